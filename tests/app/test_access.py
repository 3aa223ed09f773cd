"""The access policy and the session store, as plain objects: no gradio, no model."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from optdemo.app.access import AccessPolicy
from optdemo.app.admin_sessions import SignInLimiter, TooManySignInsError
from optdemo.app.sessions import SessionStore
from optdemo.app.settings import AppSettings, parse_settings
from optdemo.core.defaults import describe_seconds
from optdemo.core.errors import AccessError
from optdemo.core.load_config import LoadConfig

ADMIN = (("admin", "s3cret"),)
WRONG = r"^wrong username or password: check them and sign in again$"


# ---------------------------------------------------------------------------------- admins
def test_outside_public_mode_everyone_is_admin() -> None:
    policy = AccessPolicy(AppSettings())
    assert policy.is_admin(None) and policy.is_admin("anyone")
    policy.require_admin("anyone", "unload the model")  # no error
    assert policy.confine_offload("  ./off  ") == "./off"
    policy.check_config(LoadConfig("facebook/opt-66b", tokenizer="gpt2"))  # anything goes


def test_sign_in_issues_a_credential_not_bound_to_any_session() -> None:
    """Admin rights live in a token the server issues at sign-in (256 random bits), never in a
    client-chosen session id: nothing but the token is admin, and "anonymous" is nobody."""
    policy = AccessPolicy(AppSettings(lock_config=True, auth=ADMIN))
    for username, password in (("admin", "wrong"), ("nobody", "s3cret"), ("", ""), ("admin", "\ud800é")):
        with pytest.raises(AccessError, match=WRONG):
            policy.sign_in("10.0.0.1", username, password)
    grant = policy.sign_in("10.0.0.1", "admin", "s3cret")
    assert len(grant.token) >= 43 and grant.token != policy.sign_in("10.0.0.1", "admin", "s3cret").token
    assert (grant.expires_in, grant.idle_timeout) == (12 * 3600, 3600)
    assert policy.is_admin(grant.token)
    for other in (None, "", "anonymous", "10.0.0.1", "admin", grant.token[:-1], grant.token + "x"):
        assert not policy.is_admin(other), other
    assert grant.token not in repr(grant)  # a logged grant shows no credential
    assert grant.token not in repr(vars(policy.admins))  # kept only as a digest


def test_sign_out_revokes_only_that_credential() -> None:
    policy = AccessPolicy(AppSettings(lock_config=True, auth=ADMIN))
    first, second = (policy.sign_in("a", "admin", "s3cret") for _ in range(2))
    assert policy.sign_out(first.token) is True
    assert not policy.is_admin(first.token) and policy.is_admin(second.token)
    assert policy.sign_out(first.token) is False
    assert policy.sign_out(None) is False and policy.sign_out("made-up") is False


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_credentials_expire_when_idle_and_at_their_age() -> None:
    clock = FakeClock()
    policy = AccessPolicy(AppSettings(lock_config=True, auth=ADMIN), clock=clock)
    idle = policy.sign_in("a", "admin", "s3cret")
    clock.now += 3600 - 1
    assert policy.is_admin(idle.token)  # used: its idle time starts again
    clock.now += 3600 - 1
    assert policy.is_admin(idle.token)
    clock.now += 3600 + 1
    assert not policy.is_admin(idle.token)  # an hour unused
    busy = policy.sign_in("a", "admin", "s3cret")
    for _ in range(12 * 6 - 1):
        clock.now += 600
        assert policy.is_admin(busy.token)
    clock.now += 600
    assert not policy.is_admin(busy.token)  # 12 hours after sign-in, however busy
    with pytest.raises(AccessError, match=r"^visitors cannot unload the model: "):
        policy.require_admin(busy.token, "unload the model")


def test_live_credentials_are_bounded_and_the_oldest_go_first() -> None:
    policy = AccessPolicy(AppSettings(lock_config=True, auth=ADMIN))
    grants = [policy.sign_in("a", "admin", "s3cret") for _ in range(65)]
    assert not policy.is_admin(grants[0].token)
    assert all(policy.is_admin(grant.token) for grant in grants[1:])


def test_failed_sign_ins_wait_longer_each_time_and_say_how_long() -> None:
    clock = FakeClock()
    policy = AccessPolicy(AppSettings(lock_config=True, auth=ADMIN), clock=clock)
    for _ in range(4):  # four free tries
        with pytest.raises(AccessError, match=WRONG):
            policy.sign_in("10.0.0.1", "admin", "guess")
    waits = []
    for _ in range(12):
        with pytest.raises(AccessError) as wrong:
            policy.sign_in("10.0.0.1", "admin", "guess")
        wait = policy.limiter.wait("10.0.0.1")
        waits.append(wait)
        assert str(wrong.value) == (
            "wrong username or password, and too many failed sign-ins from your address: "
            f"try again in {describe_seconds(wait)}"
        )
        # The right password during the wait is refused too, with the time left.
        clock.now += 1
        with pytest.raises(TooManySignInsError) as locked:
            policy.sign_in("10.0.0.1", "admin", "s3cret")
        assert locked.value.retry_after == wait - 1
        assert str(locked.value) == (
            f"too many failed sign-ins from your address: try again in {describe_seconds(wait - 1)}"
        )
        clock.now += wait - 1
    assert waits == [2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900, 900]
    # Other addresses are not held up; after the wait the right password works and clears the count.
    assert policy.is_admin(policy.sign_in("10.0.0.2", "admin", "s3cret").token)
    assert policy.is_admin(policy.sign_in("10.0.0.1", "admin", "s3cret").token)
    assert policy.limiter.wait("10.0.0.1") == 0
    for _ in range(4):
        with pytest.raises(AccessError, match=WRONG):
            policy.sign_in("10.0.0.1", "admin", "guess")


def test_failures_are_forgotten_an_hour_after_the_last_one() -> None:
    clock = FakeClock()
    limiter = AccessPolicy(AppSettings(lock_config=True, auth=ADMIN), clock=clock).limiter
    for _ in range(4):
        assert limiter.failed("c") == 0
    clock.now += 3600
    assert limiter.failed("c") == 0  # the count started again
    for _ in range(3):
        limiter.failed("c")
    assert limiter.failed("c") == 2


def test_the_limiter_keeps_a_bounded_number_of_addresses() -> None:
    limiter = SignInLimiter(max_clients=3, clock=FakeClock())
    for client in ("a", "b", "c", "d"):
        for _ in range(5):
            limiter.failed(client)
    assert limiter.wait("a") == 0 and limiter.wait("d") == 2
    assert len(limiter) == 3


def refusal(settings: AppSettings) -> str:
    with pytest.raises(AccessError) as info:
        AccessPolicy(settings).require_admin("visitor", "unload the model")
    return str(info.value)


def test_refusal_with_accounts_says_sign_in() -> None:
    message = refusal(AppSettings(lock_config=True, auth=ADMIN))
    assert message == (
        "visitors cannot unload the model: the configuration is locked (--lock-config); "
        "sign in as an admin to change it"
    )


def test_refusal_names_the_true_reason_and_remedy() -> None:
    assert refusal(AppSettings(share=True)) == (
        "visitors cannot unload the model: this app is shared with a public link (--share); "
        "the operator must restart the app with --auth USER:PASS, or without --share"
    )
    assert refusal(AppSettings(lock_config=True)) == (
        "visitors cannot unload the model: the configuration is locked (--lock-config); "
        "the operator must restart the app with --auth USER:PASS, or without --lock-config"
    )
    both = refusal(AppSettings(share=True, lock_config=True))
    assert both.endswith("with --auth USER:PASS, or without --share and --lock-config")
    # On a Space public mode comes from the Space itself (settings turn lock_config on there too).
    space = refusal(parse_settings([], env={"SPACE_ID": "me/demo"}))
    assert "runs on a Hugging Face Space" in space
    assert "OPTDEMO_AUTH" in space and "--lock-config" not in space
    # Engine messages never name a tab of the UI.
    for message in (space, both, refusal(AppSettings(share=True, auth=ADMIN))):
        assert "tab" not in message


# ---------------------------------------------------------------------------------- what visitors may name
def test_allowed_models_default_to_the_configured_one() -> None:
    policy = AccessPolicy(AppSettings(model="opt-125m", lock_config=True))
    assert policy.allowed_models() == ("facebook/opt-125m",)
    policy.check_config(LoadConfig("opt-125m"))
    with pytest.raises(AccessError) as info:
        policy.check_config(LoadConfig("opt-350m"))
    assert str(info.value) == (
        "facebook/opt-350m is not offered here: this public deployment allows facebook/opt-125m"
    )
    with pytest.raises(AccessError, match="cannot choose another tokenizer"):
        policy.check_config(LoadConfig("opt-125m", tokenizer="gpt2"))
    listed = AccessPolicy(AppSettings(lock_config=True, allow_models=("opt-125m", "opt-1.3b")))
    assert listed.allowed_models() == ("facebook/opt-125m", "facebook/opt-1.3b")


def test_offload_folders_are_confined(tmp_path: Path) -> None:
    base = tmp_path / "offload"
    base.mkdir()
    policy = AccessPolicy(AppSettings(lock_config=True, offload_base=str(base)))
    real = os.path.realpath(base)
    assert policy.confine_offload("") is None and policy.confine_offload("   ") is None
    assert policy.confine_offload("run1") == os.path.join(real, "run1")
    assert policy.confine_offload(str(base / "a" / ".." / "b")) == os.path.join(real, "b")
    for outside in ("../escape", "/etc", str(tmp_path)):
        with pytest.raises(AccessError, match=f"must be inside {real}"):
            policy.confine_offload(outside)
    (base / "link").symlink_to(tmp_path)
    with pytest.raises(AccessError, match="is outside it"):
        policy.confine_offload("link/x")


# ---------------------------------------------------------------------------------- session store
def test_stop_sets_only_the_sessions_running_reply() -> None:
    store = SessionStore(max_history_turns=5)
    assert store.stop("a") is False
    first = store.start_reply("a")
    other = store.start_reply("b")
    assert store.stop("a") is True
    assert first.is_set() and not other.is_set()
    store.end_reply("a", first)
    assert store.stop("a") is False


def test_a_newer_reply_keeps_its_stop_event() -> None:
    store = SessionStore(max_history_turns=5)
    old = store.start_reply("a")
    new = store.start_reply("a")
    store.end_reply("a", old)  # the old reply ends after the new one started
    assert store.stop("a") is True
    assert new.is_set() and not old.is_set()


def test_histories_are_capped_per_session_and_least_recently_used_go_first() -> None:
    store = SessionStore(max_history_turns=2, max_sessions=2)
    for i in range(3):
        store.remember("a", (f"q{i}", f"r{i}"))
    assert store.history("a") == [("q1", "r1"), ("q2", "r2")]
    store.remember("b", ("hi", "hello"))
    store.remember("a", ("q3", "r3"))  # "a" is now the most recently used
    store.remember("c", ("x", "y"))  # over two sessions: "b" goes
    assert store.history("b") == []
    assert store.history("a") == [("q2", "r2"), ("q3", "r3")]
    assert store.history("c") == [("x", "y")]
    copy = store.history("c")
    copy.append(("changed", "outside"))
    assert store.history("c") == [("x", "y")]
    store.forget("c")
    assert store.history("c") == []


def test_the_store_is_safe_under_concurrent_sessions() -> None:
    store = SessionStore(max_history_turns=1000, max_sessions=1000)

    def chat(session: str) -> None:
        for i in range(200):
            store.remember(session, (str(i), str(i)))

    threads = [threading.Thread(target=chat, args=(f"s{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(len(store.history(f"s{n}")) == 200 for n in range(8))


# ---------------------------------------------------------------------------------- what admins may name
def test_admins_are_not_bound_by_the_visitors_list() -> None:
    """Issue #12: a signed-in admin may plan and load the catalog's OPT sizes and tiny-opt (and the
    visitors' models), never an arbitrary local folder or Hub repository."""
    policy = AccessPolicy(AppSettings(model="opt-125m", lock_config=True, auth=ADMIN))
    owner = policy.sign_in("127.0.0.1", "admin", "s3cret").token
    for model in ("opt-1.3b", "facebook/opt-66b", "tiny-opt", "opt-125m"):
        policy.check_config(LoadConfig(model), owner)  # no error
    with pytest.raises(AccessError) as info:
        policy.check_config(LoadConfig("someone/arbitrary-model"), owner)
    assert str(info.value).startswith("someone/arbitrary-model is not offered here: admins of this")
    assert str(info.value).endswith("the operator can allow more with --admin-allow-model")
    with pytest.raises(AccessError):
        policy.check_config(LoadConfig(os.path.dirname(__file__)), owner)  # a local folder
    # Visitors stay bound by theirs, and are told an admin may use more.
    with pytest.raises(AccessError) as info:
        policy.check_config(LoadConfig("opt-1.3b"), "visitor")
    assert str(info.value) == (
        "facebook/opt-1.3b is not offered here: this public deployment allows facebook/opt-125m; "
        "an admin may use more"
    )


def test_the_operator_sets_what_admins_may_use(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    settings = parse_settings(
        ["--lock-config", "--auth", "admin:s3cret", "--admin-allow-model", str(tmp_path)], env={}
    )
    assert settings.admin_allow_models == (str(tmp_path),)
    env = parse_settings([], env={"OPTDEMO_ADMIN_ALLOW_MODEL": "opt-2.7b,opt-6.7b"})
    assert env.admin_allow_models == ("opt-2.7b", "opt-6.7b")
    policy = AccessPolicy(settings)
    owner = policy.sign_in("127.0.0.1", "admin", "s3cret").token
    policy.check_config(LoadConfig(str(tmp_path)), owner)  # listed: allowed
    with pytest.raises(AccessError):
        policy.check_config(LoadConfig("opt-1.3b"), owner)  # the list replaces the default
    with pytest.raises(AccessError):
        policy.check_config(LoadConfig(str(tmp_path)), "visitor")


def test_admins_plan_and_load_through_the_service(tiny_model_dir: Path) -> None:
    from optdemo.app.service import DemoService
    from optdemo.runtime.manager import ModelManager

    allowed = (str(tiny_model_dir),)
    settings = AppSettings(model="opt-125m", lock_config=True, auth=ADMIN, admin_allow_models=allowed)
    service = DemoService(ModelManager(), settings)
    owner = service.sign_in("127.0.0.1", "admin", "s3cret").token
    config = service.make_config(str(tiny_model_dir), "cpu=1GiB", admin=owner)
    assert service.plan(config).plan.fits
    with pytest.raises(AccessError):
        service.make_config(str(tiny_model_dir), "cpu=1GiB", admin="visitor")
    assert [value for _, value in service.model_choices("visitor")] == ["facebook/opt-125m"]


def test_with_no_model_visitors_are_told_who_can_load_one() -> None:
    import pytest

    from optdemo.app.service import DemoService
    from optdemo.core.errors import NoModelError, NoModelForVisitorsError
    from optdemo.core.generation import GenerationParams
    from optdemo.runtime.manager import ModelManager
    from optdemo.web.errors import to_gradio_error

    params = GenerationParams(max_new_tokens=4)
    public = DemoService(ModelManager(), AppSettings(lock_config=True, auth=ADMIN))
    with pytest.raises(NoModelForVisitorsError) as visitor:
        list(public.chat("visitor", [], "Hello", params))
    assert str(visitor.value) == (
        "no model is loaded, and visitors cannot load one here: the operator or a signed-in admin "
        "can; try again once one is loaded"
    )
    assert "Configuration tab" not in to_gradio_error(visitor.value).message
    token = public.sign_in("127.0.0.1", *ADMIN[0]).token
    with pytest.raises(NoModelError) as admin:
        list(public.complete("session-1", "Hello", params, admin=token))
    assert not isinstance(admin.value, NoModelForVisitorsError)
    assert to_gradio_error(admin.value).message.endswith("(in the Configuration tab)")
