"""What the plan and the Device map say, where issue #24's newcomer tripped: the KV line, the
quantized total, block labels, a preview above the loaded map, a typo in the owner, decimal
budget units."""

from __future__ import annotations

import html
import re
from types import SimpleNamespace

import pytest
from app_fixtures import config_ui, form_values

from optdemo.app.status import BackendStatus
from optdemo.core.budget import parse_max_memory
from optdemo.core.load_config import LoadConfig
from optdemo.plan.kv_room import BatchRoom
from optdemo.plan.planner import plan_device_map
from optdemo.runtime.status import ModelStatus
from optdemo.web.render import render_device_map, render_legend
from optdemo.web.tabs import config as config_tab
from optdemo.web.tabs import devicemap as devicemap_tab
from optdemo.web.tabs.config_text import budget_units_note

REQUEST = SimpleNamespace(session_hash="session-1")
MIB = 2**20
GIB = 2**30


# ---------------------------------------------------------------------------------- the KV line
def test_no_room_for_one_sequence_says_visitors_are_served_one_at_a_time() -> None:
    """Never "fits" beside "room for 0 such sequences": the plan says what it means, and why."""
    config = LoadConfig("optdemo/tiny-opt", max_memory=parse_max_memory("cpu=2MiB"))
    plan = plan_device_map(config)
    assert plan.batch is not None and plan.batch.sequences == 0 and plan.fits
    from optdemo.web.render import plan_summary

    summary = plan_summary(plan, None, 8)
    assert summary.splitlines()[0].endswith("fits, serving one reply at a time (see the KV cache below)")
    assert plan.batch.text(8) == (
        f"KV cache: 1.5 MiB per 512-token sequence; the budget leaves {_mib(2 * MIB - plan.total_bytes)} "
        "next to the weights: less than one such sequence, so visitors are served one at a time (a long "
        "conversation may outgrow the budget); give the model more memory to serve several at once"
    )
    assert "room for 0" not in summary


def _mib(size: int) -> str:
    from optdemo.core.budget import format_bytes

    return format_bytes(size)


def test_ram_beyond_the_budget_is_named_as_such() -> None:
    """At cpu=0.25GiB with weights on disk, the room was "the budget leaves 21.1 GiB": the RAM
    beyond the budget is said to be that, and why it counts."""
    room = BatchRoom(
        bytes_per_token=96 * 1024,
        context_length=2048,
        room_bytes=int(21.1 * GIB),
        sequences=112,
        beyond_budget_bytes=int(21.1 * GIB),
    )
    assert room.text(8).startswith(
        "KV cache: 192 MiB per 2048-token sequence; the budget leaves 0 B next to the weights, and RAM "
        "beyond the budget (21.1 GiB available now) holds the cache too, since the disk tier's pages "
        "give way to it, room for more such sequences than the batch (--max-batch 8: 8 decoded together)"
    )
    # Only when weights spill to disk does the RAM beyond the budget count.
    on_disk = plan_device_map(LoadConfig("optdemo/tiny-opt", max_memory=parse_max_memory("cpu=1MiB")))
    in_ram = plan_device_map(LoadConfig("optdemo/tiny-opt", max_memory=parse_max_memory("cpu=1GiB")))
    assert on_disk.bytes_per_device.get("disk") and on_disk.batch.beyond_budget_bytes > 0
    inside = on_disk.batch.room_bytes - on_disk.batch.beyond_budget_bytes
    assert inside == MIB - on_disk.bytes_per_device["cpu"]  # what the budget leaves, said apart
    assert in_ram.batch.beyond_budget_bytes == 0 and "beyond the budget" not in in_ram.batch.text(8)


def test_a_huge_room_is_not_counted_out() -> None:
    """tiny-opt said "room for 11775 sequences": past the batch the line says so, and without a
    batch it stops counting at a thousand."""
    room = BatchRoom(3072, 512, 11775 * 3072 * 512, 11775)
    assert "room for more such sequences than the batch (--max-batch 8: 8 decoded together)" in room.text(8)
    assert "11775" not in room.text(8)
    assert "room for over 1000 such sequences at once" in room.text()
    assert "room for 3 such sequences at once (--max-batch 8: 3 decoded together)" in BatchRoom(
        3072, 512, 3 * 3072 * 512, 3
    ).text(8)


# ---------------------------------------------------------------------------------- the picture
def test_the_total_of_a_quantized_model_names_its_format() -> None:
    plan = plan_device_map(
        LoadConfig("optdemo/tiny-opt", max_memory=parse_max_memory("cpu=1GiB"), quantization="8bit")
    )
    assert plan.quantization == "8bit"
    total = re.search(r"Total [^<]*", render_legend(plan)).group(0)
    assert html.unescape(total).endswith(": 8-bit decoder weights, bfloat16 elsewhere")
    assert "in bfloat16" not in render_legend(plan)


def test_block_labels_are_never_cut() -> None:
    """opt-350m's project_in / project_out were drawn as "proje"."""
    plan = plan_device_map(LoadConfig("opt-350m", max_memory=parse_max_memory("cpu=4GiB")))
    picture = render_device_map(plan)
    labels = dict(re.findall(r'data-module="([^"]+)"[^>]*>([^<]+)</div>', picture))
    assert labels["model.decoder.project_in"] == "in" and labels["model.decoder.project_out"] == "out"
    assert "proje" not in labels.values()
    assert "min-width:58px" in picture and "white-space:nowrap" in picture  # a longer label widens its block


def test_a_preview_of_other_settings_is_drawn_below_the_loaded_map() -> None:
    """Never "Plan preview: tiny-opt (not loaded)" above the map of the loaded tiny-opt."""
    loaded = plan_device_map(LoadConfig("optdemo/tiny-opt", max_memory=parse_max_memory("cpu=1GiB")))
    other = plan_device_map(LoadConfig("optdemo/tiny-opt", max_memory=parse_max_memory("cpu=1MiB")))
    status = BackendStatus.local(
        ModelStatus(LoadConfig("optdemo/tiny-opt"), plan=loaded, bytes_per_device=loaded.bytes_per_device)
    )
    view = SimpleNamespace(plan=other, prediction=SimpleNamespace(summary=lambda: "fast"))
    heading, drawn, _ = devicemap_tab.render_tab(view, status, None)  # type: ignore[arg-type]
    picture = html.unescape(drawn)
    assert "(not loaded)" in picture
    assert picture.index("Loaded: tiny-opt") < picture.index("Plan preview")
    assert "Plan preview of the form's other settings for tiny-opt (not loaded)" in picture
    assert "Plan preview: tiny-opt (not loaded)" not in picture
    assert "**Plan preview** for the form's other settings for tiny-opt: Load model applies them" in heading


# ---------------------------------------------------------------------------------- the form
def test_a_typo_in_the_owner_is_answered_with_the_id_it_is_close_to() -> None:
    """facebok/opt-1.3b was reported as "cannot reach the Hub" under the name opt-1.3b."""
    service, tab = config_ui()
    *_, final = config_tab.plan_live(service, tab, form_values(tab, model="facebok/opt-1.3b"), REQUEST)
    assert final[tab.summary] == (
        "**Cannot plan facebok/opt-1.3b:** facebok/opt-1.3b is not a model optdemo knows: did you mean "
        "facebook/opt-1.3b?"
    )


def test_a_model_this_public_deployment_does_not_offer_gets_a_message() -> None:
    """The box takes the typed name (it never silently keeps a refused one) and the plan says why."""
    service, tab = config_ui(share=True)
    assert tab.model.allow_custom_value is True
    plan = config_tab.preview(service, tab, form_values(tab, model="facebook/opt-66b"), REQUEST)
    assert plan[tab.summary] == (
        "**Cannot plan opt-66b:** facebook/opt-66b is not offered here: this public deployment allows "
        "optdemo/tiny-opt"
    )


@pytest.mark.parametrize(
    ("spec", "note"),
    [
        ("cpu=5GB", "**Budget:** 5 GB = 4.66 GiB (a GB is 10^9 bytes, a GiB 2^30: the plan counts in GiB)"),
        ("cpu=5GiB", ""),
        (
            "0=1.5TB, cpu = 512mb",
            "**Budget:** 1.5 TB = 1.36 TiB; 512 MB = 488 MiB (a GB is 10^9 bytes, a GiB 2^30: the plan "
            "counts in GiB)",
        ),
    ],
)
def test_decimal_budget_units_are_said_in_binary_ones(spec: str, note: str) -> None:
    assert budget_units_note(spec) == note


def test_the_plan_of_a_decimal_budget_says_what_it_comes_to() -> None:
    service, tab = config_ui()
    plan = config_tab.preview(service, tab, form_values(tab, advanced="cpu=5GB"), REQUEST)
    assert plan[tab.summary].endswith(
        "**Budget:** 5 GB = 4.66 GiB (a GB is 10^9 bytes, a GiB 2^30: the plan counts in GiB)"
    )


# ---------------------------------------------------------------------------------- polish
def test_an_engine_that_does_not_say_which_it_is() -> None:
    """The status said "engine not reported by the engine"."""
    from optdemo.remote.client import EngineInfo
    from optdemo.web.tabs.endpoint_form import connected_text

    silent = connected_text(EngineInfo("http://h:8000", "m", 2048, connect_seconds=0.5))
    assert silent == (
        "**Connected** in 0.50 s: serving endpoint http://h:8000 (m) — the engine does not say which "
        "it is, 2048-token context. Chat and completion now come from that engine."
    )
    assert "— engine vLLM 0.11, " in connected_text(EngineInfo("http://h:8000", "m", 2048, "vLLM", "0.11"))


def test_a_failed_load_names_the_model_once() -> None:
    """The status said "Could not load X. loading X: ..." (the service names the model for the API)."""
    from app_fixtures import ScriptedManager

    from optdemo.core.errors import LoadError

    class Failing(ScriptedManager):
        def load(self, config, progress=None):  # type: ignore[no-untyped-def]
            raise LoadError("the checkpoint is damaged: download it again")

    service, tab = config_ui(Failing({}))
    for model, name in (("optdemo/tiny-opt", "tiny-opt"), ("someone/opt-1.3b", "someone/opt-1.3b")):
        # (no gr.Error: Gradio would cover the status with an "Error" badge)
        updates = list(config_tab.load_live(service, tab, form_values(tab, model=model), REQUEST))
        damaged = "the checkpoint is damaged: download it again"
        assert updates[-1][tab.status] == f"**Could not load {name}:** {damaged}"


def test_a_long_load_step_still_moves_on_the_page() -> None:
    """A one-shard quantization reported "shard 1 of 1 - 0%" for its whole run: the status line
    counts the seconds meanwhile."""
    import threading

    from app_fixtures import ScriptedManager

    release = threading.Event()

    class Slow(ScriptedManager):
        def load(self, config, progress=None):  # type: ignore[no-untyped-def]
            progress(0.0, "Quantizing tiny-opt to 8bit (once): shard 1 of 1")
            release.wait(10)
            raise RuntimeError("stopped by the test")

    service, tab = config_ui(Slow({}))
    stream = config_tab.load_live(service, tab, form_values(tab), REQUEST)
    seen = [next(stream)[tab.status] for _ in range(4)]
    release.set()
    assert list(stream)[-1][tab.status].startswith("**Could not load tiny-opt:** Something went wrong")
    assert seen[0] == "**Loading tiny-opt…**"
    assert seen[1:] == [
        f"**Loading tiny-opt** ({seconds} s): Quantizing tiny-opt to 8bit (once): shard 1 of 1"
        for seconds in (0, 1, 2)
    ]
