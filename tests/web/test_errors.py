"""The error adapter: engine errors reach the user as their own sentence, unexpected ones as an
apology that says the app still runs, and never with a token in them."""

from __future__ import annotations

import pytest

from optdemo.core.errors import BudgetError, ConfigError, GenerationError, OptdemoError


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
        assert "***" in message
