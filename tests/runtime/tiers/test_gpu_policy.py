"""The GPU offload policies' logic and mechanics, on the CPU: the policy choice (0 bytes, disk
bytes, pinned vs pageable), the one-ahead prefetch schedule over two fixed buffers, bounded
bookkeeping, exception safety, host memory accounting (packed blocks replace the originals), the
CPU policy's memory-mapped disk tier, and ``fast_offload=False`` meaning plain Accelerate.
tests/gpu/test_cuda.py runs the same mechanics on a real GPU."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from optdemo.core.defaults import DEFAULT_CPU_LAYERS
from optdemo.core.load_config import LoadConfig
from optdemo.plan.bandwidth import Bandwidths
from optdemo.plan.policy import choose_policy
from optdemo.runtime.tiers.gpu_policy import (
    LOG_EVENTS,
    PackedBlock,
    apply_policy,
    copy_ahead_to_gpu,
    main_gpu,
    movable_entries,
    offloaded_entries,
    release,
    run_on_cpu,
)

IDS = torch.tensor([[2, 10, 20, 30, 40, 50]])
GIB = 2**30


def _greedy(model, tokens: int = 12) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(
            IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=tokens, do_sample=False
        )


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------ the choice
def test_policy_picks_the_faster_tier_from_pinned_bandwidth():
    slow_bus = Bandwidths(cpu_matvec={"float16": 20e9}, disk_read=1e9, host_to_device=6e9)
    choice = choose_policy(12 * GIB, 0, "float16", slow_bus)
    assert choice.policy == "cpu"
    assert choice.cpu_seconds == pytest.approx(12 * GIB / 20e9)
    assert choice.gpu_seconds == pytest.approx(12 * GIB / 6e9)  # no pinned figure: pageable's
    # Pinned copies at 25 GB/s beat a 20 GB/s CPU although pageable ones (6 GB/s) do not.
    pinned_bus = Bandwidths(
        cpu_matvec={"float16": 20e9}, disk_read=1e9, host_to_device=6e9, host_to_device_pinned=25e9
    )
    choice = choose_policy(12 * GIB, 0, "float16", pinned_bus)
    assert choice.policy == "gpu" and choice.gpu_seconds == pytest.approx(12 * GIB / 25e9)
    assert choice.accelerate_seconds == pytest.approx(12 * GIB / 6e9)
    assert choose_policy(12 * GIB, 0, "float16", pinned_bus, requested="cpu").policy == "cpu"
    no_gpu = Bandwidths(cpu_matvec={"float32": 5e9}, disk_read=1e9)
    assert choose_policy(GIB, 0, "float32", no_gpu).policy == "cpu"


def test_policy_counts_disk_bytes_and_decides_nothing_for_zero_bytes():
    bus = Bandwidths(
        cpu_matvec={"float16": 20e9}, disk_read=1e9, host_to_device=10e9, host_to_device_pinned=40e9
    )
    assert choose_policy(0, 0, "float16", bus) is None  # nothing offloaded: nothing to decide
    # Disk-only offload: the prefetcher cannot help (disk entries stay with Accelerate, pageable),
    # so the CPU (20 GB/s) beats the bus (10 GB/s), where resident bytes alone would pick the GPU.
    disk_only = choose_policy(0, 4 * GIB, "float16", bus)
    assert disk_only.policy == "cpu"
    assert disk_only.gpu_seconds == pytest.approx(4 * GIB / 10e9)
    assert disk_only.cpu_seconds == pytest.approx(4 * GIB / 20e9)
    assert choose_policy(4 * GIB, 0, "float16", bus).policy == "gpu"


def test_default_is_the_measured_choice_and_says_why():
    assert DEFAULT_CPU_LAYERS == "auto"  # since measured on an H100 (docs/BENCHMARKS.md)
    assert LoadConfig("optdemo/tiny-opt").cpu_layers == "auto"
    bus = Bandwidths(cpu_matvec={"float16": 20e9}, disk_read=1e9, host_to_device=10e9)
    chosen = choose_policy(GIB, 0, "float16", bus)
    assert chosen.policy == "cpu" and "predicted faster" in chosen.reason
    plain = choose_policy(GIB, 0, "float16", bus, requested="accelerate")
    assert plain.policy == "accelerate" and "chosen in the configuration" in plain.reason
    assert plain.accelerate_seconds == pytest.approx(GIB / 10e9)


def test_fast_offload_off_means_plain_accelerate_everywhere():
    config = LoadConfig("optdemo/tiny-opt", fast_offload=False, cpu_layers="gpu")
    assert config.cpu_layers_in_force == "accelerate"
    assert LoadConfig("optdemo/tiny-opt", cpu_layers="gpu").cpu_layers_in_force == "gpu"


def test_plan_carries_the_policy_in_force(tiny_model_dir):
    from optdemo.plan.planner import plan_device_map

    assert plan_device_map(LoadConfig(str(tiny_model_dir), cpu_layers="cpu")).cpu_layers == "cpu"
    off = LoadConfig(str(tiny_model_dir), cpu_layers="cpu", fast_offload=False)
    assert plan_device_map(off).cpu_layers == "accelerate"


def test_entries_and_main_gpu_follow_accelerate():
    assert offloaded_entries({"a": "cpu", "b": "disk"}) == []
    assert offloaded_entries({"a": 0, "b": "cpu", "c": "disk", "d": 0}) == ["b", "c"]
    assert main_gpu({"a": "cpu"}) is None
    # dispatch_model takes list(set_of_devices)[0]: GPU 0 even when GPU 1 comes first in the map.
    assert main_gpu({"a": 1, "b": "cpu", "c": 0}) == 0
    assert main_gpu({"a": 3, "b": "disk"}) == 3


def test_tied_entries_stay_with_accelerate(tiny_model):
    # OPT ties lm_head to the input embeddings: moving one would split the tie.
    assert tiny_model.lm_head.weight is tiny_model.model.decoder.embed_tokens.weight
    entries = ["model.decoder.layers.1", "lm_head", "model.decoder.final_layer_norm"]
    assert movable_entries(tiny_model, entries) == [entries[0], entries[2]]


# ------------------------------------------------------------------------------ the mechanics
def test_prefetch_schedule_uses_two_buffers_and_keeps_outputs(tiny_model):
    before = _greedy(tiny_model)
    entries = [f"model.decoder.layers.{i}" for i in range(1, 5)]
    prefetcher = copy_ahead_to_gpu(tiny_model, entries, "cpu")
    assert torch.equal(before, _greedy(tiny_model))
    log = list(prefetcher.log)
    assert [i for what, i in log if what == "run"][:4] == [0, 1, 2, 3]
    # Block i+1's copy is issued before block i is dropped: transfer overlaps compute.
    for i in range(3):
        assert log.index(("copy", i + 1)) < log.index(("drop", i))
    # Exactly two device buffers, each the size of the largest block: the bound on top of the budget.
    largest = max(block.nbytes for block in prefetcher.blocks)
    assert len(prefetcher.slots) == 2 and prefetcher.in_flight_bytes == 2 * largest
    # Between forward passes each block's weights point back at its packed host buffer.
    for block in prefetcher.blocks:
        fc1 = block.module.fc1.weight
        assert fc1.data_ptr() == block.host_views["fc1.weight"].data_ptr()
        start = block.host.data_ptr()
        assert start <= fc1.data_ptr() < start + block.nbytes


def test_prefetch_log_is_bounded_however_long_the_generation(tiny_model):
    prefetcher = copy_ahead_to_gpu(tiny_model, [f"model.decoder.layers.{i}" for i in range(6)], "cpu")
    _greedy(tiny_model, tokens=40)  # 41 forward passes x 6 blocks x 3 events
    assert len(prefetcher.log) == LOG_EVENTS
    assert len(prefetcher.pending) <= 1 and not prefetcher.running


def test_a_failing_block_leaves_no_device_copy_behind(tiny_model):
    entries = [f"model.decoder.layers.{i}" for i in range(1, 4)]
    before = _greedy(tiny_model)
    prefetcher = copy_ahead_to_gpu(tiny_model, entries, "cpu")
    layer = tiny_model.get_submodule(entries[1])
    original = layer.fc2.forward
    layer.fc2.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        _greedy(tiny_model)
    layer.fc2.forward = original
    block = prefetcher.blocks[1]
    assert layer.fc1.weight.data_ptr() == block.host_views["fc1.weight"].data_ptr()
    assert not prefetcher.running and len(prefetcher.pending) <= 1
    assert torch.equal(before, _greedy(tiny_model))  # and the model still works


def test_packing_replaces_the_originals_instead_of_doubling_host_memory():
    # Two tensors, one odd-sized: the packed buffer is their bytes rounded to 64-byte alignment.
    module = torch.nn.Linear(10, 7)
    tensors = {"weight": module.weight.detach().clone(), "bias": module.bias.detach().clone()}
    expected = {k: t.clone() for k, t in tensors.items()}
    refs = [weakref.ref(t) for t in tensors.values()]
    block = PackedBlock(module, tensors, pin=False)
    gc.collect()
    assert all(ref() is None for ref in refs)  # the originals are gone: one copy, not two
    assert block.nbytes == 320 + 64  # 7x10 float32 = 280 -> 320; 7 float32 = 28 -> 64
    assert all(torch.equal(block.host_views[k], expected[k]) for k in expected)


def test_prefetch_takes_accelerates_cpu_copies_out_of_its_weights_map(tiny_model):
    from accelerate.hooks import attach_align_device_hook
    from accelerate.utils import OffloadedWeightsLoader

    before = _greedy(tiny_model)
    # Offload hooks over one shared weights map, as dispatch_model builds them for CPU entries.
    loader = OffloadedWeightsLoader(state_dict=dict(tiny_model.state_dict()))
    attach_align_device_hook(tiny_model, execution_device="cpu", offload=True, weights_map=loader)
    assert tiny_model.model.decoder.layers[2].fc1.weight.device.type == "meta"
    prefix = "model.decoder.layers.2."
    assert any(key.startswith(prefix) for key in loader.state_dict)
    copy_ahead_to_gpu(tiny_model, ["model.decoder.layers.2"], "cpu")
    # The packed block is now the only host copy of that layer's weights.
    assert not any(key.startswith(prefix) for key in loader.state_dict)
    assert torch.equal(before, _greedy(tiny_model))


def test_release_restores_forwards_and_frees_the_buffers(tiny_model):
    before = _greedy(tiny_model)
    entries = ["model.decoder.layers.0", "model.decoder.layers.1"]
    prefetcher = copy_ahead_to_gpu(tiny_model, entries, "cpu")
    layer = tiny_model.get_submodule(entries[0])
    assert "forward" in layer.__dict__  # wrapped
    release(tiny_model)
    assert "forward" not in layer.__dict__  # the class's own forward again
    assert not hasattr(tiny_model, "_optdemo_gpu_upload") and prefetcher.slots == []
    assert torch.equal(before, _greedy(tiny_model))  # weights stay usable from host memory
    release(tiny_model)  # idempotent, and safe on any model


def test_cpu_policy_keeps_outputs(tiny_model):
    before = _greedy(tiny_model)
    assert run_on_cpu(tiny_model, ["model.decoder.layers.2", "model.decoder.layers.3"]) == 2
    assert torch.equal(before, _greedy(tiny_model))


@pytest.mark.slow
def test_cpu_policy_maps_the_disk_tier_instead_of_copying_it(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    reference = _greedy(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32))
    device_map = {
        "model.decoder.embed_tokens": "cpu",
        "lm_head": "cpu",
        "model.decoder.embed_positions": "cpu",
        "model.decoder.final_layer_norm": "cpu",
        **{f"model.decoder.layers.{i}": "cpu" for i in range(4)},
        "model.decoder.layers.4": "disk",
        "model.decoder.layers.5": "disk",
    }
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, dtype=torch.float32, device_map=device_map, offload_folder=str(tmp_path)
    )
    disk = ["model.decoder.layers.4", "model.decoder.layers.5"]
    assert model.get_submodule(disk[0]).fc1.weight.device.type == "meta"
    run_on_cpu(model, disk, frozenset(disk))
    for name in disk:
        weight = model.get_submodule(name).fc1.weight
        # Served from the checkpoint's pages (a file mapping), not copied into anonymous memory.
        assert _mapped_file(weight.data_ptr()).endswith(".safetensors")
    assert torch.equal(reference, _greedy(model))


def _mapped_file(address: int) -> str:
    """The file backing ``address`` in this process ('' for anonymous memory)."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return fields[5] if len(fields) > 5 else ""
    return ""


def test_apply_policy_decides_nothing_without_a_gpu_in_the_map(tiny_model):
    tiny_model.hf_device_map = {"model.decoder.layers.0": "cpu", "model.decoder.layers.1": "disk"}
    assert apply_policy(tiny_model, "auto", "float32") is None


# ------------------------------------------------------------------------------ selectable everywhere
def test_policy_is_selectable_from_flags_environment_and_the_service():
    from optdemo.app.service import DemoService
    from optdemo.app.settings import parse_settings
    from optdemo.core.errors import ConfigError
    from optdemo.runtime.manager import ModelManager

    assert parse_settings([], env={}).cpu_layers == DEFAULT_CPU_LAYERS
    flags = parse_settings(["--cpu-layers", "gpu", "--plain-accelerate"], env={})
    assert (flags.cpu_layers, flags.fast_offload) == ("gpu", False)
    env = parse_settings([], env={"OPTDEMO_CPU_LAYERS": "cpu", "OPTDEMO_PLAIN_ACCELERATE": "1"})
    assert (env.cpu_layers, env.fast_offload) == ("cpu", False)
    service = DemoService(ModelManager(), flags)
    initial = service.initial_config()
    assert (initial.cpu_layers, initial.fast_offload) == ("gpu", False)
    assert initial.cpu_layers_in_force == "accelerate"
    assert service.make_config("optdemo/tiny-opt", cpu_layers="cpu").cpu_layers == "cpu"
    with pytest.raises(ConfigError, match="cpu_layers 'fast' is not supported: choose one of auto"):
        service.make_config("optdemo/tiny-opt", cpu_layers="fast")
