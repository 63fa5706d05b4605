"""Where Triton runs interpreted: the default of ``TRITON_INTERPRET`` for tests and benchmarks.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so the choice must be made before
:mod:`cg_fast.kernels.triton_step` (or triton itself) is imported; ``tests/conftest.py`` and
``benchmarks/conftest.py`` call :func:`default_interpret` first thing, loading this file directly (not
through the cg_fast package, whose imports may pull triton in). It imports nothing but torch.
"""
from __future__ import annotations

import os
from typing import MutableMapping

import torch

__all__ = ["default_interpret"]


def default_interpret(environ: MutableMapping[str, str] | None = None, cuda: bool | None = None) -> bool:
    """Set ``TRITON_INTERPRET=1`` in ``environ`` (default ``os.environ``) only where no CUDA device exists.

    On a GPU the compiled kernels run (an interpreted kernel copies through the host, so CUDA-graph capture
    fails and timings mean nothing); a value set by hand is always kept. Returns whether Triton will run
    interpreted. ``cuda`` overrides ``torch.cuda.is_available()`` (for tests).
    """
    env = os.environ if environ is None else environ
    if cuda is None:
        cuda = torch.cuda.is_available()
    if not cuda:
        env.setdefault("TRITON_INTERPRET", "1")
    return env.get("TRITON_INTERPRET", "0") == "1"
