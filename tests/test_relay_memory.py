"""The relay hands the memory it freed back to the system (glibc keeps it otherwise)."""

from __future__ import annotations

import sys

import pytest

from foliosync.server.memory import release_free_memory


def rss_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_memory_goes_back_to_the_system() -> None:
    # Many blocks of a few KiB, the size of frames; seven in eight freed, so that the heap
    # cannot shrink from its top: only trimming returns the pages in between.
    blocks = [bytes(4000) + bytes([i % 256]) for i in range(40_000)]  # about 160 MB
    survivors = blocks[::8]
    del blocks
    before = rss_kib()
    assert release_free_memory() is True
    after = rss_kib()
    assert before - after > 70_000, (before, after)  # most of the ~140 MB freed
    assert len(survivors) == 5_000
