"""Prompt caches kept between requests: the longest common token prefix of a scope is reused, the
rest computed; replies are token for token what they are with reuse off, alone and batched, in
float32, bfloat16 and float16; entries stay within their budget and die with the model."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from optdemo.core.generation import CacheScope, GenerationParams, GenerationStats
from optdemo.core.load_config import LoadConfig
from optdemo.runtime.batching.prefix_cache import MIN_REUSE_TOKENS, PrefixCache, common_prefix
from optdemo.runtime.manager import ModelManager

GREEDY = GenerationParams(max_new_tokens=12, temperature=0)
TURNS = [
    "Hello, who are you and what can you do for me today?",
    "What is the capital of France, and what is it famous for?",
    "Tell me more about its museums, please.",
]


def layers(length: int, fill: float = 1.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.full((1, 2, length, 4), fill), torch.full((1, 2, length, 4), -fill)) for _ in range(3)]


def entry_bytes(length: int) -> int:
    return 3 * 2 * (2 * length * 4) * 4


# ---------------------------------------------------------------------------------- the store
def test_the_longest_common_prefix_of_the_scope_is_found_and_one_token_left_to_compute() -> None:
    cache = PrefixCache(budget_bytes=10**6)
    first, second = list(range(100, 140)), list(range(100, 130)) + list(range(500, 520))
    cache.store("a", first, layers(40, 1.0))
    cache.store("a", second, layers(50, 2.0))
    hit = cache.lookup("a", [*list(range(100, 135)), 9])
    assert hit is not None and hit.tokens == 35  # the first entry shares 35, the second 30
    assert hit.layers[0][0].shape[2] == 35 and float(hit.layers[0][0][0, 0, 0, 0]) == 1.0
    exact = cache.lookup("a", first)  # the whole prompt cached: its last token is computed again
    assert exact is not None and exact.tokens == len(first) - 1
    assert cache.lookup("b", first) is None  # another scope sees nothing
    assert cache.lookup("a", [*list(range(100, 100 + MIN_REUSE_TOKENS - 1)), 7]) is None  # too short
    assert cache.lookup(None, first) is None
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2


def test_an_extended_prompt_replaces_its_entry_and_a_conversation_keeps_one() -> None:
    cache = PrefixCache(budget_bytes=10**6)
    cache.store("openai", list(range(30)), layers(30))
    cache.store("openai", list(range(50)), layers(50))  # extends it: replaces it
    cache.store("openai", [*range(20), *range(900, 930)], layers(50))  # another branch: kept
    assert cache.counts().entries == 2
    cache.store("chat:s", list(range(40)), layers(40), one_conversation=True)
    cache.store("chat:s", [*range(10), *range(700, 730)], layers(40), one_conversation=True)  # edited
    assert cache.counts().entries == 3  # the chat keeps only its newest prompt
    assert cache.lookup("chat:s", list(range(40))) is None


def test_entries_stay_within_the_budget_least_recently_used_first() -> None:
    cache = PrefixCache(budget_bytes=3 * entry_bytes(20))
    for scope in "abc":
        cache.store(scope, list(range(20)), layers(20))
    assert cache.lookup("a", [*range(20), 5]) is not None  # "a" is now the most recently used
    cache.store("d", list(range(20)), layers(20))
    counts = cache.counts()
    assert (counts.entries, counts.bytes) == (3, 3 * entry_bytes(20))
    assert cache.lookup("b", [*range(20), 5]) is None  # the least recently used went
    assert cache.lookup("a", [*range(20), 5]) is not None
    cache.store("e", list(range(100)), layers(100))  # larger than the budget: never kept
    assert cache.counts().entries == 3
    cache.shrink(entry_bytes(20))
    assert cache.counts().entries == 1
    cache.clear()
    assert cache.counts().entries == 0
    assert PrefixCache(budget_bytes=0).lookup("a", list(range(30))) is None  # no room: off


# ---------------------------------------------------------------------------------- the engine
def converse(manager: ModelManager, scope: CacheScope, turns: list[str] = TURNS) -> list[tuple]:
    """A greedy chat, each turn resent whole: (reply tokens, stats) per turn."""
    history: list[tuple[str, str]] = []
    results = []
    for message in turns:
        *_, last = manager.stream_chat(history, message, GREEDY, cache_scope=scope)
        results.append((last.token_ids, last.stats))
        history.append((message, last.text))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_a_chat_reuses_its_previous_turn_with_the_same_replies(dtype: str, tiny_model_dir: Path) -> None:
    reusing, plain = ModelManager(), ModelManager(reuse_prompts=False)
    try:
        for manager in (reusing, plain):
            manager.load(LoadConfig(str(tiny_model_dir), dtype=dtype))
        scope = CacheScope("chat:test", one_conversation=True)
        reused = converse(reusing, scope)
        computed = converse(plain, scope)
        assert [ids for ids, _ in reused] == [ids for ids, _ in computed]
        first, *later = [stats for _, stats in reused]
        assert first.cached_tokens == 0 and first.processed_tokens == first.prompt_tokens
        for stats in later:
            assert stats.cached_tokens >= MIN_REUSE_TOKENS
            assert stats.processed_tokens == stats.prompt_tokens - stats.cached_tokens > 0
            assert f"reused {stats.cached_tokens} cached tokens" in stats.summary()
        assert all(stats.cached_tokens == 0 for _, stats in computed)
        counts = reusing.status().prefix_cache
        assert counts is not None and counts.entries == 1 and counts.hits == 2 and counts.bytes > 0
    finally:
        reusing.unload()
        plain.unload()
    assert reusing.engine.prefix_cache.counts().entries == 0  # gone with the model


@pytest.mark.slow
def test_replies_batched_with_reuse_are_those_computed_alone_without(tiny_model_dir: Path) -> None:
    """Three conversations at once, each resending its history: the same tokens as each alone with
    reuse off, and the joining requests' reused prefixes are not computed again."""
    reusing, plain = ModelManager(), ModelManager(reuse_prompts=False)
    try:
        for manager in (reusing, plain):
            manager.load(LoadConfig(str(tiny_model_dir)))
        scopes = [CacheScope(f"chat:{i}", one_conversation=True) for i in range(3)]
        expected = [converse(plain, scope, TURNS[i:] + TURNS[:i]) for i, scope in enumerate(scopes)]
        got: list[list[tuple]] = [[] for _ in scopes]

        def run(index: int) -> None:
            got[index] = converse(reusing, scopes[index], TURNS[index:] + TURNS[:index])

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert [[ids for ids, _ in chat] for chat in got] == [[ids for ids, _ in chat] for chat in expected]
        stats: list[GenerationStats] = [s for chat in got for _, s in chat[1:]]
        assert all(s.cached_tokens >= MIN_REUSE_TOKENS for s in stats)
        assert max(s.batch_size or 1 for chat in got for _, s in chat) > 1  # they did share the model
    finally:
        reusing.unload()
        plain.unload()
