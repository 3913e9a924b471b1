"""The oracle: what the journals require, checked against every replica and the relay's store.

Reads go through the document models (a watchlist's symbols and notes, a portfolio's trades),
as an app would see them; identity goes through pycrdt (two documents are the same when neither
holds an update the other lacks, deletions included).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pycrdt import Doc, TransactionEvent

from chaos.journal import AckRecord, DeviceExpectation
from foliosync.sync.model import (
    DocumentKind,
    EditContext,
    Portfolio,
    Watchlist,
    document_id,
    kind_of,
)

__all__ = ["changes", "check_acks", "check_final", "view"]


def view(doc_id: str, doc: Doc[Any]) -> Any:
    """What an app reads of a document: entries in display order, or the trades."""
    kind = kind_of(doc_id)
    context = EditContext("oracle")
    if kind is DocumentKind.WATCHLIST:
        watchlist = Watchlist(doc, context)
        return [(e.symbol, e.note, e.position) for e in watchlist.entries()]
    if kind is DocumentKind.PORTFOLIO:
        portfolio = Portfolio(doc, context)
        return sorted((t.to_json() for t in portfolio.trades()), key=lambda t: t["id"])
    return None  # the user index: compared by content only


def changes(doc: Doc[Any], update: bytes) -> bool:
    """Whether applying ``update`` to ``doc`` changes it (then it has been applied)."""
    fired: list[TransactionEvent] = []
    subscription = doc.observe(fired.append)
    try:
        doc.apply_update(update)
    finally:
        doc.unobserve(subscription)
    return bool(fired)


def _copy(doc: Doc[Any]) -> Doc[Any]:
    copy: Doc[Any] = Doc()
    copy.apply_update(doc.get_update())
    return copy


def same_content(a: Doc[Any], b: Doc[Any]) -> bool:
    return not changes(_copy(a), b.get_update()) and not changes(_copy(b), a.get_update())


def check_acks(acks: list[AckRecord], stored: dict[str, Doc[Any]], when: str) -> list[str]:
    """Every acknowledged update must already be in the store (``stored`` is changed)."""
    violations = []
    for ack in acks:
        doc = stored.get(ack.doc_id)
        for update in ack.updates:
            if doc is None or changes(doc, update):
                violations.append(
                    f"{when}: {ack.device}'s Ack of {ack.doc_id} seq {ack.seq} (journal line "
                    f"{ack.line}) is not in the relay's store"
                )
                break
    return violations


def _trades_by_tag(trades: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    by_tag: dict[str, list[dict[str, Any]]] = {}
    for trade in trades:
        tag = (trade["note"] or "").split("/")[0]
        by_tag.setdefault(tag, []).append(trade)
    return by_tag


def check_final(
    expectations: list[DeviceExpectation],
    copies: dict[str, dict[str, Doc[Any]]],
    portfolio: str,
) -> list[str]:
    """Check every copy (each replica by device name, and ``"relay"``) against the journals,
    for duplicates, and against each other."""
    violations: list[str] = []
    views = {
        name: {doc_id: view(doc_id, doc) for doc_id, doc in docs.items()}
        for name, docs in copies.items()
    }
    portfolio_id = document_id(DocumentKind.PORTFOLIO, portfolio)
    for expected in expectations:
        for refusal in expected.refusals:
            violations.append(f"{expected.device}: the relay refused an accepted edit: {refusal}")
        for (doc_name, symbol), want in expected.symbols.items():
            if not want.certain:
                continue
            doc_id = document_id(DocumentKind.WATCHLIST, doc_name)
            for name, docs in views.items():
                entries = {s: note for s, note, _ in docs.get(doc_id) or []}
                if doc_id not in docs:
                    violations.append(f"{name} lacks watchlist {doc_name!r}")
                elif want.present and symbol not in entries:
                    violations.append(
                        f"{name}: {symbol} missing from {doc_name!r} ({expected.device} added it)"
                    )
                elif not want.present and symbol in entries:
                    violations.append(
                        f"{name}: {symbol} in {doc_name!r} ({expected.device} removed it)"
                    )
                elif want.present and entries[symbol] != want.note:
                    violations.append(
                        f"{name}: {symbol} in {doc_name!r} has note {entries[symbol]!r}, "
                        f"{expected.device} set {want.note!r}"
                    )
        for tag, want_trade in expected.trades.items():
            trade_id = expected.trade_ids.get(tag)
            if not want_trade.certain or trade_id is None:
                continue
            for name, docs in views.items():
                trades = {t["id"]: t for t in docs.get(portfolio_id) or []}
                got = trades.get(trade_id)
                if want_trade.present and got is None:
                    violations.append(f"{name}: trade {tag} ({trade_id}) missing")
                elif not want_trade.present and got is not None:
                    violations.append(f"{name}: trade {tag} ({trade_id}) present after delete")
                elif got is not None and (
                    Decimal(got["qty"]),
                    Decimal(got["price"]),
                    got["note"],
                ) != (Decimal(want_trade.quantity), Decimal(want_trade.price), want_trade.note):
                    violations.append(
                        f"{name}: trade {tag} is {got['qty']} @ {got['price']} {got['note']!r}, "
                        f"{expected.device} made it {want_trade.quantity} @ {want_trade.price} "
                        f"{want_trade.note!r}"
                    )
    for name, docs in views.items():
        ledger: list[dict[str, Any]] = docs.get(portfolio_id) or []
        if len({t["id"] for t in ledger}) != len(ledger):
            violations.append(f"{name}: a trade id appears twice")
        for tag, group in _trades_by_tag(ledger).items():
            if len(group) > 1:
                ids = ", ".join(t["id"] for t in group)
                violations.append(f"{name}: trade {tag} recorded {len(group)} times ({ids})")
    violations += _check_identical(copies, views)
    return violations


def _check_identical(
    copies: dict[str, dict[str, Doc[Any]]], views: dict[str, dict[str, Any]]
) -> list[str]:
    violations: list[str] = []
    names = list(copies)
    if not names:
        return violations
    first = names[0]
    for name in names[1:]:
        if set(copies[name]) != set(copies[first]):
            only = set(copies[name]) ^ set(copies[first])
            violations.append(f"{name} and {first} hold different documents: {sorted(only)}")
        for doc_id in set(copies[name]) & set(copies[first]):
            if views[name][doc_id] != views[first][doc_id]:
                violations.append(f"{name} and {first} read {doc_id} differently")
            if not same_content(copies[name][doc_id], copies[first][doc_id]):
                violations.append(f"{name} and {first} differ in the content of {doc_id}")
    return violations
