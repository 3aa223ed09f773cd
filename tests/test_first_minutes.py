"""A newcomer's first ten minutes (issue #12): no hangs offline, typos told from network trouble,
load errors that say what to do, and messages that name the model they are about."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from optdemo.core.errors import ConfigError, LoadError
from optdemo.core.load_config import LoadConfig
from optdemo.models import hub
from optdemo.plan.planner import plan_device_map

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_hub_state():
    hub.forget()
    yield
    hub.forget()


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


# ---------------------------------------------------------------- item: Hub lookups offline
def test_offline_plan_of_an_unknown_id_answers_at_once() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    plan_device_map(LoadConfig("tiny-opt"))  # imports done: what remains is the lookup itself
    started = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        plan_device_map(LoadConfig("someone/not-cached-model"))
    assert time.perf_counter() - started < 1.0
    message = str(info.value)
    assert "cannot reach the Hugging Face Hub to fetch someone/not-cached-model (HF_HUB_OFFLINE is set)" in (
        message
    )
    assert "hf download someone/not-cached-model" in message and "tiny-opt" in message


def test_a_typo_is_named_as_such_not_as_a_network_problem() -> None:
    with pytest.raises(ConfigError) as info:
        plan_device_map(LoadConfig("opt-1.3"))
    assert str(info.value) == "opt-1.3 is not a model optdemo knows: did you mean opt-1.3b?"
    assert hub.suggestion("facebook/opt-66") == "opt-66b"
    assert hub.suggestion("tiny-op") == "tiny-opt"
    assert hub.suggestion("EleutherAI/pythia-70m") is None
    # An id without an owner and nothing close: a network problem, with a hint on the id's shape.
    with pytest.raises(ConfigError) as info:
        plan_device_map(LoadConfig("gpt2"))
    assert "cannot reach the Hugging Face Hub" in str(info.value)
    assert "Hub ids usually read owner/name" in str(info.value)


@pytest.mark.slow
def test_unreachable_hub_is_detected_once_and_answered_quickly() -> None:
    result = run_offline_script(
        """
        import json, time
        from optdemo.core.load_config import LoadConfig
        from optdemo.plan.planner import plan_device_map
        plan_device_map(LoadConfig("tiny-opt"))  # imports done
        out = []
        for model in ("someone/unknown-model", "opt-1.3", "someone/other-model"):
            started = time.perf_counter()
            try:
                plan_device_map(LoadConfig(model))
                out.append(["planned", 0])
            except Exception as exc:
                out.append([str(exc), time.perf_counter() - started])
        print(json.dumps(out))
        """
    )
    assert result.returncode == 0, result.stderr
    (unknown, seconds), (typo, typo_seconds), (_, again) = json.loads(result.stdout.splitlines()[-1])
    assert seconds < 1.0 and typo_seconds < 1.0 and again < 1.0
    assert unknown.startswith(
        "cannot reach the Hugging Face Hub to fetch someone/unknown-model (http://127.0.0.1:"
    )
    assert "hf download someone/unknown-model" in unknown
    assert typo == "opt-1.3 is not a model optdemo knows: did you mean opt-1.3b?"
    # No retry warnings: huggingface_hub was never asked.
    assert "Retrying" not in result.stderr and "Connection refused" not in result.stderr


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


def test_a_raw_network_error_from_the_hub_becomes_a_remedy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub looked reachable, then the request failed in the name lookup: no raw errno."""
    import httpx
    import huggingface_hub

    from optdemo.runtime.loader import preflight

    def no_dns(*args: object, **kwargs: object) -> None:
        raise httpx.ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "offline_reason", lambda: None)
    monkeypatch.setattr(huggingface_hub, "model_info", no_dns)
    with pytest.raises(LoadError) as info:
        preflight(LoadConfig("opt-125m", max_memory="cpu=4GiB"))
    message = str(info.value)
    assert message.startswith("cannot reach the Hugging Face Hub to fetch facebook/opt-125m")
    assert "`hf download facebook/opt-125m`" in message and "tiny-opt" in message
    # ... and the failure is remembered: the next lookup does not wait for the network again.
    monkeypatch.undo()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert hub.offline_reason_if_known() is not None


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


# ---------------------------------------------------------------- item: bad startup flags
def run_app(*args: str, **env_extra: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTDEMO_") or k == "OPTDEMO_CACHE"}
    env.pop("SPACE_ID", None)
    env.update(env_extra)
    return subprocess.run(
        [sys.executable, "app.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


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
    from optdemo.app.settings import parse_settings

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


@pytest.mark.slow
def test_a_model_downloaded_beforehand_loads_with_the_hub_unreachable(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The remedy the messages give (`hf download`, then work offline) works, without waiting for
    the network: a Hub id found in the Hugging Face cache plans and loads at once."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-chat"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    result = run_offline_script(
        """
        import time
        from optdemo.core.load_config import LoadConfig
        from optdemo.runtime.manager import ModelManager
        started = time.perf_counter()
        report = ModelManager().load(LoadConfig("someone/tiny-chat", max_memory="cpu=1GiB"))
        print(report.status, time.perf_counter() - started)
        """,
        HF_HUB_CACHE=str(tmp_path / "hub"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    status, seconds = result.stdout.split()[-2:]
    assert status == "loaded" and float(seconds) < 15
    assert "Retrying" not in result.stderr
