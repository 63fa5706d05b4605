"""Benchmarks run with pytest-benchmark: `make bench` or `pytest benchmarks --benchmark-only`."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
