"""The Chat tab's saved conversations: kept in each browser (``gr.BrowserState``), never on the
server, so a reload finds them and a public deployment stores nobody's chats.

:func:`layout_saved_chats` builds the panel (a :class:`SavedChats`: the browser store, the picker,
new / rename / delete, export / import as JSON or Markdown). The handlers read and write the
current conversation of the Chat tab (its ``turns``), so they take the whole
:class:`~optdemo.web.tabs.chat.ChatTab`; the store's logic is :mod:`optdemo.app.chats` (no gradio).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from optdemo.app import chats
from optdemo.app.service import DemoService
from optdemo.web.binding import Updates, bind
from optdemo.web.render import to_messages
from optdemo.web.tabs.chat_components import ChatTab, SavedChats

# The key and the secret under which each browser keeps its chats in localStorage. BrowserState
# sends its secret to the page anyway (it only obfuscates), so a fixed one costs nothing and keeps
# the chats readable after the server restarts, where a random one per process would lose them.
STORAGE_KEY = "optdemo-chats"
STORAGE_SECRET = "optdemo-chats-v1"


def browser_store() -> gr.BrowserState:
    """The browser's chat store. Build it outside the tabs: a component inside a tab that is not
    open yet mounts (and reads localStorage) only when the tab opens, late for the page's load."""
    return gr.BrowserState(chats.empty_store(), storage_key=STORAGE_KEY, secret=STORAGE_SECRET)


def layout_saved_chats(store: gr.BrowserState | None = None) -> SavedChats:
    """Build the saved-chats panel inside the current Blocks, over ``store`` (a new one if None)."""
    store = store if store is not None else browser_store()
    chat_id = gr.State(None)
    with gr.Accordion("Saved chats (kept in this browser only)", open=False, elem_id="od-saved-chats"):
        with gr.Row():
            picker = gr.Dropdown([], value=None, label="Past chats", scale=4, elem_id="od-chat-picker")
            new = gr.Button("New chat", scale=1, min_width=90)
        with gr.Row():
            title = gr.Textbox(label="Name", placeholder="A name for this chat", scale=4)
            rename = gr.Button("Rename", scale=1, min_width=90)
            delete = gr.Button("Delete", variant="stop", scale=1, min_width=90)
        with gr.Row():
            export_json = gr.Button("Export all as JSON", size="sm")
            export_markdown = gr.Button("Export all as Markdown", size="sm")
        exported = gr.Code(label="Export (copy or download it)", language="markdown", interactive=False)
        pasted = gr.Textbox(label="Import: paste an export (JSON or Markdown)", lines=3, max_lines=8)
        import_btn = gr.Button("Import", size="sm")
        message = gr.Markdown(elem_id="od-saved-message")
    return SavedChats(
        store,
        chat_id,
        picker,
        new,
        title,
        rename,
        delete,
        export_json,
        export_markdown,
        exported,
        pasted,
        import_btn,
        message,
    )


def _picker(store: chats.Store, current: str | None) -> Any:
    return gr.update(choices=chats.choices(store), value=current)


def _show(tab: ChatTab, store: chats.Store, chat: chats.Chat | None) -> Updates:
    """Put ``chat`` (None: an empty new one) on screen, with the picker and the name field."""
    turns = list(chat["turns"]) if chat else []
    saved = tab.saved
    return {
        tab.turns: turns,
        tab.chatbot: to_messages(turns),
        tab.context_line: "",
        saved.chat_id: chat["id"] if chat else None,
        saved.picker: _picker(store, chat["id"] if chat else None),
        saved.title: chat["title"] if chat else "",
    }


def _unchanged(outputs: list, message: str | None = None) -> Updates:
    """Every one of ``outputs`` left as it is, but the last (the panel's message, by convention)
    set to ``message`` unless it is None."""
    updates: Updates = {output: gr.skip() for output in outputs}
    if message is not None:
        updates[outputs[-1]] = message
    return updates


def _switching(tab: ChatTab) -> list:
    """What new / open / delete update: the conversation on screen, the panel, its message last."""
    saved = tab.saved
    return [
        tab.turns,
        tab.chatbot,
        tab.context_line,
        saved.chat_id,
        saved.picker,
        saved.title,
        saved.store,
        saved.message,
    ]


def _storing(tab: ChatTab, *more: Any) -> list:
    """What rename and import update: the store and the picker, ``more``, the message last."""
    return [tab.saved.store, tab.saved.picker, *more, tab.saved.message]


# ---------------------------------------------------------------------------------- events
@dataclass(frozen=True)
class SavedChatEvent:
    """One saved-chats handler as wired: what triggers it, what it reads, and the outputs it
    declares, every one of which it returns (Gradio refuses a callback that returns fewer, and
    replaces the outputs with an "Error" badge)."""

    handler: Callable[..., Updates]
    trigger: Any  # the component event, e.g. ``saved.new.click``
    inputs: set
    outputs: list


def saved_chat_events(tab: ChatTab) -> list[SavedChatEvent]:
    """The saved-chats panel's events: new / open / rename / delete, export and import."""
    saved = tab.saved
    store_in = {saved.store, saved.chat_id}
    exported = [saved.exported, saved.message]
    return [
        SavedChatEvent(new_chat, saved.new.click, store_in, _switching(tab)),
        SavedChatEvent(open_chat, saved.picker.input, {*store_in, saved.picker}, _switching(tab)),
        SavedChatEvent(rename_chat, saved.rename.click, {*store_in, saved.title}, _storing(tab)),
        SavedChatEvent(delete_chat, saved.delete.click, store_in, _switching(tab)),
        SavedChatEvent(export_json, saved.export_json.click, store_in, exported),
        SavedChatEvent(export_markdown, saved.export_markdown.click, store_in, exported),
        SavedChatEvent(
            import_chats, saved.import_btn.click, {*store_in, saved.pasted}, _storing(tab, saved.pasted)
        ),
    ]


def restored_outputs(tab: ChatTab) -> list:
    """What :func:`restore` updates, the panel's message last (never the store: writing it would
    fire its change event again)."""
    saved = tab.saved
    return [tab.turns, tab.chatbot, tab.context_line, saved.chat_id, saved.picker, saved.title, saved.message]


def saved_outputs(tab: ChatTab) -> list:
    """What :func:`save_current` updates after each change to the conversation."""
    saved = tab.saved
    return [saved.store, saved.chat_id, saved.picker, saved.title]


def wire_saved_chats(service: DemoService, tab: ChatTab) -> None:
    """Connect the saved-chats panel's events (:func:`saved_chat_events`) to their handlers."""
    for event in saved_chat_events(tab):
        event.trigger(
            bind(event.handler, service, tab),
            event.inputs,
            event.outputs,
            api_visibility="private",
            queue=False,
        )


# ---------------------------------------------------------------------------------- handlers
def restore(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """When the browser's store arrives (page load), changes, or the Chat tab opens: list its
    chats, and show the chat it had open, if this page shows no conversation yet (never replacing
    one on screen, even one whose first reply is still streaming). A store over the size limit is
    cut to its newest chats first (:func:`~optdemo.app.chats.bounded`), and the message says so."""
    store, left_out = chats.bounded(values[tab.saved.store])
    blank = values[tab.saved.chat_id] is None and not values[tab.chatbot]
    updates = _unchanged(restored_outputs(tab))  # the message too, unless a store was cut
    if not blank or store["current"] is None:
        updates[tab.saved.picker] = _picker(store, values[tab.saved.chat_id])
    else:
        updates.update(_show(tab, store, chats.find(store, store["current"])))
    if left_out:
        updates[tab.saved.message] = (
            f"{left_out} older saved chat{' was' if left_out == 1 else 's were'} left out: this "
            f"browser's saved chats held more than {chats.MAX_STORE_CHARS} characters, the limit here, "
            "and the oldest are forgotten at the next save; delete chats you no longer need to keep room"
        )
    return updates


def save_current(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """After each change to the conversation: keep it in the browser (a chat emptied by clear or
    undo is removed)."""
    saved = tab.saved
    store = chats.normalized(values[saved.store])
    turns = list(values[tab.turns] or [])
    store, chat_id = chats.save(store, values[saved.chat_id], turns)
    chat = chats.find(store, chat_id)
    return {
        saved.store: store,
        saved.chat_id: chat_id,
        saved.picker: _picker(store, chat_id),
        saved.title: chat["title"] if chat else "",
    }


def new_chat(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Start an empty conversation; the current one stays in the list."""
    store = chats.normalized(values[tab.saved.store])
    store = {**store, "current": None}
    return {**_show(tab, store, None), tab.saved.store: store, tab.saved.message: ""}


def open_chat(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Show the chat picked in the list (a chat no longer there, or the one on screen: nothing
    changes, and the message says so for the first)."""
    store = chats.normalized(values[tab.saved.store])
    chat = chats.find(store, values[tab.saved.picker])
    if chat is None and values[tab.saved.picker]:
        return _unchanged(_switching(tab), "That chat is no longer saved in this browser: pick another.")
    if chat is None or chat["id"] == values[tab.saved.chat_id]:
        return _unchanged(_switching(tab))  # the one on screen, or none picked: nothing to do
    store = {**store, "current": chat["id"]}
    return {**_show(tab, store, chat), tab.saved.store: store, tab.saved.message: ""}


def rename_chat(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Give the current chat the name typed in the name field; what prevents it is said in the
    panel's message."""
    saved = tab.saved
    outputs = _storing(tab)
    store = chats.normalized(values[saved.store])
    chat_id = values[saved.chat_id]
    if chats.find(store, chat_id) is None:
        return _unchanged(outputs, "Nothing to rename yet: send a message first, or pick a saved chat.")
    try:
        store = chats.rename(store, chat_id, values[saved.title])
    except chats.ChatStoreError as exc:
        return _unchanged(outputs, f"Not renamed: {exc}.")
    return {saved.store: store, saved.picker: _picker(store, chat_id), saved.message: "Renamed."}


def delete_chat(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Forget the current chat (in this browser) and start an empty one."""
    store = chats.normalized(values[tab.saved.store])
    gone = chats.find(store, values[tab.saved.chat_id]) is not None
    store = chats.delete(store, values[tab.saved.chat_id])
    message = "Deleted." if gone else "Nothing to delete: this chat was not saved."
    return {**_show(tab, store, None), tab.saved.store: store, tab.saved.message: message}


def export_json(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Every saved chat as JSON (import it back here or in another browser)."""
    store = chats.normalized(values[tab.saved.store])
    return {
        tab.saved.exported: gr.update(value=chats.to_json(store["chats"]), language="json"),
        tab.saved.message: _exported(store),
    }


def export_markdown(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Every saved chat as Markdown, to read or to import back."""
    store = chats.normalized(values[tab.saved.store])
    return {
        tab.saved.exported: gr.update(value=chats.to_markdown(store["chats"]), language="markdown"),
        tab.saved.message: _exported(store),
    }


def _exported(store: chats.Store) -> str:
    count = len(store["chats"])
    if not count:
        return "No saved chats to export yet: the export is empty."
    return f"Exported {count} chat{'s' if count != 1 else ''}: copy or download it below."


def import_chats(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Add the chats of a pasted export (JSON or Markdown) to this browser's list; what prevents
    it is said in the panel's message, and the pasted text stays to be fixed."""
    saved = tab.saved
    outputs = _storing(tab, saved.pasted)
    try:
        imported = chats.parse_export(values[saved.pasted])
        store = chats.add_imported(chats.normalized(values[saved.store]), imported)
    except chats.ChatStoreError as exc:
        return _unchanged(outputs, f"Not imported: {exc}.")
    count = f"{len(imported)} chat{'s' if len(imported) != 1 else ''}"
    return {
        saved.store: store,
        saved.picker: _picker(store, values[saved.chat_id]),
        saved.pasted: "",
        saved.message: f"Imported {count}: pick one in the list.",
    }
