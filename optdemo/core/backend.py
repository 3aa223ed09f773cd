"""What answers chat and completion requests: the model on this machine, or a serving endpoint.

A :class:`Backend` is anything that streams replies as :class:`~optdemo.core.generation.GenerationUpdate`
values: :class:`~optdemo.runtime.manager.ModelManager` (Accelerate on this machine, the default) and
:class:`~optdemo.remote.endpoint_backend.EndpointBackend` (a serving engine reached over its OpenAI-compatible
API) both are. :class:`~optdemo.app.backend_choice.BackendChoice` holds one of each at most and routes to the
active one, so the UI, the named API and the OpenAI-compatible API work unchanged with either.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Protocol

from optdemo.core.chat_prompt import ChatTurn
from optdemo.core.generation import CacheScope, GenerationParams, GenerationUpdate


class Backend(Protocol):
    """Streams replies; the updates carry the accumulated text, the last one its stats."""

    def stream_chat(
        self,
        history: Sequence[ChatTurn],
        message: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
        max_new_tokens_cap: int = ...,
        system_prompt: str = "",
        cache_scope: CacheScope | None = None,
    ) -> Iterator[GenerationUpdate]:
        """Reply to ``message`` after ``history``; ``stop_event`` ends the reply early; a backend
        that keeps prompt caches reuses those of ``cache_scope``."""
        ...

    def stream_completion(
        self,
        prompt: str,
        params: GenerationParams,
        stop_event: threading.Event | None = None,
        max_new_tokens_cap: int = ...,
        cache_scope: CacheScope | None = None,
    ) -> Iterator[GenerationUpdate]:
        """Continue ``prompt``; ``stop_event`` ends the continuation early."""
        ...

    def context_window(self) -> int | None:
        """The model's context window in tokens, or None when unknown."""
        ...

    def chat_format(self) -> str | None:
        """How a conversation becomes the model's prompt, for people."""
        ...
