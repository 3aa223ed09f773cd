"""The remote backend against a real engine: ``transformers serve`` on 127.0.0.1 (engine_fixtures).

Every reply is compared with what the engine itself answers to the same request, not streamed
(greedy decoding: the same tokens), so the tests check that the backend streams exactly the
engine's text, through the service, the Chat tab, the named ``/chat`` API and the OpenAI API.
The failure cases (engine down, wrong model, engine killed mid-reply, HF_HUB_OFFLINE set) each
give one clear sentence and leave the app serving.
"""

from __future__ import annotations

import http.server
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import engine_fixtures
import gradio as gr
import httpx2
import openai
import pytest
from app_fixtures import config_ui, form_values, running_app
from engine_fixtures import Engine, free_port, serving

from optdemo.app.service import DemoService
from optdemo.app.settings import AppSettings, parse_settings
from optdemo.core.errors import AccessError, ConfigError, EndpointError
from optdemo.core.generation import GenerationParams
from optdemo.remote.client import once_more_if_stale, parse_endpoint
from optdemo.remote.endpoint_backend import ENDPOINT_FORMAT, EndpointBackend
from optdemo.runtime.manager import ModelManager
from optdemo.web.render import status_text
from optdemo.web.tabs import chat as chat_tab
from optdemo.web.tabs import config as config_tab
from optdemo.web.tabs import devicemap as devicemap_tab
from optdemo.web.tabs import endpoint_form
from optdemo.web.tabs.chat_components import ChatTab
from optdemo.web.tabs.config_components import ENDPOINT, LOCAL

GREEDY = GenerationParams(max_new_tokens=12, temperature=0)
TOKEN = "tok-SECRET-123"  # the endpoint's token: it must never come back
REQUEST = SimpleNamespace(session_hash="endpoint-session")
pytestmark = pytest.mark.usefixtures("online")
# The engine's fixtures, used here only (one engine per test session).
served_model, hf_cache = engine_fixtures.served_model, engine_fixtures.hf_cache
engine, online = engine_fixtures.engine, engine_fixtures.online


def engine_says(engine: Engine, route: str, body: dict) -> str:
    """The engine's own, non-streamed answer to ``body`` (greedy), straight over HTTP."""
    payload = {"model": engine.model, "temperature": 0, "stream": False, **body}
    request = urllib.request.Request(
        f"{engine.url}/v1/{route}", json.dumps(payload).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        choice = json.load(response)["choices"][0]
    # A chat reply is shown from its first word on, as the local model's.
    return choice["message"]["content"].lstrip() if route == "chat/completions" else choice["text"]


def backend(engine: Engine, model: str | None = None) -> EndpointBackend:
    return EndpointBackend.connect(parse_endpoint(engine.url, model or engine.model, TOKEN))


def grows(texts: list[str]) -> bool:
    """Each streamed text extends the one before (accumulated, as the UI expects)."""
    return all(later.startswith(earlier) for earlier, later in itertools.pairwise(texts))


# ---------------------------------------------------------------------------------- the backend
def test_connect_reports_the_engine_and_the_model(engine: Engine) -> None:
    remote = backend(engine)
    info = remote.info
    assert (info.url, info.model) == (engine.url, engine.model)
    assert info.describe() == f"serving endpoint {engine.url} ({engine.model})"
    # transformers serve lists no models (it lists the cache's) and says nothing of itself.
    assert info.note == "the engine lists no models; the name was checked with a one-token request"
    assert info.engine_text() == "not reported by the engine"
    assert remote.chat_format() == ENDPOINT_FORMAT
    assert TOKEN not in repr(remote.config) and TOKEN not in json.dumps(info.to_dict())
    # "/v1" at the end of the URL, and a trailing slash, are the same endpoint.
    assert parse_endpoint(engine.url + "/v1/").url == engine.url


def test_chat_streams_the_engines_reply(engine: Engine) -> None:
    history = [("Hello", "Hi there")]
    updates = list(backend(engine).stream_chat(history, "How are you?", GREEDY, system_prompt="Be brief."))
    texts = [u.text for u in updates]
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi there"},
        {"role": "user", "content": "How are you?"},
    ]
    assert texts[-1] == engine_says(engine, "chat/completions", {"messages": messages, "max_tokens": 12})
    assert len(updates) > 2 and grows(texts)  # streamed, piece by piece
    stats = updates[-1].stats
    assert stats is not None and stats.new_tokens == 12 and stats.prompt_tokens > 10
    assert all(u.stats is None for u in updates[:-1])


def test_completion_streams_and_cuts_at_a_stop_sequence(engine: Engine) -> None:
    whole = engine_says(engine, "completions", {"prompt": "Once upon a time", "max_tokens": 12})
    updates = list(backend(engine).stream_completion("Once upon a time", GREEDY))
    assert updates[-1].text == whole and grows([u.text for u in updates])
    # A stop sequence taken from the middle of the reply ends it there, and is not shown.
    stop = whole[len(whole) // 2 : len(whole) // 2 + 2]
    index = whole.index(stop)
    cut = list(backend(engine).stream_completion("Once upon a time", GenerationParams(12, 0, stop=[stop])))
    assert cut[-1].text == whole[:index].rstrip()
    assert stop not in cut[-1].text


def test_stop_event_ends_the_reply(engine: Engine) -> None:
    stop = threading.Event()
    stream = backend(engine).stream_completion(
        "Tell", GenerationParams(max_new_tokens=200, temperature=0), stop
    )
    first = next(stream)
    stop.set()
    rest = list(stream)
    assert rest[-1].stats is not None and rest[-1].stats.stopped
    assert rest[-1].stats.new_tokens < 200 and rest[-1].text.startswith(first.text)


def test_max_new_tokens_over_the_cap_is_refused_before_any_request(engine: Engine) -> None:
    with pytest.raises(Exception, match="max_new_tokens is at most 8 here"):
        list(backend(engine).stream_completion("Hi", GenerationParams(max_new_tokens=9), None, 8))


# ---------------------------------------------------------------------------------- failures
def test_engine_down_is_one_sentence() -> None:
    with pytest.raises(EndpointError) as caught:
        EndpointBackend.connect(parse_endpoint(f"http://127.0.0.1:{free_port()}", "m", TOKEN))
    message = str(caught.value)
    assert "cannot reach the serving endpoint at http://127.0.0.1:" in message
    assert "(connection refused): start the engine" in message and TOKEN not in message


def test_wrong_model_name_gives_the_engines_answer(engine: Engine) -> None:
    with pytest.raises(EndpointError) as caught:
        backend(engine, "no-such-model")
    message = str(caught.value)
    assert f"the serving endpoint at {engine.url} refused the request (HTTP 400: " in message
    assert "no-such-model" in message and "check the model name (--backend-model" in message


def test_chat_with_an_engine_lacking_a_chat_template_says_so(served_model: Path, tmp_path: Path) -> None:
    bare = tmp_path / "no-template"
    shutil.copytree(served_model, bare, ignore=shutil.ignore_patterns("chat_template.jinja"))
    (tmp_path / "hf").mkdir()
    with serving(bare, tmp_path / "hf") as plain:
        remote = EndpointBackend.connect(parse_endpoint(plain.url, plain.model))
        with pytest.raises(EndpointError) as caught:
            list(remote.stream_chat([], "Hi", GREEDY))
        assert list(remote.stream_completion("Hi", GREEDY))[-1].text  # completion still works
    assert str(caught.value) == (
        f"the serving endpoint at {plain.url} failed to chat (HTTP 500: Internal Server Error): its model "
        "may have no chat template (transformers serve then fails every chat): use Completion mode, or "
        "serve a model with a chat template; the engine's log says more"
    )


def test_a_request_on_a_stale_connection_is_sent_once_more() -> None:
    # After an engine answered an error (or restarted), its kept-alive connection may be gone:
    # the first try fails with a reset, the second opens a fresh connection.
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            raise httpx2.ReadError("[Errno 104] Connection reset by peer")
        return "answer"

    assert once_more_if_stale(flaky) == "answer" and len(calls) == 2

    def dead() -> str:
        calls.append(1)
        raise httpx2.RemoteProtocolError("peer closed connection")

    calls.clear()
    with pytest.raises(httpx2.RemoteProtocolError):
        once_more_if_stale(dead)
    assert len(calls) == 2  # once more, not forever


def test_hf_hub_offline_is_named_with_its_remedy(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    remote = backend(engine)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    for attempt in (lambda: backend(engine), lambda: list(remote.stream_chat([], "Hi", GREEDY))):
        with pytest.raises(EndpointError, match="unset HF_HUB_OFFLINE to use a serving endpoint"):
            attempt()


def test_engine_killed_mid_reply_keeps_the_chat(
    served_model: Path, hf_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    earlier = [{"user": "Hi", "assistant": "Hello", "stats": ""}]
    with serving(served_model, hf_cache) as doomed:
        service = DemoService(ModelManager(), AppSettings())
        service.backends.connect(parse_endpoint(doomed.url, doomed.model, TOKEN))
        with gr.Blocks():
            tab = chat_tab.layout_chat_tab(service)
        values = chat_values(tab, "Once", earlier, max_new_tokens=400)
        stream = chat_tab.respond(service, tab, values, REQUEST)
        updates = [next(stream), next(stream)]  # the box cleared, then the reply's first piece
        assert updates[-1][tab.chatbot][-1]["content"]
        doomed.kill()
        updates.extend(stream)  # no gr.Error (issue #24): the chat itself says what went wrong
    # The conversation is as it was, with what went wrong after it, and the message back in the box.
    failure = updates[-1]
    assert failure[tab.turns] == earlier and failure[tab.message] == "Once"
    *kept, note = failure[tab.chatbot]
    assert kept == chat_tab.to_messages(earlier)
    message = note["content"].removeprefix("**Not sent:** ")
    assert message.startswith(f"the serving endpoint at {doomed.url} stopped in the middle of the reply (")
    assert message.endswith(
        "the engine may have crashed or restarted; check it, then send again. Your message is back in "
        "the box."
    )
    # The app keeps serving: the next request is refused in a sentence too, not a crash.
    with pytest.raises(EndpointError, match="cannot reach the serving endpoint"):
        list(service.complete("s", "Again", GREEDY))
    assert TOKEN not in caplog.text


def test_disconnect_stops_the_reply_in_progress(engine: Engine) -> None:
    service = DemoService(ModelManager(), AppSettings())
    service.backends.connect(parse_endpoint(engine.url, engine.model))
    stream = service.complete("s", "Once", GenerationParams(max_new_tokens=300, temperature=0))
    first = next(stream)
    assert service.backends.disconnect() is True
    *_, last = stream
    assert last.stats is not None and last.stats.stopped and last.stats.new_tokens < 300
    assert last.text.startswith(first.text) and not service.status().loaded


def chat_values(tab: ChatTab, message: str, turns: list, **controls: object) -> dict:
    """What Gradio passes the Chat tab's send handler (greedy, unless ``controls`` say otherwise)."""
    values = {control: control.value for control in tab.controls.all()}
    values[tab.controls.temperature] = 0
    for name, value in controls.items():
        values[getattr(tab.controls, name)] = value
    return {**values, tab.message: message, tab.turns: turns, tab.system_prompt: ""}


# ---------------------------------------------------------------------------------- the service
def test_public_mode_never_requests_a_visitors_url() -> None:
    settings = AppSettings(lock_config=True, auth=(("admin", "pw"),), backend_url="http://10.0.0.5:8000")
    service = DemoService(ModelManager(), settings)
    with pytest.raises(AccessError, match="visitors cannot connect to a serving endpoint"):
        service.backends.endpoint_config("http://evil.example:80", admin="visitor")
    admin = service.sign_in("127.0.0.1", "admin", "pw").token
    with pytest.raises(AccessError, match="only the operator chooses the serving endpoint"):
        service.backends.endpoint_config("http://169.254.169.254", admin=admin)
    with pytest.raises(AccessError):
        service.backends.connect(parse_endpoint("http://evil.example"), "visitor")
    # The operator's endpoint, with the operator's token whatever the admin typed.
    operator = AppSettings(
        lock_config=True, auth=(("a", "b"),), backend_url="http://h:1", backend_token=TOKEN
    )
    service = DemoService(ModelManager(), operator)
    admin = service.sign_in("127.0.0.1", "a", "b").token
    config = service.backends.endpoint_config("http://h:1/v1", "m", "typed-token", admin=admin)
    assert (config.url, config.model, config.token) == ("http://h:1", "m", TOKEN)


def test_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"OPTDEMO_BACKEND_URL": "http://127.0.0.1:8000/v1", "OPTDEMO_BACKEND_TOKEN": TOKEN}
    settings = parse_settings(["--backend-model", "facebook/opt-66b"], env=env)
    assert (settings.backend_url, settings.backend_model) == ("http://127.0.0.1:8000/v1", "facebook/opt-66b")
    assert settings.backend_token == TOKEN and TOKEN not in repr(settings)
    assert parse_settings(["--backend-url", "http://h:1"], env=env).backend_url == "http://h:1"
    for argv, message in (
        (["--backend-url", "ftp://h"], "--backend-url: the endpoint URL must start with http://"),
        (["--backend-url", "http://user:pw@h"], "do not write credentials into the endpoint URL"),
        (["--backend-model", "m"], "--backend-model and --backend-token need --backend-url"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_settings(argv, env={})


# ---------------------------------------------------------------------------------- the app
def test_app_with_backend_url_streams_through_chat_tab_api_and_openai(engine: Engine) -> None:
    flags = ["--backend-url", engine.url, "--backend-model", engine.model, "--backend-token", TOKEN]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    expected = engine_says(engine, "chat/completions", {"messages": question, "max_tokens": 12})
    with running_app(flags) as app:
        assert app.service.preload() == f"serving endpoint {engine.url} ({engine.model})"
        status = app.service.status()
        assert status_text(status).startswith(f"**serving endpoint {engine.url} ({engine.model})**")
        # The Chat tab's handler.
        with gr.Blocks():
            tab = chat_tab.layout_chat_tab(app.service)
        values = chat_values(tab, question[0]["content"], [], max_new_tokens=12)
        updates = list(chat_tab.respond(app.service, tab, values, REQUEST))
        assert updates[-1][tab.turns][-1]["assistant"] == expected
        assert len(updates) > 3  # streamed
        # The named /chat API.
        client = app.client()
        job = client.submit(question[0]["content"], 12, 0.0, api_name="/chat")
        streamed = list(job)
        assert job.result() == expected and len(streamed) > 1
        api_status = client.predict(api_name="/status")
        assert api_status["backend"] == "endpoint" and api_status["endpoint"]["url"] == engine.url
        # The OpenAI-compatible API, as the served model.
        openai_client = openai.OpenAI(base_url=app.url + "v1", api_key="none")
        assert [m.id for m in openai_client.models.list().data] == [engine.model]
        chunks = openai_client.chat.completions.create(
            model="default", messages=question, max_tokens=12, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
        # The Device map tab shows what the engine reported.
        heading, picture, table = devicemap_tab.render_tab(None, app.service.status(), None)
        assert heading.startswith(f"**serving endpoint {engine.url} ({engine.model})**: the model runs")
        assert engine.model in picture and "not reported" in picture and table == []
        everything = json.dumps(
            [api_status, streamed, heading, picture, client.view_api(return_format="dict")]
        )
        assert TOKEN not in everything
        # /unload disconnects the endpoint: nothing answers until an admin connects or loads.
        unloaded = client.predict(api_name="/unload")
        assert unloaded["unloaded"] is True and unloaded["status"]["loaded"] is False
        assert app.service.endpoint is None


def test_app_reports_a_down_engine_and_keeps_serving(engine: Engine) -> None:
    with running_app(["--backend-url", f"http://127.0.0.1:{free_port()}", "--backend-model", "m"]) as app:
        with pytest.raises(EndpointError, match="cannot reach the serving endpoint"):
            app.service.preload()
        # Not connected: the named API answers as with no model, and connecting to the engine works.
        assert app.client().predict(api_name="/status")["loaded"] is False
        app.service.backends.connect(parse_endpoint(engine.url, engine.model))
        client = app.client()
        assert client.predict("Hi", 4, 0.0, api_name="/chat")


def test_configuration_tab_connects_and_disconnects(engine: Engine) -> None:
    service, tab = config_ui()
    form = tab.endpoint
    assert form.backend.value == LOCAL and not form.box.visible and form.token.visible
    switched = endpoint_form.switch_backend(service, tab, {form.backend: ENDPOINT}, REQUEST)
    assert switched[form.box]["visible"] is True and switched[form.local_box]["visible"] is False
    assert switched[tab.plan_btn]["visible"] is False
    assert (switched[tab.load_btn]["value"], switched[tab.unload_btn]["value"]) == ("Connect", "Disconnect")
    values = {**form_values(tab), form.backend: ENDPOINT, form.url: engine.url, form.model: engine.model}
    connected = config_tab.load(service, tab, values, REQUEST)[tab.status]
    assert connected.startswith("**Connected** in ")
    described = f"serving endpoint {engine.url} ({engine.model})"
    assert f"{described} — the engine does not say which it is" in connected
    assert service.chat_format() == ENDPOINT_FORMAT
    disconnected = config_tab.unload(service, tab, values, REQUEST)[tab.status]
    assert disconnected.startswith("Disconnected from the serving endpoint")
    assert not service.status().loaded
    # A wrong model name: the engine's answer, and nothing connected.
    with pytest.raises(gr.Error, match="refused the request \\(HTTP 400"):
        config_tab.load(service, tab, {**values, form.model: "nope"}, REQUEST)
    assert service.endpoint is None


def test_public_configuration_tab_hides_the_token_and_fixes_the_url(engine: Engine) -> None:
    service, tab = config_ui(lock_config=True, backend_url=engine.url, backend_token=TOKEN)
    form = tab.endpoint
    assert form.backend.value == ENDPOINT and form.box.visible and not form.local_box.visible
    assert not form.token.visible and form.token.value in ("", None) and form.url.interactive is False
    values = {**form_values(tab), form.url: "http://evil.example"}
    with pytest.raises(gr.Error, match="visitors cannot connect to a serving endpoint"):
        config_tab.load(service, tab, values, REQUEST)
    assert service.endpoint is None


# ---------------------------------------------------------------------------------- what is sent
class _VllmLike(http.server.BaseHTTPRequestHandler):
    """Answers as vLLM does (models with max_model_len, /version), streaming a two-piece reply;
    records every request's Authorization header."""

    seen: list[str | None] = []  # noqa: RUF012 - one test server at a time

    def _send(self, body: bytes, kind: str = "application/json") -> None:
        self.send_response(200)
        self.send_header("content-type", kind)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("authorization"))
        if self.path == "/v1/models":
            self._send(b'{"data": [{"id": "m", "owned_by": "vllm", "max_model_len": 2048}]}')
        elif self.path == "/version":
            self._send(b'{"version": "0.0-test"}')
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        self.seen.append(self.headers.get("authorization"))
        self.rfile.read(int(self.headers["content-length"]))
        chat = self.path.endswith("/chat/completions")
        pieces = [{"delta": {"content": "Par"}}, {"delta": {"content": "is"}, "finish_reason": "stop"}]
        if not chat:
            pieces = [{"text": "Par"}, {"text": "is", "finish_reason": "stop"}]
        events = [json.dumps({"choices": [{"index": 0, **piece}], "model": "m"}) for piece in pieces]
        self._send("".join(f"data: {e}\n\n" for e in [*events, "[DONE]"]).encode(), "text/event-stream")

    def log_message(self, *args: object) -> None:
        pass


def test_only_the_endpoints_own_token_is_sent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_NEVER_SENT_1234")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _VllmLike)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        # Without a token of its own, no Authorization value at all (InferenceClient, left to
        # itself, would send the HF token; its header is overridden with an empty one).
        for token, allowed in ((None, {None, ""}), (TOKEN, {f"Bearer {TOKEN}"})):
            _VllmLike.seen = []
            remote = EndpointBackend.connect(parse_endpoint(url, None, token))
            assert list(remote.stream_chat([], "Capital?", GREEDY))[-1].text == "Paris"
            assert list(remote.stream_completion("The capital is", GREEDY))[-1].text == "Paris"
            assert len(_VllmLike.seen) >= 4 and set(_VllmLike.seen) <= allowed
    finally:
        server.shutdown()
    # What the engine told of itself: the listed model, its context length, engine and version.
    info = remote.info
    assert (info.model, info.context_length, info.engine_text()) == ("m", 2048, "vLLM 0.0-test")
    assert remote.context_window() == 2048 and info.note == ""


# ---------------------------------------------------------------------------------- app.py
def run_app(*args: str, offline: bool) -> subprocess.CompletedProcess:
    """``python app.py ARGS`` with no OPTDEMO_* variables; HF_HUB_OFFLINE set or unset."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTDEMO_") or k == "OPTDEMO_CACHE"}
    for name in ("SPACE_ID", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(name, None)
    env.update({"HF_HUB_OFFLINE": "1"} if offline else {"HF_HUB_DISABLE_UPDATE_CHECK": "1"})
    root = Path(__file__).resolve().parents[2]
    command = [sys.executable, "app.py", *args]
    return subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=120)


def test_a_bad_backend_url_is_one_line_and_exit_2() -> None:
    result = run_app("--backend-url", "ftp://h", offline=True)
    assert result.returncode == 2
    assert result.stderr == (
        "optdemo: --backend-url: the endpoint URL must start with http:// or https:// and name a host, "
        "got 'ftp://h'\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize("offline", [False, True])
def test_public_mode_with_an_unreachable_endpoint_stops_with_the_reason(offline: bool) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = ("--lock-config", "--backend-url", url, "--backend-model", "m", "--port", "7")
    result = run_app(*flags, offline=offline)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    reason = (
        "HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) is set"
        if offline
        else f"cannot reach the serving endpoint at http://127.0.0.1:{port} (connection refused)"
    )
    expected = f"optdemo: public mode needs a serving endpoint, and it could not be reached: {reason}"
    assert last.startswith(expected), last
    assert "Traceback" not in result.stderr and "Running on" not in result.stdout
