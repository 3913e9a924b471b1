"""The chaos run: relays SIGKILLed and restarted in a loop, devices killed now and then, faults
in the proxy between them, and the oracle at the end.

Each cycle lets the devices edit through the faulty proxy for ``seconds / cycles`` seconds, then
SIGKILLs the relay (with two relays, one of them or both), checks that every Ack journalled so
far is in the relay's store, and starts it again on the same data; a device is SIGKILLed with
some probability per cycle and started again on its replica. Every choice (faults, kills, edits)
comes from the seed, so a run that found something can be replayed with the same arguments
(timings differ from run to run; the choices do not).

At the end: faults off, relays restarted, devices stopped; every replica is synced until quiet
(bounded by ``settle_timeout``), then the relays are killed once more and the oracle compares
the journals, every replica and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pycrdt import Doc

from chaos.device import PORTFOLIO
from chaos.journal import AckRecord, expectation, read_journal
from chaos.oracle import check_acks, check_final
from chaos.proxy import FaultKind, FaultProxy, RandomFaults
from chaos.relays import RelayProcess, StoreSpec, multi_relay_support, open_store, stored_documents

__all__ = ["ChaosConfig", "ChaosReport", "render_table", "run_chaos"]

ROOT = Path(__file__).resolve().parent.parent
USER = "alice"
CLOCK_OFFSET_MS = -3 * 3600 * 1000  # the last device's clock runs three hours behind
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    cycles: int = 10
    relays: int = 1
    devices: int = 3
    seed: int = 0
    seconds: float = 30.0  # relay up-time over all cycles (restarts come on top)
    device_kill_chance: float = 0.3  # per cycle
    faults_per_second: float = 2.0
    settle_timeout: float = 60.0
    workdir: Path | None = None

    def __post_init__(self) -> None:
        if self.cycles < 1 or self.devices < 1 or self.seconds <= 0:
            raise ValueError("cycles and devices must be at least 1, seconds positive")
        if self.relays not in (1, 2):
            raise ValueError("relays must be 1 or 2")

    def replay(self) -> str:
        return (
            f"python -m chaos --cycles {self.cycles} --relays {self.relays} "
            f"--devices {self.devices} --seed {self.seed} --seconds {self.seconds:g}"
        )


@dataclass(slots=True)
class ChaosReport:
    config: ChaosConfig
    cycles: int = 0
    relay_kills: int = 0
    device_kills: int = 0
    faults: Counter[FaultKind] = field(default_factory=Counter)
    edits_accepted: int = 0
    edits_refused: int = 0
    acks: int = 0
    acks_checked: int = 0
    max_catch_up: float = 0.0  # after a relay restart, until every device was acknowledged
    settle_time: float = 0.0  # the final sync, until every replica was identical
    violations: list[str] = field(default_factory=list)
    elapsed: float = 0.0


class DeviceProcess:
    def __init__(
        self, index: int, workdir: Path, url: str, token: str, seed: int, offset_ms: int
    ) -> None:
        self.index = index
        self.name = f"dev{index}"
        self.db = workdir / f"{self.name}.db"
        self.journal = workdir / f"{self.name}.jsonl"
        self.log = workdir / f"{self.name}.log"
        self.url = url
        self.token = token
        self.seed = seed
        self.offset_ms = offset_ms
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        command = [sys.executable, "-m", "chaos.device", "--db", str(self.db)]
        command += ["--journal", str(self.journal), "--url", self.url, "--token", self.token]
        command += ["--index", str(self.index), "--seed", str(self.seed)]
        command += ["--clock-offset-ms", str(self.offset_ms)]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                *command, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env, cwd=ROOT
            )

    async def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGKILL)
            await self.process.wait()
            self.process = None

    async def stop(self, timeout: float = 15.0) -> bool:
        """SIGTERM, and SIGKILL after ``timeout``: False if it came to that (the process hung;
        its threads' stacks are dumped into its log first)."""
        if self.process is None:
            return True
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGUSR1)
            await asyncio.sleep(1.0)
            await self.kill()
            return False
        self.process = None
        return True


class _AckTail:
    """The Acks journalled since the last look, per device."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def new_acks(self, devices: list[DeviceProcess]) -> list[AckRecord]:
        acks: list[AckRecord] = []
        for device in devices:
            records = read_journal(device.journal)
            expected = expectation(device.name, records)
            start = self.seen.get(device.name, 0)
            fresh = [a for a in expected.acks if a.line >= start]
            if expected.acks:
                self.seen[device.name] = expected.acks[-1].line + 1
            acks += fresh
        return acks


async def _create_database() -> str:
    import asyncpg

    name = f"foliosync_chaos_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(POSTGRES_ADMIN, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


async def _drop_database(dsn: str) -> None:
    import asyncpg

    name = dsn.rsplit("/", 1)[1]
    admin = await asyncpg.connect(POSTGRES_ADMIN, timeout=10)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}"')
    finally:
        await admin.close()


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Run the whole thing and return the figures and every violation found."""
    if config.relays == 2:
        missing = multi_relay_support()
        if missing is not None:
            raise RuntimeError(f"two relays need --redis and --store: {missing}")
    if config.workdir is not None:
        config.workdir.mkdir(parents=True, exist_ok=True)
        return await _run(config, config.workdir)
    with tempfile.TemporaryDirectory(prefix="foliosync-chaos-") as tmp:
        return await _run(config, Path(tmp))


async def _run(config: ChaosConfig, workdir: Path) -> ChaosReport:
    report = ChaosReport(config)
    started = time.monotonic()
    dsn = await _create_database() if config.relays == 2 else None
    store = StoreSpec(postgres=dsn, redis=REDIS_URL if dsn else None)
    relays = [
        RelayProcess(f"relay{i}", workdir / f"relay{i}", workdir / f"relay{i}.log", store)
        for i in range(config.relays)
    ]
    for relay in relays[1:]:
        relay.share_secret(relays[0])
    proxies = [
        FaultProxy(("127.0.0.1", relay.port), seed=config.seed + i, name=relay.name)
        for i, relay in enumerate(relays)
    ]
    devices = [
        DeviceProcess(
            i,
            workdir,
            "",
            relays[0].token(USER, f"dev{i}"),
            config.seed,
            CLOCK_OFFSET_MS if i == config.devices - 1 and config.devices > 1 else 0,
        )
        for i in range(config.devices)
    ]
    try:
        for relay in relays:
            await relay.start()
        for _i, proxy in enumerate(proxies):
            await proxy.start()
        for device in devices:
            device.url = proxies[device.index % len(proxies)].url
            await device.start()
        await _cycles(config, report, relays, proxies, devices)
        await _finish(config, report, relays, proxies, devices)
    finally:
        for device in devices:
            await device.kill()
        for proxy in proxies:
            report.faults += proxy.counts
            await proxy.close()
        for relay in relays:
            await relay.kill()
        if dsn is not None:
            with contextlib.suppress(Exception):
                await _drop_database(dsn)
        with contextlib.suppress(Exception):
            await store.forget()
        report.elapsed = time.monotonic() - started
    return report


async def _inject_faults(
    proxies: list[FaultProxy], faults: RandomFaults, rate: float, rng: random.Random
) -> None:
    while True:
        await asyncio.sleep(rng.expovariate(rate))
        proxy = rng.choice(proxies)
        proxy.apply(faults.next(list(proxy.links)))


async def _cycles(
    config: ChaosConfig,
    report: ChaosReport,
    relays: list[RelayProcess],
    proxies: list[FaultProxy],
    devices: list[DeviceProcess],
) -> None:
    rng = random.Random(config.seed)
    faults = RandomFaults(config.seed)
    tail = _AckTail()
    up_time = config.seconds / config.cycles
    restarts: list[float] = []
    for cycle in range(config.cycles):
        injector = asyncio.ensure_future(
            _inject_faults(proxies, faults, config.faults_per_second, random.Random(rng.random()))
        )
        killed: list[DeviceProcess] = []
        try:
            await asyncio.sleep(up_time * rng.uniform(0.2, 0.8))
            if rng.random() < config.device_kill_chance:
                device = rng.choice(devices)
                await device.kill()
                killed.append(device)
                report.device_kills += 1
            await asyncio.sleep(up_time * rng.uniform(0.2, 0.8))
        finally:
            injector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await injector
        victims = relays if len(relays) == 1 or rng.random() < 0.3 else [rng.choice(relays)]
        for relay in victims:
            await relay.kill()
        report.relay_kills += len(victims)
        await _check_acks(report, relays, devices, tail, f"after kill {cycle + 1}")
        for relay in victims:
            await relay.start()
        restarts.append(time.time())
        for device in killed:
            await device.start()
        report.cycles += 1
    report.max_catch_up = _catch_up(restarts, devices)


async def _check_acks(
    report: ChaosReport,
    relays: list[RelayProcess],
    devices: list[DeviceProcess],
    tail: _AckTail,
    when: str,
) -> None:
    acks = tail.new_acks(devices)
    if not acks:
        return
    async with open_store(relays[0]) as store:
        stored = await stored_documents(store, USER)
    report.acks_checked += len(acks)
    report.violations += [f"{v} [{report.config.replay()}]" for v in check_acks(acks, stored, when)]


def _catch_up(restarts: list[float], devices: list[DeviceProcess]) -> float:
    """The longest wait, after a relay restart, until every device got an Ack again."""
    ack_times = {
        device.name: sorted(
            r["at"] for r in read_journal(device.journal) if r.get("k") == "ack" and "at" in r
        )
        for device in devices
    }
    worst = 0.0
    for i, restart in enumerate(restarts):
        until = restarts[i + 1] if i + 1 < len(restarts) else float("inf")
        for times in ack_times.values():
            later = [t for t in times if restart <= t < until]
            if later:
                worst = max(worst, later[0] - restart)
    return worst


async def _finish(
    config: ChaosConfig,
    report: ChaosReport,
    relays: list[RelayProcess],
    proxies: list[FaultProxy],
    devices: list[DeviceProcess],
) -> None:
    from foliosync.client import Backoff, Replica, SyncClient

    for proxy in proxies:
        proxy.clear()
    stopped = await asyncio.gather(*(device.stop() for device in devices))
    for device, ok in zip(devices, stopped, strict=True):
        if not ok:
            report.violations.append(
                f"{device.name} hung: it did not stop within 15 s of SIGTERM (its stacks are "
                f"in {device.log.name}) [{config.replay()}]"
            )
    for relay in relays:
        if not relay.running:
            await relay.start()
    replicas = [await Replica.open(device.db) for device in devices]
    try:
        clients = [
            SyncClient(
                replica,
                relays[i % len(relays)].url,
                devices[i].token,
                backoff=Backoff(base=0.05, cap=0.3),
            )
            for i, replica in enumerate(replicas)
        ]
        settle_started = time.monotonic()
        for client in clients:
            client.start()
        settled = await _settle(replicas, clients, config.settle_timeout)
        report.settle_time = time.monotonic() - settle_started
        if not settled:
            report.violations.append(
                f"the replicas did not converge within {config.settle_timeout:g} s of the final "
                f"sync [{config.replay()}]"
            )
        for client in clients:
            await client.stop()
        copies: dict[str, dict[str, Doc[Any]]] = {}
        for device, replica in zip(devices, replicas, strict=True):
            copies[device.name] = {
                doc_id: _doc_of(await replica.diff(doc_id, Doc().get_state()))
                for doc_id in replica.document_ids()
            }
    finally:
        for replica in replicas:
            await replica.close()
    for relay in relays:
        await relay.kill()
    async with open_store(relays[0]) as store:
        stored = await stored_documents(store, USER)
    if config.relays == 1:
        copies["relay"] = stored
    else:
        copies["store"] = stored
    expectations = [expectation(d.name, read_journal(d.journal)) for d in devices]
    report.edits_accepted = sum(e.accepted for e in expectations)
    report.edits_refused = sum(e.refused for e in expectations)
    report.acks = sum(len(e.acks) for e in expectations)
    report.violations += [
        f"{v} [{config.replay()}]" for v in check_final(expectations, copies, PORTFOLIO)
    ]
    async with open_store(relays[0]) as store:
        stored = await stored_documents(store, USER)  # afresh: check_acks applies what it lacks
    everything = [ack for e in expectations for ack in e.acks]
    report.violations += [
        f"{v} [{config.replay()}]" for v in check_acks(everything, stored, "at the end")
    ]


def _doc_of(update: bytes) -> Doc[Any]:
    doc: Doc[Any] = Doc()
    doc.apply_update(update)
    return doc


async def _settle(replicas: list[Any], clients: list[Any], timeout: float) -> bool:
    """Until every client is in sync and every replica has the same state of every document."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        idle = all(client.connected and client.health().pending == 0 for client in clients)
        if idle:
            states = []
            for replica in replicas:
                ids = replica.document_ids()
                states.append({doc_id: await replica.state_vector(doc_id) for doc_id in ids})
            if all(_same_states(states[0], other) for other in states[1:]):
                await asyncio.sleep(0.3)  # and still so a moment later (a change in flight)
                again = [{d: await r.state_vector(d) for d in r.document_ids()} for r in replicas]
                if all(_same_states(again[0], other) for other in again[1:]):
                    return True
        await asyncio.sleep(0.1)
    return False


def _same_states(a: dict[str, bytes], b: dict[str, bytes]) -> bool:
    if set(a) != set(b):
        return False
    return all(_decode_state(a[d]) == _decode_state(b[d]) for d in a)


def _decode_state(state: bytes) -> dict[int, int]:
    """A Yjs V1 state vector: a count, then (client, clock) pairs, all unsigned varints."""
    values: list[int] = []
    value = shift = 0
    for byte in state:
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            values.append(value)
            value = shift = 0
    count, pairs = values[0] if values else 0, values[1:]
    return {pairs[2 * i]: pairs[2 * i + 1] for i in range(min(count, len(pairs) // 2))}


def render_table(report: ChaosReport) -> str:
    config = report.config
    faults = ", ".join(f"{kind.value} {report.faults[kind]}" for kind in FaultKind)
    rows = [
        ("relays / devices", f"{config.relays} / {config.devices} (seed {config.seed})"),
        ("cycles", str(report.cycles)),
        ("relay kills", str(report.relay_kills)),
        ("device kills", str(report.device_kills)),
        ("proxy faults", faults),
        ("edits accepted", f"{report.edits_accepted} ({report.edits_refused} refused by the API)"),
        ("acks", f"{report.acks} ({report.acks_checked} checked against the store at kills)"),
        ("max catch-up", f"{report.max_catch_up:.2f} s after a relay restart"),
        ("final sync", f"{report.settle_time:.2f} s until every replica was identical"),
        ("violations", str(len(report.violations))),
        ("elapsed", f"{report.elapsed:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'figure'.ljust(width)} | result |", f"|{'-' * (width + 2)}|--------|"]
    lines += [f"| {name.ljust(width)} | {value} |" for name, value in rows]
    return "\n".join(lines)
