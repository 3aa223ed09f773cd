"""Per-session state the server keeps: each session's running reply (to stop it), and the chat
histories of API clients (browser sessions keep theirs in the page)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from optdemo.core.chat_prompt import ChatTurn
from optdemo.core.defaults import MAX_API_SESSIONS


class SessionStore:
    """Stop events of running replies and an LRU of API chat histories; thread-safe."""

    def __init__(self, max_history_turns: int, max_sessions: int = MAX_API_SESSIONS) -> None:
        self.max_history_turns = max_history_turns
        self.max_sessions = max_sessions
        self._stops: dict[str, threading.Event] = {}
        self._histories: OrderedDict[str, list[ChatTurn]] = OrderedDict()
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- running replies
    def start_reply(self, session_id: str) -> threading.Event:
        """A fresh stop event for this session's new reply (replacing any earlier one)."""
        event = threading.Event()
        with self._lock:
            self._stops[session_id] = event
        return event

    def end_reply(self, session_id: str, event: threading.Event) -> None:
        """Forget a finished reply's stop event (unless a newer reply already replaced it)."""
        with self._lock:
            if self._stops.get(session_id) is event:
                del self._stops[session_id]

    def stop(self, session_id: str) -> bool:
        """Stop this session's running reply; True if there was one."""
        with self._lock:
            event = self._stops.get(session_id)
        if event is None:
            return False
        event.set()
        return True

    def stop_all(self) -> int:
        """Stop every running reply (the backend serving them is going away); how many."""
        with self._lock:
            events = list(self._stops.values())
        for event in events:
            event.set()
        return len(events)

    # ---------------------------------------------------------------- API chat histories
    def history(self, session_id: str) -> list[ChatTurn]:
        """The chat history of an API client session (a copy)."""
        with self._lock:
            return list(self._histories.get(session_id, []))

    def remember(self, session_id: str, turn: ChatTurn) -> None:
        """Append a finished turn, keeping the newest ``max_history_turns`` turns and the most
        recently used ``max_sessions`` sessions."""
        with self._lock:
            turns = self._histories.pop(session_id, [])
            self._histories[session_id] = [*turns, turn][-self.max_history_turns :]
            while len(self._histories) > self.max_sessions:
                self._histories.popitem(last=False)

    def forget(self, session_id: str) -> None:
        """Clear an API session's chat history."""
        with self._lock:
            self._histories.pop(session_id, None)
