"""Prices over plain HTTP, next to the WebSocket: publish, poll and stream.

- ``POST /v1/ticks`` (token with the ``publish`` scope): a batch of ticks, JSON
  (``{"ticks": [...]}`` or a bare list) or msgpack (``Content-Type: application/msgpack`` or
  ``application/x-msgpack``; any other type is read as JSON). A tick is
  ``{"symbol", "price", "timestamp" | "time_ms", "size"?}`` or ``[symbol, price, time_ms, size?]``
  with the time in epoch milliseconds. Each tick is checked on its own: the answer is
  ``{"accepted": n, "rejected": [{"index": i, "reason": "..."}]}``, so a publisher learns which
  ones were refused and why while the good ones of the batch go out. Bodies over
  :data:`MAX_BODY_BYTES` get 413.
- ``GET /v1/prices?symbols=AAPL,MSFT&since=CURSOR`` (``sync`` scope): ``{"cursor": N,
  "prices": [...]}``, the latest price of each symbol asked for, or with ``since`` only those
  that changed after that cursor (pass the returned cursor next time). A ``since`` beyond the
  relay's cursor (the relay restarted and counts from zero again) is answered with everything,
  as if there were no ``since``. Without ``symbols``: every symbol the relay has a price for.
  At most 2,000 symbols, and the URL must fit in the server's 8 KiB request line.
- ``GET /v1/prices/stream?symbols=...`` (``sync`` scope): Server-Sent Events. First an
  ``event: snapshot`` with the latest prices, then ``event: prices`` with the new ones as they
  come, conflated exactly like a WebSocket subscriber's (per symbol, at the policy's push window;
  a slow reader gets fewer, newer prices, and the relay holds one entry per symbol for it, never a
  queue), and a ``: keep-alive`` comment every :data:`HEARTBEAT_SECONDS` seconds.

The token goes in ``Authorization: Bearer TOKEN``. The stream also takes it as a ``?token=``
query parameter, because a browser's ``EventSource`` cannot set headers; such a URL ends up in
access logs and browser history, so give it a short-lived token. A missing or invalid token
gets 401, a token without the needed scope 403, a bad request 400, each with ``{"error": MESSAGE,
"code": CODE}`` like every error of the relay (:mod:`foliosync.server.http_errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import msgpack
from aiohttp import web

from foliosync.server.auth import Identity, verify_token
from foliosync.server.http_errors import http_error, json_error
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import AuthError, ValidationError
from foliosync.sync.prices import LatestPrices, PricePoint, check_ticks
from foliosync.sync.protocol.frames import MAX_TICKS
from foliosync.sync.validation import normalize_symbol

if TYPE_CHECKING:
    from foliosync.server.relay import Relay

__all__ = ["HEARTBEAT_SECONDS", "MAX_BODY_BYTES", "SseSubscriber", "add_price_routes"]

MAX_BODY_BYTES = 4 << 20
"""Largest ``POST /v1/ticks`` body."""
HEARTBEAT_SECONDS = 15.0
"""How often an idle event stream gets a comment, so that proxies keep it open."""
_MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack"})


class _Streams:
    """The open event streams of an app, so that shutting down can end them."""

    def __init__(self) -> None:
        self.open: set[SseSubscriber] = set()


_STREAMS = web.AppKey("price_streams", _Streams)


def _relay(request: web.Request) -> Relay:
    from foliosync.server.relay import RelayKey  # here: relay.py imports this module

    return request.app[RelayKey]


def _fail(cls: type[web.HTTPException], message: str, **extra: object) -> web.HTTPException:
    headers = {"WWW-Authenticate": "Bearer"} if cls is web.HTTPUnauthorized else None
    return http_error(cls, message, headers=headers, **extra)


class _TooLarge(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def _refuse_too_large(request: web.Request, message: str) -> web.StreamResponse:
    """413, then the connection is closed: the rest of an oversized body is not worth reading
    (aiohttp would otherwise linger up to 10 s draining it before the next request)."""
    response = json_error(413, message, headers={"Connection": "close"})
    await response.prepare(request)
    await response.write_eof()
    request.protocol.force_close()
    return response


def _authorize(request: web.Request, scope: str, *, query_token: bool = False) -> Identity:
    header = request.headers.get("Authorization")
    token: str | None = None
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise _fail(web.HTTPUnauthorized, "use Authorization: Bearer TOKEN")
        token = value.strip()
    elif query_token:
        token = request.query.get("token")
    if not token:
        raise _fail(web.HTTPUnauthorized, "no token given")
    try:
        identity = verify_token(_relay(request).secret, token)
    except AuthError as exc:
        raise _fail(web.HTTPUnauthorized, str(exc)) from None
    if scope not in identity.scopes:
        raise _fail(web.HTTPForbidden, f"this token lacks the {scope} scope")
    return identity


def _symbols(request: web.Request, limit: int, *, required: bool) -> list[str] | None:
    text = request.query.get("symbols")
    if text is None or not text.strip():
        if required:
            raise _fail(web.HTTPBadRequest, "give the symbols to follow: ?symbols=AAPL,MSFT")
        return None
    raw = [s for s in (part.strip() for part in text.split(",")) if s]
    if len(raw) > limit:
        raise _fail(web.HTTPBadRequest, f"at most {limit} symbols per request, got {len(raw)}")
    symbols: dict[str, None] = {}
    for symbol in raw:
        try:
            symbols.setdefault(normalize_symbol(symbol), None)
        except ValidationError as exc:
            raise _fail(web.HTTPBadRequest, str(exc), symbol=symbol[:64]) from None
    return list(symbols)


def _points(points: Iterable[PricePoint]) -> list[dict[str, object]]:
    return [p.to_json() for p in points]


# -- POST /v1/ticks ------------------------------------------------------------------------------


async def _read_body(request: web.Request) -> bytes:
    too_large = f"the body is over {MAX_BODY_BYTES} bytes"
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _TooLarge(too_large)
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise _TooLarge(too_large)
    return bytes(body)


def _decode_ticks(body: bytes, content_type: str) -> list[Any]:
    try:
        if content_type in _MSGPACK_TYPES:
            payload = msgpack.unpackb(body, raw=False, strict_map_key=False)
        else:
            payload = json.loads(body)
    except (ValueError, TypeError, RecursionError) as exc:  # msgpack's are ValueErrors; a list
        # as a key is a TypeError; JSON nested too deep a RecursionError
        kind = "msgpack" if content_type in _MSGPACK_TYPES else "JSON"
        raise _fail(web.HTTPBadRequest, f"the body is not valid {kind}: {exc}") from None
    if isinstance(payload, dict):
        if set(payload) != {"ticks"}:
            raise _fail(web.HTTPBadRequest, 'the body is {"ticks": [...]} or a list of ticks')
        payload = payload["ticks"]
    if not isinstance(payload, list):
        raise _fail(web.HTTPBadRequest, 'the body is {"ticks": [...]} or a list of ticks')
    if len(payload) > MAX_TICKS:
        raise _TooLarge(f"at most {MAX_TICKS} ticks per request")
    return payload


async def _post_ticks(request: web.Request) -> web.StreamResponse:
    _authorize(request, "publish")
    try:
        body = await _read_body(request)
        raws = _decode_ticks(body, request.content_type)
    except _TooLarge as exc:
        return await _refuse_too_large(request, exc.message)
    good, bad = check_ticks(raws, wall_ms())
    _relay(request).prices.publish(good)
    return web.json_response(
        {"accepted": len(good), "rejected": [{"index": i, "reason": r} for i, r in bad]}
    )


# -- GET /v1/prices ------------------------------------------------------------------------------


async def _get_prices(request: web.Request) -> web.Response:
    _authorize(request, "sync")
    relay = _relay(request)
    symbols = _symbols(request, relay.config.max_symbols, required=False)
    since_text = request.query.get("since")
    book = relay.prices.book
    epoch = relay.prices.epoch
    since: int | None = None
    if since_text is not None and since_text.strip():
        # A cursor is "EPOCH.N": N counts this relay run's price changes and EPOCH names the run,
        # so a cursor from before a restart is recognised and answered with everything.
        text_epoch, dot, text_n = since_text.strip().rpartition(".")
        try:
            since = int(text_n)
            if since < 0 or (dot and not (text_epoch.isascii() and text_epoch.isdigit())):
                raise ValueError
            run = int(text_epoch) if dot else None
        except ValueError:
            raise _fail(
                web.HTTPBadRequest, f"since must be a cursor from this API, not {since_text!r}"
            ) from None
        if run != epoch:
            since = None  # another run of the relay (or a bare number): start over
    if since is None or since > book.cursor:
        points = book.snapshot(sorted(symbols)) if symbols is not None else None
        if points is None:
            points, _ = book.changed_since(0)
        cursor = book.cursor
    else:
        points, cursor = book.changed_since(since, symbols)
    cursor_text = f"{epoch}.{cursor}"
    return web.json_response(
        {"cursor": cursor_text, "prices": _points(points)}, headers={"Cache-Control": "no-store"}
    )


# -- GET /v1/prices/stream -----------------------------------------------------------------------


class SseSubscriber:
    """One event stream's side of the hub: the prices it has not written yet, and a flag."""

    def __init__(self) -> None:
        self.prices = LatestPrices()
        self.closing = False
        self._wakeup = asyncio.Event()

    def deliver_prices(self, points: list[PricePoint]) -> None:
        self.prices.add(points)
        self._wakeup.set()

    def close(self) -> None:
        self.closing = True
        self._wakeup.set()

    async def wait(self, timeout: float) -> bool:
        """Until woken (True) or ``timeout`` seconds (False)."""
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            return False
        self._wakeup.clear()
        return True


def _event(name: str, data: object) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream_prices(request: web.Request) -> web.StreamResponse:
    _authorize(request, "sync", query_token=True)
    relay = _relay(request)
    symbols = _symbols(request, relay.config.max_symbols, required=True)
    assert symbols is not None
    hub = relay.prices
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass the events through, do not buffer them
        }
    )
    await response.prepare(request)
    subscriber = SseSubscriber()
    streams = request.app[_STREAMS]
    streams.open.add(subscriber)
    try:
        snapshot = hub.subscribe(subscriber, symbols)
        await response.write(b"retry: 3000\n" + _event("snapshot", _points(snapshot)))
        last_write = time.monotonic()
        while not subscriber.closing:
            # Wake at least each second to notice a client that went away while nothing moved.
            woken = await subscriber.wait(min(1.0, HEARTBEAT_SECONDS))
            transport = request.transport
            if subscriber.closing or transport is None or transport.is_closing():
                break
            if woken and subscriber.prices:
                # The write waits for the socket: meanwhile newer prices replace older ones in
                # subscriber.prices, so a slow reader costs one entry per symbol, no more.
                await response.write(_event("prices", _points(subscriber.prices.take())))
                last_write = time.monotonic()
                continue
            if time.monotonic() - last_write >= HEARTBEAT_SECONDS:
                await response.write(b": keep-alive\n\n")
                last_write = time.monotonic()
    except (ConnectionError, RuntimeError):
        pass  # the client went away
    finally:
        streams.open.discard(subscriber)
        hub.unsubscribe(subscriber)
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write_eof()
    return response


async def _end_streams(app: web.Application) -> None:
    for subscriber in list(app[_STREAMS].open):
        subscriber.close()


def add_price_routes(app: web.Application) -> None:
    """Register ``POST /v1/ticks``, ``GET /v1/prices`` and ``GET /v1/prices/stream`` on the
    relay's app (the handlers find the :class:`~foliosync.server.relay.Relay` in the app)."""
    app[_STREAMS] = _Streams()
    app.on_shutdown.append(_end_streams)
    app.router.add_post("/v1/ticks", _post_ticks)
    app.router.add_get("/v1/prices", _get_prices)
    app.router.add_get("/v1/prices/stream", _stream_prices)
