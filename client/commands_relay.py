"""`foliosync relay` runs the relay; `foliosync token` prints a token signed with its secret.

``foliosync relay [options]`` runs the relay, as it always has; ``foliosync relay backup DIR`` and
``foliosync relay restore DIR`` are optional sub-commands of the same parser. argparse gives an
option-only command optional sub-commands this way without changing how the options parse: the
first positional word picks the sub-command, and the relay takes none of its own.

``--extension module:factory`` (repeatable) adds an app's rules to the relay's defaults (see
:mod:`foliosync.server.extensions`): ``module`` is imported, and ``factory(config, secret)``
(the RelayConfig and the relay's signing secret) returns an Extension or a list of them,
appended after the defaults in the order given::

    # myrules.py
    def watchlist_cap(config, secret):
        return WatchlistCap(limit=500)

    foliosync relay --extension myrules:watchlist_cap
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import math
import os
import socket
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import platformdirs

from foliosync.sync.errors import ConfigError

if TYPE_CHECKING:
    from foliosync.server.extensions import Extension
    from foliosync.server.relay import RelayConfig

__all__ = ["default_data_dir", "load_extension", "register"]


def default_data_dir() -> Path:
    """$FOLIOSYNC_DATA, else relay/ in the platform's per-user data directory."""
    override = os.environ.get("FOLIOSYNC_DATA")
    if override:
        return Path(override).expanduser()
    return Path(platformdirs.user_data_dir("foliosync", appauthor=False)) / "relay"


def register(subparsers: Any) -> None:
    relay = subparsers.add_parser(
        "relay",
        help="run the relay",
        description="Run the relay. With no flags: 127.0.0.1:8765, SQLite and a secret in the "
        "data directory (created on first start). `relay backup DIR` copies its data while it "
        "runs; `relay restore DIR` puts a copy back while it is stopped.",
    )
    relay.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    relay.add_argument("--port", type=int, default=8765, help="port (default 8765)")
    relay.add_argument(
        "--data",
        metavar="DIR",
        help="data directory (default: $FOLIOSYNC_DATA or a per-user data directory)",
    )
    relay.add_argument(
        "--durability",
        choices=["normal", "full"],
        default="normal",
        help="normal: acknowledged updates survive a crash of the relay; full: "
        "also a power loss (an fsync per commit group)",
    )
    relay.add_argument(
        "--max-hot-documents",
        type=int,
        default=1000,
        metavar="N",
        help="documents kept in memory (default 1000)",
    )
    relay.add_argument(
        "--max-initial-syncs",
        type=int,
        default=32,
        metavar="N",
        help="documents synced at once after connects (default 32)",
    )
    relay.add_argument(
        "--feed",
        default="sim",
        metavar="SPEC",
        help="price source: sim (simulated prices in market hours, the default), sim:always "
        "(also outside them), csv:PATH[@SPEED] (replay a recorded file; @10 ten times faster, "
        "@max as fast as possible), or none (only what publishers send)",
    )
    relay.add_argument(
        "--cors-origin",
        action="append",
        metavar="ORIGIN",
        help="let browser pages from ORIGIN (e.g. https://dash.example.com) call the HTTP API; "
        "may be repeated (default: none, no cross-origin access)",
    )
    relay.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="also serve GET /metrics on 127.0.0.1:PORT, without a token (default: only "
        "/metrics on the main port, with an admin token)",
    )
    relay.add_argument(
        "--hook-timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long one extension's hook may take before the action is refused with "
        "extension_failed (default 5)",
    )
    relay.add_argument(
        "--extension",
        action="append",
        metavar="MODULE:FACTORY",
        help="add an app's extension: FACTORY(config, secret) in MODULE returns an Extension "
        "or a list of them, run after the defaults (tokens, owners, layouts); may be repeated",
    )
    relay.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="serve wss:// and https:// with this certificate chain (PEM); needs --tls-key",
    )
    relay.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    relay.add_argument(
        "--idle-timeout",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="close a connection that sent nothing, not even a ping, for this long (default "
        "120; 0: never)",
    )
    relay.add_argument(
        "--max-connections-per-user",
        type=int,
        default=100,
        metavar="N",
        help="connections one user may hold at once (default 100)",
    )
    relay.add_argument(
        "--max-documents-per-user",
        type=int,
        default=10_000,
        metavar="N",
        help="distinct documents the relay stores per user (default 10000)",
    )
    relay.add_argument(
        "--message-rate",
        type=float,
        default=1000.0,
        metavar="N",
        help="messages per second one connection may send in the long run (default 1000; "
        "bursts of 10000 pass, and 10 s over the rate ends the connection)",
    )
    relay.add_argument(
        "--max-refusals",
        type=int,
        default=100,
        metavar="N",
        help="refusals one connection may get within 10 s before it is closed as abusive "
        "(default 100; a change at fault counts 1, a refusal of a whole document 1/100)",
    )
    relay.add_argument(
        "--store",
        default=os.environ.get("FOLIOSYNC_STORE") or None,
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB to share documents between several relays "
        "(default: $FOLIOSYNC_STORE, else SQLite in the data directory)",
    )
    relay.add_argument(
        "--store-pool",
        type=int,
        default=10,
        metavar="N",
        help="connections to PostgreSQL, at most (default 10)",
    )
    relay.add_argument(
        "--redis",
        default=os.environ.get("FOLIOSYNC_REDIS") or None,
        metavar="URL",
        help="redis://HOST:PORT/DB: document changes and prices across several relays "
        "(default: $FOLIOSYNC_REDIS, else this relay alone); give it with --store",
    )
    relay.add_argument(
        "--relay-id",
        metavar="ID",
        help="this relay's name in a group, unique in it (default: HOST:PORT, with --redis)",
    )
    relay.add_argument(
        "--redis-prefix",
        default="foliosync:",
        metavar="PREFIX",
        help="prefix of the relay group's Redis keys (default foliosync:)",
    )
    relay.add_argument(
        "--reuse-port",
        action="store_true",
        help="let several relay processes listen on this port (SO_REUSEPORT): the kernel "
        "spreads connections over them; needs --store and --redis",
    )
    relay.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="start N relay processes sharing the port (implies --reuse-port; needs --store "
        "and --redis); default 1",
    )
    relay.add_argument(
        "--loop",
        choices=["asyncio", "uvloop"],
        default="asyncio",
        help="the event loop: asyncio (the default) or uvloop (pip install 'foliosync[fast]')",
    )
    relay.add_argument(
        "--fanout-flush-delay",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a change fanned out to many devices may wait for more to share one "
        "write (default 0.02; 0: none)",
    )
    relay.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    relay.add_argument(
        "--log-format",
        choices=["text", "json"],
        default="text",
        help="text (the default) or json: one JSON object per line with time, level, logger, "
        "message and the connection, user, device and document it concerns",
    )
    relay.set_defaults(handler=_relay)
    operations = relay.add_subparsers(
        dest="relay_command", metavar="[backup|restore]", title="operations", required=False
    )
    backup = operations.add_parser(
        "backup",
        help="copy the relay's data to the directory DIR, while the relay runs or not",
        description="Copy the relay's data directory to DIR: relay.db (the documents), shares.db "
        "(shares and token revocations), each a consistent snapshot taken while the relay runs, "
        "and secret.key (tokens are signed with it: keep DIR as safe as the data directory). "
        "DIR must be new, empty, or an earlier backup (which is replaced).",
    )
    backup.add_argument("dir", metavar="DIR", help="where to write the backup (a directory)")
    backup.add_argument(
        "--data", metavar="DIR", default=argparse.SUPPRESS, help="the relay's data directory"
    )
    backup.set_defaults(handler=_backup)
    restore = operations.add_parser(
        "restore",
        help="put a backup back into the data directory (the relay must be stopped)",
        description="Put BACKUP, a directory made by `foliosync relay backup` (or the relay.db "
        "file of an older backup), back into the data directory: documents, shares, token "
        "revocations and the secret. Refused while a relay runs on it. Each file it replaces is "
        "kept beside it as NAME.before-restore-TIMESTAMP; token revocations recorded since the "
        "backup are kept. Devices send what the backup lacks at their next sync.",
    )
    restore.add_argument("backup", metavar="BACKUP", help="the backup to restore")
    restore.add_argument(
        "--data", metavar="DIR", default=argparse.SUPPRESS, help="the relay's data directory"
    )
    restore.set_defaults(handler=_restore)

    token = subparsers.add_parser("token", help="print a token signed with the relay's secret")
    token.add_argument("user")
    token.add_argument("--data", metavar="DIR", help="the relay's data directory")
    token.add_argument("--device", help="the device the token is for (default: any)")
    token.add_argument(
        "--ttl",
        default="30d",
        metavar="DURATION",
        help="lifetime, e.g. 15m, 12h, 30d (default 30d)",
    )
    token.add_argument(
        "--scope",
        action="append",
        choices=["sync", "publish", "admin"],
        help="what the token allows (default: sync; admin: reading the relay's /metrics); "
        "may be repeated",
    )
    token.set_defaults(handler=_print_token)


def _data_dir(args: argparse.Namespace) -> Path:
    return Path(args.data).expanduser() if args.data else default_data_dir()


def _relay(args: argparse.Namespace) -> Any:
    """The relay's command: N worker processes with --workers, else this process's relay on
    the loop asked for (the coroutine returned is run by the CLI's asyncio.run)."""
    if args.store is not None and not str(args.store).startswith(("postgresql://", "postgres://")):
        raise ConfigError(
            f"invalid --store {args.store!r}: postgresql://USER@HOST:PORT/DB (or none for SQLite)"
        )
    if args.store_pool < 1:
        raise ConfigError(f"invalid --store-pool {args.store_pool}: at least 1")
    if args.workers < 1:
        raise ConfigError(f"invalid --workers {args.workers}: at least 1")
    if (args.reuse_port or args.workers > 1) and not (args.store and args.redis):
        raise ConfigError(
            "several relays on one port need a shared store and bus: "
            "give --store postgresql://... and --redis redis://..."
        )
    if args.workers > 1:
        return _run_workers(args)
    if args.loop == "uvloop":
        try:
            import uvloop
        except ImportError as exc:
            raise ConfigError("--loop uvloop needs pip install 'foliosync[fast]'") from exc
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return _run_relay(args)


def _run_workers(args: argparse.Namespace) -> int:
    """N relay processes on one port (SO_REUSEPORT), each its own relay id; stops them all on
    SIGINT/SIGTERM or when one of them exits (the others are then stopped too)."""
    import signal
    import subprocess
    import sys
    import time

    argv = sys.argv[1:] if sys.argv[1:2] == ["relay"] else ["relay"]
    base: list[str] = []
    skip = False
    for word in argv:  # this command's words, without --workers and --relay-id
        if skip:
            skip = False
            continue
        if word in ("--workers", "--relay-id"):
            skip = True
            continue
        if word.startswith(("--workers=", "--relay-id=")):
            continue
        base.append(word)
    prefix = args.relay_id or f"{socket.gethostname()}:{args.port}"
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "foliosync.client.cli",
                *base,
                "--reuse-port",
                "--relay-id",
                f"{prefix}/{n}",
            ]
        )
        for n in range(1, args.workers + 1)
    ]
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    failed = [c.returncode for c in children if c.returncode not in (0, -signal.SIGTERM)]
    return 1 if failed and not stopping else 0


async def _run_relay(args: argparse.Namespace) -> int:
    from foliosync.server.auth import load_or_create_secret
    from foliosync.server.data_lock import DataDirLocked
    from foliosync.server.logs import configure_logging
    from foliosync.server.relay import RelayConfig
    from foliosync.server.serve import serve, tls_server_context
    from foliosync.sync.protocol.limits import MessageRate, RefusalLimit

    if not 0 < args.port < 65536:
        raise ConfigError(f"invalid port {args.port}")
    if args.metrics_port is not None and not 0 < args.metrics_port < 65536:
        raise ConfigError(f"invalid metrics port {args.metrics_port}")
    if args.max_hot_documents < 1 or args.max_initial_syncs < 1:
        raise ConfigError("--max-hot-documents and --max-initial-syncs must be at least 1")
    if not math.isfinite(args.hook_timeout) or args.hook_timeout <= 0:
        raise ConfigError(f"invalid --hook-timeout {args.hook_timeout}: more than 0 seconds")
    if args.max_refusals < 1:
        raise ConfigError(f"invalid --max-refusals {args.max_refusals}: at least 1")
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together: give both, or neither")
    tls = None if args.tls_cert is None else tls_server_context(args.tls_cert, args.tls_key)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        raise ConfigError(f"unknown log level {args.log_level!r}")
    data_dir = _data_dir(args)
    relay_id = args.relay_id or (
        (
            f"{socket.gethostname()}:{args.port}"
            + (f":{os.getpid()}" if args.reuse_port else "")  # one port, several processes
        )
        if args.redis
        else "relay-1"
    )
    # Before anything logs: every line is redacted of tokens and of this relay's secret.
    secret = load_or_create_secret(data_dir)
    configure_logging(level, args.log_format, secrets=[secret])
    config = RelayConfig(
        host=args.host,
        port=args.port,
        data_dir=data_dir,
        durability=args.durability,
        max_hot_documents=args.max_hot_documents,
        max_initial_syncs=args.max_initial_syncs,
        feed=args.feed,
        cors_origins=tuple(args.cors_origin or ()),
        metrics_port=args.metrics_port,
        hook_timeout=args.hook_timeout,
        idle_timeout=args.idle_timeout,
        max_connections_per_user=args.max_connections_per_user,
        max_documents_per_user=args.max_documents_per_user,
        message_rate=MessageRate(rate=args.message_rate),
        refusal_limit=RefusalLimit(count=args.max_refusals),
        relay_id=relay_id,
        store_url=args.store,
        store_pool=args.store_pool,
        redis_url=args.redis,
        redis_prefix=args.redis_prefix,
        **(
            {}
            if args.fanout_flush_delay is None
            else {"fanout_flush_delay": args.fanout_flush_delay}
        ),
    )
    extensions = None
    if args.extension:
        from foliosync.server.extensions import default_extensions

        extensions = [*default_extensions(secret, config.schema_limits)]
        for spec in args.extension:
            extensions.extend(load_extension(spec, config, secret))
    host = f"[{args.host}]" if ":" in args.host else args.host

    if args.store:
        from urllib.parse import urlsplit

        place = urlsplit(args.store)
        where = f"documents in PostgreSQL at {place.hostname}:{place.port or 5432}{place.path}"
        where += f", secret in {data_dir}"
    else:
        where = f"data in {data_dir}"
    if args.redis:
        where += f", relay {relay_id} of the group on Redis"

    def listening() -> None:  # only once bound: a script may connect as soon as it reads this
        ws, http = ("wss", "https") if tls is not None else ("ws", "http")
        print(f"foliosync relay on {ws}://{host}:{args.port}/ws, {where}", flush=True)
        if tls is not None:
            print(f"HTTP API on {http}://{host}:{args.port}/", flush=True)
        if args.metrics_port is not None:
            print(f"metrics on http://127.0.0.1:{args.metrics_port}/metrics", flush=True)

    try:  # the relay locks its data directory: a second one, or a restore under it, is refused
        await serve(
            config,
            on_listening=listening,
            extensions=extensions,
            tls=tls,
            reuse_port=args.reuse_port,
        )
    except DataDirLocked as exc:
        raise DataDirLocked(f"{exc}: stop it or give this one another --data") from None
    return 0


def load_extension(spec: str, config: RelayConfig, secret: bytes) -> list[Extension]:
    """The extensions ``module:factory`` makes; ConfigError, saying which part failed, if it
    cannot be imported or called or returns something else."""
    from foliosync.server.extensions import Extension

    module_name, colon, factory_name = spec.partition(":")
    if not colon or not module_name or not factory_name:
        raise ConfigError(f"invalid --extension {spec!r}: use MODULE:FACTORY")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--extension {spec}: cannot import {module_name}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise ConfigError(f"--extension {spec}: {module_name} has no callable {factory_name}")
    try:
        made = factory(config, secret)
    except Exception as exc:
        raise ConfigError(
            f"--extension {spec}: {factory_name}(config, secret) failed: {exc}"
        ) from exc
    made = made if isinstance(made, list | tuple) else [made]
    for extension in made:
        if not isinstance(extension, Extension):
            raise ConfigError(f"--extension {spec}: {extension!r} is not an Extension")
    return list(made)


def _refuse_shared_store(args: argparse.Namespace, what: str) -> None:
    if getattr(args, "store", None) or os.environ.get("FOLIOSYNC_STORE"):
        raise ConfigError(
            f"relay {what} works on the SQLite store; documents in PostgreSQL: use pg_dump "
            "and pg_restore"
        )


def _backup(args: argparse.Namespace) -> int:
    from foliosync.server.backup import backup_store

    _refuse_shared_store(args, "backup")
    target = Path(args.dir).expanduser()
    data_dir = _data_dir(args)
    summary = backup_store(data_dir, target)
    print(f"backed up {data_dir} to {target} ({summary})")
    if not summary.secret:
        print(f"{data_dir} has no secret.key yet: the backup holds none", file=sys.stderr)
    return 0


def _restore(args: argparse.Namespace) -> int:
    from foliosync.server.backup import restore_store

    _refuse_shared_store(args, "restore")
    data_dir = _data_dir(args)
    restored = restore_store(data_dir, Path(args.backup).expanduser())
    print(f"restored {args.backup} into {data_dir} ({restored.summary})")
    if restored.shares is not None:
        print(f"shares: {restored.shares}")
    if restored.carried_revocations:
        print(f"kept {restored.carried_revocations} token revocations recorded since the backup")
    for path in restored.kept_aside:
        print(f"the {path.name.partition('.before-restore-')[0]} it replaced is kept as {path}")
    for warning in restored.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def _print_token(args: argparse.Namespace) -> int:
    from foliosync.server.auth import issue_token, load_or_create_secret, parse_duration

    secret = load_or_create_secret(_data_dir(args))
    scopes = frozenset(args.scope or ["sync"])
    print(
        issue_token(
            secret,
            args.user,
            device=args.device,
            ttl_seconds=parse_duration(args.ttl),
            scopes=scopes,
        )
    )
    return 0
