"""The relay's prices: one book, one conflator, many subscribers.

Sources (the simulator, a CSV replay, publishers over WebSocket or HTTP) call
:meth:`PriceHub.publish`. A push window depends on the symbol and the market, not on who listens,
so the hub conflates once for everyone: a :class:`TickConflator` keeps the newest price of each
followed symbol until its window has passed. A flush releases what is due and hands each
subscriber, in one call, the released prices of the symbols it follows. Flushes follow the ticks:
one runs as soon as a new price may go (so a tick does not wait for a timer), at most once per
``flush_interval`` (so a burst of small publishes still makes few, larger frames), and none runs
while nothing is pending. A subscriber writes what it is handed at once when its socket is free,
or keeps the newest per symbol until its writer has sent its control frames (documents and
acknowledgements first); so a slow reader gets fewer, newer prices and memory per subscriber is
one entry per followed symbol.

Push windows come from the smart-refresh policy: short for a volatile symbol in session, longer
by default, longer still with the market closed. The hub also watches for a stalled feed: a
followed symbol whose newest price is older than ``stall_after`` while the market is open.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Protocol

from foliosync.server.timings import Timings
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import ConfigError
from foliosync.sync.market import NYSE, ExchangeCalendar
from foliosync.sync.prices import PriceBook, PricePoint, Tick, TickConflator
from foliosync.sync.refresh_policy import (
    DEFAULT_POLICY,
    DataKind,
    RefreshContext,
    RefreshPolicy,
    is_volatile,
)

__all__ = ["PriceHub", "PricePolicy", "PriceSubscriber", "StalledSymbol"]

log = logging.getLogger("foliosync.prices")


@dataclass(frozen=True, slots=True)
class PricePolicy:
    """How the relay pushes prices, given to ``create_app(price_policy=...)``.

    ``window_ms`` None (the default) takes every symbol's push window from the smart-refresh
    policy (:mod:`foliosync.sync.refresh_policy`). A fixed window is for benchmarks and tests
    that compare like with like or must not wait; it is no operator knob, which is why it is
    not in ``RelayConfig``.
    """

    window_ms: int | None = None

    def __post_init__(self) -> None:
        window = self.window_ms
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 0
        ):
            raise ConfigError(f"invalid window_ms {window!r}: None, or milliseconds from 0")


class PriceSubscriber(Protocol):
    """What the hub needs of a subscriber: somewhere to hand the prices released for it."""

    def deliver_prices(self, points: list[PricePoint]) -> None:
        """Take these prices (the newest of symbols it follows); must not block or raise."""


class StalledSymbol:
    __slots__ = ("age_s", "symbol")

    def __init__(self, symbol: str, age_s: float | None) -> None:
        self.symbol, self.age_s = symbol, age_s

    def to_json(self) -> dict[str, object]:
        return {"symbol": self.symbol, "age_s": self.age_s}


class PriceHub:
    def __init__(
        self,
        *,
        policy: RefreshPolicy = DEFAULT_POLICY,
        calendar: ExchangeCalendar = NYSE,
        flush_interval: float = 0.05,
        stall_after: timedelta = timedelta(minutes=5),
        clock_ms: Callable[[], int] = wall_ms,
        window_override_ms: int | None = None,
    ) -> None:
        self.book = PriceBook()
        self.epoch = clock_ms()
        """Names this run of the hub: HTTP cursors carry it, so old ones are recognised."""
        self.policy = policy
        self.calendar = calendar
        # A fixed window shorter than the flush interval would be held back by it.
        if window_override_ms is not None:
            flush_interval = min(flush_interval, max(0.005, window_override_ms / 1000))
        self.flush_interval = flush_interval
        self.stall_after = stall_after
        self._clock_ms = clock_ms
        self._window_override_ms = window_override_ms
        self._followers: dict[str, set[PriceSubscriber]] = {}
        self._subscriptions: dict[PriceSubscriber, frozenset[str]] = {}
        self._pending = TickConflator(self.window_ms)
        self._windows: dict[str, tuple[int, int]] = {}  # symbol -> (computed at ms, window ms)
        self._market_open: tuple[int, bool] = (-1, False)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._flush_at_ms = 0
        self._last_flush_ms = 0
        self._stalled: list[StalledSymbol] = []
        self.forward: Callable[[list[PricePoint]], None] | None = None
        """Where this relay's own accepted prices also go (the shared price bus), if set; it
        must not block or raise (RedisPriceBus.publish only queues)."""
        self.ticks_in = 0
        self.ticks_rejected = 0  # refused by a check: the publisher was told so
        self.ticks_stale = 0
        """Ticks older than the book's price of their symbol (out of order): the publisher was
        told they were accepted (they were valid), but they changed nothing."""
        self.delivery = Timings()
        """How late each timed flush finished against the time it was armed for: the event
        loop's delay plus the flush's own work, what every price released then waited beyond
        its push window. Once per flush, nothing per tick or per price: the tick path stays a
        counter increment."""
        self.queued = Timings()
        """The rest of a late price's way: from the flush's hand-over to a subscriber that could
        not take it at once (its socket busy) to its write, once per batch that waited. With
        :attr:`delivery`, the whole lateness of a price to a slow reader, not only to the hub's
        hand-over."""

    # -- life cycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Flush from now on in the running loop, and watch for a stalled feed."""
        self.market_open()  # builds the calendar's sessions now, not in the first request
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._watch_stalls())
            self._schedule_flush()

    async def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        self._loop = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- sources -----------------------------------------------------------------------------

    def publish(self, ticks: Iterable[Tick]) -> list[PricePoint]:
        """Record checked ticks; the new prices of followed symbols go out with the next flush.

        Ticks of this relay's own sources that changed the book are also handed to
        :attr:`forward`, the shared price bus when several relays serve together."""
        accepted = self._record(ticks)
        forward = self.forward
        if forward is not None and accepted:
            forward(accepted)
        return accepted

    def publish_peer(self, ticks: Iterable[Tick]) -> list[PricePoint]:
        """Record ticks another relay of the group accepted: as :meth:`publish`, but not handed
        to :attr:`forward` again (they would go round the group for ever)."""
        return self._record(ticks)

    def _record(self, ticks: Iterable[Tick]) -> list[PricePoint]:
        accepted: list[PricePoint] = []
        followers = self._followers
        stale = 0
        for tick in ticks:
            point = self.book.apply(tick)
            if point is None:
                stale += 1
                continue
            accepted.append(point)
            if point.symbol in followers:
                self._pending.offer(point)
        self.ticks_in += len(accepted)
        self.ticks_stale += stale
        self._schedule_flush()
        return accepted

    def reject(self, count: int) -> None:
        """Count ticks a source sent that failed their check before reaching the book."""
        self.ticks_rejected += count

    @property
    def conflated(self) -> int:
        """Ticks replaced by a newer one of their symbol before their window released them."""
        return self._pending.conflated

    def now_ms(self) -> int:
        """The hub's clock (wall ms): what price ages are measured against."""
        return self._clock_ms()

    # -- subscribers -------------------------------------------------------------------------

    def subscribe(self, subscriber: PriceSubscriber, symbols: Iterable[str]) -> list[PricePoint]:
        """Follow exactly ``symbols``; returns the snapshot of those new to the set."""
        # Interned: every subscriber's set then shares one string per symbol instead of holding
        # its own copies, decoded from its frame (a third of a subscription's memory).
        wanted = frozenset(sys.intern(symbol) for symbol in symbols)
        before = self._subscriptions.get(subscriber, frozenset())
        for symbol in before - wanted:
            followers = self._followers.get(symbol)
            if followers is not None:
                followers.discard(subscriber)
                if not followers:
                    del self._followers[symbol]
                    self._pending.forget((symbol,))
        for symbol in wanted - before:
            self._followers.setdefault(symbol, set()).add(subscriber)
        self._subscriptions[subscriber] = wanted
        return self.book.snapshot(sorted(wanted - before))

    def unsubscribe(self, subscriber: PriceSubscriber) -> None:
        self.subscribe(subscriber, ())
        self._subscriptions.pop(subscriber, None)

    def subscribed_symbols(self) -> set[str]:
        return set(self._followers)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)

    def subscribers(self) -> list[PriceSubscriber]:
        """Every live subscriber (WebSocket connections and event streams alike)."""
        return list(self._subscriptions)

    # -- windows -----------------------------------------------------------------------------

    def market_open(self, now_ms: int | None = None) -> bool:
        now_ms = self._clock_ms() if now_ms is None else now_ms
        checked_at, is_open = self._market_open
        if now_ms - checked_at >= 1000 or checked_at < 0:
            is_open = self.calendar.is_open(datetime.fromtimestamp(now_ms / 1000, tz=UTC))
            self._market_open = (now_ms, is_open)
        return is_open

    def window_ms(self, symbol: str) -> int:
        """How often one subscriber may get a new price of ``symbol`` (the policy's push window)."""
        if self._window_override_ms is not None:
            return self._window_override_ms
        now = self._clock_ms()
        cached = self._windows.get(symbol)
        if cached is not None and now - cached[0] < 1000:
            return cached[1]
        context = RefreshContext(
            market_open=self.market_open(now),
            volatile=is_volatile(self.book.recent_prices(symbol)),
        )
        window = int(
            self.policy.push_window(DataKind.CURRENT_PRICE, context) / timedelta(milliseconds=1)
        )
        self._windows[symbol] = (now, window)
        return window

    # -- flushing and health -----------------------------------------------------------------

    def _schedule_flush(self) -> None:
        """Arm the flush for when the next price may go, no sooner than an interval after the
        last flush; nothing is armed while nothing is pending (an idle relay does not wake)."""
        loop = self._loop
        if loop is None or not len(self._pending):
            return
        interval_ms = max(1, round(self.flush_interval * 1000))
        at_ms = max(self._pending.next_due_ms, self._last_flush_ms + interval_ms)
        if self._flush_timer is not None:
            if at_ms >= self._flush_at_ms:
                return  # armed soon enough
            self._flush_timer.cancel()  # a price that may go sooner than the one armed for
        delay = max(0, at_ms - self._clock_ms()) / 1000
        self._flush_at_ms = at_ms
        # In a context of its own: it is armed from whichever publisher's connection came first,
        # and its lines (a subscriber's failure) are no more that connection's than any other's.
        self._flush_timer = loop.call_later(
            delay, self._timed_flush, at_ms, context=contextvars.Context()
        )

    def _timed_flush(self, planned_ms: int) -> None:
        timer, self._flush_timer = self._flush_timer, None
        # A timer may fire a little before its millisecond: flush as of the planned time, so that
        # what was due then goes now instead of one more round later.
        now = max(self._clock_ms(), planned_ms)
        self._last_flush_ms = now
        try:
            self.flush_once(now)
        except Exception:  # one bad subscriber must not stop prices for everyone
            log.exception("price flush failed")
        loop = self._loop
        if timer is not None and loop is not None:  # the loop's own clock: sub-ms, monotonic
            self.delivery.observe(max(0.0, loop.time() - timer.when()))
        self._schedule_flush()

    async def _watch_stalls(self) -> None:
        while True:
            self._check_stalls(self._clock_ms())
            await asyncio.sleep(10)

    def flush_once(self, now_ms: int | None = None) -> None:
        """Release the prices that are due and hand each subscriber those of its symbols."""
        released = self._pending.due(self._clock_ms() if now_ms is None else now_ms)
        if not released:
            return
        batches: defaultdict[PriceSubscriber, list[PricePoint]] = defaultdict(list)
        followers = self._followers
        for point in released:  # the innermost loop of the relay's price fan-out: keep it bare
            for subscriber in followers.get(point.symbol, ()):
                batches[subscriber].append(point)
        for subscriber, batch in batches.items():
            subscriber.deliver_prices(batch)

    @property
    def next_due_ms(self) -> int:
        """When the next flush has something to release (a very large number if nothing)."""
        return self._pending.next_due_ms

    def _check_stalls(self, now_ms: int) -> None:
        if not self.market_open(now_ms):
            self._stalled = []
            return
        limit_ms = int(self.stall_after / timedelta(milliseconds=1))
        stalled = []
        for symbol in sorted(self._followers):
            point = self.book.latest(symbol)
            if point is None or now_ms - point.time_ms > limit_ms:
                age = None if point is None else round((now_ms - point.time_ms) / 1000, 1)
                stalled.append(StalledSymbol(symbol, age))
        if stalled and not self._stalled:
            log.warning(
                "stalled feed: %d followed symbols have no price newer than %s during the session",
                len(stalled),
                self.stall_after,
            )
        self._stalled = stalled

    def stalled(self, now_ms: int | None = None) -> list[StalledSymbol]:
        """Followed symbols without a recent price during the session (the alert condition)."""
        self._check_stalls(self._clock_ms() if now_ms is None else now_ms)
        return list(self._stalled)
