"""The Gradio user interface: the Blocks and their launch (``blocks``), the named API, the OpenAI
API's routes and the MCP tools, and one module per tab (``tabs/``).

This is the only package that imports gradio; everything it shows comes from
:class:`optdemo.app.service.DemoService` as plain data.
"""
