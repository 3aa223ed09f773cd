"""The Configuration tab through its handlers (no browser): a plan being computed names its model, a
load's progress reaches the status line, visitors are told what they can do, and the offload-folder
field warns at once."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from app_fixtures import config_ui, form_values

from optdemo.app.service import DemoService, PlanNotice, PlanView
from optdemo.app.settings import AppSettings
from optdemo.runtime.manager import ModelManager
from optdemo.web.blocks import CSS
from optdemo.web.tabs import config as config_tab
from optdemo.web.tabs import devicemap as devicemap_tab

REQUEST = SimpleNamespace(session_hash="session-1")


# ---------------------------------------------------------------- never a stale plan
def test_a_new_plan_first_says_which_model_it_is_computed_for() -> None:
    service, tab = config_ui()
    values = form_values(tab, model="opt-2.7b", advanced="cpu=2GiB")
    pending, final = list(config_tab.plan_live(service, tab, values, REQUEST))
    assert pending[tab.summary] == "Planning **opt-2.7b**…"
    assert pending[tab.plan_state] == PlanNotice("opt-2.7b", "Planning **opt-2.7b**…")
    assert isinstance(final[tab.plan_state], PlanView)
    assert final[tab.summary].startswith("**opt-2.7b** (")
    # The Device map says the same while it is computed: no previous plan drawn as if current.
    with gr.Blocks():
        device_map = devicemap_tab.layout_devicemap_tab(tab.plan_state)
    drawn = devicemap_tab.refresh(service, device_map, {tab.plan_state: pending[tab.plan_state]}, REQUEST)
    assert drawn[device_map.heading] == "Planning **opt-2.7b**…"
    assert "Planning opt-2.7b…" in drawn[device_map.picture] and drawn[device_map.table] == []


def test_a_failed_plan_names_the_model_in_both_tabs() -> None:
    service, tab = config_ui()
    *_, final = config_tab.plan_live(service, tab, form_values(tab, model="opt-1.3"), REQUEST)
    assert final[tab.summary] == (
        "**Cannot plan opt-1.3:** opt-1.3 is not a model optdemo knows: did you mean opt-1.3b?"
    )
    assert final[tab.plan_state].model == "opt-1.3"


# ---------------------------------------------------------------- progress reaches the page
class ReportingManager(ModelManager):
    """Reports a download, a conversion and shards as the loader does, then fails or succeeds."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail

    def load(self, config, progress=None):  # type: ignore[no-untyped-def]
        from optdemo.core.errors import LoadError

        progress(0.5, "Downloading (1.00 GiB of 2.00 GiB)")
        progress(0.25, "Converting opt-1.3b's .bin checkpoint to safetensors (once): 512 MiB of 2.00 GiB")
        progress(None, "Loading the tokenizer of opt-1.3b")
        if self.fail:
            raise LoadError("the disk filled up while loading opt-1.3b: free space")
        return super().load(config, progress)


def test_load_progress_reaches_the_status_line_naming_the_model() -> None:
    service, tab = config_ui(ReportingManager(fail=True))
    updates = list(config_tab.load_live(service, tab, form_values(tab, model="opt-1.3b"), REQUEST))
    statuses = [u[tab.status] for u in updates]
    assert statuses == [
        "**Loading opt-1.3b…**",
        "**Loading opt-1.3b** (0 s): Downloading (1.00 GiB of 2.00 GiB) — 50%",
        "**Loading opt-1.3b** (0 s): Converting opt-1.3b's .bin checkpoint to safetensors (once): "
        "512 MiB of 2.00 GiB — 25%",
        "**Loading opt-1.3b** (0 s): Loading the tokenizer of opt-1.3b",
        "**Could not load opt-1.3b:** the disk filled up while loading opt-1.3b: free space",
    ]


@pytest.mark.slow
def test_a_successful_load_streams_then_reports(tiny_model_dir: Path) -> None:
    service, tab = config_ui(ReportingManager(), model=str(tiny_model_dir))
    updates = list(config_tab.load_live(service, tab, form_values(tab, advanced="cpu=1GiB"), REQUEST))
    assert updates[0][tab.status] == f"**Loading {tiny_model_dir.name}…**"
    assert updates[-1][tab.status].startswith(f"**Loaded** {tiny_model_dir.name} in ")
    assert any("Loading the tokenizer" in u[tab.status] for u in updates[1:-1])
    service.manager.unload()


def test_conversion_reports_bytes_and_shards(tiny_bin_model_dir: Path, tmp_path: Path) -> None:
    from optdemo.weights import convert

    seen: list[tuple[int, int, int, int]] = []
    source = str(tiny_bin_model_dir)
    convert.convert_checkpoint(source, tmp_path, "float32", lambda *counts: seen.append(counts))
    shards = len(list(tiny_bin_model_dir.glob("pytorch_model-*.bin")))
    total = sum(p.stat().st_size for p in tiny_bin_model_dir.glob("pytorch_model-*.bin"))
    assert [s[0] for s in seen] == list(range(shards + 1))
    assert {s[1] for s in seen} == {shards} and {s[3] for s in seen} == {total}
    assert seen[0][2] == 0 and seen[-1][2] == total


def test_the_load_event_shows_no_overlay_on_the_status() -> None:
    from optdemo.web.blocks import build_app

    demo = build_app(DemoService(ModelManager(), AppSettings()))
    loads = [d for d in demo.fns.values() if d.name == "load_live"]
    assert len(loads) == 1 and loads[0].show_progress == "hidden"
    # Clicks reach the manager at once, where a newer one replaces an older one still waiting.
    assert loads[0].concurrency_id == "load" and loads[0].concurrency_limit > 1


# ---------------------------------------------------------------- visitors are told what they can do
def test_visitors_without_a_model_are_told_what_they_can_do() -> None:
    service, tab = config_ui(lock_config=True, auth=(("admin", "pw"),))
    status = config_tab.refresh_status(service, tab, {}, REQUEST)[tab.status]
    assert "Load model" not in status
    assert status.startswith("No model is loaded right now: an admin can load one (sign in under")
    _, tab = config_ui(share=True)
    assert "only the operator can load one" in tab.status.value
    service, tab = config_ui()
    assert "**Load model**" in config_tab.refresh_status(service, tab, {}, REQUEST)[tab.status]


# ---------------------------------------------------------------- the offload-folder field
def test_offload_field_warns_at_once_and_names_the_place(tmp_path: Path) -> None:
    service, tab = config_ui()
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    warned = config_tab.free_space(service, tab, {tab.offload: str(a_file)}, REQUEST)[tab.offload_info]
    assert warned == f"⚠ `{a_file}` is a file, not a folder: give a folder for the layers that go to disk."
    inside_file = config_tab.offload_info(str(a_file / "sub"))
    assert inside_file.startswith(f"⚠ `{a_file / 'sub'}` cannot be created in `{a_file}`")
    deep = tmp_path / ("a-long-folder-name-" * 6) / "offload"
    shown = config_tab.offload_info(str(deep))
    assert shown.startswith(f"Free space at `{tmp_path}`: ")  # the place measured, in full
    assert tab.offload_info.value.startswith(f"Free space at `{os.getcwd()}`")
    assert ".od-paths" in CSS and "overflow-wrap: anywhere" in CSS
    assert "od-paths" in tab.offload_info.elem_classes and "od-paths" in tab.status.elem_classes


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_offload_field_warns_when_the_folder_cannot_be_created(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert config_tab.offload_info(str(locked / "offload")).startswith(
            f"⚠ `{locked / 'offload'}` cannot be created in `{locked}`: pick a folder you can write to."
        )
    finally:
        locked.chmod(0o700)


@pytest.mark.slow
def test_the_loader_reports_conversion_bytes_and_shards(manager, tiny_bin_model_dir: Path, fresh_cache):
    from optdemo.core.budget import format_bytes
    from optdemo.core.load_config import LoadConfig

    texts: list[tuple[float | None, str]] = []
    config = LoadConfig(str(tiny_bin_model_dir), max_memory="cpu=900KiB")
    manager.load(config, lambda fraction, text: texts.append((fraction, text)))
    name = tiny_bin_model_dir.name
    shards = sorted(tiny_bin_model_dir.glob("pytorch_model-*.bin"))
    total = format_bytes(sum(p.stat().st_size for p in shards))
    converting = [(f, t) for f, t in texts if t.startswith(f"Converting {name}'s .bin checkpoint")]
    start = f"Converting {name}'s .bin checkpoint to safetensors (once)"
    assert converting[0] == (None, start)
    assert converting[1] == (0.0, f"{start}: 0 B of {total}, shard 1 of {len(shards)}")
    assert converting[-1] == (1.0, f"{start}: {total} of {total}, shard {len(shards)} of {len(shards)}")
    assert len(converting) == len(shards) + 2
