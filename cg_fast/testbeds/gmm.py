"""An exactly solvable testbed: a Gaussian mixture, with analytic noisy scores and classifier.

Data: class y ~ Categorical(w); x_0 | y ~ N(mu_y, sigma^2 I) in any dimension d (images' trailing
dimensions are flattened). Under the forward process x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps every noisy
marginal is again a mixture, with the same weights and

    x_t | y ~ N(sqrt(ab) mu_y, v_t I),     v_t = ab sigma^2 + 1 - ab.

Hence, for any NoiseSchedule and ORIGINAL timestep t (ab = alpha_bar[t]):

    eps(x_t, t, y) = sqrt(1 - ab) (x_t - sqrt(ab) mu_y) / v_t                  (conditional)
    eps(x_t, t)    = sqrt(1 - ab) (x_t - sqrt(ab) sum_k r_k mu_k) / v_t        (unconditional)
    log p(y=k | x_t) = log w_k - |x_t - sqrt(ab) mu_k|^2 / (2 v_t) - logsumexp(...)   (noisy classifier)

with r_k = p(k | x_t). An unconditional eps model plus classifier guidance at scale 1 (exact gradient)
is the exact conditional score, so full guidance must land on p(x | y): the answer is known.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch import Tensor

from ..schedules import NoiseSchedule

__all__ = ["GaussianMixture", "GMMEps", "GMMClassifier"]


@dataclass
class GaussianMixture:
    """K classes in dimension d: ``means`` [K, d], isotropic ``std``, ``weights`` [K] (summing to 1)."""

    means: Tensor
    std: float
    weights: Tensor

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=torch.float64)
        self.weights = torch.as_tensor(self.weights, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"means must be [K, d], got shape {tuple(self.means.shape)}")
        if self.weights.shape != (self.means.shape[0],):
            raise ValueError(f"weights must be [K] = [{self.means.shape[0]}], got {tuple(self.weights.shape)}")
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {self.std}")
        if bool((self.weights <= 0).any()) or abs(float(self.weights.sum()) - 1.0) > 1e-9:
            raise ValueError("weights must be positive and sum to 1")

    @classmethod
    def random(cls, num_classes: int = 8, dim: int = 8, radius: float = 1.0, std: float = 0.3,
               seed: int = 0, equal_weights: bool = True) -> "GaussianMixture":
        """Means drawn uniformly on the sphere of ``radius``; weights equal or Dirichlet(1)."""
        gen = torch.Generator().manual_seed(seed)
        mu = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
        mu = radius * mu / mu.norm(dim=1, keepdim=True)
        if equal_weights:
            w = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
        else:
            w = -torch.rand(num_classes, generator=gen, dtype=torch.float64).log()
            w = w / w.sum()
        return cls(mu, std, w)

    @property
    def num_classes(self) -> int:
        return int(self.means.shape[0])

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def sample(self, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of p(x | y), float32 [len(y), d]."""
        y = torch.as_tensor(y, dtype=torch.long)
        z = torch.randn(y.shape[0], self.dim, generator=generator, dtype=torch.float64)
        return (self.means[y] + self.std * z).float()

    def sample_labels(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        return torch.multinomial(self.weights, n, replacement=True, generator=generator)

    def log_posterior(self, x0: Tensor) -> Tensor:
        """log p(y | x_0) [n, K] under the clean mixture."""
        x = x0.reshape(x0.shape[0], -1).double().cpu()
        logits = self.weights.log() - torch.cdist(x, self.means) ** 2 / (2 * self.std ** 2)
        return torch.log_softmax(logits, dim=1)

    def posterior_accuracy(self, x0: Tensor, y: Tensor) -> float:
        """Fraction of samples whose Bayes class argmax_k p(k | x_0) is their label."""
        return float((self.log_posterior(x0).argmax(dim=1) == y.cpu()).double().mean())

    def eps_model(self, schedule: NoiseSchedule) -> "GMMEps":
        return GMMEps(self, schedule)

    def classifier(self, schedule: NoiseSchedule) -> "GMMClassifier":
        return GMMClassifier(self, schedule)


class _GMMNoisy(nn.Module):
    """Shared buffers: the mixture and alpha_bar of the training schedule, indexed by original t."""

    def __init__(self, gmm: GaussianMixture, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.register_buffer("means", gmm.means.clone())
        self.register_buffer("log_weights", gmm.weights.log())
        self.register_buffer("alphas_cumprod", torch.from_numpy(schedule.alphas_cumprod.copy()))
        self.std = float(gmm.std)
        self.num_classes = gmm.num_classes

    def _moments(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Flattened float64 x [B, d], sqrt(ab) [B, 1] and v_t [B, 1]."""
        xf = x.reshape(x.shape[0], -1).double()
        if xf.shape[1] != self.means.shape[1]:
            raise ValueError(f"x has {xf.shape[1]} features per sample but the mixture has dimension "
                             f"{self.means.shape[1]}")
        ab = self.alphas_cumprod[t.long()].reshape(-1, 1)
        return xf, ab.sqrt(), ab * self.std ** 2 + 1 - ab

    def _logits(self, xf: Tensor, sab: Tensor, v: Tensor) -> Tensor:
        # log w_k - |x - sqrt(ab) mu_k|^2 / (2 v); the Gaussian normaliser is the same for every k.
        # |x - c mu_k|^2 = |x|^2 - 2 c <x, mu_k> + c^2 |mu_k|^2, in float64 (one matmul, no [B, K, d] tensor)
        sq = (xf * xf).sum(1, keepdim=True) - 2 * sab * (xf @ self.means.T) + sab ** 2 * (self.means ** 2).sum(1)
        return self.log_weights - sq / (2 * v)


class GMMEps(_GMMNoisy):
    """Exact eps-prediction model ``model(x, t, y=None)``; y = None or y = K (null label) is unconditional."""

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        xf, sab, v = self._moments(x, t)
        r = torch.softmax(self._logits(xf, sab, v), dim=1)
        mean_uncond = r @ self.means
        if y is None:
            mu = mean_uncond
        else:
            y = y.long()
            cond = y < self.num_classes
            mu = torch.where(cond[:, None], self.means[y.clamp(max=self.num_classes - 1)], mean_uncond)
        eps = (1 - sab ** 2).sqrt() * (xf - sab * mu) / v
        return eps.to(x.dtype).reshape(x.shape)


class GMMClassifier(_GMMNoisy):
    """Exact noisy classifier ``classifier(x, t) -> logits [B, K]`` with log_softmax = log p(y | x_t)."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        xf, sab, v = self._moments(x, t)
        return self._logits(xf, sab, v).to(x.dtype)
