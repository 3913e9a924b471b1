"""CORS: only the origins given to the relay get CORS headers, preflights included; none by
default. (The same from a real browser: tests/test_http_browser.py.)"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from foliosync.server.http_cors import normalize_origin
from foliosync.server.relay import RelayConfig
from foliosync.sync.errors import ConfigError

DASH = "http://dash.example:3000"
OTHER = "http://evil.example"


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def cors_relay(relay_server: Any, tmp_path: Path) -> Any:
    async with relay_server(tmp_path / "relay", cors_origins=(DASH, "https://ops.example")) as r:
        yield r


def preflight(origin: str, method: str, headers: str = "") -> dict[str, str]:
    asked = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers:
        asked["Access-Control-Request-Headers"] = headers
    return asked


@pytest.mark.parametrize(
    ("given", "origin"),
    [
        ("http://localhost:3000", "http://localhost:3000"),
        (" HTTPS://Dash.Example.COM:443/ ", "https://dash.example.com"),
        ("http://127.0.0.1:80", "http://127.0.0.1"),
        ("http://[::1]:8080", "http://[::1]:8080"),
        ("https://bücher.example", "https://xn--bcher-kva.example"),
    ],
)
def test_an_origin_is_kept_as_browsers_send_it(given: str, origin: str) -> None:
    assert normalize_origin(given) == origin


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("*", "list each origin"),
        ("null", "list each origin"),
        ("dash.example.com", "scheme://host"),
        ("ftp://dash.example.com", "scheme://host"),
        ("https://", "scheme://host"),
        ("https://dash.example.com/app", "a URL, not an origin"),
        ("https://dash.example.com?x=1", "a URL, not an origin"),
        ("https://me@dash.example.com", "a URL, not an origin"),
        ("http://dash.example.com:99999", "invalid CORS origin"),
    ],
)
def test_anything_else_is_refused_when_the_config_is_built(given: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        RelayConfig(cors_origins=(given,))


def test_the_config_holds_the_normalized_origins_once_each() -> None:
    config = RelayConfig(cors_origins=("http://A.example", "http://a.example/", DASH))
    assert config.cors_origins == ("http://a.example", DASH)
    assert RelayConfig().cors_origins == ()
    with pytest.raises(ConfigError, match="not one string"):
        RelayConfig(cors_origins=DASH)  # type: ignore[arg-type]


async def test_a_listed_origin_gets_its_preflight_answered(cors_relay: Any, http: Any) -> None:
    async with http.options(
        f"{cors_relay.http}/v1/prices", headers=preflight(DASH, "GET", "authorization")
    ) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == DASH
        assert response.headers["Access-Control-Allow-Methods"] == "GET"
        assert response.headers["Access-Control-Allow-Headers"].lower() == "authorization"
        assert response.headers["Access-Control-Max-Age"] == "600"
        assert "Access-Control-Allow-Credentials" not in response.headers
    async with http.options(
        f"{cors_relay.http}/v1/ticks",
        headers=preflight(DASH, "POST", "Authorization, Content-Type"),
    ) as response:
        assert response.status == 200
        allowed = response.headers["Access-Control-Allow-Headers"].lower().split(",")
        assert sorted(allowed) == ["authorization", "content-type"]
    async with http.options(
        f"{cors_relay.http}/v1/prices/stream", headers=preflight(DASH, "GET", "last-event-id")
    ) as response:
        assert response.status == 200


async def test_an_unlisted_origin_gets_no_cors_headers(cors_relay: Any, http: Any) -> None:
    async with http.options(
        f"{cors_relay.http}/v1/prices", headers=preflight(OTHER, "GET", "authorization")
    ) as response:
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers
        body = await response.json()
        assert body["code"] == "forbidden" and OTHER in body["error"]
    token = cors_relay.token("alice")
    headers = {"Origin": OTHER, "Authorization": f"Bearer {token}"}
    async with http.get(f"{cors_relay.http}/v1/prices", headers=headers) as response:
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers
    async with http.options(  # a header the API does not use is not allowed either
        f"{cors_relay.http}/v1/prices", headers=preflight(DASH, "GET", "x-custom")
    ) as response:
        assert response.status == 403
        assert "Access-Control-Allow-Origin" not in response.headers


async def test_a_listed_origin_reads_answers_errors_and_the_stream(
    cors_relay: Any, http: Any
) -> None:
    token = cors_relay.token("alice")
    headers = {"Origin": DASH, "Authorization": f"Bearer {token}"}
    async with http.get(f"{cors_relay.http}/v1/prices?symbols=AAPL", headers=headers) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == DASH
        assert response.headers["Vary"] == "Origin"
    async with http.get(f"{cors_relay.http}/v1/prices", headers={"Origin": DASH}) as response:
        assert response.status == 401  # the page can read why
        assert response.headers["Access-Control-Allow-Origin"] == DASH
    publisher = cors_relay.token("feeder", scopes=frozenset({"publish"}))
    async with http.post(
        f"{cors_relay.http}/v1/ticks",
        json={"ticks": [["AAPL", "1", time.time_ns() // 1_000_000]]},
        headers={"Origin": "https://ops.example", "Authorization": f"Bearer {publisher}"},
    ) as response:
        assert (await response.json())["accepted"] == 1
        assert response.headers["Access-Control-Allow-Origin"] == "https://ops.example"
    async with http.get(
        f"{cors_relay.http}/v1/prices/stream?symbols=AAPL&token={token}", headers={"Origin": DASH}
    ) as response:
        assert response.status == 200
        assert response.headers["Access-Control-Allow-Origin"] == DASH
        assert (await response.content.readline()).strip()  # the stream has begun


async def test_without_listed_origins_no_origin_gets_cors_headers(relay: Any, http: Any) -> None:
    token = relay.token("alice")
    headers = {"Origin": DASH, "Authorization": f"Bearer {token}"}
    async with http.get(f"{relay.http}/v1/prices", headers=headers) as response:
        assert response.status == 200
        assert "Access-Control-Allow-Origin" not in response.headers
        assert "Vary" not in response.headers
    async with http.options(
        f"{relay.http}/v1/prices", headers=preflight(DASH, "GET", "authorization")
    ) as response:
        assert response.status == 405
