"""``torch.compile`` backend: the model compiled once per static signature (``dynamic=False``).

Options: ``mode`` (None = default, "reduce-overhead" = with CUDA graphs, "max-autotune"), ``fullgraph``
(default True: a graph break is an error, since cg_fast's models compile without breaks).

.. warning:: The first call of each input signature compiles (seconds to minutes); later calls reuse it.
.. note:: The modes that use CUDA graphs ("reduce-overhead", "max-autotune") replay from cudagraph trees,
   whose outputs live in the graphs' memory and are overwritten by a later replay: CFG's two unbatched
   passes would return the same memory, and the CFG direction would silently be 0. So in those modes every
   call starts a new cudagraph-tree step (``torch.compiler.cudagraph_mark_step_begin``) and returns a copy of
   the output, which the caller owns.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["CompiledDenoiser", "COMPILE_MODES", "CUDAGRAPH_MODES"]

COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")  # modes whose outputs are cudagraph-tree memory


class CompiledDenoiser:
    """``model(x, t, y=None)`` through ``torch.compile``."""

    def __init__(self, model: Callable[..., Tensor], mode: str | None = None, fullgraph: bool = True) -> None:
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown torch.compile mode {mode!r}: use one of {COMPILE_MODES}")
        self.model = model
        self.mode = mode
        self.cudagraphs = mode in CUDAGRAPH_MODES
        self._compiled = torch.compile(model, mode=mode, fullgraph=fullgraph, dynamic=False)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            if self.cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()  # a new step: earlier outputs may be reused
            out = self._compiled(x, t) if y is None else self._compiled(x, t, y)
            return out.clone() if self.cudagraphs else out
