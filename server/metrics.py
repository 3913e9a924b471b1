"""The relay's Prometheus metrics: one registry per relay, filled at scrape time.

The names, types and labels are a contract with the alerting rules and the dashboard; they are
listed in the metrics catalog and must not change without it. The relay's hot paths (a change
fanned out to hundreds of connections, price flushes of 200k ticks/s) count in plain ints and
:class:`~foliosync.server.timings.Timings` kept where the work happens (the connection, the
document cache, the store wrapper, the fan-out, the price hub); :class:`RelayCollector` reads them
when Prometheus scrapes, so a scrape costs a walk over the relay's state and the hot paths pay for
an integer increment, never for a prometheus-client lock.

Two ways to read them: ``GET /metrics`` on the relay's port with ``Authorization: Bearer TOKEN``,
a token of the ``admin`` scope (``foliosync token NAME --scope admin``; 401 without a valid token,
403 with another scope, in the relay's JSON error shape); or ``--metrics-port PORT``
(:attr:`RelayConfig.metrics_port <foliosync.server.relay.RelayConfig.metrics_port>`), which
serves them without a token on 127.0.0.1 only, for a Prometheus on the same host.

Each relay has a registry of its own (:func:`relay_registry`), not prometheus-client's global
one: several relays in one process (tests, benchmarks) do not collide, and the standard
``process_*``/``python_*`` collectors are registered on it too.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from foliosync import __version__
from foliosync.server.timings import Timings
from foliosync.sync.prices import LatestPrices
from foliosync.sync.protocol import FRAME_NAMES

if TYPE_CHECKING:
    from foliosync.server.relay import Relay

__all__ = [
    "CLOSE_CODES",
    "CONTENT_TYPE",
    "CUT_REASONS",
    "REFUSAL_REASONS",
    "UPDATE_REFUSALS",
    "FrameCounts",
    "RelayCollector",
    "RelayCounters",
    "frame_type_name",
    "relay_registry",
    "render",
]

CONTENT_TYPE = CONTENT_TYPE_LATEST

REFUSAL_REASONS = ("auth_failed", "hello_timeout", "bad_hello", "scope", "too_many_connections")
"""Why a connection was refused at admission (the ``reason`` label of
``foliosync_connections_refused_total``), every one exported from the start at 0."""

UPDATE_REFUSALS = (
    "bad_update",
    "forbidden",
    "not_found",
    "not_synced",
    "bad_seq",
    "too_large",
    "auth_failed",
    "internal",
    "update_v2",
    "missing_dependencies",
    "invalid_document",
    "refused",
    "extension_failed",
    "too_many_documents",
)
"""The error codes an Update is refused with, exported from the start at 0 (so that a rate of
refusals is defined before the first one); a code not listed appears once sent."""

CUT_REASONS = ("rate_limited", "too_many_refusals", "idle_timeout")
"""Why the relay ended an admitted connection for its behaviour (the ``reason`` label of
``foliosync_connections_cut_total``): over the message rate past its grace, too many of its
frames refused within the refusal window, or silent for the idle timeout. Exported from the
start at 0."""

CLOSE_CODES = ("1000", "1001", "1006", "1008", "1009", "1011", "1013", "none")
"""The close codes exported from the start at 0; others (a peer's own) appear once seen."""

_FRAME_NAMES = FRAME_NAMES  # the protocol's own table: a new frame is counted by its name


def frame_type_name(code: int) -> str:
    """The ``type`` label of a frame type code; ``unknown`` for a code no frame has."""
    return _FRAME_NAMES.get(code, "unknown")


class FrameCounts:
    """Frames and their payload bytes by type code, counted where they are read or written.

    A frame is a msgpack array whose first item is its type code, a positive fixint: the code is
    the frame's second byte, so counting costs an index into a list, with no decoding.
    ``code_of`` returns 0 (no frame has it) for bytes that are not shaped like a frame.
    """

    __slots__ = ("bytes", "frames")

    def __init__(self) -> None:
        self.frames = [0] * 256
        self.bytes = [0] * 256

    @staticmethod
    def code_of(data: bytes) -> int:
        return data[1] if len(data) > 1 and 0x90 <= data[0] <= 0x9F and data[1] < 0x80 else 0

    def count(self, data: bytes) -> None:
        code = self.code_of(data)
        self.frames[code] += 1
        self.bytes[code] += len(data)

    def by_type(self) -> Iterator[tuple[str, int, int]]:
        """``(type name, frames, bytes)`` of every type seen; the known ones always."""
        for code in range(256):
            frames = self.frames[code]
            if frames or code in _FRAME_NAMES:
                yield frame_type_name(code), frames, self.bytes[code]


class RelayCounters:
    """What the relay's connections count as they go; read by :class:`RelayCollector`."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self.connections_opened = 0
        self.connections_closed: Counter[str] = Counter(dict.fromkeys(CLOSE_CODES, 0))
        self.heartbeats_missed = 0
        self.connections_refused: Counter[str] = Counter({r: 0 for r in REFUSAL_REASONS})
        self.connections_cut: Counter[str] = Counter(dict.fromkeys(CUT_REASONS, 0))
        self.received = FrameCounts()
        self.sent = FrameCounts()
        self.update_store = Timings()
        self.update_fanout = Timings()
        self.updates_acknowledged = 0
        self.updates_refused: Counter[str] = Counter(dict.fromkeys(UPDATE_REFUSALS, 0))
        self.updates_merged_concurrent = 0
        self.prices_dropped_closed = 0
        """Prices dropped by connections since closed (live ones are summed at scrape)."""


def _histogram(name: str, documentation: str, timings: Timings) -> HistogramMetricFamily:
    return HistogramMetricFamily(
        name, documentation, buckets=timings.cumulative(), sum_value=timings.total
    )


def _labelled_histogram(
    name: str, documentation: str, label: str, timings: Iterable[tuple[str, Timings]]
) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, t in timings:
        family.add_metric([value], t.cumulative(), t.total)
    return family


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _labelled_counter(
    name: str, documentation: str, label: str, values: Iterable[tuple[str, float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in sorted(values):
        family.add_metric([value], count)
    return family


class RelayCollector(Collector):
    """Every ``foliosync_*`` metric of one relay, computed from its state when scraped."""

    def __init__(self, relay: Relay) -> None:
        self._relay = relay

    def collect(self) -> Iterable[Metric]:
        relay = self._relay
        counters = relay.counters
        yield from self._relay_info(relay)
        yield from self._connections(relay)
        yield from self._frames(counters)
        yield from self._updates(counters)
        yield from self._prices(relay)
        documents = relay.documents
        yield _counter(
            "foliosync_document_cache_hits",
            "Documents found in the relay's memory",
            documents.hits,
        )
        yield _counter(
            "foliosync_document_cache_misses",
            "Documents loaded from the store",
            documents.misses,
        )
        yield _counter(
            "foliosync_document_cache_evictions",
            "Documents dropped from memory past max_hot_documents",
            documents.evictions,
        )
        yield _gauge("foliosync_documents_hot", "Documents in memory", documents.hot_count)
        store = relay.store.stats
        yield _labelled_histogram(
            "foliosync_store_seconds",
            "Time of the relay store's operations",
            "operation",
            store.timings.items(),
        )
        yield _labelled_counter(
            "foliosync_store_errors",
            "Store operations that failed",
            "operation",
            store.errors.items(),
        )
        fanout = relay.fanout.stats
        yield _histogram(
            "foliosync_fanout_lag_seconds",
            "A change published -> delivered to the fan-out's subscribers",
            fanout.lag,
        )
        yield _counter(
            "foliosync_fanout_errors",
            "Changes that could not be handed to a subscriber or peer",
            fanout.errors,
        )
        yield _gauge(
            "foliosync_initial_syncs_waiting",
            "SyncRequests waiting for an initial-sync slot",
            relay.initial_sync_slots.waiting,
        )
        yield _gauge(
            "foliosync_initial_syncs_active",
            "SyncRequests holding an initial-sync slot",
            relay.initial_sync_slots.active,
        )

    def _relay_info(self, relay: Relay) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "foliosync_relay_info", "The relay's version and id", labels=["version", "relay_id"]
        )
        info.add_metric([__version__, relay.config.relay_id], 1)
        yield info
        yield _gauge(
            "foliosync_relay_start_time_seconds",
            "When the relay started (unix time)",
            relay.counters.started_at,
        )
        yield _gauge(
            "foliosync_market_open",
            "1 while the relay's NYSE calendar says the market is open",
            1 if relay.prices.market_open() else 0,
        )

    def _connections(self, relay: Relay) -> Iterator[Metric]:
        counters = relay.counters
        yield _gauge(
            "foliosync_connections",
            "Open WebSocket connections (authenticated or not)",
            len(relay.connections),
        )
        yield _counter(
            "foliosync_connections_opened",
            "WebSocket upgrades accepted",
            counters.connections_opened,
        )
        yield _labelled_counter(
            "foliosync_connections_closed",
            "Closed WebSocket connections by close code",
            "code",
            counters.connections_closed.items(),
        )
        yield _counter(
            "foliosync_heartbeats_missed",
            "Connections closed because the peer stopped answering pings",
            counters.heartbeats_missed,
        )
        yield _labelled_counter(
            "foliosync_connections_refused",
            "Connections refused at admission",
            "reason",
            counters.connections_refused.items(),
        )
        yield _labelled_counter(
            "foliosync_connections_cut",
            "Admitted connections the relay ended for their behaviour",
            "reason",
            counters.connections_cut.items(),
        )

    def _frames(self, counters: RelayCounters) -> Iterator[Metric]:
        for direction, counts in (("received", counters.received), ("sent", counters.sent)):
            rows = list(counts.by_type())
            yield _labelled_counter(
                f"foliosync_frames_{direction}",
                f"Frames {direction} by type",
                "type",
                ((name, frames) for name, frames, _ in rows),
            )
            yield _labelled_counter(
                f"foliosync_{direction}_bytes",
                f"Payload bytes of the frames {direction}, by type",
                "type",
                ((name, size) for name, _, size in rows),
            )

    def _updates(self, counters: RelayCounters) -> Iterator[Metric]:
        yield _histogram(
            "foliosync_update_store_seconds",
            "An Update received -> stored (its Ack sent)",
            counters.update_store,
        )
        yield _histogram(
            "foliosync_update_fanout_seconds",
            "An Update received -> handed to every other subscribed connection",
            counters.update_fanout,
        )
        yield _counter(
            "foliosync_updates_acknowledged",
            "Updates stored and acknowledged",
            counters.updates_acknowledged,
        )
        yield _labelled_counter(
            "foliosync_updates_refused",
            "Updates refused, by the error code sent",
            "reason",
            counters.updates_refused.items(),
        )
        yield _counter(
            "foliosync_updates_merged_concurrent",
            "Updates that arrived while another connection's change of their document was being"
            " stored (a lower bound of concurrent edits)",
            counters.updates_merged_concurrent,
        )

    def _prices(self, relay: Relay) -> Iterator[Metric]:
        hub = relay.prices
        now_ms = hub.now_ms()
        followed = hub.subscribed_symbols()
        ages = [
            (now_ms - point.time_ms) / 1000
            for symbol in followed
            if (point := hub.book.latest(symbol)) is not None
        ]
        yield _counter(
            "foliosync_ticks_received", "Ticks accepted into the price book", hub.ticks_in
        )
        yield _counter("foliosync_ticks_rejected", "Ticks refused", hub.ticks_rejected)
        yield _counter(
            "foliosync_ticks_stale",
            "Valid ticks older than the book's price of their symbol, which they did not change",
            hub.ticks_stale,
        )
        yield _histogram(
            "foliosync_price_delivery_seconds",
            "How late each price flush finished against its planned time",
            hub.delivery,
        )
        yield _histogram(
            "foliosync_price_queued_seconds",
            "How long released prices waited for a busy subscriber's socket after the flush",
            hub.queued,
        )
        yield _gauge(
            "foliosync_followed_price_age_max_seconds",
            "Age of the oldest newest-price among followed symbols",
            max(0.0, max(ages, default=0.0)),
        )
        yield _gauge(
            "foliosync_followed_symbols",
            "Symbols followed by at least one connection",
            len(followed),
        )
        yield _gauge(
            "foliosync_followed_symbols_stale",
            "Followed symbols without a new price for the stall limit while the market is open",
            len(hub.stalled(now_ms)),
        )
        yield _counter(
            "foliosync_prices_conflated",
            "Ticks replaced by a newer one before their push window released them",
            hub.conflated,
        )
        # Every live subscriber's replaced prices, event streams' too (theirs used to count only
        # once the stream ended), plus those of subscribers gone.
        dropped = relay.counters.prices_dropped_closed + sum(
            prices.replaced
            for prices in (getattr(s, "prices", None) for s in hub.subscribers())
            if isinstance(prices, LatestPrices)
        )
        yield _counter(
            "foliosync_prices_dropped",
            "Released prices replaced while waiting for a slow reader",
            dropped,
        )
        yield _gauge(
            "foliosync_price_subscribers", "Connections following prices", hub.subscriber_count
        )


def relay_registry(relay: Relay) -> CollectorRegistry:
    """A registry of this relay's own: its metrics and the standard process and Python ones."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(RelayCollector(relay))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)
