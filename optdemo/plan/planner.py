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
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from optdemo.core.budget import Device, MemoryBudget, format_bytes
from optdemo.core.construction import construction_lock
from optdemo.core.defaults import DEFAULT_CPU_LAYERS, DEFAULT_DISK_TIER
from optdemo.core.generation import context_window
from optdemo.core.load_config import DRAFT_COPIES, LoadConfig
from optdemo.models.hf_compat import auto_device_map
from optdemo.models.source import ModelSource, resolve_model
from optdemo.plan.bandwidth import KERNELS
from optdemo.plan.kv_room import BatchRoom, batch_room
from optdemo.plan.notes import (
    Notes,
    assess,
    disk_writes,
    note_conversion,
    quantized_conversion,
    stored_format,
)
from optdemo.plan.policy import cpu_quantization
from optdemo.system.hardware import Hardware, probe_hardware

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
class DraftPlan:
    """Speculative decoding's draft as planned: loaded whole in RAM, beside the model's budget."""

    draft: str  # "8bit" / "4bit" (the model's own copy) or the draft model's reference
    display_name: str  # for people: "opt-1.3b's 4bit copy", "opt-125m"
    bytes: int  # RAM its weights take
    layers: int  # its decoder layers (the per-token bookkeeping of speed.py)
    kernel: str  # what computes it, a Bandwidths.cpu_matvec key: "int8", "int4" or a dtype
    vocab_size: int | None = None  # the tokens its logits cover (a draft must share the model's)

    def to_dict(self) -> dict:
        """Plain data for the plan's JSON."""
        return {"draft": self.draft, "display_name": self.display_name, "bytes": self.bytes}


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
    # The CPU quantization scheme the sizes are for (optdemo.weights.quantize): "8bit", "4bit" or "none"
    # (unquantized, or bitsandbytes on a GPU, which quantizes at load time).
    quantization: str = "none"
    batch: BatchRoom | None = None  # KV cache room for concurrent replies (optdemo.plan.kv_room)
    draft: DraftPlan | None = None  # speculative decoding's draft, in RAM (None: no draft)

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
            "quantization": self.quantization,
            "warnings": list(self.warnings),
            "blockers": list(self.blockers),
            "batch": None if self.batch is None else self.batch.to_dict(),
            "draft": None if self.draft is None else self.draft.to_dict(),
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


def resolve_dtype(config: LoadConfig, source: ModelSource, quantization: str = "none") -> torch.dtype:
    """The dtype the weights will have: the configured one, or the checkpoint's for ``auto``; a
    CPU-quantized model runs in bfloat16 (what torch's weight-only kernels want)."""
    import torch

    if quantization != "none":
        return torch.bfloat16
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    stored = getattr(source.config, "dtype", None) or getattr(source.config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def meta_model(source: ModelSource, dtype: torch.dtype, quantization: str = "none") -> nn.Module:
    """The model instantiated on the meta device in ``dtype``: shapes and sizes, no memory.

    Built by calling the model class directly under a (thread-local) meta-device context, not with
    ``from_config``: transformers' construction helpers patch process-wide state (the default
    dtype, ``tie_weights``, the init functions), and a plan previewed in one thread while a model
    loads in another must not disturb that load. Sizes do not depend on either: tied weights are
    known from ``all_tied_weights_keys``, and the dtype is applied afterwards. With a CPU
    ``quantization`` scheme the decoder blocks' Linear layers are
    :class:`~optdemo.weights.quantize.QuantizedLinear` ones: every size is that of the quantized tensors.
    """
    import torch
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoModelForCausalLM

    key = (source.model, source.location, str(dtype), quantization)
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
    if quantization != "none":
        from optdemo.weights.quantize import swap_linears

        swap_linears(model, quantization)
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
    quantization = cpu_quantization(config, hardware)
    dtype = resolve_dtype(config, source, quantization)
    model = meta_model(source, dtype, quantization)
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
    checkpoint_format = stored_format(source)
    disk_bytes = bytes_per_device.get("disk", 0)
    total = int(sizes.get("", 0))
    writes, conversion = disk_writes(config, source, checkpoint_format, disk_bytes, total, dtype)
    if quantization != "none":
        writes, conversion = 0, quantized_conversion(config, source, quantization, total)
    notes = assess(config, source, hardware, bytes_per_device, budget, disk_bytes, writes)
    if config.quantization != "none" and quantization == "none":
        notes.warn(
            f"sizes are shown unquantized; {config.quantization} quantization makes the Linear "
            "weights smaller once loaded"
        )
    if conversion:
        note_conversion(notes, conversion, quantization)
    draft = plan_draft(config, source)
    if draft is not None:
        _note_draft(notes, draft, source, bytes_per_device.get("cpu", 0), hardware.ram_available_bytes)
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
        quantization=quantization,
        batch=batch_room(
            model.config,
            dtype.itemsize,
            context_window(model),
            budget,
            bytes_per_device,
            hardware.ram_available_bytes,
            [block.device for block in blocks if block.kind == "layer"],
        ),
        draft=draft,
    )


def plan_draft(config: LoadConfig, source: ModelSource) -> DraftPlan | None:
    """The draft ``config`` asks for, sized on the meta device: the model's own int8 / int4 copy
    (the sizes of optdemo's quantized layers) or the draft model in its own dtype; None without.

    Raises:
        ConfigError: the draft model cannot be resolved.
    """
    import torch
    from transformers.integrations.accelerate import compute_module_sizes

    if config.draft == "none":
        return None
    if config.draft in DRAFT_COPIES:
        model = meta_model(source, torch.bfloat16, config.draft)
        name, kernel = f"{config.display_name}'s {config.draft} copy", KERNELS[config.draft]
    else:
        draft_config = LoadConfig(config.draft, trust_remote_code=config.trust_remote_code)
        draft_source = resolve_model(draft_config.model, None, config.trust_remote_code)
        dtype = resolve_dtype(draft_config, draft_source)
        model = meta_model(draft_source, dtype)
        name, kernel = draft_config.display_name, str(dtype).removeprefix("torch.")
    sizes, _ = compute_module_sizes(model)
    layers = int(getattr(model.config, "num_hidden_layers", 0) or 0)
    vocab = getattr(model.config, "vocab_size", None)
    return DraftPlan(config.draft, name, int(sizes.get("", 0)), layers, kernel, vocab)


def _note_draft(notes: Notes, draft: DraftPlan, source: ModelSource, cpu_bytes: int, available: int) -> None:
    """Block a draft model whose vocabulary differs from the model's (its tokens would mean other
    words), and warn when RAM cannot hold the draft beside the model's CPU tier."""
    ours, theirs = getattr(source.config, "vocab_size", None), draft.vocab_size
    if draft.draft not in DRAFT_COPIES and ours != theirs:
        notes.block(
            f"the draft {draft.display_name} has a vocabulary of {theirs} tokens and the model one of "
            f"{ours}: a draft must share the model's tokenizer; choose one of the same family "
            "(for OPT, opt-125m) or no draft"
        )
    if draft.bytes + cpu_bytes > available:
        notes.warn(
            f"the draft ({draft.display_name}) needs {format_bytes(draft.bytes)} of RAM beside the "
            f"model's {format_bytes(cpu_bytes)} there, and {format_bytes(available)} is available: "
            "lower the cpu budget, choose a smaller draft, or none"
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
