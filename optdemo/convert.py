"""A persistent cache of ``.bin`` checkpoints converted once to safetensors.

The facebook/opt-* main branches hold ``pytorch_model*.bin`` pickles. With layers on disk,
``from_pretrained`` must then rewrite every offloaded weight into the offload folder on *every*
load, because only safetensors can be read in place. Converting once, into a cache keyed by
model, revision and dtype, makes later loads (in new processes too) read the cache directly: they
write nothing, and the disk tier can memory-map the weights (see :mod:`optdemo.offload`).

The cache is safe against concurrent use (a file lock per entry) and interruption (an entry is
built in a temporary folder and renamed into place only when complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from optdemo.paths import cache_dir

_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")
_COMPLETE_MARKER = ".optdemo-complete"


@dataclass(frozen=True)
class CacheEntry:
    """One converted checkpoint in the cache."""

    path: Path
    model: str
    revision: str
    dtype: str
    bytes: int


def converted_root() -> Path:
    """The cache's folder: ``$OPTDEMO_CACHE/converted``."""
    return cache_dir() / "converted"


def entry_path(model: str, revision: str | None, dtype: str, source_dir: str | None = None) -> Path:
    """Where the conversion of ``model`` at ``revision`` in ``dtype`` lives. A local source folder
    is keyed by its path and the size and time of its weight files, so editing it invalidates."""
    key = f"{model}@{revision or 'main'}:{dtype}"
    if source_dir is not None:
        stamps = sorted(
            (
                name,
                os.stat(os.path.join(source_dir, name)).st_size,
                os.stat(os.path.join(source_dir, name)).st_mtime_ns,
            )
            for name in os.listdir(source_dir)
            if name.endswith(".bin")
        )
        key += json.dumps(stamps)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", model.strip("/"))[-60:]
    return converted_root() / f"{slug}--{dtype}--{digest}"


def is_bin_checkpoint(folder: str) -> bool:
    """A folder with ``.bin`` weights and no safetensors ones."""
    names = os.listdir(folder)
    return any(n.endswith(".bin") for n in names) and not any(n.endswith(".safetensors") for n in names)


def cached(model: str, revision: str | None, dtype: str, source_dir: str | None = None) -> Path | None:
    """The complete cache entry for this checkpoint, or None."""
    path = entry_path(model, revision, dtype, source_dir)
    return path if (path / _COMPLETE_MARKER).exists() else None


# progress(shards done, shard count, bytes done, bytes in all): called before and after each shard.
ShardProgress = Callable[[int, int, int, int], None]


def ensure_converted(
    model: str,
    revision: str | None,
    dtype: str,
    source_dir: str,
    local: bool,
    progress: ShardProgress | None = None,
) -> Path:
    """Return the cached safetensors copy of the ``.bin`` checkpoint in ``source_dir``, converting
    it first if needed (once, even with concurrent callers).

    Args:
        model, revision, dtype: the cache key.
        source_dir: the folder holding the ``.bin`` shards (a Hub snapshot or a local model).
        local: the model is a local folder, so its files' sizes and times join the key.
        progress: told the shards and bytes converted so far (for the page's status line).
    """
    target = entry_path(model, revision, dtype, source_dir if local else None)
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A lock file per entry: one process (or thread) converts, the others wait, then reuse.
    with FileLock(target.with_name(target.name + ".lock")):
        if (target / _COMPLETE_MARKER).exists():  # another process finished it while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
        try:
            convert_checkpoint(source_dir, staging, dtype, progress)
            (staging / _COMPLETE_MARKER).write_text(
                json.dumps({"model": model, "revision": revision or "main", "dtype": dtype})
            )
            if target.exists():
                shutil.rmtree(target)  # a stale, incomplete entry from an interrupted run
            staging.rename(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def convert_checkpoint(
    source_dir: str, dest: Path, dtype: str, progress: ShardProgress | None = None
) -> None:
    """Write ``source_dir``'s ``.bin`` shards as safetensors shards (cast to ``dtype``) into
    ``dest``, with the index and every non-weight file (config, tokenizer) copied alongside.
    One shard is in memory at a time, memory-mapped from the pickle where torch allows."""
    import torch
    from safetensors.torch import save_file

    target_dtype = getattr(torch, dtype)
    index_path = Path(source_dir) / "pytorch_model.bin.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
        shards = sorted(set(index["weight_map"].values()))
    else:
        index, shards = None, [n for n in os.listdir(source_dir) if n.endswith(".bin")][:1]
    renamed = {}
    sizes = [os.path.getsize(Path(source_dir) / shard) for shard in shards]
    report = progress or (lambda done, count, done_bytes, total_bytes: None)
    for number, shard in enumerate(shards):
        report(number, len(shards), sum(sizes[:number]), sum(sizes))
        state = torch.load(Path(source_dir) / shard, map_location="cpu", mmap=True, weights_only=True)
        seen: set[int] = set()
        tensors = {}
        for name, tensor in state.items():
            tensor = tensor.to(target_dtype) if tensor.is_floating_point() else tensor
            # safetensors refuses tensors that share memory (tied weights saved twice): copy those.
            pointer = tensor.untyped_storage().data_ptr()
            tensors[name] = tensor.clone() if pointer in seen else tensor.contiguous()
            seen.add(pointer)
        out_name = (
            "model.safetensors"
            if index is None
            else shard.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        )
        save_file(tensors, dest / out_name, metadata={"format": "pt"})
        renamed[shard] = out_name
        del state, tensors
    report(len(shards), len(shards), sum(sizes), sum(sizes))
    if index is not None:
        index["weight_map"] = {k: renamed[v] for k, v in index["weight_map"].items()}
        (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name in os.listdir(source_dir):
        source = Path(source_dir) / name
        if source.is_file() and not name.endswith(_WEIGHT_SUFFIXES) and name != index_path.name:
            shutil.copy2(source, dest / name)
    config_path = dest / "config.json"
    if config_path.exists():  # the copy now holds this dtype
        config = json.loads(config_path.read_text())
        config["torch_dtype"] = dtype
        config.pop("dtype", None)
        config_path.write_text(json.dumps(config, indent=2))


def cache_entries() -> list[CacheEntry]:
    """Everything in the cache, with sizes (for the UI and ``python -m optdemo cache``)."""
    root = converted_root()
    entries = []
    if root.exists():
        for path in sorted(root.iterdir()):
            marker = path / _COMPLETE_MARKER
            if not marker.exists():
                continue
            meta = json.loads(marker.read_text())
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            entries.append(CacheEntry(path, meta["model"], meta["revision"], meta["dtype"], size))
    return entries


def clear_cache() -> int:
    """Delete every converted checkpoint; returns the bytes freed."""
    freed = sum(entry.bytes for entry in cache_entries())
    shutil.rmtree(converted_root(), ignore_errors=True)
    return freed
