"""Guidance policies: every count of spec §3, multipliers, validation."""
from __future__ import annotations

import math

import pytest

from cg_fast import NoiseSchedule
from cg_fast.cache import cache_plan
from cg_fast.guidance import Compress, EarlyStop, Full, Interval, UniformSkip
from cg_fast.policies import gaps, make_policy

SPEC_COUNTS = [  # spec §3, N = 250
    (5, 1, 52), (5, 2, 49), (5, 3, 43), (5, 4, 38), (5, 5, 34), (5, 6, 30), (10, 1, 27), (10, 5, 19),
]


@pytest.mark.parametrize("rate, k, count", SPEC_COUNTS)
def test_compress_counts_from_spec(rate, k, count):
    assert sum(Compress(rate=rate, k=k).mask(250)) == count


@pytest.mark.parametrize("rate, k, _", SPEC_COUNTS)
@pytest.mark.parametrize("n", [250, 50, 37, 1000])
def test_compress_multipliers_sum_to_n(rate, k, _, n):
    mask = Compress(rate=rate, k=k).mask(n)
    m = gaps(mask)
    assert mask[0] and mask[-1] and mask[-2]  # j = 0 and the two final steps
    assert sum(m) == n
    assert all((mj > 0) == g for mj, g in zip(m, mask))


def test_compress_k_packs_early():
    early = lambda k: sum(Compress(rate=5, k=k).mask(250)[:125])  # noqa: E731
    assert early(5) > early(1)
    assert Compress(rate=5, k=1).guided_steps(250)[:3] == [0, 5, 10]


def test_full_early_stop_uniform_counts():
    assert sum(Full().mask(250)) == 250
    assert sum(EarlyStop(0.2).mask(250)) == 50 and EarlyStop(0.2).mask(250)[:50] == [True] * 50
    assert sum(EarlyStop(0.204).mask(250)) == 51  # the paper's ES guides ~51 of 250
    ug = UniformSkip(rate=5).mask(250)
    assert sum(ug) == 52
    assert ug[0] and ug[-1] and ug[-2] and not ug[1]  # t = 249: (249 + 1) % 5 == 0


def test_interval_uses_noise_levels():
    sched = NoiseSchedule.linear(1000).respace("50")
    sig = sched.sigmas[::-1]
    mask = Interval(lo=0.28, hi=5.42).mask(sched)
    assert mask == [0.28 <= s <= 5.42 for s in sig]
    assert 0 < sum(mask) < 50
    with pytest.raises(TypeError, match="schedule"):
        Interval(0.1, 1.0).mask(50)


def test_gaps_when_first_step_not_guided():
    assert gaps([False, True, False, False, True, False]) == [0, 3, 0, 0, 2, 0]


@pytest.mark.parametrize("make, match", [
    (lambda: Compress(rate=0), "rate"),
    (lambda: Compress(rate=2.5), "rate"),
    (lambda: Compress(k=0), "k"),
    (lambda: Compress(k=-1), "k"),
    (lambda: Compress(final=-1), "final"),
    (lambda: UniformSkip(rate=0), "rate"),
    (lambda: UniformSkip(final=-2), "final"),
    (lambda: EarlyStop(1.5), "fraction"),
    (lambda: Interval(2.0, 1.0), "lo"),
    (lambda: make_policy("sometimes"), "unknown guidance policy"),
])
def test_bad_policy_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_cache_plans():
    mask = [True, False, False, True, False]
    assert cache_plan(mask, "drop").g_weight == [1, 0, 0, 1, 0]
    assert cache_plan(mask, "compress").g_weight == [3, 0, 0, 2, 0]
    reuse = cache_plan(mask, "reuse")
    assert reuse.stateful and reuse.h_decay == [0, 1, 1, 0, 1] and reuse.g_weight == [1, 0, 0, 1, 0]
    mom = cache_plan(mask, "momentum", beta=0.25, decay=0.5)
    assert mom.h_decay == [0, 0.5, 0.5, 0.25, 0.5] and mom.g_weight == [1, 0, 0, 0.75, 0]
    same = cache_plan(mask, "momentum", beta=0.0, decay=1.0)
    assert (same.h_decay, same.g_weight) == (reuse.h_decay, reuse.g_weight)
    with pytest.raises(ValueError, match="unknown cache mode"):
        cache_plan(mask, "lru")
    with pytest.raises(ValueError, match="apply to cache='momentum' only"):
        cache_plan(mask, "reuse", beta=0.5)
    assert math.isclose(sum(cache_plan(Compress().mask(250), "compress").g_weight), 250)
