"""A client for apps that do not run asyncio: the replica and its sync on a loop of their own.

Desktop toolkits own the main thread with their own event loop (Tk's ``mainloop``, Qt's
``exec``), and a pycrdt document must be touched by one thread only. So one background thread
runs an asyncio loop that owns the :class:`Replica` and the :class:`SyncClient`, and every method
of :class:`BackgroundClient` hands that loop its work and waits for the answer, at most
``timeout`` seconds. What comes back is a snapshot (frozen dataclasses, tuples), never a live
pycrdt object, so that the app may keep it and read it from any thread.

Notifications (document changes, prices, freshness levels, the connection) leave the loop through
a queue to a notification thread, which hands each callback to the app's dispatcher:

- ``lambda fn: root.after(0, fn)`` runs it in Tk's thread;
- the ``emit`` of a Qt signal connected to a slot of an object of Qt's thread runs it there (a
  queued connection; examples/qt_watchlist.py);
- the default, :func:`call_directly`, runs it in the notification thread itself.

Callbacks never run on the loop thread, so a callback may call any method of the client: the
loop it waits for is free. Nor does the loop ever wait for a dispatcher: a toolkit whose hand-over
blocks until its own thread takes it (Tk's cross-thread calls do) delays notifications, never
edits. A blocking method called on the loop thread itself (from work given to
:meth:`BackgroundClient.submit`) raises :class:`WrongThread` at once instead of waiting for
itself forever.

An edit returns once committed to the replica file, as with the async API: it survives the app
being killed the next instant. :meth:`BackgroundClient.close` lets the calls already made finish,
gives pending changes a bounded moment to reach the relay while connected, and closes the file.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from foliosync.client.documents import PortfolioHandle, WatchlistHandle
from foliosync.client.health import ConnectionState, SyncHealth, build_health
from foliosync.client.quotes import Quote
from foliosync.client.replica import DocumentChange, DocumentInfo, Replica
from foliosync.client.sync import Backoff, SyncClient, SyncStatus
from foliosync.sync.errors import (
    CallTimeout,
    ClientClosed,
    ConfigError,
    ConnectionLost,
    FolioSyncError,
    ValidationError,
    WrongThread,
)
from foliosync.sync.freshness import (
    DEFAULT_THRESHOLDS,
    Freshness,
    FreshnessLevel,
)
from foliosync.sync.model import DocumentKind, Position, Trade, WatchlistEntry
from foliosync.sync.validation import normalize_symbol

__all__ = [
    "BackgroundClient",
    "Dispatcher",
    "FreshnessChange",
    "PortfolioSnapshot",
    "WatchlistSnapshot",
    "call_directly",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

Dispatcher = Callable[[Callable[[], None]], None]
"""Runs a callback where the app wants it: ``dispatcher(fn)`` must arrange for ``fn()`` to run."""

DEFAULT_TIMEOUT = 10.0  # a blocking call's wait; edits take milliseconds, a first load may not
DEFAULT_FLUSH_TIMEOUT = 2.0  # what close() gives pending changes to reach a connected relay
DEFAULT_FRESHNESS_INTERVAL = 1.0
_PRICE_CHECKS_PER_TICK = 250
_NOTIFIER_JOIN = 1.0  # close() waits this long for a dispatcher stuck in the app's thread


def call_directly(fn: Callable[[], None]) -> None:
    """The default dispatcher: run the callback in the client's notification thread."""
    fn()


@dataclass(frozen=True, slots=True)
class WatchlistSnapshot:
    """A watchlist as it was when read; later changes do not touch it."""

    id: str
    name: str
    entries: tuple[WatchlistEntry, ...]
    pending: int  # local changes not yet acknowledged by a relay
    freshness: Freshness

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(entry.symbol for entry in self.entries)


@dataclass(frozen=True, slots=True)
class PortfolioSnapshot:
    """A portfolio as it was when read: its trades in order and the positions they make."""

    id: str
    name: str
    trades: tuple[Trade, ...]
    positions: Mapping[str, Position]  # read-only
    pending: int
    freshness: Freshness


@dataclass(frozen=True, slots=True)
class FreshnessChange:
    """A document's or a price's freshness moved to another level (``previous`` is None the
    first time the client sees it)."""

    subject: Literal["document", "price"]
    key: str  # the document id, or the symbol
    freshness: Freshness
    previous: FreshnessLevel | None


_Event = tuple[str, Any]


class BackgroundClient:
    """A replica (and, given a server, its sync) behind plain blocking calls.

    Open with :meth:`open`; close with :meth:`close` or a ``with`` block. Every method may be
    called from any thread but the client's own loop thread.
    """

    def __init__(
        self,
        path: str | Path,
        server: str | None,
        token: str | None,
        *,
        dispatcher: Dispatcher,
        timeout: float,
        flush_timeout: float,
        freshness_interval: float,
        backoff: Backoff | None,
        client_name: str,
        synchronous: str,
        clock: Callable[[], float],
    ) -> None:
        """Use :meth:`open`, which checks the options and starts the client."""
        self._path = path
        self._server = server
        self._token = token
        self._dispatcher = dispatcher
        self._timeout = timeout
        self._flush_timeout = flush_timeout
        self._freshness_interval = freshness_interval
        self._backoff = backoff
        self._client_name = client_name
        self._synchronous = synchronous
        self._clock = clock
        # Shared between threads, under _lock.
        self._lock = threading.Lock()
        self._closing = False
        self._subscribers: dict[str, list[Callable[[Any], None]]] = {
            "change": [],
            "prices": [],
            "freshness": [],
            "connection": [],
        }
        self._connection = ConnectionState.STOPPED if server is None else ConnectionState.CONNECTING
        self._events: queue.SimpleQueue[_Event | None] = queue.SimpleQueue()
        self._shutdown_error: BaseException | None = None
        # The loop and what it owns (touched on the loop thread only, once started).
        self._runner = asyncio.Runner(loop_factory=asyncio.new_event_loop)
        self._loop = self._runner.get_loop()
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._replica: Replica | None = None
        self._sync: SyncClient | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._offline = False  # work_offline(True): the server is known, the sync stopped
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._accepting = False
        self._calls: dict[asyncio.Task[Any], bool] = {}  # running calls: cancel them on close?
        self._levels: dict[tuple[str, str], FreshnessLevel] = {}
        self._price_cursor = 0
        self._thread = threading.Thread(target=self._run_loop, name="foliosync-loop", daemon=True)
        self._notifier = threading.Thread(
            target=self._run_notifier, name="foliosync-notify", daemon=True
        )

    # -- life cycle --------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | Path,
        server: str | None = None,
        token: str | None = None,
        *,
        dispatcher: Dispatcher = call_directly,
        timeout: float = DEFAULT_TIMEOUT,
        flush_timeout: float = DEFAULT_FLUSH_TIMEOUT,
        freshness_interval: float = DEFAULT_FRESHNESS_INTERVAL,
        backoff: Backoff | None = None,
        client_name: str = "foliosync",
        synchronous: str = "NORMAL",
        clock: Callable[[], float] = time.time,
    ) -> BackgroundClient:
        """Open the replica at ``path`` on a loop thread; with ``server`` (and ``token``), keep
        it in sync with that relay, reconnecting as needed.

        Returns once the replica is open. Raises ReplicaCorrupt, ReplicaLocked or SchemaTooNew
        as :meth:`Replica.open` does, ConfigError for a bad option, CallTimeout if opening takes
        longer than ``timeout`` seconds.

        ``clock`` (seconds since the epoch, :func:`time.time` by default) is the "now" every
        freshness level and health value is taken at, so that an app's badges can be tested as
        time passes without waiting for it.
        """
        if not callable(dispatcher):
            raise ConfigError(f"dispatcher must be callable, not {dispatcher!r}")
        if not callable(clock):
            raise ConfigError(f"clock must be callable, not {clock!r}")
        for name, value in (
            ("timeout", timeout),
            ("flush_timeout", flush_timeout),
            ("freshness_interval", freshness_interval),
        ):
            # Finite too: an infinite wait overflows the loop's timers once the thread runs.
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not value >= 0
            ):
                raise ConfigError(f"{name} must be a finite number of seconds >= 0, not {value!r}")
        if timeout <= 0 or freshness_interval <= 0:
            raise ConfigError("timeout and freshness_interval must be more than 0 seconds")
        if server is not None:
            if not isinstance(server, str) or not server.startswith(("ws://", "wss://")):
                raise ConfigError(f"server must be a ws:// or wss:// URL, not {server!r}")
            if not token or not isinstance(token, str):
                raise ConfigError("a server needs a token (foliosync token USER --device NAME)")
        elif token is not None:
            raise ConfigError("a token was given without a server")
        client = cls(
            path,
            server,
            token,
            dispatcher=dispatcher,
            timeout=float(timeout),
            flush_timeout=float(flush_timeout),
            freshness_interval=float(freshness_interval),
            backoff=backoff,
            client_name=client_name,
            synchronous=synchronous,
            clock=clock,
        )
        client._start()
        return client

    def _start(self) -> None:
        self._thread.start()
        try:
            self._ready.result(self._timeout)
        except concurrent.futures.TimeoutError:
            with contextlib.suppress(FolioSyncError):
                self.close()
            raise CallTimeout(
                f"the replica {self._path} did not open within {self._timeout:g} s"
            ) from None
        except BaseException:
            self._thread.join(self._timeout)
            raise
        self._notifier.start()
        atexit.register(self._close_at_exit)

    def close(self, timeout: float | None = None) -> None:
        """Stop: let the calls already made finish, give pending changes up to
        ``flush_timeout`` seconds to reach the relay (while connected), stop syncing and close
        the replica. Waits at most ``timeout`` seconds (by default twice the call timeout plus
        the flush timeout); calling it again is harmless.

        Every edit that returned was committed before it did, so a close cut short loses
        nothing: what the relay lacks stays pending and goes on the next connection. No
        callback starts once close() has begun.
        """
        self._check_thread("close")
        with self._lock:
            first = not self._closing
            self._closing = True
        if first:
            with contextlib.suppress(RuntimeError):  # the loop has ended already
                self._loop.call_soon_threadsafe(self._request_stop)
        bound = 2 * self._timeout + self._flush_timeout if timeout is None else timeout
        if self._thread.ident is not None:
            self._thread.join(bound)
        if self._thread.is_alive():
            raise CallTimeout(
                f"the client did not stop within {bound:g} s; every edit that returned is saved"
            )
        self._events.put(None)
        if self._notifier.is_alive() and threading.current_thread() is not self._notifier:
            self._notifier.join(_NOTIFIER_JOIN)  # a dispatcher may wait for the app's thread
        atexit.unregister(self._close_at_exit)
        error, self._shutdown_error = self._shutdown_error, None
        if error is not None:
            raise error

    def _close_at_exit(self) -> None:
        """An app that forgot close() still stops cleanly when Python exits."""
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> BackgroundClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closing

    @property
    def path(self) -> Path:
        return Path(self._path)

    @property
    def server(self) -> str | None:
        """The relay this client syncs with (None: a replica that only works offline)."""
        return self._server

    def now(self) -> datetime:
        """The client's clock as an aware UTC time: what freshness is measured against."""
        return datetime.fromtimestamp(self._clock(), tz=UTC)

    # -- reads -------------------------------------------------------------------------------

    def documents(self, kind: DocumentKind | None = None) -> list[DocumentInfo]:
        """Every watchlist and portfolio, sorted by kind and name."""
        return self._call(lambda r: _now(r.documents(kind)))

    def watchlist(self, name_or_id: str) -> WatchlistSnapshot:
        """A watchlist's entries now (name in any case, or id); DocumentNotFound if none."""

        async def read(replica: Replica) -> WatchlistSnapshot:
            return self._watchlist_snapshot(await replica.watchlist(name_or_id))

        return self._call(read)

    def portfolio(self, name_or_id: str) -> PortfolioSnapshot:
        async def read(replica: Replica) -> PortfolioSnapshot:
            return self._portfolio_snapshot(await replica.portfolio(name_or_id))

        return self._call(read)

    def quote(self, symbol: str) -> Quote | None:
        """The last known price of ``symbol`` (also offline), or None."""
        wanted = normalize_symbol(symbol)
        return self._call(lambda r: _now(r.quotes.get(wanted)))

    def quotes(self, symbols: Iterable[str] | None = None) -> dict[str, Quote]:
        """The last known prices of ``symbols`` (those known), or of every symbol."""
        wanted = None if symbols is None else {normalize_symbol(s) for s in _as_list(symbols)}

        def read(replica: Replica) -> Awaitable[dict[str, Quote]]:
            known = replica.quotes.all()
            return _now(known if wanted is None else {s: known[s] for s in wanted if s in known})

        return self._call(read)

    def freshness(self, doc_id: str) -> Freshness:
        """How current this device's copy of a document is ("live" while kept in sync)."""
        return self._call(lambda r: _now(self._document_freshness(doc_id)))

    def status(self, doc_id: str) -> SyncStatus:
        """Pending changes, last sync and the relay's last change of a document."""

        def read(replica: Replica) -> Awaitable[SyncStatus]:
            if self._sync is not None:
                return _now(self._sync.status(doc_id))
            info = replica.info(doc_id)
            return _now(
                SyncStatus(
                    doc_id,
                    info.pending,
                    info.last_synced_at,
                    info.remote_changed_at,
                    info.remote_changed_by,
                    connected=False,
                )
            )

        return self._call(read)

    def health(self) -> SyncHealth:
        """Connection state, lag, pending changes, last error, price ages and the worst
        freshness in one value (``health().describe()`` is a status bar's line)."""

        def read(replica: Replica) -> Awaitable[SyncHealth]:
            return _now(self._health())

        return self._call(read)

    @property
    def connection(self) -> ConnectionState:
        """The sync connection's state as last seen (STOPPED without a server)."""
        return self._connection

    def wait_in_sync(self, timeout: float = 30.0) -> None:
        """Wait until connected with every document synced and nothing pending; CallTimeout if
        not within ``timeout`` seconds, ConnectionLost without a server."""

        async def wait(replica: Replica) -> None:
            if self._sync is None:
                raise ConnectionLost("this client has no server to sync with")
            try:
                await self._sync.wait_in_sync(timeout)
            except TimeoutError:
                raise CallTimeout(f"not in sync with the relay within {timeout:g} s") from None

        self._call(wait, timeout=timeout + self._timeout, cancel_on_close=True)

    # -- edits (each returns once committed to the replica file) -----------------------------

    def create_watchlist(self, name: str) -> WatchlistSnapshot:
        """DocumentExists if this device has a watchlist of that name already."""

        async def create(replica: Replica) -> WatchlistSnapshot:
            return self._watchlist_snapshot(await replica.create_watchlist(name))

        return self._call(create)

    def create_portfolio(self, name: str) -> PortfolioSnapshot:
        async def create(replica: Replica) -> PortfolioSnapshot:
            return self._portfolio_snapshot(await replica.create_portfolio(name))

        return self._call(create)

    def add_symbols(
        self, watchlist: str, symbols: Iterable[str] | str, note: str | None = None
    ) -> list[str]:
        """Add symbols to a watchlist (name or id), and set their note if given; returns those
        newly added."""
        wanted = _as_list(symbols)

        async def add(replica: Replica) -> list[str]:
            return await (await replica.watchlist(watchlist)).add(wanted, note)

        return self._call(add)

    def remove_symbols(self, watchlist: str, symbols: Iterable[str] | str) -> list[str]:
        """Returns the symbols that were there and are now removed."""
        wanted = _as_list(symbols)

        async def remove(replica: Replica) -> list[str]:
            return await (await replica.watchlist(watchlist)).remove(wanted)

        return self._call(remove)

    def set_note(self, watchlist: str, symbol: str, note: str | None) -> None:
        async def set_(replica: Replica) -> None:
            await (await replica.watchlist(watchlist)).set_note(symbol, note)

        self._call(set_)

    def move_symbol(self, watchlist: str, symbol: str, index: int) -> None:
        async def move(replica: Replica) -> None:
            await (await replica.watchlist(watchlist)).move(symbol, index)

        self._call(move)

    def add_trade(
        self,
        portfolio: str,
        symbol: str,
        quantity: object,
        price: object,
        time: datetime | None = None,
        note: str | None = None,
    ) -> Trade:
        """Record a trade; quantity and price as text or int (exact), negative quantity sells."""

        async def add(replica: Replica) -> Trade:
            handle = await replica.portfolio(portfolio)
            return await handle.add_trade(symbol, quantity, price, time, note)

        return self._call(add)

    def correct_trade(self, portfolio: str, trade_id: str, **changes: object) -> Trade:
        async def correct(replica: Replica) -> Trade:
            return await (await replica.portfolio(portfolio)).correct_trade(trade_id, **changes)

        return self._call(correct)

    def delete_trade(self, portfolio: str, trade_id: str) -> None:
        async def delete(replica: Replica) -> None:
            await (await replica.portfolio(portfolio)).delete_trade(trade_id)

        self._call(delete)

    def follow(self, symbols: Iterable[str] | str) -> None:
        """Also follow these symbols' prices (besides those of watchlists and positions)."""
        wanted = [normalize_symbol(s) for s in _as_list(symbols)]

        async def follow(replica: Replica) -> None:
            if self._sync is not None:
                self._sync.follow(wanted)

        self._call(follow)

    def unfollow(self, symbols: Iterable[str] | str) -> None:
        wanted = [normalize_symbol(s) for s in _as_list(symbols)]

        async def unfollow(replica: Replica) -> None:
            if self._sync is not None:
                self._sync.unfollow(wanted)

        self._call(unfollow)

    @property
    def offline(self) -> bool:
        """Whether :meth:`work_offline` stopped the sync (False without a server)."""
        return self._offline

    def work_offline(self, offline: bool = True) -> None:
        """Stop syncing with the relay (True) or start again (False), as a "work offline"
        switch does; edits go on either way and wait, pending, for the next connection.

        Connection subscribers hear the new state. ConfigError without a server.
        """
        if self._server is None or self._token is None:
            raise ConfigError("this client has no server: it is always offline")
        server, token = self._server, self._token

        async def switch(replica: Replica) -> None:
            if offline == self._offline:
                return
            self._offline = offline
            if offline:
                await self._stop_sync()
            else:
                self._start_sync(replica, server, token)
            self._check_connection()

        self._call(switch)

    def submit(self, work: Callable[[Replica], Awaitable[T]]) -> concurrent.futures.Future[T]:
        """Run ``await work(replica)`` on the loop and return its Future at once.

        For what the blocking methods do not offer, and for code on the loop thread, where a
        blocking call cannot wait. ``work`` gets the live replica: keep what it reads inside
        ``work`` and return plain values, never the replica's documents or handles.
        """
        if not callable(work):
            raise ValidationError(f"work must be callable, not {work!r}")
        with self._lock:
            if self._closing:
                raise ClientClosed("the client is closed")
            try:
                return asyncio.run_coroutine_threadsafe(self._run_call(work, False), self._loop)
            except RuntimeError:
                raise ClientClosed("the client is closed") from None

    # -- notifications -----------------------------------------------------------------------

    def on_change(self, callback: Callable[[DocumentChange], None]) -> Callable[[], None]:
        """Call ``callback(change)`` (through the dispatcher) after every committed change of a
        document, by this device (``origin == "local"``) or another.

        Each ``on_*`` returns a function that unsubscribes: no later event reaches the callback
        (one already handed to the dispatcher may still run, as a queued Qt signal would).
        """
        return self._subscribe("change", callback)

    def on_prices(self, callback: Callable[[tuple[Quote, ...]], None]) -> Callable[[], None]:
        """Call ``callback(quotes)`` with the quotes that changed, as prices arrive."""
        return self._subscribe("prices", callback)

    def on_freshness(self, callback: Callable[[FreshnessChange], None]) -> Callable[[], None]:
        """Call ``callback(change)`` when a document's or a price's freshness level changes
        (checked every ``freshness_interval`` seconds, and at once after changes)."""
        return self._subscribe("freshness", callback)

    def on_connection(self, callback: Callable[[SyncHealth], None]) -> Callable[[], None]:
        """Call ``callback(health)`` at once with the health as it is, then whenever the
        connection's state changes (connecting, connected, waiting, refused...)."""
        unsubscribe = self._subscribe("connection", callback)
        with contextlib.suppress(RuntimeError):  # the loop has ended: no greeting
            self._loop.call_soon_threadsafe(self._greet, callback)
        return unsubscribe

    def _subscribe(self, kind: str, callback: Callable[[Any], None]) -> Callable[[], None]:
        if not callable(callback):
            raise ValidationError(f"a callback must be callable, not {callback!r}")
        with self._lock:
            self._subscribers[kind].append(callback)

        def unsubscribe() -> None:
            with self._lock, contextlib.suppress(ValueError):
                self._subscribers[kind].remove(callback)

        return unsubscribe

    def _run_notifier(self) -> None:
        """Hand each event to each of its subscribers, in order, through the dispatcher."""
        while (event := self._events.get()) is not None:
            if self._closing:
                continue  # drained until close()'s sentinel: nothing starts once closing
            kind, payload = event
            if kind == "to":  # for one subscriber (its greeting)
                callbacks = [payload[0]]
                payload = payload[1]
            else:
                with self._lock:
                    callbacks = list(self._subscribers[kind])
            for callback in callbacks:
                try:
                    self._dispatcher(self._guarded(callback, payload))
                except Exception:  # closing: Tk's, say, refuses once its loop has ended
                    level = logging.DEBUG if self._closing else logging.ERROR
                    log.log(
                        level, "the dispatcher failed to take a %s callback", kind, exc_info=True
                    )

    def _guarded(self, callback: Callable[[Any], None], payload: Any) -> Callable[[], None]:
        def run() -> None:
            if self._closing:
                return
            try:
                callback(payload)
            except ClientClosed:
                log.debug("a callback ran into the client's close")
            except Exception:  # the app's callback must break neither the engine nor the app
                log.exception("callback %r failed", callback)

        return run

    def _emit(self, kind: str, payload: Any) -> None:
        """On the loop thread: queue an event (never waits, whatever the dispatcher does)."""
        self._events.put((kind, payload))

    # -- calls -------------------------------------------------------------------------------

    def _check_thread(self, what: str) -> None:
        if threading.current_thread() is self._thread:
            raise WrongThread(
                f"{what}() was called on the client's own loop thread, where it would wait for "
                "itself; use submit() there (callbacks given to on_* never run on that thread)"
            )

    def _call(
        self,
        work: Callable[[Replica], Awaitable[T]],
        *,
        timeout: float | None = None,
        cancel_on_close: bool = False,
    ) -> T:
        self._check_thread("a blocking method")
        with self._lock:
            if self._closing:
                raise ClientClosed("the client is closed")
            try:
                future = asyncio.run_coroutine_threadsafe(
                    self._run_call(work, cancel_on_close), self._loop
                )
            except RuntimeError:
                raise ClientClosed("the client is closed") from None
        wait = self._timeout if timeout is None else timeout
        try:
            return future.result(wait)
        except concurrent.futures.CancelledError:
            raise ClientClosed("the client closed before the call finished") from None
        except TimeoutError:
            if future.done():  # the work's own TimeoutError
                raise
            raise CallTimeout(
                f"no answer from the client's loop within {wait:g} s (an edit may still apply)"
            ) from None

    async def _run_call(self, work: Callable[[Replica], Awaitable[T]], cancel_on_close: bool) -> T:
        if not self._accepting or self._replica is None:
            raise ClientClosed("the client is closed")
        task = asyncio.current_task()
        assert task is not None
        self._calls[task] = cancel_on_close
        try:
            return await work(self._replica)
        finally:
            del self._calls[task]

    # -- the loop thread ---------------------------------------------------------------------

    def _run_loop(self) -> None:
        try:
            self._runner.run(self._main())
        except BaseException as exc:  # told to the opener, or to close()
            if not self._ready.done():
                self._ready.set_exception(exc)
            else:
                log.exception("the client's loop failed")
                self._shutdown_error = exc
        finally:
            with contextlib.suppress(Exception):
                self._runner.close()

    def _request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        replica = await Replica.open(self._path, synchronous=self._synchronous)
        self._replica = replica
        try:
            replica.subscribe(self._on_replica_change)
            replica.quotes.subscribe(self._on_quotes)
            if self._server is not None and self._token is not None:
                self._start_sync(replica, self._server, self._token)
            self._evaluate_freshness(notify=False)  # the levels at open: the baseline
            self._accepting = True
            self._ready.set_result(None)
            watcher = asyncio.get_running_loop().create_task(self._watch_freshness())
            if not self._closing:  # close() before open() returned (a timed-out open)
                await self._stop.wait()
            watcher.cancel()
            await self._shutdown()
        finally:
            await replica.close()

    def _start_sync(self, replica: Replica, server: str, token: str) -> None:
        """A new SyncClient each time: one whose run() was cancelled does not run again."""
        followed = set() if self._sync is None else set(self._sync.extra_symbols)
        self._sync = SyncClient(
            replica, server, token, client_name=self._client_name, backoff=self._backoff
        )
        self._sync.extra_symbols.update(followed)
        self._sync.on_connection_change(self._on_connection_change)
        self._sync_task = asyncio.get_running_loop().create_task(self._sync.run())
        self._sync_task.add_done_callback(self._on_sync_ended)

    async def _stop_sync(self) -> None:
        sync, task = self._sync, self._sync_task
        self._sync_task = None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, FolioSyncError):
                await task
        if sync is not None:
            with contextlib.suppress(FolioSyncError):
                await sync.stop()  # its state STOPPED: health() says "offline"

    async def _shutdown(self) -> None:
        self._accepting = False
        for call, cancel in list(self._calls.items()):
            if cancel:
                call.cancel()
        if self._calls:  # the calls made before close() finish first: nothing accepted is cut
            await asyncio.wait(list(self._calls), timeout=self._timeout)
        sync, task = self._sync, self._sync_task
        if sync is None or task is None:  # offline: nothing to flush
            if sync is not None:
                await self._stop_sync()
            return
        if sync.connected and self._flush_timeout > 0 and not task.done():
            with contextlib.suppress(TimeoutError):
                await sync.wait_in_sync(self._flush_timeout)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, FolioSyncError):
            await task

    def _on_replica_change(self, change: DocumentChange) -> None:
        self._emit("change", change)
        if self._wake is not None:
            self._wake.set()

    def _on_quotes(self, quotes: list[Quote]) -> None:
        self._emit("prices", tuple(quotes))
        now = self.now()
        for quote in quotes:
            self._update_price_level(quote, now, notify=True)

    def _on_connection_change(self, connected: bool) -> None:
        self._check_connection()
        if self._wake is not None:
            self._wake.set()

    def _on_sync_ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # a refused token
            self._check_connection()

    def _check_connection(self) -> None:
        """Tell the connection's subscribers of a new state (up, down, waiting, refused)."""
        if self._sync is not None and self._sync.state is not self._connection:
            self._connection = self._sync.state
            self._emit("connection", self._health())

    def _greet(self, callback: Callable[[SyncHealth], None]) -> None:
        if self._replica is not None and self._accepting:
            self._emit("to", (callback, self._health()))

    def _health(self) -> SyncHealth:
        assert self._replica is not None
        if self._sync is not None:
            return self._sync.health(self.now())
        return build_health(self._replica, state=ConnectionState.STOPPED, now=self.now())

    async def _watch_freshness(self) -> None:
        assert self._wake is not None
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._freshness_interval)
            self._wake.clear()
            try:
                self._check_connection()  # waiting, connecting: no listener tells those
                self._evaluate_freshness(notify=True)
            except Exception:  # a document gone meanwhile, say: the next tick sees it anew
                log.debug("freshness check failed", exc_info=True)

    def _evaluate_freshness(self, *, notify: bool) -> None:
        replica = self._replica
        assert replica is not None
        now = self.now()
        for info in replica.documents():
            self._update_level("document", info.id, self._document_freshness(info.id), notify)
        # A price's level rests on the market calendar (~40 µs a price): a price younger than
        # the live threshold is live without it, an outdated one stays so until a newer price
        # comes (handled as it comes), and the others are checked a slice per tick, so that two
        # thousand followed symbols cost the loop milliseconds a second, not a tenth of it.
        others: list[Quote] = []
        for quote in replica.quotes.all().values():
            if now - quote.time <= DEFAULT_THRESHOLDS.live or not notify:
                self._update_price_level(quote, now, notify)
            elif self._levels.get(("price", quote.symbol)) is not FreshnessLevel.OUTDATED:
                others.append(quote)
        if others:
            start = self._price_cursor % len(others)
            for quote in (others[start:] + others[:start])[:_PRICE_CHECKS_PER_TICK]:
                self._update_price_level(quote, now, notify)
            self._price_cursor = start + _PRICE_CHECKS_PER_TICK

    def _update_price_level(self, quote: Quote, now: datetime, notify: bool) -> None:
        young = now - quote.time <= DEFAULT_THRESHOLDS.live  # no trading time can be longer
        if young and self._levels.get(("price", quote.symbol)) is FreshnessLevel.LIVE:
            return
        self._update_level("price", quote.symbol, quote.freshness(now), notify)

    def _update_level(
        self, subject: Literal["document", "price"], key: str, freshness: Freshness, notify: bool
    ) -> None:
        previous = self._levels.get((subject, key))
        if previous is freshness.level:
            return
        self._levels[(subject, key)] = freshness.level
        if notify:
            self._emit("freshness", FreshnessChange(subject, key, freshness, previous))

    def _document_freshness(self, doc_id: str) -> Freshness:
        assert self._replica is not None
        now = self.now()
        if self._sync is None:
            return self._replica.freshness(doc_id, now)
        return self._sync.freshness(doc_id, now)  # "live" at the client's clock while in sync

    def _watchlist_snapshot(self, handle: WatchlistHandle) -> WatchlistSnapshot:
        return WatchlistSnapshot(
            handle.id,
            handle.name,
            tuple(handle.entries()),
            handle.pending,
            self._document_freshness(handle.id),
        )

    def _portfolio_snapshot(self, handle: PortfolioHandle) -> PortfolioSnapshot:
        return PortfolioSnapshot(
            handle.id,
            handle.name,
            tuple(handle.trades()),
            MappingProxyType(handle.positions()),
            handle.pending,
            self._document_freshness(handle.id),
        )


async def _now(value: T) -> T:
    """A value already at hand, as the awaitable a call runs (read on the loop thread)."""
    return value


def _as_list(symbols: Iterable[str] | str) -> list[str]:
    """One symbol or several; a str is one symbol, not its letters."""
    if isinstance(symbols, str):
        return [symbols]
    return list(symbols)
