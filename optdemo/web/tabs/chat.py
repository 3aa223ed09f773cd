"""The Chat tab: a streamed conversation (with Stop, retry, undo, clear) and a completion mode.

Each browser session keeps its conversation in a ``gr.State`` (the chatbot is a view of it) and
its saved chats in the browser (:mod:`optdemo.web.tabs.chat_history`), so a reload finds them. A failed
request never loses the conversation: the state is left as it was, the chat says what went wrong
(never a pop-up or an "Error" badge over it) and the message goes back into the textbox. While a
reply streams, the box is left alone: what the user types then stays there (a notice says to wait
for the reply or press Stop). What depends on the model (the model line, the slider's range, a
first message with no model loaded) is :mod:`optdemo.web.tabs.chat_model`.

Three parts: :func:`layout_chat_tab` builds the components (a :class:`ChatTab`); the module-level
handlers ``(service, tab, values, request) -> {component: update}`` do the work and are tested
without a browser; :func:`wire_chat_tab` connects them to the components' events.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gradio as gr

from optdemo.app.service import DemoService
from optdemo.core import defaults
from optdemo.core.errors import NoModelError
from optdemo.core.generation import CacheScope
from optdemo.web.api import admin_of, reply_group, session_of
from optdemo.web.binding import Updates, bind
from optdemo.web.errors import to_gradio_error
from optdemo.web.render import to_messages
from optdemo.web.tabs.chat_components import ChatTab, GenerationControls, ModelLink
from optdemo.web.tabs.chat_history import (
    layout_saved_chats,
    save_current,
    saved_outputs,
    wire_saved_chats,
)
from optdemo.web.tabs.chat_model import (
    FIRST_REPLY_NOTE,
    TINY_HINT,
    failed_in_chat,
    first_reply_pending,
    load_for_chat,
    max_new_tokens_info,
    offline_choice,
    refresh_slider,
)

# Shown while a reply streams: a message typed meanwhile is kept in the box, not sent. (No emoji
# before it: a font without the glyph draws an empty box.)
BUSY_NOTICE = (
    "A reply is on its way. Anything you type now stays in the box: send it when the reply "
    "ends, or press **Stop**."
)

Turn = dict  # {"user": str, "assistant": str, "stats": str}


# ---------------------------------------------------------------------------------- layout
def layout_chat_tab(
    service: DemoService, store: gr.BrowserState | None = None, link: ModelLink | None = None
) -> ChatTab:
    """Build the Chat tab's components inside the current Blocks; ``store`` is the browser's chat
    store (see :func:`~optdemo.web.tabs.chat_history.browser_store`; a new one if None), ``link``
    the Configuration tab's parts the chat follows (None: a chat on its own, as in tests)."""
    max_chars = service.settings.max_message_chars
    model_line = gr.Markdown(elem_id="od-chat-model")
    serving_line = gr.Markdown(elem_id="od-serving")
    serving_timer = gr.Timer(defaults.SERVING_REFRESH_SECONDS)
    mode = gr.Radio(["Conversation", "Completion"], value="Conversation", label="Mode", show_label=False)
    with gr.Column(visible=True) as chat_box:
        saved = layout_saved_chats(store)
        chatbot = gr.Chatbot(label="Conversation", height=440, elem_id="od-chatbot", buttons=["copy"])
        context_line = gr.Markdown(elem_id="od-context")
        notice = gr.Markdown(elem_id="od-chat-notice")
        with gr.Row():
            message = gr.Textbox(
                placeholder="Type a message and press Enter",
                show_label=False,
                scale=6,
                max_length=max_chars,
                elem_id="od-message",
            )
            send = gr.Button("Send", variant="primary", scale=1, min_width=80)
            stop = gr.Button("Stop", variant="stop", scale=1, min_width=80)
        system_prompt = gr.Textbox(
            label="System prompt",
            placeholder="Instructions before the conversation (empty: the default)",
            lines=1,
            max_lines=6,
            max_length=defaults.MAX_SYSTEM_PROMPT_CHARS,
            elem_id="od-system-prompt",
        )
        hint = gr.Markdown(TINY_HINT, visible=False, elem_id="od-tiny-hint")  # while tiny-opt answers
    with gr.Column(visible=False) as completion_box:
        prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Once upon a time", max_length=max_chars)
        with gr.Row():
            generate = gr.Button("Generate", variant="primary")
            stop_completion = gr.Button("Stop", variant="stop")
        completion = gr.Textbox(label="Continuation", lines=6, interactive=False)
        completion_stats = gr.Markdown()
    controls = layout_controls(service)
    turns = gr.State([])
    return ChatTab(
        model_line,
        mode,
        chat_box,
        chatbot,
        message,
        send,
        stop,
        completion_box,
        prompt,
        generate,
        stop_completion,
        completion,
        completion_stats,
        controls,
        system_prompt,
        context_line,
        notice,
        saved,
        turns,
        serving_line,
        serving_timer,
        hint=hint,
        link=link,
    )


def layout_controls(service: DemoService) -> GenerationControls:
    """The sampling controls, in an accordion, three to a row; max_new_tokens starts at the
    operator's cap and follows the loaded model and the prompt (see
    :func:`~optdemo.web.tabs.chat_model.max_new_tokens_slider`)."""
    cap = service.settings.max_new_tokens_cap
    with gr.Accordion("Generation parameters", open=False):
        with gr.Row():
            max_new_tokens = gr.Slider(
                1,
                cap,
                value=min(defaults.MAX_NEW_TOKENS, cap),
                step=1,
                label="max_new_tokens",
                info=max_new_tokens_info(service),
                min_width=220,
            )
            temperature = gr.Slider(
                0,
                2,
                value=defaults.TEMPERATURE,
                step=0.05,
                label="temperature",
                info="0 = greedy",
                min_width=220,
            )
            top_p = gr.Slider(0.05, 1, value=defaults.TOP_P, step=0.05, label="top_p", min_width=220)
        with gr.Row():
            top_k = gr.Slider(
                0, 200, value=defaults.TOP_K, step=1, label="top_k", info="0 = off", min_width=220
            )
            penalty = gr.Slider(
                1, 2, value=defaults.REPETITION_PENALTY, step=0.05, label="repetition_penalty", min_width=220
            )
            seed = gr.Number(value=-1, precision=0, label="seed", info="-1 = random", min_width=220)
        stop = gr.Textbox(
            label="stop sequences", info="one per line; they end the reply and are not shown", lines=2
        )
    return GenerationControls(max_new_tokens, temperature, top_p, top_k, penalty, seed, stop)


# ---------------------------------------------------------------------------------- handlers
def _reply(
    service: DemoService,
    tab: ChatTab,
    text: str,
    history: list[Turn],
    values: dict,
    request: Any,
    on_failure: Updates,
    may_load: bool = False,
) -> Iterator[Updates]:
    """Stream one reply to ``text`` after ``history``. The first update clears the box; later ones
    leave it alone, so a message typed meanwhile stays. On failure show ``on_failure`` with what
    went wrong said in the chat. With no model loaded and ``may_load``, the model selected in the
    Configuration tab is loaded first when it works offline (:func:`offline_choice`)."""
    turn = {"user": text, "assistant": "", "stats": ""}
    context = ""
    waiting = False
    first = first_reply_pending(service)
    try:
        params = tab.controls.params_from(service, values)
        pairs = [(t["user"], t["assistant"]) for t in history]
        system_prompt = values.get(tab.system_prompt) or ""
        yield {
            tab.chatbot: to_messages([*history, turn]),
            tab.turns: history,
            tab.message: "",
            tab.notice: BUSY_NOTICE,
        }
        session = session_of(request)
        scope = CacheScope(f"chat:{session}:{values.get(tab.saved.chat_id) or 'new'}", one_conversation=True)
        steps = service.chat(
            session, pairs, text, params, system_prompt, True, admin=admin_of(request), cache_scope=scope
        )
        for step in steps:
            if step.status:  # waiting for a place in the batch: say where in line
                waiting = True
                yield {tab.notice: step.status}
                continue
            stats = step.stats.summary() if step.stats else ""
            if stats and first:
                stats += f" · {FIRST_REPLY_NOTE}"
            turn = {"user": text, "assistant": step.text, "stats": stats}
            context = step.stats.context_summary() if step.stats else context
            update = {tab.chatbot: to_messages([*history, turn]), tab.turns: history}
            if waiting:  # its turn came: the usual notice again
                waiting, update[tab.notice] = False, BUSY_NOTICE
            yield update
    except NoModelError as exc:
        config = offline_choice(service, tab, values, request) if may_load else None
        failure = None if config is None else (yield from load_for_chat(service, tab, config, request))
        if config is not None and failure is None:
            yield from _reply(service, tab, text, history, values, request, on_failure)
        else:
            yield failed_in_chat(tab, on_failure, failure or exc)
        return
    except Exception as exc:  # noqa: BLE001 - the chat is restored, and says what went wrong
        yield failed_in_chat(tab, on_failure, exc)
        return
    yield {
        tab.chatbot: to_messages([*history, turn]),
        tab.turns: [*history, turn],
        tab.notice: "",
        tab.context_line: context,
    }


def respond(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Iterator[Updates]:
    """Send the message box's text; the finished turn joins this session's conversation. On
    failure the conversation is unchanged, says why, and the message goes back into the box; with
    no model loaded, the selected one is loaded first when it works offline."""
    text = values[tab.message]
    history = list(values[tab.turns] or [])
    restore = {tab.chatbot: to_messages(history), tab.turns: history, tab.message: text}
    yield from _reply(service, tab, text, history, values, request, restore, may_load=True)


def retry(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Iterator[Updates]:
    """Answer the last message again, replacing its reply; on failure the last turn stays."""
    history = list(values[tab.turns] or [])
    if not history:
        yield {tab.notice: "Nothing to retry yet: send a message first."}
        return
    *earlier, last = history
    keep = {tab.chatbot: to_messages(history), tab.turns: history}
    for updates in _reply(service, tab, last["user"], earlier, values, request, keep):
        updates.pop(tab.message, None)  # retry never touches the box
        yield updates


def undo(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Drop the last turn and put its message back in the box."""
    history = list(values[tab.turns] or [])
    if not history:
        return {tab.chatbot: [], tab.turns: [], tab.message: "", tab.context_line: ""}
    *earlier, last = history
    # The context line was the undone reply's: it no longer describes the conversation.
    return {
        tab.chatbot: to_messages(earlier),
        tab.turns: earlier,
        tab.message: last["user"],
        tab.context_line: "",
    }


def clear(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Forget this session's conversation (and, once saved, its entry in the browser)."""
    return {tab.chatbot: [], tab.turns: [], tab.context_line: ""}


def stop(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Stop this session's running reply or completion."""
    service.stop(session_of(request))
    return {}


def complete(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Iterator[Updates]:
    """Stream a continuation of the prompt with its stats line (the original scripts' mode); what
    stops it is said in the stats line, never over the boxes."""
    first = first_reply_pending(service)
    try:
        params = tab.controls.params_from(service, values)
        steps = service.complete(
            session_of(request), values[tab.prompt], params, waiting_status=True, admin=admin_of(request)
        )
        for step in steps:
            if step.status:  # waiting for a place in the batch: the stats line says where in line
                yield {tab.completion_stats: step.status}
                continue
            stats = step.stats.summary() if step.stats else ""
            if stats and first:
                stats += f" · {FIRST_REPLY_NOTE}"
            yield {tab.completion: step.text, tab.completion_stats: stats}
    except Exception as exc:  # noqa: BLE001 - said in the stats line
        yield {tab.completion_stats: f"**Not sent:** {to_gradio_error(exc).message}"}
        return
    yield {tab.serving_line: service.serving().summary()}  # this one is no longer being written


def switch_mode(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Show the conversation or the completion box."""
    chatting = values[tab.mode] == "Conversation"
    return {tab.chat_box: gr.update(visible=chatting), tab.completion_box: gr.update(visible=not chatting)}


def refresh_serving_line(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """How many visitors' replies the model is writing now, and how many wait for a place."""
    return {tab.serving_line: service.serving().summary()}


# ---------------------------------------------------------------------------------- wiring
def wire_chat_tab(service: DemoService, tab: ChatTab) -> None:
    """Connect the Chat tab's events to its handlers (all private: the API has /chat itself).
    Every change to the conversation is then saved in the browser."""
    private = {"api_visibility": "private", "queue": False}
    in_reply_group = {**reply_group(service), "api_visibility": "private"}
    tab.serving_timer.tick(
        bind(refresh_serving_line, service, tab),
        {tab.turns},
        tab.serving_line,
        show_progress="hidden",
        **private,
    )
    # Inputs given as a set reach a handler as one {component: value} dict.
    # The saved chat's id too: each conversation reuses its own prompt caches.
    with_params = {tab.turns, tab.system_prompt, tab.saved.chat_id, *tab.controls.all()}
    conversation = [tab.chatbot, tab.turns, tab.message, tab.notice, tab.context_line]
    save = {
        "fn": bind(save_current, service, tab),
        "inputs": {tab.turns, tab.saved.store, tab.saved.chat_id},
        "outputs": saved_outputs(tab),
        "show_progress": "hidden",
        **private,
    }
    tab.mode.change(
        bind(switch_mode, service, tab), {tab.mode}, [tab.chat_box, tab.completion_box], **private
    )
    # With no model loaded, a message may load the one selected in the Configuration tab.
    selected = {tab.link.plan_state} if tab.link is not None else set()
    gr.on(
        [tab.message.submit, tab.send.click],
        bind(respond, service, tab),
        {tab.message, *with_params, *selected},
        [*conversation, *tab.link_outputs()],
        **in_reply_group,
    ).success(**save)
    tab.chatbot.retry(
        bind(retry, service, tab),
        with_params,
        [tab.chatbot, tab.turns, tab.notice, tab.context_line],
        **in_reply_group,
    ).success(**save)
    tab.chatbot.undo(bind(undo, service, tab), {tab.turns}, conversation, **private).then(**save)
    tab.chatbot.clear(bind(clear, service, tab), {tab.turns}, conversation, **private).then(**save)
    gr.on([tab.stop.click, tab.stop_completion.click], bind(stop, service, tab), {tab.turns}, None, **private)
    gr.on(
        [tab.generate.click, tab.prompt.submit],
        bind(complete, service, tab),
        {tab.prompt, *tab.controls.all()},
        [tab.completion, tab.completion_stats, tab.serving_line],
        **in_reply_group,
    )
    # The slider's range follows what the next request holds: the message (or prompt), the system
    # prompt and the mode; the conversation, as it changes.
    gr.on(
        [tab.message.change, tab.system_prompt.change, tab.prompt.change, tab.mode.change, tab.turns.change],
        bind(refresh_slider, service, tab),
        {tab.message, tab.system_prompt, tab.prompt, tab.mode, tab.controls.max_new_tokens},
        tab.controls.max_new_tokens,
        show_progress="hidden",
        trigger_mode="always_last",
        **private,
    )
    wire_saved_chats(service, tab)
