"""The OpenAI-compatible API (/v1) end to end, with the official ``openai`` client and with
``huggingface_hub.InferenceClient``, against a launched app; plus its wire format as plain logic.

A scripted model (known replies, token for token) checks the format exactly; the built-in tiny
model checks the real path: the same text as the app's own chat, streamed or not.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from app_fixtures import ScriptedManager, running_app

from optdemo.app.openai_format import (
    Deltas,
    OpenAIError,
    StopCutter,
    finish_reason,
    parse_chat,
    parse_completion,
)
from optdemo.app.settings import parse_settings
from optdemo.core.generation import GenerationParams
from optdemo.core.load_config import LoadConfig
from optdemo.runtime.status import ModelStatus

SCRIPTED = "optdemo/scripted"
SCRIPT = {
    "hi": [["Hel", "Hello wor", "Hello world!"]] * 6,
    "Once": [[" upon", " upon a", " upon a time"]] * 4,
    "stop here": [["abc STOP", "abc STOP def", "abc STOP def ghi"]] * 2,
    "long": [["one", "one two", "one two three", "one two three four"]] * 2,
}


class LoadedScript(ScriptedManager):
    """A scripted model that says it is loaded (as ``optdemo/scripted``) and keeps each reply's
    stop event, so a test can see a reply told to stop. With ``until_stopped`` a reply waits
    after its first step until it is told to stop (10 s at most)."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        super().__init__(script)
        self.stop_events: list[threading.Event | None] = []
        self.until_stopped = False

    def status(self) -> ModelStatus:
        return ModelStatus(LoadConfig(model=SCRIPTED))

    def stream_completion(self, prompt, params, stop_event=None, *args, **kwargs):
        self.stop_events.append(stop_event)
        if self.until_stopped:
            self.pause = stop_event
        yield from super().stream_completion(prompt, params, stop_event, *args, **kwargs)


def client(app, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=app.url + "v1", api_key=key, max_retries=0)


# ---------------------------------------------------------------------------------- wire format
def test_messages_become_history_and_message() -> None:
    req = parse_chat(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": [{"type": "text", "text": "c"}]},
                {"role": "user", "content": "d"},
            ],
            "stop": "X",
            "max_completion_tokens": 7,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        max_chars=100,
    )
    assert req.history == (("a", "b"),)
    assert req.message == "c\nd"
    assert req.system == "Be brief."
    assert (req.sampling.stop, req.sampling.max_tokens, req.stream, req.include_usage) == (
        ("X",),
        7,
        True,
        True,
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}], "n": 2}, "n"),
        ({"messages": [{"role": "user", "content": "a"}], "stop": ["1", "2", "3", "4", "5"]}, "stop"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * 101}]}, "messages[0]"),
        ({"messages": [{"role": "tool", "content": "a"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": "a"}], "tools": [{"type": "function"}]}, "tools"),
    ],
)
def test_malformed_chat_requests_name_the_field(body: dict, param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        parse_chat(body, max_chars=100)
    assert info.value.status == 400 and info.value.param == param
    assert info.value.to_dict()["error"]["type"] == "invalid_request_error"


def test_user_messages_in_a_row_are_one_message_under_the_same_limit() -> None:
    """Consecutive user messages become one, so their sum is held to the message limit as it
    grows: a long run of them is refused where it passes the limit, never joined in full first."""
    with pytest.raises(OpenAIError) as info:
        parse_chat({"messages": [{"role": "user", "content": "x" * 60}] * 1000}, max_chars=100)
    assert info.value.param == "messages[1]"
    assert info.value.message == (
        "messages[1] makes the user's message 121 characters long (user messages in a row are "
        "one message); the limit here is 100"
    )
    assert parse_chat({"messages": [{"role": "user", "content": "x" * 49}] * 2}, 100).message == (
        "x" * 49 + "\n" + "x" * 49
    )


def test_completion_prompt_is_one_text() -> None:
    assert parse_completion({"prompt": ["Once"]}).prompt == "Once"
    with pytest.raises(OpenAIError, match="one text"):
        parse_completion({"prompt": ["a", "b"]})


def test_deltas_add_up_to_the_final_text() -> None:
    deltas = Deltas()
    pieces = [deltas.step(t) for t in ("Hel", "Hello ", "Hello wor")] + [
        deltas.step("Hello world", final=True)
    ]
    assert pieces == ["Hel", "lo", " wor", "ld"]
    assert "".join(pieces) == "Hello world"


def test_stop_cutter_holds_back_a_partial_stop_and_cuts_at_a_whole_one() -> None:
    cutter = StopCutter(["STOP"])
    assert cutter.visible("abc ST") == "abc "
    assert not cutter.hit
    assert cutter.visible("abc STOP d") == "abc"
    assert cutter.hit and cutter.visible("abc STOP def", final=True) == "abc"


def test_finish_reason() -> None:
    from optdemo.core.generation import GenerationStats

    stats = GenerationStats(3, 5, 0.1, 0.2, 10.0)
    assert finish_reason(stats, 5, False) == "length"
    assert finish_reason(stats, 6, False) == "stop"
    assert finish_reason(stats, 5, True) == "stop"


def test_flags_and_environment_variables() -> None:
    settings = parse_settings(
        [], env={"OPTDEMO_API_KEY": "k-123", "OPTDEMO_OPENAI_API": "1", "OPTDEMO_MCP": "yes"}
    )
    assert (settings.api_key, settings.openai_api, settings.mcp) == ("k-123", True, True)
    assert "k-123" not in repr(settings)  # the key never shows up in logs
    assert parse_settings(["--api-key", "flag"], env={"OPTDEMO_API_KEY": "env"}).api_key == "flag"
    assert parse_settings([], env={}).openai_api_enabled  # on at the user's own machine
    assert not parse_settings(["--share"], env={}).openai_api_enabled  # off in public mode...
    assert parse_settings(["--share", "--openai-api"], env={}).openai_api_enabled  # ...unless turned on


# ---------------------------------------------------------------------------------- scripted app
@pytest.fixture(scope="module")
def scripted():
    manager = LoadedScript(SCRIPT)
    with running_app(manager=manager) as app:
        yield app


@pytest.mark.slow
def test_models_lists_the_loaded_model(scripted) -> None:
    models = client(scripted).models.list()
    assert [m.id for m in models.data] == [SCRIPTED]
    assert models.data[0].owned_by == "optdemo"


@pytest.mark.slow
def test_chat_completion_without_streaming(scripted) -> None:
    reply = client(scripted).chat.completions.create(
        model=SCRIPTED,
        messages=[
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "earlier"},
            {"role": "assistant", "content": "answer"},
            {"role": "user", "content": "hi"},
        ],
        max_tokens=20,
        temperature=0,
    )
    # The system message is the model's system prompt, not words put into the user's first turn.
    assert scripted.service.manager.system_prompts[-1] == "Answer in French."
    assert reply.object == "chat.completion" and reply.model == SCRIPTED
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == "Hello world!"
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == (3, 3, 6)
    assert scripted.service.manager.histories[-1] == [("earlier", "answer")]


@pytest.mark.slow
def test_chat_completion_streams_token_by_token(scripted) -> None:
    stream = client(scripted).chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert pieces == ["Hel", "lo wor", "ld!"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert all(c.object == "chat.completion.chunk" for c in chunks)


@pytest.mark.slow
def test_completions_streamed_and_not(scripted) -> None:
    api = client(scripted)
    reply = api.completions.create(model=SCRIPTED, prompt="Once", max_tokens=3)
    assert reply.choices[0].text == " upon a time"
    assert reply.choices[0].finish_reason == "length"  # three tokens of three allowed
    pieces = [c.choices[0].text for c in api.completions.create(model=SCRIPTED, prompt="Once", stream=True)]
    assert "".join(pieces) == " upon a time"
    assert pieces[:3] == [" upon", " a", " time"]


@pytest.mark.slow
def test_stop_sequence_ends_the_reply(scripted) -> None:
    api = client(scripted)
    scripted.service.manager.until_stopped = True  # the reply goes on until it is told to stop
    reply = api.chat.completions.create(
        model=SCRIPTED, messages=[{"role": "user", "content": "stop here"}], stop=["STOP"]
    )
    assert reply.choices[0].message.content == "abc"
    assert reply.choices[0].finish_reason == "stop"
    # The reply was told to stop at the sequence: it ended after two steps of three, not after 10 s.
    assert scripted.service.manager.stop_events[-1].is_set()
    assert reply.usage.completion_tokens == 2
    stream = api.chat.completions.create(
        model=SCRIPTED, messages=[{"role": "user", "content": "stop here"}], stop="STOP", stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "abc"
    scripted.service.manager.until_stopped = False


@pytest.mark.slow
def test_errors_are_openai_shaped(scripted) -> None:
    api = client(scripted)
    with pytest.raises(openai.NotFoundError) as info:
        api.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["code"] == "model_not_found" and SCRIPTED in info.value.body["message"]
    # The service's caps and validation apply, as in the UI.
    with pytest.raises(openai.BadRequestError, match="max_new_tokens is at most 511 here"):
        api.chat.completions.create(
            messages=[{"role": "user", "content": "hi"}], max_tokens=1000, model="default"
        )
    with pytest.raises(openai.BadRequestError, match="characters long; the limit here is 4000"):
        api.completions.create(model=SCRIPTED, prompt="x" * 4001)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        api.completions.create(model=SCRIPTED, prompt="Once", temperature=9)
    raw = httpx.post(scripted.url + "v1/chat/completions", content=b"{not json")
    assert raw.status_code == 400
    assert set(raw.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.slow
@pytest.mark.parametrize("stop", [True, 5, 1.5, {"STOP": 1}, "x" * 500])
def test_a_bad_stop_is_a_400_naming_stop_not_a_500(scripted, stop: object) -> None:
    for route, body in (
        ("chat/completions", {"model": SCRIPTED, "messages": [{"role": "user", "content": "hi"}]}),
        ("completions", {"model": SCRIPTED, "prompt": "Once"}),
    ):
        raw = httpx.post(scripted.url + "v1/" + route, json={**body, "stop": stop})
        assert raw.status_code == 400, raw.text
        error = raw.json()["error"]
        assert error["param"] == "stop" and "Traceback" not in raw.text
        assert set(error) == {"message", "type", "param", "code"}


@pytest.mark.slow
def test_unknown_paths_and_wrong_methods_under_v1_are_openai_shaped(scripted) -> None:
    missing = httpx.get(scripted.url + "v1/engines")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "unknown_url" and error["type"] == "invalid_request_error"
    assert "/v1/engines" in error["message"] and "POST /v1/chat/completions" in error["message"]
    assert httpx.post(scripted.url + "v1", json={}).json()["error"]["code"] == "unknown_url"
    for method, route, allowed in (
        ("POST", "models", "GET"),
        ("GET", "chat/completions", "POST"),
        ("DELETE", "completions", "POST"),
    ):
        wrong = httpx.request(method, scripted.url + "v1/" + route)
        assert wrong.status_code == 405, (method, route)
        assert wrong.headers["allow"] == allowed
        error = wrong.json()["error"]
        assert error["code"] == "method_not_allowed" and f"{allowed} /v1/{route}" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client(scripted).files.list()
    # Gradio's own routes are unchanged.
    assert httpx.get(scripted.url + "gradio_api/info").status_code == 200
    assert httpx.get(scripted.url + "no-such-page").json() == {"detail": "Not Found"}


@pytest.mark.slow
def test_lone_surrogates_are_a_400_saying_the_text_is_not_valid_unicode(scripted) -> None:
    for route, body in (
        ("chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}'),
        ("completions", b'{"prompt": "\\udfff Once"}'),
        ("completions", b'{"prompt": "\xed\xa0\x80"}'),  # a surrogate encoded as raw bytes
    ):
        raw = httpx.post(scripted.url + "v1/" + route, content=body)
        assert raw.status_code == 400, raw.text
        assert "not valid Unicode" in raw.json()["error"]["message"]
        assert "TypeError" not in raw.text


@pytest.mark.slow
def test_deeply_nested_json_is_a_400_not_a_500(scripted) -> None:
    raw = httpx.post(scripted.url + "v1/completions", content=b"[" * 100_000 + b"]" * 100_000)
    assert raw.status_code == 400, raw.text
    assert raw.json()["error"]["message"].startswith("the request body must be JSON")


@pytest.mark.slow
def test_unsupported_fields_are_refused_not_ignored(scripted) -> None:
    api = client(scripted)
    hello = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=SCRIPTED, messages=hello, response_format={"type": "json_object"})
    assert info.value.body["param"] == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=SCRIPTED, messages=hello, presence_penalty=1.0)
    assert (
        info.value.body["param"] == "presence_penalty" and "repetition_penalty" in info.value.body["message"]
    )
    with pytest.raises(openai.BadRequestError, match="tool"):
        api.chat.completions.create(
            model=SCRIPTED, messages=hello, tools=[{"type": "function", "function": {"name": "f"}}]
        )
    # The defaults are accepted: plain text, one reply.
    reply = api.chat.completions.create(
        model=SCRIPTED, messages=hello, response_format={"type": "text"}, n=1, frequency_penalty=0
    )
    assert reply.choices[0].message.content == "Hello world!"


@pytest.mark.slow
def test_client_disconnect_stops_generation(scripted) -> None:
    manager = scripted.service.manager
    manager.until_stopped = True  # the reply waits after its first step until told to stop
    try:
        body = {"model": SCRIPTED, "messages": [{"role": "user", "content": "long"}], "stream": True}
        with httpx.stream("POST", scripted.url + "v1/chat/completions", json=body, timeout=10) as response:
            assert response.status_code == 200
            first = next(line for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
        event = manager.stop_events[-1]
        assert event is not None and event.wait(5), "the reply was not told to stop"
    finally:
        manager.until_stopped = False
        manager.pause = None
    # The model is free again: the next request is answered.
    assert (
        client(scripted).completions.create(model=SCRIPTED, prompt="Once").choices[0].text == " upon a time"
    )


@pytest.mark.slow
def test_requests_beyond_the_queue_size_are_refused() -> None:
    manager = LoadedScript(SCRIPT)
    manager.until_stopped = True  # every reply waits after its first step until told to stop
    body = {"model": SCRIPTED, "messages": [{"role": "user", "content": "long"}], "stream": True}
    flags = ["--queue-size", "1", "--max-batch", "1"]  # one reply written, one waiting
    with running_app(flags, manager=manager) as app, httpx.Client(timeout=10) as http:
        url = app.url + "v1/chat/completions"
        with http.stream("POST", url, json=body) as first, http.stream("POST", url, json=body) as second:
            assert (first.status_code, second.status_code) == (200, 200)  # one running, one waiting
            refused = http.post(url, json=body)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "queue_full"
            assert "at most 1" in refused.json()["error"]["message"]
        # Both clients went away: their replies stop, and the queue has room again.
        assert all(event.wait(5) for event in manager.stop_events)
        manager.until_stopped = False
        for _ in range(50):
            hello = {"model": SCRIPTED, "messages": [{"role": "user", "content": "hi"}]}
            if http.post(url, json=hello).status_code == 200:
                break
            time.sleep(0.1)
        else:
            pytest.fail("the queue never had room again")


@pytest.mark.slow
def test_huggingface_hub_inference_client(scripted, monkeypatch: pytest.MonkeyPatch) -> None:
    """InferenceClient refuses every request while offline mode is on (the suite turns it on):
    this test alone turns it off (huggingface_hub reads the variables once, at import)."""
    import huggingface_hub
    from huggingface_hub import InferenceClient

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    hf = InferenceClient(base_url=scripted.url + "v1", api_key="none")
    out = hf.chat_completion(messages=[{"role": "user", "content": "hi"}], max_tokens=20)
    assert out.choices[0].message.content == "Hello world!"
    assert out.usage.completion_tokens == 3
    pieces = [
        c.choices[0].delta.content
        for c in hf.chat_completion(messages=[{"role": "user", "content": "hi"}], stream=True)
    ]
    assert "".join(p or "" for p in pieces) == "Hello world!"


@pytest.mark.slow
def test_conversations_over_the_history_limits_are_400s_that_say_so(scripted) -> None:
    api = client(scripted)
    turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    hi = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError, match="reached the limit of 50 turns here: clear it"):
        api.chat.completions.create(model=SCRIPTED, messages=turn * 50 + hi)
    long = [{"role": "user", "content": "x" * 4000}, {"role": "assistant", "content": "y" * 4000}]
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=SCRIPTED, messages=long * 30 + hi)
    assert info.value.body["message"] == (
        "the earlier turns of this conversation hold more than 200000 characters, the limit here: "
        "clear it (or undo turns) to go on"
    )
    assert info.value.body["type"] == "invalid_request_error"
    assert all(len(history) < 30 for history in scripted.service.manager.histories)  # never reached it


# ---------------------------------------------------------------------------------- access
@pytest.mark.slow
def test_api_key_protects_the_api() -> None:
    with running_app(["--api-key", "s3cret-key"], manager=LoadedScript(SCRIPT)) as app:
        with pytest.raises(openai.AuthenticationError) as info:
            client(app, "wrong").models.list()
        assert info.value.body["code"] == "invalid_api_key"
        assert "s3cret-key" not in json.dumps(info.value.body)
        assert httpx.get(app.url + "v1/models").status_code == 401
        reply = client(app, "s3cret-key").completions.create(model=SCRIPTED, prompt="Once")
        assert reply.choices[0].text == " upon a time"


@pytest.mark.slow
def test_public_mode_turns_the_api_off_unless_the_operator_turns_it_on() -> None:
    with running_app(["--lock-config"], manager=LoadedScript(SCRIPT)) as app:
        assert not app.service.settings.openai_api_enabled
        with pytest.raises(openai.PermissionDeniedError, match="--openai-api"):
            client(app).models.list()
    with running_app(["--lock-config", "--openai-api"], manager=LoadedScript(SCRIPT)) as app:
        assert [m.id for m in client(app).models.list().data] == [SCRIPTED]


@pytest.mark.slow
def test_no_model_loaded_is_a_503_that_says_what_to_do() -> None:
    with running_app() as app:
        with pytest.raises(openai.InternalServerError) as info:
            client(app).chat.completions.create(model="default", messages=[{"role": "user", "content": "hi"}])
        assert info.value.status_code == 503
        assert info.value.body["code"] == "model_not_loaded" and "load" in info.value.body["message"]
        assert client(app).models.list().data == []


# ---------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_tiny_model_streams_what_the_app_chat_says() -> None:
    with running_app() as app:
        service = app.service
        service.load(service.make_config("tiny-opt", "cpu=1GiB"))
        question = "What is the capital of France?"
        params = GenerationParams(max_new_tokens=24, temperature=0.0)
        expected = list(service.chat("in-process", [], question, params))[-1]
        api = client(app)
        messages = [{"role": "user", "content": question}]
        reply = api.chat.completions.create(model="tiny-opt", messages=messages, max_tokens=24, temperature=0)
        assert reply.choices[0].message.content == expected.text
        assert reply.usage.prompt_tokens == expected.stats.prompt_tokens
        assert reply.usage.completion_tokens == expected.stats.new_tokens
        stream = api.chat.completions.create(
            model="optdemo/tiny-opt", messages=messages, max_tokens=24, temperature=0, stream=True
        )
        assert "".join(c.choices[0].delta.content or "" for c in stream) == expected.text
        # A seed makes sampling repeatable.
        sampled = [
            api.completions.create(
                model="default", prompt="Once upon", max_tokens=12, temperature=1.0, seed=7
            )
            for _ in range(2)
        ]
        assert sampled[0].choices[0].text == sampled[1].choices[0].text
