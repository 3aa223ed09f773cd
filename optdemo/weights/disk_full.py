"""A disk that fills up while weights are written: recognising it, and saying how much room is needed.

A write that runs out of room raises ``OSError(ENOSPC)`` from Python, but safetensors (which writes
the conversion cache and Accelerate's offload folder) raises its own ``SafetensorError`` with the
OS error in its message. Left unrecognised, that error reads like a corrupt checkpoint, and the
user is told to save the model again when the disk only needs room.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from optdemo.core.budget import format_bytes
from optdemo.core.errors import LoadError

# What safetensors' message holds for ENOSPC and EDQUOT (from Rust's io::Error: "No space left on
# device (os error 28)", "Disk quota exceeded (os error 122)").
_FULL_MARKERS = ("no space left", "os error 28", "disk quota exceeded", f"os error {errno.EDQUOT}")
_SAFETENSORS_FLOATS = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that found the disk full or over quota: an ``OSError`` with
    ENOSPC or EDQUOT, or safetensors' ``SafetensorError`` saying so (it is not an ``OSError``)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    if type(exc).__name__ != "SafetensorError":
        return False
    text = str(exc).lower()
    return any(marker in text for marker in _FULL_MARKERS)


def disk_full_error(folder: Path, shards: Iterable[Path], dtype: str, bound: str) -> LoadError:
    """The error for a conversion into ``folder`` that the disk had no room for: the space free
    there now, and what writing ``shards`` in ``dtype`` takes (``bound``: "about" for a cast, "up
    to" for a quantization, whose weights take less)."""
    free = format_bytes(shutil.disk_usage(folder).free)
    needed = format_bytes(tensor_bytes(shards, dtype))
    return LoadError(
        f"the disk at {folder} is full: {free} free, the conversion needs {bound} {needed}: free "
        "space or choose another cache folder (OPTDEMO_CACHE)"
    )


def tensor_bytes(shards: Iterable[Path], dtype: str) -> int:
    """Bytes the tensors of ``shards`` (``.bin`` or safetensors files) take with their floating
    tensors in ``dtype``: what converting them writes, headers aside. Reads safetensors headers
    and memory-maps ``.bin`` pickles, so nothing large is read into memory."""
    import torch

    item = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    total = 0
    for shard in shards:
        if shard.suffix == ".safetensors":
            with open(shard, "rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                start, end = info["data_offsets"]
                size = _SAFETENSORS_FLOATS.get(info["dtype"])
                total += (end - start) // size * item if size else end - start
        else:
            state = torch.load(shard, map_location="cpu", mmap=True, weights_only=True)
            for tensor in state.values():
                size = item if tensor.is_floating_point() else tensor.element_size()
                total += tensor.numel() * size
    return total
