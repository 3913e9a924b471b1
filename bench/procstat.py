"""What the benchmarks read of the machine: free ports, and CPU time from /proc (Linux)."""

from __future__ import annotations

import os
import socket

__all__ = ["free_port", "machine_busy_s", "proc_cpu_s"]


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (benchmarks only ever use loopback)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proc_cpu_s(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        data = stat.read()
    fields = data[data.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot, to see load from outside the benchmark."""
    with open("/proc/stat", encoding="ascii") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")
