"""Giving the memory a relay freed back to the system, and collecting its garbage seldom enough.

A relay allocates and frees many short-lived buffers of a few KiB (frames, socket writes). glibc's
allocator keeps freed pages inside its heap while live allocations sit above them, so the relay's
resident size creeps up by some MiB over minutes while its live objects stay the same: measured at
the price benchmark's nominal load, 94 -> 103 MiB over ten minutes with a constant number of
objects, and each ``malloc_trim(0)`` gave 2-4 MiB back. Trimming once a minute keeps the resident
size an honest measure of what the relay holds. Where there is no glibc (musl, macOS) this does
nothing.

Python's cycle collector examines its youngest generation every 700 container objects allocated
beyond those freed, and whatever is alive then moves on. A relay allocates short-lived containers
by the hundred thousand a second (frames, batches, events) and holds hundreds of thousands of
long-lived ones (connections, documents, prices): at 700, enough of the short-lived ones were
alive at each young collection to be promoted, and a full collection followed every 3 s, 65 ms of
a stopped loop at 1,000 connections (the price fan-out's p99 went from 18 to 60-70 ms). Collected
every 10,000, nearly all of them are gone by then: no full collection in a 40 s run at that load.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import gc
import logging
import sys
import time
from collections.abc import Callable

__all__ = ["collect_young_every", "release_free_memory", "trim_memory_every"]

log = logging.getLogger("foliosync.relay")


def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_TRIM = _malloc_trim()


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the system; False where that is not possible."""
    if _TRIM is None:
        return False
    _TRIM(0)
    return True


async def trim_memory_every(seconds: float) -> None:
    """Run :func:`release_free_memory` every ``seconds`` until cancelled."""
    if _TRIM is None:
        return
    while True:
        await asyncio.sleep(seconds)
        started = time.perf_counter()
        release_free_memory()
        log.debug("memory trimmed in %.1f ms", 1000 * (time.perf_counter() - started))


_young_thresholds: list[int] = []  # asked for by the relays running in this process
_interpreter_thresholds: tuple[int, ...] = gc.get_threshold()


def collect_young_every(allocations: int) -> Callable[[], None]:
    """Collect the youngest generation every ``allocations`` net container allocations until
    the function returned is called. Process-wide: while several relays run in one process the
    largest of their settings holds, and the interpreter's comes back once the last has stopped
    (not when the first does)."""
    global _interpreter_thresholds
    if not _young_thresholds:
        _interpreter_thresholds = gc.get_threshold()
    _young_thresholds.append(allocations)
    gc.set_threshold(max(_young_thresholds), *_interpreter_thresholds[1:])

    def release() -> None:
        _young_thresholds.remove(allocations)
        if _young_thresholds:
            gc.set_threshold(max(_young_thresholds), *_interpreter_thresholds[1:])
        else:
            gc.set_threshold(*_interpreter_thresholds)

    return release
