"""Syncing a replica with a relay over one WebSocket, and staying in sync.

A connection goes through three steps:

1. Hello with the token; the relay's Welcome lists the user's documents (a new device learns
   them here, and from the index document).
2. For every document, a SyncRequest with the local state vector; the relay answers with what the
   device lacks and its own state vector, from which the device sends what the relay lacks:
   each pending change as its own Update (so that a refusal names one change); when the relay
   lacks more than they bring (restored from a backup), what it lacks of the confirmed content
   goes first, on its own. The relay's Ack of a seq settles every pending change up to it,
   except those it answered with an Error.
3. Live: each local edit is sent as it is committed; each remote change is applied and stored.

What to send, settle, roll back or request again is decided by the pure machines of
:mod:`foliosync.sync.protocol.document_sync` (one per document and connection; their docstring
lists the invariants, each a bug once); :class:`_Connection` only executes their decisions
against the replica and the socket, and health() reads what they know. The relay's refusals
(PROTOCOL.md section 5): a change refused for good is rolled back (``Replica.refuse``; the
app hears of it through ``Replica.on_refusal``) and the document's other pending changes,
rebased ones included, go on; after ``missing_dependencies`` the document is requested again
and one merged diff sent (refused for good, it names no single change: its rows wait for the
next connection, which sends them one by one); a change to retry later stays pending, kept out
of every later Ack, and goes again on the same connection after a doubling, bounded wait, as a
new Update with a new seq (or on the next connection). A one-shot sync ends as soon as it is
quiet, even when the last of its work (a rollback's resend) ran beside the read loop.

When the connection drops the replica goes on working offline; :meth:`SyncClient.run` reconnects
with exponential backoff and full jitter, so that a thousand clients of a restarted relay spread
out instead of returning in one wave. When the relay ended the connection for the client's own
behaviour (a fatal ``rate_limited``, ``too_many_refusals`` or ``too_many_connections``, or close
1008 however it came), the next attempt waits between half and all of the backoff's cap: the
backoff restarts from its base at every Welcome, and a client cut for abuse that came back within
a quarter second would be cut again, in a loop.

One syncing process per replica. Several processes may have one replica open (an app all day,
the CLI beside it), and each may run a SyncClient; but two connections of one device would send
the same pending rows twice, and the Ack one of them gets could settle rows the other had not
sent. So a client connects only while it holds the replica's sync lease: an OS lock
(``flock``) on the file ``<replica>-sync`` beside it, held for the connection's life. The
kernel drops it when its holder exits, however it exits (SIGKILL included), and a waiting client
tries again every ``LEASE_POLL_SECONDS``: a killed syncer is taken over at once, with no lease
to expire. While it waits, a client's replica still follows the syncing process's changes (the
replica reads them from the file), and it is idle whenever nothing is pending; a one-shot
:meth:`SyncClient.sync_once` ends as soon as nothing is pending, the syncing process having sent
it. The syncing process sends other processes' edits too: the replica notifies them in the log's
order with their seq and update (``origin="other-process"``), exactly like its own. The lock
file is created with the replica's own mode, and a lock file the client cannot write (another
user's) is locked through a read-only descriptor, which ``flock`` accepts. Where no lock can be
taken at all (no lock file and a read-only folder, a file system without locks), the client
refuses to sync (SyncLeaseUnavailable) rather than risk two syncing processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import logging
import os
import random
import ssl as _ssl
import time
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp

from foliosync.client.health import ConnectionState, LastError, SyncHealth, build_health
from foliosync.client.replica import SYNCED_AT_META, DocumentChange, DocumentInfo, Replica
from foliosync.client.shares import READ_ONLY, REVOKED, SHARED, mark_share, share_state
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import (
    AuthError,
    ConfigError,
    ConnectionLost,
    DocumentNotFound,
    FolioSyncError,
    ProtocolError,
    RemoteProtocolError,
    SyncLeaseUnavailable,
    ValidationError,
)
from foliosync.sync.freshness import Freshness, document_freshness
from foliosync.sync.model import DocumentKind
from foliosync.sync.prices import PricePoint, SequenceTracker
from foliosync.sync.protocol import (
    MAX_SYMBOLS,
    Acked,
    ApplyRemote,
    CheckSettled,
    ClientSession,
    Decision,
    DeviceSync,
    EnsureDocuments,
    ErrorCode,
    ErrorReceived,
    Fail,
    MarkSynced,
    PingReceived,
    PricesReceived,
    ReadOutgoing,
    ReadUnsent,
    Report,
    RequestNew,
    RequestState,
    Rollback,
    Send,
    Settle,
    SyncReplied,
    UpdateReceived,
    Welcomed,
)
from foliosync.sync.protocol.document_sync import RetryAfter
from foliosync.sync.validation import normalize_symbol

__all__ = ["Backoff", "SyncClient", "SyncStatus", "tls_context"]

log = logging.getLogger("foliosync.sync")

CLIENT_MAX_FRAME = 64 << 20  # the relay may send a whole document at once
CLIENT_MAX_SEND = 4 << 20  # what the relay accepts by default
LEASE_POLL_SECONDS = 0.1  # how often a client waiting for the sync lease tries again
# How often the syncing process, connected and in sync, says so in the replica's meta, for the
# processes waiting for its lease (their freshness; a write of a few bytes).
HEARTBEAT_SECONDS = 2.0
# The fatal codes by which the relay says "not so fast" (PROTOCOL.md, sections 1 and 5), and the
# close code it ends such a connection with: the next attempt waits Backoff.cool_down().
_SLOW_DOWN = frozenset(
    {ErrorCode.RATE_LIMITED, ErrorCode.TOO_MANY_REFUSALS, ErrorCode.TOO_MANY_CONNECTIONS}
)


def tls_context(ca_file: str | os.PathLike[str] | None = None) -> _ssl.SSLContext:
    """The TLS context a client verifies a wss:// relay with: the system's trusted CAs, or only
    those of ``ca_file`` (PEM) when given, e.g. a private CA's. Hostnames are checked, TLS 1.2 at
    least. A missing or unreadable file is a ConfigError naming it, at construction: never a
    connection that falls back to something weaker."""
    try:
        context = _ssl.create_default_context(
            cafile=None if ca_file is None else os.fspath(ca_file)
        )
    except (OSError, _ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"cannot read the CA file {ca_file}: {reason}") from exc
    context.minimum_version = _ssl.TLSVersion.TLSv1_2
    return context


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with full jitter: delay = uniform(0, min(cap, base * 2**attempt))."""

    base: float = 0.25
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * (2**self.attempt)))
        self.attempt = min(self.attempt + 1, 30)
        return delay

    def cool_down(self) -> float:
        """The wait after the relay ended a connection for the client's behaviour: uniform(cap
        / 2, cap), still jittered (a thousand clients cut at once spread out), never short."""
        return self.rng.uniform(self.cap / 2, self.cap)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class SyncStatus:
    doc_id: str
    pending: int
    last_synced_at: int | None  # ms; "now" while connected and in sync, or the edit in flight's
    remote_changed_at: int | None
    remote_changed_by: str | None
    connected: bool


class _SyncLease:
    """The right to sync one replica, across processes: see the module docstring."""

    def __init__(self, replica_path: os.PathLike[str] | str) -> None:
        # Beside the file itself: a replica opened through a symlink (or another spelling of
        # its path) must meet the same lease, or two processes would both sync it.
        self.path = f"{os.path.realpath(replica_path)}-sync"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lease if it is free; True if held now, False if another process holds it.

        Raises SyncLeaseUnavailable when no lock can be taken at all.
        """
        if self._fd is not None:
            return True
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as exc:
            os.close(fd)
            raise self._unavailable(exc) from exc
        self._fd = fd
        return True

    def _open(self) -> int:
        """A descriptor of the lock file, created with the replica's mode if missing; read-only
        if that is all we may do (flock needs no write access)."""
        replica = self.path.removesuffix("-sync")
        try:
            mode = os.stat(replica).st_mode & 0o666
        except OSError:
            mode = 0o600
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
        except OSError as exc:
            try:
                return os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                raise self._unavailable(exc) from exc

    def _unavailable(self, exc: OSError) -> SyncLeaseUnavailable:
        return SyncLeaseUnavailable(
            f"cannot lock {self.path} ({exc.strerror or exc}), which keeps a second process from "
            "syncing this replica at the same time; not syncing (fix the file or its folder)"
        )

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # the kernel releases the lock with the last descriptor


class _Stop(Exception):
    """The connection's work is done (one-shot sync) or the client was stopped."""


async def _run_to_completion(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work``; if cancelled meanwhile (stop(), a timeout), let it finish, then re-raise.

    Handling one frame is several replica updates (apply, acknowledge, recount what is pending):
    cut between two of them, the replica's bookkeeping in memory would disagree with its file.
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await task
        raise


def _outcome_taken(future: asyncio.Future[Any]) -> None:
    """Take a background write's outcome, so that an error nobody awaits any more (its caller
    was cancelled) is not reported as never retrieved; the caller handled what it saw."""
    if not future.cancelled():
        future.exception()


class SyncClient:
    """Keeps one replica in sync with one relay."""

    def __init__(
        self,
        replica: Replica,
        url: str,
        token: str,
        *,
        client_name: str = "foliosync",
        backoff: Backoff | None = None,
        heartbeat: float = 30.0,
        connect_timeout: float = 10.0,
        flush_timeout: float = 5.0,
        snapshot_timeout: float = 5.0,
        ca_file: str | os.PathLike[str] | None = None,
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        """``ca_file`` (PEM) or ``ssl`` (a context of your own) say whom a wss:// relay's
        certificate must verify against; by default the system's trusted CAs (:func:`tls_context`).
        They do not apply to ws:// URLs, which have no TLS. ``heartbeat`` is how often the
        connection pings (WebSocket pings, and a protocol Ping that the relay's idle timeout
        sees)."""
        if ssl is not None and ca_file is not None:
            raise ConfigError("give ca_file or ssl, not both")
        if ssl is not None and not isinstance(ssl, _ssl.SSLContext):
            raise ConfigError(f"ssl must be an ssl.SSLContext, not {ssl!r}")
        self.tls = ssl if ssl is not None else tls_context(ca_file)
        """What a wss:// relay's certificate is verified with."""
        self.replica = replica
        self.url = url
        self.token = token
        self.client_name = client_name
        self.backoff = backoff or Backoff()
        self.heartbeat = heartbeat
        self.connect_timeout = connect_timeout
        self.flush_timeout = flush_timeout  # see __aexit__
        self.snapshot_timeout = snapshot_timeout  # see sync_once
        self.user: str | None = None
        self.device: str | None = None
        self._connected = False
        # The current connection's sync machine: health() and status() read what it knows of
        # each document (in sync, since when out of it); None between connections.
        self._machine: DeviceSync | None = None
        self._task: asyncio.Task[None] | None = None
        self._idle = asyncio.Event()
        self._stopping = False
        self._listeners: list[Callable[[bool], None]] = []
        self.extra_symbols: set[str] = set()
        self._connection: _Connection | None = None
        # For health(): what run() is doing, and what last went wrong (the replica remembers it).
        self._state = ConnectionState.STOPPED
        self._next_retry_at: datetime | None = None
        self._last_error = LastError.from_meta(replica.meta)
        self._followed: frozenset[str] | None = None  # as the last subscription computed them
        self._unwatch_followed: Callable[[], None] | None = None
        self._followed_task: asyncio.Task[None] | None = None
        self._followed_cost = 0.0  # seconds the last recount took
        self._lease = _SyncLease(replica.path)
        self._waited_for_lease = False  # by the last connection attempt, still without it
        self._welcomed = False  # by the relay, on the current or last connection
        # The last connection ended for this client's behaviour (a slow-down Error, close 1008).
        self._closed_for_abuse = False

    # -- status ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    @property
    def state(self) -> ConnectionState:
        return ConnectionState.CONNECTED if self._connected else self._state

    @property
    def last_error(self) -> LastError | None:
        """What last went wrong with the relay (kept after a later success, with its time)."""
        return self._last_error

    def health(self, now: datetime | None = None) -> SyncHealth:
        """Connection state, lag, pending changes, last error, price ages and the documents'
        worst freshness in one value, from memory: cheap enough to call every second.

        ``health().describe()`` is the one-line text of a status bar.
        """
        now = now or datetime.now(tz=UTC)
        now_ms = int(now.timestamp() * 1000)

        def synced_at(info: DocumentInfo) -> int | None:
            return self._synced_at(info, now_ms)

        return build_health(
            self.replica,
            state=self.state,
            now=now,
            synced_at=synced_at,
            next_retry_at=self._next_retry_at,
            last_error=self._last_error,
            followed=self._followed,
        )

    def _synced_at(self, info: DocumentInfo, now_ms: int) -> int | None:
        """When a document was last known in sync, in ms: ``now_ms`` while kept in sync.

        A document that left sync on this connection (an edit in flight) was in sync until
        that edit, whatever its last confirmation says."""
        machine = self._machine
        if machine is None:
            return info.last_synced_at
        if self._connected and machine.in_sync(info.id) and info.pending == 0:
            return now_ms
        left = machine.left_sync_at(info.id)
        if left is not None and (info.last_synced_at is None or left > info.last_synced_at):
            return left
        return info.last_synced_at

    async def _record_error(self, error: LastError) -> None:
        self._last_error = error
        # Shielded: a client stopped while it records an error (its task cancelled) still
        # leaves the file saying what memory says; the replica's close waits for the write.
        write = asyncio.ensure_future(self.replica.set_meta(**error.to_meta()))
        write.add_done_callback(_outcome_taken)
        with contextlib.suppress(FolioSyncError):  # a closed or full replica: memory still has it
            await asyncio.shield(write)

    def status(self, doc_id: str) -> SyncStatus:
        info = self.replica.info(doc_id)
        return SyncStatus(
            doc_id=doc_id,
            pending=info.pending,
            last_synced_at=self._synced_at(info, wall_ms()),
            remote_changed_at=info.remote_changed_at,
            remote_changed_by=info.remote_changed_by,
            connected=self._connected,
        )

    def freshness(self, doc_id: str, now: datetime | None = None) -> Freshness:
        """Level, age, reason and pending changes of a document as of ``now``, "live" while
        kept in sync: measured by the one rule health() uses (:meth:`_synced_at`), against the
        caller's clock (a BackgroundClient's injected one) rather than the wall clock."""
        now = now or datetime.now(tz=UTC)
        info = self.replica.info(doc_id)
        synced_ms = self._synced_at(info, int(now.timestamp() * 1000))
        synced = (
            None
            if synced_ms is None
            else min(datetime.fromtimestamp(synced_ms / 1000, tz=UTC), now)
        )
        return document_freshness(synced, now, info.pending)

    def follow(self, symbols: Iterable[str]) -> None:
        """Also follow these symbols' prices (besides those of watchlists and positions)."""
        self.extra_symbols.update(normalize_symbol(s) for s in symbols)
        self._refresh_followed()
        if self._connection is not None:
            self._connection.refresh_subscription()

    def unfollow(self, symbols: Iterable[str]) -> None:
        self.extra_symbols.difference_update(normalize_symbol(s) for s in symbols)
        self._refresh_followed()
        if self._connection is not None:
            self._connection.refresh_subscription()

    def _refresh_followed(self, change: DocumentChange | None = None) -> None:
        """Recount the followed symbols for health() soon, also offline (once per burst)."""
        if change is not None and change.kind is DocumentKind.INDEX:
            return
        if self._unwatch_followed is None:  # not running: no loop to count them in
            return
        if self._followed_task is None or self._followed_task.done():
            self._followed_task = asyncio.get_running_loop().create_task(self._count_followed())

    async def _count_followed(self) -> None:
        await asyncio.sleep(self._recount_delay())
        with contextlib.suppress(FolioSyncError):
            symbols = await self._followed_now()
            self._followed = frozenset(symbols | self.extra_symbols)

    def _recount_delay(self) -> float:
        """How long a burst of changes is let run before the followed symbols are recounted:
        at least 50 ms, and 20 times what the last recount took, so that recounting takes at
        most a twentieth of the loop. Every position of a 2,000-trade portfolio is read again
        after each remote change (tens of ms): recounted every 50 ms while another device's
        thousand offline edits arrived, it took half the process and slowed the sync itself."""
        return max(0.05, 20 * self._followed_cost)

    async def _followed_now(self) -> set[str]:
        """The replica's followed symbols, with the time it took remembered."""
        started = time.perf_counter()
        try:
            return await self.replica.followed_symbols()
        finally:
            self._followed_cost = time.perf_counter() - started

    def on_connection_change(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(connected)`` whenever the connection comes up or goes down."""
        self._listeners.append(listener)

    def _welcomed_by(self, event: Welcomed) -> None:
        """The relay welcomed this client on the current connection."""
        self.user, self.device = event.user, event.device
        self._welcomed = True
        self.backoff.reset()
        self._set_connected(True)

    def _note_followed(self, symbols: frozenset[str]) -> None:
        """The followed symbols as the connection's subscription computed them, for health()."""
        self._followed = symbols

    def _connection_quiet(self, quiet: bool) -> None:
        """The connection's machine says whether it has done all it can (see DeviceSync.quiet);
        wait_in_sync and a block's flush wait for that."""
        if quiet:
            self._idle.set()
        else:
            self._idle.clear()

    def _set_connected(self, value: bool) -> None:
        if value != self._connected:
            self._connected = value
            for listener in list(self._listeners):
                with contextlib.suppress(Exception):
                    listener(value)

    # -- running -----------------------------------------------------------------------------

    async def sync_once(self, timeout: float = 30.0) -> bool:
        """Connect, bring every document in sync both ways, fetch the latest prices of the
        followed symbols into ``replica.quotes``, and disconnect.

        The prices are waited for at most ``snapshot_timeout`` seconds once the documents are in
        sync (the relay answers a subscription with a snapshot at once; a relay without prices
        only costs that wait, and the documents are in sync whatever happens to the prices).
        Raises ConnectionLost (unreachable, or not done within ``timeout``), AuthError (token
        refused) or ProtocolError. Local data is never touched by a failure.

        Returns True if this client synced with the relay; False if another process holds the
        sync lease and had sent every pending change, so that this one never contacted the relay
        (and the relay's URL and token, unchecked, are not remembered).
        """
        self._state = ConnectionState.CONNECTING
        self._welcomed = False
        try:
            try:
                await asyncio.wait_for(self._connect_and_serve(until_idle=True), timeout)
            except TimeoutError:
                if self._waited_for_lease:
                    raise ConnectionLost(
                        f"another process syncs replica {self.replica.path} and had not sent "
                        f"every change of it within {timeout:g} s (is it offline?)"
                    ) from None
                raise ConnectionLost(
                    f"sync with {self.url} did not finish within {timeout:g} s"
                ) from None
        except (FolioSyncError, OSError) as exc:
            await self._record_error(LastError.from_exception(exc))
            self._state = (
                ConnectionState.REFUSED if isinstance(exc, AuthError) else ConnectionState.STOPPED
            )
            raise
        self._state = ConnectionState.STOPPED
        if not self._welcomed:
            return False  # another process syncs: the URL and token were never tried
        # Remembered only once the relay welcomed this token and the sync succeeded, so that
        # `foliosync sync` works without flags.
        await self.replica.set_meta(server_url=self.url, token=self.token)
        return True

    def start(self) -> None:
        """Keep syncing in the background, reconnecting as needed, until :meth:`stop`."""
        if self._task is None or self._task.done():
            self._stopping = False
            self._task = asyncio.get_running_loop().create_task(self.run())
        if self._unwatch_followed is None:
            self._unwatch_followed = self.replica.subscribe(self._refresh_followed)
            self._refresh_followed()

    async def stop(self) -> None:
        self._stopping = True
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
                self._task = None
        finally:
            if self._state is not ConnectionState.REFUSED:
                self._state = ConnectionState.STOPPED
            self._next_retry_at = None
            if self._unwatch_followed is not None:
                self._unwatch_followed()
                self._unwatch_followed = None
            if self._followed_task is not None:
                self._followed_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._followed_task
                self._followed_task = None

    async def __aenter__(self) -> SyncClient:
        """``async with SyncClient(replica, url, token) as client:`` starts it..."""
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        """...and stops it when the block ends.

        Leaving normally, it first gives the edits made in the block up to ``flush_timeout``
        seconds to reach the relay, so that a short script's changes are not left for its next
        run. Leaving by an exception, it stops at once. Either way nothing is lost: an edit is
        committed to the replica before it returns, and what the relay has not acknowledged stays
        pending and is sent on the next connection.
        """
        if exc_type is not None:
            with contextlib.suppress(FolioSyncError):  # the block's own exception goes on
                await self.stop()
            return
        task = self._task
        try:
            if self.flush_timeout > 0 and task is not None and not task.done():
                idle = asyncio.ensure_future(self._idle.wait())
                try:  # until in sync, or the connection gave up (a refused token: stop() raises)
                    await asyncio.wait(
                        {idle, task},
                        timeout=self.flush_timeout,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    idle.cancel()
        finally:  # stopped even if the wait is cancelled (Ctrl-C)
            await self.stop()

    async def wait_in_sync(self, timeout: float = 30.0) -> None:
        """Wait until connected with every document synced and nothing pending.

        A client without the sync lease (another process syncs the replica) never connects: it
        returns once nothing is pending in the replica, that process having sent every change.
        """
        await asyncio.wait_for(self._idle.wait(), timeout)

    async def run(self) -> None:
        """Sync forever: reconnect with backoff after every failure except a refused token."""
        try:
            await self._run()
        except Exception as exc:  # health() says why the client ended, not "connecting"
            if self._state is not ConnectionState.REFUSED:
                self._state = ConnectionState.STOPPED
                await self._record_error(LastError.from_exception(exc))
            raise

    async def _run(self) -> None:
        while not self._stopping:
            self._state, self._next_retry_at = ConnectionState.CONNECTING, None
            try:
                await self._connect_and_serve(until_idle=False)
            except AuthError as exc:
                log.error("the relay refused the token; not reconnecting")
                # Stored first: an app that sees REFUSED and stops the client (cancelling this
                # task) must not cancel the write that lets the next process know why.
                await self._record_error(LastError.from_exception(exc))
                self._state = ConnectionState.REFUSED
                raise
            except (ConnectionLost, ProtocolError, OSError) as exc:
                log.info("sync connection ended: %s", exc)
                await self._record_error(LastError.from_exception(exc))
                if isinstance(exc, ProtocolError) and exc.code in _SLOW_DOWN:
                    self._closed_for_abuse = True
            delay = self.backoff.next_delay()
            if self._closed_for_abuse:
                self._closed_for_abuse = False
                delay = max(delay, self.backoff.cool_down())
                log.warning("the relay asked this client to slow down; back in %.0f s", delay)
            self._next_retry_at = datetime.now(tz=UTC) + timedelta(seconds=delay)
            self._state = ConnectionState.WAITING
            await asyncio.sleep(delay)

    # -- one connection ----------------------------------------------------------------------

    @property
    def syncing(self) -> bool:
        """Whether this client holds the replica's sync lease (False: another process syncs)."""
        return self._lease.held

    async def _take_lease(self, until_idle: bool) -> bool:
        """Wait for the sync lease; False if a one-shot sync has nothing left to do meanwhile
        (another process, holding the lease, sent every pending change)."""
        self._waited_for_lease = False
        while not self._lease.try_acquire():
            self._state = ConnectionState.FOLLOWING
            if not self._waited_for_lease:
                self._waited_for_lease = True
                log.info("another process syncs %s; waiting to take over", self.replica.path)
            if until_idle:
                await self.replica.refresh()
            if not any(info.pending for info in self._all_documents()):
                self._idle.set()
                if until_idle:
                    return False
            else:
                self._idle.clear()
            await asyncio.sleep(LEASE_POLL_SECONDS)
        if self._state is ConnectionState.FOLLOWING:
            self._state = ConnectionState.CONNECTING
        return True

    def _all_documents(self) -> list[DocumentInfo]:
        return [self.replica.info(doc_id) for doc_id in self.replica.document_ids()]

    async def _connect_and_serve(self, *, until_idle: bool) -> None:
        if not await self._take_lease(until_idle):
            return
        self._waited_for_lease = False
        try:
            await self._serve_leased(until_idle)
        finally:
            self._lease.release()

    async def _serve_leased(self, until_idle: bool) -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                try:
                    ws = await http.ws_connect(
                        self.url,
                        heartbeat=self.heartbeat,
                        max_msg_size=CLIENT_MAX_FRAME + 1024,
                        compress=0,
                        ssl=self.tls if self.url.startswith(("wss:", "https:")) else True,
                    )
                except aiohttp.ClientConnectorCertificateError as exc:
                    reason = getattr(exc.certificate_error, "verify_message", None) or str(
                        exc.certificate_error
                    )
                    raise ConnectionLost(
                        f"the relay at {self.url} has a certificate that does not verify "
                        f"({reason}); give its CA with ca_file (--ca, $FOLIOSYNC_CA)"
                    ) from exc
                except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                    raise ConnectionLost(f"cannot reach the relay at {self.url}: {exc}") from exc
                async with ws:
                    session = ClientSession(
                        max_frame_size=CLIENT_MAX_FRAME, max_send_size=CLIENT_MAX_SEND
                    )
                    self._machine = DeviceSync(session, one_shot=until_idle)
                    self._connection = _Connection(self, ws, self._machine)
                    try:
                        await self._connection.serve()
                    finally:
                        self._connection = None
        finally:
            self._set_connected(False)
            self._idle.clear()
            if self._machine is not None:
                await self._remember_live_documents(self._machine)
            self._machine = None

    async def _remember_live_documents(self, machine: DeviceSync) -> None:
        for doc_id, document in list(machine.documents.items()):
            with contextlib.suppress(FolioSyncError):
                if document.in_sync and self.replica.info(doc_id).pending == 0:
                    await self.replica.mark_synced(doc_id)
        # In sync until an edit that is still in flight: confirmed up to that edit.
        for doc_id, document in list(machine.documents.items()):
            left = document.left_sync_at
            if left is None or document.in_sync:
                continue
            with contextlib.suppress(FolioSyncError):
                synced = self.replica.info(doc_id).last_synced_at
                if synced is None or left > synced:
                    await self.replica.mark_synced(doc_id, at_ms=left)


class _Connection:
    """The I/O of one connection: executes what its :class:`DeviceSync` decides, feeding back
    what the replica answered; all sends go through one writer task.

    Every decision of one frame runs to completion before the next frame is read (a refusal is
    rolled back before any later Ack is settled). ``Send`` decisions are executed without an
    await, so that the order the machine chose is the order on the wire.
    """

    def __init__(
        self, client: SyncClient, ws: aiohttp.ClientWebSocketResponse, machine: DeviceSync
    ) -> None:
        self.client = client
        self.replica = client.replica
        self.ws = ws
        self.machine = machine
        self.session = machine.session
        self.until_idle = machine.one_shot
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.subscribed: frozenset[str] | None = None
        self.price_seqs = SequenceTracker()
        self._subscription_task: asyncio.Task[None] | None = None
        # One-shot sync: once the documents are in sync, the prices' snapshot is waited for
        # until this loop time; it came, or the wait ran out.
        self.snapshot_deadline: float | None = None
        self.snapshot_received = False
        self.snapshot_given_up = False
        self._side_tasks: set[asyncio.Task[None]] = set()  # work started from callbacks
        self._heartbeat_task: asyncio.Task[None] | None = None
        # Set when work beside the read loop finds a one-shot sync done (a rollback read and
        # sent in a side task leaves the document quiet with no frame left to come).
        self._done = asyncio.Event()

    async def serve(self) -> None:
        writer = asyncio.get_running_loop().create_task(self._write_loop())
        unsubscribe = self.replica.subscribe(self._on_local_change)
        try:
            self._send(self.session.hello(self.client.token, self.client.client_name))
            await self._read_until_done()
        except _Stop:
            pass
        finally:
            unsubscribe()
            # Work started from callbacks ends with the connection it was for.
            for task in list(self._side_tasks):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, FolioSyncError):
                    await task
            self.outbox.put_nowait(None)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer, 5)
            self.session.close()

    def _send(self, data: bytes) -> None:
        self.outbox.put_nowait(data)

    async def _write_loop(self) -> None:
        while (data := await self.outbox.get()) is not None:
            try:
                await self.ws.send_bytes(data)
            except (ConnectionError, RuntimeError, aiohttp.ClientError):
                return

    async def _read_until_done(self) -> None:
        """The read loop, until it ends or a side task finds the one-shot sync done."""
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read_loop())
        done = loop.create_task(self._done.wait())
        try:
            await asyncio.wait({reader, done}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            done.cancel()
            if not reader.done():
                reader.cancel()  # a frame's handling in progress runs to completion first
                with contextlib.suppress(asyncio.CancelledError, _Stop):
                    await reader
        if reader.done() and not reader.cancelled():
            reader.result()  # _Stop, or why the connection ended

    async def _read_loop(self) -> None:
        while True:
            message = await self._receive()
            if message is None:  # the wait for the prices' snapshot ran out
                await self._finish_one_shot()
                continue
            if message.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSING,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                closed_with = message.data if message.type is aiohttp.WSMsgType.CLOSE else None
                # Ended for abuse, even without the Error that says so.
                abuse = aiohttp.WSCloseCode.POLICY_VIOLATION
                if abuse in (closed_with, self.ws.close_code):
                    self.client._closed_for_abuse = True
                raise ConnectionLost(
                    f"the relay closed the connection ({message.extra or 'no reason'})"
                )
            if message.type != aiohttp.WSMsgType.BINARY:
                raise RemoteProtocolError("the relay sent a text message", code=ErrorCode.BAD_FRAME)
            try:
                events = self.session.receive_data(message.data)
            except RemoteProtocolError:
                if self.session.error_reply is not None:
                    with contextlib.suppress(Exception):
                        await self.ws.send_bytes(self.session.error_reply)
                raise
            for event in events:
                await _run_to_completion(self._handle(event))
            if self._check_idle() and self.until_idle:
                await self._finish_one_shot()

    async def _receive(self) -> aiohttp.WSMessage | None:
        """The next frame; None if the wait for the prices' snapshot runs out first."""
        if self.snapshot_deadline is None or self.snapshot_given_up:
            return await self.ws.receive()
        remaining = self.snapshot_deadline - asyncio.get_running_loop().time()
        try:
            return await self.ws.receive(timeout=max(remaining, 0.001))
        except TimeoutError:
            log.info("no price snapshot within %g s; syncing without", self.client.snapshot_timeout)
            self.snapshot_given_up = True
            return None

    async def _finish_one_shot(self) -> None:
        """A one-shot sync whose documents are in sync ends once it also holds the latest prices
        of the followed symbols (so that prices shown right after a sync are not missing), or
        once the bounded wait for them ran out."""
        if self.snapshot_deadline is None:
            if self.client.snapshot_timeout <= 0:
                raise _Stop
            await self._update_subscription()  # the symbols as the synced documents have them
            if not self.subscribed:
                raise _Stop  # nothing followed: no prices to wait for
            loop = asyncio.get_running_loop()
            self.snapshot_deadline = loop.time() + self.client.snapshot_timeout
        elif (self.snapshot_received or self.snapshot_given_up) and self.machine.quiet:
            raise _Stop

    async def _handle(self, event: object) -> None:
        if isinstance(event, PricesReceived):
            await self._on_prices(event)
        elif isinstance(event, PingReceived):
            self._send(self.session.pong(event.nonce))
        elif isinstance(event, Welcomed):
            self.client._welcomed_by(event)
            self._spawn(self._ping_every_heartbeat())
            await self._execute(self.machine.receive(event))
            if not self.until_idle:  # a one-shot sync of documents needs no prices
                await self._update_subscription()
                if self._heartbeat_task is None:
                    self._heartbeat_task = self._spawn(self._heartbeat())
        elif isinstance(event, UpdateReceived | SyncReplied | Acked | ErrorReceived):
            await self._execute(self.machine.receive(event))

    # -- executing the machine's decisions ---------------------------------------------------

    async def _execute(self, decisions: list[Decision]) -> None:
        """Carry out ``decisions`` in order, each with what it leads to before the next."""
        for decision in decisions:
            if isinstance(decision, Send):
                self._send(decision.data)
            else:
                await self._execute(await self._carry_out(decision))

    async def _carry_out(self, decision: Decision) -> list[Decision]:
        """Do one decision that is not a Send; the machine's answer to its result."""
        machine, replica = self.machine, self.replica
        match decision:
            case EnsureDocuments(doc_ids):
                for doc_id in doc_ids:
                    with contextlib.suppress(ValidationError):
                        await replica.ensure_document(doc_id)
                return []
            case RequestNew():  # not the shared documents whose share was revoked
                return machine.documents_known(
                    d for d in replica.document_ids() if share_state(replica, d) != "revoked"
                )
            case RequestState(doc):
                if not self._holds(doc):  # dropped since (its creation refused): nothing to ask
                    return machine.pending_is(CheckSettled(doc), 0)
                return machine.state_vector_read(decision, await replica.state_vector(doc))
            case ApplyRemote(doc, update, changed_at, changed_by):
                await replica.apply_remote(  # makes the local copy of a document new to us
                    doc, update, changed_at=changed_at, changed_by=changed_by
                )
                return []
            case ReadOutgoing(doc, state_vector, relay_update, merged):
                rows = (
                    await replica.outgoing(doc, state_vector, relay_update, merged=merged)
                    if self._holds(doc)
                    else []  # dropped since: the relay's reply brought nothing to keep
                )
                return machine.outgoing_read(decision, rows, self._pending(decision.doc), wall_ms())
            case ReadUnsent(doc):
                unsent = [(p.seq, p.data) for p in await replica.pending_updates(doc)]
                return machine.unsent_read(decision, unsent, self._pending(doc), wall_ms())
            case Settle(doc, seq, keep):
                await replica.acknowledge(doc, seq, keep=keep)
                if self.client.device:  # the relay's newest change of it is now ours
                    await replica.record_watermark(doc, wall_ms(), self.client.device)
                return machine.acknowledged(decision, self._pending(doc))
            case Rollback(doc):
                await self._refuse(decision)
                return machine.rolled_back(decision, self._pending(doc))
            case RetryAfter(doc, delay):
                self._spawn(self._retry(doc, delay))
                return []
            case CheckSettled(doc):
                return machine.pending_is(decision, self._pending(doc))
            case MarkSynced(doc):
                await replica.mark_synced(doc)
                return []
            case Report(code, message, doc, None) if code == SHARED and doc is not None:
                # Shared with this user while connected: synced like a document the Welcome
                # lists (PROTOCOL.md, Sharing).
                log.info("%s: %s", doc, message)
                with contextlib.suppress(ValidationError):
                    await replica.ensure_document(doc)
                    if share_state(replica, doc) == "revoked":
                        await mark_share(replica, doc, "write")
                    return machine.documents_known([doc])
                return []
            case Report(code, message, doc, seq):
                log.warning("relay error for %s (seq %s): %s %s", doc, seq, code, message)
                await self.client._record_error(LastError.now(code, message))
                if doc is not None and "/" in doc and code in (REVOKED, READ_ONLY):
                    await mark_share(replica, doc, "revoked" if code == REVOKED else "read")
                return []
            case Fail(error):
                raise error
        raise AssertionError(f"unhandled decision {decision!r}")  # pragma: no cover

    def _pending(self, doc: str) -> int:
        try:
            return self.replica.info(doc).pending
        except DocumentNotFound:  # dropped: the relay refused its creation
            return 0

    def _holds(self, doc: str) -> bool:
        """Whether the replica holds ``doc`` (not dropped since the machine asked)."""
        try:
            self.replica.info(doc)
        except DocumentNotFound:
            return False
        return True

    async def _refuse(self, decision: Rollback) -> None:
        refusal = await self.replica.refuse(
            decision.doc, decision.seq, decision.code, decision.message, whole=decision.whole
        )
        if refusal is not None:  # the app hears of it through Replica.on_refusal
            log.warning(
                "the relay refused %s (%s: %s); rolled back",
                refusal.summary,
                decision.code,
                decision.message,
            )
            return
        if decision.whole:  # another change in flight of a document rolled back as a whole
            log.debug("seq %d of %s: rolled back with its document", decision.seq, decision.doc)
            return
        # No pending row of that seq any more: another rollback re-made it (its change, made
        # again, goes under a new seq and is judged on its own), or the Update carried no row
        # (only what the relay lacked of the confirmed content). Nothing was rolled back here:
        # say so rather than pretend, and remember it as the last error.
        message = (
            f"the relay refused seq {decision.seq} of {decision.doc} ({decision.code}: "
            f"{decision.message}), which no pending change holds any more; nothing rolled back"
        )
        log.warning("%s", message)
        await self.client._record_error(LastError.now(decision.code, message[:200]))

    async def _retry(self, doc: str, delay: float) -> None:
        """Send the document's changes to retry later again, after ``delay`` seconds."""
        await asyncio.sleep(delay)
        if not self.session.closed:
            self._spawn_decisions(self.machine.retry_due(doc))

    def _spawn_decisions(self, decisions: list[Decision]) -> None:
        """Execute decisions from a callback: Sends now, in order; the rest in a task."""
        for index, decision in enumerate(decisions):
            if not isinstance(decision, Send):
                self._spawn(self._execute_aside(decisions[index:]))
                return
            self._send(decision.data)
        self._check_idle()

    async def _execute_aside(self, decisions: list[Decision]) -> None:
        """Decisions run beside the read loop. If one fails, the connection ends: the machine
        may be waiting for its answer (a read of unsent rows), and a new connection's sync
        starts from what the replica holds."""
        try:
            await self._execute(decisions)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("sync work failed (%s); reconnecting", exc)
            with contextlib.suppress(Exception):
                await self.ws.close()
            return
        if self._check_idle() and self.until_idle:
            await self._finish_aside()

    async def _finish_aside(self) -> None:
        """A one-shot sync found quiet beside the read loop (no frame may come to end it):
        ends it now, or once the bounded wait for the prices' snapshot is over."""
        try:
            await self._finish_one_shot()
            if self.snapshot_deadline is not None:
                loop = asyncio.get_running_loop()
                await asyncio.sleep(max(self.snapshot_deadline - loop.time(), 0))
                self.snapshot_given_up = self.snapshot_given_up or not self.snapshot_received
                await self._finish_one_shot()
        except _Stop:
            self._done.set()

    async def _ping_every_heartbeat(self) -> None:
        """A protocol Ping every ``heartbeat`` seconds: the relay answers WebSocket pings below
        what it sees, so a connection with nothing to say would otherwise look idle to it and be
        closed after its idle timeout (``idle_timeout``, 120 s by default)."""
        interval = self.client.heartbeat
        if not interval > 0:
            return
        for nonce in itertools.count(1):
            await asyncio.sleep(interval)
            if self.session.closed:
                return
            self._send(self.session.ping(nonce))

    async def _heartbeat(self) -> None:
        """Every HEARTBEAT_SECONDS while every document is in sync with nothing in flight, write
        the time to the replica's meta: a process waiting for the lease counts it as the last
        sync of each settled document, instead of seeing them drift to stale."""
        while not self.session.closed:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            if self.client._idle.is_set() and self.client.connected:
                with contextlib.suppress(FolioSyncError):  # a busy file: the next beat says it
                    await self.replica.set_meta(**{SYNCED_AT_META: str(wall_ms())})

    # -- prices ------------------------------------------------------------------------------

    def refresh_subscription(self) -> None:
        """Re-check the followed symbols soon (after a burst of edits, once)."""
        if self.until_idle or self.session.closed:
            return
        if self._subscription_task is None or self._subscription_task.done():
            self._subscription_task = self._spawn(
                self._update_subscription(delay=self.client._recount_delay())
            )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``work`` alongside the read loop; it is cancelled when the connection ends."""
        task = asyncio.get_running_loop().create_task(work)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
        return task

    async def _update_subscription(self, delay: float = 0.0) -> None:
        if delay:
            await asyncio.sleep(delay)
        wanted = frozenset(await self.client._followed_now() | self.client.extra_symbols)
        self.client._note_followed(wanted)
        if not self.machine.welcomed:  # a Subscribe before the Welcome is a protocol error;
            return  # the Welcome's handling subscribes with the symbols as they are then
        if wanted != self.subscribed and not self.session.closed:
            self.subscribed = wanted
            self.price_seqs.reset()
            symbols = sorted(wanted)
            if len(symbols) > MAX_SYMBOLS:  # the most a Subscribe holds and a relay follows
                log.warning(
                    "%d symbols to follow: prices come for the first %d alphabetically only",
                    len(symbols),
                    MAX_SYMBOLS,
                )
                symbols = symbols[:MAX_SYMBOLS]
            self._send(self.session.subscribe(symbols))

    async def _on_prices(self, event: PricesReceived) -> None:
        points: list[PricePoint] = []
        regressed: list[str] = []
        for item in event.ticks:
            try:
                point = PricePoint.from_wire(item)
            except ValidationError:
                log.warning("ignoring a malformed price from the relay: %.80r", item)
                continue
            if self.price_seqs.accept(point, snapshot=event.snapshot):
                points.append(point)
            else:
                regressed.append(point.symbol)
        if regressed:  # the relay's numbers went back (it restarted): trust a fresh snapshot
            self._send(self.session.resync(sorted(set(regressed))))
        if points:
            await self.replica.apply_prices(points, snapshot=event.snapshot)
        if event.snapshot and self.snapshot_deadline is not None:
            self.snapshot_received = True

    # -- local changes -----------------------------------------------------------------------

    def _on_local_change(self, change: DocumentChange) -> None:
        if change.kind is not DocumentKind.INDEX:
            self.refresh_subscription()
        decisions = self.machine.local_change(
            change.doc_id, change.origin, change.seq, change.update, wall_ms()
        )
        if decisions:
            self._spawn_decisions(decisions)

    def _check_idle(self) -> bool:
        """Whether every document is in sync with nothing in flight (and say so to waiters)."""
        if not self.client.connected:
            return False
        quiet = self.machine.quiet
        self.client._connection_quiet(quiet)
        return quiet
