"""End to end: a real relay on 127.0.0.1, real WebSocket clients, real SQLite replicas."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc, Map

from foliosync.client.replica import Replica
from foliosync.client.sync import SyncClient
from foliosync.server.auth import issue_token
from foliosync.server.storage import MemoryRelayStore, RelayStoreError
from foliosync.sync.errors import AuthError
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.protocol import (
    Ack,
    Error,
    ErrorCode,
    Frame,
    Hello,
    Ping,
    Pong,
    SyncReply,
    SyncRequest,
    Update,
    Welcome,
    decode_frame,
    encode_frame,
)

OpenReplica = Callable[[str], Awaitable[Replica]]
TECH = document_id(DocumentKind.WATCHLIST, "Tech")
MAIN = document_id(DocumentKind.PORTFOLIO, "Main")


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def content(replica: Replica) -> dict[tuple[str, str], Any]:
    """Everything a user sees in a replica, keyed by (kind, name)."""
    seen: dict[tuple[str, str], Any] = {}
    for info in replica.documents():
        if info.kind is DocumentKind.WATCHLIST:
            wl = await replica.watchlist(info.id)
            seen[("watchlist", info.name)] = [(e.symbol, e.note, e.position) for e in wl.entries()]
        else:
            pf = await replica.portfolio(info.id)
            positions = {s: p.to_json() for s, p in pf.positions().items()}
            seen[("portfolio", info.name)] = ([t.to_json() for t in pf.trades()], positions)
    return seen


async def pending_total(replica: Replica) -> int:
    return len(await replica.pending_updates())


# -- syncing through the relay -------------------------------------------------------------------


async def test_offline_edits_on_two_devices_merge_and_reach_a_new_device(
    relay: Any, open_replica: OpenReplica
) -> None:
    one, two = await open_replica("one"), await open_replica("two")

    # offline, on both devices, the same watchlist and portfolio created independently
    wl1 = await one.create_watchlist("Tech")
    await wl1.add(["AAPL", "MSFT"], note="core")
    await wl1.remove(["MSFT"])
    pf1 = await one.create_portfolio("Main")
    await pf1.add_trade("AAPL", 10, "150.25")
    await pf1.add_trade("AAPL", -4, "160")

    wl2 = await two.create_watchlist("tech")
    await wl2.add(["GOOG", "TSLA"])
    pf2 = await two.create_portfolio("main")
    await pf2.add_trade("GOOG", 5, "100")
    assert wl1.id == wl2.id == TECH and pf1.id == pf2.id == MAIN

    c1 = SyncClient(one, relay.url, relay.token("alice", "d1"))
    c2 = SyncClient(two, relay.url, relay.token("alice", "d2"))
    await c1.sync_once(timeout=10)
    await c2.sync_once(timeout=10)
    await c1.sync_once(timeout=10)

    seen_one, seen_two = await content(one), await content(two)
    assert seen_one == seen_two
    wl = await one.watchlist(TECH)
    assert wl.symbols == ["AAPL", "GOOG", "TSLA"]
    assert wl.entries()[0].note == "core"
    pf = await two.portfolio(MAIN)
    assert sorted((t.symbol, str(t.quantity)) for t in pf.trades()) == [
        ("AAPL", "-4"),
        ("AAPL", "10"),
        ("GOOG", "5"),
    ]
    positions = pf.positions()
    assert positions["AAPL"].quantity == 6
    assert positions["GOOG"].quantity == 5
    assert await pending_total(one) == 0 and await pending_total(two) == 0
    assert {(d.kind, d.pending) for d in one.documents()} == {
        (DocumentKind.WATCHLIST, 0),
        (DocumentKind.PORTFOLIO, 0),
    }

    # a third device with an empty replica gets everything
    three = await open_replica("three")
    assert three.documents() == []
    await SyncClient(three, relay.url, relay.token("alice", "d3")).sync_once(timeout=10)
    assert [(d.kind, d.id) for d in three.documents()] == [
        (DocumentKind.PORTFOLIO, MAIN),
        (DocumentKind.WATCHLIST, TECH),
    ]
    assert await content(three) == seen_one
    assert await pending_total(three) == 0


async def test_live_edits_reach_the_other_device(
    relay: Any, open_replica: OpenReplica, sync_clients: Callable[..., SyncClient], helpers: Any
) -> None:
    eventually = helpers.eventually
    a, b = await open_replica("a"), await open_replica("b")
    client_a = sync_clients(a, relay.url, relay.token("alice", "d1"))
    client_b = sync_clients(b, relay.url, relay.token("alice", "d2"))
    client_a.start()
    client_b.start()
    await client_a.wait_in_sync(timeout=10)
    await client_b.wait_in_sync(timeout=10)
    assert client_a.connected and client_b.connected

    wl = await a.create_watchlist("Tech")
    await wl.add(["AAPL"])
    pf = await a.create_portfolio("Main")
    trade = await pf.add_trade("NVDA", 3, "450")

    async def arrived() -> bool:
        if TECH not in b.document_ids() or MAIN not in b.document_ids():
            return False
        wl_b, pf_b = await b.watchlist(TECH), await b.portfolio(MAIN)
        return wl_b.symbols == ["AAPL"] and [t.id for t in pf_b.trades()] == [trade.id]

    await eventually(arrived, timeout=10)
    status = client_b.status(TECH)
    assert status.remote_changed_by == "d1"
    assert status.remote_changed_at is not None
    assert status.pending == 0 and status.connected

    # B's edit comes back to A; acknowledged edits leave nothing pending on either side
    wl_b = await b.watchlist(TECH)
    await wl_b.add(["MSFT"])

    async def back_on_a() -> bool:
        return (await a.watchlist(TECH)).symbols == ["AAPL", "MSFT"]

    await eventually(back_on_a, timeout=10)
    await eventually(lambda: a.info(TECH).pending == 0 and b.info(TECH).pending == 0)
    assert await pending_total(a) == 0 and await pending_total(b) == 0
    assert client_a.status(TECH).remote_changed_by == "d2"
    await client_a.wait_in_sync(timeout=10)
    assert client_a.status(TECH).last_synced_at is not None


async def test_remote_changes_are_observable_as_change_events(
    relay: Any, open_replica: OpenReplica, sync_clients: Callable[..., SyncClient]
) -> None:
    a, b = await open_replica("a"), await open_replica("b")
    wl = await a.create_watchlist("Tech")
    await SyncClient(a, relay.url, relay.token("alice", "d1")).sync_once(timeout=10)
    await SyncClient(b, relay.url, relay.token("alice", "d2")).sync_once(timeout=10)
    client_a = sync_clients(a, relay.url, relay.token("alice", "d1"))
    client_b = sync_clients(b, relay.url, relay.token("alice", "d2"))
    client_a.start()
    client_b.start()
    await client_a.wait_in_sync(timeout=10)
    await client_b.wait_in_sync(timeout=10)

    changes = b.changes()
    # the iterator subscribes when first awaited: start waiting before the edit is made
    waiting = asyncio.get_running_loop().create_task(_next_change(changes, TECH))
    for _ in range(5):
        await asyncio.sleep(0)
    await wl.add(["AMZN"])
    change = await asyncio.wait_for(waiting, timeout=10)
    assert change.origin == "remote"
    assert (await b.watchlist(TECH)).symbols == ["AMZN"]
    await changes.aclose()


async def _next_change(changes: AsyncIterator[Any], doc_id: str) -> Any:
    async for change in changes:
        if change.doc_id == doc_id:
            return change
    raise AssertionError("the replica closed")


async def test_freshness_of_a_document_is_recorded_per_device(
    relay: Any, open_replica: OpenReplica
) -> None:
    one, two = await open_replica("one"), await open_replica("two")
    before = _now_ms()
    wl = await one.create_watchlist("Tech")
    await wl.add(["AAPL"])
    await SyncClient(one, relay.url, relay.token("alice", "d1")).sync_once(timeout=10)
    after = _now_ms()

    client_two = SyncClient(two, relay.url, relay.token("alice", "d2"))
    await client_two.sync_once(timeout=10)
    info = two.info(TECH)
    assert info.remote_changed_by == "d1"
    assert info.remote_changed_at is not None
    assert before <= info.remote_changed_at <= after
    assert info.last_synced_at is not None and info.last_synced_at >= after
    status = client_two.status(TECH)
    assert (status.remote_changed_by, status.pending, status.connected) == ("d1", 0, False)

    # now d2 changes it; d1 learns who and when on its next sync
    await (await two.watchlist(TECH)).add(["MSFT"])
    before_two = _now_ms()
    await client_two.sync_once(timeout=10)
    await SyncClient(one, relay.url, relay.token("alice", "d1")).sync_once(timeout=10)
    info = one.info(TECH)
    assert info.remote_changed_by == "d2"
    assert info.remote_changed_at is not None and info.remote_changed_at >= before_two
    assert info.remote_changed_at <= _now_ms()


# -- authentication and isolation ----------------------------------------------------------------


async def test_a_refused_token_raises_auth_error_and_leaves_local_data(
    relay: Any, open_replica: OpenReplica
) -> None:
    replica = await open_replica("one")
    wl = await replica.create_watchlist("Tech")
    await wl.add(["AAPL"])
    before = await content(replica)
    pending_before = await replica.pending_updates()

    forged = issue_token(b"not the relay's secret" * 3, "alice", device="d1")
    expired = relay.token("alice", "d1", ttl_seconds=60, now=time.time() - 3600)
    publisher = relay.token("alice", "d1", scopes=frozenset({"publish"}))
    for token in (forged, expired, publisher, "garbage"):
        with pytest.raises(AuthError):
            await SyncClient(replica, relay.url, token).sync_once(timeout=10)

    assert await content(replica) == before
    assert await replica.pending_updates() == pending_before
    assert "token" not in replica.meta and "server_url" not in replica.meta
    assert replica.info(TECH).last_synced_at is None
    assert await relay.relay.store.documents("alice") == []


async def test_a_user_cannot_see_another_users_documents(
    relay: Any, open_replica: OpenReplica
) -> None:
    alice = await open_replica("alice")
    await (await alice.create_watchlist("Tech")).add(["AAPL"])
    await (await alice.create_portfolio("Main")).add_trade("AAPL", 1, "100")
    await SyncClient(alice, relay.url, relay.token("alice", "d1")).sync_once(timeout=10)

    bob = await open_replica("bob")
    await SyncClient(bob, relay.url, relay.token("bob", "b1")).sync_once(timeout=10)
    assert bob.documents() == []
    assert (await bob.index()).entries() == []

    # bob's own "Tech" has the same id as alice's, and is another document
    await (await bob.create_watchlist("Tech")).add(["IBM"])
    await SyncClient(bob, relay.url, relay.token("bob", "b1")).sync_once(timeout=10)
    await SyncClient(alice, relay.url, relay.token("alice", "d1")).sync_once(timeout=10)
    assert (await bob.watchlist(TECH)).symbols == ["IBM"]
    assert (await alice.watchlist(TECH)).symbols == ["AAPL"]
    assert [d.id for d in bob.documents()] == [TECH]


# -- a client speaking the protocol by hand ------------------------------------------------------


class RawClient:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, frame: Frame) -> None:
        await self.ws.send_bytes(encode_frame(frame))

    async def receive(self) -> Frame:
        message = await self.ws.receive(timeout=5)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        return decode_frame(message.data, max_frame_size=1 << 30)

    async def hello(self, token: str) -> Welcome:
        await self.send(Hello(1, token, "raw"))
        welcome = await self.receive()
        assert isinstance(welcome, Welcome), welcome
        return welcome

    async def expect_error(self, code: str) -> Error:
        frame = await self.receive()
        assert isinstance(frame, Error), frame
        assert frame.code == code, frame
        return frame

    async def expect_closed(self) -> None:
        message = await self.ws.receive(timeout=5)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), message

    async def expect_open(self, nonce: int = 7) -> None:
        await self.send(Ping(nonce))
        assert await self.receive() == Pong(nonce)

    async def sync(self, doc: str, state_vector: bytes | None = None) -> SyncReply:
        await self.send(SyncRequest(doc, state_vector or Doc().get_state()))
        reply = await self.receive()
        assert isinstance(reply, SyncReply), reply
        return reply


@pytest.fixture
async def raw(relay: Any) -> AsyncIterator[Callable[[], Awaitable[RawClient]]]:
    async with aiohttp.ClientSession() as http:

        async def connect() -> RawClient:
            return RawClient(await http.ws_connect(relay.url))

        yield connect


def crdt_update(symbol: str) -> bytes:
    """A watchlist update adding ``symbol`` as a device does (the relay checks the layout)."""
    doc: Doc = Doc()
    doc.get("symbols", type=Map)[f"{symbol}\x1fraw"] = {"t": "0" * 17}
    return doc.get_update()


async def test_raw_frames_for_another_users_document_are_forbidden(relay: Any, raw: Any) -> None:
    bob = await raw()
    await bob.hello(relay.token("bob", "b1"))
    await bob.send(SyncRequest(f"alice/{TECH}", Doc().get_state()))
    await bob.expect_error(ErrorCode.FORBIDDEN)
    await bob.send(Update(f"alice/{TECH}", 1, crdt_update("EVIL")))
    error = await bob.expect_error(ErrorCode.FORBIDDEN)
    assert (error.doc, error.seq, error.fatal) == (f"alice/{TECH}", 1, False)
    await bob.expect_open()
    assert await relay.relay.store.documents("alice") == []


async def test_raw_frames_for_unknown_documents_are_not_found(relay: Any, raw: Any) -> None:
    client = await raw()
    await client.hello(relay.token("alice", "d1"))
    # Ids only as document_id() makes them: no sign, prefix, blank or upper case in the hex
    # (each would otherwise be a second document of the same name).
    odd = ("+" + "0" * 23, "0x" + "0" * 22, " " + "0" * 22 + " ", TECH[3:].upper())
    for doc in (
        "nonsense",
        "wl-short",
        "wl-" + "z" * 24,
        f"alice/{TECH}",
        *("pf-" + x for x in odd),
    ):
        await client.send(SyncRequest(doc, Doc().get_state()))
        error = await client.expect_error(ErrorCode.NOT_FOUND)
        assert error.doc == doc and not error.fatal
    await client.send(SyncRequest("pf-nothex", Doc().get_state()))
    assert (await client.expect_error(ErrorCode.NOT_FOUND)).seq is None
    await client.send(Update("pf-nothex", 3, crdt_update("X")))
    assert (await client.expect_error(ErrorCode.NOT_FOUND)).seq == 3
    await client.expect_open()


async def test_garbage_crdt_bytes_are_refused_and_the_document_is_unchanged(
    relay: Any, raw: Any, open_replica: OpenReplica
) -> None:
    replica = await open_replica("one")
    await (await replica.create_watchlist("Tech")).add(["AAPL"])
    await SyncClient(replica, relay.url, relay.token("alice", "d1")).sync_once(timeout=10)

    client = await raw()
    await client.hello(relay.token("alice", "d1"))
    before = await client.sync(TECH)
    truncated = crdt_update("EVIL")[:-3]
    garbage = [b"\xff\xfe garbage", truncated, b"\x05\x01\x02", b""]
    for seq, update in enumerate(garbage, 1):
        await client.send(Update(TECH, seq, update))
        error = await client.expect_error(ErrorCode.BAD_UPDATE)
        assert (error.doc, error.seq, error.fatal) == (TECH, seq, False)
    await client.expect_open()
    after = await client.sync(TECH)
    assert (after.update, after.state_vector) == (before.update, before.state_vector)
    stored = await relay.relay.store.load("alice", TECH)
    assert stored is not None and b"garbage" not in b"".join(stored.updates)

    fresh = await open_replica("fresh")
    await SyncClient(fresh, relay.url, relay.token("alice", "d2")).sync_once(timeout=10)
    assert (await fresh.watchlist(TECH)).symbols == ["AAPL"]


async def test_a_valid_update_by_hand_is_stored_acked_and_fanned_out(relay: Any, raw: Any) -> None:
    writer, reader = await raw(), await raw()
    await writer.hello(relay.token("alice", "w"))
    await reader.hello(relay.token("alice", "r"))
    await writer.sync(TECH)
    await reader.sync(TECH)
    update = crdt_update("AAPL")
    await writer.send(Update(TECH, 5, update))
    assert await writer.receive() == Ack(TECH, 5)
    fanned = await reader.receive()
    assert isinstance(fanned, Update)
    assert (fanned.doc, fanned.seq, fanned.update, fanned.changed_by) == (TECH, 0, update, "w")
    # the same update again changes nothing, and is still acknowledged
    await writer.send(Update(TECH, 6, update))
    assert await writer.receive() == Ack(TECH, 6)
    await reader.expect_open()  # nothing else arrived before the pong
    stored = await relay.relay.store.load("alice", TECH)
    assert stored is not None and stored.updates == [update]


# -- sequence rules and subscriptions (PROTOCOL.md) ----------------------------------------------


async def test_an_update_before_its_sync_request_ends_the_connection_unstored(
    relay: Any, raw: Any, open_replica: OpenReplica
) -> None:
    client = await raw()
    await client.hello(relay.token("alice", "d1"))
    await client.sync(MAIN)  # another document's SyncRequest does not count
    await client.send(Update(TECH, 1, crdt_update("EARLY")))
    error = await client.expect_error(ErrorCode.NOT_SYNCED)
    assert error.fatal and TECH in error.message
    await client.expect_closed()
    assert await relay.relay.store.load("alice", TECH) is None
    await _relay_is_unharmed(relay, open_replica)


@pytest.mark.parametrize("seqs", [(5, 5), (5, 3)], ids=["repeated", "lower"])
async def test_a_seq_that_does_not_increase_ends_the_connection_unstored(
    relay: Any, raw: Any, seqs: tuple[int, int]
) -> None:
    client = await raw()
    await client.hello(relay.token("alice", "d1"))
    await client.sync(TECH)
    first = crdt_update("AAPL")
    await client.send(Update(TECH, seqs[0], first))
    assert await client.receive() == Ack(TECH, seqs[0])
    await client.send(Update(TECH, seqs[1], crdt_update("LATE")))
    error = await client.expect_error(ErrorCode.BAD_SEQ)
    assert error.fatal
    assert error.message == (
        f"Update seq {seqs[1]} of {TECH!r} after seq {seqs[0]}: seqs must increase"
    )
    await client.expect_closed()
    stored = await relay.relay.store.load("alice", TECH)
    assert stored is not None and stored.updates == [first]
    # A new connection starts afresh: seq 1 is fine again.
    again = await raw()
    await again.hello(relay.token("alice", "d1"))
    await again.sync(TECH)
    await again.send(Update(TECH, 1, crdt_update("MSFT")))
    assert await again.receive() == Ack(TECH, 1)


async def test_live_updates_reach_only_connections_that_synced_the_document(
    relay: Any, raw: Any
) -> None:
    writer, follower, bystander = await raw(), await raw(), await raw()
    for name, client in (("w", writer), ("f", follower), ("b", bystander)):
        await client.hello(relay.token("alice", name))
    await writer.sync(TECH)
    await follower.sync(TECH)
    await bystander.sync(MAIN)  # the same user, another document
    update = crdt_update("AAPL")
    await writer.send(Update(TECH, 1, update))
    assert await writer.receive() == Ack(TECH, 1)
    fanned = await follower.receive()
    assert isinstance(fanned, Update) and (fanned.doc, fanned.update) == (TECH, update)
    await writer.expect_open()  # its own update is not echoed: the Pong comes next
    await bystander.expect_open()  # it never synced TECH: nothing of it arrives
    # A SyncRequest subscribes: from then on the bystander gets TECH's changes too.
    reply = await bystander.sync(TECH)
    assert reply.changed_by == "w"
    second = crdt_update("MSFT")
    await writer.send(Update(TECH, 2, second))
    assert await writer.receive() == Ack(TECH, 2)
    for client in (follower, bystander):
        fanned = await client.receive()
        assert isinstance(fanned, Update) and (fanned.doc, fanned.update) == (TECH, second)


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("malformed", ErrorCode.BAD_FRAME),
        ("unknown-type", ErrorCode.BAD_FRAME),
        ("text", ErrorCode.BAD_FRAME),
        ("too-large", ErrorCode.TOO_LARGE),
        ("before-hello", ErrorCode.NOT_AUTHENTICATED),
        ("protocol-7", ErrorCode.UNSUPPORTED_VERSION),
        ("bad-token", ErrorCode.AUTH_FAILED),
        ("second-hello", ErrorCode.UNEXPECTED_FRAME),
        ("relay-frame", ErrorCode.UNEXPECTED_FRAME),
    ],
)
async def test_fatal_protocol_errors_get_an_error_then_a_close(
    relay: Any, raw: Any, open_replica: OpenReplica, case: str, code: str
) -> None:
    client = await raw()
    token = relay.token("alice", "d1")
    if case not in ("before-hello", "protocol-7", "bad-token"):
        await client.hello(token)
    if case == "malformed":
        await client.ws.send_bytes(b"\xc1\xc1 not msgpack")
    elif case == "unknown-type":
        await client.ws.send_bytes(b"\x92\x63\x01")  # [99, 1]
    elif case == "text":
        await client.ws.send_str("hello?")
    elif case == "too-large":
        await client.send(Update(TECH, 1, b"\x00" * (relay.config.max_frame_size + 1)))
    elif case == "before-hello":
        await client.send(SyncRequest(TECH, Doc().get_state()))
    elif case == "protocol-7":
        await client.send(Hello(7, token, "from the future"))
    elif case == "bad-token":
        await client.send(Hello(1, token + "x", "raw"))
    elif case == "second-hello":
        await client.send(Hello(1, token, "again"))
    elif case == "relay-frame":
        await client.send(Ack(TECH, 1))
    error = await client.expect_error(code)
    assert error.fatal
    await client.expect_closed()
    await _relay_is_unharmed(relay, open_replica)


async def test_a_message_far_over_the_limit_is_cut_off(
    relay: Any, raw: Any, open_replica: OpenReplica
) -> None:
    client = await raw()
    await client.hello(relay.token("alice", "d1"))
    await client.ws.send_bytes(b"\x00" * (4 * relay.config.max_frame_size))
    message = await client.ws.receive(timeout=5)
    if message.type == aiohttp.WSMsgType.BINARY:  # an Error first is fine too
        assert decode_frame(message.data).code == ErrorCode.TOO_LARGE  # type: ignore[union-attr]
        message = await client.ws.receive(timeout=5)
    assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    await _relay_is_unharmed(relay, open_replica)


async def test_the_relay_survives_every_kind_of_abuse_at_once(
    relay: Any, raw: Any, open_replica: OpenReplica
) -> None:
    token = relay.token("bob", "b1")
    open_session = await raw()  # one connection that stays through it all
    await open_session.hello(token)
    abusers = [await raw() for _ in range(6)]
    for abuser in abusers[:4]:
        await abuser.hello(token)
    await abusers[0].send(SyncRequest(f"alice/{TECH}", Doc().get_state()))
    await abusers[3].sync(TECH)
    await abusers[1].ws.send_bytes(b"\xc1")
    await abusers[2].ws.send_bytes(b"\x00" * (relay.config.max_frame_size + 10))
    await abusers[3].send(Update(TECH, 1, b"\xff garbage"))
    await abusers[4].send(SyncRequest(TECH, b"\x00"))
    await abusers[5].send(Hello(7, token))
    await abusers[0].expect_error(ErrorCode.FORBIDDEN)
    await abusers[1].expect_error(ErrorCode.BAD_FRAME)
    await abusers[2].expect_error(ErrorCode.TOO_LARGE)
    await abusers[3].expect_error(ErrorCode.BAD_UPDATE)
    await abusers[4].expect_error(ErrorCode.NOT_AUTHENTICATED)
    await abusers[5].expect_error(ErrorCode.UNSUPPORTED_VERSION)
    for abuser in abusers[1:3] + abusers[4:]:
        await abuser.expect_closed()
    await abusers[0].expect_open()
    await abusers[3].expect_open()
    await open_session.expect_open()
    await _relay_is_unharmed(relay, open_replica)


async def _relay_is_unharmed(relay: Any, open_replica: OpenReplica) -> None:
    """A normal device still syncs both ways, and /healthz answers."""
    name = f"check-{time.monotonic_ns()}"
    one, two = await open_replica(name + "-1"), await open_replica(name + "-2")
    await (await one.create_watchlist("Health")).add(["SPY"])
    await SyncClient(one, relay.url, relay.token("carol", "c1")).sync_once(timeout=10)
    await SyncClient(two, relay.url, relay.token("carol", "c2")).sync_once(timeout=10)
    assert (await two.watchlist("Health")).symbols == ["SPY"]
    assert await pending_total(one) == 0
    async with aiohttp.ClientSession() as http, http.get(f"{relay.http}/healthz") as response:
        assert response.status == 200
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["status"] == "ok"
    assert isinstance(body["connections"], int) and isinstance(body["uptime_s"], int | float)


async def test_stopping_a_client_at_any_moment_keeps_the_replica_consistent(
    relay: Any, open_replica: OpenReplica, sync_clients: Callable[..., SyncClient]
) -> None:
    replica = await open_replica("one")
    watchlist = await replica.create_watchlist("Tech")
    portfolio = await replica.create_portfolio("Main")
    client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
    for round_ in range(40):
        await watchlist.add([f"S{round_}"])
        await portfolio.add_trade("AAPL", round_ + 1, "10")
        client.start()
        await asyncio.sleep((round_ % 8) * 0.001)
        await client.stop()
        # what the replica counts as pending is what its file holds as pending
        for doc_id in replica.document_ids():
            rows = await replica.pending_updates(doc_id)
            assert replica.info(doc_id).pending == sum(p.changes for p in rows), (round_, doc_id)

    await SyncClient(replica, relay.url, relay.token("alice", "d1")).sync_once(timeout=10)
    assert await pending_total(replica) == 0
    assert all(info.pending == 0 for info in replica.documents())
    fresh = await open_replica("fresh")
    await SyncClient(fresh, relay.url, relay.token("alice", "d2")).sync_once(timeout=10)
    assert sorted((await fresh.watchlist(TECH)).symbols) == sorted(f"S{i}" for i in range(40))
    assert len((await fresh.portfolio(MAIN)).trades()) == 40


class FlakyStore(MemoryRelayStore):
    """The memory store, failing the next ``fail_next`` appends (a disk that hiccups)."""

    fail_next = 0

    async def append(
        self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
    ) -> int:
        if self.fail_next:
            self.fail_next -= 1
            raise RelayStoreError("simulated storage failure")
        return await super().append(user, doc_id, update, changed_at, changed_by)


async def test_an_update_the_relay_failed_to_store_is_never_acknowledged(
    tmp_path: Any,
    relay_server: Any,
    open_replica: OpenReplica,
    sync_clients: Callable[..., SyncClient],
    helpers: Any,
) -> None:
    store = FlakyStore()
    async with relay_server(tmp_path / "flaky-relay", store=store) as relay:
        # by hand: the failure is reported as fatal, and nothing after it is acknowledged
        async with aiohttp.ClientSession() as http:
            client = RawClient(await http.ws_connect(relay.url))
            await client.hello(relay.token("alice", "raw"))
            await client.sync(TECH)
            store.fail_next = 1
            await client.send(Update(TECH, 1, crdt_update("LOST")))
            await client.send(Update(TECH, 2, crdt_update("LATER")))
            error = await client.expect_error(ErrorCode.INTERNAL)
            assert error.fatal
            await client.expect_closed()
        assert await store.load("alice", TECH) is None

        # a syncing device: a failed store costs a reconnect, never an edit
        replica = await open_replica("one")
        syncing = sync_clients(replica, relay.url, relay.token("alice", "d1"))
        syncing.start()
        watchlist = await replica.create_watchlist("Tech")
        await syncing.wait_in_sync(timeout=10)
        store.fail_next = 1
        await watchlist.add(["AAPL"])
        await watchlist.add(["MSFT"])
        await helpers.eventually(lambda: replica.info(TECH).pending == 0)
        await syncing.wait_in_sync(timeout=10)

        fresh = await open_replica("fresh")
        await SyncClient(fresh, relay.url, relay.token("alice", "d2")).sync_once(timeout=10)
        assert (await fresh.watchlist(TECH)).symbols == ["AAPL", "MSFT"]


async def test_the_relay_shuts_down_promptly_with_clients_connected(
    tmp_path: Any,
    relay_server: Any,
    open_replica: OpenReplica,
    sync_clients: Callable[..., SyncClient],
    helpers: Any,
) -> None:
    replica = await open_replica("one")
    await replica.create_watchlist("Tech")
    async with aiohttp.ClientSession() as http:
        async with relay_server(tmp_path / "relay-2", heartbeat=30.0) as relay:
            client = sync_clients(replica, relay.url, relay.token("alice", "d1"))
            client.start()
            await client.wait_in_sync(timeout=10)
            raw = RawClient(await http.ws_connect(relay.url, autoclose=False))
            await raw.hello(relay.token("alice", "raw"))
            started = time.monotonic()
            shutdown = asyncio.get_running_loop().create_task(relay.stop())
            message = await raw.ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.CLOSE
            assert message.data == aiohttp.WSCloseCode.GOING_AWAY
            await raw.ws.close()
            await asyncio.wait_for(shutdown, timeout=10)
            assert time.monotonic() - started < 3
        await helpers.eventually(lambda: not client.connected, timeout=5)
    assert replica.info(TECH).pending == 0


async def test_a_connection_naming_too_many_documents_is_closed(
    tmp_path: Any, relay_server: Any
) -> None:
    """The relay's session remembers every document a connection names (refused ones too): past
    max_documents it ends the connection with a fatal too_many_documents; a new connection
    (with the documents it needs) works."""
    async with (
        relay_server(tmp_path / "relay", max_documents=3) as relay,
        aiohttp.ClientSession() as http,
    ):
        client = RawClient(await http.ws_connect(relay.url))
        await client.hello(relay.token("alice", "raw"))
        for name in ("A", "B", "C"):
            await client.sync(document_id(DocumentKind.WATCHLIST, name))
        await client.sync(document_id(DocumentKind.WATCHLIST, "A"))  # no new document
        await client.send(SyncRequest(document_id(DocumentKind.WATCHLIST, "D"), b"\x00"))
        error = await client.expect_error(ErrorCode.TOO_MANY_DOCUMENTS)
        assert error.fatal and "limit of 3 documents" in error.message
        await client.expect_closed()
        again = RawClient(await http.ws_connect(relay.url))
        await again.hello(relay.token("alice", "raw"))
        await again.sync(document_id(DocumentKind.WATCHLIST, "D"))
        await again.ws.close()
