"""The Configuration tab: pick a model and a memory budget, see the plan at once, load, unload.

Three parts: :func:`~optdemo.web.tabs.config_layout.layout_config_tab` builds the components (a
:class:`ConfigTab`); the module-level handlers here, ``(service, tab, values, request) ->
{component: update}``, do the work and are tested without a browser; :func:`wire_config_tab`
connects them to the components' events.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import gradio as gr

import optdemo.web.tabs.endpoint_form as endpoint_form  # (not "from optdemo.web": no cycle via the package)
import optdemo.web.tabs.sign_in as sign_in_form
from optdemo.app.machine import probe
from optdemo.app.service import DemoService, PlanNotice
from optdemo.core import defaults
from optdemo.core.budget import format_bytes
from optdemo.core.load_config import LoadConfig
from optdemo.web.api import MODEL_GROUP, PLAN_GROUP, admin_of
from optdemo.web.binding import Updates, bind
from optdemo.web.errors import to_gradio_error, user_errors
from optdemo.web.render import describe_placement, plan_summary
from optdemo.web.tabs.config_components import DRAFT_MODEL, ENDPOINT, ConfigTab
from optdemo.web.tabs.config_text import (
    budget_spec,
    budget_units_note,
    form_values_for,
    hardware_summary,
    model_label,
    model_names,
    offload_info,
    status_for,
)

PROGRESS_POLL_SECONDS = 0.1  # how often a load's progress reports are passed to the page
# Load clicks reach the manager at once rather than wait in Gradio's queue behind the load running
# now: the manager serializes loads (and stops a reply first) behind its own lock, and a newer
# request replaces an older one still waiting there instead of running after it.
LOAD_REQUESTS = {"concurrency_id": "load", "concurrency_limit": 4}


# ---------------------------------------------------------------------------------- handlers
def config_from_form(service: DemoService, tab: ConfigTab, values: dict, request: Any = None) -> LoadConfig:
    """The configuration the form describes (validated by the service, for this caller: an admin,
    by the credential its request carries, may name more models)."""
    return service.make_config(
        model=values[tab.model] or "",
        max_memory=budget_spec(
            [float(values[s] or 0) for s in tab.gpu_sliders],
            float(values[tab.cpu_slider] or 0),
            values[tab.advanced] or "",
        ),
        dtype=values[tab.dtype] or "auto",
        offload_folder=values[tab.offload] or None,
        revision=values[tab.revision] or None,
        quantization=values[tab.quantization] or "none",
        tokenizer=values[tab.tokenizer] or None,
        fast_offload=bool(values[tab.fast_offload]),
        cpu_layers=values[tab.cpu_layers] or defaults.DEFAULT_CPU_LAYERS,
        disk_tier=values[tab.disk_tier] or defaults.DEFAULT_DISK_TIER,
        admin=admin_of(request),
        draft=(values[tab.draft_model] or "") if values[tab.draft] == DRAFT_MODEL else values[tab.draft],
    )


def preview(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """Plan the form's configuration (no weights touched). Shown in place, not as a pop-up: this
    runs on every change of a control. A failure names the model and leaves no plan standing."""
    name = model_label(values[tab.model])
    try:
        view = service.plan(config_from_form(service, tab, values, request))
    except Exception as exc:  # noqa: BLE001 - rendered as a message in the summary
        message = f"**Cannot plan {name}:** {to_gradio_error(exc).message}"
        return {tab.summary: message, tab.plan_state: PlanNotice(name, message)}
    summary = plan_summary(view.plan, view.prediction, service.settings.max_batch)
    note = budget_units_note(values[tab.advanced] or "")
    return {tab.summary: f"{summary}\n\n{note}" if note else summary, tab.plan_state: view}


def page_load(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """As a page opens: the form shows the configuration of the model loaded here, with its plan,
    so a reload or a second visitor sees what is loaded rather than the defaults (and the Device
    map shows no preview of another configuration); with nothing loaded here, the form's plan."""
    status = service.status()
    if status.endpoint is not None or status.config is None or status.plan is None:
        return {**{field: gr.skip() for field in tab.fields}, **preview(service, tab, values, request)}
    config = status.config
    view = service.view(status.plan, config.offload_folder, config)
    summary = plan_summary(view.plan, view.prediction, service.settings.max_batch)
    return {**form_values_for(tab, config), tab.summary: summary, tab.plan_state: view}


def plan_live(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Iterator[Updates]:
    """:func:`preview`, first saying which model is being planned: the previous plan (of another
    model, maybe) never stays on screen as if it were current while the new one is computed."""
    name = model_label(values[tab.model])
    pending = f"Planning **{name}**…"
    yield {tab.summary: pending, tab.plan_state: PlanNotice(name, pending)}
    yield preview(service, tab, values, request)


@user_errors
def load(service: DemoService, tab: ConfigTab, values: dict, request: Any, progress: Any = None) -> Updates:
    """Load the form's configuration (or reuse the loaded model), reporting progress; with "a
    serving endpoint" chosen, connect to it instead."""
    if values.get(tab.endpoint.backend) == ENDPOINT:
        return endpoint_form.connect(service, tab, values, request)
    config = config_from_form(service, tab, values, request)

    def report(fraction: float | None, text: str) -> None:
        if progress is not None:
            progress(fraction, desc=text)  # gr.Progress's signature; load_live's reporter too

    result = service.load(config, admin=admin_of(request), progress=report)
    verb = "Reused" if result.status == "reused" else "Loaded"
    check = "as planned ✓" if result.matches_plan else "⚠ differs from the plan (see Device map)"
    message = (
        f"**{verb}** {config.display_name} in {result.load_seconds:.2f} s — "
        f"{describe_placement(result.bytes_per_device)} — {check}"
    )
    if result.status == "reused":
        message += "  \nConfiguration unchanged: nothing was reloaded."
    assert result.plan is not None
    view = service.view(result.plan, config.offload_folder, config)  # the chat may load it again
    return {tab.status: message, tab.plan_state: view, tab.loaded: time.monotonic()}


def load_live(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Iterator[Updates]:
    """:func:`load`, with what is happening (download, conversion with bytes done, shards) shown
    in the status line itself, which names the model and counts the seconds: the load runs in a
    worker thread and its progress reports are streamed to the page (no progress overlay covers
    the status), at least once a second, so a long step (a one-shard quantization) still moves.
    A failure is said there too, as the last update (never a pop-up over the page)."""
    remote = values.get(tab.endpoint.backend) == ENDPOINT
    name = str(values[tab.endpoint.url] or "the endpoint") if remote else model_label(values[tab.model])
    reports: queue.Queue[str] = queue.Queue()
    outcome: dict[str, Any] = {}

    def report(fraction: float | None, desc: str = "") -> None:
        # No "0%" at a step's start: one shard of one stays there for its whole run (the seconds
        # beside it say it is moving).
        reports.put(desc if not fraction else f"{desc} — {fraction:.0%}")

    def work() -> None:
        try:
            outcome["updates"] = load(service, tab, values, request, report)
        except gr.Error as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=work, name="optdemo-load", daemon=True)
    started = time.monotonic()
    worker.start()
    doing = f"{'Connecting to' if remote else 'Loading'} {name}"
    yield {tab.status: f"**{doing}…**"}
    text, shown = "", 0.0
    while worker.is_alive() or not reports.empty():
        try:
            text = reports.get(timeout=PROGRESS_POLL_SECONDS)
        except queue.Empty:
            if time.monotonic() - shown < 1:
                continue
        shown = time.monotonic()
        elapsed = f"{shown - started:.0f} s"
        yield {tab.status: f"**{doing}** ({elapsed}){': ' + text if text else '…'}"}
    worker.join()
    if "error" in outcome:  # said in the status line, at the top of the page: no pop-up, no badge
        verb = "connect to" if remote else "load"
        names = (name,) if remote else model_names(values[tab.model])
        yield {tab.status: f"**Could not {verb} {name}:** {without_name(outcome['error'].message, names)}"}
        return
    yield outcome["updates"]


def without_name(message: str, names: tuple[str, ...]) -> str:
    """``message`` without a leading "loading <name>: " for one of the model's ``names`` (the
    service names the model for every caller; the status line names it already)."""
    for name in names:
        if message.startswith(f"loading {name}: "):
            return message.removeprefix(f"loading {name}: ")
    return message


@user_errors
def unload(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """Unload the model and free its memory, or disconnect the serving endpoint."""
    remote = service.endpoint is not None
    was_loaded = service.unload(admin_of(request))
    message = "Model unloaded; memory released." if was_loaded else "Nothing was loaded."
    message = endpoint_form.DISCONNECTED if remote else message
    return {tab.status: message, tab.loaded: time.monotonic()}


@user_errors
def clear_cache(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """Empty the conversion cache and say how much it freed."""
    freed = service.clear_conversion_cache(admin_of(request))
    cleared = f"cleared ({format_bytes(freed)} freed)"
    return {tab.cache_info: f"**Conversion cache:** {cleared}. {service.conversion_cache()}"}


def free_space(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """The free space where the offload folder would be (naming the place measured), or at once a
    warning when the path is a file or cannot be created; "This machine" measures the same place at
    the same moment, so the two never disagree."""
    folder = values[tab.offload]
    return {tab.offload_info: offload_info(folder), tab.machine: hardware_summary(probe(folder or None))}


def refresh_machine(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """After a load or unload, and as a page opens: free disk, RAM and the conversion cache read
    again (a load may have converted or quantized into the cache), never the figures of start-up."""
    return {
        **free_space(service, tab, values, request),
        tab.cache_info: f"**Conversion cache:** {service.conversion_cache()}",
    }


def refresh_status(service: DemoService, tab: ConfigTab, values: dict, request: Any) -> Updates:
    """The status line for what is loaded now."""
    return {tab.status: status_for(service, admin_of(request))}


# ---------------------------------------------------------------------------------- wiring
def wire_config_tab(service: DemoService, tab: ConfigTab) -> None:
    """Connect the Configuration tab's events to its handlers (all private: the API has its own)."""
    private = {"api_visibility": "private"}
    in_model_group = {**private, "concurrency_id": MODEL_GROUP, "concurrency_limit": 1}
    texts = (tab.revision, tab.advanced, tab.offload, tab.tokenizer, tab.draft_model)
    # Every control re-plans at once (sliders when released, text fields on Enter or leaving them).
    gr.on(
        [
            tab.plan_btn.click,
            *(c.change for c in (tab.model, tab.dtype, tab.quantization, tab.fast_offload)),
            *(c.change for c in (tab.cpu_layers, tab.disk_tier, tab.draft)),
            *(slider.release for slider in (*tab.gpu_sliders, tab.cpu_slider)),
            *(text.submit for text in texts),
            *(text.blur for text in texts),
        ],
        bind(plan_live, service, tab),
        tab.form,
        [tab.summary, tab.plan_state],
        trigger_mode="always_last",
        **private,
        **PLAN_GROUP,
    )
    # At once, as the path is typed: a file or an uncreatable folder is flagged before any plan.
    gr.on(
        [tab.offload.change, tab.offload.blur],
        bind(free_space, service, tab),
        {tab.offload},
        [tab.offload_info, tab.machine],
        queue=False,
        **private,
    )
    machine = [tab.offload_info, tab.machine, tab.cache_info]
    tab.loaded.change(bind(refresh_machine, service, tab), {tab.offload}, machine, queue=False, **private)
    tab.clear_cache_btn.click(
        bind(clear_cache, service, tab), {tab.loaded}, tab.cache_info, concurrency_id=MODEL_GROUP, **private
    )
    tab.load_btn.click(
        bind(load_live, service, tab),
        tab.form,
        [tab.status, tab.plan_state, tab.loaded],
        show_progress="hidden",  # the status line itself says what is happening
        **private,
        **LOAD_REQUESTS,
    )
    endpoint_form.wire_endpoint_form(service, tab)
    tab.unload_btn.click(bind(unload, service, tab), {tab.loaded}, [tab.status, tab.loaded], **in_model_group)
    if tab.sign_in is not None:
        sign_in_form.wire_sign_in(service, tab)
