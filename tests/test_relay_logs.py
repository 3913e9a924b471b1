"""The relay's logs: JSON lines with context, and never a token or the secret, even at DEBUG with
good and bad tokens on every route a token reaches."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from foliosync.client.replica import Replica
from foliosync.client.sync import SyncClient
from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.server.logs import REDACTED, configure_logging, log_context
from foliosync.sync.errors import AuthError
from foliosync.sync.protocol import Error, Hello, decode_frame, encode_frame


def foliosync() -> str:
    script = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert script is not None
    return script


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def restore_logging() -> Any:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_a_json_line_carries_context_and_no_token(restore_logging: Any) -> None:
    secret = "s3cret-value-that-is-long-enough-to-matter-here"
    token = issue_token(secret.encode(), "alice", device="phone")
    stream = io.StringIO()
    configure_logging(logging.DEBUG, "json", secrets=[secret], stream=stream)
    log = logging.getLogger("foliosync.test")
    with log_context(connection="relay-1:7", user="alice", device="phone", doc="wl:ab12"):
        log.info("got %s with secret %s", token, secret)
        try:
            raise AuthError(f"bad token {token}")
        except AuthError:
            log.exception("refused")
    log.warning("outside any connection")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["level"] for line in lines] == ["INFO", "ERROR", "WARNING"]
    first = lines[0]
    assert first["logger"] == "foliosync.test"
    assert first["message"] == f"got {REDACTED} with secret {REDACTED}"
    assert (first["connection"], first["user"], first["device"], first["doc"]) == (
        "relay-1:7",
        "alice",
        "phone",
        "wl:ab12",
    )
    assert first["time"].endswith("Z")
    assert "AuthError" in lines[1]["exc"] and REDACTED in lines[1]["exc"]
    assert "connection" not in lines[2] and "doc" not in lines[2]
    assert token not in stream.getvalue() and secret not in stream.getvalue()


def test_text_logs_are_redacted_too(restore_logging: Any) -> None:
    token = issue_token(b"x" * 40, "bob")
    stream = io.StringIO()
    configure_logging(logging.INFO, "text", stream=stream)
    logging.getLogger("aiohttp.server").info("GET /v1/prices/stream?token=%s", token)
    assert token not in stream.getvalue()
    assert f"?token={REDACTED}" in stream.getvalue()


@asynccontextmanager
async def json_relay(data: Path, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    process = await asyncio.create_subprocess_exec(
        foliosync(),
        "relay",
        "--feed",
        "sim:always",
        "--port",
        str(port),
        "--data",
        str(data),
        "--log-format",
        "json",
        "--log-level",
        "DEBUG",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"foliosync relay on" in line, line
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_no_token_and_no_secret_in_a_debug_json_log(tmp_path: Path) -> None:
    data = tmp_path / "relay"
    secret = load_or_create_secret(data)
    port = free_port()
    http = f"http://127.0.0.1:{port}"
    good = issue_token(secret, "alice", device="phone")
    nameless = issue_token(secret, "alice")  # the device name then comes from the client
    publisher = issue_token(secret, "feeder", scopes=frozenset({"publish"}))
    admin = issue_token(secret, "ops", scopes=frozenset({"admin"}))
    expired = issue_token(secret, "alice", ttl_seconds=60, now=1_600_000_000)
    foreign = issue_token(b"another relay's secret, long enough", "alice")
    tampered = good[:-3] + ("AAA" if not good.endswith("AAA") else "BBB")
    tokens = [good, nameless, publisher, admin, expired, foreign, tampered]
    async with json_relay(data, port) as relay:
        replica = await Replica.open(tmp_path / "phone.db")
        try:
            wl = await replica.create_watchlist("Tech")
            await wl.add(["AAPL", "MSFT"])
            await SyncClient(replica, f"ws://127.0.0.1:{port}/ws", good).sync_once(timeout=20)
        finally:
            await replica.close()
        async with aiohttp.ClientSession() as session:
            for token in tokens:
                async with session.ws_connect(f"ws://127.0.0.1:{port}/ws") as ws:
                    await ws.send_bytes(encode_frame(Hello(1, token, "raw")))
                    reply = decode_frame((await ws.receive(timeout=10)).data)
                    if token in (good, nameless, publisher):
                        # An Error frame whose message a client fills as it likes, here with
                        # its token: the relay logs what clients report.
                        await ws.send_bytes(encode_frame(Error("client_bug", f"oops {token}")))
                        await ws.send_bytes(encode_frame(Hello(1, token, "")))  # a fatal repeat
                        await ws.receive(timeout=10)
                    else:
                        assert type(reply).__name__ == "Error", reply
                async with session.get(
                    f"{http}/metrics", headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    assert r.status in (200, 401, 403)
            for token in [*tokens, "not-a-token"]:
                headers = {"Authorization": f"Bearer {token}"}
                async with session.get(f"{http}/v1/prices?symbols=AAPL", headers=headers) as r:
                    assert r.status in (200, 401, 403)
                tick = {"symbol": "AAPL", "price": "190.5", "time_ms": 1}
                async with session.post(
                    f"{http}/v1/ticks", json={"ticks": [tick]}, headers=headers
                ) as r:
                    assert r.status in (200, 202, 400, 401, 403)
                async with session.get(
                    f"{http}/v1/prices/stream", params={"symbols": "AAPL", "token": token}
                ) as r:
                    if r.status == 200:
                        await asyncio.wait_for(r.content.readline(), 10)
                    else:
                        assert r.status in (401, 403)
        relay.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(relay.communicate(), 20)
    assert relay.returncode == 0, err[-2000:]
    log = out.decode() + err.decode()
    lines = [json.loads(line) for line in err.decode().splitlines() if line.strip()]
    assert lines, "the relay logged nothing at DEBUG"
    for line in lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
    assert any(line.get("logger") == "foliosync.relay" for line in lines)
    stored = [line for line in lines if "stored and acknowledged" in line["message"]]
    assert stored
    for line in stored:
        assert line.get("user") == "alice" and line.get("device") == "phone", line
        assert line.get("doc") and line.get("connection"), line
    assert any("authentication failed" in line["message"] for line in lines)
    assert any(REDACTED in line["message"] for line in lines)  # the reported Error was logged
    assert not [line for line in lines if line["logger"] == "aiohttp.access"]  # stays off
    for token in tokens:
        assert token not in log
        assert token.rsplit(".", 1)[1] not in log  # not even the signature alone
    assert secret.decode() not in log


async def test_a_reader_that_falls_behind_is_logged_under_its_own_connection(
    tmp_path: Path, helpers: Any, restore_logging: Any
) -> None:
    """Fan-out runs every receiver's delivery in the sender's task: the "fell behind" line and
    the close that follows must still name the slow reader, not the sender."""
    import io

    from pycrdt import Doc, Map

    from foliosync.server.auth import load_or_create_secret
    from foliosync.server.extensions import default_extensions
    from foliosync.sync.model import DocumentKind, document_id
    from foliosync.sync.protocol import SyncRequest, Update

    stream = io.StringIO()
    configure_logging(logging.INFO, "json", stream=stream)
    doc = document_id(DocumentKind.WATCHLIST, "Tech")
    # Large updates of a root no layout knows: the schema check (a default extension) is left
    # out, the rest of the defaults kept.
    no_schema = default_extensions(load_or_create_secret(tmp_path / "relay"))[:2]
    async with (
        helpers.serve_relay(
            tmp_path / "relay", feed="none", max_outbound_bytes=256 << 10, extensions=no_schema
        ) as relay,
        aiohttp.ClientSession() as session,
    ):
        sockets = {}
        for device in ("writer", "slow"):
            ws = await session.ws_connect(relay.url)
            await ws.send_bytes(encode_frame(Hello(1, relay.token("alice", device), device)))
            decode_frame((await ws.receive(timeout=10)).data)  # Welcome
            await ws.send_bytes(encode_frame(SyncRequest(doc, b"\x00")))
            decode_frame((await ws.receive(timeout=10)).data, max_frame_size=1 << 26)
            sockets[device] = ws
        slow_id = next(c.id for c in relay.relay.connections if c.device == "slow")
        writer_id = next(c.id for c in relay.relay.connections if c.device == "writer")
        crdt: Doc[Any] = Doc()
        crdt["m"] = Map()
        for seq in range(1, 200):  # the slow one never reads: its buffers fill, then its queue
            before = crdt.get_state()
            crdt["m"][f"k{seq}"] = "x" * (256 << 10)
            await sockets["writer"].send_bytes(
                encode_frame(Update(doc, seq, crdt.get_update(before)))
            )
            decode_frame((await sockets["writer"].receive(timeout=10)).data)  # its Ack
            if not any(c.id == slow_id for c in relay.relay.connections):
                break
        await helpers.eventually(lambda: all(c.id != slow_id for c in relay.relay.connections))
        for ws in sockets.values():
            await ws.close()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    behind = [line for line in lines if "fell behind" in line["message"]]
    assert len(behind) == 1, lines
    assert behind[0]["connection"] == slow_id != writer_id, behind
    assert behind[0]["device"] == "slow", behind
    # whatever the close task logs (a close frame not taken) is the slow reader's too
    for line in lines:
        if slow_id in line["message"]:
            assert line.get("connection") == slow_id and line.get("device") == "slow", line
