"""The command-line tools in tools/: their pure parts, without running a benchmark or a load test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tools.bench import REPO_ROOT, build_parser, format_table, summarize


def _run(side: str, regime: str, load: float, per_token: float) -> dict:
    return {
        "side": side,
        "regime": regime,
        "load_s": load,
        "first_token_s": per_token,
        "s_per_token": per_token,
        "tokens_per_s": 1 / per_token,
        "peak_rss_bytes": 2**30,
        "offload_bytes_written": 0,
    }


def test_summary_takes_medians_and_ratios() -> None:
    runs = [
        _run("ram", "warm", 1.0, 0.1),
        _run("accelerate", "warm", 4.0, 0.4),
        _run("accelerate", "warm", 6.0, 0.6),
        _run("accelerate", "warm", 5.0, 0.5),
        _run("optdemo", "warm", 2.0, 0.2),
    ]
    rows = {row["side"]: row for row in summarize(runs)}
    assert rows["accelerate"]["runs"] == 3 and rows["accelerate"]["s_per_token"] == 0.5
    assert rows["optdemo"]["vs_ram"] == pytest.approx(2.0)
    assert rows["optdemo"]["vs_accelerate"] == pytest.approx(0.4)
    assert rows["optdemo"]["load_vs_accelerate"] == pytest.approx(0.4)
    table = format_table(summarize(runs)).splitlines()
    assert len(table) == 2 + 3
    assert table[-1].startswith("| warm | optdemo | 2.00 | 0.20 | 0.200 | 5.00 | 1.00 GiB | 0 MiB | 2.00x |")


def test_bench_command_line() -> None:
    args = build_parser().parse_args(["--build", "opt-125m", "--sides", "accelerate,optdemo"])
    assert (args.build, args.max_memory, args.tokens, args.repeats) == ("opt-125m", "cpu=1GiB", 30, 3)
    # Workers are spawned as ``python -m tools.bench`` from the repository root.
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--help"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and "usage: python -m tools.bench" in done.stdout
