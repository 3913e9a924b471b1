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
- ``GET /v1/prices/stream?symbols=...`` (``sync`` scope): Server-Sent Events (aiohttp-sse).
  First an ``event: snapshot`` with the latest prices, then ``event: prices`` with the new ones as
  they come, conflated exactly like a WebSocket subscriber's (per symbol, at the policy's push
  window; a slow reader gets fewer, newer prices, and the relay holds one entry per symbol for it,
  never a queue), and a ``: ping`` comment every :data:`HEARTBEAT_SECONDS` seconds. Each event's
  ``id`` is a cursor like ``GET /v1/prices``'s: a client reconnecting with it as ``Last-Event-ID``
  (an ``EventSource`` does so by itself) gets one ``prices`` event with what changed meanwhile
  instead of a new snapshot. The events are named, so a browser listens with
  ``addEventListener("snapshot" | "prices", ...)``; ``onmessage`` sees none of them.

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
from aiohttp_sse import EventSourceResponse

from foliosync.server.auth import Identity
from foliosync.server.http_auth import authorize_request, http_auth_error
from foliosync.server.http_errors import json_error
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import ValidationError
from foliosync.sync.prices import LatestPrices, PricePoint, check_ticks
from foliosync.sync.protocol.frames import MAX_TICKS
from foliosync.sync.validation import normalize_symbol

if TYPE_CHECKING:
    from foliosync.server.relay import Relay

__all__ = [
    "EVENT_ID_SECONDS",
    "HEARTBEAT_SECONDS",
    "MAX_BODY_BYTES",
    "RETRY_MS",
    "SEND_TIMEOUT_SECONDS",
    "SseSubscriber",
    "add_price_routes",
]

MAX_BODY_BYTES = 4 << 20
"""Largest ``POST /v1/ticks`` body."""
HEARTBEAT_SECONDS = 15.0
"""How often an event stream gets a ``: ping`` comment, so that proxies keep it open."""
SEND_TIMEOUT_SECONDS = 120.0
"""A stream whose client takes nothing for this long is cut (its socket stays full)."""
RETRY_MS = 3000
"""How long a browser waits before it reconnects a dropped stream."""
EVENT_ID_SECONDS = 1.0
"""An event stream's ``id:`` (its resume cursor) is computed at most this often: the cursor
walks all the stream's symbols, too much to do for every event of a busy stream. An event within
this time of the last id goes without one; the id follows on a later event or, once the stream
has been quiet that long, alone (an ``id:`` without data fires no event, but the client keeps
it), and before the relay ends the stream. A client that reconnects with an older id gets a few
prices again, never fewer."""
_MSGPACK_TYPES = frozenset({"application/msgpack", "application/x-msgpack"})


class _Streams:
    """The open event streams of an app, so that shutting down can end them."""

    def __init__(self) -> None:
        self.open: set[SseSubscriber] = set()


_STREAMS = web.AppKey("price_streams", _Streams)


def _relay(request: web.Request) -> Relay:
    from foliosync.server.relay import RelayKey  # here: relay.py imports this module

    return request.app[RelayKey]


_fail = http_auth_error


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
    return authorize_request(request, _relay(request).secret, scope, query_token=query_token)


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
    _relay(request).prices.reject(len(bad))
    _relay(request).prices.publish(good)
    return web.json_response(
        {"accepted": len(good), "rejected": [{"index": i, "reason": r} for i, r in bad]}
    )


# -- GET /v1/prices ------------------------------------------------------------------------------


def _parse_cursor(text: str, epoch: int) -> int | None:
    """The count of a cursor of this run of the relay; None for another run's; ValueError if it
    is not a cursor.

    A cursor is ``EPOCH.N``: N counts this relay run's price changes and EPOCH names the run, so
    a cursor from before a restart is recognised (and answered with everything) instead of being
    compared with a count that began again from zero. A bare number is of no known run.
    """
    text_epoch, dot, text_n = text.strip().rpartition(".")
    count = int(text_n)
    if count < 0 or (dot and not (text_epoch.isascii() and text_epoch.isdigit())):
        raise ValueError(text)
    run = int(text_epoch) if dot else None
    return count if run == epoch else None


async def _get_prices(request: web.Request) -> web.Response:
    _authorize(request, "sync")
    relay = _relay(request)
    symbols = _symbols(request, relay.config.max_symbols, required=False)
    since_text = request.query.get("since")
    book = relay.prices.book
    epoch = relay.prices.epoch
    since: int | None = None
    if since_text is not None and since_text.strip():
        try:
            since = _parse_cursor(since_text, epoch)
        except ValueError:
            raise _fail(
                web.HTTPBadRequest, f"since must be a cursor from this API, not {since_text!r}"
            ) from None
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
    """One event stream's side of the hub: the prices it has not written yet, the sequence number
    of the last price it wrote of each symbol (for its event ids), and a flag."""

    def __init__(self) -> None:
        self.prices = LatestPrices()
        self.written: dict[str, int] = {}
        self.closing = False
        self.since = 0.0  # when the prices waiting now were first handed over (perf_counter)
        self._wakeup = asyncio.Event()

    def deliver_prices(self, points: list[PricePoint]) -> None:
        if not self.prices:
            self.since = time.perf_counter()
        self.prices.add(points)
        self._wakeup.set()

    def close(self) -> None:
        self.closing = True
        self._wakeup.set()

    def fresh(self, points: list[PricePoint]) -> list[PricePoint]:
        """Those of ``points`` not written yet (a price held in its push window when the stream
        began is released later, though the snapshot or the resumed prices already had it)."""
        written = self.written
        return [p for p in points if p.seq > written.get(p.symbol, 0)]

    def wrote(self, points: Iterable[PricePoint]) -> None:
        written = self.written
        for point in points:
            if point.seq > written.get(point.symbol, 0):
                written[point.symbol] = point.seq

    async def wait(self, timeout: float) -> bool:
        """Until woken (True) or ``timeout`` seconds (False)."""
        try:
            await asyncio.wait_for(self._wakeup.wait(), timeout)
        except TimeoutError:
            return False
        self._wakeup.clear()
        return True


def _data(points: Iterable[PricePoint]) -> str:
    return json.dumps(_points(points), separators=(",", ":"))


async def _stream_prices(request: web.Request) -> web.StreamResponse:
    """The stream: aiohttp-sse writes the events and the keep-alive pings; this handler decides
    what goes in them. Each event's id is a price cursor (as ``GET /v1/prices`` returns) from which
    this client lacks nothing, so an ``EventSource`` that reconnects (it sends the id back as
    ``Last-Event-ID``) gets only what changed meanwhile, in a ``prices`` event, instead of a new
    snapshot. Without a usable id (none, another run of the relay's, not a cursor) it gets the
    ``snapshot``. An id holds for the stream's own ``symbols``: a client that reconnects with
    others should send none."""
    _authorize(request, "sync", query_token=True)
    relay = _relay(request)
    symbols = _symbols(request, relay.config.max_symbols, required=True)
    assert symbols is not None
    hub, book = relay.prices, relay.prices.book
    try:
        resume = _parse_cursor(request.headers.get("Last-Event-ID", ""), hub.epoch)
    except ValueError:
        resume = None
    stream = EventSourceResponse(
        sep="\n",  # as valid as CRLF for every client, one byte a line cheaper
        ping_interval=HEARTBEAT_SECONDS,
        send_timeout=SEND_TIMEOUT_SECONDS,
    )
    await stream.prepare(request)
    subscriber = SseSubscriber()
    streams = request.app[_STREAMS]
    streams.open.add(subscriber)

    def event_id() -> str:
        return f"{hub.epoch}.{book.resume_cursor(subscriber.written, symbols)}"

    loop = asyncio.get_running_loop()
    id_sent_at = loop.time()
    id_owed = False  # an event went without an id: the client's id lags what it has

    async def send_id_alone() -> None:
        nonlocal id_sent_at, id_owed
        async with asyncio.timeout(SEND_TIMEOUT_SECONDS):
            await stream.write(f"id: {event_id()}\n\n".encode())
        id_sent_at, id_owed = loop.time(), False

    try:
        async with stream:
            snapshot = hub.subscribe(subscriber, symbols)
            if resume is not None and resume <= book.cursor:
                first, name = book.changed_since(resume, symbols)[0], "prices"
            else:
                first, name = snapshot, "snapshot"
            subscriber.wrote(book.snapshot(symbols))  # up to date, by the snapshot or the id
            await stream.send(_data(first), id=event_id(), event=name, retry=RETRY_MS)
            while not subscriber.closing and stream.is_connected():
                # Wake at least each second to notice a client that went away while nothing
                # moved, and when an owed id falls due.
                id_due_in = id_sent_at + EVENT_ID_SECONDS - loop.time()
                woken = await subscriber.wait(max(0.0, id_due_in) if id_owed else 1.0)
                transport = request.transport
                if subscriber.closing or transport is None or transport.is_closing():
                    break
                points = []
                since = subscriber.since
                if woken and subscriber.prices:
                    # The write waits for the socket: meanwhile newer prices replace older ones in
                    # subscriber.prices, so a slow reader costs one entry per symbol, no more.
                    points = subscriber.fresh(subscriber.prices.take())
                due = loop.time() - id_sent_at >= EVENT_ID_SECONDS
                if points:
                    subscriber.wrote(points)
                    await stream.send(_data(points), id=event_id() if due else None, event="prices")
                    hub.queued.observe(time.perf_counter() - since)
                    if due:
                        id_sent_at, id_owed = loop.time(), False
                    else:
                        id_owed = True
                elif id_owed and due:
                    await send_id_alone()
            if id_owed and subscriber.closing:  # the relay ends the stream: leave the id current
                await send_id_alone()
    except (ConnectionError, RuntimeError, TimeoutError):
        pass  # the client went away (or stopped reading for SEND_TIMEOUT_SECONDS: cut)
    finally:
        streams.open.discard(subscriber)
        hub.unsubscribe(subscriber)
        _relay(request).counters.prices_dropped_closed += subscriber.prices.replaced
    with contextlib.suppress(ConnectionError, RuntimeError):
        await stream.write_eof()
    return stream


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
