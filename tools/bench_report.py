"""The benchmark's results: medians and ratios, the table, the chart, and the JSON that a published
figure comes from (the command, the device maps, the generated tokens, the memory cap read back,
the bandwidths, the disk floor and the prediction)."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
from pathlib import Path

from optdemo.core.budget import parse_size
from optdemo.core.load_config import LoadConfig
from optdemo.plan.bandwidth import measured_bandwidths
from optdemo.plan.planner import Plan, plan_device_map
from optdemo.plan.speed import predict_plan
from optdemo.system.hardware import probe_hardware

BASE_SIDES = ("ram", "accelerate", "optdemo")
# optdemo's CPU-quantized model, all in RAM and under the budget (``--quantization``).
QUANTIZED_SIDES = tuple(f"{side}-{q}" for q in ("8bit", "4bit") for side in ("ram", "optdemo"))
SIDES = BASE_SIDES + QUANTIZED_SIDES


def summarize(runs: list[dict]) -> list[dict]:
    """Medians per (regime, side), with the ratio of s/token to the all-in-RAM run and to
    plain Accelerate."""
    rows = []
    keys = (
        "load_s",
        "first_token_s",
        "s_per_token",
        "tokens_per_s",
        "peak_rss_bytes",
        "offload_bytes_written",
        "disk_bytes_per_token",
    )
    for regime in ("warm", "cold", "cold-start"):
        for side in SIDES:
            chosen = [r for r in runs if r["side"] == side and r["regime"] == regime]
            if chosen:
                row = {"regime": regime, "side": side, "runs": len(chosen)}
                row.update({k: statistics.median(r.get(k) or 0 for r in chosen) for k in keys})
                # The original scripts' figure: load plus every token, from the request to the last.
                totals = [total_seconds(r) for r in chosen]
                row["total_s"] = statistics.median(totals) if None not in totals else None
                row["total_range"] = (min(totals), max(totals)) if None not in totals else None
                # Each run against the floor measured beside it (None where nothing was read).
                ratios = [r["vs_floor"] for r in chosen if r.get("vs_floor")]
                row["vs_floor"] = statistics.median(ratios) if ratios else None
                row["vs_floor_max"] = max(ratios, default=None)
                rows.append(row)
    for row in rows:
        ref = {r["side"]: r for r in rows if r["regime"] == row["regime"]}
        base = next((r for r in rows if r["side"] == "ram"), None)
        row["vs_ram"] = row["s_per_token"] / base["s_per_token"] if base else None
        acc = ref.get("accelerate")
        row["vs_accelerate"] = row["s_per_token"] / acc["s_per_token"] if acc else None
        row["load_vs_accelerate"] = row["load_s"] / acc["load_s"] if acc else None
        paired = acc and row["total_s"] and acc["total_s"]
        row["total_vs_accelerate"] = row["total_s"] / acc["total_s"] if paired else None
        # The least favourable pairing: this side's slowest run against Accelerate's fastest.
        row["total_vs_accelerate_worst"] = row["total_range"][1] / acc["total_range"][0] if paired else None
    return rows


def total_seconds(run: dict) -> float | None:
    """Load plus generation of every token (None for a run recorded without its generation time)."""
    return run["load_s"] + run["generate_s"] if run.get("generate_s") is not None else None


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the summary."""
    header = (
        "| regime | side | load s | first token s | s/token | tokens/s | peak RSS | written to offload "
        "| s/token vs RAM | vs Accelerate | load vs Accelerate | disk read/token |"
    )
    lines = [header, "|" + "---|" * 12]
    for r in rows:
        cells = [
            r["regime"],
            r["side"],
            f"{r['load_s']:.2f}",
            f"{r['first_token_s']:.2f}",
            f"{r['s_per_token']:.3f}",
            f"{r['tokens_per_s']:.2f}",
            f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
            f"{r['offload_bytes_written'] / 2**20:.0f} MiB",
            *(
                f"{r[k]:.2f}x" if r[k] is not None else "-"
                for k in ("vs_ram", "vs_accelerate", "load_vs_accelerate")
            ),
            f"{r.get('disk_bytes_per_token', 0) / 2**20:.1f} MiB",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Bar charts of seconds per token and load time per side and regime (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ram": "#64748b", "accelerate": "#ea580c", "optdemo": "#2563eb"}
    colors.update({side: "#16a34a" for side in QUANTIZED_SIDES})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in (
        (axes[0], "s_per_token", "seconds per token"),
        (axes[1], "load_s", "load seconds"),
    ):
        names = [f"{r['side']}\n{r['regime']}" for r in rows]
        ax.bar(names, [r[key] for r in rows], color=[colors[r["side"]] for r in rows])
        ax.set_title(label)
        for index, row in enumerate(rows):
            ax.text(index, row[key], f"{row[key]:.2f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def break_even_loads(rows: list[dict], first_load: float | None) -> int | None:
    """How many loads pay for optdemo's one-time conversion: its extra first-load time over what
    each later load saves against plain Accelerate (warm); None when nothing is saved."""
    warm = {r["side"]: r for r in rows if r["regime"] == "warm"}
    if first_load is None or "optdemo" not in warm or "accelerate" not in warm:
        return None
    saved = warm["accelerate"]["load_s"] - warm["optdemo"]["load_s"]
    extra = first_load - warm["optdemo"]["load_s"]
    return max(1, math.ceil(extra / saved)) if saved > 0 else None


def report(
    args: argparse.Namespace, model: Path, runs: list[dict], first_load: float | None, argv: list[str]
) -> None:
    """Print the table, the floor, the prediction beside the measurement and the break-even number
    of loads; write the chart and the JSON asked for."""
    rows = summarize(runs)
    plan = plan_device_map(LoadConfig(str(model), dtype=args.dtype, max_memory=args.max_memory))
    available = probe_hardware().ram_available_bytes
    if args.ram_limit:
        available = min(available, parse_size(args.ram_limit))
    # What optdemo itself found available when it loaded (inside the cap, beside its own runtime).
    seen = [(r.get("disk_tier") or {}).get("available_bytes") for r in runs if r["side"] == "optdemo"]
    available = min([a for a in seen if a] or [available])
    prediction = predict_plan(plan, available)
    bandwidths = measured_bandwidths()
    floor = disk_floor(plan, bandwidths.disk_read)
    title = f"{model.name}, max_memory {args.max_memory}, {args.tokens} tokens, median of {args.repeats}"
    if args.ram_limit:
        title += f", RAM capped at {args.ram_limit}"
    print(f"\n{title}\n")
    print(format_table(rows))
    if floor:
        print(f"\ndisk floor (disk tier / measured sequential read): {floor:.3g} s/token")
    for row in rows:
        if row["side"] != "accelerate" and row["total_vs_accelerate"]:
            low, high = row["total_range"]
            print(
                f"{row['regime']} {row['side']}: load + {args.tokens} tokens {row['total_s']:.1f} s "
                f"(runs {low:.1f}-{high:.1f} s), {row['total_vs_accelerate']:.2f}x plain Accelerate's "
                f"(median against median; its slowest run against Accelerate's fastest: "
                f"{row['total_vs_accelerate_worst']:.2f}x)"
            )
    for row in rows:
        if row["vs_floor"]:
            print(
                f"{row['regime']} {row['side']}: {row['vs_floor']:.2f}x its disk floor (median; worst run "
                f"{row['vs_floor_max']:.2f}x): each run's s/token over the bytes it read per token at "
                "the disk's sequential rate measured just before and after it"
            )
    streamed = streamed_floor(runs, bandwidths.disk_read)
    if streamed:
        measured_capped = next((r["s_per_token"] for r in rows if r["side"] == "optdemo"), None)
        print(
            f"optdemo's own floor (the bytes it streams per token / measured sequential read): "
            f"{streamed:.3g} s/token; measured {measured_capped:.3g}: {measured_capped / streamed:.2f}x"
        )
    measured = next((r["s_per_token"] for r in rows if r["side"] == "optdemo"), None)
    if measured:
        print(
            f"predicted {prediction.summary()}; measured (optdemo) {measured:.3g} s/token: "
            f"ratio {measured / prediction.seconds_per_token:.2f}"
        )
    quantized = quantized_report(args, model, rows, runs, available)
    loads = break_even_loads(rows, first_load)
    if loads:
        print(f"the one-time conversion pays for itself after {loads} load(s)")
    if args.plot:
        plot(rows, args.plot, title)
    if args.json:
        result = {
            "command": "python -m tools.bench " + shlex.join(argv),
            "model": str(model),
            "args": vars(args),
            "plan": {
                "device_map": {k: str(v) for k, v in plan.device_map.items()},
                "bytes_per_device": {str(k): v for k, v in plan.bytes_per_device.items()},
            },
            "bandwidths": bandwidths.__dict__,
            "disk_floor_s_per_token": floor,
            "optdemo_streamed_floor_s_per_token": streamed,
            "prediction": prediction.to_dict(),
            "optdemo_first_load_s": first_load,
            "quantization": quantized,
            "break_even_loads": loads,
            "runs": runs,
            "summary": rows,
        }
        Path(args.json).write_text(json.dumps(result, indent=2))


def quantized_report(
    args: argparse.Namespace, model: Path, rows: list[dict], runs: list[dict], available: int
) -> dict:
    """For each quantization scheme run: its plan (bytes per device), its prediction beside the
    measured s/token under the budget, the first load and the one-time quantization time; printed
    and returned for the JSON."""
    result = {}
    for scheme in ("8bit", "4bit"):
        side = f"optdemo-{scheme}"
        if not any(r["side"] == side for r in runs):
            continue
        config = LoadConfig(str(model), dtype=args.dtype, max_memory=args.max_memory, quantization=scheme)
        plan = plan_device_map(config)
        prediction = predict_plan(plan, available)
        mine = [r for r in runs if r["side"] == side]
        seconds = [r["quantize_seconds"] for r in mine if r.get("quantize_seconds")]
        peaks = [r["quantize_peak_rss_bytes"] for r in mine if r.get("quantize_peak_rss_bytes")]
        measured = {r["regime"]: r["s_per_token"] for r in rows if r["side"] == side}
        result[scheme] = {
            "bytes_per_device": {str(k): v for k, v in plan.bytes_per_device.items()},
            "prediction": prediction.to_dict(),
            "measured_s_per_token": measured,
            "first_load_s": getattr(args, "first_loads", {}).get(side),
            "first_load_peak_rss_bytes": getattr(args, "first_load_peaks", {}).get(side),
            "quantize_seconds": max(seconds, default=None),
            # The quantizing process's high-water mark when it finished (streamed shard by shard).
            "quantize_peak_rss_bytes": max(peaks, default=None),
        }
        # The warm figure when there is one (the prediction is for steady decoding), else the
        # regime that ran (a capped run is cold only).
        regime = "warm" if "warm" in measured else next(iter(measured), None)
        seconds_per_token = measured.get(regime) if regime else None
        ratio = f": ratio {seconds_per_token / prediction.seconds_per_token:.2f}" if seconds_per_token else ""
        shown = f"{seconds_per_token:.3g} s/token ({regime})" if seconds_per_token else "nothing"
        print(
            f"{scheme}: predicted {prediction.summary()}; measured {shown}"
            f"{ratio}; quantized once in {result[scheme]['quantize_seconds'] or 0:.1f} s"
        )
    return result


def disk_floor(plan: Plan, disk_read: float) -> float | None:
    """Seconds per token the disk alone needs when every token reads the disk tier back."""
    disk = plan.bytes_per_device.get("disk", 0)
    return disk / disk_read if disk and disk_read else None


def streamed_floor(runs: list[dict], disk_read: float) -> float | None:
    """optdemo's own floor when it streams: the bytes it reads from disk every token (its streamed
    blocks; the mapped part stays cached) over the measured read rate. None when nothing streamed."""
    tiers = [r.get("disk_tier") or {} for r in runs if r["side"] == "optdemo"]
    streamed = max((tier.get("streamed_bytes") or 0 for tier in tiers), default=0)
    return streamed / disk_read if streamed and disk_read else None
