"""One streamed reply from a serving engine, read so that Stop always works and the reply stays
bounded, whatever the engine sends or does not send.

- **Stop acts at once.** Each reply has a connection of its own (none is kept alive for another
  request), whose socket is known from the moment it is connected (httpcore's ``trace``
  extension). A watcher thread shuts that socket down as soon as the reply's stop event is set, so
  a read blocked on a silent engine ends then, even one still waiting for the headers; keep-alive
  comments (``: ping``) are read line by line, with the stop event checked on each. The watcher
  ends with the reply.
- **The reply is bounded.** A line longer than the limit, or more data events than the limit, end
  the reading (:attr:`EngineStream.capped`): an engine that ignores ``max_tokens`` cannot make
  optdemo read or keep megabytes.
- **What optdemo cannot read is said.** A data line that is not a JSON object, or an event not
  shaped as OpenAI's, is an :class:`~optdemo.core.errors.EndpointError` naming the engine; so is an
  error event. Every such message goes through :func:`~optdemo.remote.client.failure`, which
  removes secrets.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx2
from huggingface_hub.utils import get_session

from optdemo.core.defaults import ENDPOINT_READ_TIMEOUT_SECONDS, ENDPOINT_STOP_POLL_SECONDS
from optdemo.core.errors import EndpointError
from optdemo.remote.client import (
    EndpointConfig,
    error_text,
    failure,
    refusal,
    request_headers,
    request_timeout,
)

ERROR_BODY_BYTES = 64 * 1024  # of a refusal's body, read to quote the engine's message
_USAGE_KEYS = ("prompt_tokens", "completion_tokens")
_IGNORED_FIELDS = ("event", "id", "retry")  # server-sent-event fields other than data
_DONE = object()  # ``data: [DONE]``
_client_lock = threading.Lock()
_client: httpx2.Client | None = None


@dataclass(frozen=True)
class StreamLimits:
    """How much of one reply is read at most."""

    events: int  # data events (about one per token, plus a few without text)
    line_bytes: int  # bytes of one line (one event)


@dataclass(frozen=True)
class Piece:
    """One event of a reply: its new text, its finish_reason (on the last), the usage counts."""

    text: str
    finish: str | None
    usage: dict[str, int] | None


def _stream_client() -> httpx2.Client:
    """The HTTP client of the streams: huggingface_hub's session's hooks (HF_HUB_OFFLINE is obeyed),
    and no connection kept alive, so that every reply opens one whose socket it knows."""
    global _client
    with _client_lock:
        if _client is None:
            _client = httpx2.Client(
                event_hooks=get_session().event_hooks,
                follow_redirects=True,
                limits=httpx2.Limits(max_connections=None, max_keepalive_connections=0),
            )
        return _client


class _StopWatch:
    """Shuts a reply's connection down once its stop event is set (within the poll interval)."""

    def __init__(self, stop_event: threading.Event) -> None:
        self._stop = stop_event
        self._over = threading.Event()
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._thread = threading.Thread(target=self._watch, name="optdemo-endpoint-stop", daemon=True)
        self._thread.start()

    def trace(self, name: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: keep the socket of the connection (TCP, then TLS over it, also
        through a proxy), so that Stop can shut it down."""
        if not name.endswith((".connect_tcp.complete", ".start_tls.complete")):
            return
        stream = info.get("return_value")
        with self._lock:
            self._socket = None if stream is None else stream.get_extra_info("socket")
        if self._stop.is_set():  # Stop came while connecting
            self._shut()

    def _watch(self) -> None:
        while not self._over.wait(ENDPOINT_STOP_POLL_SECONDS):
            if self._stop.is_set():
                self._shut()
                return

    def _shut(self) -> None:
        with self._lock:
            sock = self._socket
        if sock is not None:
            # A shutdown wakes a read blocked in another thread (closing the socket would not).
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def end(self) -> None:
        """The reply is over: the watcher ends now."""
        self._over.set()
        self._thread.join()


class EngineStream:
    """One POST to ``<api_url>/<route>`` with ``stream: true``, as a context manager; iterate it
    for the reply's :class:`Piece` values. After iterating, :attr:`stopped` says the stop event
    ended it, :attr:`capped` that the limits did, :attr:`done` that ``data: [DONE]`` came."""

    def __init__(
        self,
        config: EndpointConfig,
        route: str,
        payload: dict[str, Any],
        stop_event: threading.Event,
        limits: StreamLimits,
        chat: bool,
    ) -> None:
        self.config, self.route, self.payload = config, route, payload
        self.stop_event, self.limits, self.chat = stop_event, limits, chat
        self.stopped = self.capped = self.done = False
        self._response: httpx2.Response | None = None
        self._context: Any = None
        self._watch: _StopWatch | None = None

    def __enter__(self) -> EngineStream:
        """Send the request and read the headers (the engine's refusal raises here).

        Raises:
            EndpointError: the engine refused the request. httpx2.HTTPError, OfflineModeIsEnabled:
            the request failed (:func:`~optdemo.remote.client.explain` words it).
        """
        self._watch = _StopWatch(self.stop_event)
        # Uncompressed, so that the caps count what the engine sent.
        headers = {**request_headers(self.config), "accept": "text/event-stream"}
        headers["accept-encoding"] = "identity"
        try:
            self._context = _stream_client().stream(
                "POST",
                f"{self.config.api_url}/{self.route}",
                json=self.payload,
                headers=headers,
                timeout=request_timeout(),
                extensions={"trace": self._watch.trace},
            )
            self._response = self._context.__enter__()
            response = self._response
            if response.status_code >= 400:
                body = _read_at_most(response, ERROR_BODY_BYTES)
                raise refusal(self.config, response.status_code, response.reason_phrase, body, self.chat)
        except httpx2.HTTPError:
            if not self.stop_event.is_set():
                self.__exit__(None, None, None)
                raise
            self.stopped = True  # Stop came before the headers: the watcher shut the connection
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        """Close the connection (the engine sees its client go, and stops) and end the watcher."""
        if self._context is not None:
            with contextlib.suppress(Exception):  # closing a dead connection must not hide the real error
                self._context.__exit__(None, None, None)
            self._context = None
        if self._watch is not None:
            self._watch.end()
            self._watch = None

    def __iter__(self) -> Iterator[Piece]:
        """The reply's pieces, up to ``data: [DONE]``, the end of the body, Stop or the limits.

        Raises:
            EndpointError: an error event, or output optdemo cannot read.
            httpx2.HTTPError: the connection failed (not by Stop), or the engine sent nothing but
            keep-alive comments for the read timeout (as if it had sent nothing at all).
        """
        if self._response is None:
            return
        events, last_event = 0, time.monotonic()
        try:
            for line in self._lines():
                if self.stop_event.is_set():
                    break
                event = self._event(line)
                if event is _DONE:
                    self.done = True
                    return
                if event is None:
                    if time.monotonic() - last_event > ENDPOINT_READ_TIMEOUT_SECONDS:
                        raise httpx2.ReadTimeout("only keep-alive comments for the read timeout")
                    continue
                events, last_event = events + 1, time.monotonic()
                if events > self.limits.events:
                    self.capped = True
                    return
                yield self._piece(event)
        except httpx2.HTTPError:
            if not self.stop_event.is_set():
                raise
        # The body ended, or a read failed, because the watcher shut the connection: Stop.
        self.stopped = self.stop_event.is_set()

    # ---------------------------------------------------------------- reading
    def _lines(self) -> Iterator[str]:
        """The body's lines (without their ends), none longer than the limit."""
        assert self._response is not None
        buffer = b""
        for chunk in self._response.iter_bytes():
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if len(line) > self.limits.line_bytes:
                    self.capped = True
                    return
                yield line.rstrip(b"\r").decode("utf-8", "replace")
            if len(buffer) > self.limits.line_bytes:
                self.capped = True
                return
        if buffer:
            yield buffer.decode("utf-8", "replace")

    def _event(self, line: str) -> object:
        """The JSON object of a data line, :data:`_DONE`, or None for a line with no event."""
        if not line.strip() or line.startswith(":"):  # an event's end, or a comment (keep-alive)
            return None
        name, _, value = line.partition(":")
        if name in _IGNORED_FIELDS:
            return None
        if name != "data":
            raise self._unreadable(f"a line that is not a server-sent event ({line[:80]!r})")
        data = value.strip()
        if data == "[DONE]":
            return _DONE
        try:
            event = json.loads(data)
        except (ValueError, RecursionError):
            raise self._unreadable(f"an event that is not JSON ({data[:80]!r})") from None
        if not isinstance(event, dict):
            raise self._unreadable(f"an event that is not a JSON object ({data[:80]!r})")
        return event

    def _piece(self, event: dict[str, Any]) -> Piece:
        """The text, finish_reason and usage of one event, checked against OpenAI's shape."""
        if event.get("error") is not None:
            detail = error_text(event)[:300]
            raise failure(
                self.config,
                f"the serving endpoint at {self.config.url} failed during the reply ({detail}): check the "
                "engine's log, then send again",
            )
        if "choices" not in event and "usage" not in event:
            raise self._unreadable("an event with neither choices nor usage")
        choices = event.get("choices") or []
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise self._unreadable(f"choices that are not a list of objects ({str(choices)[:80]!r})")
        usage = event.get("usage")
        if usage is not None and not isinstance(usage, dict):
            raise self._unreadable(f"a usage that is not an object ({str(usage)[:80]!r})")
        counts = {key: usage[key] for key in _USAGE_KEYS if _count(usage.get(key))} if usage else None
        if not choices:
            return Piece("", None, counts)
        choice = choices[0]
        holder, field = (choice.get("delta"), "content") if self.chat else (choice, "text")
        if self.chat and holder is not None and not isinstance(holder, dict):
            raise self._unreadable(f"a delta that is not an object ({str(holder)[:80]!r})")
        text = (holder or {}).get(field)
        if text is not None and not isinstance(text, str):
            raise self._unreadable(f"a {field} that is not text ({str(text)[:80]!r})")
        finish = choice.get("finish_reason")
        if finish is not None and not isinstance(finish, str):
            raise self._unreadable(f"a finish_reason that is not text ({str(finish)[:80]!r})")
        # JSON may carry lone surrogates, which no UTF-8 output can hold: "?" in their place.
        return Piece((text or "").encode("utf-8", "replace").decode("utf-8"), finish, counts)

    def _unreadable(self, what: str) -> EndpointError:
        return failure(
            self.config,
            f"the serving endpoint at {self.config.url} sent a reply optdemo cannot read: {what}; check "
            "that the URL is an OpenAI-compatible engine",
        )


def _count(value: object) -> bool:
    """Whether a usage value is a token count."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_at_most(response: httpx2.Response, limit: int) -> bytes:
    """Up to ``limit`` bytes of a response's body (the rest is not read)."""
    body = b""
    with contextlib.suppress(httpx2.HTTPError):
        for chunk in response.iter_bytes():
            body += chunk
            if len(body) >= limit:
                break
    return body[:limit]
