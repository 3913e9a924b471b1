"""Prices over HTTP against a real relay: POST /v1/ticks, GET /v1/prices, the SSE stream, and
`foliosync publish` run as a real program."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
import pytest

import foliosync.server.http_prices as http_prices
from foliosync.sync.errors import ConfigError
from foliosync.sync.prices import Tick

PUBLISH = frozenset({"publish"})


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def http() -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def post_ticks(http: aiohttp.ClientSession, relay: Any, body: Any, **kwargs: Any) -> Any:
    token = kwargs.pop("token", relay.token("feeder", scopes=PUBLISH))
    async with http.post(
        f"{relay.http}/v1/ticks", json=body, headers=auth(token), **kwargs
    ) as response:
        return response.status, await response.json()


async def get_prices(http: aiohttp.ClientSession, relay: Any, query: str, token: str = "") -> Any:
    token = token or relay.token("alice")
    async with http.get(f"{relay.http}/v1/prices?{query}", headers=auth(token)) as response:
        return response.status, await response.json()


# -- POST /v1/ticks ------------------------------------------------------------------------------


async def test_post_json_takes_the_good_tick_and_names_the_bad_one(relay: Any, http: Any) -> None:
    t = now_ms()
    status, answer = await post_ticks(
        http,
        relay,
        {
            "ticks": [
                {"symbol": "aapl", "price": "187.25", "timestamp": t, "size": 300},
                {"symbol": "AAPL", "price": "-1", "timestamp": t},
            ]
        },
    )
    assert status == 200
    assert answer["accepted"] == 1
    assert [r["index"] for r in answer["rejected"]] == [1]
    assert "positive" in answer["rejected"][0]["reason"]
    status, prices = await get_prices(http, relay, "symbols=AAPL")
    assert status == 200
    assert prices["prices"] == [
        {"symbol": "AAPL", "price": "187.25", "time_ms": t, "seq": 1, "size": "300"}
    ]


async def test_the_readme_curl_example_is_accepted(relay: Any) -> None:
    """The README's curl line, as written but for the port (ISO time with Z, form content type)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    (line,) = [x for x in readme.splitlines() if x.startswith("curl ") and "/v1/ticks" in x]
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed to run the README's example"
    process = await asyncio.create_subprocess_exec(
        "bash",
        "-c",
        line.replace("127.0.0.1:8765", f"127.0.0.1:{relay.port}"),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "TOKEN": relay.token("feeder", scopes=PUBLISH)},
    )
    out, _ = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 0
    assert json.loads(out) == {"accepted": 1, "rejected": []}
    point = relay.relay.prices.book.latest("AAPL")
    assert point is not None and point.time_ms == 1795532400000  # 2026-11-24T15:00:00Z


async def test_post_a_bare_list_of_arrays(relay: Any, http: Any) -> None:
    status, answer = await post_ticks(http, relay, [["MSFT", 421.5, now_ms()], ["MSFT", "x", 1]])
    assert (status, answer["accepted"], len(answer["rejected"])) == (200, 1, 1)


async def test_post_msgpack(relay: Any, http: Any) -> None:
    t = now_ms()
    body = msgpack.packb(
        {"ticks": [["NVDA", "120.5", t], {"symbol": "NVDA", "price": "1", "time_ms": t + 10**9}]}
    )
    for content_type in ("application/msgpack", "application/x-msgpack"):
        async with http.post(
            f"{relay.http}/v1/ticks",
            data=body,
            headers={
                **auth(relay.token("feeder", scopes=PUBLISH)),
                "Content-Type": content_type,
            },
        ) as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["accepted"] == 1
        assert answer["rejected"][0]["index"] == 1
        assert "future" in answer["rejected"][0]["reason"]
    point = relay.relay.prices.book.latest("NVDA")
    assert point is not None and str(point.price) == "120.5"


async def test_post_needs_a_publish_token(relay: Any, http: Any) -> None:
    url = f"{relay.http}/v1/ticks"
    body = {"ticks": [["AAPL", "1", now_ms()]]}
    async with http.post(url, json=body) as response:
        assert response.status == 401
        assert "token" in (await response.json())["error"]
        assert response.headers["WWW-Authenticate"] == "Bearer"
    async with http.post(url, json=body, headers=auth("not-a-token")) as response:
        assert response.status == 401
    async with http.post(url, json=body, headers={"Authorization": "Basic abc"}) as response:
        assert response.status == 401
    async with http.post(url, json=body, headers=auth(relay.token("alice"))) as response:
        assert response.status == 403
        assert "publish" in (await response.json())["error"]
    assert relay.relay.prices.book.latest("AAPL") is None


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{"tickz": []}', b'"AAPL"', b"42", b"[" * 100_000],
    ids=["broken", "wrong-key", "string", "number", "nested-too-deep"],
)
async def test_a_malformed_body_is_400(relay: Any, http: Any, body: bytes) -> None:
    async with http.post(
        f"{relay.http}/v1/ticks",
        data=body,
        headers={**auth(relay.token("feeder", scopes=PUBLISH)), "Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        assert "error" in await response.json()


async def test_broken_msgpack_is_400_and_a_huge_body_413(relay: Any, http: Any) -> None:
    headers = {**auth(relay.token("feeder", scopes=PUBLISH)), "Content-Type": "application/msgpack"}
    for broken in (b"\xc1\xc1", b"\x81\x91\x01\x01", b"\x92\x01"):
        async with http.post(f"{relay.http}/v1/ticks", data=broken, headers=headers) as response:
            assert response.status == 400
    huge = b"[" + b" " * (http_prices.MAX_BODY_BYTES + 10) + b"]"
    headers["Content-Type"] = "application/json"
    async with http.post(  # a file-like body: aiohttp warns about sending big bytes at once
        f"{relay.http}/v1/ticks", data=io.BytesIO(huge), headers=headers
    ) as response:
        assert response.status == 413


# -- GET /v1/prices ------------------------------------------------------------------------------


async def test_since_a_cursor_only_changes_come_back(relay: Any, http: Any) -> None:
    t = now_ms()
    await post_ticks(http, relay, [["AAPL", "1", t], ["MSFT", "2", t], ["TSLA", "3", t]])
    status, first = await get_prices(http, relay, "symbols=AAPL,msft")
    assert status == 200
    assert [p["symbol"] for p in first["prices"]] == ["AAPL", "MSFT"]
    cursor = first["cursor"]
    _, nothing = await get_prices(http, relay, f"symbols=AAPL,MSFT&since={cursor}")
    assert nothing == {"cursor": cursor, "prices": []}
    await post_ticks(http, relay, [["MSFT", "2.5", t + 1], ["TSLA", "3.5", t + 1]])
    _, changed = await get_prices(http, relay, f"symbols=AAPL,MSFT&since={cursor}")
    assert [(p["symbol"], p["price"], p["seq"]) for p in changed["prices"]] == [("MSFT", "2.5", 2)]
    epoch, count = cursor.split(".")
    assert changed["cursor"] == f"{epoch}.{int(count) + 2}"
    _, everything = await get_prices(http, relay, f"since={epoch}.0")
    assert [p["symbol"] for p in everything["prices"]] == ["AAPL", "MSFT", "TSLA"]
    # A cursor of another run of the relay (it restarted and counts again from zero) gets
    # everything, even when its count is lower than today's: it cannot be compared.
    other_run = int(epoch) - 1
    for stale in (f"{other_run}.1", f"{other_run}.999999", "1"):
        _, after_restart = await get_prices(http, relay, f"symbols=AAPL,MSFT&since={stale}")
        assert [p["symbol"] for p in after_restart["prices"]] == ["AAPL", "MSFT"], stale


async def test_bad_queries_are_400(relay: Any, http: Any) -> None:
    status, answer = await get_prices(http, relay, "symbols=AAPL,bad%20sym!")
    assert status == 400
    assert answer["symbol"] == "bad sym!" and "bad sym!" in answer["error"]
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    # 2001 three-letter symbols: one too many, in a request line that still fits in 8 KiB
    many = ",".join([a + b + c for a in letters for b in letters for c in letters][:2001])
    status, answer = await get_prices(http, relay, f"symbols={many}")
    assert status == 400 and "2000" in answer["error"]
    for bad in ("-1", "x.1", "1.-1", "abc", "%C2%B2.5", "9" * 5000 + ".1"):
        status, _ = await get_prices(http, relay, f"symbols=AAPL&since={bad}")
        assert status == 400, bad
    status, _ = await get_prices(http, relay, "symbols=AAPL&since=soon")
    assert status == 400


async def test_reading_prices_needs_the_sync_scope(relay: Any, http: Any) -> None:
    async with http.get(f"{relay.http}/v1/prices?symbols=AAPL") as response:
        assert response.status == 401
    status, _ = await get_prices(http, relay, "symbols=AAPL", relay.token("f", scopes=PUBLISH))
    assert status == 403


# -- GET /v1/prices/stream -----------------------------------------------------------------------


class EventStream:
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response
        self.last_id = ""  # as an EventSource keeps it: the id of the last event that had one

    async def next(self, timeout: float = 5.0) -> tuple[str, Any]:
        """The next event as (name, data), or ("comment", text)."""
        name, data = "", []
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), timeout)
            assert raw, "the stream ended"
            line = raw.decode().rstrip("\r\n")
            if line.startswith(":"):
                return "comment", line[1:].strip()
            if not line:
                if name or data:
                    return name, json.loads("\n".join(data))
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "id":
                self.last_id = value
            elif field == "data":
                data.append(value)

    async def id_after(self, previous: str, timeout: float = 5.0) -> str:
        """Read on until the id changes from ``previous`` (an id may follow its event alone,
        up to EVENT_ID_SECONDS later); what it reads must be ids only."""
        while self.last_id == previous:
            raw = await asyncio.wait_for(self.response.content.readline(), timeout)
            assert raw, "the stream ended"
            line = raw.decode().rstrip("\r\n")
            assert not line or line.startswith("id:"), line
            if line.startswith("id:"):
                self.last_id = line.partition(":")[2].removeprefix(" ")
        return self.last_id


async def test_the_stream_sends_a_snapshot_then_new_prices(relay: Any, http: Any) -> None:
    t = now_ms()
    await post_ticks(http, relay, [["AAPL", "187.25", t]])
    async with http.get(
        f"{relay.http}/v1/prices/stream?symbols=AAPL,MSFT", headers=auth(relay.token("alice"))
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        stream = EventStream(response)
        name, snapshot = await stream.next()
        assert name == "snapshot"
        assert [(p["symbol"], p["price"]) for p in snapshot] == [("AAPL", "187.25")]
        await post_ticks(http, relay, [["MSFT", "421", t + 1], ["TSLA", "9", t + 1]])
        name, prices = await stream.next()
        assert name == "prices"
        assert [(p["symbol"], p["price"], p["seq"]) for p in prices] == [("MSFT", "421", 1)]
        assert relay.relay.prices.subscribed_symbols() == {"AAPL", "MSFT"}
    # the client went away: the relay notices and forgets the stream
    await asyncio.wait_for(_until(lambda: relay.relay.prices.subscriber_count == 0), 5)


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.02)


async def test_the_stream_takes_the_token_as_a_query_parameter_and_keeps_alive(
    relay: Any, http: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(http_prices, "HEARTBEAT_SECONDS", 0.2)
    token = relay.token("alice")
    async with http.get(f"{relay.http}/v1/prices/stream?symbols=AAPL&token={token}") as response:
        assert response.status == 200
        stream = EventStream(response)
        assert await stream.next() == ("snapshot", [])
        assert await stream.next(timeout=3) == ("comment", "ping")


async def test_the_stream_refuses_bad_requests(relay: Any, http: Any) -> None:
    base = f"{relay.http}/v1/prices/stream"
    async with http.get(f"{base}?symbols=AAPL") as response:
        assert response.status == 401
    async with http.get(f"{base}?symbols=AAPL&token=forged") as response:
        assert response.status == 401
    publisher = relay.token("f", scopes=PUBLISH)
    async with http.get(f"{base}?symbols=AAPL", headers=auth(publisher)) as response:
        assert response.status == 403
    async with http.get(base, headers=auth(relay.token("alice"))) as response:
        assert response.status == 400
    async with http.get(f"{base}?symbols=%24%24", headers=auth(relay.token("alice"))) as response:
        assert response.status == 400


async def test_an_event_id_is_a_cursor_and_a_reconnect_gets_only_what_changed(
    relay_server: Any, tmp_path: Path, http: Any
) -> None:
    async with relay_server(tmp_path / "r", price_window_ms=0) as relay:
        t = now_ms()
        await post_ticks(http, relay, [["AAPL", "1", t], ["MSFT", "2", t]])
        url = f"{relay.http}/v1/prices/stream?symbols=AAPL,MSFT"
        headers = auth(relay.token("alice"))
        async with http.get(url, headers=headers) as response:
            stream = EventStream(response)
            assert [p["symbol"] for p in (await stream.next())[1]] == ["AAPL", "MSFT"]
            _, polled = await get_prices(http, relay, "symbols=AAPL,MSFT")
            assert stream.last_id == polled["cursor"]
            before = stream.last_id
            await post_ticks(http, relay, [["MSFT", "2.5", t + 1]])
            started = time.monotonic()
            assert (await stream.next())[0] == "prices"
            # within EVENT_ID_SECONDS of the last id: the event goes without one, which follows
            # alone once the stream is quiet, in about a second
            seen = await stream.id_after(before)
            assert time.monotonic() - started < 2.5
        await post_ticks(http, relay, [["AAPL", "1.5", t + 2]])  # while away
        async with http.get(url, headers={**headers, "Last-Event-ID": seen}) as response:
            stream = EventStream(response)
            name, prices = await stream.next()
            assert (name, [(p["symbol"], p["price"]) for p in prices]) == (
                "prices",
                [("AAPL", "1.5")],
            )
            await post_ticks(http, relay, [["MSFT", "3", t + 3]])  # and live again
            assert [p["price"] for p in (await stream.next())[1]] == ["3"]
        epoch = seen.split(".")[0]
        for unusable in ("", "garbage", f"{int(epoch) - 1}.1", f"{epoch}.999999"):
            async with http.get(url, headers={**headers, "Last-Event-ID": unusable}) as response:
                name, prices = await EventStream(response).next()
                assert (name, len(prices)) == ("snapshot", 2), unusable


async def test_a_busy_stream_computes_its_id_at_most_once_a_second(
    relay_server: Any, tmp_path: Path, http: Any
) -> None:
    async with relay_server(tmp_path / "r", price_window_ms=0) as relay:
        t = now_ms()
        url = f"{relay.http}/v1/prices/stream?symbols=AAPL"
        async with http.get(url, headers=auth(relay.token("alice"))) as response:
            lines = response.content
            ids = events = 0
            for n in range(8):  # eight prices, each its own event, within well under a second
                await post_ticks(http, relay, [["AAPL", f"1{n}", t + n]])
                while True:
                    line = (await asyncio.wait_for(lines.readline(), 5)).decode().strip()
                    ids += line.startswith("id:")
                    if line.startswith("data:") and f'"1{n}"' in line:
                        events += 1
                        break
            assert events == 8
            assert ids <= 2  # the snapshot's, and perhaps one a second later
            # quiet now: the owed id comes alone, and a reconnect with it gets nothing again
            stream = EventStream(response)
            seen = await stream.id_after("")
        resuming = {**auth(relay.token("alice")), "Last-Event-ID": seen}
        async with http.get(url, headers=resuming) as again:
            assert await EventStream(again).next() == ("prices", [])


async def test_an_event_id_never_skips_a_price_held_back_by_conflation(
    relay_server: Any, tmp_path: Path, http: Any
) -> None:
    async with relay_server(tmp_path / "r", price_window_ms=5000) as relay:
        t = now_ms()
        url = f"{relay.http}/v1/prices/stream?symbols=AAPL,MSFT"
        headers = auth(relay.token("alice"))
        async with http.get(url, headers=headers) as response:
            stream = EventStream(response)
            assert await stream.next() == ("snapshot", [])
            await post_ticks(http, relay, [["AAPL", "1", t]])
            assert [p["price"] for p in (await stream.next())[1]] == ["1"]
            # AAPL's next price waits for its window; MSFT's first goes at once, and the id of
            # the event that brings it must still be before AAPL's waiting price.
            await post_ticks(http, relay, [["AAPL", "2", t + 1], ["MSFT", "7", t + 1]])
            name, prices = await stream.next()
            assert (name, [p["symbol"] for p in prices]) == ("prices", ["MSFT"])
            seen = stream.last_id
        async with http.get(url, headers={**headers, "Last-Event-ID": seen}) as response:
            name, prices = await EventStream(response).next()
            assert name == "prices"
            assert ("AAPL", "2") in [(p["symbol"], p["price"]) for p in prices]


async def test_a_client_going_away_is_not_an_error(
    relay: Any, http: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = await http.get(
        f"{relay.http}/v1/prices/stream?symbols=AAPL", headers=auth(relay.token("alice"))
    )
    assert (await EventStream(response).next())[0] == "snapshot"
    response.close()  # gone, without a word
    await asyncio.wait_for(_until(lambda: relay.relay.prices.subscriber_count == 0), 5)
    await asyncio.sleep(0.1)  # the handler finishes
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert not noisy, [r.getMessage() for r in noisy]


async def test_a_slow_stream_reader_gets_conflated_prices(
    relay_server: Any, tmp_path: Path, http: Any
) -> None:
    async with relay_server(tmp_path / "r", price_window_ms=300) as relay:
        hub = relay.relay.prices
        async with http.get(
            f"{relay.http}/v1/prices/stream?symbols=AAPL", headers=auth(relay.token("alice"))
        ) as response:
            stream = EventStream(response)
            assert await stream.next() == ("snapshot", [])
            t = now_ms()
            for i in range(1000):
                hub.publish([Tick("AAPL", Decimal(100 + i), t + i)])
                if i % 100 == 0:
                    await asyncio.sleep(0.01)
                (subscriber,) = [s for s in hub._subscriptions]  # the stream's one subscriber
                assert len(subscriber.prices) <= 1
            batches = []
            while not batches or batches[-1][-1]["price"] != "1099":
                name, prices = await stream.next()
                assert name == "prices"
                batches.append(prices)
            assert len(batches) <= 5
            assert all(len(b) == 1 for b in batches)


async def test_the_relay_stops_promptly_with_a_stream_open(
    relay_server: Any, tmp_path: Path, http: Any
) -> None:
    async with relay_server(tmp_path / "r") as relay:
        response = await http.get(
            f"{relay.http}/v1/prices/stream?symbols=AAPL", headers=auth(relay.token("alice"))
        )
        assert (await EventStream(response).next())[0] == "snapshot"
        started = time.monotonic()
        await relay.stop()
        assert time.monotonic() - started < 3
        response.close()


# -- foliosync publish ---------------------------------------------------------------------------


async def run_cli(*args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    script = shutil.which("foliosync", path=os.path.dirname(sys.executable))
    assert script is not None, "the foliosync console script is not installed next to python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FOLIOSYNC_")}
    process = await asyncio.create_subprocess_exec(
        script,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(stdin), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_the_publish_command_reports_counts_and_refused_lines(
    relay: Any, tmp_path: Path
) -> None:
    t = now_ms()
    path = tmp_path / "ticks.csv"
    path.write_text(
        "timestamp,symbol,price,size\n"
        f"{t},AAPL,187.25,100\n"
        f"{t},AAPL,-4,1\n"
        "2024-06-10T13:30:00Z,MSFT,421.5\n"
        "soon,TSLA,1\n"
        f"{t + 1},AAPL,187.5\n"
    )
    token = relay.token("feeder", scopes=PUBLISH)
    code, out, err = await run_cli(
        "publish", "--csv", str(path), "--server", relay.url, "--token", token, "--batch", "2"
    )
    assert code == 1, err
    assert "accepted 3, rejected 2" in out
    assert "line 3:" in err and "positive" in err
    assert "line 5:" in err and "soon" in err
    latest = relay.relay.prices.book.latest("AAPL")
    assert latest is not None and str(latest.price) == "187.5"

    code, out, err = await run_cli(
        "publish", "--server", relay.http, "--token", token, stdin=f"{t + 2},NVDA,120\n".encode()
    )
    assert (code, out.strip()) == (0, "accepted 1, rejected 0"), err


async def test_the_publish_command_fails_clearly(relay: Any, tmp_path: Path) -> None:
    path = tmp_path / "ticks.csv"
    path.write_text(f"{now_ms()},AAPL,1\n")
    code, _, err = await run_cli("publish", "--csv", str(path), "--server", relay.url)
    assert code == 1 and "--token" in err
    code, _, err = await run_cli(
        "publish", "--csv", str(path), "--server", relay.url, "--token", relay.token("alice")
    )
    assert code == 1 and "403" in err and "publish" in err
    token = relay.token("feeder", scopes=PUBLISH)
    code, _, err = await run_cli(
        "publish", "--csv", str(path), "--server", "http://127.0.0.1:9", "--token", token
    )
    assert code == 1 and "cannot reach the relay" in err


# -- the relay's feed ----------------------------------------------------------------------------


async def test_the_relay_runs_its_feed_and_refuses_a_bad_one(
    relay_server: Any, tmp_path: Path, http: Any
) -> None:
    async with relay_server(tmp_path / "r", feed="sim:always") as relay:
        token = relay.token("alice")
        for _ in range(100):
            status, answer = await get_prices(http, relay, "symbols=AAPL,ACME", token)
            if len(answer["prices"]) == 1:
                break
            await asyncio.sleep(0.05)
        assert status == 200 and answer["prices"][0]["symbol"] == "AAPL"
        async with http.get(  # a followed symbol outside the default list gets a price too
            f"{relay.http}/v1/prices/stream?symbols=ACME", headers=auth(token)
        ) as response:
            stream = EventStream(response)
            assert await stream.next() == ("snapshot", [])
            name, prices = await stream.next()
            assert name == "prices" and prices[0]["symbol"] == "ACME"
    with pytest.raises(ConfigError, match="unknown price feed"):
        async with relay_server(tmp_path / "bad", feed="stock-exchange"):
            pass


async def test_a_stream_counts_its_dropped_prices_while_open_and_times_its_waits(
    relay: Any, http: Any
) -> None:
    """An event stream's replaced prices show in /metrics while it is open (not only once it
    ends), and the wait of what it was handed, to its write, is timed."""
    from foliosync.server.metrics import render
    from foliosync.sync.prices import PriceBook

    hub = relay.relay.prices
    queued = hub.queued.count
    t = now_ms()
    async with http.get(
        f"{relay.http}/v1/prices/stream?symbols=MSFT", headers=auth(relay.token("alice"))
    ) as response:
        stream = EventStream(response)
        assert (await stream.next())[0] == "snapshot"
        await post_ticks(http, relay, [["MSFT", "421", t + 1]])
        assert (await stream.next())[0] == "prices"
        assert hub.queued.count > queued
    # A stream that is handed prices faster than it writes them: one of two replaced, counted now.
    slow = http_prices.SseSubscriber()
    book = PriceBook()
    hub.subscribe(slow, ["NVDA"])
    try:
        first = book.apply(Tick("NVDA", Decimal("1"), t))
        second = book.apply(Tick("NVDA", Decimal("2"), t + 1))
        assert first is not None and second is not None
        slow.deliver_prices([first])
        slow.deliver_prices([second])
        text = render(relay.relay.registry).decode()
        assert "foliosync_prices_dropped_total 1.0" in text, text
    finally:
        hub.unsubscribe(slow)
