"""Price ticks across relays through Redis pub/sub: a tick taken on one relay reaches every hub.

Prices are newest-wins and lossy is acceptable: a tick that is lost is replaced by the next of its
symbol within seconds, and a relay that was away reads nothing old worth having. So pub/sub, not
a stream: nothing is kept in Redis, nothing to trim, no offsets. Each relay publishes the ticks
its own sources gave it (feeds, publishers) to ``{prefix}prices`` and hands the ticks of the
other relays to its hub through ``on_peer_ticks`` (the relay passes ``PriceHub.publish``). A
relay never republishes what came from a peer, and skips its own messages when they come back,
so there is no loop however many relays there are.

Bounded: ticks wait in a map of the newest tick per symbol (at most ``max_symbols``) until the
one writer task sends them, all in one message; a burst of ticks of one symbol sends the newest.
With Redis away the writer drops what waits (counted) and retries with backoff; the listener
reconnects with backoff. Messages are msgpack ``[relay, [[symbol, price, time_ms, size], ...]]``
with decimals as text; those of peers are checked like any publisher's ticks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.exceptions import RedisError

from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import ConfigError, FolioSyncError, TickRejected
from foliosync.sync.prices import PricePoint, Tick, check_tick
from foliosync.sync.validation import decimal_to_str

__all__ = ["PeerTicksHook", "RedisPriceBus"]

log = logging.getLogger(__name__)

PeerTicksHook = Callable[[list[Tick]], object]
"""Takes the checked ticks of the other relays (``PriceHub.publish``; its result is ignored)."""

_BUS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)


class RedisPriceBus:
    """A relay's side of the shared price channel. :meth:`start` in the running loop,
    :meth:`publish` what the relay's own sources accepted, :meth:`close` at shutdown."""

    def __init__(
        self,
        url: str,
        *,
        relay_id: str,
        on_peer_ticks: PeerTicksHook,
        prefix: str = "foliosync:",
        max_symbols: int = 20_000,
        ping_timeout: float = 1.0,
        backoff: tuple[float, float] = (0.05, 5.0),
    ) -> None:
        if not relay_id or len(relay_id) > 200:
            raise ConfigError("a relay id of 1 to 200 characters is needed on a shared bus")
        if max_symbols < 1 or not 0 < ping_timeout <= 60 or not 0 < backoff[0] <= backoff[1]:
            raise ConfigError("max_symbols >= 1, 0 < ping_timeout <= 60, 0 < backoff <= maximum")
        self.relay_id = relay_id
        self.channel = f"{prefix}prices"
        self._on_peer_ticks = on_peer_ticks
        self._max_symbols, self._ping_timeout, self._backoff = max_symbols, ping_timeout, backoff
        self._redis: Redis = Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self._listen_redis: Redis = Redis.from_url(url, socket_connect_timeout=2.0)
        self._pending: dict[str, Tick | PricePoint] = {}
        self._ready = asyncio.Event()
        self._subscribed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self.sent = 0  # ticks published to the channel
        self.received = 0  # ticks of peers handed to the hub
        self.dropped = 0  # ticks lost: the map was full, or Redis was away
        self.rejected = 0  # ticks of peers that failed the checks
        self.errors = 0

    async def start(self, *, timeout: float = 2.0) -> None:
        """Start the writer and the listener; waits up to ``timeout`` for the subscription, so
        ticks published by peers right after this returns are heard (if Redis answers)."""
        if self._closed:
            raise FolioSyncError("the price bus is closed")
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._listen(), name=f"price-bus-listener-{self.relay_id}"),
                loop.create_task(self._write(), name=f"price-bus-writer-{self.relay_id}"),
            ]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._subscribed.wait(), timeout)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        for client in (self._listen_redis, self._redis):
            with contextlib.suppress(*_BUS_ERRORS):
                await client.aclose()

    async def ping(self) -> None:
        if self._closed:
            raise FolioSyncError("the price bus is closed")
        try:
            await asyncio.wait_for(self._redis.ping(), self._ping_timeout)
        except _BUS_ERRORS as exc:
            raise FolioSyncError(f"the shared bus (Redis) does not answer: {exc}") from exc

    def publish(self, ticks: Iterable[Tick | PricePoint]) -> None:
        """Queue this relay's own ticks for the peers (never those a peer sent): the ticks its
        sources gave, or the prices ``PriceHub.publish`` returned for them (the stale ones
        left out)."""
        if self._closed:
            return
        pending = self._pending
        for tick in ticks:
            held = pending.get(tick.symbol)
            if held is not None:
                if tick.time_ms >= held.time_ms:
                    pending[tick.symbol] = tick
                self.dropped += 1  # one of the two never goes out
            elif len(pending) < self._max_symbols:
                pending[tick.symbol] = tick
            else:
                self.dropped += 1
        if pending:
            self._ready.set()

    async def _write(self) -> None:
        delay = self._backoff[0]
        while True:
            await self._ready.wait()
            self._ready.clear()
            if not self._pending:
                continue
            batch, self._pending = self._pending, {}
            message = msgpack.packb(
                [
                    self.relay_id,
                    [
                        [
                            t.symbol,
                            decimal_to_str(t.price),
                            t.time_ms,
                            None if t.size is None else decimal_to_str(t.size),
                        ]
                        for t in batch.values()
                    ],
                ]
            )
            try:
                await self._redis.publish(self.channel, message)
            except _BUS_ERRORS as exc:
                self.errors += 1
                self.dropped += len(batch)  # newest-wins: the next ticks replace these
                log.warning("cannot publish prices to the shared bus (%s)", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
                continue
            delay = self._backoff[0]
            self.sent += len(batch)

    async def _listen(self) -> None:
        delay = self._backoff[0]
        while True:
            pubsub = self._listen_redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed.set()
                delay = self._backoff[0]
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._take(message["data"])
            except asyncio.CancelledError:
                raise
            except _BUS_ERRORS as exc:
                self.errors += 1
                log.warning("price bus unreachable (%s); reconnecting in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
            finally:
                with contextlib.suppress(*_BUS_ERRORS):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _take(self, data: Any) -> None:
        try:
            relay, rows = msgpack.unpackb(data, raw=False)
            if not isinstance(relay, str) or not isinstance(rows, list):
                raise ValueError("not a price message")
        except Exception:  # msgpack raises several kinds; any bad message is skipped alike
            self.errors += 1
            log.warning("skipped a message of %s that is not a price message", self.channel)
            return
        if relay == self.relay_id:
            return  # this relay's hub had them first
        now = wall_ms()
        ticks: list[Tick] = []
        for row in rows:
            try:
                if not isinstance(row, list) or len(row) != 4:
                    raise TickRejected("not a tick row")
                symbol, price, time_ms, size = row
                raw = {"symbol": symbol, "price": price, "time_ms": time_ms}
                if size is not None:
                    raw["size"] = size
                ticks.append(check_tick(raw, now))
            except TickRejected:
                self.rejected += 1
        if ticks:
            self.received += len(ticks)
            try:
                self._on_peer_ticks(ticks)
            except Exception:
                self.errors += 1
                log.exception("the hub refused ticks of relay %s", relay)
