"""How a conversation becomes a prompt, and how many tokens a reply may have.

Two chat formats: a model whose tokenizer has a chat template (instruction-tuned models) gets its
own template through ``apply_chat_template``; OPT and other models without one get a plain
``User:``/``Assistant:`` transcript, which they continue. Either way the oldest turns are dropped
until the prompt leaves room for the reply, and what was dropped is returned.

One rule bounds ``max_new_tokens`` everywhere (chat and completion, UI and API): at most
min(the operator's cap, the context window minus the prompt's tokens). :func:`check_max_new_tokens`
applies it and :func:`max_new_tokens_rule` states it, with the numbers, in every refusal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from optdemo.core.defaults import MAX_NEW_TOKENS_LIMIT
from optdemo.core.errors import GenerationError

CHAT_PREAMBLE = (
    "The following is a conversation between a curious user and a helpful, knowledgeable AI "
    "assistant. The assistant answers clearly and truthfully.\n\n"
)
USER_TAG = "User:"
ASSISTANT_TAG = "Assistant:"
# Where a plain-transcript reply ends: the model starting the next turn itself.
CHAT_STOP_STRINGS = ("\n" + USER_TAG, "\n" + ASSISTANT_TAG)

PLAIN_FORMAT = (
    "plain User:/Assistant: transcript (the model has no chat template; OPT is not instruction-tuned)"
)
TEMPLATE_FORMAT = "the model's own chat template (instruction-tuned), with the system prompt"

ChatTurn = tuple[str, str]  # (user message, assistant reply)
# (system prompt, earlier turns, new message) -> the prompt text
Renderer = Callable[[str, Sequence[ChatTurn], str], str]


def max_new_tokens_rule(window: int, prompt_tokens: int, cap: int) -> str:
    """The rule with its numbers: "max_new_tokens is at most N here: the model's 512-token window
    minus this prompt's M tokens, and the operator's cap C"."""
    limit = min(cap, window - prompt_tokens)
    return (
        f"max_new_tokens is at most {limit} here: the model's {window}-token window minus this "
        f"prompt's {prompt_tokens} tokens, and the operator's cap {cap}"
    )


def check_max_new_tokens(requested: int, window: int, prompt_tokens: int, cap: int) -> None:
    """Refuse ``requested`` new tokens beyond min(cap, window - prompt_tokens), stating the rule.

    Args:
        requested: the max_new_tokens asked for.
        window: the model's context window (tokens).
        prompt_tokens: tokens of the prompt that must stay (in chat: without any old turn).
        cap: the operator's cap (--max-new-tokens-cap); never above the engine's ceiling.
    """
    cap = min(cap, MAX_NEW_TOKENS_LIMIT)
    if requested <= min(cap, window - prompt_tokens):
        return
    if window - prompt_tokens < 1:
        raise GenerationError(
            f"this prompt's {prompt_tokens} tokens leave no room for a reply: max_new_tokens is at "
            f"most the model's {window}-token window minus the prompt's tokens, and the operator's "
            f"cap {cap}; shorten the prompt"
        )
    raise GenerationError(f"{max_new_tokens_rule(window, prompt_tokens, cap)}; you asked for {requested}")


def render_plain(system_prompt: str, turns: Sequence[ChatTurn], message: str) -> str:
    """A plain transcript: the system prompt (or the default preamble), the turns, an open reply."""
    preamble = f"{system_prompt.strip()}\n\n" if system_prompt.strip() else CHAT_PREAMBLE
    lines = [
        f"{USER_TAG} {str(user or '').strip()}\n{ASSISTANT_TAG} {str(bot or '').strip()}\n"
        for user, bot in turns
    ]
    return preamble + "".join(lines) + f"{USER_TAG} {message.strip()}\n{ASSISTANT_TAG}"


def template_renderer(tokenizer: Any) -> Renderer:
    """A renderer through the tokenizer's chat template (with the generation prompt opened)."""

    def render(system_prompt: str, turns: Sequence[ChatTurn], message: str) -> str:
        messages = [{"role": "system", "content": system_prompt.strip()}] if system_prompt.strip() else []
        for user, bot in turns:
            messages += [
                {"role": "user", "content": str(user or "")},
                {"role": "assistant", "content": str(bot or "")},
            ]
        messages.append({"role": "user", "content": message})
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template's own error (e.g. no system role)
            raise GenerationError(f"the model's chat template refused this conversation: {exc}") from None

    return render


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (an instruction-tuned model)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_format_name(tokenizer: Any) -> str:
    """Which format chat uses with this tokenizer, for people."""
    return TEMPLATE_FORMAT if has_chat_template(tokenizer) else PLAIN_FORMAT


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation laid out for the model: the text, its token count, and how many old turns
    were left out to fit the window."""

    text: str
    dropped_turns: int
    prompt_tokens: int = 0


def build_chat_prompt(
    history: Sequence[ChatTurn],
    message: str,
    count_tokens: Callable[[str], int],
    window: int,
    max_new_tokens: int,
    cap: int = MAX_NEW_TOKENS_LIMIT,
    render: Renderer = render_plain,
    system_prompt: str = "",
) -> ChatPrompt:
    """Lay out the conversation with ``render`` and drop the oldest turns until the reply fits.

    Args:
        history: earlier (user, assistant) turns, oldest first.
        message: the new user message.
        count_tokens: the tokenizer's token count for a text.
        window: the model's context window (tokens).
        max_new_tokens: tokens reserved for the reply.
        cap: the operator's cap on max_new_tokens.
        render: the chat format (plain transcript or the model's template).
        system_prompt: instructions before the conversation ("" for the format's default).

    Raises:
        GenerationError: max_new_tokens breaks the rule even with every old turn dropped.
    """
    check_max_new_tokens(max_new_tokens, window, count_tokens(render(system_prompt, [], message)), cap)
    budget = window - max_new_tokens
    for dropped in range(len(history) + 1):
        text = render(system_prompt, history[dropped:], message)
        tokens = count_tokens(text)
        if tokens <= budget:
            return ChatPrompt(text, dropped, tokens)
    raise AssertionError("unreachable: the message alone was checked to fit")  # pragma: no cover
