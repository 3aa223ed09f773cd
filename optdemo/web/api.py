"""The named API endpoints, for ``gradio_client`` users (and the app's own tests).

Each endpoint is a typed function registered with ``gr.api``: its parameter names are the API's.
They call the same :class:`~optdemo.app.service.DemoService` methods as the tabs, so the browser and
the API can never disagree. Errors come back as ``gr.Error`` messages; the next call works.

Who a call is comes from two places, never mixed: the Gradio session hash keys a client's chat
history and its Stop (:func:`session_of`); admin rights come only from the credential a sign-in
issued, sent back as ``Authorization: Bearer TOKEN`` or the browser's cookie (:func:`admin_of`).
The session hash is chosen by the client and shows in URLs and logs: it is never a credential.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

from optdemo.app.service import DemoService
from optdemo.core import defaults
from optdemo.core.errors import AccessError
from optdemo.core.load_config import LoadConfig
from optdemo.web.errors import user_errors

ADMIN_COOKIE = "optdemo_admin"  # the browser's admin credential (HttpOnly, SameSite=Strict)
# The only routes by which /sign_in answers: a direct HTTP request, whose answer goes back to that
# caller alone. Through the queue (/queue/join, /call/...) an answer travels on the session's event
# stream, which anyone who knows the session hash can open.
DIRECT_ROUTES = ("run", "api")
QUEUE_SIGN_IN = (
    "sign in with a direct request, POST /gradio_api/run/sign_in, as docs/USAGE.md shows: through "
    "the queue the credential would travel on a stream that anyone who knows this session's id can read"
)

MODEL_GROUP = "model"  # loading and unloading: one at a time
# Replies (chat, completion, from the UI, the API and MCP) share the model through the batching
# engine. Gradio starts every reply event at once: the service's admission (--queue-size plus
# --max-batch places, optdemo/app/admission.py) lets a reply in or refuses it there and then, and
# the engine's own line tells the ones let in their place. A Gradio limit here would make a second
# line in front of that one, which neither counts against the limit nor says where one stands.
# A load stops the running replies itself (ModelManager.load).
REPLY_GROUP = "replies"


def reply_group(service: DemoService) -> dict:
    """The concurrency settings of every reply event: the replies group, which Gradio does not
    limit, since ``service.admission`` does (one limit for the page, the APIs and MCP)."""
    return {"concurrency_id": REPLY_GROUP, "concurrency_limit": None}


# Plans touch no weights: a few run at once, in their own group, beside a load or a reply.
PLAN_GROUP = {"concurrency_id": "plan", "concurrency_limit": 4}


class Endpoints:
    """The named endpoints as methods over one service: their parameter names are the API's."""

    def __init__(self, service: DemoService) -> None:
        self.service = service

    @user_errors
    def plan(
        self,
        model: str,
        max_memory: str = "",
        dtype: str = "auto",
        offload_folder: str = "",
        cpu_layers: str = defaults.DEFAULT_CPU_LAYERS,
        disk_tier: str = defaults.DEFAULT_DISK_TIER,
        quantization: str = "none",
        draft: str = "none",
        request: gr.Request = None,
    ) -> dict:
        """Plan where the model's layers would go under max_memory, without touching weights.
        Returns device_map (module -> device), bytes_per_device, fits and warnings; with a GPU in
        the map, prediction.cpu_layers says where offloaded layers would run.

        Args:
            model: an OPT size (opt-1.3b), a Hugging Face Hub id or a local folder; tiny-opt is built in.
            max_memory: budget per device, e.g. "0=5GiB,cpu=20GiB"; empty: suggested for this machine.
            dtype: auto, float16, bfloat16 or float32.
            offload_folder: folder for the layers that fit no memory budget (empty: none).
            cpu_layers: with a GPU, where offloaded layers run: auto, accelerate, gpu or cpu.
            disk_tier: on a CPU-executed model, how disk layers are served: auto, map or stream.
            quantization: none, 8bit or 4bit (bitsandbytes on a GPU; torch's int8/int4 kernels on
                a CPU-only machine, where the plan's sizes are the quantized ones).
            draft: speculative decoding's draft: none, 8bit or 4bit (the model's own copy, kept in
                RAM), or a smaller model sharing its tokenizer; the plan gives its memory and
                prediction.draft the speed with and without it.
        """
        config = self._config(
            model, max_memory, dtype, offload_folder, cpu_layers, disk_tier, request, quantization, draft
        )
        return self.service.plan(config).to_dict()

    @user_errors
    def load(
        self,
        model: str,
        max_memory: str = "",
        dtype: str = "auto",
        offload_folder: str = "",
        cpu_layers: str = defaults.DEFAULT_CPU_LAYERS,
        disk_tier: str = defaults.DEFAULT_DISK_TIER,
        quantization: str = "none",
        draft: str = "none",
        request: gr.Request = None,
    ) -> dict:
        """Load the model (or reuse it when the configuration is unchanged). Returns status
        ("loaded" or "reused"), load_seconds, device_map, bytes_per_device, cpu_layers (with a GPU
        in the map: the policy in force and why) and disk_tier (what is memory-mapped, what is
        streamed, and why). draft as in /plan: replies alone on the model are then decoded
        speculatively, and their stats say how many drafted tokens were kept."""
        config = self._config(
            model, max_memory, dtype, offload_folder, cpu_layers, disk_tier, request, quantization, draft
        )
        return self.service.load(config, admin=admin_of(request)).to_dict()

    def _config(
        self,
        model: str,
        max_memory: str,
        dtype: str,
        offload_folder: str,
        cpu_layers: str,
        disk_tier: str,
        request: gr.Request | None,
        quantization: str = "none",
        draft: str = "none",
    ) -> LoadConfig:
        """The configuration /plan and /load describe, checked for this caller."""
        return self.service.make_config(
            model,
            max_memory,
            dtype,
            offload_folder or None,
            cpu_layers=cpu_layers,
            admin=admin_of(request),
            disk_tier=disk_tier,
            quantization=quantization,
            draft=draft,
        )

    @user_errors
    def unload(self, request: gr.Request = None) -> dict:
        """Unload the model and free its memory."""
        was_loaded = self.service.unload(admin_of(request))
        return {"unloaded": was_loaded, "status": self.service.status().to_dict()}

    @user_errors
    def status(self) -> dict:
        """The loaded model and its configuration, or loaded: false."""
        return self.service.status().to_dict()

    @user_errors
    def chat(
        self,
        message: str,
        max_new_tokens: int = defaults.MAX_NEW_TOKENS,
        temperature: float = defaults.TEMPERATURE,
        top_p: float = defaults.TOP_P,
        top_k: int = defaults.TOP_K,
        repetition_penalty: float = defaults.REPETITION_PENALTY,
        seed: int = -1,
        stop: list[str] | None = None,
        system_prompt: str = "",
        request: gr.Request = None,
    ) -> Iterator[str]:
        """Send a chat message; streams the reply, the final value is the whole reply. Each client
        session keeps its own history (clear it with /clear_chat). seed -1 is random; stop lists
        texts that end the reply (not included); system_prompt replaces the default instructions.
        max_new_tokens is at most min(the operator's cap, the model's window minus the prompt)."""
        session = session_of(request)
        params = self.service.params(
            max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop or ()
        )
        history = self.service.api_history(session)
        reply = ""
        admin = admin_of(request)
        for step in self.service.chat(session, history, message, params, system_prompt, admin=admin):
            reply = step.text
            yield reply
        if has_session(request):  # a call without a session has no history to keep
            self.service.remember_api_turn(session, (message, reply))

    @user_errors
    def generate(
        self,
        prompt: str,
        max_new_tokens: int = defaults.MAX_NEW_TOKENS,
        temperature: float = defaults.TEMPERATURE,
        top_p: float = defaults.TOP_P,
        top_k: int = defaults.TOP_K,
        repetition_penalty: float = defaults.REPETITION_PENALTY,
        seed: int = -1,
        stop: list[str] | None = None,
        request: gr.Request = None,
    ) -> Iterator[str]:
        """Continue the prompt; streams the text, the final value is the whole continuation.
        Same sampling settings as /chat."""
        params = self.service.params(
            max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop or ()
        )
        for step in self.service.complete(session_of(request), prompt, params, admin=admin_of(request)):
            yield step.text

    def stop(self, request: gr.Request = None) -> bool:
        """Stop this session's running reply; true if one was running."""
        return self.service.stop(session_of(request))

    def clear_chat(self, request: gr.Request = None) -> bool:
        """Forget this session's API chat history."""
        self.service.forget_api_history(session_of(request))
        return True

    @user_errors
    def sign_in(self, username: str, password: str, request: gr.Request = None) -> dict:
        """Sign in as an admin (public mode, an --auth account). Returns token, expires_in and
        idle_timeout (seconds): send "Authorization: Bearer <token>" with admin calls. Only by a
        direct request (POST /gradio_api/run/sign_in); refused through the queue. From one
        address, repeated failures make each next attempt wait longer; the refusal says how long."""
        if not is_direct(request):
            raise AccessError(QUEUE_SIGN_IN)
        grant = self.service.sign_in(client_of(request), username, password)
        return {"token": grant.token, "expires_in": grant.expires_in, "idle_timeout": grant.idle_timeout}

    def sign_out(self, request: gr.Request = None) -> bool:
        """End the admin credential this call carries; true if it was live."""
        return self.service.sign_out(admin_of(request))


def register_api(service: DemoService) -> None:
    """Register /plan, /load, /unload, /status, /chat, /generate, /stop, /clear_chat, /sign_in,
    /sign_out."""
    api = Endpoints(service)
    in_group = {"concurrency_id": MODEL_GROUP, "concurrency_limit": 1}
    gr.api(api.plan, api_name="plan", **PLAN_GROUP)
    gr.api(api.load, api_name="load", **in_group)
    gr.api(api.unload, api_name="unload", **in_group)
    gr.api(api.status, api_name="status", queue=False)
    gr.api(api.chat, api_name="chat", **reply_group(service))
    gr.api(api.generate, api_name="generate", **reply_group(service))
    gr.api(api.stop, api_name="stop", queue=False)
    gr.api(api.clear_chat, api_name="clear_chat", queue=False)
    gr.api(api.sign_in, api_name="sign_in", queue=False)
    gr.api(api.sign_out, api_name="sign_out", queue=False)


def leaving(service: DemoService) -> Callable[[gr.Request], None]:
    """The page's unload callback: a browser tab closed (or reloaded) stops its session's running
    reply at once, rather than once the backend next sends something (a stalled serving endpoint
    may send nothing for minutes)."""

    def stop_on_leave(request: gr.Request) -> None:
        service.stop(session_of(request))

    return stop_on_leave


def session_of(request: Any) -> str:
    """The client session's id, which keys chat history and Stop (never admin rights): Gradio's
    session hash, or, for a call without one (a plain REST call), an id of its own that no other
    call shares."""
    session = getattr(request, "session_hash", None) if request is not None else None
    return session if session else f"call-{secrets.token_hex(8)}"


def has_session(request: Any) -> bool:
    """Whether the call came with a Gradio session hash (else nothing is kept between calls)."""
    return bool(getattr(request, "session_hash", None)) if request is not None else False


def admin_of(request: Any) -> str | None:
    """The admin credential a request carries: ``Authorization: Bearer TOKEN`` (scripts), else the
    :data:`ADMIN_COOKIE` cookie (browsers); None without one. Works on a ``gr.Request`` and on a
    Starlette request alike. Whether it is a live credential is the access policy's question."""
    if request is None:
        return None
    headers = getattr(request, "headers", None) or {}
    authorization = headers.get("authorization") or headers.get("Authorization") or ""
    scheme, _, token = str(authorization).strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    cookies = getattr(request, "cookies", None) or {}
    cookie = cookies.get(ADMIN_COOKIE)
    return str(cookie) if cookie else None


def client_of(request: Any) -> str:
    """The caller's address as Starlette sees it (the peer, or what a trusted proxy forwarded):
    failed sign-ins are counted per address."""
    client = getattr(request, "client", None) if request is not None else None
    host = getattr(client, "host", None) if client is not None else None
    return str(host) if host else "unknown"


def is_direct(request: Any) -> bool:
    """Whether the call reached the app by a direct HTTP request (``/gradio_api/run/<name>``),
    whose answer goes to that caller only, rather than through the queue."""
    url = getattr(request, "url", None) if request is not None else None
    parts = str(getattr(url, "path", "") or "").rstrip("/").split("/")
    return len(parts) >= 2 and parts[-2] in DIRECT_ROUTES
