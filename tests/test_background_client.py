"""BackgroundClient: the engine behind blocking calls, hammered from threads, against a real relay.

The relay runs on 127.0.0.1 in a thread of its own, with its own event loop (``RelayThread``):
these tests are plain functions that block, as a desktop app does, and a relay served from the
test's loop would stall whenever the test waits.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from foliosync.client import BackgroundClient, Backoff, Replica
from foliosync.client.background import FreshnessChange
from foliosync.client.health import ConnectionState, SyncHealth
from foliosync.sync.errors import (
    CallTimeout,
    ClientClosed,
    ConfigError,
    ConnectionLost,
    DocumentNotFound,
    InvalidSymbol,
    WrongThread,
)
from foliosync.sync.freshness import FreshnessLevel

from .conftest import RelayThread

WAIT = 10.0


@pytest.fixture
def relay(tmp_path: Path, helpers: Any) -> Iterator[RelayThread]:
    running = RelayThread(tmp_path / "relay", price_window_ms=0)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def clients() -> Iterator[Callable[..., BackgroundClient]]:
    """``clients(path, server, token, **options)``: opened now, closed after the test."""
    opened: list[BackgroundClient] = []

    def open_(path: Path, server: str | None = None, token: str | None = None, **options: Any):  # type: ignore[no-untyped-def]
        options.setdefault("backoff", Backoff(base=0.05, cap=0.3))
        client = BackgroundClient.open(path, server, token, **options)
        opened.append(client)
        return client

    yield open_
    for client in opened:
        client.close()


def wait_until(check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)


def reopened_symbols(path: Path, name: str) -> list[str]:
    """What the replica file holds, read back by the async API after the client closed."""

    async def read() -> list[str]:
        async with Replica.open(path) as replica:
            return (await replica.watchlist(name)).symbols

    return asyncio.run(read())


# -- convergence and notifications ---------------------------------------------------------------


def test_two_devices_converge_and_hear_each_other(
    tmp_path: Path, relay: RelayThread, clients: Any
) -> None:
    laptop = clients(tmp_path / "laptop.db", relay.url, relay.token("alice", "laptop"))
    states: list[SyncHealth] = []
    laptop.on_connection(states.append)  # told the state at once, then every change
    tech = laptop.create_watchlist("Tech")
    assert laptop.add_symbols("Tech", ["AAPL", "MSFT"], note="core") == ["AAPL", "MSFT"]
    laptop.wait_in_sync(WAIT)
    assert laptop.freshness(tech.id).level is FreshnessLevel.LIVE
    assert laptop.connection is ConnectionState.CONNECTED
    assert laptop.health().in_sync
    wait_until(lambda: bool(states) and states[-1].state is ConnectionState.CONNECTED)

    phone = clients(tmp_path / "phone.db", relay.url, relay.token("alice", "phone"))
    heard = threading.Event()
    phone_changes: list[Any] = []
    laptop.on_change(lambda c: heard.set() if c.origin == "remote" else None)
    phone.on_change(phone_changes.append)
    phone.wait_in_sync(WAIT)
    snapshot = phone.watchlist("tech")  # any case
    assert snapshot.symbols == ("AAPL", "MSFT")
    assert snapshot.entries[0].note == "core"
    assert any(c.origin == "remote" and c.doc_id == tech.id for c in phone_changes)

    phone.add_symbols(tech.id, "NVDA")  # by id, one symbol as a str
    phone.remove_symbols("Tech", ["MSFT"])
    assert heard.wait(WAIT)
    wait_until(lambda: laptop.watchlist("Tech").symbols == ("AAPL", "NVDA"))
    laptop.create_portfolio("Main")
    trade = laptop.add_trade("Main", "AAPL", "10", "187.25")
    laptop.wait_in_sync(WAIT)
    # The index names "Main" before the portfolio's own content has arrived: wait for the trade.
    wait_until(lambda: "Main" in [d.name for d in phone.documents()])
    wait_until(lambda: [t.id for t in phone.portfolio("Main").trades] == [trade.id])
    main = phone.portfolio("Main")
    assert [t.id for t in main.trades] == [trade.id]
    assert str(main.positions["AAPL"].average_cost) == "187.25"
    with pytest.raises(TypeError):
        main.positions["X"] = main.positions["AAPL"]  # type: ignore[index]  # a snapshot


def test_prices_and_freshness_levels_are_notified(
    tmp_path: Path, relay: RelayThread, clients: Any
) -> None:
    path = tmp_path / "laptop.db"
    offline = clients(path)
    offline.create_watchlist("Tech")
    offline.add_symbols("Tech", "AAPL")
    assert offline.freshness(offline.watchlist("Tech").id).level is FreshnessLevel.OUTDATED
    assert offline.connection is ConnectionState.STOPPED
    assert offline.health().pending > 0
    with pytest.raises(ConnectionLost):
        offline.wait_in_sync(1)
    offline.close()

    freshness: list[FreshnessChange] = []
    prices: list[tuple[Any, ...]] = []
    client = clients(path, relay.url, relay.token("alice", "laptop"), freshness_interval=0.1)
    client.on_freshness(freshness.append)
    client.on_prices(prices.append)
    doc_id = client.watchlist("Tech").id
    client.wait_in_sync(WAIT)
    wait_until(
        lambda: any(
            f.subject == "document" and f.key == doc_id and f.freshness.level is FreshnessLevel.LIVE
            for f in freshness
        )
    )
    change = next(f for f in freshness if f.key == doc_id)
    assert change.previous is FreshnessLevel.OUTDATED  # the level at open, then live

    client.follow("SPY")
    relay.publish("AAPL", "187.5")
    relay.publish("SPY", "601.25")
    wait_until(lambda: {q.symbol for batch in prices for q in batch} >= {"AAPL", "SPY"})
    quote = client.quote("aapl")
    assert quote is not None and str(quote.price) == "187.5"
    assert set(client.quotes(["AAPL", "SPY", "TSLA"])) == {"AAPL", "SPY"}
    wait_until(lambda: any(f.subject == "price" and f.key == "AAPL" for f in freshness))
    first = next(f for f in freshness if f.subject == "price" and f.key == "AAPL")
    assert first.previous is None


def test_a_refused_token_is_reported_and_edits_go_on(tmp_path: Path, relay: RelayThread) -> None:
    states: list[SyncHealth] = []
    with BackgroundClient.open(tmp_path / "a.db", relay.url, "not-a-token") as client:
        client.on_connection(states.append)
        wait_until(lambda: client.connection is ConnectionState.REFUSED)
        wait_until(lambda: bool(states) and states[-1].state is ConnectionState.REFUSED)
        assert states[-1].last_error is not None and "token" in states[-1].last_error.message
        client.create_watchlist("Tech")
        assert client.add_symbols("Tech", "AAPL") == ["AAPL"]
        assert client.status(client.watchlist("Tech").id).pending > 0
    assert reopened_symbols(tmp_path / "a.db", "Tech") == ["AAPL"]


# -- threads ---------------------------------------------------------------------------------------


def test_eight_threads_at_once_lose_nothing(
    tmp_path: Path, relay: RelayThread, clients: Any
) -> None:
    laptop = clients(tmp_path / "laptop.db", relay.url, relay.token("alice", "laptop"))
    laptop.create_watchlist("Shared")
    laptop.create_portfolio("Main")
    per_thread = 25
    start = threading.Barrier(8)
    errors: list[BaseException] = []
    trades: list[str] = []

    def hammer(n: int) -> None:
        try:
            start.wait(WAIT)
            for i in range(per_thread):
                symbol = f"T{n}X{i}"
                assert laptop.add_symbols("Shared", [symbol]) == [symbol]
                seen = laptop.watchlist("Shared")
                assert symbol in seen.symbols  # a thread reads its own writes
                assert len(set(seen.symbols)) == len(seen.symbols)
                if i % 5 == 0:
                    trades.append(laptop.add_trade("Main", f"P{n}", "1", f"{i + 1}").id)
                    laptop.documents()
                    laptop.quotes()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[0]
    expected = {f"T{n}X{i}" for n in range(8) for i in range(per_thread)}
    assert set(laptop.watchlist("Shared").symbols) == expected
    assert len(laptop.watchlist("Shared").symbols) == len(expected)
    main = laptop.portfolio("Main")
    assert sorted(t.id for t in main.trades) == sorted(trades)
    assert {s: p.quantity for s, p in main.positions.items()} == {f"P{n}": 5 for n in range(8)}

    laptop.wait_in_sync(WAIT)  # and every edit reached the relay: another device gets them all
    phone = clients(tmp_path / "phone.db", relay.url, relay.token("alice", "phone"))
    phone.wait_in_sync(WAIT)
    wait_until(lambda: "Shared" in [d.name for d in phone.documents()])
    wait_until(lambda: set(phone.watchlist("Shared").symbols) == expected)
    wait_until(lambda: len(phone.portfolio("Main").trades) == len(trades))


def test_a_callback_that_calls_back_does_not_deadlock(tmp_path: Path, clients: Any) -> None:
    """Through a dispatcher that hands over as Tk's cross-thread calls do: it waits until the
    app's thread has run the callback, while that thread is itself making blocking calls."""
    app_queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()

    def blocking_dispatcher(fn: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                fn()
            finally:
                done.set()

        app_queue.put(run)
        done.wait(WAIT)

    client = clients(tmp_path / "a.db", dispatcher=blocking_dispatcher)
    client.create_watchlist("Tech")
    seen: list[tuple[str, ...]] = []
    follow_ups: list[str] = []

    def on_change(change: Any) -> None:
        assert threading.current_thread().name == "app"
        seen.append(client.watchlist("Tech").symbols)  # a read from inside a callback
        if "AAPL" in seen[-1] and not follow_ups:  # and an edit, once
            follow_ups.extend(client.add_symbols("Tech", "FOLLOW"))

    client.on_change(on_change)
    finished = threading.Event()

    def app() -> None:  # the app's thread: its own edits, and the callbacks between them
        for symbol in ("AAPL", "MSFT", "NVDA"):
            client.add_symbols("Tech", symbol)
            while (fn := _get(app_queue, 0.05)) is not None:
                fn()
        deadline = time.monotonic() + WAIT  # until the follow-up edit's callbacks ran too
        while time.monotonic() < deadline and not (follow_ups and "FOLLOW" in seen[-1]):
            if (fn := _get(app_queue, 0.05)) is not None:
                fn()
        finished.set()

    thread = threading.Thread(target=app, name="app")
    thread.start()
    assert finished.wait(WAIT + 5), "the app's thread got stuck"
    thread.join()
    assert follow_ups == ["FOLLOW"]
    assert set(client.watchlist("Tech").symbols) == {"AAPL", "MSFT", "NVDA", "FOLLOW"}
    assert seen and all(isinstance(s, tuple) for s in seen)


def test_close_is_bounded_while_the_dispatcher_waits_for_the_closing_thread(
    tmp_path: Path,
) -> None:
    """Tk's hand-over waits for Tk's thread; that thread, in a window's close handler, calls
    close(): the notification thread is stuck until it returns, and close() must not wait
    for it."""
    released = threading.Event()

    def stuck_dispatcher(fn: Callable[[], None]) -> None:
        released.wait(WAIT)  # the app's thread never takes it (it is in close())

    client = BackgroundClient.open(tmp_path / "a.db", dispatcher=stuck_dispatcher)
    client.on_change(lambda change: None)
    client.create_watchlist("Tech")
    client.add_symbols("Tech", "AAPL")
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 3
    released.set()
    assert reopened_symbols(tmp_path / "a.db", "Tech") == ["AAPL"]


def _get(q: queue.SimpleQueue[Callable[[], None] | None], timeout: float) -> Any:
    try:
        return q.get(timeout=timeout)
    except queue.Empty:
        return None


def test_default_callbacks_may_call_back_and_a_failing_one_is_logged(
    tmp_path: Path, clients: Any, caplog: pytest.LogCaptureFixture
) -> None:
    client = clients(tmp_path / "a.db")
    client.create_watchlist("Tech")
    names: list[str] = []
    read: list[tuple[str, ...]] = []

    def reader(change: Any) -> None:
        names.append(threading.current_thread().name)
        read.append(client.watchlist("Tech").symbols)

    def broken(change: Any) -> None:
        raise RuntimeError("the app's bug")

    with caplog.at_level(logging.ERROR, logger="foliosync.client.background"):
        client.on_change(broken)
        unsubscribe = client.on_change(reader)
        client.add_symbols("Tech", "AAPL")
        wait_until(lambda: any("AAPL" in r for r in read))
        assert "the app's bug" in caplog.text
    assert "foliosync-loop" not in names  # never on the loop thread
    unsubscribe()  # (a callback already handed to the dispatcher may still run)
    time.sleep(0.2)
    count = len(read)
    client.add_symbols("Tech", "MSFT")  # the loop survived the broken callback
    assert client.watchlist("Tech").symbols == ("AAPL", "MSFT")
    time.sleep(0.2)
    assert len(read) == count


def test_a_callback_may_close_the_client_and_none_starts_after_close(
    tmp_path: Path, clients: Any
) -> None:
    client = clients(tmp_path / "a.db")
    client.create_watchlist("Tech")
    closed = threading.Event()

    def close_on_change(change: Any) -> None:
        client.close()  # from the notification thread: it must not wait for itself
        closed.set()

    client.on_change(close_on_change)
    client.add_symbols("Tech", "AAPL")
    assert closed.wait(WAIT)
    with pytest.raises(ClientClosed):
        client.add_symbols("Tech", "MSFT")
    assert reopened_symbols(tmp_path / "a.db", "Tech") == ["AAPL"]

    held: list[Callable[[], None]] = []  # a dispatcher whose app runs callbacks late
    late = clients(tmp_path / "b.db", dispatcher=held.append)
    ran: list[Any] = []
    late.on_change(ran.append)
    late.create_watchlist("Tech")
    wait_until(lambda: bool(held))
    late.close()
    for fn in held:
        fn()
    assert ran == []  # handed over before close(), started after it: not run


def test_a_blocking_call_on_the_loop_thread_says_so(tmp_path: Path, clients: Any) -> None:
    client = clients(tmp_path / "a.db")

    async def inside(replica: Replica) -> list[str]:
        client.documents()  # would wait for itself
        return []

    with pytest.raises(WrongThread, match="submit"):
        client.submit(inside).result(WAIT)

    async def names(replica: Replica) -> list[str]:
        return [d.name for d in replica.documents()]

    client.create_watchlist("Tech")
    assert client.submit(names).result(WAIT) == ["Tech"]


def test_a_stuck_loop_gives_a_bounded_wait(tmp_path: Path, clients: Any) -> None:
    client = clients(tmp_path / "a.db", timeout=0.3)

    async def block(replica: Replica) -> None:
        time.sleep(1.0)  # an app's mistake: blocking work on the loop

    stuck = client.submit(block)
    started = time.monotonic()
    with pytest.raises(CallTimeout):
        client.documents()
    assert time.monotonic() - started < 0.9
    stuck.result(WAIT)
    assert client.documents() == []  # and it recovers


def test_bad_input_gets_clear_errors(tmp_path: Path, clients: Any) -> None:
    with pytest.raises(ConfigError, match="dispatcher"):
        BackgroundClient.open(tmp_path / "a.db", dispatcher="Tk")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="token"):
        BackgroundClient.open(tmp_path / "a.db", "ws://127.0.0.1:9/ws")
    with pytest.raises(ConfigError, match="ws://"):
        BackgroundClient.open(tmp_path / "a.db", "http://127.0.0.1:9/ws", "t")
    with pytest.raises(ConfigError, match="timeout"):
        BackgroundClient.open(tmp_path / "a.db", timeout=-1)
    threads = threading.active_count()
    for option in ("timeout", "flush_timeout", "freshness_interval"):
        for bad in (float("inf"), float("nan")):
            with pytest.raises(ConfigError, match=f"{option} must be a finite number"):
                BackgroundClient.open(tmp_path / "a.db", **{option: bad})
    assert threading.active_count() == threads  # no loop thread left running
    client = clients(tmp_path / "a.db")
    other = clients(tmp_path / "a.db")  # a replica is shared by its clients, not locked
    with pytest.raises(DocumentNotFound):
        client.watchlist("Nope")
    with pytest.raises(DocumentNotFound):
        client.add_symbols("Nope", "AAPL")
    client.create_watchlist("Tech")
    wait_until(lambda: [d.name for d in other.documents()] == ["Tech"])
    with pytest.raises(InvalidSymbol):
        client.add_symbols("Tech", ["AAPL", "not a symbol!"])
    assert client.watchlist("Tech").symbols == ()  # nothing of a refused edit
    client.create_portfolio("Main")
    with pytest.raises(ValueError, match="float"):
        client.add_trade("Main", "AAPL", 1.5, "1")  # money is never a binary float
    assert client.portfolio("Main").trades == ()
    client.close()
    with pytest.raises(ClientClosed):
        client.watchlist("Tech")
    client.close()  # again: harmless


# -- shutdown and durability ---------------------------------------------------------------------


def test_close_during_activity_loses_no_accepted_edit(tmp_path: Path, relay: RelayThread) -> None:
    path = tmp_path / "a.db"
    client = BackgroundClient.open(path, relay.url, relay.token("alice", "laptop"))
    client.create_watchlist("Busy")
    accepted: list[list[str]] = [[] for _ in range(4)]
    refused: list[BaseException] = []

    def writer(n: int) -> None:
        for i in range(100_000):
            try:
                accepted[n].extend(client.add_symbols("Busy", f"W{n}X{i}"))
            except ClientClosed as exc:
                refused.append(exc)
                return

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    client.close()
    for thread in threads:
        thread.join(WAIT)
    assert len(refused) == 4  # every writer was told, none hung
    done = {s for symbols in accepted for s in symbols}
    assert len(done) > 20
    assert set(reopened_symbols(path, "Busy")) >= done


def test_a_killed_process_keeps_an_edit_that_returned(tmp_path: Path) -> None:
    path = tmp_path / "a.db"
    script = textwrap.dedent(
        f"""
        import time
        from foliosync.client import BackgroundClient

        client = BackgroundClient.open({str(path)!r})
        client.create_watchlist("Tech")
        client.add_symbols("Tech", ["AAPL"])
        print("returned", flush=True)
        time.sleep(60)
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line == "returned\n", process.stderr.read() if process.stderr else line
        os.kill(process.pid, signal.SIGKILL)
        process.wait(WAIT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    assert reopened_symbols(path, "Tech") == ["AAPL"]


def test_the_types_of_the_background_clients_api_are_exported_by_the_package() -> None:
    """Every class BackgroundClient takes or returns can be named from ``foliosync.client``,
    as can the dispatcher's type and its default."""
    import typing

    import foliosync.client as package
    from foliosync.client import background

    def walk(hint: Any) -> typing.Iterator[Any]:
        yield hint
        for arg in hint if isinstance(hint, list) else typing.get_args(hint):  # Callable's [..]
            yield from walk(arg)

    used = {"Dispatcher", "call_directly"}
    for name, member in vars(BackgroundClient).items():
        function = getattr(member, "__func__", member)
        if name.startswith("_") or not callable(function):
            continue
        for hint in typing.get_type_hints(function, vars(background)).values():
            for part in walk(hint):
                if isinstance(part, type) and part.__module__ == background.__name__:
                    used.add(part.__name__)
    assert {"FreshnessChange", "WatchlistSnapshot", "PortfolioSnapshot"} <= used
    missing = {name for name in used if name not in package.__all__}
    assert not missing
    assert all(getattr(package, name) is getattr(background, name) for name in used)
