"""The saved-chats panel's handlers over their edge cases (issue #24): each returns every output
its event declares (Gradio refuses fewer, "open_chat didn't return enough output values", and
covers the outputs with an "Error" badge), and what prevents an action reaches the panel's
message instead of an error."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import pytest

from optdemo.app import chats
from optdemo.app.service import DemoService
from optdemo.app.settings import AppSettings
from optdemo.runtime.manager import ModelManager
from optdemo.web.tabs import chat as chat_tab
from optdemo.web.tabs import chat_history
from optdemo.web.tabs.chat_components import ChatTab

REQUEST = SimpleNamespace(session_hash="session-1")
TURN = {"user": "Capital?", "assistant": "Paris.", "stats": ""}


@pytest.fixture(scope="module")
def ui() -> tuple[DemoService, ChatTab]:
    service = DemoService(ModelManager(), AppSettings())
    with gr.Blocks():
        tab = chat_tab.layout_chat_tab(service)
    return service, tab


def stores() -> dict[str, object]:
    """The stores a browser may send: none, damaged, empty, one chat (open or not), two."""
    one, first = chats.save(chats.empty_store(), None, [TURN], now=1.0)
    two, second = chats.save({**one, "current": None}, None, [{**TURN, "user": "Why?"}], now=2.0)
    return {
        "none": None,
        "damaged": {"chats": "not a list"},
        "empty": chats.empty_store(),
        "one, open": one,
        "one, closed": {**one, "current": None},
        "two": two,
        "ids": {"first": first, "second": second},
    }


def edge_cases(tab: ChatTab) -> list[dict]:
    """Every combination of store, chat on screen, picked chat, name and pasted text worth trying."""
    known = stores()
    ids = known.pop("ids")
    assert isinstance(ids, dict)
    saved = tab.saved
    cases = []
    for store in known.values():
        for chat_id in (None, ids["first"], "gone"):
            for picked in (None, ids["first"], ids["second"], "gone"):
                for title in ("", "  ", "A name"):
                    for pasted in ("", "not an export", '{"format": "other"}', "{broken", chats.to_json([])):
                        cases.append(
                            {
                                saved.store: store,
                                saved.chat_id: chat_id,
                                saved.picker: picked,
                                saved.title: title,
                                saved.pasted: pasted,
                                tab.chatbot: [],
                                tab.turns: [],
                            }
                        )
    return cases


def test_every_saved_chats_handler_returns_every_output_it_declares(ui) -> None:
    service, tab = ui
    events = chat_history.saved_chat_events(tab)
    assert {event.handler.__name__ for event in events} == {
        "new_chat",
        "open_chat",
        "rename_chat",
        "delete_chat",
        "export_json",
        "export_markdown",
        "import_chats",
    }
    declared = [
        *((event.handler, event.outputs) for event in events),
        (chat_history.restore, chat_history.restored_outputs(tab)),
        (chat_history.save_current, chat_history.saved_outputs(tab)),
    ]
    for values in edge_cases(tab):
        for handler, outputs in declared:
            updates = handler(service, tab, values, REQUEST)
            assert set(updates) == set(outputs), (handler.__name__, values)


def test_rename_with_no_chat_says_so_in_the_panel(ui) -> None:
    service, tab = ui
    saved = tab.saved
    values = {saved.store: chats.empty_store(), saved.chat_id: None, saved.title: "Mine"}
    updates = chat_history.rename_chat(service, tab, values, REQUEST)
    assert updates[saved.message] == "Nothing to rename yet: send a message first, or pick a saved chat."
    assert updates[saved.store] == gr.skip() and updates[saved.picker] == gr.skip()
    store, chat_id = chats.save(chats.empty_store(), None, [TURN])
    empty_name = chat_history.rename_chat(
        service, tab, {**values, saved.store: store, saved.chat_id: chat_id, saved.title: " "}, REQUEST
    )
    assert empty_name[saved.message] == "Not renamed: a chat's name cannot be empty: type one."


@pytest.mark.parametrize(
    ("pasted", "message"),
    [
        ("", "Not imported: nothing to import: paste an exported chat (JSON or Markdown)."),
        (
            "just some text",
            "Not imported: no conversation found: paste a JSON export (format optdemo-chats) or a "
            "Markdown one ('## title', then '### User' and '### Assistant' sections).",
        ),
        (
            '{"format": "other"}',
            'Not imported: this JSON is not a chat export: it lacks "format": "optdemo-chats".',
        ),
    ],
)
def test_an_import_of_what_is_not_an_export_says_why_and_keeps_the_text(
    ui, pasted: str, message: str
) -> None:
    service, tab = ui
    saved = tab.saved
    values = {saved.store: chats.empty_store(), saved.chat_id: None, saved.pasted: pasted}
    updates = chat_history.import_chats(service, tab, values, REQUEST)
    assert updates[saved.message] == message
    assert updates[saved.pasted] == gr.skip()  # left in the box, to be fixed


def test_picking_a_chat_no_longer_saved_or_the_open_one(ui) -> None:
    service, tab = ui
    saved = tab.saved
    store, chat_id = chats.save(chats.empty_store(), None, [TURN])
    gone = chat_history.open_chat(
        service, tab, {saved.store: store, saved.chat_id: None, saved.picker: "gone"}, REQUEST
    )
    assert gone[saved.message] == "That chat is no longer saved in this browser: pick another."
    assert all(value == gr.skip() for key, value in gone.items() if key is not saved.message)
    same = chat_history.open_chat(
        service, tab, {saved.store: store, saved.chat_id: chat_id, saved.picker: chat_id}, REQUEST
    )
    assert all(value == gr.skip() for value in same.values())
    opened = chat_history.open_chat(
        service, tab, {saved.store: store, saved.chat_id: None, saved.picker: chat_id}, REQUEST
    )
    assert opened[tab.turns] == [TURN] and opened[saved.chat_id] == chat_id


def test_the_wired_events_are_the_declared_ones() -> None:
    """What the page runs is what the test above checked: each event's outputs as declared."""
    from optdemo.web.blocks import build_app

    service = DemoService(ModelManager(), AppSettings())
    demo = build_app(service)
    wired = {fn.name: [block._id for block in fn.outputs] for fn in demo.fns.values()}
    for name in ("new_chat", "open_chat", "rename_chat", "delete_chat", "export_json", "import_chats"):
        assert name in wired
    assert len(wired["open_chat"]) == 8 and len(wired["rename_chat"]) == 3
