"""The tabs' handlers called directly: no browser, no launched server.

Components are built inside a ``gr.Blocks()`` (never launched) only to serve as the keys of the
``{component: value}`` dicts handlers read and return. Chat handlers run against a scripted manager
whose replies are known; the Configuration and Device map handlers plan the built-in tiny model and
load a tiny random one.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from app_fixtures import ScriptedManager, config_ui, form_values

from optdemo.app.service import DemoService, PlanNotice, PlanView
from optdemo.app.settings import AppSettings
from optdemo.core.chat_prompt import PLAIN_FORMAT, TEMPLATE_FORMAT
from optdemo.core.errors import GenerationError
from optdemo.core.load_config import LoadConfig
from optdemo.runtime.manager import ModelManager
from optdemo.web.api import ADMIN_COOKIE, admin_of, session_of
from optdemo.web.render import to_messages
from optdemo.web.tabs import chat as chat_tab
from optdemo.web.tabs import chat_model
from optdemo.web.tabs import config as config_tab
from optdemo.web.tabs import devicemap as devicemap_tab
from optdemo.web.tabs import sign_in as sign_in_tab
from optdemo.web.tabs.chat_components import ChatTab

REQUEST = SimpleNamespace(session_hash="session-1")
PARIS = ["Paris", "Paris is", "Paris is the capital."]
STATS = "3 tokens · first token 0.01 s · 10.0 tokens/s · 0.10 s total"


# ---------------------------------------------------------------------------------- chat
def chat_ui(script: dict[str, list[list[str]]], **settings: object) -> tuple[DemoService, ChatTab]:
    service = DemoService(ScriptedManager(script), AppSettings(**settings))  # type: ignore[arg-type]
    with gr.Blocks():
        tab = chat_tab.layout_chat_tab(service)
    return service, tab


def chat_values(tab: ChatTab, message: str = "", turns: list | None = None, **controls: object) -> dict:
    """What Gradio passes: the message, the session's turns and the sampling controls' values."""
    values = {control: control.value for control in tab.controls.all()}
    for name, value in controls.items():
        values[getattr(tab.controls, name)] = value
    return {**values, tab.message: message, tab.turns: turns or [], tab.system_prompt: ""}


def turn(user: str, assistant: str, stats: str = STATS) -> dict:
    return {"user": user, "assistant": assistant, "stats": stats}


def test_respond_streams_the_reply_then_keeps_the_turn() -> None:
    service, tab = chat_ui({"Capital?": [PARIS]})
    updates = list(chat_tab.respond(service, tab, chat_values(tab, "Capital?"), REQUEST))
    # The message shows at once with a placeholder, then each streamed step, then the kept turn.
    assert [u[tab.chatbot][-1]["content"] for u in updates] == [
        "…",
        "Paris",
        "Paris is",
        f"Paris is the capital.\n\n<sub>{STATS}</sub>",
        f"Paris is the capital.\n\n<sub>{STATS}</sub>",
    ]
    # The box is cleared once, as the message is sent; later updates leave it alone, so what the
    # user types while the reply streams stays there (a notice says to wait or press Stop).
    assert updates[0][tab.message] == ""
    assert all(tab.message not in u for u in updates[1:])
    assert updates[0][tab.notice] == chat_tab.BUSY_NOTICE and "Stop" in chat_tab.BUSY_NOTICE
    assert updates[-1][tab.notice] == ""
    assert [u[tab.turns] for u in updates[:-1]] == [[]] * 4  # the state changes once, at the end
    assert updates[-1][tab.turns] == [turn("Capital?", "Paris is the capital.")]
    # How much of the window the reply used.
    assert updates[-1][tab.context_line] == "Context: 3 + 3 of 512 tokens (prompt + reply)"


def not_sent(text: str) -> dict:
    """The note a failed reply leaves after the conversation (never kept in it)."""
    return {"role": "assistant", "content": f"**Not sent:** {text}"}


def test_a_failed_reply_restores_the_chat_and_the_message() -> None:
    """Issue #24: what went wrong is said in the conversation itself (no gr.Error: Gradio would
    cover the conversation and the box with "Error" badges), and the message is back in the box."""
    service, tab = chat_ui({})  # no reply: fails as with no model loaded
    earlier = [turn("Hi", "Hello")]
    updates = list(chat_tab.respond(service, tab, chat_values(tab, "Still there?", earlier), REQUEST))
    assert updates[-1] == {
        tab.chatbot: [
            *to_messages(earlier),
            not_sent(
                "no model is loaded: load one first (in the Configuration tab). Your message is back "
                "in the box."
            ),
        ],
        tab.turns: earlier,
        tab.message: "Still there?",
        tab.notice: "",
    }


def test_bad_parameters_restore_the_chat() -> None:
    service, tab = chat_ui({"Hi": [["Hello"]]}, max_new_tokens_cap=32)
    values = chat_values(tab, "Hi", max_new_tokens=100)
    updates = list(chat_tab.respond(service, tab, values, REQUEST))
    assert updates[-1] == {
        tab.chatbot: [
            not_sent(
                "max_new_tokens is at most 32 here: the model's 512-token window minus this prompt's 1 "
                "tokens, and the operator's cap 32; you asked for 100. Your message is back in the box."
            )
        ],
        tab.turns: [],
        tab.message: "Hi",
        tab.notice: "",
    }


def test_the_slider_follows_the_loaded_models_window() -> None:
    """The max_new_tokens slider's maximum is min(cap, window - the prompt's tokens): a scripted
    model's prompt cannot be counted here, so one token is kept for it (511 for a 512 window)."""
    service, tab = chat_ui({})
    assert tab.controls.max_new_tokens.maximum == 512  # the operator's cap, before any model
    updates = chat_model.refresh_model_line(service, tab, {tab.controls.max_new_tokens: 512}, REQUEST)
    slider = updates[tab.controls.max_new_tokens]
    assert slider["maximum"] == 511 and slider["value"] == 511
    assert slider["info"] == (
        "at most 511 here: min(512, the model's 512-token window minus the prompt); older turns are "
        "left out to make room"
    )
    assert f"Chat format: {PLAIN_FORMAT}" in updates[tab.model_line]
    service, tab = chat_ui({}, max_new_tokens_cap=128)
    updates = chat_model.refresh_model_line(service, tab, {tab.controls.max_new_tokens: 64}, REQUEST)
    assert updates[tab.controls.max_new_tokens]["maximum"] == 128
    assert updates[tab.controls.max_new_tokens]["value"] == 64


@pytest.mark.slow
def test_the_chat_tab_shows_the_format_and_the_real_window(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A model saved with a chat template is chatted with through it, and the tab says so; the
    same model without one keeps the plain transcript. The slider stops where the prompt leaves
    off: the 512 window minus the format's own tokens (issue #24: never a maximum refused)."""
    import shutil

    templated = tmp_path / "tiny-chat"
    shutil.copytree(tiny_model_dir, templated)
    (templated / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    )
    service = DemoService(ModelManager(), AppSettings())
    with gr.Blocks():
        tab = chat_tab.layout_chat_tab(service)
    try:
        for path, expected in ((templated, TEMPLATE_FORMAT), (tiny_model_dir, PLAIN_FORMAT)):
            service.manager.load(LoadConfig(str(path)))
            updates = chat_model.refresh_model_line(service, tab, {tab.controls.max_new_tokens: 512}, REQUEST)
            assert f"Chat format: {expected}" in updates[tab.model_line]
            assert updates[tab.controls.max_new_tokens]["maximum"] < 511  # the format's own tokens
            # With a message typed, the maximum is exactly what a chat accepts: one more is refused.
            message = "What is the capital of France?"
            values = {tab.controls.max_new_tokens: 512, tab.message: message}
            maximum = chat_model.refresh_model_line(service, tab, values, REQUEST)[
                tab.controls.max_new_tokens
            ]
            *_, last = service.chat("s", [], message, service.params(maximum["maximum"], 0.0))
            assert last.stats is not None and 0 < last.stats.new_tokens <= maximum["maximum"]
            assert last.stats.prompt_tokens + maximum["maximum"] == 512
            with pytest.raises(GenerationError, match=f"max_new_tokens is at most {maximum['maximum']} here"):
                list(service.chat("s", [], message, service.params(maximum["maximum"] + 1, 0.0)))
    finally:
        service.manager.unload()


def test_system_prompt_and_stop_sequences_reach_the_service() -> None:
    service, tab = chat_ui({"Hi": [["Hello"]]})
    values = {**chat_values(tab, "Hi", stop="END\nSTOP"), tab.system_prompt: "Be brief."}
    list(chat_tab.respond(service, tab, values, REQUEST))
    assert service.manager.system_prompts == ["Be brief."]
    assert tab.controls.params_from(service, values).stop == ("END", "STOP")


def test_history_cap_refuses_and_keeps_the_conversation() -> None:
    service, tab = chat_ui({"Third": [["never"]]}, max_history_turns=2)
    full = [turn("One", "1"), turn("Two", "2")]
    updates = list(chat_tab.respond(service, tab, chat_values(tab, "Third", full), REQUEST))
    assert updates[-1] == {
        tab.chatbot: [
            *to_messages(full),
            not_sent(
                "this conversation has reached the limit of 2 turns here: clear it (or undo a turn) to go "
                "on. Your message is back in the box."
            ),
        ],
        tab.turns: full,
        tab.message: "Third",
        tab.notice: "",
    }
    # One turn fewer (after an undo) and the conversation goes on, with the whole history sent.
    service.manager.script["Third"] = [["Three"]]
    *_, last = chat_tab.respond(service, tab, chat_values(tab, "Third", full[:1]), REQUEST)
    assert last[tab.turns] == [full[0], turn("Third", "Three", last[tab.turns][1]["stats"])]
    assert service.manager.histories[-1] == [("One", "1")]


def test_retry_replaces_the_last_reply() -> None:
    service, tab = chat_ui({"Capital?": [PARIS]})
    first = [turn("Hi", "Hello"), turn("Capital?", "Lyon")]
    *_, last = chat_tab.retry(service, tab, chat_values(tab, "", first), REQUEST)
    assert last == {
        tab.chatbot: to_messages([first[0], turn("Capital?", "Paris is the capital.")]),
        tab.turns: [first[0], turn("Capital?", "Paris is the capital.")],
        tab.notice: "",
        tab.context_line: "Context: 3 + 3 of 512 tokens (prompt + reply)",
    }
    # The retried message was sent after the earlier turns only.
    assert service.manager.histories == [[("Hi", "Hello")]]


def test_a_failed_retry_keeps_the_last_turn() -> None:
    service, tab = chat_ui({})
    history = [turn("Hi", "Hello")]
    updates = list(chat_tab.retry(service, tab, chat_values(tab, "", history), REQUEST))
    assert updates[-1] == {
        tab.chatbot: [
            *to_messages(history),
            not_sent("no model is loaded: load one first (in the Configuration tab)."),
        ],
        tab.turns: history,
        tab.notice: "",
    }


def test_retry_with_nothing_to_retry() -> None:
    service, tab = chat_ui({})
    assert list(chat_tab.retry(service, tab, chat_values(tab), REQUEST)) == [
        {tab.notice: "Nothing to retry yet: send a message first."}
    ]


def test_undo_puts_the_last_message_back_and_clear_forgets() -> None:
    service, tab = chat_ui({})
    history = [turn("Hi", "Hello"), turn("Capital?", "Paris")]
    # The context line described the undone reply: it is cleared (issue #24).
    assert chat_tab.undo(service, tab, {tab.turns: history}, REQUEST) == {
        tab.chatbot: to_messages(history[:1]),
        tab.turns: history[:1],
        tab.message: "Capital?",
        tab.context_line: "",
    }
    assert chat_tab.undo(service, tab, {tab.turns: []}, REQUEST) == {
        tab.chatbot: [],
        tab.turns: [],
        tab.message: "",
        tab.context_line: "",
    }
    assert chat_tab.clear(service, tab, {tab.turns: history}, REQUEST) == {
        tab.chatbot: [],
        tab.turns: [],
        tab.context_line: "",
    }


def test_stop_ends_this_sessions_reply_only() -> None:
    service, tab = chat_ui({"Long": [["One", "One two", "One two three"]]})
    service.manager.pause = threading.Event()
    stream = chat_tab.respond(service, tab, chat_values(tab, "Long"), REQUEST)
    next(stream)  # the placeholder
    assert next(stream)[tab.chatbot][-1]["content"] == "One"
    other = SimpleNamespace(session_hash="session-2")
    assert chat_tab.stop(service, tab, {}, other) == {}
    assert service.sessions.stop("session-2") is False  # nothing runs there
    chat_tab.stop(service, tab, {}, REQUEST)
    service.manager.pause.set()
    *_, last = stream
    (kept,) = last[tab.turns]
    assert kept["assistant"] == "One two"  # one more step, then it stopped
    assert kept["stats"].endswith("· stopped")


def test_complete_streams_the_continuation_and_its_stats() -> None:
    service, tab = chat_ui({"Once upon a time": [[" there", " there was"]]})
    values = {**chat_values(tab), tab.prompt: "Once upon a time"}
    updates = list(chat_tab.complete(service, tab, values, REQUEST))
    assert updates == [
        {tab.completion: " there", tab.completion_stats: ""},
        {tab.completion: " there was", tab.completion_stats: updates[1][tab.completion_stats]},
        {tab.serving_line: ""},  # issue #24: "Writing 1 reply" never stays after it
    ]
    assert updates[1][tab.completion_stats].startswith("2 tokens")


def test_mode_switch_and_model_line() -> None:
    service, tab = chat_ui({})
    shown = chat_tab.switch_mode(service, tab, {tab.mode: "Completion"}, REQUEST)
    assert shown[tab.chat_box]["visible"] is False and shown[tab.completion_box]["visible"] is True
    line = chat_model.refresh_model_line(service, tab, {}, REQUEST)
    assert line[tab.model_line] == (
        "No model loaded yet. Choose one, check the plan, then **Load model**.  \n"
        f"Chat format: {PLAIN_FORMAT}"
    )


# ---------------------------------------------------------------------------------- configuration
def test_preview_plans_the_form() -> None:
    service, tab = config_ui()
    updates = config_tab.preview(service, tab, form_values(tab, advanced="cpu=1GiB"), REQUEST)
    view = updates[tab.plan_state]
    assert isinstance(view, PlanView) and view.plan.model == "optdemo/tiny-opt"
    assert view.plan.bytes_per_device == {"cpu": view.plan.total_bytes}
    assert updates[tab.summary].startswith("**tiny-opt** (")
    assert "fits" in updates[tab.summary] and view.prediction.summary() in updates[tab.summary]


def test_preview_shows_a_bad_budget_in_place() -> None:
    service, tab = config_ui()
    updates = config_tab.preview(service, tab, form_values(tab, advanced="cpu=lots"), REQUEST)
    # No plan stands for the form: the state says so, naming the model (issue #12).
    assert updates[tab.plan_state] == PlanNotice("tiny-opt", updates[tab.summary])
    assert updates[tab.summary].startswith("**Cannot plan tiny-opt:** ")
    assert "not a size" in updates[tab.summary]


def signed(token: str | None, how: str = "cookie") -> SimpleNamespace:
    """A request as Gradio hands it over: the session hash, and the admin credential (as the
    browser's cookie, or a script's bearer token) when there is one."""
    headers = {"authorization": f"Bearer {token}"} if token and how == "bearer" else {}
    cookies = {ADMIN_COOKIE: token} if token and how == "cookie" else {}
    return SimpleNamespace(session_hash="session-1", headers=headers, cookies=cookies)


def test_the_sign_in_cookie_unlocks_the_admin_controls() -> None:
    service, tab = config_ui(lock_config=True, auth=(("admin", "pw"),))
    form = tab.sign_in
    assert form is not None
    admin_controls = (tab.load_btn, tab.unload_btn, tab.clear_cache_btn, tab.tokenizer)
    assert all(control.interactive is False for control in admin_controls)
    # The session hash alone, or a made-up cookie, unlocks nothing (and the message is left alone).
    for request in (REQUEST, signed("session-1"), signed("made-up")):
        visitor = sign_in_tab.refresh_admin(service, tab, {}, request)
        assert all(visitor[control]["interactive"] is False for control in admin_controls)
        assert form.message not in visitor
        assert [value for _, value in visitor[tab.model]["choices"]] == ["optdemo/tiny-opt"]
    token = service.sign_in("127.0.0.1", "admin", "pw").token
    for how in ("cookie", "bearer"):
        admin = sign_in_tab.refresh_admin(service, tab, {}, signed(token, how))
        assert admin[form.message] == "Signed in as admin: you can load, unload and clear the cache."
        assert all(admin[control]["interactive"] is True for control in admin_controls)
        assert admin[tab.model]["allow_custom_value"] is True
        assert "facebook/opt-1.3b" in [value for _, value in admin[tab.model]["choices"]]
    # Signed out, the same cookie unlocks nothing.
    assert service.sign_out(token) is True
    after = sign_in_tab.refresh_admin(service, tab, {}, signed(token))
    assert all(after[control]["interactive"] is False for control in admin_controls)


def test_the_password_goes_only_to_the_sign_in_route() -> None:
    """The Sign in button runs in the browser: its script posts the form to /optdemo/sign-in (which
    sets the HttpOnly cookie) and clears the password box; no Gradio event carries the password,
    and the admin controls are then refreshed from the cookie."""
    from optdemo.web.blocks import build_app

    service = DemoService(ModelManager(), AppSettings(lock_config=True, auth=(("admin", "pw"),)))
    demo = build_app(service)
    form = next(d for d in demo.config["components"] if d["props"].get("label") == "Password")
    events = demo.config["dependencies"]
    clicked = [e for e in events if e.get("js") and "optdemo/sign-in" in e["js"]]
    assert len(clicked) == 1 and clicked[0]["backend_fn"] is False
    assert form["id"] in clicked[0]["outputs"]  # cleared
    assert all(form["id"] not in e["inputs"] for e in events if e["backend_fn"])
    assert any(e.get("js") and "optdemo/sign-out" in e["js"] for e in events)


def test_the_credential_comes_from_a_cookie_or_a_bearer_token_never_the_session() -> None:
    assert admin_of(signed("t0k3n")) == "t0k3n" and admin_of(signed("t0k3n", "bearer")) == "t0k3n"
    assert admin_of(REQUEST) is None and admin_of(None) is None
    assert admin_of(SimpleNamespace(session_hash="s", headers={"authorization": "t0k3n"}, cookies={})) is None
    # A call without a session id shares no identity with any other.
    assert session_of(REQUEST) == "session-1"
    assert session_of(None) != session_of(None) and "anonymous" not in session_of(None)


def test_no_sign_in_form_without_accounts() -> None:
    _, tab = config_ui(lock_config=True)
    assert tab.sign_in is None


def test_visitors_cannot_unload() -> None:
    service, tab = config_ui(lock_config=True, auth=(("admin", "pw"),))
    with pytest.raises(gr.Error) as info:
        config_tab.unload(service, tab, {}, REQUEST)
    assert info.value.message == (
        "visitors cannot unload the model: the configuration is locked (--lock-config); "
        "sign in as an admin to change it"
    )


@pytest.mark.slow
def test_load_then_device_map_then_unload(tiny_model_dir: Path) -> None:
    service, tab = config_ui(model=str(tiny_model_dir))
    values = form_values(tab, advanced="cpu=1GiB")
    loaded = config_tab.load(service, tab, values, REQUEST)
    assert loaded[tab.status].startswith(f"**Loaded** {tiny_model_dir.name} in ")
    assert loaded[tab.status].endswith("— as planned ✓")
    view = loaded[tab.plan_state]
    assert view.plan == service.status().plan
    again = config_tab.load(service, tab, values, REQUEST)
    assert again[tab.status].startswith(f"**Reused** {tiny_model_dir.name} in ")
    assert again[tab.status].endswith("Configuration unchanged: nothing was reloaded.")
    assert again[tab.loaded] > loaded[tab.loaded]

    with gr.Blocks():
        device_map = devicemap_tab.layout_devicemap_tab(tab.plan_state)
    drawn = devicemap_tab.refresh(service, device_map, {tab.plan_state: view}, REQUEST)
    assert drawn[device_map.heading].startswith(f"**Loaded** {tiny_model_dir.name}: every module is where")
    assert "Plan preview" not in drawn[device_map.heading]  # the session's plan is the loaded one
    assert len(drawn[device_map.table]) == len(view.plan.blocks)

    unloaded = config_tab.unload(service, tab, {}, REQUEST)
    assert unloaded[tab.status] == "Model unloaded; memory released."
    assert config_tab.unload(service, tab, {}, REQUEST)[tab.status] == "Nothing was loaded."
    empty = devicemap_tab.refresh(service, device_map, {tab.plan_state: None}, REQUEST)
    assert empty == {
        device_map.heading: "",
        device_map.picture: devicemap_tab.EMPTY_HTML,
        device_map.table: [],
        device_map.timing_table: {"__type__": "update", "value": [], "visible": False},
        device_map.progress: "",
        device_map.drawn: 0,  # nothing loaded: no replies drawn
    }


# ---------------------------------------------------------------------------------- binding
def test_bind_gives_gradio_the_signature_it_reads() -> None:
    import inspect
    import typing

    from optdemo.web.binding import bind

    service, tab = chat_ui({"Hi": [["Hello"]]})
    streamed = bind(chat_tab.respond, service, tab)
    assert inspect.isgeneratorfunction(streamed) and streamed.__name__ == "respond"
    assert list(inspect.signature(streamed).parameters) == ["values", "request"]
    assert typing.get_type_hints(streamed)["request"] is gr.Request
    plain = bind(chat_tab.undo, service, tab)
    assert not inspect.isgeneratorfunction(plain)
    assert plain({tab.turns: [turn("Hi", "Hello")]}, REQUEST)[tab.message] == "Hi"
    *_, last = streamed(chat_values(tab, "Hi"), REQUEST)
    assert last[tab.turns] == [turn("Hi", "Hello", last[tab.turns][0]["stats"])]


def test_quantization_radio_is_enabled_and_plans_quantized_on_the_cpu() -> None:
    """Issue #11: without a GPU, 8-bit / 4-bit are optdemo's own (torch's CPU kernels): the radio
    is enabled, and a plan made from the form has the quantized sizes."""
    import torch

    from optdemo.core.budget import format_bytes

    if torch.cuda.is_available():
        pytest.skip("the CPU quantization path")
    service, tab = config_ui()
    assert tab.quantization.interactive is True
    assert tab.quantization.info.startswith("torch's int8 / int4 CPU kernels")
    plain = config_tab.preview(service, tab, form_values(tab, advanced="cpu=1GiB"), REQUEST)
    four = config_tab.preview(
        service, tab, form_values(tab, advanced="cpu=1GiB", quantization="4bit"), REQUEST
    )
    plain_plan, four_plan = plain[tab.plan_state].plan, four[tab.plan_state].plan
    assert four_plan.quantization == "4bit" and four_plan.dtype == "bfloat16"
    assert four_plan.total_bytes < 0.4 * plain_plan.total_bytes
    assert (
        f"**tiny-opt** ({format_bytes(four_plan.total_bytes)}, 4-bit decoder weights, bfloat16 elsewhere)"
        in (four[tab.summary])
    )


def test_closing_the_tab_stops_the_sessions_reply() -> None:
    """The page's unload event (Gradio runs it when a tab's heartbeat ends) stops that session's
    running reply at once, whatever the backend is sending, and no other session's."""
    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings
    from optdemo.web.blocks import build_app

    service = DemoService(ScriptedManager({}), AppSettings())
    demo = build_app(service)
    unload = [fn for fn in demo.fns.values() if any(target[1] == "unload" for target in fn.targets)]
    assert len(unload) == 1
    mine, other = service.sessions.start_reply("tab-1"), service.sessions.start_reply("tab-2")
    unload[0].fn(SimpleNamespace(session_hash="tab-1"))
    assert mine.is_set() and not other.is_set()
