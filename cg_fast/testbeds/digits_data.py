"""The data of the digits testbed: scikit-learn's bundled handwritten digits (no download).

1,797 grey 8x8 images of the digits 0-9 (UCI optical recognition of handwritten digits, the test part),
with integer intensities 0..16. Here they are floats in [-1, 1] (x / 8 - 1), shape [n, 1, 8, 8], and split
once, by a fixed seed and per class, into two disjoint halves: the guiding classifier trains on one, the
judges on the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["DigitsData", "load_digits_data", "SPLIT_SEED"]

SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsData:
    """Images ``x`` [n, 1, 8, 8] in [-1, 1], labels ``y`` [n], and the boolean mask of half A."""

    x: Tensor
    y: Tensor
    half_a: Tensor
    num_classes: int = 10

    def subset(self, name: str) -> tuple[Tensor, Tensor]:
        """``"all"``, ``"half_a"`` or ``"half_b"``: (x, y) of that part."""
        if name == "all":
            return self.x, self.y
        if name in ("half_a", "half_b"):
            m = self.half_a if name == "half_a" else ~self.half_a
            return self.x[m], self.y[m]
        raise ValueError(f"unknown data subset {name!r}: use 'all', 'half_a' or 'half_b'")


def _import_load_digits():
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dependency
        raise ImportError("the digits testbed needs scikit-learn (its data ships inside the package): "
                          "pip install scikit-learn") from e
    return load_digits


@lru_cache(maxsize=1)
def _cached() -> DigitsData:
    raw = _import_load_digits()()
    x = torch.from_numpy(raw.images).float().div(8.0).sub(1.0)[:, None]  # 0..16 -> [-1, 1]
    y = torch.from_numpy(raw.target).long()
    # per-class split: a seeded permutation of each class, its first half goes to A
    gen = torch.Generator().manual_seed(SPLIT_SEED)
    half_a = torch.zeros(len(y), dtype=torch.bool)
    for k in range(10):
        idx = (y == k).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        half_a[idx[: len(idx) // 2]] = True
    return DigitsData(x, y, half_a)


def load_digits_data() -> DigitsData:
    """The digits as a :class:`DigitsData` (read once per process; the tensors are shared: do not modify)."""
    return _cached()
