"""The fan-out contract: what a :class:`~foliosync.server.fanout.FanOut` must do for the relay.

The relay publishes each stored change once and relies on the fan-out to hand it to every
subscriber of that user (and no one else), in publish order per document, with the change's
``origin`` kept so that the connection that made it can skip it; a subscription closed gets
nothing more, ``close`` leaves no task behind, ``ping`` answers. A shared bus (one that joins
relays) must also bring a change of one relay to the subscribers of every other, once each,
after calling that relay's ``on_peer_change`` hook, so its in-memory copy is current first.

Control events (a share granted or ended, tokens revoked) go to the control subscribers of the
other relays only: never back to the relay that published them, which acted already (so an
adapter for one process delivers none), and on a shared bus in the order the publishing relay
made them among its changes, every field as published.

Each check is an async function taking a :class:`FanOutHarness`; :data:`FANOUT_CHECKS` holds
those for every adapter, :data:`PEER_CHECKS` those for shared buses. Run them with pytest::

    import pytest
    from foliosync.testing.fanout_contract import FANOUT_CHECKS, PEER_CHECKS, FanOutHarness

    async def make() -> MyFanOut:  # a fresh, started instance, on a bus of its own
        ...

    async def make_peer(relay_id, on_peer_change) -> MyFanOut:  # one more relay, shared bus
        ...

    @pytest.mark.parametrize("check", FANOUT_CHECKS + PEER_CHECKS, ids=lambda c: c.__name__)
    async def test_my_fanout(check):
        await check(FanOutHarness(make, make_peer))

Every instance a check makes, it closes. A check fails with ``AssertionError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from foliosync.server.fanout import (
    Change,
    ControlEvent,
    FanOut,
    ShareGranted,
    ShareRevoked,
    TokensRevoked,
)
from foliosync.sync.errors import FolioSyncError

__all__ = [
    "FANOUT_CHECKS",
    "PEER_CHECKS",
    "FanOutCheck",
    "FanOutHarness",
    "check_close_stops_everything",
    "check_control_is_not_handed_back_to_its_own_relay",
    "check_control_reaches_other_relays_in_order_with_changes",
    "check_control_subscriber_that_raises_or_left_does_not_stop_others",
    "check_delivers_to_every_subscriber_of_the_user_only",
    "check_keeps_origin_so_the_sender_is_not_echoed",
    "check_peer_change_reaches_other_relay_once_after_hook",
    "check_peer_changes_keep_publish_order",
    "check_peer_does_not_read_back_its_own",
    "check_ping_answers",
    "check_publish_order_per_document",
    "check_raising_subscriber_does_not_stop_others",
    "check_unsubscribed_gets_nothing",
]

PeerHookArg = Callable[[Change], None]


@dataclass(frozen=True, slots=True)
class FanOutHarness:
    """How the checks get instances.

    ``make`` returns a fresh, started fan-out whose bus nobody else uses. ``make_peer`` (shared
    buses only) returns a started instance on one bus common to all its calls within a check,
    as relay ``relay_id``, calling ``on_peer_change`` with the changes of other relays.
    ``timeout`` bounds every wait for a delivery."""

    make: Callable[[], Awaitable[FanOut]]
    make_peer: Callable[[str, PeerHookArg], Awaitable[FanOut]] | None = None
    timeout: float = 5.0


FanOutCheck = Callable[[FanOutHarness], Awaitable[None]]


def _change(
    user: str, doc: str, n: int, *, origin: str = "relay-a:1", relay: str = "relay-a"
) -> Change:
    return Change(
        user=user,
        doc_id=doc,
        update=f"update {n} of {doc}".encode(),
        changed_at=1_700_000_000_000 + n,
        changed_by="device-1",
        origin=origin,
        relay=relay,
    )


async def _eventually(what: str, condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.005)


def _updates(changes: list[Change]) -> list[bytes]:
    return [c.update for c in changes]


_CONTROL_EVENTS: tuple[ControlEvent, ...] = (
    ShareRevoked("alice", "watchlist:tech", "bob"),
    ShareGranted("alice", "portfolio:main", "bob", "read"),
    TokensRevoked(1_700_000_000, user="alice", device="laptop"),
    TokensRevoked(1_700_000_001, jti="0123456789abcdef01234567"),
)


# -- every adapter ------------------------------------------------------------------------------


async def check_delivers_to_every_subscriber_of_the_user_only(h: FanOutHarness) -> None:
    fanout = await h.make()
    try:
        first: list[Change] = []
        second: list[Change] = []
        other: list[Change] = []
        fanout.subscribe("alice", first.append)
        fanout.subscribe("alice", second.append)
        fanout.subscribe("bob", other.append)
        await fanout.publish(_change("alice", "watchlist:tech", 1))
        await fanout.publish(_change("alice", "watchlist:tech", 2))  # the sentinel of "once"
        await fanout.publish(_change("bob", "watchlist:tech", 3))
        await _eventually(
            "both subscribers get both", lambda: min(len(first), len(second)) >= 2, h.timeout
        )
        await _eventually("bob gets his change", lambda: len(other) >= 1, h.timeout)
        expected = [b"update 1 of watchlist:tech", b"update 2 of watchlist:tech"]
        assert _updates(first) == expected, first
        assert _updates(second) == expected, second
        assert _updates(other) == [b"update 3 of watchlist:tech"], other
    finally:
        await fanout.close()


async def check_keeps_origin_so_the_sender_is_not_echoed(h: FanOutHarness) -> None:
    """The port does not know connections: the relay's connection skips a change whose
    ``origin`` is its own id, so every field must arrive as published."""
    fanout = await h.make()
    try:
        got: list[Change] = []
        fanout.subscribe("alice", got.append)
        sent = _change("alice", "portfolio:main", 7, origin="relay-a:42")
        await fanout.publish(sent)
        await _eventually("the change arrives", lambda: bool(got), h.timeout)
        received = got[0]
        for name in ("user", "doc_id", "update", "changed_at", "changed_by", "origin", "relay"):
            assert getattr(received, name) == getattr(sent, name), (name, received, sent)
    finally:
        await fanout.close()


async def check_publish_order_per_document(h: FanOutHarness) -> None:
    fanout = await h.make()
    try:
        got: list[Change] = []
        fanout.subscribe("alice", got.append)
        for n in range(60):
            await fanout.publish(_change("alice", f"watchlist:{n % 3}", n))
        await _eventually("all 60 arrive", lambda: len(got) >= 60, h.timeout)
        assert len(got) == 60, len(got)
        for doc in range(3):
            numbers = [c.changed_at for c in got if c.doc_id == f"watchlist:{doc}"]
            assert numbers == sorted(numbers) and len(numbers) == 20, (doc, numbers)
    finally:
        await fanout.close()


async def check_unsubscribed_gets_nothing(h: FanOutHarness) -> None:
    fanout = await h.make()
    try:
        gone: list[Change] = []
        staying: list[Change] = []
        fanout.subscribe("alice", gone.append).close()
        subscription = fanout.subscribe("alice", staying.append)
        await fanout.publish(_change("alice", "watchlist:tech", 1))
        await _eventually("the staying subscriber gets it", lambda: bool(staying), h.timeout)
        assert gone == [], gone
        subscription.close()
        subscription.close()  # closing twice is harmless
        await fanout.publish(_change("alice", "watchlist:tech", 2))
        await asyncio.sleep(0.05)
        assert _updates(staying) == [b"update 1 of watchlist:tech"], staying
    finally:
        await fanout.close()


async def check_raising_subscriber_does_not_stop_others(h: FanOutHarness) -> None:
    fanout = await h.make()
    try:

        def broken(change: Change) -> None:
            raise RuntimeError("a broken subscriber")

        got: list[Change] = []
        fanout.subscribe("alice", broken)
        fanout.subscribe("alice", got.append)
        errors = fanout.stats.errors
        await fanout.publish(_change("alice", "watchlist:tech", 1))
        await _eventually("the other subscriber gets it", lambda: bool(got), h.timeout)
        assert fanout.stats.errors == errors + 1, fanout.stats.errors
    finally:
        await fanout.close()


async def check_ping_answers(h: FanOutHarness) -> None:
    fanout = await h.make()
    try:
        await asyncio.wait_for(fanout.ping(), h.timeout)
    finally:
        await fanout.close()


async def check_close_stops_everything(h: FanOutHarness) -> None:
    before = asyncio.all_tasks()
    fanout = await h.make()
    got: list[Change] = []
    fanout.subscribe("alice", got.append)
    await fanout.close()
    with contextlib.suppress(FolioSyncError):  # refusing is as good as doing nothing
        await fanout.publish(_change("alice", "watchlist:tech", 1))
    with contextlib.suppress(FolioSyncError):
        await fanout.publish_control(_CONTROL_EVENTS[0])
    await asyncio.sleep(0.05)
    assert got == [], got
    try:
        await asyncio.wait_for(fanout.ping(), h.timeout)
    except FolioSyncError:
        pass
    else:
        raise AssertionError("ping answered after close")
    left = {t for t in asyncio.all_tasks() - before if t is not asyncio.current_task()}
    assert not {t for t in left if not t.done()}, left
    await fanout.close()  # closing twice is harmless


async def check_control_is_not_handed_back_to_its_own_relay(h: FanOutHarness) -> None:
    """The relay acts on its own connections before it publishes a control event: one handed
    back would tell them twice (two ``revoked`` notices)."""
    fanout = await h.make()
    try:
        got: list[ControlEvent] = []
        changes: list[Change] = []
        fanout.subscribe_control(got.append)
        fanout.subscribe("alice", changes.append)
        for event in _CONTROL_EVENTS:
            await fanout.publish_control(event)
        await fanout.publish(_change("alice", "watchlist:tech", 1))  # the changes still flow
        await _eventually("the change after them arrives", lambda: bool(changes), h.timeout)
        await asyncio.sleep(0.2)  # room for a wrong echo read back from a bus
        assert got == [], got
    finally:
        await fanout.close()


FANOUT_CHECKS: list[FanOutCheck] = [
    check_delivers_to_every_subscriber_of_the_user_only,
    check_keeps_origin_so_the_sender_is_not_echoed,
    check_publish_order_per_document,
    check_unsubscribed_gets_nothing,
    check_raising_subscriber_does_not_stop_others,
    check_ping_answers,
    check_close_stops_everything,
    check_control_is_not_handed_back_to_its_own_relay,
]
"""Checks every fan-out must pass."""


# -- shared buses -------------------------------------------------------------------------------


class _Peers:
    """Two relays on one bus, recording hook calls and deliveries in one timeline."""

    def __init__(self) -> None:
        self.timeline: list[tuple[str, str, bytes]] = []  # (relay, "hook" | "deliver", update)
        self.instances: list[FanOut] = []

    async def start(self, h: FanOutHarness, *relays: str) -> list[FanOut]:
        if h.make_peer is None:
            raise AssertionError("a peer check needs FanOutHarness.make_peer")
        for relay in relays:

            def hook(change: Change, relay: str = relay) -> None:
                self.timeline.append((relay, "hook", change.update))

            self.instances.append(await h.make_peer(relay, hook))
        return self.instances

    def subscribe(self, fanout: FanOut, relay: str, user: str) -> list[Change]:
        got: list[Change] = []

        def deliver(change: Change) -> None:
            self.timeline.append((relay, "deliver", change.update))
            got.append(change)

        fanout.subscribe(user, deliver)
        return got

    async def close(self) -> None:
        for fanout in self.instances:
            await fanout.close()


async def check_peer_change_reaches_other_relay_once_after_hook(h: FanOutHarness) -> None:
    peers = _Peers()
    try:
        a, b = await peers.start(h, "relay-a", "relay-b")
        on_a = peers.subscribe(a, "relay-a", "alice")
        on_b = peers.subscribe(b, "relay-b", "alice")
        bob_on_b = peers.subscribe(b, "relay-b", "bob")
        await a.publish(_change("alice", "watchlist:tech", 1))
        await a.publish(_change("alice", "watchlist:tech", 2))  # the sentinel of "once"
        await _eventually("relay-b's subscriber gets both", lambda: len(on_b) >= 2, h.timeout)
        assert _updates(on_b) == [b"update 1 of watchlist:tech", b"update 2 of watchlist:tech"]
        assert _updates(on_a) == _updates(on_b), on_a
        assert bob_on_b == [], bob_on_b
        received = on_b[0]
        assert (received.origin, received.relay) == ("relay-a:1", "relay-a"), received
        b_events = [(kind, u) for relay, kind, u in peers.timeline if relay == "relay-b"]
        assert b_events == [
            ("hook", b"update 1 of watchlist:tech"),
            ("deliver", b"update 1 of watchlist:tech"),
            ("hook", b"update 2 of watchlist:tech"),
            ("deliver", b"update 2 of watchlist:tech"),
        ], b_events
    finally:
        await peers.close()


async def check_peer_does_not_read_back_its_own(h: FanOutHarness) -> None:
    peers = _Peers()
    try:
        a, b = await peers.start(h, "relay-a", "relay-b")
        on_a = peers.subscribe(a, "relay-a", "alice")
        await b.publish(_change("alice", "watchlist:tech", 1, origin="relay-b:1", relay="relay-b"))
        await a.publish(_change("alice", "watchlist:tech", 2))  # read back by a after b's
        await _eventually("relay-a gets relay-b's change", lambda: len(on_a) >= 2, h.timeout)
        await asyncio.sleep(0.1)  # room for a wrong echo of a's own change
        assert sorted(_updates(on_a)) == [
            b"update 1 of watchlist:tech",
            b"update 2 of watchlist:tech",
        ], on_a
        hooks = [(relay, u) for relay, kind, u in peers.timeline if kind == "hook"]
        assert ("relay-a", b"update 1 of watchlist:tech") in hooks, hooks
        assert ("relay-a", b"update 2 of watchlist:tech") not in hooks, hooks
        assert ("relay-b", b"update 1 of watchlist:tech") not in hooks, hooks
    finally:
        await peers.close()


async def check_peer_changes_keep_publish_order(h: FanOutHarness) -> None:
    peers = _Peers()
    try:
        a, b = await peers.start(h, "relay-a", "relay-b")
        on_b = peers.subscribe(b, "relay-b", "alice")
        for n in range(200):
            await a.publish(_change("alice", f"watchlist:{n % 4}", n))
        await _eventually("all 200 reach relay-b", lambda: len(on_b) >= 200, h.timeout)
        await asyncio.sleep(0.05)
        assert len(on_b) == 200, len(on_b)
        for doc in range(4):
            numbers = [c.changed_at for c in on_b if c.doc_id == f"watchlist:{doc}"]
            assert numbers == sorted(numbers) and len(numbers) == 50, (doc, numbers)
    finally:
        await peers.close()


async def check_control_reaches_other_relays_in_order_with_changes(h: FanOutHarness) -> None:
    """A change stored after a share was revoked must not reach a peer before the revocation
    (the grantee there would get it), so control events keep their place among the changes."""
    peers = _Peers()
    try:
        a, b = await peers.start(h, "relay-a", "relay-b")
        on_a: list[ControlEvent] = []
        a.subscribe_control(on_a.append)
        on_b: list[object] = []
        b.subscribe("alice", lambda change: on_b.append(change.update))
        b.subscribe_control(on_b.append)
        expected: list[object] = []
        for n, event in enumerate(_CONTROL_EVENTS):
            change = _change("alice", "watchlist:tech", n)
            await a.publish(change)
            await a.publish_control(event)
            expected += [change.update, event]
        await a.publish(_change("alice", "watchlist:tech", 99))  # the sentinel of "once"
        expected.append(b"update 99 of watchlist:tech")
        await _eventually("all reach relay-b", lambda: len(on_b) >= len(expected), h.timeout)
        await asyncio.sleep(0.05)
        assert on_b == expected, on_b
        assert on_a == [], on_a
    finally:
        await peers.close()


async def check_control_subscriber_that_raises_or_left_does_not_stop_others(
    h: FanOutHarness,
) -> None:
    peers = _Peers()
    try:
        a, b = await peers.start(h, "relay-a", "relay-b")

        def broken(event: ControlEvent) -> None:
            raise RuntimeError("a broken control subscriber")

        gone: list[ControlEvent] = []
        got: list[ControlEvent] = []
        b.subscribe_control(broken)
        b.subscribe_control(gone.append).close()
        subscription = b.subscribe_control(got.append)
        errors = b.stats.errors
        await a.publish_control(_CONTROL_EVENTS[0])
        await _eventually("the working subscriber gets it", lambda: bool(got), h.timeout)
        assert got == [_CONTROL_EVENTS[0]] and gone == [], (got, gone)
        assert b.stats.errors == errors + 1, b.stats.errors
        subscription.close()
        subscription.close()  # closing twice is harmless
        await a.publish_control(_CONTROL_EVENTS[1])
        on_b: list[Change] = []
        b.subscribe("alice", on_b.append)
        await a.publish(_change("alice", "watchlist:tech", 1))  # published after: read after
        await _eventually("the change after it arrives", lambda: bool(on_b), h.timeout)
        assert got == [_CONTROL_EVENTS[0]], got
    finally:
        await peers.close()


PEER_CHECKS: list[FanOutCheck] = [
    check_peer_change_reaches_other_relay_once_after_hook,
    check_peer_does_not_read_back_its_own,
    check_peer_changes_keep_publish_order,
    check_control_reaches_other_relays_in_order_with_changes,
    check_control_subscriber_that_raises_or_left_does_not_stop_others,
]
"""Checks for a fan-out that joins relays (with ``FanOutHarness.make_peer``)."""
