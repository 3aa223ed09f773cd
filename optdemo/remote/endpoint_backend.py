"""A serving endpoint as the backend: chat and completion from TGI, vLLM, ``transformers serve`` or
a Hugging Face Inference Endpoint, through their OpenAI-compatible API.

:class:`EndpointBackend` streams chat from the engine's ``/v1/chat/completions`` and completion from
its ``/v1/completions`` (:class:`~optdemo.remote.engine_stream.EngineStream`: Stop and a client that
goes away end a reply within a second whatever the engine sends, and output optdemo cannot read is
an error naming the engine), yielding the same :class:`~optdemo.core.generation.GenerationUpdate`
values as the local model, so every caller works unchanged. A reply is capped by its
``max_new_tokens``: no more than that many pieces, nor more text than
``ENDPOINT_REPLY_BYTES_PER_TOKEN`` bytes per token, are kept, whatever the engine sends; a capped
reply counts as one that ran into ``max_new_tokens``. :meth:`EndpointBackend.connect` checks the
engine first; every failure becomes one :class:`~optdemo.core.errors.EndpointError` sentence. Sent
to the engine: ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and ``stop`` (stop sequences
are also applied here); ``top_k`` and ``repetition_penalty`` are not part of the OpenAI protocol:
the engine's defaults apply. The endpoint's token goes only to the endpoint and never into a
message, a log or a status.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import httpx2
from huggingface_hub.errors import OfflineModeIsEnabled

from optdemo.core.chat_prompt import ChatTurn
from optdemo.core.defaults import (
    ENDPOINT_EVENT_OVERHEAD_BYTES,
    ENDPOINT_EXTRA_EVENTS,
    ENDPOINT_MIN_REPLY_BYTES,
    ENDPOINT_REPLY_BYTES_PER_TOKEN,
    MAX_NEW_TOKENS_LIMIT,
)
from optdemo.core.errors import GenerationError
from optdemo.core.generation import (
    CacheScope,
    GenerationParams,
    GenerationStats,
    GenerationUpdate,
    cut_at_stop,
)
from optdemo.remote.client import EndpointConfig, EngineInfo, check_engine, explain, failure
from optdemo.remote.engine_stream import EngineStream, StreamLimits

ENDPOINT_FORMAT = (
    "the serving endpoint's own chat template (the engine lays out the conversation; top_k and "
    "repetition_penalty are not sent to it: the engine's defaults apply)"
)
OPENAI_MAX_STOP = 4  # stop sequences the OpenAI protocol takes; the rest are applied here only


def reply_bytes(max_new_tokens: int) -> int:
    """The most bytes of text (UTF-8) a reply of ``max_new_tokens`` keeps from an engine."""
    return max(ENDPOINT_MIN_REPLY_BYTES, ENDPOINT_REPLY_BYTES_PER_TOKEN * max_new_tokens)


class EndpointBackend:
    """Chat and completion from a serving endpoint; create it with :meth:`connect`. Thread-safe:
    each reply opens its own request (engines batch concurrent requests themselves)."""

    def __init__(self, config: EndpointConfig, info: EngineInfo) -> None:
        self.config = config
        self.info = info

    # ---------------------------------------------------------------- connecting
    @classmethod
    def connect(cls, config: EndpointConfig) -> EndpointBackend:
        """Check the engine and the model (:func:`~optdemo.remote.client.check_engine`) and return a
        backend for them.

        Raises:
            EndpointError: a sentence naming the endpoint and what to do.
        """
        return cls(config, check_engine(config))

    # ---------------------------------------------------------------- the Backend protocol
    def context_window(self) -> int | None:
        """The context length the engine reported, or None."""
        return self.info.context_length

    def chat_format(self) -> str:
        """The engine applies its model's chat template."""
        return ENDPOINT_FORMAT

    def stream_chat(
        self,
        history: Sequence[ChatTurn],
        message: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
        max_new_tokens_cap: int = MAX_NEW_TOKENS_LIMIT,
        system_prompt: str = "",
        cache_scope: CacheScope | None = None,
    ) -> Iterator[GenerationUpdate]:
        """Stream a chat reply from the engine's ``/v1/chat/completions`` (its chat template; the
        engine keeps its own prompt caches: ``cache_scope`` is not its business)."""
        self._check_length(params, max_new_tokens_cap)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": message})
        payload = {"model": self.info.model, "messages": messages, "stream": True, **self._sampling(params)}
        chat = self._stream("chat/completions", payload, params, stop_event, chat=True)
        for update in chat:
            # As the local transcript's: a reply starts at its first word (after "Assistant:").
            yield replace(update, text=update.text.lstrip())

    def stream_completion(
        self,
        prompt: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
        max_new_tokens_cap: int = MAX_NEW_TOKENS_LIMIT,
        cache_scope: CacheScope | None = None,
    ) -> Iterator[GenerationUpdate]:
        """Stream a continuation of ``prompt`` from the engine's ``/v1/completions``."""
        self._check_length(params, max_new_tokens_cap)
        payload = {"model": self.info.model, "prompt": prompt, "stream": True, **self._sampling(params)}
        yield from self._stream("completions", payload, params, stop_event)

    def _check_length(self, params: GenerationParams, cap: int) -> None:
        """max_new_tokens within the operator's cap and below the engine's context length (the
        engine counts the prompt's tokens itself and refuses what does not fit)."""
        cap = min(cap, MAX_NEW_TOKENS_LIMIT)
        window = self.info.context_length
        limit = cap if window is None else min(cap, window - 1)
        if params.max_new_tokens > limit:
            rule = f"the operator's cap {cap}"
            if window is not None:
                rule += f" and the endpoint model's {window}-token window less the prompt"
            raise GenerationError(
                f"max_new_tokens is at most {limit} here ({rule}); you asked for {params.max_new_tokens}"
            )

    # ---------------------------------------------------------------- streaming
    def _stream(
        self,
        route: str,
        payload: dict[str, Any],
        params: GenerationParams,
        stop_event: threading.Event | None,
        chat: bool = False,
    ) -> Iterator[GenerationUpdate]:
        """Run one request: accumulate the engine's pieces up to the reply's caps, hold back and cut
        stop sequences, end on ``stop_event`` (within a second, whatever the engine does), and turn
        every failure into an :class:`EndpointError`."""
        stop_event = stop_event or threading.Event()
        started = time.perf_counter()
        reply = _Reply(params)
        limits = StreamLimits(
            events=params.max_new_tokens + ENDPOINT_EXTRA_EVENTS,
            line_bytes=reply.max_bytes + ENDPOINT_EVENT_OVERHEAD_BYTES,
        )
        try:
            with EngineStream(self.config, route, payload, stop_event, limits, chat) as stream:
                for piece in stream:
                    visible = reply.add(piece.text, piece.finish, piece.usage)
                    if visible is not None:
                        yield GenerationUpdate(visible)
                    if reply.over:
                        break
            # Closed: the engine saw its client go, and stops.
        except (httpx2.HTTPError, OfflineModeIsEnabled) as exc:
            raise explain(exc, self.config, started_reply=bool(reply.text), chat=chat) from None
        reply.capped = reply.capped or stream.capped
        # Stop (or a disconnect) says "stopped" only where the reply had not already ended.
        reply.stopped = stream.stopped and not (reply.finished or reply.hit or reply.capped)
        if not (reply.finished or reply.stopped or reply.hit or reply.capped):
            raise failure(
                self.config,
                f"the serving endpoint at {self.config.url} ended the reply without finishing it (it may "
                "have stopped or restarted): check the engine, then send again",
            )
        text, _ = cut_at_stop(reply.text, params.stop, final=True)
        yield GenerationUpdate(text, self._stats(started, reply))

    def _stats(self, started: float, reply: _Reply) -> GenerationStats:
        """The reply's stats: token counts from the engine's ``usage`` where it sent one, else one
        token per streamed piece (engines stream about one token per piece); a capped reply
        counts as one that ran into max_new_tokens, and one that Stop ended says ``stopped``."""
        total = time.perf_counter() - started
        usage = reply.usage or {}
        new_tokens = int(usage.get("completion_tokens") or reply.pieces)
        if reply.capped:
            new_tokens = reply.params.max_new_tokens
        prompt_tokens = int(usage.get("prompt_tokens") or 0)
        ttft = None if reply.first is None else reply.first - started
        rate = None
        if ttft is not None and new_tokens > 1 and total > ttft:
            rate = (new_tokens - 1) / (total - ttft)
        window = self.info.context_length
        return GenerationStats(
            prompt_tokens, new_tokens, ttft, total, rate, reply.stopped, context_window=window
        )

    def _sampling(self, params: GenerationParams) -> dict[str, Any]:
        """The OpenAI parameters for ``params`` (top_k and repetition_penalty are not passed)."""
        sampling: dict[str, Any] = {"max_tokens": params.max_new_tokens, "temperature": params.temperature}
        if params.temperature > 0:
            sampling["top_p"] = params.top_p
        if params.seed is not None:
            sampling["seed"] = params.seed
        if params.stop:
            sampling["stop"] = list(params.stop[:OPENAI_MAX_STOP])
        return sampling


@dataclass
class _Reply:
    """One reply as it accumulates: its text within the caps, and how it ended."""

    params: GenerationParams
    text: str = ""
    shown: str = ""  # the text last shown (stop sequences held back)
    pieces: int = 0  # pieces with text
    size: int = 0  # bytes of text (UTF-8)
    first: float | None = None  # when the first text came (perf_counter)
    usage: dict | None = None
    finished: bool = False  # the engine said why it ended (finish_reason)
    hit: bool = False  # a stop sequence ended it
    capped: bool = False  # max_new_tokens' caps ended it
    stopped: bool = False  # Stop (or a disconnect) ended it

    @property
    def max_bytes(self) -> int:
        """The most bytes of text kept."""
        return reply_bytes(self.params.max_new_tokens)

    @property
    def over(self) -> bool:
        """Whether the reply has ended here (a stop sequence, or the caps)."""
        return self.hit or self.capped

    def add(self, piece: str, finish: str | None, usage: dict | None) -> str | None:
        """Take one piece; the text to show now, or None when nothing new can be shown."""
        self.usage = usage or self.usage
        self.finished = self.finished or finish is not None
        if not piece:
            return None
        if self.pieces == self.params.max_new_tokens:  # one more than max_new_tokens allows
            self.capped = True
            return None
        self.first = self.first or time.perf_counter()
        self.pieces += 1
        self.size += len(piece.encode("utf-8", "replace"))
        self.text += piece
        if self.size > self.max_bytes:
            self.text = _within(self.text, self.max_bytes)
            self.capped = True
        visible, self.hit = cut_at_stop(self.text, self.params.stop)
        if self.hit:
            self.text = visible
        if visible == self.shown:
            return None
        self.shown = visible
        return visible


def _within(text: str, limit: int) -> str:
    """The longest start of ``text`` of at most ``limit`` bytes in UTF-8 (whole characters)."""
    return text.encode("utf-8", "replace")[:limit].decode("utf-8", "ignore")
