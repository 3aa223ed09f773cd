"""tools/spec_bench.py: generation without and with a draft, each in a fresh process, compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tools.spec_bench import compare, draft_flags, main, predicted


def test_draft_flags_and_the_prediction_from_measured_costs() -> None:
    assert draft_flags("none") == [] and draft_flags("4bit") == ["--draft", "4bit"]
    assert draft_flags("model:opt-125m") == ["--draft-model", "opt-125m"]
    assert draft_flags("4bit@3") == ["--draft", "4bit", "--draft-length", "3"]
    # A disk-bound pass: one token 1 s, each further one 0.02 s, a draft token 0.05 s.
    rows = predicted(
        {"one_token_pass_seconds": 1.0, "per_extra_token_seconds": 0.02, "draft_token_seconds": 0.05}
    )
    assert [row["acceptance"] for row in rows] == [0.5, 0.7, 0.9]
    assert 1.0 < rows[0]["speedup"] < rows[1]["speedup"] < rows[2]["speedup"]
    assert predicted({"one_token_pass_seconds": 1.0, "per_extra_token_seconds": None}) is None
    base = {"run": "none", "token_ids": [1, 2], "decode_seconds_per_token": 1.0}
    run = {
        "run": "4bit",
        "token_ids": [1, 2],
        "decode_seconds_per_token": 0.5,
        "acceptance": 0.8,
        "k_used": [3],
    }
    (row,) = compare([base, run])
    assert row["token_identical"] is True and row["decode_speedup"] == pytest.approx(2.0)
    shorter = {**run, "run": "4bit@3", "token_ids": [1], "k_pass_over_one_pass": 4.8}
    (row,) = compare([base, shorter])  # a shorter measuring run: the base's first tokens
    assert row["token_identical"] is True and row["k_pass_over_one_pass"] == 4.8
    (row,) = compare([base, {**shorter, "token_ids": [2]}])
    assert row["token_identical"] is False


@pytest.mark.slow
def test_a_short_run_with_and_without_a_draft(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "spec.json"
    runs = ["--drafts", "none,8bit@2", "--tokens", "8", "--measure-tokens", "6", "--no-warmup"]
    assert main([str(tiny_model_dir), *runs, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [run["run"] for run in report["runs"]] == ["none", "8bit@2"]
    assert [len(run["token_ids"]) for run in report["runs"]] == [8, 6]
    (row,) = report["comparison"]
    assert row["run"] == "8bit@2" and row["token_identical"] is True
    assert set(row["k_used"]) <= {1, 2} and row["k_used"] and row["k_pass_over_one_pass"] > 0
