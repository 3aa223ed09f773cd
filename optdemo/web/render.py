"""Render plans and loaded models as HTML and tables: the device-map picture.

Plain functions from a :class:`~optdemo.plan.planner.Plan` (devices as ``optdemo.core.budget.Device``: an int
for a GPU, ``"cpu"``, ``"disk"``) to strings and rows; no gradio here, so the picture is tested
without a browser. Every block carries its name, size and device in a tooltip and an aria-label, so
the picture reads well with a mouse, a screen reader, or a test.
"""

from __future__ import annotations

import html
import re

from optdemo.app.status import BackendStatus
from optdemo.core.budget import Device, format_bytes
from optdemo.plan.planner import Block, Plan, device_label, device_of
from optdemo.plan.speed import SpeedPrediction

GPU_COLORS = ("#15803d", "#0f766e", "#4d7c0f", "#047857", "#166534", "#115e59", "#3f6212", "#065f46")
DEVICE_COLORS = {"cpu": "#2563eb", "disk": "#ea580c", "tied": "#9ca3af", "meta": "#6b7280"}

_LAYER_INDEX = re.compile(r"\.(\d+)$")


def device_color(device: Device | None) -> str:
    """The colour of a device in the picture (GPUs in greens, CPU blue, disk orange)."""
    if device is None:
        return DEVICE_COLORS["tied"]
    if isinstance(device, int):
        return GPU_COLORS[device % len(GPU_COLORS)]
    return DEVICE_COLORS.get(device, DEVICE_COLORS["meta"])


def landed_on(block: Block, actual: dict[str, Device] | None) -> Device | None:
    """Where a block's weights really went under the loaded model's map ``actual`` (None before
    loading, or for a tied block stored elsewhere)."""
    if actual is None or block.device is None:
        return None
    return device_of(block.name, actual)


# Short names for the blocks that are not numbered layers (the tooltip has the full name).
_SHORT_NAMES = {
    "embed_tokens": "tok",
    "embed_positions": "pos",
    "final_layer_norm": "norm",
    "lm_head": "head",
    "project_in": "in",  # opt-350m projects between its 512 embedding and 1024 hidden sizes
    "project_out": "out",
}


def _short_label(name: str, kind: str) -> str:
    """The text on a block: a layer's number, a short name, or the module's own name in full
    (the block widens to hold it: a label is never cut)."""
    match = _LAYER_INDEX.search(name)
    if kind == "layer" and match:
        return match.group(1)
    leaf = name.rsplit(".", 1)[-1]
    return _SHORT_NAMES.get(leaf, leaf)


def weights_format(plan: Plan) -> str:
    """How the plan's weights are stored: ``bfloat16``, or with optdemo's CPU quantization
    ``8-bit decoder weights, bfloat16 elsewhere`` (the sizes are the quantized ones)."""
    if plan.quantization == "none":
        return plan.dtype
    return f"{plan.quantization.replace('bit', '-bit')} decoder weights, {plan.dtype} elsewhere"


def render_device_map(
    plan: Plan,
    actual: dict[str, Device] | None = None,
    title: str = "",
    landed: dict[Device, int] | None = None,
) -> str:
    """HTML picture of a plan: a block per layer/embedding/norm/head coloured by device, with a
    legend of bytes per device against its budget. With ``actual`` (the loaded model's device map,
    module -> device), blocks whose device differs from the plan get a red outline and say so.

    Args:
        plan: the plan to draw.
        actual: the loaded model's device map (keys as in ``hf_device_map``), or None before loading.
        title: a heading line above the picture.
        landed: bytes that really landed on each device, for the legend (default: the plan's).
    """
    blocks_html = []
    for block in plan.blocks:
        loaded = landed_on(block, actual)
        moved = loaded is not None and loaded != block.device
        shown = loaded if moved else block.device
        note = f" — planned {device_label(block.device)}, loaded on {device_label(loaded)}" if moved else ""
        where = f"tied to {block.tied_to}" if block.device is None and block.tied_to else device_label(shown)
        tooltip = f"{block.name} · {format_bytes(block.bytes)} · {where}{note}"
        border = "outline:3px solid #dc2626;outline-offset:1px;" if note else ""
        width = 46 if block.kind == "layer" else 58
        blocks_html.append(
            f'<div class="od-block" data-device="{html.escape(device_label(shown))}" '
            f'data-module="{html.escape(block.name)}" title="{html.escape(tooltip)}" '
            f'aria-label="{html.escape(tooltip)}" role="img" '
            f'style="background:{device_color(shown)};color:white;min-width:{width}px;height:38px;'
            "padding:0 6px;box-sizing:border-box;white-space:nowrap;"
            "border-radius:6px;display:flex;align-items:center;justify-content:center;"
            f'font:600 12px/1.1 system-ui,sans-serif;{border}">{html.escape(_short_label(block.name, block.kind))}'
            "</div>"
        )
    legend = render_legend(plan, landed)
    heading = (
        f'<div style="font:600 15px system-ui,sans-serif;margin-bottom:8px">{html.escape(title)}</div>'
        if title
        else ""
    )
    return (
        f'<div class="od-devicemap" style="padding:4px">{heading}'
        '<div class="od-blocks" style="display:flex;flex-wrap:wrap;gap:5px;margin-bottom:14px">'
        + "".join(blocks_html)
        + f"</div>{legend}</div>"
    )


def render_legend(plan: Plan, landed: dict[Device, int] | None = None) -> str:
    """Bytes per device (``landed``, else the plan's) against its budget, one bar per device."""
    rows = []
    for device, used in (plan.bytes_per_device if landed is None else landed).items():
        budget = plan.budget.get(device)
        if device == "disk" or not budget:
            fill, of = 100.0, ""
        else:
            fill, of = min(100.0, 100.0 * used / budget), f" of {format_bytes(budget)}"
        rows.append(
            '<div style="display:flex;align-items:center;gap:10px;margin:4px 0;font:13px system-ui,sans-serif">'
            f'<span style="display:inline-block;width:14px;height:14px;border-radius:3px;background:{device_color(device)}"></span>'
            f'<span style="width:70px;font-weight:600">{html.escape(device_label(device))}</span>'
            '<span style="flex:1;max-width:360px;height:10px;background:#e5e7eb;border-radius:5px;overflow:hidden">'
            f'<span style="display:block;height:100%;width:{fill:.1f}%;background:{device_color(device)}"></span></span>'
            f"<span>{format_bytes(used)}{of}</span></div>"
        )
    rows += [_tied_row(block) for block in plan.blocks if block.device is None and block.tied_to]
    total = (
        '<div style="font:13px system-ui,sans-serif;margin-top:6px">'
        f"Total {format_bytes(plan.total_bytes)}: {html.escape(weights_format(plan))}</div>"
    )
    return '<div class="od-legend">' + "".join(rows) + total + "</div>"


def _tied_row(block: Block) -> str:
    """The legend's line for a grey (tied) block: it has no weights of its own."""
    owner = "the embeddings'" if "embed" in (block.tied_to or "") else f"{block.tied_to}'s"
    leaf = block.name.rsplit(".", 1)[-1]
    text = f"{leaf} shares {owner} weights (tied): drawn with them, counted once"
    return (
        '<div class="od-legend-tied" style="display:flex;align-items:center;gap:10px;margin:4px 0;'
        'font:13px system-ui,sans-serif">'
        f'<span style="display:inline-block;width:14px;height:14px;border-radius:3px;background:{DEVICE_COLORS["tied"]}"></span>'
        f"<span>{html.escape(text)}</span></div>"
    )


def device_map_rows(plan: Plan, actual: dict[str, Device] | None = None) -> list[list[str]]:
    """Table rows: module, device (actual when loaded), size, planned device, and a mark on
    differences."""
    rows = []
    for block in plan.blocks:
        planned = device_label(block.device) if block.device is not None else f"tied to {block.tied_to}"
        loaded = landed_on(block, actual)
        device = device_label(loaded) if loaded is not None else planned
        differs = "⚠ differs" if loaded is not None and loaded != block.device else ""
        rows.append([block.name, device, format_bytes(block.bytes), planned, differs])
    return rows


def plan_summary(plan: Plan, prediction: SpeedPrediction | None = None, max_batch: int | None = None) -> str:
    """A short Markdown verdict on a plan: fits or not, where the bytes go, the predicted speed, how
    prompts are computed, the KV cache room (with ``max_batch``: what is left for prompt caches)
    and the warnings."""
    placement = " · ".join(
        f"**{device_label(device)}** {format_bytes(size)}" for device, size in plan.bytes_per_device.items()
    )
    verdict = "fits" if plan.fits else "**does not fit** as configured"
    if plan.fits and plan.batch is not None and plan.batch.sequences == 0:
        verdict = "fits, serving one reply at a time (see the KV cache below)"
    lines = [
        f"**{plan.display_name}** ({format_bytes(plan.total_bytes)}, {weights_format(plan)}): {verdict}",
        "",
        placement,
    ]
    if prediction is not None:
        lines += ["", f"**Predicted speed:** {prediction.summary()}"]
        if prediction.prompt_kernel is not None:
            lines += ["", f"**Prompts:** {prediction.prompt_kernel.reason.removeprefix('prompts: ')}"]
    if plan.batch is not None:
        lines += ["", plan.batch.text(max_batch)]
    lines += [f"- {warning}" for warning in plan.warnings]
    return "\n".join(lines)


def describe_placement(bytes_per_device: dict[Device, int]) -> str:
    """``GPU 0: 3.1 GiB · CPU: 12 GiB · disk: 40 GiB`` for status lines."""
    return " · ".join(
        f"{device_label(device)}: {format_bytes(size)}" for device, size in bytes_per_device.items()
    )


def to_messages(turns: list[dict]) -> list[dict]:
    """Chatbot messages for chat turns (``{"user", "assistant", "stats"}``), each reply followed
    by its stats line."""
    messages: list[dict] = []
    for turn in turns:
        messages.append({"role": "user", "content": turn["user"]})
        reply = turn["assistant"] or "…"
        if turn.get("stats"):
            reply += f"\n\n<sub>{turn['stats']}</sub>"
        messages.append({"role": "assistant", "content": reply})
    return messages


def status_text(status: BackendStatus) -> str:
    """Markdown status line for what is loaded now."""
    if not status.loaded:
        return "No model loaded yet. Choose one, check the plan, then **Load model**."
    if status.endpoint is not None:
        return f"**{status.endpoint.describe()}**: replies come from that engine, not this machine."
    busy = f" — {status.busy}" if status.busy else ""
    seconds = status.load_seconds or 0.0
    return (
        f"**{status.display_name}** is loaded (in {seconds:.1f} s){busy}: "
        f"{describe_placement(status.bytes_per_device)}"
    )
