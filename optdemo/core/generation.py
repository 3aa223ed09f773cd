"""What a reply is made of and with: its parameters (validated), the stream of updates and its
stats, the prompt's encoding under the max_new_tokens rule, stop-sequence cutting, and failures
as messages. The replies themselves are decoded by :mod:`optdemo.runtime.batching.scheduler` (chat prompts are
laid out by :mod:`optdemo.core.chat_prompt`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optdemo.core import defaults
from optdemo.core.chat_prompt import check_max_new_tokens
from optdemo.core.defaults import MAX_NEW_TOKENS_LIMIT, MAX_PROMPT_CHARS
from optdemo.core.errors import GenerationError

if TYPE_CHECKING:
    pass

# How often the consumer wakes up while waiting for a slow (disk-offloaded) first token.


@dataclass(frozen=True)
class GenerationParams:
    """Sampling settings; validated on creation so a bad value never reaches ``generate``."""

    max_new_tokens: int = defaults.MAX_NEW_TOKENS  # tokens to generate at most
    temperature: float = defaults.TEMPERATURE  # 0 means greedy decoding (deterministic)
    top_p: float = defaults.TOP_P  # nucleus sampling mass, in (0, 1]
    top_k: int = defaults.TOP_K  # sample among the k most likely tokens; 0 disables the filter
    repetition_penalty: float = defaults.REPETITION_PENALTY  # 1.0 means no penalty
    seed: int | None = None  # fixed seed for reproducible sampling
    stop: tuple[str, ...] = ()  # texts that end the reply (never shown); one per line in a string

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_new_tokens", _as_int("max_new_tokens", self.max_new_tokens))
        object.__setattr__(self, "stop", _as_stop_sequences(self.stop))
        object.__setattr__(self, "top_k", _as_int("top_k", self.top_k))
        for name in ("temperature", "top_p", "repetition_penalty"):
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        if self.seed is not None:
            object.__setattr__(self, "seed", _as_int("seed", self.seed))
            if not 0 <= self.seed < 2**32:
                raise GenerationError("seed must be between 0 and 4294967295")
        # The upper bound depends on the model and the prompt: check_max_new_tokens, at generation.
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.temperature <= defaults.MAX_TEMPERATURE:
            raise GenerationError(
                f"temperature must be between 0 (greedy) and {defaults.MAX_TEMPERATURE:g}, "
                f"got {self.temperature:g}"
            )
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p:g}")
        if not 0 <= self.top_k <= defaults.MAX_TOP_K:
            raise GenerationError(f"top_k must be between 0 (off) and {defaults.MAX_TOP_K}, got {self.top_k}")
        low, high = defaults.REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise GenerationError(
                f"repetition_penalty must be between {low:g} and {high:g} (1 = none), "
                f"got {self.repetition_penalty:g}"
            )


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise GenerationError(f"{name} must be a whole number, not {value!r}")
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, numbers.Integral):  # int, numpy integers
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise GenerationError(f"{name} must be a whole number, got {str(value)[:40]!r}")


def _as_stop_sequences(value: object) -> tuple[str, ...]:
    """Stop sequences from a list of texts or one text with one per line (blank lines ignored)."""
    if value is None:
        return ()
    if isinstance(value, str):  # one per line, as typed in a text box
        value = [line for line in value.split("\n") if line.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
        raise GenerationError("stop must be a list of texts (or one text, one sequence per line)")
    stops = tuple(item for item in value if item)
    if len(stops) > defaults.MAX_STOP_SEQUENCES:
        raise GenerationError(f"stop takes at most {defaults.MAX_STOP_SEQUENCES} sequences, got {len(stops)}")
    for item in stops:
        if len(item) > defaults.MAX_STOP_CHARS:
            raise GenerationError(
                f"each stop sequence is at most {defaults.MAX_STOP_CHARS} characters, got {len(item)}"
            )
    return stops


def _as_float(name: str, value: object) -> float:
    if isinstance(value, bool):
        raise GenerationError(f"{name} must be a number, not {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise GenerationError(f"{name} must be a number, got {str(value)[:40]!r}") from None
    if not math.isfinite(number):
        raise GenerationError(f"{name} must be a finite number, got {value!r}")
    return number


@dataclass(frozen=True)
class CacheScope:
    """Whose prompt caches a request may reuse: ``name`` (a browser's chat, an API session, the
    OpenAI API shared by its clients), and whether the scope holds one conversation (then an
    edited conversation's older caches are dropped rather than kept beside the new one)."""

    name: str
    one_conversation: bool = False


@dataclass(frozen=True)
class GenerationStats:
    """What one reply cost: token counts and timings (seconds)."""

    prompt_tokens: int
    new_tokens: int
    time_to_first_token: float | None
    total_seconds: float
    tokens_per_second: float | None  # decode rate after the first token
    stopped: bool = False  # ended by the user (Stop) rather than by length or a stop string
    dropped_turns: int = 0  # chat: oldest turns left out of the prompt to fit the window
    context_window: int | None = None  # the model's window (tokens), when known
    batch_size: int | None = None  # most replies decoded together while this one ran; None: unknown
    # Of the prompt's tokens, how many came from a cached prefix (not computed again), and the
    # seconds computing the rest took: the wait before the first token, explained.
    cached_tokens: int = 0
    prompt_seconds: float | None = None
    # Speculative decoding (a draft loaded, the reply alone on the model): tokens the draft
    # proposed, how many of them the model accepted, the verification passes that checked them,
    # and the draft length k of each pass (chosen from the measured costs).
    drafted: int = 0
    accepted: int = 0
    passes: int = 0
    draft_lengths: tuple[int, ...] = ()

    @property
    def processed_tokens(self) -> int:
        """The prompt's tokens computed for this reply (the rest were reused)."""
        return self.prompt_tokens - self.cached_tokens

    def summary(self) -> str:
        """One line for people, e.g. ``24 tokens · first token 0.41 s · 12.3 tokens/s``."""
        parts = [f"{self.new_tokens} token{'s' if self.new_tokens != 1 else ''}"]
        if self.time_to_first_token is not None:
            parts.append(f"first token {self.time_to_first_token:.2f} s{self._prompt_part()}")
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.1f} tokens/s")
        parts.append(f"{self.total_seconds:.2f} s total")
        if self.batch_size == 1:
            parts.append("alone on the model")
        elif self.batch_size is not None:
            parts.append(f"shared the model (batch of up to {self.batch_size})")
        if self.passes:
            parts.append(self.speculation_summary())
        if self.stopped:
            parts.append("stopped")
        return " · ".join(parts)

    def speculation_summary(self) -> str:
        """``draft: 30 of 48 tokens accepted in 12 passes (k 2-6)``; empty without a pass."""
        if not self.passes:
            return ""
        low, high = min(self.draft_lengths, default=0), max(self.draft_lengths, default=0)
        k = f"k {low}" if low == high else f"k {low}-{high}"
        passes = "pass" if self.passes == 1 else "passes"
        return f"draft: {self.accepted} of {self.drafted} tokens accepted in {self.passes} {passes} ({k})"

    def _prompt_part(self) -> str:
        """`` (prompt: reused 460 cached tokens, processed 23 in 0.38 s)``: what the first token
        waited for; empty when not measured."""
        if self.prompt_seconds is None:
            return ""
        reused = f"reused {self.cached_tokens} cached tokens, " if self.cached_tokens else ""
        return f" (prompt: {reused}processed {self.processed_tokens} in {self.prompt_seconds:.2f} s)"

    def context_summary(self) -> str:
        """How much of the window this reply used, and whether old turns were left out, e.g.
        ``Context: 120 + 24 of 512 tokens (prompt + reply) · 2 oldest turns left out to fit``."""
        if self.context_window is None:
            return ""
        line = (
            f"Context: {self.prompt_tokens} + {self.new_tokens} of {self.context_window} tokens "
            "(prompt + reply)"
        )
        if self.dropped_turns:
            turns = "turn" if self.dropped_turns == 1 else "turns"
            line += f" · {self.dropped_turns} oldest {turns} left out to fit"
        return line


@dataclass(frozen=True)
class GenerationUpdate:
    """One step of a stream: the reply so far; ``stats`` is set on the final update only.
    While a request waits for a place in the batch, updates carry no text and a ``status``."""

    text: str
    stats: GenerationStats | None = None
    status: str = ""  # e.g. "Waiting for the model: number 2 in line ..."
    token_ids: tuple[int, ...] = ()  # the reply's tokens (final update; for exact comparisons)

    @property
    def done(self) -> bool:
        """True for the last update of a stream."""
        return self.stats is not None


def context_window(model: Any) -> int:
    """The model's maximum sequence length (positions it was trained with)."""
    config = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def encode_prompt(
    model: Any,
    tokenizer: Any,
    prompt: str,
    params: GenerationParams,
    max_new_tokens_cap: int = MAX_NEW_TOKENS_LIMIT,
    add_special_tokens: bool = True,
) -> list[int]:
    """``prompt``'s token ids, once it is known to be text of an allowed length and to leave room
    for ``params.max_new_tokens`` in the window (else a :class:`GenerationError` says why)."""
    if not isinstance(prompt, str):
        raise GenerationError("the prompt must be text")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise GenerationError(f"the prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}")
    ids = list(tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids)
    check_max_new_tokens(params.max_new_tokens, context_window(model), len(ids), max_new_tokens_cap)
    return ids


def cut_at_stop(text: str, stop_strings: Sequence[str], final: bool = False) -> tuple[str, bool]:
    """Text safe to show: cut at a stop string (second value True), or without a trailing partial
    match that may still become one (unless ``final``)."""
    for stop in stop_strings:
        index = text.find(stop)
        if index >= 0:
            return text[:index].rstrip(), True
    if final:
        return text.rstrip() if stop_strings else text, False
    hold = 0
    for stop in stop_strings:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return (text[:-hold] if hold else text), False


def generation_failure(exc: BaseException) -> Exception:
    """``exc`` (raised while generating) as a :class:`GenerationError` that says what to do."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return GenerationError(
            "the GPU ran out of memory while generating: lower max_new_tokens or the GPU budget"
        )
    if isinstance(exc, MemoryError):
        return GenerationError("RAM ran out while generating: lower max_new_tokens or the cpu budget")
    if isinstance(exc, Exception):
        return GenerationError(f"generation failed: {type(exc).__name__}: {exc}")
    return GenerationError(f"generation was interrupted ({type(exc).__name__})")
