"""The Device map tab: where every layer goes (the plan), where it went (the loaded model), and
where the latest reply's time went (a bar under each block, a table, the totals that explain it).

:func:`layout_devicemap_tab` builds the components (a :class:`DeviceMapTab`), the handler
:func:`refresh` redraws them (the map, the latest reply's table, the pass running now) from the
session's plan and the loaded model, and :func:`wire_devicemap_tab` redraws on every
new plan, load or unload, when the tab is opened, and every couple of seconds (:func:`tick`: the
pass running now, and the whole map once a reply has ended).
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import gradio as gr

from optdemo.app.service import DemoService, PlanNotice, PlanView
from optdemo.app.status import BackendStatus
from optdemo.core.budget import format_bytes
from optdemo.core.defaults import SERVING_REFRESH_SECONDS
from optdemo.plan.planner import Plan
from optdemo.plan.speed import SpeedPrediction
from optdemo.remote.client import EngineInfo
from optdemo.runtime.tiers.disk_map import DiskTierReport
from optdemo.web.binding import Updates, bind
from optdemo.web.render import (
    TIMING_HEADERS,
    device_map_rows,
    progress_text,
    render_device_map,
    timing_rows,
    timing_summary,
)

TABLE_HEADERS = ["Module", "Device", "Size", "Planned", "Difference"]
EMPTY_HTML = (
    '<div style="padding:24px;color:#6b7280;font:14px system-ui,sans-serif">No plan yet: choose a model '
    "in the Configuration tab.</div>"
)
PROGRESS_AFTER_SECONDS = 1.0  # a pass shorter than this is not worth a progress line


@dataclass
class DeviceMapTab:
    """The Device map tab's components, and the session's plan it draws."""

    heading: gr.Markdown
    picture: gr.HTML
    table: gr.Dataframe
    plan_state: gr.State  # the Configuration tab's PlanView state
    progress: gr.Markdown  # the pass running now: its layer, the time left
    timing_table: gr.Dataframe  # the latest reply's time per block
    timer: gr.Timer  # refreshes the progress line, and the map once a reply has ended
    drawn: gr.State  # how many replies the model had timed when the map was drawn


def render_tab(
    view: PlanView | PlanNotice | None, status: BackendStatus, prediction: SpeedPrediction | None
) -> tuple[str, str, list[list[str]]]:
    """Heading, picture and table for this session's plan and the loaded model (``status``, with
    its predicted speed).

    The loaded model is drawn first, with its actual placement (differences from its plan
    outlined in red); a plan preview of another configuration in the form is drawn below it, never
    above, and says it is the form's.
    """
    sections: list[str] = []
    heading: list[str] = []
    table: list[list[str]] = []
    preview: str | None = None
    if isinstance(view, PlanNotice):  # a plan being computed, or none possible: say so, for whom
        heading.append(view.message)
        sections.append(_notice_html(view.message))
    elif view is not None and not (status.plan is not None and _same_plan(view.plan, status.plan)):
        plan = view.plan
        title, what = _preview_words(plan, status)
        preview = render_device_map(plan, title=title)
        heading.append(f"**Plan preview** for {what}. Predicted speed: {view.prediction.summary()}.")
        table = device_map_rows(plan)
    if status.endpoint is not None:  # no local map: what the engine reports instead
        heading.insert(0, endpoint_heading(status))
        sections.insert(0, endpoint_html(status.endpoint))
    if status.plan is not None:
        heading.append(_loaded_heading(status, prediction))
        latest = status.timing.latest if status.timing is not None else None
        if latest is not None:
            heading.append(timing_summary(latest, prediction))
        title = f"Loaded: {status.display_name} — actual placement"
        # The legend shows the bytes that really landed on each device.
        sections.append(
            render_device_map(status.plan, status.device_map, title, status.bytes_per_device, latest)
        )
        table = table or device_map_rows(status.plan, status.device_map)
    if preview is not None:
        sections.append(preview)
    if not sections:
        return "", EMPTY_HTML, []
    return "  \n".join(heading), '<hr style="margin:16px 0">'.join(sections), table


def endpoint_heading(status: BackendStatus) -> str:
    """One paragraph on the serving endpoint in use, with the last reply's measured speed."""
    assert status.endpoint is not None
    line = (
        f"**{status.endpoint.describe()}**: the model runs in that engine, so there is no local device "
        "map; the engine places the layers itself (tensor parallelism, GPUs, machines)."
    )
    measured = status.last_stats
    if measured is not None and measured.tokens_per_second:
        line += f" Measured on the last reply: {measured.tokens_per_second:.3g} tokens/s."
    return line


def endpoint_html(info: EngineInfo) -> str:
    """What the engine reported when connected, as a small table."""
    rows = [
        ("Endpoint", info.url),
        ("Model", info.model),
        ("Context length", f"{info.context_length} tokens" if info.context_length else "not reported"),
        ("Engine", info.engine_text()),
        ("Connected in", f"{info.connect_seconds:.2f} s"),
    ]
    if info.note:
        rows.append(("Note", info.note))
    cells = "".join(
        f'<tr><th style="text-align:left;padding:4px 12px 4px 0">{html.escape(k)}</th>'
        f"<td>{html.escape(v)}</td></tr>"
        for k, v in rows
    )
    return (
        '<div style="padding:16px;font:14px system-ui,sans-serif" id="od-endpoint">'
        f"<b>Serving endpoint</b><table>{cells}</table></div>"
    )


def _preview_words(plan: Plan, status: BackendStatus) -> tuple[str, str]:
    """The preview's title and what its heading calls it: the form's configuration, not loaded
    (of the model that is loaded, when it is the same model with other settings)."""
    if status.plan is None:
        return (
            f"Plan preview: {plan.display_name} (not loaded)",
            f"{plan.display_name}: nothing is loaded for it yet",
        )
    if status.plan.model == plan.model:
        return (
            f"Plan preview of the form's other settings for {plan.display_name} (not loaded)",
            f"the form's other settings for {plan.display_name}: Load model applies them",
        )
    return (
        f"Plan preview of the form's {plan.display_name} (not loaded)",
        f"{plan.display_name}, selected in the form: not loaded",
    )


def _notice_html(message: str) -> str:
    text = html.escape(message.replace("**", ""))
    return f'<div style="padding:24px;color:#6b7280;font:14px system-ui,sans-serif">{text}</div>'


def _loaded_heading(status: BackendStatus, prediction: SpeedPrediction | None) -> str:
    """One paragraph on the loaded model: plan check, predicted and measured speed, disk tier and
    where CPU-resident layers run."""
    differences = len(status.plan_differences)
    verdict = (
        "every module is where the plan put it ✓"
        if not differences
        else f"⚠ {differences} module(s) differ from the plan (outlined in red)"
    )
    speed = f" Predicted speed: {prediction.summary()}." if prediction else ""
    measured = status.last_stats
    if measured is not None and measured.tokens_per_second:
        rate = measured.tokens_per_second
        speed += f" Measured on the last reply: {1 / rate:.3g} s/token ({rate:.3g} tokens/s)."
    mapped = disk_tier_text(status.disk_tier)
    policy = status.cpu_layers
    runs = f" Offloaded layers: {policy.policy} policy, {policy.reason}." if policy else ""
    return f"**Loaded** {status.display_name}: {verdict}.{speed}{mapped}{runs}"


def _same_plan(plan: Plan, loaded_plan: Plan) -> bool:
    """Whether the session's plan is for the configuration the loaded model was loaded with
    (warnings may differ: they depend on the free RAM at the time)."""
    return all(
        getattr(plan, key) == getattr(loaded_plan, key) for key in ("model", "dtype", "budget", "device_map")
    )


def refresh(service: DemoService, tab: DeviceMapTab, values: dict, request: Any) -> Updates:
    """Redraw the whole tab (map, heading, tables, the pass running now) for this session's plan
    and the loaded model, from one snapshot of the backend: the reply count it records is the one
    the map was drawn from, so a reply that ends while the tab draws is redrawn on the next tick."""
    status = service.status()
    heading, picture, table = render_tab(values[tab.plan_state], status, service.loaded_prediction())
    report = status.timing
    rows = timing_rows(report.latest) if report is not None and report.latest is not None else []
    return {
        tab.heading: heading,
        tab.picture: picture,
        tab.table: table,
        tab.timing_table: gr.update(value=rows, visible=bool(rows)),
        tab.progress: progress_line(status),
        tab.drawn: report.replies if report is not None else 0,
    }


def tick(service: DemoService, tab: DeviceMapTab, values: dict, request: Any) -> Updates:
    """Every couple of seconds: the whole map once another reply has ended, else only the line
    on the pass running now."""
    status = service.status()
    replies = status.timing.replies if status.timing is not None else 0
    if replies != values[tab.drawn]:
        return refresh(service, tab, values, request)
    return {tab.progress: progress_line(status)}


def progress_line(status: BackendStatus) -> str:
    """How far the pass running now got (a long prompt: its layer, the time left); '' when none
    has run long enough to say."""
    progress = status.timing.progress if status.timing is not None else None
    if progress is None or progress.elapsed < PROGRESS_AFTER_SECONDS:
        return ""
    return progress_text(progress)


def layout_devicemap_tab(plan_state: gr.State) -> DeviceMapTab:
    """Build the Device map tab's components, drawing ``plan_state`` (a PlanView state)."""
    gr.Markdown(
        "Each block is a decoder layer (numbered), an embedding, the final norm or the LM head, "
        "coloured by where its weights live: **GPUs** green, **CPU** blue, **disk** orange. After a "
        "reply, the bar under each block is its time (red: waiting for its weights). Hover a block "
        "for its name, size and time."
    )
    heading = gr.Markdown(elem_id="od-map-heading")
    progress = gr.Markdown(elem_id="od-map-progress")
    picture = gr.HTML(EMPTY_HTML, elem_id="od-devicemap")
    timing_table = gr.Dataframe(
        headers=TIMING_HEADERS,
        label="Time per block, latest reply",
        interactive=False,
        wrap=True,
        visible=False,
        elem_id="od-map-timing",
    )
    with gr.Accordion("Module table", open=False):
        table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, wrap=True)
    timer = gr.Timer(SERVING_REFRESH_SECONDS)
    return DeviceMapTab(heading, picture, table, plan_state, progress, timing_table, timer, gr.State(-1))


def wire_devicemap_tab(service: DemoService, tab: DeviceMapTab, triggers: list[Any]) -> None:
    """Redraw the tab on each of ``triggers`` (events: a new plan, a load, opening the tab), and
    on its timer: the pass running now, and the whole map after each reply."""
    private = {"api_visibility": "private", "queue": False}
    outputs = [tab.heading, tab.picture, tab.table, tab.timing_table, tab.progress, tab.drawn]
    gr.on(triggers, bind(refresh, service, tab), {tab.plan_state}, outputs, **private)
    tab.timer.tick(
        bind(tick, service, tab),
        {tab.plan_state, tab.drawn},
        outputs,
        show_progress="hidden",
        **private,
    )


def disk_tier_text(tier: DiskTierReport | None) -> str:
    """What the loaded model's disk tier does: the part memory-mapped (served from the page cache),
    the part streamed past it every token, and why that split ('' with no disk tier)."""
    if tier is None or not (tier.mapped_bytes or tier.streamed_blocks):
        return ""
    parts = []
    if tier.mapped_bytes:
        parts.append(f"{format_bytes(tier.mapped_bytes)} memory-mapped (served from the page cache)")
    if tier.streamed_blocks:
        parts.append(
            f"{tier.streamed_blocks} blocks ({format_bytes(tier.streamed_bytes)}) streamed from disk every "
            f"token past the page cache, through {format_bytes(tier.stream_buffer_bytes)} of buffers"
        )
    why = f" ({tier.choice})" if tier.choice else ""
    return f" Disk tier: {'; '.join(parts)}{why}."
