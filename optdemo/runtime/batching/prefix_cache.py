"""Prompts' key/value caches kept after their reply, so the next prompt that starts with the same
tokens computes only the rest (as llama.cpp's ``cache_prompt`` and vLLM's prefix caching do).

A chat resends the whole conversation every turn; its prompt starts with the previous turn's
prompt, token for token. Each prompt's cache (the key and value rows its prefill computed, per
layer) is kept, keyed by its token ids, in a *scope* (a browser session, an API client, the
OpenAI API); a new prompt reuses the longest common token prefix with the entries of its scope.
Only rows a prompt computed are kept, never a reply's (decoding steps may use another kernel than
prompts do), and a prefix is reused only when the ids match exactly, so an edited conversation
(undo, retry, another system prompt) simply matches less. With the engine's canonical kernels
(:mod:`optdemo.runtime.batching.kernels`, :mod:`optdemo.runtime.batching.exact_attention`) the
reused rows are the very bits a full prefill computes, so replies are the same with or without.

Entries live within a byte budget (the plan's KV cache room less what the running replies may
need) and the least recently used go first. A new prompt that extends an entry of its scope
replaces it. Everything is dropped when the model is unloaded or replaced.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Layers = list[tuple["torch.Tensor", "torch.Tensor"]]  # per layer: keys and values [1, heads, tokens, dim]
MIN_REUSE_TOKENS = 16  # a shorter common prefix is not worth the bookkeeping
MAX_ENTRIES = 256  # scanned per lookup; far more than the budget usually holds


@dataclass
class _Entry:
    scope: str
    ids: tuple[int, ...]
    layers: Layers
    nbytes: int
    used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class PrefixHit:
    """What a lookup found: how many leading tokens are cached, and their rows (views)."""

    tokens: int
    layers: Layers


@dataclass(frozen=True)
class CacheCounts:
    """The cache's content for /status and the plan."""

    entries: int
    bytes: int
    budget_bytes: int
    hits: int
    reused_tokens: int

    def to_dict(self) -> dict:
        """Plain data for /status."""
        return {
            "entries": self.entries,
            "bytes": self.bytes,
            "budget_bytes": self.budget_bytes,
            "hits": self.hits,
            "reused_tokens": self.reused_tokens,
        }


def common_prefix(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    count = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        count += 1
    return count


class PrefixCache:
    """Prompt caches by scope and token ids, within a byte budget; thread-safe."""

    def __init__(self, budget_bytes: int = 0) -> None:
        self.budget_bytes = budget_bytes
        self._entries: list[_Entry] = []
        self._lock = threading.Lock()
        self._hits = 0
        self._reused = 0

    def lookup(self, scope: str | None, ids: list[int]) -> PrefixHit | None:
        """The longest cached prefix of ``ids`` in ``scope`` (leaving at least one token to compute,
        since the reply's first token needs the prompt's last position), or None."""
        if scope is None or self.budget_bytes <= 0:
            return None
        with self._lock:
            best, length = None, 0
            for entry in self._entries:
                if entry.scope == scope:
                    shared = min(common_prefix(entry.ids, ids), len(ids) - 1)
                    if shared > length:
                        best, length = entry, shared
            if best is None or length < MIN_REUSE_TOKENS:
                return None
            best.used = time.monotonic()
            self._hits += 1
            self._reused += length
        return PrefixHit(length, [(k[:, :, :length], v[:, :, :length]) for k, v in best.layers])

    def store(
        self, scope: str | None, ids: list[int], layers: Layers, one_conversation: bool = False
    ) -> None:
        """Keep a prompt's computed rows (``layers`` covers exactly ``ids``), replacing the scope's
        entries it extends (with ``one_conversation``, every other entry of the scope: it holds one
        conversation, and an edited one does not come back), then evicting the least recently used
        beyond the budget."""
        if scope is None or self.budget_bytes <= 0 or len(ids) < MIN_REUSE_TOKENS:
            return
        nbytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if nbytes > self.budget_bytes:
            return
        key = tuple(ids)
        with self._lock:
            self._entries = [
                e
                for e in self._entries
                if e.scope != scope or not (one_conversation or key[: len(e.ids)] == e.ids)
            ]
            self._entries.append(_Entry(scope, key, layers, nbytes))
            self._evict(self.budget_bytes)

    def shrink(self, budget_bytes: int) -> None:
        """Evict the least recently used entries until the cache fits ``budget_bytes``."""
        with self._lock:
            self._evict(budget_bytes)

    def _evict(self, budget: int) -> None:
        self._entries.sort(key=lambda entry: entry.used)
        total = sum(entry.nbytes for entry in self._entries)
        while self._entries and (total > budget or len(self._entries) > MAX_ENTRIES):
            total -= self._entries.pop(0).nbytes

    def clear(self) -> None:
        """Drop every entry (the model they were computed by is going away)."""
        with self._lock:
            self._entries.clear()

    def counts(self) -> CacheCounts:
        """How many entries and bytes are kept, and how often they served."""
        with self._lock:
            return CacheCounts(
                len(self._entries),
                sum(entry.nbytes for entry in self._entries),
                self.budget_bytes,
                self._hits,
                self._reused,
            )
