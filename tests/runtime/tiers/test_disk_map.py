"""The memory-mapped disk tier: the same tokens as plain Accelerate, no hooks on mapped layers, and
``.bin`` checkpoints converted once (equal tensors, once under concurrency, nothing left by an
interrupted conversion)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from optdemo.core.generation import GenerationParams
from optdemo.core.load_config import LoadConfig
from optdemo.runtime.manager import ModelManager
from optdemo.weights import convert

GREEDY = GenerationParams(max_new_tokens=24, temperature=0)


SPLIT = "cpu=700KiB"  # the tiny model: embeddings and a layer in RAM, five layers on disk


def _greedy_text(manager: ModelManager, config: LoadConfig) -> str:
    manager.load(config)
    *_, last = manager.stream_completion("The quick brown fox", GREEDY)
    return last.text


@pytest.mark.slow
@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_bin_model_dir"])
def test_fast_offload_keeps_outputs_identical(fixture, request, manager, tmp_path, fresh_cache):
    model_dir = str(request.getfixturevalue(fixture))
    in_ram = _greedy_text(manager, LoadConfig(model_dir))
    plain = _greedy_text(
        manager,
        LoadConfig(model_dir, max_memory=SPLIT, offload_folder=str(tmp_path / "a"), fast_offload=False),
    )
    fast_config = LoadConfig(model_dir, max_memory=SPLIT, offload_folder=str(tmp_path / "b"))
    fast = _greedy_text(manager, fast_config)
    status = manager.status()
    assert "disk" in status.device_map.values()
    assert in_ram == plain == fast
    assert len(fast) > 0


@pytest.mark.slow
def test_disk_tier_is_memory_mapped_and_hook_free(manager, tiny_model_dir, tmp_path):
    report = manager.load(LoadConfig(str(tiny_model_dir), max_memory=SPLIT, offload_folder=str(tmp_path)))
    disk_modules = [name for name, device in report.device_map.items() if device == "disk"]
    assert report.disk_tier is not None and report.disk_tier.mapped_bytes == report.bytes_per_device["disk"]
    model = manager._loaded.model
    maps = Path("/proc/self/maps").read_text().splitlines()
    checkpoint = str(Path(tiny_model_dir) / "model.safetensors")
    regions = [
        tuple(int(x, 16) for x in line.split()[0].split("-")) for line in maps if line.endswith(checkpoint)
    ]
    for name in disk_modules:
        module = model.get_submodule(name)
        for param_name, param in module.named_parameters():
            assert param.device.type == "cpu", param_name
            pointer = param.data_ptr()
            assert any(start <= pointer < end for start, end in regions), f"{name}.{param_name} was copied"
        assert not any(
            hasattr(m, "_hf_hook") and m._hf_hook.offload for m in module.modules() if hasattr(m, "_hf_hook")
        )
    assert report.to_dict()["disk_tier"]["memory_mapped_bytes"] == report.bytes_per_device["disk"]


@pytest.mark.slow
def test_bin_checkpoint_converted_once_then_nothing_written(
    manager, tiny_bin_model_dir, tmp_path, fresh_cache
):
    offload = tmp_path / "offload"
    config = LoadConfig(str(tiny_bin_model_dir), max_memory=SPLIT, offload_folder=str(offload))
    plan = manager.plan(config)
    assert plan.checkpoint_format == "bin"
    assert plan.disk_bytes_written == 0 and plan.conversion_bytes == plan.total_bytes
    first = manager.load(config)
    assert first.checkpoint.startswith(str(convert.converted_root()))
    assert not offload.exists() or not any(offload.iterdir())
    manager.unload()
    assert manager.plan(config).conversion_bytes == 0  # cached now
    second = manager.load(config)
    assert second.checkpoint == first.checkpoint
    assert second.device_map == plan.device_map
    assert not offload.exists() or not any(offload.iterdir())
    plain = LoadConfig(
        str(tiny_bin_model_dir), max_memory=SPLIT, offload_folder=str(offload), fast_offload=False
    )
    assert manager.plan(plain).disk_bytes_written == plan.bytes_per_device["disk"]


@pytest.mark.slow
def test_converted_tensors_equal_the_source(tiny_bin_model_dir, fresh_cache):
    from safetensors.torch import load_file

    path = convert.ensure_converted(
        str(tiny_bin_model_dir), None, "float16", str(tiny_bin_model_dir), local=True
    )
    source = {}
    for shard in Path(tiny_bin_model_dir).glob("pytorch_model-*.bin"):
        source.update(torch.load(shard, weights_only=True))
    converted = {}
    for shard in path.glob("*.safetensors"):
        converted.update(load_file(shard))
    assert set(converted) == set(source)
    for name, tensor in source.items():
        assert converted[name].dtype == torch.float16
        assert torch.equal(converted[name], tensor.to(torch.float16)), name
    assert (path / "model.safetensors.index.json").exists() and (path / "vocab.json").exists()
    entries = convert.cache_entries()
    assert [e.path for e in entries] == [path] and entries[0].dtype == "float16"
    assert entries[0].bytes == sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert convert.clear_cache() == entries[0].bytes
    assert convert.cache_entries() == []


@pytest.mark.slow
def test_conversion_runs_once_under_concurrency(tiny_bin_model_dir, fresh_cache, monkeypatch):
    calls = []
    real = convert.convert_checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "convert_checkpoint", counting)
    results: list[Path] = []
    source = str(tiny_bin_model_dir)
    threads = [
        threading.Thread(
            target=lambda: results.append(convert.ensure_converted(source, None, "float32", source, True))
        )
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(results) == 3 and len(set(results)) == 1
    assert len(calls) == 1


@pytest.mark.slow
def test_interrupted_conversion_leaves_no_entry(tiny_bin_model_dir, fresh_cache, monkeypatch):
    source = str(tiny_bin_model_dir)

    def interrupted(source_dir, dest, dtype, progress=None):
        (Path(dest) / "model-00001-of-00002.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    real = convert.convert_checkpoint
    monkeypatch.setattr(convert, "convert_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert.ensure_converted(source, None, "float32", source, True)
    assert convert.cached(source, None, "float32", source) is None
    assert convert.cache_entries() == []
    monkeypatch.setattr(convert, "convert_checkpoint", real)
    path = convert.ensure_converted(source, None, "float32", source, True)
    assert convert.cached(source, None, "float32", source) == path
