"""Concurrency benchmark: N replies at once (continuous batching) against the same N one at a time.

    python -m tools.bench --build opt-1.3b --max-memory cpu=1GiB --tokens 30 --concurrency 1,2,4,8

For each level N, N greedy requests (prompts of different lengths) are submitted at once to one
:class:`~optdemo.runtime.manager.ModelManager`, and the same N are run one after another, all submitted
at the same moment too (so the last one waits behind N-1 replies, as it did before batching).
Reported per level: aggregate tokens/s, time to first token p50/p95 (from submission), the
speedup, and whether every batched reply is token-for-token its one-at-a-time reply.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from optdemo.core.budget import parse_max_memory
from optdemo.core.generation import GenerationParams, GenerationUpdate
from optdemo.core.load_config import LoadConfig
from optdemo.runtime.manager import ModelManager
from tools.loadtest import _percentile

PROMPTS = (
    "The history of large language models began",
    "Hi",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "Why is offloading slow?",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12",
    "The quick brown fox",
    "Tell me about the printing press and how it changed Europe in the fifteenth century",
    "What is the capital of France?",
)


def _level(ttfts: list[float], tokens: int, seconds: float) -> dict:
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else None,
        "ttft_p50_s": _percentile(ttfts, 50),
        "ttft_p95_s": _percentile(ttfts, 95),
    }


def one_at_a_time(
    manager: ModelManager, prompts: Sequence[str], params: GenerationParams
) -> tuple[dict, list[tuple[int, ...]]]:
    """The requests in turn, all asked at the start: each one's first token counts its wait."""
    started = time.perf_counter()
    ttfts, replies, tokens = [], [], 0
    for prompt in prompts:
        asked = time.perf_counter() - started  # how long it waited behind the earlier replies
        *_, last = manager.stream_completion(prompt, params)
        stats = last.stats
        assert stats is not None and stats.time_to_first_token is not None
        ttfts.append(asked + stats.time_to_first_token)
        replies.append(last.token_ids)
        tokens += stats.new_tokens
    return _level(ttfts, tokens, time.perf_counter() - started), replies


def at_once(
    manager: ModelManager, prompts: Sequence[str], params: GenerationParams
) -> tuple[dict, list[tuple[int, ...]]]:
    """The requests together (each in its own thread, as each visitor's is), all in line before
    the first starts; like :func:`one_at_a_time`, returns the level's figures and each reply's
    token ids. Times to first token count from each request's submission (the engine's
    own stats), so they include the few milliseconds the others took to line up."""
    finals: list[GenerationUpdate | None] = [None] * len(prompts)

    def run(index: int) -> None:
        *_, finals[index] = manager.stream_completion(prompts[index], params)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    manager.engine.hold()  # all N in line before the first starts: they arrive "at once"
    try:
        for thread in threads:
            thread.start()
        while manager.engine.counts()[1] < len(prompts):
            time.sleep(0.001)
    finally:
        manager.engine.release()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    stats = [final.stats for final in finals if final is not None and final.stats is not None]
    assert len(stats) == len(prompts), "a request failed"
    # Each request's own time to its first token (the engine times it from its submission).
    level = _level(
        [s.time_to_first_token or seconds for s in stats], sum(s.new_tokens for s in stats), seconds
    )
    level["batch_sizes"] = [s.batch_size for s in stats]
    return level, [final.token_ids for final in finals if final is not None]


def run_concurrency(model: Path, max_memory: str, dtype: str, tokens: int, levels: Sequence[int]) -> dict:
    """Load ``model`` once (in a temporary offload folder) and measure every level."""
    manager = ModelManager(max_batch=max(levels))
    with tempfile.TemporaryDirectory(prefix="optdemo-bench-offload-") as offload:
        config = LoadConfig(
            str(model), dtype=dtype, max_memory=parse_max_memory(max_memory), offload_folder=offload
        )
        report = manager.load(config)
        params = GenerationParams(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
        # Untimed: one pass of each kind at the largest level, so kernels built on first use for a
        # shape (oneDNN, the allocator) do not count against whichever side runs first.
        widest = [PROMPTS[i % len(PROMPTS)] for i in range(max(levels))]
        one_at_a_time(manager, widest, params)
        at_once(manager, widest, params)
        results = []
        for level in levels:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(level)]
            baseline, solo_replies = one_at_a_time(manager, prompts, params)
            batched, batch_replies = at_once(manager, prompts, params)
            speedup = batched["tokens_per_s"] / baseline["tokens_per_s"] if baseline["tokens_per_s"] else None
            results.append(
                {
                    "concurrency": level,
                    "one_at_a_time": baseline,
                    "batched": batched,
                    "speedup": speedup,
                    "identical_to_solo": batch_replies == solo_replies,
                    "identical_replies": sum(
                        a == b for a, b in zip(batch_replies, solo_replies, strict=True)
                    ),
                    "first_difference": [
                        _first_difference(a, b) for a, b in zip(batch_replies, solo_replies, strict=True)
                    ],
                    "token_ids": {"one_at_a_time": solo_replies, "batched": batch_replies},
                }
            )
        plan = manager.status().plan
        manager.unload()
    return {
        "model": str(model),
        "max_memory": max_memory,
        "dtype": dtype,
        "tokens": tokens,
        "device_map_devices": sorted({str(d) for d in report.device_map.values()}),
        "device_map": {name: str(device) for name, device in report.device_map.items()},
        "batch_room": plan.batch.to_dict() if plan is not None and plan.batch is not None else None,
        "levels": results,
    }


def _first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first token position where two replies differ (None: identical)."""
    if list(a) == list(b):
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def format_levels(result: dict) -> str:
    """A table for people: one row per level."""
    lines = [
        "level  one-at-a-time tok/s  batched tok/s  speedup  "
        "TTFT p50/p95 (alone)  TTFT p50/p95 (batched)  same"
    ]
    for row in result["levels"]:
        base, batch = row["one_at_a_time"], row["batched"]
        lines.append(
            f"{row['concurrency']:>5}  {base['tokens_per_s']:>19.2f}  {batch['tokens_per_s']:>13.2f}  "
            f"{row['speedup']:>6.2f}x  {base['ttft_p50_s']:>9.2f}/{base['ttft_p95_s']:<9.2f}   "
            f"{batch['ttft_p50_s']:>9.2f}/{batch['ttft_p95_s']:<9.2f}     {row['identical_to_solo']}"
        )
    return "\n".join(lines)
