"""Reading a checkpoint's first weights while the load plans (optdemo.runtime.readahead): which bytes, in
which order, into the page cache without staying mapped, stopped once the model is loaded; never while a
model in use could lose its pages."""

from __future__ import annotations

import math
import mmap
import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import GPU_COUNT, TINY_LAYER_BYTES, TINY_TOTAL_BYTES, build_tiny

from optdemo.core.defaults import STREAM_DEPTH
from optdemo.core.errors import BudgetError
from optdemo.core.load_config import LoadConfig
from optdemo.plan.policy import HEADROOM_BYTES
from optdemo.runtime import readahead as readahead_module
from optdemo.runtime.readahead import ColdStartReadAhead, block_order, first_ranges, start_cold_read_ahead
from optdemo.runtime.tiers.disk_stream import Segment, safetensors_header
from optdemo.weights.convert import safetensors_weight_files

# The tiny model's embeddings: 512 tokens and 514 positions of 64 float32 (test_planner's sizes).
EMBEDDING_BYTES = (512 + 514) * 64 * 4
SPLIT = "cpu=700KiB"  # embeddings and a layer in RAM, five layers on disk


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny OPT as several safetensors shards with an index."""
    path = build_tiny(tmp_path_factory, "tiny-sharded", max_shard_size="300KB")
    assert len(safetensors_weight_files(str(path))) > 2
    return path


def _blocks_of(ranges, folder: Path) -> list[float]:
    """The block number of every tensor the ranges cover, in the ranges' order."""
    tables = {
        str(folder / n): safetensors_header(str(folder / n)) for n in safetensors_weight_files(str(folder))
    }
    found = []
    for segment in ranges:
        base, table = tables[segment.path]
        inside = sorted(
            (entry["data_offsets"][0], name)
            for name, entry in table.items()
            if name != "__metadata__" and segment.start <= base + entry["data_offsets"][0] < segment.end
        )
        found += [block_order(name) for _, name in inside]
    return found


def test_block_order_is_the_layer_number_embeddings_first_the_rest_last():
    names = {
        "model.decoder.embed_tokens.weight": -1,
        "model.decoder.embed_positions.weight": -1,
        "transformer.wte.weight": -1,
        "model.decoder.layers.2.fc1.weight": 2,
        "model.decoder.layers.10.self_attn.q_proj.bias": 10,  # 10 after 2, not before
        "transformer.h.0.attn.c_attn.weight": 0,
        "model.layers.31.mlp.down_proj.weight": 31,
        "model.decoder.final_layer_norm.weight": math.inf,
        "lm_head.weight": math.inf,
    }
    assert {name: block_order(name) for name in names} == names


def test_first_ranges_cover_the_blocks_the_cache_keeps_in_execution_order(sharded):
    everything = first_ranges(sharded, 2**40)
    assert sum(s.end - s.start for s in everything) == TINY_TOTAL_BYTES  # tied head stored once
    order = _blocks_of(everything, sharded)
    assert order == sorted(order) and order[0] == -1 and order[-1] == math.inf
    assert set(order) == {-1, *range(6), math.inf}
    # Room for the embeddings and two layers beside the headroom and the stream buffers (each as
    # large as the largest block, the embeddings): exactly those, in that order.
    room = HEADROOM_BYTES + STREAM_DEPTH * EMBEDDING_BYTES + EMBEDDING_BYTES + 2 * TINY_LAYER_BYTES
    first = first_ranges(sharded, room + 1000)
    assert sum(s.end - s.start for s in first) == EMBEDDING_BYTES + 2 * TINY_LAYER_BYTES
    assert sorted(set(_blocks_of(first, sharded))) == [-1, 0, 1]
    assert first_ranges(sharded / "absent", 2**40) == []


def _resident(path: str, start: int, end: int) -> bool:
    """Whether a file's bytes [start, end) are all in the page cache (``mincore`` on a mapping of
    them, which reads nothing)."""
    import ctypes

    first = start // mmap.PAGESIZE * mmap.PAGESIZE
    length = end - first
    vector = (ctypes.c_ubyte * -(-length // mmap.PAGESIZE))()
    with (
        open(path, "rb") as handle,
        mmap.mmap(handle.fileno(), length, access=mmap.ACCESS_COPY, offset=first) as view,
    ):
        window = (ctypes.c_char * length).from_buffer(view)
        status = ctypes.CDLL(None).mincore(
            ctypes.c_void_p(ctypes.addressof(window)), ctypes.c_size_t(length), vector
        )
        del window  # release the buffer before the mapping closes (private: nothing is written)
    assert status == 0
    return all(byte & 1 for byte in vector)


def _evict(folder: Path) -> None:
    for name in safetensors_weight_files(str(folder)):
        fd = os.open(folder / name, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def test_the_prefetch_reads_its_ranges_into_the_page_cache_and_keeps_no_mapping(sharded):
    _evict(sharded)
    ranges = first_ranges(sharded, 2**40)
    prefetch = ColdStartReadAhead(ranges)
    assert prefetch.bytes == TINY_TOTAL_BYTES
    assert prefetch.done.wait(30)
    assert sum(length for _, _, length in prefetch.chunks) >= TINY_TOTAL_BYTES
    assert all(_resident(s.path, s.start, s.end) for s in ranges)
    maps = Path("/proc/self/maps").read_text()
    assert str(sharded) not in maps  # read, then unmapped: nothing counted in this process's memory
    assert not [t for t in threading.enumerate() if t.name.startswith("optdemo-page-warmup")]


def test_only_a_local_cpu_run_of_the_stored_dtype_is_prefetched(sharded, tmp_path):
    from optdemo.system.hardware import GpuInfo, Hardware

    cpu = Hardware((), 2**36, 2**35, str(tmp_path), 2**40)
    gpu = replace(cpu, gpus=(GpuInfo(0, "gpu", 2**34, 2**34),))
    base = LoadConfig(str(sharded), dtype="float32", max_memory=SPLIT, offload_folder=str(tmp_path))
    started = start_cold_read_ahead(base, cpu)
    assert started is not None and started.bytes == TINY_TOTAL_BYTES and started.done.wait(30)
    refused = {
        "a GPU": (base, gpu),
        "another dtype (converted, read from the copy)": (replace(base, dtype="float16"), cpu),
        "streamed disk tier": (replace(base, disk_tier="stream"), cpu),
        "fast offloading off": (replace(base, fast_offload=False), cpu),
        "a Hub name": (replace(base, model="facebook/opt-125m"), cpu),
    }
    assert {
        why: start_cold_read_ahead(config, hardware) for why, (config, hardware) in refused.items()
    } == dict.fromkeys(refused)
    assert start_cold_read_ahead(replace(base, dtype="auto"), cpu) is not None


@pytest.fixture
def started(monkeypatch, manager) -> list[tuple[ColdStartReadAhead | None, bool]]:
    """Every prefetch the manager starts, and whether a model was loaded or another prefetch still
    reading when it started (either would be evicted by it)."""
    seen: list[tuple[ColdStartReadAhead | None, bool]] = []
    original = readahead_module.start_cold_read_ahead

    def recording(config, hardware):
        reading = [p for p, *_ in seen if p is not None and not p.done.is_set()]
        prefetch = original(config, hardware)
        seen.append((prefetch, manager._loaded is not None or bool(reading)))
        return prefetch

    monkeypatch.setattr(readahead_module, "start_cold_read_ahead", recording)
    return seen


def test_a_cold_load_prefetches_then_hands_over_with_the_same_tokens(manager, sharded, tmp_path, started):
    seen = started
    config = LoadConfig(str(sharded), max_memory=SPLIT, offload_folder=str(tmp_path / "off"))
    manager.load(config)
    model = manager._loaded.model
    ids = torch.tensor([[2, 100, 200, 300]])
    with torch.inference_mode():
        got = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    with torch.inference_mode():
        want = plain.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert got.tolist() == want.tolist()
    assert len(seen) == 1
    prefetch, model_loaded = seen[0]
    if GPU_COUNT:  # the GPU paths load weights onto the GPU: nothing to read ahead for the CPU
        assert prefetch is None
        return
    assert prefetch is not None and not model_loaded
    assert prefetch.bytes == TINY_TOTAL_BYTES  # the whole tiny model fits the page cache
    assert prefetch.stopped.is_set()  # the model's own warm-up took over


def test_a_reload_prefetches_only_once_the_model_in_use_is_gone(manager, sharded, tmp_path, started):
    seen = started
    manager.load(LoadConfig(str(sharded), max_memory=SPLIT, offload_folder=str(tmp_path / "a")))
    manager.load(LoadConfig(str(sharded), max_memory="cpu=500KiB", offload_folder=str(tmp_path / "b")))
    assert [loaded for _, loaded in seen] == [False, False]  # never beside a loaded model
    if not GPU_COUNT:
        assert all(prefetch is not None and prefetch.stopped.is_set() for prefetch, _ in seen)


def test_a_load_refused_before_loading_stops_its_prefetch(manager, sharded, started):
    seen = started
    with pytest.raises(BudgetError):  # names a GPU this machine lacks: refused before loading
        manager.load(LoadConfig(str(sharded), max_memory="7=1GiB,cpu=500KiB"))
    assert len(seen) == 1
    prefetch, _ = seen[0]
    if not GPU_COUNT:
        assert prefetch is not None and prefetch.stopped.is_set()


def test_a_truncated_checkpoint_is_read_as_far_as_it_goes_without_hanging(sharded, tmp_path):
    import shutil

    copy = tmp_path / "truncated"
    shutil.copytree(sharded, copy)
    last = copy / safetensors_weight_files(str(copy))[-1]
    size = last.stat().st_size
    with open(last, "r+b") as handle:
        handle.truncate(size // 2)
    ranges = first_ranges(copy, 2**40)
    assert all(s.end <= size // 2 for s in ranges if s.path == str(last))
    prefetch = ColdStartReadAhead(ranges)
    assert prefetch.done.wait(30)  # every thread finished: none died on the missing bytes
    assert sum(s.end - s.start for s in ranges) < TINY_TOTAL_BYTES
    # A file that shrinks after its header was read: the chunks past its end are skipped.
    beyond = ColdStartReadAhead([Segment(str(last), 0, size)])
    assert beyond.done.wait(30)


def test_concurrent_loads_never_read_ahead_side_by_side(manager, sharded, tmp_path, started, monkeypatch):
    from optdemo.core.errors import OptdemoError

    fetch = ColdStartReadAhead._fetch

    def slow_fetch(self, chunk):  # a slow disk: each load's read-ahead outlasts the other's start
        time.sleep(0.2)
        fetch(self, chunk)

    monkeypatch.setattr(ColdStartReadAhead, "_fetch", slow_fetch)
    budgets = ["cpu=700KiB", "cpu=500KiB", "cpu=600KiB"]
    outcomes: list[str] = []

    def load(budget: str) -> None:
        try:
            manager.load(LoadConfig(str(sharded), max_memory=budget, offload_folder=str(tmp_path / budget)))
            outcomes.append("loaded")
        except OptdemoError as exc:  # a newer request may supersede a waiting one
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=load, args=(budget,)) for budget in budgets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert "loaded" in outcomes and manager._loaded is not None
    assert started and not any(beside for _, beside in started)  # never beside a model or a read
    if not GPU_COUNT:
        assert all(prefetch is not None for prefetch, _ in started)
    assert manager._loads_in_flight == 0
