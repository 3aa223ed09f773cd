"""Choosing one request's next token from its logits, with its own settings.

The batching engine decodes many requests in one forward pass, but each keeps its own sampling:
transformers' public logits processors (the same ``generate`` builds, in its order: repetition
penalty, then temperature, top-k, top-p) and its own ``torch.Generator``, so a seed gives the same
reply alone or in a batch, whatever the others draw.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Any

from optdemo.core.generation import GenerationParams

if TYPE_CHECKING:
    import torch


def logits_processors(params: GenerationParams) -> Any:
    """A ``LogitsProcessorList`` for ``params`` (only the processors that change anything)."""
    from transformers import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature > 0:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors


class Sampler:
    """One request's token chooser: greedy at temperature 0, else sampled with its own generator
    (seeded with the request's seed, or a random one)."""

    def __init__(self, params: GenerationParams) -> None:
        self.params = params
        self.processors = logits_processors(params)
        self.generator: torch.Generator | None = None  # made on first use, on the logits' device

    def next_token(self, ids: list[int], logits: torch.Tensor) -> int:
        """The next token after ``ids`` (prompt and reply so far) given its ``logits`` row."""
        import torch

        scores = self.processors(
            torch.tensor([ids], dtype=torch.long, device=logits.device), logits.unsqueeze(0)
        )
        if self.params.temperature == 0:
            return int(scores.argmax(dim=-1))
        if self.generator is None:
            seed = self.params.seed if self.params.seed is not None else secrets.randbits(32)
            self.generator = torch.Generator(device=logits.device).manual_seed(seed)
        probs = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))
