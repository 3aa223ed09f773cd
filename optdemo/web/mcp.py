"""MCP tools (``--mcp``): plan, status, generate and chat for agents, through Gradio's own MCP server.

Gradio (``launch(mcp_server=True)``, the ``gradio[mcp]`` extra) turns every *public* named endpoint
into an MCP tool, named after its function and described by its docstring. An MCP client has no
session of its own here (Gradio calls the app for it through one shared client), so only
state-free endpoints may be tools: /plan, /status, /generate, and /chat_messages, which takes the
whole conversation each time. The endpoints that keep per-session state (/chat's history,
/sign_in's admin rights, /stop, /clear_chat) or change the model (/load, /unload) are no tools.

Gradio 6.31 has no per-endpoint MCP switch but an endpoint's visibility, and an "undocumented"
endpoint loses gradio_client's keyword arguments and defaults (issue 23). So every endpoint stays
public, and the tools are chosen in Gradio's MCP server itself: its ``tool_to_endpoint`` map, which
listing, describing and calling tools all read, is cut to :data:`MCP_ENDPOINTS` as the server
starts (the app's lifespan calls :func:`keep_only_mcp_tools`), before it answers anyone.

Gradio's MCP server waits for each queued tool call in a thread of anyio's default limiter, the
one FastAPI's login check of every Gradio route needs (the tool call's own request to the queue
included): :class:`McpGate` bounds the MCP requests in flight, so that limiter can be sized above
them (optdemo/web/blocks.py) and MCP can never stall the app.
"""

from __future__ import annotations

import gradio as gr
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from optdemo.app.openai_format import OpenAIError, conversation
from optdemo.app.service import DemoService
from optdemo.core import defaults
from optdemo.core.errors import GenerationError
from optdemo.web.api import reply_group, session_of
from optdemo.web.errors import user_errors

# The named endpoints offered as MCP tools; every other public endpoint is hidden from MCP.
MCP_ENDPOINTS = ("plan", "status", "generate", "chat_messages")
MCP_PATH = "/gradio_api/mcp"  # where Gradio mounts its MCP server


def register_mcp_tools(service: DemoService) -> None:
    """Register /chat_messages, the state-free chat tool (call inside the Blocks)."""

    @user_errors
    def chat_messages(
        messages: list[dict],
        max_new_tokens: int = defaults.MAX_NEW_TOKENS,
        temperature: float = defaults.TEMPERATURE,
        top_p: float = defaults.TOP_P,
        request: gr.Request = None,
    ) -> str:
        """Reply to a conversation as the assistant of the model loaded in optdemo. State-free: send
        the whole conversation each time. The model is a plain language model, not instruction-tuned,
        so replies are short and may be off the mark. Roles are user, assistant and system.

        Args:
            messages: the whole conversation, oldest first, as [{role, content}]; the user's comes last.
            max_new_tokens: most tokens the reply may have (the server caps it).
            temperature: randomness of sampling; 0 always picks the likeliest token (repeatable).
            top_p: nucleus sampling mass, between 0 (excluded) and 1.
        Returns:
            the assistant's reply (text)
        """
        try:
            history, message, system = conversation(messages, service.settings.max_message_chars)
        except OpenAIError as err:
            raise GenerationError(err.message) from None
        params = service.params(max_new_tokens, temperature, top_p)
        reply = ""
        for step in service.chat(session_of(request), history, message, params, system_prompt=system):
            reply = step.text
        return reply

    gr.api(chat_messages, api_name="chat_messages", **reply_group(service))


def keep_only_mcp_tools(demo: gr.Blocks) -> None:
    """Cut the tools of ``demo``'s MCP server (none without ``--mcp``) to :data:`MCP_ENDPOINTS`:
    the other endpoints are neither listed nor callable as tools, and stay public to the named API
    (keyword arguments included)."""
    server = demo.mcp_server_obj
    if server is None:
        return
    server.tool_to_endpoint = {
        tool: endpoint
        for tool, endpoint in server.tool_to_endpoint.items()
        if endpoint.lstrip("/") in MCP_ENDPOINTS
    }


class McpGate:
    """ASGI middleware: at most ``limit`` requests to Gradio's MCP server at once (a tool call is
    one request, open until its result); past that, a 429 at once. Other paths pass untouched."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0  # the event loop's own count: no lock, ASGI calls share one thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _is_mcp(scope):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            message = f"too many MCP requests are running (at most {self.limit} here): try again in a moment"
            refusal = JSONResponse({"error": message}, status_code=429, headers={"Retry-After": "1"})
            await refusal(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


def _is_mcp(scope: Scope) -> bool:
    """Whether a request is for Gradio's MCP server (its path past the app's root path)."""
    path, root = scope["path"], scope.get("root_path") or ""
    if root and path.startswith(root):
        path = path[len(root) :]
    return path == MCP_PATH or path.startswith(MCP_PATH + "/")
