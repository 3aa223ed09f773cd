"""Benchmark: plain Accelerate against optdemo's offloading, side by side, in one invocation.

    python -m tools.bench --build opt-1.3b --format bin --max-memory cpu=1GiB --tokens 30

Reproduces the original scripts' methodology (load time, then the time to generate N tokens from
a prompt) for both sides, alternating, each measured load in a fresh process so no cache inside
Python flatters either side, and reports medians and the ratio. The *cold* regime drops the
checkpoint, the offload folder and the converted cache from the page cache before loading and
again before generating (``posix_fadvise(POSIX_FADV_DONTNEED)``), standing in for a model larger
than RAM; *cold-start* drops them before loading only: one cold start, load then generate, as the
original scripts ran (what a load leaves in the page cache serves the generation, as it would for
a user); the *warm* regime leaves the OS cache alone. An all-in-RAM run gives the reference speed.

Sides: ``ram`` (``from_pretrained`` with no device map), ``accelerate`` (``from_pretrained(
device_map="auto", max_memory, offload_folder)`` + ``generate``: nothing of ours) and ``optdemo``
(:class:`~optdemo.runtime.manager.ModelManager` with fast offloading; its runs carry ``timing``,
where the time went block by block, from :mod:`optdemo.runtime.timing`). ``--quantization 8bit,4bit`` adds,
beside them, optdemo's CPU-quantized model all in RAM (``ram-4bit``) and under the same budget
(``optdemo-4bit``), with the one-time quantization time; every run records the bytes it read from
disk per token (``/proc/self/io``: page-cache hits excluded).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from optdemo.core.budget import parse_max_memory, parse_size
from optdemo.core.catalog import catalog_entry
from optdemo.core.load_config import LoadConfig
from optdemo.core.paths import cache_dir
from optdemo.models.synthetic import build_random_opt
from optdemo.runtime import timing
from optdemo.runtime.manager import ModelManager
from optdemo.weights.convert import converted_root, quantization_info
from tools.batch_bench import format_levels, run_concurrency
from tools.bench_report import BASE_SIDES, SIDES, report
from tools.build_sharded import build_sharded_opt
from tools.memcap import CapError, MemoryCap, drop_caches

PROMPT = "The history of large language models began"
REPO_ROOT = Path(__file__).resolve().parent.parent


def bench_dir() -> Path:
    """Where built benchmark checkpoints are kept (reused once built)."""
    return cache_dir() / "bench"


def ensure_checkpoint(architecture: str, checkpoint_format: str, dtype: str = "float16") -> Path:
    """A random-weight checkpoint of a catalog architecture, built once and reused."""
    path = bench_dir() / f"{architecture}-{checkpoint_format}-{dtype}"
    if not (path / "config.json").exists():
        bench_dir().mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=bench_dir().parent))
        try:
            entry = catalog_entry(architecture)
            if checkpoint_format == "safetensors" and entry and entry.checkpoint_bytes > _ram() // 2:
                build_sharded_opt(staging, architecture, dtype)  # never the whole model in memory
            else:
                build_random_opt(
                    staging,
                    architecture,
                    dtype=dtype,
                    checkpoint_format=checkpoint_format,
                    max_shard_size="1GB",
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _ram() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


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
    """A streamer recording when each new token arrives, and how many bytes the process had read
    from disk by then (used identically on every side)."""
    from transformers.generation.streamers import BaseStreamer

    class TimingStreamer(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.reads: list[int] = []
            self.prompt_seen = False

        def put(self, value: Any) -> None:
            if self.prompt_seen:
                self.times.append(time.perf_counter())
                self.reads.append(disk_read_bytes())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    return TimingStreamer()


def timed_greedy(
    model: Any, ids: Any, tokens: int, reads: list[int] | None = None
) -> tuple[list[int], list[float], float]:
    """Generate exactly ``tokens`` greedy tokens after ``ids``; returns the new token ids, when
    each arrived (perf_counter) and when generation began. ``reads`` (when given) receives the
    bytes the process had read from disk by each arrival."""
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
    if reads is not None:
        reads.extend(streamer.reads)
    return out[0, ids.shape[1] :].tolist(), streamer.times, begin


def disk_read_bytes() -> int:
    """Bytes this process has had read from storage so far (page-cache hits excluded; 0 where the
    kernel does not account I/O)."""
    try:
        with open("/proc/self/io") as handle:
            fields = dict(line.split(": ") for line in handle.read().splitlines())
        return int(fields["read_bytes"])
    except (OSError, KeyError, ValueError):
        return 0


REGIMES = ("warm", "cold", "cold-start")
RATE_PROBE_BYTES = 2**30
_RATE_READ = 64 * 2**20
_RATE_ALIGN = 4096
_FLOOR_MIN_READ = 2**20  # bytes per token


def sequential_read_rate(folder: str | Path, limit: int = RATE_PROBE_BYTES) -> float | None:
    """The disk's sequential read rate *now*, in bytes/s: ``O_DIRECT`` reads of 64 MiB (past the
    page cache: it neither uses nor disturbs it) through the last ``limit`` bytes of the
    checkpoint's weight files, where the last layers, the disk tier, lie: the bytes each side
    reads back every token, under the same conditions (a virtual disk whose host caches what was
    read recently reads those faster). Measured beside every run, since this disk's speed drifts
    by 2x over minutes: a floor from a rate measured at another time says little. None where the
    file system has no ``O_DIRECT``."""
    import mmap

    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))
    skip = max(0, sum(p.stat().st_size for p in files) - limit)
    buffer = mmap.mmap(-1, _RATE_READ)  # page-aligned, as O_DIRECT wants
    done = 0
    started = time.perf_counter()
    try:
        for path in files:
            size = path.stat().st_size
            if skip >= size:
                skip -= size
                continue
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except (OSError, AttributeError):
                return None
            try:
                offset = skip // _RATE_ALIGN * _RATE_ALIGN
                while (got := os.preadv(fd, [buffer], offset)) > 0:
                    offset, done = offset + got, done + got
            finally:
                os.close(fd)
            skip = 0
    finally:
        buffer.close()
    return done / (time.perf_counter() - started) if done else None


def side_quantization(side: str) -> str:
    """The quantization a side runs with: ``optdemo-4bit`` -> ``4bit``; ``none`` for the others."""
    return side.rpartition("-")[2] if side.endswith("bit") else "none"


def run_worker(side: str, model: str, max_memory: str, tokens: int, regime: str, dtype: str) -> dict:
    """One measured run in this process: load, then generate ``tokens`` greedy tokens, the page
    cache dropped as ``regime`` says (see the module's docstring)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = getattr(torch, dtype)
    offload = tempfile.mkdtemp(prefix="optdemo-bench-offload-")
    if regime != "warm":
        drop_page_cache(model, converted_root())
    started = time.perf_counter()
    quantization = side_quantization(side)
    checkpoint = None  # optdemo's converted or quantized copy, where it loads one
    if side.startswith("optdemo") or quantization != "none":
        manager = ModelManager()
        budget = None if side.startswith("ram") else max_memory  # ram-4bit: everything in RAM
        config = LoadConfig(
            model, dtype=dtype, max_memory=budget, offload_folder=offload, quantization=quantization
        )
        disk_tier = manager.load(config).to_dict()["disk_tier"]
        loaded = manager._loaded
        net, tokenizer, device = loaded.model, loaded.tokenizer, loaded.input_device
        checkpoint = loaded.status.checkpoint
    else:
        disk_tier = None
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
    if regime == "cold":
        drop_page_cache(model, offload, converted_root())
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids.to(device)
    reads: list[int] = []
    # optdemo's own hooks record where its time went, block by block (the other sides have none).
    with timing.recording(net) as record:
        token_ids, times, begin = timed_greedy(net, ids, tokens, reads)
    blocks = record.result()
    first = times[0] - begin
    per_token = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else first
    shutil.rmtree(offload, ignore_errors=True)
    # Like s_per_token, from the first new token to the last: what each further token reads.
    read_per_token = (reads[-1] - reads[0]) / (len(reads) - 1) if len(reads) > 1 else 0
    quantized = (quantization_info(checkpoint) if checkpoint else None) or {}
    return {
        "side": side,
        "regime": regime,
        "load_s": load_seconds,
        "first_token_s": first,
        "s_per_token": per_token,
        "tokens_per_s": 1 / per_token if per_token else None,
        "generate_s": times[-1] - begin,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "offload_bytes_written": written,
        "disk_bytes_per_token": read_per_token,
        "quantization": quantization,
        "quantize_seconds": quantized.get("quantize_seconds"),
        "quantize_peak_rss_bytes": quantized.get("peak_rss_bytes"),
        "tokens": len(times),
        "token_ids": token_ids,
        "disk_tier": disk_tier,
        "device_map": {k: str(v) for k, v in (getattr(net, "hf_device_map", None) or {"": "cpu"}).items()},
        "timing": None if blocks is None else blocks.to_dict(),  # per block: prompt pass, decode steps
    }


def _spawn(side: str, args: argparse.Namespace, model: Path, regime: str, tokens: int | None = None) -> dict:
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
        str(tokens or args.tokens),
        "--dtype",
        args.dtype,
        "--worker-regime",
        regime,
    ]
    cap = MemoryCap(parse_size(args.ram_limit)) if args.ram_limit else None
    dropped = None
    if cap is not None:
        # Every capped run starts with nothing cached: the checkpoint and the converted copy are
        # evicted file by file, and the whole page cache is dropped where the kernel allows it.
        drop_page_cache(model, converted_root())
        dropped = drop_caches()
    # The disk's rate just before and just after the run, from this (uncapped, otherwise idle)
    # process: the floor for this run is the bytes it read per token at the mean of the two.
    rate_before = sequential_read_rate(model)
    # The worker runs ``-m tools.bench`` from the repository root, where ``tools`` is importable.
    with cap or contextlib.nullcontext():
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            check=False,
            timeout=3600,
            preexec_fn=cap.join() if cap else None,
            cwd=REPO_ROOT,
        )
        capped = asdict(cap.report()) if cap else None
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed:\n{done.stderr[-3000:]}")
    run = json.loads(done.stdout.strip().splitlines()[-1])
    rate_after = sequential_read_rate(model)
    rates = [rate for rate in (rate_before, rate_after) if rate]
    # A run that reads (next to) nothing per token has no disk floor to speak of.
    read = run["disk_bytes_per_token"] if run["disk_bytes_per_token"] >= _FLOOR_MIN_READ else 0
    floor = read / statistics.mean(rates) if rates else None
    return {
        **run,
        "cap": capped,
        "page_cache_dropped": dropped,
        "disk_rate_before": rate_before,
        "disk_rate_after": rate_after,
        "disk_floor_s_per_token": floor or None,
        "vs_floor": run["s_per_token"] / floor if floor else None,
    }


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line (``--worker``/``--worker-regime`` are internal: one measured run)."""
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
    parser.add_argument("--regime", default="both", choices=(*REGIMES, "both"), help="both: warm, then cold")
    parser.add_argument(
        "--sides", default=",".join(BASE_SIDES), help="comma-separated subset of ram,accelerate,optdemo"
    )
    parser.add_argument(
        "--quantization",
        default="none",
        help="comma-separated schemes to run beside float16: none, 8bit, 4bit (adds ram-<scheme> and "
        "optdemo-<scheme> sides: quantized all in RAM, and under the budget)",
    )
    parser.add_argument(
        "--ram-limit", help="cap each run's RAM, page cache included (e.g. 2.2GiB; cgroup v1, root)"
    )
    parser.add_argument(
        "--concurrency",
        metavar="LEVELS",
        help="instead of the sides: N concurrent replies (batched) vs the same N one at a time, "
        "for each N in a comma-separated list such as 1,2,4,8 (tools/batch_bench.py)",
    )
    parser.add_argument("--json", help="write all runs and the summary here")
    parser.add_argument("--plot", help="save a PNG chart here (needs matplotlib)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--worker-regime", choices=REGIMES, default="warm", help=argparse.SUPPRESS)
    return parser


def run_sides(args: argparse.Namespace, model: Path, sides: list[str]) -> tuple[list[dict], float | None]:
    """Every measured run, the sides alternating; returns the runs and optdemo's first load time
    (its one-time conversion included), None when optdemo is not among the sides."""
    regimes = ["warm", "cold"] if args.regime == "both" else [args.regime]
    runs = []
    first_load = None
    for side in [s for s in sides if s.startswith("optdemo")]:
        # optdemo converts a .bin checkpoint (or quantizes it) once into its cache: do that first,
        # untimed, so the runs below measure what every later load costs (the first load's time is
        # reported).
        # One token is enough: the load, not decoding, is what this run is for.
        first = _spawn(side, args, model, "warm", tokens=1)
        load_s = first["load_s"]
        first_load = load_s if side == "optdemo" else first_load
        args.first_loads[side] = load_s
        args.first_load_peaks[side] = first["peak_rss_bytes"]
        print(f"  {side} first load (one-time conversion included): {load_s:.2f}s", file=sys.stderr)
    for regime in regimes:
        for repeat in range(args.repeats):
            # Alternate the order so that neither side always runs right after the other.
            order = sides if repeat % 2 == 0 else list(reversed(sides))
            for side in order:
                if side.startswith("ram") and regime != "warm":
                    continue  # the reference is the in-memory speed, measured warm
                run = _spawn(side, args, model, regime)
                runs.append(run)
                print(
                    f"  {run['regime']:>4} {side:>10}: load {run['load_s']:.2f}s, "
                    f"{run['s_per_token']:.3f} s/token",
                    file=sys.stderr,
                    flush=True,
                )
    return runs, first_load


def expand_sides(sides: list[str], quantization: str) -> list[str]:
    """The sides to run: the float16 ones asked for, then for each quantization scheme its
    all-in-RAM and budgeted optdemo sides (``ram-4bit``, ``optdemo-4bit``)."""
    schemes = [q.strip() for q in quantization.split(",") if q.strip() and q.strip() != "none"]
    unknown = [q for q in schemes if q not in ("8bit", "4bit")]
    if unknown:
        raise SystemExit(f"--quantization: {unknown[0]!r} is not one of none, 8bit, 4bit")
    return [*sides, *(f"{side}-{q}" for q in schemes for side in ("ram", "optdemo"))]


def run_concurrency_levels(args: argparse.Namespace, model: Path, argv: list[str]) -> int:
    """``--concurrency``: batched vs one-at-a-time at each level; the table, and JSON if asked
    (with the exact command, the device map and every reply's token ids)."""
    try:
        levels = [int(level) for level in args.concurrency.split(",") if level.strip()]
    except ValueError:
        raise SystemExit(
            f"--concurrency takes whole numbers such as 1,2,4,8, not {args.concurrency!r}"
        ) from None
    if not levels or min(levels) < 1:
        raise SystemExit("--concurrency takes levels of at least 1, such as 1,2,4,8")
    result = {
        "command": " ".join(["python -m tools.bench", *argv]),
        **run_concurrency(model, args.max_memory, args.dtype, args.tokens, levels),
    }
    print(format_levels(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: build or take a checkpoint, run the sides alternately, print the table."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        run = run_worker(
            args.worker, args.model, args.max_memory, args.tokens, args.worker_regime, args.dtype
        )
        print(json.dumps(run))
        return 0
    if not args.model and not args.build:
        parser.error("give --build ARCH or --model FOLDER")
    if args.ram_limit:
        try:  # refuse before any work when the cap cannot be set, verified and removed
            MemoryCap(parse_size(args.ram_limit)).close()
        except CapError as exc:
            raise SystemExit(f"--ram-limit: {exc}") from None
    model = Path(args.model) if args.model else ensure_checkpoint(args.build, args.format, args.dtype)
    if args.concurrency:
        return run_concurrency_levels(args, model, argv if argv is not None else sys.argv[1:])
    sides = expand_sides([s.strip() for s in args.sides.split(",") if s.strip()], args.quantization)
    args.first_loads = {}
    args.first_load_peaks = {}
    runs, first_load = run_sides(args, model, sides)
    report(args, model, runs, first_load, argv if argv is not None else sys.argv[1:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
