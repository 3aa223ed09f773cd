"""Talking to a serving engine's OpenAI-compatible API: which endpoint (:class:`EndpointConfig`),
what it reported when checked (:class:`EngineInfo`), and every failure as one sentence
(:func:`explain`, :func:`refusal`, all made by :func:`failure`, which removes secrets). Requests go
through huggingface_hub's HTTP session (streamed replies: :mod:`optdemo.remote.engine_stream`), so
they obey the same settings (HF_HUB_OFFLINE included). The endpoint's token is registered as a
secret as soon as it is given, so no message or log shows it, even quoted back by the engine.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx2
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, OfflineModeIsEnabled
from huggingface_hub.utils import get_session, hf_raise_for_status

from optdemo.core.defaults import ENDPOINT_CONNECT_TIMEOUT_SECONDS, ENDPOINT_READ_TIMEOUT_SECONDS
from optdemo.core.errors import ConfigError, EndpointError
from optdemo.core.redact import redact, register_secret

T = TypeVar("T")
_MAX_URL_CHARS = 500
# Where engines say how long a context their model takes (/v1/models entries, TGI's /info).
_CONTEXT_KEYS = ("max_model_len", "context_length", "max_context_length", "max_total_tokens")


@dataclass(frozen=True)
class EndpointConfig:
    """Which serving endpoint to use: its base URL (without ``/v1``), model name and token."""

    url: str  # e.g. http://127.0.0.1:8000, no trailing slash, no /v1
    model: str | None = None  # None: the one model the engine lists
    token: str | None = field(default=None, repr=False)  # bearer token; never shown or returned

    @property
    def api_url(self) -> str:
        """The OpenAI-compatible API's root, ``<url>/v1``."""
        return f"{self.url}/v1"


def parse_endpoint(url: object, model: object = None, token: object = None) -> EndpointConfig:
    """An :class:`EndpointConfig` from typed values: ``http(s)://host[:port][/path]``, with or
    without a trailing ``/v1`` (engines differ in what they document).

    Raises:
        ConfigError: not an http(s) URL with a host, or credentials written into the URL.
    """
    for name, value in (("url", url), ("model", model), ("token", token)):
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"the endpoint's {name} must be text")
    text = str(url or "").strip()
    if not text:
        raise ConfigError("give the serving endpoint's URL, e.g. http://127.0.0.1:8000")
    if len(text) > _MAX_URL_CHARS:
        raise ConfigError(f"the endpoint URL is longer than {_MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ConfigError(f"{text[:80]!r} is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"the endpoint URL must start with http:// or https:// and name a host, got {text[:80]!r}"
        )
    if parts.username or parts.password:
        raise ConfigError("do not write credentials into the endpoint URL: give the token separately")
    if parts.query or parts.fragment:
        raise ConfigError("the endpoint URL takes no query or fragment: give the server's base URL")
    path = parts.path.rstrip("/")
    path = path[: -len("/v1")] if path.endswith("/v1") else path
    register_secret(str(token).strip() if token else None)  # from now on, never shown
    return EndpointConfig(
        url=f"{parts.scheme}://{parts.netloc}{path}",
        model=str(model).strip() or None if model else None,
        token=str(token).strip() or None if token else None,
    )


@dataclass(frozen=True)
class EngineInfo:
    """What a serving engine reported when connected (nothing secret: no token)."""

    url: str
    model: str  # the model name requests carry
    context_length: int | None = None  # tokens, where the engine tells
    engine: str | None = None  # e.g. "vLLM", "TGI", where it tells
    version: str | None = None
    connect_seconds: float = 0.0
    note: str = ""  # e.g. that the engine lists no models, so the name was checked by a request

    def describe(self) -> str:
        """The status line: ``serving endpoint <url> (<model>)``."""
        return f"serving endpoint {self.url} ({self.model})"

    def engine_text(self) -> str:
        """``vLLM 0.11.0``, ``version 1.2`` (a version, no name), or that the engine did not tell."""
        if not self.engine:
            return f"version {self.version}" if self.version else "not reported by the engine"
        return f"{self.engine} {self.version}" if self.version else self.engine

    def to_dict(self) -> dict:
        """Plain data for ``/status`` (never the token)."""
        return {
            "url": self.url,
            "model": self.model,
            "context_length": self.context_length,
            "engine": self.engine,
            "version": self.version,
            "connect_seconds": round(self.connect_seconds, 4),
            "note": self.note,
        }


def check_engine(config: EndpointConfig) -> EngineInfo:
    """Check the engine and the model: ``/v1/models`` must answer and list the model (an engine
    that lists none, as ``transformers serve`` may, gets a one-token request instead), then read
    what the engine tells of itself.

    Raises:
        EndpointError: a sentence naming the endpoint and what to do.
    """
    started = time.perf_counter()
    models = _models(config)
    ids = [str(entry.get("id")) for entry in models if entry.get("id")]
    note = ""
    if config.model is None and not ids:
        raise failure(
            config,
            f"the serving endpoint at {config.url} lists no models: give the model's name (--backend-"
            "model, or the Model field; for transformers serve, the folder or repo it serves)",
        )
    model = config.model or ids[0]
    if ids and model not in ids:
        raise failure(
            config,
            f"the serving endpoint at {config.url} does not serve {model!r}: it serves "
            f"{', '.join(repr(i[:100]) for i in ids[:8])}; check the model name (--backend-model)",
        )
    if not ids:
        _probe(config, model)
        note = "the engine lists no models; the name was checked with a one-token request"
    entry = next((e for e in models if e.get("id") == model), {})
    facts = _engine_facts(config, entry)
    seconds = time.perf_counter() - started
    return EngineInfo(config.url, model, connect_seconds=seconds, note=note, **facts)


def explain(
    exc: BaseException, config: EndpointConfig, started_reply: bool = False, chat: bool = False
) -> EndpointError:
    """The sentence for a failed request to ``config``'s endpoint: offline mode set, engine down,
    the engine's own refusal (wrong model name, bad token), a timeout, or an engine that stopped in
    the middle of a reply. The token never appears in it."""
    where = f"the serving endpoint at {config.url}"
    if isinstance(exc, EndpointError):
        message = str(exc)
    elif isinstance(exc, OfflineModeIsEnabled):
        message = (
            "HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) is set, and huggingface_hub then refuses every "
            "request, to a serving endpoint on this machine too: unset HF_HUB_OFFLINE to use a serving "
            "endpoint (and TRANSFORMERS_OFFLINE; local models need neither: optdemo detects when the "
            "Hub cannot be reached) and restart the app"
        )
    elif isinstance(exc, HfHubHTTPError) and exc.response is not None:
        response = exc.response
        body = _json_body(response)
        message = _http_refusal(where, response.status_code, response.reason_phrase, body, chat)
    elif isinstance(exc, (httpx2.TimeoutException, InferenceTimeoutError)):
        message = f"{where} did not answer in time: check that the engine is running and not overloaded"
    elif isinstance(exc, httpx2.ConnectError):
        message = (
            f"cannot reach {where} ({_reason(exc)}): start the engine, or check the URL and that its "
            "port is open"
        )
    elif started_reply and isinstance(exc, httpx2.TransportError):
        message = (
            f"{where} stopped in the middle of the reply ({_reason(exc)}): the engine may have crashed "
            "or restarted; check it, then send again"
        )
    else:
        message = f"{where} failed ({type(exc).__name__}: {_reason(exc)}): check the engine, then try again"
    return failure(config, message)


def failure(config: EndpointConfig, message: str) -> EndpointError:
    """The :class:`EndpointError` for ``message``, with every secret removed (the endpoint's token,
    registered ones, the HF token, credential shapes): every failure of an endpoint is made here."""
    return EndpointError(redact(message, config.token))


def refusal(
    config: EndpointConfig, status: int, reason: str, body: bytes, chat: bool = False
) -> EndpointError:
    """The error for an engine's HTTP refusal of a streamed request (``body``: the start of its body)."""
    try:
        parsed = json.loads(body)
    except (ValueError, RecursionError):
        parsed = None
    detail = parsed if isinstance(parsed, dict) else {}
    where = f"the serving endpoint at {config.url}"
    return failure(config, _http_refusal(where, status, reason, detail, chat))


def _http_refusal(where: str, status: int, reason: str, body: dict, chat: bool = False) -> str:
    """The engine's HTTP error as a sentence with what to do for its status code (a chat that
    fails on the engine's side is most often a model without a chat template)."""
    detail = error_text(body) or reason
    said = f"{where} refused the request (HTTP {status}: {detail[:300]})"
    if status in (401, 403):
        return f"{said}: check the endpoint's token (--backend-token)"
    if status in (400, 422) or (status == 404 and "model" in detail.lower()):
        return f"{said}: check the model name (--backend-model, or the Model field)"
    if status == 404:
        return f"{said}: check the URL (the server's base URL, with or without /v1)"
    if status >= 500 and chat:
        return (
            f"{where} failed to chat (HTTP {status}: {detail[:300]}): its model may have no chat template "
            "(transformers serve then fails every chat): use Completion mode, or serve a model with a "
            "chat template; the engine's log says more"
        )
    if status >= 500:
        return f"{where} failed (HTTP {status}: {detail[:300]}): check the engine's log"
    return said


def _json_body(response: Any) -> dict:
    try:
        response.read()
        body = response.json()
    except Exception:  # noqa: BLE001 - not JSON: the status line says enough
        return {}
    return body if isinstance(body, dict) else {}


def error_text(body: dict) -> str:
    """The message in an engine's error body: OpenAI's ``error.message``, FastAPI's ``detail``,
    TGI's ``error``."""
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    for value in (error, body.get("detail"), body.get("message")):
        if value:
            return str(value)
    return ""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return "connection refused" if "refused" in text.lower() else text[:200]


def request_headers(config: EndpointConfig) -> dict[str, str]:
    """The Authorization header for the endpoint's own token (none without one)."""
    return {"authorization": f"Bearer {config.token}"} if config.token else {}


def request_timeout() -> httpx2.Timeout:
    """A short wait to connect, a long one for the next piece of a reply."""
    return httpx2.Timeout(ENDPOINT_READ_TIMEOUT_SECONDS, connect=ENDPOINT_CONNECT_TIMEOUT_SECONDS)


def once_more_if_stale(request: Callable[[], T]) -> T:
    """``request()``, sent again once if it failed on a kept-alive connection the engine had
    already closed (it restarted, or dropped the connection after an error): the session's pool
    then opens a fresh one. A request that fails again fails for real."""
    try:
        return request()
    except (httpx2.ReadError, httpx2.WriteError, httpx2.RemoteProtocolError):
        return request()


def _get_json(config: EndpointConfig, path: str, timeout: float = ENDPOINT_CONNECT_TIMEOUT_SECONDS) -> Any:
    """GET ``<url><path>`` as JSON (raises what the session raises)."""
    url = f"{config.url}{path}"
    response = once_more_if_stale(
        lambda: get_session().get(url, headers=request_headers(config), timeout=timeout)
    )
    hf_raise_for_status(response)
    return response.json()


def _models(config: EndpointConfig) -> list[dict]:
    """The engine's ``/v1/models`` entries.

    Raises:
        EndpointError: the engine cannot be reached or does not answer like an OpenAI server.
    """
    try:
        body = _get_json(config, "/v1/models")
    except (httpx2.HTTPError, HfHubHTTPError, OfflineModeIsEnabled) as exc:
        raise explain(exc, config) from None
    except ValueError:
        body = None
    data = body.get("data") if isinstance(body, dict) else body
    if not isinstance(data, list):
        raise failure(
            config,
            f"the server at {config.url} answered /v1/models but not as an OpenAI-compatible engine "
            "does: check the URL",
        )
    return [entry for entry in data if isinstance(entry, dict)]


def _probe(config: EndpointConfig, model: str) -> None:
    """One one-token completion, so that a wrong model name fails now with the engine's answer."""
    payload = {"model": model, "prompt": "Hello", "max_tokens": 1, "temperature": 0}
    try:
        response = once_more_if_stale(
            lambda: get_session().post(
                f"{config.api_url}/completions",
                json=payload,
                headers=request_headers(config),
                timeout=request_timeout(),
            )
        )
        hf_raise_for_status(response)
    except (httpx2.HTTPError, HfHubHTTPError, OfflineModeIsEnabled) as exc:
        raise explain(exc, config) from None


def _engine_facts(config: EndpointConfig, entry: dict) -> dict[str, Any]:
    """Context length, engine and version, from the model's entry (vLLM's say ``owned_by: vllm``)
    and what the engine tells at ``/version`` (vLLM) or ``/info`` (TGI, which names its
    ``model_id``); an engine that tells nothing leaves them None."""
    engine = "vLLM" if str(entry.get("owned_by") or "").lower() == "vllm" else None
    facts: dict[str, Any] = {"context_length": _context_length(entry), "engine": engine, "version": None}
    for path in ("/version", "/info"):
        try:
            body = _get_json(config, path, timeout=2.0)
        except Exception:  # noqa: BLE001 - optional facts: an engine may not have the route
            continue
        if not isinstance(body, dict) or not body.get("version"):
            continue
        facts["version"] = str(body["version"])
        if path == "/info" and "model_id" in body:
            facts["engine"] = facts["engine"] or "TGI"
        facts["context_length"] = facts["context_length"] or _context_length(body)
        break
    return facts


def _context_length(entry: dict) -> int | None:
    for key in _CONTEXT_KEYS:
        value = entry.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None
