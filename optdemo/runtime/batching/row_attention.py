"""Attention that computes each row exactly as it is computed in any other call.

The batching engine (:mod:`optdemo.runtime.batching.scheduler`) left-pads the running requests' KV
caches to one length, and a mask hides the padding. That is exact in arithmetic but not in floating
point: a kernel's reduction over the keys is laid out from the first column, so leading padding
changes the order a row's sums are rounded in (docs/BENCHMARKS.md, "Many visitors"). So:

* decoding steps and verification passes (several tokens of one sequence checked at once) run
  SDPA once per row, on that row's own keys only: the very call a request alone makes;
* prompts run :func:`~optdemo.runtime.batching.exact_attention.block_attention`, whose rows do not
  depend on where the prompt was cut (a reused prefix), when the engine computes them
  (:func:`~optdemo.runtime.batching.kernels.computing`); the stock SDPA path otherwise.

Attention is a small share of a step next to reading the weights; the Linear layers, where the
time goes, stay batched. Registered with transformers' own attention and mask interfaces.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from optdemo.runtime.batching import kernels
from optdemo.runtime.batching.exact_attention import block_attention
from optdemo.runtime.batching.kernels import PROMPT, current_mode
from optdemo.runtime.batching.padded_batch import paddable

if TYPE_CHECKING:
    import torch

ROW_ATTENTION = "optdemo_rows"  # the implementation name the engine sets on the models it batches
_registered = False


def rowwise_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, computed row by row (see the module's text)."""
    import torch
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    mode = current_mode()
    rows = query.shape[2]
    if mode == PROMPT and query.shape[0] == 1:  # a prompt, however short
        groups = getattr(module, "num_key_value_groups", 1)
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
        return block_attention(query, key, value, kwargs.get("scaling")), None
    if rows != 1 and (mode is None or query.shape[0] != 1):  # not the engine's: the stock path
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    outputs = []
    for row in range(query.shape[0]):
        start = 0
        if attention_mask is not None and rows == 1:  # left padding: the row's keys are the suffix
            allowed = attention_mask[row, 0, -1]
            allowed = allowed if allowed.dtype == torch.bool else allowed == 0
            start = int(allowed.numel() - int(allowed.sum()))
        for place in range(rows):  # a verification pass: each token sees the keys up to itself
            end = key.shape[2] - rows + place + 1
            out, _ = sdpa_attention_forward(
                module,
                query[row : row + 1, :, place : place + 1].contiguous(),
                key[row : row + 1, :, start:end].contiguous(),
                value[row : row + 1, :, start:end].contiguous(),
                None,
                **kwargs,
            )
            outputs.append(out)
    joined = torch.cat(outputs, dim=1) if rows != 1 else torch.cat(outputs)
    return joined, None


def use_row_attention(model: Any) -> bool:
    """Switch ``model`` to :func:`rowwise_sdpa` when it uses SDPA attention (the default); returns
    whether it did. Other implementations (eager, flash) are left as they are."""
    global _registered
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", ROW_ATTENTION):
        return False
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ROW_ATTENTION, rowwise_sdpa)
        AttentionMaskInterface.register(ROW_ATTENTION, sdpa_mask)
        _registered = True
    model.set_attn_implementation(ROW_ATTENTION)
    return True


def prepare_model(model: Any) -> kernels.KernelChoice:
    """Once per model: attention that computes a row as every other call does
    (this module's) and the kernels of its products
    (:mod:`optdemo.runtime.batching.kernels`), so that a reply never depends on who else is being
    served nor on which part of its prompt was reused."""
    choice = getattr(model, "_optdemo_kernels", None)
    if choice is None:
        rows_attention = use_row_attention(model)
        choice = kernels.choose_kernels(model, getattr(model, "_optdemo_prompt_kernel", kernels.NATIVE))
        if not rows_attention or not paddable(model):
            choice = replace(choice, exact=False, reason=choice.reason + "; its attention is not row-exact")
        model._optdemo_kernels = choice
    return choice
