"""Checks of single fields of an OpenAI request: the features this server does not offer, the
``stop`` field, and text that is not valid Unicode.

Plain functions over the decoded JSON body, with no I/O; a refusal is a :class:`FieldError` (the
message is a sentence naming the field and what to send instead), which
:mod:`optdemo.app.openai_format`'s parsers answer as a 400 in OpenAI's shape.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from optdemo.core import defaults

MAX_STOP_SEQUENCES = 4  # as OpenAI's API: "up to 4 sequences"


class FieldError(ValueError):
    """A request field that is malformed or asks for what this server does not offer."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class Unsupported:
    """An OpenAI field this server does not implement: the values that mean "not used" are
    accepted (clients send defaults), any other is refused with ``why`` (what optdemo offers)."""

    accepts: Callable[[object], bool]
    why: str


def _absent(*defaults: object) -> Callable[[object], bool]:
    """Accepts None and exactly ``defaults`` (same type: ``True`` is not ``1``, ``0.0`` is ``0``)."""

    def accepts(value: object) -> bool:
        same = (d for d in defaults if type(value) is type(d) or {type(value), type(d)} == {int, float})
        return value is None or any(value == d for d in same)

    return accepts


_TEXT_ONLY = "optdemo answers with text only, never with tool or function calls (leave {name} out)"
_NO_LOGPROBS = "optdemo does not return log probabilities (leave {name} out)"
_ONE_REPLY = "optdemo writes one reply per request (send several requests for several replies)"
_PENALTY = (
    "optdemo's sampling offers repetition_penalty instead (above 1 discourages repeats, as vLLM and "
    "TGI take it), so leave {name} out or at 0"
)
_COMMON_UNSUPPORTED = {
    "n": Unsupported(_absent(1), _ONE_REPLY),
    "presence_penalty": Unsupported(_absent(0), _PENALTY),
    "frequency_penalty": Unsupported(_absent(0), _PENALTY),
    "logit_bias": Unsupported(_absent({}), "optdemo does not bias tokens (leave logit_bias out or empty)"),
}
CHAT_UNSUPPORTED = {
    **_COMMON_UNSUPPORTED,
    "response_format": Unsupported(
        _absent({"type": "text"}),
        'optdemo answers in plain text only (send response_format {"type": "text"} or leave it out)',
    ),
    "tools": Unsupported(_absent([]), _TEXT_ONLY),
    "tool_choice": Unsupported(_absent("none", "auto"), _TEXT_ONLY),
    "functions": Unsupported(_absent([]), _TEXT_ONLY),
    "function_call": Unsupported(_absent("none", "auto"), _TEXT_ONLY),
    "logprobs": Unsupported(_absent(False), _NO_LOGPROBS),
    "top_logprobs": Unsupported(_absent(0), _NO_LOGPROBS),
}
COMPLETION_UNSUPPORTED = {
    **_COMMON_UNSUPPORTED,
    "logprobs": Unsupported(_absent(False), _NO_LOGPROBS),  # an int here: 0 asks for logprobs too
    "echo": Unsupported(_absent(False), "optdemo returns the continuation only, never the prompt"),
    "suffix": Unsupported(_absent(""), "optdemo continues a prompt; it cannot write up to a suffix"),
    "best_of": Unsupported(_absent(1), _ONE_REPLY),
}


def refuse_unsupported(body: Mapping, unsupported: Mapping[str, Unsupported]) -> None:
    """Refuse the first field of ``unsupported`` that ``body`` uses, naming it and what optdemo
    offers instead.

    Raises:
        FieldError: with code ``unsupported_parameter``.
    """
    for name, rule in unsupported.items():
        if not rule.accepts(body.get(name)):
            what = "must be 1 here" if name in ("n", "best_of") else "is not supported by this server"
            why = rule.why.replace("{name}", name)
            raise FieldError(f"{name} {what}: {why}", param=name, code="unsupported_parameter")


def check_unicode(body: object) -> None:
    """Refuse text that is not valid Unicode: a lone surrogate (``"\\ud800"`` in JSON, or its bytes)
    decodes into a Python string that no tokenizer or UTF-8 writer accepts. Walks the whole body
    without recursion (JSON can nest deeper than Python's stack).

    Raises:
        FieldError: naming where the bad text is (never quoting it: it cannot be written back).
    """
    pending: list[tuple[object, str]] = [(body, "")]
    while pending:
        value, path = pending.pop()
        if isinstance(value, str):
            if not _valid_text(value):
                _refuse_surrogate(path or "the body")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and not _valid_text(key):
                    _refuse_surrogate(f"a field name in {path}" if path else "a field name")
                if isinstance(item, (str, Mapping, list)):
                    pending.append((item, f"{path}.{key}" if path else str(key)))
        elif isinstance(value, list):
            pending.extend(
                (item, f"{path}[{index}]")
                for index, item in enumerate(value)
                if isinstance(item, (str, Mapping, list))
            )


def _valid_text(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _refuse_surrogate(where: str) -> None:
    where = where if len(where) <= 120 else where[:120] + "..."  # a deeply nested place
    raise FieldError(
        f"the request's text is not valid Unicode: {where} holds a lone surrogate (such as \\ud800), "
        "which is half of a character: send the text as valid UTF-8",
        param=None if where.startswith(("a field", "the body")) else where,
        code="invalid_unicode",
    )


def stop_sequences(stop: object) -> tuple[str, ...]:
    """The ``stop`` field as OpenAI defines it: a text or a list of up to 4 texts (None or [] for
    none), each held to the engine's :data:`~optdemo.core.defaults.MAX_STOP_CHARS`. A dict, a
    number or a boolean is refused, never read for its keys or digits.

    Raises:
        FieldError: naming ``stop``.
    """
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOP_SEQUENCES
        or not all(isinstance(s, str) and s for s in stops)
    ):
        raise FieldError(
            f"stop must be a text or a list of up to {MAX_STOP_SEQUENCES} non-empty texts", param="stop"
        )
    for text in stops:
        if len(text) > defaults.MAX_STOP_CHARS:
            raise FieldError(
                f"stop sequences are at most {defaults.MAX_STOP_CHARS} characters here; one is "
                f"{len(text)}: shorten it",
                param="stop",
            )
    return tuple(stops)
