"""A device's journal: what its API accepted and what the relay acknowledged, and what that
means each replica must hold at the end.

A device writes one JSON object per line and fsyncs it before going on, so that after a SIGKILL
the harness still knows what was accepted. An edit is journalled twice: its *intent* before the
call, its outcome (``ok`` or ``err``) after. A device killed between the two leaves an intent
without an outcome, the last line of that run: the edit may or may not have been committed, so
the oracle accepts either state for what that edit touched.

Devices edit shared documents, but each edits only its own symbols and trades (plus one symbol
all of them write, which is only checked for convergence). So what a device's journal says about
its own symbols and trades is exactly what every replica must show at the end, whatever the
interleaving: the last accepted edit of a symbol decides whether it is present and its note, and
a trade's last accepted correction decides its fields.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "AckRecord",
    "DeviceExpectation",
    "ExpectedSymbol",
    "ExpectedTrade",
    "Journal",
    "expectation",
    "read_journal",
]

CONTESTED = "ALL"  # the symbol every device adds, notes and moves: checked for convergence only


class Journal:
    """An append-only JSON-lines file, each line fsynced before :meth:`write` returns."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(record, separators=(",", ":")) + "\n").encode())
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """Every complete line (a SIGKILL may leave a last line half written: it is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_bytes().split(b"\n"):
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


@dataclass(frozen=True, slots=True)
class AckRecord:
    """One Ack of the relay, as the device settled it: the updates it settled."""

    device: str
    doc_id: str
    seq: int
    updates: tuple[bytes, ...]
    line: int  # its place in the journal, to check each one once


@dataclass(slots=True)
class ExpectedSymbol:
    present: bool
    note: str | None
    certain: bool = True  # False: the last edit's outcome is unknown (killed during it)


@dataclass(slots=True)
class ExpectedTrade:
    present: bool
    quantity: str
    price: str
    note: str
    certain: bool = True


@dataclass(slots=True)
class DeviceExpectation:
    """What one device's journal requires of every replica."""

    device: str
    symbols: dict[tuple[str, str], ExpectedSymbol] = field(default_factory=dict)  # (doc, sym)
    trades: dict[str, ExpectedTrade] = field(default_factory=dict)  # by tag
    trade_ids: dict[str, str] = field(default_factory=dict)  # tag -> id
    accepted: int = 0
    refused: int = 0
    acks: list[AckRecord] = field(default_factory=list)
    refusals: list[dict[str, Any]] = field(default_factory=list)
    runs: int = 0


def _outcomes(records: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """Each intent with its outcome; an intent without one gets ``{"k": "unknown"}``."""
    open_intent: dict[str, Any] | None = None
    for record in records:
        kind = record.get("k")
        if kind == "intent":
            if open_intent is not None:
                yield open_intent, {"k": "unknown"}
            open_intent = record
        elif kind in ("ok", "err") and open_intent is not None and record["n"] == open_intent["n"]:
            yield open_intent, record
            open_intent = None
        elif kind == "start" and open_intent is not None:
            yield open_intent, {"k": "unknown"}
            open_intent = None
    if open_intent is not None:
        yield open_intent, {"k": "unknown"}


def expectation(device: str, records: list[dict[str, Any]]) -> DeviceExpectation:
    """Fold a device's journal into what it requires of every replica."""
    expected = DeviceExpectation(device)
    for line, record in enumerate(records):
        kind = record.get("k")
        if kind == "ack":
            updates = tuple(base64.b64decode(u) for u in record["updates"])
            expected.acks.append(AckRecord(device, record["doc"], record["seq"], updates, line))
        elif kind == "refusal":
            expected.refusals.append(record)
        elif kind == "start":
            expected.runs += 1
    for intent, outcome in _outcomes(records):
        if outcome["k"] == "err":
            expected.refused += 1
            continue
        certain = outcome["k"] == "ok"
        if certain:
            expected.accepted += 1
        _fold(expected, intent, outcome, certain)
    return expected


def _fold(
    expected: DeviceExpectation, intent: dict[str, Any], outcome: dict[str, Any], certain: bool
) -> None:
    """Adopt the state an edit leads to, as the device computed it from its own replica when it
    made the edit (so a device restarted after a kill goes on from what was really committed)."""
    op = intent["op"]
    if op == "create":
        return  # a document's existence follows from what is expected in it
    if op in ("add", "remove", "note", "move"):
        if intent["sym"] == CONTESTED or op == "move":
            return  # order and the contested symbol: checked for convergence only
        expected.symbols[(intent["doc"], intent["sym"])] = ExpectedSymbol(
            intent["present"], intent.get("note"), certain
        )
        return
    tag = intent["tag"]
    if op == "trade" and certain:
        expected.trade_ids[tag] = outcome["id"]
    elif "id" in intent:
        expected.trade_ids[tag] = intent["id"]
    expected.trades[tag] = ExpectedTrade(
        op != "delete", intent["qty"], intent["price"], intent["note"], certain
    )
