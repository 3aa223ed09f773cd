"""The device-map picture and table, the plan summary, the status line and the chat view: pure
renderers from engine data to HTML and Markdown, tested without a server."""

from __future__ import annotations

import html
import re
from dataclasses import replace

import pytest

from optdemo.core.budget import Device
from optdemo.plan.planner import Block, Plan


# ---------------------------------------------------------------------------------- plan fixtures
def make_plan(
    layer_devices: list[Device], warnings: tuple[str, ...] = (), blockers: tuple[str, ...] = ()
) -> Plan:
    """A plan of a small OPT: embeddings and norm on the first layer's device, one block per
    decoder layer, a tied LM head."""
    first = layer_devices[0]
    blocks = (
        Block("model.decoder.embed_tokens", first, 4096, "embedding"),
        Block("model.decoder.embed_positions", first, 2048, "embedding"),
        Block("model.decoder.final_layer_norm", first, 512, "norm"),
        *(Block(f"model.decoder.layers.{i}", d, 1024, "layer") for i, d in enumerate(layer_devices)),
        Block("lm_head", None, 0, "head", tied_to="model.decoder.embed_tokens"),
    )
    device_map = {b.name: b.device for b in blocks if b.device is not None}
    per_device: dict[Device, int] = {}
    for b in blocks:
        if b.device is not None:
            per_device[b.device] = per_device.get(b.device, 0) + b.bytes
    return Plan(
        model="facebook/opt-small",
        display_name="opt-small",
        dtype="float16",
        device_map=device_map,
        module_bytes={b.name: b.bytes for b in blocks if b.device is not None},
        bytes_per_device=per_device,
        budget={0: 8192, "cpu": 8192},
        total_bytes=sum(per_device.values()),
        blocks=blocks,
        needs_offload_folder="disk" in per_device,
        disk_bytes_written=per_device.get("disk", 0),
        conversion_bytes=0,
        warnings=warnings + blockers,
        blockers=blockers,
        checkpoint_format="safetensors",
    )


def od_blocks(picture: str) -> list[dict[str, str]]:
    """The .od-block elements of a rendered picture, as attribute dicts (unescaped)."""
    found = []
    for tag in re.findall(r'<div class="od-block"[^>]*>', picture):
        attrs = {k: html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', tag)}
        found.append(attrs)
    return found


@pytest.fixture(scope="module")
def opt66b_plan() -> Plan:
    """A real plan (meta model, no weights) of opt-66b on a 5 GiB GPU and 20 GiB of RAM: GPU, CPU
    and disk all used (whether it fits depends on this machine's free disk)."""
    from optdemo.core.load_config import LoadConfig
    from optdemo.plan.planner import plan_device_map

    return plan_device_map(LoadConfig("facebook/opt-66b", max_memory="0=5GiB,cpu=20GiB"))


# ---------------------------------------------------------------------------------- render
def test_device_label_and_color() -> None:
    from optdemo.plan.planner import device_label
    from optdemo.web.render import DEVICE_COLORS, GPU_COLORS, device_color

    assert device_label(0) == "GPU 0"
    assert device_label(3) == "GPU 3"
    assert device_label("cpu") == "CPU"
    assert device_label("disk") == "disk"
    assert device_label(None) == "tied"
    assert device_color(0) == GPU_COLORS[0]
    assert device_color(1) == GPU_COLORS[1]
    assert device_color(len(GPU_COLORS)) == GPU_COLORS[0]  # wraps around
    assert device_color("cpu") == DEVICE_COLORS["cpu"]
    assert device_color("disk") == DEVICE_COLORS["disk"]
    assert device_color(None) == DEVICE_COLORS["tied"]
    assert len({device_color(0), device_color("cpu"), device_color("disk")}) == 3


def test_render_device_map_one_block_per_module() -> None:
    from optdemo.web.render import render_device_map

    plan = make_plan([0, 0, "cpu", "disk"])
    picture = render_device_map(plan, title="Plan <preview>")
    found = od_blocks(picture)
    assert [b["data-module"] for b in found] == [b.name for b in plan.blocks]
    by_module = {b["data-module"]: b for b in found}
    assert by_module["model.decoder.embed_tokens"]["data-device"] == "GPU 0"
    assert [by_module[f"model.decoder.layers.{i}"]["data-device"] for i in range(4)] == [
        "GPU 0",
        "GPU 0",
        "CPU",
        "disk",
    ]
    assert by_module["lm_head"]["data-device"] == "tied"
    assert "tied to model.decoder.embed_tokens" in by_module["lm_head"]["title"]
    # Tooltip and aria-label name the module, its size and its device.
    layer = by_module["model.decoder.layers.2"]
    assert layer["title"] == layer["aria-label"]
    assert "model.decoder.layers.2" in layer["title"] and "CPU" in layer["title"]
    assert "planned" not in picture  # no actual map: nothing to compare
    assert "outline:3px solid" not in picture
    assert "Plan &lt;preview&gt;" in picture  # the title is escaped
    # The legend lists every device used.
    legend = picture.split('class="od-legend"', 1)[1]
    for label in ("GPU 0", "CPU", "disk"):
        assert f">{label}</span>" in legend
    # The grey block is explained: the LM head has no weights of its own.
    assert "lm_head shares the embeddings&#x27; weights (tied): drawn with them, counted once" in legend


def test_render_device_map_outlines_differences_from_the_plan() -> None:
    from optdemo.web.render import render_device_map

    plan = make_plan(["cpu", "cpu", "disk"])
    actual = dict(plan.device_map)
    actual["model.decoder.layers.1"] = "disk"  # planned CPU, loaded on disk
    picture = render_device_map(plan, actual)
    by_module = {b["data-module"]: b for b in od_blocks(picture)}
    moved = by_module["model.decoder.layers.1"]
    assert moved["data-device"] == "disk"  # drawn where it actually is
    assert "planned CPU, loaded on disk" in moved["title"]
    assert "outline:3px solid #dc2626" in moved["style"]
    for name, attrs in by_module.items():
        if name != "model.decoder.layers.1":
            assert "outline" not in attrs["style"], name
            assert "planned" not in attrs["title"], name
    # A whole-model map ("" -> device) resolves every module.
    same = render_device_map(plan, {"": "cpu"})
    differing = [b["data-module"] for b in od_blocks(same) if "planned" in b["title"]]
    assert differing == ["model.decoder.layers.2"]


def test_device_map_rows() -> None:
    from optdemo.web.render import device_map_rows

    plan = make_plan([0, "cpu"])
    rows = device_map_rows(plan)
    assert [r[0] for r in rows] == [b.name for b in plan.blocks]
    assert all(len(r) == 5 for r in rows)
    by_module = {r[0]: r for r in rows}
    assert by_module["model.decoder.layers.0"][1:] == ["GPU 0", "1 KiB", "GPU 0", ""]
    assert by_module["model.decoder.layers.1"][1] == "CPU"
    assert by_module["lm_head"][1] == "tied to model.decoder.embed_tokens"
    assert not any(r[4] for r in rows)

    actual = dict(plan.device_map)
    actual["model.decoder.layers.0"] = "cpu"
    rows = {r[0]: r for r in device_map_rows(plan, actual)}
    assert rows["model.decoder.layers.0"][1] == "CPU"  # actual device
    assert rows["model.decoder.layers.0"][3] == "GPU 0"  # planned device
    assert "differs" in rows["model.decoder.layers.0"][4]
    assert [name for name, r in rows.items() if r[4]] == ["model.decoder.layers.0"]


def test_plan_summary_fits() -> None:
    from optdemo.web.render import plan_summary

    summary = plan_summary(make_plan(["cpu", "cpu"], warnings=("a warning",)))
    assert "**opt-small**" in summary
    assert "fits" in summary and "does not fit" not in summary
    assert "**CPU**" in summary
    assert "- a warning" in summary


def test_plan_summary_does_not_fit() -> None:
    from optdemo.web.render import plan_summary

    warning = "budget 16 KiB cannot hold opt-small: give an offload folder"
    summary = plan_summary(make_plan(["cpu", "disk"], blockers=(warning,)))
    assert "**does not fit** as configured" in summary
    assert f"- {warning}" in summary
    assert "**CPU**" in summary and "**disk**" in summary


def test_real_plan_on_three_devices(opt66b_plan: Plan) -> None:
    from optdemo.web.render import device_map_rows, plan_summary, render_device_map

    summary = plan_summary(opt66b_plan)
    assert ("does not fit" in summary) is (not opt66b_plan.fits)
    assert "opt-66b" in summary
    for warning in opt66b_plan.warnings:
        assert f"- {warning}" in summary
    picture = render_device_map(opt66b_plan)
    found = od_blocks(picture)
    assert len(found) == len(opt66b_plan.blocks) == 64 + 4
    assert {b["data-device"] for b in found} == {"GPU 0", "CPU", "disk", "tied"}
    assert sum(b["data-module"].startswith("model.decoder.layers.") for b in found) == 64
    assert len(device_map_rows(opt66b_plan)) == len(found)


def test_status_text() -> None:
    from optdemo.app.status import BackendStatus
    from optdemo.core.load_config import LoadConfig
    from optdemo.web.render import status_text

    assert status_text(BackendStatus(None)).startswith("No model loaded yet")
    loaded = BackendStatus(
        LoadConfig("tiny-opt"),
        load_seconds=1.234,
        bytes_per_device={0: 2**19, "cpu": 2**20, "disk": 3 * 2**20},
    )
    text = status_text(loaded)
    assert "**tiny-opt** is loaded (in 1.2 s)" in text
    assert "GPU 0: 512 KiB · CPU: 1 MiB · disk: 3 MiB" in text
    assert "generating" in status_text(replace(loaded, busy="generating"))
    assert "(in 0.0 s)" in status_text(replace(loaded, load_seconds=None))


# ---------------------------------------------------------------------------------- chat tab
def test_to_messages() -> None:
    from optdemo.web.render import to_messages

    turns = [
        {"user": "Hi", "assistant": "Hello!", "stats": "3 tokens · 12.0 tokens/s"},
        {"user": "More?", "assistant": "", "stats": ""},
    ]
    assert to_messages(turns) == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!\n\n<sub>3 tokens · 12.0 tokens/s</sub>"},
        {"role": "user", "content": "More?"},
        {"role": "assistant", "content": "…"},  # a reply still on its way
    ]
    assert to_messages([]) == []
    assert to_messages([{"user": "a", "assistant": "b"}])[1]["content"] == "b"  # no stats key
