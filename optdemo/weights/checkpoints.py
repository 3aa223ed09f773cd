"""Where a load reads its weights from, so that disk layers can be read in place.

A safetensors checkpoint in the load dtype is read where it is. Anything else that would have disk
layers (``.bin`` pickles, safetensors stored in another dtype) is converted once into
:mod:`optdemo.weights.convert`'s cache, with the progress reported as shards and bytes. For a Hub model the
cache entry is the one of the commit its revision points to now (the Hub is asked unless offline;
offline, what the Hugging Face cache holds is used).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from optdemo.core.budget import format_bytes
from optdemo.core.load_config import LoadConfig
from optdemo.models import hub
from optdemo.models.source import ModelSource, hub_token
from optdemo.weights import convert

# progress(fraction or None when unknown, description)
ProgressCallback = Callable[[float | None, str], None]


def fast_checkpoint(
    config: LoadConfig, source: ModelSource, dtype: str, bar_class: Any, report: ProgressCallback
) -> str:
    """Where to load from so that disk layers can be read in place: the checkpoint itself when it
    is safetensors in the load dtype, else its converted copy in the cache (converted now if
    needed: ``.bin`` pickles, or safetensors stored in another dtype). A Hub model's copy is the one
    of the commit its revision points to now (the Hub is asked unless offline)."""
    if source.kind in ("local", "builtin"):
        folder = source.location
        if not convert.is_bin_checkpoint(folder) and convert.stored_dtype(folder) in (None, dtype):
            return folder
        hit = convert.cached(folder, config.revision, dtype, folder)
        if hit is not None:
            return str(hit)
        return str(
            convert.ensure_converted(
                folder,
                config.revision,
                dtype,
                folder,
                local=True,
                progress=_conversion_progress(config, folder, dtype, report),
            )
        )
    from huggingface_hub import HfApi, get_safetensors_metadata, snapshot_download

    repo, token = source.location, hub_token()
    offline = hub.offline_reason() is not None
    commit = convert.resolve_commit(repo, config.revision, token, ask_hub=not offline)
    hit = convert.cached(repo, config.revision, dtype, commit=commit)
    if hit is not None:
        return str(hit)  # works offline: nothing to download
    revision = commit or config.revision
    if offline:  # what the Hugging Face cache holds of it (preflight found it there)
        folder = snapshot_download(repo, revision=config.revision, local_files_only=True)
        if not convert.is_bin_checkpoint(folder) and convert.stored_dtype(folder) in (None, dtype):
            return repo
    else:
        files = HfApi().list_repo_files(repo, revision=revision, token=token)
        if any(f.endswith(".safetensors") for f in files):
            counts = get_safetensors_metadata(repo, revision=revision, token=token).parameter_count
            if {kind for kind in counts if kind in _HUB_DTYPES.values()} <= {_HUB_DTYPES.get(dtype)}:
                return repo  # stored in the load dtype: read in place
            weights = ["*.safetensors", convert.SAFETENSORS_INDEX]
        elif any(f.startswith("pytorch_model") and f.endswith(".bin") for f in files):
            weights = ["pytorch_model*.bin", convert.BIN_INDEX]  # never training_args.bin or adapters
        else:
            return repo
        folder = snapshot_download(
            repo,
            revision=revision,
            token=token,
            allow_patterns=[*weights, *_SMALL_FILES],
            tqdm_class=bar_class,
        )
    commit = os.path.basename(os.path.normpath(folder))  # snapshots/<commit>
    convert.remember_commit(repo, config.revision, commit)
    progress = _conversion_progress(config, folder, dtype, report)
    return str(convert.ensure_converted(repo, commit, dtype, folder, local=False, progress=progress))


def quantized_checkpoint(
    config: LoadConfig,
    source: ModelSource,
    transform: convert.ShardTransform,
    bar_class: Any,
    report: ProgressCallback,
) -> str:
    """The quantized copy of the model's checkpoint in the cache (``config.quantization``, the
    stored format in the key), quantized now, shard by shard, when it is not there yet. A Hub
    model's copy is the one of the commit its revision points to now; its weights are downloaded
    first when they must be quantized (the Hub is asked unless offline)."""
    from optdemo.weights.quantize import scheme_key

    key, scheme = scheme_key(config.quantization), config.quantization
    local = source.kind in ("local", "builtin")
    if local:
        folder = source.location
        hit = convert.cached(folder, config.revision, key, folder)
    else:
        from huggingface_hub import snapshot_download

        repo, token = source.location, hub_token()
        offline = hub.offline_reason() is not None
        commit = convert.resolve_commit(repo, config.revision, token, ask_hub=not offline)
        hit = convert.cached(repo, config.revision, key, commit=commit)
        if hit is None:
            revision = config.revision if offline else commit or config.revision
            folder = snapshot_download(
                repo,
                revision=revision,
                token=token,
                local_files_only=offline,
                allow_patterns=[*_weight_patterns(repo, revision, token, offline), *_SMALL_FILES],
                tqdm_class=bar_class,
            )
            convert.remember_commit(repo, config.revision, os.path.basename(os.path.normpath(folder)))
    if hit is not None:
        return str(hit)  # quantized before: works offline, nothing to download
    what = f"Quantizing {config.display_name} to {scheme} (once)"
    report(None, what)

    def shards(done: int, count: int, done_bytes: int, total_bytes: int) -> None:
        fraction = done_bytes / total_bytes if total_bytes else None
        report(fraction, f"{what}: shard {min(done + 1, count)} of {count}")

    model = source.location if local else repo
    revision = config.revision if local else os.path.basename(os.path.normpath(folder))
    return str(convert.ensure_quantized(model, revision, scheme, folder, local, transform, shards))


def _weight_patterns(repo: str, revision: str | None, token: str | None, offline: bool) -> list[str]:
    """The weight files of a Hub repository to download: its safetensors when it has them, else
    its ``pytorch_model*.bin`` (never both; offline, whichever the Hugging Face cache holds)."""
    safetensors = ["*.safetensors", convert.SAFETENSORS_INDEX]
    pickles = ["pytorch_model*.bin", convert.BIN_INDEX]  # never training_args.bin or adapters
    if offline:
        return [*safetensors, *pickles]
    from huggingface_hub import HfApi

    files = HfApi().list_repo_files(repo, revision=revision, token=token)
    return safetensors if any(f.endswith(".safetensors") for f in files) else pickles


# Files a conversion copies beside the weights (config, tokenizer, templates): small, never weights.
_SMALL_FILES = ["*.json", "*.txt", "*.model", "*.jinja"]
_HUB_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def _conversion_progress(
    config: LoadConfig, folder: str, dtype: str, report: ProgressCallback
) -> convert.ShardProgress:
    """Say that the conversion starts (what is converted into what), then word its shard and byte
    counts for the progress report."""
    if convert.is_bin_checkpoint(folder):
        what = f"Converting {config.display_name}'s .bin checkpoint to safetensors (once)"
    else:
        stored = convert.stored_dtype(folder) or "safetensors"
        what = f"Converting {config.display_name}'s {stored} weights to {dtype} (once)"
    report(None, what)

    def shards(done: int, count: int, done_bytes: int, total_bytes: int) -> None:
        fraction = done_bytes / total_bytes if total_bytes else None
        shard = f"shard {min(done + 1, count)} of {count}"
        report(fraction, f"{what}: {format_bytes(done_bytes)} of {format_bytes(total_bytes)}, {shard}")

    return shards
