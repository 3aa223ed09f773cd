"""The running requests' KV caches as one left-padded batch, and the forward pass over it.

Each request's prompt is prefilled alone into its own ``DynamicCache``; joining the batch pads the
shorter of (batch, newcomer) on the left to the longer, and an attention mask marks the padding so
no query ever attends to it. Position ids count each row's own tokens, so a row computes exactly
what it would alone. Leaving drops the row and the padding columns nobody needs any more.

Only plain full-attention caches (every layer a ``DynamicLayer``) can be padded this way; other
cache kinds (sliding windows, linear attention) run one request at a time (:func:`paddable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class PaddedBatch:
    """The running requests' KV caches as one left-padded cache, and its attention mask."""

    def __init__(self, config: Any, cache: Any, mask: torch.Tensor) -> None:
        self.config = config
        self.cache = cache
        self.mask = mask  # [batch, cached positions]: 1 for a real token, 0 for padding

    @classmethod
    def of(cls, model: Any, cache: Any) -> PaddedBatch:
        """A batch of one: the first request's prefilled cache, no padding."""
        import torch

        length = cache.get_seq_length()
        return cls(model.config, cache, torch.ones((1, length), dtype=torch.long))

    @property
    def size(self) -> int:
        """How many rows (requests) the batch holds."""
        return int(self.mask.shape[0])

    def grown_mask(self) -> torch.Tensor:
        """The mask with one more real position per row (the tokens being fed now)."""
        import torch

        return torch.cat([self.mask, torch.ones((self.size, 1), dtype=torch.long)], dim=1)

    def with_row(self, cache: Any) -> PaddedBatch:
        """This batch plus one request's prefilled cache, both left-padded to the longer."""
        import torch

        length, new = int(self.mask.shape[1]), cache.get_seq_length()
        total = max(length, new)
        layers = [
            tuple(
                torch.cat([_pad_left(old, total - length), _pad_left(add, total - new)])
                for old, add in zip(*pair, strict=True)
            )
            for pair in zip(_layers(self.cache), _layers(cache), strict=True)
        ]
        row = torch.ones((1, new), dtype=torch.long)
        mask = torch.cat([_pad_left(self.mask, total - length), _pad_left(row, total - new)])
        return PaddedBatch(self.config, cache_of(self.config, layers), mask)

    def without(self, rows: Sequence[int]) -> PaddedBatch:
        """This batch less ``rows``, with the padding columns no remaining row needs cut off."""
        import torch

        keep = torch.tensor([i for i in range(self.size) if i not in set(rows)], dtype=torch.long)
        mask = self.mask.index_select(0, keep)
        first = int(mask.any(dim=0).long().argmax())  # the first column some row uses
        layers = [
            tuple(t.index_select(0, keep.to(t.device))[:, :, first:] for t in pair)
            for pair in _layers(self.cache)
        ]
        return PaddedBatch(self.config, cache_of(self.config, layers), mask[:, first:])


# ---------------------------------------------------------------- model calls
def forward(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
) -> torch.Tensor:
    """The last position's logits (float32, one row per sequence); the cache grows in place. Only
    the last position goes through the LM head where the model allows (a prompt's other positions'
    logits are never used)."""
    extra = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        **extra,
    )
    return out.logits[:, -1, :].float()


def _keeps_logits(model: Any) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (most causal LMs of transformers 5)."""
    import inspect

    cached = getattr(model, "_optdemo_keeps_logits", None)
    if cached is None:
        cached = "logits_to_keep" in inspect.signature(model.forward).parameters
        model._optdemo_keeps_logits = cached
    return cached


def positions(starts: Sequence[int], length: int, device: Any) -> torch.Tensor:
    """Position ids: each row counts its own tokens (padding never counts)."""
    import torch

    base = torch.tensor(list(starts), dtype=torch.long).unsqueeze(1)
    return (base + torch.arange(length, dtype=torch.long)).to(device)


def new_cache(model: Any) -> Any:
    """An empty cache of the kind the model's config asks for (its layer types)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def cache_of(config: Any, layers: list) -> Any:
    """A cache holding ``layers`` (per layer: keys, values), which later steps extend (each
    extension makes new tensors: the given ones are never changed)."""
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=layers, config=config)


def _pad_left(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """Zeros before ``tensor``'s sequence positions (dim 2 of a cache tensor, dim 1 of a mask)."""
    import torch

    if count == 0:
        return tensor
    dim = 1 if tensor.dim() == 2 else 2
    shape = list(tensor.shape)
    shape[dim] = count
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def paddable(model: Any) -> bool:
    """Whether the model's cache is plain full attention (each layer a ``DynamicLayer``), which
    left padding and a mask can batch; other caches run one request at a time."""
    from transformers.cache_utils import DynamicLayer

    layers = new_cache(model).layers
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)
