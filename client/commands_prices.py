"""`foliosync publish`: send recorded or piped price ticks to a relay's ``POST /v1/ticks``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit, urlunsplit

from foliosync.sync.errors import AuthError, ConfigError, ConnectionLost, FolioSyncError

__all__ = ["http_base_url", "register"]

DEFAULT_BATCH = 1000
MAX_BATCH = 10000  # the relay's limit per request


def register(subparsers: Any) -> None:
    publish = subparsers.add_parser(
        "publish",
        help="publish price ticks to a relay",
        description="Read ticks as CSV rows timestamp,symbol,price[,size] (timestamp in epoch "
        "milliseconds or ISO 8601 with an offset; an optional header row names the columns) and "
        "post them to the relay in batches. Exit status 0 if the relay accepted every tick, 1 if "
        "any was refused or on error.",
    )
    publish.add_argument(
        "--csv", metavar="PATH", default="-", help="the ticks file (default: standard input)"
    )
    publish.add_argument(
        "--server",
        metavar="URL",
        help="the relay: http(s)://HOST:PORT or its WebSocket URL ws(s)://HOST:PORT/ws "
        "(default: $FOLIOSYNC_SERVER)",
    )
    publish.add_argument(
        "--token",
        metavar="TOKEN",
        help="a token with the publish scope (default: $FOLIOSYNC_TOKEN); see foliosync token "
        "--scope publish",
    )
    publish.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        metavar="N",
        help=f"ticks per request (default {DEFAULT_BATCH}, at most {MAX_BATCH})",
    )
    publish.set_defaults(handler=_publish)


def http_base_url(server: str) -> str:
    """The relay's HTTP base URL from an http(s) URL or its ws(s)://HOST:PORT/ws address."""
    parts = urlsplit(server.strip())
    scheme = {"http": "http", "https": "https", "ws": "http", "wss": "https"}.get(
        parts.scheme.lower()
    )
    if scheme is None or not parts.netloc:
        raise ConfigError(
            f"invalid relay URL {server!r}: use http://HOST:PORT or ws://HOST:PORT/ws"
        )
    path = parts.path.rstrip("/")
    if parts.scheme.lower() in ("ws", "wss") and path.endswith("/ws"):
        path = path[: -len("/ws")]
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _settings(args: argparse.Namespace) -> tuple[str, str]:
    server = args.server or os.environ.get("FOLIOSYNC_SERVER")
    if not server:
        raise ConfigError("give the relay with --server URL or $FOLIOSYNC_SERVER")
    token = args.token or os.environ.get("FOLIOSYNC_TOKEN")
    if not token:
        raise ConfigError("give a token with --token or $FOLIOSYNC_TOKEN (scope publish)")
    if not 1 <= args.batch <= MAX_BATCH:
        raise ConfigError(f"--batch must be between 1 and {MAX_BATCH}")
    return http_base_url(server), token


def _batches(
    lines: Iterable[str], size: int, bad: list[tuple[int, str]]
) -> Iterable[list[tuple[int, list[object]]]]:
    from foliosync.server.feeds import read_tick_rows

    batch: list[tuple[int, list[object]]] = []
    for line, row in read_tick_rows(lines):
        if isinstance(row, str):
            bad.append((line, row))
            continue
        batch.append((line, row.to_raw()))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def _post(http: Any, url: str, token: str, ticks: list[list[object]]) -> dict[str, Any]:
    import aiohttp

    try:
        async with http.post(
            url, json={"ticks": ticks}, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            text = await response.text()
            try:
                answer = json.loads(text)
            except ValueError:
                answer = None
            if response.status != 200 or not isinstance(answer, dict):
                reason = answer.get("error") if isinstance(answer, dict) else text[:200]
                error = AuthError if response.status in (401, 403) else ConnectionLost
                raise error(f"the relay answered {response.status}: {reason}")
            return answer
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ConnectionLost(
            f"cannot reach the relay at {url}: {exc or type(exc).__name__}"
        ) from exc


class _Tally:
    def __init__(self) -> None:
        self.accepted = 0
        self.bad: list[tuple[int, str]] = []

    def report(self) -> None:
        for line, reason in sorted(self.bad):
            print(f"line {line}: {reason}", file=sys.stderr)


async def _send(source: TextIO, url: str, token: str, size: int, tally: _Tally) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=60, connect=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for batch in _batches(source, size, tally.bad):
            answer = await _post(http, url, token, [raw for _, raw in batch])
            tally.accepted += int(answer.get("accepted", 0))
            for item in answer.get("rejected", ()):
                index, reason = item.get("index"), item.get("reason", "refused")
                line = batch[index][0] if isinstance(index, int) and 0 <= index < len(batch) else 0
                tally.bad.append((line, str(reason)))


async def _publish(args: argparse.Namespace) -> int:
    base, token = _settings(args)
    url = f"{base}/v1/ticks"
    tally = _Tally()
    try:
        if args.csv == "-":
            await _send(sys.stdin, url, token, args.batch, tally)
        else:
            path = Path(args.csv).expanduser()
            try:
                source = path.open(encoding="utf-8-sig", newline="")
            except OSError as exc:
                raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
            with source:
                await _send(source, url, token, args.batch, tally)
    except FolioSyncError:
        if tally.accepted or tally.bad:
            tally.report()
            print(
                f"before the error: accepted {tally.accepted}, rejected {len(tally.bad)}",
                file=sys.stderr,
            )
        raise
    tally.report()
    print(f"accepted {tally.accepted}, rejected {len(tally.bad)}")
    return 0 if not tally.bad else 1
