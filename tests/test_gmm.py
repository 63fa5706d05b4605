"""The exact Gaussian-mixture testbed: analytic scores, and full guidance landing on p(x | y)."""
from __future__ import annotations

import math

import pytest
import torch

from cg_fast import ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.guidance import Full
from cg_fast.eval import conditional_sliced_wasserstein, sliced_wasserstein
from cg_fast.testbeds import GaussianMixture

SCHED = NoiseSchedule.linear(1000)


def log_density_t(gmm: GaussianMixture, x: torch.Tensor, ab: float, y: int | None = None) -> torch.Tensor:
    """log p_t(x) (or log p_t(x | y)) written out directly from the mixture, float64."""
    v = ab * gmm.std ** 2 + 1 - ab
    d = gmm.dim
    comp = -((x[:, None, :] - math.sqrt(ab) * gmm.means[None]) ** 2).sum(-1) / (2 * v) \
        - 0.5 * d * math.log(2 * math.pi * v)
    if y is not None:
        return comp[:, y]
    return torch.logsumexp(comp + gmm.weights.log(), dim=1)


@pytest.mark.parametrize("t", [0, 200, 600, 999])
def test_eps_is_minus_scaled_score(t):
    gmm = GaussianMixture.random(num_classes=5, dim=3, seed=1, equal_weights=False)
    model = gmm.eps_model(SCHED).double()
    ab = float(SCHED.alphas_cumprod[t])
    x = torch.randn(7, 3, dtype=torch.float64, requires_grad=True)
    tt = torch.full((7,), t)
    for y in (None, 2):
        (score,) = torch.autograd.grad(log_density_t(gmm, x, ab, y).sum(), x)
        want = -math.sqrt(1 - ab) * score
        got = model(x.detach(), tt, None if y is None else torch.full((7,), y))
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # the null label (= K) means unconditional, row by row
    mixed = model(x.detach(), tt, torch.tensor([0, 5, 1, 5, 2, 3, 5]))
    uncond = model(x.detach(), tt, None)
    assert torch.equal(mixed[1], uncond[1]) and not torch.equal(mixed[0], uncond[0])


def test_classifier_is_the_bayes_posterior():
    gmm = GaussianMixture.random(num_classes=4, dim=2, seed=3, equal_weights=False)
    clf = gmm.classifier(SCHED).double()
    x = torch.randn(6, 2, dtype=torch.float64)
    t = 300
    ab = float(SCHED.alphas_cumprod[t])
    joint = torch.stack([log_density_t(gmm, x, ab, k) + gmm.weights[k].log() for k in range(4)], dim=1)
    want = joint - torch.logsumexp(joint, dim=1, keepdim=True)
    got = torch.log_softmax(clf(x, torch.full((6,), t)), dim=1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_metrics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 4, generator=g)
    assert sliced_wasserstein(a, a) == 0.0
    shifted = sliced_wasserstein(a, a + 1.0)
    # a pure shift v: every projection moves by <v, theta>, so SW2 = sqrt(E <v, theta>^2) = |v| / sqrt(d) = 1
    assert abs(shifted - 1.0) < 0.05
    assert sliced_wasserstein(a, a[:300]) < 0.2
    gmm = GaussianMixture.random(num_classes=3, dim=4, std=0.05, seed=0)
    y = torch.arange(300) % 3
    assert gmm.posterior_accuracy(gmm.sample(y, generator=g), y) == 1.0
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein(a, torch.randn(10, 3))


@pytest.mark.slow
def test_full_guidance_at_scale_one_lands_on_the_conditional():
    """An unconditional exact eps model + exact classifier at s = 1 is the exact conditional score.

    Bound: if the sampler were exact, its distance to an independent exact sample set would follow the
    noise floor, the distance between two exact sets of the same size. We draw 8 such pairs and require
    the sampler to be within the floor's max plus 3 standard deviations. Unguided sampling (the negative
    control) must fail the same bound by a wide margin, so the test has power.
    """
    gmm = GaussianMixture.random(num_classes=8, dim=8, std=0.3, seed=0)
    n = 2000
    y = torch.arange(n) % 8
    g = torch.Generator().manual_seed(123)
    ref = gmm.sample(y, generator=g)
    floor = torch.tensor([conditional_sliced_wasserstein(gmm.sample(y, generator=g), y, ref, y)
                          for _ in range(8)])
    bound = float(floor.max() + 3 * floor.std())

    sampler = Sampler(gmm.eps_model(SCHED), SCHED, "250", class_cond=False, clip_denoised=False)
    guid = ClassifierGuidance(gmm.classifier(SCHED), 1.0, policy=Full(), cache="drop")
    out = sampler.sample((n, 8), y=y, guidance=guid, generator=torch.Generator().manual_seed(5))
    sw = conditional_sliced_wasserstein(out.x, y, ref, y)
    assert sw <= bound, f"sliced W2 {sw:.4f} above the noise-floor bound {bound:.4f} (floor {floor.tolist()})"
    acc, exact_acc = gmm.posterior_accuracy(out.x, y), gmm.posterior_accuracy(ref, y)
    assert abs(acc - exact_acc) < 0.03

    unguided = sampler.sample((n, 8), y=y, generator=torch.Generator().manual_seed(5))
    assert conditional_sliced_wasserstein(unguided.x, y, ref, y) > 3 * bound
