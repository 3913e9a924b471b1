"""Fuzzing of everything a hostile client can reach: ``python -m fuzz``.

Three targets, each a loop that stops by itself after its share of inputs (or its seconds):

- ``frames``: the pure frame decoder and both protocol sessions, fed random, truncated and
  mutated frames. Only a protocol error may come out, a refused frame leaves a valid fatal Error
  to send, and no input takes more than a few milliseconds.
- ``updates``: the checks every CRDT update passes before the relay stores it, fed random bytes
  and mutations of real pycrdt updates, each input also as a state vector. Only
  :class:`~foliosync.sync.errors.BadUpdate` may come out; an update that passes is applied and
  the document stays readable, unless yrs refuses it on purpose (it alone sees what the document
  holds): the relay then forgets its copy, and so does the target. A Rust panic is a finding.
- ``relay``: a live relay on 127.0.0.1, hostile WebSocket connections, and a well-behaved
  device whose every edit must be acknowledged in bounded time while they run; afterwards the
  relay is alive, every stored document loads, and the device agrees with a fresh one.

A crash is saved with its input bytes under the crash folder and replays with
``python -m fuzz --replay FILE``. The folder is not part of the installed package (like
``bench/``): it drives the package from outside, as an attacker would.
"""
