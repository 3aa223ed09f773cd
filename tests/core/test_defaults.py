"""One home for each limit, default and wait time (optdemo/core/defaults.py), and engine messages that
never name the UI."""

from __future__ import annotations

import pytest

from optdemo.app.service import DemoService
from optdemo.app.settings import AppSettings, parse_settings
from optdemo.core import defaults
from optdemo.core.errors import BusyError, ConfigError, NoModelError
from optdemo.core.generation import GenerationParams
from optdemo.core.load_config import LoadConfig
from optdemo.runtime import manager as manager_module
from optdemo.runtime.loader import preflight
from optdemo.runtime.manager import ModelManager
from optdemo.system.hardware import Hardware, quantization_unavailable


def test_sampling_defaults_come_from_one_place() -> None:
    params = GenerationParams()
    assert (params.max_new_tokens, params.temperature, params.top_p, params.top_k) == (
        defaults.MAX_NEW_TOKENS,
        defaults.TEMPERATURE,
        defaults.TOP_P,
        defaults.TOP_K,
    )
    assert params.repetition_penalty == defaults.REPETITION_PENALTY
    assert DemoService(ModelManager(), AppSettings()).params() == params


def test_deployment_caps_default_to_the_defaults_module() -> None:
    settings = parse_settings([], env={})
    assert settings.max_new_tokens_cap == defaults.DEFAULT_MAX_NEW_TOKENS_CAP
    assert settings.max_message_chars == defaults.DEFAULT_MAX_MESSAGE_CHARS
    assert settings.max_history_turns == defaults.DEFAULT_MAX_HISTORY_TURNS
    assert settings.queue_size == defaults.DEFAULT_QUEUE_SIZE
    # A deployment's caps stay under the engine's ceilings.
    assert defaults.DEFAULT_MAX_NEW_TOKENS_CAP <= defaults.MAX_NEW_TOKENS_LIMIT
    assert defaults.DEFAULT_MAX_MESSAGE_CHARS <= defaults.MAX_PROMPT_CHARS


def test_describe_seconds() -> None:
    assert defaults.describe_seconds(120) == "2 minutes"
    assert defaults.describe_seconds(60) == "1 minute"
    assert defaults.describe_seconds(90) == "90 s"
    assert defaults.describe_seconds(0.05) == "0.05 s"


def test_busy_message_names_the_wait_it_really_made(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(manager_module, "LOAD_WAIT_SECONDS", 0.05)
    manager = ModelManager()
    assert manager._model_lock.acquire()  # a generation that never lets go
    try:
        with pytest.raises(BusyError) as info:
            manager.unload()
    finally:
        manager._model_lock.release()
    assert str(info.value) == "the model is still busy after 0.05 s: try unloading again shortly"


def test_engine_messages_do_not_name_the_ui() -> None:
    with pytest.raises(NoModelError) as info:
        next(ModelManager().stream_completion("Hello", GenerationParams()))
    assert str(info.value) == "no model is loaded: load one first"


def test_the_ui_adds_where_to_act() -> None:
    from optdemo.web.errors import to_gradio_error

    error = to_gradio_error(NoModelError("no model is loaded: load one first"))
    assert error.message == "no model is loaded: load one first (in the Configuration tab)"


def test_one_quantization_check_for_the_form_and_the_load(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from optdemo.web.tabs.config_text import quantization_availability

    no_gpu = Hardware((), 2**30, 2**30, "/", 2**30)
    assert quantization_unavailable(has_gpu=False) is None  # torch's CPU kernels (issue #11)
    assert quantization_availability(no_gpu)[0] is True

    class NoKernels:  # a torch without the weight-only CPU kernels
        pass

    monkeypatch.setattr(torch.ops, "aten", NoKernels())
    lacking = quantization_unavailable(has_gpu=False)
    assert lacking == "torch's int8/int4 CPU kernels (pip install -U torch)"
    with pytest.raises(ConfigError) as info:
        preflight(LoadConfig("opt-125m", quantization="8bit"))
    assert str(info.value) == f"8bit quantization needs {lacking}: set quantization to none"
    assert quantization_availability(no_gpu) == (False, f"8-bit / 4-bit need {lacking}.")
