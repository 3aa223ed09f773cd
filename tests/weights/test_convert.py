"""The conversion cache is always right: keyed by the Hub commit and by a local folder's content,
converting only the checkpoint's own weight files, re-casting safetensors stored in another dtype
(so disk layers really are memory-mapped), refusing to clear what the loaded model reads, and
cleaning what killed conversions leave behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from optdemo.core.errors import CacheInUseError
from optdemo.core.load_config import LoadConfig
from optdemo.weights import convert

pytestmark = pytest.mark.slow

SHA1, SHA2 = "1" * 40, "2" * 40


def _single_bin(tiny_model_dir: Path, dest: Path) -> Path:
    """A single-file ``pytorch_model.bin`` checkpoint beside pickles that are not its weights."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(tiny_model_dir, dest)
    torch.save(load_file(dest / "model.safetensors"), dest / "pytorch_model.bin")
    (dest / "model.safetensors").unlink()
    torch.save({"learning_rate": 0.1}, dest / "training_args.bin")
    torch.save({"lora_A": torch.zeros(2, 2)}, dest / "adapter_model.bin")
    return dest


def test_only_the_checkpoints_own_weight_files_are_converted(tiny_model_dir, tmp_path, fresh_cache):
    from safetensors import safe_open

    folder = _single_bin(tiny_model_dir, tmp_path / "single")
    assert convert.bin_weight_files(str(folder)) == ["pytorch_model.bin"]
    out = convert.ensure_converted(str(folder), None, "float32", str(folder), local=True)
    with safe_open(str(out / "model.safetensors"), "pt") as converted:
        names = set(converted.keys())
    assert "model.decoder.layers.0.fc1.weight" in names
    assert not {"learning_rate", "lora_A"} & names
    assert not list(out.glob("*.bin"))
    # A folder holding only other pickles is not a .bin checkpoint at all.
    only_others = tmp_path / "others"
    only_others.mkdir()
    for name in ("training_args.bin", "adapter_model.bin", "config.json"):
        shutil.copy(folder / name, only_others / name)
    assert not convert.is_bin_checkpoint(str(only_others))


def test_a_local_folder_is_keyed_by_its_content(tiny_bin_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bin_model_dir, folder)
    before = convert.entry_path(str(folder), None, "float32", str(folder))
    config = folder / "config.json"
    stat = config.stat()
    # Same size and time, other content (a different architecture field): a different entry.
    text = config.read_text()
    config.write_text(text.replace('"relu"', '"gelu"') if '"relu"' in text else text.replace("2", "3", 1))
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert config.read_text() != text
    assert convert.entry_path(str(folder), None, "float32", str(folder)) != before
    config.write_text(text)
    assert convert.entry_path(str(folder), None, "float32", str(folder)) == before
    (folder / "vocab.json").write_text((folder / "vocab.json").read_text() + " ")  # the tokenizer
    assert convert.entry_path(str(folder), None, "float32", str(folder)) != before


def test_a_hub_model_is_keyed_by_the_commit_main_points_to(tmp_path, fresh_cache, monkeypatch):
    from huggingface_hub import constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    refs = hub / "models--facebook--opt-125m" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(SHA1)
    entry = convert.entry_path("facebook/opt-125m", SHA1, "float16")
    entry.mkdir(parents=True)
    (entry / ".optdemo-complete").write_text("{}")
    assert convert.cached("facebook/opt-125m", None, "float16") == entry
    assert convert.cached("facebook/opt-125m", SHA1, "float16") == entry
    # main moved: the conversion of the old commit is not served for it.
    (refs / "main").write_text(SHA2)
    assert convert.cached("facebook/opt-125m", None, "float16") is None
    assert convert.cached("facebook/opt-125m", SHA1, "float16") == entry  # pinned commits still hit
    # Without the Hugging Face cache, the commit recorded at our conversion is used (offline loads).
    shutil.rmtree(hub)
    assert convert.cached("facebook/opt-125m", None, "float16") is None
    convert.remember_commit("facebook/opt-125m", None, SHA1)
    assert convert.cached("facebook/opt-125m", None, "float16") == entry


def test_safetensors_in_another_dtype_are_recast_so_disk_layers_map(
    manager, tiny_model_dir, tmp_path, fresh_cache
):
    from optdemo.plan.planner import plan_device_map

    assert convert.stored_dtype(str(tiny_model_dir)) == "float32"
    config = LoadConfig(
        str(tiny_model_dir), dtype="float16", max_memory="cpu=300KiB", offload_folder=str(tmp_path / "off")
    )
    assert plan_device_map(config).conversion_bytes > 0  # the plan says the first load converts
    report = manager.load(config)
    assert Path(report.checkpoint).is_relative_to(convert.converted_root())
    assert convert.stored_dtype(report.checkpoint) == "float16"
    # The plan promised memory-mapped disk weights; they are.
    assert report.disk_tier.mapped_modules > 0 and report.disk_tier.mapped_bytes > 0
    manager.unload()
    assert plan_device_map(config).conversion_bytes == 0  # converted once


def test_clearing_the_cache_the_loaded_model_reads_is_refused(
    manager, tiny_bin_model_dir, tmp_path, fresh_cache
):
    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings

    service = DemoService(manager, AppSettings())
    manager.load(LoadConfig(str(tiny_bin_model_dir), max_memory="cpu=900KiB"))
    with pytest.raises(CacheInUseError, match="unload it first, then clear the cache"):
        service.clear_conversion_cache()
    assert convert.cache_entries()  # nothing was deleted
    manager.unload()
    assert service.clear_conversion_cache() > 0
    assert convert.cache_entries() == []


def test_killed_conversions_are_counted_and_cleaned(tiny_bin_model_dir, fresh_cache):
    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings
    from optdemo.runtime.manager import ModelManager

    target = convert.entry_path(str(tiny_bin_model_dir), None, "float32", str(tiny_bin_model_dir))
    target.parent.mkdir(parents=True)
    left = target.parent / f".converting-{target.name}-abc123"
    left.mkdir()
    (left / "model-00001-of-00002.safetensors").write_bytes(b"x" * 1000)
    running = target.parent / ".converting-other-entry-def456"
    running.mkdir()
    with FileLock(str(target.parent / "other-entry.lock")):  # a conversion in progress elsewhere
        assert convert.interrupted_conversions() == [left]
        service = DemoService(ModelManager(), AppSettings())
        assert "1 interrupted conversion(s) left 1000 B" in service.conversion_cache()
        assert convert.clear_cache() == 1000
        assert not left.exists() and running.exists()
    # A new conversion of the same entry also sweeps its own leftovers first.
    left.mkdir()
    convert.ensure_converted(str(tiny_bin_model_dir), None, "float32", str(tiny_bin_model_dir), local=True)
    assert not left.exists() and convert.cached(
        str(tiny_bin_model_dir), None, "float32", str(tiny_bin_model_dir)
    )
