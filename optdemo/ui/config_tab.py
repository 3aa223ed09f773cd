"""The Configuration tab: pick a model and a memory budget, see the plan at once, load, unload."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from optdemo.budget import format_bytes
from optdemo.config import CPU_LAYER_POLICIES, DTYPES, QUANTIZATIONS, LoadConfig
from optdemo.hardware import Hardware, probe_hardware, quantization_unavailable
from optdemo.service import DemoService, PlanView, describe_placement
from optdemo.status import ModelStatus
from optdemo.ui.api import MODEL_GROUP, PLAN_GROUP
from optdemo.ui.errors import to_gradio_error, user_errors
from optdemo.ui.render import plan_summary

GIB = 2**30
MAX_GPU_SLIDERS = 8  # more GPUs than this are budgeted through the advanced field


@dataclass
class ConfigTab:
    """The components other tabs and the wiring need."""

    plan_state: gr.State  # the session's latest PlanView, or None
    status: gr.Markdown
    loaded: gr.State  # bumped after each load/unload so other tabs refresh
    summary: gr.Markdown
    form: set  # the controls whose values make a LoadConfig (passed as one dict)
    preview: Callable[[dict], tuple[str, PlanView | None]]  # form values -> (summary, plan)


def hardware_summary(hardware: Hardware) -> str:
    """Markdown: this machine's GPUs, RAM and free disk."""
    if hardware.gpus:
        gpus = "; ".join(
            f"GPU {g.index} {g.name}: {format_bytes(g.free_bytes)} free of {format_bytes(g.total_bytes)}"
            for g in hardware.gpus
        )
    else:
        gpus = "no CUDA GPU (everything runs on the CPU)"
    return (
        f"**GPUs:** {gpus}  \n**RAM:** {format_bytes(hardware.ram_available_bytes)} available of "
        f"{format_bytes(hardware.ram_total_bytes)}  \n**Disk:** {format_bytes(hardware.disk_free_bytes)} "
        f"free at `{hardware.disk_path}`"
    )


def quantization_availability(hardware: Hardware) -> tuple[bool, str]:
    """Whether bitsandbytes quantization can work here, and a sentence saying why not."""
    lacking = quantization_unavailable(bool(hardware.gpus))
    if lacking:
        return False, f"8-bit / 4-bit need {lacking}."
    return True, "bitsandbytes quantizes Linear weights on the GPU."


def budget_spec(gpu_gib: list[float], cpu_gib: float, advanced: str) -> str:
    """The max_memory spec from the sliders, unless the advanced field has one (it wins)."""
    if advanced and advanced.strip():
        return advanced.strip()
    parts = [f"{index}={round(value * 1024)}MiB" for index, value in enumerate(gpu_gib)]
    parts.append(f"cpu={round(cpu_gib * 1024)}MiB")
    return ",".join(parts)


def status_text(status: ModelStatus) -> str:
    """Markdown status line for what is loaded now."""
    if not status.loaded:
        return "No model loaded yet. Choose one, check the plan, then **Load model**."
    busy = f" — {status.busy}" if status.busy else ""
    seconds = status.load_seconds or 0.0
    return (
        f"**{status.display_name}** is loaded (in {seconds:.1f} s){busy}: "
        f"{describe_placement(status.bytes_per_device)}"
    )


def create_config_tab(service: DemoService) -> ConfigTab:
    """Build the Configuration tab's components and events inside the current Blocks."""
    initial: LoadConfig = service.initial_config()
    hardware = probe_hardware(initial.offload_folder)
    quant_ok, quant_info = quantization_availability(hardware)
    locked = service.settings.public
    budget = initial.max_memory.as_max_memory() if initial.max_memory else {}

    if locked:
        gr.Markdown(
            "**Public mode:** visitors can chat and preview plans; only an admin can load, "
            "unload or change the model."
        )
    with gr.Row():
        with gr.Column(scale=3):
            model = gr.Dropdown(
                choices=service.model_choices(),
                value=initial.model,
                label="Model",
                info="An OPT size, the built-in tiny model, a Hugging Face repo id, or a local folder.",
                allow_custom_value=not locked,
                interactive=True,
            )
            with gr.Row():
                dtype = gr.Dropdown(list(DTYPES), value=initial.dtype, label="dtype", scale=1)
                revision = gr.Textbox(label="Revision", placeholder="main", scale=1)
                quantization = gr.Radio(
                    list(QUANTIZATIONS),
                    value="none",
                    label="Quantization",
                    info=quant_info,
                    interactive=quant_ok,
                    scale=2,
                )
            gpu_sliders = [
                gr.Slider(
                    0,
                    round(gpu.total_bytes / GIB, 2),
                    step=0.25,
                    value=round(budget.get(gpu.index, 0) / GIB, 2),
                    label=f"GPU {gpu.index} memory (GiB) — {gpu.name}",
                )
                for gpu in hardware.gpus[:MAX_GPU_SLIDERS]
            ]
            cpu_slider = gr.Slider(
                0,
                round(hardware.ram_total_bytes / GIB, 2),
                step=0.25,
                value=round(budget.get("cpu", 0) / GIB, 2),
                label="CPU RAM (GiB)",
                info="Layers that fit neither GPU nor this budget go to the offload folder on disk.",
            )
            with gr.Accordion("Advanced", open=bool(service.settings.max_memory)):
                advanced = gr.Textbox(
                    label="max_memory (overrides the sliders)",
                    value=service.settings.max_memory or "",
                    placeholder='0=5GiB,cpu=20GiB   or   {0: "5GiB", "cpu": "20GiB"}',
                )
                fast_offload = gr.Checkbox(
                    value=True,
                    label="Fast offloading",
                    info="Memory-map disk layers, convert .bin checkpoints once. Off: plain Accelerate.",
                )
                # Only meaningful with a GPU in the map; hidden (and "auto") without one.
                cpu_layers = gr.Dropdown(
                    list(CPU_LAYER_POLICIES),
                    value="auto",
                    label="CPU-resident layers run on",
                    info="With a GPU: auto picks the faster of GPU (weights cross PCIe) and CPU.",
                    visible=bool(hardware.gpus),
                )
                tokenizer = gr.Textbox(
                    label="Tokenizer (optional)",
                    placeholder="another repo id or folder; empty: the model's own",
                    interactive=not locked,
                )
            offload = gr.Textbox(
                label="Offload folder",
                value=initial.offload_folder or "",
                placeholder="./offload — needed when layers go to disk",
            )
            offload_info = gr.Markdown(f"Free space there: {format_bytes(hardware.disk_free_bytes)}")
            with gr.Row():
                plan_btn = gr.Button("Plan", variant="secondary")
                load_btn = gr.Button("Load model", variant="primary", interactive=not locked)
                unload_btn = gr.Button("Unload", variant="stop", interactive=not locked)
            status = gr.Markdown(status_text(service.status()), elem_id="od-status")
        with gr.Column(scale=2):
            gr.Markdown("### Plan")
            summary = gr.Markdown("Planning…", elem_id="od-plan-summary")
            gr.Markdown("### This machine")
            gr.Markdown(hardware_summary(hardware))
            with gr.Row():
                cache_info = gr.Markdown(f"**Conversion cache:** {service.conversion_cache()}")
                clear_cache_btn = gr.Button("Clear cache", size="sm", scale=0, interactive=not locked)
            if locked and service.settings.auth:
                with gr.Accordion("Admin sign-in", open=False):
                    user = gr.Textbox(label="Username")
                    password = gr.Textbox(label="Password", type="password")
                    sign_in_btn = gr.Button("Sign in")
                    sign_in_msg = gr.Markdown()

    plan_state = gr.State(None)
    loaded = gr.State(0)
    # A set of inputs makes Gradio pass one {component: value} dict, whatever the number of GPUs.
    form = {
        model,
        revision,
        dtype,
        *gpu_sliders,
        cpu_slider,
        advanced,
        offload,
        quantization,
        tokenizer,
        fast_offload,
        cpu_layers,
    }

    def config_from_form(values: dict) -> LoadConfig:
        return service.make_config(
            model=values[model] or "",
            max_memory=budget_spec(
                [float(values[s] or 0) for s in gpu_sliders],
                float(values[cpu_slider] or 0),
                values[advanced] or "",
            ),
            dtype=values[dtype] or "auto",
            offload_folder=values[offload] or None,
            revision=values[revision] or None,
            quantization=values[quantization] or "none",
            tokenizer=values[tokenizer] or None,
            fast_offload=bool(values[fast_offload]),
            cpu_layers=values[cpu_layers] or "auto",
        )

    def preview(values: dict) -> tuple[str, PlanView | None]:
        # Shown in place, not as a pop-up: this runs on every change of a control.
        try:
            view = service.plan(config_from_form(values))
        except Exception as exc:  # noqa: BLE001 - rendered as a message in the summary
            return f"**Cannot plan:** {to_gradio_error(exc).message}", None
        return plan_summary(view.plan, view.prediction), view

    @user_errors
    def load_model(values: dict, request: gr.Request, progress: gr.Progress = gr.Progress()) -> tuple:
        config = config_from_form(values)

        def report(fraction: float | None, text: str) -> None:
            progress(fraction, desc=text)

        result = service.load(config, session_id=request.session_hash, progress=report)
        verb = "Reused" if result.status == "reused" else "Loaded"
        placement = describe_placement(result.bytes_per_device)
        check = "as planned ✓" if result.matches_plan else "⚠ differs from the plan (see Device map)"
        message = f"**{verb}** {config.display_name} in {result.load_seconds:.2f} s — {placement} — {check}"
        if result.status == "reused":
            message += "  \nConfiguration unchanged: nothing was reloaded."
        return message, service.view(result.plan), time_token()

    @user_errors
    def unload_model(request: gr.Request) -> tuple:
        was_loaded = service.unload(request.session_hash)
        return ("Model unloaded; memory released." if was_loaded else "Nothing was loaded."), time_token()

    @user_errors
    def clear_cache(request: gr.Request) -> str:
        freed = service.clear_conversion_cache(request.session_hash)
        return f"**Conversion cache:** cleared ({format_bytes(freed)} freed). {service.conversion_cache()}"

    def free_space(folder: str) -> str:
        info = probe_hardware(folder or None)
        return f"Free space at `{info.disk_path}`: {format_bytes(info.disk_free_bytes)}"

    # Every control re-plans at once (sliders when released, text fields on Enter or leaving them).
    gr.on(
        [
            plan_btn.click,
            *(c.change for c in (model, dtype, quantization, fast_offload, cpu_layers)),
            *(slider.release for slider in (*gpu_sliders, cpu_slider)),
            *(text.submit for text in (revision, advanced, offload, tokenizer)),
            *(text.blur for text in (revision, advanced, offload, tokenizer)),
        ],
        preview,
        form,
        [summary, plan_state],
        api_visibility="private",
        trigger_mode="always_last",
        **PLAN_GROUP,
    )
    offload.blur(free_space, offload, offload_info, api_visibility="private", queue=False)
    clear_cache_btn.click(clear_cache, None, cache_info, api_visibility="private", concurrency_id=MODEL_GROUP)
    load_btn.click(
        load_model,
        form,
        [status, plan_state, loaded],
        api_visibility="private",
        concurrency_id=MODEL_GROUP,
        concurrency_limit=1,
    )
    unload_btn.click(
        unload_model,
        None,
        [status, loaded],
        api_visibility="private",
        concurrency_id=MODEL_GROUP,
        concurrency_limit=1,
    )
    if locked and service.settings.auth:

        def sign_in_admin(username: str, secret: str, request: gr.Request) -> tuple:
            if not service.sign_in(request.session_hash, username, secret):
                return "Wrong username or password.", *(gr.update() for _ in range(5))
            unlocked = gr.update(interactive=True)
            message = "Signed in as admin: you can load, unload and clear the cache."
            return message, unlocked, unlocked, unlocked, unlocked, gr.update(allow_custom_value=True)

        sign_in_btn.click(
            sign_in_admin,
            [user, password],
            [sign_in_msg, load_btn, unload_btn, clear_cache_btn, tokenizer, model],
            api_visibility="private",
            queue=False,
        )
    return ConfigTab(plan_state, status, loaded, summary, form, preview)


def time_token() -> float:
    """A fresh value for a State whose change tells other tabs to refresh."""
    import time

    return time.monotonic()
