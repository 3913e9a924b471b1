"""Price sources for the relay's :class:`~foliosync.server.prices.PriceHub`, behind one interface.

A :class:`Feed` runs on its own (an asyncio task that calls :meth:`PriceHub.publish`) and is
stopped with :meth:`Feed.close`. :func:`start_feed` builds one from the relay's ``--feed`` spec:

``none``
    no feed: prices come only from publishers (WebSocket ``Publish`` or ``POST /v1/ticks``);
``sim``
    :class:`SimulatorFeed`, a random walk per symbol that moves while the market is open;
``sim:always``
    the same, moving outside market hours too (demos at night and on weekends);
``csv:PATH`` / ``csv:PATH@SPEED``
    :class:`CsvReplayFeed`, a recorded file replayed at its recorded pace, ``SPEED`` times faster
    (``@10``), or as fast as possible (``@max``).

The rows of a CSV file are ``timestamp,symbol,price[,size]``; :func:`read_tick_rows` reads them
for the replay and for ``foliosync publish`` alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hashlib
import logging
import math
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Protocol

from foliosync.server.prices import PriceHub
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import ConfigError, FolioSyncError, ValidationError
from foliosync.sync.prices import Tick, check_tick

__all__ = [
    "DEFAULT_SYMBOLS",
    "REFERENCE_PRICES",
    "CsvReplayFeed",
    "CsvTickRow",
    "Feed",
    "SimulatorFeed",
    "parse_timestamp",
    "read_tick_rows",
    "start_feed",
]

log = logging.getLogger("foliosync.feeds")

#: Well-known US listings the simulator always quotes, whoever follows them.
DEFAULT_SYMBOLS: tuple[str, ...] = (
    "AAPL", "ABBV", "ADBE", "AMD", "AMZN", "BA", "BAC", "BRK.B", "COST", "CRM",
    "CSCO", "CVX", "DIS", "GOOGL", "HD", "IBM", "INTC", "JNJ", "JPM", "KO",
    "MA", "MCD", "META", "MRK", "MSFT", "NFLX", "NKE", "NVDA", "ORCL", "PEP",
    "PFE", "PG", "QCOM", "QQQ", "SPY", "T", "TSLA", "UNH", "V", "VZ",
    "WMT", "XOM",
)  # fmt: skip

# Rough price levels of the default symbols, so that a demo looks plausible; each walk starts
# within 10 % of its level. Symbols without one start log-uniformly between $10 and $800.
REFERENCE_PRICES: dict[str, float] = {
    "AAPL": 230, "ABBV": 180, "ADBE": 500, "AMD": 150, "AMZN": 190, "BA": 170, "BAC": 40,
    "BRK.B": 450, "COST": 900, "CRM": 280, "CSCO": 55, "CVX": 150, "DIS": 100, "GOOGL": 170,
    "HD": 380, "IBM": 220, "INTC": 25, "JNJ": 155, "JPM": 220, "KO": 65, "MA": 500, "MCD": 290,
    "META": 550, "MRK": 100, "MSFT": 420, "NFLX": 700, "NKE": 80, "NVDA": 130, "ORCL": 170,
    "PEP": 160, "PFE": 28, "PG": 165, "QCOM": 160, "QQQ": 490, "SPY": 570, "T": 22,
    "TSLA": 250, "UNH": 550, "V": 290, "VZ": 42, "WMT": 80, "XOM": 115,
}  # fmt: skip

_CENT = Decimal("0.01")
_MIN_PRICE = 0.01


class Feed(Protocol):
    """A running price source; :meth:`close` stops it (idempotent)."""

    async def close(self) -> None: ...


class _TaskFeed:
    """A feed driven by one asyncio task."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self.last_tick_ms: int | None = None
        """When the feed last published a tick (wall ms), for the relay's readiness check."""

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def failure(self) -> BaseException | None:
        """What ended the feed's task, if it ended by an error (or was stopped: closed)."""
        if self._task is None:
            return asyncio.CancelledError("the feed was stopped")
        if not self._task.done():
            return None
        if self._task.cancelled():
            return asyncio.CancelledError("the feed was cancelled")
        return self._task.exception()

    async def wait(self) -> None:
        """Until the feed ends by itself (a replay at the end of its file)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


# -- the simulator ---------------------------------------------------------------------------------


def _symbol_digest(symbol: str) -> int:
    return int.from_bytes(hashlib.sha256(symbol.encode()).digest()[:8], "big")


def _cents(value: float) -> Decimal:
    return Decimal(repr(max(value, _MIN_PRICE))).quantize(_CENT, rounding=ROUND_HALF_EVEN)


class _Walk:
    """One symbol's random walk: its own generator, volatility and unrounded price."""

    __slots__ = ("price", "rng", "sigma")

    def __init__(self, symbol: str, seed: int) -> None:
        # Seeding with text hashes it with SHA-512: the same path on every run and platform,
        # whatever PYTHONHASHSEED is, and whichever other symbols exist.
        self.rng = random.Random(f"foliosync-sim:{seed}:{symbol}")
        digest = _symbol_digest(symbol)
        # Volatility per move from the symbol alone: 0.05 % to 0.4 % (an index fund moves less
        # than a meme stock, and a given symbol keeps its temperament from run to run).
        self.sigma = 0.0005 + (digest % 1000) / 1000 * 0.0035
        # A starting price near the symbol's reference level, or log-uniform in $10..$800,
        # drawn from the symbol's own generator.
        level = REFERENCE_PRICES.get(symbol)
        if level is not None:
            self.price = level * math.exp(self.rng.uniform(-0.1, 0.1))
        else:
            self.price = math.exp(self.rng.uniform(math.log(10), math.log(800)))

    def move(self) -> Decimal:
        shock = self.rng.gauss(0.0, self.sigma)
        # Geometric: the price stays positive; the floor keeps a penny stock from vanishing.
        self.price = max(self.price * math.exp(shock), _MIN_PRICE)
        return _cents(self.price)


class SimulatorFeed(_TaskFeed):
    """Plausible live prices without a market data contract: a random walk per symbol.

    Deterministic for a ``seed``: each symbol has its own generator seeded from the seed and the
    symbol, so a symbol's sequence of prices does not depend on which other symbols are quoted.
    Each symbol has its own volatility, derived from the symbol. Prices are decimals in cents,
    always positive.

    The universe is :data:`DEFAULT_SYMBOLS` plus every symbol a subscriber follows (re-read at each
    step), so a watchlist's symbols get prices too. A symbol seen for the first time gets a price
    at once: stamped now while the market is open, else at the last session's close (a closed
    market shows its closing price, not nothing). Moves happen only while
    :meth:`PriceHub.market_open` unless ``always``; ``ticks_per_second`` moves per second are
    spread round-robin over the universe, by a task stepping every ``interval`` seconds.
    """

    def __init__(
        self,
        hub: PriceHub,
        *,
        seed: int = 7,
        always: bool = False,
        ticks_per_second: float = 20.0,
        interval: float = 0.1,
        symbols: Iterable[str] = DEFAULT_SYMBOLS,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        super().__init__()
        if not ticks_per_second > 0 or not interval > 0:
            raise ConfigError("the simulator needs a positive tick rate and step interval")
        self.hub = hub
        self.seed = seed
        self.always = always
        self.ticks_per_second = ticks_per_second
        self.interval = interval
        self.base_symbols = frozenset(symbols)
        self._clock_ms = clock_ms
        self._walks: dict[str, _Walk] = {}
        self._next = 0  # round-robin position in the sorted universe
        self._credit = 0.0  # moves owed, fractional
        self._last_ms: int | None = None

    def universe(self) -> list[str]:
        return sorted(self.base_symbols | self.hub.subscribed_symbols())

    def step(self, now_ms: int, moves: int | None = None) -> list[Tick]:
        """Quote new symbols, then make the moves due since the last step (or exactly ``moves``,
        for tests), if the market is open or ``always``; returns the ticks published."""
        universe = self.universe()
        ticks = [self._first_tick(s, now_ms) for s in universe if s not in self._walks]
        if moves is None:
            elapsed_s = 0.0 if self._last_ms is None else max(now_ms - self._last_ms, 0) / 1000
            # At most one second's worth at once: a loop that was starved (a laptop asleep)
            # should not answer with a burst.
            cap = max(self.ticks_per_second, 1.0)
            self._credit = min(self._credit + elapsed_s * self.ticks_per_second, cap)
            moves = int(self._credit)
            self._credit -= moves
        self._last_ms = now_ms
        if moves > 0 and universe and (self.always or self.hub.market_open(now_ms)):
            for _ in range(moves):
                symbol = universe[self._next % len(universe)]
                self._next = (self._next + 1) % len(universe)
                ticks.append(Tick(symbol, self._walks[symbol].move(), now_ms))
        if ticks:
            self.hub.publish(ticks)
            self.last_tick_ms = now_ms
        return ticks

    def _first_tick(self, symbol: str, now_ms: int) -> Tick:
        walk = self._walks[symbol] = _Walk(symbol, self.seed)
        stamp = now_ms
        if not (self.always or self.hub.market_open(now_ms)):
            try:
                close = self.hub.calendar.last_close(datetime.fromtimestamp(now_ms / 1000, tz=UTC))
                stamp = min(int(close.timestamp() * 1000), now_ms)
            except FolioSyncError:  # outside the span the calendar models
                pass
        return Tick(symbol, _cents(walk.price), stamp)

    async def _run(self) -> None:
        while True:
            try:
                self.step(self._clock_ms())
            except Exception:  # a bug here must not silence prices for good
                log.exception("price simulator step failed")
            await asyncio.sleep(self.interval)


# -- CSV files -------------------------------------------------------------------------------------

_MAX_LOGGED_ROWS = 100  # a file of garbage should not flood the log
_TIME_COLUMNS = ("timestamp", "time_ms", "time", "ts")
_EPOCH_MS = re.compile(r"^\d{1,15}$")


@dataclass(frozen=True, slots=True)
class CsvTickRow:
    """One row of a ticks file, with its line number; symbol, price and size still unchecked."""

    line: int
    time_ms: int
    symbol: str
    price: str
    size: str | None = None

    def to_raw(self) -> list[object]:
        """``[symbol, price, time_ms, size?]``, as :func:`~foliosync.sync.prices.check_tick` and
        the publish endpoints take it."""
        raw: list[object] = [self.symbol, self.price, self.time_ms]
        if self.size is not None:
            raw.append(self.size)
        return raw


def parse_timestamp(text: str) -> int:
    """Epoch milliseconds from ``1718036400000`` or ISO 8601 with an offset
    (``2024-06-10T13:30:00-04:00``, ``...Z``); ValidationError otherwise."""
    text = text.strip()
    if _EPOCH_MS.match(text):
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(
            f"timestamp {text[:40]!r} is neither epoch milliseconds nor ISO 8601"
        ) from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValidationError(f"timestamp {text[:40]!r} has no UTC offset (add Z or +00:00)")
    return int(moment.timestamp() * 1000)


def _header_columns(fields: list[str]) -> dict[str, int] | None:
    """Column positions from a header row, or None if ``fields`` is a data row."""
    names = [f.strip().lower() for f in fields]
    if "symbol" not in names and "price" not in names:
        return None
    time_column = next((names.index(n) for n in _TIME_COLUMNS if n in names), None)
    if time_column is None or "symbol" not in names or "price" not in names:
        raise ValidationError("the header needs timestamp, symbol and price columns")
    columns = {"time": time_column, "symbol": names.index("symbol"), "price": names.index("price")}
    if "size" in names:
        columns["size"] = names.index("size")
    return columns


_POSITIONAL = {"time": 0, "symbol": 1, "price": 2, "size": 3}


def read_tick_rows(lines: Iterable[str]) -> Iterator[tuple[int, CsvTickRow | str]]:
    """``(line number, row)`` for each tick of a CSV text, ``(line number, reason)`` for a bad one.

    Rows are ``timestamp,symbol,price[,size]``; an optional first header row names the columns
    (then in any order). Blank lines and lines starting with ``#`` are skipped.
    """
    reader = csv.reader(lines)
    columns: dict[str, int] | None = None
    first = True
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, f"unreadable CSV: {exc}"
            continue
        line = reader.line_num
        if not fields or all(not f.strip() for f in fields) or fields[0].lstrip().startswith("#"):
            continue
        if first:
            first = False
            try:
                columns = _header_columns(fields)
            except ValidationError as exc:
                yield line, str(exc)
                return
            if columns is not None:
                continue
        use = columns or _POSITIONAL
        if columns is None and not 3 <= len(fields) <= 4:
            yield line, f"expected timestamp,symbol,price[,size], got {len(fields)} fields"
            continue
        if columns is not None:
            needed = max(columns["time"], columns["symbol"], columns["price"]) + 1
            if not needed <= len(fields) <= len(columns):
                yield line, f"expected {needed} to {len(columns)} fields, got {len(fields)}"
                continue
        try:
            time_ms = parse_timestamp(fields[use["time"]])
        except ValidationError as exc:
            yield line, str(exc)
            continue
        size_at = use.get("size")
        size = fields[size_at].strip() if size_at is not None and size_at < len(fields) else None
        yield (
            line,
            CsvTickRow(
                line,
                time_ms,
                fields[use["symbol"]].strip(),
                fields[use["price"]].strip(),
                size or None,
            ),
        )


class CsvReplayFeed(_TaskFeed):
    """Replays a recorded ticks file (see :func:`read_tick_rows`) into the hub, then ends.

    The recorded gaps between rows are kept, divided by ``speed`` (None: as fast as possible).
    Ticks are re-stamped with the time they are published (``restamp``, the default) rather than
    their recorded time: a replay stands in for a live feed, and prices stamped last month would
    look stale to every client's freshness check and to the relay's stall detector, and could be
    refused against prices already in the book. The recorded times only set the pace.
    A bad row (unreadable timestamp, symbol or price) is logged with its line number and skipped
    (the first hundred are logged; :attr:`skipped` counts them all).
    """

    def __init__(
        self,
        hub: PriceHub,
        path: Path | str,
        *,
        speed: float | None = 1.0,
        restamp: bool = True,
        batch: int = 500,
        clock_ms: Callable[[], int] = wall_ms,
    ) -> None:
        super().__init__()
        if speed is not None and not speed > 0:
            raise ConfigError(f"replay speed must be positive, not {speed}")
        self.hub = hub
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"price feed file {self.path} does not exist")
        self.speed = speed
        self.restamp = restamp
        self.batch = max(batch, 1)
        self._clock_ms = clock_ms
        self.published = 0
        self.skipped = 0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: list[Tick] = []
        first_ms: int | None = None
        started = loop.time()
        try:
            with self.path.open(encoding="utf-8-sig", errors="replace", newline="") as file:
                for line, row in read_tick_rows(file):
                    if isinstance(row, str):
                        self._skip(line, row)
                        continue
                    if self.speed is not None:
                        if first_ms is None:
                            first_ms = row.time_ms
                        delay = started + (row.time_ms - first_ms) / 1000 / self.speed - loop.time()
                        if delay > 0:
                            self._flush(pending)
                            await asyncio.sleep(delay)
                    try:
                        tick = check_tick(row.to_raw(), row.time_ms)
                    except ValidationError as exc:
                        self._skip(line, str(exc))
                        continue
                    if self.restamp:
                        tick = Tick(tick.symbol, tick.price, self._clock_ms(), tick.size)
                    pending.append(tick)
                    if len(pending) >= self.batch:
                        self._flush(pending)
                        await asyncio.sleep(0)  # as fast as possible, but not alone
        except OSError as exc:
            log.error("price feed %s: %s", self.path, exc)
        finally:
            self._flush(pending)
        log.info(
            "price feed %s finished: %d ticks published, %d rows skipped",
            self.path,
            self.published,
            self.skipped,
        )

    def _skip(self, line: int, reason: str) -> None:
        self.skipped += 1
        if self.skipped <= _MAX_LOGGED_ROWS:
            log.warning("price feed %s line %d: %s; skipped", self.path, line, reason)
        if self.skipped == _MAX_LOGGED_ROWS:
            log.warning("price feed %s: further bad rows are skipped without a message", self.path)

    def _flush(self, pending: list[Tick]) -> None:
        if pending:
            self.hub.publish(pending)
            self.last_tick_ms = self._clock_ms()
            self.published += len(pending)
            pending.clear()


# -- the spec --------------------------------------------------------------------------------------


def _speed(text: str) -> float | None:
    if text.strip().lower() == "max":
        return None
    try:
        speed = float(text.strip().lower().removesuffix("x"))
    except ValueError:
        raise ConfigError(f"invalid replay speed {text!r}: use e.g. @10 or @max") from None
    if not math.isfinite(speed) or speed <= 0:
        raise ConfigError(f"invalid replay speed {text!r}: it must be positive")
    return speed


def start_feed(spec: str, hub: PriceHub, *, seed: int = 7) -> Feed | None:
    """Start the feed ``spec`` names (see the module's documentation); None for ``none``.

    Needs a running event loop; raises ConfigError for an unknown spec, a missing file or a bad
    speed, before anything starts.
    """
    text = spec.strip()
    feed: SimulatorFeed | CsvReplayFeed
    if text.lower() in ("", "none"):
        return None
    if text.lower() in ("sim", "sim:always"):
        feed = SimulatorFeed(hub, seed=seed, always=text.lower() == "sim:always")
    elif text[:4].lower() == "csv:":
        speed: float | None = 1.0
        target, at, suffix = text[4:].rpartition("@")
        if not at or "/" in suffix or "\\" in suffix:  # an "@" inside the path is the path's
            target = text[4:]
        else:
            speed = _speed(suffix)
        if not target:
            raise ConfigError("the csv feed needs a file: csv:PATH or csv:PATH@SPEED")
        feed = CsvReplayFeed(hub, Path(target).expanduser(), speed=speed)
    else:
        raise ConfigError(
            f"unknown price feed {spec!r}: use none, sim, sim:always, csv:PATH or csv:PATH@SPEED"
        )
    feed.start()
    log.info("price feed: %s", text)
    return feed
