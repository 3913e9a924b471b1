"""`foliosync sync` (one round of sync with a relay) and `foliosync status` (how current it is)."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime
from typing import Any

from foliosync.client.cli_common import open_replica, print_json, seconds
from foliosync.client.health import ConnectionState, LastError, build_health
from foliosync.client.replica import Refusal, Replica
from foliosync.client.shares import owner_label, share_state
from foliosync.client.sync import SyncClient
from foliosync.sync.errors import ConfigError, DocumentNotFound
from foliosync.sync.model import DocumentKind

__all__ = ["register"]

DEFAULT_SERVER = "ws://127.0.0.1:8765/ws"
# How many of the changes the relay refused `status --json` lists (the text shows 5).
RECENT_REFUSALS = 20


def register(subparsers: Any) -> None:
    sync = subparsers.add_parser(
        "sync",
        help="push pending changes to the relay and pull what is new",
        description="Connect, push what is pending, pull what is new, fetch the latest prices "
        "of the followed symbols (those of the watchlists and open positions), and exit 0 once "
        "every document is in sync. The server and token come from the flags, else "
        "$FOLIOSYNC_SERVER and $FOLIOSYNC_TOKEN, else the last successful sync.",
    )
    sync.add_argument("--server", metavar="URL", help=f"relay URL (e.g. {DEFAULT_SERVER})")
    sync.add_argument("--token", help="token from `foliosync token USER` on the relay")
    sync.add_argument(
        "--ca",
        metavar="FILE",
        help="verify a wss:// relay's certificate against the CAs in FILE (PEM) instead of the "
        "system's (default: $FOLIOSYNC_CA, else the system's)",
    )
    sync.add_argument(
        "--timeout",
        type=seconds,
        default=30.0,
        metavar="S",
        help="give up after S seconds (default 30)",
    )
    sync.set_defaults(handler=_sync)

    status = subparsers.add_parser(
        "status",
        help="the status line, and pending changes and freshness per document",
        description="How this device stands with its relay, from the replica alone: the status "
        "line an app shows (lag, pending changes, last error, price ages), the last changes the "
        "relay refused (rolled back on this device), then each document. "
        "--json prints the fields of SyncClient.health() (times in ISO 8601 UTC, ages and lag "
        "in seconds) with the per-document rows.",
    )
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)


async def _sync(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        meta = replica.meta
        server = args.server or os.environ.get("FOLIOSYNC_SERVER") or meta.get("server_url")
        token = args.token or os.environ.get("FOLIOSYNC_TOKEN") or meta.get("token")
        if not server:
            raise ConfigError(f"no relay given: use --server URL (e.g. {DEFAULT_SERVER})")
        if not token:
            raise ConfigError("no token given: use --token (from `foliosync token USER`)")
        client = SyncClient(
            replica,
            server,
            token,
            client_name=f"cli-{replica.device_id}",
            ca_file=args.ca or os.environ.get("FOLIOSYNC_CA") or None,
        )
        refused: list[Refusal] = []
        stop_hearing = replica.on_refusal(refused.append)
        try:
            synced = await client.sync_once(timeout=args.timeout)
        finally:
            stop_hearing()
            for refusal in refused:  # told even if the sync then failed: they are rolled back
                print(refusal.describe(_name(replica, refusal.doc_id)))
        if not synced:
            print("another process syncs this replica; it has sent every change")
            return 0
        docs = replica.documents()
        pending = sum(d.pending for d in docs)
        followed = await replica.followed_symbols()
        priced = sum(1 for symbol in followed if replica.quotes.get(symbol) is not None)
        print(
            f"in sync with {server}: {len(docs)} documents, {pending} changes pending, "
            f"prices of {priced} of {len(followed)} followed symbols"
        )
    return 0


def _name(replica: Replica, doc_id: str) -> str | None:
    """A document's name for people ("the list of documents" for the index); None for one this
    replica no longer holds (its creation refused: the refusal's summary names it)."""
    try:
        info = replica.info(doc_id)
    except DocumentNotFound:
        return None
    if info.kind is DocumentKind.INDEX:
        return "the list of documents"
    return (info.name or doc_id) + owner_label(replica, doc_id)


def _refusal_row(refusal: Refusal) -> dict[str, object]:
    return {
        "doc_id": refusal.doc_id,
        "seq": refusal.seq,
        "code": refusal.code,
        "message": refusal.message,
        "at": _iso(refusal.at_ms),
        "changes": refusal.changes,
        "summary": refusal.summary,
        "rebased": list(refusal.rebased),
    }


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return (
        datetime.fromtimestamp(ms / 1000, tz=UTC)
        .isoformat(timespec="seconds")
        .replace("+00:00", "Z")
    )


async def _status(args: argparse.Namespace) -> int:
    now = datetime.now(tz=UTC)
    async with open_replica(args) as replica:
        rows = []
        # Per document: what its name is followed by (" (alice, read-only)"), and whether its
        # share was revoked.
        shared: dict[str, tuple[str, bool]] = {}
        for info in replica.documents():
            shared[info.id] = (
                owner_label(replica, info.id),
                share_state(replica, info.id) == "revoked",
            )
            freshness = replica.freshness(info.id, now)
            rows.append(
                {
                    "id": info.id,
                    "kind": info.kind.value,
                    "name": info.name,
                    "pending": info.pending,
                    "last_synced_at": _iso(info.last_synced_at),
                    "remote_changed_at": _iso(info.remote_changed_at),
                    "remote_changed_by": info.remote_changed_by,
                    "freshness": freshness.level.value,
                    "freshness_reason": freshness.describe(),
                }
            )
        refusals = [
            {**_refusal_row(r), "name": _name(replica, r.doc_id), "line": r.describe()}
            for r in replica.refusals()[:RECENT_REFUSALS]
        ]
        lines = [r.describe(_name(replica, r.doc_id)) for r in replica.refusals()[:5]]
        meta = replica.meta
        server = meta.get("server_url")
        health = build_health(
            replica,
            state=ConnectionState.NOT_RUNNING,
            now=now,
            last_error=LastError.from_meta(meta),
            followed=await replica.followed_symbols(),
        )
    if args.json:
        print_json({"server": server, **health.to_json(), "documents": rows, "refusals": refusals})
        return 0
    print(health.describe())
    for line in lines:
        print(line)
    if not rows:
        print("no documents")
        return 0
    print(f"relay: {server or 'never synced'}")
    for row in rows:
        remote = ""
        if row["remote_changed_at"]:
            remote = f"; relay changed {row['remote_changed_at']} by {row['remote_changed_by']}"
        label, revoked = shared[str(row["id"])]
        reason = row["freshness_reason"]
        if revoked:
            reason = "share revoked: no longer synced; the last copy is kept"
        print(f"{row['kind']:<10} {str(row['name']) + label:<24} {reason}{remote}")
    return 0
