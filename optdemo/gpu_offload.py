"""Where CPU-resident layers run when a GPU is in the map, and prefetching their weights.

With a GPU in the device map, Accelerate executes every layer on the GPU: the weights of each
CPU-mapped (or disk-mapped) layer are copied over PCIe on every token, synchronously, from pageable
memory. Two better policies:

* ``cpu``: run CPU-resident layers on the CPU where their weights live; only the activations (a
  few KiB per token) cross the bus. Wins when the CPU consumes weights faster than PCIe moves them.
* ``gpu`` with prefetch: keep running them on the GPU, but from pinned host memory, copying the
  *next* offloaded layer on a separate CUDA stream while the current one computes, so transfers
  overlap compute.

:func:`choose_policy` predicts both from measured bandwidths and picks the faster; the user can
override it (``LoadConfig.cpu_layers``). The mechanics are device-agnostic (``device`` is a
parameter, streams are optional), so the tests exercise them on the CPU; on a GPU they use CUDA
streams and events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

POLICIES = ("auto", "gpu", "cpu")


@dataclass(frozen=True)
class PolicyChoice:
    """The chosen policy for CPU-resident layers, with both predictions (seconds per token)."""

    policy: str  # "gpu" (weights cross PCIe, prefetched) or "cpu" (activations cross)
    gpu_seconds: float | None
    cpu_seconds: float | None
    reason: str


def choose_policy(offloaded_bytes: int, dtype: str, bandwidths: Any, requested: str = "auto") -> PolicyChoice:
    """Pick where CPU-resident layers run: the faster of shipping ``offloaded_bytes`` over PCIe
    every token (``gpu``) and consuming them on the CPU (``cpu``), unless ``requested`` forces one."""
    h2d = getattr(bandwidths, "host_to_device", None)
    gpu_s = offloaded_bytes / h2d if h2d else None
    cpu_s = offloaded_bytes / bandwidths.cpu_rate(dtype)
    if requested in ("gpu", "cpu"):
        return PolicyChoice(requested, gpu_s, cpu_s, "chosen by the user")
    if gpu_s is None or cpu_s <= gpu_s:
        return PolicyChoice("cpu", gpu_s, cpu_s, "the CPU consumes these weights faster than PCIe moves them")
    return PolicyChoice("gpu", gpu_s, cpu_s, "PCIe moves these weights faster than the CPU consumes them")


def offloaded_entries(device_map: dict[str, Any]) -> list[str]:
    """Device-map entries held off-GPU (``cpu`` or ``disk``) in a map that has a GPU, in order."""
    if not any(isinstance(device, int) for device in device_map.values()):
        return []
    return [name for name, device in device_map.items() if device in ("cpu", "disk")]


def _own_tensors(module: Any) -> dict[str, Any]:
    """A module subtree's weights as CPU tensors, from Accelerate's offload hooks where it holds
    them (meta parameters) or from the modules themselves; hooks are removed on the way."""
    from accelerate.hooks import AlignDevicesHook, SequentialHook, remove_hook_from_module

    tensors: dict[str, Any] = {}
    for prefix, sub in module.named_modules():
        hook = getattr(sub, "_hf_hook", None)
        hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
        align = next((h for h in hooks if isinstance(h, AlignDevicesHook) and h.offload), None)
        for name, tensor in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]:
            if tensor.device.type == "meta" and align is not None and align.weights_map is not None:
                tensor = align.weights_map[name]
            tensors[f"{prefix}.{name}" if prefix else name] = tensor.to("cpu")
        if hook is not None:
            remove_hook_from_module(sub)
    return tensors


def _assign(module: Any, tensors: dict[str, Any]) -> None:
    import torch

    for full_name, tensor in tensors.items():
        owner_name, _, leaf = full_name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor


def run_on_cpu(model: Any, entries: list[str]) -> int:
    """The ``cpu`` policy: give each entry its weights on the CPU and a hook that moves its inputs
    there; the next GPU module's hook moves the activations back. Returns the entries moved."""
    import torch
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    for name in entries:
        module = model.get_submodule(name)
        _assign(module, _own_tensors(module))
        add_hook_to_module(
            module, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=False)
        )
    model.tie_weights()
    return len(entries)


class Prefetcher:
    """Copies offloaded blocks' weights to ``device`` one block ahead of execution.

    Each block's weights sit in pinned host memory (when ``device`` is CUDA). When block *i*
    starts, its copy (issued when block *i-1* started) is awaited and block *i+1*'s copy is issued
    on a side stream, so it overlaps block *i*'s compute; when block *i* ends its device copies
    are dropped. At most two offloaded blocks occupy the device at a time.
    """

    def __init__(self, blocks: list[tuple[Any, dict[str, Any]]], device: Any) -> None:
        import torch

        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.blocks = [
            (module, {k: t.pin_memory() if cuda else t for k, t in tensors.items()})
            for module, tensors in blocks
        ]
        self.order = {id(module): index for index, (module, _) in enumerate(self.blocks)}
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.pending: dict[int, tuple[dict[str, Any], Any]] = {}
        self.log: list[tuple[str, int]] = []  # ("copy"|"run"|"drop", block): for tests and debugging

    def _issue(self, index: int) -> None:
        import torch

        if index >= len(self.blocks) or index in self.pending:
            return
        _, host = self.blocks[index]
        self.log.append(("copy", index))
        if self.stream is None:
            self.pending[index] = ({k: t.to(self.device, copy=True) for k, t in host.items()}, None)
            return
        with torch.cuda.stream(self.stream):
            copies = {k: t.to(self.device, non_blocking=True) for k, t in host.items()}
            event = torch.cuda.Event()
            event.record(self.stream)
        self.pending[index] = (copies, event)

    def before(self, module: Any) -> None:
        """Block ``module`` is about to run: make its weights resident, prefetch the next."""
        import torch

        index = self.order[id(module)]
        self._issue(index)
        copies, event = self.pending.pop(index)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
            for tensor in copies.values():  # the compute stream now owns these allocations
                tensor.record_stream(torch.cuda.current_stream(self.device))
        _assign(module, copies)
        self.log.append(("run", index))
        self._issue(index + 1 if index + 1 < len(self.blocks) else 0)  # the next token starts at 0

    def after(self, module: Any) -> None:
        """Block ``module`` finished: point it back at host memory, freeing its device copies."""
        index = self.order[id(module)]
        _assign(module, self.blocks[index][1])
        self.log.append(("drop", index))


def prefetch_on_device(model: Any, entries: list[str], device: Any) -> Prefetcher:
    """The ``gpu`` policy: run the entries on ``device`` from pinned memory with one-ahead prefetch,
    replacing Accelerate's synchronous per-module loading. Returns the prefetcher (its log shows the
    schedule)."""
    from accelerate.hooks import AlignDevicesHook, ModelHook, SequentialHook, add_hook_to_module

    blocks = [(model.get_submodule(name), None) for name in entries]
    blocks = [(module, _own_tensors(module)) for module, _ in blocks]
    prefetcher = Prefetcher(blocks, device)

    class PrefetchHook(ModelHook):
        def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple:
            prefetcher.before(module)
            return args, kwargs

        def post_forward(self, module: Any, output: Any) -> Any:
            prefetcher.after(module)
            return output

    for module, _ in prefetcher.blocks:
        # Inputs still go to the execution device (as Accelerate's hook did), then the prefetch hook.
        align = AlignDevicesHook(execution_device=prefetcher.device, io_same_device=False)
        add_hook_to_module(module, SequentialHook(align, PrefetchHook()))
    model.tie_weights()
    return prefetcher


def apply_policy(model: Any, requested: str, dtype: str) -> PolicyChoice | None:
    """Apply the chosen policy to a freshly loaded model with a GPU in its map; None when there is
    nothing to decide (no GPU, nothing offloaded) or the user asked for plain Accelerate."""
    import torch

    from optdemo.speed import measured_bandwidths

    device_map = getattr(model, "hf_device_map", None) or {}
    entries = offloaded_entries(device_map)
    if not entries or requested == "accelerate":
        return None
    resident = [name for name in entries if device_map[name] == "cpu"]
    sizes = {
        name: sum(p.numel() * p.element_size() for p in model.get_submodule(name).parameters())
        for name in entries
    }
    choice = choose_policy(sum(sizes[n] for n in resident), dtype, measured_bandwidths(), requested)
    if choice.policy == "cpu":
        run_on_cpu(model, entries)  # disk entries too: their weights stay memory-mapped
    elif resident:
        gpu = min(device for device in device_map.values() if isinstance(device, int))
        prefetch_on_device(model, resident, torch.device("cuda", gpu))
    return choice
