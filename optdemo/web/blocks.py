"""Compose the Gradio app: three tabs over one shared service, plus the named API."""

from __future__ import annotations

import gradio as gr

from optdemo.app.service import DemoService
from optdemo.app.settings import AppSettings
from optdemo.runtime.manager import ModelManager
from optdemo.web.admin_routes import AdminRoutes
from optdemo.web.api import register_api
from optdemo.web.binding import bind
from optdemo.web.mcp import keep_only_mcp_tools, mcp_middleware, register_mcp_tools
from optdemo.web.openai_routes import OpenAIServer
from optdemo.web.tabs.chat import layout_chat_tab, refresh_model_line, wire_chat_tab
from optdemo.web.tabs.chat_history import browser_store, restore
from optdemo.web.tabs.config import layout_config_tab, preview, refresh_status, wire_config_tab
from optdemo.web.tabs.devicemap import layout_devicemap_tab, wire_devicemap_tab
from optdemo.web.tabs.sign_in import admin_controls, refresh_admin

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
APPLY_THEME_JS = """() => {
  const saved = localStorage.getItem('optdemo-theme');
  if (saved) document.body.classList.toggle('dark', saved === 'dark');
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
        demo.load(None, js=APPLY_THEME_JS, api_visibility="private", queue=False)
        register_api(service)  # first, so the named endpoints keep their names
        if service.settings.mcp:
            register_mcp_tools(service)
        store = browser_store()  # outside the tabs: it reads localStorage as the page loads
        with gr.Tabs():
            with gr.Tab("Configuration", id="configuration"):
                config = layout_config_tab(service)
            with gr.Tab("Device map", id="device-map") as map_tab:
                device_map = layout_devicemap_tab(config.plan_state)
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat = layout_chat_tab(service, store)
        wire_config_tab(service, config)
        wire_chat_tab(service, chat)
        # Across tabs: the map follows the session's plan and the loaded model; the chat's model
        # line follows loads. After a load the Configuration tab keeps the load's own message.
        wire_devicemap_tab(
            service, device_map, [config.plan_state.change, config.loaded.change, map_tab.select]
        )
        private = {"api_visibility": "private", "queue": False}
        gr.on(
            [demo.load, config.loaded.change, chat_tab.select],
            bind(refresh_model_line, service, chat),
            {chat.turns, chat.controls.max_new_tokens},
            [chat.model_line, chat.controls.max_new_tokens],
            **private,
        )
        # This browser's saved chats: the one it had open comes back after a reload. The store
        # reaches the page from localStorage as the page mounts, as a change.
        restored = [chat.turns, chat.chatbot, chat.context_line, *chat.saved.restored_outputs()]
        # Opening the Chat tab tries again, should the store arrive after the page's load event.
        gr.on(
            [demo.load, chat.saved.store.change, chat_tab.select],
            bind(restore, service, chat),
            {chat.saved.store, chat.saved.chat_id, chat.chatbot},
            restored,
            show_progress="hidden",  # instant, and mostly a no-op: no flicker over the chat
            **private,
        )
        demo.load(
            bind(preview, service, config),
            config.form,
            [config.summary, config.plan_state],
            api_visibility="private",
        )
        demo.load(bind(refresh_status, service, config), {config.loaded}, config.status, **private)
        if config.sign_in is not None:  # a reload keeps an admin signed in (the cookie says so)
            admin = bind(refresh_admin, service, config)
            demo.load(admin, {config.loaded}, admin_controls(config), **private)
    if service.settings.mcp:
        keep_only_mcp_tools(demo)
    demo.queue(max_size=service.settings.queue_size, default_concurrency_limit=1)
    return demo


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
    (``/gradio_api/mcp/``), offering the tools :mod:`optdemo.web.mcp` leaves public; with
    ``--api-key`` as well, its middleware makes the MCP server want the key.
    """
    settings = service.settings
    options: dict[str, object] = {
        "app_kwargs": {
            "routes": [*OpenAIServer(service).routes(), *AdminRoutes(service).routes()],
            "middleware": mcp_middleware(settings),
        },
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
    return demo.launch(**options)
