"""A serving endpoint as the backend: chat and completion from TGI, vLLM, ``transformers serve`` or
a Hugging Face Inference Endpoint, through their OpenAI-compatible API.

:class:`EndpointBackend` streams chat through ``huggingface_hub.InferenceClient.chat_completion`` and
completion through the same library's HTTP session (``/v1/completions``), yielding the same
:class:`~optdemo.core.generation.GenerationUpdate` values as the local model, so every caller works
unchanged. :meth:`EndpointBackend.connect` checks the engine first; every failure becomes one
:class:`~optdemo.core.errors.EndpointError` sentence. Sent to the engine: ``max_tokens``,
``temperature``, ``top_p``, ``seed`` and ``stop`` (stop sequences are also applied here);
``top_k`` and ``repetition_penalty`` are not part of the OpenAI protocol: the engine's defaults
apply. The endpoint's token goes only to the endpoint and never into a message, a log or a status.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Any

import httpx2
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, OfflineModeIsEnabled
from huggingface_hub.utils import get_session, hf_raise_for_status

from optdemo.core.chat_prompt import ChatTurn
from optdemo.core.defaults import MAX_NEW_TOKENS_LIMIT
from optdemo.core.errors import EndpointError, GenerationError
from optdemo.core.generation import (
    CacheScope,
    GenerationParams,
    GenerationStats,
    GenerationUpdate,
    cut_at_stop,
)
from optdemo.remote.client import (
    EndpointConfig,
    EngineInfo,
    check_engine,
    error_text,
    explain,
    once_more_if_stale,
    request_headers,
    request_timeout,
    sse_events,
)

ENDPOINT_FORMAT = (
    "the serving endpoint's own chat template (the engine lays out the conversation; top_k and "
    "repetition_penalty are not sent to it: the engine's defaults apply)"
)
OPENAI_MAX_STOP = 4  # stop sequences the OpenAI protocol takes; the rest are applied here only
Piece = tuple[str, str | None, dict | None]  # streamed text, finish_reason (at the end), usage


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
        """Stream a chat reply through ``InferenceClient.chat_completion(stream=True)`` (the engine
        keeps its own prompt caches: ``cache_scope`` is not its business)."""
        self._check_length(params, max_new_tokens_cap)
        messages = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": message})
        chat = self._stream(lambda: self._chat_pieces(messages, params), params, stop_event, chat=True)
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
        yield from self._stream(lambda: self._completion_pieces(prompt, params), params, stop_event)

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
        open_pieces: Callable[[], _Pieces],
        params: GenerationParams,
        stop_event: threading.Event | None,
        chat: bool = False,
    ) -> Iterator[GenerationUpdate]:
        """Run one request: accumulate the engine's pieces, hold back and cut stop sequences, end
        early on ``stop_event``, and turn every failure into an :class:`EndpointError`."""
        stop_event = stop_event or threading.Event()
        started = time.perf_counter()
        first: float | None = None
        text, shown, pieces, usage = "", "", 0, None
        finished = stopped = hit = False
        try:
            stream = once_more_if_stale(open_pieces)
            try:
                for piece, finish, piece_usage in stream:
                    usage = piece_usage or usage
                    finished = finished or finish is not None
                    if stop_event.is_set():
                        stopped = True
                        break
                    if not piece:
                        continue
                    first = first or time.perf_counter()
                    pieces += 1
                    text += piece
                    visible, hit = cut_at_stop(text, params.stop)
                    if hit:
                        text = visible
                        break
                    if visible != shown:
                        shown = visible
                        yield GenerationUpdate(visible)
            finally:
                stream.close()  # closes the response: the engine sees the client go and stops
        except (httpx2.HTTPError, HfHubHTTPError, OfflineModeIsEnabled, InferenceTimeoutError) as exc:
            raise explain(exc, self.config, started_reply=bool(text), chat=chat) from None
        if not (finished or stopped or hit):
            raise EndpointError(
                f"the serving endpoint at {self.config.url} ended the reply without finishing it (it may "
                "have stopped or restarted): check the engine, then send again"
            )
        text, _ = cut_at_stop(text, params.stop, final=True)
        yield GenerationUpdate(text, self._stats(started, first, pieces, usage, stopped))

    def _stats(
        self, started: float, first: float | None, pieces: int, usage: dict | None, stopped: bool
    ) -> GenerationStats:
        """The reply's stats: token counts from the engine's ``usage`` where it sent one, else one
        token per streamed piece (engines stream about one token per piece)."""
        total = time.perf_counter() - started
        new_tokens = int((usage or {}).get("completion_tokens") or pieces)
        prompt_tokens = int((usage or {}).get("prompt_tokens") or 0)
        ttft = None if first is None else first - started
        rate = None
        if ttft is not None and new_tokens > 1 and total > ttft:
            rate = (new_tokens - 1) / (total - ttft)
        return GenerationStats(
            prompt_tokens, new_tokens, ttft, total, rate, stopped, context_window=self.info.context_length
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

    def _chat_pieces(self, messages: list[dict], params: GenerationParams) -> _Pieces:
        client = InferenceClient(
            base_url=self.config.api_url,
            token=self.config.token,
            # No token of ours: an empty header, or InferenceClient would send the HF token.
            headers={} if self.config.token else {"authorization": ""},
            timeout=request_timeout(),  # type: ignore[arg-type]  # handed to httpx as it is
        )
        try:
            chunks = client.chat_completion(
                messages, model=self.info.model, stream=True, **self._sampling(params)
            )
        except BaseException:
            client.close()  # the refused response is held open by the client until then
            raise

        def pieces() -> Iterator[Piece]:
            for chunk in chunks:
                usage = chunk.usage
                usage_dict = None if usage is None else {k: getattr(usage, k, None) for k in _USAGE_KEYS}
                choice = chunk.choices[0] if chunk.choices else None
                content = (choice.delta.content or "") if choice is not None else ""
                yield content, choice.finish_reason if choice is not None else None, usage_dict

        return _Pieces(pieces(), client.close)

    def _completion_pieces(self, prompt: str, params: GenerationParams) -> _Pieces:
        payload = {"model": self.info.model, "prompt": prompt, "stream": True, **self._sampling(params)}
        context = get_session().stream(
            "POST",
            f"{self.config.api_url}/completions",
            json=payload,
            headers=request_headers(self.config),
            timeout=request_timeout(),
        )
        response = context.__enter__()
        try:
            hf_raise_for_status(response)
        except BaseException:
            context.__exit__(None, None, None)
            raise

        def pieces() -> Iterator[Piece]:
            for event in sse_events(response.iter_lines()):
                if "error" in event:
                    raise EndpointError(
                        f"the serving endpoint at {self.config.url} failed: {error_text(event)}"
                    )
                choice = (event.get("choices") or [{}])[0]
                yield choice.get("text") or "", choice.get("finish_reason"), event.get("usage")

        return _Pieces(pieces(), lambda: context.__exit__(None, None, None))


_USAGE_KEYS = ("prompt_tokens", "completion_tokens")


class _Pieces:
    """An iterator of (text, finish_reason, usage) with the close that ends its request."""

    def __init__(self, items: Iterator[Piece], close: Callable[[], object]) -> None:
        self._items = items
        self._close = close

    def __iter__(self) -> Iterator[Piece]:
        return self._items

    def close(self) -> None:
        # Closing a dead connection must not hide the real error.
        with contextlib.suppress(Exception):
            self._close()
