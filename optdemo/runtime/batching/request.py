"""A reply's request as the batching engine holds it: its prompt, the consumer's side (updates,
stop, gone) and the scheduler's state; and what the engine reports of itself (:class:`Serving`)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from optdemo.core.generation import GenerationParams, GenerationStats
from optdemo.runtime.batching.sampling import Sampler


@dataclass(frozen=True)
class Prompt:
    """A request's prompt as the model sees it, prepared under the model lock."""

    input_ids: list[int]
    stop_strings: tuple[str, ...] = ()  # ends the reply (never shown), besides the params' own
    context_window: int | None = None  # the model's window, for the stats
    dropped_turns: int = 0  # chat: oldest turns left out to fit the window
    cache_scope: str | None = None  # whose prompt caches it may reuse (None: none)
    one_conversation: bool = False  # the scope holds one conversation (a chat session)


@dataclass(frozen=True)
class Serving:
    """What the engine is doing now, for the status line."""

    running: int  # replies being written (decoded together)
    waiting: int  # requests waiting for a place
    limit: int  # the batch size in force

    def summary(self) -> str:
        """e.g. ``Writing 3 replies together (at most 8 at once) · 2 waiting``; empty when idle."""
        if not self.running and not self.waiting:
            return ""
        replies = "1 reply" if self.running == 1 else f"{self.running} replies together"
        line = f"Writing {replies} (at most {self.limit} at once)"
        return line + (f" · {self.waiting} waiting" if self.waiting else "")


# Builds a request's prompt from the loaded model (tokenizer, window); raises GenerationError.
Prepare = Callable[[Any], Prompt]


@dataclass(eq=False)
class Request:
    """One reply: what the consumer asked, and the scheduler's state for it."""

    prepare: Prepare
    params: GenerationParams
    stop_event: threading.Event
    updates: queue.Queue = field(default_factory=queue.Queue)
    gone: threading.Event = field(default_factory=threading.Event)  # the consumer closed the stream
    submitted: float = field(default_factory=time.perf_counter)
    loaded: Any = None  # the LoadedModel it was admitted on
    prompt: Prompt | None = None
    ids: list[int] = field(default_factory=list)  # prompt + generated tokens
    generated: int = 0
    sampler: Sampler | None = None
    text: str = ""
    shown: str = ""
    first_at: float | None = None
    last_at: float | None = None
    peak_batch: int = 1
    cached_tokens: int = 0  # prompt tokens whose cache was reused, not computed
    prompt_seconds: float | None = None  # computing the rest of the prompt (its first token's wait)
    place: int = 0  # place in line last told to the consumer (0: not told yet)
    stop_hit: bool = False
    done: bool = False

    @property
    def stops(self) -> tuple[str, ...]:
        assert self.prompt is not None
        return (*self.prompt.stop_strings, *self.params.stop)

    def final_stats(self, end: float, speculation: dict) -> GenerationStats:
        """What the reply cost, as it ends at ``end`` (perf_counter); ``speculation`` adds a
        draft's figures (drafted, accepted, passes)."""
        first, last = self.first_at, self.last_at
        rate = None
        if self.generated > 1 and first is not None and last is not None and last > first:
            rate = (self.generated - 1) / (last - first)
        prompt = self.prompt
        return GenerationStats(
            prompt_tokens=len(prompt.input_ids) if prompt else 0,
            new_tokens=self.generated,
            time_to_first_token=None if first is None else first - self.submitted,
            total_seconds=end - self.submitted,
            tokens_per_second=rate,
            stopped=self.stop_event.is_set() and not self.stop_hit,
            dropped_turns=prompt.dropped_turns if prompt else 0,
            context_window=prompt.context_window if prompt else None,
            batch_size=self.peak_batch,
            cached_tokens=self.cached_tokens,
            prompt_seconds=self.prompt_seconds,
            **speculation,
        )
