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


# ---------------------------------------------------------------------------------- a full disk
DISK_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors 0.8's


def _disk_usage_with_free(monkeypatch, free: int) -> None:
    """``shutil.disk_usage`` says ``free`` bytes are free on every disk."""
    real = shutil.disk_usage

    def usage(path):
        total, used, _ = real(path)
        return type(real(path))(total, used, free)

    monkeypatch.setattr(shutil, "disk_usage", usage)


def _tensor_bytes(folder: Path) -> int:
    """What the .bin checkpoint's tensors take in float32 (their stored dtype)."""
    import torch

    shards = [torch.load(f, weights_only=True) for f in sorted(folder.glob("pytorch_model-*.bin"))]
    return sum(t.numel() * t.element_size() for shard in shards for t in shard.values())


def test_a_full_disk_during_conversion_says_so_and_leaves_nothing(
    tiny_bin_model_dir, fresh_cache, monkeypatch
):
    import safetensors.torch
    from safetensors import SafetensorError

    from optdemo.core.budget import format_bytes
    from optdemo.core.errors import LoadError

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")  # what a write that ran out of room leaves
        raise SafetensorError(DISK_FULL)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    _disk_usage_with_free(monkeypatch, 3 * 2**20)
    folder = str(tiny_bin_model_dir)
    with pytest.raises(LoadError) as caught:
        convert.ensure_converted(folder, None, "float32", folder, local=True)
    message = str(caught.value)
    needed = format_bytes(_tensor_bytes(tiny_bin_model_dir))
    assert message == (
        f"the disk at {convert.converted_root()} is full: 3 MiB free, the conversion needs about "
        f"{needed}: free space or choose another cache folder (OPTDEMO_CACHE)"
    )
    assert "corrupt" not in message and "save the model again" not in message
    # No partial entry: the staging folder is gone, nothing counts as cached or interrupted.
    assert not list(convert.converted_root().glob(".converting-*"))
    assert convert.cached(folder, None, "float32", folder) is None
    assert convert.interrupted_conversions() == [] and convert.cache_entries() == []


def test_a_full_disk_while_quantizing_says_so(tiny_model_dir, fresh_cache, monkeypatch):
    import errno

    from optdemo.core.errors import LoadError
    from optdemo.weights import quantize

    def full(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(quantize, "save_aligned", full)
    folder = str(tiny_model_dir)
    with pytest.raises(LoadError, match=r"^the disk at .* is full: .* free, the conversion needs up to "):
        convert.ensure_quantized(folder, None, "8bit", folder, True, lambda state: state)
    assert not list(convert.converted_root().glob(".converting-*"))


def test_other_write_errors_are_not_taken_for_a_full_disk(tiny_bin_model_dir, fresh_cache, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def denied(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)")

    monkeypatch.setattr(safetensors.torch, "save_file", denied)
    folder = str(tiny_bin_model_dir)
    with pytest.raises(SafetensorError, match="Permission denied"):
        convert.ensure_converted(folder, None, "float32", folder, local=True)
    assert not list(convert.converted_root().glob(".converting-*"))


@pytest.mark.parametrize(
    ("error", "full"),
    [
        ("SafetensorError:" + DISK_FULL, True),
        ("SafetensorError:Error while serializing: I/O error: Disk quota exceeded (os error 122)", True),
        ("SafetensorError:Error while deserializing header: HeaderTooLarge", False),
        ("SafetensorError:Error while serializing: I/O error: Permission denied (os error 13)", False),
        ("OSError:28", True),
        ("OSError:122", True),
        ("OSError:13", False),
        ("ValueError:No space left on device", False),  # only write errors count
    ],
)
def test_what_counts_as_a_full_disk(error: str, full: bool) -> None:
    from safetensors import SafetensorError

    from optdemo.weights.disk_full import is_disk_full

    kind, _, detail = error.partition(":")
    if kind == "OSError":
        exc: BaseException = OSError(int(detail), os.strerror(int(detail)))
    else:
        exc = {"SafetensorError": SafetensorError, "ValueError": ValueError}[kind](detail)
    assert is_disk_full(exc) is full


# ---------------------------------------------------------------------------------- the command line
def test_cache_command_lists_interrupted_conversions_and_how_to_remove_them(
    tiny_bin_model_dir, fresh_cache, capsys
):
    from optdemo.__main__ import main

    folder = str(tiny_bin_model_dir)
    entry = convert.ensure_converted(folder, None, "float32", folder, local=True)
    left = entry.parent / f".converting-{entry.name}-abc123"
    left.mkdir()
    (left / "model-00001-of-00002.safetensors").write_bytes(b"x" * 3000)
    (left / "model-00002-of-00002.safetensors").write_bytes(b"x" * 72)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "1 converted checkpoint(s)" in out
    assert f"3 KiB  interrupted conversion (a killed load's leftovers)  {left}" in out
    assert "1 interrupted conversion(s) left 3 KiB: remove them with" in out
    assert "python -m optdemo cache --clear-interrupted" in out
    assert main(["cache", "--clear-interrupted"]) == 0
    assert "freed 3 KiB" in capsys.readouterr().out
    assert not left.exists() and convert.cache_entries()  # the complete entry stays
    assert main(["cache"]) == 0
    assert "interrupted" not in capsys.readouterr().out
