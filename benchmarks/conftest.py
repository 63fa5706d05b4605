"""Benchmarks run with pytest-benchmark: `make bench` or `pytest benchmarks --benchmark-only`."""
import importlib.util
from pathlib import Path

# TRITON_INTERPRET=1 only without CUDA (where the Triton benchmarks skip anyway); loaded from its file, before
# the cg_fast package (or anything it imports) can import triton.
_spec = importlib.util.spec_from_file_location(
    "_cg_fast_triton_env", Path(__file__).resolve().parents[1] / "cg_fast" / "kernels" / "triton_env.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
_mod.default_interpret()
