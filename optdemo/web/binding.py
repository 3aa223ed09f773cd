"""Turn a tab's module-level handler into a Gradio callback.

Handlers are plain functions ``handler(service, tab, values, request) -> {component: update}``
(generators yield such dicts): ``values`` is the ``{component: value}`` dict Gradio passes when an
event's inputs are given as a set, and ``tab`` is the dataclass of the tab's components. Tests call
them directly, with no browser and no server. Gradio reads a callback's signature (the
``gr.Request`` annotation, a ``gr.Progress`` default, generator or not), so :func:`bind` builds a
callback with exactly that signature around the handler and its bound service and tab.

Every event bound this way needs at least one input (a set), even when the handler reads none:
Gradio places the request by position among the inputs, so without one it would land in
``values``. Such events pass a state of their tab, which costs nothing (states stay on the server).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

import gradio as gr

Updates = dict[Any, Any]  # {component: new value or gr.update(...)}


def bind(handler: Callable[..., Any], service: Any, tab: Any) -> Callable[..., Any]:
    """A Gradio callback ``(values, request)`` calling ``handler(service, tab, values, request)``."""
    if inspect.isgeneratorfunction(handler):

        def streamed(values: dict, request: gr.Request) -> Iterator[Updates]:
            yield from handler(service, tab, values, request)

        callback: Callable[..., Any] = streamed
    else:

        def call(values: dict, request: gr.Request) -> Updates:
            return handler(service, tab, values, request)

        callback = call
    callback.__name__ = callback.__qualname__ = handler.__name__
    return callback
