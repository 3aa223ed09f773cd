"""Time on the Device map: a bar under each block (its time, red the part waiting for its
weights), a table, the totals that explain the reply's speed beside the floor and the prediction,
the line on a long pass; the tab redraws after each reply; and, on a disk-tier model, the blocks'
times the map shows add up to the reply's measured time, as /status says."""

from __future__ import annotations

import html
import re
from dataclasses import replace
from pathlib import Path

import gradio as gr
import pytest

from optdemo.plan.speed import SpeedPrediction
from optdemo.runtime.timing_data import DISK, BlockTiming, PhaseTiming, Progress, ReplyTiming, TimingReport
from optdemo.web.render import (
    COMPUTE_COLOR,
    WAIT_COLOR,
    progress_text,
    render_device_map,
    timing_rows,
    timing_summary,
)
from optdemo.web.tabs import devicemap as devicemap_tab

GiB = 2**30
NAMES = ["model.decoder.embed_tokens", "model.decoder.layers.0", "model.decoder.layers.1", "lm_head"]
REQUEST = None  # the handlers here read no request


def example() -> ReplyTiming:
    """A disk-bound reply: layer 0 streamed from disk (1 GiB a token), layer 1 in RAM."""
    prompt = PhaseTiming(
        1,
        100,
        2.05,
        (
            BlockTiming(NAMES[0], 0.01, 0.0, 0, 0),
            BlockTiming(NAMES[1], 1.0, 0.6, GiB, 0, DISK),
            BlockTiming(NAMES[2], 0.9, 0.0, 0, 0),
            BlockTiming(NAMES[3], 0.09, 0.0, 0, 0),
        ),
    )
    decode = PhaseTiming(
        4,
        4,
        4.2,
        (
            BlockTiming(NAMES[0], 0.04, 0.0, 0, 0),
            BlockTiming(NAMES[1], 3.0, 2.604, 4 * GiB, 0, DISK),
            BlockTiming(NAMES[2], 1.0, 0.0, 0, 0),
            BlockTiming(NAMES[3], 0.12, 0.0, 0, 0),
        ),
    )
    return ReplyTiming(prompt, decode, reply_seconds=6.5, waited_seconds=0.25, disk_rate=2 * GiB)


def time_bars(picture: str) -> dict[str, dict[str, str]]:
    """The .od-time bars of a rendered picture: module -> attributes (unescaped)."""
    bars = {}
    for tag in re.findall(r'<div class="od-time"[^>]*>', picture):
        attrs = {k: html.unescape(v) for k, v in re.findall(r'([\w-]+)="([^"]*)"', tag)}
        bars[attrs["data-module"]] = attrs
    return bars


# ---------------------------------------------------------------------------------- rendering
def test_each_block_stands_over_a_bar_of_its_time_red_where_it_waited() -> None:
    from test_render import make_plan

    plan = make_plan(["cpu", "disk"])
    timing = example()
    picture = render_device_map(plan, None, "Loaded", None, timing)
    bars = time_bars(picture)
    assert list(bars) == NAMES  # in the plan's order, the blocks that ran
    layer = bars[NAMES[1]]
    assert float(layer["data-seconds"]) == pytest.approx(4.0)  # prompt and decode together
    assert float(layer["data-wait-seconds"]) == pytest.approx(3.204)
    assert layer["data-disk-bytes"] == str(5 * GiB)
    assert "80% waiting for disk" in layer["title"] and "5 GiB read" in layer["title"]
    # The slowest block's bar is full height, the wait its red share of it.
    bar = picture[picture.index(f'data-module="{NAMES[1]}" data-seconds') :]
    assert f'<span style="height:35px;background:{WAIT_COLOR}' in bar.split("</div>")[0]
    assert f'<span style="height:9px;background:{COMPUTE_COLOR}' in bar.split("</div>")[0]
    assert "no wait for its weights" in bars[NAMES[2]]["title"]
    assert "the tallest 4 s" in picture
    assert "od-time" not in render_device_map(plan, None, "Loaded")  # no reply yet: no bars


def test_the_totals_explain_the_speed_beside_the_floor_and_the_prediction() -> None:
    prediction = SpeedPrediction(0.8, {"disk reads": 0.8}, "disk layers re-read from disk every token")
    assert timing_summary(example(), prediction) == (
        "**Latest reply**: a decode step took 1.05 s (4 steps); 63% waiting for disk: 1 GiB read a token, "
        "at 975 MiB/s. Floor for moving those bytes at this machine's measured rates (disk reads 2 GiB/s): "
        "0.5 s/token. Predicted: 0.8 s/token. Prompt: 100 tokens in 2.05 s (30% waiting). Of its 6.5 s: "
        "6.16 s in the blocks, 0.09 s between them (the model's own code), 0.25 s outside its passes "
        "(preparing, sampling, its text, the engine); it waited 0.25 s in line before."
    )


def test_the_table_gives_each_block_its_prompt_time_step_time_wait_and_bytes() -> None:
    rows = timing_rows(example())
    assert rows[1] == [NAMES[1], "1000.00", "750.00", "80%", "disk", "1 GiB", ""]
    assert rows[2] == [NAMES[2], "900.00", "250.00", "0%", "", "", ""]
    assert rows[-2][0].startswith("between the blocks") and rows[-2][1:3] == ["50.00", "10.00"]
    assert rows[-1][0].startswith("outside the passes") and rows[-1][1] == "250.00"


def test_a_batched_reply_says_its_steps_were_shared() -> None:
    shared = ReplyTiming(example().prompt, example().decode, 6.5, 0.25, batch=3, disk_rate=2 * GiB)
    assert "Decoded beside up to 2 other replies: a shared step's time counts whole for each of them." in (
        timing_summary(shared)
    )


def test_a_long_pass_says_which_layer_and_how_long_is_left() -> None:
    assert progress_text(Progress("prompt", 450, 3, 24, 6.0)) == (
        "Computing a prompt of 450 tokens: layer 4 of 24, about 42 s left (6 s so far)."
    )
    assert progress_text(Progress("step", 2, 0, 24, 1.5)) == (
        "Decoding the next token of 2 replies: layer 1 of 24 (2 s so far)."
    )


# ---------------------------------------------------------------------------------- the tab
def map_ui(manager):
    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings

    service = DemoService(manager, AppSettings())
    with gr.Blocks():
        tab = devicemap_tab.layout_devicemap_tab(gr.State(None))
    return service, tab


@pytest.mark.slow
def test_the_tab_redraws_after_each_reply_and_shows_a_long_pass(manager, tiny_model_dir) -> None:
    from optdemo.core.generation import GenerationParams
    from optdemo.core.load_config import LoadConfig

    manager.load(LoadConfig(str(tiny_model_dir)))
    service, tab = map_ui(manager)
    values = {tab.plan_state: None, tab.drawn: -1}
    first = devicemap_tab.refresh(service, tab, values, REQUEST)
    assert first[tab.drawn] == 0 and first[tab.timing_table]["visible"] is False
    values[tab.drawn] = 0
    assert devicemap_tab.tick(service, tab, values, REQUEST) == {tab.progress: ""}  # nothing new
    list(manager.stream_completion("Hello", GenerationParams(max_new_tokens=4, temperature=0)))
    redrawn = devicemap_tab.tick(service, tab, values, REQUEST)
    assert redrawn[tab.drawn] == 1 and len(time_bars(redrawn[tab.picture])) == 10
    assert "**Latest reply**: a decode step took" in redrawn[tab.heading]
    assert len(redrawn[tab.timing_table]["value"]) == 12  # ten blocks, between them, outside
    # A pass running for over a second gets its line.
    running = TimingReport(None, 1, Progress("prompt", 450, 3, 24, 6.0))
    assert devicemap_tab.progress_line(replace(service.status(), timing=running)).startswith(
        "Computing a prompt of 450 tokens: layer 4 of 24"
    )


@pytest.mark.slow
def test_a_reply_ending_while_the_tab_draws_is_drawn_on_the_next_tick(manager, tiny_model_dir) -> None:
    """The map and the reply count it records come from one snapshot: when a reply ends just
    after the tab read the backend, the next tick sees a newer reply and draws it (were the count
    read later than the map, the map would keep the older reply for good)."""
    from optdemo.core.generation import GenerationParams
    from optdemo.core.load_config import LoadConfig

    manager.load(LoadConfig(str(tiny_model_dir)))
    list(manager.stream_completion("Hello", GenerationParams(max_new_tokens=4, temperature=0)))
    service, tab = map_ui(manager)
    before = service.status()
    later = replace(before, timing=replace(before.timing, replies=before.timing.replies + 1))
    snapshots = iter([before])
    service.status = lambda: next(snapshots, later)  # the reply ends after the first read
    drawn = devicemap_tab.refresh(service, tab, {tab.plan_state: None, tab.drawn: -1}, REQUEST)
    assert drawn[tab.drawn] == before.timing.replies
    redrawn = devicemap_tab.tick(service, tab, {tab.plan_state: None, tab.drawn: drawn[tab.drawn]}, REQUEST)
    assert redrawn[tab.drawn] == later.timing.replies and tab.picture in redrawn


# ---------------------------------------------------------------------------------- done when
@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random OPT of opt-125m's width with 4 layers (88 MB in float32): its layers, not Python,
    take a reply's time, as on any model that needs a disk tier (the tiny model's layers take
    0.1 ms each, less than the engine's Python around them)."""
    from optdemo.models.synthetic import TINY_OVERRIDES, build_random_opt

    overrides = {
        **TINY_OVERRIDES,
        "hidden_size": 768,
        "ffn_dim": 3072,
        "num_attention_heads": 12,
        "word_embed_proj_dim": 768,
        "num_hidden_layers": 4,
    }
    return build_random_opt(
        tmp_path_factory.mktemp("small"), "opt-125m", overrides=overrides, dtype="float32"
    )


@pytest.mark.slow
@pytest.mark.parametrize("tier", ["stream", "map"])
def test_the_blocks_times_on_the_map_add_up_to_the_replys_time(manager, small_model_dir, tmp_path, tier):
    from optdemo.core.generation import GenerationParams
    from optdemo.core.load_config import LoadConfig

    # Embeddings and layer 0 in RAM, layers 1-3 on disk (memory-mapped, or streamed past the cache).
    config = LoadConfig(
        str(small_model_dir), max_memory="cpu=70MiB", offload_folder=str(tmp_path), disk_tier=tier
    )
    report = manager.load(config)
    assert list(report.device_map.values()).count("disk") == 3
    params = GenerationParams(max_new_tokens=4, temperature=0)
    list(manager.stream_completion("Hello", params))  # the first reply after a load sets things up
    *_, last = manager.stream_completion("Hello there, how are you today? " * 25, params)  # 377 tokens
    service, tab = map_ui(manager)
    drawn = devicemap_tab.tick(service, tab, {tab.plan_state: None, tab.drawn: 1}, REQUEST)
    bars = time_bars(drawn[tab.picture])
    assert len(bars) == 8  # two embeddings, the final norm, four layers, the head
    shown = sum(float(bar["data-seconds"]) for bar in bars.values())
    measured = last.stats.total_seconds - manager.status().timing.latest.waited_seconds
    assert shown == pytest.approx(measured, rel=0.10)
    # /status carries the same numbers.
    latest = service.status().to_dict()["timing"]["latest_reply"]
    assert latest["reply_seconds"] == pytest.approx(measured, abs=1e-5)
    for phase in ("prompt", "decode"):
        assert latest[phase]["passes"] == (1 if phase == "prompt" else last.stats.new_tokens - 1)
    per_block = {
        block["block"]: block["seconds"] + latest["decode"]["blocks"][index]["seconds"]
        for index, block in enumerate(latest["prompt"]["blocks"])
    }
    assert per_block == pytest.approx(
        {name: float(bar["data-seconds"]) for name, bar in bars.items()}, abs=2e-6
    )
    if tier == "stream":
        streamed = [name for name, bar in bars.items() if int(bar["data-disk-bytes"])]
        assert streamed == [f"model.decoder.layers.{i}" for i in (1, 2, 3)]
