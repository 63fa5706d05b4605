"""Guidance semantics: cache-mode equivalences (spec §4), CFG (§6), exact accounting of passes and gradients."""
from __future__ import annotations

import pytest
import torch

from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.guidance import Compress, EarlyStop, Full, UniformSkip
from cg_fast.kernels import Col

SHAPE = (3, 3, 8, 8)
Y = torch.tensor([1, 5, 8])


def run(sampler, guidance, seed=0, y=Y, **kw):
    return sampler.sample(SHAPE, y=y, guidance=guidance, generator=torch.Generator().manual_seed(seed), **kw)


@pytest.fixture(params=["ddpm", "ddim"])
def sampler(request, tiny_eps_learned):
    return Sampler(tiny_eps_learned, NoiseSchedule.linear(1000), "20", request.param, learn_sigma=True,
                   kernels="reference")


@pytest.mark.parametrize("cache", ["compress", "reuse", "momentum"])
def test_full_policy_any_cache_equals_vanilla(sampler, tiny_classifier, cache):
    vanilla = run(sampler, ClassifierGuidance(tiny_classifier, 2.0, policy=Full(), cache="drop")).x
    other = run(sampler, ClassifierGuidance(tiny_classifier, 2.0, policy=Full(), cache=cache)).x
    assert torch.equal(vanilla, other)


def test_momentum_beta0_gamma1_equals_reuse(sampler, tiny_classifier):
    pol = Compress(rate=4, k=2)
    reuse = run(sampler, ClassifierGuidance(tiny_classifier, 2.0, policy=pol, cache="reuse")).x
    mom = run(sampler, ClassifierGuidance(tiny_classifier, 2.0, policy=pol, cache="momentum", beta=0.0,
                                          decay=1.0)).x
    assert torch.equal(reuse, mom)
    other = run(sampler, ClassifierGuidance(tiny_classifier, 2.0, policy=pol, cache="momentum", beta=0.5,
                                            decay=0.8)).x
    assert not torch.equal(reuse, other)


def test_cache_modes_differ_under_compress(sampler, tiny_classifier):
    pol = Compress(rate=4)
    outs = {c: run(sampler, ClassifierGuidance(tiny_classifier, 2.0, policy=pol, cache=c)).x
            for c in ("drop", "compress", "reuse")}
    assert not torch.equal(outs["drop"], outs["compress"])
    assert not torch.equal(outs["compress"], outs["reuse"])


def test_compress_scales_guidance_by_the_gap(tiny_eps, tiny_classifier):
    # With a constant-gradient classifier, compress at guided step j applies m_j * g; drop applies g.
    sampler = Sampler(tiny_eps, NoiseSchedule.linear(1000), "10", kernels="reference")
    guid = ClassifierGuidance(tiny_classifier, 1.5, policy=Compress(rate=5, k=1, final=0), cache="compress")
    table = sampler.table(guid)
    assert table[:, Col.G_WEIGHT].tolist() == [5, 0, 0, 0, 0, 5, 0, 0, 0, 0]
    assert table[:, Col.GUIDE_S].tolist() == [1.5] * 10


@pytest.mark.parametrize("policy", [Full(), Compress(rate=5, k=1), Compress(rate=5, k=5), EarlyStop(0.3),
                                    UniformSkip(rate=4)])
def test_classifier_called_exactly_at_guided_steps(tiny_eps, tiny_classifier, policy):
    calls = []

    def spy(x, t):
        calls.append(int(t[0]))
        return tiny_classifier(x, t)

    sampler = Sampler(tiny_eps, NoiseSchedule.linear(1000), "50")
    out = run(sampler, ClassifierGuidance(spy, 1.0, policy=policy, cache="compress"))
    t_of_j = sampler.schedule.original_timesteps_in_sampling_order()
    assert calls == [int(t_of_j[j]) for j in policy.guided_steps(50)]
    assert out.stats.classifier_grads == len(calls) == len(out.stats.guided_steps)
    assert out.stats.guided_steps == policy.guided_steps(50)
    assert sorted(out.stats.on_sampling) == out.stats.guided_steps
    assert out.stats.denoiser_passes == 50 and out.stats.denoiser_rows == 50 * 3


@pytest.mark.parametrize("batched", [True, False])
def test_cfg_rows_and_passes(tiny_eps, batched):
    sizes = []

    def spy(x, t, y=None):
        sizes.append(x.shape[0])
        return tiny_eps(x, t, y)

    sampler = Sampler(spy, NoiseSchedule.linear(1000), "50")
    pol = Compress(rate=5, k=1)
    out = run(sampler, CFG(scale=3.0, null_label=10, policy=pol, batched=batched))
    guided = set(pol.guided_steps(50))
    assert out.stats.classifier_grads == 0
    assert out.stats.denoiser_rows == 50 * 3 + len(guided) * 3
    if batched:
        assert out.stats.denoiser_passes == 50
        assert sizes == [6 if j in guided else 3 for j in range(50)]
    else:
        assert out.stats.denoiser_passes == 50 + len(guided)
        assert sizes.count(3) == 50 + len(guided)


def test_cfg_batched_equals_two_passes(tiny_eps):
    sampler = Sampler(tiny_eps, NoiseSchedule.linear(1000), "20", kernels="reference")
    a = run(sampler, CFG(scale=3.0, null_label=10, policy=Compress(rate=4), batched=True)).x
    b = run(sampler, CFG(scale=3.0, null_label=10, policy=Compress(rate=4), batched=False)).x
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cache", ["drop", "compress", "reuse", "momentum"])
def test_cfg_scale_one_equals_conditional_sampling(sampler, cache):
    cond = run(sampler, None).x
    w1 = run(sampler, CFG(scale=1.0, null_label=10, policy=Compress(rate=3), cache=cache)).x
    assert torch.equal(cond, w1)


def test_cfg_full_equals_the_dit_formula(tiny_eps_learned):
    """Full CFG = eps_u + w (eps_c - eps_u) on eps, variance from the conditional pass (DiT forward_with_cfg)."""
    w = 4.0

    def dit_style(x, t, y=None):
        c = tiny_eps_learned(x, t, y)
        u = tiny_eps_learned(x, t, torch.full_like(y, 10))
        eps = u[:, :3] + w * (c[:, :3] - u[:, :3])
        return torch.cat([eps, c[:, 3:]], dim=1)

    sched = NoiseSchedule.linear(1000)
    want = run(Sampler(dit_style, sched, "20", learn_sigma=True, kernels="reference"), None).x
    got = run(Sampler(tiny_eps_learned, sched, "20", learn_sigma=True, kernels="reference"),
              CFG(scale=w, null_label=10, policy=Full())).x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_cfg_channel_restriction(tiny_eps):
    sched = NoiseSchedule.linear(1000)
    s = Sampler(tiny_eps, sched, "10", method="ddim", kernels="reference")
    full = run(s, CFG(scale=5.0, null_label=10, policy=Full(), channels=None)).x
    two = run(s, CFG(scale=5.0, null_label=10, policy=Full(), channels=2)).x
    three = run(s, CFG(scale=5.0, null_label=10, policy=Full(), channels=3)).x
    assert torch.equal(full, three)
    assert not torch.equal(full, two)


def test_off_sampling_diagnostics(tiny_eps, tiny_classifier):
    torch.manual_seed(9)
    from conftest import TinyClassifier
    off = TinyClassifier().eval()
    sampler = Sampler(tiny_eps, NoiseSchedule.linear(1000), "20", off_classifier=off)
    out = run(sampler, ClassifierGuidance(tiny_classifier, 1.0, policy=Compress(rate=5)))
    assert sorted(out.stats.off_sampling) == list(range(20))
    rec = out.stats.off_sampling[19]
    assert rec.log_prob.shape == (3,) and 0.0 <= rec.accuracy <= 1.0 and rec.loss >= 0.0
    summary = out.stats.summary()
    assert summary["classifier_grads"] == 6 and "off_sampling_loss" in summary and "on_sampling_loss" in summary
