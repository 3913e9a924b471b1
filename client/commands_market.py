"""``foliosync market``: is the exchange open, and when does that change?

Mostly a window onto :mod:`foliosync.sync.market` for people debugging freshness ("why does this
price say closed?"), so it can ask about any moment, not just now.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

from foliosync.sync.errors import ValidationError
from foliosync.sync.market import NYSE, ExchangeCalendar, Session

__all__ = ["parse_at", "register", "run_market"]

_TIME_FORMAT = "%a %Y-%m-%d %H:%M %Z"


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "market",
        help="show whether the NYSE is open and its next open and close",
        description=(
            "Show whether the NYSE regular session (09:30-16:00 New York time, 13:00 on early "
            "closes) is open at a moment, the session of that day, and the next open and close."
        ),
    )
    parser.add_argument(
        "--at",
        metavar="TIME",
        help=(
            "the moment to ask about, ISO 8601 (e.g. 2024-03-11T14:30:00Z or "
            "2024-03-11T10:30-04:00); a time without an offset is New York time, a date alone "
            "its midnight (default: now)"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run_market)


def parse_at(text: str, calendar: ExchangeCalendar = NYSE) -> datetime:
    """Parse ``--at``; a naive time is read in the exchange's zone, where a user thinks of it."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValidationError(
            f"--at: {text!r} is not an ISO 8601 time (e.g. 2024-03-11T14:30:00Z)"
        ) from exc
    if t.tzinfo is None:
        t = t.replace(tzinfo=calendar.timezone)
    return t.astimezone(calendar.timezone)


def _session_json(session: Session | None) -> dict[str, str] | None:
    if session is None:
        return None
    return {"open": session.open.isoformat(), "close": session.close.isoformat()}


def _report(calendar: ExchangeCalendar, at: datetime) -> dict[str, Any]:
    return {
        "exchange": calendar.name,
        "at": at.isoformat(),
        "open": calendar.is_open(at),
        "session": _session_json(calendar.session(calendar.local_date(at))),
        "next_open": calendar.next_open(at).isoformat(),
        "next_close": calendar.next_close(at).isoformat(),
    }


def _text(calendar: ExchangeCalendar, at: datetime) -> str:
    session = calendar.session(calendar.local_date(at))
    if session is None:
        today = "no session (weekend or exchange holiday)"
    else:
        today = f"{session.open:%H:%M}-{session.close:%H:%M %Z}"
    state = "open" if calendar.is_open(at) else "closed"
    return "\n".join(
        [
            f"{calendar.name} is {state} at {at:{_TIME_FORMAT}}",
            f"session that day: {today}",
            f"next close: {calendar.next_close(at):{_TIME_FORMAT}}",
            f"next open:  {calendar.next_open(at):{_TIME_FORMAT}}",
        ]
    )


def run_market(args: argparse.Namespace, calendar: ExchangeCalendar = NYSE) -> int:
    at = (
        parse_at(args.at, calendar)
        if args.at is not None
        else datetime.now(UTC).astimezone(calendar.timezone)
    )
    if args.json:
        print(json.dumps(_report(calendar, at)))
    else:
        print(_text(calendar, at))
    return 0
