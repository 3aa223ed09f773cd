"""One admission limit for every reply, whichever route it came by.

A reply holds a place from the moment it asks for the model until it ends: while it waits in the
batching engine's line and while it is written. The places are ``--max-batch`` (written together)
plus ``--queue-size`` (waiting their turn); a reply that finds them all taken is refused at once
with :class:`QueueFullError`, never queued somewhere else. :class:`~optdemo.app.service.DemoService`
takes a place around every chat and completion, so the page, the named API (through Gradio's
queue), MCP and the OpenAI routes (a 429 there) all count against the same number.

Why a refusal rather than a longer line: each reply let in holds a worker thread while it waits
for the model, so the count bounds the threads replies can take, and the web layer sizes Gradio's
threads above it; Status and Stop then always find one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from optdemo.core.errors import BusyError


class QueueFullError(BusyError):
    """Every place for a reply is taken: this one was refused at once (try again in a moment)."""


class Admission:
    """The count of replies let in (waiting for the model or being written); thread-safe."""

    def __init__(self, waiting: int, running: int) -> None:
        """Args:
        waiting: replies that may wait for a place in the batch (``--queue-size``).
        running: replies written together (``--max-batch``).
        """
        self.waiting = waiting
        self.limit = waiting + running  # the places: every reply let in holds one until it ends
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        """How many replies hold a place now."""
        with self._lock:
            return self._count

    def enter(self) -> None:
        """Take a place, or refuse at once when none is left.

        Raises:
            QueueFullError: ``limit`` replies hold a place already.
        """
        with self._lock:
            if self._count >= self.limit:
                raise QueueFullError(
                    f"too many requests are waiting (at most {self.waiting} here): try again in a moment"
                )
            self._count += 1

    def leave(self) -> None:
        """Give a place back (once per :meth:`enter` that succeeded)."""
        with self._lock:
            if self._count <= 0:
                raise RuntimeError("a place was given back that nobody held")
            self._count -= 1

    @contextlib.contextmanager
    def place(self) -> Iterator[None]:
        """Hold a place for the ``with`` block (refused at entry, see :meth:`enter`)."""
        self.enter()
        try:
            yield
        finally:
            self.leave()
