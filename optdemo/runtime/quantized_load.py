"""Load a CPU-quantized model (:mod:`optdemo.weights.quantize`) from its quantized checkpoint in the cache.

The model is built on the meta device, its decoder Linear layers swapped for
:class:`~optdemo.weights.quantize.QuantizedLinear`, and placed by the plan's device map (the planner built
the same model, so the plan is exact and equals the map). CPU-tier tensors are read into memory;
disk-tier ones are left where they are: Accelerate's ``dispatch_model`` gets an offload index that
points *into* the cached safetensors files, so nothing is copied to an offload folder, and the
memory-mapped or streamed disk tier (:func:`optdemo.runtime.tiers.disk_map.place_disk_tier`) then reads the
quantized bytes, a half (8-bit) or a quarter (4-bit) of fp16's per token.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from optdemo.core.budget import Device
from optdemo.core.construction import construction_lock
from optdemo.core.errors import LoadError
from optdemo.models.source import ModelSource
from optdemo.plan.planner import device_of
from optdemo.weights.convert import SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS


def empty_model(source: ModelSource, scheme: str, trust_remote_code: bool = False) -> Any:
    """``source``'s model without weights (meta device), in bfloat16, its decoder blocks' Linear
    layers quantized ones (none for ``scheme`` "none"); buffers computed at construction (rotary
    tables) are real."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from optdemo.weights.quantize import swap_linears

    with construction_lock, init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(source.config), dtype=torch.bfloat16, trust_remote_code=trust_remote_code
        )
    if scheme != "none":
        swap_linears(model, scheme)
    return model


def shard_transform(source: ModelSource, scheme: str, trust_remote_code: bool = False) -> Any:
    """The function that turns one checkpoint shard into the quantized model's tensors (for
    :func:`optdemo.weights.convert.ensure_quantized`): which Linear layers are quantized and what the model
    calls each tensor are read from the empty model."""
    from optdemo.weights.quantize import (
        checkpoint_tensors,
        model_names,
        output_head,
        quantized_modules,
        tied_head_source,
    )

    reference = empty_model(source, "none", trust_remote_code)
    modules = quantized_modules(reference, scheme)
    source_name, head = tied_head_source(reference), output_head(reference)
    tied_head = (head[0], source_name) if source_name is not None and head is not None else None
    expected = set(reference.state_dict())
    prefix = getattr(reference, "base_model_prefix", "") or ""

    def transform(state: dict) -> dict:
        return checkpoint_tensors(state, modules, model_names(list(state), expected, prefix), tied_head)

    return transform


def load_quantized(
    folder: str,
    source: ModelSource,
    scheme: str,
    device_map: dict[str, Device],
    trust_remote_code: bool = False,
) -> Any:
    """The quantized model from the cached checkpoint ``folder``, placed by ``device_map`` (``cpu``
    and ``disk`` entries): CPU-tier tensors read into memory, disk-tier ones served by Accelerate
    from the cached files themselves until the disk tier is placed.

    Raises:
        LoadError: the cached checkpoint lacks a weight the model needs.
    """
    from accelerate import dispatch_model
    from accelerate.utils import set_module_tensor_to_device
    from safetensors import safe_open

    from optdemo.weights.quantize import PAD_PREFIX

    model = empty_model(source, scheme, trust_remote_code)
    offload_index: dict[str, dict] = {}
    files: dict[Path, list[str]] = {}
    weights = _weight_files(Path(folder))
    # A tied weight (the LM head sharing the embeddings) is stored once, under its source's name.
    for target, tied_source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        on_disk = device_of(target.rpartition(".")[0], device_map) == "disk"
        if on_disk and target not in weights and tied_source in weights:
            offload_index[target] = {
                "safetensors_file": str(weights[tied_source]),
                "weight_name": tied_source,
            }
    for name, path in weights.items():
        if name.startswith(PAD_PREFIX):
            continue  # alignment padding between tensors, no weight
        if device_of(name.rpartition(".")[0], device_map) == "disk":
            offload_index[name] = {"safetensors_file": str(path), "weight_name": name}
        else:
            files.setdefault(path, []).append(name)
    for path, names in files.items():
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in names:
                set_module_tensor_to_device(model, name, "cpu", value=handle.get_tensor(name))
    model.tie_weights()
    missing = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.device.type == "meta" and name not in offload_index
    ]
    if missing:
        raise LoadError(
            f"the quantized checkpoint in {folder} lacks {missing[0]}: clear the conversion cache "
            "(python -m optdemo cache --clear) and load again"
        )
    if "disk" in device_map.values():
        dispatch_model(model, device_map, main_device="cpu", offload_index=offload_index)
    model.hf_device_map = dict(device_map)
    return model.eval()


def _weight_files(folder: Path) -> dict[str, Path]:
    """Every tensor name in a safetensors checkpoint folder -> the file that holds it."""
    index = folder / SAFETENSORS_INDEX
    if index.exists():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    path = folder / SAFETENSORS_WEIGHTS
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return dict.fromkeys(handle.keys(), path)
