"""What every command of the CLI shares: where the replica lives, and how output is printed."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import platformdirs

from foliosync.client.replica import Replica

__all__ = [
    "QTIMER_MAX_SECONDS",
    "default_db_path",
    "open_replica",
    "print_json",
    "replica_path",
    "seconds",
    "timer_seconds",
]

# A QTimer takes a signed 32-bit number of milliseconds: a longer wait overflows it.
QTIMER_MAX_SECONDS = (2**31 - 1) / 1000


def seconds(text: str) -> float:
    """An argparse type for a duration: a finite number of seconds above 0.

    NaN passes every comparison test that is not written against it (``nan <= 0`` is False)
    and infinity overflows the timers it ends up in, so both are refused here, at the flag.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or not value > 0:
        raise argparse.ArgumentTypeError(
            f"must be a finite number of seconds above 0, not {text!r}"
        )
    return value


def timer_seconds(text: str) -> float:
    """:func:`seconds` that a QTimer can wait: at most :data:`QTIMER_MAX_SECONDS`."""
    value = seconds(text)
    if value > QTIMER_MAX_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {QTIMER_MAX_SECONDS:g} seconds (the longest a Qt timer waits), "
            f"not {text!r}"
        )
    return value


def default_db_path() -> Path:
    """$FOLIOSYNC_DB, else replica.db in the platform's per-user data directory."""
    override = os.environ.get("FOLIOSYNC_DB")
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_data_dir("foliosync", appauthor=False)) / "replica.db"


def replica_path(args: argparse.Namespace) -> Path:
    db = getattr(args, "db", None)
    return Path(db).expanduser() if db else default_db_path()


@asynccontextmanager
async def open_replica(args: argparse.Namespace) -> AsyncIterator[Replica]:
    replica = await Replica.open(replica_path(args))
    try:
        yield replica
    finally:
        await replica.close()


def print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
