"""Sample-set metrics: sliced Wasserstein distance, overall and per class.

Sliced Wasserstein-p between two sample sets: the p-Wasserstein distance of their 1-D projections on
random unit directions, averaged (in the p-th power) over directions. Sample sets of unequal size are
compared at common quantile levels.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sliced_wasserstein", "conditional_sliced_wasserstein"]


def _quantiles(p: Tensor, m: int) -> Tensor:
    """Sorted projections [n, L] resampled to m evenly spaced quantile levels (midpoints)."""
    n = p.shape[0]
    s = p.sort(dim=0).values
    if n == m:
        return s
    levels = (torch.arange(m, dtype=p.dtype, device=p.device) + 0.5) / m
    return torch.quantile(s, levels, dim=0)


def sliced_wasserstein(a: Tensor, b: Tensor, num_projections: int = 512, p: float = 2.0,
                       seed: int = 0) -> float:
    """Sliced Wasserstein-p distance between sample sets ``a`` [n, ...] and ``b`` [m, ...].

    Directions come from a private generator seeded with ``seed``, so the metric is deterministic and the
    same directions are used for every comparison with the same seed.
    """
    a = a.detach().reshape(a.shape[0], -1).double().cpu()
    b = b.detach().reshape(b.shape[0], -1).double().cpu()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"sample sets differ in dimension: {a.shape[1]} vs {b.shape[1]}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("sliced_wasserstein needs at least 2 samples in each set")
    for name, s in (("a", a), ("b", b)):
        if not bool(torch.isfinite(s).all()):
            bad = int((~torch.isfinite(s)).any(dim=1).sum())
            raise ValueError(f"sliced_wasserstein: sample set {name} has NaN or infinite values in {bad} of "
                             f"{s.shape[0]} samples (a diverged sampler?); the distance would be NaN")
    gen = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], num_projections, generator=gen, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    m = min(a.shape[0], b.shape[0])
    qa, qb = _quantiles(a @ dirs, m), _quantiles(b @ dirs, m)
    return float(((qa - qb).abs() ** p).mean() ** (1.0 / p))


def conditional_sliced_wasserstein(x: Tensor, y: Tensor, x_ref: Tensor, y_ref: Tensor, **kw) -> float:
    """Sliced Wasserstein per class, averaged with the classes' frequencies in ``y``.

    Unlike the distance between the pooled sets, this sees a sampler that draws the wrong class.
    """
    total, count = 0.0, 0
    for k in torch.unique(y).tolist():
        xs, xr = x[y == k], x_ref[y_ref == k]
        if xs.shape[0] < 2 or xr.shape[0] < 2:
            raise ValueError(f"class {k} has fewer than 2 samples in one of the sets")
        total += sliced_wasserstein(xs, xr, **kw) * xs.shape[0]
        count += xs.shape[0]
    return total / count
