"""Continuous batching (issue #13): replies decoded together give each the tokens it gets alone.

A tiny random OPT in float32: greedy output must be token-for-token the same alone and in a batch
of 8 prompts of different lengths (in RAM, and offloaded to disk through the normal loader, with
optdemo's fast offload and with Accelerate's hooks); seeded sampling too; Stop, a closed stream
and the batch limit change nobody else's reply; the KV cache is accounted in the plan.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import TINY_TOTAL_BYTES

from optdemo.core.budget import parse_max_memory
from optdemo.core.errors import GenerationError
from optdemo.core.generation import GenerationParams, GenerationUpdate
from optdemo.core.load_config import LoadConfig
from optdemo.plan.kv_room import batch_in_force, batch_room, kv_bytes_per_token
from optdemo.plan.planner import plan_device_map
from optdemo.runtime.manager import ModelManager

pytestmark = pytest.mark.slow

# Eight prompts of different lengths (2 to 20-odd tokens).
PROMPTS = (
    "Hi",
    "The quick brown fox",
    "Once upon a time there was",
    "Why is offloading slow when the weights live on disk?",
    "A",
    "Tell me about the history of the printing press in Europe",
    "Numbers: 1 2 3 4 5 6 7 8 9",
    "What is the capital of France? It is",
)
# A repetition penalty keeps the random model's greedy output varied.
GREEDY = GenerationParams(max_new_tokens=24, temperature=0, repetition_penalty=1.3)
SPLIT = "cpu=700KiB"  # the tiny model: embeddings and a layer in RAM, five layers on disk

Job = tuple[str, GenerationParams]


def solo(manager: ModelManager, prompt: str, params: GenerationParams) -> list[GenerationUpdate]:
    """One request alone (nothing else running)."""
    assert manager.engine.counts() == (0, 0)
    return list(manager.stream_completion(prompt, params))


def together(
    manager: ModelManager,
    jobs: list[Job],
    on_update: Callable[[int, GenerationUpdate, threading.Event], None] | None = None,
) -> list[list[GenerationUpdate]]:
    """Queue every job while the engine admits nobody, then let them all start at once (in
    order); returns each job's updates. ``on_update(index, update, stop_event)`` sees each."""
    results: list[list[GenerationUpdate]] = [[] for _ in jobs]
    failures: dict[int, GenerationError] = {}
    manager.engine.hold()
    threads = []
    try:
        for index, (prompt, params) in enumerate(jobs):
            stop = threading.Event()

            def consume(index: int = index, prompt: str = prompt, params=params, stop=stop) -> None:
                try:
                    for update in manager.stream_completion(prompt, params, stop):
                        results[index].append(update)
                        if on_update:
                            on_update(index, update, stop)
                except GenerationError as exc:
                    failures[index] = exc

            threads.append(threading.Thread(target=consume))
            threads[-1].start()
            wait_until(lambda index=index: manager.engine.counts()[1] == index + 1)  # queued in order
    finally:
        manager.engine.release()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    for index, exc in failures.items():
        results[index] = [exc]  # type: ignore[list-item]
    return results


def wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def texts(updates: list[GenerationUpdate]) -> list[str]:
    return [u.text for u in updates if not u.status]


@pytest.mark.parametrize(
    "where",
    ["ram", "ram, bfloat16", "ram, 4bit", "disk (fast offload)", "disk (Accelerate hooks)"],
)
def test_greedy_output_is_the_same_alone_and_in_a_batch_of_eight(where, manager, tiny_model_dir, tmp_path):
    """Token for token, alone and among seven others, wherever the layers are and in the dtypes
    whose kernels round differently by row count (bfloat16's one-row product: padded to two rows,
    optdemo.runtime.batching.kernels) or not at all (the int8/int4 kernels)."""
    config = LoadConfig(str(tiny_model_dir))
    if where == "ram, bfloat16":
        config = LoadConfig(str(tiny_model_dir), dtype="bfloat16")
    if where == "ram, 4bit":
        config = LoadConfig(str(tiny_model_dir), quantization="4bit")
    if where.startswith("disk"):
        config = LoadConfig(
            str(tiny_model_dir),
            max_memory=parse_max_memory(SPLIT),
            offload_folder=str(tmp_path),
            fast_offload=where == "disk (fast offload)",
        )
    manager.load(config)
    if where.startswith("disk"):
        assert "disk" in manager.status().device_map.values()
    alone = [solo(manager, prompt, GREEDY) for prompt in PROMPTS]
    batched = together(manager, [(prompt, GREEDY) for prompt in PROMPTS])
    for one, many in zip(alone, batched, strict=True):
        assert one[-1].token_ids == many[-1].token_ids  # token for token
        assert len(many[-1].token_ids) == many[-1].stats.new_tokens > 0
        assert one[-1].text == many[-1].text and one[-1].text
        assert one[-1].stats.batch_size == 1
        assert many[-1].stats.batch_size == len(PROMPTS)  # all eight decoded together
        assert texts(many)[-1] == many[-1].text


def test_seeded_sampling_is_the_same_alone_and_batched(manager, tiny_model_dir):
    manager.load(LoadConfig(str(tiny_model_dir)))
    jobs = [
        (
            prompt,
            GenerationParams(
                max_new_tokens=20, temperature=t, top_p=p, top_k=k, repetition_penalty=r, seed=s
            ),
        )
        for prompt, t, p, k, r, s in [
            ("Hello there", 1.0, 1.0, 0, 1.0, 1),
            ("Hello there", 1.0, 1.0, 0, 1.0, 2),
            ("Once upon a time", 0.7, 0.9, 50, 1.1, 7),
            ("The quick brown fox", 1.5, 0.8, 20, 1.2, 3),
        ]
    ]
    alone = [solo(manager, *job)[-1].token_ids for job in jobs]
    batched = [updates[-1].token_ids for updates in together(manager, jobs)]
    assert alone == batched
    assert alone[0] != alone[1]  # the seed matters


def test_stop_ends_only_that_reply(manager, tiny_model_dir):
    manager.load(LoadConfig(str(tiny_model_dir)))
    long = GenerationParams(max_new_tokens=400, temperature=1.0, seed=5)
    jobs = [("Hello there", long), *[(prompt, GREEDY) for prompt in PROMPTS[1:4]]]
    alone = [solo(manager, prompt, params)[-1].text for prompt, params in jobs[1:]]

    def stop_first(index: int, update: GenerationUpdate, stop: threading.Event) -> None:
        if index == 0 and update.text:
            stop.set()  # what the Stop button does for this visitor

    results = together(manager, jobs, stop_first)
    stopped = results[0][-1].stats
    assert stopped.stopped is True and 1 <= stopped.new_tokens < 400
    assert [updates[-1].text for updates in results[1:]] == alone
    assert not any(updates[-1].stats.stopped for updates in results[1:])


def test_a_failing_prefill_fails_only_its_own_request(manager, tiny_model_dir, monkeypatch):
    manager.load(LoadConfig(str(tiny_model_dir)))
    jobs = [(prompt, GREEDY) for prompt in PROMPTS[:4]]
    alone = [solo(manager, *job)[-1].text for job in jobs]
    model = manager._loaded.model
    bad_length = len(manager._loaded.tokenizer(PROMPTS[2]).input_ids)
    forward = model.forward

    def failing(input_ids, **kwargs):  # this prompt's prefill runs out of memory
        if input_ids.shape[1] == bad_length:
            raise MemoryError
        return forward(input_ids=input_ids, **kwargs)

    monkeypatch.setattr(model, "forward", failing)
    results = together(manager, jobs)
    failed = results[2][0]
    assert isinstance(failed, GenerationError) and str(failed).startswith("RAM ran out while generating")
    assert [results[i][-1].text for i in (0, 1, 3)] == [alone[i] for i in (0, 1, 3)]
    assert all(results[i][-1].stats.batch_size == 3 for i in (0, 1, 3))


def test_a_closed_stream_frees_its_slot_and_others_go_on(manager, tiny_model_dir):
    manager.load(LoadConfig(str(tiny_model_dir)))
    other = GenerationParams(max_new_tokens=300, temperature=1.0, seed=9)
    expected = solo(manager, "Once upon a time", other)[-1].text
    gone = manager.stream_completion(
        "Hello there", GenerationParams(max_new_tokens=400, temperature=1.0, seed=3)
    )
    first = next(gone)
    assert first.text and manager.engine.counts() == (1, 0)
    result: list[GenerationUpdate] = []
    runner = threading.Thread(
        target=lambda: result.extend(manager.stream_completion("Once upon a time", other))
    )
    runner.start()
    wait_until(lambda: manager.engine.counts()[0] == 2 or bool(result))
    gone.close()  # what gradio does when the visitor leaves
    wait_until(lambda: manager.engine.counts()[0] <= 1, seconds=1.0)  # freed at the next step
    runner.join(30)
    assert result[-1].text == expected and result[-1].stats.stopped is False
    wait_until(lambda: manager.status().busy is None)


def test_requests_beyond_max_batch_wait_in_order_and_are_told_their_place(tiny_model_dir):
    manager = ModelManager(max_batch=2)
    manager.load(LoadConfig(str(tiny_model_dir)))
    try:
        lengths = (8, 60, 30, 10)  # the first ends first: the third starts, then the fourth
        jobs = [
            (prompt, GenerationParams(max_new_tokens=n, temperature=0))
            for prompt, n in zip(PROMPTS[:4], lengths, strict=True)
        ]
        alone = [solo(manager, *job)[-1].text for job in jobs]
        results = together(manager, jobs)
    finally:
        manager.unload()
    assert [updates[-1].text for updates in results] == alone
    statuses = [[u.status for u in updates if u.status] for updates in results]
    assert statuses[0] == statuses[1] == []
    assert [s.split(":")[1].split("(")[0].strip() for s in statuses[2]] == ["number 1 in line"]
    assert [s.split(":")[1].split("(")[0].strip() for s in statuses[3]] == [
        "number 2 in line",
        "number 1 in line",
    ]
    assert statuses[3][0] == (
        "Waiting for the model: number 2 in line (2 replies being written, at most 2 at once)"
    )
    assert all(updates[0].status for updates in results[2:])  # told before any text
    assert all(updates[-1].stats.batch_size == 2 for updates in results)


def test_stop_while_waiting_ends_with_no_tokens(tiny_model_dir):
    manager = ModelManager(max_batch=1)
    manager.load(LoadConfig(str(tiny_model_dir)))
    try:

        def stop_the_waiting_one(index: int, update: GenerationUpdate, stop: threading.Event) -> None:
            if index == 1 and update.status:
                stop.set()

        long = GenerationParams(max_new_tokens=300, temperature=0)
        results = together(manager, [("Hello", long), ("Hi", GREEDY)], stop_the_waiting_one)
    finally:
        manager.unload()
    waited = results[1][-1]
    assert waited.text == "" and waited.stats.new_tokens == 0 and waited.stats.stopped is True
    assert results[0][-1].stats.stopped is False


def test_a_load_stops_every_running_reply_and_says_so(manager, tiny_model_dir):
    manager.load(LoadConfig(str(tiny_model_dir)))
    long = GenerationParams(max_new_tokens=400, temperature=1.0, seed=1)
    updates: list[list[GenerationUpdate]] = [[], [], []]
    threads = [
        threading.Thread(target=lambda i=i: updates[i].extend(manager.stream_completion("Hello", long)))
        for i in range(3)
    ]
    for thread in threads:
        thread.start()
    wait_until(lambda: manager.engine.counts()[0] == 3)
    report = manager.load(LoadConfig(str(tiny_model_dir), max_memory=parse_max_memory("cpu=900KiB")))
    for thread in threads:
        thread.join(10)
    assert report.stopped_generation is True
    assert report.message.endswith("; the 3 replies in progress were stopped to apply it")
    assert all(u[-1].stats.stopped and u[-1].stats.new_tokens < 400 for u in updates)


# ---------------------------------------------------------------------------------- memory
def test_kv_bytes_are_layers_times_two_times_hidden_times_dtype(tiny_model_dir):
    plan = plan_device_map(LoadConfig(str(tiny_model_dir), max_memory=parse_max_memory("cpu=4MiB")))
    room = plan.batch
    assert room is not None
    assert room.bytes_per_token == 6 * 2 * 64 * 4 == 3072  # float32, 6 layers, hidden 64
    assert room.context_length == 512
    assert room.bytes_per_sequence == 3072 * 512 == 1_572_864
    assert room.room_bytes == 4 * 2**20 - TINY_TOTAL_BYTES == 2_731_520
    assert room.sequences == 1
    assert room.text(8) == (
        "KV cache: 1.5 MiB per 512-token sequence; the budget leaves 2.6 MiB next to the weights, "
        "room for 1 such sequence at once (--max-batch 8: 1 decoded together); 1.1 MiB left for "
        "prompt caches (a conversation's next turn reuses them)"
    )
    assert room.prompt_cache_bytes(8) == 2_731_520 - 1_572_864
    from optdemo.web.render import plan_summary  # the Configuration tab's plan summary shows it

    assert room.text() in plan_summary(plan).splitlines()
    assert plan.to_dict()["batch"] == {
        "kv_bytes_per_token": 3072,
        "kv_bytes_per_sequence": 1_572_864,
        "context_length": 512,
        "room_bytes": 2_731_520,
        "sequences": 1,
    }


def test_room_counts_free_ram_beyond_the_cpu_budget_when_weights_spill_to_disk():
    class OptConfig:  # opt-1.3b's shape
        num_hidden_layers = 24
        hidden_size = 2048

    gib = 2**30
    assert kv_bytes_per_token(OptConfig(), 2) == 24 * 2 * 2048 * 2 == 196_608
    in_ram = batch_room(OptConfig(), 2, 2048, {"cpu": 4 * gib}, {"cpu": 3 * gib}, ram_available=10 * gib)
    assert in_ram.room_bytes == gib and in_ram.bytes_per_sequence == 402_653_184
    assert in_ram.sequences == 2  # 1 GiB / 384 MiB
    spilled = batch_room(OptConfig(), 2, 2048, {"cpu": gib}, {"cpu": gib - 100, "disk": 2 * gib}, 5 * gib)
    assert spilled.room_bytes == 100 + 4 * gib and spilled.sequences == 10
    assert batch_in_force(8, in_ram) == 2 and batch_in_force(8, spilled) == 8
    assert batch_in_force(8, batch_room(OptConfig(), 2, 2048, {"cpu": gib}, {"cpu": gib}, 0)) == 1
    assert batch_in_force(3, None) == 3


def test_each_layers_cache_counts_where_the_layer_computes():
    class OptConfig:  # opt-1.3b's shape: 384 MiB per 2048-token sequence in float16
        num_hidden_layers = 24
        hidden_size = 2048

    gib, mib = 2**30, 2**20
    # All on GPU 0: only the GPU's room counts (the unused RAM budget holds no layer's cache).
    on_gpu = batch_room(
        OptConfig(), 2, 2048, {0: 10 * gib, "cpu": 100 * gib}, {0: 3 * gib}, 50 * gib, [0] * 24
    )
    assert on_gpu.room_bytes == 7 * gib and on_gpu.sequences == 7 * gib // (384 * mib) == 18
    # Half the layers on the GPU, half in RAM: each side holds 192 MiB of every sequence, and the
    # tighter side decides (1 GiB on the GPU: 5 sequences; 4 GiB in RAM: 21).
    split = batch_room(
        OptConfig(),
        2,
        2048,
        {0: 2 * gib, "cpu": 8 * gib},
        {0: gib, "cpu": 4 * gib},
        0,
        [0] * 12 + ["cpu"] * 12,
    )
    assert split.room_bytes == 5 * gib and split.sequences == 5
    # Layers on disk compute in RAM: their cache is in RAM, which has the room beyond the budget.
    disk = batch_room(
        OptConfig(),
        2,
        2048,
        {"cpu": gib},
        {"cpu": gib, "disk": 2 * gib},
        3 * gib,
        ["cpu"] * 4 + ["disk"] * 20,
    )
    assert disk.room_bytes == 2 * gib and disk.sequences == 5


def test_the_budget_caps_the_batch_in_force(manager, tiny_model_dir: Path):
    manager.load(LoadConfig(str(tiny_model_dir), max_memory=parse_max_memory("cpu=4MiB")))
    assert manager.engine.limit() == 1  # room for one 512-token sequence only
    results = together(manager, [(prompt, GREEDY) for prompt in PROMPTS[:3]])
    assert all(updates[-1].stats.batch_size == 1 for updates in results)
    manager.load(LoadConfig(str(tiny_model_dir), max_memory=parse_max_memory("cpu=64MiB")))
    assert manager.engine.limit() == 8  # the flag's default


# ---------------------------------------------------------------------------------- end to end
def test_the_concurrency_benchmark_reports_each_level(tiny_model_dir: Path):
    from tools.batch_bench import format_levels, run_concurrency

    result = run_concurrency(tiny_model_dir, SPLIT, "float32", 6, [1, 3])
    assert result["device_map_devices"] == ["cpu", "disk"]
    assert [row["concurrency"] for row in result["levels"]] == [1, 3]
    for row in result["levels"]:
        assert row["identical_to_solo"] is True
        for side in ("one_at_a_time", "batched"):
            assert row[side]["tokens"] == 6 * row["concurrency"]
            assert row[side]["tokens_per_s"] > 0 and row[side]["ttft_p95_s"] >= row[side]["ttft_p50_s"]
    assert result["levels"][1]["batched"]["batch_sizes"] == [3, 3, 3]
    assert format_levels(result).splitlines()[2].split()[0] == "3"


def test_eight_gradio_client_sessions_get_their_solo_greedy_replies():
    from app_fixtures import running_app
    from gradio_client import Client

    prompts = [f"{prompt} (visitor {index})" for index, prompt in enumerate(PROMPTS)]
    greedy = {"max_new_tokens": 80, "temperature": 0.0, "repetition_penalty": 1.3}
    with running_app() as app:
        client = app.client()
        client.predict("tiny-opt", "cpu=1GiB", "auto", "", api_name="/load")
        alone = [client.predict(p, **greedy, api_name="/generate") for p in prompts]
        engine = app.service.manager.engine
        most = [0]
        watching = threading.Event()

        def watch() -> None:  # the most replies decoded together while the clients run
            while not watching.is_set():
                most[0] = max(most[0], engine.counts()[0])
                time.sleep(0.001)

        watcher = threading.Thread(target=watch)
        watcher.start()
        clients = [Client(app.url, verbose=False) for _ in prompts]
        jobs = [c.submit(p, **greedy, api_name="/generate") for c, p in zip(clients, prompts, strict=True)]
        together_ = [job.result(timeout=60) for job in jobs]
        watching.set()
        watcher.join()
    assert together_ == alone and all(alone)
    assert most[0] > 1  # they did share the model


# ---------------------------------------------------------------------------------- the Chat tab
WAITING = "Waiting for the model: number 1 in line (2 replies being written, at most 2 at once)"


def chat_tab_with(updates: list[GenerationUpdate]):
    """A Chat tab over a manager whose every reply streams ``updates``."""
    import gradio as gr
    from app_fixtures import ScriptedManager

    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings
    from optdemo.web.tabs import chat as chat_tab

    class Waiting(ScriptedManager):
        def stream_completion(self, prompt, params, stop_event=None, max_new_tokens_cap=0, cache_scope=None):
            yield from updates

    service = DemoService(Waiting({}), AppSettings(max_batch=2))
    with gr.Blocks():
        tab = chat_tab.layout_chat_tab(service)
    values = {control: control.value for control in tab.controls.all()}
    values.update({tab.message: "Hi", tab.turns: [], tab.system_prompt: "", tab.prompt: "Hi"})
    return service, tab, values


def test_the_chat_tab_shows_the_place_in_line_then_whether_the_reply_shared_the_model():
    from types import SimpleNamespace

    from optdemo.core.generation import GenerationStats
    from optdemo.web.tabs import chat as chat_tab

    stats = GenerationStats(3, 2, 0.5, 0.6, 10.0, batch_size=2)
    updates = [
        GenerationUpdate("", status=WAITING),
        GenerationUpdate("Par"),
        GenerationUpdate("Paris", stats),
    ]
    service, tab, values = chat_tab_with(updates)
    request = SimpleNamespace(session_hash="s")
    steps = list(chat_tab.respond(service, tab, values, request))
    assert steps[0][tab.notice] == chat_tab.BUSY_NOTICE
    assert steps[1] == {tab.notice: WAITING}  # only the notice changes while waiting
    assert steps[2][tab.notice] == chat_tab.BUSY_NOTICE  # its turn came
    assert tab.notice not in steps[3]
    assert steps[-1][tab.turns][0]["stats"] == (
        "2 tokens · first token 0.50 s · 10.0 tokens/s · 0.60 s total · shared the model (batch of up to 2)"
    )
    completion = list(chat_tab.complete(service, tab, values, request))
    assert completion[0] == {tab.completion_stats: WAITING}
    assert completion[-2][tab.completion] == "Paris"
    assert completion[-1] == {tab.serving_line: ""}  # then the serving line, no longer writing it
    # The API streams no waiting steps: only text.
    assert [step.text for step in service.complete("s", "Hi", service.params())] == ["Par", "Paris"]


def test_the_stats_say_whether_a_reply_ran_alone():
    from optdemo.core.generation import GenerationStats

    assert GenerationStats(3, 2, 0.5, 0.6, 10.0, batch_size=1).summary().endswith(" · alone on the model")
    assert "model" not in GenerationStats(3, 2, 0.5, 0.6, 10.0).summary()  # unknown: not said


def test_the_serving_line_counts_replies_running_and_waiting(monkeypatch):
    from types import SimpleNamespace

    from optdemo.web.tabs import chat as chat_tab

    service, tab, _ = chat_tab_with([])
    request = SimpleNamespace(session_hash="s")
    assert chat_tab.refresh_serving_line(service, tab, {}, request) == {tab.serving_line: ""}  # idle
    monkeypatch.setattr(service.manager.engine, "counts", lambda: (2, 3))
    assert chat_tab.refresh_serving_line(service, tab, {}, request) == {
        tab.serving_line: "Writing 2 replies together (at most 8 at once) · 3 waiting"
    }
    monkeypatch.setattr(service.manager.engine, "counts", lambda: (1, 0))
    assert service.serving().summary() == "Writing 1 reply (at most 8 at once)"


# ---------------------------------------------------------------------------------- --max-batch
def test_max_batch_comes_from_the_flag_or_the_environment_and_reaches_the_engine():
    from optdemo.app.settings import parse_settings
    from optdemo.core import defaults
    from optdemo.core.errors import ConfigError
    from optdemo.web.blocks import create_app

    assert parse_settings([], env={}).max_batch == defaults.DEFAULT_MAX_BATCH == 8
    assert parse_settings([], env={"OPTDEMO_MAX_BATCH": "5"}).max_batch == 5
    assert parse_settings(["--max-batch", "3"], env={"OPTDEMO_MAX_BATCH": "5"}).max_batch == 3  # flag wins
    with pytest.raises(ConfigError, match="OPTDEMO_MAX_BATCH must be a whole number"):
        parse_settings([], env={"OPTDEMO_MAX_BATCH": "lots"})
    with pytest.raises(ConfigError, match="--max-batch must be positive, got 0"):
        parse_settings(["--max-batch", "0"], env={})
    demo, service = create_app(parse_settings(["--max-batch", "3"], env={}))
    try:
        assert service.manager.engine.max_batch == 3 and service.manager.engine.limit() == 3
        # Gradio starts every reply at once: the service lets in --queue-size + --max-batch of them.
        replies = [fn for fn in demo.fns.values() if fn.api_name in ("chat", "generate")]
        assert len(replies) == 2 and {fn.concurrency_limit for fn in replies} == {None}
        assert service.admission.limit == defaults.DEFAULT_QUEUE_SIZE + 3
        assert {fn.concurrency_id for fn in replies} == {"replies"}
    finally:
        demo.close()


def test_row_attention_computes_each_padded_row_as_it_would_alone() -> None:
    """A decoding step over a left-padded batch: every row's attention output has the bits of the
    same row computed alone on its own keys (bfloat16, opt-1.3b's 32 heads of 64)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from optdemo.runtime.batching.row_attention import rowwise_sdpa

    class Attention(torch.nn.Module):
        is_causal = True

    module = Attention()
    torch.manual_seed(0)
    lengths, heads, dim = [70, 41, 5, 66], 32, 64
    total = max(lengths)
    keys = [torch.randn(1, heads, n, dim, dtype=torch.bfloat16) for n in lengths]
    values = [torch.randn(1, heads, n, dim, dtype=torch.bfloat16) for n in lengths]
    queries = [torch.randn(1, heads, 1, dim, dtype=torch.bfloat16) for _ in lengths]

    def padded(parts: list) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(p, (0, 0, total - p.shape[2], 0)) for p in parts])

    mask = torch.stack([torch.arange(total) >= total - n for n in lengths])[:, None, None, :]
    out, _ = rowwise_sdpa(module, torch.cat(queries), padded(keys), padded(values), mask, scaling=dim**-0.5)
    for row in range(len(lengths)):
        alone, _ = sdpa_attention_forward(
            module, queries[row], keys[row], values[row], None, scaling=dim**-0.5
        )
        assert torch.equal(out[row : row + 1], alone)
