"""Stream the disk tier at disk speed when RAM cannot cache it.

Memory-mapped disk layers (:mod:`optdemo.runtime.tiers.disk_map`) are ideal while the page cache can hold
them. When it cannot (a model larger than the RAM left, a container's memory limit), every token faults them
back in a few hundred KiB at a time, and a sequential scan larger than the cache evicts everything, every
token. This module reads each disk block instead with one large sequential read per block (``O_DIRECT``: past
the page cache, so it evicts nothing) into a ring of reusable buffers, from a reader thread, ``depth`` blocks
ahead of the one computing (FlexGen's overlap of I/O and compute, on the CPU). The buffers are the only memory
it takes: ``depth`` x the largest block, allocated once.

Each block's tensors lie next to each other in a safetensors file (their names share the block's
prefix), so a block is one byte range per file holding it (two when it straddles two shards): read
them back to back into a buffer and the tensors are views.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

from optdemo.runtime import timing
from optdemo.runtime.timing_data import DISK
from optdemo.weights.tensors import assign_tensors

_ALIGN = 4096  # O_DIRECT wants offsets, lengths and buffers aligned to the logical block size
# safetensors dtype -> torch dtype name; the integer ones hold quantized weights (optdemo.weights.quantize).
_DTYPES = {
    "F16": "float16",
    "BF16": "bfloat16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "U8": "uint8",
}


@dataclass(frozen=True)
class Segment:
    """One contiguous byte range of a block's weights in one safetensors file."""

    path: str
    start: int
    end: int

    @property
    def aligned_start(self) -> int:
        """Where its direct read begins (``start`` rounded down to the alignment)."""
        return self.start // _ALIGN * _ALIGN

    @property
    def aligned_length(self) -> int:
        """Bytes its direct read covers (from ``aligned_start``, rounded up to the alignment)."""
        return -(-(self.end - self.aligned_start) // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class BlockSpan:
    """Where one block's weights lie on disk: one byte range per safetensors file holding some of
    them (one, unless the block straddles two shards), read back to back into one buffer; and each
    tensor's place in that buffer (name relative to the block -> buffer offset, dtype, shape)."""

    segments: tuple[Segment, ...]
    tensors: dict[str, tuple[int, str, tuple[int, ...]]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of its ranges (what one token reads for this block)."""
        return sum(segment.end - segment.start for segment in self.segments)

    @property
    def buffer_bytes(self) -> int:
        """The buffer it needs: each segment's aligned read, back to back."""
        return sum(segment.aligned_length for segment in self.segments)


def safetensors_header(path: str) -> tuple[int, dict]:
    """(offset where tensor data starts, the header's tensor table) of a safetensors file."""
    with open(path, "rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        return 8 + length, json.loads(handle.read(length))


# A block's range in one file may hold a little that is not its own (alignment, a small tensor of
# another module sorted between its tensors); more than this share and the block stays mapped.
_SLACK = 0.05


def block_span(module: Any, headers: dict[str, tuple[int, dict]]) -> BlockSpan | None:
    """The byte ranges of an Accelerate-offloaded block's weights, from the offload index its hooks
    read; None when a tensor is not in a safetensors file in the module's dtype, or when a file's
    range would hold much besides the block's own tensors (then the block is not streamed)."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook

    places: dict[str, tuple[str, int, int, str, tuple[int, ...]]] = {}
    for prefix, sub in module.named_modules():
        hook = getattr(sub, "_hf_hook", None)
        hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
        align = next((h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload), None)
        index = getattr(getattr(getattr(align, "weights_map", None), "dataset", None), "index", None)
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            info = (index or {}).get(align.weights_map.prefix + name) if align else None
            if not info or not info.get("safetensors_file"):
                return None
            path = info["safetensors_file"]
            if path not in headers:
                headers[path] = safetensors_header(path)
            base, table = headers[path]
            entry = table.get(info.get("weight_name", align.weights_map.prefix + name))
            if entry is None or _DTYPES.get(entry["dtype"]) != str(tensor.dtype).removeprefix("torch."):
                return None
            begin, end = entry["data_offsets"]
            places[f"{prefix}.{name}" if prefix else name] = (path, base + begin, base + end, *_meta(entry))
    if not places:
        return None
    segments: list[Segment] = []
    for path in dict.fromkeys(place[0] for place in places.values()):  # in first-seen order
        own = [place for place in places.values() if place[0] == path]
        segment = Segment(path, min(p[1] for p in own), max(p[2] for p in own))
        if segment.end - segment.start > (1 + _SLACK) * sum(p[2] - p[1] for p in own) + 2 * _ALIGN:
            return None
        segments.append(segment)
    offsets, at = {}, 0  # where each segment's aligned read lands in the buffer
    for segment in segments:
        offsets[segment.path] = at - segment.aligned_start
        at += segment.aligned_length
    tensors = {name: (offsets[place[0]] + place[1], place[3], place[4]) for name, place in places.items()}
    return BlockSpan(tuple(segments), tensors)


def _meta(entry: dict) -> tuple[str, tuple[int, ...]]:
    return _DTYPES[entry["dtype"]], tuple(entry["shape"])


class DiskStreamer:
    """Reads blocks into ``depth`` reusable buffers, ahead of execution, from one reader thread.

    Blocks run in order 0..n-1, every token. The k-th block to run uses buffer ``k % depth``; when
    it finishes, that buffer receives the block that runs ``depth`` later, whose read starts at
    once. A pass cut short (an error inside a block) is noticed at the next block and the ring
    restarted there, so nothing waits forever.
    """

    def __init__(self, spans: list[BlockSpan], depth: int = 2, direct: bool = True) -> None:
        self.spans = spans
        self.depth = max(1, min(depth, len(spans)))
        size = max(span.buffer_bytes for span in spans)
        self.buffers = [mmap.mmap(-1, size) for _ in range(self.depth)]  # page-aligned, anonymous
        self.ready = [threading.Event() for _ in range(self.depth)]
        self.holds = [-1] * self.depth  # the block each buffer holds (or is receiving)
        self.failure: list[BaseException] = []
        self.direct = direct
        self.bytes_read = 0
        self._requests: queue.Queue[tuple[int, int] | None] = queue.Queue()
        self._files: dict[str, int] = {}
        self._thread = threading.Thread(target=self._read_loop, name="optdemo-disk-stream", daemon=True)
        self._thread.start()
        self._ran = self._issued = 0  # blocks run, blocks requested (both counted since the start)
        self._restart_at(0)

    @property
    def buffer_bytes(self) -> int:
        """Memory the streamer holds: its buffers (the bound; nothing else grows)."""
        return sum(len(buffer) for buffer in self.buffers)

    @property
    def reader_id(self) -> int | None:
        """The reader thread's id for the OS (whose reads :mod:`optdemo.runtime.timing_hooks`
        tells apart from the blocks' own)."""
        return self._thread.native_id

    def _issue(self) -> None:
        slot = self._issued % self.depth
        block = self._issued % len(self.spans)
        self.ready[slot].clear()
        self.holds[slot] = block
        self._issued += 1
        self._requests.put((block, slot))

    def _restart_at(self, index: int) -> None:
        for slot in range(min(self.depth, self._issued - self._ran)):
            self.ready[(self._ran + slot) % self.depth].wait()  # let reads in flight land
        self._ran = self._issued = index
        for _ in range(self.depth):
            self._issue()

    def _read_loop(self) -> None:
        while (request := self._requests.get()) is not None:
            block, slot = request
            try:
                self._read(block, self.buffers[slot])
            except BaseException as exc:  # noqa: BLE001 - surfaced to the computing thread
                self.failure.append(exc)
            self.ready[slot].set()

    def _read(self, index: int, buffer: mmap.mmap) -> None:
        at = 0
        for segment in self.spans[index].segments:
            self._read_segment(segment, memoryview(buffer)[at : at + segment.aligned_length])
            at += segment.aligned_length
        self.bytes_read += self.spans[index].nbytes

    def _read_segment(self, segment: Segment, view: memoryview) -> None:
        fd = self._open(segment.path)
        begin, length = segment.aligned_start, len(view)
        done = 0
        while done < length:  # a read at the end of the file returns less than asked: that is all
            got = os.preadv(fd, [view[done:]], begin + done)
            if got <= 0:
                break
            done += got
        if done < segment.end - begin:
            raise OSError(f"short read of {segment.path}: {done} of {segment.end - begin} bytes")
        if not self.direct:
            os.posix_fadvise(fd, begin, length, os.POSIX_FADV_DONTNEED)  # keep the cache for others

    def _open(self, path: str) -> int:
        if path not in self._files:
            flags = os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if self.direct else 0)
            try:
                self._files[path] = os.open(path, flags)
            except OSError:  # a file system without O_DIRECT: buffered reads, dropped after use
                self.direct = False
                self._files[path] = os.open(path, os.O_RDONLY)
        return self._files[path]

    def tensors(self, index: int) -> dict[str, Any]:
        """Block ``index``'s weights as views of its buffer, once its read has finished (the time
        waited for it, and the bytes read for it, are the block's: :mod:`optdemo.runtime.timing`)."""
        import torch

        started = timing.stamp()
        if self._ran % len(self.spans) != index:  # the last pass was cut short: start over here
            self._restart_at(index)
        slot = self._ran % self.depth
        self.ready[slot].wait()
        timing.waited(started, DISK, disk_bytes=self.spans[index].buffer_bytes)
        if self.failure:
            raise self.failure[0]
        raw = torch.frombuffer(self.buffers[slot], dtype=torch.uint8)
        views = {}
        for name, (offset, dtype, shape) in self.spans[index].tensors.items():
            kind = getattr(torch, dtype)
            count = kind.itemsize
            for dim in shape:
                count *= dim
            views[name] = raw[offset : offset + count].view(kind).view(shape)
        return views

    def release(self, index: int) -> None:
        """Block ``index`` finished: its buffer now receives the block that runs ``depth`` later."""
        self._ran += 1
        self._issue()

    def close(self) -> None:
        """Stop the reader, close the files, free the buffers."""
        self._requests.put(None)
        self._thread.join(timeout=30)
        for fd in self._files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files.clear()
        self.buffers = []


def stream_blocks(model: Any, names: list[str], depth: int = 2) -> tuple[DiskStreamer | None, list[str]]:
    """Serve the disk-tier blocks ``names`` (in execution order) from a :class:`DiskStreamer`
    instead of Accelerate's per-forward loading. A block that cannot be read as a few ranges of
    its own bytes (see :func:`block_span`) is left as it is. Returns the streamer (None when nothing is
    streamed) and the names it serves."""
    import torch
    from accelerate.hooks import remove_hook_from_submodules

    headers: dict[str, tuple[int, dict]] = {}
    chosen = [(name, span) for name in names if (span := block_span(model.get_submodule(name), headers))]
    if not chosen:
        return None, []
    streamer = DiskStreamer([span for _, span in chosen], depth)
    for index, (name, span) in enumerate(chosen):
        module = model.get_submodule(name)
        remove_hook_from_submodules(module)
        placeholders = {
            tensor: torch.empty(shape, dtype=getattr(torch, dtype), device="meta")
            for tensor, (_, dtype, shape) in span.tensors.items()
        }
        assign_tensors(module, placeholders)
        _wrap(module, index, streamer, placeholders)
    model._optdemo_disk_streamer = streamer
    return streamer, [name for name, _ in chosen]


def _wrap(module: Any, index: int, streamer: DiskStreamer, placeholders: dict[str, Any]) -> None:
    """Run ``module`` on its streamed weights; afterwards (even on an error) point it back at meta
    placeholders and hand its buffer on."""
    inner = module.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        assign_tensors(module, streamer.tensors(index))
        try:
            return inner(*args, **kwargs)
        finally:
            assign_tensors(module, placeholders)
            streamer.release(index)

    module.forward = forward


def release(model: Any) -> None:
    """Stop a model's streamer (before the model is dropped); safe on any model."""
    streamer = model.__dict__.pop("_optdemo_disk_streamer", None)
    if streamer is not None:
        streamer.close()
