"""Inception-score-style score of classifier predictions (Salimans et al. 2016).

For predictions p(y|x) over K classes on n samples, with marginal p(y) = mean_x p(y|x):

    IS = exp( E_x KL(p(y|x) || p(y)) ),   1 <= IS <= K.

It is 1 when every prediction is the same and K when predictions are one-hot and spread evenly over the K
classes. As in the original evaluation, the samples are cut into ``splits`` consecutive parts, the score is
computed per part, and the mean and (population) standard deviation over the parts are returned. Everything
is computed in float64 from log-probabilities.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

__all__ = ["InceptionScore", "inception_score"]

ArrayLike = Tensor | np.ndarray


class InceptionScore(NamedTuple):
    """Mean and standard deviation of the score over the splits (std is 0 for one split)."""

    mean: float
    std: float


def _log_probs(x: Tensor, probs: bool, log_probs: bool) -> Tensor:
    if probs:
        if (x < 0).any() or not torch.allclose(x.sum(1), torch.ones((), dtype=x.dtype), atol=1e-4):
            raise ValueError("with probs=True every row must be non-negative and sum to 1; "
                             "pass raw logits with probs=False instead")
        return (x / x.sum(1, keepdim=True)).log()  # renormalise away float32 round-off; log 0 = -inf is fine
    if log_probs:
        lse = torch.logsumexp(x, dim=1)
        if not torch.allclose(lse, torch.zeros((), dtype=x.dtype), atol=1e-4):
            raise ValueError("with log_probs=True every row's exp must sum to 1 (logsumexp 0); "
                             "pass raw logits with log_probs=False instead")
        return x - lse[:, None]
    return torch.log_softmax(x, dim=1)


def inception_score(predictions: ArrayLike, splits: int = 1, *, probs: bool = False,
                    log_probs: bool = False) -> InceptionScore:
    """Score of class predictions [n, K]: logits by default, probabilities with ``probs=True``, or
    log-probabilities with ``log_probs=True``. Returns ``InceptionScore(mean, std)`` over ``splits`` parts.
    """
    if probs and log_probs:
        raise ValueError("pass at most one of probs=True and log_probs=True")
    x = torch.as_tensor(predictions).detach()
    if x.ndim != 2 or x.shape[1] < 1:
        raise ValueError(f"predictions must be [n, K] with K >= 1 classes; got shape {tuple(x.shape)}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"predictions must be real numbers; got dtype {x.dtype}")
    x = x.to(device="cpu", dtype=torch.float64)
    if torch.isnan(x).any() or torch.isposinf(x).any() or (not log_probs and torch.isinf(x).any()):
        raise ValueError("predictions contain NaN or inf (-inf is allowed only as a log-probability of 0 "
                         "with log_probs=True)")
    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"splits must be a positive integer; got {splits!r}")
    n = x.shape[0]
    if n < splits:
        raise ValueError(f"{n} samples cannot be cut into {splits} non-empty splits; use fewer splits")
    logp = _log_probs(x, probs, log_probs)
    scores = []
    for s in range(splits):
        part = logp[s * n // splits:(s + 1) * n // splits]
        log_marginal = torch.logsumexp(part, dim=0) - math.log(part.shape[0])  # log p(y) = log mean_x p(y|x)
        p = part.exp()
        # KL(p(y|x) || p(y)) = sum_y p(y|x) (log p(y|x) - log p(y)), with 0 log 0 = 0
        kl = torch.where(p > 0, p * (part - log_marginal), torch.zeros((), dtype=p.dtype)).sum(1)
        scores.append(math.exp(float(kl.mean())))
    arr = np.asarray(scores, dtype=np.float64)
    return InceptionScore(mean=float(arr.mean()), std=float(arr.std()))
