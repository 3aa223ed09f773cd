"""Speed prediction: each tier (RAM, mapped disk, streamed disk) adds its own bytes over its own
bandwidth."""

from __future__ import annotations

from dataclasses import replace

import pytest

from optdemo.plan.bandwidth import Bandwidths
from optdemo.plan.planner import Block, Plan
from optdemo.plan.speed import predict


def speed_plan(bytes_per_device: dict, layers: int) -> Plan:
    """A float16 plan with ``layers`` decoder layers and the given bytes per device (what the speed
    prediction reads)."""
    blocks = tuple(Block(f"layers.{i}", "cpu", 0, "layer") for i in range(layers))
    return Plan(
        model="m",
        display_name="m",
        dtype="float16",
        device_map={},
        module_bytes={},
        bytes_per_device=bytes_per_device,
        budget={},
        total_bytes=sum(bytes_per_device.values()),
        blocks=blocks,
        needs_offload_folder=False,
        disk_bytes_written=0,
        conversion_bytes=0,
    )


def test_prediction_adds_each_tier():
    bandwidths = Bandwidths(cpu_matvec={"float32": 10e9, "float16": 5e9, "bfloat16": 5e9}, disk_read=1e9)
    plan = speed_plan({"cpu": 5_000_000_000, "disk": 2_000_000_000}, layers=10)
    warm = predict(plan, bandwidths, page_cache_bytes=10**12)
    overhead = 0.004 + 0.0004 * 10
    assert warm.seconds_per_token == pytest.approx(1.0 + 0.4 + overhead)
    # RAM caches 1 of the 2 GB disk tier: plain Accelerate re-reads all of it, then computes.
    plain = predict(replace(plan, disk_tier="accelerate"), bandwidths, page_cache_bytes=10**9)
    assert plain.seconds_per_token == pytest.approx(1.0 + 2.0 + 0.4 + overhead)
    assert "re-read" in plain.assumption
    # Streamed: with four 0.5 GB disk blocks and room for one beside the CPU tier, the headroom and
    # the two stream buffers, 1.5 GB is read every token on top of the compute.
    blocks = tuple(Block(f"layers.{i}", "disk" if i >= 6 else "cpu", 5 * 10**8, "layer") for i in range(10))
    split = replace(plan, blocks=blocks)
    # Reading (1.5 s) is longer than computing (1.408 s): half of the computing hides behind it.
    cold = predict(split, bandwidths, page_cache_bytes=22 * 10**8)
    assert cold.seconds_per_token == pytest.approx(1.5 + 0.5 * (1.0 + 0.4 + overhead))
    assert cold.breakdown["disk reads (streamed)"] == pytest.approx(1.5 - 0.5 * (1.0 + 0.4 + overhead))
    assert "0.47 GiB of the disk tier cached, 1.40 GiB streamed" in cold.assumption
    # The same decision as the loader's (policy.mapped_prefix): enough room maps everything.
    assert "page cache" in predict(split, bandwidths, page_cache_bytes=30 * 10**8).assumption
    streamed = predict(replace(split, disk_tier="stream"), bandwidths, page_cache_bytes=10**12)
    assert streamed.seconds_per_token == pytest.approx(2.0 + 0.5 * (1.0 + 0.4 + overhead))
    gpu = Bandwidths(
        cpu_matvec={"float32": 10e9}, disk_read=1e9, host_to_device=10e9, gpu_matvec={"float16": 1e12}
    )
    on_gpu = predict(replace(plan, bytes_per_device={0: 4e9, "cpu": 6e9}), gpu, page_cache_bytes=10**12)
    assert on_gpu.breakdown["CPU→GPU transfers"] == pytest.approx(0.6)
    assert on_gpu.breakdown["GPU 0"] == pytest.approx(0.004)
