"""Guidance policies side by side on the CPU: wall time, denoiser passes, classifier gradients.

A small conv eps-model and a deeper conv classifier (random weights; the classifier's forward + backward
costs about as much as the denoiser's forward, as for ADM-64 at small batch, see gpu-anchors.md), batch 8
at 32x32, 50 DDPM steps. Each benchmark records the exact counts in ``extra_info``; compare the times as
ratios within one run (``--benchmark-compare`` / the printed table), e.g. full vs compg-k1.
"""
from __future__ import annotations

import pytest
import torch

from cg_fast import ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.guidance import Compress, EarlyStop, Full, UniformSkip
from cg_fast.testbeds.tiny import TinyConvClassifier, TinyConvEps

POLICIES = {
    "full": (Full(), "drop"),
    "compg-k1": (Compress(rate=5, k=1), "compress"),
    "compg-k5": (Compress(rate=5, k=5), "compress"),
    "early-stop": (EarlyStop(0.2), "drop"),
    "uniform-skip": (UniformSkip(rate=5), "drop"),
    "unguided": (None, None),
}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = TinyConvEps(width=32, depth=4).eval()
    clf = TinyConvClassifier(width=32, depth=4).eval()
    sampler = Sampler(model, NoiseSchedule.linear(1000), "50")
    return sampler, clf


@pytest.mark.parametrize("name", list(POLICIES))
def test_policy_cost(benchmark, setup, name):
    sampler, clf = setup
    policy, cache = POLICIES[name]
    guid = None if policy is None else ClassifierGuidance(clf, 1.0, policy=policy, cache=cache)
    y = torch.arange(8) % 10
    benchmark.group = "guidance policies, 50 DDPM steps, batch 8x3x32x32, CPU"

    def run():
        return sampler.sample((8, 3, 32, 32), y=y, guidance=guid, generator=torch.Generator().manual_seed(0))

    out = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    benchmark.extra_info.update({"denoiser_passes": out.stats.denoiser_passes,
                                 "classifier_grads": out.stats.classifier_grads,
                                 "guided_steps": len(out.stats.guided_steps)})
    assert out.stats.denoiser_passes == 50
