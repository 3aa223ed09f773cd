"""Plan where every layer goes, without touching weights.

The plan is made exactly the way ``from_pretrained(device_map="auto", max_memory=...)`` decides: the
model is instantiated on the meta device in the load dtype, then transformers' own device-map
function (Accelerate's ``infer_auto_device_map`` with the model's no-split classes, tied weights and
balanced GPU budgets) runs on it. So the plan shown to a user before loading is the map the load
then produces; a test holds us to that.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import shutil
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from optdemo.batch_memory import BatchRoom, batch_room
from optdemo.budget import Device, MemoryBudget, describe_gpu_count, format_bytes, missing_gpus
from optdemo.config import LoadConfig
from optdemo.construction import construction_lock
from optdemo.convert import cached, converted_root, stored_dtype
from optdemo.defaults import DEFAULT_CPU_LAYERS, DEFAULT_DISK_TIER
from optdemo.generation import context_window
from optdemo.hardware import Hardware, existing_parent, probe_hardware
from optdemo.hf_compat import auto_device_map
from optdemo.models import ModelSource, resolve_model

if TYPE_CHECKING:
    import torch
    from torch import nn

# Meta models are cheap but not free to build (about 0.1 s for opt-66b): keep a few, since the UI
# replans on every change of a control.
_META_CACHE_SIZE = 4
_meta_cache: OrderedDict[tuple, nn.Module] = OrderedDict()
_meta_lock = threading.Lock()


@dataclass(frozen=True)
class Block:
    """One unit of the picture: a decoder layer, an embedding, a norm or the LM head."""

    name: str
    device: Device | None  # None: tied to another block and stored there (size 0)
    bytes: int
    kind: str  # "layer", "embedding", "norm", "head" or "other"
    tied_to: str | None = None


@dataclass(frozen=True)
class Plan:
    """Where every module goes, and what it costs each device."""

    __hash__ = None  # type: ignore[assignment]  # holds dicts; compared by value, never hashed

    model: str
    display_name: str
    dtype: str
    device_map: dict[str, Device]  # module -> device, as from_pretrained will set hf_device_map
    module_bytes: dict[str, int]  # size of each device_map entry
    bytes_per_device: dict[Device, int]
    budget: dict[Device, int]  # the max_memory the plan used (bytes)
    total_bytes: int
    blocks: tuple[Block, ...]
    needs_offload_folder: bool
    disk_bytes_written: int  # bytes the load will write to the offload folder
    conversion_bytes: int  # bytes a one-time .bin -> safetensors conversion writes to the cache
    # Everything a user should read before loading, in order; the blockers among them too.
    warnings: tuple[str, ...] = field(default=())
    # What prevents loading as configured (no room on disk, no offload folder): a subset of warnings.
    blockers: tuple[str, ...] = field(default=())
    checkpoint_format: str = "unknown"
    cpu_layers: str = DEFAULT_CPU_LAYERS  # the policy in force for offloaded layers, with a GPU
    # How a CPU-executed model's disk tier is served: auto/map/stream, or "accelerate" (Accelerate's
    # own per-forward loading) when fast offloading is off.
    disk_tier: str = DEFAULT_DISK_TIER
    batch: BatchRoom | None = None  # KV cache room for concurrent replies (optdemo.batch_memory)

    @property
    def fits(self) -> bool:
        """Whether the model can be loaded as configured: nothing blocks it."""
        return not self.blockers

    @property
    def layers(self) -> tuple[Block, ...]:
        """Only the decoder layers (the repeated blocks), in order."""
        return tuple(block for block in self.blocks if block.kind == "layer")

    def to_dict(self) -> dict:
        """Plain JSON-friendly data for the API and the UI (device keys as strings)."""
        return {
            "model": self.model,
            "display_name": self.display_name,
            "dtype": self.dtype,
            "device_map": device_map_json(self.device_map),
            "bytes_per_device": per_device_json(self.bytes_per_device),
            "budget": per_device_json(self.budget),
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "needs_offload_folder": self.needs_offload_folder,
            "disk_bytes_written": self.disk_bytes_written,
            "conversion_bytes": self.conversion_bytes,
            "checkpoint_format": self.checkpoint_format,
            "cpu_layers": self.cpu_layers,
            "warnings": list(self.warnings),
            "blockers": list(self.blockers),
            "batch": None if self.batch is None else self.batch.to_dict(),
            "blocks": [
                {
                    "name": b.name,
                    "device": None if b.device is None else str(b.device),
                    "bytes": b.bytes,
                    "kind": b.kind,
                    "tied_to": b.tied_to,
                }
                for b in self.blocks
            ],
        }


def per_device_json(per_device: dict[Device, int]) -> dict[str, int]:
    """Per-device numbers with the API's device keys: ``"0"`` (GPU 0), ``"cpu"``, ``"disk"``."""
    return {str(device): value for device, value in per_device.items()}


def device_map_json(device_map: dict[str, Device]) -> dict[str, str]:
    """A module -> device map with devices written as the API writes them (``"0"``, ``"cpu"``)."""
    return {name: str(device) for name, device in device_map.items()}


def device_label(device: Device | None) -> str:
    """How people name a device: ``GPU 0``, ``CPU``, ``disk``."""
    if isinstance(device, int):
        return f"GPU {device}"
    if device is None:
        return "tied"
    return {"cpu": "CPU", "disk": "disk"}.get(str(device), str(device))


def resolve_dtype(config: LoadConfig, source: ModelSource) -> torch.dtype:
    """The dtype the weights will have: the configured one, or the checkpoint's for ``auto``."""
    import torch

    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    stored = getattr(source.config, "dtype", None) or getattr(source.config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def meta_model(source: ModelSource, dtype: torch.dtype) -> nn.Module:
    """The model instantiated on the meta device in ``dtype``: shapes and sizes, no memory.

    Built by calling the model class directly under a (thread-local) meta-device context, not with
    ``from_config``: transformers' construction helpers patch process-wide state (the default
    dtype, ``tie_weights``, the init functions), and a plan previewed in one thread while a model
    loads in another must not disturb that load. Sizes do not depend on either: tied weights are
    known from ``all_tied_weights_keys``, and the dtype is applied afterwards.
    """
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    key = (source.model, source.location, str(dtype))
    with _meta_lock:
        if key in _meta_cache:
            _meta_cache.move_to_end(key)
            return _meta_cache[key]
    config = copy.deepcopy(source.config)  # never touch the shared, cached configuration
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is not None:
        with torch.device("meta"):
            model = model_class(config)
        model = model.to(dtype)
    else:  # code from the repository (auto_map): only from_config knows how to build it
        with construction_lock, torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=True)
    with _meta_lock:
        _meta_cache[key] = model
        while len(_meta_cache) > _META_CACHE_SIZE:
            _meta_cache.popitem(last=False)
    return model


def plan_device_map(config: LoadConfig, hardware: Hardware | None = None) -> Plan:
    """Plan where ``config``'s model would be placed, exactly as the load would place it.

    Args:
        config: the load configuration; its budget may name GPUs this machine lacks (planning for
            another machine), which adds a warning.
        hardware: this machine's probe, for GPU count, RAM and offload-folder space checks;
            probed when omitted.

    Raises:
        ConfigError: the model cannot be resolved.
    """
    from transformers.integrations.accelerate import compute_module_sizes

    hardware = hardware or probe_hardware(config.offload_folder)
    source = resolve_model(config.model, config.revision, config.trust_remote_code)
    dtype = resolve_dtype(config, source)
    model = meta_model(source, dtype)
    max_memory = config.max_memory.as_max_memory() if config.max_memory is not None else None
    # transformers' own decision, the very call from_pretrained makes (it logs a warning itself for
    # GPUs that do not exist here; we turn those into plan warnings instead).
    with _quiet("accelerate.utils.modeling", "transformers.integrations.accelerate"):
        device_map = auto_device_map(model, dict(max_memory) if max_memory else None)
    sizes, _ = compute_module_sizes(model)
    module_bytes = {name: int(sizes.get(name, 0)) for name in device_map}
    bytes_per_device: dict[Device, int] = {}
    for name, device in device_map.items():
        bytes_per_device[device] = bytes_per_device.get(device, 0) + module_bytes[name]
    budget = _effective_budget(config.max_memory, hardware)
    blocks = _blocks(model, device_map, sizes)
    checkpoint_format = _checkpoint_format(source)
    disk_bytes = bytes_per_device.get("disk", 0)
    total = int(sizes.get("", 0))
    writes, conversion = _disk_writes(config, source, checkpoint_format, disk_bytes, total, dtype)
    notes = _assess(config, source, hardware, bytes_per_device, budget, disk_bytes, writes)
    if conversion:
        free = int(shutil.disk_usage(existing_parent(str(converted_root()))).free)
        notes.warn(
            f"the first load converts the .bin checkpoint once to safetensors in {converted_root()} "
            f"({format_bytes(conversion)}; {format_bytes(free)} free there); later loads write nothing"
        )
        if free < conversion:
            notes.block(
                f"not enough free space to convert the checkpoint ({format_bytes(conversion)} needed in "
                f"{converted_root()}): free some space or turn fast offloading off"
            )
    return Plan(
        model=config.model,
        display_name=config.display_name,
        dtype=str(dtype).removeprefix("torch."),
        device_map=device_map,
        module_bytes=module_bytes,
        bytes_per_device=_ordered(bytes_per_device),
        budget=budget,
        total_bytes=total,
        blocks=blocks,
        needs_offload_folder=writes > 0,
        disk_bytes_written=writes,
        conversion_bytes=conversion,
        warnings=tuple(notes.warnings),
        blockers=tuple(notes.blockers),
        checkpoint_format=checkpoint_format,
        cpu_layers=config.cpu_layers_in_force,
        disk_tier=config.disk_tier if config.fast_offload else "accelerate",
        batch=batch_room(
            model.config,
            dtype.itemsize,
            context_window(model),
            budget,
            bytes_per_device,
            hardware.ram_available_bytes,
            [block.device for block in blocks if block.kind == "layer"],
        ),
    )


@contextlib.contextmanager
def _quiet(*logger_names: str) -> Iterator[None]:
    """Silence library warnings that the plan reports itself (e.g. "Device 0 is not available")."""
    loggers = [logging.getLogger(name) for name in logger_names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _effective_budget(budget: MemoryBudget | None, hardware: Hardware) -> dict[Device, int]:
    if budget is not None:
        return budget.as_max_memory()
    # No budget: Accelerate uses all free GPU memory and all available RAM.
    limits: dict[Device, int] = {gpu.index: gpu.free_bytes for gpu in hardware.gpus}
    limits["cpu"] = hardware.ram_available_bytes
    return limits


def _ordered(per_device: dict[Device, int]) -> dict[Device, int]:
    order = {"cpu": 1, "disk": 2}
    return dict(sorted(per_device.items(), key=lambda kv: (order.get(kv[0], 0), str(kv[0]))))


def _blocks(model: nn.Module, device_map: dict[str, Device], sizes: dict[str, int]) -> tuple[Block, ...]:
    """Decoder layers (the no-split modules) and the other parameter-holding leaves, in order."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    tied = dict(getattr(model, "all_tied_weights_keys", {}) or {})
    blocks: list[Block] = []
    skip_prefixes: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p) for p in skip_prefixes):
            continue
        is_layer = type(module).__name__ in no_split
        own_params = [n for n, _ in module.named_parameters(recurse=False)]
        if not is_layer and not own_params:
            continue
        skip_prefixes.append(name + ".")
        tied_to = next(
            (tied[f"{name}.{p}"].rsplit(".", 1)[0] for p in own_params if f"{name}.{p}" in tied), None
        )
        size = int(sizes.get(name, 0))
        device = None if tied_to and size == 0 else device_of(name, device_map)
        blocks.append(Block(name, device, size, _kind(name, module, is_layer), tied_to))
    return tuple(blocks)


def device_of(name: str, device_map: dict[str, Device]) -> Device | None:
    """The device of module ``name`` under ``device_map`` (the longest entry that contains it), as
    Accelerate resolves it; for a module split between devices, the device of its first part."""
    owners = [key for key in device_map if key == "" or name == key or name.startswith(key + ".")]
    if owners:
        return device_map[max(owners, key=len)]
    parts = [device for key, device in device_map.items() if key.startswith(name + ".")]
    return parts[0] if parts else None


def _kind(name: str, module: nn.Module, is_layer: bool) -> str:
    if is_layer:
        return "layer"
    lowered = name.lower()
    cls = type(module).__name__.lower()
    if "embed" in lowered or "wte" in lowered or "wpe" in lowered or "embedding" in cls:
        return "embedding"
    if "norm" in lowered or "norm" in cls:
        return "norm"
    if "lm_head" in lowered or "head" in lowered:
        return "head"
    return "other"


def _disk_writes(
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


def _checkpoint_format(source: ModelSource) -> str:
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
class _Notes:
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


def _assess(
    config: LoadConfig,
    source: ModelSource,
    hardware: Hardware,
    bytes_per_device: dict[Device, int],
    budget: dict[Device, int],
    disk_bytes: int,
    writes: int,
) -> _Notes:
    """Warnings a user should read before loading, and what blocks the load."""
    notes = _Notes()
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
            free = _free_disk(config.offload_folder, hardware)
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
    if config.quantization != "none":
        notes.warn(
            f"sizes are shown unquantized; {config.quantization} quantization makes the Linear "
            "weights smaller once loaded"
        )
    return notes


def _free_disk(folder: str, hardware: Hardware) -> int:
    path = existing_parent(folder)
    if path == hardware.disk_path:
        return hardware.disk_free_bytes
    return int(shutil.disk_usage(path).free)
