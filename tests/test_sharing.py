"""Sharing end to end: a real relay on 127.0.0.1, real WebSocket clients, real replicas.

Shares read-only and read-write, their live revocation on open sockets, a lost device shut out,
a read-only user's edit rolled back on their device, same-named documents of two users kept
apart, and a shared portfolio edited by both users converging. The share stores run the
contract of ``foliosync.testing.share_contract``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pycrdt import Doc, Map

from foliosync.client.replica import Replica
from foliosync.client.shares import share_state
from foliosync.server.sharing import MemoryShareStore, Revocation, SQLiteShareStore
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.protocol import (
    Ack,
    Error,
    Hello,
    SyncRequest,
    Update,
)
from foliosync.testing.share_contract import share_checks

TECH = document_id(DocumentKind.WATCHLIST, "Tech")
MAIN = document_id(DocumentKind.PORTFOLIO, "Main")


# -- the share stores' contract ------------------------------------------------------------------


@pytest.mark.parametrize("check", share_checks(durable=False), ids=str)
async def test_memory_share_store_contract(check: Any) -> None:
    store = MemoryShareStore()

    async def open_store() -> MemoryShareStore:
        return store

    await check.run(open_store)


@pytest.mark.parametrize("check", share_checks(durable=True), ids=str)
async def test_sqlite_share_store_contract(check: Any, tmp_path: Path) -> None:
    await check.run(lambda: SQLiteShareStore.open(tmp_path / "shares.db"))


def _services() -> ModuleType:
    name = "foliosync_test_services"
    if name not in sys.modules:
        path = Path(__file__).with_name("services.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.mark.parametrize("check", share_checks(durable=True), ids=str)
async def test_postgres_share_store_contract(check: Any) -> None:
    from foliosync.server.sharing_pg import PostgresShareStore

    async with _services().postgres_database() as dsn:
        await check.run(lambda: PostgresShareStore.open(dsn))


# -- a client speaking the protocol by hand ------------------------------------------------------


Raw = _services().RawClient


def symbol_update(symbol: str) -> bytes:
    doc: Doc = Doc()
    doc.get("symbols", type=Map)[f"{symbol}\x1fraw"] = {"t": "0" * 17}
    return doc.get_update()


@pytest.fixture
async def raw(relay: Any) -> AsyncIterator[Callable[[], Awaitable[Raw]]]:
    async with aiohttp.ClientSession() as http:

        async def connect() -> Raw:
            return Raw(await http.ws_connect(relay.url))

        yield connect


async def _http(relay: Any, token: str, method: str, path: str, body: Any = None) -> Any:
    async with (
        aiohttp.ClientSession() as http,
        http.request(
            method, relay.http + path, json=body, headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        return response.status, await response.json()


# -- the relay -----------------------------------------------------------------------------------


async def test_a_share_fans_changes_out_both_ways_and_revocation_cuts_it_at_once(
    relay: Any, raw: Any
) -> None:
    alice_token, bob_token = relay.token("alice", "a1"), relay.token("bob", "b1")
    status, share = await _http(
        relay, alice_token, "POST", "/v1/shares", {"doc": TECH, "user": "bob", "access": "write"}
    )
    assert status == 201 and share["id"] == f"alice/{TECH}" and share["access"] == "write"
    alice, bob = await raw(), await raw()
    await alice.hello(alice_token)
    assert (await bob.hello(bob_token)).documents == (f"alice/{TECH}",)
    await alice.sync(TECH)
    await bob.sync(f"alice/{TECH}")

    await alice.send(Update(TECH, 1, symbol_update("AAPL")))
    assert await alice.receive() == Ack(TECH, 1)
    got = await bob.receive()
    assert isinstance(got, Update) and got.doc == f"alice/{TECH}" and got.changed_by == "a1"

    await bob.send(Update(f"alice/{TECH}", 1, symbol_update("MSFT")))
    assert await bob.receive() == Ack(f"alice/{TECH}", 1)
    got = await alice.receive()
    assert isinstance(got, Update) and got.doc == TECH and got.changed_by == "b1"

    status, _ = await _http(relay, alice_token, "DELETE", f"/v1/shares/{TECH}/bob")
    assert status == 200
    notice = await bob.receive()
    assert isinstance(notice, Error) and not notice.fatal
    assert (notice.code, notice.doc, notice.seq) == ("revoked", f"alice/{TECH}", None)
    await alice.send(Update(TECH, 2, symbol_update("NVDA")))
    assert await alice.receive() == Ack(TECH, 2)
    await bob.quiet()  # alice's change did not reach bob
    await bob.send(Update(f"alice/{TECH}", 2, symbol_update("EVIL")))
    refused = await bob.receive()
    assert isinstance(refused, Error) and (refused.code, refused.seq) == ("revoked", 2)
    await alice.quiet()
    # A new connection of bob's: not in his Welcome, and forbidden.
    again = await raw()
    assert (await again.hello(bob_token)).documents == ()
    await again.send(SyncRequest(f"alice/{TECH}", Doc().get_state()))
    forbidden = await again.receive()
    assert isinstance(forbidden, Error) and forbidden.code == "forbidden"
    doc = await relay.relay.read_document("alice", TECH)
    assert sorted(k.split("\x1f")[0] for k in doc.get("symbols", type=Map)) == [
        "AAPL",
        "MSFT",
        "NVDA",
    ]


async def test_a_share_granted_while_connected_is_announced(relay: Any, raw: Any) -> None:
    bob = await raw()
    await bob.hello(relay.token("bob", "b1"))
    await relay.relay.grant_share("alice", TECH, "bob", "read")
    notice = await bob.receive()
    assert isinstance(notice, Error) and not notice.fatal
    assert (notice.code, notice.doc) == ("shared", f"alice/{TECH}")
    assert "read-only" in notice.message
    await bob.sync(f"alice/{TECH}")
    await bob.send(Update(f"alice/{TECH}", 1, symbol_update("AAPL")))
    refused = await bob.receive()
    assert isinstance(refused, Error) and (refused.code, refused.seq) == ("read_only", 1)


async def test_a_revoked_device_is_shut_out_with_its_sockets_open(relay: Any, raw: Any) -> None:
    laptop_token = relay.token("alice", "laptop")
    phone_token = relay.token("alice", "phone")
    laptop, phone, other_laptop = await raw(), await raw(), await raw()
    await laptop.hello(laptop_token)
    await phone.hello(phone_token)
    await other_laptop.hello(relay.token("bob", "laptop"))
    admin = relay.token("ops", scopes=frozenset({"admin"}))
    status, answer = await _http(
        relay, admin, "POST", "/v1/revocations", {"device": "laptop", "user": "alice"}
    )
    assert (status, answer) == (200, {"closed": 1})
    fatal = await laptop.receive()
    assert isinstance(fatal, Error) and fatal.fatal
    assert (fatal.code, fatal.message) == ("auth_failed", "token revoked")
    assert await laptop.receive() is None
    await phone.quiet()
    await other_laptop.quiet()  # bob's laptop is another device
    again = await raw()
    await again.send(Hello(1, laptop_token, "raw"))
    refused = await again.receive()
    assert isinstance(refused, Error) and refused.code == "auth_failed" and refused.fatal
    status, body = await _http(relay, laptop_token, "GET", "/v1/shares")
    assert (status, body["code"], body["error"]) == (401, "unauthorized", "token revoked")
    # A token issued after the revocation (the laptop found, or a new one) works.
    await asyncio.sleep(1.05)
    await (await raw()).hello(relay.token("alice", "laptop"))


async def test_one_token_is_revoked_by_its_jti(relay: Any, raw: Any) -> None:
    from foliosync.server.auth import verify_token

    first = relay.token("alice", "desk")
    second = relay.token("alice", "desk", ttl_seconds=3600)  # other claims: another jti
    jti = verify_token(relay.secret, first).token_id
    assert jti and jti != verify_token(relay.secret, second).token_id
    one, two = await raw(), await raw()
    await one.hello(first)
    await two.hello(second)
    assert await relay.relay.revoke_tokens(Revocation(int(time.time()), jti=jti)) == 1
    fatal = await one.receive()
    assert isinstance(fatal, Error) and fatal.code == "auth_failed" and fatal.fatal
    await two.quiet()


async def test_shares_and_revocations_outlive_a_restart(relay_server: Any, tmp_path: Path) -> None:
    data = tmp_path / "relay"
    async with relay_server(data) as running:
        await running.relay.grant_share("alice", TECH, "bob", "read")
        lost = running.token("alice", "laptop")
        await running.relay.revoke_tokens(Revocation(int(time.time()), "alice", "laptop"))
        bob = running.token("bob", "b1")
    assert (data / "shares.db").exists()
    async with relay_server(data) as running, aiohttp.ClientSession() as http:
        status, body = await _http(running, bob, "GET", "/v1/shares")
        assert status == 200 and [s["id"] for s in body["shared_with_me"]] == [f"alice/{TECH}"]
        status, _ = await _http(running, lost, "GET", "/v1/shares")
        assert status == 401
        async with http.ws_connect(running.url) as ws:
            client = Raw(ws)
            assert (await client.hello(bob)).documents == (f"alice/{TECH}",)


async def test_bad_share_requests_get_clear_errors(relay: Any) -> None:
    token = relay.token("alice", "a1")
    for body, message in (
        ({"doc": "index", "user": "bob"}, "not a document one can share"),
        ({"doc": TECH, "user": "alice"}, "themselves"),
        ({"doc": TECH, "user": "bad user"}, "invalid user name"),
        ({"doc": TECH, "user": "bob", "access": "own"}, '"access"'),
        ({"doc": TECH}, '"user"'),
        ({"doc": TECH, "user": "bob", "extra": 1}, "unknown field"),
        ([1, 2], "JSON object"),
    ):
        status, answer = await _http(relay, token, "POST", "/v1/shares", body)
        assert status == 400 and answer["code"] == "bad_request", (body, answer)
        assert message in answer["error"], (body, answer)
    status, answer = await _http(relay, token, "DELETE", f"/v1/shares/{TECH}/nobody")
    assert (status, answer["code"]) == (404, "not_found")


# -- devices -------------------------------------------------------------------------------------


async def _symbols(replica: Replica, doc_id: str) -> list[str]:
    return sorted((await replica.watchlist(doc_id)).symbols)


async def test_a_read_only_users_edit_is_rolled_back_on_their_device(
    relay: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    alice_db, carol_db = await open_replica("alice"), await open_replica("carol")
    tech = await alice_db.create_watchlist("Tech")
    await tech.add(["AAPL", "MSFT"])
    await sync_clients(alice_db, relay.url, relay.token("alice", "a1")).sync_once(10)
    await relay.relay.grant_share("alice", TECH, "carol", "read")

    carol = sync_clients(carol_db, relay.url, relay.token("carol", "c1"))
    carol.start()
    shared = f"alice/{TECH}"
    await helpers.eventually(lambda: shared in carol_db.document_ids())
    await carol.wait_in_sync(10)
    assert carol_db.info(shared).name == "Tech"  # learnt from the document's meta
    assert await _symbols(carol_db, shared) == ["AAPL", "MSFT"]

    await (await carol_db.watchlist(shared)).add("EVIL")
    await helpers.eventually(lambda: bool(carol_db.refusals(shared)))
    refusal = carol_db.refusals(shared)[0]
    assert refusal.code == "read_only"
    await helpers.eventually(lambda: carol_db.info(shared).pending == 0)
    assert await _symbols(carol_db, shared) == ["AAPL", "MSFT"]
    assert share_state(carol_db, shared) == "read"
    doc = await relay.relay.read_document("alice", TECH)
    assert "EVIL\x1fraw" not in doc.get("symbols", type=Map)
    # Her index was not written with alice's id: only her own documents are there.
    assert (await carol_db.index()).get(shared) is None


async def test_two_users_same_named_watchlists_stay_two(
    relay: Any, open_replica: Any, sync_clients: Any
) -> None:
    alice_db, bob_db = await open_replica("alice"), await open_replica("bob")
    await (await alice_db.create_watchlist("Tech")).add("AAPL")
    await (await bob_db.create_watchlist("Tech")).add("TSLA")
    await sync_clients(alice_db, relay.url, relay.token("alice", "a1")).sync_once(10)
    await relay.relay.grant_share("alice", TECH, "bob", "write")
    await sync_clients(bob_db, relay.url, relay.token("bob", "b1")).sync_once(10)
    assert await _symbols(bob_db, TECH) == ["TSLA"]
    assert await _symbols(bob_db, f"alice/{TECH}") == ["AAPL"]
    assert await _symbols(alice_db, TECH) == ["AAPL"]
    assert sorted(i.id for i in bob_db.documents()) == sorted([TECH, f"alice/{TECH}"])


async def test_a_shared_portfolio_edited_by_both_users_converges(
    relay: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    alice_db, bob_db = await open_replica("alice"), await open_replica("bob")
    mine = await alice_db.create_portfolio("Main")
    await mine.add_trade("AAPL", 10, "150")
    alice = sync_clients(alice_db, relay.url, relay.token("alice", "a1"))
    await alice.sync_once(10)
    await relay.relay.grant_share("alice", MAIN, "bob", "write")
    bob = sync_clients(bob_db, relay.url, relay.token("bob", "b1"))
    await bob.sync_once(10)
    shared = f"alice/{MAIN}"
    theirs = await bob_db.portfolio(shared)
    # Both edit offline, then both sync live at once.
    await mine.add_trade("MSFT", 5, "400")
    await theirs.add_trade("AAPL", -4, "160")
    await theirs.add_trade("NVDA", 2, "900")
    alice.start()
    bob.start()
    await alice.wait_in_sync(10)
    await bob.wait_in_sync(10)

    async def same() -> bool:
        a = {s: p.quantity for s, p in (await alice_db.portfolio(MAIN)).positions().items()}
        b = {s: p.quantity for s, p in (await bob_db.portfolio(shared)).positions().items()}
        return a == b == {"AAPL": Decimal(6), "MSFT": Decimal(5), "NVDA": Decimal(2)}

    await helpers.eventually(same)


@settings(
    max_examples=6,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    owner_symbols=st.lists(st.sampled_from(["AAPL", "MSFT", "NVDA", "TSLA"]), max_size=3),
    grantee_symbols=st.lists(st.sampled_from(["AAPL", "GOOG", "AMZN", "META"]), max_size=3),
    removed=st.lists(st.sampled_from(["AAPL", "MSFT", "GOOG"]), max_size=2),
)
async def test_a_shared_watchlist_converges_whatever_both_users_do(
    relay_server: Any,
    tmp_path_factory: Any,
    helpers: Any,
    owner_symbols: list[str],
    grantee_symbols: list[str],
    removed: list[str],
) -> None:
    base = tmp_path_factory.mktemp("converge")
    async with (
        relay_server(base / "relay") as relay,
        helpers.opened_replica(base / "alice.db") as alice_db,
        helpers.opened_replica(base / "bob.db") as bob_db,
    ):
        tech = await alice_db.create_watchlist("Tech")
        await tech.add(["AAPL"])
        alice = helpers.fast_client(alice_db, relay.url, relay.token("alice", "a1"))
        await alice.sync_once(10)
        await relay.relay.grant_share("alice", TECH, "bob", "write")
        bob = helpers.fast_client(bob_db, relay.url, relay.token("bob", "b1"))
        await bob.sync_once(10)
        theirs = await bob_db.watchlist(f"alice/{TECH}")
        if owner_symbols:
            await tech.add(owner_symbols)
        if grantee_symbols:
            await theirs.add(grantee_symbols)
        if removed:
            await theirs.remove(removed)
        for _ in range(2):  # each sees the other's changes after two rounds
            await alice.sync_once(10)
            await bob.sync_once(10)
        assert await _symbols(alice_db, TECH) == await _symbols(bob_db, f"alice/{TECH}")


async def test_a_device_stops_syncing_a_revoked_share_and_keeps_its_copy(
    relay: Any, open_replica: Any, sync_clients: Any, helpers: Any
) -> None:
    alice_db, bob_db = await open_replica("alice"), await open_replica("bob")
    tech = await alice_db.create_watchlist("Tech")
    await tech.add("AAPL")
    alice = sync_clients(alice_db, relay.url, relay.token("alice", "a1"))
    await alice.sync_once(10)
    await relay.relay.grant_share("alice", TECH, "bob", "write")
    bob = sync_clients(bob_db, relay.url, relay.token("bob", "b1"))
    bob.start()
    shared = f"alice/{TECH}"
    await helpers.eventually(lambda: shared in bob_db.document_ids())
    await bob.wait_in_sync(10)
    await relay.relay.revoke_share("alice", TECH, "bob")
    await helpers.eventually(lambda: share_state(bob_db, shared) == "revoked")
    await tech.add("NVDA")
    await alice.sync_once(10)
    await bob.stop()
    # The next sync neither asks for it nor waits for it; the last copy stays.
    assert await sync_clients(bob_db, relay.url, relay.token("bob", "b1")).sync_once(10)
    assert await _symbols(bob_db, shared) == ["AAPL"]


async def test_the_sharing_commands(relay: Any, tmp_path: Path, helpers: Any) -> None:
    alice_db, bob_db = str(tmp_path / "alice.db"), str(tmp_path / "bob.db")
    alice = ("--server", relay.url, "--token", relay.token("alice", "a1"))
    bob = ("--server", relay.url, "--token", relay.token("bob", "b1"))
    run = helpers.run_cli
    assert (await run("--db", alice_db, "watchlist", "create", "Tech"))[0] == 0
    assert (await run("--db", alice_db, "watchlist", "add", "Tech", "AAPL"))[0] == 0
    assert (await run("--db", alice_db, "sync", *alice))[0] == 0
    status, out, err = await run("--db", alice_db, "share", "Tech", "bob", "--read-only", *alice)
    assert (status, out.strip(), err) == (0, "shared Tech with bob (read-only)", "")
    status, out, err = await run("--db", alice_db, "share", "Nothing", "bob", *alice)
    assert status == 1 and "no watchlist or portfolio 'Nothing'" in err
    assert (await run("--db", bob_db, "sync", *bob))[0] == 0
    status, out, _ = await run("--db", bob_db, "shares", *bob)
    assert status == 0 and f"Tech (alice, read-only)  alice/{TECH}" in out
    status, out, _ = await run("--db", bob_db, "watchlist", "list")
    assert status == 0 and "Tech (alice, read-only)  (1 symbols)" in out
    status, out, _ = await run("--db", alice_db, "shares", *alice)
    assert "Tech  with bob (read-only)" in out
    status, out, _ = await run("--db", alice_db, "unshare", "Tech", "bob", *alice)
    assert (status, out.strip()) == (0, "Tech is no longer shared with bob")
    assert (await run("--db", bob_db, "shares", *bob))[0] == 0
    status, out, _ = await run("--db", bob_db, "status")
    assert "Tech (alice, revoked)" in out and "share revoked" in out
    admin = relay.token("ops", scopes=frozenset({"admin"}))
    status, out, _ = await run(
        "token", "revoke", "laptop", "--user", "alice", "--server", relay.url, "--token", admin
    )
    assert (status, out.strip()) == (0, "revoked device laptop; 0 open connection(s) closed")
    status, _, err = await run("token", "revoke", "laptop", "--server", relay.url, *alice[2:])
    assert status == 1 and "admin scope" in err
