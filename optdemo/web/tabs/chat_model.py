"""The Chat tab and the model it talks to: the model line, the max_new_tokens slider's range, the
tiny model's hint, and what a message does when no model answers.

With no model loaded, the first message loads the model selected in the Configuration tab when it
is the built-in tiny model (it works offline, in a second) and this visitor may load; otherwise the
conversation itself says what to do, and the message stays in the box. Never a toast, never an
"Error" badge over the conversation: a reply that cannot be written says why in the chat
(:func:`failed_in_chat`).
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import gradio as gr

from optdemo.app.service import DemoService, PlanNotice, PlanView
from optdemo.core.catalog import TINY_MODEL_ID
from optdemo.core.load_config import LoadConfig
from optdemo.web.api import admin_of
from optdemo.web.binding import Updates
from optdemo.web.errors import to_gradio_error
from optdemo.web.render import describe_placement, status_text
from optdemo.web.tabs.chat_components import ChatTab

TINY_HINT = (
    "<sub>The built-in tiny model knows only a handful of answers: try *What is the capital of "
    "France?* or *Why is offloading slow?*</sub>"
)
# Said with the stats of the first reply after a load, which is several times slower than the next.
FIRST_REPLY_NOTE = (
    "first reply after loading: slower while the weights are read from disk and the model warms up"
)
COMPLETION = "Completion"  # the mode radio's value for the completion box


# ---------------------------------------------------------------------------------- slider
def max_new_tokens_slider(service: DemoService, tab: ChatTab, values: dict) -> Any:
    """The max_new_tokens slider, its maximum what the next request will accept: the operator's cap
    and the model's window minus the prompt that must stay (the system prompt and the message in
    the box, or the completion prompt); its value lowered into that range."""
    completion = values.get(tab.mode) == COMPLETION
    text = values.get(tab.prompt if completion else tab.message) or ""
    system = "" if completion else values.get(tab.system_prompt) or ""
    limit = service.max_new_tokens_limit(text, system, completion)
    current = int(values.get(tab.controls.max_new_tokens) or limit)
    return gr.update(maximum=limit, value=min(current, limit), info=max_new_tokens_info(service, limit))


def max_new_tokens_info(service: DemoService, limit: int | None = None) -> str:
    """The slider's rule, with the loaded model's numbers."""
    cap = service.settings.max_new_tokens_cap
    window = service.context_window()
    if window is None:
        return f"at most the operator's cap {cap}; a loaded model's window minus the prompt may lower it"
    rule = f"min({cap}, the model's {window}-token window minus the prompt)"
    if limit is None:
        return f"at most {rule}"
    return f"at most {limit} here: {rule}; older turns are left out to make room"


def refresh_slider(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Follow the message, the system prompt, the mode and the conversation with the slider's range."""
    return {tab.controls.max_new_tokens: max_new_tokens_slider(service, tab, values)}


def refresh_model_line(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """What is loaded, its chat format and predicted speed; the max_new_tokens slider follows the
    loaded model's window; the tiny model's hint shows while it is the model in use."""
    prediction = service.loaded_prediction()
    chat_format = service.chat_format()
    line = status_text(service.status())
    if chat_format:
        line += f"  \nChat format: {chat_format}"
    if prediction:
        line += f"  \nPredicted speed: {prediction.summary()}"
    updates = {tab.model_line: line, tab.controls.max_new_tokens: max_new_tokens_slider(service, tab, values)}
    if tab.hint is not None:
        updates[tab.hint] = gr.update(visible=tiny_in_use(service, tab, values))
    return updates


def tiny_in_use(service: DemoService, tab: ChatTab, values: dict) -> bool:
    """Whether the built-in tiny model answers (or, with nothing loaded, would: it is selected)."""
    status = service.status()
    if status.endpoint is not None:
        return False
    if status.loaded:
        return status.model_id == TINY_MODEL_ID
    view = values.get(tab.link.plan_state) if tab.link is not None else None
    return isinstance(view, PlanView) and view.plan.model == TINY_MODEL_ID


# ---------------------------------------------------------------------------------- no model
def offline_choice(service: DemoService, tab: ChatTab, values: dict, request: Any) -> LoadConfig | None:
    """The configuration a message may load when no model is loaded: the one selected in the
    Configuration tab, if it is the built-in tiny model (offline, a second to load), its plan fits,
    and this visitor may load (never in public mode without an admin's credential)."""
    if tab.link is None or service.endpoint is not None or not service.is_admin(admin_of(request)):
        return None
    view = values.get(tab.link.plan_state)
    if isinstance(view, PlanNotice) or (isinstance(view, PlanView) and not view.plan.fits):
        return None  # being planned, or not loadable as the form stands
    config = view.config if isinstance(view, PlanView) else service.initial_config()
    return config if config is not None and config.model == TINY_MODEL_ID else None


def load_for_chat(
    service: DemoService, tab: ChatTab, config: LoadConfig, request: Any
) -> Generator[Updates, None, BaseException | None]:
    """Load ``config`` before the first reply, saying so over the chat and in the Configuration
    tab's status line; returns the error that stopped it, or None once it is loaded."""
    name = config.display_name
    yield {
        tab.notice: f"Loading {name} first: no model was loaded, and {name} is selected and works offline…"
    }
    try:
        report = service.load(config, admin=admin_of(request))
    except Exception as exc:  # noqa: BLE001 - said in the chat by the caller
        return exc
    if tab.link is not None:
        yield {
            tab.link.loaded: time.monotonic(),
            tab.link.status: (
                f"**Loaded** {name} for the chat's first message in {report.load_seconds:.2f} s — "
                f"{describe_placement(report.bytes_per_device)}"
            ),
        }
    return None


def failed_in_chat(tab: ChatTab, on_failure: Updates, exc: BaseException) -> Updates:
    """``on_failure`` (the conversation as it was, the message back in the box) with what went
    wrong said in the conversation itself: a note after its last turn, never kept in it."""
    sentence = to_gradio_error(exc).message.rstrip(".")
    if tab.message in on_failure:
        sentence += ". Your message is back in the box"
    note = {"role": "assistant", "content": f"**Not sent:** {sentence}."}
    return {**on_failure, tab.chatbot: [*on_failure[tab.chatbot], note], tab.notice: ""}


def first_reply_pending(service: DemoService) -> bool:
    """Whether the local model has not answered yet since it was loaded (its first reply is slower)."""
    status = service.status()
    return status.config is not None and status.endpoint is None and status.last_stats is None
