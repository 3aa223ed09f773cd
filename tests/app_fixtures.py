"""Helpers for the tests that launch the app: start a server on a free port, stop it cleanly.

Imported by test_app_api.py and test_browser.py (conftest.py, owned by the engine tests, already
sets the offline environment and a per-session OPTDEMO_CACHE before anything is imported).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

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


@contextlib.contextmanager
def running_app(flags: Sequence[str] = (), token: str | None = FAKE_TOKEN) -> Iterator[RunningApp]:
    """Launch the app with ``flags`` on 127.0.0.1 and a free port; unload and close afterwards.

    ``HF_TOKEN`` is set to ``token`` for the app's lifetime (and restored after), so tests can check
    that it never leaks into a response.
    """
    from optdemo.settings import parse_settings
    from optdemo.ui import create_app, launch

    with _env("HF_TOKEN", token):
        demo, service = create_app(parse_settings(list(flags), env={}))
        try:
            _, url, _ = launch(demo, service.settings, prevent_thread_lock=True, quiet=True, server_port=None)
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
