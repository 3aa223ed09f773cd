"""A zero-copy disk tier for models that run on the CPU.

Plain Accelerate keeps disk-offloaded weights on the meta device and, on *every* forward pass of
every offloaded module, opens the safetensors file again, builds the tensors and puts them back on
meta afterwards. On a CPU-executed model that per-token work is pure overhead: the weights could
simply stay memory-mapped. This module maps them once, from the safetensors files Accelerate's own
offload index points to (the checkpoint itself, or our converted cache), and removes the offload
hooks, the way llama.cpp runs a model with mmap: the OS page cache serves the weights in place.

The budget keeps its meaning: the CPU budget bounds the process's own (anonymous) memory, while
disk-tier weights live in the page cache, which the OS can reclaim at any time and re-read from
disk when RAM is short. Nothing is copied, so a model larger than RAM still runs.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, replace
from typing import Any

from optdemo.core.defaults import STREAM_DEPTH
from optdemo.plan.policy import split_disk_tier
from optdemo.runtime import timing
from optdemo.system import libc
from optdemo.weights.tensors import assign_tensors, entries_bytes, module_bytes


@dataclass(frozen=True)
class DiskTierReport:
    """What :func:`place_disk_tier` did: modules and bytes memory-mapped (served from the page
    cache) and streamed (read from disk every token, past the page cache), or why neither."""

    mapped_modules: int
    mapped_bytes: int
    skipped_reason: str | None = None
    streamed_blocks: int = 0
    streamed_bytes: int = 0
    stream_buffer_bytes: int = 0  # what the streamer's buffers take (counted against the CPU budget)
    choice: str = ""  # why this split: the memory available and what was asked for
    available_bytes: int | None = None  # the memory available when the split was decided

    @property
    def active(self) -> bool:
        """Whether any disk-tier weights are served from memory maps."""
        return self.mapped_modules > 0


def cpu_executed(device_map: dict[str, Any]) -> bool:
    """True when every module runs on the CPU (the map holds only ``cpu`` and ``disk``)."""
    return bool(device_map) and all(device in ("cpu", "disk") for device in device_map.values())


def place_disk_tier(model: Any, mode: str = "auto", available_bytes: int | None = None) -> DiskTierReport:
    """Serve a CPU-executed model's disk tier: memory-mapped where the memory actually available
    (``available_bytes``: RAM, or the room under a cgroup limit) can cache it, streamed with large
    direct reads where it cannot. The first blocks stay mapped (resident), the rest are streamed,
    so the streamed reads never evict the resident part. ``mode`` forces either."""
    from optdemo.runtime.tiers.disk_stream import stream_blocks

    device_map = getattr(model, "hf_device_map", None) or {}
    disk = [name for name, device in device_map.items() if device == "disk"]
    if not cpu_executed(device_map) or not disk:
        return DiskTierReport(0, 0, "no disk layers on a CPU-executed model")
    sizes = [module_bytes(model, name) for name in disk]
    # The CPU tier is usually memory-mapped from the checkpoint too: it needs its share of the
    # page cache every token, before any disk block does.
    cpu_tier = entries_bytes(model, [name for name, device in device_map.items() if device == "cpu"])
    if available_bytes is None and mode == "auto":
        from optdemo.system.hardware import probe_hardware

        available_bytes = probe_hardware().ram_available_bytes
    kept, choice = split_disk_tier(sizes, mode, available_bytes, cpu_tier)
    wanted = disk[kept:]
    streamer, streamed = stream_blocks(model, wanted, STREAM_DEPTH) if wanted else (None, [])
    if len(streamed) < len(wanted):
        choice += (
            f"; {len(wanted) - len(streamed)} block(s) stay mapped: their weights are not ranges "
            "of their own bytes in safetensors files of the model's dtype"
        )
    mapped = [name for name in disk if name not in streamed]
    report = map_disk_tier(model, mapped=mapped)
    return replace(
        report,
        streamed_blocks=len(streamed),
        streamed_bytes=sum(size for name, size in zip(disk, sizes, strict=True) if name in streamed),
        stream_buffer_bytes=streamer.buffer_bytes if streamer else 0,
        choice=choice,
        available_bytes=available_bytes,
    )


def map_disk_tier(model: Any, mapped: list[str] | None = None) -> DiskTierReport:
    """Replace Accelerate's per-forward disk loading with persistent memory maps.

    Applies only to CPU-executed models whose offloaded weights are safetensors tensors of the
    model's own dtype (anything else would need a copy, which is what we avoid); other modules keep
    Accelerate's hooks, so the result is always correct. Outputs are unchanged: the same bytes are
    used, only how they reach the matmul differs.
    """
    from accelerate.hooks import AlignDevicesHook, SequentialHook, remove_hook_from_module
    from accelerate.utils import PrefixedDataset
    from safetensors import safe_open

    device_map = getattr(model, "hf_device_map", None) or {}
    if not cpu_executed(device_map) or "disk" not in device_map.values():
        return DiskTierReport(0, 0, "no disk layers on a CPU-executed model")
    handles: dict[str, Any] = {}
    mapped_modules = mapped_bytes = 0
    try:
        with contextlib.ExitStack() as stack:
            for module in model.modules():
                hook = getattr(module, "_hf_hook", None)
                hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
                align = next((h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload), None)
                if align is None or not isinstance(align.weights_map, PrefixedDataset):
                    continue
                tensors = _mapped_tensors(module, align.weights_map, handles, stack, safe_open)
                if tensors is None:
                    continue  # not mappable without a copy: Accelerate keeps serving this module
                remove_hook_from_module(module)
                mapped_bytes += assign_tensors(module, tensors)
                mapped_modules += 1
    finally:
        handles.clear()
    if mapped_modules:
        model.tie_weights()  # re-point tied heads at the mapped embeddings
        # Everything the page cache serves, in execution order: the mapped disk blocks and the CPU
        # tier, which from_pretrained maps from the checkpoint too (cold, it faults in the same way).
        cached = (
            {name for name, device in device_map.items() if device == "disk"}
            if mapped is None
            else set(mapped)
        )
        resident = [
            model.get_submodule(name)
            for name, device in device_map.items()
            if device == "cpu" or name in cached
        ]
        hint_next_blocks(resident)
        model._optdemo_page_warmup = PageCacheWarmup(module_ranges(resident))
    return DiskTierReport(mapped_modules, mapped_bytes)


def map_offloaded_module(module: Any) -> int | None:
    """Memory-map every Accelerate-offloaded tensor in ``module``'s subtree from its safetensors
    file and remove the subtree's hooks, so the module computes on the CPU from the page cache.
    Returns the bytes mapped, or None (nothing changed) when a tensor would need a copy."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook, remove_hook_from_submodules
    from accelerate.utils import PrefixedDataset
    from safetensors import safe_open

    mapped: list[tuple[Any, dict]] = []
    handles: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        for sub in module.modules():
            hook = getattr(sub, "_hf_hook", None)
            hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
            align = next((h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload), None)
            if align is None:
                continue
            if not isinstance(align.weights_map, PrefixedDataset):
                return None
            tensors = _mapped_tensors(sub, align.weights_map, handles, stack, safe_open)
            if tensors is None:
                return None
            mapped.append((sub, tensors))
    remove_hook_from_submodules(module)
    return sum(assign_tensors(sub, tensors) for sub, tensors in mapped)


def hint_next_blocks(blocks: list[Any]) -> None:
    """When block *i* starts computing, ask the OS to start reading block *i+1* from disk
    (``madvise(MADV_WILLNEED)``), so that when RAM cannot cache the disk tier the reads overlap
    compute instead of stalling on page faults. A hint only: nothing changes when pages are cached."""
    ranges = [_page_ranges(block) for block in blocks]
    for index, block in enumerate(blocks):
        upcoming, following = ranges[(index + 1) % len(blocks)], blocks[(index + 1) % len(blocks)]

        def hint(module: Any, args: Any, upcoming: list = upcoming, following: Any = following) -> None:
            # What it reads is the next block's (optdemo.runtime.timing counts it so).
            timing.read_ahead(following, libc.will_need, upcoming)

        block.register_forward_pre_hook(hint)


WARMUP_THREADS = 2  # two readers fetch ~2x what one does on the disks measured (docs/BENCHMARKS.md)
WARMUP_CHUNK = 32 * 2**20


class PageCacheWarmup:
    """Reads mapped memory ranges into the page cache, in the order given, from
    ``WARMUP_THREADS`` threads: the resident part of a cold model (its CPU tier and mapped disk
    blocks, :func:`module_ranges`) right after loading. :mod:`optdemo.runtime.readahead` reads file ranges
    the same way while the model is still being planned.

    Left alone, the first forward pass faults those weights in one page-fault read-ahead at a time,
    several times slower than these large reads (docs/BENCHMARKS.md, "Larger than RAM"); the
    warm-up keeps the disk busy instead, ahead of the computation that follows it. It reads
    only what was sized to stay cached, so it evicts nothing; it is a hint (``madvise``), so a
    failure changes nothing but the speed.
    """

    def __init__(self, ranges: list[tuple[int, int]]) -> None:
        """``ranges``: page-aligned (address, length) pairs of mapped memory, in reading order."""
        chunks = [
            (address + offset, min(WARMUP_CHUNK, length - offset))
            for address, length in ranges
            for offset in range(0, length, WARMUP_CHUNK)
        ]
        self._begin(chunks if libc.available() else [])

    def _begin(self, chunks: list[Any]) -> None:
        """Start the threads over ``chunks`` (each handed to :meth:`_fetch`, in order)."""
        self.chunks = chunks
        self.stopped = threading.Event()
        self.done = threading.Event()
        if not chunks:
            self.done.set()
            return
        self._next = iter(range(len(chunks)))
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._read, name=f"optdemo-page-warmup-{i}", daemon=True)
            for i in range(WARMUP_THREADS)
        ]
        self._running = len(self._threads)
        for thread in self._threads:
            thread.start()

    def _fetch(self, chunk: tuple[int, int]) -> None:
        """Read one chunk (address, length) in."""
        libc.populate(*chunk)

    def _read(self) -> None:
        try:
            while not self.stopped.is_set():
                with self._lock:
                    index = next(self._next, None)
                if index is None:
                    break
                # A hint: a chunk that cannot be read (a truncated file, a vanished one) is skipped;
                # the load reads the files itself and says what is wrong.
                with contextlib.suppress(OSError, ValueError):
                    self._fetch(self.chunks[index])
        finally:
            with self._lock:
                self._running -= 1
                if not self._running:
                    self.done.set()

    def stop(self) -> None:
        """Stop reading (before the model's mappings go away)."""
        self.stopped.set()
        self.done.wait(timeout=30)


def release_disk_tier(model: Any) -> None:
    """Stop a model's disk-tier threads (the warm-up, the streamer) before it is dropped; safe on
    any model."""
    from optdemo.runtime.tiers.disk_stream import release

    warmup = model.__dict__.pop("_optdemo_page_warmup", None)
    if warmup is not None:
        warmup.stop()
    release(model)


def module_ranges(blocks: list[Any]) -> list[tuple[int, int]]:
    """The page-aligned ranges of the blocks' mapped tensors, in block order, each once (a tied
    head shares the embeddings' range)."""
    return list(dict.fromkeys(r for block in blocks for r in _page_ranges(block)))


def _page_ranges(module: Any) -> list[tuple[int, int]]:
    """Page-aligned (address, length) of each mapped tensor of a module."""
    page = os.sysconf("SC_PAGE_SIZE")
    ranges = []
    for tensor in [*module.parameters(), *module.buffers()]:
        start = tensor.data_ptr() // page * page
        end = tensor.data_ptr() + tensor.numel() * tensor.element_size()
        ranges.append((start, end - start))
    return ranges


def _mapped_tensors(module: Any, weights_map: Any, handles: dict, stack: Any, safe_open: Any) -> dict | None:
    """The module's own offloaded tensors as memory-mapped views, or None if one would need a copy."""
    loader = weights_map.dataset
    index = getattr(loader, "index", None)
    if index is None:
        return None
    tensors = {}
    names = [n for n, _ in module.named_parameters(recurse=False)] + [
        n for n, _ in module.named_buffers(recurse=False)
    ]
    for name in names:
        info = index.get(weights_map.prefix + name)
        if not info or not info.get("safetensors_file"):
            return None
        path = info["safetensors_file"]
        if path not in handles:
            handles[path] = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
        tensor = handles[path].get_tensor(info.get("weight_name", weights_map.prefix + name))
        current = getattr(module, name)
        if tensor.dtype != current.dtype or tuple(tensor.shape) != tuple(current.shape):
            return None
        tensors[name] = tensor
    return tensors
