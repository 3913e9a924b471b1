"""foliosync.testing's store contract, run against every store foliosync ships."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType

import pytest

from foliosync.server.postgres_store import PostgresRelayStore
from foliosync.server.storage import MemoryRelayStore, RelayStore, SQLiteRelayStore
from foliosync.testing.store_contract import (
    STORE_CHECKS,
    OpenStore,
    StoreCheck,
    check_store,
    store_checks,
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


# Checks an adapter is known not to meet yet (adapter, check name): xfail(strict), never skipped.
_KNOWN_GAPS: set[tuple[str, str]] = set()


def _maybe_known_gap(request: pytest.FixtureRequest, adapter: str, check: StoreCheck) -> None:
    if (adapter, check.name) in _KNOWN_GAPS:
        request.applymarker(
            pytest.mark.xfail(strict=True, reason=f"{adapter} store: {check.name} not met yet")
        )


@pytest.mark.parametrize("check", store_checks(durable=False, shared=False), ids=str)
async def test_memory_store(request: pytest.FixtureRequest, check: StoreCheck) -> None:
    _maybe_known_gap(request, "memory", check)

    async def open_store() -> RelayStore:
        return MemoryRelayStore()

    await check.run(open_store)


@pytest.mark.parametrize("check", store_checks(durable=True, shared=False), ids=str)
async def test_sqlite_store(
    request: pytest.FixtureRequest, check: StoreCheck, tmp_path: Path
) -> None:
    _maybe_known_gap(request, "sqlite", check)

    async def open_store() -> RelayStore:
        return await SQLiteRelayStore.open(tmp_path / "data" / "relay.db")

    await check.run(open_store)


@pytest.fixture
async def postgres_store_factory() -> AsyncIterator[OpenStore]:
    async with _services().postgres_database() as dsn:

        async def open_store() -> RelayStore:
            return await PostgresRelayStore.open(dsn, min_size=1, max_size=4)

        yield open_store


@pytest.mark.parametrize("check", store_checks(durable=True, shared=True), ids=str)
async def test_postgres_store(check: StoreCheck, postgres_store_factory: OpenStore) -> None:
    await check.run(postgres_store_factory)


async def test_check_store_runs_every_check_and_names_the_failing_one() -> None:
    """The all-in-one entry point: a store that breaks one rule is caught, with the rule's name."""

    class ForgetsWatermarks(MemoryRelayStore):
        async def append(
            self, user: str, doc_id: str, update: bytes, changed_at: int, changed_by: str
        ) -> int:
            return await super().append(user, doc_id, update, 0, changed_by)

    async def open_store() -> RelayStore:
        return ForgetsWatermarks()

    with pytest.raises(AssertionError, match="store contract watermark: watermark"):
        await check_store(open_store, durable=False, shared=False)


def test_the_checks_are_named_once_and_picked_by_what_a_store_can_do() -> None:
    names = [c.name for c in STORE_CHECKS]
    assert len(names) == len(set(names))
    assert {c.name for c in store_checks(durable=True, shared=True)} == set(names)
    plain = store_checks(durable=False, shared=False)
    assert not any(c.durable or c.shared for c in plain)
    assert {c.name for c in store_checks(durable=True, shared=False)} - {c.name for c in plain} == {
        "reopened_store_holds_everything"
    }
