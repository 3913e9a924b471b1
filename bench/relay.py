"""The relay under load: propagation latency, catching up, a reconnect storm, memory, fan-out.

The relay always runs as its own process (``foliosync relay``, SQLite store in a fresh data
directory), and so does every large group of clients (``python -m bench.relay_load``, driven by
JSON lines), so that the relay's CPU is its own; this process drives the scenarios and runs the
few clients whose timing is measured. Everything connects to 127.0.0.1 only, and every loop is
bounded in count and time.

1. Propagation: devices A and B of one user are real SyncClients with SQLite replicas; A edits a
   watchlist (one set_note, committed) and B's replica reports the remote change; one edit at a
   time. Idle clients around them: authenticated connections of other users, each synced one
   watchlist of its own (the relay fans a change out to every connection of its user only).
2. Catching up: a replica synced once, then 100 edits to each of 100 documents offline, then one
   sync_once, split into connect + handshake, initial sync and acks (measured around the
   replica's methods that the sync client calls).
3. Reconnect storm: devices of as many users, each with its index and 1-2 documents, synced; the
   relay is SIGKILLed, every device edits a watchlist offline, the relay restarts on the same
   data directory, and the devices reconnect with SyncClient's backoff (full jitter) until every
   one is in sync again with its edit acknowledged.
4. Memory: the relay's VmRSS idle and with the idle clients of (1) connected.
5. Fan-out: devices of one user synced to one watchlist, one of them editing at rising rates;
   receipt times sampled on a few receivers, update counts taken on all. The same load against
   pycrdt-websocket's server (its WebsocketServer and ASGIServer on Hypercorn, as its
   documentation shows), one room holding the watchlist's document.
6. Crossing: two devices of one user (real SyncClients and replicas, in this process) share a
   portfolio and a watchlist; both go offline, each makes N edits, and both come back at once,
   so that each one's edits reach the relay while the other's are fanned out to it: the time
   until both replicas hold everything with nothing pending. On one relay (SQLite), on one
   relay with PostgreSQL and Redis, and on two relays sharing them, each device on its own.

Run with ``python -m bench relay [--quick]``; the comparison needs the ``bench`` extra
(``pip install -e ".[bench]"``), and is reported as not run without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgpack
from pycrdt import Doc

from bench.cpubudget import BudgetUnavailable, check_budget, cpu_budget, throttled_s
from bench.procstat import free_port, machine_busy_s, proc_cpu_s
from bench.relay_load import (
    FolioDevice,
    YDevice,
    build_documents,
    one_struct,
    raise_nofile_limit,
    update_edits,
    update_items,
    update_key,
    y_update_payload,
)
from bench.table import Table
from foliosync.client.replica import DocumentChange, Replica
from foliosync.client.sync import SyncClient
from foliosync.server.auth import issue_token, load_or_create_secret
from foliosync.server.relay import RelayConfig
from foliosync.sync.model import DocumentKind, DocumentModel, EditContext, Watchlist, document_id
from foliosync.sync.updates import decode_state_vector

__all__ = ["run"]

LATENCY_TARGET_MS = 15.0  # p99 with 1,000 connections
RESYNC_TARGET_S = 1.0
STORM_TARGET_S = 10.0
FANOUT_P99_MS = 100.0
FANOUT_TARGET_RATE = 100.0
FANOUT_AIM_RATIO = 3.0  # the highest rate held against y-websocket's, same load, same run
GROUP_AIM_RATIO = 1.6  # two relays' deliveries held against one relay's, each on its own budget

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Sizes:
    idle: tuple[int, ...]  # idle clients around A and B, in rising order
    edits: int  # timed edits per idle level
    warmup: int
    offline_docs: int  # documents edited offline (half watchlists, half portfolios)
    offline_edits: int  # edits per document
    storm: int  # devices in the reconnect storm
    receivers: int  # devices of the busy document, the editor included
    samplers: int  # receivers whose receipt times are taken
    rates: tuple[float, ...]  # edits per second, one step each
    step_s: float
    min_step_edits: int
    drain_s: float  # how long a step may take to be delivered after its last edit
    crossing: int  # offline edits per device in the crossing part
    group_rates: tuple[float, ...]  # the group part's steps: finer, since it compares two climbs


FULL = Sizes(
    idle=(100, 1000),
    edits=500,
    warmup=20,
    offline_docs=100,
    offline_edits=100,
    storm=1000,
    receivers=500,
    samplers=20,
    rates=(1, 2, 5, 10, 25, 50, 75, 100, 150, 200, 300, 400, 600, 800, 1000, 1500, 2000, 3000),
    step_s=3.0,
    min_step_edits=6,
    drain_s=3.0,
    crossing=1000,
    group_rates=tuple(float(round(100 * 1.1**k)) for k in range(40)),  # 100 .. 4,100
)
QUICK = Sizes(
    idle=(10, 100),
    edits=100,
    warmup=10,
    offline_docs=10,
    offline_edits=100,
    storm=100,
    receivers=50,
    samplers=10,
    rates=(2, 10, 50, 200),
    step_s=1.0,
    min_step_edits=4,
    drain_s=1.5,
    crossing=200,
    group_rates=(2, 10, 50, 200),
)


# -- small helpers -----------------------------------------------------------------------------


def percentile(ordered: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _raise_child_nofile() -> None:
    raise_nofile_limit()


def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Server:
    """A server process (the relay, or pycrdt-websocket's) on 127.0.0.1, logging to a file."""

    def __init__(
        self, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.argv = argv
        self.port = port
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, ready: Callable[[], Any], timeout: float = 20.0) -> float:
        """Start and wait until ``ready()`` succeeds; returns the seconds that took."""
        started = time.monotonic()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
                env=None if self.env is None else {**os.environ, **self.env},
                preexec_fn=_raise_child_nofile,
            )
        deadline = started + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: see {self.log}\n{self.tail()}")
            try:
                await ready()
                return time.monotonic() - started
            except (OSError, aiohttp.ClientError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"not ready after {timeout:g} s: {self.tail()}") from None
                await asyncio.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL, and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    async def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.kill()

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_count(self, needle: str) -> int:
        try:
            return self.log.read_text(errors="replace").count(needle)
        except OSError:
            return 0


def relay_command() -> list[str]:
    script = Path(sys.executable).parent / "foliosync"
    return [str(script)] if script.exists() else [sys.executable, "-m", "foliosync.client.cli"]


def relay_has_feed_option() -> bool:
    """Whether ``foliosync relay`` has a price feed that can be turned off (--feed none)."""
    result = subprocess.run(
        [*relay_command(), "relay", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return "--feed" in result.stdout


FEED_OFF = ["--feed", "none"]
# The fan-out parts connect hundreds of devices of one user: above the relay's default bound of
# connections per user (a limit against a hostile client, not a capacity).
BENCH_LIMITS = ["--max-connections-per-user", "100000"]


def relay_argv(port: int, data_dir: Path, extra: Sequence[str] = ()) -> list[str]:
    return [
        *relay_command(),
        "relay",
        "--port",
        str(port),
        "--data",
        str(data_dir),
        "--log-level",
        "INFO",
        *extra,
    ]


class Relay(Server):
    extra_args: Sequence[str] = ()  # set once per run: e.g. the price feed turned off

    def __init__(
        self, root: Path, name: str, extra: Sequence[str] = (), data_dir: Path | None = None
    ) -> None:
        self.data_dir = data_dir or root / f"{name}-data"
        self.secret = load_or_create_secret(self.data_dir)
        port = free_port()
        argv = relay_argv(port, self.data_dir, [*self.extra_args, *extra])
        super().__init__(argv, port, root / f"{name}.log")

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def token(self, user: str, device: str) -> str:
        return str(issue_token(self.secret, user, device=device))

    async def start_relay(self) -> float:
        async def healthy() -> None:
            timeout = aiohttp.ClientTimeout(total=1)
            async with (
                aiohttp.ClientSession(timeout=timeout) as http,
                http.get(f"http://127.0.0.1:{self.port}/healthz") as response,
            ):
                response.raise_for_status()

        return await self.start(healthy)

    async def health(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http,
            http.get(f"http://127.0.0.1:{self.port}/healthz") as response,
        ):
            return dict(await response.json())


class Loader:
    """A load process (python -m bench.relay_load) and its JSON-lines conversation."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, root: Path, name: str) -> Loader:
        log = root / f"{name}.log"
        with open(log, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.relay_load",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                cwd=REPO,
                limit=64 << 20,
            )
        return cls(proc, log)

    async def call(self, cmd: str, wait: float = 300.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), wait)
        if not line:
            raise RuntimeError(f"load process died: {self.log.read_text(errors='replace')[-2000:]}")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"load process: {reply['error']}")
        return reply

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.call("stop", wait=15)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proc.wait(), 10)
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


def idle_specs(relay: Relay, first: int, count: int) -> list[dict[str, Any]]:
    return [
        {
            "token": relay.token(f"idle{n:05d}", f"dev{n:05d}"),
            "device": f"dev{n:05d}",
            "watchlist": "Idle",
            "index": False,
        }
        for n in range(first, first + count)
    ]


def check_connected(result: dict[str, Any], what: str) -> None:
    if result["in_sync"] != result["devices"]:
        raise RuntimeError(
            f"{what}: only {result['in_sync']} of {result['devices']} in sync; {result['errors']}"
        )


# -- 1 and 4: propagation latency and memory ---------------------------------------------------


@dataclass(slots=True)
class Pair:
    """Devices A and B of one user: real replicas and sync clients."""

    a: Replica
    b: Replica
    client_a: SyncClient
    client_b: SyncClient
    doc_id: str
    symbols: list[str]
    remote: asyncio.Future[float] | None = None
    b_apply_s: float = 0.0  # how long B's last apply_remote took (apply + commit)


async def open_pair(relay: Relay, root: Path) -> Pair:
    a = await Replica.open(root / "device-a.db")
    b = await Replica.open(root / "device-b.db")
    wl = await a.create_watchlist("Latency")
    symbols = ["AAPL", "MSFT", "GOOG", "AMZN", "NVDA", "META", "TSLA", "AMD"]
    await wl.add(symbols)
    client_a = SyncClient(a, relay.url, relay.token("alice", "device-a"))
    client_b = SyncClient(b, relay.url, relay.token("alice", "device-b"))
    pair = Pair(a, b, client_a, client_b, wl.id, symbols)

    def on_change(change: DocumentChange) -> None:
        if change.origin == "remote" and change.doc_id == pair.doc_id:
            waiting = pair.remote
            if waiting is not None and not waiting.done():
                waiting.set_result(time.perf_counter())

    b.subscribe(on_change)
    original = b.apply_remote

    async def timed_apply(*args: Any, **kwargs: Any) -> bool:
        started = time.perf_counter()
        try:
            changed: bool = await original(*args, **kwargs)
        finally:
            pair.b_apply_s = time.perf_counter() - started
        return changed

    b.apply_remote = timed_apply  # type: ignore[method-assign,unused-ignore]  # this instance
    await client_a.sync_once(timeout=30)
    return pair


async def start_pair(pair: Pair) -> None:
    pair.client_a.start()
    pair.client_b.start()
    await pair.client_a.wait_in_sync(30)
    await pair.client_b.wait_in_sync(30)
    deadline = time.monotonic() + 30
    while pair.doc_id not in pair.b.document_ids() or pair.b.info(pair.doc_id).name != "Latency":
        if time.monotonic() > deadline:
            raise RuntimeError("device B never received the watchlist")
        await asyncio.sleep(0.01)
    await pair.client_b.wait_in_sync(30)


async def stop_pair(pair: Pair) -> None:
    await pair.client_a.stop()
    await pair.client_b.stop()


@dataclass(slots=True)
class Propagated:
    total_ms: float  # A's edit call -> B's replica reported the change
    commit_ms: float  # A's edit call until it returned (committed locally)
    apply_ms: float  # B's apply_remote (apply + commit), part of the total


async def propagation(pair: Pair, edits: int, warmup: int) -> tuple[list[Propagated], int]:
    """The timed edits A -> B, and how many B never saw within 5 s."""
    wl = await pair.a.watchlist(pair.doc_id)
    loop = asyncio.get_running_loop()
    samples: list[Propagated] = []
    lost = 0
    for i in range(warmup + edits):
        pair.remote = loop.create_future()
        started = time.perf_counter()
        await wl.set_note(pair.symbols[i % len(pair.symbols)], f"edit {i}")
        committed = time.perf_counter()
        try:
            received = await asyncio.wait_for(pair.remote, 5)
        except TimeoutError:
            lost += 1
            continue
        finally:
            pair.remote = None
        if i >= warmup:
            samples.append(
                Propagated(
                    (received - started) * 1000,
                    (committed - started) * 1000,
                    pair.b_apply_s * 1000,
                )
            )
    return samples, lost


async def latency_and_memory(root: Path, sizes: Sizes) -> tuple[Table, Table]:
    latency = Table(
        "Edit propagation device A -> relay -> device B (real SyncClients and replicas)",
        [
            "idle clients",
            "edits",
            "p50 ms",
            "p99 ms",
            "max ms",
            "A commit p50",
            "B apply p50",
            "lost",
            "relay CPU %",
            "other CPU %",
            "target",
            "met",
        ],
    )
    memory = Table(
        "Relay memory per connected client (VmRSS of the relay process)",
        ["relay state", "clients", "VmRSS MiB", "KiB per client", "target", "met"],
    )
    relay = Relay(root, "relay-latency")
    loader = await Loader.start(root, "load-idle")
    slowest: list[str] = []
    try:
        await relay.start_relay()
        warm = await loader.call(
            "start", proto="folio", port=relay.port, devices=idle_specs(relay, 0, 1)
        )
        check_connected(warm, "warm-up client")
        await asyncio.sleep(1.0)
        rss_idle = proc_rss_kib(relay.pid)
        memory.add("idle (after one warm-up client)", 1, rss_idle / 1024, None, "-", "")
        pair = await open_pair(relay, root)
        connected = 1
        for level in sizes.idle:
            result = await loader.call(
                "start",
                proto="folio",
                port=relay.port,
                devices=idle_specs(relay, connected, level - connected + 1),
            )
            check_connected(result, f"{level} idle clients")
            connected = level + 1
            await asyncio.sleep(1.0)
            rss = proc_rss_kib(relay.pid)
            memory.add(
                f"{level:,} idle clients, 1 watchlist each",
                level,
                rss / 1024,
                (rss - rss_idle) / level,
                "-",
                "",
            )
            await start_pair(pair)
            loader0 = (await loader.call("cpu"))["cpu_s"]
            cpu0, own0, busy0 = proc_cpu_s(relay.pid), own_cpu_s(), machine_busy_s()
            wall0 = time.monotonic()
            samples, lost = await propagation(pair, sizes.edits, sizes.warmup)
            relay_s, own_s = proc_cpu_s(relay.pid) - cpu0, own_cpu_s() - own0
            busy_s, wall = machine_busy_s() - busy0, time.monotonic() - wall0
            loader_s = (await loader.call("cpu"))["cpu_s"] - loader0
            cpu = relay_s / wall * 100
            other = max(0.0, busy_s - relay_s - own_s - loader_s) / wall * 100
            await stop_pair(pair)
            ordered = sorted(p.total_ms for p in samples)
            p99 = percentile(ordered, 0.99)
            at_target = level >= 1000 or level == sizes.idle[-1]
            latency.add(
                level,
                len(samples),
                percentile(ordered, 0.5),
                p99,
                ordered[-1] if ordered else float("nan"),
                statistics.median(p.commit_ms for p in samples) if samples else float("nan"),
                statistics.median(p.apply_ms for p in samples) if samples else float("nan"),
                lost,
                cpu,
                other,
                f"p99 < {LATENCY_TARGET_MS:g} ms" if at_target else "",
                ("yes" if p99 < LATENCY_TARGET_MS and not lost else "NO") if at_target else "",
            )
            if samples:
                worst = max(samples, key=lambda p: p.total_ms)
                slowest.append(
                    f"{level:,} idle: {worst.total_ms:.1f} ms = A commit {worst.commit_ms:.1f} + "
                    f"B apply {worst.apply_ms:.1f} + relay and sockets "
                    f"{worst.total_ms - worst.commit_ms - worst.apply_ms:.1f}"
                )
        counts = await loader.call("counts")
        await asyncio.sleep(0.2)  # let the clients' delayed price-subscription checks finish
        await pair.a.close()
        await pair.b.close()
    finally:
        await loader.close()
        await relay.stop()
    last = sizes.idle[-1]
    latency.notes += [
        f"{sizes.edits} timed edits per row after {sizes.warmup} untimed, one at a time: the next "
        "edit starts when B's replica has reported the previous one (DocumentChange, "
        "origin='remote'); lost = not seen within 5 s.",
        "latency = A's set_note (committed to A's SQLite replica) -> relay (applied, stored, "
        "acknowledged, fanned out) -> B applied it and committed it to its replica. A commit and "
        "B apply (apply_remote, timed on B's instance) are parts of it. Slowest edit: "
        + "; ".join(slowest)
        + ".",
        "idle clients: authenticated WebSocket connections of OTHER users (one per user), each "
        "synced one watchlist of its own, then silent; lightweight protocol clients in a separate "
        "process (bench/relay_load.py). A and B: SyncClient + Replica in the driving process.",
        f"idle clients disconnected during the run: {counts['disconnects']}; their errors: "
        f"{counts['errors'] or 'none'}. other CPU % = processes other than the relay, the load "
        "process and this one (from /proc/stat), in % of one core: the machine is shared.",
    ]
    memory.notes += [
        "VmRSS from /proc/<pid>/status of the relay process, 1 s after the clients are in sync; "
        f"KiB per client = (VmRSS - idle) / clients; at {last:,} clients: the figure asked for.",
        "each client is another user: its connection, session, subscription, and one hot "
        "watchlist of 3 symbols (the relay keeps up to max_hot_documents in memory).",
        "idle = the relay after one client connected and left (imports and pools warmed).",
    ]
    return latency, memory


# -- 2: catching up after offline edits --------------------------------------------------------


async def offline_resync(root: Path, sizes: Sizes) -> Table:
    table = Table(
        f"Syncing a device back after {sizes.offline_docs * sizes.offline_edits:,} offline edits "
        f"over {sizes.offline_docs} documents (SyncClient.sync_once)",
        ["step", "seconds", "frames", "target", "met"],
    )
    relay = Relay(root, "relay-offline")
    replica = await Replica.open(root / "offline.db")
    try:
        await relay.start_relay()
        client = SyncClient(replica, relay.url, relay.token("olga", "laptop"))
        watchlists, portfolios = [], []
        for n in range(sizes.offline_docs):
            if n % 2 == 0:
                wl = await replica.create_watchlist(f"Watchlist {n:03d}")
                await wl.add(["AAPL", "MSFT"])
                watchlists.append(wl)
            else:
                pf = await replica.create_portfolio(f"Portfolio {n:03d}")
                await pf.add_trade("AAPL", 10, "150")
                portfolios.append(pf)
        await client.sync_once(timeout=60)
        built = time.perf_counter()
        for k in range(sizes.offline_edits):
            for wl in watchlists:
                await wl.add(f"Z{k:04d}" if k % 2 == 0 else f"Y{k:04d}")
            for pf in portfolios:
                await pf.add_trade("MSFT", k + 1, f"{300 + k}.25")
        edit_s = time.perf_counter() - built
        pending = len(await replica.pending_updates())

        marks: dict[str, float] = {}
        frames = {"replies": 0, "sent": 0, "acks": 0}
        clock = time.perf_counter

        def wrap(name: str, key: str, count: str | None = None) -> None:
            original = getattr(replica, name)

            async def timed(*args: Any, **kwargs: Any) -> Any:
                result = await original(*args, **kwargs)
                marks.setdefault(f"first {key}", clock())
                marks[f"last {key}"] = clock()
                if count == "sent" and result is not None:
                    frames["sent"] += 1
                elif count is not None and count != "sent":
                    frames[count] += 1
                return result

            setattr(replica, name, timed)  # this instance only

        wrap("apply_remote", "reply", "replies")
        wrap("outgoing", "outgoing", "sent")
        wrap("acknowledge", "ack", "acks")
        client.on_connection_change(lambda up: marks.setdefault("welcome", clock()) if up else None)
        relay_cpu0 = proc_cpu_s(relay.pid)
        started = clock()
        await client.sync_once(timeout=60)
        ended = clock()
        relay_cpu = proc_cpu_s(relay.pid) - relay_cpu0
        left = len(await replica.pending_updates())

        # a second device, empty, pulls every document
        fresh = await Replica.open(root / "offline-new-device.db")
        try:
            pulled = clock()
            await SyncClient(fresh, relay.url, relay.token("olga", "phone")).sync_once(timeout=60)
            pull_s = clock() - pulled
            pulled_docs = len(fresh.documents())
        finally:
            await fresh.close()
    finally:
        await replica.close()
        await relay.stop()
    welcome = marks.get("welcome", started)
    last_out = marks.get("last outgoing", welcome)
    last_ack = marks.get("last ack", last_out)
    total = ended - started
    table.add("connect + handshake (to the Welcome)", welcome - started, 1, "", "")
    table.add(
        "initial sync (SyncRequests -> SyncReplies -> diffs sent)",
        last_out - welcome,
        frames["replies"] + frames["sent"],
        "",
        "",
    )
    table.add(
        "acks (last diff sent -> last Ack applied)", last_ack - last_out, frames["acks"], "", ""
    )
    table.add("close (mark synced, disconnect)", ended - last_ack, None, "", "")
    table.add(
        "total sync_once",
        total,
        None,
        f"< {RESYNC_TARGET_S:g} s",
        "yes" if total < RESYNC_TARGET_S and left == 0 else "NO",
    )
    table.add(f"a new device pulls all {pulled_docs} documents", pull_s, None, "", "")
    table.notes += [
        f"{sizes.offline_docs // 2 + sizes.offline_docs % 2} watchlists (add one symbol per edit) "
        f"and {sizes.offline_docs // 2} portfolios (add_trade per edit), synced once, then "
        f"{sizes.offline_edits} edits each offline: {pending:,} pending updates, made in "
        f"{edit_s:.1f} s (each committed); {left} left pending after the sync.",
        "frames: SyncReplies received + diffs sent (one per document the relay lacked something "
        "of, the index included), then Acks; times from the replica methods the sync client "
        "calls (apply_remote, outgoing, acknowledge), wrapped on this replica instance.",
        f"relay CPU during the sync: {relay_cpu:.2f} s. The relay ran with no other client.",
    ]
    return table


# -- 3: reconnect storm ------------------------------------------------------------------------


async def reconnect_storm(root: Path, sizes: Sizes) -> Table:
    n = sizes.storm
    table = Table(
        f"Reconnect storm: {n:,} devices, relay SIGKILLed and restarted on the same data",
        ["phase", "seconds", "devices", "target", "met"],
    )
    relay = Relay(root, "relay-storm")
    loader = await Loader.start(root, "load-storm")
    try:
        await relay.start_relay()
        specs = [
            {
                "token": relay.token(f"storm{k:05d}", f"dev{k:05d}"),
                "device": f"dev{k:05d}",
                "watchlist": "Main",
                "portfolio": "Savings" if k % 2 else None,
            }
            for k in range(n)
        ]
        first = await loader.call(
            "start", proto="folio", port=relay.port, devices=specs, reconnect=True
        )
        check_connected(first, "storm devices")
        rss_before = proc_rss_kib(relay.pid)
        killed = time.monotonic()
        relay.kill()
        await loader.call("offline_edit")
        restart_s = await relay.start_relay()
        healthy = time.monotonic()  # the restarted relay answered /healthz
        cpu0, busy0 = proc_cpu_s(relay.pid), machine_busy_s()
        done = await loader.call("wait_in_sync", timeout=60)
        relay_cpu = proc_cpu_s(relay.pid) - cpu0
        busy = machine_busy_s() - busy0
        resync_wall = time.monotonic() - healthy
        rss_after = proc_rss_kib(relay.pid)
        health = await relay.health()
        behind = relay.log_count("fell behind")
    finally:
        await loader.close()
        await relay.stop()
    synced = [t - killed for t in done["synced_at"]]
    welcomed = [t - killed for t in done["welcomed_at"]]
    lags = done["lags"]
    all_in = max(synced) if len(synced) == n else float("nan")
    table.add("connect and sync all, before the kill", first["seconds"], n, "", "")
    table.add("SIGKILL -> restarted relay answers /healthz", healthy - killed, None, "", "")
    table.add("SIGKILL -> Welcome, half of the devices", percentile(welcomed, 0.5), None, "", "")
    table.add("SIGKILL -> Welcome, last device", max(welcomed, default=float("nan")), None, "", "")
    table.add("Welcome -> in sync, per device: p50", percentile(lags, 0.5), None, "", "")
    table.add("Welcome -> in sync, per device: p99", percentile(lags, 0.99), None, "", "")
    table.add("Welcome -> in sync, per device: max", max(lags, default=float("nan")), None, "", "")
    table.add("SIGKILL -> half of the devices in sync", percentile(synced, 0.5), None, "", "")
    table.add("SIGKILL -> 99% of the devices in sync", percentile(synced, 0.99), None, "", "")
    table.add(
        "SIGKILL -> ALL devices in sync",
        all_in,
        len(synced),
        f"< {STORM_TARGET_S:g} s",
        "yes" if all_in < STORM_TARGET_S else "NO",
    )
    table.add("relay healthy -> ALL devices in sync", all_in - (healthy - killed), None, "", "")
    table.notes += [
        f"relay max_initial_syncs = {RelayConfig().max_initial_syncs} (documents synced at once "
        "across all connections; the default, not overridden).",
        f"devices: one per user, each with its index and a watchlist, every second one also a "
        f"portfolio ({n + n + n // 2:,} documents); after the kill every device edits its "
        "watchlist offline, so 'in sync' = Welcome, a SyncReply for each document, and that edit "
        "acknowledged.",
        "reconnects: SyncClient's Backoff (full jitter: uniform(0, min(30, 0.5 * 2^attempt)) s, "
        "reset on Welcome), lightweight protocol clients in one load process. 'SIGKILL -> "
        "Welcome' is mostly the backoff (when each device tries again); 'Welcome -> in sync' is "
        "the relay's work for that device (JWT check, documents, SyncReplies under "
        "max_initial_syncs, storing the offline edit) and its queueing behind the others.",
        f"connection attempts after the kill: {done['connects'] - n} succeeded, "
        f"{done['failed_connects']} refused or failed; relay restart took {restart_s:.2f} s "
        f"(process start to /healthz).",
        f"relay CPU from restart to all in sync: {relay_cpu:.2f} s of {resync_wall:.2f} s; all "
        f"processes together: {busy:.2f} CPU s (2 cores); VmRSS {rss_before / 1024:.0f} "
        f"MiB before the kill, {rss_after / 1024:.0f} MiB after; {health['hot_documents']} hot "
        f"documents; 'fell behind' disconnects: {behind}; device errors: "
        f"{done['errors'] or 'none'}.",
    ]
    return table


# -- 5: fan-out of one busy document -----------------------------------------------------------


@dataclass(slots=True)
class Probe:
    """The editor's send times and the samplers' receipts, keyed by the edit's update key."""

    keys: dict[tuple[int, int], int] = field(default_factory=dict)
    sent: list[float] = field(default_factory=list)
    received: list[list[float]] = field(default_factory=list)  # per edit: latencies (s)
    counts: dict[int, int] = field(default_factory=dict)  # sampler -> receipts this step

    def reset(self) -> None:
        self.keys.clear()
        self.sent.clear()
        self.received.clear()
        self.counts.clear()

    def register(self, update: bytes, at: float) -> None:
        self.keys[update_key(update)] = len(self.sent)
        self.sent.append(at)
        self.received.append([])

    def receipt(self, sampler: int, update: bytes) -> None:
        """Every edit the update carries (several, merged, from a relay that merges; of several
        editors, several clients' blocks)."""
        now = time.monotonic()
        if update[0] == 1:
            client, clock, structs = update_edits(update)
            items: Sequence[tuple[int, int]] = [
                (client, at) for at in range(clock, clock + structs)
            ]
        else:
            items = update_items(update)
        for key in items:
            index = self.keys.get(key)
            if index is not None:
                self.received[index].append(now - self.sent[index])
                self.counts[sampler] = self.counts.get(sampler, 0) + 1


def folio_receipt(probe: Probe, sampler: int, _device: object, payload: bytes) -> None:
    """A sampler got an Update frame: [12, doc, seq, update, changed_at, changed_by]."""
    probe.receipt(sampler, msgpack.unpackb(payload)[3])


def y_receipt(probe: Probe, sampler: int, _device: object, payload: bytes) -> None:
    probe.receipt(sampler, y_update_payload(payload))


@dataclass(slots=True)
class Step:
    rate: float
    edits: int
    sent_rate: float
    p50: float
    p99: float
    worst: float
    first_p50: float
    last_p50: float
    delivered: float  # fraction of edits x receivers delivered
    server_cpu: float
    server_us_per_frame: float  # server CPU per update delivered to a receiver
    load_cpu: float
    other_cpu: float  # the rest of the machine (other processes), % of one core
    ack_p99: float  # editor: edit -> Ack (foliosync only; nan otherwise)
    disconnects: int

    @property
    def backlog(self) -> bool:
        # A p50 growing from the first third of the step to the last: judged on steps of at
        # least 30 edits (ten per third); with fewer, two slow edits look like a trend.
        growing = self.edits >= 30 and self.last_p50 > 2 * self.first_p50 + 10
        return growing or self.delivered < 1.0 or self.disconnects > 0

    @property
    def held(self) -> bool:
        return self.p99 < FANOUT_P99_MS and not self.backlog and self.sent_rate >= 0.95 * self.rate


@dataclass(slots=True)
class Target:
    """The server under a fan-out load and how its editor edits."""

    server: Server
    edit: Callable[[int], bytes]  # makes edit i, sends it, returns its update
    sent_at: dict[int, float] = field(default_factory=dict)  # seq -> when edited (foliosync)
    acked: dict[int, float] = field(default_factory=dict)  # seq -> when acknowledged
    others: list[Server] = field(default_factory=list)  # more server processes (a relay group)


async def run_steps(
    system: Target,
    loader: Loader,
    probe: Probe,
    samplers: int,
    bulk: int,
    sizes: Sizes,
    rates: Sequence[float],
    patience: int = 2,
) -> list[Step]:
    """Climb ``rates``; stop at a backlog or after ``patience`` steps not held in a row."""
    steps: list[Step] = []
    failed_in_a_row = 0
    for rate in rates:
        await loader.call("counts", reset=True)
        probe.reset()
        system.sent_at.clear()
        edits = max(sizes.min_step_edits, round(rate * sizes.step_s))
        loader0 = (await loader.call("cpu"))["cpu_s"]
        pids = [system.server.pid, *(o.pid for o in system.others)]
        server_cpu0, own0, busy0 = sum(map(proc_cpu_s, pids)), own_cpu_s(), machine_busy_s()
        started = time.monotonic()
        for i in range(edits):
            due = started + i / rate
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            at = time.monotonic()
            probe.register(system.edit(i), at)
        last_sent = time.monotonic()
        sent_rate = (edits - 1) / (probe.sent[-1] - probe.sent[0]) if edits > 1 else rate
        expected = edits * samplers
        deadline = last_sent + sizes.drain_s
        while sum(probe.counts.values()) < expected and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        counts = await loader.call("counts")
        while counts["updates_min"] < edits and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            counts = await loader.call("counts")
        server_cpu_s = sum(map(proc_cpu_s, pids)) - server_cpu0
        own_s, busy_s = own_cpu_s() - own0, machine_busy_s() - busy0
        wall = time.monotonic() - started
        loader_s = (await loader.call("cpu"))["cpu_s"] - loader0
        server_cpu = server_cpu_s / wall * 100
        load_cpu = (loader_s + own_s) / wall * 100
        other_cpu = max(0.0, busy_s - server_cpu_s - loader_s - own_s) / wall * 100
        acks = sorted(
            (system.acked[seq] - at) * 1000
            for seq, at in system.sent_at.items()
            if seq in system.acked
        )
        latencies = sorted(x * 1000 for edit in probe.received for x in edit)
        third = max(1, edits // 3)
        first = [x * 1000 for edit in probe.received[:third] for x in edit]
        last = [x * 1000 for edit in probe.received[-third:] for x in edit]
        delivered = (sum(probe.counts.values()) + counts["updates_total"]) / (
            edits * (samplers + bulk)
        )
        step = Step(
            rate=rate,
            edits=edits,
            sent_rate=sent_rate,
            p50=percentile(latencies, 0.5),
            p99=percentile(latencies, 0.99) if len(latencies) >= expected else float("inf"),
            worst=latencies[-1] if latencies else float("nan"),
            first_p50=statistics.median(first) if first else float("nan"),
            last_p50=statistics.median(last) if last else float("inf"),
            delivered=delivered,
            server_cpu=server_cpu,
            server_us_per_frame=server_cpu_s / (edits * (samplers + bulk)) * 1e6,
            load_cpu=load_cpu,
            other_cpu=other_cpu,
            ack_p99=percentile(acks, 0.99),
            disconnects=counts["disconnects"],
        )
        steps.append(step)
        # Stop at a backlog (over capacity), or after ``patience`` steps not held in a row (a
        # single slow edit at a low rate, where p99 is nearly the maximum, does not end it).
        failed_in_a_row = 0 if step.held else failed_in_a_row + 1
        if step.backlog or failed_in_a_row >= patience:
            break
        await asyncio.sleep(0.3)
    return steps


async def fanout_foliosync(root: Path, sizes: Sizes) -> tuple[list[Step], dict[str, Any]]:
    relay = Relay(root, "relay-fanout")
    loader = await Loader.start(root, "load-fanout")
    probe = Probe()
    devices: list[FolioDevice] = []
    try:
        await relay.start_relay()
        models = build_documents("editor", "Busy", None, symbols=20)
        doc_id = document_id(DocumentKind.WATCHLIST, "Busy")
        editor = FolioDevice(relay.port, relay.token("fan", "editor"), dict(models))
        devices.append(editor)
        editor_task = asyncio.get_running_loop().create_task(editor.run())
        await asyncio.wait_for(editor.in_sync.wait(), 30)
        model = models[doc_id]
        assert isinstance(model, Watchlist)
        symbols = model.symbols

        samplers = []
        for k in range(sizes.samplers):
            device = FolioDevice(
                relay.port,
                relay.token("fan", f"sampler{k:03d}"),
                {doc_id: None},
                on_update=functools.partial(folio_receipt, probe, k),
            )
            samplers.append(device)
        devices.extend(samplers)
        tasks = [asyncio.get_running_loop().create_task(d.run()) for d in samplers]
        for device in samplers:
            await asyncio.wait_for(device.in_sync.wait(), 30)
        bulk = sizes.receivers - 1 - sizes.samplers
        specs = [
            {"token": relay.token("fan", f"reader{k:04d}"), "read": doc_id} for k in range(bulk)
        ]
        result = await loader.call("start", proto="folio", port=relay.port, devices=specs)
        check_connected(result, "fan-out readers")

        def edit(i: int) -> bytes:
            at = time.monotonic()
            seq, update = editor.edit(
                doc_id, lambda m: m.set_note(symbols[i % len(symbols)], f"n{i}")
            )
            target.sent_at[seq] = at
            return one_struct(update)

        target = Target(relay, edit, acked=editor.acked)
        steps = await run_steps(target, loader, probe, sizes.samplers, bulk, sizes, sizes.rates)
        info = {
            "bulk": bulk,
            "behind": relay.log_count("fell behind"),
            "errors": [e for d in devices for e in d.errors][:5],
        }
        for device in devices:
            device.close()
        await asyncio.wait([editor_task, *tasks], timeout=5)
    finally:
        await loader.close()
        await relay.stop()
    return steps, info


GROUP_POSTGRES = "postgresql://postgres@127.0.0.1:5432/postgres"


@contextlib.asynccontextmanager
async def group_services(root: Path) -> Any:
    """A database of its own on the machine's PostgreSQL and a redis-server of its own on a free
    port (nothing on disk), for a relay group; yields (dsn, redis url)."""
    import secrets

    import asyncpg

    name = f"foliosync_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(GROUP_POSTGRES, timeout=10)
    port = free_port()
    redis = subprocess.Popen(
        [
            *("redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await asyncio.sleep(0.3)  # redis-server's start
        yield GROUP_POSTGRES.rsplit("/", 1)[0] + f"/{name}", f"redis://127.0.0.1:{port}/0"
    finally:
        redis.kill()
        redis.wait()
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await admin.close()


async def fanout_group(
    root: Path,
    sizes: Sizes,
    count: int,
    rates: Sequence[float],
    *,
    editors: int = 1,
    cpu_budget_cores: float | None = None,
) -> tuple[list[Step], dict[str, Any]]:
    """The fan-out load on ``count`` relays sharing PostgreSQL and Redis: ``editors`` devices
    editing in turn, editor k on relay k % count, samplers and readers spread evenly over all
    relays. With ``cpu_budget_cores``, each
    relay process is held to that share of a core (a cgroup quota: bench/cpubudget.py)."""
    async with group_services(root) as (dsn, redis_url), contextlib.AsyncExitStack() as budgets:
        data_dir = root / f"group{count}-data"
        relays = [
            Relay(
                root,
                f"group{count}-relay{n}",
                ["--store", dsn, "--redis", redis_url, "--relay-id", f"g{count}-{n}"],
                data_dir=data_dir,
            )
            for n in range(count)
        ]
        loader = await Loader.start(root, f"load-group{count}")
        probe = Probe()
        devices: list[FolioDevice] = []
        groups: list[Path] = []
        try:
            for n, relay in enumerate(relays):
                await relay.start_relay()
                if cpu_budget_cores is not None:
                    groups.append(
                        budgets.enter_context(
                            cpu_budget(relay.pid, cpu_budget_cores, f"g{count}-{n}")
                        )
                    )
            first = relays[0]
            doc_id = document_id(DocumentKind.WATCHLIST, "Busy")
            loop = asyncio.get_running_loop()
            writers: list[FolioDevice] = []
            tasks = []
            for k in range(editors):
                # The first creates the documents; the others start empty and sync them from
                # the relay, as a user's second device does.
                models: dict[str, DocumentModel | None] = (
                    dict(build_documents("editor", "Busy", None, symbols=20))
                    if k == 0
                    else {doc_id: Watchlist(Doc(), EditContext(f"editor{k}"))}
                )
                port = relays[k % count].port
                writer = FolioDevice(port, first.token("fan", f"editor{k}"), models)
                writers.append(writer)
                tasks.append(loop.create_task(writer.run()))
                await asyncio.wait_for(writer.in_sync.wait(), 30)
            devices.extend(writers)
            model = writers[0].models[doc_id]
            assert isinstance(model, Watchlist)
            symbols = model.symbols
            samplers = [
                FolioDevice(
                    relays[k % count].port,
                    first.token("fan", f"sampler{k:03d}"),
                    {doc_id: None},
                    on_update=functools.partial(folio_receipt, probe, k),
                )
                for k in range(sizes.samplers)
            ]
            devices.extend(samplers)
            tasks += [loop.create_task(d.run()) for d in samplers]
            for device in samplers:
                await asyncio.wait_for(device.in_sync.wait(), 30)
            bulk = sizes.receivers - editors - sizes.samplers
            for n, relay in enumerate(relays):
                specs = [
                    {"token": first.token("fan", f"reader{k:04d}"), "read": doc_id}
                    for k in range(n, bulk, count)
                ]
                result = await loader.call("start", proto="folio", port=relay.port, devices=specs)
                check_connected(result, f"group readers on relay {n}")

            def edit(i: int) -> bytes:
                at = time.monotonic()
                writer = writers[i % editors]
                seq, update = writer.edit(
                    doc_id, lambda m: m.set_note(symbols[i % len(symbols)], f"n{i}")
                )
                if writer is writers[0]:  # edit -> Ack is taken on the first editor
                    target.sent_at[seq] = at
                return update

            target = Target(first, edit, acked=writers[0].acked, others=relays[1:])
            throttled0 = [throttled_s(g) for g in groups]
            # Three steps, not two: the steps are 10 % apart, and one stall of a relay group
            # (150-200 ms, seen once in a few runs) on two steps ended a climb at a fifth of
            # the rate the runs around it held.
            steps = await run_steps(
                target, loader, probe, sizes.samplers, bulk, sizes, rates, patience=3
            )
            info = {
                "bulk": bulk,
                "behind": sum(r.log_count("fell behind") for r in relays),
                "throttled_s": sum(throttled_s(g) for g in groups) - sum(throttled0),
                "errors": [e for d in devices for e in d.errors][:5],
            }
            for device in devices:
                device.close()
            await asyncio.wait(tasks, timeout=5)
        finally:
            await loader.close()
            for relay in relays:
                await relay.stop()
    return steps, info


def group_budget() -> float | None:
    """The share of a core each relay of the group part gets (FOLIOSYNC_BENCH_RELAY_CPU; 0.5 by
    default, ``none``: no budget)."""
    value = os.environ.get("FOLIOSYNC_BENCH_RELAY_CPU", "0.5")
    return None if value.lower() in ("none", "0", "") else float(value)


def group_editors() -> int:
    """How many devices edit the busy document in turn (FOLIOSYNC_BENCH_GROUP_EDITORS, 2 by
    default): with one, the editor's relay checks and stores every edit and the other only
    applies them, so two relays are asymmetric by the load's shape; with two, one on each."""
    return max(1, int(os.environ.get("FOLIOSYNC_BENCH_GROUP_EDITORS", "2")))


async def group(root: Path, sizes: Sizes) -> list[Table]:
    """One relay against two, both on PostgreSQL and Redis, under the fan-out load; each relay
    held to the same share of a core, so that the relays, not the two cores they share with the
    load, are the limit."""
    budget = group_budget()
    editors = group_editors()
    budget_note = "No CPU budget (FOLIOSYNC_BENCH_RELAY_CPU=none): the relays share the machine."
    if budget is not None:
        try:
            check_budget()
        except BudgetUnavailable as exc:
            budget = None
            budget_note = f"No CPU budget could be set ({exc}): the relays share the machine."
    if budget is not None:
        budget_note = (
            f"Each relay process is held to {budget:g} of a core (a cgroup CPU quota, 10 ms "
            "period: bench/cpubudget.py), so that one relay holds what that share holds and two "
            "relays what twice it holds, while the rest of the two cores is left to the load "
            "processes, the driver, PostgreSQL and Redis (their CPU beside each step: a step "
            "whose load and other CPU reach the rest of the machine is limited by them, not by "
            "the relays)."
        )
    table = Table(
        f"Relay group: the fan-out load ({sizes.receivers} devices of one user, {editors} of them "
        "editing in turn) on 1 and 2 relay processes sharing PostgreSQL and Redis",
        [
            "relays",
            "rate/s",
            "p50 ms",
            "p99 ms",
            "delivered %",
            "relays' CPU %",
            "µs/update",
            "deliveries per relay-CPU-s",
            "load CPU %",
            "other CPU %",
            "held",
        ],
    )
    table.notes.append(budget_note)
    summary = Table(
        "Relay group: deliveries held, 2 relays against 1 (same run)",
        ["relays", "highest rate held /s", "deliveries/s held", "per relay-CPU-s at that rate"],
    )
    best: dict[int, tuple[float, float]] = {}
    for count in (1, 2):
        try:
            steps, info = await fanout_group(
                root, sizes, count, sizes.group_rates, editors=editors, cpu_budget_cores=budget
            )
        except Exception as exc:
            summary.notes.append(f"{count} relay(s) could not be run: {type(exc).__name__}: {exc}")
            continue
        if budget is not None:
            table.notes.append(
                f"{count} relay(s): {info['throttled_s']:.1f} s in all waited on the quota."
            )
        if info["errors"]:
            summary.notes.append(f"{count} relay(s): device errors {info['errors']}")
        for s in steps:
            per_cpu = 1e6 / s.server_us_per_frame if s.server_us_per_frame else float("nan")
            table.add(
                count,
                float(s.rate),
                s.p50,
                s.p99,
                s.delivered * 100,
                s.server_cpu,
                s.server_us_per_frame,
                per_cpu,
                s.load_cpu,
                s.other_cpu,
                "yes" if s.held else "NO",
            )
        held = [s for s in steps if s.held]
        top = max(held, key=lambda s: s.rate) if held else None
        rate = top.rate if top else 0.0
        per_cpu = 1e6 / top.server_us_per_frame if top and top.server_us_per_frame else 0.0
        best[count] = (rate, per_cpu)
        summary.add(count, float(rate), rate * (sizes.receivers - 1), per_cpu)
    if 1 in best and 2 in best and best[1][0]:
        ratio = best[2][0] / best[1][0]
        verdict = "met" if ratio >= GROUP_AIM_RATIO else "NOT met"
        summary.notes.append(
            f"2 relays / 1 relay, deliveries held: {ratio:.2f}x (aim {GROUP_AIM_RATIO:g}x where "
            f"the load leaves the CPU to the relays: {verdict}). {budget_note}"
        )
    return [table, summary]


Y_WEBSOCKET_DIR = REPO / "bench" / "ywebsocket"
Y_WEBSOCKET_SERVER = (
    Y_WEBSOCKET_DIR / "node_modules" / "@y" / "websocket-server" / "src" / "server.js"
)


def y_websocket_server(port: int, log: Path) -> Server:
    """y-websocket's own Node server (``@y/websocket-server``, pinned by bench/ywebsocket's
    package-lock.json), installed with ``npm ci`` on first use: what most Yjs apps run."""
    node = shutil.which("node")
    if node is None or shutil.which("npm") is None:
        raise RuntimeError("Node.js and npm are needed (tools/system-deps installs them)")
    if not Y_WEBSOCKET_SERVER.exists():
        subprocess.run(
            ["npm", "ci", "--silent", "--no-audit", "--no-fund"],
            cwd=Y_WEBSOCKET_DIR,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return Server(
        [node, str(Y_WEBSOCKET_SERVER)], port, log, env={"HOST": "127.0.0.1", "PORT": str(port)}
    )


def pycrdt_websocket_server(port: int, log: Path) -> Server:
    return Server(
        [sys.executable, "-m", "bench.relay_pycrdt_server", "--port", str(port)], port, log
    )


async def fanout_y(
    root: Path, sizes: Sizes, make_server: Callable[[int, Path], Server], name: str
) -> tuple[list[Step], dict[str, Any]]:
    """The same load against a server of the y-websocket protocol (one room, no store)."""
    port = free_port()
    server = make_server(port, root / f"{name}.log")

    async def ready() -> None:
        # A plain TCP connect: a WebSocket that connects and leaves at once can crash the
        # server (its room is cleaned up while it is still starting).
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()

    loader = await Loader.start(root, f"load-{name}")
    probe = Probe()
    devices: list[YDevice] = []
    try:
        await server.start(ready)
        models = build_documents("editor", "Busy", None, symbols=20)
        doc_id = document_id(DocumentKind.WATCHLIST, "Busy")
        model = models[doc_id]
        assert isinstance(model, Watchlist)
        symbols = model.symbols
        room = "fan"
        editor = YDevice(port, room, model)
        devices.append(editor)
        editor_task = asyncio.get_running_loop().create_task(editor.run())
        await asyncio.wait_for(editor.in_sync.wait(), 30)
        await asyncio.sleep(0.3)  # the room applies the editor's content before readers join

        samplers = []
        for k in range(sizes.samplers):
            device = YDevice(
                port,
                room,
                on_update=functools.partial(y_receipt, probe, k),
            )
            samplers.append(device)
        devices.extend(samplers)
        tasks = [asyncio.get_running_loop().create_task(d.run()) for d in samplers]
        for device in samplers:
            await asyncio.wait_for(device.in_sync.wait(), 30)
        bulk = sizes.receivers - 1 - sizes.samplers
        result = await loader.call(
            "start", proto="y", port=port, devices=[{"room": room}] * bulk, timeout=120
        )
        check_connected(result, f"{name} readers")

        def y_edit(i: int) -> bytes:
            return editor.edit(lambda m: m.set_note(symbols[i % len(symbols)], f"n{i}"))

        target = Target(server, y_edit)  # the y-websocket protocol has no Acks
        steps = await run_steps(target, loader, probe, sizes.samplers, bulk, sizes, sizes.rates)
        info = {"bulk": bulk, "connect_s": result["seconds"]}
        for device in devices:
            device.close()
        await asyncio.wait([editor_task, *tasks], timeout=5)
    finally:
        await loader.close()
        await server.stop()
    return steps, info


async def fanout(root: Path, sizes: Sizes) -> list[Table]:
    table = Table(
        f"Fan-out of one busy watchlist: {sizes.receivers} devices of one user, one editing at "
        "rising rates",
        [
            "server",
            "rate/s",
            "sent/s",
            "edits",
            "p50 ms",
            "p99 ms",
            "max ms",
            "p50 1st/last third",
            "delivered %",
            "ack p99",
            "server CPU %",
            "µs/update",
            "load CPU %",
            "other CPU %",
            "backlog",
            "held",
        ],
    )
    summary = Table(
        "Fan-out: highest rate held (p99 < 100 ms, every update delivered, no backlog)",
        ["server", "receivers", "highest rate held /s", "target", "met"],
    )
    results: list[tuple[str, list[Step], dict[str, Any]]] = []
    steps, info = await fanout_foliosync(root, sizes)
    results.append(("foliosync relay", steps, info))
    comparisons = (
        ("y-websocket", y_websocket_server),
        ("pycrdt-websocket", pycrdt_websocket_server),
    )
    # FOLIOSYNC_BENCH_COMPARE=0: the relay alone (e.g. to compare two of its configurations).
    for name, make_server in (
        comparisons if os.environ.get("FOLIOSYNC_BENCH_COMPARE") != "0" else ()
    ):
        try:
            y_steps, y_info = await fanout_y(root, sizes, make_server, name)
            results.append((name, y_steps, y_info))
        except Exception as exc:  # reported in the table, not fatal for the other figures
            summary.notes.append(f"{name} could not be run: {type(exc).__name__}: {exc}")
    for name, steps, _ in results:
        for s in steps:
            table.add(
                name,
                float(s.rate),
                s.sent_rate,
                s.edits,
                s.p50,
                s.p99,
                s.worst,
                f"{s.first_p50:.1f}/{s.last_p50:.1f}",
                s.delivered * 100,
                s.ack_p99,
                s.server_cpu,
                s.server_us_per_frame,
                s.load_cpu,
                s.other_cpu,
                "YES" if s.backlog else "no",
                "yes" if s.held else "NO",
            )
        held = [s.rate for s in steps if s.held]
        best = max(held) if held else 0.0
        is_folio = name == "foliosync relay"
        summary.add(
            name,
            sizes.receivers,
            float(best),
            f">= {FANOUT_TARGET_RATE:g}/s" if is_folio else "(comparison)",
            ("yes" if best >= FANOUT_TARGET_RATE else "NO") if is_folio else "",
        )
    best_of = {
        name: max((s.rate for s in steps if s.held), default=0.0) for name, steps, _ in results
    }
    y_best = best_of.get("y-websocket")
    if y_best:
        ratio = best_of["foliosync relay"] / y_best
        summary.notes.append(
            f"foliosync / y-websocket, measured side by side in this run: {ratio:.2f}x "
            f"(aim: at least {FANOUT_AIM_RATIO:g}x: "
            f"{'met' if ratio >= FANOUT_AIM_RATIO else 'NOT met'}); the rates are steps, so "
            "the ratio is bounded by the step sizes."
        )
    folio_info = results[0][2]
    table.notes += [
        f"each step ~{sizes.step_s:g} s (at least {sizes.min_step_edits} edits) at a fixed "
        "schedule; the editor does not wait for Acks. Latency = edit made -> update received, on "
        f"{sizes.samplers} sampling receivers in the driving process (every edit, every sampler); "
        f"the other {folio_info['bulk']} receivers (a load process) read every update frame and "
        "count the edits it carries (an edit is one struct, checked as it is made; the relay "
        "merges a busy document's changes of one flush delay into one Update, the Yjs servers "
        "send each on its own). Climbing stops at a backlog or at two steps not held in a "
        "row. ack p99 (ms) = the editor's edit -> the relay's Ack (stored in SQLite); the relay "
        "fans an update out right after acknowledging it.",
        f"backlog = delivered < 100% within {sizes.drain_s:g} s of the last edit, a receiver "
        "disconnected, or the p50 of the last third of the step > 2x the first third's + 10 ms. "
        "held = p99 < 100 ms, no backlog, and the editor kept >= 95% of the rate.",
        "server CPU % = the server process (all threads) over the step and its drain; µs/update "
        "= that CPU time / edits delivered to receivers; load CPU % = the load process + the "
        "driving process (editor, samplers); other CPU % = every other process on the machine "
        "(from /proc/stat). % of one core; 2 cores in all.",
        "foliosync: the editor and receivers are protocol clients of user 'fan' (Hello/Welcome, "
        "SyncRequest of the watchlist, then Updates; readers keep no document); an edit is a "
        "set_note through the Watchlist model (~45-byte update), stored in SQLite before it is "
        "acknowledged and fanned out. 'fell behind' disconnects: "
        f"{folio_info['behind']}; device errors: {folio_info['errors'] or 'none'}.",
    ]
    if any(name == "y-websocket" for name, _, _ in results):
        table.notes.append(
            "y-websocket: its Node server (@y/websocket-server 0.1.1 on Node "
            f"{node_version()}, bench/ywebsocket), one room holding the same watchlist, the same "
            "y-websocket protocol clients and updates as pycrdt-websocket's. No store and no "
            "authentication either."
        )
    if any(name == "pycrdt-websocket" for name, _, _ in results):
        table.notes.append(
            "pycrdt-websocket 0.16 (WebsocketServer + ASGIServer on Hypercorn, as documented; "
            "bench/relay_pycrdt_server.py): one room holding the same watchlist; clients speak "
            "the y-websocket protocol (sync step 1/2, then update messages), the editor sends the "
            "same Watchlist-model updates. No store and no authentication: it does less per "
            "update than the relay."
        )
    return [table, summary]


def node_version() -> str:
    try:
        out = subprocess.run(["node", "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip().lstrip("v") or "?"


# -- 6: two devices back online at once, each with offline edits --------------------------------

CROSSING_USER = "crossing"
CROSSING_SYMBOLS = ("AAPL", "MSFT", "GOOG", "AMZN", "NVDA")
CROSSING_WATCHLIST_EVERY = 10  # one offline edit in ten adds a symbol; the rest are trades
CROSSING_POLL_S = 0.02
CROSSING_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Crossed:
    """One crossing run, from the moment both devices are started."""

    edits: int  # offline edits per device
    seconds: float  # until both replicas hold everything, nothing pending
    edit_s: float  # making the offline edits, both devices one after the other
    relay_cpu_s: float  # every relay process of the setup, all threads
    devices_cpu_s: float  # this process: both devices, their SQLite threads, the polling
    other_cpu: float  # every other process on the machine, % of one core
    trades: int  # in each replica's portfolio at the end
    symbols: int  # in each replica's watchlist at the end


def merged_state(states: Sequence[dict[int, int]]) -> dict[int, int]:
    """The state vector of a document holding every change of each of ``states``."""
    merged: dict[int, int] = {}
    for state in states:
        for client, clock in state.items():
            merged[client] = max(merged.get(client, 0), clock)
    return merged


async def holds_all(replica: Replica, expected: dict[str, dict[int, int]]) -> bool:
    """Whether ``replica`` has every change in ``expected`` and nothing left to send: compared
    by state vector, which costs microseconds where reading 2,000 trades costs milliseconds
    on the loop that is syncing both devices."""
    if any(replica.info(doc_id).pending for doc_id in replica.document_ids()):
        return False
    for doc_id, state in expected.items():
        mine = decode_state_vector(await replica.state_vector(doc_id))
        if any(mine.get(client, 0) < clock for client, clock in state.items()):
            return False
    return True


async def offline_edits(
    replica: Replica, device: int, portfolio: str, watchlist: str, n: int
) -> None:
    pf = await replica.portfolio(portfolio)
    wl = await replica.watchlist(watchlist)
    for k in range(n):
        if k % CROSSING_WATCHLIST_EVERY == CROSSING_WATCHLIST_EVERY - 1:
            await wl.add(f"D{device}X{k:04d}")
        else:
            symbol = CROSSING_SYMBOLS[k % len(CROSSING_SYMBOLS)]
            await pf.add_trade(symbol, k % 7 + 1, f"{100 + k % 50}.25", note=f"d{device} #{k}")


async def crossing_run(root: Path, name: str, relays: Sequence[Relay], edits: int) -> Crossed:
    """Device 0 syncs through the first relay, device 1 through the last one (the same relay
    when there is one); the relays share their secret, so either token works on either."""
    homes = (relays[0], relays[-1])
    replicas = [await Replica.open(root / f"{name}-device{i}.db") for i in range(2)]
    clients: list[SyncClient] = []
    try:
        pf = await replicas[0].create_portfolio("Shared")
        await pf.add_trade("AAPL", 10, "150")
        wl = await replicas[0].create_watchlist("Shared")
        await wl.add(list(CROSSING_SYMBOLS))
        doc_ids = (pf.id, wl.id)
        tokens = [relays[0].token(CROSSING_USER, f"device{i}") for i in range(2)]
        for replica, home, token in zip(replicas, homes, tokens, strict=True):
            await SyncClient(replica, home.url, token).sync_once(timeout=60)
        if not set(doc_ids) <= set(replicas[1].document_ids()):
            raise RuntimeError(f"{name}: the second device never received the shared documents")

        made = time.perf_counter()
        for i, replica in enumerate(replicas):
            await offline_edits(replica, i, pf.id, wl.id, edits)
        edit_s = time.perf_counter() - made
        expected = {
            doc_id: merged_state(
                [decode_state_vector(await r.state_vector(doc_id)) for r in replicas]
            )
            for doc_id in doc_ids
        }

        clients = [
            SyncClient(replica, home.url, token)
            for replica, home, token in zip(replicas, homes, tokens, strict=True)
        ]
        pids = [relay.pid for relay in relays]
        relay0, own0, busy0 = sum(map(proc_cpu_s, pids)), own_cpu_s(), machine_busy_s()
        online = time.monotonic()
        for client in clients:
            client.start()
        settled = [False, False]
        while not all(settled):
            settled = [
                done or await holds_all(r, expected)
                for done, r in zip(settled, replicas, strict=True)
            ]
            if all(settled):
                break
            if time.monotonic() - online > CROSSING_TIMEOUT_S:
                pending = [sum(r.info(d).pending for d in r.document_ids()) for r in replicas]
                raise RuntimeError(
                    f"{name}: not converged after {CROSSING_TIMEOUT_S:g} s (pending {pending})"
                )
            await asyncio.sleep(CROSSING_POLL_S)
        wall = time.monotonic() - online
        relay_s = sum(map(proc_cpu_s, pids)) - relay0
        own_s, busy_s = own_cpu_s() - own0, machine_busy_s() - busy0

        # What the state vectors said, checked on the content: the same trades and symbols on
        # both devices, every edit of each among them.
        portfolios = [await r.portfolio(pf.id) for r in replicas]
        watchlists = [await r.watchlist(wl.id) for r in replicas]
        trade_ids = [{t.id for t in p.trades()} for p in portfolios]
        symbols = [set(w.symbols) for w in watchlists]
        added = edits // CROSSING_WATCHLIST_EVERY
        want_trades = 1 + 2 * (edits - added)
        want_symbols = len(CROSSING_SYMBOLS) + 2 * added
        if trade_ids[0] != trade_ids[1] or len(trade_ids[0]) != want_trades:
            raise RuntimeError(
                f"{name}: portfolios differ or lack trades: {[len(t) for t in trade_ids]} "
                f"trades, {want_trades} expected"
            )
        if symbols[0] != symbols[1] or len(symbols[0]) != want_symbols:
            raise RuntimeError(
                f"{name}: watchlists differ or lack symbols: {[len(s) for s in symbols]} "
                f"symbols, {want_symbols} expected"
            )
    finally:
        for client in clients:
            await client.stop()
        for replica in replicas:
            await replica.close()
    return Crossed(
        edits=edits,
        seconds=wall,
        edit_s=edit_s,
        relay_cpu_s=relay_s,
        devices_cpu_s=own_s,
        other_cpu=max(0.0, busy_s - relay_s - own_s) / wall * 100,
        trades=want_trades,
        symbols=want_symbols,
    )


RelaySetup = Callable[[], contextlib.AbstractAsyncContextManager[list[Relay]]]


@contextlib.asynccontextmanager
async def sqlite_relays(root: Path, name: str) -> AsyncIterator[list[Relay]]:
    """One relay, as `foliosync relay` runs by default (SQLite store, in-process fan-out)."""
    relay = Relay(root, f"{name}-relay")
    try:
        await relay.start_relay()
        yield [relay]
    finally:
        await relay.stop()


@contextlib.asynccontextmanager
async def shared_relays(root: Path, name: str, count: int) -> AsyncIterator[list[Relay]]:
    """``count`` relays on a fresh PostgreSQL database and a redis-server of their own."""
    async with group_services(root) as (dsn, redis_url):
        relays = [
            Relay(
                root,
                f"{name}-relay{n}",
                ["--store", dsn, "--redis", redis_url, "--relay-id", f"{name}-{n}"],
                data_dir=root / f"{name}-data",
            )
            for n in range(count)
        ]
        try:
            for relay in relays:
                await relay.start_relay()
            yield relays
        finally:
            for relay in relays:
                await relay.stop()


async def crossing(root: Path, sizes: Sizes) -> Table:
    n = sizes.crossing
    table = Table(
        f"Crossing: two devices of one user back online at once, {n:,} offline edits each to a "
        "shared portfolio and watchlist",
        [
            "setup",
            "edits per device",
            "seconds to converge",
            "edits/s",
            "relay CPU s",
            "devices CPU s",
            "other CPU %",
        ],
    )
    setups: list[tuple[str, str, RelaySetup]] = [
        ("1 relay, SQLite", "crossing1", functools.partial(sqlite_relays, root, "crossing1")),
        (
            "1 relay, PostgreSQL + Redis",
            "crossing1pg",
            functools.partial(shared_relays, root, "crossing1pg", 1),
        ),
        (
            "2 relays, PostgreSQL + Redis",
            "crossing2",
            functools.partial(shared_relays, root, "crossing2", 2),
        ),
    ]
    runs: list[Crossed] = []
    for setup, name, relays_of in setups:
        try:
            async with relays_of() as relays:
                run = await crossing_run(root, name, relays, n)
        except Exception as exc:  # reported in the table, not fatal for the other setups
            table.notes.append(f"{setup} could not be run: {type(exc).__name__}: {exc}")
            continue
        runs.append(run)
        table.add(
            setup,
            n,
            run.seconds,
            2 * n / run.seconds,
            run.relay_cpu_s,
            run.devices_cpu_s,
            run.other_cpu,
        )
    made = f"{runs[0].edit_s:.1f} s" if runs else "-"
    held = f"{runs[0].trades:,} trades and {runs[0].symbols} symbols" if runs else "-"
    table.notes += [
        f"the devices are real SyncClients with SQLite replicas, both in this process, user "
        f"'{CROSSING_USER}'. The first creates a portfolio (1 trade) and a watchlist "
        f"({len(CROSSING_SYMBOLS)} symbols) and syncs; the second syncs and receives them. "
        f"Offline, each then makes {n:,} edits, each committed: one in "
        f"{CROSSING_WATCHLIST_EVERY} adds a symbol to the watchlist, the others add a trade "
        f"(both devices' edits made in {made}). Then both SyncClients start at once.",
        "converged = both replicas' state vectors of the two documents cover both devices' "
        "changes, and nothing is pending in any document of either (every edit acknowledged by "
        f"a relay); polled every {CROSSING_POLL_S * 1000:g} ms. edits/s = both devices' edits "
        "/ seconds to converge. Checked after: the same trades and symbols on both devices, "
        f"every edit among them ({held} on each).",
        "each pending edit goes out as its own Update (so that a refusal names one change): the "
        "relay checks it, applies it, stores it, acknowledges it and fans it out to the other "
        "device, which applies and commits it. With 2 relays, device 0 is on the first and "
        "device 1 on the second: every edit crosses from one relay to the other through Redis. "
        "1 relay on PostgreSQL + Redis (both devices on it) tells the store's part from the "
        "second relay's.",
        "relay CPU s = the relay processes (/proc, all threads) over the convergence; devices "
        "CPU s = this process (both devices); other CPU % = every other process on the machine, "
        "PostgreSQL and Redis included, in % of one core (2 cores in all).",
    ]
    return table


# -- entry point ---------------------------------------------------------------------------------


def config_notes() -> list[str]:
    config = RelayConfig()
    return [
        "relay configuration (defaults of `foliosync relay`, one process, SQLite store, "
        f"in-process fan-out): durability={config.durability}, "
        f"max_initial_syncs={config.max_initial_syncs}, "
        f"max_hot_documents={config.max_hot_documents}, "
        f"max_outbound_bytes={config.max_outbound_bytes >> 20} MiB, "
        f"heartbeat={config.heartbeat:g} s, max_frame_size={config.max_frame_size >> 20} MiB"
        + (
            "; price feed off (--feed none: the default simulated feed ticks in market hours "
            "only, which would make the figures depend on the time of day)"
            if FEED_OFF[0] in Relay.extra_args
            else ""
        )
        + f"; {' '.join(BENCH_LIMITS)} (the fan-out's devices are one user's).",
    ]


PARTS = ("latency", "resync", "storm", "fanout", "group", "crossing")
"""The scenarios, in order; ``FOLIOSYNC_BENCH_PARTS=fanout`` (a comma list) runs only some."""


async def run(quick: bool) -> list[Table]:
    sizes = QUICK if quick else FULL
    chosen = os.environ.get("FOLIOSYNC_BENCH_PARTS", "")
    parts = [p for p in chosen.split(",") if p in PARTS] or list(PARTS)
    raise_nofile_limit()
    # FOLIOSYNC_BENCH_RELAY_ARGS: more `foliosync relay` options, e.g. "--loop uvloop".
    more = os.environ.get("FOLIOSYNC_BENCH_RELAY_ARGS", "").split()
    Relay.extra_args = [*(FEED_OFF if relay_has_feed_option() else ()), *BENCH_LIMITS, *more]
    with tempfile.TemporaryDirectory(prefix="foliosync-bench-relay-") as tmp:
        root = Path(tmp)
        tables: list[Table] = []
        if "latency" in parts:
            latency, memory = await latency_and_memory(root, sizes)
            latency.notes += config_notes()
            tables += [latency, memory]
        if "resync" in parts:
            tables.append(await offline_resync(root, sizes))
        if "storm" in parts:
            tables.append(await reconnect_storm(root, sizes))
        if "fanout" in parts:
            tables += await fanout(root, sizes)
        if "group" in parts:
            tables += await group(root, sizes)
        if "crossing" in parts:
            tables.append(await crossing(root, sizes))
    return tables
