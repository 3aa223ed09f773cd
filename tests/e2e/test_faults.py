"""Faults and steadiness: full or vanishing offload disk, unreachable Hub, client disconnects,
memory that stays flat over load/unload cycles, and a concurrent load test over loopback."""

from __future__ import annotations

import errno
import gc
import shutil
import threading
import time

import psutil
import pytest

from optdemo.core.errors import LoadError, OptdemoError
from optdemo.core.generation import GenerationParams
from optdemo.core.load_config import LoadConfig
from tools.loadtest import LoadTestResult, check_loopback, run_load_test

SPLIT = "cpu=700KiB"
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors 0.8
GREEDY = GenerationParams(max_new_tokens=8, temperature=0)


def _answers(manager) -> str:
    *_, last = manager.stream_completion("Hello", GREEDY)
    return last.text


def _generate_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "optdemo-generate" and t.is_alive()]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failure", "expected"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "disk filled up"),
        ("safetensors-full", "disk filled up"),  # what safetensors really raises: not an OSError
        ("vanish", "vanished"),
    ],
)
def test_offload_disk_fault_mid_load_keeps_previous_model(
    failure, expected, manager, tiny_model_dir, tiny_bin_model_dir, tmp_path, monkeypatch
):
    import transformers.integrations.accelerate as hf_accelerate

    manager.load(LoadConfig(str(tiny_model_dir)))
    before = _answers(manager)
    offload = tmp_path / "offload"

    def failing_save(tensors, filename, *args, **kwargs):
        if failure == "safetensors-full":
            from safetensors import SafetensorError

            raise SafetensorError(DISK_FULL)
        if failure == "vanish":
            shutil.rmtree(offload, ignore_errors=True)
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(filename))
        raise failure

    monkeypatch.setattr(hf_accelerate, "save_file", failing_save)
    plain = LoadConfig(
        str(tiny_bin_model_dir), max_memory=SPLIT, offload_folder=str(offload), fast_offload=False
    )
    with pytest.raises(LoadError) as caught:
        manager.load(plain)
    message = str(caught.value)
    assert expected in message and "Traceback" not in message
    assert "loaded again" in message
    assert manager.status().config == LoadConfig(str(tiny_model_dir))
    assert _answers(manager) == before
    assert not _generate_threads()


@pytest.mark.slow
def test_full_disk_during_conversion_is_not_a_corrupt_checkpoint(
    manager, tiny_model_dir, tiny_bin_model_dir, fresh_cache, tmp_path, monkeypatch
):
    """Converting a .bin checkpoint for fast offloading writes safetensors into the conversion
    cache; safetensors reports a full disk as a SafetensorError, which once read as a corrupt
    checkpoint ("save the model again"). It is a full disk, said with the room needed, and the
    half-written conversion is removed."""
    import safetensors.torch
    from safetensors import SafetensorError

    from optdemo.weights import convert

    manager.load(LoadConfig(str(tiny_model_dir)))
    before = _answers(manager)

    def full(tensors, filename, metadata=None):
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(LoadError) as caught:
        manager.load(
            LoadConfig(str(tiny_bin_model_dir), max_memory=SPLIT, offload_folder=str(tmp_path / "off"))
        )
    message = str(caught.value)
    assert f"the disk at {convert.converted_root()} is full" in message
    assert "the conversion needs about" in message and "OPTDEMO_CACHE" in message
    assert "corrupt" not in message and "save the model again" not in message
    assert "loaded again" in message
    assert not list(convert.converted_root().glob(".converting-*"))
    assert convert.interrupted_conversions() == []
    assert manager.status().config == LoadConfig(str(tiny_model_dir))
    assert _answers(manager) == before


@pytest.mark.slow
def test_unreachable_hub_is_refused_before_unloading(manager, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    manager.load(LoadConfig(str(tiny_model_dir)))
    with pytest.raises(OptdemoError) as caught:
        manager.load(LoadConfig("facebook/opt-125m"))
    assert "cannot reach the Hugging Face Hub" in str(caught.value)
    assert manager.status().config == LoadConfig(str(tiny_model_dir))
    assert _answers(manager)


@pytest.mark.slow
def test_memory_stays_flat_over_six_load_unload_cycles(tmp_path_factory):
    """A 270 MB model loaded and unloaded six times (alternating RAM and RAM+disk placements):
    resident memory after each load stays within a few percent of the first."""
    from optdemo.models.synthetic import build_random_opt
    from optdemo.runtime.manager import ModelManager

    model_dir = build_random_opt(
        tmp_path_factory.mktemp("cycles"), "opt-125m", overrides={"num_hidden_layers": 4}, dtype="float32"
    )
    offload = tmp_path_factory.mktemp("cycles-offload")
    configs = [
        LoadConfig(str(model_dir)),
        LoadConfig(str(model_dir), max_memory="cpu=200MiB", offload_folder=str(offload)),
    ]
    manager = ModelManager()
    process = psutil.Process()
    resident = []
    try:
        for cycle in range(6):
            manager.load(configs[cycle % 2])
            _answers(manager)
            assert manager.unload()
            gc.collect()
            resident.append(process.memory_info().rss)
    finally:
        manager.unload()
    first = resident[0]
    assert max(resident[1:]) <= first * 1.05, [f"{r / 2**20:.0f} MiB" for r in resident]


def test_latency_percentiles_interpolate_between_ranks():
    result = LoadTestResult(1, 4, latencies=[4.0, 1.0, 3.0, 2.0])
    assert result.p50 == 2.5
    assert result.p95 == pytest.approx(3.85)  # 3 + 0.85 of the way to 4
    assert LoadTestResult(1, 1, latencies=[2.0]).p95 == 2.0
    assert LoadTestResult(1, 1).p50 is None and LoadTestResult(1, 1).p95 is None
    assert "p50 2.50s, p95 3.85s" in result.summary()


def test_loopback_only():
    check_loopback("http://127.0.0.1:7860/")
    check_loopback("http://localhost:7860/")
    for url in ("http://10.0.0.1:7860/", "http://192.168.1.2/", "http://8.8.8.8/"):
        with pytest.raises(ValueError, match="only loopback"):
            check_loopback(url)


@pytest.mark.slow
def test_concurrent_clients_all_complete_in_order():
    from app_fixtures import running_app

    with running_app(["--model", "tiny-opt", "--max-memory", "cpu=1GiB"]) as app:
        app.service.manager.load(app.service.initial_config())
        result = run_load_test(app.url, clients=4, messages=2, max_new_tokens=6, deadline_seconds=180)
    assert result.failed == 0, result.errors
    assert result.completed == 8
    # Every message was answered once, and each session's answers came in the order they were sent.
    assert sorted(result.answered) == [(client, turn) for client in range(4) for turn in range(2)]
    for client in range(4):
        assert [turn for c, turn in result.answered if c == client] == [0, 1]
    assert result.p50 is not None and result.p95 >= result.p50 > 0
    # The aggregate's time runs from the first request to the last reply: no longer than the whole
    # run (which includes connecting), no shorter than the slowest request.
    assert max(result.latencies) <= result.span_seconds <= result.seconds
    assert sorted(result.replies) == [f"{c}/{t}" for c in range(4) for t in range(2)]
    assert all(isinstance(text, str) for text in result.replies.values())


@pytest.mark.slow
def test_client_disconnect_mid_stream_stops_generation():
    from app_fixtures import running_app

    with running_app(["--model", "tiny-opt", "--max-memory", "cpu=1GiB"]) as app:
        app.service.manager.load(app.service.initial_config())
        client = app.client()
        job = client.submit("Tell me a long story", 400, 0.7, 0.9, api_name="/chat")
        deadline = time.monotonic() + 60
        while not job.outputs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.outputs(), "no streamed output arrived"
        job.cancel()
        client.close()
        deadline = time.monotonic() + 20
        while (_generate_threads() or app.service.manager.status().busy) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _generate_threads()
        assert app.service.manager.status().busy is None
        # The app still serves: a new session chats at once.
        assert app.client().predict("What is the capital of France?", 12, 0.0, 0.9, api_name="/chat")


@pytest.mark.slow
def test_planning_while_loading_does_not_corrupt_model_construction(manager, tiny_model_dir):
    """transformers builds models under process-wide patches (default dtype, tie_weights, init
    functions). Plans previewed in one thread while another thread loads must leave every loaded
    model whole: tied head, no meta weights, and transformers' own methods restored."""
    from transformers import PreTrainedModel

    from optdemo.plan import planner

    original_tie = PreTrainedModel.tie_weights
    stop = threading.Event()
    planned = []

    def keep_planning() -> None:
        while not stop.is_set():
            planner._meta_cache.clear()  # force a fresh construction every time
            planned.append(
                planner.plan_device_map(LoadConfig("opt-1.3b", max_memory="cpu=64GiB")).total_bytes
            )

    thread = threading.Thread(target=keep_planning)
    thread.start()
    try:
        for dtype in ("float32", "bfloat16", "float32", "bfloat16", "float32", "bfloat16"):
            manager.load(LoadConfig(str(tiny_model_dir), dtype=dtype))
            model = manager._loaded.model
            assert model.lm_head.weight is model.model.decoder.embed_tokens.weight
            assert {p.device.type for p in model.parameters()} == {"cpu"}
            assert {str(p.dtype) for p in model.parameters()} == {f"torch.{dtype}"}
    finally:
        stop.set()
        thread.join(60)
    assert planned and set(planned) == {2 * 1315758080}
    assert PreTrainedModel.tie_weights is original_tie
