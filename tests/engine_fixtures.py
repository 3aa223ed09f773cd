"""A real serving engine for the remote-backend tests: ``transformers serve`` on 127.0.0.1.

A tiny random OPT folder (with a ``chat_template.jinja``: without one the engine answers chat with
a 500) is served on the CPU by a subprocess, offline in effect (a local folder, no update check)
but with ``HF_HUB_OFFLINE`` unset, since huggingface_hub refuses every request while it is set.
Its Hugging Face cache folder must exist, or ``/v1/models`` answers 500. The engine is started
once per test session (a few seconds) and killed at the end; a test that kills an engine starts
its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

READY_SECONDS = 120  # the engine imports torch and transformers: seconds here, more on a busy box
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


@dataclass
class Engine:
    """A running ``transformers serve``: its base URL, the model name it accepts, its process."""

    url: str
    model: str
    process: subprocess.Popen

    def kill(self) -> None:
        """Stop it at once (SIGKILL: no goodbye to the clients)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_served_model(root: Path) -> Path:
    """A tiny random OPT with its tokenizer and a chat template, for the engine to serve."""
    from optdemo.models.synthetic import TINY_OVERRIDES, build_random_opt

    path = build_random_opt(root / "served-opt", "opt-125m", overrides=TINY_OVERRIDES, dtype="float32")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return path


@contextlib.contextmanager
def serving(model_dir: Path, hf_cache: Path) -> Iterator[Engine]:
    """Start ``transformers serve MODEL_DIR`` on a free loopback port; wait until it answers
    ``/health`` (bounded); kill it afterwards."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_CACHE=str(hf_cache), HF_HUB_DISABLE_TELEMETRY="1")
    command = [
        str(Path(sys.executable).with_name("transformers")),
        "serve",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
    ]
    log = (hf_cache / f"serve-{port}.log").open("wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine = Engine(f"http://127.0.0.1:{port}", str(model_dir), process)
    try:
        _wait_ready(engine, hf_cache / f"serve-{port}.log")
        yield engine
    finally:
        engine.kill()
        log.close()


def _wait_ready(engine: Engine, log: Path) -> None:
    deadline = time.monotonic() + READY_SECONDS
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            pytest.fail(
                f"transformers serve exited with {engine.process.returncode}:\n{log.read_text()[-2000:]}"
            )
        url = f"{engine.url}/health"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.3)
    pytest.fail(f"transformers serve did not answer within {READY_SECONDS} s:\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="session")
def served_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny OPT folder the engines serve."""
    return build_served_model(tmp_path_factory.mktemp("engine"))


@pytest.fixture(scope="session")
def hf_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An existing, empty Hugging Face cache folder for the engines (and their logs)."""
    return tmp_path_factory.mktemp("engine-hf-cache")


@pytest.fixture(scope="session")
def engine(served_model: Path, hf_cache: Path) -> Iterator[Engine]:
    """One engine for the whole session."""
    with serving(served_model, hf_cache) as running:
        yield running


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub allowed to make requests (the suite runs with HF_HUB_OFFLINE=1, which it
    reads once, at import, into ``constants.HF_HUB_OFFLINE``)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
