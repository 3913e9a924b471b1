"""Chaos, the short version: real relays SIGKILLed and restarted, devices (each a process with
its own replica) killed now and then, a faulty proxy between them, and the oracle at the end:
nothing the API accepted or the relay acknowledged is lost, nothing is duplicated, every replica
and the relay's store are identical. ``python -m chaos`` is the long version.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from pycrdt import Doc

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # chaos/ is a folder of the checkout, not of the package
    sys.path.append(str(ROOT))

from chaos.harness import ChaosConfig, render_table, run_chaos  # noqa: E402
from chaos.journal import AckRecord, expectation  # noqa: E402
from chaos.oracle import check_acks, check_final  # noqa: E402
from chaos.proxy import FaultKind  # noqa: E402
from chaos.relays import multi_relay_support  # noqa: E402
from foliosync.sync.model import DocumentKind, EditContext, Watchlist, document_id  # noqa: E402


def _services() -> ModuleType:
    name = "foliosync_test_services"
    if name not in sys.modules:
        path = Path(__file__).with_name("services.py")
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def _assert_clean(report: object, relays: int) -> None:
    from chaos.harness import ChaosReport

    assert isinstance(report, ChaosReport)
    table = render_table(report)
    assert report.violations == [], table + "\n" + "\n".join(report.violations)
    assert report.cycles == report.config.cycles
    assert report.relay_kills >= report.config.cycles
    assert report.device_kills >= 1
    assert report.edits_accepted > 50, table
    assert report.acks > 0 and report.acks_checked > 0, table
    assert sum(report.faults.values()) > 0, table


async def test_one_relay_killed_every_cycle_loses_nothing(tmp_path: Path) -> None:
    config = ChaosConfig(
        cycles=3,
        relays=1,
        devices=3,
        seed=5,
        seconds=6.0,
        device_kill_chance=1.0,
        faults_per_second=4.0,
        settle_timeout=30.0,
        workdir=tmp_path,
    )
    report = await run_chaos(config)
    _assert_clean(report, relays=1)


async def test_two_relays_sharing_redis_and_postgres_lose_nothing(tmp_path: Path) -> None:
    services = _services()
    services.require_redis()
    services.require_postgres()
    missing = multi_relay_support()
    if missing is not None:
        pytest.skip(missing)
    config = ChaosConfig(
        cycles=3,
        relays=2,
        devices=4,
        seed=6,
        seconds=6.0,
        device_kill_chance=1.0,
        settle_timeout=30.0,
        workdir=tmp_path,
    )
    report = await run_chaos(config)
    _assert_clean(report, relays=2)


# -- the oracle itself can fail ------------------------------------------------------------------


def _watchlist(device: str, symbols: dict[str, str | None]) -> tuple[str, Doc[object]]:
    doc: Doc[object] = Doc()
    model = Watchlist(doc, EditContext(device))
    for symbol, note in symbols.items():
        model.add([symbol], note=note)
    return document_id(DocumentKind.WATCHLIST, "Shared"), doc


def _journal(*edits: dict[str, object]) -> list[dict[str, object]]:
    records: list[dict[str, object]] = [{"k": "start"}]
    for n, edit in enumerate(edits, 1):
        records.append({"k": "intent", "n": n, **edit})
        records.append({"k": "ok", "n": n})
    return records


def test_the_oracle_reports_a_lost_edit_a_wrong_note_and_a_divergence() -> None:
    records = _journal(
        {"op": "add", "doc": "Shared", "sym": "D0X1", "present": True, "note": "a"},
        {"op": "add", "doc": "Shared", "sym": "D0X2", "present": True, "note": None},
        {"op": "remove", "doc": "Shared", "sym": "D0X3", "present": False},
    )
    expected = expectation("dev0", records)
    assert expected.accepted == 3
    good_id, good = _watchlist("dev0", {"D0X1": "a", "D0X2": None})
    _, lossy = _watchlist("dev0", {"D0X1": "b", "D0X3": None})
    violations = check_final(
        [expected], {"dev0": {good_id: good}, "dev1": {good_id: lossy}}, "Main"
    )
    text = "\n".join(violations)
    assert "dev1: D0X2 missing" in text
    assert "has note 'b'" in text
    assert "D0X3 in 'Shared' (dev0 removed it)" in text
    assert "read" in text and "differently" in text
    assert not any(v.startswith("dev0:") for v in violations)


def test_an_edit_killed_midway_is_not_held_against_either_outcome() -> None:
    records = _journal({"op": "add", "doc": "Shared", "sym": "D0X1", "present": True, "note": None})
    records.append({"k": "intent", "n": 2, "op": "remove", "doc": "Shared", "sym": "D0X1"})
    records[-1]["present"] = False
    records.append({"k": "start"})  # killed before the outcome: either state is right
    expected = expectation("dev0", records)
    doc_id, kept = _watchlist("dev0", {"D0X1": None})
    assert check_final([expected], {"dev0": {doc_id: kept}}, "Main") == []


def test_an_acknowledged_update_missing_from_the_store_is_reported() -> None:
    doc_id, doc = _watchlist("dev0", {"D0X1": None})
    before = doc.get_state()
    Watchlist(doc, EditContext("dev0")).add(["D0X2"])
    late = doc.get_update(before)
    stored: Doc[object] = Doc()
    stored.apply_update(doc.get_update())
    ack = AckRecord("dev0", doc_id, 7, (late,), 12)
    assert check_acks([ack], {doc_id: stored}, "after kill 1") == []
    _, old = _watchlist("dev0", {"D0X1": None})
    violations = check_acks([ack], {doc_id: old}, "after kill 1")
    assert violations and "seq 7" in violations[0]
    assert check_acks([ack], {}, "after kill 1") != []


def test_the_table_names_every_fault_kind() -> None:
    from chaos.harness import ChaosReport

    table = render_table(ChaosReport(ChaosConfig()))
    for kind in FaultKind:
        assert kind.value in table
    for row in ("cycles", "relay kills", "device kills", "edits accepted", "acks", "violations"):
        assert row in table
