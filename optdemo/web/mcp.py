"""MCP tools (``--mcp``): plan, status, generate and chat for agents, through Gradio's own MCP server.

Only state-free endpoints are tools (an MCP client has no session of its own here): /plan, /status,
/generate and /chat_messages, which takes the whole conversation each time. Gradio offers no
per-endpoint MCP switch but visibility, which would cost gradio_client its keyword arguments, so
every endpoint stays public and the MCP server's tool map is cut to :data:`MCP_ENDPOINTS` as it
starts (:func:`keep_only_mcp_tools`, from the app's lifespan). :class:`McpGate` bounds the MCP
requests in flight (Gradio's MCP server holds a thread of anyio's default pool per tool call, the
pool every route's login check needs), and with ``--api-key`` :class:`McpKeyGuard` makes the MCP
server want the key as /v1 does; the UI and the named API stay as open as the app itself.
"""

from __future__ import annotations

import hmac

import gradio as gr
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from optdemo.app.openai_format import OpenAIError, conversation
from optdemo.app.service import DemoService
from optdemo.app.settings import AppSettings
from optdemo.core import defaults
from optdemo.core.errors import GenerationError
from optdemo.core.generation import CacheScope
from optdemo.web.api import reply_group, session_of
from optdemo.web.errors import user_errors

# The named endpoints offered as MCP tools; every other public endpoint is hidden from MCP.
MCP_ENDPOINTS = ("plan", "status", "generate", "chat_messages")
MCP_PATH = "/gradio_api/mcp"  # where Gradio mounts its MCP server (every transport under it)
KEY_REQUIRED = (
    "a valid API key is required: send it as 'Authorization: Bearer KEY' (the key given to the "
    "server with --api-key)"
)
# MCP clients send the whole conversation each time and share one session: one shared scope.
MCP_SCOPE = CacheScope("mcp")


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
        session = session_of(request)
        for step in service.chat(
            session, history, message, params, system_prompt=system, cache_scope=MCP_SCOPE
        ):
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


class McpKeyGuard:
    """ASGI middleware: a request to the MCP server without ``Authorization: Bearer KEY`` is
    answered 401 (OpenAI's error shape, as /v1's), never reaching it; other paths pass untouched.

    Args:
        app: the application it wraps (Gradio's).
        key: the bearer token (``--api-key``); compared in constant time, never shown.
    """

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_mcp_path(scope.get("path", "")) and not self._allowed(scope):
            error = {"message": KEY_REQUIRED, "type": "authentication_error", "param": None}
            body = {"error": {**error, "code": "invalid_api_key"}}
            await JSONResponse(body, 401, {"WWW-Authenticate": "Bearer"})(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"), self._key)


def is_mcp_path(path: str) -> bool:
    """Whether ``path`` (behind any root path) is the MCP server's or below it."""
    index = path.find(MCP_PATH)
    return index >= 0 and path[index + len(MCP_PATH) : index + len(MCP_PATH) + 1] in ("", "/")


def mcp_middleware(settings: AppSettings) -> list[Middleware]:
    """The middleware Gradio's app needs for MCP here: the key guard with ``--mcp`` and
    ``--api-key``, else none."""
    if not settings.mcp or not settings.api_key:
        return []
    return [Middleware(McpKeyGuard, key=settings.api_key)]


class McpGate:
    """ASGI middleware: at most ``limit`` requests to Gradio's MCP server at once (a tool call is
    one request, open until its result); past that, a 429 at once. Other paths pass untouched."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.in_flight = 0  # the event loop's own count: no lock, ASGI calls share one thread

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_mcp_path(scope.get("path", "")):
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
