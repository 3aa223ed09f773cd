"""A persistent cache of ``.bin`` checkpoints converted once to safetensors.

With layers on disk, ``from_pretrained`` rewrites every offloaded weight of a ``.bin`` checkpoint
into the offload folder on every load, since only safetensors can be read in place. Converted once
into a cache keyed by model, revision and dtype, later loads read the cache directly and the disk
tier memory-maps it. Safe against concurrent use (a file lock per entry) and interruption (built in
a staging folder, renamed into place when complete; leftovers are counted and cleaned). Always
right: a Hub model is keyed by its resolved commit; a local folder by its content; only the
checkpoint's own weight files are converted; safetensors in another dtype than requested are
converted (cast) too, since only same-dtype weights can be memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from optdemo.core.errors import CacheInUseError
from optdemo.core.paths import cache_dir
from optdemo.system.hardware import peak_rss_bytes
from optdemo.weights.disk_full import disk_full_error, is_disk_full

_WEIGHT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth", ".msgpack", ".h5", ".ckpt")
_COMPLETE_MARKER = ".optdemo-complete"
_STAGING = ".converting-"  # + the entry's name + a random suffix
_HASHED_FILE_BYTES = 16 * 2**20  # files up to this size join the key by content, larger by size/time
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_SAFETENSORS_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
BIN_WEIGHTS, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
SAFETENSORS_WEIGHTS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"


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
    """Where the conversion of ``model`` in ``dtype`` lives: keyed by ``revision`` (for a Hub model,
    the resolved commit) or, for a local ``source_dir``, by its content (:func:`local_fingerprint`)."""
    key = f"{model}@{revision or 'main'}:{dtype}"
    if source_dir is not None:
        key += local_fingerprint(source_dir)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", model.strip("/"))[-60:]
    return converted_root() / f"{slug}--{dtype}--{digest}"


def local_fingerprint(folder: str) -> str:
    """What identifies a local checkpoint's content: the exact bytes of every small file (config,
    tokenizer, index) and the name, size and modification time of every large one (weights)."""
    parts = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        stat = os.stat(path)
        if stat.st_size <= _HASHED_FILE_BYTES:
            with open(path, "rb") as handle:
                parts.append([name, hashlib.sha256(handle.read()).hexdigest()])
        else:
            parts.append([name, stat.st_size, stat.st_mtime_ns])
    return json.dumps(parts)


def bin_weight_files(folder: str) -> list[str]:
    """The ``.bin`` weight files of a checkpoint folder: those its index names, else
    ``pytorch_model.bin``; never other pickles (``training_args.bin``, ``adapter_model.bin``)."""
    index = Path(folder) / BIN_INDEX
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [BIN_WEIGHTS] if (Path(folder) / BIN_WEIGHTS).exists() else []


def safetensors_weight_files(folder: str) -> list[str]:
    """The safetensors weight files of a checkpoint folder (index-named, or ``model.safetensors``)."""
    index = Path(folder) / SAFETENSORS_INDEX
    if index.exists():
        return sorted(set(json.loads(index.read_text())["weight_map"].values()))
    return [SAFETENSORS_WEIGHTS] if (Path(folder) / SAFETENSORS_WEIGHTS).exists() else []


def is_bin_checkpoint(folder: str) -> bool:
    """A folder whose weights are ``.bin`` pickles (and no safetensors weights)."""
    return bool(bin_weight_files(folder)) and not safetensors_weight_files(folder)


def stored_dtype(folder: str) -> str | None:
    """The floating dtype a safetensors checkpoint stores (``float16``...), read from the first
    shard's header only; None when unknown."""
    files = safetensors_weight_files(folder)
    if not files:
        return None
    with open(Path(folder) / files[0], "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    kinds = {info["dtype"] for name, info in header.items() if name != "__metadata__"}
    floats = [_SAFETENSORS_DTYPES[k] for k in kinds if k in _SAFETENSORS_DTYPES]
    return floats[0] if len(floats) == 1 else None


def resolve_commit(
    repo: str, revision: str | None, token: str | None = None, ask_hub: bool = False
) -> str | None:
    """The commit ``revision`` of a Hub repo stands for: itself when it is a commit hash; the Hub's
    answer when ``ask_hub`` (and not offline); else what this machine last saw (the Hugging Face
    cache's refs, or the commit recorded at our last conversion). None when nothing is known."""
    if revision and _COMMIT_RE.fullmatch(revision):
        return revision
    if ask_hub and not os.environ.get("HF_HUB_OFFLINE"):
        from huggingface_hub import HfApi

        try:
            return HfApi().model_info(repo, revision=revision, token=token, timeout=10).sha
        except Exception:  # noqa: BLE001 - unreachable or refused: fall back to what we saw last
            pass
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip() or None
    return _recorded_commits().get(f"{repo}@{revision or 'main'}")


def remember_commit(repo: str, revision: str | None, commit: str) -> None:
    """Record which commit ``revision`` resolved to at a conversion, for offline loads."""
    with FileLock(str(_commits_path()) + ".lock"):
        commits = _recorded_commits()
        commits[f"{repo}@{revision or 'main'}"] = commit
        _commits_path().parent.mkdir(parents=True, exist_ok=True)
        _commits_path().write_text(json.dumps(commits, indent=2))


def _commits_path() -> Path:
    return converted_root() / "commits.json"


def _recorded_commits() -> dict[str, str]:
    try:
        return json.loads(_commits_path().read_text())
    except (OSError, ValueError):
        return {}


def cached(
    model: str, revision: str | None, dtype: str, source_dir: str | None = None, commit: str | None = None
) -> Path | None:
    """The complete cache entry for this checkpoint, or None. A Hub model's entry is the one of
    ``commit`` (resolved from this machine's records when not given: no network)."""
    if source_dir is None:
        commit = commit or resolve_commit(model, revision)
        if commit is None:
            return None
        revision = commit
    path = entry_path(model, revision, dtype, source_dir)
    return path if (path / _COMPLETE_MARKER).exists() else None


# progress(shards done, shard count, bytes done, bytes in all): called before and after each shard.
ShardProgress = Callable[[int, int, int, int], None]
# transform(a shard's tensors by name) -> the tensors to write in their place.
ShardTransform = Callable[[dict], dict]
QUANTIZATION_INFO = "optdemo-quantization.json"


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
        model, revision, dtype: the cache key (for a Hub model, ``revision`` is the commit).
        source_dir: the folder holding the weights (a Hub snapshot or a local model): ``.bin``
            shards, or safetensors ones in another dtype.
        local: the model is a local folder, so its content joins the key.
        progress: told the shards and bytes converted so far (for the page's status line).
    """
    target = entry_path(model, revision, dtype, source_dir if local else None)
    return _ensure_entry(
        target,
        {"model": model, "revision": revision or "main", "dtype": dtype},
        lambda staging: convert_checkpoint(source_dir, staging, dtype, progress),
        (source_dir, "about", dtype),
    )


def ensure_quantized(
    model: str,
    revision: str | None,
    scheme: str,
    source_dir: str,
    local: bool,
    transform: ShardTransform,
    progress: ShardProgress | None = None,
) -> Path:
    """The cached quantized copy of the checkpoint in ``source_dir``, quantized first if needed (once,
    shard by shard by ``transform``, even with concurrent callers) in :func:`ensure_converted`'s cache
    keyed by the stored format; the entry records the time and peak memory (:func:`quantization_info`).
    A full disk is reported with the bfloat16 size as the most needed."""
    from optdemo.weights.quantize import save_aligned, scheme_key

    key = scheme_key(scheme)
    target = entry_path(model, revision, key, source_dir if local else None)

    def build(staging: Path) -> None:
        started = time.perf_counter()
        convert_checkpoint(source_dir, staging, "bfloat16", progress, transform, save_aligned)
        seconds, peak = time.perf_counter() - started, peak_rss_bytes()  # peak: it never held the model
        info = {"scheme": scheme, "format": key, "quantize_seconds": seconds, "peak_rss_bytes": peak}
        (staging / QUANTIZATION_INFO).write_text(json.dumps(info, indent=2))

    meta = {"model": model, "revision": revision or "main", "dtype": key}
    return _ensure_entry(target, meta, build, (source_dir, "up to", "bfloat16"))


def quantization_info(folder: str | Path) -> dict | None:
    """What a quantized cache entry records (scheme, stored format, one-time quantization
    seconds), or None for any other checkpoint."""
    try:
        return json.loads((Path(folder) / QUANTIZATION_INFO).read_text())
    except (OSError, ValueError):
        return None


def _ensure_entry(
    target: Path, meta: dict, build: Callable[[Path], None], needs: tuple[str, str, str]
) -> Path:
    """The complete cache entry ``target``, built first by ``build(staging folder)`` when missing:
    under the entry's file lock (one process builds, the others wait, then reuse), in a staging
    folder renamed into place only when complete (a killed build's leftovers are removed).

    Raises:
        LoadError: the disk filled up, with the room ``needs`` (source folder, "about"/"up to", dtype).
    """
    if (target / _COMPLETE_MARKER).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A lock file per entry: one process (or thread) converts, the others wait, then reuse.
    with FileLock(_lock_path(target)):
        if (target / _COMPLETE_MARKER).exists():  # another process finished it while we waited
            return target
        for leftover in target.parent.glob(f"{_STAGING}{target.name}-*"):
            shutil.rmtree(leftover, ignore_errors=True)  # a killed conversion's: we hold the lock
        try:
            _build_entry(target, meta, build)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            source, bound, dtype = needs  # the staging folder is gone: the free space is what's left
            raise disk_full_error(target.parent, _shards(source), dtype, bound) from None
    return target


def _build_entry(target: Path, meta: dict, build: Callable[[Path], None]) -> None:
    """Build ``target`` in a staging folder renamed into place when complete, else removed."""
    staging = Path(tempfile.mkdtemp(prefix=f"{_STAGING}{target.name}-", dir=target.parent))
    try:
        build(staging)
        (staging / _COMPLETE_MARKER).write_text(json.dumps(meta))
        if target.exists():
            shutil.rmtree(target)  # a stale, incomplete entry from an interrupted run
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def convert_checkpoint(
    source_dir: str,
    dest: Path,
    dtype: str,
    progress: ShardProgress | None = None,
    transform: ShardTransform | None = None,
    save: Callable[..., None] | None = None,
) -> None:
    """Write ``source_dir``'s weight shards (``.bin``, or safetensors in another dtype) as
    safetensors shards cast to ``dtype`` (or turned into what ``transform`` returns, written by
    ``save``) into ``dest``, with the index and every non-weight file (config, tokenizer) copied
    alongside. One shard is in memory at a time."""
    import torch
    from safetensors.torch import save_file

    save = save or save_file
    target_dtype = getattr(torch, dtype)
    transform = transform or (lambda state: _cast(state, target_dtype))
    index_path = Path(source_dir) / (BIN_INDEX if is_bin_checkpoint(source_dir) else SAFETENSORS_INDEX)
    index = json.loads(index_path.read_text()) if index_path.exists() else None
    shards = [path.name for path in _shards(source_dir)]
    written: dict[str, str] = {}  # tensor name -> the shard it was written to
    sizes = [os.path.getsize(Path(source_dir) / shard) for shard in shards]
    report = progress or (lambda done, count, done_bytes, total_bytes: None)
    for number, shard in enumerate(shards):
        report(number, len(shards), sum(sizes[:number]), sum(sizes))
        state = _read_shard(Path(source_dir) / shard)
        tensors = _unshared(transform(state))
        out_name = (
            SAFETENSORS_WEIGHTS
            if index is None
            else shard.replace("pytorch_model", "model").replace(".bin", ".safetensors")
        )
        save(tensors, dest / out_name, metadata={"format": "pt"})
        written.update(dict.fromkeys(tensors, out_name))
        del state, tensors
    report(len(shards), len(shards), sum(sizes), sum(sizes))
    if index is not None:
        index["weight_map"] = written
        (dest / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2))
    for name in os.listdir(source_dir):
        source = Path(source_dir) / name
        if (
            source.is_file()
            and not name.endswith(_WEIGHT_SUFFIXES)
            and name not in (BIN_INDEX, SAFETENSORS_INDEX)
        ):
            shutil.copy2(source, dest / name)
    config_path = dest / "config.json"
    if config_path.exists():  # the copy now holds this dtype
        config = json.loads(config_path.read_text())
        config["torch_dtype"] = dtype
        config.pop("dtype", None)
        config_path.write_text(json.dumps(config, indent=2))


def _shards(source_dir: str) -> list[Path]:
    """The weight files a conversion of ``source_dir`` reads: its ``.bin`` ones, else safetensors."""
    from_bin = is_bin_checkpoint(source_dir)
    names = bin_weight_files(source_dir) if from_bin else safetensors_weight_files(source_dir)
    return [Path(source_dir) / name for name in names]


def _cast(state: dict, dtype: Any) -> dict:
    """A shard's tensors with the floating ones cast to ``dtype``."""
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}


def _unshared(tensors: dict) -> dict:
    """Contiguous tensors, each with its own memory: safetensors refuses tensors that share memory
    (tied weights saved twice), so the second of such a pair is copied."""
    seen: set[int] = set()
    result = {}
    for name, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr()
        result[name] = tensor.clone() if pointer in seen else tensor.contiguous()
        seen.add(pointer)
    return result


def _read_shard(path: Path) -> dict:
    """A shard's tensors: a ``.bin`` pickle memory-mapped where torch allows, or safetensors."""
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _lock_path(target: Path) -> str:
    return str(target.with_name(target.name + ".lock"))


def interrupted_conversions() -> list[Path]:
    """Staging folders left by conversions that were killed (none holds its entry's lock now)."""
    root = converted_root()
    stale = []
    for staging in sorted(root.glob(f"{_STAGING}*")) if root.exists() else []:
        name = staging.name.removeprefix(_STAGING).rsplit("-", 1)[0]
        lock = FileLock(_lock_path(root / name), timeout=0)
        try:
            with lock:
                stale.append(staging)
        except Timeout:
            continue  # a conversion is running right now: its staging folder is not left over
    return stale


def folder_bytes(folder: Path) -> int:
    """Total size of the files under ``folder``."""
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


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
            size = folder_bytes(path)
            entries.append(CacheEntry(path, meta["model"], meta["revision"], meta["dtype"], size))
    return entries


def clear_cache(in_use: str | None = None) -> int:
    """Delete every converted checkpoint and every interrupted conversion's leftovers; returns the
    bytes freed.

    Raises:
        CacheInUseError: ``in_use`` (the loaded model's checkpoint) lies in the cache.
    """
    root = converted_root()
    if in_use and Path(in_use).resolve().is_relative_to(root.resolve()):
        raise CacheInUseError(
            f"the loaded model reads its weights from the conversion cache ({in_use}): unload it "
            "first, then clear the cache"
        )
    freed = 0
    for entry in cache_entries():
        shutil.rmtree(entry.path, ignore_errors=True)
        freed += entry.bytes
    return freed + clear_interrupted()


def clear_interrupted() -> int:
    """Delete what killed conversions left (never a running conversion's folder, nor a complete
    entry); returns the bytes freed."""
    stale = interrupted_conversions()
    freed = sum(folder_bytes(path) for path in stale)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return freed
