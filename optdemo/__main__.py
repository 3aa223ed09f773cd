"""Command line for the engine, the original scripts' workflow without the UI.

python -m optdemo plan facebook/opt-66b --max-memory 0=5GiB,cpu=20GiB
python -m optdemo generate optdemo/tiny-opt --prompt "Hello" --max-new-tokens 30
python -m optdemo generate opt-13b --max-memory cpu=8GiB --offload-folder off --draft 4bit --json
python -m optdemo cache [--clear | --clear-interrupted]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from optdemo.app.machine import conversion_cache_summary
from optdemo.core.budget import format_bytes
from optdemo.core.errors import ConfigError, OptdemoError
from optdemo.core.generation import GenerationParams, GenerationStats
from optdemo.core.load_config import DRAFT_COPIES, LoadConfig
from optdemo.plan.planner import device_label, plan_device_map
from optdemo.plan.policy import MAX_DRAFT_LENGTH
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
    parser.add_argument(
        "--draft",
        default="none",
        choices=("none", *DRAFT_COPIES),
        help="speculative decoding with the model's own 8bit / 4bit copy in RAM as the draft",
    )
    parser.add_argument("--draft-model", help="speculative decoding with this smaller model as the draft")


def _config(args: argparse.Namespace) -> LoadConfig:
    if args.draft_model and args.draft != "none":
        raise ConfigError("--draft and --draft-model both set the draft: give one of them")
    return LoadConfig(
        args.model,
        dtype=args.dtype,
        max_memory=args.max_memory,
        offload_folder=args.offload_folder,
        quantization=args.quantization,
        draft=args.draft_model or args.draft,
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
    """Load, then stream a continuation of the prompt with timings, as the original scripts did;
    with ``--json``, print one JSON object instead (the benchmark's record)."""
    config = _config(args)
    if args.draft_length is not None and config.draft == "none":
        raise ConfigError("--draft-length needs a draft: add --draft 4bit, --draft 8bit or --draft-model ID")
    manager = ModelManager()
    manager.engine.speculator.fixed_k = args.draft_length
    report = manager.load(config)
    print(f"[{report.message}; placement: {report.bytes_per_device}]", file=sys.stderr)
    params = GenerationParams(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed
    )
    shown = ""
    for update in manager.stream_completion(args.prompt, params):
        if not args.json:
            print(update.text[len(shown) :], end="", flush=True)
        shown = update.text
        if update.stats:
            print(f"\n[{update.stats.summary()}]", file=sys.stderr)
            if args.json:
                record = generation_record(manager, report.load_seconds, update.token_ids, update.stats)
                print(json.dumps({**record, "text": update.text}))
    return 0


def generation_record(
    manager: ModelManager, load_seconds: float | None, token_ids: tuple[int, ...], stats: GenerationStats
) -> dict:
    """What ``generate --json`` prints: the reply's tokens and timings and, with a draft, its
    speculation (proposals, kept, passes, the k of each pass) and the costs the engine measured
    (a one-token pass, each further token of a pass, a draft token)."""
    config, measured = manager.current_config, manager.engine.speculator.measured
    decode = None if not stats.tokens_per_second else 1.0 / stats.tokens_per_second
    mean_k = sum(stats.draft_lengths) / len(stats.draft_lengths) if stats.draft_lengths else None
    ratio = None
    if mean_k is not None and measured.one_pass and measured.per_extra_token is not None:
        ratio = (measured.one_pass + mean_k * measured.per_extra_token) / measured.one_pass
    status = manager.status()
    return {
        "model": None if config is None else config.model,
        "draft": None if config is None else config.draft,
        # What was in force, read back from the loaded model, not the flags: the budget, where every
        # module landed, the bytes per device, the disk tier's split and the draft's RAM.
        "max_memory": None if config is None or config.max_memory is None else str(config.max_memory),
        "device_map": {name: str(device) for name, device in status.device_map.items()},
        "bytes_per_device": {str(device): size for device, size in status.bytes_per_device.items()},
        "disk_tier": None if status.disk_tier is None else asdict(status.disk_tier),
        "draft_loaded": manager.draft_info,
        "token_ids": list(token_ids),
        "load_seconds": load_seconds,
        "time_to_first_token": stats.time_to_first_token,
        "decode_seconds_per_token": decode,
        "new_tokens": stats.new_tokens,
        "total_seconds": stats.total_seconds,
        "drafted": stats.drafted,
        "accepted": stats.accepted,
        "passes": stats.passes,
        "k_used": list(stats.draft_lengths),
        "acceptance": stats.accepted / stats.drafted if stats.drafted else None,
        "one_token_pass_seconds": measured.one_pass,
        "per_extra_token_seconds": measured.per_extra_token,
        "draft_token_seconds": measured.draft_token,
        "k_pass_over_one_pass": ratio,  # a pass over mean k + 1 tokens against one over 1 token
        "draft_released": measured.released,  # why the draft was let go mid-reply, if it was
    }


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
    generate.add_argument("--seed", type=int, default=None, help="seed for sampling (default: random)")
    generate.add_argument(
        "--draft-length",
        type=int,
        choices=range(1, MAX_DRAFT_LENGTH + 1),
        metavar=f"1..{MAX_DRAFT_LENGTH}",
        help="with a draft: propose exactly this many tokens a pass, whatever the costs (to measure "
        "such a pass; default: chosen from the costs, plain decoding where speculation cannot pay)",
    )
    generate.add_argument(
        "--json", action="store_true", help="print one JSON object: tokens, timings, the draft's figures"
    )
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
