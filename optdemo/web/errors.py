"""Turn engine exceptions into ``gr.Error`` messages, so a user sees a sentence, never a traceback.

Expected problems (:class:`~optdemo.core.errors.OptdemoError`) pass their message through. Anything else
is a bug: it is logged with its traceback for the operator and shown as a short apology, and the app
keeps serving. Every message and log line goes through :func:`~optdemo.core.redact.redact` first.
"""

from __future__ import annotations

import functools
import inspect
import logging
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import gradio as gr

from optdemo.core.errors import NoModelError, NoModelForVisitorsError, OptdemoError
from optdemo.core.redact import redact

log = logging.getLogger("optdemo")
F = TypeVar("F", bound=Callable[..., Any])


def to_gradio_error(exc: BaseException) -> gr.Error:
    """The ``gr.Error`` to show for an exception raised by the engine."""
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, OptdemoError):
        return gr.Error(redact(str(exc)) + _ui_advice(exc), print_exception=False)
    # The traceback is for the operator, with secrets removed (an engine may quote a token).
    log.error("unexpected error: %s", redact("".join(traceback.format_exception(exc))))
    return gr.Error(
        f"Something went wrong ({type(exc).__name__}: {redact(str(exc))[:200]}). The app is "
        "still running: try again, and report this if it repeats.",
        print_exception=False,
    )


def _ui_advice(exc: OptdemoError) -> str:
    """Where in this UI to act on an engine error (the engine's messages never name the UI)."""
    if isinstance(exc, NoModelError) and not isinstance(exc, NoModelForVisitorsError):
        return " (in the Configuration tab)"
    return ""


def user_errors(fn: F) -> F:
    """Decorate a callback (function or generator) so its exceptions reach the user as
    ``gr.Error``; the signature is kept for Gradio's API introspection."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - converted for the user, logged if unexpected
                raise to_gradio_error(exc) from None

        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def function(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - converted for the user, logged if unexpected
            raise to_gradio_error(exc) from None

    return function  # type: ignore[return-value]
