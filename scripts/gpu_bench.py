"""GPU benchmark: plain Accelerate against each CPU-layer policy on a GPU map, in one run.

    python scripts/gpu_bench.py --arch opt-6.7b --out gpu-check-out

The original scripts' scenario: a random-weight OPT (float16, the exact architecture from the
shipped configs) with a GPU budget too small for it (``0=5GiB,cpu=10GiB``), and the same with a
disk tier (``0=5GiB,cpu=4GiB`` + offload folder). Each side loads and generates greedy tokens in a
fresh process: ``plain`` is ``from_pretrained(device_map="auto", max_memory, offload_folder)`` with
nothing of ours; ``accelerate``, ``gpu`` and ``cpu`` are optdemo's loader with that policy.

For each run it records s/token, peak GPU memory, anonymous host memory, the device map, the
generated token ids (to check they equal plain Accelerate's), and the physical floor: the bytes
that cross PCIe per token over the measured pinned host-to-device bandwidth (for ``cpu``: the
offloaded bytes over the CPU's measured matrix-vector rate). Writes ``gpu-bench.json`` (command,
GPU, versions, bandwidths, limits, every run) and ``gpu-bench.md`` (a table) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optdemo.core.budget import parse_max_memory
from optdemo.core.paths import cache_dir
from tools.bench import timed_greedy

SIDES = ("plain", "accelerate", "gpu", "cpu")
DEFAULT_SIDES = ("plain", "gpu", "cpu")  # optdemo's "accelerate" policy is plain Accelerate's path
PROMPT_IDS = [2, 133, 750, 9, 1144, 3645, 2777, 15, 10]
SCENARIOS = {  # name -> (max_memory, uses an offload folder)
    "gpu+cpu": ("0=5GiB,cpu=10GiB", False),
    "gpu+cpu+disk": ("0=5GiB,cpu=4GiB", True),
}


def build_checkpoint(arch: str, dest: Path) -> Path:
    """A random-weight float16 checkpoint of a catalog architecture, initialised on the GPU (seconds
    for opt-6.7b) and saved as safetensors with the tiny tokenizer; reused once built."""
    import torch
    from transformers import AutoModelForCausalLM, OPTConfig

    from optdemo.core.catalog import catalog_config_dict
    from optdemo.models.synthetic import build_tokenizer

    if (dest / "config.json").exists():
        return dest
    fields = {k: v for k, v in catalog_config_dict(arch).items() if not k.startswith("_")}
    config = OPTConfig(**{**fields, "torch_dtype": "float16"})
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(staging, max_shard_size="2GB")
    del model
    build_tokenizer(staging)
    staging.rename(dest)
    return dest


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def _timed_generate(model: Any, tokens: int) -> tuple[list[int], list[float], float]:
    import torch

    device = model.get_input_embeddings().weight.device
    device = torch.device("cpu") if device.type == "meta" else device
    return timed_greedy(model, torch.tensor([PROMPT_IDS], device=device), tokens)


def run_worker(side: str, model_dir: str, max_memory: str, offload: bool, tokens: int) -> dict:
    """One measured run in this process: load with ``side``, then generate greedy tokens."""
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.init()
    rss_before = _rss_anon()
    folder = tempfile.mkdtemp(prefix="optdemo-gpu-bench-") if offload else None
    started = time.perf_counter()
    policy = None
    if side == "plain":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            model_dir,
            dtype=torch.float16,
            device_map="auto",
            max_memory=parse_max_memory(max_memory).as_max_memory(),
            offload_folder=folder,
        )
    else:
        from optdemo.core.load_config import LoadConfig
        from optdemo.runtime.manager import ModelManager

        manager = ModelManager()
        config = LoadConfig(
            model_dir, dtype="float16", max_memory=max_memory, offload_folder=folder, cpu_layers=side
        )
        report = manager.load(config)
        model = manager._loaded.model
        policy = None if report.cpu_layers is None else report.cpu_layers.policy
    load_s = time.perf_counter() - started
    device_map = {k: str(v) for k, v in (getattr(model, "hf_device_map", None) or {}).items()}
    gpu_after_load = torch.cuda.memory_allocated() if cuda else 0
    rss_after_load = _rss_anon() - rss_before
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ids, times, begin = _timed_generate(model, tokens)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    per_token = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[0] - begin
    return {
        "side": side,
        "policy_in_force": policy or ("accelerate" if side == "plain" else side),
        "load_s": load_s,
        "first_token_s": times[0] - begin,
        "s_per_token": per_token,
        "token_ids": ids,
        "device_map": device_map,
        "gpu_allocated_after_load_bytes": gpu_after_load,
        "gpu_peak_during_generation_bytes": torch.cuda.max_memory_allocated() if cuda else 0,
        "host_anon_after_load_bytes": rss_after_load,
        "host_anon_after_generation_bytes": _rss_anon() - rss_before,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def _spawn(side: str, model_dir: Path, max_memory: str, offload: bool, tokens: int, timeout: float) -> dict:
    command = [sys.executable, __file__, "--worker", side, "--model", str(model_dir)]
    command += ["--budget", max_memory, "--tokens", str(tokens)] + (["--offload"] if offload else [])
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{done.stderr[-2500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def offloaded_bytes(model_dir: Path, max_memory: str) -> dict[str, int]:
    """Bytes per tier of the plan (equal to the actual map: the planner runs transformers' own
    device-map function), for the floors."""
    from optdemo.core.load_config import LoadConfig
    from optdemo.plan.planner import plan_device_map

    plan = plan_device_map(LoadConfig(str(model_dir), dtype="float16", max_memory=max_memory))
    return {str(k): v for k, v in plan.bytes_per_device.items()}


def floor_seconds(side: str, tiers: dict[str, int], bandwidths: Any) -> float | None:
    """The physical floor of one token: bytes crossing PCIe / measured pinned bandwidth (what
    any GPU-executed policy must move), or for ``cpu`` the offloaded bytes / CPU rate."""
    moved = tiers.get("cpu", 0) + tiers.get("disk", 0)
    if side == "cpu":
        return moved / bandwidths.cpu_rate("float16")
    rate = bandwidths.pinned_rate
    return moved / rate if rate else None


def summarize(runs: list[dict], tiers: dict[str, dict[str, int]], bandwidths: Any) -> list[dict]:
    """One row per run: ratios to plain Accelerate (same scenario) and to the floor."""
    rows = []
    for run in runs:
        plain = next((r for r in runs if r["scenario"] == run["scenario"] and r["side"] == "plain"), None)
        floor = floor_seconds(run["side"], tiers[run["scenario"]], bandwidths)
        rows.append(
            {
                "scenario": run["scenario"],
                "side": run["side"],
                "s_per_token": run["s_per_token"],
                "vs_plain": run["s_per_token"] / plain["s_per_token"] if plain else None,
                "floor_s_per_token": floor,
                "vs_floor": run["s_per_token"] / floor if floor else None,
                "same_tokens_as_plain": plain is not None and run["token_ids"] == plain["token_ids"],
                "load_s": run["load_s"],
                "gpu_peak_gib": run["gpu_peak_during_generation_bytes"] / 2**30,
                "host_anon_gib": run["host_anon_after_generation_bytes"] / 2**30,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| scenario | side | s/token | vs plain | floor s/token | vs floor | same tokens | load s "
        "| peak GPU GiB | host anon GiB |",
        "|" + "---|" * 10,
    ]

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    for r in rows:
        floor = "-" if r["floor_s_per_token"] is None else f"{r['floor_s_per_token']:.3f}"
        lines.append(
            f"| {r['scenario']} | {r['side']} | {r['s_per_token']:.3f} | {ratio(r['vs_plain'])} | {floor} "
            f"| {ratio(r['vs_floor'])} | {'yes' if r['same_tokens_as_plain'] else 'NO'} | {r['load_s']:.1f} "
            f"| {r['gpu_peak_gib']:.2f} | {r['host_anon_gib']:.2f} |"
        )
    return "\n".join(lines)


def _environment() -> dict:
    import accelerate
    import torch
    import transformers

    info = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": sys.version.split()[0],
        "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update(gpu=torch.cuda.get_device_name(), gpu_total_bytes=total, gpu_free_bytes=free)
    return info


def main(argv: list[str] | None = None) -> int:
    """Command line: build (once), measure bandwidths, run every scenario and side, write results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="opt-6.7b", help="catalog architecture (random weights)")
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--sides", default=",".join(DEFAULT_SIDES), help=f"subset of {','.join(SIDES)}")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--max-memory", action="append", help="NAME=BUDGET replacing a scenario's budget")
    parser.add_argument("--out", default="gpu-check-out", help="folder for gpu-bench.json and .md")
    parser.add_argument("--time-limit", type=float, default=330, help="seconds; later runs are skipped")
    parser.add_argument("--cpu-dry-run", action="store_true", help="without a GPU, run the flow anyway")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--budget", help=argparse.SUPPRESS)
    parser.add_argument("--offload", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args.worker, args.model, args.budget, args.offload, args.tokens)))
        return 0
    return run_benchmark(args, argv if argv is not None else sys.argv[1:])


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> int:
    """The parent process: everything but the measured runs themselves."""
    import torch

    from optdemo.plan.bandwidth import measured_bandwidths
    from optdemo.plan.policy import choose_policy

    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scenarios = {name: SCENARIOS[name] for name in args.scenarios.split(",") if name}
    for override in args.max_memory or []:
        name, _, budget = override.partition("=")
        scenarios[name] = (budget, scenarios.get(name, ("", False))[1])
    sides = [s for s in args.sides.split(",") if s]
    not_run: list[str] = []
    if not torch.cuda.is_available():
        if not args.cpu_dry_run:
            print("NOT RUN: no CUDA GPU here, nothing to measure (--cpu-dry-run tries the flow on the CPU)")
            return 0
        not_run.append("no CUDA GPU here: the policies were not measured (plain and accelerate only)")
        sides = [s for s in sides if s in ("plain", "accelerate")]
    root = cache_dir() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_checkpoint(args.arch, root / f"{args.arch}-safetensors-float16-random")
    built_s = time.perf_counter() - started
    bandwidths = measured_bandwidths(refresh=True)  # workers read the same cached figures
    tiers = {name: offloaded_bytes(model_dir, budget) for name, (budget, _) in scenarios.items()}
    runs: list[dict] = []
    for name, (budget, offload) in scenarios.items():
        for side in sides:
            left = args.time_limit - (time.perf_counter() - started)
            if left < 20:
                not_run.append(
                    f"{name}/{side}: skipped, the time limit ({args.time_limit:.0f} s) was reached"
                )
                continue
            try:
                run = _spawn(side, model_dir, budget, offload, args.tokens, timeout=left)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                not_run.append(f"{name}/{side}: {str(exc)[-1500:]}")
                continue
            run.update(scenario=name, max_memory=budget)
            runs.append(run)
            print(f"  {name:>13} {side:>10}: {run['s_per_token']:.3f} s/token", file=sys.stderr, flush=True)
    rows = summarize(runs, tiers, bandwidths)
    auto = {
        name: (choose_policy(t.get("cpu", 0), t.get("disk", 0), "float16", bandwidths, "auto") or None)
        for name, t in tiers.items()
    }
    result = {
        "command": "python scripts/gpu_bench.py " + shlex.join(argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "environment": _environment(),
        "model": {"architecture": args.arch, "dtype": "float16", "weights": "random", "path": str(model_dir)},
        "build_seconds": built_s,
        "bandwidths": bandwidths.__dict__,
        "bytes_per_tier": tiers,
        "auto_would_pick": {n: (c.policy if c else None) for n, c in auto.items()},
        "runs": runs,
        "summary": rows,
        "not_run": not_run,
        "seconds": time.perf_counter() - started,
    }
    (out / "gpu-bench.json").write_text(json.dumps(result, indent=2))
    table = format_table(rows)
    (out / "gpu-bench.md").write_text(table + "\n")
    print(table)
    for line in not_run:
        print(f"NOT RUN: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
