"""The Configuration tab's choice of backend: this machine, or a serving endpoint.

"a serving endpoint" shows a URL and a model field (and, outside public mode, a token field: the
person at the machine is the operator); the tab's Load / Unload buttons become Connect /
Disconnect. In public mode the URL is the operator's (``--backend-url``) and cannot be edited, the
token field is absent, and only a signed-in admin may connect (the service enforces it).
"""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from optdemo.app.service import DemoService
from optdemo.remote.client import EngineInfo
from optdemo.web.api import admin_of
from optdemo.web.binding import Updates, bind
from optdemo.web.tabs.config_components import BACKEND_CHOICES, ENDPOINT, LOCAL, ConfigTab, EndpointForm

DISCONNECTED = "Disconnected from the serving endpoint: nothing answers until you connect or load a model."


def backend_radio(remote: bool) -> gr.Radio:
    """The choice between this machine and a serving endpoint (``remote``: the endpoint first)."""
    return gr.Radio(
        list(BACKEND_CHOICES),
        value=ENDPOINT if remote else LOCAL,
        label="Run on",
        info="This machine (Accelerate), or a serving engine (TGI, vLLM, transformers serve).",
    )


def button_labels(remote: bool) -> tuple[str, str]:
    """The load and unload buttons' labels: connect/disconnect for a serving endpoint."""
    return ("Connect", "Disconnect") if remote else ("Load model", "Unload")


def endpoint_fields(service: DemoService, backend: gr.Radio, local_box: gr.Column) -> EndpointForm:
    """The serving endpoint's fields. In public mode the URL is the operator's and fixed, and the
    token field is absent: the operator's token (from flags or environment) is used, never shown."""
    settings = service.settings
    with gr.Column(visible=bool(settings.backend_url)) as box:
        url = gr.Textbox(
            label="Endpoint URL",
            value=settings.backend_url or "",
            placeholder="http://127.0.0.1:8000 (with or without /v1)",
            interactive=not settings.public,
        )
        model = gr.Textbox(
            label="Model name",
            value=settings.backend_model or "",
            placeholder="empty: the one the engine lists",
        )
        token = gr.Textbox(
            label="Token (optional)",
            type="password",
            placeholder="empty: the operator's, for its endpoint" if settings.backend_token else "none",
            visible=not settings.public,
        )
    return EndpointForm(backend, local_box, box, url, model, token)


def connect(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """Connect to the endpoint the form names (this deployment's rules apply: in public mode only
    an admin, and only to the operator's endpoint)."""
    form = tab.endpoint
    admin = admin_of(request)  # the admin credential the browser holds (its cookie), if any
    config = service.backends.endpoint_config(
        values[form.url], values[form.model], values.get(form.token), admin
    )
    info = service.backends.connect(config, admin)
    return {tab.status: connected_text(info), tab.loaded: time.monotonic()}


def connected_text(info: EngineInfo) -> str:
    """The status line after connecting: the endpoint, its model, and what the engine told."""
    window = f"{info.context_length}-token context" if info.context_length else "context length not reported"
    return (
        f"**Connected** in {info.connect_seconds:.2f} s: {info.describe()} — {engine_phrase(info)}, "
        f"{window}. Chat and completion now come from that engine."
    )


def engine_phrase(info: EngineInfo) -> str:
    """``engine vLLM 0.11.0``, or, when the engine says nothing of itself, that it does not."""
    if info.engine or info.version:
        return f"engine {info.engine_text()}"
    return "the engine does not say which it is"


def switch_backend(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """Show the chosen backend's fields; the buttons become connect/disconnect for an endpoint.
    Nothing is connected or unloaded until a button is pressed."""
    form = tab.endpoint
    remote = values[form.backend] == ENDPOINT
    load_label, unload_label = button_labels(remote)
    return {
        form.box: gr.update(visible=remote),
        form.local_box: gr.update(visible=not remote),
        tab.plan_btn: gr.update(visible=not remote),  # a serving endpoint has no plan here
        tab.load_btn: gr.update(value=load_label),
        tab.unload_btn: gr.update(value=unload_label),
    }


def wire_endpoint_form(service: DemoService, tab: ConfigTab) -> None:
    """Switch the shown fields and the buttons' labels when the backend choice changes."""
    private: dict[str, Any] = {"api_visibility": "private"}
    form = tab.endpoint
    form.backend.change(
        bind(switch_backend, service, tab),
        {form.backend},
        [form.box, form.local_box, tab.plan_btn, tab.load_btn, tab.unload_btn],
        queue=False,
        **private,
    )
