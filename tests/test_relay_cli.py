"""`foliosync relay` as a real program: it announces its URL once listening, says clearly when the
port is taken, refuses a bad --cors-origin, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp


def foliosync() -> str:
    script = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert script is not None, "the foliosync console script is not installed next to python"
    return script


@asynccontextmanager
async def relay_process(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    process = await asyncio.create_subprocess_exec(
        foliosync(),
        "relay",
        "--feed",
        "none",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_a_port_in_use_is_named_and_the_url_never_announced(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with relay_process("--port", str(port), "--data", str(tmp_path)) as relay:
            out, err = await asyncio.wait_for(relay.communicate(), 30)
    assert relay.returncode == 1, err
    assert f"foliosync: error: port {port} on 127.0.0.1 is in use" in err.decode()
    assert "internal error" not in err.decode() and "Traceback" not in err.decode()
    assert b"relay on" not in out


async def test_a_port_in_use_stops_the_relay_before_its_feed_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with relay_process(
            "--port", str(port), "--data", str(tmp_path), "--feed", "sim:always"
        ) as relay:
            _out, err = await asyncio.wait_for(relay.communicate(), 30)
    assert relay.returncode == 1, err
    assert f"port {port} on 127.0.0.1 is in use" in err.decode()
    assert "price feed" not in err.decode(), err.decode()


async def test_a_shared_store_needs_postgresql_and_several_on_a_port_need_store_and_bus(
    tmp_path: Path,
) -> None:
    for args, message in (
        (("--store", "sqlite:///x.db"), "invalid --store"),
        (("--reuse-port",), "need a shared store and bus"),
        (("--workers", "2", "--store", "postgresql://u@127.0.0.1:1/db"), "shared store and bus"),
    ):
        async with relay_process("--port", str(free_port()), "--data", str(tmp_path), *args) as r:
            out, err = await asyncio.wait_for(r.communicate(), 30)
        assert r.returncode == 1 and message in err.decode(), (args, err)
        assert b"relay on" not in out


async def test_the_url_is_announced_once_listening_and_sigterm_stops_it(tmp_path: Path) -> None:
    port = free_port()
    origin = "http://dash.example"
    async with relay_process(
        "--port", str(port), "--data", str(tmp_path), "--cors-origin", origin
    ) as relay:
        assert relay.stdout is not None
        line = (await asyncio.wait_for(relay.stdout.readline(), 30)).decode()
        assert line.startswith(f"foliosync relay on ws://127.0.0.1:{port}/ws"), line
        async with aiohttp.ClientSession() as http:  # no retry: it listens when it says so
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            async with http.options(
                f"http://127.0.0.1:{port}/v1/prices",
                headers={"Origin": origin, "Access-Control-Request-Method": "GET"},
            ) as response:
                assert response.headers["Access-Control-Allow-Origin"] == origin
        relay.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(relay.communicate(), 15)
    assert relay.returncode == 0, err
    assert b"Traceback" not in err


async def test_a_bad_cors_origin_is_refused_before_listening(tmp_path: Path) -> None:
    async with relay_process(
        "--port",
        str(free_port()),
        "--data",
        str(tmp_path),
        "--cors-origin",
        "https://x.example/app",
    ) as relay:
        out, err = await asyncio.wait_for(relay.communicate(), 30)
    assert relay.returncode == 1
    assert "is a URL, not an origin" in err.decode()
    assert not out


async def test_on_uvloop_a_device_talks_to_the_relay_over_its_own_websocket(tmp_path: Path) -> None:
    """``--loop uvloop``: uvloop's transports are not asyncio's classes, and the relay's own
    WebSocket layer takes them as they are: a Hello is welcomed, a Ping answered, a close clean."""
    from foliosync.server.auth import issue_token, load_or_create_secret
    from foliosync.sync.protocol import ClientSession, PongReceived, Welcomed

    token = issue_token(load_or_create_secret(tmp_path), "alice", device="laptop")
    port = free_port()
    args = ("--port", str(port), "--data", str(tmp_path), "--loop", "uvloop")
    async with relay_process(*args) as relay:
        assert relay.stdout is not None
        line = (await asyncio.wait_for(relay.stdout.readline(), 30)).decode()
        assert line.startswith(f"foliosync relay on ws://127.0.0.1:{port}/ws"), line
        session = ClientSession()
        async with (
            aiohttp.ClientSession() as http,
            http.ws_connect(f"ws://127.0.0.1:{port}/ws") as ws,
        ):
            await ws.send_bytes(session.hello(token, "cli-test"))
            events = session.receive_data((await ws.receive(timeout=10)).data)
            assert any(isinstance(e, Welcomed) for e in events)
            await ws.send_bytes(session.ping(7))
            events = session.receive_data((await ws.receive(timeout=10)).data)
            assert any(isinstance(e, PongReceived) and e.nonce == 7 for e in events)
            await ws.close()
            assert ws.close_code == 1000
        relay.send_signal(signal.SIGTERM)
        _out, err = await asyncio.wait_for(relay.communicate(), 30)
    assert relay.returncode == 0, err
    assert b"Traceback" not in err
