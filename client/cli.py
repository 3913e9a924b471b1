"""The ``foliosync`` command line: parsing, dispatch and error reporting.

Each group of commands lives in its own ``commands_*`` module with a ``register(subparsers)``
function; this module only wires them together, so that every command reports errors the same
way: a one-line message on stderr and a non-zero exit code, never a traceback; and so that output
piped to a reader that stops early (``| head``) ends every command quietly, as in other Unix tools.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from foliosync import __version__
from foliosync.sync.errors import FolioSyncError

__all__ = [
    "EXIT_ERROR",
    "EXIT_INTERNAL",
    "EXIT_PIPE_CLOSED",
    "EXIT_USAGE",
    "build_parser",
    "main",
]

EXIT_ERROR = 1
EXIT_INTERNAL = 70  # EX_SOFTWARE
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE: see main()
EXIT_USAGE = 2


def _registrars() -> list[Callable[[Any], None]]:
    # Imported here so that `foliosync --help` stays fast and a broken optional group
    # cannot stop the others from loading.
    from foliosync.client import (
        commands_app,
        commands_documents,
        commands_market,
        commands_prices,
        commands_quotes,
        commands_relay,
        commands_sharing,
        commands_sync,
    )

    registrars: list[Callable[[Any], None]] = [
        commands_documents.register,
        commands_market.register,
        commands_sync.register,
        commands_quotes.register,
        commands_prices.register,
        commands_relay.register,
        commands_sharing.register,
        commands_app.register,
    ]
    return registrars


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="foliosync",
        description="Offline-first watchlists and portfolios, synced through a foliosync relay.",
    )
    parser.add_argument("--version", action="version", version=f"foliosync {__version__}")
    parser.add_argument(
        "--db",
        metavar="PATH",
        help="the local replica file (default: $FOLIOSYNC_DB, else a per-user data directory)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in _registrars():
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            return _run(argv)
        finally:
            # What is still buffered goes now, so that a closed pipe shows here and not in the
            # interpreter's exit (short outputs are all still buffered when a command returns).
            sys.stdout.flush()
    except BrokenPipeError:
        # Whoever reads our output stopped early (`foliosync ... | head -1`). Like any Unix tool
        # killed by SIGPIPE: no message, and the status a shell shows for that, 128 + SIGPIPE,
        # as `yes | head` gives. Not 0: the output was cut short, and a script with
        # `set -o pipefail` should see that just as it does for cat, grep or yes.
        _silence_stdout()
        return EXIT_PIPE_CLOSED


def _silence_stdout() -> None:
    """Point stdout at /dev/null: what is still buffered would fail again at exit, and Python
    would then print "Exception ignored ... BrokenPipeError" and exit 120."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _spelled(argv: Sequence[str]) -> list[str]:
    """``token revoke ...`` is ``token-revoke ...``: ``token USER`` takes its user positionally,
    so ``revoke`` could not be one of its sub-commands (a user called "revoke" mints with
    ``foliosync token -- revoke``)."""
    if list(argv[:2]) == ["token", "revoke"]:
        return ["token-revoke", *argv[2:]]
    return list(argv)


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    argv = _spelled(argv if argv is not None else sys.argv[1:])
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:  # a group given without its sub-command
        parser.parse_args([*argv, "--help"])
        return EXIT_USAGE
    try:
        result = handler(args)
        if inspect.iscoroutine(result):
            result = asyncio.run(result)
    except BrokenPipeError:  # not a bug: handled in main()
        raise
    except FolioSyncError as exc:
        print(f"foliosync: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: still one clear line, the traceback on request
        if os.environ.get("FOLIOSYNC_DEBUG"):
            raise
        print(
            f"foliosync: internal error: {type(exc).__name__}: {exc} "
            "(set FOLIOSYNC_DEBUG=1 for details)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
