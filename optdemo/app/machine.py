"""What the app tells people about this machine: its GPUs, RAM and disk, whether quantization can
run here, whether an offload folder can be used, and what the conversion cache holds. The web layer
formats these; it never probes the system itself."""

from __future__ import annotations

import os
from dataclasses import dataclass

from optdemo.core.budget import format_bytes
from optdemo.system.hardware import Hardware, existing_parent, probe_hardware, quantization_unavailable
from optdemo.weights import convert


def probe(folder: str | None = None) -> Hardware:
    """This machine now: GPUs, RAM, and free disk at ``folder`` (the cache folder when None)."""
    return probe_hardware(folder)


def quantization_missing(hardware: Hardware) -> str | None:
    """What 8-bit / 4-bit quantization lacks on this machine, or None when it can run (the same
    check a load's preflight makes)."""
    return quantization_unavailable(bool(hardware.gpus))


@dataclass(frozen=True)
class FolderCheck:
    """Whether an offload folder can be used, as typed: its absolute path, what is wrong with it
    (None: nothing), and the free space where it would be."""

    path: str
    problem: str | None
    disk_path: str = ""
    free_bytes: int = 0


def check_offload_folder(folder: str | None) -> FolderCheck:
    """Check ``folder`` as the offload folder: not a file, writable (or creatable in a writable
    parent); and the free space at it (at the cache folder for an empty field)."""
    folder = (folder or "").strip()
    path = os.path.abspath(os.path.expanduser(folder)) if folder else ""
    if folder:
        if os.path.exists(path) and not os.path.isdir(path):
            return FolderCheck(path, "is a file, not a folder: give a folder for the layers that go to disk")
        parent = existing_parent(path)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            what = "exists but is not writable" if parent == path else f"cannot be created in `{parent}`"
            return FolderCheck(path, f"{what}: pick a folder you can write to")
    info = probe_hardware(folder or None)
    return FolderCheck(path, None, info.disk_path, info.disk_free_bytes)


def free_disk_text(folder: str | None) -> str:
    """ "12.3 GiB free at `/data`": the free space where ``folder`` would be (the current folder
    for an empty field), measured now. The one wording of free disk space in every view."""
    info = probe_hardware((folder or "").strip() or None)
    return f"{format_bytes(info.disk_free_bytes)} free at `{info.disk_path}`"


def conversion_cache_summary(remedy: str | None = "Clear cache removes them", code: bool = True) -> str:
    """One line on the conversion cache, read now: how many converted checkpoints, how big, where;
    and what interrupted conversions left (``remedy`` says how to remove it; None: not said here).
    The Configuration tab and ``python -m optdemo cache`` both print this line (``code``: the
    folder in backticks)."""
    entries = convert.cache_entries()
    root = convert.converted_root()
    where = f"`{root}`" if code else str(root)
    line = f"{len(entries)} converted checkpoint(s), {format_bytes(sum(e.bytes for e in entries))} in {where}"
    stale = convert.interrupted_conversions() if remedy is not None else []
    if stale:
        left = format_bytes(sum(convert.folder_bytes(path) for path in stale))
        line += f"; {len(stale)} interrupted conversion(s) left {left} ({remedy})"
    return line
