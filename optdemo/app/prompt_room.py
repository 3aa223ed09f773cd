"""How many new tokens a request may ask for, known before it is sent.

One rule bounds ``max_new_tokens`` (:mod:`optdemo.core.chat_prompt`): at most min(the operator's
cap, the model's window minus the tokens of the prompt that must stay). For a chat that prompt is
the system prompt, the format's own text (the plain transcript's preamble and speaker tags, or the
chat template's) and the new message: older turns are left out to make room. The page sets its
max_new_tokens slider to this limit, so that the slider's whole range is accepted; counting needs
the loaded model's tokenizer, which is read here once per loaded configuration (from the files
the load read, never from the network).
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from optdemo.core.chat_prompt import has_chat_template, render_plain, template_renderer
from optdemo.core.errors import OptdemoError
from optdemo.core.load_config import LoadConfig
from optdemo.core.redact import redact
from optdemo.runtime.status import ModelStatus

log = logging.getLogger("optdemo")


class PromptCounter:
    """Counts a prompt's tokens as the loaded model's engine does (same tokenizer, same chat
    format, same special tokens); None where it cannot tell (nothing loaded here, a serving
    endpoint, a tokenizer it cannot read)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[LoadConfig, str] | None = None
        self._tokenizer: Any = None

    def tokens(self, status: ModelStatus, message: str, system_prompt: str, completion: bool) -> int | None:
        """:meth:`completion_tokens` of ``message`` with ``completion``, else :meth:`chat_tokens`."""
        if completion:
            return self.completion_tokens(status, message)
        return self.chat_tokens(status, system_prompt, message)

    def chat_tokens(self, status: ModelStatus, system_prompt: str = "", message: str = "") -> int | None:
        """Tokens of a chat prompt holding only ``system_prompt`` and ``message`` (every old turn
        left out): what must fit beside the reply."""
        tokenizer = self._tokenizer_for(status)
        if tokenizer is None:
            return None
        templated = has_chat_template(tokenizer)
        render = template_renderer(tokenizer) if templated else render_plain
        try:
            text = render(system_prompt, [], message)
        except OptdemoError:  # a template that refuses an empty conversation: unknown
            return None
        return len(tokenizer(text, add_special_tokens=not templated).input_ids)

    def completion_tokens(self, status: ModelStatus, prompt: str) -> int | None:
        """Tokens of a completion prompt (as :func:`optdemo.core.generation.encode_prompt` counts)."""
        tokenizer = self._tokenizer_for(status)
        return None if tokenizer is None else len(tokenizer(prompt).input_ids)

    def _tokenizer_for(self, status: ModelStatus) -> Any:
        """The loaded model's tokenizer, read once per loaded configuration from what the load
        read (its checkpoint folder, or the Hugging Face cache), offline."""
        config, checkpoint = status.config, status.checkpoint
        if config is None or not checkpoint:
            return None
        key = (config, checkpoint)
        with self._lock:
            if self._key == key:
                return self._tokenizer
        tokenizer = _read_tokenizer(config, checkpoint)
        with self._lock:
            self._key, self._tokenizer = key, tokenizer
        return tokenizer


def _read_tokenizer(config: LoadConfig, checkpoint: str) -> Any:
    """The tokenizer a load of ``config`` from ``checkpoint`` uses, or None when it cannot be read
    without the network (the limit is then the window minus one token, as before any count)."""
    from transformers import AutoTokenizer

    options: dict[str, Any] = {"local_files_only": True, "trust_remote_code": config.trust_remote_code}
    if config.revision and not os.path.isdir(checkpoint):
        options["revision"] = config.revision
    try:
        return AutoTokenizer.from_pretrained(config.tokenizer or checkpoint, **options)
    except Exception as exc:  # noqa: BLE001 - counting is a convenience: the engine still checks
        log.info(
            "cannot read the tokenizer of %s to size max_new_tokens: %s",
            config.display_name,
            redact(str(exc)),
        )
        return None
