"""Cache modes (spec §4): what the steps without fresh guidance get.

The update of the guidance state ``h`` is written as one rule that the step kernels apply in the same
memory pass as the sampler update::

    a_j = H_DECAY_j * h + G_WEIGHT_j * g_j        (the g term only at guided steps)
    h  <- a_j                                      (stateful modes only)

and the step applies ``a_j`` (scaled by s, or by w - 1 for CFG). This module turns a guided-step mask
into the per-step weights:

    mode       guided step j                 skipped step j         state
    drop       G_WEIGHT = 1                  nothing                 none
    compress   G_WEIGHT = m_j (gap, §4),     nothing                 none
               or a calibrated w_j
    reuse      H_DECAY = 0, G_WEIGHT = 1     H_DECAY = 1             h
    momentum   (beta, 1 - beta); (0, 1) the  H_DECAY = gamma         h
               first time
"""
from __future__ import annotations

import math

from dataclasses import dataclass

from .policies import gaps

__all__ = ["CACHE_MODES", "CachePlan", "cache_plan", "check_cache_args"]

CACHE_MODES = ("drop", "compress", "reuse", "momentum")


@dataclass(frozen=True)
class CachePlan:
    """Per-step weights in sampling order, and whether the mode keeps a state ``h``."""

    h_decay: list[float]
    g_weight: list[float]
    stateful: bool


def check_cache_args(cache: str, beta: float, decay: float) -> None:
    """Raise ``ValueError`` with what to fix for an unknown mode or out-of-range beta / decay."""
    if cache not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {cache!r}: use one of {CACHE_MODES}")
    for name, v in (("beta", beta), ("decay", decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta (momentum weight of the old state) must lie in [0, 1], got {beta!r}")
    if not decay >= 0.0:
        raise ValueError(f"decay (gamma, applied to h at skipped steps) must be >= 0, got {decay!r}")
    if cache != "momentum" and (beta != 0.0 or decay != 1.0):
        raise ValueError(f"beta and decay apply to cache='momentum' only (got cache={cache!r}, beta={beta}, "
                         f"decay={decay}); use cache='momentum' or leave them at 0.0 and 1.0")


def cache_plan(mask: list[bool], cache: str, beta: float = 0.0, decay: float = 1.0,
               weights: list[float] | None = None) -> CachePlan:
    """The weights (H_DECAY, G_WEIGHT) of every step for a guided-step ``mask`` (spec §4).

    ``weights`` (a calibrated policy's w_j, 0 where not guided) replace the gaps m_j of ``cache="compress"``;
    the other modes use the mask only.
    """
    check_cache_args(cache, beta, decay)
    n = len(mask)
    if weights is not None and len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries for {n} steps")
    if cache == "drop":
        return CachePlan([0.0] * n, [1.0 if g else 0.0 for g in mask], stateful=False)
    if cache == "compress":
        m = gaps(mask) if weights is None else [w if g else 0.0 for w, g in zip(weights, mask)]
        return CachePlan([0.0] * n, [float(v) for v in m], stateful=False)
    if cache == "reuse":
        beta, decay = 0.0, 1.0  # reuse is momentum with beta = 0, gamma = 1 (zero-order hold)
    h_decay, g_weight = [], []
    seen = False
    for guided in mask:
        if guided:
            h_decay.append(beta if seen else 0.0)  # the first guided step sets h = g
            g_weight.append(1.0 - beta if seen else 1.0)
            seen = True
        else:
            h_decay.append(decay)
            g_weight.append(0.0)
    return CachePlan(h_decay, g_weight, stateful=True)
