"""A browser's saved conversations: plain data, kept in the browser, never on the server.

The Chat tab keeps a *store* in the browser's localStorage (Gradio's ``BrowserState``): a dict
``{"chats": [chat, ...], "current": id}`` where a chat is ``{"id", "title", "turns", "updated"}``
and a turn is ``{"user", "assistant", "stats"}``. The functions here change a store and return a
new one (never mutating their input), and export/import chats as JSON and as Markdown, so the tab's
handlers stay thin and all of it is tested without a browser.

The store comes from the browser with each event, so its size is checked before anything reads it:
:func:`bounded` measures chats in order, newest first, and stops at the first that passes
``MAX_STORE_CHARS`` (:func:`store_size` stops counting there too), so a forged or damaged store of
any size costs the server no more than the limit.
"""

from __future__ import annotations

import itertools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from optdemo.core.defaults import MAX_SAVED_CHATS_CHARS
from optdemo.core.errors import OptdemoError

Turn = dict  # {"user": str, "assistant": str, "stats": str}
Chat = dict  # {"id": str, "title": str, "turns": list[Turn], "updated": float}
Store = dict  # {"chats": list[Chat], "current": str | None}

EXPORT_FORMAT = "optdemo-chats"  # the "format" field of an exported JSON file
EXPORT_VERSION = 1
MAX_SAVED_CHATS = 100  # the oldest chats beyond this are forgotten
MAX_STORE_CHARS = MAX_SAVED_CHATS_CHARS  # ...and beyond this size (characters, about its JSON's)
MAX_IMPORT_CHARS = MAX_STORE_CHARS  # largest export accepted back (checked before it is parsed)
TITLE_CHARS = 48  # a new chat's title: the start of its first message
USER_HEADING = "### User"
ASSISTANT_HEADING = "### Assistant"


class ChatStoreError(OptdemoError, ValueError):
    """A rename or an import that cannot be done (the message says what to do)."""


def empty_store() -> Store:
    """A store with no chats (the BrowserState's default)."""
    return {"chats": [], "current": None}


def normalized(store: Any) -> Store:
    """A valid store from whatever the browser sent (None, an older shape, damaged data), within
    the size limit (see :func:`bounded`)."""
    return bounded(store)[0]


def bounded(store: Any) -> tuple[Store, int]:
    """A valid store from whatever the browser sent, and how many chats were left out of it: its
    first (newest) chats up to ``MAX_SAVED_CHATS`` and ``MAX_STORE_CHARS``. The first chat that
    does not fit ends it, so what lies beyond is never read."""
    if not isinstance(store, dict) or not isinstance(store.get("chats"), list):
        return empty_store(), 0
    raw = store["chats"]
    kept = _first_that_fit(raw)
    chats = [chat for chat in (_clean_chat(c) for c in kept) if chat is not None]
    ids = {chat["id"] for chat in chats}
    current = store.get("current") if store.get("current") in ids else None
    return {"chats": chats, "current": current}, len(raw) - len(kept)


def store_size(value: object, limit: int) -> int:
    """About the size of ``value``'s JSON (a store, a chat): each text's characters and its two
    quotes, one for every other value. Counting stops once past ``limit`` (every value counts at
    least one), so measuring costs no more than the limit whatever the value holds."""
    size = 0
    pending: list[Iterator[object]] = [iter((value,))]
    while pending and size <= limit:
        item = next(pending[-1], _END)
        if item is _END:
            pending.pop()
        elif isinstance(item, str):
            size += len(item) + 2
        else:
            size += 1
            if isinstance(item, dict):
                pending.append(itertools.chain.from_iterable(item.items()))
            elif isinstance(item, (list, tuple)):
                pending.append(iter(item))
    return size


_END = object()  # store_size's "no more items here"


def find(store: Store, chat_id: str | None) -> Chat | None:
    """The chat with ``chat_id``, or None."""
    return next((chat for chat in store["chats"] if chat["id"] == chat_id), None)


def choices(store: Store) -> list[tuple[str, str]]:
    """(title, id) pairs for a picker, most recently changed first."""
    ordered = sorted(store["chats"], key=lambda chat: chat["updated"], reverse=True)
    return [(chat["title"], chat["id"]) for chat in ordered]


def title_for(turns: list[Turn]) -> str:
    """A new chat's title: the start of its first message."""
    first = " ".join(str(turns[0]["user"]).split()) if turns else ""
    if not first:
        return "New chat"
    return first if len(first) <= TITLE_CHARS else first[: TITLE_CHARS - 1].rstrip() + "…"


def save(
    store: Store, chat_id: str | None, turns: list[Turn], now: float | None = None
) -> tuple[Store, str | None]:
    """Store ``turns`` as chat ``chat_id`` (a new chat when None) and make it current; returns the
    new store and the chat's id. A chat with no turns is removed (nothing worth keeping); the
    oldest chats beyond the store's limits are forgotten (and a chat too big to keep, its id None)."""
    now = time.time() if now is None else now
    chats = [dict(chat) for chat in store["chats"]]
    existing = next((chat for chat in chats if chat["id"] == chat_id), None)
    if not turns:
        return {"chats": [c for c in chats if c["id"] != chat_id], "current": None}, None
    if existing is None:
        existing = {"id": chat_id or new_id(), "title": title_for(turns), "turns": [], "updated": now}
        chats.append(existing)
    existing.update(turns=[dict(turn) for turn in turns], updated=now)
    chats = _newest(chats)
    saved = existing["id"] if any(chat is existing for chat in chats) else None  # None: too big to keep
    return {"chats": chats, "current": saved}, saved


def rename(store: Store, chat_id: str | None, title: str) -> Store:
    """The store with chat ``chat_id`` titled ``title`` (unchanged if there is no such chat)."""
    title = " ".join(str(title or "").split())[:200]
    if not title:
        raise ChatStoreError("a chat's name cannot be empty: type one")
    chats = [dict(chat, title=title) if chat["id"] == chat_id else chat for chat in store["chats"]]
    return {"chats": chats, "current": store["current"]}


def delete(store: Store, chat_id: str | None) -> Store:
    """The store without chat ``chat_id``; no chat is current afterwards."""
    return {"chats": [chat for chat in store["chats"] if chat["id"] != chat_id], "current": None}


def add_imported(store: Store, imported: list[Chat], now: float | None = None) -> Store:
    """The store with ``imported`` chats added (new ids, so importing twice never overwrites).

    Raises:
        ChatStoreError: together they would pass ``MAX_STORE_CHARS``.
    """
    now = time.time() if now is None else now
    added = [dict(chat, id=new_id(), updated=now + index * 1e-3) for index, chat in enumerate(imported)]
    chats = [*store["chats"], *added]
    if store_size(chats, MAX_STORE_CHARS) > MAX_STORE_CHARS:
        raise ChatStoreError(
            f"importing these chats would take this browser's saved chats over {MAX_STORE_CHARS} "
            "characters, the limit here: delete some saved chats (or import fewer) first"
        )
    return {"chats": _newest(chats), "current": store["current"]}


def new_id() -> str:
    """A fresh chat id."""
    return uuid.uuid4().hex[:12]


# ---------------------------------------------------------------- export / import
def to_json(chats: list[Chat]) -> str:
    """Chats as a JSON document that :func:`parse_export` reads back."""
    exported = [{"title": c["title"], "turns": c["turns"]} for c in chats]
    document = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "chats": exported}
    return json.dumps(document, ensure_ascii=False, indent=2)


def to_markdown(chats: list[Chat]) -> str:
    """Chats as Markdown (a ``##`` heading per chat, ``### User`` / ``### Assistant`` per message)
    that people read and :func:`parse_export` reads back."""
    parts = []
    for chat in chats:
        lines = [f"## {chat['title']}", ""]
        for turn in chat["turns"]:
            lines += [
                USER_HEADING,
                "",
                turn["user"].strip(),
                "",
                ASSISTANT_HEADING,
                "",
                turn["assistant"].strip(),
                "",
            ]
        parts.append("\n".join(lines))
    return "\n".join(parts).rstrip() + "\n"


def parse_export(text: object) -> list[Chat]:
    """Chats from an export (JSON or Markdown, as written by :func:`to_json` / :func:`to_markdown`).

    Raises:
        GenerationError: the text is neither, or holds no conversation.
    """
    if not isinstance(text, str) or not text.strip():
        raise ChatStoreError("nothing to import: paste an exported chat (JSON or Markdown)")
    if len(text) > MAX_IMPORT_CHARS:
        raise ChatStoreError(
            f"the import is {len(text)} characters long; the limit is {MAX_IMPORT_CHARS}: import fewer "
            "chats at a time"
        )
    chats = _parse_json(text) if text.lstrip().startswith("{") else _parse_markdown(text)
    chats = [chat for chat in chats if chat["turns"]]
    if not chats:
        raise ChatStoreError(
            "no conversation found: paste a JSON export (format optdemo-chats) or a Markdown one "
            f"('## title', then '{USER_HEADING}' and '{ASSISTANT_HEADING}' sections)"
        )
    return chats


def _parse_json(text: str) -> list[Chat]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ChatStoreError(f"the JSON export is damaged ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ChatStoreError(f'this JSON is not a chat export: it lacks "format": "{EXPORT_FORMAT}"')
    raw = document.get("chats") if isinstance(document.get("chats"), list) else []
    return [chat for chat in (_clean_chat({"id": "", "updated": 0.0, **c}) for c in raw) if chat is not None]


def _parse_markdown(text: str) -> list[Chat]:
    chats: list[Chat] = []
    role: str | None = None
    lines: list[str] = []

    def flush() -> None:
        if role is None or not chats:
            return
        content = "\n".join(lines).strip()
        turns = chats[-1]["turns"]
        if role == "user":
            turns.append({"user": content, "assistant": "", "stats": ""})
        elif turns:
            turns[-1]["assistant"] = content

    for line in text.splitlines():
        heading = line.rstrip()
        if heading.startswith("## ") or heading in (USER_HEADING, ASSISTANT_HEADING):
            flush()
            lines = []
            if heading.startswith("## "):
                chats.append(
                    {"id": "", "title": heading[3:].strip() or "Imported chat", "turns": [], "updated": 0.0}
                )
                role = None
            else:
                if not chats:  # messages before any title: one untitled chat
                    chats.append({"id": "", "title": "Imported chat", "turns": [], "updated": 0.0})
                role = "user" if heading == USER_HEADING else "assistant"
        else:
            lines.append(line)
    flush()
    return chats


def _clean_chat(chat: Any) -> Chat | None:
    """A chat with the expected fields and types, or None when it is not one."""
    if not isinstance(chat, dict) or not isinstance(chat.get("turns"), list):
        return None
    turns = [
        {key: str(turn.get(key) or "") for key in ("user", "assistant", "stats")}
        for turn in chat["turns"]
        if isinstance(turn, dict)
    ]
    updated = chat.get("updated")
    return {
        "id": str(chat.get("id") or new_id()),
        "title": str(chat.get("title") or title_for(turns))[:200],
        "turns": turns,
        "updated": float(updated) if isinstance(updated, (int, float)) else 0.0,
    }


def _newest(chats: list[Chat]) -> list[Chat]:
    """The most recently changed chats, at most ``MAX_SAVED_CHATS`` and ``MAX_STORE_CHARS``."""
    return _first_that_fit(sorted(chats, key=lambda chat: chat["updated"], reverse=True))


def _first_that_fit(chats: list[Any]) -> list[Any]:
    """The first ``chats`` within ``MAX_SAVED_CHATS`` and ``MAX_STORE_CHARS``: the first that
    does not fit ends the list, and nothing after it is read."""
    kept, room = [], MAX_STORE_CHARS
    for chat in chats[:MAX_SAVED_CHATS]:
        size = store_size(chat, room)
        if size > room:
            break
        kept.append(chat)
        room -= size
    return kept
