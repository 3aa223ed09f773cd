"""Admin rights in public mode, from outside: a real server, plain HTTP requests and gradio_client.

Issue #23's reproductions, each as a test: an admin signing in through the plain REST route (no
session id) must not make strangers admins; a stranger replaying the admin's session hash on
``/gradio_api/queue/join`` must not unload the model; gradio_client without the admin's token is
a visitor; sign-out revokes; sign-in attempts are rate-limited with a wait that grows and is stated.
Admin rights live in a credential the server issues at sign-in (a bearer token for scripts, an
HttpOnly cookie for browsers), never in Gradio's client-chosen session hash.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from app_fixtures import FAKE_TOKEN, RunningApp, ScriptedManager, running_app
from gradio_client import Client
from gradio_client.exceptions import AppError

from optdemo.core.budget import parse_max_memory
from optdemo.core.load_config import LoadConfig

pytestmark = pytest.mark.slow

PUBLIC = ["--lock-config", "--auth", "admin:pw"]
LOAD_ARGS = ["tiny-opt", "cpu=1GiB", "auto", ""]  # what the operator loaded: /load reuses it
# Another configuration (a real change), every parameter given: raw HTTP calls get no defaults.
OTHER_LOAD = ["tiny-opt", "cpu=2GiB", "auto", "", "auto", "auto", "none", "none"]  # /load's every parameter
REFUSED = "visitors cannot"


# ---------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def public_app() -> Iterator[RunningApp]:
    with running_app(PUBLIC) as running:
        assert running.service.settings.public
        yield running


def operator_loads(app: RunningApp) -> None:
    """The tiny model loaded with LOAD_ARGS by the operator (in-process, no access check)."""
    config = LoadConfig("tiny-opt", max_memory=parse_max_memory("cpu=1GiB"))
    app.service.manager.load(config)
    assert app.service.status().loaded


def still_loaded(app: RunningApp) -> None:
    """The operator's model is still the one loaded, unchanged."""
    status = app.service.manager.status()
    assert status.config is not None, "a stranger unloaded the model"
    assert status.config.max_memory == parse_max_memory("cpu=1GiB"), "a stranger reloaded the model"


def run(app: RunningApp, api_name: str, data: list, headers: dict | None = None) -> httpx.Response:
    """POST /gradio_api/run/<api_name>: Gradio's plain REST route, with no session id."""
    url = app.url + f"gradio_api/run/{api_name}"
    return httpx.post(url, json={"data": data}, headers=headers, timeout=60)


def sign_in(app: RunningApp, username: str = "admin", password: str = "pw") -> dict:
    """A script's sign-in, as docs/USAGE.md shows it: the grant (token, expires_in, idle_timeout)."""
    answer = run(app, "sign_in", [username, password])
    assert answer.status_code == 200, answer.text
    (grant,) = answer.json()["data"]
    return grant


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def join_queue(app: RunningApp, api_name: str, session_hash: str, data: list | None = None) -> dict:
    """What a stranger can do with a session hash seen in a URL or a proxy log: join the queue as
    that session and read the outcome from its stream. Returns the process_completed message."""
    fn_index = next(fn._id for fn in app.demo.fns.values() if fn.api_name == api_name)
    body = {"data": data or [], "fn_index": fn_index, "session_hash": session_hash}
    joined = httpx.post(app.url + "gradio_api/queue/join", json=body, timeout=30)
    assert joined.status_code == 200, joined.text
    event_id = joined.json()["event_id"]
    url = app.url + "gradio_api/queue/data"
    with httpx.stream("GET", url, params={"session_hash": session_hash}, timeout=60) as stream:
        for line in stream.iter_lines():
            if not line.startswith("data:"):
                continue
            message = json.loads(line[5:])
            if message.get("msg") == "process_completed" and message.get("event_id") == event_id:
                return message
    raise AssertionError("the queue never completed the stranger's event")


def refusal(message: dict) -> str:
    """The error text of a completed queue event (it must have failed)."""
    assert message["success"] is False, f"the stranger's call succeeded: {message}"
    return str(message["output"].get("error"))


def call_events(app: RunningApp, api_name: str, data: list, **credentials: dict) -> str:
    """The events of ``/gradio_api/call/<api_name>`` (Gradio's REST route through the queue), with
    ``headers`` or ``cookies``."""
    with httpx.Client(timeout=30, **credentials) as client:
        started = client.post(f"{app.url}gradio_api/call/{api_name}", json={"data": data})
        return client.get(f"{app.url}gradio_api/call/{api_name}/{started.json()['event_id']}").text


def call(app: RunningApp, api_name: str, data: list, headers: dict | None = None, **credentials: dict) -> str:
    """The error text of a ``/gradio_api/call/<api_name>`` that must fail."""
    events = call_events(app, api_name, data, headers=headers or {}, **credentials)
    assert "event: error" in events, f"the stranger's /call/{api_name} succeeded: {events}"
    return events


def app_error(client: Client, api_name: str, *args: object) -> str:
    with pytest.raises(AppError) as info:
        client.predict(*args, api_name=api_name)
    message = str(info.value)
    assert FAKE_TOKEN not in message
    return message


# ---------------------------------------------------------------------------------- the reproductions
def test_a_rest_sign_in_without_a_session_makes_no_stranger_admin(public_app: RunningApp) -> None:
    """The tester's first reproduction: the admin signs in with `curl .../run/sign_in` (no session
    id); a stranger's `/run/unload` and `/run/load` must still be refused: the direct route refuses
    queued endpoints outright (they must join the queue), and through the queue (/call/) the
    stranger is no admin."""
    operator_loads(public_app)
    assert run(public_app, "sign_in", ["admin", "pw"]).status_code == 200
    for api_name, data in (("unload", []), ("load", OTHER_LOAD)):
        answer = run(public_app, api_name, data)
        assert answer.status_code != 200, f"a stranger's /run/{api_name} succeeded"
        assert "join the queue" in answer.text
        assert REFUSED in call(public_app, api_name, data)
    still_loaded(public_app)


def test_a_stranger_replaying_the_admins_session_hash_cannot_unload(public_app: RunningApp) -> None:
    """The second: after an admin signed in with gradio_client, a stranger who knows the admin's
    session hash joins the queue as that session: /unload and /load are refused."""
    operator_loads(public_app)
    admin = public_app.client()
    with contextlib.suppress(AppError):  # through the queue: refused (the token would travel there)
        admin.predict("admin", "pw", api_name="/sign_in")
    admin.predict(api_name="/status")
    assert REFUSED in refusal(join_queue(public_app, "unload", admin.session_hash))
    assert REFUSED in refusal(join_queue(public_app, "load", admin.session_hash, OTHER_LOAD))
    still_loaded(public_app)
    # The same with an admin whose calls carry the token: its session hash grants nothing either.
    holder = Client(public_app.url, headers=bearer(sign_in(public_app)["token"]), verbose=False)
    assert holder.predict(*LOAD_ARGS, api_name="/load")["status"] == "reused"
    assert REFUSED in refusal(join_queue(public_app, "unload", holder.session_hash))
    still_loaded(public_app)


def test_gradio_client_without_the_token_is_a_visitor(public_app: RunningApp) -> None:
    operator_loads(public_app)
    token = sign_in(public_app)["token"]
    stranger = public_app.client()
    assert REFUSED in app_error(stranger, "/unload")
    assert REFUSED in app_error(stranger, "/load", *OTHER_LOAD)
    # Another header, a made-up token, the session hash as a token: still a visitor.
    for headers in (bearer(token + "x"), bearer("anonymous"), {"Authorization": token}):
        assert REFUSED in app_error(Client(public_app.url, headers=headers, verbose=False), "/unload")
    still_loaded(public_app)
    # The admin's client, with the token, may change the model.
    admin = Client(public_app.url, headers=bearer(token), verbose=False)
    assert admin.predict(*OTHER_LOAD, api_name="/load")["status"] == "loaded"
    assert admin.predict(api_name="/unload")["unloaded"] is True
    assert public_app.service.status().loaded is False


def test_the_grant_says_when_it_expires_and_sign_out_revokes_it(public_app: RunningApp) -> None:
    operator_loads(public_app)
    grant = sign_in(public_app)
    assert set(grant) == {"token", "expires_in", "idle_timeout"}
    assert len(grant["token"]) >= 43  # secrets.token_urlsafe(32): 256 random bits
    assert grant["token"] != sign_in(public_app)["token"]
    assert grant["expires_in"] == 12 * 3600 and grant["idle_timeout"] == 3600
    admin = Client(public_app.url, headers=bearer(grant["token"]), verbose=False)
    assert admin.predict(api_name="/sign_out") is True
    assert REFUSED in app_error(admin, "/unload")
    assert run(public_app, "unload", [], bearer(grant["token"])).status_code != 200
    assert admin.predict(api_name="/sign_out") is False  # nothing left to revoke
    still_loaded(public_app)


def test_an_unused_token_expires_after_an_hour(public_app: RunningApp) -> None:
    operator_loads(public_app)
    admins = public_app.service.access.admins
    token = sign_in(public_app)["token"]
    real_clock = admins.clock
    try:
        admins.clock = lambda: real_clock() + 3600 + 1  # an hour and a second later
        assert REFUSED in call(public_app, "unload", [], bearer(token))
    finally:
        admins.clock = real_clock
    assert REFUSED in call(public_app, "unload", [], bearer(token))  # ended for good
    still_loaded(public_app)


def test_sign_in_through_the_queue_is_refused_and_says_how(public_app: RunningApp) -> None:
    """gradio_client sends every call through the queue, whose answers travel on the session's
    stream, readable by whoever knows the session hash: the token is never sent there."""
    client = public_app.client()
    message = app_error(client, "/sign_in", "admin", "pw")
    assert "gradio_api/run/sign_in" in message
    assert not re.search(r"[A-Za-z0-9_-]{43}", message)  # no token in the refusal
    # Gradio's two-step REST route (/call/...) goes through the queue too: refused alike.
    url = public_app.url + "gradio_api/call/sign_in"
    event_id = httpx.post(url, json={"data": ["admin", "pw"]}).json()["event_id"]
    events = httpx.get(f"{url}/{event_id}", timeout=30).text
    assert "event: error" in events and "gradio_api/run/sign_in" in events
    assert not re.search(r"[A-Za-z0-9_-]{43}", events)


def test_wrong_passwords_are_refused_in_a_sentence(public_app: RunningApp) -> None:
    answer = run(public_app, "sign_in", ["admin", "wrong"])
    assert answer.status_code != 200
    assert answer.json()["error"] == "wrong username or password: check them and sign in again"


def test_the_usage_snippet_signs_a_script_in(public_app: RunningApp) -> None:
    """docs/USAGE.md's sign-in snippet, run as written against this server."""
    operator_loads(public_app)
    usage = (Path(__file__).resolve().parents[2] / "docs" / "USAGE.md").read_text()
    snippet = re.search(r"```python\n(# A script signs in.*?)```", usage, re.DOTALL)
    assert snippet, "docs/USAGE.md has no sign-in snippet"
    code = snippet.group(1).replace("http://127.0.0.1:7860/", public_app.url).replace('"PW"', '"pw"')
    scope: dict = {}
    exec(compile(code, "USAGE.md", "exec"), scope)  # the documentation's own example
    assert scope["admin"].headers["Authorization"].startswith("Bearer ")
    assert public_app.service.status().loaded is False  # the snippet unloads, then signs out
    assert REFUSED in app_error(scope["admin"], "/unload")


# ---------------------------------------------------------------------------------- browsers: a cookie
def test_the_browser_route_sets_an_httponly_strict_cookie(public_app: RunningApp) -> None:
    operator_loads(public_app)
    url = public_app.url
    answer = httpx.post(url + "optdemo/sign-in", json={"username": "admin", "password": "pw"})
    assert answer.status_code == 200, answer.text
    cookie = answer.headers["set-cookie"]
    token = re.match(r"optdemo_admin=([^;]+);", cookie)
    assert token, cookie
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert "Secure" not in cookie  # plain http here
    assert token.group(1) not in answer.text  # the page's scripts never see the credential
    assert answer.json()["signed_in"] is True
    # Over https (behind a proxy that says so) the cookie is Secure too.
    https = httpx.post(
        url + "optdemo/sign-in",
        json={"username": "admin", "password": "pw"},
        headers={"X-Forwarded-Proto": "https"},
    )
    assert "Secure" in https.headers["set-cookie"]
    # The cookie is the credential: calls that carry it are the admin's, others are not.
    jar = {"optdemo_admin": token.group(1)}
    assert run(public_app, "unload", []).status_code != 200
    with httpx.Client(cookies=jar) as browser:
        out = browser.post(url + "optdemo/sign-out")
        assert out.status_code == 200 and "optdemo_admin=" in out.headers["set-cookie"]
        assert "Max-Age=0" in out.headers["set-cookie"] or "expires=" in out.headers["set-cookie"].lower()
    assert REFUSED in call(public_app, "unload", [], cookies=jar)
    still_loaded(public_app)


def test_the_cookie_makes_its_holder_admin(public_app: RunningApp) -> None:
    operator_loads(public_app)
    answer = httpx.post(public_app.url + "optdemo/sign-in", json={"username": "admin", "password": "pw"})
    jar = {"optdemo_admin": answer.cookies["optdemo_admin"]}
    events = call_events(public_app, "unload", [], cookies=jar)
    assert "event: complete" in events and '"unloaded": true' in events


# ---------------------------------------------------------------------------------- rate limit
def test_sign_in_attempts_wait_longer_after_each_failure() -> None:
    """2000 wrong passwords at 52/s, then the right one, worked before. Now, from one address:
    four free tries, then a wait of 2 s, 4 s, 8 s… (at most 15 minutes) that every refusal states;
    the right password during a wait is refused too, on every route."""
    with running_app(PUBLIC, manager=ScriptedManager({})) as app:
        for attempt in range(1, 5):
            answer = run(app, "sign_in", ["admin", f"guess{attempt}"])
            assert answer.json()["error"] == "wrong username or password: check them and sign in again"
        fifth = run(app, "sign_in", ["admin", "guess5"]).json()["error"]
        assert fifth.startswith("wrong username or password") and "try again in 2 s" in fifth
        locked = run(app, "sign_in", ["admin", "pw"])  # right, but during the wait
        assert locked.status_code != 200
        wait = r"too many failed sign-ins from your address: try again in [12] s"
        assert re.fullmatch(wait, locked.json()["error"])
        cookie_route = httpx.post(app.url + "optdemo/sign-in", json={"username": "admin", "password": "pw"})
        assert cookie_route.status_code == 429 and int(cookie_route.headers["retry-after"]) in (1, 2)
        assert "optdemo_admin" not in cookie_route.headers.get("set-cookie", "")
        time.sleep(2.1)
        sixth = run(app, "sign_in", ["admin", "guess6"]).json()["error"]
        assert "try again in 4 s" in sixth  # the wait doubles
        assert "try again in" in run(app, "sign_in", ["admin", "pw"]).json()["error"]
