"""The sharing API: ``/v1/shares`` for a device's user, ``/v1/revocations`` for operators.

HTTP rather than frames: sharing is rare, asked by a command (``foliosync share``) that need not
hold a sync connection, and its answers (a list, a status) are what HTTP says well; the live
effects reach the WebSocket connections from the relay (a ``shared`` notice, a ``revoked``
Error, a fatal ``auth_failed``). Every route takes ``Authorization: Bearer TOKEN``, checked by
the relay's extensions like a Hello's token (a revoked token is a 401); errors are in the relay's
``{"error", "code"}`` shape:

- ``POST /v1/shares`` ``{"doc": ID, "user": USER, "access": "read" | "write"}`` (scope sync):
  share the caller's document ``ID`` (its plain id) with ``USER``; 201 with the share.
- ``DELETE /v1/shares/{doc}/{user}`` (scope sync): end it; 404 if there was none.
- ``GET /v1/shares`` (scope sync): ``{"shared_by_me": [...], "shared_with_me": [...]}``.
- ``POST /v1/revocations`` ``{"device": D, "user": U}`` (``user`` optional: that device of every
  user) or ``{"jti": J}`` (scope admin): the tokens stop working on every route, and the open
  connections with them are closed, on every relay of a group; 200 ``{"closed": N}``, N those
  of this relay (the others close theirs as they get the relay's control event).
"""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web

from foliosync.server.auth import Identity
from foliosync.server.http_auth import authorize_request, http_auth_error
from foliosync.server.sharing import Revocation
from foliosync.sync.errors import RelayStoreError, ValidationError

__all__ = ["MAX_BODY_BYTES", "add_share_routes"]

MAX_BODY_BYTES = 16 << 10
"""Largest body of a sharing request (they hold a few names)."""

_fail = http_auth_error


def _relay(request: web.Request) -> Any:
    from foliosync.server.relay import RelayKey  # here: relay.py imports this module

    return request.app[RelayKey]


def _authorize(request: web.Request, scope: str) -> Identity:
    return authorize_request(request, _relay(request).secret, scope)


async def _body(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _fail(web.HTTPRequestEntityTooLarge, f"the body is over {MAX_BODY_BYTES} bytes")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise _fail(web.HTTPRequestEntityTooLarge, f"the body is over {MAX_BODY_BYTES} bytes")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _fail(web.HTTPBadRequest, f"the body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise _fail(web.HTTPBadRequest, "the body is a JSON object")
    return payload


def _text(payload: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = payload.get(key, "")
    if not isinstance(value, str) or (required and not value):
        raise _fail(web.HTTPBadRequest, f'"{key}" is a non-empty string')
    return value


def _store_failed(exc: RelayStoreError) -> web.HTTPException:
    return _fail(web.HTTPServiceUnavailable, f"the relay cannot store shares now: {exc}")


async def _post_share(request: web.Request) -> web.StreamResponse:
    identity = _authorize(request, "sync")
    payload = await _body(request)
    unknown = set(payload) - {"doc", "user", "access"}
    if unknown:
        raise _fail(web.HTTPBadRequest, f"unknown field(s): {', '.join(sorted(unknown))}")
    doc, user = _text(payload, "doc"), _text(payload, "user")
    access = payload.get("access", "write")
    if access not in ("read", "write"):
        raise _fail(web.HTTPBadRequest, '"access" is "read" or "write"')
    try:
        share = await _relay(request).grant_share(identity.user, doc, user, access)
    except ValidationError as exc:
        raise _fail(web.HTTPBadRequest, str(exc)) from None
    except RelayStoreError as exc:
        raise _store_failed(exc) from None
    return web.json_response(share.to_json(), status=201)


async def _delete_share(request: web.Request) -> web.StreamResponse:
    identity = _authorize(request, "sync")
    doc, user = request.match_info["doc"], request.match_info["user"]
    try:
        ended = await _relay(request).revoke_share(identity.user, doc, user)
    except RelayStoreError as exc:
        raise _store_failed(exc) from None
    if not ended:
        raise _fail(web.HTTPNotFound, f"{doc} is not shared with {user}")
    return web.json_response({"revoked": True, "doc": doc, "user": user})


async def _get_shares(request: web.Request) -> web.StreamResponse:
    identity = _authorize(request, "sync")
    shares = _relay(request).shares
    try:
        mine = await shares.by_owner(identity.user)
        theirs = await shares.by_grantee(identity.user)
    except RelayStoreError as exc:
        raise _store_failed(exc) from None
    return web.json_response(
        {
            "shared_by_me": [s.to_json() for s in mine],
            "shared_with_me": [s.to_json() for s in theirs],
        }
    )


async def _post_revocation(request: web.Request) -> web.StreamResponse:
    _authorize(request, "admin")
    payload = await _body(request)
    unknown = set(payload) - {"device", "user", "jti"}
    if unknown:
        raise _fail(web.HTTPBadRequest, f"unknown field(s): {', '.join(sorted(unknown))}")
    revocation = Revocation(
        int(time.time()),
        user=_text(payload, "user", required=False),
        device=_text(payload, "device", required=False),
        jti=_text(payload, "jti", required=False),
    )
    try:
        closed = await _relay(request).revoke_tokens(revocation)
    except ValidationError as exc:
        raise _fail(web.HTTPBadRequest, str(exc)) from None
    except RelayStoreError as exc:
        raise _store_failed(exc) from None
    return web.json_response({"closed": closed})


def add_share_routes(app: web.Application) -> None:
    """Register the sharing routes on the relay's app (see the module's documentation)."""
    app.router.add_post("/v1/shares", _post_share)
    app.router.add_get("/v1/shares", _get_shares)
    app.router.add_delete("/v1/shares/{doc}/{user}", _delete_share)
    app.router.add_post("/v1/revocations", _post_revocation)
