"""A plan's blockers: the warnings that prevent loading (too little disk among them), and preflight
refusing with the first of them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from optdemo.core.errors import PlanError
from optdemo.core.load_config import LoadConfig
from optdemo.plan.planner import plan_device_map
from optdemo.runtime.loader import preflight
from optdemo.system.hardware import Hardware

GiB = 2**30


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
