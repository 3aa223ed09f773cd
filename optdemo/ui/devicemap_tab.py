"""The Device map tab: where every layer goes (the plan) and where it went (the loaded model)."""

from __future__ import annotations

import gradio as gr

from optdemo.service import DemoService
from optdemo.ui.render import device_map_rows, render_device_map

TABLE_HEADERS = ["Module", "Device", "Size", "Planned", "Difference"]
EMPTY_HTML = (
    '<div style="padding:24px;color:#6b7280;font:14px system-ui,sans-serif">No plan yet: choose a model '
    "in the Configuration tab.</div>"
)


def render_tab(plan: dict | None, service: DemoService) -> tuple[str, str, list[list[str]]]:
    """Heading, picture and table for this session's plan and the loaded model.

    The loaded model is drawn with its actual placement (differences from its plan outlined in
    red); a plan preview for a different configuration is drawn above it.
    """
    status = service.manager.status().to_dict()
    loaded_plan = status.get("plan")
    sections: list[str] = []
    heading: list[str] = []
    table: list[list[str]] = []
    showing_loaded = loaded_plan is not None
    if plan is not None and not (showing_loaded and _same_plan(plan, loaded_plan)):
        sections.append(render_device_map(plan, title=f"Plan preview: {plan['display_name']} (not loaded)"))
        heading.append(
            f"**Plan preview** for {plan['display_name']}: nothing is loaded for it yet.{_speed(plan)}"
        )
        table = device_map_rows(plan)
    if showing_loaded:
        actual = status["device_map"]
        differences = [row for row in device_map_rows(loaded_plan, actual) if row[4]]
        verdict = (
            "every module is where the plan put it ✓"
            if not differences
            else f"⚠ {len(differences)} module(s) differ from the plan (outlined in red)"
        )
        # The legend shows the bytes that really landed on each device.
        landed = {**loaded_plan, "bytes_per_device": status["bytes_per_device"]}
        title = f"Loaded: {status['display_name']} — actual placement"
        sections.append(render_device_map(landed, actual, title=title))
        prediction = service.loaded_prediction()
        speed = f" Predicted speed: {prediction['summary']}." if prediction else ""
        measured = status.get("last_generation")
        if measured and measured.get("tokens_per_second"):
            rate = measured["tokens_per_second"]
            speed += f" Measured on the last reply: {1 / rate:.3g} s/token ({rate:.3g} tokens/s)."
        tier = status.get("disk_tier") or {}
        mapped = (
            " Disk layers are memory-mapped (served from the page cache, no per-token copies)."
            if tier.get("memory_mapped_modules")
            else ""
        )
        policy = status.get("cpu_layers")
        runs = (
            f" CPU-resident layers run on the {policy['runs_on'].upper()}: {policy['reason']}."
            if policy
            else ""
        )
        heading.append(f"**Loaded** {status['display_name']}: {verdict}.{speed}{mapped}{runs}")
        table = table or device_map_rows(loaded_plan, actual)
    if not sections:
        return "", EMPTY_HTML, []
    return "  \n".join(heading), '<hr style="margin:16px 0">'.join(sections), table


def _speed(plan: dict) -> str:
    prediction = plan.get("prediction")
    return f" Predicted speed: {prediction['summary']}." if prediction else ""


def _same_plan(plan: dict, loaded_plan: dict) -> bool:
    """Whether the session's plan is for the configuration the loaded model was loaded with
    (warnings may differ: they depend on the free RAM at the time)."""
    keys = ("model", "dtype", "budget", "device_map")
    return all(plan.get(key) == loaded_plan.get(key) for key in keys)


def create_devicemap_tab(service: DemoService) -> tuple[gr.Markdown, gr.HTML, gr.Dataframe]:
    """Build the Device map tab's components; the wiring refreshes them."""
    gr.Markdown(
        "Each block is a decoder layer (numbered), an embedding, the final norm or the LM head, "
        "coloured by where its weights live: **GPUs** green, **CPU** blue, **disk** orange. Hover a "
        "block for its name and size."
    )
    heading = gr.Markdown(elem_id="od-map-heading")
    picture = gr.HTML(EMPTY_HTML, elem_id="od-devicemap")
    with gr.Accordion("Module table", open=False):
        table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True)
    return heading, picture, table
