"""Noise schedules and ADM respacing."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cg_fast import NoiseSchedule
from cg_fast.schedules import space_timesteps


def test_linear_matches_ddpm_definition():
    s = NoiseSchedule.linear(1000)
    assert s.betas.dtype == np.float64 and s.num_steps == 1000
    assert s.betas[0] == pytest.approx(1e-4) and s.betas[-1] == pytest.approx(0.02)
    # fewer training steps: same range, rescaled (ADM: scale = 1000 / T)
    assert NoiseSchedule.linear(500).betas[-1] == pytest.approx(0.04)


def test_cosine_alpha_bar():
    s = NoiseSchedule.cosine(1000)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 10, 500, 900):
        assert s.alphas_cumprod[t] == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    assert s.betas.max() <= 0.999


def test_from_betas_validates():
    with pytest.raises(ValueError, match="betas"):
        NoiseSchedule.from_betas([0.1, 1.5])
    with pytest.raises(ValueError, match="unknown noise schedule"):
        NoiseSchedule.named("quadratic")


@pytest.mark.parametrize("spec, expect", [
    ("250", 250), ("50", 50), ("1000", 1000), ("10,15,20", 45), (25, 25),
])
def test_respacing_counts(spec, expect):
    assert len(space_timesteps(1000, spec)) == expect


def test_respacing_values():
    assert space_timesteps(1000, "ddim25") == list(range(0, 1000, 40))
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    steps = space_timesteps(1000, "4")
    assert steps == [0, 333, 666, 999]  # round(333.0), round(666.0), 999
    two = space_timesteps(10, "2,3")
    assert two == [0, 4, 5, 7, 9]


@pytest.mark.parametrize("bad", ["ddimX", "abc", "0", "2000", "ddim7"])
def test_bad_respacing_says_what_to_use(bad):
    with pytest.raises(ValueError):
        space_timesteps(1000 if bad != "ddim7" else 10, bad)


def test_spaced_alpha_bar_equals_base_at_kept_steps():
    base = NoiseSchedule.linear(1000)
    sp = base.respace("50")
    np.testing.assert_allclose(sp.alphas_cumprod, base.alphas_cumprod[sp.timestep_map], rtol=1e-12)
    assert sp.original_timesteps_in_sampling_order()[0] == 999
    assert sp.original_timesteps_in_sampling_order()[-1] == 0
