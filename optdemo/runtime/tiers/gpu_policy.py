"""Where CPU-resident layers run when a GPU is in the map, and copying their weights ahead.

With a GPU in the map, Accelerate runs every layer on the GPU, copying CPU- and disk-mapped
weights over PCIe every token from pageable memory (the ``accelerate`` policy). The alternatives,
chosen by :func:`optdemo.plan.policy.choose_policy`: ``cpu`` runs those layers on the CPU where
their weights live (only activations cross the bus); ``gpu`` keeps them on the GPU but copies the
*next* block from pinned memory into one of two fixed GPU buffers while one computes
(:class:`GpuUploadAhead`).

Memory bounds, for any policy: host memory stays within the CPU budget (blocks are packed into
exact-size pinned buffers, one block of transient extra); the GPU holds its budget plus two
buffers of the largest block, allocated once; nothing grows per token; :func:`release` frees the
buffers and unpins host memory before the model is dropped. The mechanics are device-agnostic,
so the CPU tests exercise the schedule and the CUDA tests streams, events and pinning.
"""

from __future__ import annotations

import collections
from typing import Any

from optdemo.plan.bandwidth import measured_bandwidths
from optdemo.plan.policy import PolicyChoice, choose_policy
from optdemo.runtime import timing
from optdemo.runtime.tiers.disk_map import map_offloaded_module
from optdemo.runtime.timing_data import COPY
from optdemo.weights.tensors import assign_tensors, module_bytes

# Byte alignment of each tensor inside a packed block (keeps every view aligned for any dtype).
_ALIGN = 64
# The schedule log keeps the latest events only: it is for tests and debugging, never a history.
LOG_EVENTS = 256


def offloaded_entries(device_map: dict[str, Any]) -> list[str]:
    """Device-map entries held off-GPU (``cpu`` or ``disk``) in a map that has a GPU, in order."""
    if not any(isinstance(device, int) for device in device_map.values()):
        return []
    return [name for name, device in device_map.items() if device in ("cpu", "disk")]


def main_gpu(device_map: dict[str, Any]) -> int | None:
    """The GPU that executes offloaded entries: the one Accelerate's ``dispatch_model`` picks
    (``list(set_of_gpu_indices)[0]``), so our hooks run where Accelerate's would have."""
    gpus = {device for device in device_map.values() if isinstance(device, int)}
    return next(iter(gpus)) if gpus else None


def movable_entries(model: Any, entries: list[str]) -> list[str]:
    """The entries whose weights are their own: an entry sharing a parameter with a module outside
    it (a tied LM head and embedding) stays with Accelerate, which keeps ties consistent."""
    movable = []
    for name in entries:
        module = model.get_submodule(name)
        inside = {id(p) for p in module.parameters()}
        outside = any(
            id(p) in inside
            for other, sub in model.named_modules()
            if not (other == name or other.startswith(f"{name}."))
            for p in sub.parameters(recurse=False)
        )
        if not outside:
            movable.append(name)
    return movable


def _take_tensors(module: Any) -> dict[str, Any]:
    """A module subtree's weights, from Accelerate's offload hooks where it holds them (meta
    parameters) or from the modules themselves; hooks are removed, and the hooks' references to the
    CPU copies dropped, so these tensors become the only ones."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook, remove_hook_from_module

    tensors: dict[str, Any] = {}
    held: list[tuple[dict, str]] = []  # (Accelerate's shared dict, key) of each tensor taken from it
    for prefix, sub in module.named_modules():
        hook = getattr(sub, "_hf_hook", None)
        hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
        align = next((h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload), None)
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            if tensor.device.type == "meta" and align is not None and align.weights_map is not None:
                tensor = align.weights_map[name]
                dataset = align.weights_map.dataset
                store = getattr(dataset, "state_dict", dataset)
                if isinstance(store, dict):
                    held.append((store, align.weights_map.prefix + name))
            tensors[f"{prefix}.{name}" if prefix else name] = tensor
        if hook is not None:
            remove_hook_from_module(sub)  # (restores the weights it held onto the module)
    # Accelerate keeps CPU-resident weights in one shared dict (an OffloadedWeightsLoader's
    # state_dict, or a plain dict) for as long as any offload hook lives: drop our entries there,
    # or every packed block would be doubled.
    for store, key in held:
        store.pop(key, None)
    return tensors


def _skip_keys(model: Any) -> Any:
    """Input keys Accelerate must not move for this model (as ``dispatch_model`` is told)."""
    return getattr(model, "_skip_keys_device_placement", None)


# ------------------------------------------------------------------------------------- cpu policy
def run_on_cpu(model: Any, entries: list[str], disk: frozenset[str] = frozenset()) -> int:
    """The ``cpu`` policy: CPU-resident entries compute on the CPU from the weights they already
    have; ``disk`` entries compute on the CPU from memory-mapped safetensors (or, when their
    weights cannot be mapped, from Accelerate's own per-forward loading retargeted to the CPU, one
    module at a time): the disk tier is never copied into anonymous RAM, nor sent through the GPU.
    The next GPU module's hook moves the activations back. Returns the entries now on the CPU."""
    import torch
    from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module

    cpu = torch.device("cpu")
    for name in entries:
        module = model.get_submodule(name)
        if name not in disk:
            assign_tensors(module, _take_tensors(module))
        elif map_offloaded_module(module) is None:
            for sub in module.modules():
                hook = getattr(sub, "_hf_hook", None)
                for align in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
                    if isinstance(align, AlignDevicesHook):
                        align.execution_device = cpu
        # Inputs of the whole entry go to the CPU (residual connections included).
        add_hook_to_module(module, inputs_to_hook(cpu, _skip_keys(model)), append=True)
    return len(entries)


def inputs_to_hook(device: Any, skip_keys: Any = None) -> Any:
    """An Accelerate hook that only moves a module's inputs to ``device`` (weights untouched),
    skipping the keys the model asks Accelerate to skip (a KV cache). Built on first use so that
    importing this module does not import torch."""
    from accelerate.hooks import ModelHook
    from accelerate.utils import send_to_device

    class _InputsTo(ModelHook):
        def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple:
            return send_to_device(args, device), send_to_device(kwargs, device, skip_keys=skip_keys)

    return _InputsTo()


# ------------------------------------------------------------------------------------- gpu policy
class PackedBlock:
    """One block's weights packed into a single exact-size host buffer (pinned in place on CUDA),
    with a view per tensor; ``views_in(buffer)`` gives the same layout inside another buffer."""

    def __init__(self, module: Any, tensors: dict[str, Any], pin: bool) -> None:
        import torch

        self.module = module
        self.layout: dict[str, tuple[int, Any, tuple[int, ...]]] = {}  # name -> (offset, dtype, shape)
        offset = 0
        for name, tensor in tensors.items():
            self.layout[name] = (offset, tensor.dtype, tuple(tensor.shape))
            offset += -(-tensor.numel() * tensor.element_size() // _ALIGN) * _ALIGN
        self.nbytes = offset
        self.host = torch.empty(self.nbytes, dtype=torch.uint8)
        views = self.views_in(self.host)
        for name in list(tensors):
            views[name].copy_(tensors.pop(name))  # the original goes as soon as it is packed
        self.pinned = pin and _register_pinned(self.host)
        self.host_views = views

    def views_in(self, buffer: Any) -> dict[str, Any]:
        """Tensors viewing ``buffer`` with this block's layout."""
        views = {}
        for name, (offset, dtype, shape) in self.layout.items():
            size = dtype.itemsize
            for dim in shape:
                size *= dim
            views[name] = buffer[offset : offset + size].view(dtype).view(shape)
        return views

    def unpin(self) -> None:
        """Return the host buffer to pageable memory (CUDA only; idempotent)."""
        if self.pinned:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.host.data_ptr())
            self.pinned = False


def _register_pinned(buffer: Any) -> bool:
    """Pin ``buffer`` in place (``cudaHostRegister``, as PyTorch's checkpoint stager does): no
    copy and no power-of-two rounding, unlike ``Tensor.pin_memory()``. False when CUDA refuses,
    in which case copies are still correct, only synchronous."""
    import torch

    try:
        return int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), 0)) == 0
    except (AttributeError, RuntimeError):
        return False


class GpuUploadAhead:
    """Runs packed blocks on ``device`` from two fixed device buffers, one block ahead.

    When block *i* starts, the compute stream waits for its copy (issued when block *i-1*
    started) and block *i+1*'s copy is issued on a side stream into the other buffer, after the
    block that last used that buffer has finished computing (a GPU-side event wait). When block *i*
    ends, its parameters point back at host memory. On the CPU (tests) the same schedule runs with
    synchronous copies.
    """

    def __init__(self, blocks: list[PackedBlock], device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self.blocks = blocks
        self.order = {id(block.module): index for index, block in enumerate(blocks)}
        cuda = self.device.type == "cuda"
        slot_bytes = max(block.nbytes for block in blocks)
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.copied = [torch.cuda.Event() for _ in self.slots] if cuda else None
        self.freed = [torch.cuda.Event() for _ in self.slots] if cuda else None
        self.next_slot = 0
        self.pending: dict[int, int] = {}  # block index -> slot holding (or receiving) its copy
        self.running: dict[int, int] = {}
        self.log: collections.deque[tuple[str, int]] = collections.deque(maxlen=LOG_EVENTS)

    @property
    def in_flight_bytes(self) -> int:
        """Device memory this prefetcher holds: its two buffers (the bound on top of the budget)."""
        return sum(slot.numel() for slot in self.slots)

    def _issue(self, index: int) -> None:
        import torch

        if index in self.pending:
            return
        slot = self.next_slot
        self.next_slot = 1 - slot
        block = self.blocks[index]
        target = self.slots[slot][: block.nbytes]
        self.log.append(("copy", index))
        if self.stream is None:
            target.copy_(block.host)
        else:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(self.freed[slot])  # the buffer's previous block is done
                target.copy_(block.host, non_blocking=block.pinned)
                self.copied[slot].record(self.stream)
        self.pending[index] = slot

    def before(self, module: Any) -> None:
        """Block ``module`` is about to run: point it at its device copy, prefetch the next."""
        import torch

        index = self.order[id(module)]
        # The block's wait for its weights (:mod:`optdemo.runtime.timing`): on a GPU the compute
        # stream's wait for the copy; on the CPU the copies themselves, which are synchronous.
        started = timing.stamp(self.device)
        self._issue(index)
        slot = self.pending.pop(index)
        if self.copied is not None:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
        block = self.blocks[index]
        assign_tensors(module, block.views_in(self.slots[slot]))
        self.running[index] = slot
        self.log.append(("run", index))
        self._issue((index + 1) % len(self.blocks))  # after the last block, the next token's first
        timing.waited(started, COPY, copy_bytes=block.nbytes)

    def after(self, module: Any) -> None:
        """Block ``module`` finished (or failed): point it back at host memory and free its buffer
        for the copy after next."""
        import torch

        index = self.order[id(module)]
        slot = self.running.pop(index, None)
        if slot is not None and self.freed is not None:
            self.freed[slot].record(torch.cuda.current_stream(self.device))
        assign_tensors(module, self.blocks[index].host_views)
        self.log.append(("drop", index))

    def close(self) -> None:
        """Stop using the device: wait for copies in flight, free the buffers, unpin host memory."""
        import torch

        if self.stream is not None:
            torch.cuda.synchronize(self.device)
        self.slots = []
        self.pending.clear()
        for block in self.blocks:
            block.unpin()


def copy_ahead_to_gpu(model: Any, entries: list[str], device: Any) -> GpuUploadAhead:
    """The ``gpu`` policy: run the entries on ``device`` from packed (pinned) host memory with
    one-ahead prefetch, replacing Accelerate's synchronous per-module loading."""
    import torch

    device = torch.device(device)
    pin = device.type == "cuda"
    blocks = []
    for name in entries:
        module = model.get_submodule(name)
        block = PackedBlock(module, _take_tensors(module), pin)
        assign_tensors(module, block.host_views)  # the module lets go of the originals too
        blocks.append(block)
    prefetcher = GpuUploadAhead(blocks, device)
    for block in blocks:
        _wrap_forward(block.module, prefetcher, _skip_keys(model))
    model._optdemo_gpu_upload = prefetcher  # released by release(model)
    return prefetcher


def _wrap_forward(module: Any, prefetcher: GpuUploadAhead, skip_keys: Any) -> None:
    """Make ``module.forward`` move its inputs to the prefetcher's device and run between
    ``prefetcher.before`` and ``prefetcher.after``, the latter even when the forward raises (no
    device copy is left pointed at)."""
    from accelerate.utils import send_to_device

    inner = module.forward
    device = prefetcher.device

    def forward(*args: Any, **kwargs: Any) -> Any:
        args = send_to_device(args, device)
        kwargs = send_to_device(kwargs, device, skip_keys=skip_keys)
        prefetcher.before(module)
        try:
            return inner(*args, **kwargs)
        finally:
            prefetcher.after(module)

    module._optdemo_own_forward = module.__dict__.get("forward")  # an Accelerate hook's, or None
    module.forward = forward


def release(model: Any) -> None:
    """Undo what a policy holds outside the model: restore wrapped forwards, free the prefetch
    buffers and unpin host memory. Called before a model is dropped; safe on any model."""
    prefetcher = getattr(model, "_optdemo_gpu_upload", None)
    if prefetcher is None:
        return
    for block in prefetcher.blocks:
        module = block.module
        own = module.__dict__.pop("_optdemo_own_forward", None)
        if own is None:
            module.__dict__.pop("forward", None)  # back to the class's forward
        else:
            module.forward = own
    prefetcher.close()
    del model._optdemo_gpu_upload


# ------------------------------------------------------------------------------------- applying
def apply_policy(model: Any, requested: str, dtype: str) -> PolicyChoice | None:
    """Apply the CPU-layer policy to a freshly loaded model with a GPU in its map.

    Returns the policy in force with its reason (``accelerate`` included, so the UI can say
    which one is active), or None when there is nothing to decide (no GPU in the map, or nothing
    offloaded)."""
    import torch

    device_map = getattr(model, "hf_device_map", None) or {}
    entries = movable_entries(model, offloaded_entries(device_map))
    if not entries:
        return None
    resident = [name for name in entries if device_map[name] == "cpu"]
    disk = [name for name in entries if device_map[name] == "disk"]
    choice = choose_policy(
        sum(module_bytes(model, n) for n in resident),
        sum(module_bytes(model, n) for n in disk),
        dtype,
        measured_bandwidths(),
        requested,
    )
    if choice is None:
        return None
    if choice.policy == "cpu":
        run_on_cpu(model, entries, frozenset(disk))
    elif choice.policy == "gpu" and resident:
        copy_ahead_to_gpu(model, resident, torch.device("cuda", main_gpu(device_map)))
    return choice
