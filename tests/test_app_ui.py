"""The app's pure adapters and its start-up, without a server: the device-map picture and table,
the form helpers, the chat view, the error adapter, the settings (flags and environment), and
``app.py`` itself in a subprocess."""

from __future__ import annotations

import html
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from optdemo.app.settings import (
    DEFAULT_MAX_MESSAGE_CHARS,
    DEFAULT_MAX_NEW_TOKENS_CAP,
    AppSettings,
    parse_settings,
)
from optdemo.core.budget import Device
from optdemo.core.errors import BudgetError, ConfigError, GenerationError, OptdemoError
from optdemo.plan.planner import Block, Plan

ROOT = Path(__file__).resolve().parent.parent
TINY = "optdemo/tiny-opt"


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


# ---------------------------------------------------------------------------------- config tab
def test_budget_spec_from_sliders() -> None:
    from optdemo.web.tabs.config import budget_spec

    assert budget_spec([5.0], 20.0, "") == "0=5120MiB,cpu=20480MiB"
    assert budget_spec([], 1.5, "") == "cpu=1536MiB"
    assert budget_spec([0.25, 2], 0, "  ") == "0=256MiB,1=2048MiB,cpu=0MiB"


def test_budget_spec_advanced_field_wins() -> None:
    from optdemo.core.budget import parse_max_memory
    from optdemo.web.tabs.config import budget_spec

    assert budget_spec([5.0], 20.0, "  0=1GiB,cpu=2GiB ") == "0=1GiB,cpu=2GiB"
    # What the sliders produce is a valid max_memory.
    budget = parse_max_memory(budget_spec([5.0], 20.0, "")).as_max_memory()
    assert budget == {0: 5 * 2**30, "cpu": 20 * 2**30}


def test_status_text() -> None:
    from optdemo.core.load_config import LoadConfig
    from optdemo.runtime.status import ModelStatus
    from optdemo.web.tabs.config import status_text

    assert status_text(ModelStatus(None)).startswith("No model loaded yet")
    loaded = ModelStatus(
        LoadConfig("tiny-opt"),
        load_seconds=1.234,
        bytes_per_device={0: 2**19, "cpu": 2**20, "disk": 3 * 2**20},
    )
    text = status_text(loaded)
    assert "**tiny-opt** is loaded (in 1.2 s)" in text
    assert "GPU 0: 512 KiB · CPU: 1 MiB · disk: 3 MiB" in text
    assert "generating" in status_text(replace(loaded, busy="generating"))
    assert "(in 0.0 s)" in status_text(replace(loaded, load_seconds=None))


def test_quantization_available_without_gpu() -> None:
    from optdemo.system.hardware import Hardware
    from optdemo.web.tabs.config import hardware_summary, quantization_availability

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


# ---------------------------------------------------------------------------------- chat tab
def test_to_messages() -> None:
    from optdemo.web.tabs.chat import to_messages

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


# ---------------------------------------------------------------------------------- errors
def test_optdemo_error_message_passes_through() -> None:
    import gradio as gr

    from optdemo.web.errors import to_gradio_error, user_errors

    message = "max_memory names GPU 3 but this machine has no GPU: remove it from the budget"
    for exc_type in (OptdemoError, BudgetError, ConfigError, GenerationError):
        err = to_gradio_error(exc_type(message))
        assert isinstance(err, gr.Error)
        assert err.message == message

    @user_errors
    def fails(x: int) -> int:
        raise ConfigError("dtype 'float8' is not supported")

    with pytest.raises(gr.Error) as info:
        fails(1)
    assert info.value.message == "dtype 'float8' is not supported"
    own = gr.Error("already for the user")
    assert to_gradio_error(own) is own


def test_unexpected_error_says_the_app_is_still_running(caplog: pytest.LogCaptureFixture) -> None:
    import gradio as gr

    from optdemo.web.errors import to_gradio_error, user_errors

    err = to_gradio_error(KeyError("blocks"))
    assert isinstance(err, gr.Error)
    assert "still running" in err.message
    assert "KeyError" in err.message
    assert "Traceback" not in err.message

    @user_errors
    def broken() -> None:
        raise RuntimeError("x" * 1000)

    with caplog.at_level("ERROR", logger="optdemo"), pytest.raises(gr.Error) as info:
        broken()
    assert "still running" in info.value.message
    assert len(info.value.message) < 400  # the exception text is cut
    assert "unexpected error" in caplog.text  # logged with its traceback for the operator


def test_user_errors_wraps_generators_and_keeps_signatures() -> None:
    import inspect

    import gradio as gr

    from optdemo.web.errors import user_errors

    def stream(prompt: str, max_new_tokens: int = 64):
        yield prompt
        yield prompt + "!"
        raise GenerationError("the model was unloaded: load one first")

    wrapped = user_errors(stream)
    assert inspect.isgeneratorfunction(wrapped)
    assert inspect.signature(wrapped) == inspect.signature(stream)
    assert wrapped.__name__ == "stream"
    gen = wrapped("hi")
    assert next(gen) == "hi"
    assert next(gen) == "hi!"
    with pytest.raises(gr.Error) as info:
        next(gen)
    assert info.value.message == "the model was unloaded: load one first"

    @user_errors
    def unexpected():
        yield 1
        raise ZeroDivisionError("division by zero")

    gen = unexpected()
    assert next(gen) == 1
    with pytest.raises(gr.Error) as info:
        next(gen)
    assert "still running" in info.value.message


def test_errors_never_show_the_hub_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from optdemo.web.errors import to_gradio_error

    monkeypatch.setenv("HF_TOKEN", "hf_FAKEtoken123")
    for exc in (OptdemoError("401 with token hf_FAKEtoken123"), RuntimeError("auth hf_FAKEtoken123")):
        message = to_gradio_error(exc).message
        assert "hf_FAKEtoken123" not in message
        assert "hf_***" in message


# ---------------------------------------------------------------------------------- settings
def test_settings_defaults() -> None:
    settings = parse_settings([], env={})
    assert settings == AppSettings()
    assert settings.model == TINY
    assert settings.max_memory is None and settings.offload_folder is None
    assert settings.host == "127.0.0.1" and settings.port is None
    assert settings.dtype == "auto"
    assert not settings.preload and not settings.share and not settings.lock_config
    assert settings.auth == () and settings.allow_models == ()
    assert settings.max_new_tokens_cap == DEFAULT_MAX_NEW_TOKENS_CAP
    assert settings.max_message_chars == DEFAULT_MAX_MESSAGE_CHARS
    assert settings.public is False


def test_settings_from_flags() -> None:
    settings = parse_settings(
        [
            "--model",
            "opt-1.3b",
            "--max-memory",
            "0=5GiB,cpu=20GiB",
            "--offload-folder",
            "/tmp/off",
            "--dtype",
            "float16",
            "--preload",
            "--host",
            "0.0.0.0",
            "--port",
            "7999",
            "--share",
            "--auth",
            "admin:pw",
            "--auth",
            "root:pa:ss",
            "--lock-config",
            "--allow-model",
            "opt-125m",
            "--allow-model",
            "opt-350m",
            "--offload-base",
            "/tmp",
            "--max-new-tokens-cap",
            "128",
            "--max-message-chars",
            "1000",
            "--max-history-turns",
            "5",
            "--queue-size",
            "8",
        ],
        env={},
    )
    assert settings.model == "opt-1.3b"
    assert settings.max_memory == "0=5GiB,cpu=20GiB"
    assert settings.offload_folder == "/tmp/off"
    assert settings.dtype == "float16"
    assert settings.preload and settings.share and settings.lock_config
    assert settings.host == "0.0.0.0" and settings.port == 7999
    assert settings.auth == (("admin", "pw"), ("root", "pa:ss"))  # split at the first colon
    assert settings.allow_models == ("opt-125m", "opt-350m")
    assert settings.offload_base == "/tmp"
    assert settings.max_new_tokens_cap == 128
    assert settings.max_message_chars == 1000
    assert settings.max_history_turns == 5
    assert settings.queue_size == 8
    assert settings.public and not settings.on_space


def test_settings_from_environment() -> None:
    env = {
        "OPTDEMO_MODEL": "opt-125m",
        "OPTDEMO_MAX_MEMORY": "cpu=4GiB",
        "OPTDEMO_OFFLOAD_FOLDER": "/tmp/o",
        "OPTDEMO_DTYPE": "bfloat16",
        "OPTDEMO_PRELOAD": "true",
        "OPTDEMO_HOST": "0.0.0.0",
        "OPTDEMO_PORT": "8123",
        "OPTDEMO_AUTH": "admin:pw, ops:secret",
        "OPTDEMO_LOCK_CONFIG": "1",
        "OPTDEMO_ALLOW_MODEL": "opt-125m,opt-350m",
        "OPTDEMO_MAX_NEW_TOKENS_CAP": "32",
    }
    settings = parse_settings([], env=env)
    assert settings.model == "opt-125m"
    assert settings.max_memory == "cpu=4GiB"
    assert settings.offload_folder == "/tmp/o"
    assert settings.dtype == "bfloat16"
    assert settings.preload is True
    assert settings.host == "0.0.0.0" and settings.port == 8123
    assert settings.auth == (("admin", "pw"), ("ops", "secret"))
    assert settings.lock_config is True and settings.public is True
    assert settings.allow_models == ("opt-125m", "opt-350m")
    assert settings.max_new_tokens_cap == 32
    for off in ("0", "false", "no", ""):
        assert parse_settings([], env={"OPTDEMO_SHARE": off}).share is False
    assert parse_settings([], env={"OPTDEMO_SHARE": "yes"}).share is True


def test_flags_win_over_environment() -> None:
    env = {
        "OPTDEMO_MODEL": "opt-125m",
        "OPTDEMO_MAX_MEMORY": "cpu=4GiB",
        "OPTDEMO_DTYPE": "bfloat16",
        "OPTDEMO_PORT": "8123",
        "OPTDEMO_AUTH": "env:user",
        "OPTDEMO_ALLOW_MODEL": "opt-350m",
    }
    settings = parse_settings(
        [
            "--model",
            "opt-2.7b",
            "--max-memory",
            "cpu=8GiB",
            "--dtype",
            "float32",
            "--port",
            "9000",
            "--auth",
            "flag:user",
            "--allow-model",
            "opt-1.3b",
        ],
        env=env,
    )
    assert settings.model == "opt-2.7b"
    assert settings.max_memory == "cpu=8GiB"
    assert settings.dtype == "float32"
    assert settings.port == 9000
    assert settings.auth == (("flag", "user"),)
    assert settings.allow_models == ("opt-1.3b",)


@pytest.mark.parametrize("entry", ["noColon", ":pw", "admin:", ":"])
def test_bad_auth_is_a_config_error(entry: str) -> None:
    with pytest.raises(ConfigError, match="USER:PASS"):
        parse_settings(["--auth", entry], env={})
    with pytest.raises(ConfigError, match="USER:PASS"):
        parse_settings([], env={"OPTDEMO_AUTH": entry})


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"OPTDEMO_PORT": "http"}, "OPTDEMO_PORT must be a whole number"),
        ({"OPTDEMO_MAX_NEW_TOKENS_CAP": "0"}, "must be positive"),
        ({"OPTDEMO_QUEUE_SIZE": "-3"}, "must be positive"),
        ({"OPTDEMO_DTYPE": "float8"}, "dtype 'float8' is not supported"),
    ],
)
def test_bad_environment_values_are_config_errors(env: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_settings([], env=env)


def test_bad_flag_values_exit_like_argparse() -> None:
    with pytest.raises(SystemExit):
        parse_settings(["--dtype", "float8"], env={})
    with pytest.raises(SystemExit):
        parse_settings(["--port", "http"], env={})


def test_space_turns_on_public_mode_and_preload() -> None:
    settings = parse_settings([], env={"SPACE_ID": "someone/optdemo"})
    assert settings.on_space and settings.lock_config and settings.preload
    assert settings.public
    assert not parse_settings([], env={"SPACE_ID": ""}).public


@pytest.mark.parametrize(
    ("kwargs", "public"),
    [
        ({}, False),
        ({"share": True}, True),
        ({"lock_config": True}, True),
        ({"on_space": True}, True),
        ({"auth": (("a", "b"),)}, False),  # accounts alone do not lock anything
        ({"host": "0.0.0.0"}, False),
    ],
)
def test_public_property(kwargs: dict, public: bool) -> None:
    assert AppSettings(**kwargs).public is public


# ---------------------------------------------------------------------------------- app.py
def run_python(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTDEMO_") or k == "OPTDEMO_CACHE"}
    env.pop("SPACE_ID", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )


def test_app_help_lists_every_flag() -> None:
    result = run_python("app.py", "--help")
    assert result.returncode == 0, result.stderr
    for flag in (
        "--model",
        "--max-memory",
        "--offload-folder",
        "--dtype",
        "--preload",
        "--host",
        "--port",
        "--share",
        "--auth",
        "--lock-config",
        "--allow-model",
        "--offload-base",
        "--max-new-tokens-cap",
    ):
        assert flag in result.stdout, flag
    # Each flag names its environment variable.
    assert "OPTDEMO_MAX_MEMORY" in result.stdout.replace("\n", "").replace(" ", "")


def test_app_rejects_bad_settings_before_importing_gradio() -> None:
    started = time.perf_counter()
    result = run_python("app.py", "--auth", "noColon")
    assert result.returncode == 2
    assert result.stderr.strip() == "optdemo: --auth takes USER:PASS, e.g. --auth admin:s3cret"
    assert "Traceback" not in result.stderr
    result = run_python("app.py", env_extra={"OPTDEMO_PORT": "http"})
    assert result.returncode == 2
    assert "OPTDEMO_PORT must be a whole number" in result.stderr
    assert time.perf_counter() - started < 20


def test_import_app_is_light() -> None:
    code = (
        "import sys, time; t = time.perf_counter(); import app; t = time.perf_counter() - t; "
        "print('gradio' in sys.modules, 'torch' in sys.modules, 'transformers' in sys.modules, t)"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    gradio, torch, transformers, seconds = result.stdout.split()
    assert (gradio, torch, transformers) == ("False", "False", "False")
    assert float(seconds) < 1.0


def test_suggested_budget_survives_the_sliders():
    """The sliders start at the suggested budget; what they send back must be the same
    configuration, or pressing Load on an unchanged form would reload instead of reuse."""
    from optdemo.core.budget import parse_max_memory
    from optdemo.system.hardware import GpuInfo, Hardware, suggest_budget
    from optdemo.web.tabs.config import GIB, budget_spec

    for ram, gpu_free in ((23.5 * GIB, None), (16 * GIB + 12345, 7_999_999_999), (64 * GIB, 10 * GIB + 1)):
        gpus = () if gpu_free is None else (GpuInfo(0, "GPU", 16 * GIB, gpu_free),)
        hw = Hardware(gpus, int(ram), int(ram), "/", 10**12)
        budget = suggest_budget(hw).as_max_memory()
        sliders = [round(budget[g.index] / GIB, 2) for g in gpus]  # as the tab sets them
        spec = budget_spec(sliders, round(budget["cpu"] / GIB, 2), "")
        assert parse_max_memory(spec) == suggest_budget(hw), spec


def test_conversion_cache_is_shown_and_cleared_by_admins_only(tiny_bin_model_dir, tmp_path, monkeypatch):
    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings
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
    assert public.sign_in("owner", "admin", "pw")
    assert public.clear_conversion_cache("owner") == size
    assert public.conversion_cache().startswith("0 converted checkpoint(s), 0 B")
