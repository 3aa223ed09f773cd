"""Helpers for the tests that launch the app: start a server on a free port, stop it cleanly.

Imported by test_app_api.py and test_browser.py (conftest.py, owned by the engine tests, already
sets the offline environment and a per-session OPTDEMO_CACHE before anything is imported).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from optdemo.errors import NoModelError
from optdemo.generation import ChatTurn, GenerationParams, GenerationStats, GenerationUpdate
from optdemo.manager import ModelManager

FAKE_TOKEN = "hf_FAKEtoken123"  # set as HF_TOKEN while an app runs: it must never come back


@dataclass
class RunningApp:
    """A launched app: its Blocks, its service (for in-process checks) and its URL."""

    demo: Any
    service: Any
    url: str

    def client(self) -> Any:
        """A new gradio_client session on this app."""
        from gradio_client import Client

        return Client(self.url, verbose=False)


class ScriptedManager(ModelManager):
    """A model manager whose replies are known in advance: no model, no sampling.

    ``script`` maps a message (or prompt) to the replies it gets, in order (a retry gets the next
    one); each reply is the list of accumulated texts it streams, the last one with stats. A message
    without a reply left fails as a manager with no model loaded does. Every history a chat was
    given is kept in ``histories``; ``pause`` (when set) is waited on after the first step, so a
    test can act while a reply is running.
    """

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        super().__init__()
        self.script = {message: list(replies) for message, replies in script.items()}
        self.histories: list[list[ChatTurn]] = []
        self.pause: threading.Event | None = None

    def stream_chat(
        self,
        history: Sequence[ChatTurn],
        message: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
    ) -> Iterator[GenerationUpdate]:
        self.histories.append(list(history))
        yield from self.stream_completion(message, params, stop_event)

    def stream_completion(
        self, prompt: str, params: GenerationParams, stop_event: threading.Event | None = None
    ) -> Iterator[GenerationUpdate]:
        if not self.script.get(prompt):
            raise NoModelError("no model is loaded: load one first")
        steps = self.script[prompt].pop(0)
        for index, text in enumerate(steps):
            last = index == len(steps) - 1 or (stop_event is not None and stop_event.is_set())
            stats = GenerationStats(3, index + 1, 0.01, 0.1, 10.0, stopped=index < len(steps) - 1)
            yield GenerationUpdate(text, stats if last else None)
            if last:
                return
            if self.pause is not None and index == 0:
                self.pause.wait(10)


@contextlib.contextmanager
def running_app(
    flags: Sequence[str] = (), token: str | None = FAKE_TOKEN, manager: ModelManager | None = None
) -> Iterator[RunningApp]:
    """Launch the app with ``flags`` (and ``manager``, default a real one) on 127.0.0.1 and a free
    port; unload and close afterwards.

    ``HF_TOKEN`` is set to ``token`` for the app's lifetime (and restored after), so tests can check
    that it never leaks into a response.
    """
    from optdemo.settings import parse_settings
    from optdemo.ui import create_app, launch

    with _env("HF_TOKEN", token):
        demo, service = create_app(parse_settings(list(flags), env={}), manager)
        try:
            _, url, _ = launch(demo, service, prevent_thread_lock=True, quiet=True, server_port=None)
            yield RunningApp(demo, service, url.rstrip("/") + "/")
        finally:
            try:
                service.manager.unload()
            finally:
                demo.close()


@contextlib.contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
