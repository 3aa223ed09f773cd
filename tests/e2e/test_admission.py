"""One admission limit on every route that starts a reply, and Status / Stop answering meanwhile.

A launched app with ``--queue-size 4 --max-batch 2`` holds at most 4 + 2 = 6 replies (running and
waiting); every reply past that is refused at once, whichever way it came: Gradio's queue
(gradio_client, ``/gradio_api/call/``), the OpenAI routes (``/v1``, a 429) or MCP
(``chat_messages``). Gradio's direct route ``/gradio_api/run/<name>`` would skip the queue, so it
is closed to the endpoints that go through it. The model is a fake whose replies hold after their
first step until the test lets them go, so "how many were let in" is an exact count. Everything is
on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from app_fixtures import RunningApp, ScriptedManager, running_app
from gradio_client import Client
from gradio_client.exceptions import AppError
from test_mcp import with_mcp

from optdemo.core.generation import GenerationStats, GenerationUpdate
from optdemo.core.load_config import LoadConfig
from optdemo.runtime.status import ModelStatus

pytestmark = pytest.mark.slow

HELD = "optdemo/held"
QUEUE_SIZE, MAX_BATCH = 4, 2
LIMIT = QUEUE_SIZE + MAX_BATCH  # replies let in at once: those running and those waiting
REFUSAL = f"too many requests are waiting (at most {QUEUE_SIZE} here): try again in a moment"
ANSWER_SECONDS = 2.0  # Status, Stop and the API info answer within this under full load
SETTLE_SECONDS = 20.0  # how long a test waits for a burst of requests to be let in or refused
# /generate's every value, as Gradio's REST routes take them: prompt, then the sampling settings.
GENERATE_DATA = ["Once", 8, 0.0, 0.9, 50, 1.1, -1, None]


class HeldManager(ScriptedManager):
    """A loaded fake model whose every reply streams "held", then waits until ``release`` is set
    (or its own stop event), then ends as "held reply". ``entered`` counts the replies that
    reached the model: the ones the app let in."""

    def __init__(self) -> None:
        super().__init__({})
        self.release = threading.Event()
        self.entered = 0
        self._count = threading.Lock()

    def status(self) -> ModelStatus:
        return ModelStatus(LoadConfig(model=HELD))

    def stream_completion(self, prompt, params, stop_event=None, *args, **kwargs) -> Iterator:
        with self._count:
            self.entered += 1
        yield GenerationUpdate("held")
        deadline = time.monotonic() + 3 * SETTLE_SECONDS
        while not self.release.wait(0.02) and time.monotonic() < deadline:
            if stop_event is not None and stop_event.is_set():
                break
        yield GenerationUpdate("held reply", GenerationStats(1, 2, 0.01, 0.02, 10.0))

    def reset(self) -> None:
        """Hold replies again, counting from zero (call with no reply running)."""
        self.release.clear()
        with self._count:
            self.entered = 0


@pytest.fixture(scope="module")
def app() -> Iterator[RunningApp]:
    flags = ["--queue-size", str(QUEUE_SIZE), "--max-batch", str(MAX_BATCH), "--mcp"]
    with running_app(flags, manager=HeldManager()) as running:
        yield running


@pytest.fixture
def held(app: RunningApp) -> Iterator[HeldManager]:
    """The app's fake model, holding replies; every held reply is let go afterwards."""
    manager = app.service.manager
    manager.reset()
    try:
        yield manager
    finally:
        manager.release.set()
        wait_for(lambda: app.service.admission.count == 0, "the replies to let go of their places")


def wait_for(condition: Callable[[], bool], what: str, timeout: float = SETTLE_SECONDS) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def timed(call: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def assert_control_answers(app: RunningApp, http: httpx.Client) -> None:
    """Status, Stop, clear_chat and the API info answer quickly, by every route a script uses."""
    api = app.url + "gradio_api/"
    checks: dict[str, Callable[[], Any]] = {
        "run/status": lambda: http.post(api + "run/status", json={"data": []}),
        "run/stop": lambda: http.post(api + "run/stop", json={"data": []}),
        "run/clear_chat": lambda: http.post(api + "run/clear_chat", json={"data": []}),
        "info": lambda: http.get(api + "info"),
    }
    for name, check in checks.items():
        response, seconds = timed(check)
        assert response.status_code == 200, (name, response.text)
        assert seconds < ANSWER_SECONDS, f"{name} took {seconds:.1f} s"
    status, seconds = timed(lambda: app.client().predict(api_name="/status"))
    assert status["model"] == HELD and seconds < ANSWER_SECONDS + 1  # + the client's own start


# ---------------------------------------------------------------------------------- Gradio's routes
def test_direct_run_calls_cannot_skip_the_queue(app: RunningApp, held: HeldManager) -> None:
    """Reproduces issue 23: 100 concurrent ``/gradio_api/run/generate`` were all accepted and
    Status took 56 s. Direct calls of the endpoints that go through the queue are refused at once
    (they would skip it); Status and Stop, which never queue, still answer on that route."""
    url = app.url + "gradio_api/run/generate"
    with httpx.Client(timeout=30) as http, ThreadPoolExecutor(24) as pool:
        calls = [pool.submit(timed, lambda: http.post(url, json={"data": GENERATE_DATA})) for _ in range(24)]
        answers = [future.result() for future in calls]
        assert held.entered == 0  # nothing reached the model by this route
        for response, seconds in answers:
            assert response.status_code == 404 and seconds < ANSWER_SECONDS
            assert "join the queue" in response.json()["detail"]
        assert_control_answers(app, http)


def test_the_queue_lets_in_the_limit_and_refuses_the_rest(app: RunningApp, held: HeldManager) -> None:
    """A burst through Gradio's queue: exactly LIMIT replies reach the model, every other one is
    refused at once with the limit in words, and Status / Stop answer throughout."""
    client = app.client()
    jobs = [client.submit("Once", api_name="/generate") for _ in range(3 * LIMIT)]
    wait_for(lambda: held.entered + sum(job.done() for job in jobs) == len(jobs), "the burst to settle")
    refused = [job for job in jobs if job.done()]
    assert held.entered == LIMIT and len(refused) == len(jobs) - LIMIT
    for job in refused:
        assert isinstance(job.exception(), AppError) and REFUSAL in str(job.exception())
    with httpx.Client(timeout=30) as http:
        assert_control_answers(app, http)
    held.release.set()
    assert sorted(job.result() for job in jobs if job not in refused) == ["held reply"] * LIMIT


def test_the_rest_call_route_goes_through_the_same_limit(app: RunningApp, held: HeldManager) -> None:
    """``/gradio_api/call/<name>``, Gradio's REST route through the queue, meets the same limit."""
    url = app.url + "gradio_api/call/generate"
    with httpx.Client(timeout=30) as http:
        events = [http.post(url, json={"data": GENERATE_DATA}).json()["event_id"] for _ in range(LIMIT + 2)]
        wait_for(lambda: held.entered == LIMIT, "the queue to let in LIMIT replies")
        refused = [http.get(f"{url}/{event}").text for event in events[-2:]]
        assert all("event: error" in text and REFUSAL in text for text in refused), refused
        assert held.entered == LIMIT


# ---------------------------------------------------------------------------------- one limit for all
def test_v1_lets_in_the_limit_and_answers_429_past_it(app: RunningApp, held: HeldManager) -> None:
    url = app.url + "v1/chat/completions"
    body = {"model": HELD, "messages": [{"role": "user", "content": "Once"}]}
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(3 * LIMIT) as pool:
        calls: list[Future] = [pool.submit(http.post, url, json=body) for _ in range(3 * LIMIT)]
        wait_for(lambda: held.entered + sum(c.done() for c in calls) == len(calls), "the burst to settle")
        refused = [call.result() for call in calls if call.done()]
        assert held.entered == LIMIT and len(refused) == len(calls) - LIMIT
        for response in refused:
            assert response.status_code == 429
            error = response.json()["error"]
            assert error["code"] == "queue_full" and error["message"] == REFUSAL
        assert_control_answers(app, http)
        held.release.set()
        replies = [call.result() for call in calls if call.result().status_code == 200]
        assert [r.json()["choices"][0]["message"]["content"] for r in replies] == ["held reply"] * LIMIT


def test_replies_from_every_route_share_one_count(app: RunningApp, held: HeldManager) -> None:
    """Places taken through /v1 are the places the queue and MCP find taken."""
    url = app.url + "v1/completions"
    with httpx.Client(timeout=60) as http, ThreadPoolExecutor(LIMIT) as pool:
        calls = [pool.submit(http.post, url, json={"model": HELD, "prompt": "Once"}) for _ in range(LIMIT)]
        wait_for(lambda: held.entered == LIMIT, "/v1 to take every place")
        job = app.client().submit("Once", api_name="/generate")
        with pytest.raises(AppError, match="too many requests are waiting"):
            job.result(timeout=ANSWER_SECONDS + 5)

        async def chat(client: Any) -> Any:
            messages = [{"role": "user", "content": "Once"}]
            return await client.call_tool("chat_messages", {"messages": messages})

        tool = with_mcp(app.url, chat)
        assert tool.isError and REFUSAL in tool.content[0].text
        assert held.entered == LIMIT
        held.release.set()
        assert all(call.result().status_code == 200 for call in calls)
    # The places are free again: the next reply is let in.
    wait_for(lambda: app.service.admission.count == 0, "the places to be free")
    assert app.client().predict("Once", api_name="/generate") == "held reply"


# ---------------------------------------------------------------------------------- worker threads
def test_more_held_replies_than_anyio_threads_leave_status_answering() -> None:
    """With room for 42 replies (more than the 40 threads anyio lends sync handlers by default),
    42 held replies through the queue all reach the model, and Status, Stop and the API info
    still answer at once: replies never take the last worker thread."""
    manager = HeldManager()
    flags = ["--queue-size", "40", "--max-batch", "2"]
    with running_app(flags, manager=manager) as app, httpx.Client(timeout=30) as http:
        client = Client(app.url, verbose=False, max_workers=64)  # its default runs 40 jobs at once
        try:
            jobs = [client.submit("Once", api_name="/generate") for _ in range(42)]
            wait_for(lambda: manager.entered == 42, "42 replies to reach the model")
            assert not any(job.done() for job in jobs)
            assert_control_answers(app, http)
        finally:
            manager.release.set()
        assert [job.result() for job in jobs] == ["held reply"] * 42


def test_as_many_held_mcp_calls_as_anyio_threads_leave_status_answering() -> None:
    """Gradio's MCP server waits for each queued tool call in a thread of anyio's default limiter
    (40 threads), the limiter FastAPI's login check of every Gradio route needs, the MCP call's own
    included: 40 held chat_messages calls must neither stall each other nor Status. (40: Gradio's
    MCP server runs at most 40 queued calls at once, through its one gradio_client.)"""
    manager = HeldManager()
    flags = ["--queue-size", "40", "--max-batch", "2", "--mcp"]
    with running_app(flags, manager=manager) as app, httpx.Client(timeout=30) as http:

        async def chat(client: Any) -> Any:
            messages = [{"role": "user", "content": "Once"}]
            return await client.call_tool("chat_messages", {"messages": messages})

        with ThreadPoolExecutor(40) as pool:
            try:
                calls = [pool.submit(with_mcp, app.url, chat) for _ in range(40)]
                wait_for(lambda: manager.entered == 40, "40 MCP calls to reach the model")
                assert_control_answers(app, http)
            finally:
                manager.release.set()
            results = [call.result() for call in calls]
        assert [result.content[0].text for result in results] == ["held reply"] * 40
