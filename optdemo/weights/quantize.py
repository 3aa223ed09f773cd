"""8-bit and 4-bit weights on the CPU, as plain tensors that every offloading tier can move.

bitsandbytes, optimum-quanto and torchao all fail together with Accelerate's disk offload on the
CPU (docs/BENCHMARKS.md, "Choosing the kernels"), and their weights are tensor subclasses that
Accelerate's hooks and optdemo's disk tier (which assign tensors by name) cannot serve. This module
keeps a quantized Linear's weights as ordinary tensors (``int8``, packed ``uint8``, ``bfloat16``
scales) held as frozen parameters, and computes with torch's own weight-only kernels:

* ``8bit``: per-output-channel symmetric int8, ``aten._weight_int8pack_mm``;
* ``4bit``: group-wise asymmetric int4 (groups of up to 128 inputs), stored in the packed layout
  ``aten._weight_int4pack_mm_for_cpu`` consumes, so nothing is repacked per token.

Both kernels want bfloat16 activations (fp16 ones are far slower), so a quantized model runs in
bfloat16 and each module casts at its boundary when it is handed another dtype. Only the Linear
layers inside the decoder blocks are quantized; embeddings, norms and the LM head stay bfloat16.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# The schemes a configuration names, and the cache key of each one's stored format. The int4
# packed layout may differ between CPU instruction sets, so its key names the one it was packed for.
SCHEMES = ("8bit", "4bit")
INT4_GROUP_SIZES = (128, 64, 32)  # the largest that divides a layer's inputs is used
_INT8_K_MULTIPLE = 16  # _weight_int8pack_mm gives wrong results (or crashes) otherwise
_INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu refuses other output sizes
COMPUTE_DTYPE = torch.bfloat16


def scheme_key(scheme: str) -> str:
    """The stored format's name, part of the conversion cache key: ``int8``, or for int4, whose
    packed layout is torch's private business, the CPU capability and torch release it was packed
    for (``int4-g128-avx512-torch2.13``): another CPU or torch quantizes anew, never misreads."""
    if scheme == "8bit":
        return "int8-head8"
    if scheme == "4bit":
        capability = torch.backends.cpu.get_cpu_capability().lower()
        release = ".".join(torch.__version__.split("+")[0].split(".")[:2])
        return f"int4-g{INT4_GROUP_SIZES[0]}-head8-{capability}-torch{release}"
    raise ValueError(f"unknown quantization scheme {scheme!r}")


def group_size(in_features: int) -> int | None:
    """The int4 group size for a layer with ``in_features`` inputs, or None if none divides it."""
    return next((size for size in INT4_GROUP_SIZES if in_features % size == 0), None)


def quantizable(linear: nn.Linear, scheme: str) -> bool:
    """Whether torch's kernel for ``scheme`` accepts this layer's shape (else it stays bfloat16)."""
    out_features, in_features = linear.out_features, linear.in_features
    if scheme == "8bit":
        return in_features % _INT8_K_MULTIPLE == 0
    return group_size(in_features) is not None and out_features % _INT4_N_MULTIPLE == 0


class QuantizedLinear(nn.Module):
    """A Linear layer whose weight is int8 (``8bit``) or packed int4 (``4bit``), computed by torch's
    weight-only CPU kernels. Its tensors are ordinary frozen parameters, so Accelerate's hooks and
    the disk tier load, offload, memory-map and stream them like any weight:

    * ``weight``: int8 ``[out, in]``, or uint8 ``[out, in / 2]`` in the int4 kernel's packed layout;
    * ``scales``: bfloat16 ``[out]`` (8bit) or ``[in / group, out, 2]`` scales and zeros (4bit);
    * ``bias``: bfloat16 ``[out]`` when the original layer had one.
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, scheme: str, device: Any = "meta"
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group_size = group_size(in_features) if scheme == "4bit" else None
        if scheme == "8bit":
            weight = torch.empty(out_features, in_features, dtype=torch.int8, device=device)
            scales = torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device)
        else:
            assert self.group_size is not None
            weight = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device)
            groups = in_features // self.group_size
            scales = torch.empty(groups, out_features, 2, dtype=COMPUTE_DTYPE, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=COMPUTE_DTYPE, device=device), requires_grad=False)
            if bias
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T + b`` with the dequantization fused into the kernel; bfloat16 inside."""
        shape = x.shape
        flat = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
        if self.scheme == "8bit":
            out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight, self.group_size, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, bfloat16 per-row scales): symmetric, scale = max |w| / 127 of each output row,
    rounded against the bfloat16 scale the kernel will use."""
    weight = weight.float()
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=1e-8).to(COMPUTE_DTYPE)
    q = torch.round(weight / scales.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 levels 0..15 ``[out, in]``, bfloat16 scales and zeros ``[in / group, out, 2]``):
    per group of inputs, ``w ~ (q - 8) * scale + zero`` with ``scale = (max - min) / 15`` and
    ``zero = min + 8 * scale``, the format of torch's int4 kernel."""
    out_features, in_features = weight.shape
    size = group_size(in_features)
    assert size is not None
    groups = weight.float().reshape(out_features, in_features // size, size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-8).to(COMPUTE_DTYPE).float()
    zeros = (low + 8 * scales).to(COMPUTE_DTYPE).float()
    q = torch.round((groups - zeros[..., None]) / scales[..., None]) + 8
    q = q.clamp(0, 15).to(torch.int32).reshape(out_features, in_features)
    scales_and_zeros = torch.stack([scales.T, zeros.T], dim=-1).to(COMPUTE_DTYPE).contiguous()
    return q, scales_and_zeros


def dequantize(scheme: str, weight: torch.Tensor) -> torch.Tensor:
    """The float32 weight a quantized layer computes with (the reference tests compare against):
    quantized and dequantized exactly as the kernels see it."""
    if scheme == "8bit":
        q, scales = quantize_int8(weight)
        return q.float() * scales.float()[:, None]
    q, scales_and_zeros = quantize_int4(weight)
    out_features, in_features = q.shape
    groups = scales_and_zeros.shape[0]
    scale = scales_and_zeros[..., 0].float().T[..., None]
    zero = scales_and_zeros[..., 1].float().T[..., None]
    levels = q.float().reshape(out_features, groups, in_features // groups)
    return ((levels - 8) * scale + zero).reshape(out_features, in_features)


def quantized_tensors(scheme: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Linear weight as the tensors :class:`QuantizedLinear` holds (``weight``, ``scales``), in
    the exact format its kernel consumes (stored so in the cache: nothing is repacked at load)."""
    if scheme == "8bit":
        q, scales = quantize_int8(weight)
        return {"weight": q.contiguous(), "scales": scales.contiguous()}
    q, scales_and_zeros = quantize_int4(weight)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    return {"weight": packed.contiguous(), "scales": scales_and_zeros}


def decoder_linears(model: nn.Module, scheme: str) -> Iterator[tuple[str, nn.Linear]]:
    """The Linear layers inside the model's decoder blocks (its no-split modules) that ``scheme``'s
    kernel accepts, by name: q/k/v/out projections and the MLP for OPT."""
    no_split = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [name for name, module in model.named_modules() if type(module).__name__ in no_split]
    for name, module in model.named_modules():
        inside = any(name.startswith(block + ".") for block in blocks)
        if inside and type(module) is nn.Linear and quantizable(module, scheme):
            yield name, module


# The LM head is int8 under both schemes: it is read every token (a large share of a 4-bit
# token's time in bfloat16: docs/BENCHMARKS.md), int8 reads it at the int8 kernel's rate, and int8
# keeps the next-token scores close (4-bit heads are a common source of quality loss).
HEAD_SCHEME = "8bit"


def output_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """The LM head (the output embeddings) by name, when it is a Linear the int8 kernel accepts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or not quantizable(head, HEAD_SCHEME):
        return None
    return next((name, module) for name, module in model.named_modules() if module is head)


def quantized_modules(model: nn.Module, scheme: str) -> dict[str, str]:
    """Module name -> the scheme it is stored in: the decoder blocks' Linear layers in ``scheme``,
    the LM head in :data:`HEAD_SCHEME`. Embeddings and norms stay bfloat16."""
    modules = {name: scheme for name, _ in decoder_linears(model, scheme)}
    head = output_head(model)
    if head is not None:
        modules[head[0]] = HEAD_SCHEME
    return modules


def tied_head_source(model: nn.Module) -> str | None:
    """The tensor a tied LM head shares (``model.decoder.embed_tokens.weight`` for OPT), or None:
    the quantized model unties them and stores the head as its own int8 copy of that tensor."""
    head = output_head(model)
    if head is None:
        return None
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return tied.get(f"{head[0]}.weight")


def swap_linears(model: nn.Module, scheme: str, quantize_weights: bool = False) -> list[str]:
    """Replace the decoder blocks' Linear layers and the LM head by :class:`QuantizedLinear` (in
    place, untying a tied head from the embeddings); returns their names. On a meta model the new
    layers are empty (for planning and loading); with ``quantize_weights`` the real weights are
    quantized (a model already in memory, for tests)."""
    modules = quantized_modules(model, scheme)
    source = tied_head_source(model)
    if source is not None:  # the head becomes its own tensor: nothing may tie it back
        model.config.tie_word_embeddings = False
        head = output_head(model)
        assert head is not None
        model.all_tied_weights_keys.pop(f"{head[0]}.weight", None)
    swapped = []
    for name, module_scheme in modules.items():
        linear = model.get_submodule(name)
        bias = linear.bias is not None
        device = "cpu" if quantize_weights else "meta"
        layer = QuantizedLinear(linear.in_features, linear.out_features, bias, module_scheme, device)
        if quantize_weights:
            tensors = quantized_tensors(module_scheme, linear.weight.detach())
            if bias:
                tensors["bias"] = linear.bias.detach().to(COMPUTE_DTYPE)
            for key, value in tensors.items():
                getattr(layer, key).data = value
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, layer)
        swapped.append(name)
    return swapped


def checkpoint_tensors(
    state: dict[str, torch.Tensor],
    modules: dict[str, str],
    names: dict[str, str],
    tied_head: tuple[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """One checkpoint shard's tensors in the quantized model's format: the weights of ``modules``
    (module name -> scheme) quantized, every other floating tensor in bfloat16. ``names`` maps
    checkpoint names to the model's own (a ``.bin`` checkpoint may lack the base model's prefix);
    tensors the model does not have are dropped. ``tied_head`` (head module, the tensor it shared)
    makes the head's int8 copy from that tensor wherever it is, and ignores any stored head."""
    tensors: dict[str, torch.Tensor] = {}
    for stored, tensor in state.items():
        name = names.get(stored)
        if name is None:
            continue
        module, _, leaf = name.rpartition(".")
        if tied_head is not None and module == tied_head[0]:
            continue  # made from the tensor it shared, below (a .bin may store both)
        if tied_head is not None and name == tied_head[1]:
            for key, value in quantized_tensors(modules[tied_head[0]], tensor).items():
                tensors[f"{tied_head[0]}.{key}"] = value
        if module in modules and leaf == "weight":
            for key, value in quantized_tensors(modules[module], tensor).items():
                tensors[f"{module}.{key}"] = value
        elif tensor.is_floating_point():
            tensors[name] = tensor.to(COMPUTE_DTYPE).contiguous()
        else:
            tensors[name] = tensor.contiguous()
    return tensors


def model_names(stored: list[str], expected: set[str], prefix: str) -> dict[str, str]:
    """Checkpoint tensor name -> the model's name for it (``decoder.x`` -> ``model.decoder.x`` when
    the checkpoint was saved from the base model), for the names the model has."""
    names = {}
    for name in stored:
        if name in expected:
            names[name] = name
        elif f"{prefix}.{name}" in expected:
            names[name] = f"{prefix}.{name}"
    return names


ALIGNMENT = 64  # torch's int8 kernel crashes on weights not 16-byte aligned; 64 suits every kernel
PAD_PREFIX = "optdemo_padding."
_SAFETENSORS_NAMES = {
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float32: "F32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.bool: "BOOL",
}


def save_aligned(tensors: dict[str, torch.Tensor], path: Any, metadata: dict | None = None) -> None:
    """Write ``tensors`` as a safetensors file whose tensors each start at a multiple of
    :data:`ALIGNMENT` bytes, in name order (so a decoder block's tensors are one byte range, as the
    streamed disk tier reads them). safetensors' own writer orders by dtype and packs tensors
    back to back, which leaves int8 weights misaligned once the file is memory-mapped. The gaps
    are small ``uint8`` tensors named ``optdemo_padding.*`` (the format allows no holes)."""
    import json

    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    chunks: list[torch.Tensor] = []
    offset = 0
    for name in sorted(tensors):
        tensor = tensors[name].contiguous()
        gap = -offset % ALIGNMENT
        if gap:
            pad = torch.zeros(gap, dtype=torch.uint8)
            header[f"{PAD_PREFIX}{len(header):06d}"] = _entry(pad, offset)
            chunks.append(pad)
            offset += gap
        header[name] = _entry(tensor, offset)
        chunks.append(tensor)
        offset += tensor.numel() * tensor.element_size()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)  # data starts aligned in the file
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        for chunk in chunks:
            handle.write(chunk.reshape(-1).view(torch.uint8).numpy().data)  # no copy


def _entry(tensor: torch.Tensor, offset: int) -> dict:
    size = tensor.numel() * tensor.element_size()
    return {
        "dtype": _SAFETENSORS_NAMES[tensor.dtype],
        "shape": list(tensor.shape),
        "data_offsets": [offset, offset + size],
    }
