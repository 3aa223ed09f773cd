"""Where a reply's time goes, per block of the plan (optdemo.runtime.timing): the hooks change no
token; the streamed tier's waits and bytes, the GPU prefetcher's copies, Accelerate's own loads and
page faults land on the right block; a reply's prompt pass and decode steps are apart, a batched
step counts for every reply in it; a long pass says how far it got; /status carries it all."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from optdemo.core.generation import GenerationParams
from optdemo.core.load_config import LoadConfig
from optdemo.plan.bandwidth import measured_bandwidths
from optdemo.plan.planner import plan_device_map
from optdemo.runtime import timing, timing_hooks
from optdemo.runtime.loader import actual_device_map
from optdemo.runtime.timing_data import COPY, DISK, PAGE_FAULTS

pytestmark = pytest.mark.slow
SPLIT = "cpu=700KiB"  # the tiny model: embeddings, the final norm and layer 0 in RAM, five layers on disk
GREEDY = GenerationParams(max_new_tokens=8, temperature=0, repetition_penalty=1.3)
LAYERS = [f"model.decoder.layers.{i}" for i in range(6)]
IDS = torch.tensor([[2, 10, 20, 30, 40, 50]])


def reply(manager, prompt: str = "Hello there", params: GenerationParams = GREEDY):
    """One completion through the engine: its final update."""
    *_, last = manager.stream_completion(prompt, params)
    return last


def disk_config(model_dir, tmp_path, tier: str, **changes) -> LoadConfig:
    return LoadConfig(
        str(model_dir), max_memory=SPLIT, offload_folder=str(tmp_path / tier), disk_tier=tier, **changes
    )


def timed_model(tiny_model_dir):
    """The tiny model in RAM, loaded without the manager."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def install(model, model_dir) -> timing_hooks.BlockTimer:
    plan = plan_device_map(LoadConfig(str(model_dir)))
    return timing_hooks.install(model, plan, actual_device_map(model), measured_bandwidths())


def forward(model, ids=IDS) -> None:
    with torch.inference_mode():
        model(input_ids=ids)


# ---------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("tier", ["stream", "map"])
def test_the_hooks_change_no_token(manager, tiny_model_dir, tmp_path, tier):
    manager.load(disk_config(tiny_model_dir, tmp_path, tier))
    model = manager._loaded.model
    assert isinstance(model._optdemo_timer, timing_hooks.BlockTimer)
    timed = [reply(manager, prompt).token_ids for prompt in ("Hello there", "The history of")]
    timing_hooks.uninstall(model)
    assert not hasattr(model, "_optdemo_timer") and manager.status().timing is None
    plain = [reply(manager, prompt).token_ids for prompt in ("Hello there", "The history of")]
    assert timed == plain and all(timed)


# ---------------------------------------------------------------------------------- the tiers
def test_streamed_blocks_wait_for_their_reads_and_say_how_many_bytes(manager, tiny_model_dir, tmp_path):
    manager.load(disk_config(tiny_model_dir, tmp_path, "stream"))
    streamer = manager._loaded.model._optdemo_disk_streamer
    last = reply(manager)
    stats, result = last.stats, manager.status().timing.latest
    # The prompt pass and the decode steps apart: one prompt pass, a step per further token.
    assert (result.prompt.passes, result.decode.passes) == (1, stats.new_tokens - 1)
    assert result.prompt.tokens == stats.prompt_tokens and result.decode.tokens == stats.new_tokens - 1
    # Its time is GenerationStats' total less its wait in line, to the microsecond.
    assert result.reply_seconds == pytest.approx(stats.total_seconds - result.waited_seconds, abs=1e-6)
    assert result.blocks_seconds + result.outside_passes_seconds <= result.reply_seconds + 1e-6
    disk = [b for b in result.decode.blocks if b.disk_bytes]
    # Every streamed block read its own buffer once per pass, and only those blocks.
    assert [b.name for b in disk] == LAYERS[1:]
    assert [b.disk_bytes for b in disk] == [result.decode.passes * s.buffer_bytes for s in streamer.spans]
    assert all(b.waits_for == DISK and 0 <= b.wait_seconds <= b.seconds for b in disk)
    assert result.moved_per_token == (sum(s.buffer_bytes for s in streamer.spans), 0.0)
    assert result.floor_seconds_per_token == pytest.approx(
        sum(s.buffer_bytes for s in streamer.spans) / measured_bandwidths().disk_read
    )
    ram = {b.name: b for b in result.decode.blocks}[LAYERS[0]]
    assert (ram.disk_bytes, ram.wait_seconds, ram.waits_for) == (0, 0.0, "")
    # /status carries the same numbers.
    data = manager.status().to_dict()["timing"]
    assert data["replies_timed"] == 1 and data["latest_reply"] == result.to_dict()
    assert data["latest_reply"]["decode"]["blocks"][4]["disk_bytes"] == disk[0].disk_bytes


def test_a_slow_read_is_the_blocks_wait(manager, tiny_model_dir, tmp_path, monkeypatch):
    """A disk that takes 250 ms a block: the streamed blocks wait for it, the others do not."""
    from optdemo.runtime.tiers.disk_stream import DiskStreamer

    manager.load(disk_config(tiny_model_dir, tmp_path, "stream"))
    read = DiskStreamer._read

    def slow(self, index, buffer):
        time.sleep(0.25)
        read(self, index, buffer)

    monkeypatch.setattr(DiskStreamer, "_read", slow)
    reply(manager, params=GenerationParams(max_new_tokens=2, temperature=0))
    result = manager.status().timing.latest
    assert result.decode.passes == 1
    step = {b.name: b.wait_seconds for b in result.decode.blocks}
    # Five reads of 250 ms a step, one at a time, two blocks ahead: what the rest of the step
    # (milliseconds a block, more on a busy machine) does not hide, the streamed blocks wait for;
    # the last three each wait for most of their read.
    assert sum(step[name] for name in LAYERS[1:]) > 0.7 and all(step[n] > 0.1 for n in LAYERS[3:])
    assert all(wait == 0.0 for name, wait in step.items() if name not in LAYERS[1:])
    assert result.waits_for == DISK and result.decode.wait_seconds > result.decode.blocks_seconds / 2


def test_page_faults_are_the_time_beyond_the_blocks_own_warm_time(tiny_model_dir, monkeypatch):
    """A memory-mapped block that reads from storage while it runs waited for page faults: the
    bytes the process read meanwhile, and the time beyond its own time when nothing was read.
    Reads are measured block by block in the passes after one that read."""
    model = timed_model(tiny_model_dir)
    timer = install(model, tiny_model_dir)
    for _ in range(timing_hooks.WARM_PASSES):
        forward(model)  # warm: every block's reference time (the fastest of these)
    layer = model.get_submodule(LAYERS[3])
    read = {"bytes": 0}
    monkeypatch.setattr(timing, "read_bytes", lambda fd=None: read["bytes"])
    compute = layer.forward

    def faulting(*args, **kwargs):  # the block stalls 200 ms on 1 MiB of page faults
        time.sleep(0.2)
        read["bytes"] += 2**20
        return compute(*args, **kwargs)

    layer.forward = faulting
    with timing.recording(model) as unmeasured:
        forward(model)  # after a pass that read nothing: measured as a whole only
    with timing.recording(model) as record:
        forward(model)
    assert all(b.disk_bytes == 0 for b in unmeasured.result().prompt.blocks)
    blocks = {b.name: b for b in record.result().prompt.blocks}
    faulted = blocks[LAYERS[3]]
    assert faulted.disk_bytes == 2**20 and faulted.waits_for == PAGE_FAULTS
    # Its warm time (a millisecond, tens on a busy machine) is computing; the rest is waiting.
    assert 0.12 < faulted.wait_seconds < faulted.seconds and faulted.seconds > 0.2
    assert all(b.disk_bytes == 0 and b.wait_seconds == 0 for n, b in blocks.items() if n != LAYERS[3])
    assert timer.latest is None and timer.replies == 0  # a recording is no reply
    layer.forward = compute
    forward(model)  # reads nothing: the next pass is measured as a whole only again
    assert timer._sampling is False


def test_a_read_ahead_hint_counts_for_the_block_it_reads_for(tiny_model_dir, monkeypatch):
    model = timed_model(tiny_model_dir)
    install(model, tiny_model_dir)
    read = {"bytes": 0}
    monkeypatch.setattr(timing, "read_bytes", lambda fd=None: read["bytes"])
    following = model.get_submodule(LAYERS[4])

    def hint() -> None:
        read["bytes"] += 3 * 2**20

    model.get_submodule(LAYERS[3]).register_forward_pre_hook(
        lambda module, args: timing.read_ahead(following, hint), prepend=True
    )
    with timing.recording(model) as record:
        forward(model)  # the first pass after the install: measured block by block
    blocks = {b.name: b for b in record.result().prompt.blocks}
    assert blocks[LAYERS[4]].disk_bytes == 3 * 2**20 and blocks[LAYERS[3]].disk_bytes == 0


def test_the_gpu_prefetchers_copies_are_its_blocks_wait(tiny_model_dir):
    """The upload-ahead schedule on the CPU (synchronous copies): each block's copy is its wait,
    its packed bytes the bytes copied, once a pass."""
    from optdemo.runtime.tiers.gpu_policy import copy_ahead_to_gpu

    model = timed_model(tiny_model_dir)
    reference = model(input_ids=IDS).logits
    prefetcher = copy_ahead_to_gpu(model, LAYERS[2:], "cpu")
    install(model, tiny_model_dir)
    with timing.recording(model) as record:
        forward(model)
        forward(model)
    assert torch.equal(model(input_ids=IDS).logits, reference)
    blocks = {b.name: b for b in record.result().prompt.blocks}
    packed = {name: block.nbytes for name, block in zip(LAYERS[2:], prefetcher.blocks, strict=True)}
    assert {n: b.copy_bytes for n, b in blocks.items() if b.copy_bytes} == {
        n: 2 * s for n, s in packed.items()
    }
    assert all(blocks[name].waits_for == COPY and blocks[name].wait_seconds > 0 for name in packed)


def test_accelerates_own_loads_from_disk_are_timed(manager, tiny_model_dir, tmp_path):
    manager.load(disk_config(tiny_model_dir, tmp_path, "auto", fast_offload=False))
    assert "disk" in manager.status().device_map.values()
    reply(manager)
    result = manager.status().timing.latest
    waited = [b.name for b in result.decode.blocks if b.waits_for == DISK and b.wait_seconds > 0]
    assert waited == [name for name, where in manager.status().device_map.items() if where == "disk"]


def test_a_quantized_model_is_timed_per_block(manager, tiny_model_dir):
    manager.load(LoadConfig(str(tiny_model_dir), quantization="4bit"))
    last = reply(manager)
    result = manager.status().timing.latest
    assert result.decode.passes == last.stats.new_tokens - 1
    assert [b.name for b in result.decode.blocks] == [b.name for b in manager.status().plan.blocks]
    assert all(b.seconds > 0 for b in result.decode.blocks)


# ---------------------------------------------------------------------------------- replies
def test_a_batched_step_counts_whole_for_each_of_its_replies(manager, tiny_model_dir, monkeypatch):
    manager.load(LoadConfig(str(tiny_model_dir)))
    finished = []
    finish = timing.finish
    monkeypatch.setattr(timing, "finish", lambda request, ended: finished.append(finish(request, ended)))
    manager.engine.hold()  # both wait, then start together
    results: dict[int, object] = {}
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, reply(manager, f"Hello {i}")))
        for i in range(2)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while manager.engine.counts()[1] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    manager.engine.release()
    for thread in threads:
        thread.join(30)
    assert len(finished) == 2 and all(result.batch == 2 for result in finished)
    # Each reply's decode steps are all the steps it was in, shared ones whole.
    by_tokens = sorted(finished, key=lambda r: r.decode.passes)
    assert [r.decode.passes for r in by_tokens] == sorted(r.stats.new_tokens - 1 for r in results.values())
    assert manager.status().timing.replies == 2


def test_a_long_pass_says_which_layer_it_is_at_and_how_long_is_left(tiny_model_dir):
    model = timed_model(tiny_model_dir)
    install(model, tiny_model_dir)
    seen = []
    layer = model.get_submodule(LAYERS[3])
    layer.register_forward_hook(lambda module, args, output: seen.append(timing.report(model).progress))
    forward(model, torch.arange(2, 102).unsqueeze(0))
    progress = seen[0]
    assert (progress.mode, progress.tokens, progress.layers_done, progress.layers) == ("prompt", 100, 4, 6)
    assert progress.eta_seconds == pytest.approx(progress.elapsed * 2 / 4)
    assert timing.report(model).progress is None  # nothing runs now
    data = progress.to_dict()
    assert data["layers_done"] == 4 and data["eta_seconds"] == round(progress.eta_seconds, 3)


# ---------------------------------------------------------------------------------- the benchmark
def test_the_benchmarks_optdemo_runs_record_where_their_time_went(tiny_model_dir):
    from tools.bench import run_worker

    run = run_worker("optdemo", str(tiny_model_dir), SPLIT, 4, "warm", "float32")
    data = run["timing"]
    assert (data["prompt"]["passes"], data["decode"]["passes"]) == (1, run["tokens"] - 1)
    assert [block["block"] for block in data["decode"]["blocks"]][3:9] == LAYERS
    assert data["disk_bytes_per_token"] >= 0 and 0 < data["blocks_seconds"] <= data["reply_seconds"]
