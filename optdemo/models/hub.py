"""Whether the Hugging Face Hub can be reached, and what to tell people when it cannot.

huggingface_hub retries a failed connection five times over about 23 s, printing a warning each
time, so asking it is no way to find out that this machine is offline. Instead, "offline" is decided
once and remembered for a while: the environment says so (``HF_HUB_OFFLINE``), a quick TCP
connection to the Hub's endpoint fails, or a real request failed with a network error. Callers then
answer from the local cache, or with a message, in well under a second.

It also tells a probable typo (``opt-1.3``, close to a catalog name) from a network problem, and
words the remedies: connect, pre-download with ``hf download``, or pick a local folder or tiny-opt.
"""

from __future__ import annotations

import difflib
import os
import socket
import threading
import time
from urllib.parse import urlsplit

from optdemo.core.catalog import OPT_SIZES, TINY_MODEL_ID
from optdemo.core.defaults import (
    HUB_OFFLINE_RECHECK_SECONDS,
    HUB_ONLINE_RECHECK_SECONDS,
    HUB_PROBE_TIMEOUT_SECONDS,
)

_TRUE_WORDS = ("1", "true", "yes", "on")
# How close an id under another owner must be to one of ours to read as a typo of it: a letter
# off in the owner (facebok/opt-1.3b), not another owner's model of the same name.
OWNER_TYPO_CUTOFF = 0.9
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")

# The remembered answer: (reason it is offline or None when reachable, monotonic time it expires).
_state: tuple[str | None, float] | None = None
_state_lock = threading.Lock()


def endpoint() -> str:
    """The Hub's base URL (``HF_ENDPOINT``, else https://huggingface.co)."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def offline_reason() -> str | None:
    """Why the Hub cannot be used now, or None when it can; cheap after the first call.

    The environment is read on every call; a probe's answer is kept for
    ``HUB_OFFLINE_RECHECK_SECONDS`` (offline) or ``HUB_ONLINE_RECHECK_SECONDS`` (reachable).
    """
    known = _environment_reason()
    if known is not None:
        return known
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # read once by huggingface_hub at import: it refuses every request
        return "HF_HUB_OFFLINE was set when the app started"
    with _state_lock:
        if _state is not None and time.monotonic() < _state[1]:
            return _state[0]
    reason = _probe()
    _remember(reason)
    return reason


def _environment_reason() -> str | None:
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in _TRUE_WORDS:
            return f"{name} is set"
    return None


def offline_reason_if_known() -> str | None:
    """Why the Hub is offline, from the environment or a remembered failure; never probes."""
    known = _environment_reason()
    if known is not None:
        return known
    with _state_lock:
        if _state is not None and time.monotonic() < _state[1]:
            return _state[0]
    return None


def mark_unreachable(exc: BaseException) -> None:
    """Remember that a real Hub request just failed for want of a network (see :func:`is_network_error`)."""
    _remember(f"{endpoint()}: {_short(exc)}")


def forget() -> None:
    """Drop the remembered answer, so the next call checks again (tests; a network that came back)."""
    global _state
    with _state_lock:
        _state = None


def _remember(reason: str | None) -> None:
    global _state
    keep = HUB_OFFLINE_RECHECK_SECONDS if reason else HUB_ONLINE_RECHECK_SECONDS
    with _state_lock:
        _state = (reason, time.monotonic() + keep)


def _probe() -> str | None:
    """One TCP connection to the endpoint, bounded by ``HUB_PROBE_TIMEOUT_SECONDS`` including the
    name lookup (which a socket timeout does not bound, hence the thread). Behind a proxy the
    endpoint is not reached directly: assume reachable and let a failed request say otherwise."""
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return None
    parts = urlsplit(endpoint())
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    outcome: list[str | None] = []

    def connect() -> None:
        try:
            with socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_SECONDS):
                outcome.append(None)
        except OSError as exc:
            outcome.append(_short(exc))

    worker = threading.Thread(target=connect, name="optdemo-hub-probe", daemon=True)
    worker.start()
    worker.join(HUB_PROBE_TIMEOUT_SECONDS)
    if not outcome:
        return f"{endpoint()} did not answer within {HUB_PROBE_TIMEOUT_SECONDS:g} s"
    if outcome[0] is None:
        return None
    return f"{endpoint()}: {outcome[0]}"


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:120]


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) means "no network": refused, no DNS, timed out, offline."""
    from huggingface_hub import errors as hub_errors

    network: tuple[type[BaseException], ...] = (
        ConnectionError,
        TimeoutError,
        socket.gaierror,
        hub_errors.OfflineModeIsEnabled,
    )
    try:
        import httpx

        network += (httpx.TransportError,)
    except ImportError:  # pragma: no cover - huggingface_hub depends on httpx
        pass
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, network) or "Name or service not known" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


# ---------------------------------------------------------------- messages
def known_names() -> tuple[str, ...]:
    """The names optdemo offers without a network: tiny-opt and the OPT sizes (short names)."""
    return ("tiny-opt", *OPT_SIZES)


def suggestion(model: str) -> str | None:
    """The catalog name ``model`` is probably a typo of (``opt-1.3`` -> ``opt-1.3b``), or None;
    a typo in the owner is answered with the whole id (``facebok/opt-1.3b`` ->
    ``facebook/opt-1.3b``)."""
    typed = model.strip().lower()
    short = typed.removeprefix("facebook/").removeprefix(TINY_MODEL_ID.split("/")[0] + "/")
    if "/" in short:  # another owner: close to one of ours, owner included?
        ids = [TINY_MODEL_ID, *(f"facebook/{name}" for name in OPT_SIZES)]
        matches = difflib.get_close_matches(typed, ids, n=1, cutoff=OWNER_TYPO_CUTOFF)
        return matches[0] if matches and matches[0] != typed else None
    matches = difflib.get_close_matches(short, known_names(), n=1, cutoff=0.75)
    return matches[0] if matches and matches[0] != short else None


def typo_message(model: str) -> str | None:
    """A sentence for a probable typo of a catalog name, or None."""
    close = suggestion(model)
    return None if close is None else f"{model} is not a model optdemo knows: did you mean {close}?"


def remedy(repo_id: str) -> str:
    """What to do when ``repo_id`` is needed from the Hub and the Hub cannot be reached."""
    return (
        f"connect to the internet, or download it beforehand on a connected machine with "
        f"`hf download {repo_id}` (into the Hugging Face cache), or pick a local folder or the "
        "built-in tiny-opt"
    )


def unreachable_message(repo_id: str, where: str, reason: str | None) -> str:
    """The message for a model that must come from the Hub while the Hub cannot be reached; a
    probable typo is named as such first, since no network would find it either."""
    typo = typo_message(repo_id)
    if typo is not None:
        return typo
    cause = f" ({reason})" if reason else ""
    shape = (
        ""
        if "/" in repo_id
        else f" (Hub ids usually read owner/name; known offline: {', '.join(known_names())})"
    )
    return (
        f"cannot reach the Hugging Face Hub to fetch {where}{cause} and it is not in the local "
        f"cache{shape}: {remedy(repo_id)}"
    )
