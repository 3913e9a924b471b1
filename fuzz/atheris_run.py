"""The pure targets under atheris: libFuzzer's coverage guidance, this package's mutator.

libFuzzer ends its process when its runs are done, so each target runs in a child process
(``python -m fuzz.atheris_run``) that writes its counts to a JSON file as it goes; the parent
reads them back, and a child that died (a segfault, an abort in native code, libFuzzer's own
timeout or memory limit) is a crash whose input libFuzzer saved under the crash folder.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fuzz.engine import DEFAULT_HANG_MS, Recorder, Result, seeds_for

__all__ = ["run_atheris"]

_MAX_LEN = 1 << 16


def run_atheris(
    target: str,
    count: int,
    *,
    seconds: float | None = None,
    seed: int = 0,
    crash_dir: Path,
    hang_ms: float = DEFAULT_HANG_MS,
    update_check: str = "auto",
) -> Result:
    """``count`` runs of ``target`` under libFuzzer, in a child process."""
    crash_dir.mkdir(parents=True, exist_ok=True)
    result = Result(target, engine="atheris")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="foliosync-atheris-") as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        for index, data in enumerate(seeds_for(target)):
            (corpus / f"seed-{index}").write_bytes(data)
        stats = Path(tmp) / "stats.json"
        flags = [
            f"-runs={count}",
            f"-seed={seed + 1}",
            f"-max_len={_MAX_LEN}",
            "-timeout=10",
            "-rss_limit_mb=3072",
            f"-artifact_prefix={crash_dir.resolve()}/{target}-libfuzzer-",
            "-print_final_stats=1",
        ]
        if seconds is not None:
            flags.append(f"-max_total_time={max(1, int(seconds))}")
        command = [sys.executable, "-m", "fuzz.atheris_run", target, str(stats), str(crash_dir)]
        command += [str(hang_ms), update_check, *flags, str(corpus)]
        log = Path(tmp) / "libfuzzer.log"
        env = {**os.environ, "RUST_BACKTRACE": "0"}
        with open(log, "wb") as out:
            code = subprocess.run(command, stdout=out, stderr=out, env=env, check=False).returncode
        if stats.exists():
            counts = json.loads(stats.read_text())
            result.tried = counts["tried"]
            result.crashes = counts["crashes"]
            result.hangs = counts["hangs"]
            result.slowest_ms = counts["slowest_ms"]
            result.signatures.update(counts["signatures"])
            result.saved = [Path(p) for p in counts["saved"]]
            result.notes.extend(counts.get("notes", []))
        if code != 0:
            result.crashes += 1
            tail = log.read_text(errors="replace").splitlines()[-15:]
            result.signatures[f"the libFuzzer process ended with {code}"] += 1
            result.notes.extend(tail)
    result.seconds = time.perf_counter() - started
    return result


def _child(argv: list[str]) -> None:
    import atheris

    target, stats, crash_dir, hang_ms, update_check, *flags = argv
    with atheris.instrument_imports(include=["foliosync", "fuzz.targets", "msgpack"]):
        from fuzz.engine import check_notes, make_check
        from fuzz.mutate import Mutator

    result = Result(target, engine="atheris")
    recorder = Recorder(result, make_check(target, update_check), Path(crash_dir), float(hang_ms))
    seeds = seeds_for(target)
    last_write = [0.0]

    def write() -> None:
        counts = {
            "tried": result.tried,
            "crashes": result.crashes,
            "hangs": result.hangs,
            "slowest_ms": result.slowest_ms,
            "signatures": dict(result.signatures),
            "saved": [str(p) for p in result.saved],
            "notes": check_notes(recorder.check),
        }
        Path(stats + ".tmp").write_text(json.dumps(counts))
        os.replace(stats + ".tmp", stats)
        last_write[0] = time.monotonic()

    runs = next((int(f[6:]) for f in flags if f.startswith("-runs=")), 0)

    def one_input(data: bytes) -> None:
        recorder.run_one(data)
        if result.tried == runs or time.monotonic() - last_write[0] > 1.0:
            write()

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        mutator = Mutator(random.Random(seed), [data or seeds[0], *seeds])
        pick = mutator.rng.random()
        if pick < 0.4:
            out = mutator.frame_mutation(data) if target == "frames" else mutator.next_input()
        elif pick < 0.8:
            out = mutator.bytes_mutation(data)
        else:
            out = mutator.next_input()
        return out[:max_size]

    import atexit

    atexit.register(write)
    atheris.Setup([sys.argv[0], *flags], one_input, custom_mutator=mutate)
    try:
        atheris.Fuzz()
    finally:
        write()


if __name__ == "__main__":
    _child(sys.argv[1:])
