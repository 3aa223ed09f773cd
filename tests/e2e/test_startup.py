"""``app.py`` itself, in a subprocess: its help, its refusals of bad flags (one line, exit 2, before
gradio is imported), public mode's preload, and an import that stays light."""

from __future__ import annotations

import hashlib
import os
import shutil
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


# ---------------------------------------------------------------- issue 24: the first minutes
def test_the_start_up_log_says_share_the_optdemo_way(capsys: pytest.CaptureFixture[str]) -> None:
    """Gradio prints "set `share=True` in `launch()`": optdemo's user has a flag, not that call."""
    from optdemo.web.blocks import SHARE_ADVICE, create_app, launch

    demo, service = create_app(parse_settings([], env={}))
    try:
        _, url, _ = launch(demo, service, prevent_thread_lock=True, quiet=False, server_port=None)
    finally:
        demo.close()
    out = capsys.readouterr().out
    assert "Running on local URL" in out and url.rstrip("/") in out
    assert SHARE_ADVICE in out and "--share" in SHARE_ADVICE
    assert "share=True" not in out


def fake_venv(tmp_path: Path, pip_seconds: float) -> Path:
    """A venv whose python records each pip call and takes ``pip_seconds`` over the last one,
    silently (as a large download does)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> "{tmp_path}/pip-calls"\n'
        f'case "$*" in *" -r "*) sleep {pip_seconds} ;; esac\n'
    )
    python.chmod(0o755)
    return venv


def test_a_first_install_shows_progress(tmp_path: Path) -> None:
    """./run.sh was silent for a minute while pip installed: pip's own lines are shown now (no
    --quiet), and a line comes every few seconds while it works."""
    venv = fake_venv(tmp_path, 3.5)
    env = {**os.environ, "OPTDEMO_VENV": str(venv), "OPTDEMO_PROGRESS_SECONDS": "1"}
    result = subprocess.run(
        ["bash", "-c", "source scripts/bootstrap.sh requirements.txt && echo ready"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert (
        lines[0] == f"optdemo: installing requirements.txt into {venv} (the first time takes a few minutes)"
    )
    assert sum(line.startswith("optdemo: still installing (") for line in lines) >= 2, lines
    assert lines[-2:] == ["optdemo: requirements.txt installed", "ready"]
    calls = (tmp_path / "pip-calls").read_text().splitlines()
    assert calls[-1] == f"-m pip install --progress-bar on -r {ROOT}/requirements.txt"
    # The second time nothing is installed, and nothing is said.
    again = subprocess.run(
        ["bash", "-c", "source scripts/bootstrap.sh requirements.txt && echo ready"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.stdout == "ready\n"


# ---------------------------------------------------------------- gpu-check.sh from a fresh clone
@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This branch as a new user gets it: ``git clone`` (no .venv, nothing built)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and this repository's history")
    target = tmp_path_factory.mktemp("clone") / "optdemo"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(target)], check=True, timeout=120)
    assert not (target / ".venv").exists()
    return target


def gpu_check(clone: Path, fake_gpu: str | None, **env_extra: str) -> subprocess.CompletedProcess:
    """Run the clone's scripts/gpu-check.sh; ``fake_gpu``: what a fake nvidia-smi prints, first on
    PATH (None: this machine's own, if any)."""
    env = {name: value for name, value in os.environ.items() if name != "PYTHON"}
    env.update(env_extra)
    if fake_gpu is not None:
        bin_dir = clone.parent / "fake-bin"
        bin_dir.mkdir(exist_ok=True)
        smi = bin_dir / "nvidia-smi"
        status = 0 if fake_gpu.startswith("GPU ") else 6
        smi.write_text(f"#!/bin/sh\necho '{fake_gpu}'\nexit {status}\n")
        smi.chmod(0o755)
        env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return subprocess.run(
        ["bash", "scripts/gpu-check.sh"], cwd=clone, env=env, capture_output=True, text=True, timeout=120
    )


def test_gpu_check_without_a_gpu_says_so_in_one_line(fresh_clone: Path) -> None:
    """It crashed with ModuleNotFoundError (psutil, huggingface_hub) before saying anything."""
    if shutil.which("nvidia-smi") is None:  # this machine as it is
        result = gpu_check(fresh_clone, None)
        assert result.returncode == 1 and result.stdout == ""
        assert result.stderr.startswith("no NVIDIA GPU here: nvidia-smi is not installed (no NVIDIA driver);")
        assert len(result.stderr.splitlines()) == 1
    result = gpu_check(fresh_clone, "No devices were found")  # a driver, but no GPU
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "no NVIDIA GPU here: nvidia-smi failed (No devices were found); run scripts/gpu-check.sh on a "
        "machine with one (./test.sh runs the CPU tests)"
    ]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (fresh_clone / ".venv").exists()  # nothing was installed for nothing


def test_gpu_check_names_what_an_interpreter_lacks(fresh_clone: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    result = gpu_check(fresh_clone, "GPU 0: Fake GPU (UUID: GPU-0)", PYTHON=str(bare / "bin" / "python"))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"optdemo: {bare}/bin/python lacks torch transformers accelerate psutil huggingface_hub "
        "safetensors pytest: install requirements-dev.txt into it (or unset PYTHON)"
    ]


def test_gpu_check_sets_up_through_bootstrap_then_finds_no_usable_gpu(fresh_clone: Path) -> None:
    """From the fresh clone it sets up through scripts/bootstrap.sh (here reusing this test run's
    environment, already installed: nothing is downloaded), then says torch sees no GPU."""
    venv = Path(sys.prefix)
    stamp = venv / ".installed-requirements-dev.txt"
    wanted = hashlib.sha256(
        (fresh_clone / "requirements-dev.txt").read_bytes() + (fresh_clone / "requirements.txt").read_bytes()
    ).hexdigest()
    if not stamp.exists() or stamp.read_text().strip() != wanted:
        pytest.skip(f"{venv} is not bootstrap's install of requirements-dev.txt: it would install packages")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the check would run the GPU tests")
    result = gpu_check(fresh_clone, "GPU 0: Fake GPU (UUID: GPU-0)", OPTDEMO_VENV=str(venv))
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "no NVIDIA GPU here: nvidia-smi lists one, but torch (a CPU-only build?) cannot use it; run "
        "scripts/gpu-check.sh on a machine with one (./test.sh runs the CPU tests)"
    )
    assert "Traceback" not in result.stdout + result.stderr
