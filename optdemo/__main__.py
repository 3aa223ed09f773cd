"""Command line for the engine, the original scripts' workflow without the UI.

python -m optdemo plan facebook/opt-66b --max-memory 0=5GiB,cpu=20GiB
python -m optdemo generate optdemo/tiny-opt --prompt "Hello" --max-new-tokens 30
python -m optdemo cache [--clear | --clear-interrupted]
"""

from __future__ import annotations

import argparse
import sys

from optdemo.app.machine import conversion_cache_summary
from optdemo.core.budget import format_bytes
from optdemo.core.errors import OptdemoError
from optdemo.core.generation import GenerationParams
from optdemo.core.load_config import LoadConfig
from optdemo.plan.planner import device_label, plan_device_map
from optdemo.runtime.manager import ModelManager
from optdemo.weights import convert


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="OPT size (opt-1.3b), Hub id, optdemo/tiny-opt, or a local folder")
    parser.add_argument("--max-memory", help="budget, e.g. '0=5GiB,cpu=20GiB' (default: all free memory)")
    parser.add_argument("--offload-folder", help="folder for layers that go to disk")
    parser.add_argument("--dtype", default="auto", help="auto, float16, bfloat16 or float32")
    parser.add_argument(
        "--quantization", default="none", help="none, 8bit or 4bit (on a CPU-only machine: torch's int8/int4)"
    )


def _config(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        args.model,
        dtype=args.dtype,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
        quantization=args.quantization,
    )


def cmd_plan(args: argparse.Namespace) -> int:
    """Print where each layer would go, bytes per device and the warnings."""
    plan = plan_device_map(_config(args))
    print(f"{plan.display_name}: {format_bytes(plan.total_bytes)} in {plan.dtype}, fits: {plan.fits}")
    for device, size in plan.bytes_per_device.items():
        budget = plan.budget.get(device)
        of = f" of {format_bytes(budget)}" if budget and device != "disk" else ""
        print(f"  {device_label(device):>6}: {format_bytes(size)}{of}")
    layers = " ".join(device_label(block.device)[0] for block in plan.layers)
    print(f"  layers (G=GPU, C=CPU, d=disk): {layers}")
    for warning in plan.warnings:
        print(f"  warning: {warning}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    """Load, then stream a continuation of the prompt with timings, as the original scripts did."""
    manager = ModelManager()
    report = manager.load(_config(args))
    print(f"[{report.message}; placement: {report.bytes_per_device}]", file=sys.stderr)
    params = GenerationParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    shown = ""
    for update in manager.stream_completion(args.prompt, params):
        print(update.text[len(shown) :], end="", flush=True)
        shown = update.text
        if update.stats:
            print(f"\n[{update.stats.summary()}]", file=sys.stderr)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """List the converted-checkpoint cache with sizes, and what killed conversions left behind
    (their staging folders take room too, and nothing else shows them); or clear either."""
    root = convert.converted_root()
    if args.clear:
        print(f"freed {format_bytes(convert.clear_cache())} in {root}")
        return 0
    if args.clear_interrupted:
        print(f"freed {format_bytes(convert.clear_interrupted())} of interrupted conversions in {root}")
        return 0
    entries = convert.cache_entries()
    for entry in entries:
        print(
            f"{format_bytes(entry.bytes):>10}  {entry.model}@{entry.revision} ({entry.dtype})  {entry.path}"
        )
    stale = [(path, convert.folder_bytes(path)) for path in convert.interrupted_conversions()]
    for path, size in stale:
        print(f"{format_bytes(size):>10}  interrupted conversion (a killed load's leftovers)  {path}")
    # The same count and size as the Configuration tab's "Conversion cache", from the same function.
    print(conversion_cache_summary(None, code=False))
    if stale:
        left = format_bytes(sum(size for _, size in stale))
        print(
            f"{len(stale)} interrupted conversion(s) left {left}: remove them with "
            "`python -m optdemo cache --clear-interrupted` (the converted checkpoints stay)"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m optdemo``."""
    parser = argparse.ArgumentParser(prog="python -m optdemo", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    plan = commands.add_parser("plan", help="show where every layer would go (no weights touched)")
    _config_args(plan)
    plan.set_defaults(run=cmd_plan)
    generate = commands.add_parser("generate", help="load the model and stream a continuation")
    _config_args(generate)
    generate.add_argument("--prompt", default="Hello, my name is")
    generate.add_argument("--max-new-tokens", type=int, default=30)
    generate.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    generate.set_defaults(run=cmd_generate)
    cache = commands.add_parser("cache", help="show (or --clear) the .bin -> safetensors conversion cache")
    clearing = cache.add_mutually_exclusive_group()
    clearing.add_argument(
        "--clear", action="store_true", help="delete every converted checkpoint and interrupted conversion"
    )
    clearing.add_argument(
        "--clear-interrupted", action="store_true", help="delete only what killed conversions left behind"
    )
    cache.set_defaults(run=cmd_cache)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except OptdemoError as exc:
        print(f"optdemo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
