"""What ``GET /readyz`` answers: whether this relay can do its work now, check by check.

``/healthz`` says the process runs; a load balancer or an orchestrator needs more before it sends
devices here: that the store answers a real query, that the fan-out can publish, and that the
price feed the relay was started with still feeds. Each check has its own time limit, so that a
store stuck on a lock makes the relay not ready instead of hanging the probe.

What "alive" means depends on the feed (``--feed``):

``none``
    always alive: prices come from publishers, whose absence is not the relay's fault.
``sim`` / ``sim:always``
    the simulator's task runs, and while it should move prices (the market is open, or always for
    ``sim:always``) it published a tick in the last :data:`FEED_STALE_AFTER_S` seconds. Outside
    market hours a running task is enough: the simulator is quiet then by design.
``csv:PATH``
    the replay's task runs, or it ended by reaching the end of its file (a replay is finite).
    Its pace is the recorded file's, so no tick recency is required; a replay that failed or was
    stopped is not alive.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from dataclasses import dataclass

from foliosync.server.fanout import FanOut
from foliosync.server.feeds import CsvReplayFeed, Feed, SimulatorFeed
from foliosync.server.prices import PriceHub
from foliosync.server.storage import RelayStore
from foliosync.sync.clock import wall_ms
from foliosync.sync.errors import FolioSyncError

__all__ = [
    "CHECK_TIMEOUT_S",
    "FEED_STALE_AFTER_S",
    "Check",
    "Readiness",
    "check_feed",
    "check_readiness",
    "short_reason",
]

CHECK_TIMEOUT_S = 2.0
"""Longest a store or fan-out check may take before it counts as failed."""

log = logging.getLogger("foliosync.relay")

FEED_STALE_AFTER_S = 30.0
"""A simulator that should move prices and published none for this long is not alive (it steps
ten times a second, so this is many missed steps, not a slow one)."""


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the answer: ``ok`` and what was seen, in words an operator can act on."""

    name: str
    ok: bool
    detail: str

    def to_json(self) -> dict[str, object]:
        return {"ok": self.ok, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Readiness:
    checks: tuple[Check, ...]

    @property
    def ready(self) -> bool:
        return all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {
            "status": "ready" if self.ready else "not_ready",
            "checks": {check.name: check.to_json() for check in self.checks},
        }
        if not self.ready:
            body["failing"] = [check.name for check in self.checks if not check.ok]
        return body


def short_reason(exc: BaseException) -> str:
    """What ``/readyz`` (unauthenticated) says of a failure: our own errors' first clause (``the
    relay store does not answer``), without what follows it (the database's message, a path);
    for anything else only its type. The whole exception goes to the log."""
    if isinstance(exc, FolioSyncError):
        head = str(exc).split(": ", 1)[0].strip()
        if head:
            return head[:80]
    return f"failed ({type(exc).__name__})"


async def _probe(name: str, ping: Awaitable[None], ok: str, timeout: float) -> Check:
    try:
        await asyncio.wait_for(ping, timeout)
    except TimeoutError:
        return Check(name, False, f"no answer within {timeout:g} s")
    except Exception as exc:  # any failure makes the relay not ready; the probe must not crash
        log.warning("readiness: the %s check failed: %r", name, exc)
        return Check(name, False, short_reason(exc))
    return Check(name, True, ok)


def check_feed(spec: str, feed: Feed | None, hub: PriceHub, now_ms: int | None = None) -> Check:
    """Whether the feed ``spec`` names is alive (see the module's documentation)."""
    kind = spec.strip().lower() or "none"
    if kind == "none":
        return Check("feed", True, "no feed configured (prices come from publishers)")
    if feed is None:
        return Check("feed", False, f"the {spec} feed is not running")
    if isinstance(feed, SimulatorFeed | CsvReplayFeed):
        failure = feed.failure
        if failure is not None:
            log.warning("readiness: the %s feed stopped: %r", spec, failure)
            return Check("feed", False, f"the {spec} feed stopped: {short_reason(failure)}")
    if isinstance(feed, CsvReplayFeed):
        return Check("feed", True, "replaying" if feed.running else "replay finished")
    if isinstance(feed, SimulatorFeed):
        now_ms = wall_ms() if now_ms is None else now_ms
        if not (feed.always or hub.market_open(now_ms)):
            return Check("feed", True, "running; the market is closed, so prices do not move")
        last = feed.last_tick_ms
        age_s = None if last is None else max(now_ms - last, 0) / 1000
        if age_s is None or age_s > FEED_STALE_AFTER_S:
            seen = "never" if age_s is None else f"{age_s:.0f} s ago"
            return Check("feed", False, f"no tick for too long (last: {seen})")
        return Check("feed", True, f"running; last tick {age_s:.1f} s ago")
    return Check("feed", True, "running")


async def check_readiness(
    store: RelayStore,
    fanout: FanOut,
    feed_spec: str,
    feed: Feed | None,
    hub: PriceHub,
    *,
    timeout: float = CHECK_TIMEOUT_S,
) -> Readiness:
    """Every check, the store's and the fan-out's at once."""
    store_check, fanout_check = await asyncio.gather(
        _probe("store", store.ping(), "answers", timeout),
        _probe("fanout", fanout.ping(), "reachable", timeout),
    )
    return Readiness((store_check, fanout_check, check_feed(feed_spec, feed, hub)))
