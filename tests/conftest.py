"""Shared fixtures for the engine tests: offline environment, tiny random OPT checkpoints, a manager.

The environment variables are set at import time, before anything imports huggingface_hub or
transformers (they read them once, at import).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

# The built-in tiny model (optdemo/tiny-opt) is built on first use under $OPTDEMO_CACHE: keep the
# tests' copy out of the user's cache unless the caller chose a cache (test.sh does).
_OWN_CACHE: str | None = None
if not os.environ.get("OPTDEMO_CACHE"):
    _OWN_CACHE = tempfile.mkdtemp(prefix="optdemo-test-cache-")
    os.environ["OPTDEMO_CACHE"] = _OWN_CACHE

# `python -m pytest` puts the repository root on sys.path; plain `pytest` does not.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest  # noqa: E402

from optdemo.models.synthetic import TINY_OVERRIDES  # noqa: E402
from optdemo.system.hardware import probe_hardware  # noqa: E402

# Exact sizes of the tiny model (TINY_OVERRIDES, float32), from OPT's architecture:
# hidden 64, ffn 256, 6 layers, vocab 512, 512 positions (+2 offset rows), tied lm_head.
_H, _F, _V, _P = 64, 256, 512, 512 + 2
TINY_LAYER_PARAMS = 4 * (_H * _H + _H) + 2 * (2 * _H) + (_H * _F + _F) + (_F * _H + _H)
TINY_PARAMS = _V * _H + _P * _H + 2 * _H + 6 * TINY_LAYER_PARAMS
TINY_LAYER_BYTES = 4 * TINY_LAYER_PARAMS  # 199936
TINY_TOTAL_BYTES = 4 * TINY_PARAMS  # 1462784

# What the hardware probe finds here. Tests whose expectation depends on it (where a model with no
# budget lands, which GPUs a budget may name) use these, so the suite passes on a GPU host too.
GPU_COUNT = probe_hardware().gpu_count
WHOLE_MODEL_DEVICE = 0 if GPU_COUNT else "cpu"  # where from_pretrained(device_map="auto") puts it all

assert TINY_OVERRIDES["hidden_size"] == _H and TINY_OVERRIDES["ffn_dim"] == _F
assert TINY_OVERRIDES["vocab_size"] == _V and TINY_OVERRIDES["num_hidden_layers"] == 6


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True)
def fresh_module_caches() -> Iterator[None]:
    """Every test starts with empty in-process caches (resolved models, meta models, the catalog),
    so that no test depends on what another one planned or loaded before it, and none has to copy a
    model folder to get a cache entry of its own."""
    from optdemo.core import catalog
    from optdemo.models import source as models
    from optdemo.plan import planner

    def clear() -> None:
        with models._cache_lock:
            models._cache.clear()
        with planner._meta_lock:
            planner._meta_cache.clear()
        catalog.catalog.cache_clear()

    clear()
    yield
    clear()


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty ``$OPTDEMO_CACHE`` for this test: nothing converted yet, nothing measured."""
    cache = tmp_path / "optdemo-cache"
    monkeypatch.setenv("OPTDEMO_CACHE", str(cache))
    return cache


def build_tiny(tmp_path_factory: pytest.TempPathFactory, name: str, **options: str) -> Path:
    """The tiny OPT (float32, random weights, with its tokenizer) in a fresh folder; ``options``
    go to :func:`~optdemo.models.synthetic.build_random_opt` (format, shard size)."""
    from optdemo.models.synthetic import build_random_opt

    return build_random_opt(
        tmp_path_factory.mktemp(name), "opt-125m", overrides=TINY_OVERRIDES, dtype="float32", **options
    )


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny OPT (float32, one model.safetensors) with its tokenizer."""
    return build_tiny(tmp_path_factory, "tiny")


@pytest.fixture(scope="session")
def tiny_bin_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same tiny OPT as ``pytorch_model-*.bin`` shards (several), like the Hub's OPT repos:
    disk-offloaded layers of such a checkpoint must be written to an offload folder."""
    path = build_tiny(tmp_path_factory, "tiny-bin", checkpoint_format="bin", max_shard_size="200KB")
    assert len(list(path.glob("pytorch_model-*.bin"))) > 1
    assert not list(path.glob("*.safetensors"))
    return path


@pytest.fixture
def manager():
    """A fresh ModelManager; whatever it loaded is unloaded afterwards."""
    from optdemo.runtime.manager import ModelManager

    mgr = ModelManager()
    yield mgr
    mgr.unload()
