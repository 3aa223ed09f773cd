"""Several GPUs in one box, through Accelerate: docs/DEPLOY.md's scale-out recipe says a budget such as
``0=…,1=…,cpu=…`` spreads the layers over every GPU and that the plan shows each GPU separately.
Planned offline for opt-66b on a fake two-GPU machine (no GPU, no weights needed).
"""

from __future__ import annotations

from pathlib import Path

from optdemo.core.budget import format_bytes
from optdemo.core.load_config import LoadConfig
from optdemo.plan.planner import plan_device_map
from optdemo.system.hardware import GpuInfo, Hardware, existing_parent
from optdemo.web.render import describe_placement, device_map_rows, plan_summary

GiB = 2**30


def two_gpu_machine(tmp_path: Path) -> Hardware:
    gpus = (GpuInfo(0, "Fake GPU A", 48 * GiB, 48 * GiB), GpuInfo(1, "Fake GPU B", 48 * GiB, 48 * GiB))
    return Hardware(
        gpus=gpus,
        ram_total_bytes=128 * GiB,
        ram_available_bytes=128 * GiB,
        disk_path=existing_parent(str(tmp_path)),
        disk_free_bytes=2**40,
    )


def test_two_gpus_each_get_their_share_and_are_shown_apart(tmp_path: Path) -> None:
    config = LoadConfig(
        "facebook/opt-66b",
        max_memory="0=40GiB,1=40GiB,cpu=60GiB",
        offload_folder=str(tmp_path / "offload"),
        fast_offload=False,
    )
    plan = plan_device_map(config, two_gpu_machine(tmp_path))
    per_device = plan.bytes_per_device
    assert list(per_device)[:2] == [0, 1]
    assert 30 * GiB < per_device[0] <= 40 * GiB and 30 * GiB < per_device[1] <= 40 * GiB
    assert sum(per_device.values()) == plan.total_bytes
    # Layers fill GPU 0 first, then GPU 1, then the CPU: a pipeline, in order.
    layers = [plan.device_map[name] for name in plan.device_map if ".layers." in name]
    order = {0: 0, 1: 1, "cpu": 2, "disk": 3}
    assert [order[d] for d in layers] == sorted(order[d] for d in layers)
    assert {0, 1} <= set(layers)
    # Each GPU appears on its own in the summary, the status line and the module table.
    summary = plan_summary(plan)
    assert f"**GPU 0** {format_bytes(per_device[0])}" in summary
    assert f"**GPU 1** {format_bytes(per_device[1])}" in summary
    assert describe_placement(per_device).startswith(
        f"GPU 0: {format_bytes(per_device[0])} · GPU 1: {format_bytes(per_device[1])}"
    )
    assert {row[1] for row in device_map_rows(plan)} >= {"GPU 0", "GPU 1"}
