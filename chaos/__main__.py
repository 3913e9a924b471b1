"""``python -m chaos [--cycles N] [--relays 1|2] [--devices N] [--seed S] [--seconds T]``.

Prints a table of the run's figures, then every violation the oracle found, each with the
command that replays it. The exit status is 1 when there is any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from chaos.harness import ChaosConfig, render_table, run_chaos


def parse_args(argv: list[str] | None) -> ChaosConfig:
    parser = argparse.ArgumentParser(prog="python -m chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=10, help="relay kill-and-restart cycles")
    parser.add_argument("--relays", type=int, choices=(1, 2), default=1)
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=30.0, help="relay up-time over all cycles")
    parser.add_argument("--faults-per-second", type=float, default=2.0)
    parser.add_argument("--device-kill-chance", type=float, default=0.3, help="per cycle")
    parser.add_argument("--settle-timeout", type=float, default=60.0)
    parser.add_argument("--workdir", type=Path, help="keep replicas, journals and logs here")
    args = parser.parse_args(argv)
    try:
        return ChaosConfig(
            cycles=args.cycles,
            relays=args.relays,
            devices=args.devices,
            seed=args.seed,
            seconds=args.seconds,
            faults_per_second=args.faults_per_second,
            device_kill_chance=args.device_kill_chance,
            settle_timeout=args.settle_timeout,
            workdir=args.workdir,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        report = asyncio.run(run_chaos(config))
    except RuntimeError as exc:
        print(f"chaos: {exc}", file=sys.stderr)
        return 2
    print(render_table(report))
    for violation in report.violations:
        print(f"VIOLATION: {violation}")
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
