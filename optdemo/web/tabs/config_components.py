"""The Configuration tab's components, as dataclasses: what the tab's layout builds and the handlers
of its form, its sign-in and its endpoint choice address. Only data here, so each of those modules
imports it and none imports another."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

# The Configuration tab's two backends, also the values its radio returns.
LOCAL = "this machine"
ENDPOINT = "a serving endpoint"
BACKEND_CHOICES = (LOCAL, ENDPOINT)
# The Draft dropdown's value for "a smaller model" (the model field then names it).
DRAFT_MODEL = "model"


@dataclass
class SignIn:
    """The admin sign-in form (public mode with --auth accounts only): its buttons talk to the
    sign-in routes from the browser (optdemo.web.tabs.sign_in)."""

    user: gr.Textbox
    password: gr.Textbox  # sent only to the sign-in route, never in a Gradio event
    button: gr.Button
    message: gr.Markdown
    sign_out: gr.Button


@dataclass
class ConfigTab:
    """The Configuration tab's components."""

    model: gr.Dropdown
    revision: gr.Textbox
    dtype: gr.Dropdown
    quantization: gr.Radio
    gpu_sliders: list[gr.Slider]
    cpu_slider: gr.Slider
    advanced: gr.Textbox  # a full max_memory spec; wins over the sliders
    fast_offload: gr.Checkbox
    cpu_layers: gr.Dropdown
    disk_tier: gr.Dropdown
    tokenizer: gr.Textbox
    draft: gr.Dropdown  # speculative decoding: none, the model's 8bit / 4bit copy, or DRAFT_MODEL
    draft_model: gr.Textbox  # the draft model, when ``draft`` is DRAFT_MODEL
    offload: gr.Textbox
    offload_info: gr.Markdown
    plan_btn: gr.Button
    load_btn: gr.Button
    unload_btn: gr.Button
    status: gr.Markdown
    summary: gr.Markdown
    cache_info: gr.Markdown
    clear_cache_btn: gr.Button
    machine: gr.Markdown  # this machine's GPUs, RAM and free disk
    sign_in: SignIn | None
    plan_state: gr.State  # the session's latest PlanView, or None
    loaded: gr.State  # bumped after each load/unload so other tabs refresh
    endpoint: EndpointForm  # this machine or a serving endpoint, and which

    @property
    def fields(self) -> list:
        """The controls whose values make a LoadConfig, in the page's order."""
        return [
            self.model,
            self.revision,
            self.dtype,
            self.quantization,
            *self.gpu_sliders,
            self.cpu_slider,
            self.advanced,
            self.fast_offload,
            self.cpu_layers,
            self.disk_tier,
            self.tokenizer,
            self.offload,
            self.draft,
            self.draft_model,
        ]

    @property
    def form(self) -> set:
        """Those controls and the backend's (a set: Gradio passes them as one dict, whatever the
        number of GPUs)."""
        return {*self.fields, *self.endpoint.controls}


@dataclass
class EndpointForm:
    """Where replies come from: this machine, or a serving endpoint named by URL and model (the
    token field only where the operator is the one at the page: outside public mode)."""

    backend: gr.Radio  # LOCAL or ENDPOINT
    local_box: gr.Column  # the local model's controls, shown for LOCAL
    box: gr.Column  # the endpoint's fields, shown for ENDPOINT
    url: gr.Textbox
    model: gr.Textbox
    token: gr.Textbox

    @property
    def controls(self) -> set:
        """The values a Connect needs: the choice, the URL, the model name, the token."""
        return {self.backend, self.url, self.model, self.token}
