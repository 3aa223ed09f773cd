"""Build a random-weight checkpoint larger than RAM, one shard at a time.

``optdemo.models.synthetic.build_random_opt`` instantiates the whole model, which a 25.7 GB opt-13b on a
23 GiB machine cannot afford. This builder takes the parameter names and shapes from the model
built on the meta device (no memory), then generates each tensor and writes it into the current
safetensors shard, flushing a shard as soon as it is full: at most one shard is in memory. The
weights follow OPT's initialisation closely enough for benchmarks (normal(0, 0.02), layer norms at
weight 1 / bias 0, biases 0); the tied LM head is not stored, as ``save_pretrained`` would not.
"""

from __future__ import annotations

import json
from pathlib import Path

from optdemo.core.catalog import catalog_config_dict
from optdemo.models.synthetic import build_tokenizer

SHARD_BYTES = 2 * 10**9


def build_sharded_opt(dest: Path, architecture: str, dtype: str = "float16", seed: int = 0) -> Path:
    """Write a random ``architecture`` checkpoint (safetensors shards + index + tokenizer) to
    ``dest`` holding at most one shard in memory; returns ``dest``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, OPTConfig

    fields = {k: v for k, v in catalog_config_dict(architecture).items() if not k.startswith("_")}
    config = OPTConfig(**{**fields, "torch_dtype": dtype})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    shapes = {name: tuple(p.shape) for name, p in skeleton.named_parameters()}  # tied: listed once
    del skeleton
    dest.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    names: list[str] = []
    total = size = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            names.append(f"model-{len(names) + 1:05d}.safetensors")
            save_file(shard, dest / names[-1], metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, names[-1]))
            shard, size = {}, 0

    for name, shape in shapes.items():
        tensor = _initial(name, shape, generator).to(getattr(torch, dtype))
        nbytes = tensor.numel() * tensor.element_size()
        if size and size + nbytes > SHARD_BYTES:
            flush()
        shard[name] = tensor
        size += nbytes
        total += nbytes
    flush()
    final = {old: old.replace(".safetensors", f"-of-{len(names):05d}.safetensors") for old in names}
    for old, new in final.items():
        (dest / old).rename(dest / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: final[v] for k, v in weight_map.items()}}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(dest)
    build_tokenizer(dest)
    return dest


def _initial(name: str, shape: tuple[int, ...], generator: object) -> object:
    import torch

    if name.endswith(("layer_norm.weight", "layernorm.weight")):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.zeros(shape)
    return torch.randn(shape, generator=generator) * 0.02
