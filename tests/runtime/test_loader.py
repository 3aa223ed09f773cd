"""Loading real (tiny) checkpoints through from_pretrained: the plan is the map, reuse versus
reload, memory really freed, failed loads leave a clean state, and the token never shows."""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import threading
import time
import weakref
from pathlib import Path

import psutil
import pytest
from conftest import GPU_COUNT, TINY_LAYER_BYTES, TINY_TOTAL_BYTES, WHOLE_MODEL_DEVICE

from optdemo.core.budget import describe_gpu_count
from optdemo.core.errors import BudgetError, ConfigError, LoadError, OptdemoError, PlanError
from optdemo.core.generation import GenerationParams
from optdemo.core.load_config import LoadConfig
from optdemo.plan.planner import Plan, plan_device_map
from optdemo.runtime.manager import ModelManager

pytestmark = pytest.mark.slow

KiB = 2**10
GREEDY = GenerationParams(max_new_tokens=8, temperature=0)


def layer_devices(plan: Plan) -> list:
    return [block.device for block in plan.layers]


def find_split_budget(model_dir: Path, **config_fields) -> tuple[LoadConfig, Plan]:
    """The smallest cpu budget (in 50 KiB steps) whose plan puts decoder layers on both the CPU
    and the disk. Accelerate reserves room for the largest layer on the main device, so small
    budgets put everything on disk and large ones everything on the CPU."""
    for kib in range(300, 1500, 50):
        config = LoadConfig(str(model_dir), max_memory=f"cpu={kib}KiB", **config_fields)
        plan = plan_device_map(config)
        if {"cpu", "disk"} <= set(layer_devices(plan)):
            return config, plan
    raise AssertionError("no cpu budget between 300 and 1500 KiB splits the layers between cpu and disk")


def assert_load_matches_plan(manager, config: LoadConfig, plan: Plan):
    report = manager.load(config)
    assert report.status == "loaded"
    assert report.device_map == plan.device_map
    assert report.bytes_per_device == plan.bytes_per_device
    assert report.matches_plan
    assert report.plan_differences == {}
    assert report.plan.device_map == plan.device_map
    status = manager.status()
    assert status.config == config
    assert status.device_map == plan.device_map
    assert status.bytes_per_device == plan.bytes_per_device
    return report


def generate(manager, prompt: str = "Hello there", params: GenerationParams = GREEDY):
    updates = list(manager.stream_completion(prompt, params))
    assert updates[-1].stats is not None
    assert updates[-1].stats.new_tokens >= 1
    return updates[-1]


# ---------------------------------------------------------------- the plan is the map


def test_cpu_only_load_matches_plan(manager, tiny_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_model_dir), max_memory="cpu=2MiB")
    plan = plan_device_map(config)
    assert plan.device_map == {"": "cpu"}
    assert plan.bytes_per_device == {"cpu": TINY_TOTAL_BYTES}
    report = assert_load_matches_plan(manager, config, plan)
    assert report.load_seconds > 0
    assert report.message.startswith(f"loaded {tiny_model_dir.name} in ")
    generate(manager)


@pytest.mark.parametrize("fast_offload", [True, False], ids=["fast-offload", "plain-accelerate"])
def test_cpu_and_disk_load_matches_plan(manager, tiny_model_dir: Path, fast_offload: bool) -> None:
    config, plan = find_split_budget(tiny_model_dir, fast_offload=fast_offload)
    devices = layer_devices(plan)
    assert devices == sorted(devices, key=["cpu", "disk"].index)  # cpu layers first
    assert set(plan.bytes_per_device) == {"cpu", "disk"}
    assert plan.bytes_per_device["disk"] == devices.count("disk") * TINY_LAYER_BYTES
    assert plan.bytes_per_device["cpu"] <= config.max_memory.get("cpu")
    assert plan.needs_offload_folder is False  # safetensors are read in place
    assert plan.conversion_bytes == 0
    report = assert_load_matches_plan(manager, config, plan)
    assert report.checkpoint == str(tiny_model_dir)
    loaded = manager._loaded
    disk_layer = next(b.name for b in plan.layers if b.device == "disk")
    cpu_layer = next(b.name for b in plan.layers if b.device == "cpu")
    disk_param = next(loaded.model.get_submodule(disk_layer).parameters())
    assert next(loaded.model.get_submodule(cpu_layer).parameters()).device.type == "cpu"
    if fast_offload:
        # The disk tier is memory-mapped from the checkpoint: CPU tensors, no hooks, no copy.
        assert report.disk_tier.active
        assert report.disk_tier.mapped_bytes == plan.bytes_per_device["disk"]
        assert disk_param.device.type == "cpu"
    else:
        assert not report.disk_tier.active
        assert report.disk_tier.skipped_reason == "fast offloading is off"
        assert disk_param.device.type == "meta"  # Accelerate reads it back on every forward
    greedy = GenerationParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    offloaded_text = generate(manager, params=greedy).text
    # Same weights, same greedy tokens as the model held entirely in RAM.
    manager.load(LoadConfig(str(tiny_model_dir)))
    assert generate(manager, params=greedy).text == offloaded_text


def test_all_disk_load_matches_plan(manager, tiny_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_model_dir), max_memory="cpu=300KiB")
    plan = plan_device_map(config)
    assert plan.device_map == {"": "disk"}
    assert_load_matches_plan(manager, config, plan)
    generate(manager)


def test_bin_checkpoint_with_offload_folder_matches_plan(
    manager, tiny_bin_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "offload"
    config, plan = find_split_budget(tiny_bin_model_dir, offload_folder=str(folder), fast_offload=False)
    assert plan.checkpoint_format == "bin"
    assert plan.needs_offload_folder is True
    assert plan.fits is True
    disk_layers = [b.name for b in plan.layers if b.device == "disk"]
    cpu_layers = [b.name for b in plan.layers if b.device == "cpu"]
    assert disk_layers and cpu_layers
    assert plan.disk_bytes_written == len(disk_layers) * TINY_LAYER_BYTES
    assert_load_matches_plan(manager, config, plan)
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert written, "nothing was written to the offload folder"
    names = [p.name for p in written]
    for layer in disk_layers:
        assert any(name.startswith(layer + ".") for name in names), f"{layer} not in the offload folder"
    for layer in cpu_layers:
        assert not any(name.startswith(layer + ".") for name in names), f"{layer} written but on cpu"
    assert sum(p.stat().st_size for p in written) >= plan.disk_bytes_written
    generate(manager)


def test_bin_checkpoint_with_fast_offload_is_converted_once(
    manager, tiny_bin_model_dir: Path, fresh_cache: Path
) -> None:
    from optdemo.weights.convert import cache_entries, converted_root

    model_dir = tiny_bin_model_dir  # never converted: the cache is empty
    config, plan = find_split_budget(model_dir)
    assert plan.fits is True
    assert plan.needs_offload_folder is False
    assert plan.conversion_bytes == TINY_TOTAL_BYTES
    report = assert_load_matches_plan(manager, config, plan)
    checkpoint = Path(report.checkpoint)
    assert checkpoint.parent == converted_root()
    assert (checkpoint / "model.safetensors.index.json").is_file()
    assert not list(checkpoint.glob("*.bin"))
    assert report.disk_tier.mapped_bytes == plan.bytes_per_device["disk"]
    entry = next(e for e in cache_entries() if e.path == checkpoint)
    assert (entry.model, entry.revision, entry.dtype) == (str(model_dir), "main", "float32")
    generate(manager)
    manager.unload()
    # Converted once: the next plan writes nothing, the next load reads the same copy.
    again = plan_device_map(config)
    assert again.conversion_bytes == 0
    assert not any("converts" in w for w in again.warnings)
    stamp = (checkpoint / ".optdemo-complete").stat().st_mtime_ns
    report = manager.load(config)
    assert report.checkpoint == str(checkpoint)
    assert report.matches_plan
    assert (checkpoint / ".optdemo-complete").stat().st_mtime_ns == stamp  # not converted again
    generate(manager)


def test_no_converting_message_when_already_converted(
    manager, tiny_bin_model_dir: Path, fresh_cache: Path
) -> None:
    config = LoadConfig(str(tiny_bin_model_dir), max_memory="cpu=900KiB")
    first: list[str] = []
    manager.load(config, progress=lambda f, text: first.append(text))
    assert f"Converting {tiny_bin_model_dir.name}'s .bin checkpoint to safetensors (once)" in first
    manager.unload()
    assert plan_device_map(config).conversion_bytes == 0  # the planner knows it is converted
    again: list[str] = []
    manager.load(config, progress=lambda f, text: again.append(text))
    assert not any("Converting" in text for text in again), again


def test_half_precision_load_matches_plan(manager, tiny_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_model_dir), dtype="bfloat16", max_memory="cpu=500KiB")
    plan = plan_device_map(config)
    assert plan.total_bytes == TINY_TOTAL_BYTES // 2
    assert {"cpu", "disk"} <= set(layer_devices(plan))
    assert_load_matches_plan(manager, config, plan)
    assert {str(p.dtype) for p in manager._loaded.model.parameters()} == {"torch.bfloat16"}
    generate(manager)


def test_auto_dtype_after_an_explicit_dtype_load(manager, tiny_model_dir: Path) -> None:
    manager.load(LoadConfig(str(tiny_model_dir), dtype="bfloat16"))
    report = manager.load(LoadConfig(str(tiny_model_dir)))
    assert report.status == "loaded"
    assert {str(p.dtype) for p in manager._loaded.model.parameters()} == {"torch.float32"}
    assert report.bytes_per_device == {WHOLE_MODEL_DEVICE: TINY_TOTAL_BYTES}


# ---------------------------------------------------------------- reuse versus reload


def test_same_config_is_reused(manager, tiny_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_model_dir), max_memory="cpu=2MiB")
    first = manager.load(config)
    model = manager._loaded.model
    again = manager.load(LoadConfig(str(tiny_model_dir) + "/", max_memory="cpu=2048KiB", label="same"))
    assert first.status == "loaded"
    assert again.status == "reused"
    assert again.load_seconds < 0.05
    assert manager._loaded.model is model
    assert again.device_map == first.device_map
    assert again.matches_plan
    assert "already loaded" in again.message
    different = manager.load(config.with_changes(max_memory="cpu=3MiB"))
    assert different.status == "loaded"
    assert manager._loaded.model is not model


# ---------------------------------------------------------------- memory is freed


def test_unload_frees_the_model(manager, tiny_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_model_dir))
    manager.load(config)
    generate(manager)
    ref = weakref.ref(manager._loaded.model)
    assert manager.unload() is True
    gc.collect()
    assert ref() is None
    status = manager.status()
    assert status.config is None
    assert status.device_map == {}
    assert manager.current_config is None
    assert manager.unload() is False


def test_reload_frees_the_previous_model(manager, tiny_model_dir: Path) -> None:
    manager.load(LoadConfig(str(tiny_model_dir), max_memory="cpu=900KiB"))  # with offload hooks
    generate(manager)
    ref = weakref.ref(manager._loaded.model)
    manager.load(LoadConfig(str(tiny_model_dir)))
    gc.collect()
    assert ref() is None


def test_rss_is_stable_over_load_unload_cycles(manager, tiny_model_dir: Path) -> None:
    process = psutil.Process()
    config = LoadConfig(str(tiny_model_dir), max_memory="cpu=900KiB")
    rss = []
    for _ in range(6):
        manager.load(config)
        generate(manager)
        manager.unload()
        gc.collect()
        rss.append(process.memory_info().rss)
    # One leaked model would be 1.4 MiB a cycle: 7 MiB over the five cycles after the first.
    growth = rss[-1] - rss[0]
    assert growth < 4 * 2**20, f"RSS grew by {growth / 2**20:.1f} MiB over 5 cycles: {rss}"


# ---------------------------------------------------------------- failed loads


def test_budget_naming_a_missing_gpu_keeps_the_current_model(manager, tiny_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_model_dir))
    manager.load(config)
    model = manager._loaded.model
    with pytest.raises(BudgetError) as info:
        manager.load(LoadConfig(str(tiny_model_dir), max_memory="3=1GiB,cpu=1GiB"))
    assert str(info.value) == (
        f"max_memory names GPU 3 but {describe_gpu_count(GPU_COUNT)}: remove it from the budget to load "
        "here (plans may name it)"
    )
    assert manager.status().config == config
    assert manager._loaded.model is model
    generate(manager)


def test_disk_without_offload_folder_keeps_the_current_model(
    manager, tiny_model_dir: Path, tiny_bin_model_dir: Path
) -> None:
    config = LoadConfig(str(tiny_model_dir))
    manager.load(config)
    with pytest.raises(PlanError) as info:
        manager.load(LoadConfig(str(tiny_bin_model_dir), max_memory="cpu=900KiB", fast_offload=False))
    assert "give an offload folder" in str(info.value)
    assert isinstance(info.value, OptdemoError)
    assert manager.status().config == config
    generate(manager)


def test_unreachable_hub_model_keeps_the_current_model(manager, tiny_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_model_dir))
    manager.load(config)
    with pytest.raises(ConfigError, match="cannot reach the Hugging Face Hub"):
        manager.load(LoadConfig("optdemo-tests/not-cached-anywhere"))
    assert manager.status().config == config
    generate(manager)


def test_unwritable_offload_folder_is_refused_before_unloading(
    manager, tiny_model_dir: Path, tiny_bin_model_dir: Path, tmp_path: Path
) -> None:
    config = LoadConfig(str(tiny_model_dir))
    manager.load(config)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    bad = LoadConfig(
        str(tiny_bin_model_dir),
        max_memory="cpu=900KiB",
        offload_folder=str(blocker / "sub"),
        fast_offload=False,
    )
    with pytest.raises(PlanError, match="cannot be written"):
        manager.load(bad)
    assert manager.status().config == config


@pytest.mark.parametrize("checkpoint", ["safetensors", "bin-fast-offload"])
def test_unwritable_offload_folder_is_always_refused_before_unloading(
    manager, tiny_model_dir: Path, tiny_bin_model_dir: Path, tmp_path: Path, checkpoint: str
) -> None:
    config = LoadConfig(str(tiny_model_dir))
    manager.load(config)
    model = manager._loaded.model
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    model_dir = tiny_model_dir if checkpoint == "safetensors" else tiny_bin_model_dir
    bad = LoadConfig(str(model_dir), max_memory="cpu=900KiB", offload_folder=str(blocker / "sub"))
    with pytest.raises(PlanError, match="cannot be written"):
        manager.load(bad)
    assert manager.status().config == config
    assert manager._loaded.model is model  # refused before anything was unloaded


def corrupt_copy(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    weights = dest / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated, as by an interrupted download
    return dest


def test_corrupt_checkpoint_is_a_load_error_and_a_clean_state(
    manager, tiny_model_dir: Path, tmp_path: Path
) -> None:
    broken = corrupt_copy(tiny_model_dir, tmp_path / "broken")
    plan = plan_device_map(LoadConfig(str(broken)))
    assert plan.fits  # nothing to see before the weights are read
    with pytest.raises(LoadError) as info:
        manager.load(LoadConfig(str(broken)))
    message = str(info.value)
    assert "corrupt" in message
    assert message.endswith("No model is loaded now.")
    assert manager.status().config is None
    assert manager.status().busy is None
    with pytest.raises(OptdemoError, match="no model is loaded"):
        generate(manager)
    config = LoadConfig(str(tiny_model_dir))
    assert manager.load(config).status == "loaded"
    generate(manager)


def test_corrupt_checkpoint_after_a_model_brings_the_previous_one_back(
    manager, tiny_model_dir: Path, tmp_path: Path
) -> None:
    previous = LoadConfig(str(tiny_model_dir), max_memory="cpu=900KiB")
    manager.load(previous)
    ref = weakref.ref(manager._loaded.model)
    broken = corrupt_copy(tiny_model_dir, tmp_path / "broken")
    with pytest.raises(LoadError) as info:
        manager.load(LoadConfig(str(broken)))
    assert "corrupt" in str(info.value)
    assert str(info.value).endswith(f"{tiny_model_dir.name} is loaded again, as before.")
    gc.collect()
    assert ref() is None  # it was really dropped to make room, then loaded afresh
    status = manager.status()
    assert status.config == previous
    assert status.busy is None
    assert status.device_map == plan_device_map(previous).device_map
    generate(manager)
    assert manager.load(previous).status == "reused"


def test_offline_catalog_model_is_refused_before_unloading(manager, tiny_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_model_dir))
    manager.load(config)
    model = manager._loaded.model
    with pytest.raises(LoadError, match="cannot reach the Hugging Face Hub") as info:
        manager.load(LoadConfig("opt-125m"))  # plannable offline, but its weights are on the Hub
    assert "facebook/opt-125m" in str(info.value)
    assert manager._loaded.model is model
    generate(manager)


# ---------------------------------------------------------------- the token never shows


def test_hf_token_never_appears(
    manager, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    token = "hf_FAKEtoken123"
    monkeypatch.setenv("HF_TOKEN", token)
    from optdemo.models.source import hub_token

    assert hub_token() == token  # the engine does see it
    caplog.set_level(logging.DEBUG)
    texts = []
    report = manager.load(LoadConfig(str(tiny_model_dir), max_memory="cpu=900KiB"))
    texts += [json.dumps(report.to_dict()), json.dumps(manager.status().to_dict()), repr(report)]
    texts.append(json.dumps(report.plan.to_dict()))
    texts.append(generate(manager).text)
    for bad in (
        LoadConfig("optdemo-tests/private-model"),
        LoadConfig(str(tiny_model_dir), max_memory="2=1GiB"),
    ):
        with pytest.raises(OptdemoError) as info:
            manager.load(bad)
        texts.append(str(info.value))
    broken = corrupt_copy(tiny_model_dir, tmp_path / "broken")
    with pytest.raises(LoadError) as info:
        manager.load(LoadConfig(str(broken)))
    texts += [str(info.value), json.dumps(manager.status().to_dict())]
    texts.append(caplog.text)
    for text in texts:
        assert token not in text
    assert "hub" in " ".join(texts).lower()  # the checks above did see real messages


# ---------------------------------------------------------------- progress and status


def test_progress_callback(manager, tiny_model_dir: Path) -> None:
    events: list[tuple[float | None, str]] = []
    manager.load(LoadConfig(str(tiny_model_dir)), progress=lambda f, text: events.append((f, text)))
    assert len(events) >= 3
    fractions = [f for f, _ in events if f is not None]
    assert fractions[0] == 0.0
    assert fractions[-1] == 1.0
    assert all(0.0 <= f <= 1.0 for f in fractions)
    assert fractions == sorted(fractions)
    assert events[0][1] == f"Loading the tokenizer of {tiny_model_dir.name}"
    assert {text for _, text in events[1:-1]} == {"Loading weights"}  # tiny: no byte counts shown
    assert events[-1][1].startswith(f"Loaded {tiny_model_dir.name} in ")
    # A reused model is not loaded again: no progress at all.
    events.clear()
    manager.load(LoadConfig(str(tiny_model_dir)), progress=lambda f, text: events.append((f, text)))
    assert events == []


def test_status_while_loaded(manager, tiny_model_dir: Path) -> None:
    config = LoadConfig(str(tiny_model_dir), max_memory="cpu=900KiB", label="Tiny")
    report = manager.load(config)
    status = manager.status()
    assert status.busy is None
    assert status.load_seconds == report.load_seconds > 0
    data = json.loads(json.dumps(status.to_dict()))
    assert data["loaded"] is True
    assert data["display_name"] == "Tiny"
    assert data["config"]["max_memory"] == "cpu=900KiB"
    assert data["config"]["dtype"] == "auto"
    assert data["bytes_per_device"] == report.to_dict()["bytes_per_device"]
    assert report.to_dict()["matches_plan"] is True
    assert set(data["device_map"].values()) == {"cpu", "disk"}


def start_long_generation(manager, seed: int) -> tuple[threading.Thread, list]:
    """A 400-token reply streaming in another thread; returns once its first update arrived."""
    updates: list = []
    first = threading.Event()

    def consume() -> None:
        params = GenerationParams(max_new_tokens=400, temperature=1.0, seed=seed)
        for update in manager.stream_completion("Hello there", params):
            updates.append(update)
            first.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert first.wait(10)
    return consumer, updates


def test_load_stops_a_running_generation(manager, tiny_model_dir: Path) -> None:
    manager.load(LoadConfig(str(tiny_model_dir)))
    consumer, updates = start_long_generation(manager, seed=1)
    assert manager.status().busy == "generating"
    report = manager.load(LoadConfig(str(tiny_model_dir), max_memory="cpu=900KiB"))
    consumer.join(10)
    assert not consumer.is_alive()
    assert report.status == "loaded"
    assert report.stopped_generation is True
    assert report.message.endswith("; the reply in progress was stopped to apply it")
    assert updates[-1].stats.stopped is True
    assert updates[-1].stats.new_tokens < 400
    assert manager.status().busy is None


def test_builtin_tiny_model_loads(manager) -> None:
    report = manager.load(LoadConfig("tiny-opt"))
    assert report.device_map == {"": WHOLE_MODEL_DEVICE}
    assert report.bytes_per_device == {WHOLE_MODEL_DEVICE: TINY_TOTAL_BYTES}
    assert report.matches_plan
    assert manager.status().config.model == "optdemo/tiny-opt"
    assert os.path.isdir(os.environ["OPTDEMO_CACHE"])
    generate(manager)


def test_unload_stops_a_running_generation(manager, tiny_model_dir: Path) -> None:
    manager.load(LoadConfig(str(tiny_model_dir)))
    consumer, updates = start_long_generation(manager, seed=2)
    ref = weakref.ref(manager._loaded.model)
    assert manager.unload() is True
    consumer.join(10)
    assert not consumer.is_alive()
    assert updates[-1].stats.stopped is True
    assert manager.status().config is None
    gc.collect()
    assert ref() is None


def test_generations_take_turns_with_max_batch_one(tiny_model_dir: Path) -> None:
    # With --max-batch 1 replies take turns (with more, they share the model: test_batching.py).
    manager = ModelManager(max_batch=1)
    manager.load(LoadConfig(str(tiny_model_dir)))
    first_stream = manager.stream_completion("Hello", GenerationParams(max_new_tokens=300, temperature=0))
    next(first_stream)  # holds the model now
    second = list(manager.stream_completion("Hi", GenerationParams(max_new_tokens=3)))
    rest = list(first_stream)
    assert rest[-1].stats.new_tokens <= 300 and rest[-1].stats.batch_size == 1
    # The second waited in line behind the first, then ran alone.
    assert second[0].text == "" and second[0].status.startswith("Waiting for the model: number 1 in line")
    assert second[-1].done and second[-1].stats.batch_size == 1
    manager.unload()


def test_generation_requested_during_a_load_waits_for_it(manager, tiny_model_dir: Path) -> None:
    manager.load(LoadConfig(str(tiny_model_dir)))
    new_config = LoadConfig(str(tiny_model_dir), max_memory="cpu=2MiB")
    in_load, release = threading.Event(), threading.Event()
    outcome: dict = {}
    events: list[tuple[str, float]] = []  # (what, time.monotonic()), in the order they happened

    def progress(fraction, text) -> None:
        if not in_load.is_set():
            in_load.set()
            release.wait(10)

    def load() -> None:
        manager.load(new_config, progress=progress)
        events.append(("loaded", time.monotonic()))

    def generate_now() -> None:
        updates = manager.stream_completion("Hi", GenerationParams(max_new_tokens=3, temperature=0))
        try:
            first = next(updates)
            events.append(("first update", time.monotonic()))
            outcome["config"] = manager.current_config  # the model this generation holds
            outcome["updates"] = [first, *updates]
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
            outcome["error"] = exc
        finally:
            updates.close()  # gives the model back even when an assertion above failed

    loader = threading.Thread(target=load)
    loader.start()
    try:
        assert in_load.wait(10)
        assert manager.status().busy == f"loading {tiny_model_dir.name}"
        generator = threading.Thread(target=generate_now)
        generator.start()
        generator.join(0.3)
        # Still waiting: the load holds the model and nothing was generated.
        assert generator.is_alive() and not events and "updates" not in outcome
    finally:
        released_at = time.monotonic()
        release.set()
        loader.join(10)
    generator.join(10)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["updates"][-1].done
    # It waited for the load: its first update came after the load was let go, on the new model.
    first_update = dict(events)["first update"]
    assert first_update > released_at
    assert outcome["config"] == new_config
