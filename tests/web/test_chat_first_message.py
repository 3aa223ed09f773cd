"""The Chat tab when no model answers yet, through its handlers (issue #24): the first message
loads the selected tiny-opt where this visitor may load, else the conversation says what to do;
the first reply after a load says why it is slower; the tiny model's hint shows only while it
answers."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from optdemo.app.service import DemoService, PlanNotice
from optdemo.app.settings import AppSettings
from optdemo.core.load_config import LoadConfig
from optdemo.runtime.manager import ModelManager
from optdemo.web.render import to_messages
from optdemo.web.tabs import chat as chat_tab
from optdemo.web.tabs import chat_model
from optdemo.web.tabs.chat_components import ChatTab, ModelLink

REQUEST = SimpleNamespace(session_hash="session-1")
QUESTION = "What is the capital of France?"


def linked_chat(**settings: object) -> tuple[DemoService, ChatTab]:
    """A real manager (nothing loaded) and a Chat tab linked to a Configuration tab's parts."""
    service = DemoService(ModelManager(), AppSettings(**settings))  # type: ignore[arg-type]
    with gr.Blocks():
        link = ModelLink(gr.State(None), gr.State(0), gr.Markdown())
        tab = chat_tab.layout_chat_tab(service, link=link)
    return service, tab


def values_of(tab: ChatTab, message: str, selected: object = None, turns: list | None = None) -> dict:
    values = {control: control.value for control in tab.controls.all()}
    values[tab.controls.temperature] = 0.0
    assert tab.link is not None
    return {
        **values,
        tab.message: message,
        tab.turns: turns or [],
        tab.system_prompt: "",
        tab.link.plan_state: selected,
    }


@pytest.mark.slow
def test_the_first_message_loads_the_selected_tiny_model_and_gets_a_reply() -> None:
    service, tab = linked_chat()
    assert tab.link is not None
    try:
        updates = list(chat_tab.respond(service, tab, values_of(tab, QUESTION), REQUEST))
        assert service.status().model_id == "optdemo/tiny-opt"
        notices = [u[tab.notice] for u in updates if tab.notice in u]
        assert notices[1] == (
            "Loading tiny-opt first: no model was loaded, and tiny-opt is selected and works offline…"
        )
        loaded = next(u for u in updates if tab.link.loaded in u)
        assert loaded[tab.link.status].startswith("**Loaded** tiny-opt for the chat's first message in ")
        (kept,) = updates[-1][tab.turns]
        assert kept["user"] == QUESTION and kept["assistant"]
        # The first reply after a load says why it is slower; the next one does not.
        assert kept["stats"].endswith(f" · {chat_model.FIRST_REPLY_NOTE}")
        again = list(chat_tab.respond(service, tab, values_of(tab, QUESTION, turns=[kept]), REQUEST))
        assert chat_model.FIRST_REPLY_NOTE not in again[-1][tab.turns][-1]["stats"]
    finally:
        service.manager.unload()


def test_a_visitor_of_a_public_deployment_is_told_in_the_chat() -> None:
    service, tab = linked_chat(share=True)
    updates = list(chat_tab.respond(service, tab, values_of(tab, QUESTION), REQUEST))
    assert not service.status().loaded
    assert updates[-1] == {
        tab.chatbot: [
            {
                "role": "assistant",
                "content": "**Not sent:** no model is loaded, and visitors cannot load one here: the "
                "operator or a signed-in admin can; try again once one is loaded. Your message is back "
                "in the box.",
            }
        ],
        tab.turns: [],
        tab.message: QUESTION,
        tab.notice: "",
    }


def test_another_selected_model_is_not_loaded_by_a_message() -> None:
    """Only the built-in tiny model loads from the chat (offline, in a second): a model being
    planned, or another model selected, gets an instruction in the chat."""
    service, tab = linked_chat()
    opt = service.plan(LoadConfig("opt-1.3b", max_memory="cpu=8GiB"))
    for selected in (opt, PlanNotice("tiny-opt", "Planning **tiny-opt**…")):
        *_, last = chat_tab.respond(service, tab, values_of(tab, QUESTION, selected), REQUEST)
        assert not service.status().loaded
        assert last[tab.chatbot][-1]["content"].startswith("**Not sent:** no model is loaded: load one first")
        assert last[tab.message] == QUESTION and last[tab.turns] == []


def test_the_tiny_models_hint_shows_only_while_it_answers() -> None:
    service, tab = linked_chat()
    assert tab.hint is not None and tab.hint.visible is False and tab.link is not None
    tiny = service.plan(LoadConfig("optdemo/tiny-opt", max_memory="cpu=1GiB"))
    opt = service.plan(LoadConfig("opt-1.3b", max_memory="cpu=8GiB"))

    def hint(selected: object) -> bool:
        values = {tab.link.plan_state: selected, tab.controls.max_new_tokens: 64, tab.message: ""}
        return chat_model.refresh_model_line(service, tab, values, REQUEST)[tab.hint]["visible"]

    assert hint(tiny) is True  # nothing loaded: the selected model would answer
    assert hint(opt) is False and hint(None) is False
    service.manager.load(LoadConfig("optdemo/tiny-opt"))
    try:
        assert hint(opt) is True  # tiny-opt answers, whatever the form now shows
    finally:
        service.manager.unload()


def test_the_busy_notice_starts_with_a_letter() -> None:
    """No emoji before it: a font without the glyph drew an empty box."""
    assert chat_tab.BUSY_NOTICE.startswith("A reply is on its way.")
    assert to_messages([]) == []
