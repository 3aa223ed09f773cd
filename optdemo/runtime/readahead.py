"""Read a checkpoint's first weights into the page cache while the load is still planning.

A cold load starts with the disk idle while Python imports the model's code and plans; the disk
tier's own warm-up (:class:`~optdemo.runtime.tiers.disk_map.PageCacheWarmup`) starts only once the
model is built. :class:`ColdStartReadAhead` starts those reads at once, from the safetensors headers
alone: tensors grouped into blocks in execution order (embeddings first, head last), and of those
the prefix the page cache will keep by the rule that splits the disk tier
(:func:`optdemo.plan.policy.mapped_prefix`), so nothing read here is evicted by what follows.
Chunks are read through short-lived mappings (:func:`optdemo.system.libc.populate_file_range`):
nothing stays mapped or counts twice in RSS. A hint: a failure changes only the speed.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import threading
from pathlib import Path

from optdemo.core.load_config import LoadConfig
from optdemo.plan.policy import mapped_prefix
from optdemo.runtime.tiers.disk_map import WARMUP_CHUNK, PageCacheWarmup
from optdemo.runtime.tiers.disk_stream import Segment, safetensors_header
from optdemo.system import libc
from optdemo.system.hardware import Hardware
from optdemo.weights import convert

_BLOCK_NUMBER = re.compile(r"\.(\d+)(?:\.|$)")
_EMBEDDING_PARTS = {"wte", "wpe"}  # GPT-2 style names; others say "embed"


def block_order(name: str) -> float:
    """When a tensor's block runs in a forward pass: its block number (``layers.12`` -> 12),
    embeddings first (-1), anything else (final norm, untied head) after the last block."""
    if match := _BLOCK_NUMBER.search(name):
        return int(match.group(1))
    return -1 if "embed" in name or _EMBEDDING_PARTS.intersection(name.split(".")) else math.inf


def first_ranges(folder: str | Path, available: int) -> list[Segment]:
    """The file ranges of the blocks that the page cache keeps with ``available`` bytes, in
    execution order (none for a folder without safetensors weights)."""
    blocks: dict[float, list[Segment]] = {}
    for name in convert.safetensors_weight_files(str(folder)):
        path = str(Path(folder) / name)
        base, table = safetensors_header(path)
        size = os.path.getsize(path)  # a truncated file: read what is there (the load reports it)
        for tensor, entry in table.items():
            if tensor != "__metadata__":
                begin, end = (min(size, base + offset) for offset in entry["data_offsets"])
                blocks.setdefault(block_order(tensor), []).append(Segment(path, begin, end))
    order = sorted(blocks)
    sizes = [sum(segment.end - segment.start for segment in blocks[key]) for key in order]
    kept = mapped_prefix(sizes, available, 0)
    return [s for key in order[:kept] for s in _coalesce(blocks[key]) if s.end > s.start]


def _coalesce(segments: list[Segment]) -> list[Segment]:
    """Ranges of one file that touch (tensors stored back to back) merged into one."""
    merged: list[Segment] = []
    for segment in sorted(segments, key=lambda s: (s.path, s.start)):
        last = merged[-1] if merged else None
        if last and last.path == segment.path and segment.start - last.end <= mmap.PAGESIZE:
            merged[-1] = Segment(last.path, last.start, max(last.end, segment.end))
        else:
            merged.append(segment)
    return merged


class ColdStartReadAhead(PageCacheWarmup):
    """Reads file ranges into the page cache from :class:`~optdemo.runtime.tiers.disk_map.PageCacheWarmup`'s
    threads, each chunk through a mapping of its own that is dropped once the chunk is read."""

    def __init__(self, ranges: list[Segment]) -> None:
        self.bytes = sum(segment.end - segment.start for segment in ranges)
        chunks = []
        for segment in ranges:
            start = segment.start // mmap.PAGESIZE * mmap.PAGESIZE
            chunks += [
                (segment.path, offset, min(WARMUP_CHUNK, segment.end - offset))
                for offset in range(start, segment.end, WARMUP_CHUNK)
            ]
        self._begin(chunks)

    def _fetch(self, chunk: tuple[str, int, int]) -> None:
        libc.populate_file_range(*chunk)


def start_cold_read_ahead(config: LoadConfig, hardware: Hardware) -> ColdStartReadAhead | None:
    """Start reading ``config``'s checkpoint where the model will run on the CPU, memory-mapped
    from a local safetensors folder as it is: no GPU, no quantization, fast offloading, a disk
    tier that may be mapped, weights stored in the load dtype (else the load converts them and
    reads the copy). None when that does not apply or the files cannot be read here."""
    if not libc.available() or hardware.gpu_count or config.quantization != "none":
        return None
    if not config.fast_offload or config.disk_tier == "stream" or not Path(config.model).is_dir():
        return None
    try:
        if config.dtype != "auto" and convert.stored_dtype(config.model) not in (None, config.dtype):
            return None
        ranges = first_ranges(config.model, hardware.ram_available_bytes)
    except (OSError, ValueError, KeyError):
        return None  # a hint only: the load reads the files itself and reports what is wrong
    return ColdStartReadAhead(ranges) if ranges else None


class ReadAheadSlot:
    """One read-ahead at a time, so that two loads' reads never evict each other: a load claims the
    slot, which stops any other load's read-ahead first; the load that holds the model wins."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: ColdStartReadAhead | None = None

    def claim(
        self, config: LoadConfig, hardware: Hardware, mine: ColdStartReadAhead | None
    ) -> ColdStartReadAhead | None:
        """Read ``config``'s checkpoint ahead, keeping ``mine`` if this load has one already (and
        nobody stopped it); returns the read-ahead now under way for this load, or None."""
        with self._lock:
            other = self._current if self._current is not mine else None
        self.stop(other)
        if mine is None or mine.stopped.is_set():  # none yet, or stopped by another load
            mine = start_cold_read_ahead(config, hardware)
        with self._lock:
            self._current = mine
        return mine

    def stop(self, read_ahead: ColdStartReadAhead | None) -> None:
        """Stop ``read_ahead`` (if any) and free the slot when it held it."""
        if read_ahead is None:
            return
        read_ahead.stop()
        with self._lock:
            if self._current is read_ahead:
                self._current = None
