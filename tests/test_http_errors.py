"""Every HTTP error of the relay is JSON, ``{"error": MESSAGE, "code": CODE}``, whichever layer
refused the request: a handler, aiohttp's router, or aiohttp's HTTP parser (raw sockets)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from foliosync.server.http_errors import JsonErrorAppRunner, error_code
from foliosync.server.relay import RelayConfig, create_app


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def error_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.content_type == "application/json", await response.text()
    body = await response.json()
    assert isinstance(body["error"], str) and body["error"]
    assert body["code"] == error_code(response.status)
    return dict(body)


async def raw_request(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` as is and read the answer up to the relay closing the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines)}
    return int(status_line.split()[1]), headers, body


def test_codes_are_the_status_phrases_in_snake_case() -> None:
    assert error_code(404) == "not_found"
    assert error_code(405) == "method_not_allowed"
    assert error_code(426) == "upgrade_required"
    assert error_code(599) == "http_599"


async def test_an_unknown_path_is_a_json_404(relay: Any, http: Any) -> None:
    async with http.get(f"{relay.http}/v2/nothing") as response:
        assert response.status == 404
        assert (await error_of(response))["error"] == "no such resource: /v2/nothing"


async def test_a_wrong_method_is_a_json_405_that_names_the_allowed_ones(
    relay: Any, http: Any
) -> None:
    async with http.get(f"{relay.http}/v1/ticks") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"
        assert "allowed: POST" in (await error_of(response))["error"]
    async with http.delete(f"{relay.http}/v1/prices") as response:
        assert response.status == 405
        await error_of(response)


async def test_a_preflight_without_cors_configured_is_a_json_405(relay: Any, http: Any) -> None:
    headers = {"Origin": "http://dash.example", "Access-Control-Request-Method": "GET"}
    async with http.options(f"{relay.http}/v1/prices", headers=headers) as response:
        assert response.status == 405
        assert "Access-Control-Allow-Origin" not in response.headers
        await error_of(response)


async def test_the_websocket_path_without_an_upgrade_is_a_json_426(relay: Any, http: Any) -> None:
    async with http.get(f"{relay.http}/ws") as response:
        assert response.status == 426
        assert response.headers["Upgrade"] == "websocket"
        assert "WebSocket" in (await error_of(response))["error"]


async def test_the_price_api_errors_have_the_same_shape(relay: Any, http: Any) -> None:
    async with http.get(f"{relay.http}/v1/prices") as response:
        assert response.status == 401
        assert "token" in (await error_of(response))["error"]
    token = relay.token("alice")
    async with http.get(
        f"{relay.http}/v1/prices?symbols=bad%20sym!", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        assert response.status == 400
        assert (await error_of(response))["symbol"] == "bad sym!"


async def test_an_over_long_request_line_is_json_and_logs_one_line(
    relay: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, headers, body = await raw_request(
        relay.port, b"GET /v1/prices?symbols=" + b"A" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    answer = json.loads(body)
    assert answer == {
        "error": "the request line or a header field is longer than 8190 bytes",
        "code": "bad_request",
    }
    assert all(record.exc_info is None for record in caplog.records), "a traceback was logged"
    assert all(record.levelno < logging.WARNING for record in caplog.records)
    refused = [r for r in caplog.records if "malformed request" in r.getMessage()]
    assert len(refused) == 1 and "longer than 8190" in refused[0].getMessage()


async def test_a_malformed_header_is_json_too(relay: Any, caplog: pytest.LogCaptureFixture) -> None:
    status, headers, body = await raw_request(
        relay.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n"
    )
    assert status == 400 and headers["content-type"].startswith("application/json")
    answer = json.loads(body)
    assert answer["code"] == "bad_request" and answer["error"].startswith("malformed HTTP request")
    assert all(record.exc_info is None for record in caplog.records)


async def test_a_handler_that_fails_answers_a_json_500_and_logs_its_traceback(
    tmp_path: Path, http: Any, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(RelayConfig(data_dir=tmp_path, feed="none"))

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug")

    app.router.add_get("/broken", broken)
    runner = JsonErrorAppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with http.get(f"http://127.0.0.1:{port}/broken") as response:
            assert response.status == 500
            assert (await error_of(response))["code"] == "internal_server_error"
    finally:
        await runner.cleanup()
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)


async def test_the_websocket_path_answers_other_methods_through_the_router(
    relay: Any, http: Any
) -> None:
    # GET /ws goes straight to the relay's handler (DirectGetKey); the rest still takes the
    # router and the middlewares, which answer in JSON.
    async with http.post(f"{relay.http}/ws") as response:
        assert response.status == 405
        assert "GET" in response.headers["Allow"]
        await error_of(response)


async def test_a_plain_runner_serves_the_websocket_path_through_its_route(tmp_path: Path) -> None:
    app = create_app(RelayConfig(data_dir=tmp_path / "relay", port=0))
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"ws://127.0.0.1:{port}/ws") as ws,
        ):
            await ws.send_bytes(b"\x91\x00")  # not a Hello: refused, through the route
            message = await ws.receive(timeout=5)
            assert message.type == aiohttp.WSMsgType.BINARY
    finally:
        await runner.cleanup()
