"""The relay's refusals end to end: a real relay on 127.0.0.1 and real replica files; either the
relay's own extension refuses (``before_apply`` raising UpdateRefused), or a small WebSocket
stand-in in front of the relay answers chosen Updates with a per-document Error (it forwards
everything else both ways, untouched, and can drop every connection to force a reconnect)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pycrdt import Doc, Map

from foliosync.client.replica import Replica
from foliosync.client.sync import SyncClient, _Connection
from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.server.extensions import Extension, ProposedUpdate, default_extensions
from foliosync.server.http_errors import JsonErrorAppRunner
from foliosync.server.relay import RelayConfig, create_app
from foliosync.sync.errors import UpdateRefused
from foliosync.sync.model import DocumentKind
from foliosync.sync.protocol import (
    ClientSession,
    DeviceSync,
    Error,
    ErrorCode,
    Update,
    decode_frame,
    encode_frame,
)
from foliosync.sync.protocol import document_sync as document_sync_module

TECH = "wl-52864113d0bf7ec5b0a294a5"
Rule = Callable[[Update], str | None]  # the error code to answer an Update with, or None


def added_symbols(update: bytes) -> set[str]:
    """The symbols a watchlist update adds (its ``symbols`` keys are SYMBOL\\x1fDEVICE)."""
    scratch = Doc()
    try:
        scratch.apply_update(update)
    except ValueError:
        return set()
    return {key.split("\x1f")[0] for key in scratch.get("symbols", type=Map)}


class RefusingRelay:
    """Forwards each client's WebSocket to ``upstream``, answering an Update itself with
    ``Error(code, ..., doc, seq)`` when ``rule`` names a code (the relay never sees it)."""

    def __init__(self, upstream: str, rule: Rule) -> None:
        self.upstream = upstream
        self.rule = rule
        self.refused: list[tuple[str, int, str]] = []  # (doc, seq, code)
        self.connections = 0  # accepted so far
        self._drops: set[asyncio.Event] = set()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        client = web.WebSocketResponse(max_msg_size=0)
        await client.prepare(request)
        self.connections += 1
        drop = asyncio.Event()
        self._drops.add(drop)
        lock = asyncio.Lock()

        async def to_client(data: bytes) -> None:
            async with lock:
                await client.send_bytes(data)

        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(self.upstream, max_msg_size=0) as relay,
        ):

            async def pump_up() -> None:
                async for message in client:
                    if message.type is not aiohttp.WSMsgType.BINARY:
                        break
                    frame = decode_frame(message.data)
                    code = self.rule(frame) if isinstance(frame, Update) else None
                    if code is not None and isinstance(frame, Update):
                        self.refused.append((frame.doc, frame.seq, code))
                        await to_client(encode_frame(Error(code, "a rule", frame.doc, frame.seq)))
                    else:
                        await relay.send_bytes(message.data)

            async def pump_down() -> None:
                async for message in relay:
                    if message.type is not aiohttp.WSMsgType.BINARY:
                        break
                    await to_client(message.data)

            tasks = [
                asyncio.ensure_future(pump_up()),
                asyncio.ensure_future(pump_down()),
                asyncio.ensure_future(drop.wait()),
            ]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:  # no reader left when the socket closes
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._drops.discard(drop)
        await client.close()
        return client

    def drop_everyone(self) -> None:
        """Close every client's connection (they reconnect: a SyncClient does by itself)."""
        for drop in self._drops:
            drop.set()


@asynccontextmanager
async def refusing_relay(upstream: str, rule: Rule) -> AsyncIterator[tuple[str, RefusingRelay]]:
    stand_in = RefusingRelay(upstream, rule)
    app = web.Application()
    app.router.add_get("/ws", stand_in.handle)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"ws://127.0.0.1:{port}/ws", stand_in
    finally:
        stand_in.drop_everyone()
        await runner.cleanup()


def refuse_symbol(symbol: str, code: str, *, times: int | None = None) -> Rule:
    """Refuse every Update that adds ``symbol`` (the first ``times`` only, if given)."""
    count = [0]

    def rule(update: Update) -> str | None:
        if symbol not in added_symbols(update.update):
            return None
        count[0] += 1
        return code if times is None or count[0] <= times else None

    return rule


async def symbols(replica: Replica) -> list[str]:
    return (await replica.watchlist(TECH)).symbols


async def test_a_change_to_retry_later_stays_pending_through_later_acks_and_goes_next_time(
    relay: Any, tmp_path: Path, helpers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(document_sync_module, "RETRY_BASE_SECONDS", 600.0)  # not on this one
    eventually, fast_client, opened_replica = (
        helpers.eventually,
        helpers.fast_client,
        helpers.opened_replica,
    )
    rule = refuse_symbol("FLAKY", ErrorCode.EXTENSION_FAILED, times=1)
    async with (
        refusing_relay(relay.url, rule) as (url, stand_in),
        opened_replica(tmp_path / "laptop.db") as laptop,
        opened_replica(tmp_path / "phone.db") as phone,
    ):
        client = fast_client(laptop, url, relay.token("alice", "laptop"))
        client.start()
        try:
            watchlist = await laptop.create_watchlist("Tech")
            await client.wait_in_sync(10)
            await watchlist.add("AAPL")
            await watchlist.add("FLAKY")
            await watchlist.add("MSFT")
            await eventually(lambda: len(stand_in.refused) == 1)
            await client.wait_in_sync(10)  # done what it can: FLAKY waits for a new connection
            assert stand_in.refused[0][2] == ErrorCode.EXTENSION_FAILED
            # MSFT's Ack came after the refusal and did not settle FLAKY with it.
            assert laptop.info(TECH).pending > 0
            assert client.freshness(TECH).pending > 0
            # (MSFT's own Update then lacked FLAKY's items on the relay: missing_dependencies,
            # a resync whose merged diff the relay took; FLAKY's row is still kept pending.)
            assert client.last_error is not None
            assert client.last_error.code in (
                ErrorCode.EXTENSION_FAILED,
                ErrorCode.MISSING_DEPENDENCIES,
            )
            stand_in.drop_everyone()  # the next connection sends it again
            await eventually(lambda: laptop.info(TECH).pending == 0)
        finally:
            await client.stop()
        await fast_client(phone, relay.url, relay.token("alice", "phone")).sync_once(10)
        assert await symbols(phone) == ["AAPL", "FLAKY", "MSFT"]


async def test_a_refused_change_never_reaches_the_relay_or_another_device(
    relay: Any, tmp_path: Path, helpers: Any
) -> None:
    eventually, fast_client, opened_replica = (
        helpers.eventually,
        helpers.fast_client,
        helpers.opened_replica,
    )
    async with (
        refusing_relay(relay.url, refuse_symbol("EVIL", ErrorCode.REFUSED)) as (url, stand_in),
        opened_replica(tmp_path / "laptop.db") as laptop,
        opened_replica(tmp_path / "phone.db") as phone,
    ):
        client = fast_client(laptop, url, relay.token("alice", "laptop"))
        client.start()
        try:
            watchlist = await laptop.create_watchlist("Tech")
            await client.wait_in_sync(10)
            await watchlist.add("AAPL")
            await watchlist.add("EVIL")
            await watchlist.add("MSFT")
            await eventually(lambda: len(stand_in.refused) >= 1)
            await client.wait_in_sync(10)
        finally:
            await client.stop()
        await fast_client(phone, relay.url, relay.token("alice", "phone")).sync_once(10)
        assert await symbols(phone) == ["AAPL", "MSFT"]
        assert await symbols(laptop) == ["AAPL", "MSFT"]  # rolled back, the others kept
        assert laptop.info(TECH).pending == 0


async def test_a_refused_change_between_two_accepted_ones_across_a_reconnect_and_a_restart(
    relay: Any, tmp_path: Path, helpers: Any
) -> None:
    eventually, fast_client, opened_replica = (
        helpers.eventually,
        helpers.fast_client,
        helpers.opened_replica,
    )
    path = tmp_path / "laptop.db"
    async with refusing_relay(relay.url, refuse_symbol("EVIL", ErrorCode.REFUSED)) as (url, _):
        async with opened_replica(path) as laptop:
            client = fast_client(laptop, url, relay.token("alice", "laptop"))
            await (await laptop.create_watchlist("Tech")).add("AAPL")
            await client.sync_once(10)
        # Offline: a refused change between two accepted ones, then the app ends.
        async with opened_replica(path) as laptop:
            watchlist = await laptop.watchlist(TECH)
            await watchlist.add("EVIL")
            await watchlist.add("MSFT")
        # Restarted, it syncs live, is dropped and reconnects.
        async with opened_replica(path) as laptop:
            client = fast_client(laptop, url, relay.token("alice", "laptop"))
            client.start()
            try:
                await eventually(lambda: laptop.info(TECH).pending == 0)
                refusals = laptop.refusals(TECH)
                assert [(r.code, r.doc_id) for r in refusals] == [(ErrorCode.REFUSED, TECH)]
                assert "EVIL" in refusals[0].summary
                await client.wait_in_sync(10)
            finally:
                await client.stop()
            assert await symbols(laptop) == ["AAPL", "MSFT"]
    async with opened_replica(tmp_path / "phone.db") as phone:
        await fast_client(phone, relay.url, relay.token("alice", "phone")).sync_once(10)
        assert await symbols(phone) == ["AAPL", "MSFT"]


class NoEvil(Extension):
    """An app's rule on the relay: no watchlist may gain the symbol EVIL."""

    async def before_apply(self, change: ProposedUpdate) -> None:
        added = change.candidate.changed.get("symbols", frozenset())
        if change.kind is DocumentKind.WATCHLIST and any(k.startswith("EVIL\x1f") for k in added):
            raise UpdateRefused("EVIL is not a symbol we follow")


@asynccontextmanager
async def relay_with(data_dir: Path, *extra: Extension) -> AsyncIterator[tuple[str, bytes]]:
    """A real relay whose extensions are the defaults plus ``extra``: (its URL, its secret)."""
    secret = load_or_create_secret(data_dir)
    app = create_app(
        RelayConfig(data_dir=data_dir, heartbeat=5.0),
        extensions=[*default_extensions(secret), *extra],
    )
    runner = JsonErrorAppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"ws://127.0.0.1:{port}/ws", secret
    finally:
        await runner.cleanup()


def forward_all(update: Update) -> str | None:
    return None


async def test_an_extensions_refusal_between_two_accepted_changes_across_processes(
    tmp_path: Path, helpers: Any
) -> None:
    """Made by one process, refused and rolled back in another across a reconnect, gone for
    good after a restart: the accepted changes on the relay and every device, the refused one
    nowhere, and the replica reports it."""
    run_cli, eventually = helpers.run_cli, helpers.eventually
    laptop, phone = str(tmp_path / "laptop.db"), str(tmp_path / "phone.db")
    async with relay_with(tmp_path / "relay", NoEvil()) as (relay_url, secret):
        token = issue_token(secret, "alice", device="laptop")
        async with refusing_relay(relay_url, forward_all) as (url, stand_in):
            for args in (("create", "Tech"), ("add", "Tech", "AAPL")):
                assert (await run_cli("--db", laptop, "watchlist", *args))[0] == 0
            code, _, err = await run_cli("--db", laptop, "sync", "--server", url, "--token", token)
            assert code == 0, err
            # Offline, one process per edit: the refused one between two accepted ones.
            for symbol in ("EVIL", "MSFT"):
                assert (await run_cli("--db", laptop, "watchlist", "add", "Tech", symbol))[0] == 0
            async with helpers.opened_replica(Path(laptop)) as replica:
                client = helpers.fast_client(replica, url, token)
                client.start()
                try:
                    await eventually(lambda: replica.info(TECH).pending == 0)
                    await client.wait_in_sync(10)
                    assert await symbols(replica) == ["AAPL", "MSFT"]
                    before = stand_in.connections
                    stand_in.drop_everyone()  # a reconnect brings nothing of it back
                    await eventually(lambda: stand_in.connections > before and client.connected)
                    await client.wait_in_sync(10)
                    await (await replica.watchlist(TECH)).add("NVDA")
                    await eventually(lambda: replica.info(TECH).pending == 0)
                    await client.wait_in_sync(10)
                finally:
                    await client.stop()
                refusals = replica.refusals(TECH)
                assert [(r.code, r.seq > 0) for r in refusals] == [(ErrorCode.REFUSED, True)]
                assert "EVIL" in refusals[0].summary
                assert "we follow" in refusals[0].message
            # The app restarted: the rollback is in the file, and nothing is left to send.
            code, out, err = await run_cli("--db", laptop, "watchlist", "show", "Tech")
            assert (
                code == 0 and "EVIL" not in out and all(s in out for s in ("AAPL", "MSFT", "NVDA"))
            )
            code, _, err = await run_cli("--db", laptop, "sync")
            assert code == 0, err
        phone_token = issue_token(secret, "alice", device="phone")
        code, _, err = await run_cli(
            "--db", phone, "sync", "--server", relay_url, "--token", phone_token
        )
        assert code == 0, err
        code, out, _ = await run_cli("--db", phone, "watchlist", "show", "Tech")
        assert code == 0 and "EVIL" not in out and all(s in out for s in ("AAPL", "MSFT", "NVDA"))


async def test_a_change_to_retry_later_goes_again_on_the_same_connection(
    relay: Any, tmp_path: Path, helpers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A webhook down for a moment: the change is sent again after a short wait (twice here,
    the wait doubling), as a new Update, without waiting for a reconnect."""
    monkeypatch.setattr(document_sync_module, "RETRY_BASE_SECONDS", 0.05)
    rule = refuse_symbol("FLAKY", ErrorCode.EXTENSION_FAILED, times=2)
    async with (
        refusing_relay(relay.url, rule) as (url, stand_in),
        helpers.opened_replica(tmp_path / "laptop.db") as laptop,
        helpers.opened_replica(tmp_path / "phone.db") as phone,
    ):
        client = helpers.fast_client(laptop, url, relay.token("alice", "laptop"))
        client.start()
        try:
            watchlist = await laptop.create_watchlist("Tech")
            await client.wait_in_sync(10)
            await watchlist.add("AAPL")
            await watchlist.add("FLAKY")
            await helpers.eventually(lambda: laptop.info(TECH).pending == 0, timeout=10)
            assert [code for _doc, _seq, code in stand_in.refused] == [
                ErrorCode.EXTENSION_FAILED
            ] * 2
            seqs = [seq for _doc, seq, _code in stand_in.refused]
            assert seqs[0] < seqs[1]  # each retry under a new seq
            assert stand_in.connections == 1  # on the same connection
            assert laptop.refusals() == []
        finally:
            await client.stop()
        await helpers.fast_client(phone, relay.url, relay.token("alice", "phone")).sync_once(10)
        assert await symbols(phone) == ["AAPL", "FLAKY"]


async def test_sync_once_ends_as_soon_as_a_refused_change_is_rolled_back(
    relay: Any, tmp_path: Path, helpers: Any
) -> None:
    """One pending change, refused: once it is rolled back nothing is pending and no frame is
    due, so the one-shot sync ends then (it used to wait for its timeout and fail)."""
    async with (
        refusing_relay(relay.url, refuse_symbol("EVIL", ErrorCode.REFUSED)) as (url, _),
        helpers.opened_replica(tmp_path / "laptop.db") as laptop,
    ):
        token = relay.token("alice", "laptop")
        watchlist = await laptop.create_watchlist("Tech")
        await watchlist.add("AAPL")
        assert await helpers.fast_client(laptop, url, token).sync_once(10)
        await watchlist.add("EVIL")
        for snapshot_timeout in (0.0, 2.0):  # without prices to wait for, and with them
            started = time.monotonic()
            assert await helpers.fast_client(
                laptop, url, token, snapshot_timeout=snapshot_timeout
            ).sync_once(8)
            assert time.monotonic() - started < 5
            assert watchlist.symbols == ["AAPL"] and laptop.info(TECH).pending == 0
            await watchlist.add("EVIL")
        assert [r.code for r in laptop.refusals(TECH)] == [ErrorCode.REFUSED] * 2


async def test_a_relay_restored_from_a_backup_refuses_one_change_and_keeps_the_others(
    tmp_path: Path, helpers: Any
) -> None:
    """The relay lost a settled change (MSFT, restored from an older backup); offline, the device
    then made a change its rule refuses (EVIL) and a valid one (a note). What the relay lacks of
    the confirmed content goes first, then each change on its own: EVIL alone is rolled back."""
    data, backup = tmp_path / "relay", tmp_path / "backup"
    async with helpers.opened_replica(tmp_path / "laptop.db") as laptop:
        async with relay_with(data, NoEvil()) as (url, secret):
            token = issue_token(secret, "alice", device="laptop")
            watchlist = await laptop.create_watchlist("Tech")
            await watchlist.add("AAPL")
            assert await helpers.fast_client(laptop, url, token).sync_once(10)
        shutil.copytree(data, backup)
        async with relay_with(data, NoEvil()) as (url, secret):
            await watchlist.add("MSFT")
            assert await helpers.fast_client(laptop, url, token).sync_once(10)
        shutil.rmtree(data)
        shutil.copytree(backup, data)  # restored: MSFT is gone
        await watchlist.add("EVIL")
        await watchlist.set_note("AAPL", "core")
        async with relay_with(data, NoEvil()) as (url, secret):
            assert await helpers.fast_client(laptop, url, token).sync_once(10)
            assert [r.summary for r in laptop.refusals(TECH)] == ["add EVIL to Tech"]
            assert [(e.symbol, e.note) for e in watchlist.entries()] == [
                ("AAPL", "core"),
                ("MSFT", None),
            ]
            assert laptop.info(TECH).pending == 0
            async with helpers.opened_replica(tmp_path / "phone.db") as phone:
                phone_token = issue_token(secret, "alice", device="phone")
                assert await helpers.fast_client(phone, url, phone_token).sync_once(10)
                phone_list = await phone.watchlist(TECH)
                assert [(e.symbol, e.note) for e in phone_list.entries()] == [
                    ("AAPL", "core"),
                    ("MSFT", None),
                ]


async def test_followed_symbols_changing_before_the_welcome_send_no_subscribe(
    tmp_path: Path, helpers: Any
) -> None:
    """An edit while a reconnect waits for the Welcome re-checks the followed symbols: no
    Subscribe may go before the Welcome (a protocol error); the Welcome's handling sends it."""
    async with helpers.opened_replica(tmp_path / "laptop.db") as laptop:
        await (await laptop.create_watchlist("Tech")).add("AAPL")
        client = SyncClient(laptop, "ws://127.0.0.1:9/ws", "token")
        session = ClientSession()
        session.hello("token")
        connection = _Connection(client, None, DeviceSync(session))  # type: ignore[arg-type]
        await connection._update_subscription()
        assert connection.outbox.empty() and connection.subscribed is None
