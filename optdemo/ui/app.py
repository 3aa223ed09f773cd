"""Compose the Gradio app: three tabs over one shared service, plus the named API."""

from __future__ import annotations

import gradio as gr

from optdemo.manager import ModelManager
from optdemo.service import DemoService, PlanView
from optdemo.settings import AppSettings
from optdemo.ui.api import register_api
from optdemo.ui.chat_tab import create_chat_tab
from optdemo.ui.config_tab import create_config_tab, status_text
from optdemo.ui.devicemap_tab import create_devicemap_tab, render_tab

THEME = gr.themes.Soft(primary_hue="blue", neutral_hue="slate")
CSS = """
#od-header h1 { margin-bottom: 0; }
#od-header p { margin-top: 4px; color: var(--body-text-color-subdued); }
"""


def build_app(service: DemoService) -> gr.Blocks:
    """The app's Blocks: Configuration, Device map and Chat tabs wired to ``service``."""
    with gr.Blocks(title="optdemo: models bigger than your GPU") as demo:
        gr.Markdown(
            "# optdemo\nRun models larger than your GPU: plan where every layer goes (GPU, CPU RAM, "
            "disk), load with Accelerate, and chat.",
            elem_id="od-header",
        )
        register_api(service)  # first, so the named endpoints keep their names
        with gr.Tabs():
            with gr.Tab("Configuration", id="configuration"):
                config = create_config_tab(service)
            with gr.Tab("Device map", id="device-map") as map_tab:
                map_heading, map_picture, map_table = create_devicemap_tab(service)
            with gr.Tab("Chat", id="chat") as chat_tab:
                chat_model_line = create_chat_tab(service)

        def refresh_map(view: PlanView | None) -> tuple:
            return render_tab(view, service)

        def chat_status() -> str:
            text = status_text(service.status())
            prediction = service.loaded_prediction()
            return text + (f"  \nPredicted speed: {prediction.summary()}" if prediction else "")

        def refresh_status() -> tuple[str, str]:
            return status_text(service.status()), chat_status()

        private = {"api_visibility": "private", "queue": False}
        map_outputs = [map_heading, map_picture, map_table]
        demo.load(config.preview, config.form, [config.summary, config.plan_state], api_visibility="private")
        demo.load(refresh_status, None, [config.status, chat_model_line], **private)
        config.plan_state.change(refresh_map, config.plan_state, map_outputs, **private)
        config.loaded.change(refresh_map, config.plan_state, map_outputs, **private)
        # After a load the Configuration tab keeps the load's own message (reused, plan check).
        config.loaded.change(chat_status, None, chat_model_line, **private)
        map_tab.select(refresh_map, config.plan_state, map_outputs, **private)
        chat_tab.select(chat_status, None, chat_model_line, **private)
    demo.queue(max_size=service.settings.queue_size, default_concurrency_limit=1)
    return demo


def create_app(settings: AppSettings, manager: ModelManager | None = None) -> tuple[gr.Blocks, DemoService]:
    """Build the service and the Blocks for ``settings`` (one manager per process)."""
    service = DemoService(manager or ModelManager(), settings)
    return build_app(service), service


def launch(demo: gr.Blocks, settings: AppSettings, **overrides: object) -> tuple:
    """Launch with the app's theme and the settings' network options; returns Gradio's tuple."""
    options: dict[str, object] = {
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
