"""Who may do what: every principal against every operation, on a real relay on 127.0.0.1.

Principals: alice (the owner of Tech), bob (a read-write share), carol (a read-only share), dave
(a stranger), erin (a share since revoked), alice's lost laptop (a revoked device), an expired
token of alice, and alice's publish-only and admin-only tokens. Each cell is the exact outcome:
``ok``, an Error's code (``fatal:`` when the relay ends the connection), or an HTTP status.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pycrdt import Doc, Map

from foliosync.server.sharing import Revocation
from foliosync.sync.model import DocumentKind, document_id
from foliosync.sync.protocol import (
    Ack,
    Error,
    Frame,
    Hello,
    PriceSnapshot,
    Publish,
    Published,
    Subscribe,
    SyncReply,
    SyncRequest,
    Update,
    Welcome,
    decode_frame,
    encode_frame,
)

TECH = document_id(DocumentKind.WATCHLIST, "Tech")
SHARED = f"alice/{TECH}"

PRINCIPALS = (
    "owner",
    "read_write",
    "read_only",
    "stranger",
    "revoked_share",
    "revoked_device",
    "expired",
    "publish_only",
    "admin_only",
)

_FATAL_TOKEN = "fatal:auth_failed"
_SYNCERS = ("owner", "read_write", "read_only", "stranger", "revoked_share")

# principal -> operation -> outcome
EXPECTED: dict[str, dict[str, object]] = {
    p: {
        "sync": {"owner": "ok", "read_write": "ok", "read_only": "ok"}.get(p, "forbidden"),
        "update": {"owner": "ok", "read_write": "ok", "read_only": "read_only"}.get(p, "forbidden"),
        "subscribe_prices": "ok",
        "publish_ticks": "forbidden",
        "POST /v1/shares": 201,
        "DELETE /v1/shares": 200 if p == "owner" else 404,
        "GET /v1/shares": 200,
        "GET /v1/prices": 200,
        "GET /v1/prices/stream": 200,
        "POST /v1/ticks": 403,
        "GET /metrics": 403,
        "POST /v1/revocations": 403,
    }
    for p in _SYNCERS
}
_REFUSED_TOKEN: dict[str, object] = {
    "sync": _FATAL_TOKEN,
    "update": _FATAL_TOKEN,
    "subscribe_prices": _FATAL_TOKEN,
    "publish_ticks": _FATAL_TOKEN,
    **{
        route: 401
        for route in (
            "POST /v1/shares",
            "DELETE /v1/shares",
            "GET /v1/shares",
            "GET /v1/prices",
            "GET /v1/prices/stream",
            "POST /v1/ticks",
            "GET /metrics",
            "POST /v1/revocations",
        )
    },
}
EXPECTED["revoked_device"] = dict(_REFUSED_TOKEN)
EXPECTED["expired"] = dict(_REFUSED_TOKEN)
EXPECTED["publish_only"] = {
    "sync": "auth_failed",
    "update": "auth_failed",
    "subscribe_prices": "forbidden",
    "publish_ticks": "ok",
    "POST /v1/shares": 403,
    "DELETE /v1/shares": 403,
    "GET /v1/shares": 403,
    "GET /v1/prices": 403,
    "GET /v1/prices/stream": 403,
    "POST /v1/ticks": 200,
    "GET /metrics": 403,
    "POST /v1/revocations": 403,
}
EXPECTED["admin_only"] = {
    **_REFUSED_TOKEN,
    **{route: 403 for route in _REFUSED_TOKEN if route.startswith(("GET", "POST", "DELETE"))},
    "GET /metrics": 200,
    "POST /v1/revocations": 200,
}
OPERATIONS = tuple(EXPECTED["owner"])
_HTTP_CODES = {200: None, 201: None, 401: "unauthorized", 403: "forbidden", 404: "not_found"}


def crdt_update(symbol: str) -> bytes:
    doc: Doc = Doc()
    doc.get("symbols", type=Map)[f"{symbol}\x1fraw"] = {"t": "0" * 17}
    return doc.get_update()


async def _receive(ws: aiohttp.ClientWebSocketResponse) -> Frame | str:
    message = await ws.receive(timeout=5)
    if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
        return "closed"
    assert message.type == aiohttp.WSMsgType.BINARY, message
    return decode_frame(message.data, max_frame_size=1 << 30)


def _outcome(frame: Frame | str, allowed: type) -> object:
    if isinstance(frame, Error):
        return f"fatal:{frame.code}" if frame.fatal else frame.code
    assert isinstance(frame, allowed), frame
    return "ok"


@pytest.fixture
async def world(relay_server: Any, tmp_path: Path) -> AsyncIterator[tuple[Any, dict[str, str]]]:
    async with relay_server(tmp_path / "relay") as running:
        relay = running.relay
        await relay.grant_share("alice", TECH, "bob", "write")
        await relay.grant_share("alice", TECH, "carol", "read")
        await relay.grant_share("alice", TECH, "erin", "read")
        await relay.revoke_share("alice", TECH, "erin")
        await relay.grant_share("alice", TECH, "yan", "read")  # what DELETE takes away
        lost = running.token("alice", "laptop")
        await relay.revoke_tokens(Revocation(int(time.time()), user="alice", device="laptop"))
        tokens = {
            "owner": running.token("alice", "desk"),
            "read_write": running.token("bob", "b1"),
            "read_only": running.token("carol", "c1"),
            "stranger": running.token("dave", "d1"),
            "revoked_share": running.token("erin", "e1"),
            "revoked_device": lost,
            "expired": running.token("alice", "old", ttl_seconds=10, now=time.time() - 60),
            "publish_only": running.token("alice", "feed", scopes=frozenset({"publish"})),
            "admin_only": running.token("alice", "ops", scopes=frozenset({"admin"})),
        }
        yield running, tokens


async def _ws_operation(running: Any, token: str, principal: str, operation: str) -> object:
    doc = TECH if principal in ("owner", "revoked_device", "expired") else SHARED
    async with aiohttp.ClientSession() as http, http.ws_connect(running.url) as ws:
        await ws.send_bytes(encode_frame(Hello(1, token, "matrix")))
        welcome = await _receive(ws)
        if not isinstance(welcome, Welcome):
            return _outcome(welcome, Welcome)
        if operation == "sync":
            await ws.send_bytes(encode_frame(SyncRequest(doc, Doc().get_state())))
            return _outcome(await _receive(ws), SyncReply)
        if operation == "update":
            await ws.send_bytes(encode_frame(SyncRequest(doc, Doc().get_state())))
            await _receive(ws)  # the SyncReply, or the same refusal as the Update's
            await ws.send_bytes(encode_frame(Update(doc, 1, crdt_update("NVDA"))))
            answer = await _receive(ws)
            if isinstance(answer, Error):
                assert (answer.doc, answer.seq) == (doc, 1) or answer.fatal, answer
            return _outcome(answer, Ack)
        if operation == "subscribe_prices":
            await ws.send_bytes(encode_frame(Subscribe(("AAPL",))))
            return _outcome(await _receive(ws), PriceSnapshot)
        assert operation == "publish_ticks"
        tick = ["AAPL", "187.25", int(time.time() * 1000)]
        await ws.send_bytes(encode_frame(Publish(1, (tick,))))
        return _outcome(await _receive(ws), Published)


async def _http_operation(running: Any, token: str, operation: str) -> object:
    method, _, route = operation.partition(" ")
    path, body = route, None
    if route == "/v1/shares" and method == "POST":
        body = {"doc": TECH, "user": "zed", "access": "read"}
    elif route == "/v1/shares" and method == "DELETE":
        path = f"/v1/shares/{TECH}/yan"
    elif route.startswith("/v1/prices"):
        path = route + "?symbols=AAPL"
    elif route == "/v1/ticks":
        body = {"ticks": [{"symbol": "AAPL", "price": "1", "time_ms": int(time.time() * 1000)}]}
    elif route == "/v1/revocations":
        body = {"device": "nothing-here"}
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, running.http + path, json=body, headers=headers) as response,
    ):
        if response.status >= 400:
            payload = await response.json()
            assert payload["code"] == _HTTP_CODES[response.status], payload
            assert isinstance(payload["error"], str) and payload["error"]
        return response.status


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("principal", PRINCIPALS)
async def test_authorization_matrix(world: Any, principal: str, operation: str) -> None:
    running, tokens = world
    token = tokens[principal]
    if " " in operation:
        outcome = await _http_operation(running, token, operation)
    else:
        outcome = await _ws_operation(running, token, principal, operation)
    assert outcome == EXPECTED[principal][operation]


async def test_the_matrix_left_the_relay_as_the_owner_made_it(world: Any) -> None:
    """Refused writes stored nothing: only the owner's and the read-write grantee's."""
    running, tokens = world
    for principal in ("read_only", "stranger", "revoked_share", "revoked_device"):
        await _ws_operation(running, tokens[principal], principal, "update")
    assert await running.relay.store.documents("alice") == []
    assert await running.relay.store.documents("carol") == []
    assert await running.relay.store.documents("dave") == []
