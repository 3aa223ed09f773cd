"""The one model-status type and the load report: the API's device-key convention (``"0"``,
``"cpu"``, ``"disk"`` in JSON; an int GPU index inside Python) and the report's extra fields."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from optdemo.core.generation import GenerationStats
from optdemo.core.load_config import LoadConfig
from optdemo.plan.planner import plan_device_map
from optdemo.runtime.status import LoadReport, ModelStatus, map_differences
from optdemo.runtime.tiers.disk_map import DiskTierReport
from optdemo.system.hardware import Hardware

GiB = 2**30


# Documented in docs/USAGE.md's API table and pinned by the app tests: the /load and /status JSON keys.
LOAD_KEYS = {
    "status",
    "model",
    "display_name",
    "load_seconds",
    "device_map",
    "bytes_per_device",
    "matches_plan",
    "plan_differences",
    "message",
    "stopped_generation",
    "disk_tier",
    "checkpoint",
    "cpu_layers",
}


# The local model's part of /status; the app adds "backend" and "endpoint" (tests/app/test_status.py).
STATUS_KEYS = {
    "loaded",
    "model",
    "display_name",
    "config",
    "busy",
    "load_seconds",
    "device_map",
    "bytes_per_device",
    "plan",
    "disk_tier",
    "cpu_layers",
    "last_generation",
    "prompt_kernel",
    "prefix_cache",
    "timing",
}


def machine(disk_free: int = 10 * 2**40, disk_path: str = "/") -> Hardware:
    """A machine without GPUs, with known RAM and free disk at ``disk_path``."""
    return Hardware((), 64 * GiB, 64 * GiB, os.path.abspath(disk_path), disk_free)


def test_status_json_uses_string_device_keys() -> None:
    plan = plan_device_map(LoadConfig("opt-125m", max_memory="cpu=8GiB"), machine())
    stats = GenerationStats(3, 5, 0.1, 0.5, 10.0)
    status = ModelStatus(
        LoadConfig("opt-125m", max_memory="cpu=8GiB"),
        plan=plan,
        device_map={"model.decoder": 0, "lm_head": "cpu"},
        bytes_per_device={0: 10, "cpu": 20, "disk": 30},
        load_seconds=1.5,
        disk_tier=DiskTierReport(2, 30, ""),
        last_stats=stats,
    )
    data = json.loads(json.dumps(status.to_dict()))
    assert set(data) == STATUS_KEYS
    assert data["bytes_per_device"] == {"0": 10, "cpu": 20, "disk": 30}
    assert data["device_map"] == {"model.decoder": "0", "lm_head": "cpu"}
    assert data["config"]["max_memory"] == "cpu=8GiB"
    assert data["disk_tier"] == {
        "memory_mapped_modules": 2,
        "memory_mapped_bytes": 30,
        "streamed_blocks": 0,
        "streamed_bytes": 0,
        "stream_buffer_bytes": 0,
        "choice": "",
        "available_bytes": None,
        "note": "",
    }
    assert data["last_generation"]["tokens_per_second"] == 10.0
    assert status.plan_differences == map_differences(plan.device_map, status.device_map)
    assert status.matches_plan is False
    assert set(ModelStatus(None).to_dict()) == STATUS_KEYS and ModelStatus(None).to_dict()["loaded"] is False


def test_a_load_report_is_a_status_plus_its_outcome() -> None:
    plan = plan_device_map(LoadConfig("opt-125m", max_memory="cpu=8GiB"), machine())
    status = ModelStatus(
        LoadConfig("opt-125m"), plan=plan, device_map=dict(plan.device_map), load_seconds=0.123456
    )
    report = LoadReport.of(status, "reused", "already loaded")
    assert (report.config, report.plan, report.device_map) == (status.config, plan, plan.device_map)
    assert report.matches_plan and report.plan_differences == {}
    data = json.loads(json.dumps(report.to_dict()))
    assert set(data) == LOAD_KEYS
    assert (data["status"], data["message"], data["load_seconds"]) == ("reused", "already loaded", 0.1235)
    assert plan.device_map == {"": "cpu"}
    moved = LoadReport.of(replace(status, device_map={"": "disk"}), "loaded", "")
    assert moved.to_dict()["plan_differences"] == {"": ["cpu", "disk"]}
    assert moved.to_dict()["matches_plan"] is False
