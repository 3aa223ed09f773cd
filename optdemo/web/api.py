"""The named API endpoints, for ``gradio_client`` users (and the app's own tests).

Each endpoint is a typed function registered with ``gr.api``: its parameter names are the API's.
They call the same :class:`~optdemo.app.service.DemoService` methods as the tabs, so the browser and
the API can never disagree. Errors come back as ``gr.Error`` messages; the next call works.
"""

from __future__ import annotations

from collections.abc import Iterator

import gradio as gr

from optdemo.app.service import DemoService
from optdemo.core import defaults
from optdemo.core.load_config import LoadConfig
from optdemo.web.errors import user_errors

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
        """
        config = self._config(
            model, max_memory, dtype, offload_folder, cpu_layers, disk_tier, request, quantization
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
        request: gr.Request = None,
    ) -> dict:
        """Load the model (or reuse it when the configuration is unchanged). Returns status
        ("loaded" or "reused"), load_seconds, device_map, bytes_per_device, cpu_layers (with a GPU
        in the map: the policy in force and why) and disk_tier (what is memory-mapped, what is
        streamed, and why)."""
        config = self._config(
            model, max_memory, dtype, offload_folder, cpu_layers, disk_tier, request, quantization
        )
        return self.service.load(config, session_id=session_of(request)).to_dict()

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
    ) -> LoadConfig:
        """The configuration /plan and /load describe, checked for this client session."""
        return self.service.make_config(
            model,
            max_memory,
            dtype,
            offload_folder or None,
            cpu_layers=cpu_layers,
            session_id=session_of(request),
            disk_tier=disk_tier,
            quantization=quantization,
        )

    @user_errors
    def unload(self, request: gr.Request = None) -> dict:
        """Unload the model and free its memory."""
        was_loaded = self.service.unload(session_of(request))
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
        for step in self.service.chat(session, history, message, params, system_prompt):
            reply = step.text
            yield reply
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
        for step in self.service.complete(session_of(request), prompt, params):
            yield step.text

    def stop(self, request: gr.Request = None) -> bool:
        """Stop this session's running reply; true if one was running."""
        return self.service.stop(session_of(request))

    def clear_chat(self, request: gr.Request = None) -> bool:
        """Forget this session's API chat history."""
        self.service.forget_api_history(session_of(request))
        return True

    def sign_in(self, username: str, password: str, request: gr.Request = None) -> bool:
        """Become an admin for this session in public mode (with an --auth account)."""
        return self.service.sign_in(session_of(request), username, password)


def register_api(service: DemoService) -> None:
    """Register /plan, /load, /unload, /status, /chat, /generate, /stop, /clear_chat, /sign_in."""
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


def session_of(request: gr.Request | None) -> str:
    """The client session's id (``"anonymous"`` for a call without one)."""
    return request.session_hash if request is not None and request.session_hash else "anonymous"
