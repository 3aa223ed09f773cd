"""The browser's admin sign-in: two small routes on Gradio's own server that set and clear a cookie.

``POST /optdemo/sign-in`` takes ``{"username", "password"}`` as JSON and, for an ``--auth`` account,
sets the admin credential as a cookie (HttpOnly: the page's scripts never read it; SameSite=Strict:
no other site's page can send it; Secure when the page came over https). Every later request of
that browser (Gradio's queue, its direct calls) carries it, and :func:`~optdemo.web.api.admin_of`
reads it there. The credential never travels through a Gradio event, so nobody who merely knows
the browser's session hash can read or replay it. ``POST /optdemo/sign-out`` revokes it and clears
the cookie. Refusals are JSON ``{"signed_in": false, "message"}``: 401 for a wrong password, 429
with ``Retry-After`` while the address must wait (the limit is the same as for ``/sign_in``).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from optdemo.app.admin_sessions import TooManySignInsError
from optdemo.app.service import DemoService
from optdemo.core.errors import AccessError
from optdemo.web.api import ADMIN_COOKIE, admin_of, client_of

SIGN_IN_PATH = "/optdemo/sign-in"
SIGN_OUT_PATH = "/optdemo/sign-out"
MAX_FORM_BYTES = 4096  # a username and a password; anything larger is refused unread
SIGNED_IN = "Signed in as admin: you can load, unload and clear the cache."
SIGNED_OUT = "Signed out."
BAD_FORM = 'send the username and password as JSON: {"username": "...", "password": "..."}'


class AdminRoutes:
    """The sign-in and sign-out routes over one service."""

    def __init__(self, service: DemoService) -> None:
        self.service = service

    def routes(self) -> list[BaseRoute]:
        """The routes to add to Gradio's FastAPI app (``launch(app_kwargs={"routes": ...})``)."""
        router = APIRouter()
        router.add_api_route(SIGN_IN_PATH, self.sign_in, methods=["POST"], include_in_schema=False)
        router.add_api_route(SIGN_OUT_PATH, self.sign_out, methods=["POST"], include_in_schema=False)
        return list(router.routes)

    async def sign_in(self, request: Request) -> Response:
        """Check the form; on success set the credential as the cookie (it is not in the body)."""
        body = await request.body()
        if len(body) > MAX_FORM_BYTES:
            return _refusal(413, BAD_FORM)
        try:
            form = json.loads(body)
            username, password = form["username"], form["password"]
            if not isinstance(username, str) or not isinstance(password, str):
                raise TypeError
        except (ValueError, TypeError, KeyError):
            return _refusal(400, BAD_FORM)
        try:
            grant = self.service.sign_in(client_of(request), username, password)
        except TooManySignInsError as exc:
            return _refusal(429, str(exc), {"Retry-After": str(exc.retry_after)})
        except AccessError as exc:
            return _refusal(401, str(exc))
        answer = {
            "signed_in": True,
            "message": SIGNED_IN,
            "expires_in": grant.expires_in,
            "idle_timeout": grant.idle_timeout,
        }
        response = JSONResponse(answer)
        response.set_cookie(
            ADMIN_COOKIE,
            grant.token,
            max_age=grant.expires_in,
            path="/",
            secure=is_https(request),
            httponly=True,
            samesite="strict",
        )
        return response

    async def sign_out(self, request: Request) -> Response:
        """Revoke the credential the browser holds, if any, and clear its cookie."""
        revoked = self.service.sign_out(admin_of(request))
        response = JSONResponse({"signed_in": False, "signed_out": revoked, "message": SIGNED_OUT})
        response.delete_cookie(
            ADMIN_COOKIE, path="/", secure=is_https(request), httponly=True, samesite="strict"
        )
        return response


def is_https(request: Request) -> bool:
    """Whether the browser reached the app over https: directly, or through a proxy that says so
    (``X-Forwarded-Proto``, as on a Space). A wrong "yes" only keeps the cookie off plain http."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def _refusal(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"signed_in": False, "message": message}, status_code=status, headers=headers)
