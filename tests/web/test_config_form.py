"""The Configuration tab's form helpers: the budget text from the sliders, quantization's
availability, a suggested budget that survives the sliders, and the conversion cache line."""

from __future__ import annotations

import pytest

from optdemo.app.settings import (
    AppSettings,
)


# ---------------------------------------------------------------------------------- config tab
def test_budget_spec_from_sliders() -> None:
    from optdemo.web.tabs.config_text import budget_spec

    assert budget_spec([5.0], 20.0, "") == "0=5120MiB,cpu=20480MiB"
    assert budget_spec([], 1.5, "") == "cpu=1536MiB"
    assert budget_spec([0.25, 2], 0, "  ") == "0=256MiB,1=2048MiB,cpu=0MiB"


def test_budget_spec_advanced_field_wins() -> None:
    from optdemo.core.budget import parse_max_memory
    from optdemo.web.tabs.config_text import budget_spec

    assert budget_spec([5.0], 20.0, "  0=1GiB,cpu=2GiB ") == "0=1GiB,cpu=2GiB"
    # What the sliders produce is a valid max_memory.
    budget = parse_max_memory(budget_spec([5.0], 20.0, "")).as_max_memory()
    assert budget == {0: 5 * 2**30, "cpu": 20 * 2**30}


def test_quantization_available_without_gpu() -> None:
    from optdemo.system.hardware import Hardware
    from optdemo.web.tabs.config_text import hardware_summary, quantization_availability

    hardware = Hardware(
        gpus=(),
        ram_total_bytes=16 * 2**30,
        ram_available_bytes=8 * 2**30,
        disk_path="/tmp",
        disk_free_bytes=100 * 2**30,
    )
    ok, reason = quantization_availability(hardware)
    assert ok is True  # optdemo's own int8 / int4 CPU path (issue #11)
    assert reason == "torch's int8 / int4 CPU kernels; quantized once into the cache, disk tier included."
    assert "no CUDA GPU" in hardware_summary(hardware)


def test_suggested_budget_survives_the_sliders():
    """The sliders start at the suggested budget; what they send back must be the same
    configuration, or pressing Load on an unchanged form would reload instead of reuse."""
    from optdemo.core.budget import parse_max_memory
    from optdemo.system.hardware import GpuInfo, Hardware, suggest_budget
    from optdemo.web.tabs.config_text import GIB, budget_spec

    for ram, gpu_free in ((23.5 * GIB, None), (16 * GIB + 12345, 7_999_999_999), (64 * GIB, 10 * GIB + 1)):
        gpus = () if gpu_free is None else (GpuInfo(0, "GPU", 16 * GIB, gpu_free),)
        hw = Hardware(gpus, int(ram), int(ram), "/", 10**12)
        budget = suggest_budget(hw).as_max_memory()
        sliders = [round(budget[g.index] / GIB, 2) for g in gpus]  # as the tab sets them
        spec = budget_spec(sliders, round(budget["cpu"] / GIB, 2), "")
        assert parse_max_memory(spec) == suggest_budget(hw), spec


def test_conversion_cache_is_shown_and_cleared_by_admins_only(tiny_bin_model_dir, tmp_path, monkeypatch):
    from optdemo.app.service import DemoService
    from optdemo.core.errors import AccessError
    from optdemo.runtime.manager import ModelManager
    from optdemo.weights import convert

    monkeypatch.setenv("OPTDEMO_CACHE", str(tmp_path))
    source = str(tiny_bin_model_dir)
    convert.ensure_converted(source, None, "float32", source, local=True)
    size = convert.cache_entries()[0].bytes
    public = DemoService(ModelManager(), AppSettings(lock_config=True, auth=(("admin", "pw"),)))
    assert public.conversion_cache().startswith("1 converted checkpoint(s), ")
    with pytest.raises(AccessError, match="visitors cannot clear the conversion cache"):
        public.clear_conversion_cache("visitor")
    owner = public.sign_in("127.0.0.1", "admin", "pw").token
    assert public.clear_conversion_cache(owner) == size
    assert public.conversion_cache().startswith("0 converted checkpoint(s), 0 B")
