"""The app's OpenAI-compatible API on Gradio's own server: /v1/models, /v1/chat/completions and
/v1/completions, streamed (server-sent events) or not.

An adapter like :mod:`optdemo.web.api`: every request goes through the same
:class:`~optdemo.app.service.DemoService` as the tabs (the loaded model, the deployment's caps and
validation, the model lock), shaped by :mod:`optdemo.app.openai_format`. ``--api-key`` protects it with
a bearer token; in public mode it answers only when the operator turned it on (``--openai-api``).
The service's blocking reply runs in a thread of its own (:class:`_Pump`) that always drains it,
so the model lock is released however the request ends; a client that goes away stops the reply.
Replies here hold the service's admission places like every other route's (a 429 past them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import threading
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import BaseRoute

from optdemo.app.openai_format import (
    Deltas,
    OpenAIError,
    ReplyShape,
    Sampling,
    StopCutter,
    as_error,
    check_model,
    cut_error,
    error_for,
    finish_reason,
    model_card,
    no_model_error,
    parse_chat,
    parse_completion,
)
from optdemo.app.service import ChatReply, DemoService
from optdemo.core.errors import OptdemoError
from optdemo.core.generation import CacheScope, GenerationParams, GenerationStats
from optdemo.core.redact import redact

log = logging.getLogger("optdemo")
# OpenAI clients resend the whole conversation and carry no session: their prompts share one
# scope, where the longest common token prefix is reused (as llama.cpp's and vLLM's servers do).
OPENAI_SCOPE = CacheScope("openai")
DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting request checks that its client is still there
_END = object()  # the pump's "reply finished" marker


class ClientGone(Exception):
    """The client closed the connection before the reply was complete."""


def error_response(err: OpenAIError) -> JSONResponse:
    """The JSON error response for ``err`` (its status, OpenAI's error object)."""
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.to_dict(), status_code=err.status, headers=headers)


def _event(data: dict | str) -> str:
    """One server-sent event: ``data: {...}`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


class _Pump:
    """Runs the service's blocking reply iterator to its end in its own thread and hands each step
    to the event loop. ``stop()`` ends the reply early through the service's stop event; the thread
    still drains it, so the model lock is released in the thread that took it."""

    def __init__(self, service: DemoService, session: str, steps: Iterator[ChatReply]) -> None:
        self.service, self.session = service, session
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self._getter: asyncio.Future | None = None
        threading.Thread(target=self._run, args=(steps,), name="optdemo-openai", daemon=True).start()

    def _run(self, steps: Iterator[ChatReply]) -> None:
        try:
            for step in steps:
                self._put(step)
            self._put(_END)
        except Exception as exc:  # noqa: BLE001 - handed to the request, which reports it
            self._put(exc)

    def _put(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the server (and its loop) already shut down
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def next(self, request: Request) -> ChatReply | None:
        """The next step (None at the end), checking meanwhile that the client is still there.

        Raises:
            ClientGone: the client went away (the reply was told to stop).
            Exception: whatever the reply raised.
        """
        while True:
            self._getter = self._getter or asyncio.ensure_future(self.queue.get())
            done, _ = await asyncio.wait({self._getter}, timeout=DISCONNECT_POLL_SECONDS)
            if done:
                item, self._getter = self._getter.result(), None
                if isinstance(item, Exception):
                    raise item
                return None if item is _END else item
            if await request.is_disconnected():
                self.stop()
                raise ClientGone

    def stop(self) -> None:
        """End the reply early (the thread drains what is left)."""
        self.service.stop(self.session)
        if self._getter is not None:
            self._getter.cancel()
            self._getter = None


@dataclass(frozen=True)
class _Job:
    """One accepted request, ready to run."""

    shape: ReplyShape
    session: str
    start: Callable[[], Iterator[ChatReply]]
    stops: tuple[str, ...]
    stream: bool
    include_usage: bool
    max_tokens: int


class OpenAIServer:
    """The /v1 routes over one service; thread-safe."""

    def __init__(self, service: DemoService) -> None:
        self.service = service

    def routes(self) -> list[BaseRoute]:
        """The routes to add to Gradio's FastAPI app (``launch(app_kwargs={"routes": ...})``): the
        API's own, then one for anything else under ``/v1``, so that an unknown path or a wrong
        method gets OpenAI's error shape rather than FastAPI's ``{"detail": ...}``. Only ``/v1``
        paths are caught: Gradio's own routes answer as before."""
        router = APIRouter(prefix="/v1")
        router.add_api_route("/models", self.models, methods=["GET"], include_in_schema=False)
        router.add_api_route("/chat/completions", self.chat, methods=["POST"], include_in_schema=False)
        router.add_api_route("/completions", self.completions, methods=["POST"], include_in_schema=False)
        for path in ("", "/{rest:path}"):  # after the API's routes: only what they do not answer
            router.add_api_route(path, _elsewhere, methods=list(_ANY_METHOD), include_in_schema=False)
        return list(router.routes)

    # ---------------------------------------------------------------- endpoints
    async def models(self, request: Request) -> Response:
        """GET /v1/models: the loaded model (an empty list while none is)."""
        try:
            self._guard(request)
        except OpenAIError as err:
            return error_response(err)
        status = self.service.status()
        cards = [model_card(status.model_id, 0)] if status.model_id is not None else []
        return JSONResponse({"object": "list", "data": cards})

    async def chat(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        try:
            self._guard(request)
            req = parse_chat(await _json(request), self.service.settings.max_message_chars)
            shape, params = self._accept(req.model, True, req.sampling)
        except OpenAIError as err:
            return error_response(err)
        session = _session()
        start = functools.partial(
            self.service.chat,
            session,
            req.history,
            req.message,
            params,
            system_prompt=req.system,
            cache_scope=OPENAI_SCOPE,
        )
        job = _Job(
            shape, session, start, req.sampling.stop, req.stream, req.include_usage, params.max_new_tokens
        )
        return await self._reply(request, job)

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        try:
            self._guard(request)
            req = parse_completion(await _json(request))
            shape, params = self._accept(req.model, False, req.sampling)
        except OpenAIError as err:
            return error_response(err)
        session = _session()
        start = functools.partial(
            self.service.complete, session, req.prompt, params, cache_scope=OPENAI_SCOPE
        )
        job = _Job(
            shape, session, start, req.sampling.stop, req.stream, req.include_usage, params.max_new_tokens
        )
        return await self._reply(request, job)

    # ---------------------------------------------------------------- checks
    def _guard(self, request: Request) -> None:
        """Refuse when the API is off here or the bearer token is wrong."""
        settings = self.service.settings
        if not settings.openai_api_enabled:
            raise OpenAIError(
                "the OpenAI-compatible API is off in this public deployment: the operator can turn it "
                "on with --openai-api (OPTDEMO_OPENAI_API=1), ideally with --api-key",
                403,
                "permission_error",
                code="api_disabled",
            )
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise OpenAIError(
                "a valid API key is required: send it as 'Authorization: Bearer KEY' (the key given "
                "to the server with --api-key)",
                401,
                "authentication_error",
                code="invalid_api_key",
            )

    def _accept(
        self, model: str | None, chat: bool, sampling: Sampling
    ) -> tuple[ReplyShape, GenerationParams]:
        """Check that a model is loaded and is the one asked for, and the sampling values (the
        service's own validation and caps); the reply's shape and the generation parameters."""
        status = self.service.status()
        if status.model_id is None or status.display_name is None:
            raise no_model_error(status.busy)
        check_model(model, (status.model_id, status.display_name))
        try:
            params = self.service.params(
                sampling.max_tokens,
                sampling.temperature,
                sampling.top_p,
                sampling.top_k,
                sampling.repetition_penalty,
                sampling.seed,
            )
        except OptdemoError as exc:
            raise error_for(exc) from None
        return ReplyShape(status.model_id, chat), params

    # ---------------------------------------------------------------- running a reply
    async def _reply(self, request: Request, job: _Job) -> Response:
        """Start the reply; wait for its first step, so a refusal is an HTTP error (past the
        service's admission limit: a 429), then answer."""
        pump = _Pump(self.service, job.session, job.start())
        try:
            first = await pump.next(request)
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - reported in OpenAI's shape
            return error_response(_reported(exc))
        if job.stream:
            return StreamingResponse(self._events(request, pump, job, first), media_type="text/event-stream")
        cutter, step, stats = StopCutter(job.stops), first, None
        text = ""
        try:
            while step is not None:
                text = cutter.visible(step.text, final=step.stats is not None)
                stats = step.stats or stats
                if cutter.hit and step.stats is None:
                    self.service.stop(job.session)  # the reply ends at the stop sequence
                step = await pump.next(request)
            _raise_if_cut(stats, cutter.hit)
        except ClientGone:
            return Response(status_code=499)
        except asyncio.CancelledError:  # the server is shutting down, or the client went away
            pump.stop()
            raise
        except Exception as exc:  # noqa: BLE001 - reported in OpenAI's shape
            return error_response(_reported(exc))
        reason = finish_reason(stats, job.max_tokens, cutter.hit)
        return JSONResponse(job.shape.response(text, reason, stats))

    async def _events(self, request: Request, pump: _Pump, job: _Job, first: ChatReply) -> AsyncIterator[str]:
        """The server-sent events of a streamed reply, ending with ``data: [DONE]``."""
        cutter, deltas, stats, step = StopCutter(job.stops), Deltas(), None, first
        finished = False
        try:
            if job.shape.chat:
                yield _event(job.shape.chunk("", first=True))
            while step is not None:
                final = step.stats is not None
                piece = deltas.step(cutter.visible(step.text, final), final)
                if piece:
                    yield _event(job.shape.chunk(piece))
                stats = step.stats or stats
                if cutter.hit and not final:
                    self.service.stop(job.session)  # the reply ends at the stop sequence
                step = await pump.next(request)
            _raise_if_cut(stats, cutter.hit)
            yield _event(
                job.shape.chunk(
                    None if job.shape.chat else "", finish_reason(stats, job.max_tokens, cutter.hit)
                )
            )
            if job.include_usage:
                yield _event(job.shape.usage_chunk(stats))
            finished = True
        except ClientGone:
            return
        except Exception as exc:  # noqa: BLE001 - the stream already started: its last event says it
            yield _event(_reported(exc).to_dict())
            finished = True
        finally:
            if not finished:  # cancelled (the client went away) or closed early
                pump.stop()
        yield _event("[DONE]")


_ROUTES = {"/v1/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}
_ANY_METHOD = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


async def _elsewhere(request: Request) -> Response:
    """Any /v1 request the API's routes did not take: a 405 (with ``Allow``) for a known path
    asked with the wrong method, else a 404 listing what is offered; both in OpenAI's shape."""
    rest = request.path_params.get("rest")
    path = "/v1" if rest is None else f"/v1/{rest}"
    allowed = _ROUTES.get(path)
    if allowed is not None:
        response = error_response(
            OpenAIError(
                f"{request.method} is not allowed on {path}: use {allowed} {path}",
                405,
                code="method_not_allowed",
            )
        )
        response.headers["Allow"] = allowed
        return response
    offered = ", ".join(f"{method} {route}" for route, method in _ROUTES.items())
    shown = path if len(path) <= 120 else path[:120] + "..."
    return error_response(
        OpenAIError(f"there is no {shown} here: this server offers {offered}", 404, code="unknown_url")
    )


def _session() -> str:
    """A session of its own for each request: its stop event is this request's alone."""
    return f"openai-{uuid.uuid4().hex}"


def _raise_if_cut(stats: GenerationStats | None, stopped_at_sequence: bool) -> None:
    """Raise the error of a reply the server cut before its end (see :func:`cut_error`)."""
    cut = cut_error(stats, stopped_at_sequence)
    if cut is not None:
        raise cut


def _reported(exc: Exception) -> OpenAIError:
    """The OpenAI error for an exception of a reply (a failed serving endpoint: 502), with secrets
    removed; an unexpected one is logged as the bug it is, its traceback scrubbed too."""
    err = as_error(exc)
    if err is not None:
        return OpenAIError(redact(err.message), err.status, err.type, err.param, err.code)
    trace = "".join(traceback.format_exception(exc))
    log.error("unexpected error in the OpenAI-compatible API: %s", redact(trace))
    return OpenAIError(
        f"Something went wrong ({type(exc).__name__}: {redact(str(exc))[:200]}). The server is "
        "still running: try again, and report this if it repeats.",
        500,
        "server_error",
    )


async def _json(request: Request) -> object:
    """The request's JSON body (its text is checked by the parsers: lone surrogates are refused).

    Raises:
        OpenAIError: not JSON, or nested deeper than Python's parser goes (a RecursionError).
    """
    try:
        return await request.json()
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise OpenAIError(
            "the request body must be JSON (UTF-8 text, nested at most a few hundred levels)"
        ) from None
