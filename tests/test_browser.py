"""The HTTP API and the WebSocket from a real headless Chromium, as a dashboard uses them.

A page served by the test on 127.0.0.1:A runs the README's EventSource snippet against a relay on
127.0.0.1:B (another origin: the port differs) started with ``--cors-origin`` for the page:
it gets the snapshot, publishes a tick with a preflighted ``POST /v1/ticks`` (JSON body, ISO
time, token header), polls ``GET /v1/prices`` with an ``Authorization`` header, gets the tick as
a ``prices`` event, and, when the relay drops the stream, reconnects by itself with
``Last-Event-ID`` and gets only what changed meanwhile. Then the same calls against a relay that
does not list the page's origin: the browser gives the page nothing. The page reports everything
to its own origin; no browser driver is involved. Last, a page opens the relay's WebSocket as a
browser app would: Chromium's own upgrade (it offers permessage-deflate) on the relay's own
WebSocket layer, a hand-encoded Hello, the Welcome, a clean close.

Chromium is found by ``$FOLIOSYNC_CHROMIUM`` or as ``chromium`` on PATH (``tools/system-deps``
installs it); without it this test fails, it does not skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import time
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import foliosync.server.http_prices as http_prices
from foliosync.sync.prices import Tick

README = Path(__file__).resolve().parent.parent / "README.md"
README_RELAY = "http://127.0.0.1:8765"
# The README's browser example, run as written (``token`` and the relay's address are the page's).
SNIPPET = "\n".join(
    [
        'const prices = new EventSource("http://127.0.0.1:8765/v1/prices/stream'
        '?symbols=AAPL,MSFT&token=" + token);',
        'prices.addEventListener("snapshot", (event) => console.log("now", JSON.parse(event.data)));',  # noqa: E501
        'prices.addEventListener("prices", (event) => console.log("new", JSON.parse(event.data)));',
    ]
)
WAIT_SECONDS = 45  # for each step; Chromium's first start on a busy 2-core machine takes a while

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>foliosync dashboard</title>
<script>
const token = %(token)s, publishToken = %(publish_token)s;
const relay = %(relay)s, closedRelay = %(closed_relay)s, closedToken = %(closed_token)s;
const send = (path, body) => fetch(path, {method: "POST", body: JSON.stringify(body)});
window.onerror = (message) => send("/report", {error: String(message)});
window.onunhandledrejection = (event) => send("/report", {error: String(event.reason)});
let news = 0;
console.log = (label, data) => {
  send("/event", [label, data]);
  if (label === "now" && news === 0) publishAndPoll();
  if (label === "new" && ++news === 2) { prices.close(); tryTheClosedRelay(); }
};

async function publishAndPoll() {
  const posted = await fetch(relay + "/v1/ticks", {
    method: "POST",
    headers: {"Authorization": "Bearer " + publishToken, "Content-Type": "application/json"},
    body: JSON.stringify({ticks: [
      {symbol: "MSFT", price: "421.5", timestamp: new Date().toISOString()},
    ]}),
  });
  const polled = await fetch(relay + "/v1/prices?symbols=AAPL,MSFT", {
    headers: {"Authorization": "Bearer " + token},
  });
  send("/report", {posted: await posted.json(), polled: await polled.json()});
}

async function tryTheClosedRelay() {
  const result = {};
  try {
    await fetch(closedRelay + "/v1/prices?symbols=AAPL", {
      headers: {"Authorization": "Bearer " + closedToken},
    });
    result.fetch = "read";
  } catch (error) {
    result.fetch = error.name;
  }
  const url = closedRelay + "/v1/prices/stream?symbols=AAPL&token=" + closedToken;
  const stream = new EventSource(url);
  result.stream = await new Promise((resolve) => {
    stream.onerror = () => resolve("error, readyState " + stream.readyState);
    stream.addEventListener("snapshot", () => resolve("snapshot"));
  });
  stream.close();
  send("/report", {closed: result});
}
</script>
<script>
%(snippet)s
</script>
"""


def readme_snippet() -> str:
    """The README's ``js`` block if it has one (it must then be :data:`SNIPPET`)."""
    blocks = re.findall(r"^```js\n(.*?)^```", README.read_text(encoding="utf-8"), re.M | re.S)
    if blocks:
        assert blocks[0].strip() == SNIPPET, "README's browser example is not the one tested"
    return SNIPPET


def chromium() -> str:
    path = os.environ.get("FOLIOSYNC_CHROMIUM") or shutil.which("chromium")
    if not path or not os.access(path, os.X_OK):
        pytest.fail(
            "Chromium is needed for the browser test and was not found: install it "
            "(`tools/system-deps`, or `apt-get install chromium`) or set FOLIOSYNC_CHROMIUM",
            pytrace=False,
        )
    return path


class Page:
    """The dashboard's origin: serves the page and collects what the page reports."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[list[Any]] = asyncio.Queue()
        self.reports: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.html = ""
        self.go_on = asyncio.Event()  # answers the page's GET /proceed once set

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=self.html, content_type="text/html")

    async def event(self, request: web.Request) -> web.Response:
        await self.events.put(json.loads(await request.text()))
        return web.Response()

    async def report(self, request: web.Request) -> web.Response:
        await self.reports.put(json.loads(await request.text()))
        return web.Response()

    async def proceed(self, request: web.Request) -> web.Response:
        await self.go_on.wait()
        return web.Response()

    @contextlib.asynccontextmanager
    async def serve(self) -> AsyncIterator[str]:
        app = web.Application()
        app.router.add_get("/", self.index)
        app.router.add_post("/event", self.event)
        app.router.add_post("/report", self.report)
        app.router.add_get("/proceed", self.proceed)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            yield f"http://127.0.0.1:{runner.addresses[0][1]}"
        finally:
            await runner.cleanup()


@contextlib.asynccontextmanager
async def headless_chromium(url: str, profile: Path, log: Path) -> AsyncIterator[None]:
    with log.open("wb") as stderr:
        browser = await asyncio.create_subprocess_exec(
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--enable-logging=stderr",
            f"--user-data-dir={profile}",
            url,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its own process group: its helpers go with it
        )
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(browser.pid, signal.SIGKILL)
            await browser.wait()


async def next_of(queue: asyncio.Queue[Any], what: str, log: Path) -> Any:
    try:
        item = await asyncio.wait_for(queue.get(), WAIT_SECONDS)
    except TimeoutError:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        pytest.fail(f"the page did not report {what} in {WAIT_SECONDS} s; Chromium said:\n{tail}")
    if isinstance(item, dict) and "error" in item:
        pytest.fail(f"the page failed: {item['error']}")
    return item


def end_streams(relay: Any) -> None:
    """Drop the relay's open event streams, as a restarted proxy or a network change would."""
    for subscriber in list(relay.runner.app[http_prices._STREAMS].open):
        subscriber.close()


async def test_a_dashboard_on_another_origin_streams_publishes_and_resumes(
    relay_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chromium()  # fail first, and clearly, if there is no browser
    monkeypatch.setattr(http_prices, "RETRY_MS", 200)  # the browser reconnects sooner
    page = Page()
    async with (
        page.serve() as origin,
        relay_server(tmp_path / "open", cors_origins=(origin,)) as relay,
        relay_server(tmp_path / "closed") as closed,
    ):
        token = relay.token("alice", ttl_seconds=600)
        publish_token = relay.token("feeder", scopes=frozenset({"publish"}))
        assert closed.secret != relay.secret  # its own tokens: only CORS can stop the page
        async with aiohttp.ClientSession() as http:
            await http.post(
                f"{relay.http}/v1/ticks",
                json={"ticks": [["AAPL", "187.25", time.time_ns() // 10**6]]},
                headers={"Authorization": f"Bearer {publish_token}"},
            )
        page.html = PAGE % {
            "token": json.dumps(token),
            "publish_token": json.dumps(publish_token),
            "relay": json.dumps(relay.http),
            "closed_relay": json.dumps(closed.http),
            "closed_token": json.dumps(closed.token("alice", ttl_seconds=600)),
            "snippet": readme_snippet().replace(README_RELAY, relay.http),
        }
        log = tmp_path / "chromium.log"
        async with headless_chromium(f"{origin}/", tmp_path / "profile", log):
            label, snapshot = await next_of(page.events, "the snapshot", log)
            assert label == "now"
            assert [(p["symbol"], p["price"]) for p in snapshot] == [("AAPL", "187.25")]

            report = await next_of(page.reports, "its publish and poll", log)
            assert report["posted"] == {"accepted": 1, "rejected": []}
            assert [p["symbol"] for p in report["polled"]["prices"]] == ["AAPL", "MSFT"]

            label, prices = await next_of(page.events, "the published tick", log)
            assert (label, [(p["symbol"], p["price"]) for p in prices]) == (
                "new",
                [("MSFT", "421.5")],
            )

            # The relay drops the stream; a price changes before the browser is back.
            end_streams(relay)
            relay.relay.prices.publish([Tick("AAPL", Decimal("188"), time.time_ns() // 10**6)])
            label, prices = await next_of(page.events, "the prices after reconnecting", log)
            assert (label, [(p["symbol"], p["price"]) for p in prices]) == (
                "new",
                [("AAPL", "188")],
            ), "the reconnected stream should bring only what changed, as a prices event"

            report = await next_of(page.reports, "the calls to the closed relay", log)
            assert report["closed"] == {"fetch": "TypeError", "stream": "error, readyState 2"}


SOCKET_PAGE = """<!doctype html>
<meta charset="utf-8">
<title>foliosync socket</title>
<script>
const send = (path, body) => fetch(path, {method: "POST", body: JSON.stringify(body)});
window.onerror = (message) => send("/report", {error: String(message)});
// msgpack by hand: the Hello [1, 1, token, client_name] (PROTOCOL.md, sections 1 and 3).
const str = (text) => {
  const bytes = new TextEncoder().encode(text);
  const head = bytes.length < 32 ? [0xa0 | bytes.length]
    : bytes.length < 256 ? [0xd9, bytes.length] : [0xda, bytes.length >> 8, bytes.length & 255];
  return [...head, ...bytes];
};
const ws = new WebSocket(%(url)s);
ws.binaryType = "arraybuffer";
ws.onopen = () => ws.send(new Uint8Array([0x94, 1, 1, ...str(%(token)s), ...str("browser")]));
ws.onmessage = (event) => {
  const frame = new Uint8Array(event.data);
  // The test looks at the relay while the socket is open, then lets the page close it.
  send("/report", {extensions: ws.extensions, first: [frame[0], frame[1]]})
    .then(() => fetch("/proceed"))
    .then(() => {
      ws.onclose = (closed) => send("/report", {closed: closed.code, clean: closed.wasClean});
      ws.close(1000);
    });
  ws.onmessage = null;
};
</script>
"""


async def test_a_browser_websocket_syncs_on_the_relays_own_layer(
    relay_server: Any, tmp_path: Path
) -> None:
    """Chromium offers permessage-deflate, which the relay declines; its Hello is answered with a
    Welcome on the relay's own WebSocket layer (aiohttp holds nothing of the connection), and
    its close is a clean 1000."""
    chromium()
    page = Page()
    async with page.serve() as origin, relay_server(tmp_path / "relay") as relay:
        page.html = SOCKET_PAGE % {
            "url": json.dumps(f"ws://127.0.0.1:{relay.port}/ws"),
            "token": json.dumps(relay.token("alice", "browser", ttl_seconds=600)),
        }
        log = tmp_path / "chromium.log"
        async with headless_chromium(f"{origin}/", tmp_path / "profile", log):
            report = await next_of(page.reports, "the relay's first frame", log)
            assert report["extensions"] == "" and report["first"][1] == 2  # a Welcome
            (connection,) = relay.relay.connections
            assert "permessage-deflate" in connection.request.headers["Sec-WebSocket-Extensions"]
            assert len(relay.runner.server.connections) == 0  # type: ignore[union-attr]
            page.go_on.set()
            report = await next_of(page.reports, "the close", log)
            assert report == {"closed": 1000, "clean": True}
