"""``python -m fuzz [--target T] [--frames N] [--seconds S] [--seed X] [--replay FILE]``.

By default a million inputs across the three targets (frames 45 %, updates 45 %, relay 10 %:
the live relay costs a WebSocket round trip where the pure targets cost microseconds). Every
loop stops by itself, at its count or at its share of ``--seconds``. The exit status is 1 when
anything was found.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from pathlib import Path

from fuzz.engine import DEFAULT_HANG_MS, Result, make_check, render_table, run_pure
from fuzz.targets import PURE_TARGETS, UpdateTarget

TARGETS = ("frames", "updates", "relay")
_SHARES = {"frames": 0.45, "updates": 0.45, "relay": 0.10}


def _engine() -> str:
    try:
        import atheris  # noqa: F401
    except ImportError:
        return "builtin"
    return "atheris"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", choices=TARGETS, help="repeatable")
    parser.add_argument("--frames", type=int, default=1_000_000, help="inputs across targets")
    parser.add_argument("--seconds", type=float, help="stop each target at its share of this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    parser.add_argument("--hang-ms", type=float, default=DEFAULT_HANG_MS)
    parser.add_argument("--connections", type=int, default=4, help="hostile relay connections")
    parser.add_argument(
        "--engine",
        choices=("auto", "atheris", "builtin"),
        default="auto",
        help="atheris (coverage-guided, when installed) or the built-in mutator alone",
    )
    parser.add_argument(
        "--update-check",
        choices=("auto", "module", "pycrdt"),
        default="auto",
        help="updates target: foliosync.sync.updates.check_update once committed (auto), "
        "always (module), or pycrdt's guarded apply_update alone",
    )
    parser.add_argument("--replay", type=Path, metavar="FILE", help="run one saved input again")
    args = parser.parse_args(argv)
    if args.frames < 1:
        parser.error("--frames must be at least 1")
    return args


def replay(path: Path, update_check: str) -> int:
    """Run one saved input again; 1 if it still fails."""
    target = path.name.split("-", 1)[0]
    if target == "relay":
        from fuzz.relay import replay_relay

        print(asyncio.run(replay_relay(path)))
        return 0
    if target not in PURE_TARGETS:
        print(f"{path.name}: not a saved input of a known target", file=sys.stderr)
        return 2
    check = make_check(target, update_check)
    try:
        check(path.read_bytes())
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        traceback.print_exception(exc)
        return 1
    print(f"{path.name}: passes")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replay is not None:
        return replay(args.replay, args.update_check)
    targets = list(dict.fromkeys(args.target or TARGETS))
    total = sum(_SHARES[t] for t in targets)
    engine = _engine() if args.engine == "auto" else args.engine
    results: list[Result] = []
    for target in targets:
        share = _SHARES[target] / total
        count = max(1, round(args.frames * share))
        seconds = None if args.seconds is None else args.seconds * share
        if target == "relay":
            from fuzz.relay import run_relay

            result = asyncio.run(
                run_relay(
                    count,
                    seconds=seconds,
                    seed=args.seed,
                    crash_dir=args.crash_dir,
                    connections=args.connections,
                )
            )
        elif engine == "atheris":
            from fuzz.atheris_run import run_atheris

            result = run_atheris(
                target,
                count,
                seconds=seconds,
                seed=args.seed,
                crash_dir=args.crash_dir,
                hang_ms=args.hang_ms,
                update_check=args.update_check,
            )
        else:
            result = run_pure(
                target,
                count,
                seconds=seconds,
                seed=args.seed,
                crash_dir=args.crash_dir,
                hang_ms=args.hang_ms,
                update_check=args.update_check,
            )
        if target == "updates":
            result.notes.insert(0, f"check: {UpdateTarget(args.update_check).description}")
        results.append(result)
        print(render_table([result]), flush=True)
        print(flush=True)
    print(render_table(results))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
