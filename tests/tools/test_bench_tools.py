"""The command-line tools in tools/: their pure parts, without running a benchmark or a load test."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tools.bench import REPO_ROOT, build_parser
from tools.bench_report import format_table, summarize


def _run(side: str, regime: str, load: float, per_token: float, tokens: int = 8) -> dict:
    return {
        "side": side,
        "regime": regime,
        "load_s": load,
        "first_token_s": per_token,
        "s_per_token": per_token,
        "tokens_per_s": 1 / per_token,
        "generate_s": tokens * per_token,
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
    # Load + 8 tokens: Accelerate 7.2, 10.8 and 9.0 s (median 9.0), optdemo 3.6 s.
    assert rows["optdemo"]["total_s"] == pytest.approx(3.6)
    assert rows["accelerate"]["total_range"] == pytest.approx((7.2, 10.8))
    assert rows["optdemo"]["total_vs_accelerate"] == pytest.approx(3.6 / 9.0)
    assert rows["optdemo"]["total_vs_accelerate_worst"] == pytest.approx(3.6 / 7.2)
    cold_start = summarize(
        [_run("accelerate", "cold-start", 2.0, 3.0), _run("optdemo", "cold-start", 3.0, 1.0)]
    )
    assert [(r["regime"], r["total_vs_accelerate"]) for r in cold_start] == [
        ("cold-start", pytest.approx(1.0)),
        ("cold-start", pytest.approx(11 / 26)),
    ]
    table = format_table(summarize(runs)).splitlines()
    assert len(table) == 2 + 3
    assert table[-1].startswith("| warm | optdemo | 2.00 | 0.20 | 0.200 | 5.00 | 1.00 GiB | 0 MiB | 2.00x |")


def test_bench_command_line() -> None:
    args = build_parser().parse_args(["--build", "opt-125m", "--sides", "accelerate,optdemo"])
    assert (args.build, args.max_memory, args.tokens, args.repeats) == ("opt-125m", "cpu=1GiB", 30, 3)
    assert build_parser().parse_args(["--regime", "cold-start"]).regime == "cold-start"
    # Workers are spawned as ``python -m tools.bench`` from the repository root.
    done = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--help"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0 and "usage: python -m tools.bench" in done.stdout


def test_gpu_bench_floors_and_ratios() -> None:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import gpu_bench

    from optdemo.plan.bandwidth import Bandwidths

    bus = Bandwidths(
        cpu_matvec={"float16": 20e9}, disk_read=1e9, host_to_device=10e9, host_to_device_pinned=40e9
    )
    tiers = {"gpu+cpu": {"0": 4 * 10**9, "cpu": 8 * 10**9}}
    # The floor: offloaded bytes over the pinned bandwidth (GPU sides) or the CPU rate (cpu).
    assert gpu_bench.floor_seconds("gpu", tiers["gpu+cpu"], bus) == pytest.approx(0.2)
    assert gpu_bench.floor_seconds("cpu", tiers["gpu+cpu"], bus) == pytest.approx(0.4)

    def run(side: str, per_token: float, ids: list[int]) -> dict:
        return {
            "scenario": "gpu+cpu",
            "side": side,
            "s_per_token": per_token,
            "token_ids": ids,
            "load_s": 10.0,
            "gpu_peak_during_generation_bytes": 5 * 2**30,
            "host_anon_after_generation_bytes": 2**30,
        }

    rows = gpu_bench.summarize(
        [run("plain", 2.0, [1, 2]), run("gpu", 0.3, [1, 2]), run("cpu", 0.5, [1, 3])], tiers, bus
    )
    by_side = {row["side"]: row for row in rows}
    assert by_side["gpu"]["vs_plain"] == pytest.approx(0.15)
    assert by_side["gpu"]["vs_floor"] == pytest.approx(1.5)
    assert by_side["cpu"]["vs_floor"] == pytest.approx(1.25)
    assert by_side["gpu"]["same_tokens_as_plain"] and not by_side["cpu"]["same_tokens_as_plain"]
    table = gpu_bench.format_table(rows)
    assert "| gpu+cpu | gpu | 0.300 | 0.15x | 0.200 | 1.50x | yes | 10.0 | 5.00 | 1.00 |" in table
    assert "| NO |" in table


@pytest.mark.slow
def test_a_checkpoint_larger_than_ram_is_built_one_shard_at_a_time(tmp_path, monkeypatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from optdemo.core.catalog import catalog_entry
    from tools import build_sharded

    monkeypatch.setattr(build_sharded, "SHARD_BYTES", 60 * 10**6)
    folder = build_sharded.build_sharded_opt(tmp_path / "m", "opt-125m")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    assert all(
        (folder / s).stat().st_size <= 60 * 10**6 + 80 * 10**6 for s in shards
    )  # one tensor over at most
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float16)
    assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == catalog_entry("opt-125m").parameters
    assert torch.equal(model.model.decoder.layers[0].fc1.bias, torch.zeros(3072, dtype=torch.float16))


def test_optdemos_own_floor_counts_only_what_it_streams() -> None:
    from tools.bench_report import streamed_floor

    runs = [
        {"side": "accelerate", "disk_tier": None},
        {"side": "optdemo", "disk_tier": {"streamed_bytes": 3 * 10**9}},
        {"side": "optdemo", "disk_tier": {"streamed_bytes": 3 * 10**9}},
    ]
    assert streamed_floor(runs, 2 * 10**9) == pytest.approx(1.5)
    assert streamed_floor([{"side": "optdemo", "disk_tier": {"streamed_bytes": 0}}], 1e9) is None


def test_bench_quantization_sides() -> None:
    from tools.bench import disk_read_bytes, expand_sides, side_quantization

    assert expand_sides(["ram", "accelerate", "optdemo"], "none,8bit,4bit") == [
        "ram",
        "accelerate",
        "optdemo",
        "ram-8bit",
        "optdemo-8bit",
        "ram-4bit",
        "optdemo-4bit",
    ]
    assert expand_sides(["optdemo"], "none") == ["optdemo"]
    with pytest.raises(SystemExit, match="'3bit' is not one of none, 8bit, 4bit"):
        expand_sides(["optdemo"], "3bit")
    assert [side_quantization(s) for s in ("optdemo", "ram-4bit", "optdemo-8bit")] == ["none", "4bit", "8bit"]
    assert disk_read_bytes() >= 0
    row = {**_run("optdemo-4bit", "warm", 1.0, 0.1), "disk_bytes_per_token": 3 * 2**20}
    table = format_table(summarize([_run("ram", "warm", 1.0, 0.2), row]))
    assert table.splitlines()[-1].startswith("| warm | optdemo-4bit | 1.00 | 0.10 | 0.100 |")
    assert table.splitlines()[-1].endswith("| 0.50x | - | - | 3.0 MiB |")


def test_the_disk_rate_beside_a_run_reads_the_checkpoints_last_bytes_past_the_cache(
    tmp_path, monkeypatch
) -> None:
    import os

    from tools import bench

    (tmp_path / "a.safetensors").write_bytes(os.urandom(3 * 2**20))
    (tmp_path / "b.safetensors").write_bytes(os.urandom(2 * 2**20))
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setattr(bench, "_RATE_READ", 2**20)
    reads: list[tuple[str, int, int]] = []
    real_preadv, real_open = os.preadv, os.open
    names: dict[int, str] = {}

    def opened(path, flags, *args):
        fd = real_open(path, flags, *args)
        names[fd] = os.path.basename(path)
        assert flags & os.O_DIRECT  # past the page cache: it neither uses nor disturbs it
        return fd

    def read(fd, buffers, offset):
        got = real_preadv(fd, buffers, offset)
        reads.append((names[fd], offset, got))
        return got

    monkeypatch.setattr(bench.os, "open", opened)
    monkeypatch.setattr(bench.os, "preadv", read)
    rate = bench.sequential_read_rate(tmp_path, limit=3 * 2**20)
    if rate is None:
        pytest.skip("this file system has no O_DIRECT")
    # The last 3 MiB of the 5 MiB checkpoint: a's last MiB, then all of b; config.json untouched.
    got = [(name, offset, size) for name, offset, size in reads if size]
    mib = 2**20
    assert got == [("a.safetensors", 2 * mib, mib), ("b.safetensors", 0, mib), ("b.safetensors", mib, mib)]
    assert rate > 0


def test_the_prefill_floor_times_a_layer_and_says_which_paths_are_exact() -> None:
    from tools.prefill_floor import fc1_paths, layer_seconds

    paths = fc1_paths(hidden=64, ffn=1024, rows=3)
    assert paths["float16"]["equals_float16"] and paths["float16 in 512-row blocks"]["equals_float16"]
    assert all(entry["seconds"] > 0 and entry["gflops"] > 0 for entry in paths.values())
    seconds, layers = layer_seconds("opt-125m", 4)
    assert seconds > 0 and layers == 12
