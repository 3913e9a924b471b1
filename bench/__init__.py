"""Benchmarks for foliosync; run with ``python -m bench`` (see bench/__main__.py)."""
