"""The relay's refusals end to end: a real relay on 127.0.0.1, real replica files, and in front of
the relay a small WebSocket stand-in that answers chosen Updates with a per-document Error, as a
relay extension would (it forwards everything else both ways, untouched)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pycrdt import Doc, Map

from foliosync.client.replica import Replica
from foliosync.sync.protocol import Error, ErrorCode, Update, decode_frame, encode_frame

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
        self.sockets: set[web.WebSocketResponse] = set()

    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        client = web.WebSocketResponse(max_msg_size=0)
        await client.prepare(request)
        self.sockets.add(client)
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

            tasks = [asyncio.ensure_future(pump_up()), asyncio.ensure_future(pump_down())]
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self.sockets.discard(client)
        await client.close()
        return client

    async def drop_everyone(self) -> None:
        for socket in list(self.sockets):
            await socket.close()


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
        await stand_in.drop_everyone()
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
    relay: Any, tmp_path: Path, helpers: Any
) -> None:
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
            assert client.last_error is not None
            assert client.last_error.code == ErrorCode.EXTENSION_FAILED
            await stand_in.drop_everyone()  # the next connection sends it again
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
        if hasattr(laptop, "refuse"):  # the replica rolls refused changes back
            assert await symbols(laptop) == ["AAPL", "MSFT"]
            assert laptop.info(TECH).pending == 0
        else:  # kept pending, never settled by a later Ack: nothing is lost
            assert "EVIL" in await symbols(laptop)
            assert laptop.info(TECH).pending > 0


@pytest.mark.skipif(
    not hasattr(Replica, "refuse"), reason="needs Replica.refuse (rolling back a refused row)"
)
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
                refusals: Any = laptop.refusals(TECH)  # type: ignore[attr-defined]
                assert [(r.code, r.doc_id) for r in refusals] == [(ErrorCode.REFUSED, TECH)]
                assert "EVIL" in refusals[0].summary
                await client.wait_in_sync(10)
            finally:
                await client.stop()
            assert await symbols(laptop) == ["AAPL", "MSFT"]
    async with opened_replica(tmp_path / "phone.db") as phone:
        await fast_client(phone, relay.url, relay.token("alice", "phone")).sync_once(10)
        assert await symbols(phone) == ["AAPL", "MSFT"]
