"""Where a model comes from when the Hub is slow or gone: no hang offline, a typo told apart from
network trouble, one probe reused, raw network errors turned into remedies, and a model downloaded
beforehand that loads with the Hub unreachable."""

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
