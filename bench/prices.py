"""Price fan-out: the relay next to a bare aiohttp loop sending the same ticks to the same clients.

Four servers run in turn, each in a process of its own on 127.0.0.1:

- ``bare``: :mod:`bench.prices_bare`, the ceiling: every 10 ms each client gets one frame with all
  the ticks of its symbols since the previous one (no authentication, no conflation).
- ``relay 10ms``: the foliosync relay with ``PricePolicy(window_ms=10)``, so that both sides batch
  about every 10 ms (the notes say what the relay actually does).
- ``relay 10ms+flush10``: the same with the price hub's ``flush_interval`` set to 10 ms.
- ``relay policy``: the relay with the smart-refresh policy's windows (``PricePolicy()``),
  the production behaviour: fewer, newer prices.

One publisher process (:mod:`bench.prices_publisher`) sends ticks at the step's rate, one batch
every 10 ms, over a ``Publish`` frame with a publish-scope token (relay) or a plain msgpack frame
(bare). Two load processes (:mod:`bench.prices_load`) hold half of the clients each; each client
follows 50 symbols of the 500 (seeded, the same on both sides) and counts every tick it receives;
one client in ten also records the latency of every tick (publish to receipt: the tick carries its
send time). The server, the publisher and the clients share the machine's cores; the server's CPU
and RSS are its own (``/proc/<pid>/stat`` utime+stime over the measured window, 100 % = one core,
and VmRSS at its end); "load CPU" is the publisher and load processes together.

Steps, each measured over ``step_s`` after ``warmup_s`` at its rate:
(a) the nominal load (1,000 clients, 2,000 ticks/s in); (c) rising input rates at 1,000 clients,
until one where a side delivers less than 90 % of the ticks published for watched symbols (or
its p99 passes 1 s); (b) 5,000 clients at 2,000 ticks/s. A step is held with p99 under 50 ms and
at least 90 % delivered. Then the relay with the policy's windows under the nominal load, and
with a soak (``relay 10ms``), the relay's RSS every 5 s over a long run at the nominal load.
``--quick`` uses 100 and 500 clients, short steps and no soak.

``python -m bench prices [--quick]``, or ``python -m bench.prices [--quick] [--soak SECONDS]`` to
choose the soak (the full run soaks 60 s; 0 turns it off; e.g. 600 for ten minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.prices_load import HIST_PER_MS, UNIVERSE, raise_nofile_limit, watched
from bench.procstat import free_port, machine_busy_s, proc_cpu_s
from bench.relay_load import load_loop
from bench.table import Table

__all__ = ["run"]

P99_TARGET_MS = 50.0
DELIVERED_TARGET = 0.90  # share of the ticks published for watched symbols
RELAY_VS_BARE_TARGET = 0.70
P99_VS_BARE_AIM = 1.5  # nominal load, 1,000 clients: the relay's p99 at most this times the bare's
MANY_DELIVERED_AIM = 0.95  # 5,000 clients: the relay delivers at least this share of the bare's
LOADERS = 2
RSS_EVERY_S = 5.0
KEEPS_UP_P99_MS = 1000.0  # the ramp goes on while delivered >= 90 % and p99 below this
POLICY_MIN_STEP_S = 6.0  # the policy's windows are up to 5 s
RELAY = "relay 10ms"
RELAY_FLUSH = "relay 10ms+flush10"

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True, slots=True)
class Sizes:
    clients: int  # steps (a) and (c)
    many: int  # step (b)
    rates: tuple[int, ...]  # ticks per second in; the first is the nominal rate
    step_s: float
    warmup_s: float
    soak_s: float


FULL = Sizes(
    clients=1000,
    many=5000,
    rates=(2000, 5000, 10_000, 20_000, 40_000),
    step_s=12.0,
    warmup_s=2.0,
    soak_s=60.0,
)
QUICK = Sizes(clients=100, many=500, rates=(2000, 10_000), step_s=2.5, warmup_s=0.5, soak_s=0.0)


# -- processes -------------------------------------------------------------------------------


def proc_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


class Server:
    """The process under test: the bare loop or the relay."""

    def __init__(self, name: str, argv: list[str], port: int, log: Path) -> None:
        self.name, self.argv, self.port, self.log = name, argv, port, log
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, timeout: float = 30.0) -> None:
        with open(self.log, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=REPO,
                env=child_env(),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self.proc.returncode is not None:
                    break
                try:
                    async with http.get(f"http://127.0.0.1:{self.port}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        await self.stop()
        raise RuntimeError(f"{self.name} did not start; see {self.log}:\n{self.tail()}")

    async def health(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.port}/healthz"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            return dict(await response.json())

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_count(self, needle: str) -> int:
        try:
            return self.log.read_text(errors="replace").count(needle)
        except OSError:
            return 0


class Child:
    """A load or publisher process, driven by JSON lines."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, module: str, args: list[str], log: Path) -> Child:
        with open(log, "ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                module,
                *args,
                cwd=REPO,
                env=child_env(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                limit=64 << 20,
            )
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def call(self, cmd: str, wait: float = 600.0, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), wait)
        if not line:
            raise RuntimeError(f"{cmd}: the child process exited (code {self.proc.returncode})")
        return dict(json.loads(line))

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(RuntimeError, TimeoutError, ConnectionError):
                await self.call("close", wait=60)
        try:
            await asyncio.wait_for(self.proc.wait(), 20)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


# -- measuring -------------------------------------------------------------------------------


def percentile_ms(histogram: Counter[int], q: float) -> float:
    """Nearest-rank percentile of a latency histogram (bucket midpoints), in ms."""
    total = sum(histogram.values())
    if not total:
        return float("nan")
    rank = max(1, min(total, round(q * total + 0.5)))
    seen = 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen >= rank:
            return (bucket + 0.5) / HIST_PER_MS
    return float("nan")


@dataclass(slots=True)
class Step:
    step: str
    server: str
    clients: int
    target: int
    seconds: float
    sent_rate: float = 0.0
    delivered: float = 0.0
    frames: float = 0.0
    share: float = float("nan")
    p50: float = float("nan")
    p99: float = float("nan")
    max_ms: float = float("nan")
    cpu: float = float("nan")
    rss: float = float("nan")
    load_cpu: float = float("nan")
    machine_cpu: float = float("nan")  # every process and the kernel, all cores
    closed: int = 0
    malformed: int = 0  # PriceBatch frames whose tick count the load clients could not read
    publisher_lag_ms: float = 0.0
    rejected: int = 0  # ticks the relay refused (should be none)
    rss_samples: list[tuple[float, float]] = field(default_factory=list)
    judged: bool = True  # False: conflation by design, the delivered share says nothing

    @property
    def keeps_up(self) -> bool:
        """Delivers what was published without a growing queue: worth trying a higher rate."""
        return self.share >= DELIVERED_TARGET and self.p99 < KEEPS_UP_P99_MS

    @property
    def held(self) -> bool | None:
        if not self.judged:
            return None
        return self.p99 < P99_TARGET_MS and self.share >= DELIVERED_TARGET


@dataclass(slots=True)
class Connected:
    server: str
    clients: int
    connected: int
    seconds: float
    rss: float
    cpu_s: float
    errors: dict[str, int]


class Side:
    """One server under test with its publisher and load processes."""

    def __init__(
        self,
        name: str,
        kind: str,
        window: str,
        root: Path,
        sizes: Sizes,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.name, self.kind, self.window, self.sizes = name, kind, window, sizes
        self.root = root / "".join(c if c.isalnum() else "-" for c in name)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.data_dir = self.root / "data"
        if kind == "relay":
            argv = [sys.executable, "-m", "bench.prices_relay", str(self.port), str(self.data_dir)]
            argv += [window, *extra]
        else:
            argv = [sys.executable, "-m", "bench.prices_bare", str(self.port)]
        self.server = Server(name, argv, self.port, self.root / "server.log")
        self.publisher: Child | None = None
        self.loaders: list[Child] = []
        self.followers: Counter[str] = Counter()
        self.clients = 0

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        await self.server.start()
        if self.kind == "relay":
            args = ["relay", self.ws_url, str(self.data_dir)]
        else:
            args = ["bare", f"ws://127.0.0.1:{self.port}/pub"]
        self.publisher = await Child.start(
            "bench.prices_publisher", args, self.root / "publisher.log"
        )
        await self.publisher.call("connect", wait=30)

    async def connect(self, clients: int) -> Connected:
        await self.disconnect()
        per = -(-clients // LOADERS)
        cpu_before = proc_cpu_s(self.server.pid)
        started = time.perf_counter()
        for index in range(LOADERS):
            first, count = index * per, min(per, clients - index * per)
            args = ["relay" if self.kind == "relay" else "bare", self.ws_url, str(first)]
            args += [str(count), str(self.data_dir)]
            log = self.root / f"load-{index}.log"
            self.loaders.append(await Child.start("bench.prices_load", args, log))
        replies = await asyncio.gather(
            *(
                loader.call("connect", wait=900, concurrency=100, timeout=600.0)
                for loader in self.loaders
            )
        )
        seconds = time.perf_counter() - started
        errors: Counter[str] = Counter()
        failed: set[int] = set()
        for reply in replies:
            errors.update(reply["errors"])
            failed.update(reply["failed_ids"])
        self.followers = Counter()
        for client in range(clients):
            if client not in failed:
                self.followers.update(watched(client))
        self.clients = sum(reply["connected"] for reply in replies)
        await asyncio.sleep(0.5)
        return Connected(
            self.name,
            clients,
            self.clients,
            seconds,
            proc_rss_mib(self.server.pid),
            proc_cpu_s(self.server.pid) - cpu_before,
            dict(errors),
        )

    async def disconnect(self) -> None:
        await asyncio.gather(*(loader.close() for loader in self.loaders))
        self.loaders = []
        self.clients = 0

    async def stop(self) -> None:
        await self.disconnect()
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None
        await self.server.stop()

    def load_cpu_s(self) -> float:
        pids = [loader.pid for loader in self.loaders]
        if self.publisher is not None:
            pids.append(self.publisher.pid)
        return sum(proc_cpu_s(pid) for pid in pids)

    async def step(
        self, label: str, rate: int, seconds: float, *, judged: bool = True, rss_every: float = 0
    ) -> Step:
        assert self.publisher is not None
        sizes = self.sizes
        # What an earlier step left queued drains first (bounded: an overloaded server may never
        # fall silent).
        await asyncio.gather(
            *(loader.call("quiet", idle=0.5, timeout=10.0) for loader in self.loaders)
        )
        start = time.time() + 0.3
        t0 = start + sizes.warmup_s
        t1 = t0 + seconds
        end = t1 + 0.3
        await asyncio.gather(*(loader.call("measure", t0=t0, t1=t1) for loader in self.loaders))
        publishing = asyncio.ensure_future(
            self.publisher.call(
                "run", wait=end - time.time() + 60, rate=rate, start=start, t0=t0, t1=t1, end=end
            )
        )
        pid = self.server.pid
        await asyncio.sleep(max(0.0, t0 - time.time()))
        cpu0, load0, w0 = proc_cpu_s(pid), self.load_cpu_s(), time.time()
        busy0 = machine_busy_s()
        samples: list[tuple[float, float]] = []
        if rss_every:
            at = w0
            while at < t1 - rss_every / 2:
                await asyncio.sleep(max(0.0, at - time.time()))
                samples.append((round(time.time() - w0, 1), round(proc_rss_mib(pid), 1)))
                at += rss_every
        await asyncio.sleep(max(0.0, t1 - time.time()))
        cpu1, load1, w1 = proc_cpu_s(pid), self.load_cpu_s(), time.time()
        busy1 = machine_busy_s()
        rss = proc_rss_mib(pid)
        if rss_every:
            samples.append((round(w1 - w0, 1), round(rss, 1)))
        published = await publishing
        reports = await asyncio.gather(*(loader.call("report") for loader in self.loaders))
        window = t1 - t0
        histogram: Counter[int] = Counter()
        for report in reports:
            histogram.update({int(k): v for k, v in report["latency"].items()})
        in_window = published["in_window"]
        expected = sum(n * self.followers[UNIVERSE[i]] for i, n in enumerate(in_window))
        delivered = sum(report["ticks"] for report in reports)
        return Step(
            step=label,
            server=self.name,
            clients=self.clients,
            target=rate,
            seconds=round(window, 1),
            sent_rate=sum(in_window) / window,
            delivered=delivered / window,
            frames=sum(report["frames"] for report in reports) / window,
            share=delivered / expected if expected else float("nan"),
            p50=percentile_ms(histogram, 0.50),
            p99=percentile_ms(histogram, 0.99),
            max_ms=percentile_ms(histogram, 1.0),
            cpu=100 * (cpu1 - cpu0) / (w1 - w0),
            rss=rss,
            load_cpu=100 * (load1 - load0) / (w1 - w0),
            machine_cpu=100 * (busy1 - busy0) / (w1 - w0),
            closed=sum(report["closed"] for report in reports),
            malformed=sum(report["malformed"] for report in reports),
            publisher_lag_ms=published["max_lag_ms"],
            rejected=published["rejected"],
            rss_samples=samples,
            judged=judged,
        )


# -- the benchmark ---------------------------------------------------------------------------


async def ramp_side(
    name: str,
    kind: str,
    window: str,
    root: Path,
    sizes: Sizes,
    *,
    soak_s: float = 0.0,
    many: bool = True,
    extra: tuple[str, ...] = (),
) -> tuple[list[Step], list[Connected], Step | None]:
    """Steps (a), (c) and, if ``many``, (b) on one server; and a soak if asked."""
    side = Side(name, kind, window, root, sizes, extra)
    steps: list[Step] = []
    connections: list[Connected] = []
    soak: Step | None = None
    try:
        await side.start()
        connections.append(await side.connect(sizes.clients))
        nominal = await side.step("a", sizes.rates[0], sizes.step_s)
        steps.append(nominal)
        if soak_s > 0:
            soak = await side.step("soak", sizes.rates[0], soak_s, rss_every=RSS_EVERY_S)
        if nominal.keeps_up:
            for rate in sizes.rates[1:]:
                result = await side.step("c", rate, sizes.step_s)
                steps.append(result)
                if not result.keeps_up:
                    break
        if many:
            connections.append(await side.connect(sizes.many))
            steps.append(await side.step("b", sizes.rates[0], sizes.step_s))
    finally:
        await side.stop()
    fell_behind = side.server.log_count("fell behind")
    if fell_behind:
        print(f"[{name}: {fell_behind} connections disconnected for falling behind]")
    return steps, connections, soak


async def policy_side(root: Path, sizes: Sizes) -> tuple[Step, dict[str, Any]]:
    side = Side("relay policy", "relay", "policy", root, sizes)
    try:
        await side.start()
        await side.connect(sizes.clients)
        health = await side.server.health()
        seconds = max(sizes.step_s, POLICY_MIN_STEP_S)
        result = await side.step("policy", sizes.rates[0], seconds, judged=False)
    finally:
        await side.stop()
    return result, health


def step_order(step: Step) -> tuple[int, int, int, int]:
    order = {"a": 0, "c": 1, "b": 2, "policy": 3, "soak": 4}
    servers = {"bare": 0, RELAY: 1, RELAY_FLUSH: 2, "relay policy": 3}
    return order[step.step], step.clients, step.target, servers.get(step.server, 9)


def results_table(steps: list[Step]) -> Table:
    table = Table(
        "Price fan-out: delivered ticks, latency, server CPU and RSS",
        [
            "step",
            "server",
            "clients",
            "in/s target",
            "in/s sent",
            "delivered/s",
            "frames/s",
            "% delivered",
            "p50 ms",
            "p99 ms",
            "max ms",
            "server CPU %",
            "RSS MiB",
            "load CPU %",
            "other CPU %",
            "held",
        ],
    )
    for s in sorted(steps, key=step_order):
        if s.rejected:
            table.notes.append(f"{s.server} step {s.step}: the relay refused {s.rejected} ticks")
        if s.closed:
            table.notes.append(f"{s.server} step {s.step}: {s.closed} connections closed")
        if s.malformed:
            table.notes.append(
                f"{s.server} step {s.step}: {s.malformed} unreadable PriceBatch frames"
            )
        table.add(
            s.step,
            s.server,
            s.clients,
            s.target,
            s.sent_rate,
            s.delivered,
            s.frames,
            100 * s.share,
            s.p50,
            s.p99,
            s.max_ms,
            s.cpu,
            s.rss,
            s.load_cpu,
            max(0.0, s.machine_cpu - s.cpu - s.load_cpu),
            s.held,
        )
    return table


def comparison_table(steps: list[Step]) -> Table:
    table = Table(
        "The relay against the bare loop, same clients, same ticks",
        [
            "relay",
            "clients",
            "in/s",
            "bare delivered/s",
            "relay delivered/s",
            "relay/bare %",
            "bare p99 ms",
            "relay p99 ms",
            "p99 relay/bare",
            f"rate >= {100 * RELAY_VS_BARE_TARGET:g} %",
            f"p99 < {P99_TARGET_MS:g} ms",
        ],
    )
    bare = {(s.step, s.clients, s.target): s for s in steps if s.server == "bare"}
    for s in sorted(steps, key=step_order):
        if s.server not in (RELAY, RELAY_FLUSH) or s.step == "soak":
            continue
        other = bare.get((s.step, s.clients, s.target))
        if other is None or not other.delivered:
            continue
        ratio = s.delivered / other.delivered
        table.add(
            s.server,
            s.clients,
            s.target,
            other.delivered,
            s.delivered,
            100 * ratio,
            other.p99,
            s.p99,
            f"{s.p99 / other.p99:.2f}x",
            ratio >= RELAY_VS_BARE_TARGET,
            s.p99 < P99_TARGET_MS,
        )
        if s.server == RELAY and s.step == "a":
            met = "met" if s.p99 <= P99_VS_BARE_AIM * other.p99 else "not met"
            table.notes.append(
                f"aim: at the nominal load the relay's p99 at most {P99_VS_BARE_AIM:g}x the bare "
                f"loop's: {s.p99:.1f} / {other.p99:.1f} ms = {s.p99 / other.p99:.2f}x, {met}"
            )
        if s.server == RELAY and s.step == "b":
            met = "met" if ratio >= MANY_DELIVERED_AIM else "not met"
            table.notes.append(
                f"aim: at {s.clients:,} clients the relay delivers at least "
                f"{100 * MANY_DELIVERED_AIM:g} % of what the bare loop delivers: "
                f"{100 * ratio:.1f} %, {met}"
            )
    for server in ("bare", RELAY, RELAY_FLUSH):
        tried = [s for s in steps if s.server == server and s.step in ("a", "c")]
        if not tried:
            continue
        held = [s.target for s in tried if s.held]
        kept = [s.target for s in tried if s.share >= DELIVERED_TARGET]
        best = f"{max(held):,} ticks/s" if held else "none"
        most = f"{max(kept):,} ticks/s" if kept else "none"
        rates = ", ".join(f"{s.target:,}" for s in tried)
        table.notes.append(
            f"{server} at {tried[0].clients:,} clients: highest input rate held (p99 and "
            f"delivery) {best}; delivered within {100 - 100 * DELIVERED_TARGET:g} % (p99 aside) "
            f"up to {most}; tried {rates}"
        )
    return table


def connect_table(connections: list[Connected]) -> Table:
    table = Table(
        "Connecting the clients (each authenticates, subscribes to 50 symbols, gets its snapshot)",
        ["server", "clients", "connected", "seconds", "server CPU s", "idle RSS MiB", "errors"],
    )
    for c in connections:
        errors = ", ".join(f"{k} {v}" for k, v in sorted(c.errors.items())) or "-"
        table.add(c.server, c.clients, c.connected, c.seconds, c.cpu_s, c.rss, errors)
    return table


def soak_table(soak: Step) -> Table:
    values = [rss for _, rss in soak.rss_samples]
    table = Table(
        f"Relay memory over {soak.seconds:.0f} s at the nominal load "
        f"(RSS every {RSS_EVERY_S:.0f} s)",
        [
            "clients",
            "in/s",
            "RSS start MiB",
            "RSS end MiB",
            "RSS max MiB",
            "growth %",
            "delivered/s",
            "p99 ms",
        ],
    )
    start, end = values[0], values[-1]
    table.add(
        soak.clients,
        soak.target,
        start,
        end,
        max(values),
        100 * (end - start) / start,
        soak.delivered,
        soak.p99,
    )
    table.notes.append(
        "RSS samples (s: MiB): " + ", ".join(f"{t:g}: {r:g}" for t, r in soak.rss_samples)
    )
    return table


def notes(sizes: Sizes, policy_health: dict[str, Any]) -> list[str]:
    market = policy_health.get("prices", {}).get("market_open")
    return [
        f"Clients follow {len(watched(0))} of {len(UNIVERSE)} symbols each (seeded); the "
        "publisher ticks the 500 in turn (each symbol at rate/500 per second, evenly spaced), one "
        "batch every 10 ms. Steps: a = nominal; c = rising input rate, until one where less than "
        f"90 % is delivered or p99 exceeds {KEEPS_UP_P99_MS:g} ms; b = {sizes.many:,} clients. "
        f"Each is measured over {sizes.step_s:g} s after {sizes.warmup_s:g} s at its rate.",
        "% delivered: ticks received / ticks published for the symbols each client follows, in "
        "the same window (a missing tick was conflated or is still queued). held: p99 < "
        f"{P99_TARGET_MS:g} ms and >= {100 * DELIVERED_TARGET:g} % delivered.",
        "Latency: from the publisher's send time (carried in each tick's size field, to the "
        "microsecond) to receipt by a load client, every tick of one client in ten; it includes "
        "the time a busy load process takes to get to the frame.",
        "server CPU %: utime+stime of the server process over the window (100 = one core); load "
        f"CPU %: publisher and load processes together (their event loop: {load_loop()}); "
        "other CPU %: the rest of the machine's "
        "busy time (/proc/stat) over the window: kernel work charged to no process (softirq: "
        "loopback TCP) and any process outside the benchmark running meanwhile. The machine has "
        f"{os.cpu_count()} cores: {100 * (os.cpu_count() or 1)} % in all.",
        f"{RELAY}: PricePolicy(window_ms=10); a fixed window also sets the hub's flush "
        f"interval (here 10 ms). {RELAY_FLUSH}: the same, with flush_interval set to 10 ms "
        "explicitly after start (kept as a control: the two rows should agree).",
        "relay policy: PricePolicy(), the smart-refresh policy's push windows (250 ms for a "
        "volatile symbol in session, 1 s in session, 5 s with the market closed); market open "
        f"during the run: {market}. Its delivered share is conflation by design: not judged.",
    ]


async def run(quick: bool, soak_s: float | None = None) -> list[Table]:
    sizes = QUICK if quick else FULL
    soak = sizes.soak_s if soak_s is None else soak_s
    raise_nofile_limit()
    root = Path(tempfile.mkdtemp(prefix="foliosync-prices-"))
    try:
        steps: list[Step] = []
        connections: list[Connected] = []
        bare_steps, bare_conn, _ = await ramp_side("bare", "bare", "", root, sizes)
        steps += bare_steps
        connections += bare_conn
        relay_steps, relay_conn, soaked = await ramp_side(
            RELAY, "relay", "10", root, sizes, soak_s=soak
        )
        steps += relay_steps
        connections += relay_conn
        flush_steps, _, _ = await ramp_side(
            RELAY_FLUSH, "relay", "10", root, sizes, many=False, extra=("--flush-ms", "10")
        )
        steps += flush_steps
        policy, health = await policy_side(root, sizes)
        steps.append(policy)
        tables = [results_table(steps), comparison_table(steps), connect_table(connections)]
        tables[0].notes.extend(notes(sizes, health))
        if soaked is not None:
            tables.append(soak_table(soaked))
        return tables
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from bench.__main__ import machine_info, machine_line

    parser = argparse.ArgumentParser(
        prog="python -m bench.prices", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="100 clients, short steps, no soak")
    parser.add_argument(
        "--soak", type=float, metavar="SECONDS", help="relay RSS soak length (full run: 60, 0: off)"
    )
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write raw results here")
    args = parser.parse_args(argv)
    info = machine_info()
    started = time.perf_counter()
    tables = asyncio.run(run(args.quick, args.soak))
    for table in tables:
        print(table.render(machine_line(info)))
        print()
    print(f"[prices: {time.perf_counter() - started:.1f} s]")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"machine": info, "quick": args.quick, "tables": [t.to_json() for t in tables]}
        args.json.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
