"""The live target: a real relay process on 127.0.0.1, hostile connections, one honest device.

The relay runs as ``foliosync relay`` in its own process with a temporary data directory, so
that "alive" means what it says: a crash of the relay ends that process, not the fuzzer. Hostile
connections send random, truncated and mutated frames before and after a valid Hello, malformed
CRDT updates inside well-formed Update frames and random SyncRequests, to their own user's
documents and to the honest device's. Meanwhile that device edits a watchlist and times every
edit until the relay acknowledges it. A crash here is the relay answering ``internal`` or closing
with 1011 (it failed on its own), or a connection that no longer answers a Ping.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from pycrdt import Doc, Map

from foliosync.client.replica import Replica
from foliosync.client.sync import Backoff, SyncClient
from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.server.storage import SQLiteRelayStore
from foliosync.sync.protocol.frames import (
    PROTOCOL_VERSION,
    Error,
    Hello,
    Ping,
    SyncRequest,
    Update,
    decode_frame,
    encode_frame,
)
from fuzz.corpus import WATCHLIST, crdt_updates, frame_seeds
from fuzz.engine import Result
from fuzz.mutate import Mutator

__all__ = ["DEFAULT_CONNECTIONS", "run_relay"]

DEFAULT_CONNECTIONS = 4
ACK_LIMIT_S = 5.0
"""An honest edit not acknowledged within this is a failure of the run."""
_ANSWER_S = 10.0
_SYMBOLS = ("AAPL", "MSFT", "GOOG", "TSLA", "NVDA", "AMZN", "META", "BRK.B", "RDS-A", "7203.T")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class _Relay:
    """``foliosync relay`` on a free port of 127.0.0.1, with its data in ``data``."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = _free_port()
        self.log = data.parent / "relay.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def health(self) -> str:
        return f"http://127.0.0.1:{self.port}/healthz"

    async def start(self, http: aiohttp.ClientSession) -> bytes:
        command = [sys.executable, "-m", "foliosync", "relay", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--data", str(self.data), "--feed", "none"]
        command += ["--log-level", "WARNING"]
        env = {**os.environ, "RUST_BACKTRACE": "0"}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the relay exited at start: {self.log.read_text()[-2000:]}")
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(self.health) as response:
                    if response.status == 200:
                        return load_or_create_secret(self.data)
            await asyncio.sleep(0.1)
        raise RuntimeError("the relay did not answer /healthz within 30 s")

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


class _Fuzzer:
    """One hostile client: connection after connection until its share of frames is sent."""

    def __init__(self, run: _Run, index: int, frames: int) -> None:
        self.run = run
        self.index = index
        self.frames = frames
        self.rng = random.Random(f"relay:{run.seed}:{index}")
        self.frame_mutator = Mutator(self.rng, frame_seeds())
        self.update_mutator = Mutator(self.rng, crdt_updates())
        self.user = "alice" if index % 2 == 0 else f"mallory{index}"

    def _doc(self) -> str:
        rng = self.rng
        return rng.choice(
            (
                WATCHLIST,
                "index",
                "pf-f967821bca9ea0dddc004278",
                "wl-" + rng.randbytes(12).hex(),
                "bob/index",
                "alice/index",
                "x" * rng.choice((1, 255, 256)),
                rng.randbytes(4).hex(),
            )
        )

    def _benign(self, synced: list[str], seqs: dict[str, int]) -> bytes:
        """A well-formed frame a hostile peer may send without being disconnected."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.55 and synced:
            doc = rng.choice(synced)
            seqs[doc] = seqs.get(doc, 0) + rng.choice((1, 1, 2, 1000))
            update = self.update_mutator.next_input()
            return encode_frame(Update(doc, seqs[doc], update))
        if pick < 0.85:
            doc = self._doc()
            if len(doc) <= 256:
                state = self.update_mutator.next_input() if rng.random() < 0.7 else b"\x00"
                if doc not in synced:
                    synced.append(doc)
                return encode_frame(SyncRequest(doc, state))
        if pick < 0.92:
            symbols = tuple(rng.choice((*_SYMBOLS, "", " msft ", "??", "x" * 32)) for _ in "abc")
            return msgpack.packb([40, [s for s in symbols if s]])  # type: ignore[no-any-return]
        return encode_frame(Ping(rng.randrange(1 << 63)))

    async def serve(self, http: aiohttp.ClientSession) -> None:
        run = self.run
        while run.sent < run.frames and not run.over():
            await self.connection(http)

    async def connection(self, http: aiohttp.ClientSession) -> None:
        run, rng = self.run, self.rng
        sent: list[bytes] = []
        hello = rng.random() < 0.85
        try:
            ws = await http.ws_connect(run.relay.url, max_msg_size=0, autoping=True)
        except (aiohttp.ClientError, OSError) as exc:
            run.result.notes.append(f"connect failed: {exc}")
            await asyncio.sleep(0.1)
            return
        try:
            if hello:
                token = issue_token(run.secret, self.user, device=f"fuzz{self.index}")
                await ws.send_bytes(encode_frame(Hello(PROTOCOL_VERSION, token, "fuzz")))
                welcome = await ws.receive(timeout=_ANSWER_S)
                if welcome.type != aiohttp.WSMsgType.BINARY:
                    run.finding(sent, f"no Welcome: {welcome.type!r} {welcome.data!r}")
                    return
            synced: list[str] = []
            seqs: dict[str, int] = {}
            count = rng.randint(1, 40) if hello else rng.randint(1, 3)
            for position in range(count):
                last = position == count - 1
                hostile = not hello or (last and rng.random() < 0.5) or rng.random() < 0.03
                data = self.frame_mutator.next_input() if hostile else self._benign(synced, seqs)
                if len(data) > (4 << 20):
                    data = data[: 4 << 20]
                sent.append(data)
                await ws.send_bytes(data)
                run.sent += 1
                if hostile:
                    break
            nonce = rng.randrange(1 << 62)
            await ws.send_bytes(encode_frame(Ping(nonce)))
            await self.answers(ws, sent, nonce, ended_by_hostile=hostile)
        except (aiohttp.ClientError, ConnectionResetError):
            pass  # the relay closed the socket under us: what a fatal error does
        finally:
            await ws.close()

    async def answers(
        self, ws: aiohttp.ClientWebSocketResponse, sent: list[bytes], nonce: int, **_: Any
    ) -> None:
        """Read until the Pong of ``nonce`` or the close; an ``internal`` Error, close 1011 or
        silence is a finding."""
        run = self.run
        deadline = time.monotonic() + _ANSWER_S
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                run.hang(sent)
                return
            try:
                message = await ws.receive(timeout=left)
            except TimeoutError:
                run.hang(sent)
                return
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                code = ws.close_code
                if code == 1011:
                    run.finding(sent, "the relay closed with 1011 (its own failure)")
                return
            if message.type == aiohttp.WSMsgType.ERROR:
                return
            if message.type != aiohttp.WSMsgType.BINARY:
                run.finding(sent, f"a non-binary message from the relay: {message.type!r}")
                return
            try:
                frame = decode_frame(message.data, max_frame_size=64 << 20)
            except Exception as exc:
                run.finding(sent, f"the relay sent a frame we cannot decode: {exc}")
                return
            if isinstance(frame, Error) and frame.code == "internal":
                run.finding(sent, f"the relay failed on its own: {frame.message}")
                return
            if type(frame).__name__ == "Pong" and getattr(frame, "nonce", None) == nonce:
                return


class _Honest:
    """The well-behaved device: edits a watchlist and times each edit until its Ack."""

    def __init__(self, run: _Run, path: Path) -> None:
        self.run = run
        self.path = path
        self.latencies: list[float] = []
        self.unacknowledged = 0

    async def serve(self, replica: Replica, client: SyncClient) -> None:
        run = self.run
        rng = random.Random(f"honest:{run.seed}")
        watchlist = await replica.watchlist("Tech")
        while not run.stopping:
            symbol = rng.choice(_SYMBOLS)
            if symbol in watchlist.model:
                if rng.random() < 0.5:
                    await watchlist.remove([symbol])
                else:
                    await watchlist.set_note(symbol, f"note {rng.randrange(1000)}")
            else:
                await watchlist.add([symbol])
            started = time.perf_counter()
            while replica.info(watchlist.id).pending:
                if time.perf_counter() - started > ACK_LIMIT_S:
                    self.unacknowledged += 1
                    break
                await asyncio.sleep(0.002)
            else:
                self.latencies.append(time.perf_counter() - started)
            await asyncio.sleep(rng.uniform(0.01, 0.05))


class _Run:
    """Everything one relay fuzzing run shares."""

    def __init__(self, result: Result, frames: int, seconds: float | None, seed: int) -> None:
        self.result = result
        self.frames = frames
        self.seed = seed
        self.seconds = seconds
        self.deadline: float | None = None
        self.sent = 0
        self.stopping = False
        self.secret = b""
        self.relay: _Relay
        self.crash_dir = Path()

    def over(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _save(self, sent: list[bytes], kind: str, why: str) -> None:
        key = f"{kind}: {why[:100]}"
        self.result.signatures[key] += 1
        if self.result.signatures[key] > 3:
            return
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        data = msgpack.packb(sent, use_bin_type=True)
        path = self.crash_dir / f"relay-{kind}-{hashlib.sha1(data).hexdigest()[:12]}.bin"
        path.write_bytes(data)
        path.with_suffix(".txt").write_text(
            f"{key}\n\nframes sent after the Hello, as a msgpack array of bin\n"
            f"replay: python -m fuzz --replay {path}\n",
            encoding="utf-8",
        )
        self.result.saved.append(path)

    def finding(self, sent: list[bytes], why: str) -> None:
        self.result.crashes += 1
        self._save(sent, "crash", why)

    def hang(self, sent: list[bytes]) -> None:
        self.result.hangs += 1
        self._save(sent, "hang", f"no answer within {_ANSWER_S} s")


def _stored_documents(db: Path) -> list[tuple[str, str]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        rows = conn.execute(
            "SELECT user, doc_id FROM documents UNION SELECT user, doc_id FROM updates"
        ).fetchall()
    return [(str(user), str(doc)) for user, doc in rows]


async def _check_store(db: Path, result: Result) -> int:
    """Load every stored document into pycrdt and read it: the relay's store is never left
    holding what cannot be read."""
    store = await SQLiteRelayStore.open(db)
    try:
        documents = _stored_documents(db)
        for user, doc_id in documents:
            stored = await store.load(user, doc_id)
            assert stored is not None
            doc: Doc[Any] = Doc()
            try:
                if stored.snapshot:
                    doc.apply_update(stored.snapshot)
                for update in stored.updates:
                    doc.apply_update(update)
                for key in list(doc.keys()):
                    doc.get(key, type=Map).to_py()
                doc.get_update()
            except BaseException as exc:
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                result.crashes += 1
                result.signatures[f"stored document {user}/{doc_id} unreadable: {exc!r}"] += 1
    finally:
        await store.close()
    return len(documents)


async def _content(replica: Replica) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for info in replica.documents():
        if info.kind.value == "watchlist":
            watchlist = await replica.watchlist(info.id)
            entries = watchlist.entries()
            seen[info.id] = [(e.symbol, e.note, e.position) for e in entries]
        elif info.kind.value == "portfolio":
            portfolio = await replica.portfolio(info.id)
            seen[info.id] = [t.to_json() for t in portfolio.trades()]
    return seen


def _client(replica: Replica, url: str, token: str) -> SyncClient:
    return SyncClient(replica, url, token, backoff=Backoff(base=0.05, cap=0.3))


async def run_relay(
    frames: int,
    *,
    seconds: float | None = None,
    seed: int = 0,
    crash_dir: Path,
    connections: int = DEFAULT_CONNECTIONS,
) -> Result:
    """``frames`` hostile frames over ``connections`` connections against a fresh relay."""
    result = Result("relay", engine="builtin")
    run = _Run(result, frames, seconds, seed)
    run.crash_dir = crash_dir
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="foliosync-fuzz-") as tmp:
        root = Path(tmp)
        relay = run.relay = _Relay(root / "relay")
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            run.secret = await relay.start(http)
            if run.seconds is not None:  # the relay's start-up is not the fuzzing's time
                run.deadline = time.monotonic() + run.seconds
            try:
                await _fuzz(run, root, http, connections)
            finally:
                code = relay.stop()
        if code not in (0, None):
            result.crashes += 1
            result.signatures[f"the relay exited with {code} on SIGTERM"] += 1
        result.notes.append(
            f"documents stored and read back: {await _check_store(relay.data / 'relay.db', result)}"
        )
        log = relay.log.read_text(errors="replace")
        tracebacks = log.count("Traceback (most recent call last)")
        if tracebacks:
            result.notes.append(f"relay log: {tracebacks} tracebacks (see a run's relay.log)")
            first = log.index("Traceback (most recent call last)")
            result.notes.append("first: " + " | ".join(log[first : first + 1500].splitlines()[-3:]))
    result.tried = run.sent
    result.seconds = time.perf_counter() - started
    return result


async def _fuzz(run: _Run, root: Path, http: aiohttp.ClientSession, connections: int) -> None:
    result, relay = run.result, run.relay
    token = issue_token(run.secret, "alice", device="honest")
    async with await Replica.open(root / "honest.db") as replica:
        await replica.create_watchlist("Tech")
        client = _client(replica, relay.url, token)
        client.start()
        honest = _Honest(run, root / "honest.db")
        honest_task = asyncio.ensure_future(honest.serve(replica, client))
        share = max(1, run.frames // connections)
        fuzzers = [_Fuzzer(run, index, share) for index in range(connections)]
        try:
            await asyncio.gather(*(fuzzer.serve(http) for fuzzer in fuzzers))
        finally:
            run.stopping = True
            await honest_task
        latencies = sorted(honest.latencies)
        if latencies:
            p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
            result.notes.append(
                f"honest device: {len(latencies)} edits acknowledged, p50 "
                f"{latencies[len(latencies) // 2] * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, "
                f"max {latencies[-1] * 1000:.1f} ms"
            )
        if honest.unacknowledged or not latencies:
            result.crashes += honest.unacknowledged or 1
            result.signatures[f"honest edits not acknowledged within {ACK_LIMIT_S} s"] += (
                honest.unacknowledged or 1
            )
        alive = relay.alive()
        healthy = False
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with http.get(relay.health) as response:
                healthy = response.status == 200
        if not (alive and healthy):
            result.crashes += 1
            result.signatures[f"relay alive {alive}, /healthz answered {healthy}"] += 1
        await client.wait_in_sync(timeout=30)
        await client.stop()
        mine = await _content(replica)
    async with await Replica.open(root / "fresh.db") as fresh:
        fresh_client = _client(fresh, relay.url, issue_token(run.secret, "alice", device="new"))
        await fresh_client.sync_once(timeout=30)
        theirs = await _content(fresh)
    if mine.get(WATCHLIST) != theirs.get(WATCHLIST):
        result.crashes += 1
        result.signatures["the honest device and a fresh one disagree on its watchlist"] += 1
    else:
        result.notes.append(f"honest and fresh device agree on the watchlist ({len(mine)} docs)")
    if set(mine) != set(theirs):
        only = sorted(set(mine) ^ set(theirs))
        result.notes.append(f"documents listed by one device only: {only}")


async def replay_relay(path: Path) -> str:
    """Send the frames of a saved relay finding on one connection of a fresh relay, after a
    valid Hello; what the relay answered."""
    sent: list[bytes] = msgpack.unpackb(path.read_bytes(), raw=False)
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="foliosync-replay-") as tmp:
        relay = _Relay(Path(tmp) / "relay")
        async with aiohttp.ClientSession() as http:
            secret = await relay.start(http)
            try:
                ws = await http.ws_connect(relay.url, max_msg_size=0)
                token = issue_token(secret, "alice", device="replay")
                await ws.send_bytes(encode_frame(Hello(PROTOCOL_VERSION, token, "replay")))
                for data in sent:
                    await ws.send_bytes(data)
                await ws.send_bytes(encode_frame(Ping(1)))
                while True:
                    message = await ws.receive(timeout=_ANSWER_S)
                    if message.type != aiohttp.WSMsgType.BINARY:
                        lines.append(f"{message.type.name} {ws.close_code}")
                        break
                    frame = decode_frame(message.data, max_frame_size=64 << 20)
                    lines.append(repr(frame)[:300])
                    if type(frame).__name__ == "Pong":
                        break
                await ws.close()
            finally:
                relay.stop()
            lines.append(f"relay alive after the replay: {relay.alive()}")
    return "\n".join(lines)
