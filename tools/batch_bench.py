"""Concurrency benchmark: N replies at once (continuous batching) against the same N one at a time.

    python -m tools.bench --build opt-1.3b --max-memory cpu=1GiB --tokens 30 --concurrency 1,2,4,8

For each level N, N greedy requests (prompts of different lengths) are submitted at once to one
:class:`~optdemo.manager.ModelManager`, and the same N are run one after another, all submitted
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

from optdemo.budget import parse_max_memory
from optdemo.config import LoadConfig
from optdemo.generation import GenerationParams, GenerationUpdate
from optdemo.manager import ModelManager
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
) -> tuple[dict, list[str]]:
    """The requests in turn, all asked at the start: each one's first token counts its wait."""
    started = time.perf_counter()
    ttfts, texts, tokens = [], [], 0
    for prompt in prompts:
        first = None
        last: GenerationUpdate | None = None
        for update in manager.stream_completion(prompt, params):
            if first is None and update.text:
                first = time.perf_counter() - started
            last = update
        assert last is not None and last.stats is not None
        ttfts.append(first if first is not None else time.perf_counter() - started)
        texts.append(last.text)
        tokens += last.stats.new_tokens
    return _level(ttfts, tokens, time.perf_counter() - started), texts


def at_once(
    manager: ModelManager, prompts: Sequence[str], params: GenerationParams
) -> tuple[dict, list[str]]:
    """The requests together (each in its own thread, as each visitor's is)."""
    finals: list[GenerationUpdate | None] = [None] * len(prompts)
    firsts: list[float | None] = [None] * len(prompts)
    started = time.perf_counter()

    def run(index: int) -> None:
        for update in manager.stream_completion(prompts[index], params):
            if firsts[index] is None and update.text:
                firsts[index] = time.perf_counter() - started
            finals[index] = update

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    assert all(f is not None and f.stats is not None for f in finals), "a request failed"
    tokens = sum(f.stats.new_tokens for f in finals)  # type: ignore[union-attr]
    ttfts = [f if f is not None else seconds for f in firsts]
    level = _level(ttfts, tokens, seconds)
    level["batch_sizes"] = [f.stats.batch_size for f in finals]  # type: ignore[union-attr]
    return level, [f.text for f in finals]  # type: ignore[union-attr]


def run_concurrency(model: Path, max_memory: str, dtype: str, tokens: int, levels: Sequence[int]) -> dict:
    """Load ``model`` once (in a temporary offload folder) and measure every level."""
    manager = ModelManager(max_batch=max(levels))
    with tempfile.TemporaryDirectory(prefix="optdemo-bench-offload-") as offload:
        config = LoadConfig(
            str(model), dtype=dtype, max_memory=parse_max_memory(max_memory), offload_folder=offload
        )
        report = manager.load(config)
        params = GenerationParams(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
        list(manager.stream_completion("warm-up", GenerationParams(max_new_tokens=2, temperature=0)))
        results = []
        for level in levels:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(level)]
            baseline, solo_texts = one_at_a_time(manager, prompts, params)
            batched, batch_texts = at_once(manager, prompts, params)
            speedup = batched["tokens_per_s"] / baseline["tokens_per_s"] if baseline["tokens_per_s"] else None
            results.append(
                {
                    "concurrency": level,
                    "one_at_a_time": baseline,
                    "batched": batched,
                    "speedup": speedup,
                    "identical_to_solo": batch_texts == solo_texts,
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
        "batch_room": plan.batch.to_dict() if plan is not None and plan.batch is not None else None,
        "levels": results,
    }


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
