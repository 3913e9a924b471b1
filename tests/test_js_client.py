"""The JavaScript client in clients/js, written from PROTOCOL.md, against a real relay and a real
Python device: what one adds, the other sees, both ways, live.

It proves the spec is enough to write a client. It needs node and npm, and fails (never skips)
without them: a silently skipped proof proves nothing.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from foliosync.client.replica import Replica
from foliosync.client.sync import SyncClient
from foliosync.sync.errors import ValidationError
from foliosync.sync.model import DocumentKind, document_id

SOURCE = Path(__file__).resolve().parent.parent / "clients" / "js"
CLIENT_FILES = (
    "package.json",
    "package-lock.json",
    "foliosync.mjs",
    "protocol.mjs",
    "documents.mjs",
)


@pytest.fixture(scope="module")
def js_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A copy of clients/js with its locked packages installed by ``npm ci``."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are needed to test clients/js (node 20 or later)")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    assert int(version.stdout.strip().lstrip("v").split(".")[0]) >= 20, version.stdout
    target = tmp_path_factory.mktemp("js-client")
    for name in CLIENT_FILES:
        shutil.copy2(SOURCE / name, target / name)
    installed = subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund"],
        cwd=target,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if installed.returncode != 0:
        pytest.fail(f"npm ci failed:\n{installed.stdout}\n{installed.stderr}")
    yield target


class JsResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


async def run_js(client: Path, relay: Any, *args: str, token: str | None = None) -> JsResult:
    """One run of the JS CLI (in a subprocess, so that the relay in this loop keeps serving)."""
    token = token if token is not None else relay.token("alice", "js1")
    process = await asyncio.create_subprocess_exec(
        "node",
        str(client / "foliosync.mjs"),
        "--server",
        relay.url,
        "--token",
        token,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return JsResult(process.returncode, out.decode(), err.decode())


def symbols_of(result: JsResult) -> list[str]:
    return [entry["symbol"] for entry in result.json()["symbols"]]


async def _equals(value: Any, expected: Any) -> bool:
    return await value == expected


async def watchlist_symbols(replica: Replica, name: str) -> list[str] | None:
    doc_id = document_id(DocumentKind.WATCHLIST, name)
    if doc_id not in replica.document_ids():
        return None
    return (await replica.watchlist(doc_id)).symbols


async def test_python_adds_js_shows_and_js_adds_python_sees_live(
    js_client: Path,
    relay: Any,
    open_replica: Callable[[str], Any],
    sync_clients: Callable[..., SyncClient],
    helpers: Any,
) -> None:
    replica: Replica = await open_replica("laptop")
    device = sync_clients(replica, relay.url, relay.token("alice", "laptop"))
    device.start()
    tech = await replica.create_watchlist("Tech")
    await tech.add(["AAPL", "BRK.B"], note="core")
    await device.wait_in_sync(timeout=10)

    shown = (await run_js(js_client, relay, "show", "tech", "--json")).json()
    assert shown["id"] == tech.id
    assert shown["name"] == "Tech"
    assert shown["symbols"] == [
        {"symbol": "AAPL", "note": "core"},
        {"symbol": "BRK.B", "note": "core"},
    ]

    added = (await run_js(js_client, relay, "add", "Tech", "msft", "AAPL", "--json")).json()
    assert added["added"] == ["MSFT"]
    assert [s["symbol"] for s in added["symbols"]] == ["AAPL", "BRK.B", "MSFT"]
    # The Python device is still connected: the change reaches it live, in the order JS gave it.
    await helpers.eventually(
        lambda: _equals(watchlist_symbols(replica, "Tech"), ["AAPL", "BRK.B", "MSFT"]), timeout=10
    )
    assert device.connected
    assert replica.info(tech.id).remote_changed_by == "js1"


async def test_a_watchlist_created_by_js_reaches_a_connected_python_device(
    js_client: Path,
    relay: Any,
    open_replica: Callable[[str], Any],
    sync_clients: Callable[..., SyncClient],
    helpers: Any,
) -> None:
    replica: Replica = await open_replica("desktop")
    device = sync_clients(replica, relay.url, relay.token("alice", "desktop"))
    device.start()
    await device.wait_in_sync(timeout=10)

    result = await run_js(js_client, relay, "add", "Energy", "XOM", "--note", "oil")
    assert result.code == 0, result.err
    assert result.out.strip() == "added XOM to Energy"
    # Learned through the index, which the device synced, then its own SyncRequest.
    await helpers.eventually(
        lambda: _equals(watchlist_symbols(replica, "Energy"), ["XOM"]), timeout=10
    )
    energy = await replica.watchlist(document_id(DocumentKind.WATCHLIST, "Energy"))
    assert energy.name == "Energy" and energy.entries()[0].note == "oil"
    assert [(e.kind, e.name) for e in (await replica.index()).entries()] == [
        (DocumentKind.WATCHLIST, "Energy")
    ]

    await energy.add(["CVX"])
    await device.wait_in_sync(timeout=10)
    assert symbols_of(await run_js(js_client, relay, "show", "Energy", "--json")) == ["XOM", "CVX"]
    plain = await run_js(js_client, relay, "show", "Energy")
    assert plain.code == 0 and plain.out.splitlines() == ["XOM\toil", "CVX"]


async def test_the_js_client_refuses_bad_input_and_reports_relay_errors(
    js_client: Path, relay: Any
) -> None:
    bad_symbol = await run_js(js_client, relay, "add", "Tech", "B@D")
    assert bad_symbol.code == 2 and 'invalid symbol "B@D"' in bad_symbol.err
    missing = await run_js(js_client, relay, "show", "Nothing")
    assert missing.code == 1 and 'no watchlist named "Nothing"' in missing.err
    forged = await run_js(js_client, relay, "show", "Tech", token=relay.token("alice") + "x")
    assert forged.code == 1 and "auth_failed: token signature is invalid" in forged.err
    usage = await run_js(js_client, relay, "rename", "Tech")
    assert usage.code == 2 and "usage:" in usage.err


def test_the_js_client_derives_ids_as_python_does_or_refuses_the_name(js_client: Path) -> None:
    """Ids derive from the case-folded name; JavaScript can only lower-case, so a name whose
    folding differs is refused rather than given a second document's id."""
    spaced = ["a\u0085b", "a\ufeffb", "a\x1cb", "a\u3000b", "\u2028x\u00a0", "a\x07b"]
    names = ["Tech", "  my   Tech ", "Ünïcode", "Straße", "Σοφός", "ﬁnance", *spaced]
    script = (
        'import("./documents.mjs").then((m) => { const out = {};'
        f" for (const n of {json.dumps(names)})"
        ' { try { out[n] = m.documentId("watchlist", n); } catch (e) { out[n] = null; } }'
        " console.log(JSON.stringify(out)); });"
    )
    done = subprocess.run(
        ["node", "-e", script], cwd=js_client, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    ids = json.loads(done.stdout)
    for name in names[:3]:
        assert ids[name] == document_id(DocumentKind.WATCHLIST, name), name
    assert [ids[name] for name in names[3:6]] == [None, None, None]
    for name in spaced:  # white space is PROTOCOL.md's list on both sides, not JavaScript's \s
        try:
            python: str | None = document_id(DocumentKind.WATCHLIST, name)
        except ValidationError:
            python = None
        assert ids[name] == python, repr(name)
    assert ids["a\x07b"] is None and ids["a\ufeffb"] != ids["a\x1cb"]
    assert document_id(DocumentKind.WATCHLIST, "Straße") == document_id(
        DocumentKind.WATCHLIST, "STRASSE"
    )  # what Python makes of it, and why JavaScript must not guess
