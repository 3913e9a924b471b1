"""Chaos runs with an oracle: real devices and relays, killed and restarted, through a proxy
that misbehaves, then a check that nothing the API accepted or the relay acknowledged was lost.

``python -m chaos --cycles 100 --relays 1 --devices 3 --seed 1 --seconds 300`` (see
:mod:`chaos.harness`). Not part of the installed package, like ``bench/`` and ``fuzz/``.
"""
