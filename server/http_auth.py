"""Who may call the relay's HTTP routes: a bearer token with a scope, answered in JSON if not.

Shared by the price API (``/v1/...``) and ``GET /metrics`` on the main port, so that every route
refuses alike: 401 with ``WWW-Authenticate: Bearer`` for a missing, malformed or invalid token,
403 for a valid one without the scope the route needs.

A token is checked by the relay's extensions (their ``authenticate`` chain, the same one a
WebSocket Hello goes through): the :func:`bearer_authentication` middleware asks them, since
the chain is asynchronous, and :func:`authorize_request` then only reads its answer. In an app
without that middleware, :func:`authorize_request` verifies the token against the secret itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from foliosync.server.auth import Identity, verify_token
from foliosync.server.extensions import ConnectionRequest, HookRunner
from foliosync.server.http_errors import http_error
from foliosync.sync.errors import AuthError, ExtensionFailed

__all__ = [
    "HookRunnerKey",
    "authorize_request",
    "bearer_authentication",
    "http_auth_error",
]

HookRunnerKey = web.AppKey("hooks", HookRunner)
"""The extensions that authenticate this app's HTTP requests."""


@dataclass(frozen=True, slots=True)
class _Checked:
    token: str
    identity: Identity | None
    refusal: str = ""


# What bearer_authentication found, under a typed key where aiohttp has them (3.12 and later).
_CHECKED: Any = (
    web.RequestKey("foliosync.bearer", _Checked)
    if hasattr(web, "RequestKey")
    else "foliosync.bearer"
)


def http_auth_error(
    cls: type[web.HTTPException], message: str, **extra: object
) -> web.HTTPException:
    """An HTTP error in the relay's JSON shape; a 401 also says which scheme to use."""
    headers = {"WWW-Authenticate": "Bearer"} if cls is web.HTTPUnauthorized else None
    return http_error(cls, message, headers=headers, **extra)


def _header_token(request: web.Request) -> str | None:
    """The bearer token of the Authorization header; None without one; 401 if malformed."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise http_auth_error(web.HTTPUnauthorized, "use Authorization: Bearer TOKEN")
    return value.strip()


@web.middleware
async def bearer_authentication(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Ask the app's extensions who a request's token (header, else ``?token=``) is, before the
    route runs; the route decides with :func:`authorize_request` whether that is enough."""
    hooks = request.app.get(HookRunnerKey)
    if hooks is not None and request.path != "/ws":  # a WebSocket authenticates by its Hello
        header = request.headers.get("Authorization")
        scheme, _, value = (header or "").strip().partition(" ")
        token = value.strip() if scheme.lower() == "bearer" else request.query.get("token")
        if token:
            info = ConnectionRequest(request.remote, request.headers, "", request.path)
            try:
                checked = _Checked(token, await hooks.authenticate(token, info))
            except AuthError as exc:
                checked = _Checked(token, None, str(exc))
            except ExtensionFailed:
                checked = _Checked(token, None, "the relay's authentication check failed")
            request[_CHECKED] = checked
    return await handler(request)


def authorize_request(
    request: web.Request, secret: bytes, scope: str, *, query_token: bool = False
) -> Identity:
    """The identity of the request's ``Authorization: Bearer TOKEN`` (or, with ``query_token``,
    of ``?token=``, for an ``EventSource`` that cannot set headers) if it holds ``scope``;
    otherwise raises the 401 or 403 to answer with."""
    token = _header_token(request)
    if token is None and query_token:
        token = request.query.get("token")
    if not token:
        raise http_auth_error(web.HTTPUnauthorized, "no token given")
    checked = request.get(_CHECKED)
    if isinstance(checked, _Checked) and checked.token == token:
        if checked.identity is None:
            raise http_auth_error(web.HTTPUnauthorized, checked.refusal)
        identity = checked.identity
    else:
        try:
            identity = verify_token(secret, token)
        except AuthError as exc:
            raise http_auth_error(web.HTTPUnauthorized, str(exc)) from None
    if scope not in identity.scopes:
        raise http_auth_error(web.HTTPForbidden, f"this token lacks the {scope} scope")
    return identity
