"""The fan-out contract (foliosync.testing.fanout_contract) on every fan-out foliosync ships."""

from __future__ import annotations

import importlib.util
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType

import pytest
from redis.asyncio import Redis

from foliosync.server.fanout import Change, FanOut, InProcessFanOut
from foliosync.server.redis_fanout import RedisFanOut
from foliosync.testing.fanout_contract import (
    FANOUT_CHECKS,
    PEER_CHECKS,
    FanOutCheck,
    FanOutHarness,
)


def _services() -> ModuleType:
    name = "foliosync_test_services"
    if name not in sys.modules:
        path = Path(__file__).with_name("services.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def redis_url() -> str:
    url: str = _services().redis_url()
    return url


async def _in_process() -> FanOut:
    return InProcessFanOut()


@pytest.mark.parametrize("check", FANOUT_CHECKS, ids=lambda c: c.__name__)
async def test_in_process(check: FanOutCheck) -> None:
    await check(FanOutHarness(_in_process))


async def flush_prefix(prefix: str) -> None:
    """Delete this test's keys only: the Redis is shared with other tests."""
    client = Redis.from_url(redis_url())
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    _services().require_redis()
    name = f"test-fanout-{uuid.uuid4().hex[:12]}:"
    yield name
    await flush_prefix(name)


def redis_harness(prefix: str) -> FanOutHarness:
    made = 0

    async def make() -> FanOut:
        nonlocal made
        made += 1  # each instance on a bus of its own
        fanout = RedisFanOut(
            redis_url(), relay_id="relay-a", on_peer_change=_refuse, prefix=f"{prefix}{made}:"
        )
        await fanout.start()
        return fanout

    async def make_peer(relay_id: str, on_peer_change: Callable[[Change], None]) -> FanOut:
        fanout = RedisFanOut(
            redis_url(), relay_id=relay_id, on_peer_change=on_peer_change, prefix=prefix
        )
        await fanout.start()
        return fanout

    return FanOutHarness(make, make_peer)


def _refuse(change: Change) -> None:
    raise AssertionError(f"a change of relay {change.relay} came from a bus nobody shares")


@pytest.mark.parametrize("check", FANOUT_CHECKS + PEER_CHECKS, ids=lambda c: c.__name__)
async def test_redis(check: FanOutCheck, prefix: str) -> None:
    await check(redis_harness(prefix))
