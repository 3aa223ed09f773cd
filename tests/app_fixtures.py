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

from optdemo.core.chat_prompt import PLAIN_FORMAT, ChatTurn, check_max_new_tokens
from optdemo.core.defaults import MAX_NEW_TOKENS_LIMIT
from optdemo.core.errors import NoModelError
from optdemo.core.generation import CacheScope, GenerationParams, GenerationStats, GenerationUpdate
from optdemo.runtime.manager import ModelManager

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
    given is kept in ``histories`` (and each system prompt in ``system_prompts``); ``pause`` (when
    set) is waited on after the first step, so a test can act while a reply is running. Its "model"
    has a ``window`` of 512 tokens, a prompt counts one token per word, and max_new_tokens obeys
    the same rule as a real model's.
    """

    window = 512

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        super().__init__()
        self.script = {message: list(replies) for message, replies in script.items()}
        self.histories: list[list[ChatTurn]] = []
        self.system_prompts: list[str] = []
        self.pause: threading.Event | None = None

    def context_window(self) -> int | None:
        return self.window

    def chat_format(self) -> str | None:
        return PLAIN_FORMAT

    def stream_chat(
        self,
        history: Sequence[ChatTurn],
        message: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
        max_new_tokens_cap: int = MAX_NEW_TOKENS_LIMIT,
        system_prompt: str = "",
        cache_scope: CacheScope | None = None,
    ) -> Iterator[GenerationUpdate]:
        self.histories.append(list(history))
        self.system_prompts.append(system_prompt)
        yield from self.stream_completion(message, params, stop_event, max_new_tokens_cap)

    def stream_completion(
        self,
        prompt: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
        max_new_tokens_cap: int = MAX_NEW_TOKENS_LIMIT,
        cache_scope: CacheScope | None = None,
    ) -> Iterator[GenerationUpdate]:
        if not self.script.get(prompt):
            raise NoModelError("no model is loaded: load one first")
        check_max_new_tokens(params.max_new_tokens, self.window, len(prompt.split()), max_new_tokens_cap)
        steps = self.script[prompt].pop(0)
        for index, text in enumerate(steps):
            last = index == len(steps) - 1 or (stop_event is not None and stop_event.is_set())
            stopped = index < len(steps) - 1
            stats = GenerationStats(3, index + 1, 0.01, 0.1, 10.0, stopped, context_window=self.window)
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
    from optdemo.app.settings import parse_settings
    from optdemo.web.blocks import create_app, launch

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


def config_ui(manager: object = None, **settings: object) -> tuple[Any, Any]:
    """A service and its Configuration tab's components (inside a throwaway Blocks), for handler
    tests without a browser."""
    import gradio as gr

    from optdemo.app.service import DemoService
    from optdemo.app.settings import AppSettings
    from optdemo.web.tabs import config_layout

    service = DemoService(manager or ModelManager(), AppSettings(**settings))  # type: ignore[arg-type]
    with gr.Blocks():
        tab = config_layout.layout_config_tab(service)
    return service, tab


def form_values(tab: Any, **changes: object) -> dict:
    """The form as the page starts, with some controls changed (by ConfigTab field name)."""
    values = {control: control.value for control in tab.form}
    for name, value in changes.items():
        values[getattr(tab, name)] = value
    return values
