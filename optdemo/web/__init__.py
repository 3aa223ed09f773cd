"""The Gradio user interface: one module per tab, the named API, and the wiring.

This is the only package that imports gradio; everything it shows comes from
:class:`optdemo.app.service.DemoService` as plain data.
"""

from optdemo.web.blocks import build_app, create_app, launch

__all__ = ["build_app", "create_app", "launch"]
