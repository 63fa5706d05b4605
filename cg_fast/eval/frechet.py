"""Fréchet distance between Gaussian fits of two feature sets (FID when the features are Inception pools).

``FeatureStats`` holds the mean [D], covariance [D, D] (float64) and sample count of a feature set and saves
to / loads from ``.npz`` (keys ``mu``, ``sigma`` and ``n``; files with only ``mu`` and ``sigma``, such as the
ADM evaluator's reference batches, load with ``n=None``). ``frechet_distance`` compares two of them:

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))

(Heusel et al. 2017). The trace term is computed in float64 without a general matrix square root: with
A = S1^(1/2) (symmetric, from an eigendecomposition), S1 S2 = A (A S2) is similar to the symmetric PSD matrix
A S2 A, so tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(A S2 A)).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor

__all__ = ["FeatureStats", "frechet_distance"]

ArrayLike = Tensor | np.ndarray

# Covariance eigenvalues below -_PSD_RTOL * (largest |eigenvalue|) are not round-off: the matrix is not a
# covariance. Smaller negatives are round-off and clamped to 0.
_PSD_RTOL = 1e-6
_CHUNK = 4096  # rows per step when accumulating the covariance (bounds the float64 working copy)


def _as_features(feats: ArrayLike, what: str = "features") -> np.ndarray:
    """Validated float64 [n, D] numpy view/copy of ``feats`` (Tensor or ndarray)."""
    if isinstance(feats, Tensor):
        feats = feats.detach().cpu().numpy()
    x = np.asarray(feats)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array [n, D]; got shape {tuple(x.shape)} "
                         "(flatten each sample to a vector first, e.g. x.reshape(len(x), -1))")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{what} must be real numbers; got dtype {x.dtype}")
    if x.shape[0] < 2:
        raise ValueError(f"{what} need at least 2 samples for a covariance; got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{what} have dimension 0")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} contain NaN or inf; drop or fix those samples before computing statistics")
    return x


@dataclass(frozen=True, eq=False)
class FeatureStats:
    """Gaussian fit of a feature set: ``mu`` [D] and unbiased covariance ``sigma`` [D, D] (float64), ``n`` samples.

    Build it with ``FeatureStats.from_features(feats)`` or directly from a known mean and covariance
    (``n`` may then be ``None``).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None

    def __post_init__(self) -> None:
        mu = np.asarray(self.mu.detach().cpu() if isinstance(self.mu, Tensor) else self.mu, dtype=np.float64)
        sigma = np.asarray(self.sigma.detach().cpu() if isinstance(self.sigma, Tensor) else self.sigma,
                           dtype=np.float64)
        if mu.ndim != 1:
            raise ValueError(f"FeatureStats.mu must be a vector [D]; got shape {mu.shape}")
        d = mu.shape[0]
        if sigma.shape != (d, d):
            raise ValueError(f"FeatureStats.sigma must be [D, D] = [{d}, {d}] to match mu; got {sigma.shape}")
        if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
            raise ValueError("FeatureStats contains NaN or inf; recompute it from finite features")
        scale = max(float(np.abs(sigma).max()), np.finfo(np.float64).tiny)
        if float(np.abs(sigma - sigma.T).max()) > 1e-6 * scale:
            raise ValueError("FeatureStats.sigma is not symmetric, so it is not a covariance matrix")
        if self.n is not None and int(self.n) < 2:
            raise ValueError(f"FeatureStats.n must be at least 2 (or None when unknown); got {self.n}")
        object.__setattr__(self, "mu", mu)
        object.__setattr__(self, "sigma", sigma)
        object.__setattr__(self, "n", None if self.n is None else int(self.n))

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, feats: ArrayLike) -> FeatureStats:
        """Mean and unbiased covariance (divisor n - 1, as ``np.cov``) of ``feats`` [n, D], in float64.

        The covariance is accumulated over row chunks, so 50k x 2048 features never need a full float64 copy.
        """
        x = _as_features(feats)
        n, d = x.shape
        mu = np.zeros(d, dtype=np.float64)
        for i in range(0, n, _CHUNK):
            mu += x[i:i + _CHUNK].sum(axis=0, dtype=np.float64)
        mu /= n
        # Two-pass: S = sum_i (x_i - mu)(x_i - mu)^T / (n - 1), centred first for accuracy.
        sigma = np.zeros((d, d), dtype=np.float64)
        for i in range(0, n, _CHUNK):
            c = x[i:i + _CHUNK].astype(np.float64) - mu
            sigma += c.T @ c
        sigma /= n - 1
        sigma = 0.5 * (sigma + sigma.T)  # exact symmetry despite summation order
        return cls(mu, sigma, n)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``mu``, ``sigma`` (and ``n`` when known) to ``path`` as .npz, atomically; returns the path."""
        path = Path(path)
        arrays = {"mu": self.mu, "sigma": self.sigma}
        if self.n is not None:
            arrays["n"] = np.asarray(self.n, dtype=np.int64)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        """Read statistics saved by ``save`` (or any .npz holding ``mu`` and ``sigma``)."""
        with np.load(path, allow_pickle=False) as data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise ValueError(f"{path} is not a feature-statistics file: it lacks {missing} "
                                 f"(it holds {sorted(data.files)}); write one with FeatureStats.save")
            n = int(data["n"]) if "n" in data.files else None
            return cls(data["mu"], data["sigma"], n)


def _sqrt_psd(s: np.ndarray, what: str) -> np.ndarray:
    """Symmetric square root of a covariance via its eigendecomposition, round-off negatives clamped to 0."""
    w, v = np.linalg.eigh(s)
    _check_psd(w, what)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _check_psd(w: np.ndarray, what: str) -> None:
    scale = float(np.abs(w).max()) if w.size else 0.0
    if w.size and float(w.min()) < -_PSD_RTOL * scale:
        raise ValueError(f"{what} is not positive semi-definite (eigenvalue {float(w.min()):.3g}, "
                         f"largest |eigenvalue| {scale:.3g}); it is not a covariance matrix")


def frechet_distance(a: FeatureStats | ArrayLike, b: FeatureStats | ArrayLike) -> float:
    """Fréchet distance between two feature sets, each given as ``FeatureStats`` or features [n, D].

    FD = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), computed in float64 (see the module doc).
    """
    sa = a if isinstance(a, FeatureStats) else FeatureStats.from_features(_as_features(a, "first features"))
    sb = b if isinstance(b, FeatureStats) else FeatureStats.from_features(_as_features(b, "second features"))
    if sa.dim != sb.dim:
        raise ValueError(f"feature dimensions differ: {sa.dim} vs {sb.dim}; both sets must come from the "
                         "same feature extractor layer")
    root1 = _sqrt_psd(sa.sigma, "the first covariance")
    m = root1 @ sb.sigma @ root1
    lam = np.linalg.eigvalsh(0.5 * (m + m.T))  # eigenvalues of S1 S2 (similar matrices), PSD up to round-off
    _check_psd(lam, "the second covariance (seen through the first)")
    tr_covmean = float(np.sqrt(np.clip(lam, 0.0, None)).sum())
    diff = sa.mu - sb.mu
    fd = float(diff @ diff) + float(np.trace(sa.sigma)) + float(np.trace(sb.sigma)) - 2.0 * tr_covmean
    return max(fd, 0.0)  # FD >= 0; a tiny negative value is round-off between equal statistics
