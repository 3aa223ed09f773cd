"""Hardware probe: what this machine can hold (GPUs, RAM, disk) and a sensible default budget.

The probe is cheap and side-effect free (no CUDA context is created when torch reports no GPU), so
the UI can call it on every page load.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass

import psutil

from optdemo.core.budget import MemoryBudget
from optdemo.system.cgroup import memory_limit

# Headroom kept free when suggesting a budget, in the spirit of Accelerate's own defaults: a GPU
# needs room for activations and the CUDA context, and the OS and the app itself need some RAM.
GPU_HEADROOM_FRACTION = 0.10
CPU_HEADROOM_FRACTION = 0.20
MIN_CPU_HEADROOM_BYTES = 2 * 2**30
BUDGET_STEP_BYTES = 2**28  # suggestions are whole quarter GiB


@dataclass(frozen=True)
class GpuInfo:
    """One CUDA device: index, name, and memory in bytes."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class Hardware:
    """A snapshot of this machine's memory: GPUs, RAM, and free disk at the offload folder."""

    gpus: tuple[GpuInfo, ...]
    ram_total_bytes: int
    ram_available_bytes: int
    disk_path: str
    disk_free_bytes: int

    @property
    def gpu_count(self) -> int:
        """How many GPUs torch can use here."""
        return len(self.gpus)


def probe_hardware(offload_folder: str | None = None) -> Hardware:
    """Measure GPUs (name, total, free), RAM (total, available) and free disk. RAM is what this
    process may use: a cgroup memory limit (a container, a Space, a benchmark's cap) lowers both
    figures to the limit and the room left under it.

    Args:
        offload_folder: where disk-offloaded weights would go; free space is measured at its
            nearest existing parent (the folder need not exist yet). Defaults to the current
            directory.
    """
    gpus = tuple(_probe_gpus())
    memory = psutil.virtual_memory()
    total, available = int(memory.total), int(memory.available)
    cap = memory_limit()
    if cap is not None:
        total, available = min(total, cap.limit_bytes), min(available, cap.headroom_bytes)
    disk_path = existing_parent(offload_folder or os.getcwd())
    return Hardware(
        gpus=gpus,
        ram_total_bytes=total,
        ram_available_bytes=available,
        disk_path=disk_path,
        disk_free_bytes=int(shutil.disk_usage(disk_path).free),
    )


def _probe_gpus() -> list[GpuInfo]:
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        gpus.append(GpuInfo(index, torch.cuda.get_device_name(index), int(total), int(free)))
    return gpus


def existing_parent(path: str) -> str:
    """The path itself if it exists, else its nearest existing ancestor (for disk-space checks)."""
    path = os.path.abspath(os.path.expanduser(path))
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def suggest_budget(hardware: Hardware) -> MemoryBudget:
    """A default max_memory for this machine: 90% of each GPU's free memory and the available
    RAM less 20% (at least 2 GiB) for the OS and the app, rounded down to a quarter GiB (the UI
    sliders' step, so the suggested budget and the sliders' budget are the same configuration)."""
    limits: list[tuple[int | str, int]] = []
    for gpu in hardware.gpus:
        limits.append((gpu.index, _round_step(gpu.free_bytes * (1 - GPU_HEADROOM_FRACTION))))
    headroom = max(MIN_CPU_HEADROOM_BYTES, hardware.ram_available_bytes * CPU_HEADROOM_FRACTION)
    limits.append(("cpu", _round_step(max(0, hardware.ram_available_bytes - headroom))))
    return MemoryBudget(tuple(limits))


def _round_step(n: float) -> int:
    return int(n) // BUDGET_STEP_BYTES * BUDGET_STEP_BYTES


def peak_rss_bytes() -> int | None:
    """This process's resident-memory high-water mark so far (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB


def quantization_unavailable(has_gpu: bool) -> str | None:
    """What 8-bit / 4-bit quantization lacks here, or None when it can work: the one check behind
    the Configuration form and the load's preflight. With a GPU it is bitsandbytes'; without one,
    optdemo's own (:mod:`optdemo.weights.quantize`) on torch's weight-only CPU kernels."""
    if not has_gpu:
        import torch

        kernels = (
            "_weight_int8pack_mm",
            "_weight_int4pack_mm_for_cpu",
            "_convert_weight_to_int4pack_for_cpu",
        )
        if all(hasattr(torch.ops.aten, kernel) for kernel in kernels):
            return None
        return "torch's int8/int4 CPU kernels (pip install -U torch)"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "the bitsandbytes package (pip install bitsandbytes)"
    return None
