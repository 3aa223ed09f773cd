"""The Chat tab: a streamed conversation (with Stop, retry, undo, clear) and a completion mode.

Each browser session keeps its own turns in a ``gr.State``; the chatbot is a view of them, so a
failed request never loses the conversation: on error the state is left as it was and the message
goes back into the textbox.

Three parts: :func:`layout_chat_tab` builds the components (a :class:`ChatTab`); the module-level
handlers ``(service, tab, values, request) -> {component: update}`` do the work and are tested
without a browser; :func:`wire_chat_tab` connects them to the components' events.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import gradio as gr

from optdemo import defaults
from optdemo.generation import GenerationParams
from optdemo.service import DemoService
from optdemo.ui.api import MODEL_GROUP, session_of
from optdemo.ui.binding import Updates, bind
from optdemo.ui.errors import to_gradio_error, user_errors
from optdemo.ui.render import status_text

Turn = dict  # {"user": str, "assistant": str, "stats": str}


@dataclass
class GenerationControls:
    """The sampling controls, shared by chat and completion."""

    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    repetition_penalty: gr.Slider
    seed: gr.Number

    def all(self) -> list:
        """In :meth:`DemoService.params` order."""
        return [
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            self.top_k,
            self.repetition_penalty,
            self.seed,
        ]

    def params_from(self, service: DemoService, values: dict) -> GenerationParams:
        """Validated parameters from a callback's {component: value} dict."""
        return service.params(*(values[control] for control in self.all()))


@dataclass
class ChatTab:
    """The Chat tab's components."""

    model_line: gr.Markdown  # what is loaded, and its predicted speed
    mode: gr.Radio
    chat_box: gr.Column
    chatbot: gr.Chatbot
    message: gr.Textbox
    send: gr.Button
    stop: gr.Button
    completion_box: gr.Column
    prompt: gr.Textbox
    generate: gr.Button
    stop_completion: gr.Button
    completion: gr.Textbox
    completion_stats: gr.Markdown
    controls: GenerationControls
    turns: gr.State  # this session's conversation: a list of Turn


def to_messages(turns: list[Turn]) -> list[dict]:
    """Chatbot messages for the turns, each reply followed by its stats line."""
    messages: list[dict] = []
    for turn in turns:
        messages.append({"role": "user", "content": turn["user"]})
        reply = turn["assistant"] or "…"
        if turn.get("stats"):
            reply += f"\n\n<sub>{turn['stats']}</sub>"
        messages.append({"role": "assistant", "content": reply})
    return messages


# ---------------------------------------------------------------------------------- layout
def layout_chat_tab(service: DemoService) -> ChatTab:
    """Build the Chat tab's components inside the current Blocks."""
    cap = service.settings.max_new_tokens_cap
    max_chars = service.settings.max_message_chars
    model_line = gr.Markdown(elem_id="od-chat-model")
    mode = gr.Radio(["Conversation", "Completion"], value="Conversation", label="Mode", show_label=False)
    with gr.Column(visible=True) as chat_box:
        chatbot = gr.Chatbot(label="Conversation", height=440, elem_id="od-chatbot", buttons=["copy"])
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
        gr.Markdown(
            "<sub>OPT is not instruction-tuned: replies continue a plain *User:/Assistant:* transcript. "
            "The built-in tiny model knows only a handful of answers: try *What is the capital of France?* "
            "or *Why is offloading slow?*</sub>"
        )
    with gr.Column(visible=False) as completion_box:
        prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Once upon a time", max_length=max_chars)
        with gr.Row():
            generate = gr.Button("Generate", variant="primary")
            stop_completion = gr.Button("Stop", variant="stop")
        completion = gr.Textbox(label="Continuation", lines=6, interactive=False)
        completion_stats = gr.Markdown()
    with gr.Accordion("Generation parameters", open=False), gr.Row():
        controls = GenerationControls(
            gr.Slider(1, cap, value=min(defaults.MAX_NEW_TOKENS, cap), step=1, label="max_new_tokens"),
            gr.Slider(0, 2, value=defaults.TEMPERATURE, step=0.05, label="temperature", info="0 = greedy"),
            gr.Slider(0.05, 1, value=defaults.TOP_P, step=0.05, label="top_p"),
            gr.Slider(0, 200, value=defaults.TOP_K, step=1, label="top_k", info="0 = off"),
            gr.Slider(1, 2, value=defaults.REPETITION_PENALTY, step=0.05, label="repetition_penalty"),
            gr.Number(value=-1, precision=0, label="seed", info="-1 = random"),
        )
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
        turns,
    )


# ---------------------------------------------------------------------------------- handlers
def _reply(
    service: DemoService, tab: ChatTab, text: str, history: list[Turn], values: dict, request: Any
) -> Iterator[Updates]:
    """Stream one reply to ``text`` after ``history``; on failure restore the chat and put the
    message back in the box, then raise the error for the user."""
    turn = {"user": text, "assistant": "", "stats": ""}
    try:
        params = tab.controls.params_from(service, values)
        pairs = [(t["user"], t["assistant"]) for t in history]
        yield {tab.chatbot: to_messages([*history, turn]), tab.turns: history, tab.message: ""}
        for step in service.chat(session_of(request), pairs, text, params):
            turn = {"user": text, "assistant": step.text, "stats": step.stats.summary() if step.stats else ""}
            yield {tab.chatbot: to_messages([*history, turn]), tab.turns: history, tab.message: ""}
    except Exception as exc:  # noqa: BLE001 - the chat is restored, then the error is shown
        yield {tab.chatbot: to_messages(history), tab.turns: history, tab.message: text}
        raise to_gradio_error(exc) from None
    yield {tab.chatbot: to_messages([*history, turn]), tab.turns: [*history, turn], tab.message: ""}


def respond(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Iterator[Updates]:
    """Send the message box's text; the finished turn joins this session's conversation."""
    yield from _reply(service, tab, values[tab.message], list(values[tab.turns] or []), values, request)


def retry(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Iterator[Updates]:
    """Answer the last message again, replacing its reply; on failure the last turn stays."""
    history = list(values[tab.turns] or [])
    if not history:
        raise gr.Error("Nothing to retry yet.")
    *earlier, last = history
    for updates in _reply(service, tab, last["user"], earlier, values, request):
        failed = updates.pop(tab.message) != ""  # _reply restores "earlier": keep the last turn
        yield {tab.chatbot: to_messages(history), tab.turns: history} if failed else updates


def undo(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Drop the last turn and put its message back in the box."""
    history = list(values[tab.turns] or [])
    if not history:
        return {tab.chatbot: [], tab.turns: [], tab.message: ""}
    *earlier, last = history
    return {tab.chatbot: to_messages(earlier), tab.turns: earlier, tab.message: last["user"]}


def clear(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Forget this session's conversation."""
    return {tab.chatbot: [], tab.turns: []}


def stop(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Stop this session's running reply or completion."""
    service.stop(session_of(request))
    return {}


@user_errors
def complete(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Iterator[Updates]:
    """Stream a continuation of the prompt with its stats line (the original scripts' mode)."""
    params = tab.controls.params_from(service, values)
    for step in service.complete(session_of(request), values[tab.prompt], params):
        yield {tab.completion: step.text, tab.completion_stats: step.stats.summary() if step.stats else ""}


def switch_mode(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """Show the conversation or the completion box."""
    chatting = values[tab.mode] == "Conversation"
    return {tab.chat_box: gr.update(visible=chatting), tab.completion_box: gr.update(visible=not chatting)}


def refresh_model_line(service: DemoService, tab: ChatTab, values: dict, request: Any) -> Updates:
    """What is loaded, and the speed predicted for it."""
    prediction = service.loaded_prediction()
    speed = f"  \nPredicted speed: {prediction.summary()}" if prediction else ""
    return {tab.model_line: status_text(service.status()) + speed}


# ---------------------------------------------------------------------------------- wiring
def wire_chat_tab(service: DemoService, tab: ChatTab) -> None:
    """Connect the Chat tab's events to its handlers (all private: the API has /chat itself)."""
    private = {"api_visibility": "private", "queue": False}
    in_model_group = {"concurrency_id": MODEL_GROUP, "concurrency_limit": 1, "api_visibility": "private"}
    # Inputs given as a set reach a handler as one {component: value} dict.
    with_params = {tab.turns, *tab.controls.all()}
    conversation = [tab.chatbot, tab.turns, tab.message]
    tab.mode.change(
        bind(switch_mode, service, tab), {tab.mode}, [tab.chat_box, tab.completion_box], **private
    )
    gr.on(
        [tab.message.submit, tab.send.click],
        bind(respond, service, tab),
        {tab.message, *with_params},
        conversation,
        **in_model_group,
    )
    tab.chatbot.retry(bind(retry, service, tab), with_params, [tab.chatbot, tab.turns], **in_model_group)
    tab.chatbot.undo(bind(undo, service, tab), {tab.turns}, conversation, **private)
    tab.chatbot.clear(bind(clear, service, tab), {tab.turns}, [tab.chatbot, tab.turns], **private)
    gr.on([tab.stop.click, tab.stop_completion.click], bind(stop, service, tab), {tab.turns}, None, **private)
    gr.on(
        [tab.generate.click, tab.prompt.submit],
        bind(complete, service, tab),
        {tab.prompt, *tab.controls.all()},
        [tab.completion, tab.completion_stats],
        **in_model_group,
    )
