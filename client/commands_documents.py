"""`foliosync watchlist ...` and `foliosync portfolio ...`: editing documents, fully offline."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from foliosync.client.cli_common import open_replica, print_json
from foliosync.client.documents import PortfolioHandle
from foliosync.client.quotes import Quote
from foliosync.client.replica import Replica
from foliosync.client.shares import owner_label, share_state
from foliosync.sync.errors import DocumentNotFound, ValidationError
from foliosync.sync.model import DocumentKind, Position, Trade
from foliosync.sync.model.document import split_owner
from foliosync.sync.validation import decimal_to_str

__all__ = ["register"]


def register(subparsers: Any) -> None:
    _register_watchlist(subparsers)
    _register_portfolio(subparsers)


# -- watchlists ----------------------------------------------------------------------------


def _register_watchlist(subparsers: Any) -> None:
    group = subparsers.add_parser("watchlist", help="create and edit watchlists")
    commands = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = commands.add_parser("create", help="create a watchlist")
    create.add_argument("name")
    create.set_defaults(handler=_watchlist_create)

    add = commands.add_parser("add", help="add symbols to a watchlist")
    add.add_argument("name")
    add.add_argument("symbols", nargs="+", metavar="SYMBOL")
    add.add_argument("--note", help="a note for the symbols")
    add.set_defaults(handler=_watchlist_add)

    remove = commands.add_parser("remove", help="remove symbols from a watchlist")
    remove.add_argument("name")
    remove.add_argument("symbols", nargs="+", metavar="SYMBOL")
    remove.set_defaults(handler=_watchlist_remove)

    move = commands.add_parser("move", help="move a symbol to a position (0 is the top)")
    move.add_argument("name")
    move.add_argument("symbol")
    move.add_argument("position", type=int)
    move.set_defaults(handler=_watchlist_move)

    listing = commands.add_parser("list", help="list watchlists")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_watchlist_list)

    show = commands.add_parser("show", help="show a watchlist")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_watchlist_show)


async def _watchlist_create(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        handle = await replica.create_watchlist(args.name)
        print(f"created watchlist {handle.name!r} ({handle.id})")
    return 0


async def _watchlist_add(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        handle = await replica.watchlist(args.name)
        added = await handle.add(args.symbols, note=args.note)
        already = [s for s in (x.upper().strip() for x in args.symbols) if s not in added]
        if added:
            print(f"added {', '.join(added)} to {handle.name!r}")
        if already:
            print(f"already in {handle.name!r}: {', '.join(dict.fromkeys(already))}")
    return 0


async def _watchlist_remove(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        handle = await replica.watchlist(args.name)
        removed = await handle.remove(args.symbols)
        missing = [s for s in (x.upper().strip() for x in args.symbols) if s not in removed]
        if removed:
            print(f"removed {', '.join(removed)} from {handle.name!r}")
        if missing:
            print(f"not in {handle.name!r}: {', '.join(dict.fromkeys(missing))}")
    return 0


async def _watchlist_move(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        handle = await replica.watchlist(args.name)
        await handle.move(args.symbol, args.position)
        print(" ".join(handle.symbols))
    return 0


async def _watchlist_list(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        infos = replica.documents(DocumentKind.WATCHLIST)
        rows = []
        for info in infos:
            handle = await replica.watchlist(info.id)
            rows.append(
                {
                    "id": info.id,
                    "name": info.name,
                    "symbols": len(handle.symbols),
                    "pending": info.pending,
                    **_share_fields(replica, info.id),
                }
            )
    if args.json:
        print_json(rows)
    elif not rows:
        print("no watchlists")
    else:
        for row in rows:
            pending = f", {row['pending']} pending" if row["pending"] else ""
            print(f"{row['name']}{row.get('label', '')}  ({row['symbols']} symbols{pending})")
    return 0


async def _watchlist_show(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        handle = await replica.watchlist(args.name)
        entries = handle.entries()
        now = datetime.now(tz=UTC)
        quotes = {e.symbol: replica.quotes.get(e.symbol) for e in entries}
        data: dict[str, Any] = {
            "id": handle.id,
            "name": handle.name,
            "symbols": [e.symbol for e in entries],
            "entries": [
                {"symbol": e.symbol, "note": e.note, **_price_fields(quotes[e.symbol], now)}
                for e in entries
            ],
            "pending": handle.pending,
        }
    if args.json:
        print_json(data)
        return 0
    print(f"{data['name']}  ({len(entries)} symbols, {data['pending']} changes not yet synced)")
    for entry in data["entries"]:
        price = entry["price"] or ""
        change = entry["change"] or ""
        level = entry["freshness"] or ""
        print(f"  {entry['symbol']:<10}{price:>12} {change:>10} {level:<9} {entry['note'] or ''}")
    return 0


def _share_fields(replica: Replica, doc_id: str) -> dict[str, object]:
    """Whose a shared document is (``owner``, ``access``: read, write or revoked) and the label
    lists append to its name: "Tech (alice, read-only)"."""
    owner, _local = split_owner(doc_id)
    if owner is None:
        return {}
    return {
        "owner": owner,
        "access": share_state(replica, doc_id) or "write",
        "label": owner_label(replica, doc_id),
    }


def _price_fields(quote: Quote | None, now: datetime) -> dict[str, object]:
    if quote is None:
        return {"price": None, "change": None, "price_time": None, "freshness": None}
    shown = quote.to_json(now)
    return {
        "price": shown["price"],
        "change": shown["change"],
        "price_time": shown["time"],
        "freshness": shown["freshness"],
    }


# -- portfolios ----------------------------------------------------------------------------


def _register_portfolio(subparsers: Any) -> None:
    group = subparsers.add_parser("portfolio", help="create portfolios and record trades")
    commands = group.add_subparsers(dest="action", metavar="ACTION", required=True)

    create = commands.add_parser("create", help="create a portfolio")
    create.add_argument("name")
    create.set_defaults(handler=_portfolio_create)

    trade = commands.add_parser(
        "trade", help="record a trade (negative QTY sells)", prefix_chars="-"
    )
    trade.add_argument("name")
    trade.add_argument("symbol")
    trade.add_argument("quantity", metavar="QTY")
    trade.add_argument("price", metavar="PRICE")
    trade.add_argument("--note", help="a note for the trade")
    trade.add_argument("--at", metavar="TIME", help="when it happened (ISO 8601; default: now)")
    trade.set_defaults(handler=_portfolio_trade)

    correct = commands.add_parser("correct", help="correct fields of a trade")
    correct.add_argument("name")
    correct.add_argument("trade", metavar="TRADE_ID", help="the trade's id or a unique prefix")
    correct.add_argument("--symbol")
    correct.add_argument("--qty", dest="quantity")
    correct.add_argument("--price")
    correct.add_argument("--at", metavar="TIME")
    correct.add_argument("--note")
    correct.set_defaults(handler=_portfolio_correct)

    delete = commands.add_parser("delete-trade", help="delete a trade")
    delete.add_argument("name")
    delete.add_argument("trade", metavar="TRADE_ID", help="the trade's id or a unique prefix")
    delete.set_defaults(handler=_portfolio_delete_trade)

    listing = commands.add_parser("list", help="list portfolios")
    listing.add_argument("--json", action="store_true", help="print JSON")
    listing.set_defaults(handler=_portfolio_list)

    show = commands.add_parser("show", help="show positions and trades")
    show.add_argument("name")
    show.add_argument("--json", action="store_true", help="print JSON")
    show.set_defaults(handler=_portfolio_show)


_CENT = Decimal("0.01")


def _valuation(position: Position, quote: Quote | None, now: datetime) -> dict[str, object]:
    """Market value and unrealized profit of a position at the last known price."""
    fields = _price_fields(quote, now)
    if quote is None:
        return {**fields, "market_value": None, "unrealized": None}
    value = position.quantity * quote.price
    unrealized = (quote.price - position.average_cost) * position.quantity
    return {
        **fields,
        "market_value": format(value.quantize(_CENT), "f"),
        "unrealized": format(unrealized.quantize(_CENT), "f"),
    }


def _parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValidationError(
            f"cannot read time {text!r}: use ISO 8601, e.g. 2026-03-02T15:30Z"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _find_trade(handle: PortfolioHandle, key: str) -> Trade:
    matches = [t for t in handle.trades() if t.id == key] or [
        t for t in handle.trades() if len(key) >= 4 and t.id.startswith(key)
    ]
    if not matches:
        raise DocumentNotFound(f"no trade {key!r} in portfolio {handle.name!r}")
    if len(matches) > 1:
        raise ValidationError(f"trade id prefix {key!r} is ambiguous; give more characters")
    return matches[0]


async def _portfolio_create(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        handle = await replica.create_portfolio(args.name)
        print(f"created portfolio {handle.name!r} ({handle.id})")
    return 0


async def _portfolio_trade(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        handle = await replica.portfolio(args.name)
        trade = await handle.add_trade(
            args.symbol, args.quantity, args.price, time=_parse_time(args.at), note=args.note
        )
        side = "bought" if trade.quantity > 0 else "sold"
        print(
            f"{side} {decimal_to_str(abs(trade.quantity))} {trade.symbol} at "
            f"{decimal_to_str(trade.price)} in {handle.name!r} (trade {trade.id[:8]})"
        )
    return 0


async def _portfolio_correct(args: argparse.Namespace) -> int:
    changes: dict[str, object] = {}
    for field in ("symbol", "quantity", "price", "note"):
        value = getattr(args, field)
        if value is not None:
            changes[field] = value
    if args.at is not None:
        changes["time"] = _parse_time(args.at)
    if not changes:
        raise ValidationError("nothing to correct: give --symbol, --qty, --price, --at or --note")
    async with open_replica(args) as replica:
        handle = await replica.portfolio(args.name)
        trade = _find_trade(handle, args.trade)
        await handle.correct_trade(trade.id, **changes)
        print(f"corrected trade {trade.id[:8]} in {handle.name!r}")
    return 0


async def _portfolio_delete_trade(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        handle = await replica.portfolio(args.name)
        trade = _find_trade(handle, args.trade)
        await handle.delete_trade(trade.id)
        print(f"deleted trade {trade.id[:8]} from {handle.name!r}")
    return 0


async def _portfolio_list(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        rows = []
        for info in replica.documents(DocumentKind.PORTFOLIO):
            handle = await replica.portfolio(info.id)
            rows.append(
                {
                    "id": info.id,
                    "name": info.name,
                    "trades": len(handle.trades()),
                    "positions": sum(1 for p in handle.positions().values() if p.quantity),
                    "pending": info.pending,
                    **_share_fields(replica, info.id),
                }
            )
    if args.json:
        print_json(rows)
    elif not rows:
        print("no portfolios")
    else:
        for row in rows:
            pending = f", {row['pending']} pending" if row["pending"] else ""
            counts = f"{row['positions']} positions, {row['trades']} trades{pending}"
            print(f"{row['name']}{row.get('label', '')}  ({counts})")
    return 0


async def _portfolio_show(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        handle = await replica.portfolio(args.name)
        positions = handle.positions()
        trades = handle.trades()
        now = datetime.now(tz=UTC)
        data: dict[str, Any] = {
            "id": handle.id,
            "name": handle.name,
            "positions": {
                s: {**p.to_json(), **_valuation(p, replica.quotes.get(s), now)}
                for s, p in positions.items()
                if p.quantity
            },
            "closed": {s: p.to_json() for s, p in positions.items() if not p.quantity},
            "trades": [t.to_json() for t in trades],
            "pending": handle.pending,
        }
    if args.json:
        print_json(data)
        return 0
    print(f"{data['name']}  ({len(trades)} trades, {data['pending']} changes not yet synced)")
    if data["positions"]:
        print(f"  {'SYMBOL':<10}{'QTY':>12}{'AVG COST':>14}{'PRICE':>12}{'VALUE':>14}  FRESHNESS")
        for symbol, pos in data["positions"].items():
            print(
                f"  {symbol:<10}{pos['qty']:>12}{pos['avg_cost']:>14}{pos['price'] or '-':>12}"
                f"{pos['market_value'] or '-':>14}  {pos['freshness'] or 'no price yet'}"
            )
    for trade in trades:
        t = trade.to_json()
        note = f"  {t['note']}" if t["note"] else ""
        print(f"  {t['id'][:8]}  {t['time']}  {t['symbol']:<8}{t['qty']:>12} @ {t['price']}{note}")
    return 0
