"""What a page shows as it opens, and after a load (issue #24): the loaded configuration in the
form (a reload or a second visitor no longer sees the defaults), free disk and the conversion
cache read now, the same figures in every view and in ``python -m optdemo cache``."""

from __future__ import annotations

import shutil
from collections import namedtuple
from types import SimpleNamespace

import pytest
from app_fixtures import config_ui, form_values

from optdemo.core.budget import parse_max_memory
from optdemo.core.load_config import LoadConfig
from optdemo.web.tabs import config as config_tab

REQUEST = SimpleNamespace(session_hash="session-1")


@pytest.mark.slow
def test_a_page_opening_shows_the_loaded_configuration() -> None:
    service, tab = config_ui()
    config = service.make_config("optdemo/tiny-opt", "cpu=5GB", dtype="float32", disk_tier="map")
    service.manager.load(config)
    try:
        opened = config_tab.page_load(service, tab, form_values(tab), REQUEST)
        assert opened[tab.model] == "optdemo/tiny-opt" and opened[tab.dtype] == "float32"
        assert opened[tab.disk_tier] == "map"
        # 5 GB is no quarter of a GiB: the exact budget goes to the advanced field, which wins.
        assert opened[tab.advanced] == "cpu=5000000000B"
        assert opened[tab.plan_state].plan == service.status().plan  # no preview beside the map
        # The form as the page now shows it makes the loaded configuration again: Load reuses.
        shown = {**form_values(tab), **{k: v for k, v in opened.items() if k in tab.fields}}
        assert config_tab.config_from_form(service, tab, shown, REQUEST) == config
    finally:
        service.manager.unload()


def test_a_budget_the_sliders_hold_goes_to_the_sliders() -> None:
    from optdemo.web.tabs.config_text import form_values_for

    _, tab = config_ui()
    values = form_values_for(tab, LoadConfig("optdemo/tiny-opt", max_memory=parse_max_memory("cpu=1536MiB")))
    assert values[tab.cpu_slider] == 1.5 and values[tab.advanced] == ""


def test_nothing_loaded_plans_the_form_as_before() -> None:
    service, tab = config_ui()
    opened = config_tab.page_load(service, tab, form_values(tab, advanced="cpu=1GiB"), REQUEST)
    assert opened[tab.summary].startswith("**tiny-opt** (") and opened[tab.model] == {"__type__": "update"}


def test_free_disk_is_the_same_in_every_view(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """ "This machine" and the offload field's line measure the same place at the same moment,
    again after each load (they were the start-up figures, and differed)."""
    service, tab = config_ui()
    usage = namedtuple("usage", "total used free")
    for free in (7 * 2**30, 3 * 2**30):  # the disk fills up between two loads
        monkeypatch.setattr(shutil, "disk_usage", lambda path, free=free: usage(2 * free, free, free))
        shown = config_tab.refresh_machine(service, tab, {tab.offload: str(tmp_path)}, REQUEST)
        amount = f"{free // 2**30} GiB"
        assert shown[tab.offload_info] == f"Free space at `{tmp_path}`: {amount}"
        assert shown[tab.machine].endswith(f"**Disk:** {amount} free at `{tmp_path}`")


def test_the_conversion_cache_line_is_read_now_and_is_the_clis(
    tiny_bin_model_dir, fresh_cache, capsys
) -> None:
    """The tab said "Conversion cache: 0" (read at start-up) while the CLI listed the entries: both
    print one function's line, and the tab reads it again after a load."""
    from optdemo.__main__ import main
    from optdemo.weights import convert

    service, tab = config_ui()
    assert config_tab.refresh_machine(service, tab, {tab.offload: ""}, REQUEST)[tab.cache_info].startswith(
        "**Conversion cache:** 0 converted checkpoint(s), 0 B in "
    )
    source = str(tiny_bin_model_dir)
    convert.ensure_converted(source, None, "float32", source, local=True)
    line = config_tab.refresh_machine(service, tab, {tab.offload: ""}, REQUEST)[tab.cache_info]
    size = convert.cache_entries()[0].bytes
    from optdemo.core.budget import format_bytes

    root = convert.converted_root()
    assert line == f"**Conversion cache:** 1 converted checkpoint(s), {format_bytes(size)} in `{root}`"
    assert main(["cache"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    assert printed == line.removeprefix("**Conversion cache:** ").replace("`", "")
