"""Every update is checked before the relay stores it: its bytes (V1, nothing trailing, every item
it refers to held), then the document it would make. A real relay on 127.0.0.1, raw frames over
aiohttp, updates made by pycrdt and by the real yjs package (node)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc, Map

from foliosync.server.auth import load_or_create_secret
from foliosync.server.extensions import (
    Extension,
    OwnerAuthorization,
    ProposedUpdate,
    TokenAuthentication,
    default_extensions,
)
from foliosync.sync.errors import UpdateRefused
from foliosync.sync.model import (
    DocumentKind,
    EditContext,
    Portfolio,
    Watchlist,
    document_id,
)
from foliosync.sync.protocol import (
    Acked,
    ClientEvent,
    ClientSession,
    ErrorReceived,
    SyncReplied,
    Welcomed,
)

from .conftest import RunningRelay, serve_relay

TECH = document_id(DocumentKind.WATCHLIST, "Tech")
MAIN = document_id(DocumentKind.PORTFOLIO, "Main")
ROOT = Path(__file__).resolve().parent.parent
NODE_MODULES = ROOT / "clients" / "js" / "node_modules"


class Peer:
    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws
        self.session = ClientSession()
        self.seq = 0

    async def next(self, timeout: float = 5.0) -> ClientEvent:
        message = await self.ws.receive(timeout=timeout)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        (event,) = self.session.receive_data(message.data)
        return event

    async def sync(self, doc: str, state_vector: bytes = b"\x00") -> ClientEvent:
        await self.ws.send_bytes(self.session.sync_request(doc, state_vector))
        return await self.next()

    async def send(self, doc: str, update: bytes) -> ClientEvent:
        self.seq += 1
        await self.ws.send_bytes(self.session.update(doc, self.seq, update))
        return await self.next()


@asynccontextmanager
async def peer(relay: RunningRelay, device: str = "a") -> AsyncIterator[Peer]:
    async with aiohttp.ClientSession() as http:
        connected = Peer(http, await http.ws_connect(relay.url))
        await connected.ws.send_bytes(connected.session.hello(relay.token("alice", device), "v"))
        assert isinstance(await connected.next(), Welcomed)
        try:
            yield connected
        finally:
            await connected.ws.close()


def refused(event: ClientEvent, doc: str, seq: int, code: str) -> bool:
    assert isinstance(event, ErrorReceived), event
    assert (event.doc, event.seq, event.code, event.fatal) == (doc, seq, code, False), event
    return True


def watchlist_update(*symbols: str, base: Doc | None = None, device: str = "py") -> bytes:
    doc: Doc = base if base is not None else Doc()
    before = doc.get_state()
    Watchlist(doc, EditContext(device)).add(list(symbols))
    return doc.get_update(before)


async def stored_update(relay: RunningRelay, doc_id: str) -> bytes:
    return await relay.relay.documents.snapshot("alice", doc_id)


def yjs(script: str) -> dict[str, str]:
    """Run ``script`` with the real yjs (clients/js); it prints a JSON object of hex strings."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed for the yjs cases (node 20 or later)")
    if not (NODE_MODULES / "yjs").is_dir():
        npm = shutil.which("npm")
        assert npm is not None, "npm is needed to install clients/js"
        subprocess.run([npm, "ci", "--prefix", str(ROOT / "clients" / "js")], check=True)
    done = subprocess.run(
        [node, "-e", "const Y = require('yjs'); " + script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
        check=True,
    )
    result: dict[str, str] = json.loads(done.stdout)
    return result


_YJS_WATCHLIST = """
const doc = new Y.Doc(); doc.clientID = 4242;
doc.getMap('symbols').set('NVDA\\x1fjs', { t: '0000000000000000a' });
const hex = (u8) => Buffer.from(u8).toString('hex');
console.log(JSON.stringify({ v1: hex(Y.encodeStateAsUpdate(doc)),
                             v2: hex(Y.encodeStateAsUpdateV2(doc)) }));
"""


async def test_a_yjs_v2_update_is_refused_and_its_v1_twin_stored(relay: RunningRelay) -> None:
    made = yjs(_YJS_WATCHLIST)
    async with peer(relay) as a:
        assert isinstance(await a.sync(TECH), SyncReplied)
        event = await a.send(TECH, bytes.fromhex(made["v2"]))
        assert refused(event, TECH, 1, "update_v2")
        assert Watchlist(_doc(await stored_update(relay, TECH)), EditContext("r")).symbols == []
        assert await a.send(TECH, bytes.fromhex(made["v1"])) == Acked(TECH, 2)
    doc = _doc(await stored_update(relay, TECH))
    assert Watchlist(doc, EditContext("r")).symbols == ["NVDA"]
    assert relay.relay.counters.updates_refused["update_v2"] == 1


def _doc(update: bytes) -> Doc:
    doc: Doc = Doc()
    doc.apply_update(update)
    return doc


@pytest.mark.parametrize(
    ("case", "make"),
    [
        ("empty update and garbage", lambda: b"\x00\x00" + b"\xde\xad\xbe\xef" * 4),
        ("trailing bytes", lambda: watchlist_update("AAPL") + b"\x00"),
        ("truncated", lambda: watchlist_update("AAPL")[:-3]),
    ],
)
async def test_bytes_that_are_no_v1_update_are_refused_and_the_connection_goes_on(
    relay: RunningRelay, case: str, make: Any
) -> None:
    async with peer(relay) as a:
        assert isinstance(await a.sync(TECH), SyncReplied)
        assert refused(await a.send(TECH, make()), TECH, 1, "bad_update")
        assert await a.send(TECH, watchlist_update("MSFT")) == Acked(TECH, 2)
    assert Watchlist(_doc(await stored_update(relay, TECH)), EditContext("r")).symbols == ["MSFT"]
    assert relay.relay.counters.updates_refused["bad_update"] == 1


async def test_a_state_vector_that_does_not_decode_is_refused(relay: RunningRelay) -> None:
    async with peer(relay) as a:
        event = await a.sync(TECH, b"\x05\x01")
        assert isinstance(event, ErrorReceived) and (event.code, event.doc) == ("bad_update", TECH)
        assert not event.fatal
        assert isinstance(await a.sync(TECH), SyncReplied)


async def test_a_state_vector_claiming_millions_of_clients_is_refused_before_yrs_reads_it(
    relay: RunningRelay,
) -> None:
    # yrs reserves memory for the claimed count first: these 12 bytes held the loop for seconds.
    hostile = bytes.fromhex("ffffffff01e8a390ea45b204")
    async with peer(relay) as a, peer(relay) as b:
        event = await a.sync(TECH, hostile)
        assert isinstance(event, ErrorReceived) and (event.code, event.doc) == ("bad_update", TECH)
        assert "clients" in event.message
        assert isinstance(await b.sync(TECH), SyncReplied)


async def test_an_update_whose_predecessor_the_relay_lacks_is_refused_across_restarts(
    tmp_path: Path,
) -> None:
    data = tmp_path / "relay"
    local: Doc = Doc()
    first = watchlist_update("AAPL", base=local)
    second = watchlist_update("MSFT", base=local)  # the same client, its clock after the first
    async with serve_relay(data) as relay, peer(relay) as a:
        assert isinstance(await a.sync(TECH), SyncReplied)
        assert refused(await a.send(TECH, second), TECH, 1, "missing_dependencies")
    async with serve_relay(data) as relay:
        async with peer(relay) as a:
            assert isinstance(await a.sync(TECH), SyncReplied)
            assert refused(await a.send(TECH, second), TECH, 1, "missing_dependencies")
            assert await a.send(TECH, first) == Acked(TECH, 2)
            assert await a.send(TECH, second) == Acked(TECH, 3)
        doc = _doc(await stored_update(relay, TECH))
        assert Watchlist(doc, EditContext("r")).symbols == ["AAPL", "MSFT"]


async def test_a_trade_whose_quantity_is_a_number_is_an_invalid_document(
    relay: RunningRelay,
) -> None:
    doc: Doc = Doc()
    Portfolio(doc, EditContext("py")).add_trade("AAPL", 10, "150.25")
    good = doc.get_update()
    broken: Doc = Doc()
    broken.apply_update(good)
    trades = broken.get("trades", type=Map)
    (trade_id,) = list(trades.keys())
    trades[trade_id] = {**dict(trades[trade_id]), "qty": 10}
    bad = broken.get_update()  # the whole document, its one trade's qty now 10, not "10"
    async with peer(relay) as a:
        assert isinstance(await a.sync(MAIN), SyncReplied)
        event = await a.send(MAIN, bad)
        assert refused(event, MAIN, 1, "invalid_document")
        assert "qty" in event.message  # type: ignore[attr-defined]
        assert await a.send(MAIN, good) == Acked(MAIN, 2)
    stored = Portfolio(_doc(await stored_update(relay, MAIN)), EditContext("r"))
    assert [t.quantity for t in stored.trades()] == [10]


async def test_valid_updates_from_pycrdt_and_from_yjs_pass(relay: RunningRelay) -> None:
    made = yjs(_YJS_WATCHLIST)
    async with peer(relay) as a:
        assert isinstance(await a.sync(TECH), SyncReplied)
        assert await a.send(TECH, watchlist_update("AAPL", "MSFT")) == Acked(TECH, 1)
        assert await a.send(TECH, bytes.fromhex(made["v1"])) == Acked(TECH, 2)
    doc = _doc(await stored_update(relay, TECH))
    assert sorted(Watchlist(doc, EditContext("r")).symbols) == ["AAPL", "MSFT", "NVDA"]


class WatchlistCap(Extension):
    """The app rule of the docs: no more than 500 symbols in a watchlist."""

    async def before_apply(self, change: ProposedUpdate) -> None:
        if change.kind is DocumentKind.WATCHLIST and len(change.candidate.model()) > 500:
            raise UpdateRefused("no more than 500 symbols in a watchlist", "too_many_symbols")


async def test_an_app_rule_refuses_the_501st_symbol(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    extensions = [*default_extensions(load_or_create_secret(data)), WatchlistCap()]
    local: Doc = Doc()
    async with serve_relay(data, extensions=extensions) as relay, peer(relay) as a:
        assert isinstance(await a.sync(TECH), SyncReplied)
        symbols = [f"S{i:03d}" for i in range(500)]
        assert await a.send(TECH, watchlist_update(*symbols, base=local)) == Acked(TECH, 1)
        event = await a.send(TECH, watchlist_update("ONEMORE", base=Doc()))
        assert refused(event, TECH, 2, "too_many_symbols")
        assert "500 symbols" in event.message  # type: ignore[attr-defined]
        doc = _doc(await stored_update(relay, TECH))
        assert len(Watchlist(doc, EditContext("r"))) == 500


# Hand-made (no encoder writes them): client 5 writes a watchlist's meta and MSFT; client 999's
# update adds AAPL, then an item whose parent is client 5's first item, which is no type. The
# decoder cannot tell (the parent is not in the update); yrs integrates AAPL, then raises.
_META_AND_MSFT = bytes.fromhex(
    "010305002801046d657461046b696e6401770977617463686c6973742801046d657461046e616d6501770454"
    "65636828010773796d626f6c73074d5346541f6430017601017477113030313961643733353834303030303030"
    "00"
)
_AAPL_THEN_A_BAD_PARENT = bytes.fromhex(
    "0102e7070028010773796d626f6c73074141504c1f64310176010174771130303139616437333538343030303030"
    "3028000500027a7a0177017800"
)


def _symbols(update: bytes) -> list[str]:
    return sorted(_doc(update).get("symbols", type=Map).keys())


@pytest.mark.parametrize("layout_check", [False, True], ids=["own-rules", "defaults"])
async def test_an_update_yrs_refuses_half_way_leaves_nothing_of_it_on_the_relay(
    tmp_path: Path, layout_check: bool
) -> None:
    data = tmp_path / "relay"
    secret = load_or_create_secret(data)
    # An app's own list without the layout check (no scratch replica in front of the hot copy).
    extensions = (
        default_extensions(secret)
        if layout_check
        else [TokenAuthentication(secret), OwnerAuthorization()]
    )
    async with serve_relay(data, extensions=extensions) as relay:
        async with peer(relay) as a:
            assert isinstance(await a.sync(TECH), SyncReplied)
            assert await a.send(TECH, _META_AND_MSFT) == Acked(TECH, 1)
            assert refused(await a.send(TECH, _AAPL_THEN_A_BAD_PARENT), TECH, 2, "bad_update")
        async with peer(relay, "b") as b:
            reply = await b.sync(TECH)
            assert isinstance(reply, SyncReplied)
            assert _symbols(reply.update) == ["MSFT\x1fd0"]
            assert await b.send(TECH, watchlist_update("IBM")) == Acked(TECH, 1)
    async with serve_relay(data, extensions=extensions) as relay, peer(relay) as a:
        reply = await a.sync(TECH)
        assert isinstance(reply, SyncReplied)
        assert _symbols(reply.update) == ["IBM\x1fpy", "MSFT\x1fd0"]


async def test_a_deletion_of_items_the_relay_lacks_is_taken(relay: RunningRelay) -> None:
    # A device may hold such a deletion (another relay's order of events); refusing it would
    # refuse every diff that device sends from then on. Yjs keeps it pending: no content.
    elsewhere: Doc = Doc()
    Watchlist(elsewhere, EditContext("x")).add(["AAPL"])
    before = elsewhere.get_state()
    Watchlist(elsewhere, EditContext("x")).remove(["AAPL"])
    deletion = elsewhere.get_update(before)  # no structs: only the delete set
    async with peer(relay) as a:
        assert isinstance(await a.sync(TECH), SyncReplied)
        assert await a.send(TECH, deletion) == Acked(TECH, 1)
        assert await a.send(TECH, watchlist_update("MSFT")) == Acked(TECH, 2)
