"""Ten thousand connected devices: the relay's memory per connection, under a realistic mix.

The relay runs as its own process (``foliosync relay --feed sim:always``, SQLite store in a fresh
data directory, every other setting its default); the devices run in several load processes
(``python -m bench.relay_load``, at most ~2,500 sockets each), and this process drives them and
runs the few devices whose timing is measured. Everything connects to 127.0.0.1 only; every loop
is bounded in count and time.

The mix, as many users' devices would make it:

- users with 2 or 3 devices each (the last user of a run may have fewer), each user with 1 to 3
  documents (two watchlists in three, else a portfolio) besides the index; every device syncs
  the index and all of them. A user's first device creates them; the others connect after it and
  receive them in their first sync, as a second device does.
- a share of the devices follow prices: 3 to 36 symbols each, out of 200 (the simulator's 42
  default symbols and 158 more); the simulated feed moves 20 symbols a second, so that each
  symbol moves about every 10 s, longer than its push window: a tick is released at the next
  flush, and its age on arrival measures the relay's delivery, not the window.
- edits at a low rate per device (one edit a minute on average: a note in a watchlist, a trade
  in a portfolio), which the relay stores, acknowledges and fans out to the user's other devices,
  which apply it to their documents.
- reconnects: a small share of the devices a second lose their connection (cut, no closing
  handshake) and come back after SyncClient's Backoff.

Memory is the relay's VmRSS idle (after one device connected and left), then with 1,000, 5,000 and
10,000 devices connected and in sync, before the mix; per connection = (VmRSS - idle) /
connections. If that is more than the aim (20 KiB), a second relay runs with tracemalloc on
(``python -m bench.devices --traced-relay DIR ARGS...``, this module, around the same ``foliosync
relay`` command), and the same kind of devices are connected to it between two snapshots it takes
on SIGUSR1: what Python allocated per connection, by the line that allocated it and by the
relay's own line that led there, and the objects per connection by type. Last, y-websocket's
Node server with as many idle y-websocket clients, one room each, for comparison.

Run with ``python -m bench devices [--quick]`` (the quick form: 1,000 devices, under 2 minutes).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import msgpack

from bench.procstat import free_port, machine_busy_s, proc_cpu_s
from bench.relay import (
    REPO,
    Loader,
    Relay,
    Server,
    node_version,
    percentile,
    proc_rss_kib,
    relay_argv,
    relay_command,
    y_websocket_server,
)
from bench.relay_load import FolioDevice, build_user_documents, raise_nofile_limit, update_key
from bench.table import Table
from foliosync.server.feeds import DEFAULT_SYMBOLS
from foliosync.server.relay import RelayConfig
from foliosync.sync.model import DocumentKind, Watchlist, document_id

__all__ = ["FULL", "QUICK", "DeviceSpec", "Sizes", "plan_devices", "run"]

MEMORY_AIM_KIB = 20.0  # per connection (y-websocket's Node server: 12.5 KiB per idle client here)
SYMBOL_POOL: tuple[str, ...] = DEFAULT_SYMBOLS + tuple(f"Q{n:03d}" for n in range(158))
TRACE_FRAMES = 8
TRACE_ENV_SIGNAL = signal.SIGUSR1


@dataclass(frozen=True, slots=True)
class Sizes:
    levels: tuple[int, ...]  # devices connected at each memory reading, rising; last: the total
    loaders: int  # load processes
    concurrency: int  # devices connecting at once, per load process
    mix_s: float  # how long the mix runs at the total
    edit_interval_s: float  # per device, on average
    drops_per_s: float  # share of the devices that lose their connection each second
    price_share: float  # share of the devices that follow prices
    probe_pairs: int  # users of two devices in this process: one edits, the other receives
    probe_edit_s: float  # between two edits of one probe editor
    profile_devices: int  # connected to the traced relay
    trace_frames: int  # frames tracemalloc keeps per block (more: slower snapshots)
    y_devices: int  # idle clients of y-websocket's server


FULL = Sizes(
    levels=(1000, 5000, 10_000),
    loaders=4,
    concurrency=25,
    mix_s=60.0,
    edit_interval_s=60.0,
    drops_per_s=0.001,
    price_share=0.3,
    probe_pairs=10,
    probe_edit_s=0.5,
    profile_devices=1000,
    trace_frames=8,
    y_devices=10_000,
)
QUICK = Sizes(
    levels=(250, 500, 1000),
    loaders=2,
    concurrency=25,
    mix_s=10.0,
    edit_interval_s=60.0,
    drops_per_s=0.002,
    price_share=0.3,
    probe_pairs=5,
    probe_edit_s=0.25,
    profile_devices=100,
    trace_frames=3,
    y_devices=1000,
)


# -- the mix -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeviceSpec:
    """One device of the mix, as a load process builds it (see LoadProcess._user_device)."""

    user: str
    device: str
    watchlists: tuple[str, ...]
    portfolios: tuple[str, ...]
    symbols: tuple[str, ...]  # in each of the user's watchlists
    create: bool  # the user's first device: it creates the documents
    subscribe: tuple[str, ...] = ()
    sample_prices: bool = False

    def to_json(self, token: str) -> dict[str, Any]:
        return {
            "token": token,
            "device": self.device,
            "watchlists": list(self.watchlists),
            "portfolios": list(self.portfolios),
            "symbols": list(self.symbols),
            "create": self.create,
            "subscribe": list(self.subscribe),
            "sample_prices": self.sample_prices,
        }


def plan_devices(
    count: int, *, price_share: float, seed: str = "devices", sample_every: int = 10
) -> list[list[DeviceSpec]]:
    """``count`` devices grouped by user, the same on every run for a seed: 2 or 3 devices per
    user (the last user takes what is left), 1 to 3 documents each; one subscriber in
    ``sample_every`` times the prices it receives."""
    if count < 0 or not 0 <= price_share <= 1 or sample_every < 1:
        raise ValueError(f"bad plan: {count} devices, price share {price_share}")
    rng = random.Random(seed)
    users: list[list[DeviceSpec]] = []
    left = count
    subscribers = 0
    while left > 0:
        user = f"user{len(users):05d}"
        devices = min(rng.choice((2, 3)), left)
        left -= devices
        watchlists: list[str] = []
        portfolios: list[str] = []
        for n in range(rng.randint(1, 3)):
            if rng.random() < 2 / 3:
                watchlists.append(f"List {n}")
            else:
                portfolios.append(f"Savings {n}")
        if not watchlists:
            watchlists.append("List 0")  # every user has a watchlist to edit notes in
        symbols = tuple(rng.sample(SYMBOL_POOL, rng.randint(3, 20)))
        specs: list[DeviceSpec] = []
        for k in range(devices):
            follows: tuple[str, ...] = ()
            sample = False
            if rng.random() < price_share:
                follows = tuple(rng.sample(SYMBOL_POOL, rng.randint(3, 36)))
                sample = subscribers % sample_every == 0
                subscribers += 1
            specs.append(
                DeviceSpec(
                    user,
                    f"{user}-d{k}",
                    tuple(watchlists),
                    tuple(portfolios),
                    symbols,
                    create=k == 0,
                    subscribe=follows,
                    sample_prices=sample,
                )
            )
        users.append(specs)
    return users


def split_levels(
    users: list[list[DeviceSpec]], levels: Sequence[int]
) -> list[list[list[DeviceSpec]]]:
    """The users in groups, one per level: each level's devices are those up to its count (cut
    at a user's boundary, so that a user's devices connect together)."""
    groups: list[list[list[DeviceSpec]]] = [[] for _ in levels]
    total = 0
    level = 0
    for user in users:
        while level < len(levels) - 1 and total >= levels[level]:
            level += 1
        groups[level].append(user)
        total += len(user)
    return groups


class FeedRelay(Relay):
    """``foliosync relay`` with the simulated feed moving at any hour."""

    extra_args: Sequence[str] = ("--feed", "sim:always")


class TracedRelay(FeedRelay):
    """The same relay command run under tracemalloc (:func:`traced_relay_main`): SIGUSR1 makes
    it write what it allocated since the first signal into ``dump_dir``."""

    def __init__(self, root: Path, name: str, frames: int = TRACE_FRAMES) -> None:
        super().__init__(root, name)
        self.dump_dir = root / f"{name}-traces"
        self.dump_dir.mkdir()
        args = relay_argv(self.port, self.data_dir, self.extra_args)[len(relay_command()) :]
        self.argv = [sys.executable, "-m", "bench.devices", "--traced-relay", str(self.dump_dir)]
        self.argv += [str(frames), *args]
        self.signals = 0

    async def start_relay(self) -> float:
        """As the plain relay, with more time: imports run slower under tracemalloc."""

        async def healthy() -> None:
            await self.health()

        return await self.start(healthy, timeout=90.0)

    async def snapshot(self, timeout: float = 120.0) -> dict[str, Any]:
        """Ask for a snapshot and wait for its report (the first one only sets the baseline)."""
        self.signals += 1
        number = self.signals
        assert self.proc is not None
        self.proc.send_signal(TRACE_ENV_SIGNAL)
        done = self.dump_dir / f"report-{number}.json"
        deadline = time.monotonic() + timeout
        while not done.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"no trace report {number}: {self.tail()}")
            await asyncio.sleep(0.1)
        report: dict[str, Any] = json.loads(done.read_text())
        return report


_STARTED = time.monotonic()


def progress(message: str) -> None:
    """A line on stderr as each phase ends: a full run takes minutes."""
    print(f"[devices {time.monotonic() - _STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def tokens_for(relay: Relay, specs: Sequence[DeviceSpec]) -> list[dict[str, Any]]:
    return [s.to_json(relay.token(s.user, s.device)) for s in specs]


async def start_loaders(root: Path, name: str, count: int) -> list[Loader]:
    return list(await asyncio.gather(*(Loader.start(root, f"{name}-{n}") for n in range(count))))


async def close_loaders(loaders: Sequence[Loader]) -> None:
    await asyncio.gather(*(loader.close() for loader in loaders), return_exceptions=True)


async def connect_users(
    relay: Relay,
    loaders: Sequence[Loader],
    users: Sequence[list[DeviceSpec]],
    concurrency: int,
    timeout: float,
) -> dict[str, Any]:
    """Connect users' devices, user k on load process k % n, every user's first device before
    the others (which then find the documents on the relay); wait until all are in sync."""
    per_loader: list[list[list[DeviceSpec]]] = [[] for _ in loaders]
    for k, user in enumerate(users):
        per_loader[k % len(loaders)].append(user)

    async def one(loader: Loader, mine: list[list[DeviceSpec]]) -> list[dict[str, Any]]:
        results = []
        for wave in ([u[0] for u in mine], [d for u in mine for d in u[1:]]):
            if wave:
                results.append(
                    await loader.call(
                        "start",
                        wait=timeout + 60,
                        proto="folio",
                        port=relay.port,
                        devices=tokens_for(relay, wave),
                        concurrency=concurrency,
                        timeout=timeout,
                        reconnect=True,
                    )
                )
        return results

    started = time.monotonic()
    replies = await asyncio.gather(
        *(one(loader, mine) for loader, mine in zip(loaders, per_loader, strict=True))
    )
    seconds = time.monotonic() - started
    flat = [r for rs in replies for r in rs]
    return {
        "devices": sum(r["devices"] for r in flat),
        "in_sync": sum(r["in_sync"] for r in flat),
        "seconds": seconds,
        "errors": [e for r in flat for e in r["errors"]][:10],
    }


async def statuses(loaders: Sequence[Loader]) -> dict[str, Any]:
    replies = await asyncio.gather(*(loader.call("status") for loader in loaders))
    total: dict[str, Any] = {"errors": []}
    for reply in replies:
        for key, value in reply.items():
            if key == "errors":
                total["errors"] += value
            else:
                total[key] = total.get(key, 0) + value
    return total


def merge_histograms(histograms: Sequence[Mapping[str, int]], per_ms: int) -> list[float]:
    """Merged buckets as an ascending list of values (ms, each at its bucket's floor)."""
    counts: Counter[int] = Counter()
    for histogram in histograms:
        for key, value in histogram.items():
            counts[int(key)] += value
    values: list[float] = []
    for bucket in sorted(counts):
        values.extend([bucket / per_ms] * counts[bucket])
    return values


def run_queue_wait_s(pid: int) -> float:
    """Seconds the process's main thread (the relay's event loop) waited for a CPU while
    runnable (/proc/PID/schedstat): on a shared machine, what the other processes took from it."""
    try:
        with open(f"/proc/{pid}/schedstat", encoding="ascii") as stat:
            return int(stat.read().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return float("nan")


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    """Rss, Pss, Anonymous and the like of a process (/proc/PID/smaps_rollup), in KiB."""
    out: dict[str, int] = {}
    with (
        contextlib.suppress(OSError),
        open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as rollup,
    ):
        for line in rollup:
            parts = line.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1])
    return out


# -- the probes: a few devices timed in this process --------------------------------------------


@dataclass(slots=True)
class Probe:
    """Pairs of devices of one user: the editor's send times, the receiver's receipt times."""

    editors: list[FolioDevice] = field(default_factory=list)
    receivers: list[FolioDevice] = field(default_factory=list)
    sent: dict[tuple[int, int], float] = field(default_factory=dict)  # update key -> time
    sent_seq: list[tuple[FolioDevice, int, float]] = field(default_factory=list)
    fanout_ms: list[float] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    pinging: asyncio.Task[None] | None = None

    def receipt(self, _device: FolioDevice, payload: bytes) -> None:
        """An Update frame [12, doc, seq, update, changed_at, changed_by] reached a receiver."""
        at = time.monotonic()
        sent = self.sent.get(update_key(msgpack.unpackb(payload)[3]))
        if sent is not None:
            self.fanout_ms.append((at - sent) * 1000)

    async def connect(self, relay: Relay, pairs: int) -> None:
        loop = asyncio.get_running_loop()
        for k in range(pairs):
            user = f"probe{k:02d}"
            for role, create in (("editor", True), ("receiver", False)):
                models = build_user_documents(
                    f"{user}-{role}", ["Probe"], [], create=create, symbols=("AAPL", "MSFT")
                )
                device = FolioDevice(
                    relay.port,
                    relay.token(user, f"{user}-{role}"),
                    dict(models),
                    reconnect=True,
                    name=f"{user}-{role}",
                    on_update=None if create else self.receipt,
                    apply_remote=True,
                )
                (self.editors if create else self.receivers).append(device)
                self.tasks.append(loop.create_task(device.run()))
                await asyncio.wait_for(device.in_sync.wait(), 60)
        self.pinging = loop.create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        """The probes ping as the load processes' devices do (FolioDevice.heartbeat)."""
        while True:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            for device in (*self.editors, *self.receivers):
                device.heartbeat(now)

    async def edit_for(self, seconds: float, interval: float) -> None:
        """Each editor edits every ``interval`` s (staggered) for ``seconds``."""
        doc_id = document_id(DocumentKind.WATCHLIST, "Probe")
        end = time.monotonic() + seconds
        n = 0
        gap = interval / max(1, len(self.editors))
        while time.monotonic() < end:
            editor = self.editors[n % len(self.editors)]
            n += 1
            if editor.conn is not None and editor.in_sync.is_set():

                def note(model: Any, i: int = n) -> None:
                    assert isinstance(model, Watchlist)
                    model.set_note("AAPL", f"probe {i}")

                at = time.monotonic()
                seq, update = editor.edit(doc_id, note)
                self.sent[update_key(update)] = at
                self.sent_seq.append((editor, seq, at))
            await asyncio.sleep(gap)
        await asyncio.sleep(1.0)  # the last receipts

    def ack_ms(self) -> list[float]:
        return sorted((d.acked[seq] - at) * 1000 for d, seq, at in self.sent_seq if seq in d.acked)

    async def close(self) -> None:
        if self.pinging is not None:
            self.pinging.cancel()
        for device in (*self.editors, *self.receivers):
            device.close()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=5)

    @property
    def errors(self) -> list[str]:
        return [e for d in (*self.editors, *self.receivers) for e in d.errors]


# -- 1: the relay with 10,000 devices ------------------------------------------------------------


@dataclass(slots=True)
class Reading:
    devices: int
    in_sync: int
    connect_s: float
    rss_kib: int
    anon_kib: int
    hot: int


async def warm_up(relay: Relay) -> None:
    """One device connects, syncs and leaves: imports and pools warmed before the idle reading."""
    models = build_user_documents("warm-d0", ["Warm"], [], create=True)
    device = FolioDevice(relay.port, relay.token("warm", "warm-d0"), dict(models))
    task = asyncio.get_running_loop().create_task(device.run())
    await asyncio.wait_for(device.in_sync.wait(), 30)
    device.close()
    await asyncio.wait_for(task, 10)


async def devices_run(root: Path, sizes: Sizes) -> tuple[list[Table], float]:
    total = sizes.levels[-1]
    bulk_levels = [max(0, level - 2 * sizes.probe_pairs) for level in sizes.levels]
    users = plan_devices(bulk_levels[-1], price_share=sizes.price_share)
    groups = split_levels(users, bulk_levels)
    relay = FeedRelay(root, "relay-devices")
    loaders = await start_loaders(root, "load-devices", sizes.loaders)
    probe = Probe()
    readings: list[Reading] = []
    try:
        await relay.start_relay()
        await warm_up(relay)
        await asyncio.sleep(1.0)
        rss_idle = proc_rss_kib(relay.pid)
        progress(f"relay idle: {rss_idle / 1024:.1f} MiB")
        anon_idle = smaps_rollup_kib(relay.pid).get("Anonymous", 0)
        started = time.monotonic()
        await probe.connect(relay, sizes.probe_pairs)
        probe_s = time.monotonic() - started
        connected = 2 * sizes.probe_pairs
        connect_total = probe_s
        for level, group in zip(sizes.levels, groups, strict=True):
            result = await connect_users(
                relay, loaders, group, sizes.concurrency, timeout=60.0 if level < 5000 else 180.0
            )
            connected += result["devices"]
            connect_total += result["seconds"]
            if result["in_sync"] != result["devices"]:
                raise RuntimeError(
                    f"{level:,} devices: only {result['in_sync']} of {result['devices']} new "
                    f"ones in sync; {result['errors']}"
                )
            await asyncio.sleep(2.0)
            health = await relay.health()
            readings.append(
                Reading(
                    connected,
                    (await statuses(loaders))["in_sync"] + 2 * sizes.probe_pairs,
                    result["seconds"] + (probe_s if not readings else 0.0),
                    proc_rss_kib(relay.pid),
                    smaps_rollup_kib(relay.pid).get("Anonymous", 0),
                    int(health["hot_documents"]),
                )
            )
            progress(
                f"{connected:,} devices in sync ({result['seconds']:.1f} s): "
                f"{readings[-1].rss_kib / 1024:.1f} MiB"
            )
        health_before = await relay.health()

        # the mix, at the total
        relay_cpu0, busy0, wall0 = proc_cpu_s(relay.pid), machine_busy_s(), time.monotonic()
        waited0 = run_queue_wait_s(relay.pid)
        load_cpu0 = sum([(await loader.call("cpu"))["cpu_s"] for loader in loaders])
        per_loader = (total - 2 * sizes.probe_pairs) / len(loaders)
        mixes, _ = await asyncio.gather(
            asyncio.gather(
                *(
                    loader.call(
                        "mix",
                        wait=sizes.mix_s + 120,
                        duration=sizes.mix_s,
                        edit_interval=sizes.edit_interval_s,
                        drops_per_s=sizes.drops_per_s * per_loader,
                        seed=n,
                    )
                    for n, loader in enumerate(loaders)
                )
            ),
            probe.edit_for(sizes.mix_s, sizes.probe_edit_s),
        )
        wall = time.monotonic() - wall0
        relay_cpu = (proc_cpu_s(relay.pid) - relay_cpu0) / wall * 100
        waited = (run_queue_wait_s(relay.pid) - waited0) / wall * 100
        load_cpu = sum([(await loader.call("cpu"))["cpu_s"] for loader in loaders]) - load_cpu0
        busy = (machine_busy_s() - busy0) / wall * 100
        deadline = time.monotonic() + 30
        final = await statuses(loaders)
        while final["in_sync"] < final["devices"] and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            final = await statuses(loaders)
        rss_after = proc_rss_kib(relay.pid)
        progress(f"mix done: relay CPU {relay_cpu:.0f} %, {final['in_sync']:,} bulk in sync")
        health = await relay.health()
        behind = relay.log_count("fell behind")
        relay_errors = relay.log_count(" ERROR ") + relay.log_count("Traceback")
        probe_in_sync = sum(
            1 for d in (*probe.editors, *probe.receivers) if d.conn and d.in_sync.is_set()
        )
        await probe.close()
    finally:
        await close_loaders(loaders)
        await relay.stop()

    memory = Table(
        f"The relay with {total:,} connected devices: memory by count (VmRSS of the relay)",
        ["devices", "in sync", "connect s", "VmRSS MiB", "anon MiB", "hot docs", "KiB per device"],
    )
    memory.add(0, 0, None, rss_idle / 1024, anon_idle / 1024, None, None)
    for r in readings:
        memory.add(
            r.devices,
            r.in_sync,
            r.connect_s,
            r.rss_kib / 1024,
            r.anon_kib / 1024,
            r.hot,
            (r.rss_kib - rss_idle) / r.devices,
        )
    per_device = (readings[-1].rss_kib - rss_idle) / readings[-1].devices
    memory.notes += [
        "idle = after one device connected, synced and left (imports and pools warmed). Each "
        "row: that many devices connected and in sync (their connects timed in 'connect s'), "
        "2 s later, before the mix; KiB per device = (VmRSS - idle) / devices. anon = the "
        "Anonymous line of /proc/PID/smaps_rollup (the heaps).",
        f"hot docs: documents the relay keeps in memory (max_hot_documents = "
        f"{RelayConfig().max_hot_documents}, the default); the {total:,} devices' users have "
        f"{sum(len(u[0].watchlists) + len(u[0].portfolios) + 1 for u in users):,} documents in "
        "all (index included).",
        f"after the mix: VmRSS {rss_after / 1024:.1f} MiB "
        f"({(rss_after - rss_idle) / total:.1f} KiB per device).",
    ]

    acks = merge_histograms([m["ack_hist"] for m in mixes], 10)
    prices = merge_histograms([m["price_hist"] for m in mixes], 1)
    probe_acks = probe.ack_ms()
    fanout = sorted(probe.fanout_ms)
    edits = sum(m["edits"] for m in mixes)
    drops = sum(m["drops"] for m in mixes)
    reconnects = sum(m["reconnects"] for m in mixes)
    back = sum(m["back_in_sync"] for m in mixes)
    errors = [e for m in mixes for e in m["errors"]][:5] + probe.errors[:5]
    in_sync = final["in_sync"] + probe_in_sync
    subscribers = sum(1 for u in users for d in u if d.subscribe)
    connect_all = connect_total

    def ms(values: Sequence[float]) -> str:
        if not values:
            return "-"
        return f"p50 {percentile(values, 0.5):.1f} ms, p99 {percentile(values, 0.99):.1f} ms"

    figures = Table(
        f"{total:,} connected devices under a realistic mix: the figures",
        ["figure", "result", "aim", "met"],
    )
    figures.add("devices connected and in sync (after the mix)", f"{in_sync:,} of {total:,}", "all",
                "yes" if in_sync == total else "NO")  # fmt: skip
    figures.add("time to connect and sync them all", f"{connect_all:.1f} s", "", "")
    figures.add("relay VmRSS idle", f"{rss_idle / 1024:.1f} MiB", "", "")
    for r in readings:
        figures.add(f"relay VmRSS at {r.devices:,} devices", f"{r.rss_kib / 1024:.1f} MiB", "", "")
    figures.add(
        f"relay memory per connection (at {readings[-1].devices:,})",
        f"{per_device:.1f} KiB",
        f"<= {MEMORY_AIM_KIB:g} KiB",
        "yes" if per_device <= MEMORY_AIM_KIB else "NO",
    )
    figures.add(
        "relay CPU under the mix (% of one core)",
        f"{relay_cpu:.0f} %, waiting for a CPU {waited:.0f} %",
        "",
        "",
    )
    figures.add(f"edit -> Ack, {len(probe.editors)} sampled editors", ms(probe_acks), "", "")
    figures.add(f"edit -> fan-out, {len(probe.receivers)} sampled receivers", ms(fanout), "", "")
    figures.add(f"edit -> Ack, all {edits:,} edits of the mix", ms(acks), "", "")
    figures.add(
        f"price delivery (tick's age on arrival), {len(prices):,} ticks on sampled subscribers",
        ms(prices),
        "",
        "",
    )
    figures.add(
        "reconnects: drops / reconnects / back in sync", f"{drops} / {reconnects} / {back}", "", ""
    )
    figures.add("errors (devices; relay log ERROR lines)", f"{len(errors)}; {relay_errors}",
                "0", "yes" if not errors and not relay_errors else "NO")  # fmt: skip
    figures.notes += [
        f"devices: {len(users):,} users with 2-3 devices each, 1-3 documents each besides the "
        f"index; {subscribers:,} devices follow prices (3-36 of {len(SYMBOL_POOL)} symbols; "
        "one subscriber in 10 times each tick it receives). "
        f"{sizes.loaders} load processes ({sizes.concurrency} devices connecting at once in "
        f"each) plus {sizes.probe_pairs} probe users of 2 devices in the driving process.",
        f"mix: {sizes.mix_s:g} s; each device edits once every {sizes.edit_interval_s:g} s on "
        f"average ({edits / wall:.0f} edits/s in all; a note or a trade); the probe editors "
        f"every {sizes.probe_edit_s:g} s; {sizes.drops_per_s * 100:g} % of the devices a second "
        "lose their connection (cut) and reconnect with SyncClient's Backoff; the fanned-out "
        "updates are applied by the receiving devices.",
        "edit -> Ack: from the edit to its Ack (the relay applied and stored it in SQLite); edit "
        "-> fan-out: from the edit to the other device of the same user receiving it. Price "
        "delivery: a tick's age when it arrives (wall ms now - the tick's time stamp, which the "
        "simulated feed sets when it moves the price; 1 ms resolution): the hub's flush "
        "interval (50 ms), the relay's delivery to every follower, and the socket.",
        f"during the mix: load processes {load_cpu / wall * 100:.0f} % of a core, the whole "
        f"machine {busy:.0f} % (2 cores = 200 %): the relay shares the machine with the load. "
        f"Price batches received: {sum(m['price_batches'] for m in mixes):,}. 'fell behind' "
        f"disconnects: {behind}; edits skipped (device not in sync at that moment): "
        f"{sum(m['skipped'] for m in mixes)}; relay connections at the end: "
        f"{health['connections']:,} (before the mix {health_before['connections']:,}); "
        f"device errors: {errors or 'none'}.",
        "waiting for a CPU: the share of the mix's wall time the relay's event loop was "
        "runnable but not running (/proc/PID/schedstat), taken by other processes.",
        "relay: `foliosync relay --feed sim:always`, defaults otherwise (SQLite, durability "
        f"{RelayConfig().durability}, max_initial_syncs {RelayConfig().max_initial_syncs}).",
    ]
    return [figures, memory], per_device


# -- 2: where a connection's memory goes ---------------------------------------------------------


async def profile_run(root: Path, sizes: Sizes, per_device: float) -> Table:
    count = sizes.profile_devices
    table = Table(
        f"Where the relay's memory per connection goes: tracemalloc, {count:,} devices",
        ["allocated by", "where", "KiB per device", "blocks per device"],
    )
    relay = TracedRelay(root, "relay-traced", sizes.trace_frames)
    loaders = await start_loaders(root, "load-traced", min(sizes.loaders, 2))
    users = plan_devices(count, price_share=sizes.price_share, seed="profile")
    try:
        await relay.start_relay()
        await warm_up(relay)
        await asyncio.sleep(1.0)
        rss0 = proc_rss_kib(relay.pid)
        await relay.snapshot()
        result = await connect_users(relay, loaders, users, sizes.concurrency, timeout=180.0)
        await asyncio.sleep(2.0)
        rss1 = proc_rss_kib(relay.pid)
        hot = int((await relay.health())["hot_documents"])  # before: the snapshot holds it up
        report = await relay.snapshot()
        documents = sum(len(u[0].watchlists) + len(u[0].portfolios) + 1 for u in users)
        progress(f"traced relay: {result['in_sync']:,} devices profiled")
    finally:
        await close_loaders(loaders)
        await relay.stop()
    n = result["in_sync"] or 1
    traced = report["traced_diff"] / 1024 / n
    for row in report["by_owner"][:12]:
        table.add("relay", row["where"], row["size"] / 1024 / n, row["count"] / n)
    for row in report["by_line"][:12]:
        table.add("line", row["where"], row["size"] / 1024 / n, row["count"] / n)
    objects = ", ".join(
        f"{row['type']} {row['count'] / n:.1f} ({row['size'] / n:.0f} B)"
        for row in report["objects"][:14]
    )
    table.notes += [
        f"{result['in_sync']:,} of {result['devices']:,} devices in sync, the same mix as above "
        "(idle: no edits, no drops) on a relay run under tracemalloc "
        f"({sizes.trace_frames} frames); two snapshots, before and after they connected, each "
        "after gc.collect(). 'relay' rows: by the innermost line of foliosync's own code on "
        "the allocating stack (what the relay did that led to it); 'line' rows: by the "
        "allocating line itself.",
        f"Python allocations traced: {traced:.1f} KiB per device; VmRSS of the traced relay "
        f"(inflated by tracemalloc's own bookkeeping): +{(rss1 - rss0) / n:.1f} KiB per device; "
        f"untraced relay above: {per_device:.1f} KiB per device. What VmRSS has beyond the "
        "traced Python blocks is native: pycrdt's Rust documents, the kernel-side socket is not "
        "counted in VmRSS, glibc's heap slack and free lists.",
        f"objects per device (gc-tracked, by type; shallow size): {objects}.",
        f"alive after gc.collect(): {report['docs_alive'] // 2:,} pycrdt Docs (objects named "
        f"Doc / 2: each is a Python Doc and its native one) and {report['hot']:,} hot-document "
        f"records (RelayDocuments' _Hot), while the relay reports {hot:,} hot documents "
        f"(each holds at most two Docs, its own and a scratch copy, dropped 30 s after its last "
        f"update); the devices' users have {documents:,} documents in all."
        + (
            " More records than hot documents: evicted documents that were never freed."
            if report["hot"] > hot
            else ""
        ),
    ]
    return table


def _owner(frames: Sequence[tracemalloc.Frame]) -> str:
    """The innermost frame of the relay's own code (its line that led to an allocation), else
    the allocating module: a callback of the event loop (aiohttp's protocol, asyncio's
    transports) with no relay code among the innermost frames."""
    root = f"{REPO}/"
    for frame in reversed(frames):
        name = frame.filename
        if name.startswith(root) and not name.startswith((f"{root}bench/", f"{root}client/")):
            return f"{name[len(root) :]}:{frame.lineno}"
    return f"(loop callbacks) {_short(frames[-1].filename)}"


def _short(filename: str) -> str:
    name = filename.replace("\\", "/")
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in name:
            return name.rsplit(marker, 1)[1]
    return "/".join(name.rsplit("/", 3)[-3:])


class _Tracer:
    """In the traced relay: each SIGUSR1 writes what was allocated since the first one."""

    def __init__(self, dump_dir: Path) -> None:
        self.dump_dir = dump_dir
        self.base: tracemalloc.Snapshot | None = None
        self.base_objects: dict[str, tuple[int, int]] = {}
        self.number = 0

    @staticmethod
    def _objects() -> dict[str, tuple[int, int]]:
        counts: dict[str, list[int]] = {}
        for obj in gc.get_objects():
            name = type(obj).__qualname__
            entry = counts.setdefault(name, [0, 0])
            entry[0] += 1
            entry[1] += sys.getsizeof(obj, 0)
        return {k: (v[0], v[1]) for k, v in counts.items()}

    def on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        self.number += 1
        gc.collect()
        snapshot = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        objects = self._objects()
        report: dict[str, Any] = {"number": self.number}
        if self.base is None:
            self.base, self.base_objects = snapshot, objects
            report["traced"] = sum(s.size for s in snapshot.statistics("filename"))
        else:
            report.update(self._diff(self.base, snapshot, objects))
        path = self.dump_dir / f"report-{self.number}.json"
        path.with_suffix(".tmp").write_text(json.dumps(report))
        path.with_suffix(".tmp").rename(path)

    def _diff(
        self,
        base: tracemalloc.Snapshot,
        snapshot: tracemalloc.Snapshot,
        objects: dict[str, tuple[int, int]],
    ) -> dict[str, Any]:
        by_owner: dict[str, list[int]] = {}
        for stat in snapshot.compare_to(base, "traceback"):
            if stat.size_diff or stat.count_diff:
                entry = by_owner.setdefault(_owner(list(stat.traceback)), [0, 0])
                entry[0] += stat.size_diff
                entry[1] += stat.count_diff
        owners = sorted(by_owner.items(), key=lambda kv: -kv[1][0])
        lines = snapshot.compare_to(base, "lineno")
        lines.sort(key=lambda s: -s.size_diff)
        changed: list[dict[str, Any]] = []
        for name, (count, size) in objects.items():
            count0, size0 = self.base_objects.get(name, (0, 0))
            if count > count0:
                changed.append({"type": name, "count": count - count0, "size": size - size0})
        changed.sort(key=lambda row: -int(row["size"]))
        return {
            "docs_alive": objects.get("Doc", (0, 0))[0],
            "hot": sum(1 for o in gc.get_objects() if type(o).__qualname__ == "_Hot"),
            "traced_diff": sum(s.size_diff for s in lines),
            "by_owner": [{"where": k, "size": v[0], "count": v[1]} for k, v in owners[:20]],
            "by_line": [
                {
                    "where": f"{_short(s.traceback[-1].filename)}:{s.traceback[-1].lineno}",
                    "size": s.size_diff,
                    "count": s.count_diff,
                }
                for s in lines[:20]
            ],
            "objects": changed[:20],
        }


def traced_relay_main(argv: Sequence[str]) -> int:
    """``--traced-relay DIR FRAMES ARGS...``: ``foliosync ARGS...`` under tracemalloc (FRAMES
    per block), reporting into DIR on SIGUSR1 (bench code only: the relay has no such hook)."""
    from foliosync.client.cli import main

    tracemalloc.start(int(argv[1]))
    tracer = _Tracer(Path(argv[0]))
    signal.signal(TRACE_ENV_SIGNAL, tracer.on_signal)
    return int(main(list(argv[2:])))


# -- 3: y-websocket's server with as many idle clients ------------------------------------------


async def y_websocket_run(root: Path, sizes: Sizes) -> dict[str, Any]:
    count = sizes.y_devices
    port = free_port()
    server: Server = y_websocket_server(port, root / "y-websocket.log")

    async def ready() -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        await writer.wait_closed()

    loaders = await start_loaders(root, "load-y", sizes.loaders)
    try:
        await server.start(ready)
        warm = await loaders[0].call("start", proto="y", port=port, devices=[{"room": "warm"}])
        await asyncio.sleep(1.0)
        rss0 = proc_rss_kib(server.pid)
        specs = [{"room": f"room{n:05d}"} for n in range(count)]
        started = time.monotonic()
        replies = await asyncio.gather(
            *(
                loader.call(
                    "start",
                    wait=300,
                    proto="y",
                    port=port,
                    devices=specs[k :: len(loaders)],
                    concurrency=sizes.concurrency,
                    timeout=180,
                )
                for k, loader in enumerate(loaders)
            )
        )
        seconds = time.monotonic() - started
        await asyncio.sleep(2.0)
        rss1 = proc_rss_kib(server.pid)
        progress(f"y-websocket: {count:,} clients, {rss1 / 1024:.1f} MiB")
    finally:
        await close_loaders(loaders)
        await server.stop()
    in_sync = sum(r["in_sync"] for r in replies) + warm["in_sync"] - 1
    return {
        "devices": count,
        "in_sync": in_sync,
        "seconds": seconds,
        "rss0": rss0,
        "rss1": rss1,
        "per": (rss1 - rss0) / max(1, in_sync),
    }


# -- entry points ---------------------------------------------------------------------------------


async def run(quick: bool) -> list[Table]:
    sizes = QUICK if quick else FULL
    raise_nofile_limit()
    with tempfile.TemporaryDirectory(prefix="foliosync-bench-devices-") as tmp:
        root = Path(tmp)
        tables, per_device = await devices_run(root, sizes)
        figures, memory = tables
        compare = Table(
            f"Memory per idle connection: the relay and y-websocket's server, {sizes.y_devices:,} "
            "devices",
            ["server", "devices", "in sync", "connect s", "idle MiB", "loaded MiB", "KiB/device"],
        )
        last = memory.rows[-1]
        compare.add(
            "foliosync relay (the mix above, before it ran)",
            last[0],
            last[1],
            None,
            memory.rows[0][3],
            last[3],
            per_device,
        )
        try:
            y = await y_websocket_run(root, sizes)
            compare.add(
                "y-websocket (@y/websocket-server 0.1.1, one room each)",
                y["devices"],
                y["in_sync"],
                y["seconds"],
                y["rss0"] / 1024,
                y["rss1"] / 1024,
                y["per"],
            )
            compare.notes.append(
                f"y-websocket: its Node server (Node {node_version()}, bench/ywebsocket) with "
                "idle y-websocket clients, one room each (sync step 1 of an empty document, "
                "then nothing), in the same load processes; VmRSS of the node process, 1 s "
                "after one warm-up client, and 2 s after all were in sync. No store, no "
                "authentication, no prices: a room is a Y.Doc and its connection set."
            )
        except Exception as exc:  # reported, not fatal for the relay's figures
            compare.notes.append(f"y-websocket could not be run: {type(exc).__name__}: {exc}")
        out = [figures, memory, compare]
        if per_device > MEMORY_AIM_KIB:
            try:
                out.append(await profile_run(root, sizes, per_device))
            except Exception as exc:  # reported, not fatal for the figures above
                compare.notes.append(f"the traced profile failed: {type(exc).__name__}: {exc}")
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--traced-relay":
        sys.exit(traced_relay_main(sys.argv[2:]))
    sys.exit("usage: python -m bench devices [--quick] (this module runs the traced relay only)")
