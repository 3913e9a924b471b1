"""Running a target: inputs in, findings saved, a bounded loop, one result row.

A finding is saved as the input's bytes (``TARGET-KIND-HASH.bin``) beside a text file with its
traceback, so that ``python -m fuzz --replay FILE`` runs that one input again. Findings of one
signature (exception type and where it was raised) are all counted, the first few saved.

An input's time is the CPU time of the thread that runs it, not the clock on the wall: on a
machine whose other processes keep both cores busy, an input of a fifth of a millisecond waited
over ten for its turn, three times in a row. One slower than the hang limit is timed again twice
and counts as a hang only if it is still slower every time: a garbage collection is not the
input's fault either.
"""

from __future__ import annotations

import hashlib
import random
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fuzz.corpus import crdt_updates, frame_seeds
from fuzz.mutate import Mutator
from fuzz.targets import PURE_TARGETS, UpdateTarget

__all__ = [
    "DEFAULT_HANG_MS",
    "Recorder",
    "Result",
    "check_notes",
    "make_check",
    "render_table",
    "run_pure",
    "seeds_for",
]

DEFAULT_HANG_MS = 10.0
"""An input of a pure target that takes longer than this (three times in a row) is a hang."""
_SAVED_PER_SIGNATURE = 3


@dataclass(slots=True)
class Result:
    """One target's row of the table, and what it found."""

    target: str
    tried: int = 0
    crashes: int = 0
    hangs: int = 0
    slowest_ms: float = 0.0
    seconds: float = 0.0
    engine: str = "builtin"
    saved: list[Path] = field(default_factory=list)
    signatures: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.crashes and not self.hangs


def make_check(target: str, update_check: str = "auto") -> Callable[[bytes], None]:
    """The function that checks one input of a pure target."""
    if target == "updates":
        return UpdateTarget(update_check)
    return PURE_TARGETS[target]()


def seeds_for(target: str) -> list[bytes]:
    """The valid inputs a target's mutations start from."""
    return crdt_updates() if target == "updates" else frame_seeds()


def _signature(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    first_line = (str(exc).splitlines() or [""])[0][:80]
    if isinstance(exc, AssertionError):  # an invariant: its message says which
        return f"AssertionError: {first_line} ({where})"
    return f"{type(exc).__name__} at {where}"


class Recorder:
    """Runs one input of a target, times it and saves what it finds into ``result``."""

    def __init__(
        self,
        result: Result,
        check: Callable[[bytes], None],
        crash_dir: Path,
        hang_ms: float = DEFAULT_HANG_MS,
    ) -> None:
        self.result = result
        self.check = check
        self.crash_dir = crash_dir
        self.hang_ms = hang_ms

    def _timed(self, data: bytes) -> tuple[float, BaseException | None]:
        """The input's own time in ms (its thread's CPU time), and what it raised."""
        started = time.thread_time()
        try:
            self.check(data)
        except BaseException as exc:  # pycrdt's Rust panics derive from BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            return (time.thread_time() - started) * 1000, exc
        return (time.thread_time() - started) * 1000, None

    def run_one(self, data: bytes) -> None:
        result = self.result
        result.tried += 1
        elapsed, exc = self._timed(data)
        if elapsed > self.hang_ms:  # a garbage collection, say: the input's time is its least
            elapsed = min(elapsed, self._timed(data)[0], self._timed(data)[0])
        if elapsed > self.hang_ms:
            result.hangs += 1
            self.save(data, "hang", f"{elapsed:.1f} ms (limit {self.hang_ms} ms)")
        result.slowest_ms = max(result.slowest_ms, elapsed)
        if exc is not None:
            result.crashes += 1
            text = "".join(traceback.format_exception(exc))
            self.save(data, "crash", text, _signature(exc))

    def save(self, data: bytes, kind: str, text: str, signature: str | None = None) -> None:
        """Keep ``data`` for replay, unless enough inputs of its signature are kept already."""
        key = signature or f"{kind} ({self.result.target})"
        self.result.signatures[key] += 1
        if self.result.signatures[key] > _SAVED_PER_SIGNATURE:
            return
        self.crash_dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha1(data).hexdigest()[:12]
        path = self.crash_dir / f"{self.result.target}-{kind}-{digest}.bin"
        path.write_bytes(data)
        path.with_suffix(".txt").write_text(
            f"{key}\n\n{text}\nreplay: python -m fuzz --replay {path}\n", encoding="utf-8"
        )
        self.result.saved.append(path)


def run_pure(
    target: str,
    count: int,
    *,
    seconds: float | None = None,
    seed: int = 0,
    crash_dir: Path,
    hang_ms: float = DEFAULT_HANG_MS,
    update_check: str = "auto",
) -> Result:
    """``count`` inputs of the built-in mutator (or fewer, once ``seconds`` ran out)."""
    result = Result(target)
    recorder = Recorder(result, make_check(target, update_check), crash_dir, hang_ms)
    mutator = Mutator(random.Random(f"{target}:{seed}"), seeds_for(target))
    started = time.perf_counter()
    deadline = None if seconds is None else started + seconds
    for index in range(count):
        if deadline is not None and index % 64 == 0 and time.perf_counter() > deadline:
            break
        recorder.run_one(mutator.next_input())
    result.seconds = time.perf_counter() - started
    result.notes.extend(check_notes(recorder.check))
    return result


def check_notes(check: Callable[[bytes], None]) -> list[str]:
    """What a target's check has to report besides its findings (UpdateTarget.notes)."""
    notes = getattr(check, "notes", None)
    return list(notes()) if callable(notes) else []


def render_table(results: list[Result]) -> str:
    """The summary every run prints: one row per target."""
    columns = ["target", "engine", "inputs tried", "crashes", "hangs", "slowest input ms", "time s"]
    rows = [
        [
            r.target,
            r.engine,
            f"{r.tried:,}",
            str(r.crashes),
            str(r.hangs),
            f"{r.slowest_ms:.2f}",
            f"{r.seconds:.1f}",
        ]
        for r in results
    ]
    widths = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(columns)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(columns), "  ".join("-" * w for w in widths), *(line(row) for row in rows)]
    for r in results:
        for signature, times in r.signatures.most_common():
            out.append(f"  {r.target}: {times} x {signature}")
        out.extend(f"  {r.target}: {note}" for note in r.notes)
        out.extend(f"  saved: {path}" for path in r.saved)
    return "\n".join(out)
