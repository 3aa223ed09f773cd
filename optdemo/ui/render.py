"""Render plans and load reports as HTML and tables: the device-map picture.

Plain functions from plan data (``Plan.to_dict()``) to strings and rows; no gradio here, so the
picture is tested without a browser. Every block carries its name, size and device in a tooltip and
an aria-label, so the picture reads well with a mouse, a screen reader, or a test.
"""

from __future__ import annotations

import html
import re

from optdemo.budget import format_bytes
from optdemo.planner import device_of

GPU_COLORS = ("#15803d", "#0f766e", "#4d7c0f", "#047857", "#166534", "#115e59", "#3f6212", "#065f46")
DEVICE_COLORS = {"cpu": "#2563eb", "disk": "#ea580c", "tied": "#9ca3af", "meta": "#6b7280"}

_LAYER_INDEX = re.compile(r"\.(\d+)$")


def device_name(device: str | None) -> str:
    """``GPU 0`` / ``CPU`` / ``disk`` / ``tied`` for a device key as the plan dict writes it."""
    if device is None:
        return "tied"
    if device.isdigit():
        return f"GPU {device}"
    return {"cpu": "CPU", "disk": "disk"}.get(device, device)


def device_color(device: str | None) -> str:
    """The colour of a device in the picture (GPUs in greens, CPU blue, disk orange)."""
    if device is None:
        return DEVICE_COLORS["tied"]
    if device.isdigit():
        return GPU_COLORS[int(device) % len(GPU_COLORS)]
    return DEVICE_COLORS.get(device, DEVICE_COLORS["meta"])


def _short_label(name: str, kind: str) -> str:
    match = _LAYER_INDEX.search(name)
    if kind == "layer" and match:
        return match.group(1)
    leaf = name.rsplit(".", 1)[-1]
    return {
        "embed_tokens": "tok",
        "embed_positions": "pos",
        "final_layer_norm": "norm",
        "lm_head": "head",
    }.get(leaf, leaf[:5])


def render_device_map(plan: dict, actual: dict[str, str] | None = None, title: str = "") -> str:
    """HTML picture of a plan: a block per layer/embedding/norm/head coloured by device, with a
    legend of bytes per device against its budget. With ``actual`` (the loaded model's device map,
    module -> device), blocks whose device differs from the plan get a red outline and say so.

    Args:
        plan: ``Plan.to_dict()``.
        actual: the loaded model's device map (keys as in ``hf_device_map``), or None before loading.
        title: a heading line above the picture.
    """
    blocks_html = []
    for block in plan["blocks"]:
        planned = block["device"]
        shown = planned
        note = ""
        if actual is not None and planned is not None:
            loaded = _device_of(block["name"], actual)
            if loaded is not None and loaded != planned:
                shown = loaded
                note = f" — planned {device_name(planned)}, loaded on {device_name(loaded)}"
        where = (
            "tied to " + block["tied_to"] if planned is None and block.get("tied_to") else device_name(shown)
        )
        tooltip = f"{block['name']} · {format_bytes(block['bytes'])} · {where}{note}"
        border = "outline:3px solid #dc2626;outline-offset:1px;" if note else ""
        width = 46 if block["kind"] == "layer" else 58
        blocks_html.append(
            f'<div class="od-block" data-device="{html.escape(device_name(shown))}" '
            f'data-module="{html.escape(block["name"])}" title="{html.escape(tooltip)}" '
            f'aria-label="{html.escape(tooltip)}" role="img" '
            f'style="background:{device_color(shown)};color:white;width:{width}px;height:38px;'
            "border-radius:6px;display:flex;align-items:center;justify-content:center;"
            f'font:600 12px/1.1 system-ui,sans-serif;{border}">{html.escape(_short_label(block["name"], block["kind"]))}'
            "</div>"
        )
    legend = render_legend(plan)
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


def render_legend(plan: dict) -> str:
    """Bytes per device against its budget, one bar per device, with the device's colour."""
    rows = []
    budgets = plan.get("budget", {})
    for device, used in plan["bytes_per_device"].items():
        budget = budgets.get(device)
        if device == "disk" or not budget:
            fill, of = 100.0, ""
        else:
            fill, of = min(100.0, 100.0 * used / budget), f" of {format_bytes(budget)}"
        rows.append(
            '<div style="display:flex;align-items:center;gap:10px;margin:4px 0;font:13px system-ui,sans-serif">'
            f'<span style="display:inline-block;width:14px;height:14px;border-radius:3px;background:{device_color(device)}"></span>'
            f'<span style="width:70px;font-weight:600">{html.escape(device_name(device))}</span>'
            '<span style="flex:1;max-width:360px;height:10px;background:#e5e7eb;border-radius:5px;overflow:hidden">'
            f'<span style="display:block;height:100%;width:{fill:.1f}%;background:{device_color(device)}"></span></span>'
            f"<span>{format_bytes(used)}{of}</span></div>"
        )
    total = f'<div style="font:13px system-ui,sans-serif;margin-top:6px">Total {format_bytes(plan["total_bytes"])} in {plan["dtype"]}</div>'
    return '<div class="od-legend">' + "".join(rows) + total + "</div>"


def device_map_rows(plan: dict, actual: dict[str, str] | None = None) -> list[list[str]]:
    """Table rows: module, device (actual when loaded), size, planned device, and a mark on
    differences."""
    rows = []
    for block in plan["blocks"]:
        planned = (
            device_name(block["device"]) if block["device"] is not None else f"tied to {block['tied_to']}"
        )
        loaded = (
            _device_of(block["name"], actual) if actual is not None and block["device"] is not None else None
        )
        device = device_name(loaded) if loaded is not None else planned
        differs = "⚠ differs" if loaded is not None and loaded != block["device"] else ""
        rows.append([block["name"], device, format_bytes(block["bytes"]), planned, differs])
    return rows


def _device_of(name: str, device_map: dict[str, str]) -> str | None:
    device = device_of(name, device_map)
    return None if device is None else str(device)


def plan_summary(plan: dict) -> str:
    """A short Markdown verdict on a plan: fits or not, where the bytes go, and the warnings."""
    placement = " · ".join(
        f"**{device_name(device)}** {format_bytes(size)}" for device, size in plan["bytes_per_device"].items()
    )
    verdict = "fits" if plan["fits"] else "**does not fit** as configured"
    lines = [
        f"**{plan['display_name']}** ({format_bytes(plan['total_bytes'])}, {plan['dtype']}): {verdict}",
        "",
        placement,
    ]
    if plan.get("prediction"):
        lines += ["", f"**Predicted speed:** {plan['prediction']['summary']}"]
    lines += [f"- {warning}" for warning in plan["warnings"]]
    return "\n".join(lines)
