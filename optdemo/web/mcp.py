"""MCP tools (``--mcp``): plan, status, generate and chat for agents, through Gradio's own MCP server.

Gradio (``launch(mcp_server=True)``, the ``gradio[mcp]`` extra) turns every *public* named endpoint
into an MCP tool, named after its function and described by its docstring. An MCP client has no
session of its own here (Gradio calls the app for it through one shared client), so only
state-free endpoints may be tools: /plan, /status, /generate, and /chat_messages, which takes the
whole conversation each time. The endpoints that keep per-session state (/chat's history,
/sign_in's admin rights, /stop, /clear_chat) or change the model (/load, /unload) stay callable
through the named API but are left out of the docs page and of MCP ("undocumented").
"""

from __future__ import annotations

import gradio as gr

from optdemo.app.openai_format import OpenAIError, conversation
from optdemo.app.service import DemoService
from optdemo.core import defaults
from optdemo.core.errors import GenerationError
from optdemo.core.generation import CacheScope
from optdemo.web.api import reply_group, session_of
from optdemo.web.errors import user_errors

# The named endpoints offered as MCP tools; every other public endpoint is hidden from MCP.
MCP_ENDPOINTS = ("plan", "status", "generate", "chat_messages")
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
    """Mark every public named endpoint but :data:`MCP_ENDPOINTS` "undocumented": still callable
    through the named API, absent from the docs page and from the MCP tools."""
    for fn in demo.fns.values():
        if fn.api_visibility == "public" and fn.api_name not in MCP_ENDPOINTS:
            fn.api_visibility = "undocumented"
