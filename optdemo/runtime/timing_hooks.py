"""The hooks that measure a loaded model's forward passes, block by block (:mod:`optdemo.runtime.timing`
says what is measured, and holds the records).

One :class:`BlockTimer` per loaded model, installed by the model manager once the tiers are in
place: a pre- and a post-hook on the model (a pass begins and ends) and on each block of the plan
(its clock; its reads), and Accelerate's offload hooks' ``pre_forward`` timed as the block's wait.

Page faults, the one wait no tier reports: a block whose weights are in RAM or memory-mapped
faults them in from disk when they are not cached, inside the matrix products, on whichever of
their threads touches a page first. So the block's reads are the bytes the *process* read from
storage while it ran (``/proc/self/io`` ``read_bytes``: page-cache hits excluded), less what the
streamed tier's reader thread read meanwhile (its own ``/proc`` io file, read at the same
moments), plus what the mapped tier's read-ahead hint for it read (issued as the block before it
starts: :func:`optdemo.runtime.timing.read_ahead`). When it read any, the time beyond its compute
estimate counts as waiting: its fastest in its latest three passes of the same kind that read
nothing (a prompt's scaled up to this prompt's tokens, never down), else what this machine's
measured rates predict for its weights (:mod:`optdemo.plan.bandwidth`). Reads by other threads of
the process while a block runs (the page-cache warm-up right after a load) count as its own.

What it costs: the reads are measured block by block (two ``pread`` of /proc a block) in the
first pass after the load and in each pass after one that read from storage; after a pass that
read nothing, the next is measured as a whole only (two ``pread``), so a pass that reads after
warm ones has its bytes counted for the pass, and the blocks of the passes after it theirs.
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

from optdemo.core.budget import Device
from optdemo.plan.bandwidth import KERNELS, Bandwidths
from optdemo.plan.planner import Plan, device_of
from optdemo.plan.speed import LAYER_OVERHEAD_SECONDS
from optdemo.runtime import timing
from optdemo.runtime.batching import kernels
from optdemo.runtime.timing import PROMPT, STEP, PassRecord
from optdemo.runtime.timing_data import COPY, DISK, PAGE_FAULTS, ReplyTiming

WARM_PASSES = 3  # read-free passes a block's compute estimate is the fastest of


class BlockTimer:
    """The hooks on one loaded model, what they measured last, and the pass in flight.

    Args:
        model: the loaded model, its tiers in place.
        plan: its plan: the blocks measured are the plan's.
        device_map: where its weights really are (a block in RAM or on disk gets its reads
            measured).
        bandwidths: this machine's measured rates (compute estimates, the floor).
    """

    def __init__(self, model: Any, plan: Plan, device_map: dict[str, Device], bandwidths: Bandwidths) -> None:
        blocks = [block for block in plan.blocks if _has_module(model, block.name)]
        self.names = [block.name for block in blocks]
        modules = [model.get_submodule(name) for name in self.names]
        self.layer = [block.kind == "layer" for block in blocks]
        self.layers = sum(self.layer)
        self.reads = [device_of(name, device_map) in ("cpu", "disk") for name in self.names]
        self.gpus = [_gpu_of(model, module) for module in modules]  # where each computes (None: CPU)
        self.gpu_devices = list(dict.fromkeys(gpu for gpu in self.gpus if gpu is not None))
        self.gpu = self.gpu_devices[0] if self.gpu_devices else None
        self.estimates = [
            _estimates(module, plan, block.kind, bandwidths)
            for module, block in zip(modules, blocks, strict=True)
        ]
        self.disk_rate = bandwidths.disk_read
        self.copy_rate = bandwidths.pinned_rate if self.gpu is not None else None
        streamer = getattr(model, "_optdemo_disk_streamer", None)
        reader = getattr(streamer, "reader_id", None)
        self._reader_io = timing.open_io(f"/proc/self/task/{reader}/io") if reader is not None else -1
        # Reads are measured block by block only while passes read from storage: the first after
        # the load, and each after one that did (a warm pass costs two reads of /proc, not 4 a block).
        self._measures_reads = any(self.reads)
        self._sampling = True
        self._ahead: dict[int, int] = {}  # read ahead in a pass for a block of the next one
        self.latest: ReplyTiming | None = None
        self.replies = 0  # replies timed since the load
        self.run: PassRecord | None = None  # the pass in flight
        self.recordings: list[Any] = []  # timing's accumulators of recordings
        # (block, mode) -> its latest read-free passes: (tokens, seconds), the fastest counts
        self._warm: dict[tuple[int, str], collections.deque[tuple[int, float]]] = {}
        self._gpu_events: list[tuple[Any, Any]] = []
        if self.gpu is not None:
            import torch

            self._gpu_events = [
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in modules
            ]
        self._handles = [
            model.register_forward_pre_hook(self._pass_begins, with_kwargs=True),
            model.register_forward_hook(self._pass_ends, with_kwargs=True, always_call=True),
        ]
        for index, module in enumerate(modules):
            self._handles.append(module.register_forward_pre_hook(self._block_begins(index)))
            self._handles.append(module.register_forward_hook(self._block_ends(index), always_call=True))
        self._timed_hooks = [hook for module in modules for hook in _time_accelerate_loads(module)]

    def remove(self) -> None:
        """Take every hook off the model (and close what it read the streamer's reads from)."""
        if self._reader_io >= 0:
            os.close(self._reader_io)
            self._reader_io = -1
        for handle in self._handles:
            handle.remove()
        for hook in self._timed_hooks:
            hook.__dict__.pop("pre_forward", None)  # back to Accelerate's own method
        self._handles, self._timed_hooks = [], []

    # ------------------------------------------------------------------------------ the hooks
    def _pass_begins(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        shape = tuple(getattr(ids, "shape", (1, 1))) or (1,)
        length = shape[1] if len(shape) > 1 else 1
        run = timing.begin(
            self, kernels.current_mode() or (PROMPT if length > 1 else STEP), shape[0] * length
        )
        if run is not None and self._measures_reads:
            run.sampling, run.ahead, self._ahead = self._sampling, self._ahead, {}
            run.reads_at = self.storage_reads()

    def _pass_ends(self, module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        run = timing.end(self)
        if run is not None and output is not None:  # a pass that failed is nobody's
            self._close(run)
            timing.charge(run)

    def _block_begins(self, index: int) -> Any:
        # What the hook needs, bound once: it runs twice a block and pass (see docs/BENCHMARKS.md).
        reads, gpu, clock = self.reads[index], self.gpus[index], time.perf_counter

        def begins(module: Any, args: tuple) -> None:
            run = self.run  # the engine runs one pass of a model at a time (its lock)
            if run is None:
                return
            run.block = index
            if gpu is not None:
                self._gpu_events[index][0].record(_stream(gpu))
            else:
                for device in self.gpu_devices:  # the GPUs' queued blocks are theirs, not this one's
                    _stream(device).synchronize()
            if reads and run.sampling:
                run.read_from = self.storage_reads()
            run.begun = clock()

        return begins

    def _block_ends(self, index: int) -> Any:
        reads, gpu, layer, clock = self.reads[index], self.gpus[index], self.layer[index], time.perf_counter

        def ends(module: Any, args: tuple, output: Any) -> None:
            ended = clock()
            run = self.run
            if run is None or run.block != index:
                return
            run.block = -1
            run.layers_done += layer
            wall = ended - run.begun
            if gpu is not None:  # its time is read from the GPU's clock at the end of the pass
                self._gpu_events[index][1].record(_stream(gpu))
                run.on_gpu.append(index)
            else:
                run.wall[index] += wall
            if reads and run.sampling:
                read = max(0, self.storage_reads() - run.read_from) + run.ahead.pop(id(module), 0)
                if read and not run.disk[index]:  # a tier that reads for itself said how much
                    run.disk[index] = read
                if read and not run.reported[index] and gpu is None:
                    run.wait[index] += min(wall, max(0.0, wall - self._estimate(index, run)))
                    run.kind[index] = PAGE_FAULTS

        return ends

    # ------------------------------------------------------------------------------ helpers
    def storage_reads(self) -> int:
        """Bytes the process has read from storage so far, less the streamer's reader thread's
        (which reads for the blocks ahead; the streamer says which block each read is for)."""
        if self._reader_io < 0:
            return timing.read_bytes()
        for _ in range(3):  # the reader's count the same before and after: none of it was missed
            reader = timing.read_bytes(self._reader_io)
            process = timing.read_bytes()
            if timing.read_bytes(self._reader_io) == reader:
                break
        return process - reader

    def _estimate(self, index: int, run: PassRecord) -> float:
        """The block's compute time for this pass: its fastest in the latest passes of this kind in
        which it read nothing (a prompt's scaled up to this one's tokens, never down; the fastest,
        since a busy machine can stall any one of them), else what the measured rates predict."""
        warm = self._warm.get((index, run.mode))
        if warm:
            if run.mode == PROMPT:
                return min(seconds * max(1.0, run.tokens / tokens) for tokens, seconds in warm)
            return min(seconds for _, seconds in warm)
        step, per_token = self.estimates[index]
        return max(step, per_token * run.tokens) if run.mode == PROMPT else step

    def _close(self, run: PassRecord) -> None:
        """End of a pass: read the GPU's clocks (once, after its work), keep each block that read
        nothing as the compute reference of its kind of pass."""
        if self.gpu_devices:
            for device in self.gpu_devices:
                _stream(device).synchronize()
            for index in run.on_gpu:
                start, end = self._gpu_events[index]
                run.wall[index] += start.elapsed_time(end) / 1000
            for index, start, end in run.events:
                run.wait[index] += start.elapsed_time(end) / 1000
        run.seconds = time.perf_counter() - run.started
        read_free = True
        if self._measures_reads:  # measure the next pass's blocks if this pass read anything
            read_free = self.storage_reads() <= run.reads_at
            self._sampling, self._ahead = not read_free, run.ahead  # (hints for its first blocks)
        for index, wall in enumerate(run.wall):
            measured_free = run.sampling and not run.disk[index]
            if wall and not run.reported[index] and (read_free or measured_free):
                key = (index, run.mode)
                if key not in self._warm:
                    self._warm[key] = collections.deque(maxlen=WARM_PASSES)
                self._warm[key].append((max(1, run.tokens), wall))


def install(model: Any, plan: Plan, device_map: dict[str, Device], bandwidths: Bandwidths) -> BlockTimer:
    """Measure every forward pass of ``model`` from now on, per block of ``plan`` (its tiers must
    be in place: their hooks are timed too); replaces a timer installed before."""
    uninstall(model)
    timer = BlockTimer(model, plan, device_map, bandwidths)
    model._optdemo_timer = timer
    return timer


def uninstall(model: Any) -> None:
    """Stop measuring ``model`` (before it is dropped); safe on any model."""
    timer = model.__dict__.pop("_optdemo_timer", None) if model is not None else None
    if timer is not None:
        timer.remove()


def _has_module(model: Any, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _stream(device: Any) -> Any:
    import torch

    return torch.cuda.current_stream(device)


def _gpu_of(model: Any, module: Any) -> Any:
    """The GPU a block computes on (``torch.device``), or None: where its weights are, where
    Accelerate's hooks move them, or the prefetcher's device."""
    devices = [tensor.device for tensor in (*module.parameters(), *module.buffers())]
    for sub in module.modules():
        devices += [_as_device(hook.execution_device) for hook in _hooks_of(sub) if _executes(hook)]
    prefetcher = getattr(model, "_optdemo_gpu_upload", None)
    if prefetcher is not None and id(module) in prefetcher.order:
        devices.append(prefetcher.device)
    return next((device for device in devices if device.type == "cuda"), None)


def _executes(hook: Any) -> bool:
    """Whether an Accelerate hook names the device its module computes on."""
    return getattr(hook, "execution_device", None) is not None


def _as_device(device: Any) -> Any:
    """A ``torch.device`` for what Accelerate names a device (an int is a GPU)."""
    import torch

    return torch.device("cuda", device) if isinstance(device, int) else torch.device(device)


def _hooks_of(module: Any) -> list[Any]:
    """Accelerate's hooks on ``module`` (a SequentialHook's parts), none when it has none."""
    hook = getattr(module, "_hf_hook", None)
    return [] if hook is None else list(getattr(hook, "hooks", [hook]))


def _time_accelerate_loads(block: Any) -> list[Any]:
    """Time the ``pre_forward`` of Accelerate's offload hooks in ``block`` (they load the weights
    from the offload files, or copy them to the GPU, every forward); returns the hooks timed."""
    from accelerate.utils import named_module_tensors

    timed = []
    for module in block.modules():
        for hook in _hooks_of(module):
            if not getattr(hook, "offload", False) or "pre_forward" in hook.__dict__:
                continue
            tensors = named_module_tensors(
                module,
                include_buffers=hook.offload_buffers,
                recurse=hook.place_submodules,
                remove_non_persistent=True,
            )
            nbytes = sum(tensor.numel() * tensor.element_size() for _, tensor in tensors)
            device = _as_device(hook.execution_device) if _executes(hook) else None
            gpu = device is not None and device.type == "cuda"
            hook.pre_forward = _timed(hook.pre_forward, nbytes, device if gpu else None)
            timed.append(hook)
    return timed


def _timed(pre_forward: Any, nbytes: int, gpu: Any) -> Any:
    """``pre_forward`` reporting its time as the block's wait and its bytes: a copy to ``gpu``
    (a ``torch.device``), or without one a load from the offload files (whose bytes read from
    storage the block's own measurement counts)."""

    def timed(module: Any, *args: Any, **kwargs: Any) -> Any:
        started = timing.stamp(gpu)
        try:
            return pre_forward(module, *args, **kwargs)
        finally:
            timing.waited(
                started,
                COPY if gpu is not None else DISK,
                copy_bytes=nbytes if gpu is not None else 0,
            )

    return timed


def _estimates(module: Any, plan: Plan, kind: str, bandwidths: Bandwidths) -> tuple[float, float]:
    """(seconds for a decode step, seconds per prompt token) this machine's measured rates predict
    for a block: its weights read once at the CPU's rate for their kind, plus the per-layer cost
    of eager PyTorch; a prompt's products at the measured prompt rate."""
    weights = [*module.parameters(), *module.buffers()]
    nbytes = sum(tensor.numel() * tensor.element_size() for tensor in weights)
    params = sum(tensor.numel() for tensor in weights)
    kernel = KERNELS[plan.quantization] if plan.quantization != "none" and kind == "layer" else plan.dtype
    step = nbytes / bandwidths.cpu_rate(kernel) + (LAYER_OVERHEAD_SECONDS if kind == "layer" else 0.0)
    flops = bandwidths.prompt_matmul.get(plan.dtype)
    return step, (2 * params / flops if flops else 0.0)
