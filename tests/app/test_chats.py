"""Saved chats: the browser store's logic (optdemo.app.chats) and the Chat tab's saved-chats handlers,
without a browser. The store lives in the browser (BrowserState); these functions only transform it.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import gradio as gr
import pytest
from app_fixtures import ScriptedManager

from optdemo.app import chats
from optdemo.app.service import DemoService
from optdemo.app.settings import AppSettings
from optdemo.web.render import to_messages
from optdemo.web.tabs import chat as chat_tab
from optdemo.web.tabs import chat_history
from optdemo.web.tabs.chat_components import ChatTab

REQUEST = SimpleNamespace(session_hash="session-1")


def turn(user: str, assistant: str) -> dict:
    return {"user": user, "assistant": assistant, "stats": ""}


CAPITAL = [turn("What is the capital of France?", "Paris."), turn("And of Italy?", "Rome.")]
HELLO = [turn("Hi", "Hello\n\nTwo lines.")]


# ---------------------------------------------------------------------------------- the store
def test_save_creates_then_updates_a_chat() -> None:
    store, first = chats.save(chats.empty_store(), None, CAPITAL[:1], now=1.0)
    assert store["current"] == first and first
    assert store["chats"] == [
        {"id": first, "title": "What is the capital of France?", "turns": CAPITAL[:1], "updated": 1.0}
    ]
    store, same = chats.save(store, first, CAPITAL, now=2.0)
    assert same == first and chats.find(store, first)["turns"] == CAPITAL
    store, second = chats.save(store, None, HELLO, now=3.0)
    assert second != first
    assert chats.choices(store) == [("Hi", second), ("What is the capital of France?", first)]
    # Emptied (clear, or undo of the only turn): removed, nothing current.
    store, none = chats.save(store, second, [], now=4.0)
    assert none is None and store["current"] is None
    assert [chat["id"] for chat in store["chats"]] == [first]


def test_titles_are_the_start_of_the_first_message() -> None:
    assert chats.title_for([turn("  many   spaces\nhere ", "")]) == "many spaces here"
    long = chats.title_for([turn("word " * 40, "")])
    assert len(long) == chats.TITLE_CHARS and long.endswith("…")
    assert chats.title_for([]) == "New chat"


def test_rename_and_delete() -> None:
    store, chat_id = chats.save(chats.empty_store(), None, HELLO, now=1.0)
    renamed = chats.rename(store, chat_id, "  Greetings  ")
    assert chats.find(renamed, chat_id)["title"] == "Greetings"
    assert chats.find(store, chat_id)["title"] == "Hi"  # the input store is never changed
    with pytest.raises(chats.ChatStoreError, match="a chat's name cannot be empty"):
        chats.rename(store, chat_id, "   ")
    assert chats.delete(renamed, chat_id) == {"chats": [], "current": None}


def test_damaged_browser_data_becomes_a_valid_store() -> None:
    assert chats.normalized(None) == chats.empty_store()
    assert chats.normalized("junk") == chats.empty_store()
    store = chats.normalized(
        {
            "chats": [{"id": "a", "title": "T", "turns": [{"user": "u", "assistant": 3}]}, "junk"],
            "current": "zz",
        }
    )
    assert store == {
        "chats": [
            {"id": "a", "title": "T", "turns": [{"user": "u", "assistant": "3", "stats": ""}], "updated": 0.0}
        ],
        "current": None,  # an id that is not there
    }


def test_the_number_of_saved_chats_is_bounded() -> None:
    store = chats.empty_store()
    for index in range(chats.MAX_SAVED_CHATS + 5):
        store, _ = chats.save(store, None, [turn(f"message {index}", "")], now=float(index))
    assert len(store["chats"]) == chats.MAX_SAVED_CHATS
    assert store["chats"][-1]["title"] == "message 5"  # the oldest five were forgotten


class Untouchable(dict):
    """A chat that fails the test if anything reads it."""

    def _read(self, *args: object) -> None:
        raise AssertionError("a chat beyond the store's limit was read")

    get = items = keys = values = __iter__ = __getitem__ = __len__ = _read


def big_chat(index: int, chars: int) -> dict:
    return {"id": f"c{index}", "title": f"chat {index}", "turns": [turn("x" * chars, "")], "updated": -index}


def test_store_size_stops_counting_past_its_limit() -> None:
    # Texts count with their quotes, every other value as one: about the size of its JSON.
    assert chats.store_size({"chats": [], "current": None}, 100) == len("chats") + len("current") + 7
    assert chats.store_size(["ab", ["c", 5]], 100) == (2 + 2) + 1 + (1 + 2) + 1 + 1
    huge = {"chats": [big_chat(0, 50), *[Untouchable()] * 10**6]}
    assert 100 < chats.store_size(huge, 100) < 200  # nothing past the limit was read


def test_an_oversized_store_keeps_its_newest_chats_and_never_reads_the_rest() -> None:
    """A store bigger than a browser may keep (a damaged or forged localStorage, ~2 MB in the
    report) is cut to its first (newest) chats that fit, before anything else is done with it."""
    size = chats.MAX_STORE_CHARS // 3
    store = {
        "chats": [big_chat(0, size), big_chat(1, size), big_chat(2, size), Untouchable()],
        "current": "c2",
    }
    kept, left_out = chats.bounded(store)
    assert [chat["id"] for chat in kept["chats"]] == ["c0", "c1"] and left_out == 2
    assert kept["current"] is None  # the chat it had open was left out
    assert chats.normalized(store) == kept
    assert chats.bounded(kept) == (kept, 0)


def test_saving_forgets_the_oldest_chats_beyond_the_size_limit() -> None:
    size = chats.MAX_STORE_CHARS // 3
    store = chats.empty_store()
    for index in range(4):
        store, chat_id = chats.save(store, None, [turn("x" * size, str(index))], now=float(index))
    assert [chat["turns"][0]["assistant"] for chat in store["chats"]] == ["3", "2"]
    assert store["current"] == chat_id
    assert chats.store_size(store, chats.MAX_STORE_CHARS) <= chats.MAX_STORE_CHARS


def test_an_import_that_would_overfill_the_store_is_refused() -> None:
    size = chats.MAX_STORE_CHARS // 3
    store, _ = chats.save(chats.empty_store(), None, [turn("x" * size, "")], now=1.0)
    store, _ = chats.save(store, None, [turn("y" * size, "")], now=2.0)
    imported = chats.parse_export(chats.to_json([big_chat(9, size)]))
    with pytest.raises(chats.ChatStoreError) as info:
        chats.add_imported(store, imported)
    assert str(info.value) == (
        f"importing these chats would take this browser's saved chats over {chats.MAX_STORE_CHARS} "
        "characters, the limit here: delete some saved chats (or import fewer) first"
    )
    assert len(chats.add_imported(chats.empty_store(), imported)["chats"]) == 1


# ---------------------------------------------------------------------------------- export / import
def two_chats() -> list[dict]:
    store, _ = chats.save(chats.empty_store(), None, CAPITAL, now=1.0)
    store, _ = chats.save(store, None, HELLO, now=2.0)
    return store["chats"]


def test_json_export_round_trips() -> None:
    saved = two_chats()
    text = chats.to_json(saved)
    document = json.loads(text)
    assert document["format"] == "optdemo-chats" and document["version"] == 1
    assert [c["title"] for c in document["chats"]] == ["Hi", "What is the capital of France?"]
    back = chats.parse_export(text)
    assert [(c["title"], c["turns"]) for c in back] == [(c["title"], c["turns"]) for c in saved]


def test_markdown_export_reads_well_and_round_trips() -> None:
    saved = two_chats()
    text = chats.to_markdown(saved)
    assert text.startswith("## Hi\n\n### User\n\nHi\n\n### Assistant\n\nHello\n\nTwo lines.\n")
    assert "## What is the capital of France?\n\n### User\n\nWhat is the capital of France?\n" in text
    back = chats.parse_export(text)
    assert [(c["title"], c["turns"]) for c in back] == [(c["title"], c["turns"]) for c in saved]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "nothing to import"),
        ("{not json", "the JSON export is damaged"),
        ('{"chats": []}', 'it lacks "format": "optdemo-chats"'),
        ("just some text", "no conversation found"),
        ("x" * (chats.MAX_IMPORT_CHARS + 1), "the limit is"),
    ],
)
def test_bad_imports_say_what_to_do(text: str, message: str) -> None:
    with pytest.raises(chats.ChatStoreError, match=message):
        chats.parse_export(text)


def test_imports_are_added_never_overwriting() -> None:
    store, chat_id = chats.save(chats.empty_store(), None, HELLO, now=1.0)
    imported = chats.parse_export(chats.to_json(store["chats"]))
    twice = chats.add_imported(chats.add_imported(store, imported, now=2.0), imported, now=3.0)
    assert len(twice["chats"]) == 3
    assert len({chat["id"] for chat in twice["chats"]}) == 3
    assert twice["current"] == chat_id


# ---------------------------------------------------------------------------------- the handlers
def chat_ui(script: dict | None = None) -> tuple[DemoService, ChatTab]:
    service = DemoService(ScriptedManager(script or {}), AppSettings())
    with gr.Blocks():
        tab = chat_tab.layout_chat_tab(service)
    return service, tab


def test_the_store_lives_in_the_browser() -> None:
    _, tab = chat_ui()
    assert isinstance(tab.saved.store, gr.BrowserState)
    assert tab.saved.store.storage_key == chat_history.STORAGE_KEY
    # A fixed secret: chats stay readable after the server restarts.
    assert tab.saved.store.secret == chat_history.STORAGE_SECRET


def test_a_finished_turn_is_saved_then_restored_after_a_reload() -> None:
    service, tab = chat_ui({"Capital?": [["Paris."]]})
    saved = tab.saved
    values = {control: control.value for control in tab.controls.all()}
    values.update({tab.message: "Capital?", tab.turns: [], tab.system_prompt: ""})
    *_, last = chat_tab.respond(service, tab, values, REQUEST)
    turns = last[tab.turns]
    after = chat_history.save_current(
        service, tab, {tab.turns: turns, saved.store: chats.empty_store(), saved.chat_id: None}, REQUEST
    )
    store, chat_id = after[saved.store], after[saved.chat_id]
    assert store["current"] == chat_id and chats.find(store, chat_id)["turns"] == turns
    assert after[saved.picker]["choices"] == [("Capital?", chat_id)] and after[saved.title] == "Capital?"
    # A new page (a reload) gets the browser's store and shows that chat again.
    blank = {saved.store: store, saved.chat_id: None, tab.chatbot: []}
    page = chat_history.restore(service, tab, blank, REQUEST)
    assert page[tab.turns] == turns and page[tab.chatbot] == to_messages(turns)
    assert page[saved.chat_id] == chat_id and page[saved.picker]["value"] == chat_id
    assert saved.store not in page  # writing the store would fire its change event again
    # The page that saved it already shows it: only the list is refreshed (every other output is
    # returned unchanged: Gradio wants them all, issue #24).
    skipped = dict.fromkeys(chat_history.restored_outputs(tab), gr.skip())
    same = chat_history.restore(service, tab, {**blank, saved.chat_id: chat_id}, REQUEST)
    assert same == {**skipped, saved.picker: page[saved.picker]}
    # A conversation on screen (a first reply still streaming) is never replaced.
    streaming = to_messages([turn("Another question", "")])
    busy = chat_history.restore(service, tab, {**blank, tab.chatbot: streaming}, REQUEST)
    assert busy == {**skipped, saved.picker: {**page[saved.picker], "value": None}}


def test_restoring_an_oversized_store_says_what_was_left_out() -> None:
    service, tab = chat_ui()
    saved = tab.saved
    size = chats.MAX_STORE_CHARS // 3
    store = {"chats": [big_chat(0, size), big_chat(1, size), big_chat(2, size)], "current": "c0"}
    page = chat_history.restore(
        service, tab, {saved.store: store, saved.chat_id: None, tab.chatbot: []}, REQUEST
    )
    assert page[saved.chat_id] == "c0" and page[tab.turns] == store["chats"][0]["turns"]
    assert [choice[1] for choice in page[saved.picker]["choices"]] == ["c0", "c1"]
    assert page[saved.message] == (
        "1 older saved chat was left out: this browser's saved chats held more than "
        f"{chats.MAX_STORE_CHARS} "
        "characters, the limit here, and the oldest are forgotten at the next save; delete chats you no "
        "longer need to keep room"
    )
    assert saved.message in chat_history.restored_outputs(tab)


def test_new_open_rename_delete() -> None:
    service, tab = chat_ui()
    saved = tab.saved
    store, first = chats.save(chats.empty_store(), None, CAPITAL, now=1.0)
    store, second = chats.save(store, None, HELLO, now=2.0)
    new = chat_history.new_chat(service, tab, {saved.store: store, saved.chat_id: second}, REQUEST)
    assert new[tab.turns] == [] and new[tab.chatbot] == [] and new[saved.chat_id] is None
    assert new[saved.store]["chats"] == store["chats"]  # the previous chat stays in the list
    opened = chat_history.open_chat(
        service, tab, {saved.store: store, saved.chat_id: None, saved.picker: first}, REQUEST
    )
    assert opened[tab.turns] == CAPITAL and opened[saved.chat_id] == first
    assert opened[saved.store]["current"] == first
    renamed = chat_history.rename_chat(
        service, tab, {saved.store: store, saved.chat_id: first, saved.title: "Capitals"}, REQUEST
    )
    assert chats.find(renamed[saved.store], first)["title"] == "Capitals"
    assert ("Capitals", first) in renamed[saved.picker]["choices"]
    nothing = chat_history.rename_chat(
        service, tab, {saved.store: store, saved.chat_id: None, saved.title: "x"}, REQUEST
    )  # said in the panel, not raised (issue #24)
    assert nothing[saved.message].startswith("Nothing to rename yet")
    deleted = chat_history.delete_chat(service, tab, {saved.store: store, saved.chat_id: first}, REQUEST)
    assert [chat["id"] for chat in deleted[saved.store]["chats"]] == [second]
    assert deleted[tab.turns] == [] and deleted[saved.chat_id] is None


def test_export_and_import_handlers() -> None:
    service, tab = chat_ui()
    saved = tab.saved
    store, chat_id = chats.save(chats.empty_store(), None, HELLO, now=1.0)
    values = {saved.store: store, saved.chat_id: chat_id}
    as_json = chat_history.export_json(service, tab, values, REQUEST)[saved.exported]
    assert as_json["language"] == "json" and as_json["value"] == chats.to_json(store["chats"])
    as_markdown = chat_history.export_markdown(service, tab, values, REQUEST)[saved.exported]
    assert as_markdown["language"] == "markdown" and as_markdown["value"].startswith("## Hi\n")
    for text in (as_json["value"], as_markdown["value"]):
        imported = chat_history.import_chats(service, tab, {**values, saved.pasted: text}, REQUEST)
        assert len(imported[saved.store]["chats"]) == 2
        assert imported[saved.message] == "Imported 1 chat: pick one in the list."
        assert imported[saved.pasted] == ""
    refused = chat_history.import_chats(service, tab, {**values, saved.pasted: "hello"}, REQUEST)
    assert refused[saved.message].startswith("Not imported: no conversation found")
