"""The trained (imperfect) noisy classifier of the Gaussian-mixture testbed, checked against the exact one."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from cg_fast import ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.guidance import Full
from cg_fast.testbeds.gmm import GaussianMixture
from cg_fast.testbeds.gmm_trained import (
    DEFAULT_GMM,
    DEFAULT_SCHEDULE,
    DEFAULT_WEIGHTS,
    EVAL_TS,
    GMMClassifierConfig,
    GMMTrainedClassifier,
    default_gmm_classifier,
    evaluate_against_exact,
    load_gmm_classifier,
    save_gmm_classifier,
    train_gmm_classifier,
)
from cg_fast.testbeds.gmm_trained import _one_thread as one_thread  # tiny tensors: threads only add syncs

SCHED = NoiseSchedule.linear(1000)
N_FRESH = 20_000  # per t; with the recorded n = 20 000 the 5-sigma bands below are a few 0.01 wide at most




@pytest.fixture(scope="module")
def shipped():
    gmm, sched, clf = default_gmm_classifier()
    record = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    fresh = evaluate_against_exact(clf, gmm, sched, n=N_FRESH, seed=2024)  # not the recorded seed
    return gmm, sched, clf, record, fresh


def test_default_mixture_is_the_demos():
    demo_gmm = GaussianMixture.random(num_classes=8, dim=8, std=0.3, seed=0)  # the GMM demo's mixture
    gmm, sched, clf = default_gmm_classifier()
    assert torch.equal(gmm.means, demo_gmm.means) and torch.equal(gmm.weights, demo_gmm.weights)
    assert (sched.alphas_cumprod == SCHED.alphas_cumprod).all()
    assert DEFAULT_SCHEDULE == {"name": "linear", "num_timesteps": 1000}
    assert not clf.training and (clf.config.dim, clf.num_classes) == (8, 8)


def test_shipped_files_are_small_and_complete():
    assert DEFAULT_WEIGHTS.stat().st_size < 100_000
    record = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    for key in ("config", "gmm", "schedule", "training", "torch", "evaluation"):
        assert key in record, key
    assert {"steps", "batch", "lr", "seed", "hidden", "seconds", "threads"} <= set(record["training"])
    assert record["evaluation"]["ts"] == list(EVAL_TS)


def test_recorded_evaluation_reproduces_with_its_seed(shipped):
    gmm, sched, clf, record, _ = shipped
    rec = record["evaluation"]
    again = evaluate_against_exact(clf, gmm, sched, ts=rec["ts"], n=rec["n"], seed=rec["seed"])
    for t, r in rec["per_t"].items():  # same samples, same weights: equal up to float32 summation order
        for k, v in r.items():
            assert again["per_t"][t][k] == pytest.approx(v, rel=1e-4, abs=1e-6), (t, k)


def test_shipped_weights_reach_recorded_quality_on_fresh_samples(shipped):
    _, _, _, record, fresh = shipped
    rec = record["evaluation"]
    for t, r in rec["per_t"].items():
        f = fresh["per_t"][t]
        # difference of two independent means: 5 standard errors of the difference
        kl_tol = 5 * math.hypot(r["kl_se"], f["kl_se"])
        assert abs(f["kl"] - r["kl"]) <= kl_tol, (t, f["kl"], r["kl"], kl_tol)
        for key in ("acc_trained", "acc_exact"):
            p = r[key]
            acc_tol = 5 * math.sqrt(p * (1 - p) * (1 / rec["n"] + 1 / fresh["n"]))
            assert abs(f[key] - p) <= acc_tol, (t, key, f[key], p, acc_tol)


def test_trained_is_imperfect_but_far_better_than_chance(shipped):
    _, _, _, _, fresh = shipped
    rows = fresh["per_t"]
    r0 = rows["0"]
    # imperfect: KL to the exact posterior is measurably positive (many standard errors) at every t
    for t, r in rows.items():
        assert r["kl"] > 5 * r["kl_se"] and r["kl"] > 1e-4, t
    assert r0["kl"] > 0.005
    # useful: at t = 0 nearly the Bayes accuracy, far above chance (1/8)
    assert r0["acc_exact"] > 0.85
    assert r0["acc_trained"] > r0["acc_exact"] - 0.02 and r0["agreement"] > 0.95
    assert r0["kl"] < 0.1
    # Gibbs: E[CE(trained)] - E[CE(exact)] = E[KL] >= 0 (labels are drawn from the exact posterior)
    for t, r in rows.items():
        diff = r["ce_trained"] - r["ce_exact"]
        assert diff == pytest.approx(r["kl"], abs=0.02 + 5 * r["kl_se"]), t


def test_exact_against_itself_has_zero_kl():
    gmm = GaussianMixture.random(num_classes=4, dim=3, seed=1, equal_weights=False)
    ev = evaluate_against_exact(gmm.classifier(SCHED), gmm, SCHED, ts=(0, 500, 999), n=2000, seed=0)
    for r in ev["per_t"].values():
        assert r["kl"] == 0.0 and r["kl_se"] == 0.0 and r["agreement"] == 1.0
        assert r["acc_trained"] == r["acc_exact"] and r["ce_trained"] == r["ce_exact"]
    assert ev["mean_kl"] == 0.0


def test_kl_by_hand_for_a_uniform_classifier():
    gmm = GaussianMixture.random(num_classes=4, dim=3, seed=1, equal_weights=False)

    def uniform(x, t):
        return torch.zeros(x.shape[0], 4)

    t, n, seed = 100, 3000, 7
    ev = evaluate_against_exact(uniform, gmm, SCHED, ts=(t,), n=n, seed=seed)["per_t"][str(t)]
    # rebuild the same samples: y, x_0, eps drawn in that order from the evaluation's generator
    g = torch.Generator().manual_seed(seed)
    y = gmm.sample_labels(n, generator=g)
    x0 = gmm.sample(y, generator=g).double()
    eps = torch.randn(n, 3, generator=g, dtype=torch.float64)
    ab = float(SCHED.alphas_cumprod[t])
    xt = (math.sqrt(ab) * x0 + math.sqrt(1 - ab) * eps).float().double()
    logp = torch.log_softmax(gmm.classifier(SCHED)(xt, torch.full((n,), t)), dim=1)
    entropy = -(logp.exp() * logp).sum(1)
    # KL(p || uniform) = log K - H(p); CE(uniform) = log K; argmax of ties is class 0
    assert ev["kl"] == pytest.approx(float((math.log(4) - entropy).mean()), rel=1e-9)
    assert ev["ce_trained"] == pytest.approx(math.log(4), rel=1e-12)
    assert ev["acc_trained"] == pytest.approx(float((y == 0).double().mean()))


def test_training_is_reproducible_and_leaves_global_rng_alone():
    gmm = GaussianMixture.random(num_classes=3, dim=2, seed=5)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = train_gmm_classifier(gmm, SCHED, steps=30, batch=64, seed=3)
    torch.set_num_threads(threads + 1)  # training runs on one thread: the setting does not matter
    try:
        b = train_gmm_classifier(gmm, SCHED, steps=30, batch=64, seed=3)
        assert torch.get_num_threads() == threads + 1  # restored
    finally:
        torch.set_num_threads(threads)
    c = train_gmm_classifier(gmm, SCHED, steps=30, batch=64, seed=4)
    assert torch.equal(torch.get_rng_state(), state)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.training


def test_short_training_learns_and_logs():
    gmm, sched, _ = default_gmm_classifier()
    lines: list[str] = []
    clf = train_gmm_classifier(gmm, sched, steps=200, batch=128, seed=1, log=lines.append)
    assert len(lines) == 10 and lines[-1].startswith("step 200/200: loss")
    r = evaluate_against_exact(clf, gmm, sched, ts=(0,), n=4000, seed=5)["per_t"]["0"]
    assert r["acc_trained"] > 0.6  # chance is 1/8
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train_gmm_classifier(gmm, sched, steps=0)


def test_trained_classifier_guides_sampling(shipped):
    gmm, sched, clf, _, _ = shipped
    n, d = 800, gmm.dim
    y = torch.arange(n) % gmm.num_classes
    sampler = Sampler(gmm.eps_model(sched), sched, "50", "ddpm", class_cond=False, clip_denoised=False)

    def accuracy(classifier) -> float:
        guidance = None if classifier is None else ClassifierGuidance(classifier, 1.0, policy=Full(), cache="drop")
        with one_thread():
            out = sampler.sample((n, d), y=y, guidance=guidance, generator=torch.Generator().manual_seed(0))
        return gmm.posterior_accuracy(out.x, y)

    unguided, exact, trained = accuracy(None), accuracy(gmm.classifier(sched)), accuracy(clf)
    assert unguided < 0.25                      # labels are independent of unguided samples: ~1/8
    assert trained > unguided + 0.5 and trained > 0.75
    assert trained > exact - 0.05               # same noise: close to exact guidance


def test_forward_is_capture_safe_and_flattens():
    clf = GMMTrainedClassifier(GMMClassifierConfig(dim=8, num_classes=5)).eval()
    x, t = torch.randn(6, 2, 4), torch.randint(0, 1000, (6,))
    out = clf(x, t)
    assert out.shape == (6, 5) and out.dtype == torch.float32
    assert torch.equal(out, clf(x.reshape(6, 8), t)) and torch.equal(out, clf(x, t))  # deterministic
    torch.testing.assert_close(clf(x, torch.tensor(7))[:1], clf(x[:1], torch.tensor([7])))  # scalar t broadcasts
    assert clf.double()(x.double(), t).dtype == torch.float64
    # on the meta device any host sync or CPU tensor made inside forward would raise
    meta = GMMTrainedClassifier(GMMClassifierConfig(dim=8, num_classes=5)).to("meta")
    assert meta(torch.empty(6, 8, device="meta"), torch.empty(6, dtype=torch.long, device="meta")).shape == (6, 5)
    with pytest.raises(ValueError, match="dimension 8"):
        clf(torch.randn(6, 3), t)


def test_save_load_round_trip(tmp_path):
    clf = GMMTrainedClassifier(GMMClassifierConfig(dim=3, num_classes=4, hidden=16)).eval()
    path = save_gmm_classifier(clf, tmp_path / "c.pt", {"note": "x"})
    back = load_gmm_classifier(path)
    x, t = torch.randn(5, 3), torch.randint(0, 1000, (5,))
    assert torch.equal(back(x, t), clf(x, t)) and back.config == clf.config and not back.training
    rec = json.loads((tmp_path / "c.json").read_text())
    assert rec["note"] == "x" and rec["config"]["hidden"] == 16 and rec["torch"] == torch.__version__
    with pytest.raises(TypeError):  # meta not JSON-serialisable: nothing written
        save_gmm_classifier(clf, tmp_path / "d.pt", {"bad": object()})
    assert not (tmp_path / "d.pt").exists()


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-testbed"):
        load_gmm_classifier(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a saved GMM classifier"):
        load_gmm_classifier(tmp_path / "junk.pt")
    torch.save({"weights": 1}, tmp_path / "nodict.pt")
    with pytest.raises(ValueError, match="'config' and 'state_dict'"):
        load_gmm_classifier(tmp_path / "nodict.pt")

    payload = torch.load(DEFAULT_WEIGHTS, weights_only=True)
    wrong = dict(payload, config=dict(payload["config"], dim=5))
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="do not match their config"):
        load_gmm_classifier(tmp_path / "wrong.pt")
    torch.save(dict(payload, config=dict(payload["config"], width=3)), tmp_path / "unknown.pt")
    with pytest.raises(ValueError, match="unknown classifier config keys"):
        load_gmm_classifier(tmp_path / "unknown.pt")
    torch.save(dict(payload, config=dict(payload["config"], hidden=0)), tmp_path / "zero.pt")
    with pytest.raises(ValueError, match="hidden must be a positive integer"):
        load_gmm_classifier(tmp_path / "zero.pt")


def test_default_checks_the_recorded_mixture(tmp_path):
    pt = tmp_path / "gmm_classifier.pt"
    shutil.copy(DEFAULT_WEIGHTS, pt)
    with pytest.raises(FileNotFoundError, match=r"gmm_classifier\.json.*missing"):
        default_gmm_classifier(pt)
    record = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    record["gmm"]["std"] = 0.5
    pt.with_suffix(".json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="not the demo's"):
        default_gmm_classifier(pt)
    record["gmm"]["std"] = DEFAULT_GMM["std"]
    record["gmm"]["means"][0][0] += 0.1
    pt.with_suffix(".json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="different means"):
        default_gmm_classifier(pt)
