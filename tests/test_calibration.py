"""Calibrated policy (issue 19): the DP against brute force, closed-form weights, determinism, files, accounting."""
from __future__ import annotations

import itertools
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.cache import cache_plan
from cg_fast.calibration import (calibrate, calibrated_policy, calibration_key, choose_steps, load_calibration,
                                 objective, save_calibration, segment_costs, segment_weights, shift_coefficients)
from cg_fast.guidance import Calibrated, Compress, Full
from cg_fast.kernels import Col
from cg_fast.policies import gaps
from cg_fast.runs import RunError
from cg_fast.testbeds.gmm import GaussianMixture


def _gram(n: int, d: int = 5, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n, 4, d)) * rng.uniform(0.1, 2.0, size=(n, 1, 1)) + rng.normal(size=(1, 4, d))
    return np.einsum("tbd,sbd->ts", u, u) / 4


def _segment_j(gram: np.ndarray, lo: int, hi: int, a: int) -> tuple[float, float]:
    """Residual and least-squares weight of segment [lo, hi) guided at a, straight from the definition."""
    s_dot_u = gram[lo:hi, a].sum()
    w = s_dot_u / gram[a, a] if gram[a, a] > 0 else 0.0
    return gram[lo:hi, lo:hi].sum() - 2 * w * s_dot_u + w * w * gram[a, a], w


def _brute(gram: np.ndarray, k: int, anchor: str) -> float:
    """Every cut of [0, N) into k segments, every guided step inside each (free) or its first step."""
    n = gram.shape[0]
    best = np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = list(zip((0,) + cuts, cuts + (n,)))
        total = 0.0
        for lo, hi in bounds:
            reps = range(lo, hi) if anchor == "free" else [lo]
            total += min(_segment_j(gram, lo, hi, a)[0] for a in reps)
        best = min(best, total)
    return best


@pytest.mark.parametrize("anchor", ["free", "first"])
@pytest.mark.parametrize("n, k", [(1, 1), (5, 1), (6, 2), (7, 3), (8, 4), (8, 8), (9, 5)])
@pytest.mark.parametrize("seed", [0, 1])
def test_dp_matches_brute_force(n, k, seed, anchor):
    gram = _gram(n, seed=seed)
    guided, weights, obj = choose_steps(gram, k, anchor)
    assert len(guided) == k and guided == sorted(set(guided))
    assert obj == pytest.approx(_brute(gram, k, anchor), rel=1e-9, abs=1e-9)
    mask = [j in guided for j in range(n)]
    if anchor == "first":
        assert guided[0] == 0
        per_step = [0.0] * n
        for j, w in zip(guided, weights):
            per_step[j] = w
        assert objective(gram, per_step, mask) == pytest.approx(obj, rel=1e-9, abs=1e-9)
        assert segment_weights(gram, mask) == pytest.approx(per_step)
    else:  # free anchors can only do better
        assert obj <= choose_steps(gram, k, "first")[2] + 1e-12


def test_weights_are_the_least_squares_optimum():
    gram = _gram(9, seed=3)
    mask = [True, False, False, True, False, True, False, False, False]
    w = segment_weights(gram, mask)
    base = objective(gram, w, mask)
    for j in (0, 3, 5):
        for eps in (-1e-3, 1e-3):
            v = list(w)
            v[j] += eps
            assert objective(gram, v, mask) > base


@pytest.mark.parametrize("mask", [Compress(5, 1).mask(50), Compress(3, 2).mask(25), [True] + [False] * 6,
                                  [True, True, False, True]])
def test_constant_u_gives_the_gap_multipliers(mask):
    gram = np.full((len(mask), len(mask)), 2.5)  # u_t the same vector at every step
    assert segment_weights(gram, mask) == pytest.approx([float(m) for m in gaps(mask)])
    assert objective(gram, gaps(mask)) == pytest.approx(0.0, abs=1e-9)
    guided, weights, obj = choose_steps(gram, 4, "first")
    assert obj == pytest.approx(0.0, abs=1e-9)
    assert weights == pytest.approx([float(m) for m in gaps([j in guided for j in range(len(gram))]) if m])
    guided, weights, obj = choose_steps(gram, 4, "free")  # any step of a segment stands in for it equally
    assert obj == pytest.approx(0.0, abs=1e-9) and sum(weights) == pytest.approx(len(mask))


def test_segment_costs_zero_guidance_step():
    gram = np.zeros((3, 3))
    gram[1, 1] = gram[2, 2] = gram[1, 2] = gram[2, 1] = 1.0
    cost, weight, rep = segment_costs(gram, "first")
    assert weight[0, 3] == 0.0 and cost[0, 3] == pytest.approx(4.0)  # nothing to scale at step 0
    assert weight[1, 3] == pytest.approx(2.0) and cost[1, 3] == pytest.approx(0.0)
    cost, weight, rep = segment_costs(gram, "free")
    assert rep[0, 3] == 1 and weight[0, 3] == pytest.approx(2.0) and cost[0, 3] == pytest.approx(0.0)


def test_dp_rejects_bad_input():
    with pytest.raises(ValueError, match="budget"):
        choose_steps(np.eye(3), 0)
    with pytest.raises(ValueError, match="square"):
        choose_steps(np.ones((2, 3)), 1)
    with pytest.raises(ValueError, match="anchor"):
        choose_steps(np.eye(3), 1, "middle")


# -- policy and plan -------------------------------------------------------------------------------------------
def test_calibrated_policy_mask_weights_and_checks():
    p = Calibrated(budget=3, guided=(0, 2, 3), step_weights=(2.0, 0.5, 1.5), num_steps=5)
    assert p.mask(5) == [True, False, True, True, False]
    assert p.weights(5) == [2.0, 0.0, 0.5, 1.5, 0.0]
    assert cache_plan(p.mask(5), "compress", weights=p.weights(5)).g_weight == [2.0, 0.0, 0.5, 1.5, 0.0]
    assert cache_plan(p.mask(5), "drop", weights=p.weights(5)).g_weight == [1.0, 0.0, 1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="N = 5"):
        p.mask(6)
    with pytest.raises(ValueError, match="not been calibrated"):
        Calibrated(budget=3).mask(5)
    with pytest.raises(ValueError, match="at most budget"):
        Calibrated(budget=1, guided=(0, 2), step_weights=(1.0, 1.0), num_steps=5)
    with pytest.raises(ValueError, match="budget"):
        Calibrated(budget=0)


# -- the measuring run (exact GMM testbed: fast) ------------------------------------------------------------
@pytest.fixture(scope="module")
def gmm_setup():
    gmm = GaussianMixture.random(num_classes=4, dim=4, seed=0)
    sched = NoiseSchedule.linear(1000)
    clf = gmm.classifier(sched)
    samplers = {m: Sampler(gmm.eps_model(sched), sched, steps, m, class_cond=False, clip_denoised=False,
                           num_classes=4, kernels="reference")
                for m, steps in (("ddpm", "40"), ("ddim", "ddim20"), ("dpmpp2m", "15"))}
    return gmm, clf, samplers


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpmpp2m"])
def test_calibration_is_deterministic_and_accounted(gmm_setup, method):
    gmm, clf, samplers = gmm_setup
    s = samplers[method]
    guid = ClassifierGuidance(clf, 1.0, policy=Full(), cache="drop")
    a = calibrate(s, guid, 5, sample_shape=(gmm.dim,), batch=16, seed=3, model_id="gmm", classifier_id="exact")
    b = calibrate(s, guid, 5, sample_shape=(gmm.dim,), batch=16, seed=3, model_id="gmm", classifier_id="exact")
    assert a.guided == b.guided and a.weights == b.weights and a.objective == b.objective
    assert len(a.guided) == 5 and a.cost["data_var"] is None  # transport "none" (default)
    assert a.objective <= a.objective_even + 1e-12 and a.objective < a.objective_none
    n = s.num_steps
    assert a.cost["classifier_grads"] == n and a.cost["classifier_rows"] == 16 * n and a.cost["denoiser_rows"] == 16 * n
    # sampling with it: exactly K gradients, at the chosen steps, with the weights in the G_WEIGHT column
    g = replace(guid, policy=a.policy, cache="compress")
    out = s.sample((10, gmm.dim), y=torch.arange(10) % 4, guidance=g, generator=torch.Generator().manual_seed(0))
    assert out.stats.classifier_grads == 5 and out.stats.guided_steps == a.guided
    col = s.table(g)[:, Col.G_WEIGHT]
    assert col[a.guided].tolist() == pytest.approx(a.weights, rel=1e-6)
    assert (col != 0).nonzero().flatten().tolist() == a.guided


def test_shift_coefficients_signs(gmm_setup):
    _, clf, samplers = gmm_setup
    for s in samplers.values():
        c = shift_coefficients(s, ClassifierGuidance(clf, 2.0))
        assert c.shape == (s.num_steps,) and np.isfinite(c).all() and (c > 0).all()


def test_calibrated_with_gap_weights_equals_compress(gmm_setup):
    gmm, clf, samplers = gmm_setup
    s = samplers["ddpm"]
    mask = Compress(5, 1).mask(s.num_steps)
    guided = [j for j, m in enumerate(mask) if m]
    pol = Calibrated(budget=len(guided), guided=tuple(guided), step_weights=tuple(float(m) for m in gaps(mask) if m),
                     num_steps=s.num_steps)
    y = torch.arange(8) % 4
    run = lambda p: s.sample((8, gmm.dim), y=y, guidance=ClassifierGuidance(clf, 1.0, policy=p, cache="compress"),  # noqa: E731
                             generator=torch.Generator().manual_seed(1)).x
    assert torch.equal(run(pol), run(Compress(5, 1)))


def test_save_load_and_refuse(gmm_setup, tmp_path):
    gmm, clf, samplers = gmm_setup
    s = samplers["ddim"]
    guid = ClassifierGuidance(clf, 1.0)
    kw = dict(batch=8, seed=0, model_id="gmm", classifier_id="exact")
    cal = calibrate(s, guid, 4, sample_shape=(gmm.dim,), **kw)
    path = save_calibration(cal, tmp_path)
    assert path.parent == tmp_path and json.loads(path.read_text())["key"]["budget"] == 4
    key = calibration_key(s, guid, 4, **kw)
    back = load_calibration(tmp_path, key)
    assert back.guided == cal.guided and back.weights == cal.weights and back.policy == cal.policy
    assert load_calibration(path, key).policy == cal.policy
    with pytest.raises(FileNotFoundError, match="calibrate"):
        load_calibration(tmp_path, calibration_key(s, guid, 5, **kw))
    with pytest.raises(RunError, match="budget"):  # a file of another key is refused, naming what differs
        load_calibration(path, calibration_key(s, guid, 5, **kw))
    with pytest.raises(RunError, match="scale"):
        load_calibration(path, calibration_key(s, replace(guid, scale=2.0), 4, **kw))
    with pytest.raises(RunError, match="anchor"):
        load_calibration(path, calibration_key(s, guid, 4, anchor="first", **kw))
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"kind": "cg_fast calibration", "key": key, "guided": [0, 0]}))
    with pytest.raises(RunError, match="broken"):
        load_calibration(broken, key)
    # the service path: load only, never calibrate at sampling time
    assert calibrated_policy(s, guid, 4, tmp_path, allow_calibration=False, **kw) == cal.policy
    with pytest.raises(FileNotFoundError):
        calibrated_policy(s, guid, 3, tmp_path, allow_calibration=False, **kw)
    made = calibrated_policy(s, guid, 3, tmp_path, sample_shape=(gmm.dim,), **kw)
    assert made.budget == 3 and len(list(tmp_path.glob("classifier-*.json"))) == 2


# -- CFG: where to run the unconditional pass ---------------------------------------------------------------
def test_cfg_calibration(tiny_eps):
    s = Sampler(tiny_eps, NoiseSchedule.linear(1000), "12", "ddim", kernels="reference", num_classes=10)
    cfg = CFG(3.0, null_label=10, policy=Full())
    cal = calibrate(s, cfg, 4, sample_shape=(3, 8, 8), batch=4, seed=0, model_id="tiny")
    assert len(cal.guided) == 4 and cal.key["kind"] == "cfg" and cal.cost["denoiser_rows"] == 2 * 4 * 12
    g = replace(cfg, policy=cal.policy, cache="compress")
    out = s.sample((2, 3, 8, 8), y=torch.tensor([1, 2]), guidance=g, generator=torch.Generator().manual_seed(0))
    assert out.stats.guided_steps == cal.guided
    assert out.stats.denoiser_rows == 2 * (12 + 4)  # B per step + B more at the 4 guided (batched 2B) steps
    assert s.table(g)[cal.guided, Col.G_WEIGHT].tolist() == pytest.approx(cal.weights, rel=1e-6)


def test_gaussian_transport(gmm_setup):
    gmm, clf, samplers = gmm_setup
    from cg_fast.calibration import transport
    s = samplers["ddim"]
    rho = transport(s, 0.3)
    assert rho[-1] == pytest.approx(1.0) and (np.diff(rho) > 0).all()  # early, noisy shifts count less
    assert (transport(s, None) == 1.0).all()
    cal = calibrate(s, ClassifierGuidance(clf, 1.0), 4, sample_shape=(gmm.dim,), batch=8, transport_mode="gaussian")
    assert cal.cost["data_var"] > 0 and cal.key["transport"] == "gaussian" and len(cal.guided) == 4


def test_shipped_digits_calibrations_load_without_a_run():
    from cg_fast.testbeds.digits import CALIBRATIONS_DIR, load_testbed

    files = sorted(CALIBRATIONS_DIR.glob("*.json"))
    assert files, "the digits testbed ships its calibrations"
    tb = load_testbed(networks=("uncond", "guide"))
    specs = {("ddim", 25): "ddim25", ("dpmpp2m", 20): "20", ("ddpm", 250): "250", ("ddpm", 50): "50"}
    for path in files:
        d = json.loads(path.read_text())
        key = d["key"]
        s = tb.sampler("uncond", specs[(key["method"], len(key["steps"]))], key["method"])
        guid = ClassifierGuidance(tb.guide, key["scale"])
        pol = tb.calibrated(s, guid, key["budget"])  # allow_calibration=False: a missing file would raise
        assert list(pol.guided) == d["guided"] and len(pol.guided) == key["budget"]
        assert calibration_key(s, guid, key["budget"], batch=64, seed=1000) == key
        if key["method"] == "ddim":
            out = s.sample(tb.shape(4), y=tb.labels(4), guidance=replace(guid, policy=pol, cache="compress"),
                           generator=torch.Generator().manual_seed(0))
            assert out.stats.classifier_grads == key["budget"]


def test_calibration_cost_against_a_50k_run():
    """The shipped calibrations' recorded cost, as a fraction of a 50k-sample run with the same sampler and budget."""
    from cg_fast.testbeds.digits import CALIBRATIONS_DIR

    for path in sorted(CALIBRATIONS_DIR.glob("*.json")):
        d = json.loads(path.read_text())
        n, k, cost = len(d["key"]["steps"]), d["key"]["budget"], d["cost"]
        assert cost["denoiser_rows"] == cost["classifier_rows"] == 64 * n and cost["classifier_grads"] == n
        run_rows = 50_000 * n + 50_000 * k  # denoiser rows + classifier-gradient rows of the 50k run
        assert (cost["denoiser_rows"] + cost["classifier_rows"]) / run_rows < 0.01
        assert cost["denoiser_rows"] / (50_000 * n) < 0.0013
