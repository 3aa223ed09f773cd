"""The app's status: the local model's as the runtime reports it, or a serving endpoint's in its
place, through the same fields and one ``/status`` JSON."""

from __future__ import annotations

from optdemo.app.status import BackendStatus
from optdemo.core.generation import GenerationStats
from optdemo.core.load_config import LoadConfig
from optdemo.remote.client import EngineInfo
from optdemo.runtime.status import ModelStatus


def test_the_local_model_passes_through_with_its_backend_named() -> None:
    local = ModelStatus(LoadConfig("tiny-opt"), busy="generating", load_seconds=1.5)
    status = BackendStatus.local(local)
    assert (status.config, status.busy, status.load_seconds) == (local.config, "generating", 1.5)
    assert (status.loaded, status.model_id, status.display_name) == (True, local.model_id, "tiny-opt")
    data = status.to_dict()
    assert data == {**local.to_dict(), "backend": "local", "endpoint": None}
    assert BackendStatus.local(ModelStatus(None)).to_dict()["loaded"] is False


def test_an_endpoint_answers_in_place_of_a_local_model() -> None:
    info = EngineInfo(url="http://127.0.0.1:8000", model="Qwen/Qwen2.5-0.5B", engine="vLLM")
    stats = GenerationStats(3, 4, 0.1, 0.5, 10.0)
    status = BackendStatus.remote(info, stats)
    assert status.config is None and status.loaded
    assert status.model_id == status.display_name == "Qwen/Qwen2.5-0.5B"
    data = status.to_dict()
    assert (data["backend"], data["endpoint"], data["model"]) == ("endpoint", info.to_dict(), info.model)
    assert data["last_generation"]["new_tokens"] == 4 and data["device_map"] == {}
