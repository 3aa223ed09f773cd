"""What a plan says before loading: what it writes to disk, and its warnings and blockers.

The planner decides where every module goes; this module weighs the consequences on this machine:
bytes written to the offload folder or, once, to the conversion cache (a ``.bin`` conversion, a
recast, a quantization), room on disk, RAM, and the messages a user should read first.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from optdemo.core.budget import Device, describe_gpu_count, format_bytes, missing_gpus
from optdemo.core.load_config import LoadConfig
from optdemo.models.source import ModelSource
from optdemo.system.hardware import Hardware, existing_parent
from optdemo.weights.convert import cached, converted_root, stored_dtype

if TYPE_CHECKING:
    import torch


def disk_writes(
    config: LoadConfig,
    source: ModelSource,
    checkpoint_format: str,
    disk_bytes: int,
    total: int,
    dtype: torch.dtype,
) -> tuple[int, int]:
    """(bytes written to the offload folder, bytes a one-time conversion writes to the cache).

    Safetensors disk layers in the load dtype are read in place. A ``.bin`` checkpoint with disk
    layers is rewritten into the offload folder on every load by plain Accelerate; with fast
    offloading it is converted once into the cache instead (nothing when already converted), and
    so is a local safetensors checkpoint stored in another dtype (only same-dtype weights map).
    """
    dtype_name = str(dtype).removeprefix("torch.")
    local = source.location if source.kind in ("local", "builtin") else None
    if checkpoint_format == "safetensors":
        recast = config.fast_offload and local is not None and stored_dtype(local) not in (None, dtype_name)
        if not disk_bytes or not recast:
            return 0, 0
    elif not disk_bytes:
        return 0, 0
    elif not config.fast_offload:
        return disk_bytes, 0
    elif checkpoint_format != "bin":  # unknown (a Hub repo not yet downloaded): converted if .bin
        return 0, 0
    if cached(source.location, config.revision, dtype_name, local) is not None:
        return 0, 0
    return 0, total


def quantized_conversion(config: LoadConfig, source: ModelSource, quantization: str, total: int) -> int:
    """Bytes the one-time quantization writes to the conversion cache (0 when done before): a
    CPU-quantized model always loads from its quantized copy there."""
    from optdemo.weights.quantize import scheme_key

    local = source.location if source.kind in ("local", "builtin") else None
    return 0 if cached(source.location, config.revision, scheme_key(quantization), local) else total


def note_conversion(notes: Notes, conversion: int, quantization: str) -> None:
    """Say that the first load writes ``conversion`` bytes to the cache once; block if no room."""
    free = int(shutil.disk_usage(existing_parent(str(converted_root()))).free)
    what = (
        f"quantizes it once to {quantization}"
        if quantization != "none"
        else ("converts the .bin checkpoint once to safetensors")
    )
    notes.warn(
        f"the first load {what} in {converted_root()} "
        f"({format_bytes(conversion)}; {format_bytes(free)} free there); later loads write nothing"
    )
    if free < conversion:
        fix = "set quantization to none" if quantization != "none" else "turn fast offloading off"
        notes.block(
            f"not enough free space to convert the checkpoint ({format_bytes(conversion)} needed in "
            f"{converted_root()}): free some space or {fix}"
        )


def stored_format(source: ModelSource) -> str:
    """``safetensors`` or ``bin`` when known: it decides whether disk layers are copied at load."""
    if source.kind == "catalog":
        return "bin"
    if source.kind in ("local", "builtin"):
        names = os.listdir(source.location)
        if any(n.endswith(".safetensors") for n in names):
            return "safetensors"
        if any(n.endswith(".bin") for n in names):
            return "bin"
    return "unknown"


@dataclass
class Notes:
    """The plan's messages as they are found: warnings, and the blockers among them."""

    warnings: list[str] = field(default_factory=list)
    blockers: list[str] = field(default_factory=list)

    def warn(self, text: str) -> None:
        """Something to read before loading."""
        self.warnings.append(text)

    def block(self, text: str) -> None:
        """Something that prevents loading (shown among the warnings too)."""
        self.warnings.append(text)
        self.blockers.append(text)


def assess(
    config: LoadConfig,
    source: ModelSource,
    hardware: Hardware,
    bytes_per_device: dict[Device, int],
    budget: dict[Device, int],
    disk_bytes: int,
    writes: int,
) -> Notes:
    """Warnings a user should read before loading, and what blocks the load."""
    notes = Notes()
    name = config.display_name
    total = sum(bytes_per_device.values())
    if config.max_memory is not None:
        for index in missing_gpus(config.max_memory, hardware.gpu_count):
            notes.warn(
                f"GPU {index} is not on this machine ({describe_gpu_count(hardware.gpu_count)}): "
                "this plan is for another machine and cannot be loaded here"
            )
    if disk_bytes:
        in_memory = sum(size for device, size in budget.items() if device != "disk")
        if config.fast_offload and not any(isinstance(d, int) for d in bytes_per_device):
            notes.warn(
                f"{format_bytes(disk_bytes)} of {name}'s weights go to disk: they are memory-mapped, "
                "so they run at RAM speed while the OS can cache them and at disk speed when it cannot"
            )
        else:
            notes.warn(
                f"{format_bytes(disk_bytes)} of {name}'s weights go to disk: every token reads them "
                "back, so generation will be slow"
            )
        if writes and config.offload_folder is None:
            notes.block(
                f"budget {format_bytes(in_memory)} cannot hold {name} ({format_bytes(total)}): "
                f"give an offload folder with {format_bytes(writes)} free or raise the memory budget"
            )
        elif writes and config.offload_folder is not None:
            free = free_disk(config.offload_folder, hardware)
            if free < writes:
                notes.block(
                    f"the offload folder has {format_bytes(free)} free but {name} needs "
                    f"{format_bytes(writes)} there: free some space, pick another folder, or raise "
                    "the memory budget"
                )
    cpu_bytes = bytes_per_device.get("cpu", 0)
    if cpu_bytes > hardware.ram_available_bytes:
        notes.warn(
            f"{format_bytes(cpu_bytes)} would be held in RAM but only "
            f"{format_bytes(hardware.ram_available_bytes)} is available now: lower the cpu budget "
            "so more goes to disk"
        )
    return notes


def free_disk(folder: str, hardware: Hardware) -> int:
    """Free bytes at ``folder`` (the probe's figure when it is the probed disk)."""
    path = existing_parent(folder)
    if path == hardware.disk_path:
        return hardware.disk_free_bytes
    return int(shutil.disk_usage(path).free)
