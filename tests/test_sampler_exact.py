"""Same seed, same samples as guided-diffusion: bitwise agreement with the independent oracle."""
from __future__ import annotations

import pytest
import torch

from adm_oracle import Oracle, make_cond_fn
from cg_fast import ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.guidance import Full
from cg_fast.schedules import space_timesteps

SHAPE = (3, 3, 8, 8)


def oracle_for(sched: NoiseSchedule, steps: str, **kw) -> Oracle:
    use = space_timesteps(sched.num_steps, steps)
    from adm_oracle import spaced_betas
    betas, tmap = spaced_betas(sched.betas, set(use))
    return Oracle(betas, tmap, **kw)


CASES = [
    # (schedule, steps, method, eta, learned, variance, clip, class_cond)
    ("linear", "25", "ddpm", 0.0, False, "fixed_large", True, True),
    ("cosine", "20", "ddpm", 0.0, True, "fixed_large", True, True),
    ("linear", "10,5,5", "ddpm", 0.0, False, "fixed_small", False, True),
    ("cosine", "ddim20", "ddim", 0.0, True, "fixed_large", True, True),
    ("linear", "16", "ddim", 1.0, False, "fixed_large", True, False),
    ("linear", "30", "ddpm", 0.0, True, "fixed_large", False, False),
]


def _kernel_impls():
    from cg_fast import kernels
    impls = ["reference"]
    if kernels.available("csrc", "cpu"):
        impls.append("csrc")  # the CPU default: fused, and bitwise too (same op order, torch's exp)
    return impls


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "full-guidance"])
@pytest.mark.parametrize("impl", _kernel_impls())
def test_bitwise_equal_to_guided_diffusion(case, guided, impl, tiny_eps, tiny_eps_learned, tiny_classifier):
    sched_name, steps, method, eta, learned, variance, clip, class_cond = case
    sched = NoiseSchedule.named(sched_name, 1000)
    model = tiny_eps_learned if learned else tiny_eps
    y = torch.tensor([1, 4, 7])
    scale = 2.5
    orc = oracle_for(sched, steps, learned=learned, fixed=variance.split("_")[1], clip=clip,
                     class_cond=class_cond)
    torch.manual_seed(1234)
    want = orc.loop(model, SHAPE, y=y,
                    cond_fn=make_cond_fn(tiny_classifier, scale) if guided else None, method=method, eta=eta)

    sampler = Sampler(model, sched, steps, method, eta=eta, learn_sigma=learned, clip_denoised=clip,
                      class_cond=class_cond, variance=variance, kernels=impl)
    guid = ClassifierGuidance(tiny_classifier, scale, policy=Full(), cache="drop") if guided else None
    torch.manual_seed(1234)
    got = sampler.sample(SHAPE, y=y, guidance=guid)
    assert torch.equal(got.x, want), f"max diff {(got.x - want).abs().max():.3g}"
    assert got.stats.classifier_grads == (sampler.num_steps if guided else 0)


def test_generator_draws_the_same_sequence_as_the_global_rng(tiny_eps, tiny_classifier):
    sched = NoiseSchedule.linear(1000)
    sampler = Sampler(tiny_eps, sched, "20")
    guid = ClassifierGuidance(tiny_classifier, 1.0, policy=Full(), cache="drop")
    y = torch.tensor([0, 1, 2])
    torch.manual_seed(7)
    a = sampler.sample(SHAPE, y=y, guidance=guid).x
    b = sampler.sample(SHAPE, y=y, guidance=guid, generator=torch.Generator().manual_seed(7)).x
    assert torch.equal(a, b)


def test_noise_argument_is_the_initial_state(tiny_eps):
    sched = NoiseSchedule.linear(1000)
    sampler = Sampler(tiny_eps, sched, "10")
    y = torch.tensor([0, 1, 2])
    torch.manual_seed(3)
    a = sampler.sample(SHAPE, y=y).x
    torch.manual_seed(3)
    x_T = torch.randn(*SHAPE)
    keep = x_T.clone()
    b = sampler.sample(SHAPE, y=y, noise=x_T).x
    assert torch.equal(a, b)
    assert torch.equal(x_T, keep), "the caller's noise tensor must not be modified"


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_seeded_runs_are_bitwise_reproducible(method, tiny_eps, tiny_classifier):
    from cg_fast.guidance import Compress
    sched = NoiseSchedule.cosine(1000)
    sampler = Sampler(tiny_eps, sched, "25", method, eta=0.5 if method == "ddim" else 0.0)
    guid = ClassifierGuidance(tiny_classifier, 3.0, policy=Compress(rate=5, k=2), cache="momentum", beta=0.3,
                              decay=0.9)
    y = torch.tensor([3, 3, 9])
    outs = [sampler.sample(SHAPE, y=y, guidance=guid, generator=torch.Generator().manual_seed(11)).x
            for _ in range(2)]
    assert torch.equal(outs[0], outs[1])
    other = sampler.sample(SHAPE, y=y, guidance=guid, generator=torch.Generator().manual_seed(12)).x
    assert not torch.equal(outs[0], other)
