"""A fake OpenAI-compatible serving engine that misbehaves on purpose, for the endpoint-stream tests.

One threaded ``http.server`` on 127.0.0.1 answers ``/v1/models`` (one model, ``m``) and streams
``/v1/completions`` and ``/v1/chat/completions`` as :attr:`FakeEngine.behaviour` says: a normal
two-piece reply, keep-alive comments forever, a silent stall (before or after the headers), a
5 MB reply, output that is not JSON or not shaped as OpenAI's, an error event or a 401 that
quotes the Authorization header it received, or one data line as given. It records when the
client hung up, so a test can tell that the connection really was closed.
"""

from __future__ import annotations

import http.server
import json
import select
import socket
import threading
import time
from collections.abc import Iterator

FIRST = "Once"  # the first piece of every streamed reply
HUGE_BYTES = 5 * 1024 * 1024  # the huge reply's size
PING_SECONDS = 0.05  # how often keep-alive comments come


class _Server(http.server.ThreadingHTTPServer):
    """Handler threads named ``fake-engine`` (so a test can tell them from the backend's)."""

    daemon_threads = True

    def process_request(self, request: socket.socket, client_address: object) -> None:  # type: ignore[override]
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), name="fake-engine"
        )
        thread.daemon = True
        thread.start()


class FakeEngine:
    """The engine and what it saw; a context manager that stops it."""

    def __init__(self) -> None:
        self.behaviour = "ok"
        self.error_text = ""  # the message of the "error" behaviour's event
        self.streaming = threading.Event()  # a reply's headers (and first piece, if any) went out
        self.gone = threading.Event()  # the client hung up during a reply
        self.authorization: str | None = None  # the last request's Authorization header
        self._closing = threading.Event()
        self.server = _Server(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, name="fake-engine", daemon=True).start()

    def expect(self, behaviour: str, error_text: str = "") -> None:
        """Behave as ``behaviour`` for the next replies, and forget what the last one saw."""
        self.behaviour, self.error_text = behaviour, error_text
        self.streaming.clear()
        self.gone.clear()

    def __enter__(self) -> FakeEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- what a reply sends
    def events(self, chat: bool) -> Iterator[bytes | None]:
        """The body of a streamed reply, as chunks to write; None means "wait a while"."""
        behaviour = self.behaviour
        if behaviour in ("stall-before-headers", "refuse"):
            return
        yield _event(_piece(FIRST, chat))
        if behaviour == "ok":
            yield _event(_piece(" upon", chat, "stop"))
            yield b"data: [DONE]\n\n"
        elif behaviour == "ping":
            while not self._closing.is_set():
                yield b": ping\n\n"
                yield None
        elif behaviour == "huge-pieces":  # 5 MB in pieces of 1000 bytes, never finishing
            for _ in range(HUGE_BYTES // 1000):
                yield _event(_piece("x" * 1000, chat))
        elif behaviour == "huge-piece":  # 5 MB in one event, on one line
            yield _event(_piece("y" * HUGE_BYTES, chat, "stop"))
        elif behaviour == "html":  # a body that is not server-sent events
            yield b"<html><body>502 Bad Gateway</body></html>\n"
        elif behaviour == "error":
            yield _event({"error": {"message": self.error_text, "type": "invalid_request_error"}})
        elif behaviour.startswith(("malformed:", "raw:")):  # one data line as given
            yield f"data: {behaviour.split(':', 1)[1]}\n\n".encode()
            yield b"data: [DONE]\n\n"

    def stalls(self) -> bool:
        """Whether a reply waits, silent, for the client to hang up after its events."""
        return self.behaviour in ("stall", "stall-before-headers")

    def closing(self) -> bool:
        """Whether the engine is shutting down."""
        return self._closing.is_set()


def _piece(text: str, chat: bool, finish: str | None = None) -> dict:
    choice: dict = {"index": 0, "finish_reason": finish}
    choice.update({"delta": {"content": text}} if chat else {"text": text})
    return {"id": "x", "model": "m", "choices": [choice]}


def _event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _hung_up(connection: socket.socket) -> bool:
    """Whether the client closed the connection (readable, and nothing to read)."""
    readable, _, _ = select.select([connection], [], [], 0)
    if not readable:
        return False
    try:
        return connection.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _handler(engine: FakeEngine) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self.send_error(404)
                return
            body = b'{"data": [{"id": "m", "max_model_len": 100000}]}'
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:
            engine.authorization = self.headers.get("authorization")
            self.rfile.read(int(self.headers["content-length"]))
            chat = self.path.endswith("/chat/completions")
            if engine.behaviour == "refuse":  # a 401 whose body quotes the header it got
                body = json.dumps({"error": {"message": engine.error_text}}).encode()
                self.send_response(401)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            try:
                if engine.behaviour != "stall-before-headers":
                    self.send_response(200)
                    self.send_header("content-type", "text/event-stream")
                    self.end_headers()
                self._write(engine.events(chat))
                if engine.stalls():
                    self._wait_for_hang_up()
            except OSError:  # the client hung up while the engine wrote
                engine.gone.set()

        def _write(self, chunks: Iterator[bytes | None]) -> None:
            for number, chunk in enumerate(chunks):
                if chunk is None:
                    if _hung_up(self.connection):
                        raise ConnectionResetError("the client hung up")
                    time.sleep(PING_SECONDS)
                    continue
                self.wfile.write(chunk)
                self.wfile.flush()
                if number == 0:
                    engine.streaming.set()
            engine.streaming.set()

        def _wait_for_hang_up(self) -> None:
            while not engine.closing():
                if _hung_up(self.connection):
                    engine.gone.set()
                    return
                time.sleep(0.02)

        def log_message(self, *args: object) -> None:
            pass

    return Handler
