"""The Chat tab's components, as dataclasses: what the tab's layout builds and its handlers (and the
saved-chats handlers) address. Only data here, so every module of the tab imports it and none
imports another's components."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from optdemo.app.service import DemoService
from optdemo.core.generation import GenerationParams


@dataclass
class GenerationControls:
    """The sampling controls, shared by chat and completion."""

    max_new_tokens: gr.Slider
    temperature: gr.Slider
    top_p: gr.Slider
    top_k: gr.Slider
    repetition_penalty: gr.Slider
    seed: gr.Number
    stop: gr.Textbox  # stop sequences, one per line

    def all(self) -> list:
        """In :meth:`DemoService.params` order."""
        return [
            self.max_new_tokens,
            self.temperature,
            self.top_p,
            self.top_k,
            self.repetition_penalty,
            self.seed,
            self.stop,
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
    system_prompt: gr.Textbox
    context_line: gr.Markdown  # how much of the model's window the last reply used
    notice: gr.Markdown  # "wait for the reply or press Stop" while one streams
    saved: SavedChats  # this browser's saved chats
    turns: gr.State  # this session's conversation: a list of Turn
    serving_line: gr.Markdown  # how many replies the model is writing together, and how many wait
    serving_timer: gr.Timer  # refreshes serving_line
    hint: gr.Markdown | None = None  # what the built-in tiny model can answer (shown while it is in use)
    link: ModelLink | None = None  # the Configuration tab's parts the chat follows (None: a chat alone)

    def link_outputs(self) -> list:
        """The Configuration tab's components a reply may update (after loading the selected model)."""
        return [] if self.link is None else [self.link.loaded, self.link.status]


@dataclass
class ModelLink:
    """The Configuration tab's parts the Chat tab reads and updates: with no model loaded, the
    first message loads the model selected there (when it works offline and this visitor may load)."""

    plan_state: gr.State  # the session's PlanView (or PlanNotice): the selected configuration
    loaded: gr.State  # bumped after a load, so the other tabs refresh
    status: gr.Markdown  # the Configuration tab's status line


@dataclass
class SavedChats:
    """The saved-chats panel's components, and the session's current chat."""

    store: gr.BrowserState  # this browser's chats (an optdemo.app.chats store)
    chat_id: gr.State  # the id of the conversation on screen (None: not saved yet)
    picker: gr.Dropdown
    new: gr.Button
    title: gr.Textbox
    rename: gr.Button
    delete: gr.Button
    export_json: gr.Button
    export_markdown: gr.Button
    exported: gr.Code
    pasted: gr.Textbox
    import_btn: gr.Button
    message: gr.Markdown
