"""Planning where every layer goes (no weights touched) and the hardware probe."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import GPU_COUNT, TINY_LAYER_BYTES, TINY_TOTAL_BYTES, WHOLE_MODEL_DEVICE
from packaging.version import Version

from optdemo.core.budget import describe_gpu_count, format_bytes
from optdemo.core.errors import PlanError
from optdemo.core.load_config import LoadConfig
from optdemo.models import hf_compat
from optdemo.models.hf_compat import (
    PINNED_TRANSFORMERS,
    TESTED_TRANSFORMERS,
    TransformersCompatError,
    auto_device_map,
    installed_transformers,
)
from optdemo.plan.planner import device_label, device_of, plan_device_map
from optdemo.system.hardware import (
    GpuInfo,
    Hardware,
    existing_parent,
    probe_hardware,
    suggest_budget,
)
from optdemo.weights.convert import converted_root

KiB, MiB, GiB = 2**10, 2**20, 2**30
OPT_66B_PARAMETERS = 65719701504
_RANK = {"cpu": 1, "disk": 2}


def hardware(
    *,
    gpus: tuple[GpuInfo, ...] = (),
    ram: int = 64 * GiB,
    disk_path: str = "/",
    disk_free: int = 10 * 2**40,
) -> Hardware:
    """A machine with known numbers, so that warnings do not depend on the test runner."""
    return Hardware(
        gpus=gpus,
        ram_total_bytes=max(ram, 1),
        ram_available_bytes=ram,
        disk_path=existing_parent(disk_path),
        disk_free_bytes=disk_free,
    )


def rank(device) -> int:
    return 0 if isinstance(device, int) else _RANK[device]


def opt_layer_bytes(hidden: int, ffn: int, bytes_per_param: int = 2) -> int:
    """One OPT decoder layer: q/k/v/out projections, two LayerNorms, fc1, fc2 (with biases)."""
    params = (
        4 * (hidden * hidden + hidden) + 2 * (2 * hidden) + (hidden * ffn + ffn) + (ffn * hidden + hidden)
    )
    return bytes_per_param * params


# ---------------------------------------------------------------- opt-66b, planned offline


@pytest.fixture(scope="module")
def plan_66b():
    """opt-66b with plain Accelerate offloading (fast_offload off): .bin disk layers are rewritten
    into the offload folder on every load."""
    config = LoadConfig("opt-66b", max_memory="0=5GiB,cpu=20GiB", fast_offload=False)
    return plan_device_map(config, hardware())


def test_66b_plan_totals(plan_66b) -> None:
    plan = plan_66b
    assert plan.model == "facebook/opt-66b"
    assert plan.display_name == "opt-66b"
    assert plan.dtype == "float16"
    assert plan.checkpoint_format == "bin"
    assert plan.total_bytes == 2 * OPT_66B_PARAMETERS == 131439403008
    assert sum(plan.bytes_per_device.values()) == plan.total_bytes
    assert sum(plan.module_bytes.values()) == plan.total_bytes
    assert list(plan.bytes_per_device) == [0, "cpu", "disk"]
    assert 0 < plan.bytes_per_device[0] <= 5 * GiB
    assert 0 < plan.bytes_per_device["cpu"] <= 20 * GiB
    assert plan.bytes_per_device["disk"] > 0
    assert plan.budget == {0: 5 * GiB, "cpu": 20 * GiB}
    assert plan.conversion_bytes == 0
    for name, device in plan.device_map.items():
        assert plan.bytes_per_device[device] >= plan.module_bytes[name]


def test_66b_plan_layers(plan_66b) -> None:
    layers = plan_66b.layers
    assert [block.name for block in layers] == [f"model.decoder.layers.{i}" for i in range(64)]
    assert {block.bytes for block in layers} == {opt_layer_bytes(9216, 36864)} == {2038671360}
    assert all(block.kind == "layer" for block in layers)
    # GPU first, then CPU, then disk: never back to a faster device.
    ranks = [rank(block.device) for block in layers]
    assert ranks == sorted(ranks)
    assert {block.device for block in layers} == {0, "cpu", "disk"}
    for block in layers:
        assert block.device == device_of(block.name, plan_66b.device_map)


def test_66b_plan_blocks(plan_66b) -> None:
    blocks = {block.name: block for block in plan_66b.blocks}
    head = blocks["lm_head"]
    assert head.kind == "head"
    assert head.tied_to == "model.decoder.embed_tokens"
    assert head.bytes == 0
    assert head.device is None
    embed = blocks["model.decoder.embed_tokens"]
    assert embed.kind == "embedding"
    assert embed.bytes == 2 * 50272 * 9216
    assert blocks["model.decoder.embed_positions"].bytes == 2 * (2048 + 2) * 9216
    assert blocks["model.decoder.final_layer_norm"].kind == "norm"
    assert sum(block.bytes for block in plan_66b.blocks) == plan_66b.total_bytes


def test_66b_plan_warnings_without_offload_folder(plan_66b) -> None:
    plan = plan_66b
    assert plan.fits is False
    assert plan.needs_offload_folder is True
    assert plan.disk_bytes_written == plan.bytes_per_device["disk"]
    warnings = plan.warnings
    assert warnings[0] == (
        "GPU 0 is not on this machine (this machine has no GPU): this plan is for another machine "
        "and cannot be loaded here"
    )
    assert any("go to disk" in w for w in warnings)
    assert any("offload folder" in w and "cannot hold opt-66b" in w for w in warnings)
    disk = format_bytes(plan.bytes_per_device["disk"])
    assert f"give an offload folder with {disk} free" in " ".join(warnings)


def test_66b_plan_with_probed_hardware_warns_about_missing_gpu() -> None:
    # Name the first GPU index this machine lacks (0 here without a GPU).
    budget = f"{GPU_COUNT}=5GiB,cpu=20GiB"
    plan = plan_device_map(LoadConfig("opt-66b", max_memory=budget, fast_offload=False))
    missing = f"GPU {GPU_COUNT} is not on this machine ({describe_gpu_count(GPU_COUNT)})"
    assert any(w.startswith(missing) for w in plan.warnings)
    assert plan.total_bytes == 2 * OPT_66B_PARAMETERS


def test_66b_plan_with_offload_folder_fits(tmp_path: Path) -> None:
    config = LoadConfig(
        "opt-66b", max_memory="0=5GiB,cpu=20GiB", offload_folder=str(tmp_path / "off"), fast_offload=False
    )
    gpus = (GpuInfo(0, "Fake GPU", 24 * GiB, 24 * GiB),)
    plan = plan_device_map(config, hardware(gpus=gpus, disk_path=str(tmp_path), disk_free=200 * GiB))
    assert plan.fits is True
    assert plan.needs_offload_folder is True
    assert not any("not on this machine" in w for w in plan.warnings)
    assert not any("cannot hold" in w for w in plan.warnings)


def test_66b_plan_with_too_little_disk(tmp_path: Path) -> None:
    config = LoadConfig(
        "opt-66b", max_memory="0=5GiB,cpu=20GiB", offload_folder=str(tmp_path / "off"), fast_offload=False
    )
    plan = plan_device_map(config, hardware(disk_path=str(tmp_path), disk_free=1000))
    assert plan.fits is False
    needed = format_bytes(plan.disk_bytes_written)
    assert f"the offload folder has 1000 B free but opt-66b needs {needed} there" in plan.warnings[-1]


def converted_free_bytes() -> int:
    return shutil.disk_usage(existing_parent(str(converted_root()))).free


def test_66b_fast_offload_plans_a_one_time_conversion(plan_66b) -> None:
    plan = plan_device_map(LoadConfig("opt-66b", max_memory="0=5GiB,cpu=20GiB"), hardware())
    assert plan.device_map == plan_66b.device_map  # fast offloading changes no placement
    assert plan.needs_offload_folder is False
    assert plan.disk_bytes_written == 0
    assert plan.conversion_bytes == plan.total_bytes == 2 * OPT_66B_PARAMETERS
    converting = [w for w in plan.warnings if w.startswith("the first load converts")]
    assert len(converting) == 1
    assert f"to safetensors in {converted_root()} (122 GiB; " in converting[0]
    assert converting[0].endswith("free there); later loads write nothing")
    no_room = [w for w in plan.warnings if w.startswith("not enough free space to convert")]
    # Whether 122 GiB fits depends on this machine's disk: the plan must say what is true here.
    room = converted_free_bytes() >= plan.conversion_bytes
    assert plan.fits is room
    assert bool(no_room) is not room


def test_fast_offload_plan_without_room_to_convert(monkeypatch: pytest.MonkeyPatch) -> None:
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * GiB))
    plan = plan_device_map(LoadConfig("opt-66b", max_memory="0=5GiB,cpu=20GiB"), hardware())
    assert plan.fits is False
    assert plan.warnings[-1] == (
        f"not enough free space to convert the checkpoint (122 GiB needed in {converted_root()}): "
        "free some space or turn fast offloading off"
    )


def test_plan_to_dict_is_json(plan_66b) -> None:
    data = json.loads(json.dumps(plan_66b.to_dict()))
    assert data["total_bytes"] == 131439403008
    assert data["conversion_bytes"] == 0
    assert data["needs_offload_folder"] is True
    assert data["bytes_per_device"] == {str(k): v for k, v in plan_66b.bytes_per_device.items()}
    assert data["device_map"]["model.decoder.layers.63"] == "disk"
    assert len(data["blocks"]) == len(plan_66b.blocks)
    assert data["blocks"][-1] == {
        "name": "lm_head",
        "device": None,
        "bytes": 0,
        "kind": "head",
        "tied_to": "model.decoder.embed_tokens",
    }


def test_planning_66b_is_fast() -> None:
    plan_device_map(LoadConfig("opt-125m", max_memory="cpu=1GiB"), hardware())  # pays the imports
    started = time.perf_counter()
    plan = plan_device_map(LoadConfig("opt-66b", max_memory="0=6GiB,cpu=30GiB"), hardware())
    elapsed = time.perf_counter() - started
    assert plan.total_bytes == 2 * OPT_66B_PARAMETERS
    assert elapsed < 2.0, f"planning opt-66b took {elapsed:.2f} s"


@pytest.mark.parametrize(("dtype", "size"), [("float32", 4), ("bfloat16", 2), ("float16", 2)])
def test_dtype_sets_plan_sizes(dtype: str, size: int) -> None:
    plan = plan_device_map(LoadConfig("opt-1.3b", dtype=dtype, max_memory="cpu=64GiB"), hardware())
    assert plan.dtype == dtype
    assert plan.total_bytes == size * 1315758080
    assert plan.device_map == {"": "cpu"}


# ---------------------------------------------------------------- the tiny model


@pytest.mark.slow
def test_tiny_plan_without_budget_is_all_cpu(tiny_model_dir: Path) -> None:
    # No budget: transformers measures this machine's free memory itself, GPUs included.
    plan = plan_device_map(LoadConfig(str(tiny_model_dir)), hardware())
    assert plan.device_map == {"": WHOLE_MODEL_DEVICE}
    assert plan.bytes_per_device == {WHOLE_MODEL_DEVICE: TINY_TOTAL_BYTES}
    assert plan.total_bytes == TINY_TOTAL_BYTES
    assert plan.dtype == "float32"
    assert plan.checkpoint_format == "safetensors"
    assert plan.fits is True
    assert plan.warnings == ()
    assert plan.budget == {"cpu": 64 * GiB}  # no budget: all available RAM
    assert [b.name for b in plan.layers] == [f"model.decoder.layers.{i}" for i in range(6)]
    assert {b.bytes for b in plan.layers} == {TINY_LAYER_BYTES}
    assert {b.device for b in plan.blocks if b.name != "lm_head"} == {WHOLE_MODEL_DEVICE}


@pytest.mark.slow
def test_tiny_plan_small_cpu_budget_puts_everything_on_disk(tiny_model_dir: Path) -> None:
    # Accelerate keeps room for the largest layer on the main device, so 300 KiB holds nothing.
    plan = plan_device_map(LoadConfig(str(tiny_model_dir), max_memory="cpu=300KiB"), hardware())
    assert plan.device_map == {"": "disk"}
    assert plan.bytes_per_device == {"disk": TINY_TOTAL_BYTES}
    # safetensors are read in place: nothing is written, no folder needed.
    assert plan.fits is True
    assert plan.needs_offload_folder is False
    assert plan.disk_bytes_written == 0
    assert plan.warnings == (
        f"{format_bytes(TINY_TOTAL_BYTES)} of {tiny_model_dir.name}'s weights go to disk: they are "
        "memory-mapped, so they run at RAM speed while the OS can cache them and at disk speed when it "
        "cannot",
    )
    plain = plan_device_map(
        LoadConfig(str(tiny_model_dir), max_memory="cpu=300KiB", fast_offload=False), hardware()
    )
    assert plain.warnings == (
        f"{format_bytes(TINY_TOTAL_BYTES)} of {tiny_model_dir.name}'s weights go to disk: every token "
        "reads them back, so generation will be slow",
    )


@pytest.mark.slow
def test_tiny_plan_cpu_and_disk(tiny_model_dir: Path) -> None:
    plan = plan_device_map(LoadConfig(str(tiny_model_dir), max_memory="cpu=900KiB"), hardware())
    layer_devices = [b.device for b in plan.layers]
    assert layer_devices == ["cpu", "cpu", "disk", "disk", "disk", "disk"]
    assert plan.bytes_per_device == {
        "cpu": TINY_TOTAL_BYTES - 4 * TINY_LAYER_BYTES,
        "disk": 4 * TINY_LAYER_BYTES,
    }
    assert plan.bytes_per_device["cpu"] <= 900 * KiB


@pytest.mark.slow
def test_bin_checkpoint_on_disk_needs_an_offload_folder(tiny_bin_model_dir: Path, tmp_path: Path) -> None:
    config = LoadConfig(str(tiny_bin_model_dir), max_memory="cpu=900KiB", fast_offload=False)
    plan = plan_device_map(config, hardware())
    assert plan.checkpoint_format == "bin"
    assert plan.fits is False
    assert plan.needs_offload_folder is True
    assert plan.disk_bytes_written == plan.bytes_per_device["disk"] == 4 * TINY_LAYER_BYTES
    assert any("offload folder" in w for w in plan.warnings)
    with_folder = config.with_changes(offload_folder=str(tmp_path / "offload"))
    plan = plan_device_map(with_folder, hardware(disk_path=str(tmp_path), disk_free=10 * MiB))
    assert plan.fits is True
    assert plan.device_map == plan_device_map(config, hardware()).device_map
    plan = plan_device_map(with_folder, hardware(disk_path=str(tmp_path), disk_free=4 * TINY_LAYER_BYTES - 1))
    assert plan.fits is False
    assert any("free" in w for w in plan.warnings)


@pytest.mark.slow
def test_bin_checkpoint_with_fast_offload_plans_a_conversion(
    tiny_bin_model_dir: Path, fresh_cache: Path
) -> None:
    model_dir = tiny_bin_model_dir  # never converted: the cache is empty
    plan = plan_device_map(LoadConfig(str(model_dir), max_memory="cpu=900KiB"), hardware())
    assert plan.checkpoint_format == "bin"
    assert plan.fits is True
    assert plan.needs_offload_folder is False
    assert plan.disk_bytes_written == 0
    assert plan.conversion_bytes == TINY_TOTAL_BYTES  # the whole checkpoint, once
    assert plan.warnings[-1].startswith(
        f"the first load converts the .bin checkpoint once to safetensors in {converted_root()} (1.4 MiB; "
    )
    # Without disk layers nothing needs converting.
    in_ram = plan_device_map(LoadConfig(str(model_dir)), hardware())
    assert in_ram.conversion_bytes == 0
    assert in_ram.warnings == ()


@pytest.mark.slow
def test_ram_warning_when_cpu_bytes_exceed_available_ram(tiny_model_dir: Path) -> None:
    plan = plan_device_map(LoadConfig(str(tiny_model_dir), max_memory="cpu=2MiB"), hardware(ram=1000))
    assert plan.warnings == (
        f"{format_bytes(TINY_TOTAL_BYTES)} would be held in RAM but only 1000 B is available now: "
        "lower the cpu budget so more goes to disk",
    )
    assert plan.fits is True  # a warning, not a refusal: the OS may still find the memory


@pytest.mark.slow
def test_quantization_warning_only_where_bitsandbytes_quantizes(tiny_model_dir: Path) -> None:
    # With a GPU, bitsandbytes quantizes at load time: the plan's sizes are the unquantized ones.
    gpu = GpuInfo(0, "Test GPU", 8 * GiB, 8 * GiB)
    plan = plan_device_map(LoadConfig(str(tiny_model_dir), quantization="8bit"), hardware(gpus=(gpu,)))
    assert plan.warnings == (
        "sizes are shown unquantized; 8bit quantization makes the Linear weights smaller once loaded",
    )
    assert plan.quantization == "none"
    # Without one, optdemo quantizes on the CPU and the sizes are the quantized ones: no such warning.
    plan = plan_device_map(LoadConfig(str(tiny_model_dir), quantization="8bit"), hardware())
    assert plan.quantization == "8bit"
    assert not any("unquantized" in warning for warning in plan.warnings)


@pytest.mark.slow
def test_builtin_tiny_model_is_built_in_the_cache() -> None:
    plan = plan_device_map(LoadConfig("tiny-opt"), hardware())
    from optdemo.models.source import resolve_model

    source = resolve_model("optdemo/tiny-opt")
    assert source.kind == "builtin"
    assert Path(source.location).is_relative_to(os.environ["OPTDEMO_CACHE"])
    assert (Path(source.location) / "model.safetensors").is_file()
    assert plan.total_bytes == TINY_TOTAL_BYTES
    assert plan.display_name == "tiny-opt"
    assert plan.device_map == {"": WHOLE_MODEL_DEVICE}


@pytest.mark.slow
def test_explicit_dtype_does_not_change_what_auto_means(tiny_model_dir: Path) -> None:
    model_dir = tiny_model_dir
    assert plan_device_map(LoadConfig(str(model_dir)), hardware()).dtype == "float32"
    assert plan_device_map(LoadConfig(str(model_dir), dtype="float16"), hardware()).dtype == "float16"
    plan = plan_device_map(LoadConfig(str(model_dir)), hardware())
    assert plan.dtype == "float32"
    assert plan.total_bytes == TINY_TOTAL_BYTES


# ---------------------------------------------------------------- device helpers


def test_device_of() -> None:
    device_map = {"": "cpu", "model.decoder.layers.3": "disk", "model.decoder.layers.30": 0}
    assert device_of("model.decoder.layers.3.fc1", device_map) == "disk"
    assert device_of("model.decoder.layers.30", device_map) == 0
    assert device_of("model.decoder.layers.31", device_map) == "cpu"
    assert device_of("lm_head", {"model.a": 0, "lm_head": "cpu"}) == "cpu"
    assert device_of("model", {"model.a": 0, "model.b": "cpu"}) == 0  # split: its first part
    assert device_of("other", {"model.a": 0}) is None


def test_device_label() -> None:
    assert [device_label(d) for d in (0, 3, "cpu", "disk", None)] == ["GPU 0", "GPU 3", "CPU", "disk", "tied"]


# ---------------------------------------------------------------- hardware


def test_suggest_budget_without_gpu() -> None:
    # Whole quarter GiB (the sliders' step), rounded down.
    assert suggest_budget(hardware(ram=16 * GiB)).as_max_memory() == {"cpu": 12.75 * GiB}  # 80% = 12.8
    assert suggest_budget(hardware(ram=4 * GiB)).as_max_memory() == {"cpu": 2 * GiB}  # 2 GiB kept
    assert suggest_budget(hardware(ram=1 * GiB)).as_max_memory() == {"cpu": 0}
    assert suggest_budget(hardware(ram=2 * GiB + 300 * MiB + 7)).as_max_memory() == {"cpu": 256 * MiB}


def test_suggest_budget_with_two_gpus() -> None:
    gpus = (
        GpuInfo(1, "Fake GPU B", 16 * GiB, 8_000_000_000),
        GpuInfo(0, "Fake GPU A", 24 * GiB, 10 * GiB),
    )
    budget = suggest_budget(hardware(gpus=gpus, ram=32 * GiB))
    assert budget.as_max_memory() == {
        0: 9 * GiB,  # 90% of 10 GiB free = 9.0 GiB
        1: 6.5 * GiB,  # 90% of 8e9 = 7.2e9 bytes = 6.71 GiB, rounded down to a quarter GiB
        "cpu": 25.5 * GiB,  # 80% of 32 GiB = 25.6 GiB, rounded down to a quarter GiB
    }
    assert list(budget.as_max_memory()) == [0, 1, "cpu"]
    assert hardware(gpus=gpus).gpu_count == 2


def test_probe_hardware_here(tmp_path: Path) -> None:
    import torch

    probed = probe_hardware(str(tmp_path / "not" / "yet"))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert [gpu.index for gpu in probed.gpus] == list(range(count))
    assert all(gpu.total_bytes >= gpu.free_bytes > 0 for gpu in probed.gpus)
    assert probed.ram_total_bytes >= probed.ram_available_bytes > 0
    assert probed.disk_path == str(tmp_path)
    assert probed.disk_free_bytes > 0
    assert probe_hardware().disk_path == os.getcwd()
    assert set(suggest_budget(probed).as_max_memory()) == {"cpu", *range(count)}


def test_existing_parent(tmp_path: Path) -> None:
    assert existing_parent(str(tmp_path / "a" / "b" / "c")) == str(tmp_path)
    assert existing_parent(str(tmp_path)) == str(tmp_path)
    assert existing_parent("/definitely/not/here") == "/"


# ------------------------------------------------------------- the private transformers call
def test_planner_reports_a_missing_private_function(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import modeling_utils  # noqa: F401 - imports _get_device_map itself: load it first
    from transformers.integrations import accelerate as hf_accelerate

    monkeypatch.delattr(hf_accelerate, "_get_device_map")
    with pytest.raises(TransformersCompatError) as caught:
        plan_device_map(LoadConfig("opt-125m", max_memory="cpu=1GiB"), hardware())
    message = str(caught.value)
    assert "_get_device_map is missing" in message
    assert f"pip install transformers=={PINNED_TRANSFORMERS}" in message
    assert "report it" in message
    assert isinstance(caught.value, PlanError)  # shown to users like every other planning error


def test_adapter_refuses_a_changed_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations import accelerate as hf_accelerate

    def changed(model, device_map, max_memory):  # hf_quantizer dropped
        raise AssertionError("must not be called")

    monkeypatch.setattr(hf_accelerate, "_get_device_map", changed)
    with pytest.raises(TransformersCompatError, match=r"now takes \(model, device_map, max_memory\)"):
        auto_device_map(None, None)


def test_adapter_warns_outside_the_tested_range_and_still_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers.integrations import accelerate as hf_accelerate

    calls = []

    def same_signature(model, device_map, max_memory, hf_quantizer):
        calls.append((model, device_map, max_memory, hf_quantizer))
        return {"": "cpu"}

    monkeypatch.setattr(hf_accelerate, "_get_device_map", same_signature)
    monkeypatch.setattr(hf_compat, "installed_transformers", lambda: Version("5.30.0"))
    with pytest.warns(UserWarning, match=r"transformers 5\.30\.0 is outside the range"):
        assert auto_device_map("model", {"cpu": 5}) == {"": "cpu"}
    assert calls == [("model", "auto", {"cpu": 5}, None)]


def test_installed_transformers_is_in_the_tested_range() -> None:
    first, last = TESTED_TRANSFORMERS
    assert first <= installed_transformers() < last
    assert Version(PINNED_TRANSFORMERS) == first
