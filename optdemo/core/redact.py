"""Secrets never leave the process: one function removes them from any text shown or logged.

Every path that turns an error into words for a person or a client (the UI's errors, the named
API, the OpenAI API, the serving endpoint's messages, the logs) goes through :func:`redact`. It
removes the secrets the process knows (the Hugging Face token, and what the app registers at
start: the serving endpoint's token, the API key, admin passwords) and anything shaped like a
credential (``Bearer ...``, ``Authorization: ...``, ``hf_...`` tokens), since an engine's error may
quote a header it received.
"""

from __future__ import annotations

import re
import threading

_lock = threading.Lock()
_secrets: set[str] = set()
MASK = "***"
# Credentials by their shape: an Authorization header's value, a bearer token, a Hugging Face token.
_SHAPES = (
    (re.compile(r"(?i)\b(authorization[\"']?\s*[:=]\s*[\"']?)(?:bearer\s+)?[^\s\"',}]+"), r"\1" + MASK),
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]+"), r"\1" + MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), "hf_" + MASK),
)
MIN_SECRET_CHARS = 4  # shorter values would mask ordinary words


def register_secret(value: str | None) -> None:
    """Remember ``value`` as a secret to remove from every text :func:`redact` sees."""
    if value and len(value) >= MIN_SECRET_CHARS:
        with _lock:
            _secrets.add(value)


def _hub_token() -> str | None:
    try:
        from huggingface_hub import get_token
    except ImportError:  # pragma: no cover - huggingface_hub is a requirement
        return None
    return get_token()


def redact(text: object, *also: str | None) -> str:
    """``text`` with every known secret (and ``also``) replaced by ``***``, and credential-shaped
    strings masked."""
    result = str(text)
    with _lock:
        known = set(_secrets)
    known.update(value for value in (*also, _hub_token()) if value and len(value) >= MIN_SECRET_CHARS)
    for secret in sorted(known, key=len, reverse=True):  # a longer secret may contain a shorter one
        result = result.replace(secret, MASK)
    for pattern, replacement in _SHAPES:
        result = pattern.sub(replacement, result)
    return result
