"""The OpenAI wire format, as plain Python: parse requests, shape replies, errors and stream chunks.

The HTTP layer (:mod:`optdemo.web.openai_routes`) reads a JSON body, calls :func:`parse_chat` or
:func:`parse_completion`, runs the request through :class:`~optdemo.app.service.DemoService`, and
shapes what comes back with the builders here. Nothing in this module does I/O, so the format is
unit-tested without a server; every refusal is an :class:`OpenAIError` whose message is a sentence.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from optdemo.app.admission import QueueFullError
from optdemo.app.openai_fields import (
    CHAT_UNSUPPORTED,
    COMPLETION_UNSUPPORTED,
    FieldError,
    Unsupported,
    check_unicode,
    refuse_unsupported,
    stop_sequences,
)
from optdemo.core import defaults
from optdemo.core.chat_prompt import ChatTurn
from optdemo.core.errors import AccessError, BusyError, EndpointError, NoModelError, OptdemoError
from optdemo.core.generation import GenerationStats, cut_at_stop

OWNER = "optdemo"  # the ``owned_by`` of the models listed by /v1/models
# ``model`` values that mean "whatever this server serves": none, "default", and "dummy", which
# huggingface_hub's InferenceClient sends when it was given a URL instead of a model (as for TGI).
ANY_MODEL = (None, "default", "dummy")


class OpenAIError(Exception):
    """A refusal in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` + a status."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code

    def to_dict(self) -> dict:
        """The JSON body of the error response (also sent as a stream's last event)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_for(exc: OptdemoError) -> OpenAIError:
    """The HTTP status and OpenAI error type of an engine error (its message passes through)."""
    message = str(exc)
    if isinstance(exc, NoModelError):
        return OpenAIError(
            f"{message} (an admin loads one in the Configuration tab or with the /load endpoint)",
            503,
            "server_error",
            code="model_not_loaded",
        )
    if isinstance(exc, QueueFullError):  # every place for a reply is taken: retry later
        return OpenAIError(message, 429, "rate_limit_error", code="queue_full")
    if isinstance(exc, BusyError):
        return OpenAIError(message, 503, "server_error", code="model_busy")
    if isinstance(exc, AccessError):
        return OpenAIError(message, 403, "permission_error", code="not_allowed")
    if isinstance(exc, EndpointError):  # the serving endpoint behind this server failed
        return OpenAIError(message, 502, "server_error", code="backend_error")
    return OpenAIError(message, 400)


def cut_error(stats: GenerationStats | None, stopped_at_sequence: bool) -> OpenAIError | None:
    """The error for a reply the server cut before its end (its stats say ``stopped``, and no stop
    sequence ended it: the model was unloaded or replaced, or the serving endpoint disconnected),
    or None for a reply that ended by itself. OpenAI's finish_reason has no value for a cut reply
    ("stop" says the model ended it, "length" that max_tokens did): a client told either would keep
    a truncated reply as complete, so it gets a 503 (a stream: an error event after its text), as
    OpenAI reports a reply its servers could not finish, and sends again."""
    if stats is None or not stats.stopped or stopped_at_sequence:
        return None
    return OpenAIError(
        "the reply was cut short: the model was unloaded or replaced, or its serving endpoint "
        "disconnected, while it was being written; send the request again",
        503,
        "server_error",
        code="reply_cut",
    )


# ---------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Sampling:
    """The sampling fields every request may carry, as given (DemoService.params validates them)."""

    max_tokens: object = defaults.MAX_NEW_TOKENS
    temperature: object = defaults.TEMPERATURE
    top_p: object = defaults.TOP_P
    top_k: object = defaults.TOP_K  # not OpenAI's, but accepted as vLLM and TGI do
    repetition_penalty: object = defaults.REPETITION_PENALTY  # likewise
    seed: object = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class ChatRequest:
    """A /v1/chat/completions request: the conversation so far and the new user message."""

    model: str | None
    history: tuple[ChatTurn, ...]
    message: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage
    system: str = ""  # the system (and developer) messages: the model's own system turn


@dataclass(frozen=True)
class CompletionRequest:
    """A /v1/completions request: one prompt to continue."""

    model: str | None
    prompt: str
    sampling: Sampling
    stream: bool = False
    include_usage: bool = False


def parse_chat(body: object, max_chars: int) -> ChatRequest:
    """A chat request from its JSON body; every message is held to ``max_chars`` characters.

    Raises:
        OpenAIError: a missing or malformed field, or a feature this server does not offer.
    """
    body = _object(body, CHAT_UNSUPPORTED)
    history, message, system = conversation(body.get("messages"), max_chars)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    return ChatRequest(
        _model(body), tuple(history), message, _sampling(body, max_tokens), *_streaming(body), system=system
    )


def parse_completion(body: object) -> CompletionRequest:
    """A completion request from its JSON body (one text prompt; no echo, suffix or logprobs).

    Raises:
        OpenAIError: a missing or malformed field, or a feature this server does not offer.
    """
    body = _object(body, COMPLETION_UNSUPPORTED)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise OpenAIError(
            "prompt must be one text (lists of prompts and token ids are not supported)", param="prompt"
        )
    return CompletionRequest(_model(body), prompt, _sampling(body, body.get("max_tokens")), *_streaming(body))


def _object(body: object, unsupported: Mapping[str, Unsupported]) -> Mapping:
    """``body`` as a JSON object whose text is valid Unicode and which asks for nothing in
    ``unsupported`` (the first such field is refused, naming it and what optdemo offers)."""
    if not isinstance(body, Mapping):
        raise OpenAIError("the request body must be a JSON object")
    with _refused():
        check_unicode(body)
        refuse_unsupported(body, unsupported)
    return body


@contextlib.contextmanager
def _refused() -> Iterator[None]:
    """A field check's :class:`FieldError` as the 400 it is."""
    try:
        yield
    except FieldError as err:
        raise OpenAIError(str(err), param=err.param, code=err.code) from None


def _model(body: Mapping) -> str | None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise OpenAIError("model must be text", param="model")
    return model or None


def _sampling(body: Mapping, max_tokens: object) -> Sampling:
    given = {
        name: body[name]
        for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed")
        if body.get(name) is not None
    }
    if max_tokens is not None:
        given["max_tokens"] = max_tokens
    with _refused():
        stops = stop_sequences(body.get("stop"))
    return Sampling(**given, stop=stops)


def _streaming(body: Mapping) -> tuple[bool, bool]:
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise OpenAIError("stream must be true or false", param="stream")
    options = body.get("stream_options") or {}
    return stream, bool(isinstance(options, Mapping) and options.get("include_usage"))


def _text(message: object, index: int) -> tuple[str, str]:
    """(role, text) of one message; content may be a text or a list of text parts."""
    param = f"messages[{index}]"
    if not isinstance(message, Mapping) or message.get("role") not in (
        "system",
        "developer",
        "user",
        "assistant",
    ):
        raise OpenAIError(f"{param} must be an object with a role of system, user or assistant", param=param)
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
            raise OpenAIError(f"{param}: only text content is supported by this server", param=param)
        if not all(isinstance(p.get("text", ""), str) for p in content):
            raise OpenAIError(f"{param}: the text of a content part must be text", param=param)
        content = "".join(p.get("text", "") for p in content)
    if content is None and message["role"] == "assistant":
        content = ""
    if not isinstance(content, str):
        raise OpenAIError(f"{param}.content must be text", param=param)
    return str(message["role"]), content


def conversation(messages: object, max_chars: int) -> tuple[list[ChatTurn], str, str]:
    """(history turns, new message, system prompt) from OpenAI-style messages: user/assistant
    pairs in order, the last message the user's. System and developer messages, wherever they
    stand, become the system prompt, which the service renders as the model's own system turn
    (its chat template's, or the plain format's preamble) rather than as words of the user.

    Raises:
        OpenAIError: a malformed message, one over ``max_chars`` (user messages in a row count as
            one), or no user message last. The turns' number and size are the service's to check.
    """
    if not isinstance(messages, list) or not messages:
        raise OpenAIError("messages must be a non-empty list of {role, content} objects", param="messages")
    system: list[str] = []
    turns: list[list[str]] = []  # [user, assistant] pairs being built
    for index, message in enumerate(messages):
        role, text = _text(message, index)
        if len(text) > max_chars:
            raise OpenAIError(
                f"messages[{index}] is {len(text)} characters long; the limit here is {max_chars}",
                param=f"messages[{index}]",
            )
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user" and (not turns or turns[-1][1] is not None):
            turns.append([text, None])  # type: ignore[list-item]
        elif role == "user":  # two user messages in a row: one message, under the same limit
            joined = len(turns[-1][0]) + 1 + len(text)
            if joined > max_chars:  # checked before joining: a long run is never joined in full
                raise OpenAIError(
                    f"messages[{index}] makes the user's message {joined} characters long (user "
                    f"messages in a row are one message); the limit here is {max_chars}",
                    param=f"messages[{index}]",
                )
            turns[-1][0] = f"{turns[-1][0]}\n{text}"
        elif turns and turns[-1][1] is None:
            turns[-1][1] = text
        else:  # an assistant message with no user message before it
            turns.append(["", text])
    if not turns or turns[-1][1] is not None:
        raise OpenAIError("the last message must be the user's", param="messages")
    history = [(user, bot) for user, bot in turns[:-1]]
    return history, turns[-1][0], "\n".join(system).strip()


# ---------------------------------------------------------------------------------- replies
class StopCutter:
    """Cuts accumulated text at the request's stop sequences, holding back a partial match."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.cut: str | None = None  # the text up to the first stop sequence, once one appeared

    @property
    def hit(self) -> bool:
        """Whether a stop sequence appeared: the reply ends there."""
        return self.cut is not None

    def visible(self, text: str, final: bool = False) -> str:
        """The part of ``text`` that may be shown (after a hit, always the text before the stop)."""
        if not self.stops:
            return text
        if self.cut is None:
            shown, hit = cut_at_stop(text, self.stops, final)
            if not hit:
                return shown
            self.cut = shown
        return self.cut


class Deltas:
    """Turns accumulated texts into the pieces a stream sends, so that the pieces add up to the
    final text exactly: trailing whitespace waits until the next step shows it is not trimmed."""

    def __init__(self) -> None:
        self.sent = ""

    def step(self, text: str, final: bool = False) -> str:
        """The new piece to send for accumulated ``text`` ("" when nothing new can be sent)."""
        candidate = text if final else text.rstrip()
        if len(candidate) <= len(self.sent) or not candidate.startswith(self.sent):
            return ""
        piece, self.sent = candidate[len(self.sent) :], candidate
        return piece


def finish_reason(stats: GenerationStats | None, max_tokens: int, stopped_at_sequence: bool) -> str:
    """ "length" when the reply ran into max_tokens, else "stop" (end of text or a stop sequence)."""
    if not stopped_at_sequence and stats is not None and stats.new_tokens >= max_tokens:
        return "length"
    return "stop"


def usage(stats: GenerationStats | None) -> dict:
    """OpenAI's usage counts from a reply's stats (zeros when a reply ended without them), with
    the prompt's tokens served from a cached prefix as ``prompt_tokens_details.cached_tokens``."""
    prompt = stats.prompt_tokens if stats else 0
    completion = stats.new_tokens if stats else 0
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": stats.cached_tokens if stats else 0},
    }


@dataclass(frozen=True)
class ReplyShape:
    """The fixed parts of one reply's JSON: its id, creation time, model and kind."""

    model: str
    chat: bool
    id: str = field(default_factory=lambda: f"optdemo-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, streaming: bool) -> dict:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": ("chatcmpl-" if self.chat else "cmpl-") + self.id,
            "object": kind + (".chunk" if streaming and self.chat else ""),
            "created": self.created,
            "model": self.model,
        }

    def _choice(self, text: str | None, reason: str | None, streaming: bool, first: bool = False) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        if not streaming:
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        return {"index": 0, "delta": delta, "finish_reason": reason}

    def response(self, text: str, reason: str, stats: GenerationStats | None) -> dict:
        """The whole reply of a request without streaming."""
        return {**self._head(False), "choices": [self._choice(text, reason, False)], "usage": usage(stats)}

    def chunk(self, text: str | None, reason: str | None = None, first: bool = False) -> dict:
        """One streamed chunk: a piece of text, or (with ``reason``) the end of the reply."""
        return {**self._head(True), "choices": [self._choice(text, reason, True, first)]}

    def usage_chunk(self, stats: GenerationStats | None) -> dict:
        """The extra last chunk of ``stream_options.include_usage``: no choices, the usage."""
        return {**self._head(True), "choices": [], "usage": usage(stats)}


def model_card(model_id: str, created: int) -> dict:
    """One entry of /v1/models."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": OWNER}


def check_model(requested: str | None, loaded: Sequence[str]) -> None:
    """Accept a request's ``model`` when it is one of :data:`ANY_MODEL` or a name of the loaded model.

    Raises:
        OpenAIError: 404 naming the loaded model.
    """
    if requested in ANY_MODEL or requested in loaded:
        return
    raise OpenAIError(
        f"model {requested!r} is not served here: this server serves {loaded[0]!r} (or omit model)",
        404,
        "invalid_request_error",
        param="model",
        code="model_not_found",
    )


def no_model_error(busy: str | None) -> OpenAIError:
    """The 503 for a request that arrives while no model is loaded."""
    detail = f" ({busy}: retry in a moment)" if busy else ""
    return error_for(NoModelError(f"no model is loaded on this server{detail}"))


def as_error(exc: Exception) -> OpenAIError | None:
    """The OpenAI error of an engine error, or None for anything else (a bug)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, OptdemoError):
        return error_for(exc)
    return None
