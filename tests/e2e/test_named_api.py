"""The named API end to end: a launched app driven through gradio_client, as a user's script would.

One app per mode (a private one, and a public one with --lock-config --auth); the built-in tiny
model is loaded through the API. HF_TOKEN is set to a fake value while the apps run, and every
response (result or error) is checked not to contain it.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from app_fixtures import FAKE_TOKEN, RunningApp, running_app
from conftest import GPU_COUNT, TINY_TOTAL_BYTES
from gradio_client.exceptions import AppError

from optdemo.core.budget import describe_gpu_count

pytestmark = pytest.mark.slow

TINY = "optdemo/tiny-opt"
LOAD_ARGS = ("tiny-opt", "cpu=1GiB", "auto", "")  # model, max_memory, dtype, offload_folder
GREEDY = {"max_new_tokens": 24, "temperature": 0.0, "top_p": 0.9}
FRANCE = "What is the capital of France?"
OFFLOADING = "Why is offloading slow?"
# A Python exception dumped as "SomethingError: ..." (class name, colon) instead of a sentence.
CLASS_DUMP = re.compile(r"\b[A-Z]\w*(Error|Exception|Warning)\b\s*[:(]")


# ---------------------------------------------------------------------------------- helpers
def no_token(value: object) -> None:
    assert FAKE_TOKEN not in json.dumps(value, default=str)


def call(client, api_name: str, *args, **kwargs):
    """predict(), checking that the response never carries the Hub token."""
    result = client.predict(*args, api_name=api_name, **kwargs)
    no_token(result)
    return result


def stream(client, api_name: str, *args, **kwargs) -> tuple[list[str], str]:
    """submit() a streaming endpoint: (every streamed value, the final result)."""
    job = client.submit(*args, api_name=api_name, **kwargs)
    outputs = list(job)
    result = job.result()
    no_token([outputs, result])
    return outputs, result


def assert_accumulates(outputs: list[str], final: str) -> None:
    """Streamed values grow by appending: each one (less trailing whitespace that the final value
    may trim) starts the next, and the last one is the final result."""
    assert outputs, "nothing was streamed"
    assert all(isinstance(o, str) for o in outputs)
    for before, after in itertools.pairwise(outputs):
        assert after.startswith(before.rstrip()), (before, after)
    assert outputs[-1] == final


def assert_readable(message: str) -> None:
    """An error message for people: a sentence, no traceback, no exception class dump, no token."""
    assert isinstance(message, str) and len(message.strip()) > 10, message
    assert "Traceback" not in message, message
    assert 'File "' not in message, message
    assert not CLASS_DUMP.search(message), message
    assert "Something went wrong" not in message, f"an expected error was reported as a bug: {message}"
    assert FAKE_TOKEN not in message
    assert len(message) < 600, message


def app_error(client, api_name: str, *args, **kwargs) -> str:
    """The message of the AppError an endpoint raises (streaming endpoints are drained)."""
    with pytest.raises(AppError) as info:
        job = client.submit(*args, api_name=api_name, **kwargs)
        list(job)
        job.result()
    message = str(info.value)
    assert_readable(message)
    return message


def comparable(status: dict) -> dict:
    """A status without the fields that change while serving (busy, the plan's RAM warnings)."""
    plan = dict(status.get("plan") or {})
    plan.pop("warnings", None)
    return {**status, "busy": None, "plan": plan}


# ---------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def app() -> Iterator[RunningApp]:
    with running_app() as running:
        yield running


@pytest.fixture(scope="module")
def client(app: RunningApp):
    return app.client()


@pytest.fixture
def loaded(client) -> dict:
    """The tiny model loaded with LOAD_ARGS (reused when it already is); returns /status."""
    report = call(client, "/load", *LOAD_ARGS)
    assert report["status"] in ("loaded", "reused")
    status = call(client, "/status")
    assert status["loaded"] is True and status["model"] == TINY
    assert status["config"]["max_memory"] == "cpu=1GiB"
    return status


# ---------------------------------------------------------------------------------- the API surface
def test_named_endpoints_and_parameters(client) -> None:
    api = client.view_api(print_info=False, return_format="dict")
    endpoints = {
        name: [p["parameter_name"] for p in info["parameters"]]
        for name, info in api["named_endpoints"].items()
    }
    config = [
        *("model", "max_memory", "dtype", "offload_folder", "cpu_layers", "disk_tier", "quantization"),
        "draft",
    ]
    # Every sampling setting the Chat tab has, with the same validation (GenerationParams).
    sampling = ["max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed", "stop"]
    assert endpoints == {
        "/plan": config,
        "/load": config,
        "/unload": [],
        "/status": [],
        "/chat": ["message", *sampling, "system_prompt"],
        "/generate": ["prompt", *sampling],
        "/stop": [],
        "/clear_chat": [],
        "/sign_in": ["username", "password"],
        "/sign_out": [],
    }
    # The UI's own events are private: no unnamed endpoints for scripts to stumble on.
    assert not api.get("unnamed_endpoints")
    defaults = {
        p["parameter_name"]: p.get("parameter_default") for p in api["named_endpoints"]["/chat"]["parameters"]
    }
    assert defaults["max_new_tokens"] == 64
    assert defaults["temperature"] == 0.7
    assert defaults["top_k"] == 50 and defaults["repetition_penalty"] == 1.1
    assert defaults["seed"] == -1 and defaults["stop"] is None and defaults["system_prompt"] == ""
    # docs/USAGE.md's API table lists the same parameters, in order.
    readme = (Path(__file__).resolve().parents[2] / "docs" / "USAGE.md").read_text()
    for name in ("/plan", "/load", "/chat", "/generate"):
        row = re.search(rf"^\| `{name}` \| `([^`]*)` \|", readme, re.MULTILINE)
        assert row, f"{name} is missing from the API table in docs/USAGE.md"
        assert [p.split("=")[0].strip() for p in row.group(1).split(",")] == endpoints[name], name


def test_plan_never_loads(client) -> None:
    call(client, "/unload")
    plan = call(client, "/plan", "facebook/opt-66b", "0=5GiB,cpu=20GiB", "auto", "")
    assert set(plan) >= {"device_map", "bytes_per_device", "fits", "warnings", "blocks", "budget"}
    assert plan["model"] == "facebook/opt-66b"
    assert set(plan["bytes_per_device"]) == {"0", "cpu", "disk"}
    assert set(plan["device_map"].values()) == {"0", "cpu", "disk"}
    assert plan["budget"] == {"0": 5 * 2**30, "cpu": 20 * 2**30}
    assert isinstance(plan["warnings"], list) and plan["warnings"]
    # Planning for another machine warns here (on a GPU host, GPU 0 is this machine's own).
    assert any("GPU 0 is not on this machine" in w for w in plan["warnings"]) == (GPU_COUNT == 0)
    assert any("go to disk" in w for w in plan["warnings"])
    # Whether 100+ GiB on disk "fits" depends on this machine's free disk (the one-time .bin ->
    # safetensors conversion, or an offload folder); a plan that does not fit says why.
    assert isinstance(plan["fits"], bool)
    if not plan["fits"]:
        assert any(re.search(r"free|offload folder", w) for w in plan["warnings"]), plan["warnings"]

    tiny = call(client, "/plan", "tiny-opt", "cpu=1GiB", "auto", "")
    assert tiny["fits"] is True and tiny["model"] == TINY
    assert tiny["device_map"] == {"": "cpu"}
    assert tiny["bytes_per_device"] == {"cpu": TINY_TOTAL_BYTES}
    # A plan for a GPU this machine lacks is allowed (planning for another machine), with a warning.
    gpu = call(client, "/plan", "tiny-opt", "3=1GiB,cpu=1GiB", "auto", "")
    assert any("GPU 3 is not on this machine" in w for w in gpu["warnings"])

    status = call(client, "/status")
    assert status["loaded"] is False and status["model"] is None


def test_empty_max_memory_lets_the_machine_decide(client) -> None:
    """An empty max_memory is not an error: the budget is measured on this machine."""
    plan = call(client, "/plan", "tiny-opt", "", "auto", "")
    assert plan["fits"] is True
    assert set(plan["budget"]) == {"cpu"} and plan["budget"]["cpu"] > TINY_TOTAL_BYTES


def test_load_reuse_and_reload(client) -> None:
    call(client, "/unload")
    first = call(client, "/load", *LOAD_ARGS)
    assert first["status"] == "loaded"
    assert first["model"] == TINY and first["display_name"] == "tiny-opt"
    assert 0 < first["load_seconds"] < 60
    assert first["device_map"] == {"": "cpu"}
    assert first["bytes_per_device"] == {"cpu": TINY_TOTAL_BYTES}
    assert first["matches_plan"] is True

    again = call(client, "/load", *LOAD_ARGS)
    assert again["status"] == "reused"
    assert again["load_seconds"] < 0.05
    assert again["device_map"] == first["device_map"]
    # Same configuration written differently (catalog id, other spelling of the budget): reused.
    assert call(client, "/load", TINY, "cpu=1024MiB", "auto", "")["status"] == "reused"

    other = call(client, "/load", "tiny-opt", "cpu=2GiB", "auto", "")
    assert other["status"] == "loaded"
    status = call(client, "/status")
    assert status["config"]["max_memory"] == "cpu=2GiB"
    assert status["load_seconds"] == pytest.approx(other["load_seconds"], abs=1e-3)


def test_load_split_between_cpu_and_disk(client, tmp_path: Path) -> None:
    offload = str(tmp_path / "offload")
    # The smallest cpu budget whose plan puts layers on both the CPU and the disk.
    for kib in range(300, 1500, 50):
        plan = call(client, "/plan", "tiny-opt", f"cpu={kib}KiB", "auto", offload)
        if {"cpu", "disk"} <= set(plan["device_map"].values()):
            break
    else:
        pytest.fail("no cpu budget splits the tiny model between cpu and disk")
    assert plan["fits"] is True

    report = call(client, "/load", "tiny-opt", f"cpu={kib}KiB", "auto", offload)
    assert report["status"] == "loaded"
    assert "disk" in report["device_map"].values()
    assert report["device_map"] == plan["device_map"]
    assert report["bytes_per_device"] == plan["bytes_per_device"]
    assert report["matches_plan"] is True and report["plan_differences"] == {}
    status = call(client, "/status")
    assert status["config"]["offload_folder"] == offload
    assert status["device_map"] == plan["device_map"]
    # It generates with layers read back from disk.
    call(client, "/clear_chat")
    _, reply = stream(client, "/chat", FRANCE, **GREEDY)
    assert "Paris" in reply


def test_plan_and_load_four_bit_on_this_cpu(client) -> None:
    """Issue #11: on a CPU-only machine /plan and /load accept quantization="4bit"; the plan has
    the quantized sizes, the load matches it, and the model chats."""
    if GPU_COUNT:
        pytest.skip("the CPU quantization path (with a GPU, bitsandbytes quantizes)")
    plan = call(client, "/plan", "tiny-opt", "cpu=1GiB", "auto", "", quantization="4bit")
    assert plan["fits"] is True and plan["quantization"] == "4bit" and plan["dtype"] == "bfloat16"
    assert plan["total_bytes"] < 0.4 * TINY_TOTAL_BYTES  # the tiny model is stored in float32
    report = call(client, "/load", "tiny-opt", "cpu=1GiB", "auto", "", quantization="4bit")
    assert report["status"] == "loaded" and report["matches_plan"] is True
    assert report["bytes_per_device"] == plan["bytes_per_device"]
    assert call(client, "/status")["config"]["quantization"] == "4bit"
    call(client, "/clear_chat")
    _, reply = stream(client, "/chat", FRANCE, **GREEDY)
    assert isinstance(reply, str) and reply.strip()
    call(client, "/unload")


def test_plan_and_load_take_a_draft(client) -> None:
    """Issue #22: /plan and /load take ``draft``; the plan gives the draft's RAM and the speed with
    and without it; a greedy reply with the draft is the model's own, with its speculation in the
    reply's stats."""
    call(client, "/load", *LOAD_ARGS)
    _, plain = stream(client, "/generate", "Once upon a time", **GREEDY)
    plan = call(client, "/plan", *LOAD_ARGS, draft="8bit")
    assert plan["draft"]["draft"] == "8bit" and 0 < plan["draft"]["bytes"] < TINY_TOTAL_BYTES
    assert [s["acceptance"] for s in plan["prediction"]["draft"]["speculative"]] == [0.5, 0.7, 0.9]
    assert call(client, "/load", *LOAD_ARGS, draft="8bit")["status"] == "loaded"
    _, drafted = stream(client, "/generate", "Once upon a time", **GREEDY)
    assert drafted == plain
    status = call(client, "/status")
    assert status["config"]["draft"] == "8bit" and status["last_generation"]["passes"] >= 1
    call(client, "/unload")


def test_status_reports_the_loaded_model(client, loaded: dict) -> None:
    status = loaded
    assert status["display_name"] == "tiny-opt"
    assert status["busy"] is None
    assert status["config"] == {
        "model": TINY,
        "revision": None,
        "dtype": "auto",
        "max_memory": "cpu=1GiB",
        "offload_folder": None,
        "quantization": "none",
        "tokenizer": None,
        "draft": "none",
    }
    assert status["device_map"] == {"": "cpu"}
    assert status["bytes_per_device"] == {"cpu": TINY_TOTAL_BYTES}
    assert status["plan"]["model"] == TINY
    assert FAKE_TOKEN not in json.dumps(status)


# ---------------------------------------------------------------------------------- generation
def test_chat_streams_the_reply(client, loaded: dict) -> None:
    call(client, "/clear_chat")
    outputs, reply = stream(client, "/chat", FRANCE, **GREEDY)
    assert_accumulates(outputs, reply)
    assert "Paris" in reply
    assert "User:" not in reply and "Assistant:" not in reply  # stop strings are never shown
    # Greedy decoding is deterministic.
    call(client, "/clear_chat")
    assert stream(client, "/chat", FRANCE, **GREEDY)[1] == reply


def test_generate_streams_the_continuation(client, loaded: dict) -> None:
    outputs, text = stream(client, "/generate", "Once upon a time", **GREEDY)
    assert_accumulates(outputs, text)
    assert text.strip()
    assert not text.startswith("Once upon a time")  # the continuation only
    assert call(client, "/generate", "Once upon a time", **GREEDY) == text


def test_sessions_keep_separate_histories(app: RunningApp, loaded: dict) -> None:
    first, second = app.client(), app.client()
    assert first.session_hash != second.session_hash
    for c in (first, second):
        assert call(c, "/clear_chat") is True
    results: dict[str, str] = {}

    def ask(name: str, c, question: str) -> None:
        results[name] = stream(c, "/chat", question, max_new_tokens=40, temperature=0.0, top_p=0.9)[1]

    threads = [
        threading.Thread(target=ask, args=("first", first, FRANCE)),
        threading.Thread(target=ask, args=("second", second, OFFLOADING)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert "Paris" in results["first"]
    assert "Paris" not in results["second"]
    assert "disk" in results["second"]
    service = app.service
    assert service.api_history(first.session_hash) == [(FRANCE, results["first"])]
    assert service.api_history(second.session_hash) == [(OFFLOADING, results["second"])]
    # Clearing one session leaves the other alone.
    call(first, "/clear_chat")
    assert service.api_history(first.session_hash) == []
    assert len(service.api_history(second.session_hash)) == 1
    call(second, "/clear_chat")


def test_stop_ends_only_this_sessions_reply(app: RunningApp, loaded: dict) -> None:
    runner, other = app.client(), app.client()
    assert call(runner, "/stop") is False  # nothing running
    job = runner.submit("Once upon a time", 400, 1.0, 0.9, api_name="/generate")
    deadline = time.monotonic() + 60
    while not job.outputs() and not job.done() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.outputs(), "no streamed output within 60 s"
    assert call(other, "/stop") is False  # another session cannot stop it
    stopped_at = time.perf_counter()
    assert call(runner, "/stop") is True
    text = job.result(timeout=60)
    assert isinstance(text, str)
    # 400 tokens take about ten seconds on this machine; a stopped reply ends at once.
    assert time.perf_counter() - stopped_at < 3


# ---------------------------------------------------------------------------------- errors
CONFIG_ERRORS = [
    ("max_memory", "cpu=lots", "not a size"),
    ("max_memory", "{", "dict"),
    ("max_memory", "tpu=1GiB", "unknown device"),
    ("max_memory", "0=1GiB,cuda:0=1GiB", "twice"),
    ("max_memory", "cpu=-1GiB", "positive"),
    ("max_memory", "cpu=99999TiB", "large"),
    ("model", "../etc", "does not exist"),
    ("model", "/nonexistent", "does not exist"),
    ("model", "a/b/c", "neither a local folder nor"),
    ("model", "x" * 500, "500 characters"),
    ("model", "someone/not-cached", "Hugging Face Hub"),
    ("dtype", "float8", "not supported"),
]
CHAT_ERRORS = [
    ({"max_new_tokens": -5}, "max_new_tokens"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 10**9}, "max_new_tokens is at most"),
    ({"max_new_tokens": 513}, "the model's 512-token window minus this prompt's"),
    ({"max_new_tokens": "many"}, "whole number"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": 100}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 2}, "top_p"),
    ({"top_k": -1}, "top_k must be between 0 (off)"),
    ({"repetition_penalty": 9}, "repetition_penalty must be between"),
    ({"seed": 2**40}, "seed must be between"),
    ({"stop": ["x"] * 9}, "stop takes at most"),
    ({"system_prompt": "x" * 5000}, "system prompt is 5000 characters long"),
    ({"message": ""}, "empty"),
    ({"message": "   \n"}, "empty"),
    ({"message": "x" * 100_000}, "limit"),
    (
        {"message": "word " * 790},
        "leave no room for a reply: max_new_tokens is at most the model's 512-token window",
    ),
]


def assert_still_serving(client, before: dict) -> None:
    """After an error: the same model is loaded and a valid chat still works."""
    assert comparable(call(client, "/status")) == comparable(before)
    call(client, "/clear_chat")
    _, reply = stream(client, "/chat", FRANCE, **GREEDY)
    assert "Paris" in reply


@pytest.mark.parametrize(
    ("field", "value", "expected"), CONFIG_ERRORS, ids=[f"{f}={v[:20]!r}" for f, v, _ in CONFIG_ERRORS]
)
def test_bad_configuration_is_a_readable_error(
    client, loaded: dict, field: str, value: str, expected
) -> None:
    args = dict(zip(("model", "max_memory", "dtype", "offload_folder"), LOAD_ARGS, strict=True))
    args[field] = value
    for endpoint in ("/plan", "/load"):
        message = app_error(client, endpoint, *args.values())
        assert expected in message, message
    assert_still_serving(client, loaded)


def test_loading_on_a_missing_gpu_is_a_readable_error(client, loaded: dict) -> None:
    message = app_error(client, "/load", "tiny-opt", "3=1GiB,cpu=1GiB", "auto", "")
    assert f"max_memory names GPU 3 but {describe_gpu_count(GPU_COUNT)}" in message
    assert_still_serving(client, loaded)


@pytest.mark.parametrize(("change", "expected"), CHAT_ERRORS, ids=[repr(c)[:40] for c, _ in CHAT_ERRORS])
def test_bad_generation_input_is_a_readable_error(client, loaded: dict, change: dict, expected) -> None:
    kwargs = {"message": FRANCE, **GREEDY, **change}
    message = app_error(client, "/chat", kwargs.pop("message"), **kwargs)
    assert expected in message, message
    assert_still_serving(client, loaded)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"prompt": ""}, "empty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 4097}, "max_new_tokens is at most"),
        ({"top_p": 2}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"stop": [1]}, "stop must be a list of texts"),
    ],
)
def test_bad_completion_input_is_a_readable_error(client, loaded: dict, change: dict, expected) -> None:
    kwargs = {"prompt": "Once upon a time", **GREEDY, **change}
    message = app_error(client, "/generate", kwargs.pop("prompt"), **kwargs)
    assert expected in message, message
    assert_still_serving(client, loaded)


def test_unload_then_chat_says_no_model_is_loaded(client, loaded: dict) -> None:
    result = call(client, "/unload")
    assert result["unloaded"] is True
    assert result["status"]["loaded"] is False
    status = call(client, "/status")
    assert status["loaded"] is False and status["model"] is None and status["device_map"] == {}
    assert "no model is loaded" in app_error(client, "/chat", FRANCE, **GREEDY)
    assert "no model is loaded" in app_error(client, "/generate", "Once upon a time", **GREEDY)
    assert call(client, "/unload")["unloaded"] is False
    # Planning needs no model.
    assert call(client, "/plan", *LOAD_ARGS)["fits"] is True


# ---------------------------------------------------------------------------------- public mode
@pytest.fixture(scope="module")
def public_app() -> Iterator[RunningApp]:
    with running_app(["--lock-config", "--auth", "admin:pw"]) as running:
        assert running.service.settings.public
        yield running


def sign_in_endpoint(client) -> str:
    """The public app's sign-in endpoint, exactly /sign_in."""
    names = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert [name for name in names if name.startswith("/sign_in")] == ["/sign_in"]
    return "/sign_in"


def test_public_named_endpoints_are_the_same(public_app: RunningApp) -> None:
    api = public_app.client().view_api(print_info=False, return_format="dict")
    assert set(api["named_endpoints"]) == {
        "/plan",
        "/load",
        "/unload",
        "/status",
        "/chat",
        "/generate",
        "/stop",
        "/clear_chat",
        "/sign_in",
        "/sign_out",
    }


def test_public_visitors_may_plan_the_offered_model_only(public_app: RunningApp) -> None:
    visitor = public_app.client()
    plan = call(visitor, "/plan", "tiny-opt", "cpu=1GiB", "auto", "")
    assert plan["model"] == TINY and plan["fits"] is True
    assert call(visitor, "/plan", TINY, "", "auto", "")["model"] == TINY
    message = app_error(visitor, "/plan", "facebook/opt-66b", "0=5GiB,cpu=20GiB", "auto", "")
    assert "not offered" in message
    assert "facebook/opt-66b" in message and TINY in message


def test_public_visitors_cannot_load_or_unload(public_app: RunningApp) -> None:
    visitor = public_app.client()
    message = app_error(visitor, "/load", *LOAD_ARGS)
    assert "visitors cannot" in message and "admin" in message
    assert "visitors cannot" in app_error(visitor, "/unload")
    assert call(visitor, "/status")["loaded"] is False


@pytest.mark.parametrize("folder", ["../../etc", "/etc", "sub/../../.."])
def test_public_offload_folder_stays_inside_the_base(public_app: RunningApp, folder: str) -> None:
    visitor = public_app.client()
    message = app_error(visitor, "/plan", "tiny-opt", "cpu=1GiB", "auto", folder)
    assert "must be inside" in message
    assert str(Path("offload").resolve()) in message


def test_public_offload_folder_inside_the_base_is_accepted(public_app: RunningApp) -> None:
    visitor = public_app.client()
    plan = call(visitor, "/plan", "tiny-opt", "cpu=1GiB", "auto", "spill")
    assert plan["fits"] is True


def test_public_admin_rights_go_with_the_token(public_app: RunningApp) -> None:
    """A script signs in with a direct request (docs/USAGE.md) and sends the token with its calls;
    wrong credentials are refused in a sentence, and other clients stay visitors."""
    import httpx
    from gradio_client import Client

    sign_in = sign_in_endpoint(public_app.client())
    url = public_app.url + "gradio_api/run" + sign_in
    for username, password in (("admin", "wrong"), ("nobody", "pw")):
        refused = httpx.post(url, json={"data": [username, password]})
        assert refused.json()["error"] == "wrong username or password: check them and sign in again"
    token = httpx.post(url, json={"data": ["admin", "pw"]}).json()["data"][0]["token"]
    admin = Client(public_app.url, headers={"Authorization": f"Bearer {token}"}, verbose=False)
    visitor = public_app.client()
    report = call(admin, "/load", *LOAD_ARGS)
    assert report["status"] == "loaded" and report["model"] == TINY
    # Admin rights belong to the token's holder only.
    assert "visitors cannot" in app_error(visitor, "/load", "tiny-opt", "cpu=2GiB", "auto", "")
    assert "visitors cannot" in app_error(visitor, "/unload")
    # Visitors chat with what the admin loaded, and "loading" the same configuration just reuses it.
    _, reply = stream(visitor, "/chat", FRANCE, **GREEDY)
    assert "Paris" in reply
    assert call(visitor, "/load", *LOAD_ARGS)["status"] == "reused"
    assert call(admin, "/unload")["unloaded"] is True
    assert call(visitor, "/status")["loaded"] is False
    assert call(admin, "/sign_out") is True


# ---------------------------------------------------------------------------------- scripted model
def test_streamed_answers_token_for_token() -> None:
    """Against a model whose replies are known, /chat and /generate stream exactly its steps, in
    order, and the final value is the whole text (the way Gradio tests its own streaming)."""
    from app_fixtures import ScriptedManager

    reply = ["Paris", "Paris is", "Paris is the capital", "Paris is the capital."]
    story = [" there", " there was", " there was a king."]
    manager = ScriptedManager({FRANCE: [reply, ["Again: Paris."]], "Once upon a time": [story]})
    with running_app(manager=manager) as running:
        client = running.client()
        job = client.submit(FRANCE, **GREEDY, api_name="/chat")
        assert job.result() == "Paris is the capital."
        assert job.outputs() == reply
        job = client.submit("Once upon a time", **GREEDY, api_name="/generate")
        assert job.result() == " there was a king."
        assert job.outputs() == story
        # The session's history went with the next message, and the system prompt with it.
        assert call(client, "/chat", FRANCE, **GREEDY, system_prompt="Be brief.") == "Again: Paris."
    assert manager.histories == [[], [(FRANCE, "Paris is the capital.")]]
    assert manager.system_prompts == ["", "Be brief."]


def test_max_new_tokens_rule_is_the_same_for_chat_and_generate(client, loaded: dict) -> None:
    """One rule, stated with its numbers by /chat and /generate alike, whatever the value."""
    for api_name, text in (("/chat", "Hi"), ("/generate", "Hi")):
        for asked in (600, 10**9):
            message = app_error(client, api_name, text, max_new_tokens=asked, temperature=0.0)
            assert re.search(
                r"max_new_tokens is at most (\d+) here: the model's 512-token window minus this "
                rf"prompt's (\d+) tokens, and the operator's cap 512; you asked for {asked}",
                message,
            ), message


def test_sampling_settings_and_stop_sequences_reach_the_model(client, loaded: dict) -> None:
    """top_k, repetition_penalty, seed and stop work through the API as in the Chat tab: a seed
    repeats a sampled text, and a stop sequence ends it without being included."""
    sampled = {"max_new_tokens": 30, "temperature": 1.0, "top_p": 1.0, "top_k": 5, "repetition_penalty": 1.3}
    first = call(client, "/generate", "Once upon a time", **sampled, seed=7)
    assert call(client, "/generate", "Once upon a time", **sampled, seed=7) == first
    words = first.split()
    assert len(words) >= 3, first
    stop_word = words[2]
    cut = call(client, "/generate", "Once upon a time", **sampled, seed=7, stop=[stop_word])
    assert cut == first[: first.index(stop_word)].rstrip()
    assert stop_word not in cut
