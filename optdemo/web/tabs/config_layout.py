"""The Configuration tab's layout: the components a :class:`~optdemo.web.tabs.config_components.ConfigTab`
holds, built inside the current Blocks from the service's initial configuration and this machine's
hardware (the sliders' ranges). The handlers and the wiring are in :mod:`optdemo.web.tabs.config`.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

import optdemo.web.tabs.endpoint_form as endpoint_form  # (not "from optdemo.web": no cycle via the package)
import optdemo.web.tabs.sign_in as sign_in_form
from optdemo.app.machine import probe
from optdemo.app.service import DemoService
from optdemo.core.load_config import DTYPES, QUANTIZATIONS, LoadConfig
from optdemo.system.hardware import Hardware
from optdemo.web.tabs.config_components import DRAFT_MODEL, ConfigTab
from optdemo.web.tabs.config_text import (
    GIB,
    hardware_summary,
    offload_info,
    quantization_availability,
    status_for,
)

MAX_GPU_SLIDERS = 8  # more GPUs than this are budgeted through the advanced field


# ---------------------------------------------------------------------------------- layout
def layout_config_tab(service: DemoService) -> ConfigTab:
    """Build the Configuration tab's components inside the current Blocks."""
    initial: LoadConfig = service.initial_config()
    hardware = probe(initial.offload_folder)
    locked = service.settings.public
    if locked:
        gr.Markdown(
            "**Public mode:** visitors can chat and preview plans; only an admin can load, "
            "unload or change the model."
        )
    remote = bool(service.settings.backend_url)
    with gr.Row():
        with gr.Column(scale=3):
            backend, local_box = endpoint_form.backend_radio(remote), gr.Column(visible=not remote)
            with local_box:
                form = _form(service, initial, hardware)
            endpoint = endpoint_form.endpoint_fields(service, backend, local_box)
            with gr.Row():
                load_label, unload_label = endpoint_form.button_labels(remote)
                plan_btn = gr.Button("Plan", variant="secondary", visible=not remote)
                load_btn = gr.Button(load_label, variant="primary", interactive=not locked)
                unload_btn = gr.Button(unload_label, variant="stop", interactive=not locked)
        with gr.Column(scale=2):
            # At the top, beside the form: a load's progress shows without scrolling on a laptop.
            status = gr.Markdown(status_for(service, None), elem_id="od-status", elem_classes=["od-paths"])
            gr.Markdown("### Plan")
            summary = gr.Markdown("Planning…", elem_id="od-plan-summary")
            gr.Markdown("### This machine")
            machine = gr.Markdown(hardware_summary(hardware), elem_id="od-machine", elem_classes=["od-paths"])
            with gr.Row():
                cache_info = gr.Markdown(
                    f"**Conversion cache:** {service.conversion_cache()}",
                    elem_id="od-cache",
                    elem_classes=["od-paths"],
                )
                clear_cache_btn = gr.Button("Clear cache", size="sm", scale=0, interactive=not locked)
            sign_in = sign_in_form.layout_sign_in() if locked and service.settings.auth else None
    return ConfigTab(
        **form,
        plan_btn=plan_btn,
        load_btn=load_btn,
        unload_btn=unload_btn,
        status=status,
        summary=summary,
        cache_info=cache_info,
        clear_cache_btn=clear_cache_btn,
        machine=machine,
        sign_in=sign_in,
        plan_state=gr.State(None),
        loaded=gr.State(0),
        endpoint=endpoint,
    )


def _form(service: DemoService, initial: LoadConfig, hardware: Hardware) -> dict[str, Any]:
    """The controls that make a configuration, by ConfigTab field name."""
    locked = service.settings.public
    quant_ok, quant_info = quantization_availability(hardware)
    budget = initial.max_memory.as_max_memory() if initial.max_memory else {}
    controls: dict[str, Any] = {}
    controls["model"] = gr.Dropdown(
        choices=service.model_choices(),
        value=initial.model,
        label="Model",
        info="An OPT size, the built-in tiny model, a Hugging Face repo id, or a local folder.",
        # Typed names are accepted even in public mode: the plan then says whether this
        # deployment offers the model (the box never keeps a refused name without a word).
        allow_custom_value=True,
        interactive=True,
    )
    with gr.Row():
        controls["dtype"] = gr.Dropdown(list(DTYPES), value=initial.dtype, label="dtype", scale=1)
        controls["revision"] = gr.Textbox(label="Revision", placeholder="main", scale=1)
        controls["quantization"] = gr.Radio(
            list(QUANTIZATIONS),
            value=initial.quantization,
            label="Quantization",
            info=quant_info,
            interactive=quant_ok,
            scale=2,
        )
    controls["gpu_sliders"] = [
        gr.Slider(
            0,
            round(gpu.total_bytes / GIB, 2),
            step=0.25,
            value=round(budget.get(gpu.index, 0) / GIB, 2),
            label=f"GPU {gpu.index} memory (GiB) — {gpu.name}",
        )
        for gpu in hardware.gpus[:MAX_GPU_SLIDERS]
    ]
    controls["cpu_slider"] = gr.Slider(
        0,
        round(hardware.ram_total_bytes / GIB, 2),
        step=0.25,
        value=round(budget.get("cpu", 0) / GIB, 2),
        label="CPU RAM (GiB)",
        info="Layers that fit neither GPU nor this budget go to the offload folder on disk.",
    )
    with gr.Accordion("Advanced", open=bool(service.settings.max_memory)):
        controls["advanced"] = gr.Textbox(
            label="max_memory (overrides the sliders)",
            value=service.settings.max_memory or "",
            placeholder='0=5GiB,cpu=20GiB   or   {0: "5GiB", "cpu": "20GiB"}',
        )
        controls.update(_offloading_controls(initial, hardware))
        controls["tokenizer"] = gr.Textbox(
            label="Tokenizer (optional)",
            placeholder="another repo id or folder; empty: the model's own",
            interactive=not locked,
        )
        controls.update(_draft_controls(initial, locked))
    controls["offload"] = gr.Textbox(
        label="Offload folder",
        value=initial.offload_folder or "",
        placeholder="./offload — needed when layers go to disk",
    )
    controls["offload_info"] = gr.Markdown(
        offload_info(initial.offload_folder), elem_id="od-offload-info", elem_classes=["od-paths"]
    )
    return controls


def _offloading_controls(initial: LoadConfig, hardware: Hardware) -> dict[str, Any]:
    """How offloaded layers are served: fast offloading, the CPU-layer policy (with a GPU), the
    disk tier."""
    controls: dict[str, Any] = {}
    controls["fast_offload"] = gr.Checkbox(
        value=initial.fast_offload,
        label="Fast offloading",
        info="Memory-map disk layers, convert .bin checkpoints once. Off: plain Accelerate.",
    )
    # Only meaningful with a GPU in the map; hidden without one.
    controls["cpu_layers"] = gr.Dropdown(
        [
            ("auto: the faster by prediction", "auto"),
            ("gpu: prefetch weights from pinned memory", "gpu"),
            ("cpu: compute offloaded layers on the CPU", "cpu"),
            ("accelerate: plain Accelerate", "accelerate"),
        ],
        value=initial.cpu_layers,
        label="Offloaded layers run",
        info="With a GPU in the map. The Device map tab says which one is in force, and why.",
        visible=bool(hardware.gpus),
    )
    controls["disk_tier"] = gr.Dropdown(
        [
            ("auto: map what RAM can cache, stream the rest", "auto"),
            ("map: memory-map every disk layer", "map"),
            ("stream: read every disk layer past the page cache", "stream"),
        ],
        value=initial.disk_tier,
        label="Disk layers (CPU-executed models)",
        info="The Device map tab says what was mapped, what is streamed, and why.",
    )
    return controls


def _draft_controls(initial: LoadConfig, locked: bool) -> dict[str, Any]:
    """Speculative decoding's draft: none, the model's own quantized copy, or a smaller model."""
    model = initial.draft_model
    with gr.Row():
        draft = gr.Dropdown(
            [
                ("none", "none"),
                ("the model's 4bit copy (in RAM)", "4bit"),
                ("the model's 8bit copy (in RAM)", "8bit"),
                ("a smaller model sharing the tokenizer", DRAFT_MODEL),
            ],
            value=DRAFT_MODEL if model else initial.draft,
            label="Draft (speculative decoding)",
            info="Proposes tokens the model checks several at a time: faster when the model's weights "
            "stream from disk; the reply is the model's own. The plan predicts the speed with and without.",
            scale=2,
        )
        draft_model = gr.Textbox(
            value=model or "",
            label="Draft model",
            placeholder="e.g. opt-125m for any OPT",
            interactive=not locked,
            scale=1,
        )
    return {"draft": draft, "draft_model": draft_model}
