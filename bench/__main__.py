"""Run benchmarks and print their tables: ``python -m bench [NAME ...] [--quick] [--json PATH]``.

A benchmark is a module with ``run(quick: bool) -> list[Table]`` (plain or ``async``); add it to
BENCHMARKS below to make it runnable by name.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import os
import platform
import sqlite3
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.table import Table

# name -> module; one line per benchmark.
BENCHMARKS: dict[str, str] = {
    "replica": "bench.replica",
    "relay": "bench.relay",
    "devices": "bench.devices",
    "prices": "bench.prices",
    "app": "bench.app",
}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> dict[str, Any]:
    try:
        pycrdt_version = version("pycrdt")
    except PackageNotFoundError:
        pycrdt_version = "not installed"
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count() or 0,
        "python": platform.python_version(),
        "pycrdt": pycrdt_version,
        "sqlite": sqlite3.sqlite_version,
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, "
        f"pycrdt {info['pycrdt']}, SQLite {info['sqlite']}; {info['date']}"
    )


def run_benchmark(name: str, quick: bool) -> list[Table]:
    module = importlib.import_module(BENCHMARKS[name])
    run = module.run
    tables = asyncio.run(run(quick)) if inspect.iscoroutinefunction(run) else run(quick)
    return list(tables)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Run foliosync benchmarks and print their tables."
    )
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument("--quick", action="store_true", help="~10x smaller sizes: a smoke run")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write raw results here")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = list(dict.fromkeys(args.names)) or list(BENCHMARKS)
    info = machine_info()
    line = machine_line(info)
    results: dict[str, Any] = {"machine": info, "quick": args.quick, "benchmarks": {}}
    for name in names:
        started = time.perf_counter()
        tables = run_benchmark(name, args.quick)
        elapsed = time.perf_counter() - started
        for table in tables:
            print(table.render(line))
            print()
        print(f"[{name}: {elapsed:.1f} s]")
        print()
        sys.stdout.flush()
        results["benchmarks"][name] = {
            "seconds": round(elapsed, 3),
            "tables": [t.to_json() for t in tables],
        }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
