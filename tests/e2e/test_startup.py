"""``app.py`` itself, in a subprocess: its help, its refusals of bad flags (one line, exit 2, before
gradio is imported), public mode's preload, and an import that stays light."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optdemo.app.settings import (
    parse_settings,
)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------- app.py
def run_python(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:

    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTDEMO_") or k == "OPTDEMO_CACHE"}
    env.pop("SPACE_ID", None)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
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


# ---------------------------------------------------------------- item: bad startup flags
def run_app(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    return run_python("app.py", *args, env_extra=env_extra)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--max-memory", "cpu=lots"), "optdemo: --max-memory: size for cpu 'lots' is not a size"),
        (("--model", "nonexistent-folder/"), "optdemo: --model: model folder 'nonexistent-folder/' does not"),
        (("--port", "99999"), "optdemo: --port must be between 1 and 65535, got 99999"),
        (("--dtype", "bad"), "optdemo: argument --dtype: invalid choice: 'bad'"),
        (("--allow-model", "../nowhere"), "optdemo: --allow-model: model folder '../nowhere' does not"),
        (("--offload-folder", "app.py"), "optdemo: --offload-folder: app.py is a file, not a folder"),
    ],
)
def test_a_bad_flag_is_one_line_and_exit_2(args: tuple[str, ...], expected: str) -> None:
    result = run_app(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith(expected), result.stderr


# ---------------------------------------------------------------- item: public mode dead end
@pytest.mark.parametrize("flag", ["--share", "--lock-config"])
def test_public_mode_implies_preload(flag: str) -> None:

    assert parse_settings([flag], env={}).preload
    assert parse_settings([], env={"OPTDEMO_LOCK_CONFIG": "1"}).preload
    assert not parse_settings([], env={}).preload


@pytest.mark.slow
def test_a_failed_preload_in_public_mode_is_fatal_with_the_reason() -> None:
    # opt-125m's weights are not here and the Hub is offline: the preload fails before serving.
    result = run_app("--lock-config", "--model", "opt-125m", "--max-memory", "cpu=2GiB", "--port", "7")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "optdemo: public mode needs a loaded model, and it could not be loaded: cannot reach the "
        "Hugging Face Hub to fetch facebook/opt-125m"
    ), last
    assert "Running on" not in result.stdout  # never served
