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
from optdemo.runtime.timing_data import BlockTiming, Progress, ReplyTiming

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
    timing: ReplyTiming | None = None,
) -> str:
    """HTML picture of a plan: a block per layer/embedding/norm/head coloured by device, with a
    legend of bytes per device against its budget. With ``actual`` (the loaded model's device map,
    module -> device), blocks whose device differs from the plan get a red outline and say so.

    Args:
        plan: the plan to draw.
        actual: the loaded model's device map (keys as in ``hf_device_map``), or None before loading.
        title: a heading line above the picture.
        landed: bytes that really landed on each device, for the legend (default: the plan's).
        timing: the latest reply's timing: a bar under each block, its height the block's time,
            its red part the time it waited for its weights.
    """
    times = block_times(timing) if timing is not None else {}
    longest = max((t.seconds for t in times.values()), default=0.0)
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
        drawn = (
            f'<div class="od-block" data-device="{html.escape(device_label(shown))}" '
            f'data-module="{html.escape(block.name)}" title="{html.escape(tooltip)}" '
            f'aria-label="{html.escape(tooltip)}" role="img" '
            f'style="background:{device_color(shown)};color:white;min-width:{width}px;height:38px;'
            "padding:0 6px;box-sizing:border-box;white-space:nowrap;"
            "border-radius:6px;display:flex;align-items:center;justify-content:center;"
            f'font:600 12px/1.1 system-ui,sans-serif;{border}">{html.escape(_short_label(block.name, block.kind))}'
            "</div>"
        )
        if block.name in times:  # the block over its time bar
            drawn = (
                f'<div class="od-cell" style="display:flex;flex-direction:column;gap:3px;width:{width}px">'
                f"{drawn}{_time_bar(times[block.name], longest)}</div>"
            )
        blocks_html.append(drawn)
    legend = render_legend(plan, landed) + (_time_legend(longest) if times else "")
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


# ---------------------------------------------------------------------------------- time on the map
WAIT_COLOR = "#dc2626"  # the part of a block's time spent waiting for its weights
COMPUTE_COLOR = "#475569"  # the rest: computing
_BAR_PX = 44  # the tallest time bar (the slowest block)
TIMING_HEADERS = [
    "Block",
    "Prompt (ms)",
    "Decode (ms a step)",
    "Waiting",
    "Waits for",
    "Read a token",
    "Copied a token",
]


def block_times(timing: ReplyTiming) -> dict[str, BlockTiming]:
    """Each block's time in a reply, its prompt pass and decode steps together."""
    prompt = {block.name: block for block in timing.prompt.blocks}
    times = {}
    for block in timing.decode.blocks or timing.prompt.blocks:
        first = prompt.get(block.name) if timing.decode.blocks else None
        if first is not None:
            block = BlockTiming(
                block.name,
                first.seconds + block.seconds,
                first.wait_seconds + block.wait_seconds,
                first.disk_bytes + block.disk_bytes,
                first.copy_bytes + block.copy_bytes,
                block.waits_for or first.waits_for,
            )
        times[block.name] = block
    return times


def _time_bar(block: BlockTiming, longest: float) -> str:
    """The bar under a block: its height its share of the slowest block's time, red the part spent
    waiting for its weights, slate the part computing."""
    height = max(2, round(_BAR_PX * block.seconds / longest)) if longest and block.seconds else 0
    waiting = round(height * block.wait_seconds / block.seconds) if block.seconds else 0
    share = block.wait_seconds / block.seconds if block.seconds else 0.0
    moved = _moved(block.disk_bytes, block.copy_bytes)
    tooltip = (
        f"{block.name} · {block.seconds:.3g} s in the latest reply · "
        + (f"{share:.0%} waiting for {block.waits_for}" if block.wait_seconds else "no wait for its weights")
        + (f" · {moved}" if moved else "")
    )
    return (
        f'<div class="od-time" data-module="{html.escape(block.name)}" data-seconds="{block.seconds:.6f}" '
        f'data-wait-seconds="{block.wait_seconds:.6f}" data-disk-bytes="{block.disk_bytes}" '
        f'data-copy-bytes="{block.copy_bytes}" title="{html.escape(tooltip)}" aria-label="{html.escape(tooltip)}" '
        f'role="img" style="height:{_BAR_PX}px;display:flex;flex-direction:column;justify-content:flex-end">'
        f'<span style="height:{waiting}px;background:{WAIT_COLOR};border-radius:2px 2px 0 0"></span>'
        f'<span style="height:{height - waiting}px;background:{COMPUTE_COLOR}"></span></div>'
    )


def _time_legend(longest: float) -> str:
    return (
        '<div class="od-time-legend" style="font:13px system-ui,sans-serif;margin-top:6px">'
        f"Bars under the blocks: each block's time in the latest reply (the tallest {longest:.3g} s), "
        f'<span style="color:{WAIT_COLOR};font-weight:600">red</span> the part waiting for its weights, '
        f'<span style="color:{COMPUTE_COLOR};font-weight:600">slate</span> computing.</div>'
    )


def _moved(disk: float, copy: float) -> str:
    """``3.1 MiB read, 1 MiB copied to the GPU`` ('' when nothing moved)."""
    parts = [
        f"{format_bytes(int(disk))} read" if disk else "",
        f"{format_bytes(int(copy))} copied to the GPU" if copy else "",
    ]
    return ", ".join(part for part in parts if part)


def timing_rows(timing: ReplyTiming) -> list[list[str]]:
    """The table under the map: per block, its prompt time, its time a decode step, the share it
    waited and for what, the bytes it moved a token; then the reply's time outside the blocks."""
    prompt = {block.name: block for block in timing.prompt.blocks}
    decode = {block.name: block for block in timing.decode.blocks}
    steps = timing.decode.passes
    rows = []
    for name, block in block_times(timing).items():
        per_step = decode.get(name)
        moving = per_step or prompt[name]
        count = steps if per_step is not None else max(1, timing.prompt.passes)
        rows.append(
            [
                name,
                _ms(prompt[name].seconds) if name in prompt and timing.prompt.passes else "",
                _ms(per_step.seconds / steps) if per_step is not None and steps else "",
                f"{block.wait_seconds / block.seconds:.0%}" if block.seconds else "",
                block.waits_for,
                format_bytes(moving.disk_bytes // count) if moving.disk_bytes else "",
                format_bytes(moving.copy_bytes // count) if moving.copy_bytes else "",
            ]
        )
    prompt_between, decode_between = (
        timing.prompt.between_blocks_seconds,
        timing.decode.between_blocks_seconds,
    )
    rows.append(
        [
            "between the blocks (the model's own code)",
            _ms(prompt_between),
            _ms(decode_between / steps) if steps else "",
            "",
            "",
            "",
            "",
        ]
    )
    rows.append(
        [
            "outside the passes (preparing, sampling, text, the engine)",
            _ms(timing.outside_passes_seconds),
            "",
            "",
            "",
            "",
            "",
        ]
    )
    return rows


def _ms(seconds: float) -> str:
    """Milliseconds, two decimals: ``12.34``."""
    return f"{seconds * 1000:.2f}"


def timing_summary(timing: ReplyTiming, prediction: SpeedPrediction | None = None) -> str:
    """What explains the latest reply's speed, in Markdown: its decode rate, the share waiting
    for weights and for what, the bytes moved a token and at what rate, the floor those bytes set
    at this machine's measured rates and the predicted speed beside it; its prompt; where the rest
    of its time went."""
    lines = []
    per_token = timing.seconds_per_token
    if per_token is not None:
        phase = timing.decode
        line = f"**Latest reply**: a decode step took {per_token:.3g} s ({timing.decode.passes} steps)"
    else:
        phase = timing.prompt
        line = f"**Latest reply**: its prompt only ({timing.prompt.tokens} tokens)"
    share = phase.wait_seconds / phase.blocks_seconds if phase.blocks_seconds else 0.0
    disk, copy = timing.moved_per_token if per_token is not None else (phase.disk_bytes, phase.copy_bytes)
    moved = _moved(disk, copy)
    if phase.wait_seconds:
        kinds = timing.waits_for or "its weights"
        line += f"; {share:.0%} waiting for {kinds}"
        if moved and per_token:
            line += f": {moved} a token, at {format_bytes(int((disk + copy) / per_token))}/s"
    else:
        line += "; no block waited for its weights" + (f" ({moved} a token)" if moved and per_token else "")
    lines.append(line + ".")
    floor = timing.floor_seconds_per_token
    if floor is not None:
        rates = [
            f"disk reads {format_bytes(int(timing.disk_rate or 0))}/s" if disk else "",
            f"copies to the GPU {format_bytes(int(timing.copy_rate or 0))}/s" if copy else "",
        ]
        lines.append(
            f"Floor for moving those bytes at this machine's measured rates ({', '.join(r for r in rates if r)}): "
            f"{floor:.3g} s/token."
        )
    if prediction is not None:
        lines.append(f"Predicted: {prediction.seconds_per_token:.3g} s/token.")
    if timing.prompt.passes:
        prompt = timing.prompt
        waiting = prompt.wait_seconds / prompt.blocks_seconds if prompt.blocks_seconds else 0.0
        lines.append(f"Prompt: {prompt.tokens} tokens in {prompt.seconds:.3g} s ({waiting:.0%} waiting).")
    if timing.batch > 1:
        lines.append(
            f"Decoded beside up to {timing.batch - 1} other repl{'y' if timing.batch == 2 else 'ies'}: a shared "
            "step's time counts whole for each of them."
        )
    between = timing.prompt.between_blocks_seconds + timing.decode.between_blocks_seconds
    lines.append(
        f"Of its {timing.reply_seconds:.3g} s: {timing.blocks_seconds:.3g} s in the blocks, {between:.3g} s between "
        f"them (the model's own code), {timing.outside_passes_seconds:.3g} s outside its passes (preparing, "
        f"sampling, its text, the engine)"
        + (
            f"; it waited {timing.waited_seconds:.3g} s in line before."
            if timing.waited_seconds >= 0.01
            else "."
        )
    )
    return " ".join(lines)


def progress_text(progress: Progress) -> str:
    """The pass running now: ``Computing a prompt of 450 tokens: layer 3 of 24, about 12 s left``."""
    what = (
        f"Computing a prompt of {progress.tokens} tokens"
        if progress.mode == "prompt"
        else f"Decoding the next token of {progress.tokens} repl{'y' if progress.tokens == 1 else 'ies'}"
    )
    layer = min(progress.layers_done + 1, progress.layers)
    eta = progress.eta_seconds
    left = (
        f", about {eta:.0f} s left"
        if eta is not None and eta >= 1
        else (", almost done" if eta is not None else "")
    )
    return f"{what}: layer {layer} of {progress.layers}{left} ({progress.elapsed:.0f} s so far)."
