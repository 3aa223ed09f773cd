"""The streamed disk tier: large direct reads into a bounded ring of buffers, ahead of compute.
Same tokens as the all-in-RAM model; the split between mapped and streamed blocks follows the
memory available; nothing grows per token; streamed reads bypass the page cache; a failed pass
does not wedge the next one."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest
import torch
from conftest import TINY_TOTAL_BYTES

from optdemo.core.defaults import STREAM_DEPTH
from optdemo.core.load_config import LoadConfig
from optdemo.runtime.tiers.disk_map import place_disk_tier
from optdemo.runtime.tiers.disk_stream import block_span, release, safetensors_header

pytestmark = pytest.mark.slow
IDS = torch.tensor([[2, 10, 20, 30, 40, 50]])


def _greedy(model, tokens: int = 12) -> list[int]:
    with torch.inference_mode():
        out = model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=tokens, do_sample=False)
    return out[0].tolist()


@pytest.fixture
def reference(tiny_model_dir) -> list[int]:
    from transformers import AutoModelForCausalLM

    return _greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))


def _offloaded(tiny_model_dir: Path, tmp_path: Path):
    """The tiny model with layers 2..5 on disk, hooked by Accelerate (not yet served by us)."""
    from transformers import AutoModelForCausalLM

    device_map = {
        "model.decoder.embed_tokens": "cpu",
        "lm_head": "cpu",
        "model.decoder.embed_positions": "cpu",
        "model.decoder.final_layer_norm": "cpu",
        **{f"model.decoder.layers.{i}": "cpu" if i < 2 else "disk" for i in range(6)},
    }
    return AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path / "off")
    )


def test_streamed_blocks_give_the_same_tokens_from_a_bounded_ring(tiny_model_dir, tmp_path, reference):
    model = _offloaded(tiny_model_dir, tmp_path)
    report = place_disk_tier(model, "stream")
    assert (report.streamed_blocks, report.mapped_modules, report.mapped_bytes) == (4, 0, 0)
    assert "chosen in the configuration" in report.choice
    streamer = model._optdemo_disk_streamer
    assert len(streamer.buffers) == STREAM_DEPTH
    assert report.stream_buffer_bytes == streamer.buffer_bytes
    assert report.stream_buffer_bytes <= STREAM_DEPTH * (max(s.nbytes for s in streamer.spans) + 2 * 4096)
    threads = threading.active_count()
    assert _greedy(model) == reference
    # 12 forward passes read each streamed block once, plus at most the ring's read-ahead.
    per_pass = sum(span.nbytes for span in streamer.spans)
    assert (
        12 * per_pass
        <= streamer.bytes_read
        <= 12 * per_pass + STREAM_DEPTH * max(s.nbytes for s in streamer.spans)
    )
    assert _greedy(model) == reference and threading.active_count() == threads  # nothing grows
    release(model)
    assert not hasattr(model, "_optdemo_disk_streamer")


def test_auto_maps_what_fits_and_streams_the_rest(tiny_model_dir, tmp_path, reference):
    model = _offloaded(tiny_model_dir, tmp_path)
    block = 4 * 49984  # one tiny decoder layer in float32
    # Room for one block beside the headroom and the ring: one mapped, three streamed.
    from optdemo.plan.policy import HEADROOM_BYTES

    cpu_tier = TINY_TOTAL_BYTES - 4 * block  # embeddings, final norm, layers 0-1: mapped too
    available = HEADROOM_BYTES + cpu_tier + STREAM_DEPTH * block + block + 100
    report = place_disk_tier(model, "auto", available_bytes=available)
    assert (report.mapped_bytes, report.streamed_blocks, report.streamed_bytes) == (block, 3, 3 * block)
    assert "mapped" in report.choice and "streamed" in report.choice and "available" in report.choice
    assert _greedy(model) == reference
    # With the memory to cache it all, everything stays memory-mapped.
    everything = place_disk_tier(_offloaded(tiny_model_dir, tmp_path / "b"), "auto", available_bytes=2**34)
    assert (everything.mapped_bytes, everything.streamed_blocks) == (4 * block, 0)


def test_streamed_reads_bypass_the_page_cache(tiny_model_dir, tmp_path):
    model = _offloaded(tiny_model_dir, tmp_path)
    place_disk_tier(model, "stream")
    streamer = model._optdemo_disk_streamer
    _greedy(model, 2)
    if not streamer.direct:
        pytest.skip("this file system has no O_DIRECT")
    # Every read goes through descriptors opened O_DIRECT: it neither fills nor evicts the cache.
    assert streamer._files
    assert all(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT for fd in streamer._files.values())


def test_a_failed_pass_does_not_wedge_the_next(tiny_model_dir, tmp_path, reference):
    model = _offloaded(tiny_model_dir, tmp_path)
    place_disk_tier(model, "stream")
    layer = model.model.decoder.layers[3].fc2
    original = layer.forward
    layer.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        _greedy(model)
    layer.forward = original
    assert _greedy(model) == reference


def test_a_block_spread_over_two_files_is_streamed_from_both(tiny_model_dir, tmp_path, reference):
    model = _offloaded(tiny_model_dir, tmp_path)
    module = model.get_submodule("model.decoder.layers.3")
    index = module.fc1._hf_hook.weights_map.dataset.index
    prefix = "model.decoder.layers.3."
    real = index[prefix + "fc1.weight"]["safetensors_file"]
    copy = tmp_path / "copy.safetensors"  # the same bytes under another name: a second "shard"
    copy.write_bytes(Path(real).read_bytes())
    # As in a sharded checkpoint: the block's first tensors (in file order) end one shard, the
    # rest begin the next.
    _, table = safetensors_header(real)
    names = sorted((k for k in index if k.startswith(prefix)), key=lambda k: table[k]["data_offsets"])
    tail = names[len(names) // 2 :]
    for name in tail:
        index[name] = {**index[name], "safetensors_file": str(copy)}
    span = block_span(module, {})
    assert [segment.path for segment in span.segments] == [real, str(copy)]
    sizes = {name: table[name]["data_offsets"][1] - table[name]["data_offsets"][0] for name in names}
    assert [s.end - s.start for s in span.segments] == [
        sum(sizes[n] for n in names if n not in tail),
        sum(sizes[n] for n in tail),
    ]
    report = place_disk_tier(model, "stream")
    assert report.streamed_blocks == 4 and report.mapped_modules == 0 and "stay mapped" not in report.choice
    streamer = model._optdemo_disk_streamer
    assert streamer.buffer_bytes == STREAM_DEPTH * max(s.buffer_bytes for s in streamer.spans)
    assert _greedy(model) == reference


def test_a_block_whose_range_holds_other_weights_stays_mapped(tiny_model_dir, tmp_path):
    model = _offloaded(tiny_model_dir, tmp_path)
    module = model.get_submodule("model.decoder.layers.3")
    hook = module.fc1._hf_hook
    index = hook.weights_map.dataset.index
    key = hook.weights_map.prefix + "weight"
    # fc1 read from layer 0's place: the block's range in the file would span layers 0 to 3.
    index[key] = {**index[key], "weight_name": "model.decoder.layers.0.fc1.weight"}
    assert block_span(module, {}) is None
    report = place_disk_tier(model, "stream")
    assert report.streamed_blocks == 3 and "1 block(s) stay mapped" in report.choice


def test_loads_choose_the_mode_from_the_configuration(manager, tiny_model_dir, tmp_path, reference):
    from optdemo.core.generation import GenerationParams

    config = LoadConfig(
        str(tiny_model_dir), max_memory="cpu=700KiB", offload_folder=str(tmp_path / "o"), disk_tier="stream"
    )
    report = manager.load(config)
    assert report.disk_tier.streamed_blocks > 0 and report.disk_tier.mapped_modules == 0
    assert report.to_dict()["disk_tier"]["streamed_blocks"] == report.disk_tier.streamed_blocks
    text = "".join(
        u.text for u in manager.stream_completion("Hello", GenerationParams(max_new_tokens=8, temperature=0))
    )
    manager.load(config.with_changes(disk_tier="map"))
    again = "".join(
        u.text for u in manager.stream_completion("Hello", GenerationParams(max_new_tokens=8, temperature=0))
    )
    assert text == again


def test_the_mode_is_set_by_flag_environment_and_service():
    from optdemo.app.service import DemoService
    from optdemo.app.settings import parse_settings
    from optdemo.core.errors import ConfigError
    from optdemo.runtime.manager import ModelManager

    assert parse_settings([], env={}).disk_tier == "auto"
    assert parse_settings(["--disk-tier", "stream"], env={}).disk_tier == "stream"
    settings = parse_settings([], env={"OPTDEMO_DISK_TIER": "map"})
    service = DemoService(ModelManager(), settings)
    assert service.initial_config().disk_tier == "map"
    assert service.make_config("optdemo/tiny-opt", disk_tier="stream").disk_tier == "stream"
    with pytest.raises(
        ConfigError, match="disk_tier 'fast' is not supported: choose one of auto, map, stream"
    ):
        service.make_config("optdemo/tiny-opt", disk_tier="fast")


def test_the_device_map_tab_says_what_was_mapped_and_streamed():
    from optdemo.runtime.tiers.disk_map import DiskTierReport
    from optdemo.web.tabs.devicemap import disk_tier_text

    assert disk_tier_text(None) == "" and disk_tier_text(DiskTierReport(0, 0, "no disk layers")) == ""
    report = DiskTierReport(
        8, 2**29, None, streamed_blocks=12, streamed_bytes=3 * 2**29, stream_buffer_bytes=2**27, choice="why"
    )
    assert disk_tier_text(report) == (
        " Disk tier: 512 MiB memory-mapped (served from the page cache); 12 blocks (1.5 GiB) streamed "
        "from disk every token past the page cache, through 128 MiB of buffers (why)."
    )


def _resident_pages(address: int, length: int) -> int:
    """How many pages of a mapped range are in RAM (``mincore``)."""
    import ctypes

    page = os.sysconf("SC_PAGE_SIZE")
    count = -(-length // page)
    vector = (ctypes.c_ubyte * count)()
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(length), vector) == 0
    return sum(byte & 1 for byte in vector)


def test_the_resident_part_is_read_in_once_in_execution_order_and_stopped_on_release(
    tiny_model_dir, tmp_path, reference
):
    from optdemo.runtime.tiers.disk_map import WARMUP_THREADS, _page_ranges, release_disk_tier

    model = _offloaded(tiny_model_dir, tmp_path)
    place_disk_tier(model, "map")
    warmup = model._optdemo_page_warmup
    assert warmup.done.wait(30)
    # Exactly the CPU tier and the mapped blocks, each range once (the tied head shares the
    # embeddings' range), chunked in execution order.
    resident = [model.get_submodule(name) for name in model.hf_device_map]
    ranges = list(dict.fromkeys(r for module in resident for r in _page_ranges(module)))
    assert sum(length for _, length in warmup.chunks) == sum(length for _, length in ranges)
    assert warmup.chunks[0][0] == ranges[0][0]
    assert all(_resident_pages(address, length) == -(-length // 4096) for address, length in warmup.chunks)
    assert _greedy(model) == reference
    release_disk_tier(model)
    assert not hasattr(model, "_optdemo_page_warmup")
    names = [thread.name for thread in threading.enumerate()]
    assert not any(name.startswith("optdemo-page-warmup") for name in names) and WARMUP_THREADS == 2
