"""Load a model with Accelerate across GPU / CPU / disk, and check a configuration before loading.

``preflight`` validates everything that can be known before weights are touched (model resolves,
budget usable here, offload folder writable with room, dtype and quantization possible), so a bad
request is refused while the current model is still loaded. ``load_model`` then makes the single
``from_pretrained(device_map="auto", ...)`` call and reports where the weights really went.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from optdemo.core.budget import Device, describe_gpu_count, format_bytes, missing_gpus
from optdemo.core.construction import construction_lock
from optdemo.core.errors import BudgetError, ConfigError, LoadError, OptdemoError, PlanError
from optdemo.core.load_config import LoadConfig
from optdemo.core.redact import redact
from optdemo.models import hub
from optdemo.models.source import (
    ModelSource,
    hub_error_message,
    hub_token,
    resolve_model,
)
from optdemo.plan.planner import Plan, device_of, plan_device_map, resolve_dtype
from optdemo.runtime.draft import Draft, load_draft, preflight_draft
from optdemo.runtime.quantized_load import load_quantized, shard_transform
from optdemo.runtime.status import ModelStatus
from optdemo.runtime.tiers.disk_map import DiskTierReport, place_disk_tier
from optdemo.runtime.tiers.gpu_policy import apply_policy
from optdemo.system.hardware import Hardware, probe_hardware, quantization_unavailable
from optdemo.weights import convert
from optdemo.weights.checkpoints import ProgressCallback, fast_checkpoint, quantized_checkpoint
from optdemo.weights.disk_full import is_disk_full

# progress(fraction or None when unknown, description)


@dataclass
class LoadedModel:
    """A model in memory with its tokenizer, and the facts of its load (replaced, not edited, when
    a reply records its measured speed)."""

    model: Any
    tokenizer: Any
    status: ModelStatus  # configuration, plan, actual placement, timings; ``busy`` is always None
    draft: Draft | None = None  # speculative decoding's draft, whole in RAM (LoadConfig.draft)

    @property
    def config(self) -> LoadConfig:
        """The configuration the model was loaded with."""
        assert self.status.config is not None
        return self.status.config

    @property
    def input_device(self) -> Any:
        """Where input ids must go: the device of the input embeddings (CPU for disk/CPU)."""
        return input_device(self.model, self.status.device_map)


def preflight(config: LoadConfig, hardware: Hardware | None = None) -> Plan:
    """Check that ``config`` can be loaded here, and return its plan; raise before any harm.

    Raises:
        ConfigError: the model cannot be resolved, or dtype / quantization impossible here.
        BudgetError: the budget names GPUs this machine does not have.
        PlanError: the model does not fit the budget and offload folder.
    """
    import torch

    hardware = hardware or probe_hardware(config.offload_folder)
    if config.max_memory is not None:
        missing = missing_gpus(config.max_memory, hardware.gpu_count)
        if missing:
            raise BudgetError(
                f"max_memory names GPU {missing[0]} but {describe_gpu_count(hardware.gpu_count)}: "
                "remove it from the budget to load here (plans may name it)"
            )
    lacking = quantization_unavailable(torch.cuda.is_available())
    if config.quantization != "none" and lacking:
        raise ConfigError(f"{config.quantization} quantization needs {lacking}: set quantization to none")
    if config.dtype == "bfloat16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ConfigError("this GPU does not support bfloat16: choose float16 or float32")
    plan = plan_device_map(config, hardware)
    source = resolve_model(config.model, config.revision, config.trust_remote_code)
    if source.kind in ("hub", "catalog"):
        _check_hub_reachable(config, source, plan)
    preflight_draft(config, source)
    if plan.blockers:
        raise PlanError(plan.blockers[0])
    if plan.bytes_per_device.get("disk") and config.offload_folder:  # from_pretrained creates it
        _check_writable(config.offload_folder)
    return plan


def _check_hub_reachable(config: LoadConfig, source: ModelSource, plan: Plan) -> None:
    """Refuse early (before the current model is dropped) when the Hub is needed but unreachable:
    the model is neither in the local Hugging Face cache nor already converted by us."""
    from huggingface_hub import model_info, try_to_load_from_cache

    if plan.quantization != "none" and plan.conversion_bytes == 0:
        return  # quantized before: loads from our cache, no Hub needed
    converted = config.fast_offload and plan.conversion_bytes == 0 and plan.bytes_per_device.get("disk")
    if converted and convert.cached(source.location, config.revision, plan.dtype) is not None:
        return  # converted before: loads from our cache, no Hub needed
    if isinstance(try_to_load_from_cache(source.location, "config.json", revision=config.revision), str):
        return  # downloaded before: from_pretrained can use the cache
    where = f"{source.location}@{config.revision}" if config.revision else source.location
    reason = hub.offline_reason()
    if reason is not None:
        raise LoadError(hub.unreachable_message(source.location, where, reason))
    try:
        model_info(source.location, revision=config.revision, token=hub_token(), timeout=15)
    except Exception as exc:  # noqa: BLE001 - every Hub failure becomes a message a user can act on
        if hub.is_network_error(exc):
            hub.mark_unreachable(exc)
        raise LoadError(hub_error_message(exc, source.location, config.revision)) from None


def _check_writable(folder: str) -> None:
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".optdemo-write-test-"):
            pass
    except OSError as exc:
        raise PlanError(
            f"the offload folder {folder} cannot be written ({exc.strerror or exc}): pick a folder "
            "you can write to"
        ) from None


def load_model(config: LoadConfig, plan: Plan, progress: ProgressCallback | None = None) -> LoadedModel:
    """Load ``config``'s model and tokenizer with ``device_map="auto"`` and its budget.

    Raises:
        LoadError: with a message that says what to do (network, gated, corrupt, memory, disk).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_model(config.model, config.revision, config.trust_remote_code)
    dtype = resolve_dtype(config, source, plan.quantization)
    token = hub_token() if source.kind in ("hub", "catalog") else None
    common: dict[str, Any] = {"trust_remote_code": config.trust_remote_code, "token": token}
    if config.revision and source.kind in ("hub", "catalog"):
        common["revision"] = config.revision
    if source.kind in ("hub", "catalog") and hub.offline_reason() is not None:
        # Offline with the model in the Hugging Face cache (preflight checked): read the cache
        # directly instead of letting each file's lookup retry the network for 23 s first.
        common["local_files_only"] = True
    started = time.perf_counter()
    report = progress or (lambda fraction, text: None)
    try:
        kwargs: dict[str, Any] = {
            "device_map": "auto",
            "dtype": dtype,
            # A fresh dict: transformers converts and adjusts it in place.
            "max_memory": config.max_memory.as_max_memory() if config.max_memory else None,
            "offload_folder": config.offload_folder,
            "quantization_config": _quantization_config(config, plan),
            **common,
        }
        with _progress_bars(report) as bar_class:
            location = source.location
            if plan.quantization != "none":
                transform = shard_transform(source, plan.quantization, config.trust_remote_code)
                location = quantized_checkpoint(config, source, transform, bar_class, report)
            elif config.fast_offload and plan.bytes_per_device.get("disk"):
                location = fast_checkpoint(
                    config, source, str(dtype).removeprefix("torch."), bar_class, report
                )
            report(0.0, f"Loading the tokenizer of {config.display_name}")
            # The converted cache holds the tokenizer files too, so a cached model loads offline.
            tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or location, **common)
            if plan.quantization != "none":
                report(None, f"Loading {config.display_name}'s {plan.quantization} weights")
                model = load_quantized(
                    location, source, plan.quantization, plan.device_map, config.trust_remote_code
                )
            else:
                with construction_lock:
                    model = AutoModelForCausalLM.from_pretrained(location, tqdm_class=bar_class, **kwargs)
            draft = load_draft(config, source, tokenizer, bar_class, report)
    except OptdemoError:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an actionable message
        raise LoadError(load_error_message(exc, config, source)) from None
    model.eval()
    disk_tier = _disk_tier(model, config, source)
    policy = None
    if config.quantization == "none":
        policy = apply_policy(model, config.cpu_layers_in_force, str(dtype).removeprefix("torch."))
    device_map = actual_device_map(model)
    elapsed = time.perf_counter() - started
    report(1.0, f"Loaded {config.display_name} in {elapsed:.1f} s")
    status = ModelStatus(
        config=config,
        plan=plan,
        device_map=device_map,
        bytes_per_device=bytes_per_device(model, device_map),
        load_seconds=elapsed,
        disk_tier=disk_tier,
        checkpoint=str(location),
        cpu_layers=policy,
    )
    return LoadedModel(model, tokenizer, status, draft)


def _disk_tier(model: Any, config: LoadConfig, source: ModelSource) -> DiskTierReport:
    """Fast offloading's disk tier for the loaded ``model``; RAM running out there (the streamed
    tier's read buffers are a load's last large allocation) is a :class:`LoadError` that says what
    to do."""
    if not config.fast_offload:
        return DiskTierReport(0, 0, "fast offloading is off")
    try:
        return place_disk_tier(model, config.disk_tier)
    except (MemoryError, OSError) as exc:
        if not isinstance(exc, MemoryError) and exc.errno != errno.ENOMEM:
            raise
        raise LoadError(load_error_message(exc, config, source)) from None


def _quantization_config(config: LoadConfig, plan: Plan) -> Any:
    """bitsandbytes' configuration on a GPU; None when unquantized or quantized by optdemo (CPU)."""
    if config.quantization == "none" or plan.quantization != "none":
        return None
    from transformers import BitsAndBytesConfig

    if config.quantization == "8bit":
        # Layers the budget sends to CPU stay in float32 there (bitsandbytes int8 is GPU-only).
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_enable_fp32_cpu_offload=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float16")


def load_error_message(exc: BaseException, config: LoadConfig, source: ModelSource) -> str:
    """A sentence for a failed load: what went wrong and what to do."""
    import torch
    from huggingface_hub import errors as hub_errors

    name = config.display_name
    if isinstance(exc, torch.OutOfMemoryError):
        return f"the GPU ran out of memory loading {name}: lower the GPU budget so more goes to CPU"
    if isinstance(exc, MemoryError) or (isinstance(exc, OSError) and exc.errno == errno.ENOMEM):
        draft = ", or choose a smaller draft (or none)" if config.draft != "none" else ""
        return f"RAM ran out loading {name}: lower the cpu budget so more goes to disk{draft}"
    if is_disk_full(exc):  # before the corrupt-checkpoint test: safetensors' full disk is no OSError
        return (
            f"the disk filled up while loading {name}: free space in the offload folder "
            f"({config.offload_folder}) and the Hugging Face cache, or raise the memory budget"
        )
    if hub.is_network_error(exc):
        hub.mark_unreachable(exc)
        return hub_error_message(exc, source.location, config.revision)
    if isinstance(exc, (hub_errors.HfHubHTTPError, hub_errors.LocalEntryNotFoundError)):
        return hub_error_message(exc, source.location, config.revision)
    if (
        isinstance(exc, FileNotFoundError)
        and exc.filename
        and config.offload_folder
        and str(exc.filename).startswith(config.offload_folder)
    ):
        return (
            f"the offload folder {config.offload_folder} vanished during the load: recreate it and load again"
        )
    text = redact(str(exc)) or type(exc).__name__
    if _looks_corrupt(exc, text):
        if source.kind in ("local", "builtin"):
            fix = f"save the model again into {source.location}"
        else:
            fix = "delete the model's folder in the Hugging Face cache and load again to re-download it"
        return f"a checkpoint file of {name} is corrupt or incomplete ({text[:160]}): {fix}"
    if isinstance(exc, OSError) and ("does not appear to have" in text or "not a valid" in text):
        return (
            f"{name} has no weights that transformers can load ({text[:200]}): pick a model folder or "
            "repository that holds its weights, or the built-in tiny-opt"
        )
    if isinstance(exc, KeyboardInterrupt):
        return f"loading {name} was interrupted: load it again"
    return (
        f"loading {name} failed ({type(exc).__name__}: {text[:300]}): try again; if it fails again, "
        "pick another model (the built-in tiny-opt always loads) and report the error"
    )


def _looks_corrupt(exc: BaseException, text: str) -> bool:
    if isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return True
    if type(exc).__name__ == "SafetensorError":
        return True
    lowered = text.lower()
    return any(
        marker in lowered
        for marker in (
            "header too",
            "invalid header",
            "pytorchstreamreader",
            "incomplete metadata",
            "unexpected end",
            "corrupt",
            "invalid load key",
            "deserializ",
        )
    )


def actual_device_map(model: Any) -> dict[str, Device]:
    """Where the weights really are: ``hf_device_map``, or ``{"": device}`` when everything landed
    on one device (transformers then sets no map)."""
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        return dict(device_map)
    device = next(model.parameters()).device
    return {"": device.index if device.type == "cuda" else device.type}


def bytes_per_device(model: Any, device_map: dict[str, Device]) -> dict[Device, int]:
    """Bytes of weights on each device according to ``device_map`` (tied weights counted once)."""
    from transformers.integrations.accelerate import compute_module_sizes

    sizes, _ = compute_module_sizes(model)
    totals: dict[Device, int] = {}
    for name, device in device_map.items():
        totals[device] = totals.get(device, 0) + int(sizes.get(name, 0))
    return totals


def input_device(model: Any, device_map: dict[str, Device]) -> Any:
    """The device the input ids must be on: that of the input embeddings (GPU index -> cuda)."""
    import torch

    embed = model.get_input_embeddings()
    embed_name = next((name for name, module in model.named_modules() if module is embed), "")
    device = device_of(embed_name, device_map) if embed_name else None
    if isinstance(device, int):
        return torch.device("cuda", device)
    if device is None or device in ("cpu", "disk", "meta"):
        return torch.device("cpu")
    return torch.device(str(device))


@contextmanager
def _progress_bars(report: ProgressCallback):
    """Route the download bars (``tqdm_class``) and the "Loading weights" bar (transformers'
    tqdm hook) to ``report``."""
    from transformers.utils import logging as hf_logging

    class CallbackBar:
        _lock = threading.RLock()

        def __init__(
            self,
            iterable: Any = None,
            *args: Any,
            total: float | None = None,
            desc: str | None = None,
            initial: float = 0,
            **kwargs: Any,
        ) -> None:
            self.iterable = iterable
            self.total = total if total is not None else _len_or_none(iterable)
            self.desc = desc or "Loading"
            self.n = initial or 0

        def __iter__(self):
            for item in self.iterable:
                yield item
                self.update(1)

        def update(self, n: float = 1) -> None:
            self.n += n or 0
            fraction = min(1.0, self.n / self.total) if self.total else None
            unit = (
                f" ({format_bytes(self.n)} of {format_bytes(self.total)})"
                if (self.total or 0) > 10_000
                else ""
            )
            report(fraction, f"{self.desc}{unit}")

        def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
            self.desc = desc or self.desc

        def set_postfix(self, *args: Any, **kwargs: Any) -> None:
            pass

        def refresh(self, *args: Any, **kwargs: Any) -> None:
            pass

        def reset(self, total: float | None = None) -> None:
            self.n, self.total = 0, total if total is not None else self.total

        def close(self) -> None:
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc: object) -> None:
            self.close()

        @classmethod
        def get_lock(cls):
            return cls._lock

        @classmethod
        def set_lock(cls, lock: Any) -> None:
            cls._lock = lock

    previous = hf_logging.set_tqdm_hook(lambda factory, args, kwargs: CallbackBar(*args, **kwargs))
    try:
        yield CallbackBar
    finally:
        hf_logging.set_tqdm_hook(previous)


def _len_or_none(iterable: Any) -> int | None:
    try:
        return len(iterable)
    except TypeError:
        return None
