"""Compose the Gradio app: three tabs over one shared service, plus the named API."""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TextIO

import anyio.to_thread
import gradio as gr
from starlette.middleware import Middleware

from optdemo.app.service import DemoService
from optdemo.app.settings import AppSettings
from optdemo.core import defaults
from optdemo.runtime.manager import ModelManager
from optdemo.web.admin_routes import AdminRoutes
from optdemo.web.api import REPLY_GROUP, leaving, register_api
from optdemo.web.binding import bind
from optdemo.web.mcp import McpGate, keep_only_mcp_tools, mcp_middleware, register_mcp_tools
from optdemo.web.openai_routes import OpenAIServer
from optdemo.web.tabs.chat import layout_chat_tab, wire_chat_tab
from optdemo.web.tabs.chat_components import ChatTab, ModelLink
from optdemo.web.tabs.chat_history import browser_store, restore, restored_outputs
from optdemo.web.tabs.chat_model import refresh_model_line
from optdemo.web.tabs.config import (
    page_load,
    refresh_machine,
    refresh_status,
    wire_config_tab,
)
from optdemo.web.tabs.config_components import ConfigTab
from optdemo.web.tabs.config_layout import layout_config_tab
from optdemo.web.tabs.devicemap import DeviceMapTab, layout_devicemap_tab, wire_devicemap_tab
from optdemo.web.tabs.sign_in import admin_controls, refresh_admin

# The concurrency limit of the events that name none (demo.queue's default_concurrency_limit).
DEFAULT_CONCURRENCY = 1
# Gradio runs sync handlers on anyio's default thread limiter, which FastAPI's own sync work (the
# login check every Gradio route depends on, /gradio_api/info) shares, exactly when max_threads is
# this number; any other gives the handlers a limiter of their own.
ANYIO_DEFAULT_THREADS = 40

# What Gradio prints at start-up when the app is not shared, and what optdemo says instead.
GRADIO_SHARE_ADVICE = "To create a public link, set `share=True` in `launch()`."
SHARE_ADVICE = (
    "To create a public link, start optdemo with --share (public mode: visitors chat, admins load)."
)

THEME = gr.themes.Soft(primary_hue="blue", neutral_hue="slate")
CSS = """
#od-header h1 { margin-bottom: 0; }
#od-header p { margin-top: 4px; color: var(--body-text-color-subdued); }
/* Long paths (offload folder, caches, models) wrap instead of being clipped. */
.od-paths, .od-paths code { overflow-wrap: anywhere; word-break: break-word; white-space: normal; }
#od-theme { max-width: 150px; margin-left: auto; }
"""
# Light/dark: Gradio's dark mode is the "dark" class on <body>. The button flips it in the browser
# (no server round trip) and remembers the choice in localStorage; each page load applies it.
TOGGLE_THEME_JS = """() => {
  const dark = document.body.classList.toggle('dark');
  localStorage.setItem('optdemo-theme', dark ? 'dark' : 'light');
}"""
# As the page loads: apply the remembered theme; and make Enter in a number box (a slider's, as
# the CPU RAM one) leave the box, which is what tells Gradio the value is final (the slider's
# "release"): typing a budget and pressing Enter re-plans, as dragging the slider does.
PAGE_JS = """() => {
  const saved = localStorage.getItem('optdemo-theme');
  if (saved) document.body.classList.toggle('dark', saved === 'dark');
  if (window.optdemoEnterLeaves) return;
  window.optdemoEnterLeaves = true;
  document.addEventListener('keydown', (event) => {
    const box = event.target;
    if (event.key === 'Enter' && box instanceof HTMLInputElement && box.type === 'number') box.blur();
  }, true);
}"""


def build_app(service: DemoService) -> gr.Blocks:
    """The app's Blocks: Configuration, Device map and Chat tabs wired to ``service``."""
    with gr.Blocks(title="optdemo: models bigger than your GPU") as demo:
        with gr.Row(equal_height=True):
            gr.Markdown(
                "# optdemo\nRun models larger than your GPU: plan where every layer goes (GPU, CPU "
                "RAM, disk), load with Accelerate, and chat.",
                elem_id="od-header",
            )
            theme = gr.Button("◐ Dark / light", size="sm", elem_id="od-theme", scale=0, min_width=130)
        theme.click(None, js=TOGGLE_THEME_JS, api_visibility="private", queue=False)
        demo.load(None, js=PAGE_JS, api_visibility="private", queue=False)
        register_api(service)  # first, so the named endpoints keep their names
        demo.unload(leaving(service))  # a closed tab ends its reply, whatever the backend is doing
        if service.settings.mcp:
            register_mcp_tools(service)
        store = browser_store()  # outside the tabs: it reads localStorage as the page loads
        with gr.Tabs():
            with gr.Tab("Configuration", id="configuration"):
                config = layout_config_tab(service)
            with gr.Tab("Device map", id="device-map") as map_tab:
                device_map = layout_devicemap_tab(config.plan_state)
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat = layout_chat_tab(
                    service, store, ModelLink(config.plan_state, config.loaded, config.status)
                )
        wire_config_tab(service, config)
        wire_chat_tab(service, chat)
        wire_across_tabs(demo, service, config, device_map, chat, map_tab.select, chat_tab.select)
    # api_open=False: Gradio's direct route (/gradio_api/run/<name>) refuses the endpoints that go
    # through the queue, since it would skip the queue and its limits (it is closed on Spaces by
    # default too). gradio_client and the page join the queue, and /gradio_api/call/<name> is
    # Gradio's REST route through it; Status, Stop, clear_chat and sign_in never queue, so they
    # stay on the direct route as well.
    # Replies leave Gradio's queue as soon as they arrive (the admission answers them), so its
    # events wait only for a worker or their group's turn (plans, loads): it may hold as many as
    # there are workers, and a burst of replies reaches the admission rather than Gradio's cut.
    demo.queue(
        max_size=worker_threads(demo, service.admission.limit),
        default_concurrency_limit=DEFAULT_CONCURRENCY,
        api_open=False,
    )
    return demo


def wire_across_tabs(
    demo: gr.Blocks,
    service: DemoService,
    config: ConfigTab,
    device_map: DeviceMapTab,
    chat: ChatTab,
    map_opened: Any,
    chat_opened: Any,
) -> None:
    """What crosses tabs: the map follows the session's plan and the loaded model; the chat's model
    line follows loads and the selected model; the page's load shows the loaded configuration in
    the form (or plans the default one), the status line, this browser's saved chats, and an admin
    still signed in. After a load the Configuration tab keeps the load's own message."""
    private = {"api_visibility": "private", "queue": False}
    wire_devicemap_tab(service, device_map, [config.plan_state.change, config.loaded.change, map_opened])
    gr.on(
        [demo.load, config.loaded.change, chat_opened, config.plan_state.change],
        bind(refresh_model_line, service, chat),
        {
            config.plan_state,
            chat.message,
            chat.system_prompt,
            chat.prompt,
            chat.mode,
            chat.controls.max_new_tokens,
        },
        [chat.model_line, chat.controls.max_new_tokens, chat.hint],
        **private,
    )
    # This browser's saved chats: the one it had open comes back after a reload. The store reaches
    # the page from localStorage as the page mounts, as a change; opening the Chat tab tries again,
    # should the store arrive after the page's load event.
    gr.on(
        [demo.load, chat.saved.store.change, chat_opened],
        bind(restore, service, chat),
        {chat.saved.store, chat.saved.chat_id, chat.chatbot},
        restored_outputs(chat),
        show_progress="hidden",  # instant, and mostly a no-op: no flicker over the chat
        **private,
    )
    demo.load(
        bind(page_load, service, config),
        config.form,
        [*config.fields, config.summary, config.plan_state],
        show_progress="hidden",  # the summary says "Planning…"; no spinner over every field
        api_visibility="private",
    )
    demo.load(bind(refresh_status, service, config), {config.loaded}, config.status, **private)
    machine = [config.offload_info, config.machine, config.cache_info]
    demo.load(bind(refresh_machine, service, config), {config.offload}, machine, **private)
    if config.sign_in is not None:  # a reload keeps an admin signed in (the cookie says so)
        admin = bind(refresh_admin, service, config)
        demo.load(admin, {config.loaded}, admin_controls(config), **private)


def worker_threads(demo: gr.Blocks, replies: int) -> int:
    """Gradio's threads and queue workers (``launch(max_threads=...)``) for ``demo``: one for each
    of the ``replies`` the admission lets in (a reply holds one while it waits for the model), the
    limit of every other concurrency group (plans, loads, Status, Stop, the page's events), and a
    few for direct calls, so that replies can never take the thread Status or Stop needs. Never
    :data:`ANYIO_DEFAULT_THREADS`, so FastAPI's own work keeps anyio's default limiter to itself."""
    groups: dict[str, int] = {}
    for fn in demo.fns.values():
        if fn.fn is None or fn.concurrency_id == REPLY_GROUP:
            continue  # a browser-only event, or a reply (counted by the admission)
        limit = DEFAULT_CONCURRENCY if fn.concurrency_limit == "default" else fn.concurrency_limit
        if limit is None:
            raise RuntimeError(f"the event {fn.api_name} needs a concurrency limit: only replies go without")
        groups[fn.concurrency_id] = min(groups.get(fn.concurrency_id, limit), limit)
    threads = replies + sum(groups.values()) + defaults.DIRECT_CALL_THREADS
    return max(threads, ANYIO_DEFAULT_THREADS + 1)


def create_app(settings: AppSettings, manager: ModelManager | None = None) -> tuple[gr.Blocks, DemoService]:
    """Build the service and the Blocks for ``settings`` (one manager per process)."""
    service = DemoService.for_settings(settings, manager)
    return build_app(service), service


def launch(demo: gr.Blocks, service: DemoService, **overrides: object) -> tuple:
    """Launch with the app's theme and the settings' network options; returns Gradio's tuple.

    The OpenAI-compatible API's routes and the browser's admin sign-in routes
    (:mod:`optdemo.web.admin_routes`) go into Gradio's FastAPI app as it is created (FastAPI's
    ``routes`` argument, through ``app_kwargs``), so they answer from the first request on, on the
    same server and port as the UI. With ``--mcp`` Gradio's MCP server is mounted too
    (``/gradio_api/mcp/``), cut to the tools :mod:`optdemo.web.mcp` names as the server starts
    (the app's lifespan); with ``--api-key`` as well, its middleware makes the MCP server want the
    key. Gradio's threads are sized by :func:`worker_threads`.
    """
    settings = service.settings
    threads = worker_threads(demo, service.admission.limit)
    app_kwargs = {
        "routes": [*OpenAIServer(service).routes(), *AdminRoutes(service).routes()],
        "lifespan": server_lifespan(demo, threads),
        # An MCP call beyond the ones the queue could run anyway is refused (a 429) at once; with
        # --api-key, the MCP server wants the key.
        "middleware": [Middleware(McpGate, limit=threads), *mcp_middleware(settings)],
    }
    options: dict[str, object] = {
        "app_kwargs": app_kwargs,
        "max_threads": threads,
        "mcp_server": settings.mcp,
        "server_name": settings.host,
        "server_port": settings.port,
        "share": settings.share,
        "theme": THEME,
        "css": CSS,
        "show_error": True,
        "footer_links": ["api", "gradio"],
    }
    options.update(overrides)
    # Gradio prints its start-up lines (local URL, how to get a public link) during launch; the
    # server then runs in its own threads, and this thread waits as Gradio's own launch would.
    block = not options.get("prevent_thread_lock", False)
    options["prevent_thread_lock"] = True
    with contextlib.redirect_stdout(OptdemoWords(sys.stdout)):
        started = demo.launch(**options)
    if block:
        demo.block_thread()
    return started


class OptdemoWords(io.TextIOBase):
    """Gradio's start-up lines as they are, but its advice for a public link, which names its own
    API (``share=True`` in ``launch()``): here the flag is ``--share``."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def write(self, text: str) -> int:
        """Write ``text`` on, with Gradio's share advice replaced by optdemo's."""
        self.out.write(text.replace(GRADIO_SHARE_ADVICE, SHARE_ADVICE))
        return len(text)

    def flush(self) -> None:
        """Flush the stream written to."""
        self.out.flush()


def server_lifespan(demo: gr.Blocks, threads: int) -> Callable[[Any], AbstractAsyncContextManager[None]]:
    """The lifespan of ``demo``'s server (``launch(app_kwargs={"lifespan": ...})``), run in its
    event loop before the first request: MCP keeps only its tools, and anyio's default limiter
    (FastAPI's sync work, Gradio's MCP waits: at most ``threads`` of those, :class:`McpGate`) gets
    room for both, so MCP calls can never take the thread a route's login check needs."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        keep_only_mcp_tools(demo)
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, ANYIO_DEFAULT_THREADS + threads)
        yield

    return lifespan
