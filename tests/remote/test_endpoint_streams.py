"""Endpoint streams against an engine that misbehaves (fake_engine.py): Stop and disconnects are
honoured within a second whatever the engine sends or does not send, a reply is capped by
max_new_tokens, output optdemo cannot read is an EndpointError naming the engine (a 502 on /v1),
and the endpoint's token never comes back, through the backend, the OpenAI API, the named API,
the UI's errors and the logs.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator

import gradio as gr
import httpx
import pytest
from app_fixtures import running_app
from fake_engine import FIRST, HUGE_BYTES, FakeEngine
from gradio_client.exceptions import AppError

from optdemo.app.service import DemoService
from optdemo.app.settings import AppSettings
from optdemo.core.defaults import ENDPOINT_MIN_REPLY_BYTES, ENDPOINT_REPLY_BYTES_PER_TOKEN
from optdemo.core.errors import EndpointError
from optdemo.core.generation import GenerationParams, GenerationUpdate
from optdemo.core.redact import redact
from optdemo.remote import engine_stream
from optdemo.remote.client import parse_endpoint
from optdemo.remote.endpoint_backend import EndpointBackend
from optdemo.runtime.manager import ModelManager
from optdemo.web.errors import to_gradio_error
from optdemo.web.openai_routes import _reported

TOKEN = "tok-SECRET-4242"  # the endpoint's token: it must never come back
PARAMS = GenerationParams(max_new_tokens=50, temperature=0)
STOP_SECONDS = 1.0  # Stop must end a reply within this, whatever the engine does
ROUTES = ("completion", "chat")
QUOTED = f"rejected header Authorization: Bearer {TOKEN}; the token {TOKEN} is unknown"


@pytest.fixture(autouse=True)
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub allowed to make requests (the suite sets HF_HUB_OFFLINE=1)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def engine() -> Iterator[FakeEngine]:
    with FakeEngine() as fake:
        yield fake


def connect(engine: FakeEngine) -> EndpointBackend:
    return EndpointBackend.connect(parse_endpoint(engine.url, "m", TOKEN))


def reply(remote: EndpointBackend, route: str, stop: threading.Event | None = None, params=PARAMS):
    """The backend's stream for ``route``."""
    if route == "chat":
        return remote.stream_chat([], "Hi", params, stop)
    return remote.stream_completion("Hi", params, stop)


def ours(before: set[threading.Thread]) -> list[threading.Thread]:
    """Threads started since ``before`` that are still alive (the fake engine's own aside)."""
    return [t for t in threading.enumerate() if t not in before and t.name != "fake-engine"]


def read_in_background(stream: Iterator[GenerationUpdate]) -> tuple[threading.Thread, list, list]:
    """Consume ``stream`` in a thread: (the thread, the updates, the exception if any)."""
    updates: list[GenerationUpdate] = []
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            updates.extend(stream)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            failures.append(exc)

    thread = threading.Thread(target=consume, name="test-reader", daemon=True)
    thread.start()
    return thread, updates, failures


# ---------------------------------------------------------------------------------- Stop
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("behaviour", ["ping", "stall", "stall-before-headers"])
def test_stop_ends_the_reply_within_a_second_whatever_the_engine_sends(
    engine: FakeEngine, behaviour: str, route: str
) -> None:
    remote = connect(engine)
    engine.expect(behaviour)
    before = set(threading.enumerate())
    stop = threading.Event()
    reader, updates, failures = read_in_background(reply(remote, route, stop))
    assert engine.streaming.wait(5) or behaviour == "stall-before-headers"
    time.sleep(0.3)  # the reader now waits on the engine
    stop.set()
    stopped_at = time.monotonic()
    reader.join(timeout=3 * STOP_SECONDS)
    took = time.monotonic() - stopped_at
    assert not reader.is_alive(), f"the reply was still waiting on the engine {took:.1f} s after Stop"
    assert took < STOP_SECONDS and failures == []
    last = updates[-1]
    assert last.stats is not None and last.stats.stopped
    assert last.text == ("" if behaviour == "stall-before-headers" else FIRST)
    # The engine saw its client go, and no thread of the reply lingers.
    assert engine.gone.wait(STOP_SECONDS)
    time.sleep(0.2)
    assert [t.name for t in ours(before) if t is not reader] == []


def test_disconnecting_the_endpoint_ends_a_stalled_reply_within_a_second(engine: FakeEngine) -> None:
    service = DemoService(ModelManager(), AppSettings())
    service.backends.connect(parse_endpoint(engine.url, "m", TOKEN))
    engine.expect("stall")
    reader, updates, failures = read_in_background(service.complete("s", "Hi", PARAMS))
    assert engine.streaming.wait(5)
    time.sleep(0.3)
    assert service.backends.disconnect() is True
    reader.join(timeout=3 * STOP_SECONDS)
    assert not reader.is_alive() and failures == []
    last = updates[-1]
    assert last.text == FIRST and last.stats is not None and last.stats.stopped  # the stats say it
    assert engine.gone.wait(STOP_SECONDS)


def test_keep_alive_comments_alone_time_out_as_silence_does(
    engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_stream, "ENDPOINT_READ_TIMEOUT_SECONDS", 0.3)
    engine.expect("ping")
    with pytest.raises(EndpointError) as caught:
        list(reply(connect(engine), "completion"))
    assert str(caught.value) == (
        f"the serving endpoint at {engine.url} did not answer in time: check that the engine is running "
        "and not overloaded"
    )
    assert engine.gone.wait(STOP_SECONDS)


# ---------------------------------------------------------------------------------- size
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("behaviour", ["huge-pieces", "huge-piece"])
def test_a_huge_reply_is_capped_by_max_new_tokens(engine: FakeEngine, behaviour: str, route: str) -> None:
    engine.expect(behaviour)
    started = time.monotonic()
    updates = list(reply(connect(engine), route))
    cap = max(ENDPOINT_MIN_REPLY_BYTES, ENDPOINT_REPLY_BYTES_PER_TOKEN * PARAMS.max_new_tokens)
    last = updates[-1]
    assert len(last.text.encode()) <= cap < HUGE_BYTES // 100
    assert last.text.startswith(FIRST)
    # Counted as a reply that ran into max_new_tokens (OpenAI's "length"), not as stopped by a user.
    assert last.stats is not None and last.stats.new_tokens == PARAMS.max_new_tokens
    assert not last.stats.stopped
    assert time.monotonic() - started < 5
    assert engine.gone.wait(STOP_SECONDS)  # optdemo stopped reading and hung up


# ---------------------------------------------------------------------------------- malformed
MALFORMED = [
    ("completion", "{not json", "not JSON"),
    ("completion", "[1, 2]", "not a JSON object"),
    ("completion", '{"choices": "x"}', "choices"),
    ("completion", '{"choices": [{"text": 5}]}', "text"),
    ("chat", '{"choices": [{"delta": "x"}]}', "delta"),
    ("chat", '{"choices": [{"delta": {"content": ["a"]}}]}', "content"),
    ("chat", '{"choices": [{"delta": {"content": "a"}, "finish_reason": 3}]}', "finish_reason"),
]


@pytest.mark.parametrize(("route", "payload", "named"), MALFORMED)
def test_malformed_output_is_an_endpoint_error_naming_the_engine(
    engine: FakeEngine, route: str, payload: str, named: str
) -> None:
    engine.expect(f"malformed:{payload}")
    with pytest.raises(EndpointError) as caught:
        list(reply(connect(engine), route))
    message = str(caught.value)
    assert message.startswith(f"the serving endpoint at {engine.url} sent a reply optdemo cannot read: ")
    assert named in message and message.endswith("check that the URL is an OpenAI-compatible engine")


def test_a_body_that_is_not_a_stream_of_events_is_malformed(engine: FakeEngine) -> None:
    # A line with no "data:" (an HTML page, a JSON body where events were asked for).
    engine.expect("html")
    with pytest.raises(EndpointError, match="sent a reply optdemo cannot read: "):
        list(reply(connect(engine), "completion"))


# ---------------------------------------------------------------------------------- the token
@pytest.mark.parametrize("route", ROUTES)
def test_an_error_event_quoting_the_token_never_shows_it(engine: FakeEngine, route: str) -> None:
    remote = connect(engine)
    assert engine.authorization == f"Bearer {TOKEN}"  # sent to the engine, and only there
    engine.expect("error", QUOTED)
    with pytest.raises(EndpointError) as caught:
        list(reply(remote, route))
    assert str(caught.value) == (
        f"the serving endpoint at {engine.url} failed during the reply (rejected header Authorization: "
        "*** the token *** is unknown): check the engine's log, then send again"
    )


def test_a_refusal_quoting_the_token_never_shows_it(engine: FakeEngine) -> None:
    remote = connect(engine)
    engine.expect("refuse", QUOTED)
    with pytest.raises(EndpointError) as caught:
        list(reply(remote, "completion"))
    assert str(caught.value) == (
        f"the serving endpoint at {engine.url} refused the request (HTTP 401: rejected header "
        "Authorization: *** the token *** is unknown): check the endpoint's token (--backend-token)"
    )


def test_lone_surrogates_from_the_engine_become_question_marks(engine: FakeEngine) -> None:
    engine.expect('raw:{"choices": [{"text": "a\\ud800b", "finish_reason": "stop"}]}')
    assert list(reply(connect(engine), "completion"))[-1].text == f"{FIRST}a?b"


def test_the_token_is_a_secret_from_the_moment_the_endpoint_is_given() -> None:
    parse_endpoint("http://127.0.0.1:9", "m", "tok-REGISTERED-77")
    assert redact("engine said tok-REGISTERED-77") == "engine said ***"


def test_unexpected_errors_quoting_the_token_are_scrubbed_in_messages_and_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    parse_endpoint("http://127.0.0.1:9", "m", TOKEN)
    caplog.set_level(logging.DEBUG)
    bug = RuntimeError(f"engine quoted {TOKEN}")
    assert TOKEN not in to_gradio_error(bug).message
    assert TOKEN not in _reported(bug).message
    assert TOKEN not in to_gradio_error(EndpointError(f"x {TOKEN}")).message
    assert TOKEN not in _reported(EndpointError(f"x {TOKEN}")).message
    assert "RuntimeError" in caplog.text and TOKEN not in caplog.text


# ---------------------------------------------------------------------------------- through the app
@pytest.fixture(scope="module")
def app(engine: FakeEngine) -> Iterator:
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        engine.expect("ok")
        flags = ["--backend-url", engine.url, "--backend-model", "m", "--backend-token", TOKEN]
        with running_app(flags) as running:
            running.service.preload()
            yield running


def v1(app, route: str, stream: bool, **extra: object) -> httpx.Response:
    """POST /v1/<route> (completions or chat/completions), the whole response read."""
    body: dict = {"model": "m", "max_tokens": 50, "stream": stream, **extra}
    if route == "chat":
        body["messages"] = [{"role": "user", "content": "Hi"}]
    else:
        body["prompt"] = "Hi"
    path = "chat/completions" if route == "chat" else "completions"
    return httpx.post(f"{app.url}v1/{path}", json=body, timeout=30)


def last_event(response: httpx.Response) -> dict:
    """The last JSON event of a streamed /v1 reply (before ``data: [DONE]``)."""
    events = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])


@pytest.mark.slow
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("stream", [False, True])
def test_v1_never_returns_the_token_and_names_the_engine(
    app, engine: FakeEngine, route: str, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    engine.expect("error", QUOTED)
    response = v1(app, route, stream)
    assert TOKEN not in response.text and TOKEN not in caplog.text
    error = (last_event(response) if stream else response.json())["error"]
    assert error["code"] == "backend_error"
    assert error["message"].startswith(f"the serving endpoint at {engine.url} failed during the reply (")
    assert response.status_code == (200 if stream else 502)


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_v1_maps_malformed_engine_output_to_502(app, engine: FakeEngine, stream: bool) -> None:
    engine.expect("malformed:{not json")
    response = v1(app, "completion", stream)
    error = (last_event(response) if stream else response.json())["error"]
    assert (error["code"], error["type"]) == ("backend_error", "server_error")
    assert error["message"].startswith(f"the serving endpoint at {engine.url} sent a reply optdemo cannot")
    assert response.status_code == (200 if stream else 502)


@pytest.mark.slow
def test_named_api_and_chat_never_return_the_token(app, engine: FakeEngine) -> None:
    engine.expect("error", QUOTED)
    client = app.client()
    for api_name, args in (("/generate", ("Hi", 8)), ("/chat", ("Hi", 8))):
        with pytest.raises(AppError) as caught:
            client.predict(*args, api_name=api_name)
        assert TOKEN not in str(caught.value)
        assert f"the serving endpoint at {engine.url} failed during the reply (" in str(caught.value)
    engine.expect("malformed:[1]")
    with pytest.raises(AppError, match="sent a reply optdemo cannot read"):
        client.predict("Hi", 8, api_name="/generate")


@pytest.mark.slow
def test_a_v1_client_that_leaves_a_pinging_stream_frees_the_engine(app, engine: FakeEngine) -> None:
    engine.expect("ping")
    body = {"model": "m", "prompt": "Hi", "max_tokens": 50, "stream": True}
    with httpx.stream("POST", f"{app.url}v1/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert FIRST in next(line for line in lines if FIRST in line)
    left = time.monotonic()
    assert engine.gone.wait(2 * STOP_SECONDS)  # the disconnect poll (0.25 s) plus Stop's second
    assert time.monotonic() - left < 2 * STOP_SECONDS


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_v1_a_reply_cut_by_a_disconnect_is_not_a_finished_one(app, engine: FakeEngine, stream: bool) -> None:
    engine.expect("stall")
    results: list[httpx.Response] = []
    request = threading.Thread(target=lambda: results.append(v1(app, "completion", stream)), daemon=True)
    request.start()
    assert engine.streaming.wait(5)
    time.sleep(0.5)
    config = app.service.endpoint.config
    try:
        app.service.backends.disconnect()
        request.join(timeout=5)
        assert not request.is_alive()
    finally:
        app.service.backends.connect_operator(config)
    response = results[0]
    error = (last_event(response) if stream else response.json())["error"]
    assert error["code"] == "reply_cut" and "send the request again" in error["message"]
    assert response.status_code == (200 if stream else 503)
    assert '"finish_reason": "stop"' not in response.text


@pytest.mark.slow
def test_v1_a_huge_reply_ends_at_max_tokens(app, engine: FakeEngine) -> None:
    engine.expect("huge-pieces")
    choice = v1(app, "completion", False).json()["choices"][0]
    assert choice["finish_reason"] == "length"
    cap = max(ENDPOINT_MIN_REPLY_BYTES, ENDPOINT_REPLY_BYTES_PER_TOKEN * 50)
    assert len(choice["text"].encode()) <= cap


def test_ui_errors_are_sentences_without_the_token(engine: FakeEngine) -> None:
    error = to_gradio_error(EndpointError(f"the serving endpoint at {engine.url} failed: {QUOTED}"))
    assert isinstance(error, gr.Error) and TOKEN not in error.message
