"""What every command of the CLI shares: where the replica lives, and how output is printed."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import platformdirs

from foliosync.client.replica import Replica

__all__ = ["default_db_path", "open_replica", "print_json", "replica_path"]


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
