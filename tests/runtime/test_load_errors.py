"""Load errors: each says what to do and names the model it is about, and a newer load request
supersedes one still waiting for the model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from optdemo.core.errors import LoadError
from optdemo.core.load_config import LoadConfig

ROOT = Path(__file__).resolve().parents[2]


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_offline_script(code: str, **env_extra: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with the Hub unreachable (HF_ENDPOINT at a closed
    loopback port) and offline mode off, as on a laptop with no network."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env = {k: v for k, v in env.items() if "proxy" not in k.lower()}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", **env_extra)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------- item: load errors say what to do
@pytest.mark.slow
def test_loading_an_opt_size_with_the_hub_unreachable_says_what_to_do() -> None:
    result = run_offline_script(
        """
        import time
        from optdemo.core.load_config import LoadConfig
        from optdemo.runtime.manager import ModelManager
        from optdemo.app.service import DemoService
        from optdemo.app.settings import AppSettings
        from transformers import AutoModelForCausalLM, OPTForCausalLM  # imports: not the wait measured
        service = DemoService(ModelManager(), AppSettings())
        started = time.perf_counter()
        try:
            service.load(service.make_config("opt-1.3b", "cpu=8GiB"))
        except Exception as exc:
            print(type(exc).__name__, time.perf_counter() - started)
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    head, message = result.stdout.strip().splitlines()[-2:]
    kind, seconds = head.split()
    assert kind == "LoadError" and float(seconds) < 5.0
    assert message.startswith("cannot reach the Hugging Face Hub to fetch facebook/opt-1.3b")
    assert "`hf download facebook/opt-1.3b`" in message
    assert "local folder" in message and "tiny-opt" in message
    assert "Errno" not in message.split(":", 1)[1].split("connect to the internet")[1]


@pytest.mark.parametrize(
    "exc",
    [
        OSError("x does not appear to have a file named pytorch_model.bin"),
        KeyboardInterrupt(),
        RuntimeError("something unforeseen"),
        None,  # a network error, built in the test (httpx imports lazily)
    ],
)
def test_every_load_error_says_what_to_do(exc: BaseException | None) -> None:
    import httpx

    from optdemo.models.source import resolve_model
    from optdemo.runtime.loader import load_error_message

    config = LoadConfig("opt-125m")
    error = exc if exc is not None else httpx.ConnectError("[Errno -2] Name or service not known")
    message = load_error_message(error, config, resolve_model(config.model))
    assert "opt-125m" in message
    remedy = message.rsplit("): ", 1)[-1] if "): " in message else message.rsplit(": ", 1)[-1]
    assert any(word in remedy for word in ("pick", "load it again", "connect", "try again")), message


def test_ram_running_out_while_the_disk_tier_is_placed_is_a_sentence(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The streamed tier's buffers are allocated after the weights: ENOMEM there (a large draft in
    RAM beside the model) is a load error that says what to do, not a traceback, and nothing stays
    loaded."""
    import errno

    from optdemo.runtime import loader
    from optdemo.runtime.manager import ModelManager

    def no_memory(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(loader, "place_disk_tier", no_memory)
    manager = ModelManager()
    config = LoadConfig(str(tiny_model_dir), draft="8bit")
    with pytest.raises(LoadError) as caught:
        manager.load(config)
    assert "RAM ran out loading" in str(caught.value) and "smaller draft" in str(caught.value)
    assert manager.current_config is None


# ---------------------------------------------------------------- item: a newer load supersedes
@pytest.mark.slow
def test_a_newer_load_supersedes_a_waiting_one_and_errors_name_their_model(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Load A is slow and fails; B is requested while A runs, then C: B never starts (C replaced
    it), A's failure names A, and C loads."""
    import threading

    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings
    from optdemo.core.errors import SupersededError
    from optdemo.runtime import manager as manager_module
    from optdemo.runtime.manager import ModelManager

    real_load = manager_module.load_model
    release_a = threading.Event()
    started: list[str] = []

    def load_model(config, plan, progress=None):
        started.append(config.max_memory.as_max_memory()["cpu"])
        if config.label == "A":
            release_a.wait(30)
            raise LoadError("the checkpoint of A is corrupt")
        return real_load(config, plan, progress)

    monkeypatch.setattr(manager_module, "load_model", load_model)
    service = DemoService(ModelManager(), AppSettings())
    a, b, c = (
        LoadConfig(str(tiny_model_dir), max_memory=f"cpu={n}GiB", label=label)
        for n, label in ((1, "A"), (2, "B"), (3, "C"))
    )
    outcomes: dict[str, object] = {}

    def request(config: LoadConfig) -> None:
        try:
            outcomes[config.label] = service.load(config)
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            outcomes[config.label] = exc

    threads = {}
    for config in (a, b, c):
        count = service.manager._load_requests
        threads[config.label] = threading.Thread(target=request, args=(config,))
        threads[config.label].start()
        deadline = time.monotonic() + 30
        while service.manager._load_requests == count and time.monotonic() < deadline:
            time.sleep(0.01)  # this request is registered (past its checks) before the next comes
        if config.label == "A":
            while not started and time.monotonic() < deadline:
                time.sleep(0.01)  # A holds the model
    release_a.set()
    for thread in threads.values():
        thread.join(60)
    assert isinstance(outcomes["A"], LoadError) and "the checkpoint of A is corrupt" in str(outcomes["A"])
    assert isinstance(outcomes["B"], SupersededError)
    assert str(outcomes["B"]) == "loading B was not started: a newer request to load C replaced it"
    assert outcomes["C"].status == "loaded"
    assert started == [2**30, 3 * 2**30]  # B never started
    assert service.status().config == c
    service.manager.unload()


def test_every_load_error_names_its_model() -> None:
    from optdemo.app.service import naming_model
    from optdemo.core.errors import BusyError

    config = LoadConfig("opt-1.3b")
    named = naming_model(BusyError("the model is still busy after 2 minutes: try loading again"), config)
    assert isinstance(named, BusyError)
    assert str(named) == "loading opt-1.3b: the model is still busy after 2 minutes: try loading again"
    already = LoadError("cannot reach the Hugging Face Hub to fetch facebook/opt-1.3b")
    assert naming_model(already, config) is already
