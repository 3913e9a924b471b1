"""`foliosync prices SYMBOL...`: the last known prices, offline, or followed live with --follow."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from foliosync.client.cli_common import open_replica, print_json, seconds
from foliosync.client.quotes import Quote
from foliosync.client.sync import SyncClient
from foliosync.sync.errors import ConfigError
from foliosync.sync.validation import decimal_to_str, normalize_symbol

__all__ = ["register"]


def register(subparsers: Any) -> None:
    prices = subparsers.add_parser(
        "prices",
        help="last known prices (offline), or follow them live",
        description="Print the last known price of each SYMBOL with its age and freshness, from "
        "the local replica (works offline). With --follow, connect to the relay and print every "
        "new price as it arrives.",
    )
    prices.add_argument("symbols", nargs="+", metavar="SYMBOL")
    prices.add_argument("--follow", action="store_true", help="connect and print live prices")
    prices.add_argument(
        "--json", action="store_true", help="print JSON (one object per line with --follow)"
    )
    prices.add_argument("--server", metavar="URL", help="relay URL (default: remembered)")
    prices.add_argument("--token", help="token (default: remembered)")
    prices.add_argument(
        "--ca", metavar="FILE", help="CAs (PEM) a wss:// relay's certificate must verify against"
    )
    prices.add_argument(
        "--duration", type=seconds, metavar="S", help="with --follow: stop after S seconds"
    )
    prices.set_defaults(handler=_prices)


def _line(quote: Quote, now: datetime) -> str:
    """SYMBOL, price, change, age, freshness level and why, e.g.
    ``AAPL  187.25 (+1.25)  12 s ago  live  updated 12 s ago``."""
    change = quote.change
    shown = "" if change is None else f" ({'+' if change >= 0 else ''}{decimal_to_str(change)})"
    freshness = quote.freshness(now)
    return (
        f"{quote.symbol:<10}{decimal_to_str(quote.price):>14}{shown:<14} "
        f"{quote.describe_age(now):>14}  {freshness.level.value:<9} {freshness.reason}"
    )


async def _prices(args: argparse.Namespace) -> int:
    symbols = sorted({normalize_symbol(s) for s in args.symbols})
    async with open_replica(args) as replica:
        now = datetime.now(tz=UTC)
        known = {s: q for s in symbols if (q := replica.quotes.get(s)) is not None}
        if not args.follow:
            if args.json:
                print_json({s: (known[s].to_json(now) if s in known else None) for s in symbols})
            else:
                for symbol in symbols:
                    quote = known.get(symbol)
                    print(_line(quote, now) if quote else f"{symbol:<10}{'no price yet':>14}")
            return 0
        meta = replica.meta
        server = args.server or os.environ.get("FOLIOSYNC_SERVER") or meta.get("server_url")
        token = args.token or os.environ.get("FOLIOSYNC_TOKEN") or meta.get("token")
        if not server or not token:
            raise ConfigError("--follow needs a relay: give --server and --token (or sync once)")
        client = SyncClient(
            replica,
            server,
            token,
            client_name=f"cli-{replica.device_id}",
            ca_file=args.ca or os.environ.get("FOLIOSYNC_CA") or None,
        )
        client.extra_symbols.update(symbols)
        wanted = set(symbols)
        shown: dict[str, tuple[int, Decimal]] = {}

        def show(quote: Quote, now: datetime) -> None:
            if shown.get(quote.symbol) == (quote.time_ms, quote.price):
                return  # the relay's snapshot repeats the price already shown
            shown[quote.symbol] = (quote.time_ms, quote.price)
            print(json.dumps(quote.to_json(now)) if args.json else _line(quote, now), flush=True)

        for quote in known.values():  # the last known first, then every new one
            show(quote, now)
        # Printed here, not in the listener: the price book keeps a failing listener from
        # breaking the engine, so an error while printing (a closed pipe) must be raised here to
        # end the command.
        arrived: asyncio.Queue[list[Quote]] = asyncio.Queue()
        unsubscribe = replica.quotes.subscribe(arrived.put_nowait)
        client.start()
        try:
            async with asyncio.timeout(args.duration):
                while True:
                    quotes = await arrived.get()
                    now = datetime.now(tz=UTC)
                    for quote in quotes:
                        if quote.symbol in wanted:
                            show(quote, now)
        except TimeoutError:
            pass  # --duration is over
        finally:
            unsubscribe()
            with contextlib.suppress(Exception):
                await client.stop()
    sys.stdout.flush()
    return 0
