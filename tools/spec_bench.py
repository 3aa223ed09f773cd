"""Benchmark speculative decoding: the same generation without and with drafts, side by side.

    python -m tools.spec_bench /path/to/opt-13b --max-memory cpu=8GiB --offload-folder off \\
        --drafts none,4bit --tokens 30 --cold --json spec.json

Each run is ``python -m optdemo generate ... --json`` (greedy) in a fresh process, so nothing in
Python carries over; ``--cold`` drops the checkpoint, the offload folder and the conversion cache
from the page cache first (and the whole page cache where the kernel allows it), as tools.bench
does. ``--drafts`` names the runs: ``none``, ``8bit``, ``4bit``, or ``model:ID`` for a draft model,
each optionally ``@K`` for a draft of exactly K tokens a pass (``generate --draft-length K``: it
measures a K-token pass where the engine, by its costs, would not speculate); each draft's one-time
quantization happens in a warm-up run that is not measured. The report holds
every run's record (tokens, load seconds, time to first token, decode seconds per token, proposals,
kept ones, passes, the k of each pass, the measured costs), whether each draft's tokens equal the
run without one, its decode speed against that run, and the speed the measured costs predict at
acceptance 0.5 / 0.7 / 0.9 (random weights agree differently from trained ones).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from optdemo.plan.policy import DraftCosts, choose_draft_length
from optdemo.plan.speed import ACCEPTANCE_RATES
from optdemo.weights.convert import converted_root
from tools.bench import REPO_ROOT, drop_page_cache
from tools.memcap import drop_caches

PROMPT = "The history of large language models began"


def draft_flags(run: str) -> list[str]:
    """The ``generate`` flags of one run: none, a copy scheme, or ``model:ID``, each maybe ``@K``."""
    draft, _, length = run.partition("@")
    fixed = ["--draft-length", length] if length else []
    if draft == "none":
        return []
    if draft.startswith("model:"):
        return ["--draft-model", draft.removeprefix("model:"), *fixed]
    return ["--draft", draft, *fixed]


def generate_command(args: argparse.Namespace, draft: str, tokens: int) -> list[str]:
    """``python -m optdemo generate ... --json`` for one run."""
    command = [sys.executable, "-m", "optdemo", "generate", args.model, "--json"]
    command += ["--max-new-tokens", str(tokens), "--prompt", args.prompt, *draft_flags(draft)]
    for flag, value in (("--max-memory", args.max_memory), ("--offload-folder", args.offload_folder)):
        if value:
            command += [flag, value]
    if args.dtype:
        command += ["--dtype", args.dtype]
    return command


def run_once(args: argparse.Namespace, draft: str, tokens: int) -> dict:
    """One run in a fresh process (the page cache dropped first with ``--cold``): its record."""
    dropped = None
    if args.cold:
        drop_page_cache(*(p for p in (args.model, args.offload_folder, converted_root()) if p))
        dropped = drop_caches()
    started = time.perf_counter()
    done = subprocess.run(
        generate_command(args, draft, tokens), cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"spec_bench: the {draft} run failed: {done.stderr.strip()[-500:]}")
    record = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        **record,
        "run": draft,
        "process_seconds": time.perf_counter() - started,
        "page_cache_dropped": dropped,
    }


def predicted(record: dict) -> list[dict] | None:
    """The speed a run's measured costs predict at each acceptance rate (the engine's rule), or
    None when the run measured no several-token pass."""
    one, extra, draft = (
        record.get("one_token_pass_seconds"),
        record.get("per_extra_token_seconds"),
        record.get("draft_token_seconds"),
    )
    if not one or extra is None or draft is None:
        return None
    costs = DraftCosts(one, extra, draft)
    rows = []
    for acceptance in ACCEPTANCE_RATES:
        k, rate = choose_draft_length(costs, acceptance)
        rows.append({"acceptance": acceptance, "k": k, "tokens_per_second": rate, "speedup": rate * one})
    return rows


def compare(runs: list[dict]) -> list[dict]:
    """Each draft's run against the run without one: same tokens, decode speed ratio, prediction."""
    base = next((run for run in runs if run["run"] == "none"), None)
    rows = []
    for run in runs:
        if run["run"] == "none":
            continue
        row: dict[str, Any] = {
            "run": run["run"],
            "acceptance": run.get("acceptance"),
            "k_used": run["k_used"],
            "k_pass_over_one_pass": run.get("k_pass_over_one_pass"),
            "draft_released": run.get("draft_released"),
        }
        if base is not None:
            # A shorter run (--measure-tokens) is compared with the same number of the base's tokens.
            row["token_identical"] = run["token_ids"] == base["token_ids"][: len(run["token_ids"])]
            plain, spec = base.get("decode_seconds_per_token"), run.get("decode_seconds_per_token")
            row["decode_speedup"] = plain / spec if plain and spec else None
        row["predicted"] = predicted(run)
        rows.append(row)
    return rows


_GIT: dict[str, Any] = {"cwd": REPO_ROOT, "capture_output": True, "text": True, "check": False}


def _commit() -> str | None:
    """The commit the runs were made at (with ``+changes`` when the tree differs), or None."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **_GIT)
        dirty = subprocess.run(["git", "status", "--porcelain"], **_GIT)
    except OSError:
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def build_parser() -> argparse.ArgumentParser:
    """The command line (see the module's text)."""
    parser = argparse.ArgumentParser(prog="python -m tools.spec_bench", description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a model folder, an OPT size or a Hub id")
    parser.add_argument("--max-memory", default="", help="budget, e.g. cpu=8GiB")
    parser.add_argument("--offload-folder", default="", help="where disk-tier layers go")
    parser.add_argument("--dtype", default="", help="the load dtype (default: the checkpoint's)")
    parser.add_argument(
        "--drafts", default="none,4bit", help="runs: none, 8bit, 4bit, model:ID (comma-separated)"
    )
    parser.add_argument("--tokens", type=int, default=30, help="tokens per run (the original scripts': 30)")
    parser.add_argument("--repeats", type=int, default=1, help="measured runs per draft")
    parser.add_argument(
        "--measure-tokens",
        type=int,
        help="tokens of the @K runs, which pass at their fixed length however slow (default: --tokens)",
    )
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run")
    parser.add_argument("--no-warmup", action="store_true", help="skip the unmeasured run per draft")
    parser.add_argument("--json", help="write the report here (default: print it)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run every draft's generation, then print or write the report."""
    args = build_parser().parse_args(argv)
    drafts = [draft.strip() for draft in args.drafts.split(",") if draft.strip()]
    runs, warmed = [], {"none"}
    for draft in drafts:
        if not args.no_warmup and draft.partition("@")[0] not in warmed:
            run_once(args, draft, 1)  # the one-time quantization into the cache, not measured
            warmed.add(draft.partition("@")[0])
        tokens = args.measure_tokens if "@" in draft and args.measure_tokens else args.tokens
        for _ in range(args.repeats):
            runs.append(run_once(args, draft, tokens))
            print(f"[{draft}: {runs[-1]['decode_seconds_per_token']} s/token]", file=sys.stderr)
    report = {
        "command": ["python", "-m", "tools.spec_bench", *(sys.argv[1:] if argv is None else argv)],
        "commit": _commit(),
        "model": args.model,
        "max_memory": args.max_memory,
        "tokens": args.tokens,
        "cold": args.cold,
    }
    report |= {"runs": runs, "comparison": compare(runs)}
    text = json.dumps(report, indent=2)
    if args.json:
        Path(args.json).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
