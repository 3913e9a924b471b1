"""A fixed CPU budget for one process (a Linux cgroup's CPU quota), for measuring how relays scale.

On a machine with as many cores as relays, the load and the services beside them take part of
those cores, so two relays cannot show what a second core buys. Giving each relay the same budget
(say 0.4 of a core) makes each relay, not the machine, the limit: one relay holds what 0.4 of a
core holds, two relays what 2 x 0.4 holds, and the rest of the machine is left to the load,
PostgreSQL and Redis. The quota's period is short (10 ms), so that a relay that used its share is
paused for a few milliseconds, not for most of a 100 ms period, and latency stays comparable.

cgroup v2 (``cpu.max``) and v1 (``cpu.cfs_quota_us``) are both handled; where neither can be
written (no permission, no cpu controller), :func:`cpu_budget` raises :class:`BudgetUnavailable`
with the reason, and the benchmark says so instead of reporting unbudgeted figures as budgeted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["BudgetUnavailable", "check_budget", "cpu_budget", "throttled_s"]

CGROUP = Path("/sys/fs/cgroup")
PERIOD_US = 10_000


class BudgetUnavailable(RuntimeError):
    """No cgroup could be made to hold a process to a CPU quota on this machine."""


def _v2_root() -> Path | None:
    controllers = CGROUP / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return CGROUP
    return None


def _v1_root() -> Path | None:
    for name in ("cpu", "cpu,cpuacct"):
        root = CGROUP / name
        if (root / "cpu.cfs_quota_us").exists():
            return root
    return None


def _make_group(name: str, cores: float) -> Path:
    quota = max(1000, round(cores * PERIOD_US))
    root = _v2_root()
    if root is not None:
        with contextlib.suppress(OSError):
            (root / "cgroup.subtree_control").write_text("+cpu")
        group = root / name
        group.mkdir(exist_ok=True)
        (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        return group
    root = _v1_root()
    if root is None:
        raise BudgetUnavailable("no cgroup cpu controller under /sys/fs/cgroup")
    group = root / name
    group.mkdir(exist_ok=True)
    (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
    (group / "cpu.cfs_quota_us").write_text(str(quota))
    return group


def throttled_s(group: Path) -> float:
    """Seconds the group's processes waited because they had used their quota."""
    for line in (group / "cpu.stat").read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "throttled_usec":  # v2
            return int(value) / 1e6
        if key == "throttled_time":  # v1, in nanoseconds
            return int(value) / 1e9
    return 0.0


def check_budget() -> None:
    """Raise :class:`BudgetUnavailable` if no quota can be set here: a group is made and removed,
    with no process moved into it."""
    try:
        group = _make_group(f"foliosync-bench-probe-{os.getpid()}", 1.0)
    except OSError as exc:
        raise BudgetUnavailable(f"cannot set a CPU quota ({exc})") from exc
    with contextlib.suppress(OSError):
        group.rmdir()


@contextlib.contextmanager
def cpu_budget(pid: int, cores: float, name: str) -> Iterator[Path]:
    """Hold process ``pid`` (and the threads it has) to ``cores`` of a core while the block runs;
    yields the cgroup's directory. The process is moved back to the root group afterwards (if it
    still runs) and the group removed."""
    group_name = f"foliosync-bench-{name}-{os.getpid()}"
    try:
        group = _make_group(group_name, cores)
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        raise BudgetUnavailable(f"cannot set a CPU quota ({exc})") from exc
    try:
        yield group
    finally:
        with contextlib.suppress(OSError):
            for task in (group / "cgroup.procs").read_text().split():
                (group.parent / "cgroup.procs").write_text(task)
        with contextlib.suppress(OSError):
            group.rmdir()
