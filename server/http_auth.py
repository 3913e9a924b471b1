"""Who may call the relay's HTTP routes: a bearer token with a scope, answered in JSON if not.

Shared by the price API (``/v1/...``) and ``GET /metrics`` on the main port, so that every route
refuses alike: 401 with ``WWW-Authenticate: Bearer`` for a missing, malformed or invalid token,
403 for a valid one without the scope the route needs.
"""

from __future__ import annotations

from aiohttp import web

from foliosync.server.auth import Identity, verify_token
from foliosync.server.http_errors import http_error
from foliosync.sync.errors import AuthError

__all__ = ["authorize_request", "http_auth_error"]


def http_auth_error(
    cls: type[web.HTTPException], message: str, **extra: object
) -> web.HTTPException:
    """An HTTP error in the relay's JSON shape; a 401 also says which scheme to use."""
    headers = {"WWW-Authenticate": "Bearer"} if cls is web.HTTPUnauthorized else None
    return http_error(cls, message, headers=headers, **extra)


def authorize_request(
    request: web.Request, secret: bytes, scope: str, *, query_token: bool = False
) -> Identity:
    """The identity of the request's ``Authorization: Bearer TOKEN`` (or, with ``query_token``,
    of ``?token=``, for an ``EventSource`` that cannot set headers) if it holds ``scope``;
    otherwise raises the 401 or 403 to answer with."""
    header = request.headers.get("Authorization")
    token: str | None = None
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise http_auth_error(web.HTTPUnauthorized, "use Authorization: Bearer TOKEN")
        token = value.strip()
    elif query_token:
        token = request.query.get("token")
    if not token:
        raise http_auth_error(web.HTTPUnauthorized, "no token given")
    try:
        identity = verify_token(secret, token)
    except AuthError as exc:
        raise http_auth_error(web.HTTPUnauthorized, str(exc)) from None
    if scope not in identity.scopes:
        raise http_auth_error(web.HTTPForbidden, f"this token lacks the {scope} scope")
    return identity
