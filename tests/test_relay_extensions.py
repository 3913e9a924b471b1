"""The relay's extensions, one hook at a time, against a real relay on 127.0.0.1 and real WebSocket
clients talking raw frames (a pure ClientSession over aiohttp)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc

from foliosync.server.auth import Identity, load_or_create_secret
from foliosync.server.extensions import (
    SERVER_SCOPE,
    ConnectionInfo,
    ConnectionRequest,
    Extension,
    OwnerAuthorization,
    ProposedUpdate,
    SchemaValidation,
    StoredChange,
    default_extensions,
)
from foliosync.server.relay import RelayConfig, create_app
from foliosync.sync.errors import AccessDenied, AuthError, ConfigError, UpdateRefused
from foliosync.sync.model import DocumentKind, EditContext, Watchlist, document_id
from foliosync.sync.protocol import (
    Acked,
    ClientEvent,
    ClientSession,
    ErrorReceived,
    SyncReplied,
    UpdateReceived,
    Welcomed,
)

from .conftest import RunningRelay, eventually, run_cli, serve_relay

TECH = document_id(DocumentKind.WATCHLIST, "Tech")
HEALTH = document_id(DocumentKind.WATCHLIST, "Health")


def watchlist_update(*symbols: str, device: str = "raw", base: Doc | None = None) -> bytes:
    """An update adding ``symbols`` the way a device's Watchlist does (so in the layout the
    relay checks); on top of ``base`` if given (which it then also changes)."""
    doc: Doc = base if base is not None else Doc()
    before = doc.get_state()
    Watchlist(doc, EditContext(device)).add(list(symbols))
    return doc.get_update(before)


def symbols_of(doc: Doc) -> list[str]:
    return Watchlist(doc, EditContext("reader")).symbols


class Peer:
    """A raw protocol client on one WebSocket."""

    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http, self.ws = http, ws
        self.session = ClientSession()
        self.seq = 0

    @classmethod
    async def connect(cls, relay: RunningRelay, token: str, name: str = "ext-test") -> Peer:
        http = aiohttp.ClientSession()
        peer = cls(http, await http.ws_connect(relay.url))
        await peer.ws.send_bytes(peer.session.hello(token, name))
        return peer

    async def next(self, timeout: float = 5.0) -> ClientEvent:
        message = await self.ws.receive(timeout=timeout)
        assert message.type == aiohttp.WSMsgType.BINARY, message
        (event,) = self.session.receive_data(message.data)
        return event

    async def welcomed(self) -> Peer:
        event = await self.next()
        assert isinstance(event, Welcomed), event
        return self

    async def sync(self, doc: str) -> SyncReplied:
        await self.ws.send_bytes(self.session.sync_request(doc, b"\x00"))
        reply = await self.next()
        assert isinstance(reply, SyncReplied), reply
        return reply

    async def send(self, doc: str, update: bytes) -> int:
        self.seq += 1
        await self.ws.send_bytes(self.session.update(doc, self.seq, update))
        return self.seq

    async def close(self) -> None:
        await self.ws.close()
        await self.http.close()


@asynccontextmanager
async def peers(relay: RunningRelay) -> AsyncIterator[Callable[..., Any]]:
    opened: list[Peer] = []

    async def open_(user: str = "alice", device: str = "a", token: str | None = None) -> Peer:
        peer = await Peer.connect(relay, token or relay.token(user, device))
        opened.append(peer)
        return await peer.welcomed()

    try:
        yield open_
    finally:
        for peer in opened:
            await peer.close()


def with_defaults(data_dir: Path, *extra: Extension) -> list[Extension]:
    return [*default_extensions(load_or_create_secret(data_dir)), *extra]


class NoBadSymbol(Extension):
    """Refuses any watchlist holding the symbol BAD."""

    async def before_apply(self, change: ProposedUpdate) -> None:
        if change.kind is DocumentKind.WATCHLIST and "BAD" in change.candidate.model():
            raise UpdateRefused("BAD may not be followed", "no_bad")


class Recorder(Extension):
    def __init__(self) -> None:
        self.stored: list[StoredChange] = []
        self.connected: list[tuple[Identity, ConnectionInfo]] = []
        self.disconnected: list[str] = []

    async def after_store(self, change: StoredChange) -> None:
        self.stored.append(change)

    async def on_connect(self, identity: Identity, info: ConnectionInfo) -> None:
        self.connected.append((identity, info))

    async def on_disconnect(self, identity: Identity, info: ConnectionInfo) -> None:
        self.disconnected.append(info.connection_id)


async def expect_error(peer: Peer, doc: str, seq: int, code: str) -> ErrorReceived:
    event = await peer.next()
    assert isinstance(event, ErrorReceived), event
    assert (event.doc, event.seq, event.code, event.fatal) == (doc, seq, code, False), event
    return event


async def expect_ack(peer: Peer, doc: str, seq: int) -> None:
    event = await peer.next()
    assert event == Acked(doc, seq), event


# -- before_apply --------------------------------------------------------------------------------


async def test_a_refused_update_is_neither_stored_nor_sent_and_nothing_else_stops(
    tmp_path: Path,
) -> None:
    data = tmp_path / "relay"
    recorder = Recorder()
    async with serve_relay(data, extensions=with_defaults(data, NoBadSymbol(), recorder)) as relay:
        async with peers(relay) as open_:
            a, b = await open_(device="a"), await open_(device="b")
            await a.sync(TECH)
            await a.sync(HEALTH)
            await b.sync(TECH)
            base = Doc()
            seq = await a.send(TECH, watchlist_update("AAPL", base=base))
            await expect_ack(a, TECH, seq)
            assert isinstance(await b.next(), UpdateReceived)
            refused = await a.send(TECH, watchlist_update("BAD", base=Doc()))
            error = await expect_error(a, TECH, refused, "no_bad")
            assert "BAD may not be followed" in error.message
            # The same connection goes on, on this document and another; so does the other one.
            seq = await a.send(HEALTH, watchlist_update("JNJ"))
            await expect_ack(a, HEALTH, seq)
            seq = await b.send(TECH, watchlist_update("MSFT", device="b"))
            await expect_ack(b, TECH, seq)
            relayed = await a.next()  # b's change, and never the refused one before it
            assert isinstance(relayed, UpdateReceived) and relayed.doc == TECH
            assert relay.relay.counters.updates_refused["no_bad"] == 1
        assert [c.doc_id for c in recorder.stored] == [TECH, HEALTH, TECH]
    async with serve_relay(data) as again:
        assert symbols_of(await again.relay.read_document("alice", TECH)) == ["AAPL", "MSFT"]


class Raises(Extension):
    async def before_apply(self, change: ProposedUpdate) -> None:
        if "BOOM" in change.candidate.model():
            raise RuntimeError("the rule's database is down")


async def test_an_extension_that_raises_refuses_that_update_only_and_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "relay"
    async with (
        serve_relay(data, extensions=with_defaults(data, Raises())) as relay,
        peers(relay) as open_,
    ):
        a = await open_()
        await a.sync(TECH)
        with caplog.at_level(logging.ERROR, "foliosync.relay.extensions"):
            seq = await a.send(TECH, watchlist_update("BOOM"))
            await expect_error(a, TECH, seq, "extension_failed")
        failed = [r for r in caplog.records if "Raises" in r.getMessage()]
        assert failed and failed[0].exc_info is not None  # its name and its traceback
        seq = await a.send(TECH, watchlist_update("AAPL"))
        await expect_ack(a, TECH, seq)
        assert relay.relay.counters.updates_refused["extension_failed"] == 1
        assert symbols_of(await relay.relay.read_document("alice", TECH)) == ["AAPL"]


class _OwnBase(BaseException):
    pass


class RaisesBase(Extension):
    """Raises what ``except Exception`` would let through, once per symbol "BASE"."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    async def before_apply(self, change: ProposedUpdate) -> None:
        if "BASE" in change.candidate.model():
            raise self.exc


@pytest.mark.parametrize(
    "exc",
    [SystemExit(3), GeneratorExit(), asyncio.CancelledError(), _OwnBase("boom")],
    ids=["SystemExit", "GeneratorExit", "CancelledError", "own-BaseException"],
)
async def test_an_extension_raising_a_base_exception_refuses_only_that_update(
    tmp_path: Path, exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "relay"
    async with (
        serve_relay(data, extensions=with_defaults(data, RaisesBase(exc))) as relay,
        peers(relay) as open_,
    ):
        a = await open_()
        await a.sync(TECH)
        with caplog.at_level(logging.ERROR, "foliosync.relay.extensions"):
            seq = await a.send(TECH, watchlist_update("BASE"))
            await expect_error(a, TECH, seq, "extension_failed")
        assert any("RaisesBase" in r.getMessage() for r in caplog.records)
        seq = await a.send(TECH, watchlist_update("AAPL"))  # the connection and the relay go on
        await expect_ack(a, TECH, seq)
        assert symbols_of(await relay.relay.read_document("alice", TECH)) == ["AAPL"]


class Hangs(Extension):
    async def before_apply(self, change: ProposedUpdate) -> None:
        if "HANG" in change.candidate.model():
            await asyncio.Event().wait()


async def test_an_extension_that_hangs_times_out_and_the_relay_serves_others_meanwhile(
    tmp_path: Path,
) -> None:
    data = tmp_path / "relay"
    extensions = with_defaults(data, Hangs())
    async with serve_relay(data, extensions=extensions, hook_timeout=0.5) as relay:
        async with peers(relay) as open_:
            a, b = await open_(device="a"), await open_(user="bob", device="b")
            await a.sync(TECH)
            await b.sync(TECH)
            loop = asyncio.get_running_loop()
            started = loop.time()
            hung = await a.send(TECH, watchlist_update("HANG"))
            answer = asyncio.ensure_future(a.next())
            seq = await b.send(TECH, watchlist_update("AAPL"))
            await expect_ack(b, TECH, seq)
            assert not answer.done()  # b was answered while a's update waits on the hook
            error = await answer
            assert isinstance(error, ErrorReceived), error
            assert (error.doc, error.seq, error.code) == (TECH, hung, "extension_failed")
            assert "did not answer in time" in error.message
            assert loop.time() - started >= 0.5
            seq = await a.send(TECH, watchlist_update("MSFT"))
            await expect_ack(a, TECH, seq)
        assert symbols_of(await relay.relay.read_document("alice", TECH)) == ["MSFT"]


# -- authenticate, authorize, on_connect ----------------------------------------------------------


class ApiKeys(Extension):
    """Static API keys instead of tokens."""

    async def authenticate(self, token: object, request: ConnectionRequest) -> Identity | None:
        if token == "key-alice":
            return Identity("alice", "", frozenset({"sync"}))
        raise AuthError("unknown API key")


async def test_a_custom_authenticate_replaces_tokens_for_websockets_and_http(
    tmp_path: Path,
) -> None:
    extensions = [ApiKeys(), OwnerAuthorization(), SchemaValidation()]
    async with serve_relay(tmp_path / "relay", extensions=extensions) as relay:
        async with peers(relay) as open_:
            a = await open_(token="key-alice")
            await a.sync(TECH)
            seq = await a.send(TECH, watchlist_update("AAPL"))
            await expect_ack(a, TECH, seq)
            refused = await Peer.connect(relay, relay.token("alice", "a"))  # a valid JWT
            event = await refused.next()
            await refused.close()
            assert isinstance(event, ErrorReceived) and event.fatal
            assert (event.code, event.message) == ("auth_failed", "unknown API key")
        async with aiohttp.ClientSession() as http:
            url = f"{relay.http}/v1/prices?symbols=AAPL"
            ok = await http.get(url, headers={"Authorization": "Bearer key-alice"})
            assert ok.status == 200
            jwt = await http.get(url, headers={"Authorization": f"Bearer {relay.token('alice')}"})
            assert jwt.status == 401
            assert (await jwt.json())["error"] == "unknown API key"


class BrokenAuthentication(Extension):
    async def authenticate(self, token: object, request: ConnectionRequest) -> Identity | None:
        raise RuntimeError("the key service is down")


async def test_an_authentication_that_fails_refuses_the_connection_saying_so(
    tmp_path: Path,
) -> None:
    data = tmp_path / "relay"
    extensions = [BrokenAuthentication(), *default_extensions(load_or_create_secret(data))]
    async with serve_relay(data, extensions=extensions) as relay:
        refused = await Peer.connect(relay, relay.token("alice", "a"))
        event = await refused.next()
        await refused.close()
        assert isinstance(event, ErrorReceived) and event.fatal and event.code == "auth_failed"
        assert "authentication check failed" in event.message
        async with aiohttp.ClientSession() as http:
            response = await http.get(
                f"{relay.http}/metrics",
                headers={"Authorization": f"Bearer {relay.token('ops', scopes={'admin'})}"},
            )
            assert response.status == 401
            assert "authentication check failed" in (await response.json())["error"]
        assert relay.relay.hooks.failures == 2


class ReadOnlyTech(Extension):
    async def authorize(self, identity: Identity, doc_id: str, access: str) -> None:
        if doc_id == TECH and access == "write":
            raise AccessDenied("Tech is read-only", "read_only")


async def test_a_custom_authorize_refuses_writes_of_one_document(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    async with (
        serve_relay(data, extensions=with_defaults(data, ReadOnlyTech())) as relay,
        peers(relay) as open_,
    ):
        a = await open_()
        await a.sync(TECH)  # reading is allowed
        await a.sync(HEALTH)
        seq = await a.send(TECH, watchlist_update("AAPL"))
        await expect_error(a, TECH, seq, "read_only")
        seq = await a.send(HEALTH, watchlist_update("JNJ"))
        await expect_ack(a, HEALTH, seq)
        assert relay.relay.counters.updates_refused["read_only"] == 1


class BlockDevice(Extension):
    async def on_connect(self, identity: Identity, info: ConnectionInfo) -> None:
        if info.device == "stolen":
            raise AccessDenied("this device was reported stolen")


async def test_on_connect_refuses_a_connection_and_on_disconnect_follows_the_accepted(
    tmp_path: Path,
) -> None:
    data = tmp_path / "relay"
    recorder = Recorder()
    extensions = with_defaults(data, BlockDevice(), recorder)
    async with serve_relay(data, extensions=extensions) as relay:
        stolen = await Peer.connect(relay, relay.token("alice", "stolen"))
        event = await stolen.next()
        assert isinstance(event, ErrorReceived) and event.fatal
        assert (event.code, event.message) == ("forbidden", "this device was reported stolen")
        closed = await stolen.ws.receive(timeout=5)
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await stolen.close()
        async with peers(relay) as open_:
            await open_(device="laptop")
        assert [(i.user, c.device) for i, c in recorder.connected] == [("alice", "laptop")]
        assert recorder.connected[0][1].request.client_name == "ext-test"
        await eventually(lambda: len(recorder.disconnected) == 1)
        assert recorder.disconnected == [recorder.connected[0][1].connection_id]


# -- after_store and the server-side API ----------------------------------------------------------


async def test_after_store_sees_every_stored_change_and_nothing_refused(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    recorder = Recorder()
    async with (
        serve_relay(data, extensions=with_defaults(data, NoBadSymbol(), recorder)) as relay,
        peers(relay) as open_,
    ):
        a = await open_(device="a")
        await a.sync(TECH)
        sent = []
        for symbols in (["AAPL"], ["BAD"], ["MSFT"], ["GOOG"]):
            update = watchlist_update(*symbols)
            seq = await a.send(TECH, update)
            if symbols == ["BAD"]:
                await expect_error(a, TECH, seq, "no_bad")
            else:
                await expect_ack(a, TECH, seq)
                sent.append(update)
        connection = next(iter(relay.relay.connections)).id
    assert [c.update for c in recorder.stored] == sent
    assert {(c.owner, c.doc_id, c.device, c.origin) for c in recorder.stored} == {
        ("alice", TECH, "a", connection)
    }
    assert all(c.watermark.changed_by == "a" for c in recorder.stored)


async def test_a_server_side_edit_reaches_connected_devices_through_the_extensions(
    tmp_path: Path,
) -> None:
    data = tmp_path / "relay"
    recorder = Recorder()
    async with (
        serve_relay(data, extensions=with_defaults(data, NoBadSymbol(), recorder)) as relay,
        peers(relay) as open_,
    ):
        a = await open_()
        await a.sync(TECH)
        local = Doc()
        seq = await a.send(TECH, watchlist_update("AAPL", base=local))
        await expect_ack(a, TECH, seq)

        def add(symbols: list[str]) -> Callable[[Doc], None]:
            return lambda doc: Watchlist(doc, EditContext("server")).add(symbols)

        assert await relay.relay.edit_document("alice", TECH, add(["SPY"]))
        relayed = await a.next()
        assert isinstance(relayed, UpdateReceived) and relayed.changed_by == "server"
        local.apply_update(relayed.update)
        assert symbols_of(local) == ["AAPL", "SPY"]
        with pytest.raises(UpdateRefused, match="BAD may not"):
            await relay.relay.edit_document("alice", TECH, add(["BAD"]))
        assert not await relay.relay.edit_document("alice", TECH, lambda doc: None)
        copy = await relay.relay.read_document("alice", TECH)
        copy.get("meta", type=__import__("pycrdt").Map)["name"] = "changed only here"
        assert symbols_of(await relay.relay.read_document("alice", TECH)) == ["AAPL", "SPY"]
    server_changes = [c for c in recorder.stored if c.device == "server"]
    assert len(server_changes) == 1 and server_changes[0].origin.endswith(":server")


class SeesServerScope(Extension):
    def __init__(self) -> None:
        self.scopes: list[frozenset[str]] = []

    async def before_apply(self, change: ProposedUpdate) -> None:
        self.scopes.append(change.identity.scopes)


async def test_a_server_side_edit_runs_under_the_server_identity(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    seen = SeesServerScope()
    async with serve_relay(data, extensions=with_defaults(data, seen)) as relay:
        await relay.relay.edit_document(
            "alice", TECH, lambda doc: Watchlist(doc, EditContext("cron")).add(["IBM"])
        )
    assert seen.scopes == [frozenset({"sync", SERVER_SCOPE})]


# -- configuration ---------------------------------------------------------------------------------


def test_an_empty_authentication_chain_is_refused_at_start_up(tmp_path: Path) -> None:
    config = RelayConfig(data_dir=tmp_path)
    with pytest.raises(ConfigError, match="no extension authenticates"):
        create_app(config, extensions=[])
    with pytest.raises(ConfigError, match="no extension authenticates"):
        create_app(config, extensions=[OwnerAuthorization(), SchemaValidation()])
    with pytest.raises(ConfigError, match="not a relay Extension"):
        create_app(config, extensions=[object()])  # type: ignore[list-item]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("hook_timeout", 0),
        ("hook_timeout", float("nan")),
        ("heartbeat", -1.0),
        ("hello_timeout", float("inf")),
        ("max_hot_documents", 0),
        ("max_initial_syncs", True),
        ("max_frame_size", 10),
        ("durability", "sometimes"),
        ("relay_id", ""),
        ("port", 70000),
        ("trim_memory_every", -5),
        ("gc_young_threshold", -1),
        ("schema_limits", {"max_symbols": 3}),
    ],
)
def test_every_config_field_is_checked_and_named(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        RelayConfig(**{field: value})  # type: ignore[arg-type]


# -- the CLI ---------------------------------------------------------------------------------------


async def test_the_cli_extension_flag_adds_an_app_rule_to_the_defaults(tmp_path: Path) -> None:
    (tmp_path / "app_rules.py").write_text(
        "from foliosync.server.extensions import Extension\n"
        "from foliosync.sync.errors import UpdateRefused\n"
        "class NoBad(Extension):\n"
        "    async def before_apply(self, change):\n"
        "        if 'BAD' in change.candidate.model():\n"
        "            raise UpdateRefused('not BAD', 'no_bad')\n"
        "def rules(config, secret):\n"
        "    assert config.hook_timeout == 2.5 and len(secret) >= 32\n"
        "    return [NoBad()]\n"
    )
    code, _, err = await run_cli(
        "relay", "--data", str(tmp_path / "x"), "--extension", "app_rules:missing",
        env={"PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert code != 0 and "app_rules has no callable missing" in err
    code, _, err = await run_cli("relay", "--data", str(tmp_path / "x"), "--hook-timeout", "0")
    assert code != 0 and "--hook-timeout" in err
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = tmp_path / "relay"
    process = await asyncio.create_subprocess_exec(
        os.path.join(os.path.dirname(sys.executable), "foliosync"),
        "relay", "--port", str(port), "--data", str(data), "--feed", "none",
        "--hook-timeout", "2.5", "--extension", "app_rules:rules",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"foliosync relay on" in line, line
        secret = load_or_create_secret(data)
        running = RunningRelay(RelayConfig(data_dir=data), None, port, secret)  # type: ignore[arg-type]
        a = await (await Peer.connect(running, running.token("alice", "a"))).welcomed()
        try:
            await a.sync(TECH)
            seq = await a.send(TECH, watchlist_update("BAD"))
            await expect_error(a, TECH, seq, "no_bad")
            seq = await a.send(TECH, watchlist_update("AAPL"))
            await expect_ack(a, TECH, seq)
        finally:
            await a.close()
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
