"""Benchmark: plain Accelerate against optdemo's offloading, side by side, in one invocation.

    python -m tools.bench --build opt-1.3b --format bin --max-memory cpu=1GiB --tokens 30

Reproduces the original scripts' methodology (load time, then the time to generate N tokens from
a prompt) for both sides, alternating, each measured load in a fresh process so no cache inside
Python flatters either side, and reports medians and the ratio. The *cold* regime drops the
checkpoint, the offload folder and the converted cache from the page cache before loading and
again before generating (``posix_fadvise(POSIX_FADV_DONTNEED)``), standing in for a model larger
than RAM; the *warm* regime leaves the OS cache alone. An all-in-RAM run gives the reference speed.

Sides: ``ram`` (``from_pretrained`` with no device map), ``accelerate`` (``from_pretrained(
device_map="auto", max_memory, offload_folder)`` + ``generate``: nothing of ours) and ``optdemo``
(:class:`~optdemo.manager.ModelManager` with fast offloading).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from optdemo.budget import parse_max_memory, parse_size
from optdemo.config import LoadConfig
from optdemo.convert import converted_root
from optdemo.hardware import probe_hardware
from optdemo.manager import ModelManager
from optdemo.paths import cache_dir
from optdemo.planner import plan_device_map
from optdemo.speed import predict_plan
from optdemo.synthetic import build_random_opt

SIDES = ("ram", "accelerate", "optdemo")
PROMPT = "The history of large language models began"
REPO_ROOT = Path(__file__).resolve().parent.parent


def bench_dir() -> Path:
    """Where built benchmark checkpoints are kept (reused once built)."""
    return cache_dir() / "bench"


def ensure_checkpoint(architecture: str, checkpoint_format: str, dtype: str = "float16") -> Path:
    """A random-weight checkpoint of a catalog architecture, built once and reused."""
    path = bench_dir() / f"{architecture}-{checkpoint_format}-{dtype}"
    if not (path / "config.json").exists():
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=bench_dir().parent))
        try:
            build_random_opt(
                staging, architecture, dtype=dtype, checkpoint_format=checkpoint_format, max_shard_size="1GB"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def drop_page_cache(*roots: str | Path) -> int:
    """Evict every file under ``roots`` from the OS page cache; returns the bytes advised."""
    advised = 0
    for root in roots:
        root = Path(root)
        files = (
            [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
        )
        for path in files:
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())  # dirty pages cannot be dropped
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
            advised += path.stat().st_size
    return advised


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under ``folder``."""
    folder = Path(folder)
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


def timing_streamer() -> Any:
    """A streamer recording when each new token arrives (used identically on every side)."""
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    return TimingStreamer()


def timed_greedy(model: Any, ids: Any, tokens: int) -> tuple[list[int], list[float], float]:
    """Generate exactly ``tokens`` greedy tokens after ``ids``; returns the new token ids, when
    each arrived (perf_counter) and when generation began."""
    import torch

    streamer = timing_streamer()
    begin = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,
            do_sample=False,
            streamer=streamer,
        )
    return out[0, ids.shape[1] :].tolist(), streamer.times, begin


def run_worker(side: str, model: str, max_memory: str, tokens: int, cold: bool, dtype: str) -> dict:
    """One measured run in this process: load, then generate ``tokens`` greedy tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    offload = tempfile.mkdtemp(prefix="optdemo-bench-offload-")
    if cold:
        drop_page_cache(model, converted_root())
    started = time.perf_counter()
    if side == "optdemo":
        manager = ModelManager()
        config = LoadConfig(model, dtype=dtype, max_memory=max_memory, offload_folder=offload)
        manager.load(config)
        loaded = manager._loaded
        net, tokenizer, device = loaded.model, loaded.tokenizer, loaded.input_device
    else:
        tokenizer = AutoTokenizer.from_pretrained(model)
        kwargs: dict[str, Any] = {"dtype": torch_dtype}
        if side == "accelerate":
            kwargs.update(
                device_map="auto",
                max_memory=parse_max_memory(max_memory).as_max_memory(),
                offload_folder=offload,
            )
        net = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        device = torch.device("cpu")
    load_seconds = time.perf_counter() - started
    written = folder_bytes(offload)
    if cold:
        drop_page_cache(model, offload, converted_root())
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
    _, times, begin = timed_greedy(net, ids, tokens)
    first = times[0] - begin
    per_token = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else first
    shutil.rmtree(offload, ignore_errors=True)
    return {
        "side": side,
        "regime": "cold" if cold else "warm",
        "load_s": load_seconds,
        "first_token_s": first,
        "s_per_token": per_token,
        "tokens_per_s": 1 / per_token if per_token else None,
        "generate_s": times[-1] - begin,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "offload_bytes_written": written,
        "tokens": len(times),
    }


CGROUP_ROOT = Path("/sys/fs/cgroup/memory")  # the cgroup v1 memory controller


def ram_limited_cgroup(limit_bytes: int) -> Path:
    """A memory cgroup capping a worker's RAM, page cache included: it stands in for a machine
    whose RAM cannot cache the disk tier, so every token reads it from disk again."""
    group = CGROUP_ROOT / "optdemo-bench"
    if not CGROUP_ROOT.is_dir() or not os.access(CGROUP_ROOT, os.W_OK):
        raise SystemExit("--ram-limit needs the cgroup v1 memory controller, writable (run as root)")
    group.mkdir(exist_ok=True)
    (group / "memory.limit_in_bytes").write_text(str(limit_bytes))
    return group


def _spawn(side: str, args: argparse.Namespace, model: Path, cold: bool) -> dict:
    command = [
        sys.executable,
        "-m",
        "tools.bench",
        "--worker",
        side,
        "--model",
        str(model),
        "--max-memory",
        args.max_memory,
        "--tokens",
        str(args.tokens),
        "--dtype",
        args.dtype,
    ]
    if cold:
        command.append("--cold")
    join_group = None
    if args.ram_limit:
        procs = ram_limited_cgroup(parse_size(args.ram_limit)) / "cgroup.procs"

        def join_group() -> None:  # runs in the child, before it starts Python
            procs.write_text(str(os.getpid()))

    # The worker runs ``-m tools.bench`` from the repository root, where ``tools`` is importable.
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        timeout=3600,
        preexec_fn=join_group,
        cwd=REPO_ROOT,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


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
    )
    for regime in ("warm", "cold"):
        for side in SIDES:
            chosen = [r for r in runs if r["side"] == side and r["regime"] == regime]
            if chosen:
                row = {"regime": regime, "side": side, "runs": len(chosen)}
                row.update({k: statistics.median(r[k] for r in chosen) for k in keys})
                rows.append(row)
    for row in rows:
        ref = {r["side"]: r for r in rows if r["regime"] == row["regime"]}
        base = next((r for r in rows if r["side"] == "ram"), None)
        row["vs_ram"] = row["s_per_token"] / base["s_per_token"] if base else None
        acc = ref.get("accelerate")
        row["vs_accelerate"] = row["s_per_token"] / acc["s_per_token"] if acc else None
        row["load_vs_accelerate"] = row["load_s"] / acc["load_s"] if acc else None
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the summary."""
    header = (
        "| regime | side | load s | first token s | s/token | tokens/s | peak RSS | written to offload "
        "| s/token vs RAM | vs Accelerate | load vs Accelerate |"
    )
    lines = [header, "|" + "---|" * 11]
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
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def predicted_speed(model: Path, max_memory: str, dtype: str) -> dict:
    """optdemo's prediction for this configuration (what the Device map tab shows)."""
    plan = plan_device_map(LoadConfig(str(model), dtype=dtype, max_memory=max_memory))
    return predict_plan(plan, probe_hardware().ram_available_bytes).to_dict()


def plot(rows: list[dict], path: str, title: str) -> None:
    """Bar charts of seconds per token and load time per side and regime (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"ram": "#64748b", "accelerate": "#ea580c", "optdemo": "#2563eb"}
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


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line (``--worker``/``--cold`` are internal: one measured run)."""
    parser = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--build", metavar="ARCH", help="build (once) a random-weight checkpoint: opt-125m ... opt-66b"
    )
    parser.add_argument(
        "--format", default="bin", choices=("bin", "safetensors"), help="checkpoint format to build"
    )
    parser.add_argument("--model", help="an existing checkpoint folder instead of --build")
    parser.add_argument("--max-memory", default="cpu=1GiB", help="the budget both sides get")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--tokens", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--regime", default="both", choices=("warm", "cold", "both"))
    parser.add_argument(
        "--sides", default=",".join(SIDES), help="comma-separated subset of ram,accelerate,optdemo"
    )
    parser.add_argument(
        "--ram-limit", help="cap each run's RAM, page cache included (e.g. 2.2GiB; cgroup v1, root)"
    )
    parser.add_argument("--json", help="write all runs and the summary here")
    parser.add_argument("--plot", help="save a PNG chart here (needs matplotlib)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--cold", action="store_true", help=argparse.SUPPRESS)
    return parser


def run_sides(args: argparse.Namespace, model: Path, sides: list[str]) -> tuple[list[dict], float | None]:
    """Every measured run, the sides alternating; returns the runs and optdemo's first load time
    (its one-time conversion included), None when optdemo is not among the sides."""
    regimes = {"warm": [False], "cold": [True], "both": [False, True]}[args.regime]
    runs = []
    first_load = None
    if "optdemo" in sides:
        # optdemo converts a .bin checkpoint once into its cache: do that first, untimed, so the
        # runs below measure what every later load costs (the first load's time is reported).
        first_load = _spawn("optdemo", args, model, cold=False)["load_s"]
        print(f"  optdemo first load (one-time conversion included): {first_load:.2f}s", file=sys.stderr)
    for cold in regimes:
        for repeat in range(args.repeats):
            # Alternate the order so that neither side always runs right after the other.
            order = sides if repeat % 2 == 0 else list(reversed(sides))
            for side in order:
                if side == "ram" and cold:
                    continue  # the reference is the in-memory speed, measured warm
                run = _spawn(side, args, model, cold)
                runs.append(run)
                print(
                    f"  {run['regime']:>4} {side:>10}: load {run['load_s']:.2f}s, "
                    f"{run['s_per_token']:.3f} s/token",
                    file=sys.stderr,
                    flush=True,
                )
    return runs, first_load


def report(args: argparse.Namespace, model: Path, runs: list[dict], first_load: float | None) -> None:
    """Print the table and the prediction next to the measurement; write the chart and JSON asked for."""
    rows = summarize(runs)
    prediction = predicted_speed(model, args.max_memory, args.dtype)
    title = f"{model.name}, max_memory {args.max_memory}, {args.tokens} tokens, median of {args.repeats}"
    if args.ram_limit:
        title += f", RAM capped at {args.ram_limit}"
    print(f"\n{title}\n")
    print(format_table(rows))
    measured = next(
        (r["s_per_token"] for r in rows if r["side"] == "optdemo" and r["regime"] == "warm"), None
    )
    if measured:
        print(
            f"\npredicted {prediction['summary']}; measured (optdemo, warm) {measured:.3g} s/token: "
            f"ratio {measured / prediction['seconds_per_token']:.2f}"
        )
    if args.plot:
        plot(rows, args.plot, title)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "model": str(model),
                    "args": vars(args),
                    "optdemo_first_load_s": first_load,
                    "runs": runs,
                    "summary": rows,
                },
                indent=2,
            )
        )


def main(argv: list[str] | None = None) -> int:
    """Command line: build or take a checkpoint, run the sides alternately, print the table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(
            json.dumps(
                run_worker(args.worker, args.model, args.max_memory, args.tokens, args.cold, args.dtype)
            )
        )
        return 0
    if not args.model and not args.build:
        parser.error("give --build ARCH or --model FOLDER")
    model = Path(args.model) if args.model else ensure_checkpoint(args.build, args.format, args.dtype)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    runs, first_load = run_sides(args, model, sides)
    report(args, model, runs, first_load)
    return 0


if __name__ == "__main__":
    sys.exit(main())
