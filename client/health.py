"""How a device stands with its relay, in one frozen value an app can show in a status bar.

An app polls this every second, so building it reads only what the replica and the sync client
already hold in memory: no SQLite query, no CRDT load. ``foliosync status --json`` prints the same
value (:meth:`SyncHealth.to_json`) for a device whose app is not running, with the connection
state ``not_running`` and the last error the replica remembers.

The last error is kept after a later success, with its time: it is what last went wrong, not
necessarily what is wrong now. :meth:`SyncHealth.describe` shows it only while the device is not
connected and the error is newer than the last confirmed sync, so that a status bar does not blame
a relay that has answered since.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from types import MappingProxyType

from foliosync.client.quotes import Quote, QuoteBook
from foliosync.client.replica import DocumentInfo, Refusal, Replica
from foliosync.sync.errors import (
    AccessDenied,
    AuthError,
    ConnectionLost,
    ProtocolError,
    ReplicaError,
)
from foliosync.sync.freshness import (
    Freshness,
    FreshnessLevel,
    document_freshness,
    format_duration,
)
from foliosync.sync.model import DocumentKind

__all__ = ["ConnectionState", "LastError", "PriceAge", "SyncHealth", "build_health"]

_ZERO = timedelta()
_REFUSAL_SHOWN = timedelta(hours=1)  # how long the status line names a rolled-back change
_LEVEL_RANK = {level: rank for rank, level in enumerate(FreshnessLevel)}
# Where the replica keeps the last sync error (its ``meta`` table).
_META_CODE, _META_MESSAGE, _META_AT = "last_error_code", "last_error_message", "last_error_at"


class ConnectionState(StrEnum):
    CONNECTING = "connecting"
    """Opening a connection (or between a drop and the decision to wait)."""
    CONNECTED = "connected"
    """Welcomed by the relay: edits go out as they are made, remote ones come in."""
    WAITING = "waiting"
    """Offline after a failure, retrying at ``next_retry_at``."""
    STOPPED = "stopped"
    """The client was never started, or was stopped (a one-shot sync ended)."""
    REFUSED = "refused"
    """The relay refused the token: the client does not retry (a new token is needed)."""
    NOT_RUNNING = "not_running"
    """No sync client in this process (``foliosync status``): the replica alone speaks."""
    FOLLOWING = "following"
    """Another process holds the replica's sync lease and syncs it; this one follows its changes
    through the file, and its freshness comes from that process's "synced at" heartbeat."""


def _iso(t: datetime | None) -> str | None:
    if t is None:
        return None
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _seconds(span: timedelta | None) -> float | None:
    return None if span is None else round(span.total_seconds(), 3)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


@dataclass(frozen=True, slots=True)
class LastError:
    """The last thing that went wrong between this device and its relay.

    ``code`` is the relay's error code when the relay said it (``auth_failed``, ``forbidden``,
    ``too_large``...), else ``connection_lost`` (unreachable, dropped, timed out),
    ``replica_error`` (this device's file failed) or ``internal``.
    """

    code: str
    message: str
    at: datetime

    @classmethod
    def now(cls, code: str, message: str) -> LastError:
        """An error happening now (to the millisecond, as the replica keeps it)."""
        return cls(code, message, _from_ms(int(time.time() * 1000)))

    @classmethod
    def from_exception(cls, exc: BaseException) -> LastError:
        if isinstance(exc, AuthError):
            code = "auth_failed"
        elif isinstance(exc, AccessDenied):
            code = "forbidden"
        elif isinstance(exc, ProtocolError):
            code = exc.code
        elif isinstance(exc, ConnectionLost | OSError):
            code = "connection_lost"
        elif isinstance(exc, ReplicaError):
            code = "replica_error"  # this device's file, not the relay: a full disk, say
        else:
            code = "internal"
        return cls.now(code, str(exc) or type(exc).__name__)

    def to_meta(self) -> dict[str, str]:
        return {
            _META_CODE: self.code,
            _META_MESSAGE: self.message,
            _META_AT: str(int(self.at.timestamp() * 1000)),
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, str]) -> LastError | None:
        """The error a replica remembers, or None (also for a damaged entry: it is only a note)."""
        code, message, at = meta.get(_META_CODE), meta.get(_META_MESSAGE), meta.get(_META_AT)
        if not code or message is None or at is None:
            return None
        try:
            return cls(code, message, _from_ms(int(at)))
        except (ValueError, OverflowError, OSError):
            return None

    def to_json(self) -> dict[str, object]:
        return {"code": self.code, "message": self.message, "at": _iso(self.at)}


@dataclass(frozen=True, slots=True)
class PriceAge:
    """One price's age: ``age`` in wall time (what "2 s old" says), ``freshness`` in market time
    (a closing price stays LIVE while the exchange is shut)."""

    symbol: str
    time: datetime
    age: timedelta
    freshness: Freshness

    @classmethod
    def of(cls, quote: Quote, now: datetime) -> PriceAge:
        return cls(quote.symbol, quote.time, quote.age(now), quote.freshness(now))

    def to_json(self) -> dict[str, object]:
        return {
            "symbol": self.symbol,
            "time": _iso(self.time),
            "age": _seconds(self.age),
            "freshness": _freshness_json(self.freshness, pending=False),
        }


def _freshness_json(
    freshness: Freshness | None, *, pending: bool = True
) -> dict[str, object] | None:
    if freshness is None:
        return None
    shown: dict[str, object] = {
        "level": freshness.level.value,
        "age": _seconds(freshness.age),  # market time for a price, wall time for a document
        "reason": freshness.reason,
    }
    if pending:  # a price has no pending changes
        shown["pending"] = freshness.pending
    return shown


@dataclass(frozen=True, slots=True)
class SyncHealth:
    """Everything a status bar shows, as of ``at``.

    ``lag`` is how far behind the relay this device may be: the time since the *oldest* moment at
    which some document (the index of documents included) was last known to be in sync. A document
    counts as in sync "now" while a connected client keeps it so with nothing pending; once an
    edit leaves it pending on a live connection, from the moment of that edit; otherwise from the
    last time the device confirmed it in sync with the relay (a disconnect confirms what was in
    sync then); a document never synced, from when it was created. Both directions are in it: a
    pending change was made after its document's last confirmation, so the edits the relay lacks
    and the remote edits this device may have missed are both at most ``lag`` old. It is zero
    exactly when connected with everything in sync.

    ``pending`` counts the local changes the relay has not acknowledged, over the watchlists and
    portfolios (``pending_by_document`` by document id, only those with some). ``freshness`` is
    the worst of the documents' (None without documents). ``newest_price`` is the most recent
    price held; ``oldest_price`` the least recent price of a followed symbol, and
    ``prices_missing`` the followed symbols with no price at all. ``last_refusal`` is the last
    change the relay refused for good and this device rolled back (shown for an hour).
    """

    at: datetime
    state: ConnectionState
    next_retry_at: datetime | None
    lag: timedelta
    pending: int
    pending_by_document: Mapping[str, int]
    last_error: LastError | None
    freshness: Freshness | None
    newest_price: PriceAge | None
    oldest_price: PriceAge | None
    prices_missing: int
    last_refusal: Refusal | None = None

    @property
    def in_sync(self) -> bool:
        return self.state is ConnectionState.CONNECTED and self.lag == _ZERO and not self.pending

    @property
    def error_is_current(self) -> bool:
        """Whether the last error is newer than the last moment everything was in sync."""
        if self.last_error is None or self.state is ConnectionState.CONNECTED:
            return False
        return self.last_error.at > self.at - self.lag

    def describe(self) -> str:
        """One line for a status bar: "live · 3 changes waiting to sync · prices 2 s old"."""
        parts = [self._describe_state()]
        if not self.in_sync and self.lag >= timedelta(seconds=1):
            parts.append(f"behind {format_duration(self.lag)}")
        if self.pending:
            noun = "change" if self.pending == 1 else "changes"
            parts.append(f"{self.pending} {noun} waiting to sync")
        if self.error_is_current and self.last_error is not None:
            parts.append(f"{self.last_error.code}: {self.last_error.message}")
        refusal = self.last_refusal
        if refusal is not None and self.at - _from_ms(refusal.at_ms) < _REFUSAL_SHOWN:
            parts.append(f'refused "{refusal.summary}", rolled back')
        prices = self._describe_prices()
        if prices:
            parts.append(prices)
        return " · ".join(parts)

    def _describe_state(self) -> str:
        state = self.state
        if state is ConnectionState.CONNECTED:
            return "live" if self.lag == _ZERO else "syncing"
        if state is ConnectionState.WAITING:
            if self.next_retry_at is None:
                return "offline"
            wait = max(self.next_retry_at - self.at, _ZERO)
            return f"offline, retrying in {format_duration(wait)}"
        if state is ConnectionState.REFUSED:
            return "refused by the relay"
        if state is ConnectionState.CONNECTING:
            return "connecting"
        if state is ConnectionState.FOLLOWING:
            return "another process syncs"
        return "offline"

    def _describe_prices(self) -> str:
        newest = self.newest_price
        if newest is None:
            return ""
        closed = "market closed" in newest.freshness.reason
        if closed and newest.freshness.level is FreshnessLevel.LIVE:
            text = "closing prices"  # nothing traded since: as current as prices can be
        else:
            text = f"prices {format_duration(newest.age)} old"
            if newest.freshness.level is not FreshnessLevel.LIVE:
                text += f" ({newest.freshness.level.value})"
        oldest = self.oldest_price
        if (
            oldest is not None
            and oldest.symbol != newest.symbol
            and _LEVEL_RANK[oldest.freshness.level] > _LEVEL_RANK[newest.freshness.level]
        ):
            text += f", {oldest.symbol} {oldest.freshness.level.value}"
        if self.prices_missing:
            text += f", {self.prices_missing} without a price"
        return text

    def to_json(self) -> dict[str, object]:
        """The same fields, for JSON: times in ISO 8601 UTC, ages and ``lag`` in seconds."""
        return {
            "at": _iso(self.at),
            "state": self.state.value,
            "next_retry_at": _iso(self.next_retry_at),
            "lag": _seconds(self.lag),
            "pending": self.pending,
            "pending_by_document": dict(self.pending_by_document),
            "last_error": None if self.last_error is None else self.last_error.to_json(),
            "freshness": _freshness_json(self.freshness),
            "newest_price": None if self.newest_price is None else self.newest_price.to_json(),
            "oldest_price": None if self.oldest_price is None else self.oldest_price.to_json(),
            "prices_missing": self.prices_missing,
            "last_refusal": None if self.last_refusal is None else _refusal_json(self.last_refusal),
            "status_line": self.describe(),
        }


def _refusal_json(refusal: Refusal) -> dict[str, object]:
    return {
        "doc_id": refusal.doc_id,
        "seq": refusal.seq,
        "code": refusal.code,
        "message": refusal.message,
        "at": _iso(_from_ms(refusal.at_ms)),
        "changes": refusal.changes,
        "summary": refusal.summary,
        "rebased": list(refusal.rebased),
    }


def _worst(freshnesses: list[Freshness]) -> Freshness | None:
    def rank(f: Freshness) -> tuple[int, bool, timedelta]:
        return (_LEVEL_RANK[f.level], f.age is None, f.age or _ZERO)

    return max(freshnesses, key=rank, default=None)


def _prices(
    quotes: QuoteBook, followed: Collection[str] | None, now: datetime
) -> tuple[PriceAge | None, PriceAge | None, int]:
    held = quotes.all()
    newest = max(held.values(), key=lambda q: q.time_ms, default=None)
    if followed is None:  # not known yet: every symbol held was followed at some point
        followed_quotes = list(held.values())
        missing = 0
    else:
        followed_quotes = [held[s] for s in followed if s in held]
        missing = len(followed) - len(followed_quotes)
    oldest = min(followed_quotes, key=lambda q: q.time_ms, default=None)
    return (
        None if newest is None else PriceAge.of(newest, now),
        None if oldest is None else PriceAge.of(oldest, now),
        missing,
    )


def build_health(
    replica: Replica,
    *,
    state: ConnectionState,
    now: datetime | None = None,
    synced_at: Callable[[DocumentInfo], int | None] | None = None,
    next_retry_at: datetime | None = None,
    last_error: LastError | None = None,
    followed: Collection[str] | None = None,
) -> SyncHealth:
    """The health of ``replica`` as of ``now``, from memory only.

    ``synced_at(info)`` is when a document was last known in sync, in ms (a sync client answers
    "now" for those it keeps in sync); by default the replica's last confirmation. ``followed``
    are the symbols whose prices count for ``oldest_price`` (None: every symbol held).
    """
    now = now or datetime.now(tz=UTC)
    now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # ms, as the replica keeps time
    since = synced_at or (lambda info: info.last_synced_at)
    infos = [replica.info(doc_id) for doc_id in replica.document_ids()]
    oldest_ms: int | None = None
    freshnesses: list[Freshness] = []
    pending: dict[str, int] = {}
    for info in infos:
        synced = since(info)
        known = synced if synced is not None else info.created_at
        oldest_ms = known if oldest_ms is None else min(oldest_ms, known)
        if info.kind is DocumentKind.INDEX:
            continue
        if info.pending:
            pending[info.id] = info.pending
        synced_time = None if synced is None else min(_from_ms(synced), now)
        freshnesses.append(document_freshness(synced_time, now, info.pending))
    lag = _ZERO if oldest_ms is None else max(now - _from_ms(oldest_ms), _ZERO)
    newest, oldest, missing = _prices(replica.quotes, followed, now)
    return SyncHealth(
        at=now,
        state=state,
        next_retry_at=next_retry_at if state is ConnectionState.WAITING else None,
        lag=lag,
        pending=sum(pending.values()),
        pending_by_document=MappingProxyType(dict(sorted(pending.items()))),
        last_error=last_error,
        freshness=_worst(freshnesses),
        newest_price=newest,
        oldest_price=oldest,
        prices_missing=missing,
        last_refusal=next(iter(replica.refusals()), None),
    )
