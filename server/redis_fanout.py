"""Changes across relays through one Redis Stream: the shared-bus adapter of the FanOut port.

Every relay of a group appends the changes it stored to one stream, ``{prefix}changes``, and
reads that stream back: a change of another relay is applied to this relay's hot copy of the
document (``on_peer_change``, which the relay points at ``RelayDocuments.apply_peer``) and only
then handed to the local subscribers of its user, so a connection that syncs the document next
reads a state that holds it. A change of this relay is handed to its local subscribers at publish
time, as :class:`~foliosync.server.fanout.InProcessFanOut` does, and skipped when read back.

Why one stream per relay group and not one per shard of users: a relay may serve any user, so
its reader has to read every shard anyway; shards would multiply the offsets to keep and the
reads to make and keep nothing off any reader. One stream keeps per-document order for free
(every change of every document is in one sequence) and costs one blocking XREAD per relay. What
shards would buy is room on a Redis Cluster (one stream lives on one node); at the rates of a
relay group (tens of thousands of changes a second fit one Redis core) that is not needed.

Entries are compact msgpack, never the relay's encoded frames (those belong to one relay's
WebSocket layer). The writer puts what queued while it was sending into one entry, so a burst
costs one XADD and one reply to parse per reader, not one per change::

    [relay, [record, ...]]
    record: [1, user, doc, update, changed_at, changed_by, origin, published_ns]   a change
            [2, published_ns]   "this relay may have stored changes it did not publish": reload
            [3, published_ns, "granted", owner, doc, grantee, access]   a control event:
            [3, published_ns, "unshared", owner, doc, grantee]           a share granted or
            [3, published_ns, "tokens", revoked_at, user, device, jti]   ended, tokens revoked

Control events (:class:`~foliosync.server.fanout.ShareGranted`, ``ShareRevoked``,
``TokensRevoked``) take the same outbox as the changes, so a peer reads them in the order the
relay made them: a change of a document stored after its share was revoked reaches a peer after
the revocation, never before. A relay acts on its own connections itself and skips its own
records when it reads them back; a peer hands them to :meth:`RedisFanOut.subscribe_control`'s
subscribers. A control kind this version does not know is skipped and counted (``bad_records``).

The stream is trimmed approximately (``MAXLEN ~ maxlen`` entries) and an entry holds at most
``batch`` records and about 1 MiB, so its memory is bounded.

Offsets. The reader writes the id of the last entry it handled to ``{prefix}offset:{relay}``
(at most every quarter second, and at close; with a TTL, so a relay id gone for good leaves
nothing behind), and a restarted relay resumes from there. A key per relay is enough: each
relay reads every entry, so a consumer group per relay would only add a pending list to
acknowledge, one more command per batch. Relay ids must be unique within a group: a relay
skips the entries of its own id.

Missed changes. A relay can miss changes in three ways: it was away longer than the stream
holds (``XINFO STREAM`` says entries were trimmed and the oldest one left is newer than its
offset), Redis lost its data (the key ``{prefix}epoch``, a random token set once, changed or
vanished: the reader then reads the new stream from its start), or a peer could not publish and
its outbox overflowed (a type-2 record). A relay with no offset at all (its first start) is
treated alike. Then the reader calls ``on_missed`` before reading on, its place in the stream
fixed first: every change is stored before it is published, so reloading the hot documents
from the shared store (and sending the connected devices what they lack, through
:meth:`RedisFanOut.deliver_local`) covers whatever the stream no longer holds, and what is
published after that place is read as usual. A reader more than ``maxlen`` entries behind while
connected is not detected; with the defaults that is 100,000 entries of backlog.

A relay killed between storing a change and publishing it. The change is in the shared store
(acknowledged or not) but on no peer's hot copy, and no record will ever say so. Each relay
sets ``{prefix}running:{relay}`` to a token of its run when it starts and deletes it when it
closes with its outbox empty; a relay that finds the key of an earlier run still there queues a
type-2 record, and its peers reload. What the peers serve until then lacks that change.

One prefix, one store. ``{prefix}store`` holds the id of the store the group's relays write to
(a PostgreSQL store names itself: :attr:`PostgresRelayStore.store_id`); a relay with another
store refuses to start (ConfigError), as two groups on one prefix would apply each other's
changes to documents of the same ids.

Redis down. The relay refuses updates while :attr:`RedisFanOut.reachable` is false (the reader's
or the writer's last exchange failed: a dropped connection is noticed at once), with its fatal
``internal`` Error ("the other relays are unreachable"); the device resends after it reconnects.
A change stored then would be acknowledged while the other relays' devices could not get it.
:meth:`RedisFanOut.publish` itself never raises for it: a change stored just before Redis fell is
acknowledged already, and the local subscribers got it at once. Its record waits in a bounded
outbox that one writer task sends, in order, as soon as Redis answers again (with backoff); if
the outbox overflows, its oldest records are dropped and a type-2 record goes first, so peers
reload. The reader reconnects with backoff too and resumes from its offset in memory, so a
subscriber is never handed the same entry twice. :meth:`RedisFanOut.ping` raises meanwhile, which
makes ``/readyz`` say the relay cannot reach its peers.

Redis down when a share is ended or a token revoked. The revocation is stored in the share store
(PostgreSQL) before it is published, and the relay that stored it acts on its own connections at
once; the store is what every relay asks at each Hello, SyncRequest and Update, so no new
connection and no write gets past it. The control record is best effort on top: it waits in the
outbox like a change and reaches the peers, late, once Redis answers again; if the outbox
overflowed meanwhile, the type-2 record makes the peers call ``on_missed``, where the relay
re-checks its open connections against the share store. Until then a peer's open socket may go
on receiving the document's changes, or stay open on a revoked token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.exceptions import RedisError

from foliosync.server.fanout import (
    Change,
    ControlEvent,
    ControlHook,
    Deliver,
    FanOutStats,
    ShareGranted,
    ShareRevoked,
    Subscription,
    TokensRevoked,
    websocket_binary_frame,
)
from foliosync.server.timings import Timings
from foliosync.sync.errors import ConfigError, FolioSyncError, ValidationError
from foliosync.sync.protocol.frames import Update, encode_frame

__all__ = [
    "DEFAULT_MAXLEN",
    "MissedHook",
    "PeerHook",
    "RedisFanOut",
    "StreamId",
]

log = logging.getLogger(__name__)

DEFAULT_MAXLEN = 100_000
"""Entries the stream keeps (approximately): a relay away for fewer changes than this catches up
from the stream, one away longer reloads its hot documents."""

PeerHook = Callable[[Change], None]
"""Called with each change of another relay before it is delivered (``apply_peer``)."""

MissedHook = Callable[[], Awaitable[None]]
"""Called when changes may have been missed: reload the hot documents from the shared store."""

_CHANGE, _MISSED, _CONTROL = 1, 2, 3
_RUNNING_REFRESH_S = 3600.0
_FIELD = b"c"
_MAX_ENTRY_BYTES = 1 << 20
_SAVE_EVERY_S = 0.25
_BUS_ERRORS = (RedisError, OSError, asyncio.TimeoutError)

StreamId = tuple[int, int]


def _parse_id(raw: bytes | str) -> StreamId:
    text = raw.decode() if isinstance(raw, bytes) else raw
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def _format_id(value: StreamId) -> str:
    return f"{value[0]}-{value[1]}"


def _array_header(size: int) -> bytes:
    if size < 16:
        return bytes((0x90 | size,))
    if size < 1 << 16:
        return b"\xdc" + size.to_bytes(2, "big")
    return b"\xdd" + size.to_bytes(4, "big")


def _is_change(record: object) -> bool:
    if not isinstance(record, list) or len(record) != 8 or record[0] != _CHANGE:
        return False
    _, user, doc, update, changed_at, changed_by, origin, published = record
    return (
        all(isinstance(v, str) for v in (user, doc, changed_by, origin))
        and isinstance(update, bytes)
        and isinstance(changed_at, int)
        and isinstance(published, int)
    )


def _control_record(event: ControlEvent, published: int) -> list[object]:
    if isinstance(event, ShareGranted):
        return [
            _CONTROL,
            published,
            "granted",
            event.owner,
            event.doc_id,
            event.grantee,
            event.access,
        ]
    if isinstance(event, ShareRevoked):
        return [_CONTROL, published, "unshared", event.owner, event.doc_id, event.grantee]
    if isinstance(event, TokensRevoked):
        fields = (event.revoked_at, event.user, event.device, event.jti)
        return [_CONTROL, published, "tokens", *fields]
    raise ValidationError(f"not a control event: {event!r}")


def _control_event(record: list[Any]) -> ControlEvent | None:
    """The event of a type-3 record, or None if it is not one this version knows."""
    if len(record) < 3 or not isinstance(record[1], int):
        return None
    kind, fields = record[2], record[3:]
    texts = all(isinstance(v, str) for v in fields)
    if kind == "granted" and len(fields) == 4 and texts and fields[3] in ("read", "write"):
        return ShareGranted(*fields)
    if kind == "unshared" and len(fields) == 3 and texts:
        return ShareRevoked(*fields)
    if (
        kind == "tokens"
        and len(fields) == 4
        and isinstance(fields[0], int)
        and all(isinstance(v, str) for v in fields[1:])
    ):
        return TokensRevoked(*fields)
    return None


class _ControlSubscription:
    def __init__(self, listeners: set[ControlHook], deliver: ControlHook) -> None:
        self._listeners, self._deliver = listeners, deliver

    def close(self) -> None:
        self._listeners.discard(self._deliver)


class _Subscription:
    def __init__(self, bus: RedisFanOut, user: str, deliver: Deliver) -> None:
        self._bus, self._user, self._deliver = bus, user, deliver

    def close(self) -> None:
        listeners = self._bus._listeners.get(self._user)
        if listeners is not None:
            listeners.discard(self._deliver)
            if not listeners:
                del self._bus._listeners[self._user]


class RedisFanOut:
    """A relay's side of the shared bus: ``publish``/``subscribe`` as in one process, plus a
    reader that brings in the changes of the other relays. Call :meth:`start` in the running
    loop (after the hooks' targets exist), :meth:`close` at shutdown."""

    def __init__(
        self,
        url: str,
        *,
        relay_id: str,
        on_peer_change: PeerHook,
        on_missed: MissedHook | None = None,
        prefix: str = "foliosync:",
        maxlen: int = DEFAULT_MAXLEN,
        batch: int = 512,
        block_s: float = 1.0,
        max_outbox: int = 10_000,
        ping_timeout: float = 1.0,
        backoff: tuple[float, float] = (0.05, 5.0),
        offset_ttl_s: int = 7 * 86_400,
        store_id: str = "",
    ) -> None:
        if not relay_id or len(relay_id) > 200:
            raise ConfigError("a relay id of 1 to 200 characters is needed on a shared bus")
        if maxlen < 100 or batch < 1 or max_outbox < 1 or not 0 < block_s <= 60:
            raise ConfigError("maxlen >= 100, batch >= 1, max_outbox >= 1, 0 < block_s <= 60")
        if not 0 < ping_timeout <= 60 or not 0 < backoff[0] <= backoff[1]:
            raise ConfigError("0 < ping_timeout <= 60 and 0 < initial backoff <= maximum")
        self.relay_id = relay_id
        self.stream = f"{prefix}changes"
        self._offset_key = f"{prefix}offset:{relay_id}"
        self._epoch_key = f"{prefix}epoch"
        self._store_key = f"{prefix}store"
        self._running_key = f"{prefix}running:{relay_id}"
        self._incarnation = os.urandom(8).hex()
        self._running_refresh_at = 0.0
        self._announced = False
        self.unclean_start = False
        """The previous run of this relay id ended without closing (killed, crashed): it may
        have stored changes it never published, so its peers were told to reload."""
        self._store_id = store_id
        self._prefix = prefix
        self._on_peer_change = on_peer_change
        self._on_missed = on_missed
        self._maxlen, self._batch, self._block_ms = maxlen, batch, max(1, int(block_s * 1000))
        self._max_outbox, self._ping_timeout, self._backoff = max_outbox, ping_timeout, backoff
        self._offset_ttl_s = offset_ttl_s
        # Three connections' worth: the reader blocks in XREAD, the writer sends, ping asks.
        self._reader_redis: Redis = Redis.from_url(
            url, socket_timeout=block_s + 5.0, socket_connect_timeout=2.0
        )
        self._redis: Redis = Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=2.0)
        self._listeners: dict[str, set[Deliver]] = {}
        self._control: set[ControlHook] = set()
        self._outbox: deque[tuple[int, bytes]] = deque()
        self._queued = 0  # records ever queued: numbers them
        self._entry_head = b"\x92" + msgpack.packb(relay_id)  # [relay, [records...]]
        self._dropped_told = 0  # of the records dropped, those a type-2 record told peers of
        self._outbox_ready = asyncio.Event()
        self._position: StreamId | None = None
        self._epoch: bytes | str | None = None
        self._placed = False
        self._saved: StreamId | None = None  # the offset last written to Redis
        self._save_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        # Whether the reader's and the writer's last exchange with Redis succeeded: the relay
        # refuses updates while either failed (see :attr:`reachable`).
        self._reader_ok = True
        self._writer_ok = True
        self.stats = FanOutStats()
        self.peer_lag = Timings()
        """From publish on a peer to delivery here (wall clocks of both hosts)."""
        self.published = 0  # records written to the stream
        self.received = 0  # changes of peers delivered here
        self.control_received = 0  # control events of peers delivered here
        self.missed = 0  # times on_missed was called
        self.dropped = 0  # records dropped from a full outbox
        self.bad_records = 0  # entries that were not records of ours (skipped)

    # -- life cycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Find this relay's place in the stream, then start the reader and the writer.

        If Redis answers, the place is fixed before this returns, so nothing a peer publishes
        afterwards is skipped; if not, this still returns and the reader keeps trying."""
        if self._closed:
            raise FolioSyncError("the fan-out is closed")
        if not self._tasks:
            try:
                missed = await asyncio.wait_for(self._place(), self._ping_timeout + 2.0)
                self._placed = True
                await self._announce_start()
            except _BUS_ERRORS as exc:
                self.stats.errors += 1
                self._reader_ok = False
                log.warning("shared bus unreachable at start (%s); the reader retries", exc)
            else:
                if missed:
                    await self._missed()
            loop = asyncio.get_running_loop()
            self._tasks = [
                loop.create_task(self._read_loop(), name=f"fanout-reader-{self.relay_id}"),
                loop.create_task(self._write_loop(), name=f"fanout-writer-{self.relay_id}"),
            ]

    async def close(self, *, flush_timeout: float = 1.0) -> None:
        """Send what the outbox holds (for up to ``flush_timeout``), stop both tasks and drop
        the connections; nothing of this fan-out runs afterwards."""
        if self._closed:
            return
        self._closed = True
        self._listeners.clear()
        self._control.clear()
        if self._outbox and self._tasks:
            deadline = time.monotonic() + flush_timeout
            while self._outbox and time.monotonic() < deadline and not self._tasks[1].done():
                await asyncio.sleep(0.01)
        if self._tasks:
            reader, writer = self._tasks
            writer.cancel()
            # A blocking XREAD is not cancelled cleanly by redis-py (the task can hang in its
            # clean-up): drop the reader's connection instead, so the read fails and the loop,
            # seeing the fan-out closed, returns; cancelling stays the fallback.
            with contextlib.suppress(*_BUS_ERRORS):
                await self._reader_redis.connection_pool.disconnect(inuse_connections=True)
            done, _ = await asyncio.wait({reader}, timeout=self._ping_timeout)
            if not done:
                reader.cancel()
            for task in (reader, writer):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await asyncio.wait_for(task, self._ping_timeout)
        self._tasks = []
        if self._position is not None:
            with contextlib.suppress(*_BUS_ERRORS):
                await asyncio.wait_for(self._save_offset(self._redis), self._ping_timeout)
        if not self._outbox and self._announced:  # every change published: nothing to reload
            with contextlib.suppress(*_BUS_ERRORS):
                await asyncio.wait_for(self._end_running(), self._ping_timeout)
        for client in (self._reader_redis, self._redis):
            with contextlib.suppress(*_BUS_ERRORS):
                await client.aclose()

    async def _end_running(self) -> None:
        """Take this run's mark away, unless another run of the same id has set its own."""
        if await self._redis.get(self._running_key) == self._incarnation.encode():
            await self._redis.delete(self._running_key)

    async def ping(self) -> None:
        """Returns if Redis answers within ``ping_timeout``; else raises FolioSyncError."""
        if self._closed:
            raise FolioSyncError("the fan-out is closed")
        try:
            await asyncio.wait_for(self._redis.ping(), self._ping_timeout)
        except _BUS_ERRORS as exc:
            raise FolioSyncError(f"the shared bus (Redis) does not answer: {exc}") from exc

    # -- the port ----------------------------------------------------------------------------

    def subscribe(self, user: str, deliver: Deliver) -> Subscription:
        self._listeners.setdefault(user, set()).add(deliver)
        return _Subscription(self, user, deliver)

    async def publish(self, change: Change) -> None:
        """Deliver to this relay's subscribers now, and queue the record for the peers.

        Never raises for the bus: the change is stored and acknowledged already; if Redis is
        away its record waits in the outbox (see the module's docstring)."""
        started = time.perf_counter()
        self.deliver_local(change)
        self.stats.lag.observe(time.perf_counter() - started)
        if self._closed:
            return
        record = msgpack.packb(
            [
                _CHANGE,
                change.user,
                change.doc_id,
                change.update,
                change.changed_at,
                change.changed_by,
                change.origin,
                time.time_ns(),
            ],
            use_bin_type=True,
        )
        self._queue(record)

    def subscribe_control(self, deliver: ControlHook) -> Subscription:
        self._control.add(deliver)
        return _ControlSubscription(self._control, deliver)

    async def publish_control(self, event: ControlEvent) -> None:
        """Queue ``event`` for the peers, behind the changes queued before it (nothing local:
        the relay acted on its own connections already). Never raises for the bus: what it
        tells is stored already; see the module's docstring for Redis down."""
        if self._closed:
            return
        self._queue(msgpack.packb(_control_record(event, time.time_ns()), use_bin_type=True))

    def deliver_local(self, change: Change) -> None:
        """Hand ``change`` to this relay's subscribers of its user only (no record): what the
        relay's ``on_missed`` uses to send connected devices what a reload found."""
        for deliver in list(self._listeners.get(change.user, ())):
            try:
                deliver(change)
            except Exception:
                self.stats.errors += 1
                log.exception("a subscriber failed to take a change of %s", change.doc_id)

    @property
    def reachable(self) -> bool:
        """Whether Redis answered the reader's and the writer's last exchange. The relay refuses
        updates while it does not: a change stored then would reach the other relays' devices
        only once Redis is back (its record waits in the outbox), so the device is told to
        retry instead. A change stored just before Redis fell still goes out from the outbox."""
        return self._reader_ok and self._writer_ok and not self._closed

    @property
    def outbox(self) -> int:
        """Records waiting for Redis."""
        return len(self._outbox)

    # -- writer ------------------------------------------------------------------------------

    def _queue(self, record: bytes) -> None:
        if len(self._outbox) >= self._max_outbox:
            self._outbox.popleft()
            self.dropped += 1
        self._queued += 1
        self._outbox.append((self._queued, record))
        self._outbox_ready.set()

    def _next_entry(self) -> list[tuple[int, bytes]]:
        """The oldest records of the outbox that make one entry: up to ``batch`` of them and
        ``_MAX_ENTRY_BYTES`` (but at least one, however large)."""
        records: list[tuple[int, bytes]] = []
        size = 0
        for numbered in self._outbox:
            size += len(numbered[1])
            if records and (len(records) >= self._batch or size > _MAX_ENTRY_BYTES):
                break
            records.append(numbered)
        return records

    async def _write_loop(self) -> None:
        """One writer, so records reach the stream in publish order. What queued while it sent
        goes out as one entry, so a burst costs few commands and the readers few replies
        to parse (redis-py parses replies in Python: per entry, not per record, is what
        keeps a burst of changes fast)."""
        delay = self._backoff[0]
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                records = self._next_entry()
                dropped = self.dropped
                if dropped > self._dropped_told:
                    records.insert(0, (0, msgpack.packb([_MISSED, time.time_ns()])))
                entry = b"".join(
                    (self._entry_head, _array_header(len(records)), *(r for _, r in records))
                )
                try:
                    await self._redis.xadd(
                        self.stream, {_FIELD: entry}, maxlen=self._maxlen, approximate=True
                    )
                except _BUS_ERRORS as exc:
                    self.stats.errors += 1
                    self._writer_ok = False
                    log.warning(
                        "cannot publish to the shared bus (%s); %d change(s) wait, retry in %.2f s",
                        exc,
                        len(self._outbox),
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._backoff[1])
                    continue
                delay = self._backoff[0]
                self._writer_ok = True
                self._dropped_told = dropped
                # Only what was sent leaves: what was queued meanwhile stays, in order; what an
                # overflow dropped meanwhile is gone already (and the marker says so next).
                last_sent = records[-1][0]  # the marker, numbered 0, is never last
                while self._outbox and self._outbox[0][0] <= last_sent:
                    self._outbox.popleft()
                self.published += sum(1 for n, _ in records if n)

    # -- reader ------------------------------------------------------------------------------

    async def _read_loop(self) -> None:
        delay = self._backoff[0]
        resumed = self._placed  # start() found its place
        while not self._closed:
            try:
                if not resumed:
                    missed = await self._place()
                    resumed = True
                    if missed:
                        await self._missed()
                    if delay > self._backoff[0]:
                        log.info("shared bus reachable again; reading from %s", self._position)
                    delay = self._backoff[0]
                if not self._announced:  # Redis was down when this relay started
                    await self._announce_start()
                assert self._position is not None
                reply = await self._reader_redis.xread(
                    {self.stream: _format_id(self._position)},
                    count=self._batch,
                    block=self._block_ms,
                )
                self._reader_ok = True
                if reply:
                    await self._handle(reply)
                if time.monotonic() >= self._running_refresh_at:  # it outlives no quiet run
                    await self._reader_redis.expire(self._running_key, self._offset_ttl_s)
                    self._running_refresh_at = time.monotonic() + _RUNNING_REFRESH_S
                if self._position != self._saved and time.monotonic() >= self._save_at:
                    await self._save_offset(self._reader_redis)
            except asyncio.CancelledError:
                raise
            except _BUS_ERRORS as exc:
                if self._closed:
                    return
                self.stats.errors += 1
                self._reader_ok = False
                resumed = False
                log.warning("shared bus unreachable (%s); reconnecting in %.2f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._backoff[1])
            except ConfigError as exc:
                # Another group took the prefix while this relay was away (Redis lost its data
                # and the other got there first): nothing of it may be read, nor anything
                # accepted that its peers would never get.
                if self._closed:
                    return
                self.stats.errors += 1
                self._reader_ok = False
                resumed = False
                log.error("%s", exc)
                await asyncio.sleep(self._backoff[1])

    async def _place(self) -> bool:
        """Find where to read from; True if changes may have been missed before it (the
        caller then reloads, before reading on: whatever is published from here on is read)."""
        redis = self._reader_redis
        epoch = await redis.get(self._epoch_key)
        if epoch is None:
            await redis.set(self._epoch_key, os.urandom(12).hex().encode(), nx=True)
            epoch = await redis.get(self._epoch_key)
        lost = self._epoch is not None and epoch != self._epoch
        self._epoch = epoch
        await self._check_group(redis)
        if self._position is None:
            saved = await redis.get(self._offset_key)
            self._position = _parse_id(saved) if saved is not None else None
        info = await self._stream_info()
        if lost:
            # Redis lost its data: the stream now holds only what came after; read all of it.
            why, level = "the shared bus lost its data", logging.WARNING
            start: StreamId = (0, 0)
        elif self._position is None:
            why, level = "no offset is known for this relay", logging.INFO  # a first start
            start = info[1]
        elif not info[2] and (info[0] or info[1]) > self._position:
            why, level = "the stream was trimmed past this relay's offset", logging.WARNING
            start = info[1]
        else:
            return False
        log.log(level, "%s: reloading the hot documents from the store", why)
        self._position = start
        return True

    async def _stream_info(self) -> tuple[StreamId | None, StreamId, bool]:
        """(the oldest id the stream still holds, or None; the newest id ever added; whether
        it holds every entry ever added). Trimming drops the oldest entries first, so a relay
        whose last entry is older than the oldest held may have missed some: it may also have
        missed none (the trim stopped right after its entry), a reload too many, never one too
        few."""
        try:
            info: dict[Any, Any] = await self._reader_redis.xinfo_stream(self.stream)
        except RedisError as exc:
            if "no such key" in str(exc).lower():
                return None, (0, 0), True
            raise
        last = _parse_id(info.get("last-generated-id", b"0-0"))
        first = info.get("first-entry")
        added = info.get("entries-added")  # Redis 7 and later
        complete = added is not None and added == info.get("length")
        return (_parse_id(first[0]) if first else None), last, complete

    async def _missed(self) -> None:
        self.missed += 1
        if self._on_missed is None:
            log.warning("changes of peers may be missing and no on_missed hook reloads them")
            return
        try:
            await self._on_missed()
        except Exception:
            self.stats.errors += 1
            log.exception("reloading after missed changes failed")

    async def _save_offset(self, redis: Redis) -> None:
        """At most every ``_SAVE_EVERY_S`` while reading (one command less per batch), and at
        close: a relay that crashes reads that much again, which changes nothing (applying an
        update twice is a no-op, and its devices are new connections)."""
        position = self._position
        if position is not None:
            async with redis.pipeline(transaction=False) as pipe:
                pipe.set(self._offset_key, _format_id(position), ex=self._offset_ttl_s)
                if self._store_id:  # the group's binding lasts as long as one relay reads
                    pipe.expire(self._store_key, self._offset_ttl_s)
                await pipe.execute()
            self._saved, self._save_at = position, time.monotonic() + _SAVE_EVERY_S

    async def _announce_start(self) -> None:
        """Mark this relay id running until :meth:`close`; if the mark of an earlier run is
        still there, that run ended between storing a change and publishing it, perhaps: a
        type-2 record then makes the peers reload their hot copies from the shared store
        (which holds every change acknowledged), else they would serve the copies without it
        for as long as they stay in memory."""
        previous = await self._redis.set(
            self._running_key, self._incarnation, ex=self._offset_ttl_s, get=True
        )
        self._running_refresh_at = time.monotonic() + _RUNNING_REFRESH_S
        self._announced = True
        if previous is not None:
            self.unclean_start = True
            log.warning(
                "the last run of relay %s did not close: its peers reload what it stored",
                self.relay_id,
            )
            self._queue(msgpack.packb([_MISSED, time.time_ns()]))

    async def _check_group(self, redis: Redis) -> None:
        """Bind the prefix to this relay's store, or refuse if it is bound to another: two
        groups on one prefix (a staging and a production, an old database and a new one) would
        read each other's changes into their documents, same ids and all, and send them on to
        their devices, which would store them for good."""
        if not self._store_id:
            return
        await redis.set(self._store_key, self._store_id, ex=self._offset_ttl_s, nx=True)
        bound = await redis.get(self._store_key)
        if isinstance(bound, bytes):
            bound = bound.decode(errors="replace")
        if bound is not None and bound != self._store_id:
            raise ConfigError(
                f"the Redis prefix {self._prefix!r} belongs to a relay group with another store "
                f"(id {bound}, this relay's is {self._store_id}): give each group its own "
                f"--redis-prefix; if that store is gone for good, delete the key "
                f"{self._store_key!r}"
            )

    async def _handle(self, reply: Any) -> None:
        streams = reply.items() if isinstance(reply, dict) else reply  # RESP3 gives a map
        for _stream, entries in streams:
            for entry_id, fields in entries:
                self._position = _parse_id(entry_id)
                entry = self._decode(fields)
                if entry is None or entry[0] == self.relay_id:
                    continue  # junk, or this relay's own: delivered here at publish time
                relay, records = entry
                for record in records:
                    if _is_change(record):
                        self._peer_change(relay, record)
                    elif isinstance(record, list) and record and record[0] == _MISSED:
                        log.warning(
                            "relay %s may have stored changes it never published: reloading", relay
                        )
                        await self._missed()
                    elif isinstance(record, list) and record and record[0] == _CONTROL:
                        self._peer_control(relay, record)
                    else:
                        self._bad("a record that is not a change")

    def _decode(self, fields: Any) -> tuple[str, list[Any]] | None:
        try:
            relay, records = msgpack.unpackb(fields[_FIELD], raw=False)
            if isinstance(relay, str) and isinstance(records, list):
                return relay, records
        except Exception:  # msgpack raises several kinds; any bad entry is skipped alike
            pass
        self._bad("an entry that is not one of ours")
        return None

    def _bad(self, what: str) -> None:
        self.bad_records += 1
        self.stats.errors += 1
        log.warning("skipped %s on %s", what, self.stream)

    def _peer_change(self, relay: str, record: list[Any]) -> None:
        _, user, doc, update, changed_at, changed_by, origin, published = record
        frame = encode_frame(Update(doc, 0, update, changed_at, changed_by))
        # Framed once for every receiver, as a change made here is: without it each receiver
        # framed the change itself, and the relay could not hold and merge a peer's busy
        # document (a frame per change per device: half the deliveries of a relay of its own).
        change = Change(
            user,
            doc,
            update,
            changed_at,
            changed_by,
            origin,
            relay,
            frame,
            websocket_binary_frame(frame),
        )
        try:
            self._on_peer_change(change)
        except Exception:
            # Still delivered: the devices merge it; the hot copy reloads on its next miss.
            self.stats.errors += 1
            log.exception("applying a change of relay %s to %s failed", relay, doc)
        self.deliver_local(change)
        self.received += 1
        lag = max(0.0, (time.time_ns() - published) / 1e9)
        self.stats.lag.observe(lag)
        self.peer_lag.observe(lag)

    def _peer_control(self, relay: str, record: list[Any]) -> None:
        event = _control_event(record)
        if event is None:
            self._bad("a control record of a kind this relay does not know")
            return
        for deliver in list(self._control):
            try:
                deliver(event)
            except Exception:
                self.stats.errors += 1
                log.exception("a control subscriber failed to take %s of relay %s", event, relay)
        self.control_received += 1
