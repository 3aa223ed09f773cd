"""The data that crosses the layers: a plan's blockers, the one model-status type, and the API's
device-key convention (``"0"``, ``"cpu"``, ``"disk"`` in JSON; an int GPU index inside Python)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from optdemo.core.errors import PlanError
from optdemo.core.generation import GenerationStats
from optdemo.core.load_config import LoadConfig
from optdemo.plan.planner import plan_device_map
from optdemo.runtime.loader import preflight
from optdemo.runtime.status import LoadReport, ModelStatus, map_differences
from optdemo.runtime.tiers.disk_map import DiskTierReport
from optdemo.system.hardware import Hardware

GiB = 2**30
# Documented in README's API table and pinned by the app tests: the /load and /status JSON keys.
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
STATUS_KEYS = {
    "loaded",
    "backend",  # "local", or "endpoint" with a serving endpoint (then "endpoint" says which)
    "endpoint",
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
}


def machine(disk_free: int = 10 * 2**40, disk_path: str = "/") -> Hardware:
    """A machine without GPUs, with known RAM and free disk at ``disk_path``."""
    return Hardware((), 64 * GiB, 64 * GiB, os.path.abspath(disk_path), disk_free)


def test_a_plan_that_fits_has_no_blockers() -> None:
    plan = plan_device_map(LoadConfig("opt-125m", max_memory="cpu=8GiB"), machine())
    assert plan.blockers == ()
    assert plan.fits is True
    assert plan.to_dict()["blockers"] == []


def test_blockers_are_the_warnings_that_prevent_loading() -> None:
    config = LoadConfig("opt-66b", max_memory="0=5GiB,cpu=20GiB", fast_offload=False)
    plan = plan_device_map(config, machine())
    assert plan.fits is False
    # The missing GPU and the slow disk tier are warnings; only the missing offload folder blocks.
    assert len(plan.blockers) == 1
    assert plan.blockers[0].startswith("budget 25 GiB cannot hold opt-66b (122 GiB): give an offload folder")
    assert set(plan.blockers) < set(plan.warnings)
    assert plan.warnings[0].startswith("GPU 0 is not on this machine")
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["fits"] is False and data["blockers"] == list(plan.blockers)
    assert data["bytes_per_device"].keys() == {"0", "cpu", "disk"}


def test_too_little_disk_blocks(tmp_path: Path) -> None:
    folder = str(tmp_path / "off")
    config = LoadConfig("opt-66b", max_memory="cpu=20GiB", offload_folder=folder, fast_offload=False)
    plan = plan_device_map(config, machine(1000, str(tmp_path)))
    assert plan.blockers == (plan.warnings[-1],)
    assert plan.blockers[0].startswith("the offload folder has 1000 B free but opt-66b needs ")
    roomy = plan_device_map(config, machine(10 * 2**40, str(tmp_path)))
    assert roomy.blockers == () and roomy.fits


def test_preflight_refuses_with_the_first_blocker(tiny_bin_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_bin_model_dir), max_memory="cpu=300KiB", fast_offload=False)
    plan = plan_device_map(config)
    assert plan.blockers, plan.warnings
    with pytest.raises(PlanError) as info:
        preflight(config)
    assert str(info.value) == plan.blockers[0]


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
