"""The GPU offload policies' mechanics, exercised on the CPU (no GPU here): the policy choice, the
one-ahead prefetch schedule, and that re-hooking offloaded blocks leaves outputs identical."""

from __future__ import annotations

import pytest
import torch

from optdemo.gpu_offload import choose_policy, offloaded_entries, prefetch_on_device, run_on_cpu
from optdemo.speed import Bandwidths

IDS = torch.tensor([[2, 10, 20, 30, 40, 50]])


def _greedy(model) -> torch.Tensor:
    with torch.inference_mode():
        return model.generate(IDS, attention_mask=torch.ones_like(IDS), max_new_tokens=12, do_sample=False)


@pytest.fixture
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def test_policy_picks_the_faster_tier():
    slow_bus = Bandwidths(cpu_matvec={"float16": 20e9}, disk_read=1e9, host_to_device=6e9)
    choice = choose_policy(12 * 2**30, "float16", slow_bus)
    assert choice.policy == "cpu" and choice.cpu_seconds < choice.gpu_seconds
    fast_bus = Bandwidths(cpu_matvec={"float16": 5e9}, disk_read=1e9, host_to_device=25e9)
    assert choose_policy(12 * 2**30, "float16", fast_bus).policy == "gpu"
    assert choose_policy(12 * 2**30, "float16", fast_bus, requested="cpu").policy == "cpu"
    no_gpu = Bandwidths(cpu_matvec={"float32": 5e9}, disk_read=1e9)
    assert choose_policy(2**30, "float32", no_gpu).policy == "cpu"


def test_offloaded_entries_only_with_a_gpu_in_the_map():
    assert offloaded_entries({"a": "cpu", "b": "disk"}) == []
    assert offloaded_entries({"a": 0, "b": "cpu", "c": "disk", "d": 0}) == ["b", "c"]


def test_prefetch_copies_the_next_block_before_dropping_the_current(tiny_model):
    before = _greedy(tiny_model)
    entries = [f"model.decoder.layers.{i}" for i in range(1, 5)]
    prefetcher = prefetch_on_device(tiny_model, entries, "cpu")
    after = _greedy(tiny_model)
    assert torch.equal(before, after)
    log = prefetcher.log
    runs = [i for step, (what, i) in enumerate(log) if what == "run"]
    assert runs[:4] == [0, 1, 2, 3]
    # Block i+1's copy is issued before block i is dropped: transfer overlaps compute.
    for i in range(3):
        assert log.index(("copy", i + 1)) < log.index(("drop", i))
    # Between forward passes each block's weights point back at host memory.
    for name in entries:
        module = tiny_model.get_submodule(name)
        index = prefetcher.order[id(module)]
        host = prefetcher.blocks[index][1]
        assert module.fc1.weight.data_ptr() == host["fc1.weight"].data_ptr()


def test_cpu_execution_hooks_keep_outputs(tiny_model):
    before = _greedy(tiny_model)
    assert run_on_cpu(tiny_model, ["model.decoder.layers.2", "model.decoder.layers.3"]) == 2
    assert torch.equal(before, _greedy(tiny_model))
