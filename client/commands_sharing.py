"""`foliosync share`, `unshare` and `shares` (a user's documents for others), and
`foliosync token revoke` (an operator shuts out a lost device or one token).

They talk to the relay's HTTP API (``foliosync.server.http_shares``) with the device's token
and relay URL (the flags, else $FOLIOSYNC_SERVER and $FOLIOSYNC_TOKEN, else the last successful
sync); `token revoke` takes an admin token, never the device's remembered one.
"""

from __future__ import annotations

import argparse
import os
from typing import Any
from urllib.parse import quote

from foliosync.client.cli_common import open_replica, print_json
from foliosync.client.replica import Replica
from foliosync.client.shares import call_relay, remember_shares
from foliosync.sync.errors import ConfigError, DocumentNotFound
from foliosync.sync.model import DocumentKind

__all__ = ["register"]

_EXAMPLE = "ws://127.0.0.1:8765/ws"


def register(subparsers: Any) -> None:
    share = subparsers.add_parser(
        "share",
        help="share a watchlist or portfolio with another user",
        description="Let USER sync the watchlist or portfolio NAME (read and write, or only "
        "read with --read-only). USER sees it as OWNER/id, with your name shown, on their next "
        "sync, or at once if connected. Sharing again changes the access.",
    )
    share.add_argument("name", metavar="NAME", help="the document's name (or id)")
    share.add_argument("user", metavar="USER")
    share.add_argument("--read-only", action="store_true", help="USER may read, not edit")
    _relay_flags(share)
    share.set_defaults(handler=_share)

    unshare = subparsers.add_parser(
        "unshare",
        help="stop sharing a document with a user",
        description="End the share at once: USER's open connections stop receiving its changes "
        "and their edits are refused; their devices keep their last copy, no longer synced.",
    )
    unshare.add_argument("name", metavar="NAME", help="the document's name (or id)")
    unshare.add_argument("user", metavar="USER")
    _relay_flags(unshare)
    unshare.set_defaults(handler=_unshare)

    shares = subparsers.add_parser(
        "shares",
        help="what I share, and what others share with me",
        description="Lists the shares the relay holds for you, and records on this device "
        "which shared documents are read-only or revoked (shown by list and status).",
    )
    shares.add_argument("--json", action="store_true", help="print JSON")
    _relay_flags(shares)
    shares.set_defaults(handler=_shares)

    revoke = subparsers.add_parser(
        "token-revoke",
        help="(also `token revoke`) revoke a device's tokens, or one token, on the relay",
        description="Every token of DEVICE issued until now (of USER only, with --user) stops "
        "working at once, open connections included; or, with --jti, the one token of that "
        "id. Needs an admin token (`foliosync token ops --scope admin` on the relay).",
    )
    revoke.add_argument("device", metavar="DEVICE", nargs="?", help="the device to shut out")
    revoke.add_argument("--user", help="only this user's device of that name")
    revoke.add_argument("--jti", metavar="JTI", help="revoke only the token with this id")
    revoke.add_argument("--server", metavar="URL", help=f"relay URL (e.g. {_EXAMPLE})")
    revoke.add_argument("--token", help="an admin token (else $FOLIOSYNC_ADMIN_TOKEN)")
    revoke.set_defaults(handler=_token_revoke)


def _relay_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", metavar="URL", help=f"relay URL (e.g. {_EXAMPLE})")
    parser.add_argument("--token", help="this device's token (from `foliosync token USER`)")


def _relay(args: argparse.Namespace, replica: Replica) -> tuple[str, str]:
    meta = replica.meta
    server = args.server or os.environ.get("FOLIOSYNC_SERVER") or meta.get("server_url")
    token = args.token or os.environ.get("FOLIOSYNC_TOKEN") or meta.get("token")
    if not server:
        raise ConfigError(f"no relay given: use --server URL (e.g. {_EXAMPLE})")
    if not token:
        raise ConfigError("no token given: use --token (from `foliosync token USER`)")
    return server, token


def _own_document(replica: Replica, name: str) -> str:
    """The id of this user's own watchlist or portfolio ``name`` (a shared one is not theirs
    to share)."""
    found: list[str] = []
    for kind in (DocumentKind.WATCHLIST, DocumentKind.PORTFOLIO):
        try:
            doc_id = replica.resolve(kind, name)
        except DocumentNotFound:
            continue
        if "/" not in doc_id:
            found.append(doc_id)
    if not found:
        raise DocumentNotFound(f"you have no watchlist or portfolio {name!r}")
    if len(found) > 1:
        raise ConfigError(f"a watchlist and a portfolio are both called {name!r}: give its id")
    return found[0]


async def _share(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        server, token = _relay(args, replica)
        doc_id = _own_document(replica, args.name)
        name = replica.info(doc_id).name
    access = "read" if args.read_only else "write"
    body = {"doc": doc_id, "user": args.user, "access": access}
    await call_relay(server, token, "POST", "/v1/shares", body)
    print(f"shared {name} with {args.user}" + (" (read-only)" if args.read_only else ""))
    return 0


async def _unshare(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        server, token = _relay(args, replica)
        doc_id = _own_document(replica, args.name)
        name = replica.info(doc_id).name
    path = f"/v1/shares/{quote(doc_id, safe='')}/{quote(args.user, safe='')}"
    await call_relay(server, token, "DELETE", path)
    print(f"{name} is no longer shared with {args.user}")
    return 0


def _local_name(replica: Replica, doc_id: str) -> str:
    try:
        return replica.info(doc_id).name or doc_id
    except DocumentNotFound:
        return doc_id


async def _shares(args: argparse.Namespace) -> int:
    async with open_replica(args) as replica:
        server, token = _relay(args, replica)
        listing = await call_relay(server, token, "GET", "/v1/shares")
        mine = list(listing.get("shared_by_me", []))
        theirs = list(listing.get("shared_with_me", []))
        await remember_shares(replica, theirs)
        for share in mine:
            share["name"] = _local_name(replica, str(share.get("doc")))
        for share in theirs:
            share["name"] = _local_name(replica, str(share.get("id")))
    if args.json:
        print_json({"shared_by_me": mine, "shared_with_me": theirs})
        return 0
    print("I share:" if mine else "I share nothing")
    for share in mine:
        access = "read-only" if share.get("access") == "read" else "read-write"
        print(f"  {share['name']}  with {share.get('user')} ({access})")
    print("shared with me:" if theirs else "nothing is shared with me")
    for share in theirs:
        access = ", read-only" if share.get("access") == "read" else ""
        name = share["name"] if share["name"] != share.get("id") else "(not synced yet)"
        print(f"  {name} ({share.get('owner')}{access})  {share.get('id')}")
    return 0


async def _token_revoke(args: argparse.Namespace) -> int:
    server = args.server or os.environ.get("FOLIOSYNC_SERVER")
    token = args.token or os.environ.get("FOLIOSYNC_ADMIN_TOKEN")
    if not server:
        raise ConfigError(f"no relay given: use --server URL (e.g. {_EXAMPLE})")
    if not token:
        raise ConfigError("no admin token given: use --token (`foliosync token ops --scope admin`)")
    if bool(args.device) == bool(args.jti):
        raise ConfigError("name either a DEVICE or a token (--jti JTI)")
    body: dict[str, str] = {"jti": args.jti} if args.jti else {"device": args.device}
    if args.user:
        if args.jti:
            raise ConfigError("--user goes with a DEVICE, not with --jti")
        body["user"] = args.user
    answer = await call_relay(server, token, "POST", "/v1/revocations", body)
    what = f"token {args.jti}" if args.jti else f"device {args.device}"
    print(f"revoked {what}; {answer.get('closed', 0)} open connection(s) closed")
    return 0
