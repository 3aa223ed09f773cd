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


def checked_history(history: object, max_turns: int, max_chars: int, max_total_chars: int) -> list[ChatTurn]:
    """``history`` as (message, reply) pairs of text, once it is known to be one and within the
    deployment's bounds; ``None`` for a text (no reply yet) is "". A conversation comes from
    outside (an API call, the browser's saved chats), so its size bounds what a request costs.

    Args:
        history: earlier turns, oldest first, as sent.
        max_turns: a conversation with this many turns is refused (--max-history-turns).
        max_chars: longest message or reply in a turn (--max-message-chars).
        max_total_chars: most characters in all its turns (--max-history-chars).

    Raises:
        GenerationError: the limit broken, in a sentence that says what to do.
    """
    if not isinstance(history, (list, tuple)):
        raise GenerationError(
            "the conversation's earlier turns must be a list of (message, reply) pairs: clear the "
            "conversation to go on"
        )
    if len(history) >= max_turns:  # before reading any turn
        raise GenerationError(
            f"this conversation has reached the limit of {max_turns} turns here: clear it (or undo a "
            "turn) to go on"
        )
    remedy = "clear the conversation (or undo turns) to go on"
    turns: list[ChatTurn] = []
    total = 0
    for number, turn in enumerate(history, start=1):
        if not isinstance(turn, (list, tuple)) or len(turn) != 2:
            raise GenerationError(
                f"turn {number} of this conversation is not a (message, reply) pair: {remedy}"
            )
        user, bot = ("" if text is None else text for text in turn)
        for text, what in ((user, "message"), (bot, "reply")):
            where = f"the {what} in turn {number} of this conversation"
            if not isinstance(text, str):
                raise GenerationError(f"{where} is not text: {remedy}")
            if len(text) > max_chars:
                raise GenerationError(
                    f"{where} is {len(text)} characters long; the limit here is {max_chars}: {remedy}"
                )
        total += len(user) + len(bot)
        if total > max_total_chars:
            raise GenerationError(
                f"the earlier turns of this conversation hold more than {max_total_chars} characters, "
                "the limit here: clear it (or undo turns) to go on"
            )
        turns.append((user, bot))
    return turns


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (an instruction-tuned model)."""
    return bool(getattr(tokenizer, "chat_template", None))


def chat_format_name(tokenizer: Any) -> str:
    """Which format chat uses with this tokenizer, for people."""
    return TEMPLATE_FORMAT if has_chat_template(tokenizer) else PLAIN_FORMAT


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation laid out for the model: the text, its token count, how many old turns were
    left out to fit the window, and (when the layout was given an ``encode``) the text's token ids."""

    text: str
    dropped_turns: int
    prompt_tokens: int = 0
    input_ids: tuple[int, ...] | None = None


def build_chat_prompt(
    history: Sequence[ChatTurn],
    message: str,
    count_tokens: Callable[[str], int],
    window: int,
    max_new_tokens: int,
    cap: int = MAX_NEW_TOKENS_LIMIT,
    render: Renderer = render_plain,
    system_prompt: str = "",
    encode: Callable[[str], Sequence[int]] | None = None,
) -> ChatPrompt:
    """Lay out the conversation with ``render``, leaving out the oldest turns the reply has no room
    for: the fewest dropped turns whose whole prompt fits ``window - max_new_tokens``.

    The work is linear in what is kept, whatever the history's length: each turn is counted once,
    alone, newest first, up to the first that cannot fit (its tokens in a one-turn conversation
    minus those of none, which is exact for the plain transcript and close for a template); then
    the whole prompt is rendered and counted near that estimate, twice when it is exact (it fits,
    and one more turn does not), else by a galloping search over the number of dropped turns
    (a few more renders, logarithmic in the estimate's error). Old turns that cannot fit are never
    rendered. The result equals rendering and counting the whole conversation once per dropped
    turn, as long as dropping a turn never lengthens the prompt.

    Args:
        history: earlier (user, assistant) turns, oldest first.
        message: the new user message.
        count_tokens: the tokenizer's token count for a text.
        window: the model's context window (tokens).
        max_new_tokens: tokens reserved for the reply.
        cap: the operator's cap on max_new_tokens.
        render: the chat format (plain transcript or the model's template).
        system_prompt: instructions before the conversation ("" for the format's default).
        encode: the tokenizer's ids for a text; when given, the whole prompt is tokenized with it
            (the ids kept in ``input_ids``: exactly the whole text's tokenization).

    Raises:
        GenerationError: max_new_tokens breaks the rule even with every old turn dropped.
    """
    layouts = _Layouts(history, message, render, system_prompt, count_tokens, encode)
    alone = layouts.of(len(history))  # the message alone: every old turn dropped
    check_max_new_tokens(max_new_tokens, window, alone.prompt_tokens, cap)
    budget = window - max_new_tokens
    estimate = _estimated_drop(history, render, count_tokens, budget - alone.prompt_tokens)
    dropped = _fewest_dropped(estimate, len(history), lambda d: layouts.of(d).prompt_tokens <= budget)
    return layouts.of(dropped)


class _Layouts:
    """The whole prompt for a number of dropped turns, rendered and tokenized once each."""

    def __init__(
        self,
        history: Sequence[ChatTurn],
        message: str,
        render: Renderer,
        system_prompt: str,
        count_tokens: Callable[[str], int],
        encode: Callable[[str], Sequence[int]] | None,
    ) -> None:
        self._history, self._message, self._render, self._system = history, message, render, system_prompt
        self._count, self._encode = count_tokens, encode
        self._done: dict[int, ChatPrompt] = {}

    def of(self, dropped: int) -> ChatPrompt:
        """The prompt without the ``dropped`` oldest turns."""
        if dropped not in self._done:
            text = self._render(self._system, self._history[dropped:], self._message)
            if self._encode is None:
                self._done[dropped] = ChatPrompt(text, dropped, self._count(text))
            else:
                ids = tuple(self._encode(text))
                self._done[dropped] = ChatPrompt(text, dropped, len(ids), ids)
        return self._done[dropped]


# A stand-in message for counting one turn's tokens apart from the real message.
_PROBE_MESSAGE = "?"


def _estimated_drop(
    history: Sequence[ChatTurn], render: Renderer, count_tokens: Callable[[str], int], room: int
) -> int:
    """How many oldest turns to drop, from each turn's own tokens: newest first, until the turns'
    sum passes ``room`` (the budget minus the message alone). Each turn is counted once."""
    empty = _turn_tokens(render, count_tokens, None)
    used = 0
    for index in range(len(history) - 1, -1, -1):
        used += _turn_tokens(render, count_tokens, history[index]) - empty
        if used > room:
            return index + 1
    return 0


def _turn_tokens(render: Renderer, count_tokens: Callable[[str], int], turn: ChatTurn | None) -> int:
    """Tokens of a conversation of ``turn`` (None: of none) and a short message; a template that
    refuses such a conversation is estimated from the turn's text alone (the search corrects it)."""
    try:
        return count_tokens(render("", [] if turn is None else [turn], _PROBE_MESSAGE))
    except GenerationError:
        return 0 if turn is None else count_tokens(f"{turn[0] or ''}\n{turn[1] or ''}")


def _fewest_dropped(start: int, most: int, fits: Callable[[int], bool]) -> int:
    """The smallest number of dropped turns in [0, most] that ``fits``, searched from ``start``
    (``fits(most)`` holds: the message alone was checked): a step at a time, doubling, until the
    answer is bracketed, then halving. Assumes dropping more never stops a prompt from fitting."""
    if fits(start):
        good, step = start, 1
        while True:  # does keeping more also fit?
            probe = good - step
            if probe < 0 or not fits(probe):
                bad = max(probe, -1)
                break
            good, step = probe, step * 2
    else:
        bad, step = start, 1
        while True:  # drop more until it fits
            probe = bad + step
            if probe >= most or fits(probe):
                good = min(probe, most)
                break
            bad, step = probe, step * 2
    while good - bad > 1:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good
