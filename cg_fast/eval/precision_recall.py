"""Improved precision and recall of generated samples (Kynkäänniemi et al., NeurIPS 2019), k-NN manifolds.

The manifold of a feature set Phi is the union of balls B(phi, r_k(phi)) over phi in Phi, where r_k(phi) is the
distance from phi to its k-th nearest neighbour in Phi other than itself. Then

    precision = fraction of generated features inside the manifold of the real features,
    recall    = fraction of real features inside the manifold of the generated features.

All pairwise distances are computed in [batch_size x batch_size] tiles, so 50k x 50k sets never allocate an
n^2 matrix; squared distances are compared with squared radii (no square roots).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["PrecisionRecall", "precision_recall"]

ArrayLike = Tensor | np.ndarray


@dataclass(frozen=True)
class PrecisionRecall:
    """Result of ``precision_recall``; ``as_dict()`` gives ``{"precision": ..., "recall": ...}``."""

    precision: float
    recall: float

    def as_dict(self) -> dict[str, float]:
        return {"precision": self.precision, "recall": self.recall}


def _prepare(x: ArrayLike, what: str, device: torch.device, dtype: torch.dtype) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [n, D]; got shape {tuple(x.shape)} "
                         "(flatten each sample to a vector first)")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{what} must be real numbers; got dtype {x.dtype}")
    x = x.detach().to(device=device, dtype=dtype)
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf; drop or fix those samples first")
    return x


def _sq_dists(a: Tensor, a_sq: Tensor, b: Tensor, b_sq: Tensor) -> Tensor:
    """Squared Euclidean distances [len(a), len(b)]: |a|^2 + |b|^2 - 2 a.b, clamped at 0 against round-off."""
    return (a_sq[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)).clamp_min_(0.0)


def _kth_nn_sq_radii(x: Tensor, x_sq: Tensor, k: int, bs: int) -> Tensor:
    """Squared distance from each row of ``x`` to its k-th nearest other row, tiled over both axes."""
    n = x.shape[0]
    radii = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, bs):
        rows = x[i:i + bs]
        best = torch.full((rows.shape[0], k), float("inf"), dtype=x.dtype, device=x.device)
        for j in range(0, n, bs):
            d = _sq_dists(rows, x_sq[i:i + bs], x[j:j + bs], x_sq[j:j + bs])
            lo, hi = max(i, j), min(i + rows.shape[0], j + d.shape[1])
            if lo < hi:  # the tile holds some self-pairs: exclude each point from its own neighbours
                idx = torch.arange(lo, hi, device=x.device)
                d[idx - i, idx - j] = float("inf")
            # running k smallest per row: merge the kept k with this tile's candidates
            best = torch.cat([best, d], dim=1).topk(k, dim=1, largest=False).values
        radii[i:i + rows.shape[0]] = best[:, k - 1]
    return radii


def _coverage(query: Tensor, q_sq: Tensor, ref: Tensor, ref_sq: Tensor, ref_radii: Tensor, bs: int) -> float:
    """Fraction of ``query`` rows inside some ball B(ref_j, r_j): |q - ref_j|^2 <= r_j^2."""
    inside = torch.zeros(query.shape[0], dtype=torch.bool, device=query.device)
    for i in range(0, query.shape[0], bs):
        hit = inside[i:i + bs]
        for j in range(0, ref.shape[0], bs):
            d = _sq_dists(query[i:i + bs], q_sq[i:i + bs], ref[j:j + bs], ref_sq[j:j + bs])
            hit |= (d <= ref_radii[None, j:j + bs]).any(dim=1)
            if bool(hit.all()):
                break
    return float(inside.double().mean())


def precision_recall(real_features: ArrayLike, generated_features: ArrayLike, k: int = 3, *,
                     batch_size: int = 4096, device: str | torch.device | None = None,
                     dtype: torch.dtype = torch.float64) -> PrecisionRecall:
    """Improved precision and recall of ``generated_features`` [m, D] against ``real_features`` [n, D].

    ``k``: neighbourhood size of the k-NN manifolds (the paper uses 3); needs k < n and k < m.
    ``batch_size``: tile side of the distance computations (memory ~ batch_size^2 values per tile).
    ``device``: where to compute (default: the real features' device). ``dtype``: float64 by default so that
    hand-built ties are exact; pass ``torch.float32`` on GPUs with slow float64 for a large speed-up.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive integer; got {k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    if device is None:
        device = real_features.device if isinstance(real_features, Tensor) else torch.device("cpu")
    device = torch.device(device)
    real = _prepare(real_features, "real_features", device, dtype)
    gen = _prepare(generated_features, "generated_features", device, dtype)
    if real.shape[1] != gen.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]} vs generated {gen.shape[1]}; "
                         "both sets must come from the same feature extractor")
    for name, x in (("real_features", real), ("generated_features", gen)):
        if k >= x.shape[0]:
            raise ValueError(f"k={k} needs more than k samples in {name} (the k-th neighbour excludes the point "
                             f"itself); got {x.shape[0]}. Use a smaller k or more samples")
    with torch.no_grad():
        real_sq, gen_sq = (real * real).sum(1), (gen * gen).sum(1)
        real_r = _kth_nn_sq_radii(real, real_sq, k, batch_size)
        gen_r = _kth_nn_sq_radii(gen, gen_sq, k, batch_size)
        precision = _coverage(gen, gen_sq, real, real_sq, real_r, batch_size)
        recall = _coverage(real, real_sq, gen, gen_sq, gen_r, batch_size)
    return PrecisionRecall(precision=precision, recall=recall)
