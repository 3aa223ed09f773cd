"""The Chat tab: a streamed conversation (with Stop, retry, undo, clear) and a completion mode.

Each browser session keeps its own turns in a ``gr.State``; the chatbot is a view of them, so a
failed request never loses the conversation: on error the state is left as it was and the message
goes back into the textbox.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import gradio as gr

from optdemo import defaults
from optdemo.generation import GenerationParams
from optdemo.service import DemoService
from optdemo.ui.api import MODEL_GROUP
from optdemo.ui.errors import to_gradio_error, user_errors

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


def create_chat_tab(service: DemoService) -> gr.Markdown:
    """Build the Chat tab inside the current Blocks; returns its model-status line."""
    cap = service.settings.max_new_tokens_cap
    model_line = gr.Markdown(elem_id="od-chat-model")
    mode = gr.Radio(["Conversation", "Completion"], value="Conversation", label="Mode", show_label=False)
    with gr.Column(visible=True) as chat_box:
        chatbot = gr.Chatbot(label="Conversation", height=440, elem_id="od-chatbot", buttons=["copy"])
        with gr.Row():
            message = gr.Textbox(
                placeholder="Type a message and press Enter",
                show_label=False,
                scale=6,
                max_length=service.settings.max_message_chars,
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
        prompt = gr.Textbox(
            label="Prompt",
            lines=4,
            placeholder="Once upon a time",
            max_length=service.settings.max_message_chars,
        )
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
    mode.change(
        lambda m: (gr.update(visible=m == "Conversation"), gr.update(visible=m == "Completion")),
        mode,
        [chat_box, completion_box],
        api_visibility="private",
        queue=False,
    )

    # Inputs given as a set reach a callback as one {component: value} dict.
    params_of = controls.params_from
    with_params = {turns, *controls.all()}

    def reply(text: str, history: list[Turn], values: dict, request: gr.Request) -> Iterator[tuple]:
        """Stream one reply after ``history``; on failure restore the chat and the message box."""
        turn = {"user": text, "assistant": "", "stats": ""}
        try:
            params = params_of(service, values)
            pairs = [(t["user"], t["assistant"]) for t in history]
            yield to_messages([*history, turn]), history, ""
            for step in service.chat(request.session_hash, pairs, text, params):
                stats = step.stats.summary() if step.stats else ""
                turn = {"user": text, "assistant": step.text, "stats": stats}
                yield to_messages([*history, turn]), history, ""
        except Exception as exc:  # noqa: BLE001 - the chat is restored, then the error is shown
            yield to_messages(history), history, text
            raise to_gradio_error(exc) from None
        yield to_messages([*history, turn]), [*history, turn], ""

    def respond(values: dict, request: gr.Request) -> Iterator[tuple]:
        yield from reply(values[message], list(values[turns] or []), values, request)

    def retry(values: dict, request: gr.Request) -> Iterator[tuple]:
        history = list(values[turns] or [])
        if not history:
            raise gr.Error("Nothing to retry yet.")
        *earlier, last = history
        for messages, new_history, leftover in reply(last["user"], earlier, values, request):
            # On failure reply() restores "earlier": keep the original last turn instead.
            yield (messages, new_history) if leftover == "" else (to_messages(history), history)

    def undo(history: list[Turn]) -> tuple:
        if not history:
            return [], [], ""
        *earlier, last = history
        return to_messages(earlier), earlier, last["user"]

    def stop_reply(request: gr.Request) -> None:
        service.stop(request.session_hash)

    @user_errors
    def complete(values: dict, request: gr.Request) -> Iterator[tuple[str, str]]:
        params = params_of(service, values)
        for step in service.complete(request.session_hash, values[prompt], params):
            yield step.text, step.stats.summary() if step.stats else ""

    model_group = {"concurrency_id": MODEL_GROUP, "concurrency_limit": 1, "api_visibility": "private"}
    gr.on(
        [message.submit, send.click],
        respond,
        {message, *with_params},
        [chatbot, turns, message],
        **model_group,
    )
    chatbot.retry(retry, with_params, [chatbot, turns], **model_group)
    chatbot.undo(undo, turns, [chatbot, turns, message], api_visibility="private", queue=False)
    chatbot.clear(lambda: ([], []), None, [chatbot, turns], api_visibility="private", queue=False)
    gr.on([stop.click, stop_completion.click], stop_reply, None, None, api_visibility="private", queue=False)
    gr.on(
        [generate.click, prompt.submit],
        complete,
        {prompt, *controls.all()},
        [completion, completion_stats],
        **model_group,
    )
    return model_line
