"""cg_fast.eval: Fréchet distance, precision/recall, Inception score, ADM .npz batches, Inception plumbing.

Every metric is checked against cases whose answer is known by hand or in closed form.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from cg_fast.eval import (
    FeatureStats,
    frechet_distance,
    from_uint8,
    inception_features,
    inception_score,
    load_sample_batch,
    precision_recall,
    save_sample_batch,
    to_uint8,
)

frechet_mod = importlib.import_module("cg_fast.eval.frechet")
npz_mod = importlib.import_module("cg_fast.eval.npz")
inception_mod = importlib.import_module("cg_fast.eval.inception")


def random_spd(d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((d, d))
    return a @ a.T + 0.1 * np.eye(d)


def fd_closed_form_reference(mu1, s1, mu2, s2) -> float:
    """Independent FD: scipy's general sqrtm where available, else the eigenvalues of the non-symmetric S1 S2."""
    try:
        from scipy.linalg import sqrtm
        tr_covmean = float(np.real(np.trace(sqrtm(s1 @ s2))))
    except ImportError:
        tr_covmean = float(np.sqrt(np.clip(np.real(np.linalg.eigvals(s1 @ s2)), 0, None)).sum())
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------------------------- Fréchet
def test_fd_identical_sets_is_zero():
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)) * 3 + 1
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)
    st = FeatureStats.from_features(x)
    assert frechet_distance(st, st) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(x.numpy(), st) == pytest.approx(0.0, abs=1e-8)  # arrays and stats mix


def test_fd_one_dimensional_by_hand():
    # N(0, 1) vs N(3, 4): 3^2 + 1 + 4 - 2 * sqrt(1 * 4) = 10
    a = FeatureStats(np.array([0.0]), np.array([[1.0]]))
    b = FeatureStats(np.array([3.0]), np.array([[4.0]]))
    assert frechet_distance(a, b) == pytest.approx(10.0, abs=1e-12)


def test_fd_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([1.0, 1.0, 0.5])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    want = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()  # commuting covariances
    got = frechet_distance(FeatureStats(mu1, np.diag(s1), 10), FeatureStats(mu2, np.diag(s2), 10))
    assert got == pytest.approx(want, rel=1e-12)
    assert want == pytest.approx(7.25 + 4 + 1 + 0)  # means 1 + 6.25; variances (1-3)^2 + (2-1)^2 + 0


def test_fd_non_commuting_matches_independent_sqrtm():
    d = 6
    s1, s2 = random_spd(d, 1), random_spd(d, 2)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    mu1, mu2 = np.arange(d, dtype=float), np.ones(d)
    got = frechet_distance(FeatureStats(torch.tensor(mu1), torch.tensor(s1)), FeatureStats(mu2, s2))
    assert got == pytest.approx(fd_closed_form_reference(mu1, s1, mu2, s2), rel=1e-9)


def test_fd_singular_covariance_is_handled():
    # rank-1 covariances (fewer samples than dimensions in practice): sqrt eigenvalues clamp round-off negatives
    u, v = np.array([1.0, 2.0, 0.0, 0.0]), np.array([0.0, 1.0, 1.0, 0.0])
    s1, s2 = np.outer(u, u), np.outer(v, v)
    # tr((S1 S2)^(1/2)) = |u.v| for rank-1 PSD matrices uu^T, vv^T
    want = u @ u + v @ v - 2 * abs(u @ v)
    assert frechet_distance(FeatureStats(np.zeros(4), s1), FeatureStats(np.zeros(4), s2)) == \
        pytest.approx(want, abs=1e-9)


def test_fd_of_large_samples_approaches_closed_form():
    d, n = 4, 20000
    rng = np.random.default_rng(3)
    s1, s2 = random_spd(d, 4) / 4, random_spd(d, 5) / 4
    mu1, mu2 = np.zeros(d), np.array([1.0, -0.5, 0.0, 0.25])
    x = rng.multivariate_normal(mu1, s1, size=n)
    y = rng.multivariate_normal(mu2, s2, size=n)
    want = fd_closed_form_reference(mu1, s1, mu2, s2)
    assert want > 1.0
    assert frechet_distance(x, y) == pytest.approx(want, rel=0.03)
    assert frechet_distance(x, rng.multivariate_normal(mu1, s1, size=n)) < 0.02  # same law: FD -> 0


def test_feature_stats_match_numpy_and_chunking(monkeypatch):
    x = np.random.default_rng(0).standard_normal((103, 5)).astype(np.float32) + 7
    monkeypatch.setattr(frechet_mod, "_CHUNK", 10)  # several chunks, a ragged last one
    st = FeatureStats.from_features(torch.from_numpy(x))
    assert st.n == 103 and st.mu.dtype == np.float64 and st.sigma.shape == (5, 5)
    np.testing.assert_allclose(st.mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(x.astype(np.float64), rowvar=False), rtol=1e-10, atol=1e-12)


def test_feature_stats_save_load_round_trip(tmp_path):
    st = FeatureStats.from_features(np.random.default_rng(1).standard_normal((50, 3)))
    path = st.save(tmp_path / "ref.npz")
    back = FeatureStats.load(path)
    assert back.n == 50
    np.testing.assert_array_equal(back.mu, st.mu)
    np.testing.assert_array_equal(back.sigma, st.sigma)
    assert [p.name for p in tmp_path.iterdir()] == ["ref.npz"]  # no temporary file left behind
    # ADM-style reference statistics: only mu and sigma
    np.savez(tmp_path / "adm.npz", mu=st.mu, sigma=st.sigma)
    assert FeatureStats.load(tmp_path / "adm.npz").n is None
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
    with pytest.raises(ValueError, match="lacks"):
        FeatureStats.load(tmp_path / "bad.npz")


def test_fd_input_errors():
    x = np.random.default_rng(2).standard_normal((10, 4))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(x, x[:, :3])
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(x, x[:1])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        frechet_distance(x, bad)
    bad[3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        FeatureStats.from_features(bad)
    with pytest.raises(ValueError, match="2-D"):
        FeatureStats.from_features(x[None])
    with pytest.raises(ValueError, match="to match mu"):
        FeatureStats(np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="not symmetric"):
        FeatureStats(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(FeatureStats(np.zeros(2), np.diag([1.0, -1.0])), FeatureStats(np.zeros(2), np.eye(2)))
    with pytest.raises(ValueError, match="positive semi-definite"):
        frechet_distance(FeatureStats(np.zeros(2), np.eye(2)), FeatureStats(np.zeros(2), np.diag([1.0, -1.0])))


# -------------------------------------------------------------------------------------- precision/recall
REAL_1D = [0.0, 1.0, 10.0, 12.0]                     # k=1 radii 1, 1, 2, 2: manifold [-1, 2] u [8, 14]
GEN_1D = [-1.0, 2.0, 5.0, 6.0, 14.0, 16.0, 30.0, 31.0]  # k=1 radii 3, 3, 1, 1, 2, 2, 1, 1


@pytest.mark.parametrize("batch_size", [2, 3, 4096])
def test_pr_hand_built_1d(batch_size):
    real, gen = torch.tensor(REAL_1D)[:, None], torch.tensor(GEN_1D)[:, None]
    pr = precision_recall(real, gen, k=1, batch_size=batch_size)
    # precision: -1, 2 and 14 lie on ball boundaries (inside); 5, 6, 16, 30, 31 outside -> 3/8
    # recall: 0 in [-4, 2], 1 in [-1, 5], 12 on the edge of [12, 16]; 10 is in no generated ball -> 3/4
    assert (pr.precision, pr.recall) == (3 / 8, 3 / 4)
    assert pr.as_dict() == {"precision": 3 / 8, "recall": 3 / 4}
    swapped = precision_recall(gen, real, k=1, batch_size=batch_size)
    assert (swapped.precision, swapped.recall) == (pr.recall, pr.precision)


@pytest.mark.parametrize("k,want", [(2, 2 / 4), (3, 3 / 4)])
def test_pr_hand_built_2d_square(k, want):
    real = np.array([[0, 0], [1, 0], [0, 1], [1, 1]], dtype=float)  # k=2 radius 1, k=3 radius sqrt(2)
    gen = np.array([[0.5, 0.5], [2, 0], [2, 2], [-1.5, 0]], dtype=float)
    # distances to the nearest corner: sqrt(.5) (in), 1 (in), sqrt(2) (in only for k=3), 1.5 (out)
    assert precision_recall(real, gen, k=k, batch_size=3).precision == want


def test_pr_identical_and_disjoint_sets():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x.clone()).as_dict() == {"precision": 1.0, "recall": 1.0}
    far = precision_recall(x, x + 1000.0)
    assert (far.precision, far.recall) == (0.0, 0.0)


def test_pr_generated_covers_half_of_real():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(150, 2, generator=g), torch.randn(150, 2, generator=g) + torch.tensor([100.0, 0.0])
    real = torch.cat([a, b])
    exact = precision_recall(real, a.clone(), k=3, batch_size=64)   # the generated set is real's cluster A
    assert (exact.precision, exact.recall) == (1.0, 0.5)
    fresh = precision_recall(real, torch.randn(150, 2, generator=g), k=3, batch_size=64)  # new draws from A
    assert fresh.precision > 0.9 and 0.4 < fresh.recall <= 0.5


def test_pr_float32_agrees_off_ties():
    g = torch.Generator().manual_seed(2)
    real, gen = torch.randn(120, 5, generator=g), torch.randn(90, 5, generator=g) * 1.3
    a = precision_recall(real, gen, k=3, batch_size=50)
    b = precision_recall(real, gen, k=3, batch_size=50, dtype=torch.float32)
    assert a == b and 0.0 < a.precision < 1.0 and 0.0 < a.recall < 1.0


def test_pr_input_errors():
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="more than k samples"):
        precision_recall(x, x[:3], k=3)
    with pytest.raises(ValueError, match="dimensions differ"):
        precision_recall(x, x[:, :2], k=1)
    with pytest.raises(ValueError, match="positive integer"):
        precision_recall(x, x, k=0)
    with pytest.raises(ValueError, match="NaN or inf"):
        precision_recall(x, torch.full((5, 3), float("nan")), k=1)
    with pytest.raises(ValueError, match="2-D"):
        precision_recall(x[None], x, k=1)


# ----------------------------------------------------------------------------------------- Inception score
def test_is_uniform_and_constant_predictions_give_one():
    assert inception_score(torch.zeros(10, 7)) == (pytest.approx(1.0, abs=1e-12), 0.0)
    same = torch.tensor([[2.0, -1.0, 0.5]]).repeat(10, 1)  # every sample predicts the same distribution
    assert inception_score(same).mean == pytest.approx(1.0, abs=1e-12)


def test_is_confident_and_balanced_gives_num_classes():
    k = 5
    onehot = torch.eye(k).repeat(3, 1)  # 15 samples, each class 3 times, probability 1
    assert inception_score(onehot, probs=True).mean == pytest.approx(k, rel=1e-12)
    assert inception_score(onehot.log(), log_probs=True).mean == pytest.approx(k, rel=1e-12)  # log 0 = -inf
    assert inception_score(100.0 * onehot).mean == pytest.approx(k, rel=1e-12)  # logits: softmax ~ one-hot


def test_is_two_samples_by_hand():
    # p(y|x) = [1, 0], [.5, .5]; p(y) = [.75, .25]; KLs log(4/3) and .5 log(4/3) -> IS = (4/3)^(3/4)
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    assert inception_score(p, probs=True).mean == pytest.approx((4 / 3) ** 0.75, rel=1e-12)


def test_is_splits_mean_and_std():
    # first half all class 0 (score 1); second half balanced over 2 classes, one-hot (score 2)
    probs = torch.tensor([[1.0, 0.0]] * 4 + [[1.0, 0.0], [0.0, 1.0]] * 2)
    mean, std = inception_score(probs, splits=2, probs=True)
    assert (mean, std) == (pytest.approx(1.5, rel=1e-12), pytest.approx(0.5, rel=1e-12))


def test_is_input_errors():
    with pytest.raises(ValueError, match="at most one"):
        inception_score(torch.zeros(4, 2), probs=True, log_probs=True)
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(torch.ones(4, 2), probs=True)
    with pytest.raises(ValueError, match="logsumexp"):
        inception_score(torch.zeros(4, 2), log_probs=True)
    with pytest.raises(ValueError, match="non-empty splits"):
        inception_score(torch.zeros(3, 2), splits=4)
    with pytest.raises(ValueError, match="NaN"):
        inception_score(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\[n, K\]"):
        inception_score(torch.zeros(4))


# ------------------------------------------------------------------------------------------ ADM .npz
def test_to_uint8_formula_on_known_values():
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.5, 2.0, -3.0, 0.999]).reshape(1, 1, 2, 4)
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 2, 4, 1)
    # (x + 1) * 127.5, clamped, truncated by the cast: 0, 255, 127 (127.5), 191 (191.25), 63 (63.75), 255, 0, 254
    assert u.flatten().tolist() == [0, 255, 127, 191, 63, 255, 0, 254]


def test_to_uint8_permutes_nchw_to_nhwc():
    x = torch.full((2, 3, 4, 5), -1.0)
    x[1, 2, 3, 4] = 1.0  # image 1, channel 2, row 3, column 4
    u = to_uint8(x)
    assert u.shape == (2, 4, 5, 3) and u[1, 3, 4, 2] == 255 and int(u.sum()) == 255


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_from_uint8_inverts_to_uint8_exactly(dtype):
    u = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1)
    x = from_uint8(u, dtype=dtype)
    assert x.dtype == dtype and x.shape == (1, 1, 16, 16)
    assert torch.equal(to_uint8(x), u)
    nominal = u.permute(0, 3, 1, 2).double() / 127.5 - 1
    ulp = torch.finfo(dtype).eps * 2
    assert float((x.double() - nominal).abs().max()) <= ulp  # at most ~1 ulp from u / 127.5 - 1
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_npz_round_trip_uint8_with_labels(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9])
    path = save_sample_batch(tmp_path / "samples.npz", images, labels)
    with np.load(path) as raw:  # the ADM evaluator's keys
        assert sorted(raw.files) == ["arr_0", "arr_1"]
    got, got_labels = load_sample_batch(path)
    assert got.dtype == np.uint8 and np.array_equal(got, images)
    assert got_labels.dtype == np.int64 and np.array_equal(got_labels, labels)
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]


def test_npz_float_grayscale_without_labels(tmp_path):
    u = torch.randint(0, 256, (4, 5, 6, 1), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = from_uint8(u)  # float NCHW [4, 1, 5, 6]
    save_sample_batch(tmp_path / "g.npz", x)
    got, labels = load_sample_batch(tmp_path / "g.npz")
    assert labels is None and got.shape == (4, 5, 6, 1)
    assert np.array_equal(got, u.numpy())


def test_npz_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "s.npz"
    save_sample_batch(path, np.zeros((1, 2, 2, 3), np.uint8))
    before = path.read_bytes()

    def broken_savez(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(npz_mod.np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_sample_batch(path, np.full((1, 2, 2, 3), 7, np.uint8))
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # and the temporary file is gone


def test_npz_save_errors(tmp_path):
    with pytest.raises(ValueError, match="NHWC"):
        save_sample_batch(tmp_path / "a.npz", np.zeros((2, 3, 8, 8), np.uint8))  # uint8 NCHW by mistake
    with pytest.raises(ValueError, match="labels"):
        save_sample_batch(tmp_path / "a.npz", np.zeros((2, 8, 8, 3), np.uint8), labels=[1, 2, 3])
    with pytest.raises(ValueError, match="integers"):
        save_sample_batch(tmp_path / "a.npz", np.zeros((2, 8, 8, 3), np.uint8), labels=[0.5, 1.5])
    with pytest.raises(ValueError, match="NaN or inf"):
        save_sample_batch(tmp_path / "a.npz", torch.full((1, 3, 2, 2), float("nan")))
    assert list(tmp_path.iterdir()) == []


def test_npz_load_errors(tmp_path):
    np.savez(tmp_path / "nokey.npz", images=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="no arr_0"):
        load_sample_batch(tmp_path / "nokey.npz")
    np.savez(tmp_path / "float.npz", np.zeros((1, 2, 2, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_sample_batch(tmp_path / "float.npz")
    np.savez(tmp_path / "ndim.npz", np.zeros((2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="NHWC"):
        load_sample_batch(tmp_path / "ndim.npz")
    np.savez(tmp_path / "labels.npz", np.zeros((2, 2, 2, 3), np.uint8), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="labels"):
        load_sample_batch(tmp_path / "labels.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable"):
        load_sample_batch(tmp_path / "junk.npz")
    np.save(tmp_path / "single.npy", np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match="single array"):
        load_sample_batch(tmp_path / "single.npy")
    with pytest.raises(FileNotFoundError):
        load_sample_batch(tmp_path / "missing.npz")


# ------------------------------------------------------------------------------------------ Inception
@pytest.fixture
def weights_file(tmp_path):
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    path.write_bytes(b"stand-in; the fake extractor never reads it")
    inception_mod._load_extractor.cache_clear()
    yield path
    inception_mod._load_extractor.cache_clear()


def install_fake_torch_fidelity(monkeypatch, old: bool = False):
    """A stand-in torch_fidelity whose extractor records its arguments and returns channel means as features."""
    calls = {"init": [], "batches": []}

    class FakeExtractor(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__()
            calls["init"].append((name, list(features_list), feature_extractor_weights_path))

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.ndim == 4 and x.shape[1] == 3  # what torch-fidelity demands
            calls["batches"].append(x.shape[0])
            means = x.double().mean(dim=(2, 3))                      # [b, 3]
            return (means.repeat(1, 683)[:, :2048].float(),)          # a tuple, like torch-fidelity

    class OldExtractor(torch.nn.Module):  # releases before feature_extractor_weights_path existed
        def __init__(self, name, features_list, **kwargs):
            super().__init__()

    pkg = types.ModuleType("torch_fidelity")
    sub = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    sub.FeatureExtractorInceptionV3 = OldExtractor if old else FakeExtractor
    pkg.feature_extractor_inceptionv3 = sub
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", sub)
    return calls


def test_inception_needs_local_weights(tmp_path):
    with pytest.raises(ValueError, match="never downloads") as e:
        inception_features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), None)
    assert "2015-12-05" in str(e.value)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        inception_features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), tmp_path / "nope.pth")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_installed(weights_file):
    """The real import failure in this venv (torch-fidelity is not installable beside its torch build)."""
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        inception_features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), weights_file)


def test_inception_blocked_torch_fidelity_and_old_release(weights_file, monkeypatch):
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch_fidelity", None)  # import fails whether or not it is installed
        m.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
        with pytest.raises(ImportError, match="pip install torch-fidelity"):
            inception_features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), weights_file)
    install_fake_torch_fidelity(monkeypatch, old=True)
    with pytest.raises(ImportError, match="too old"):
        inception_features(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), weights_file)


def test_inception_plumbing_with_fake_extractor(weights_file, monkeypatch):
    """Batching, layout conversion and weight-path forwarding through a fake torch_fidelity.

    The real Inception network is not exercised here: torch-fidelity (and its weights) are not available in
    this environment, so the fake extractor returns per-channel means that the test can predict.
    """
    calls = install_fake_torch_fidelity(monkeypatch)
    nchw = torch.randint(0, 256, (10, 3, 6, 7), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    feats = inception_features(nchw, weights_file, batch_size=4, device="cpu")
    assert feats.shape == (10, 2048) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert calls["batches"] == [4, 4, 2]
    assert calls["init"] == [("inception-v3-compat", ["2048"], str(weights_file.resolve()))]
    torch.testing.assert_close(feats[:, :3], nchw.double().mean(dim=(2, 3)).float())
    # NHWC numpy input gives the same features; the network is loaded once and reused
    again = inception_features(nchw.permute(0, 2, 3, 1).numpy(), weights_file, batch_size=16, device="cpu")
    torch.testing.assert_close(again, feats)
    assert len(calls["init"]) == 1 and calls["batches"][3:] == [10]
    # grayscale is repeated to 3 channels
    gray = nchw[:, :1]
    g = inception_features(gray, weights_file, device="cpu")
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])


def test_inception_input_errors(weights_file, monkeypatch):
    install_fake_torch_fidelity(monkeypatch)
    with pytest.raises(ValueError, match="to_uint8"):
        inception_features(torch.zeros(2, 3, 8, 8), weights_file)
    with pytest.raises(ValueError, match="layout="):
        inception_features(torch.zeros(2, 3, 8, 3, dtype=torch.uint8), weights_file)  # NCHW or NHWC?
    assert inception_features(torch.zeros(2, 3, 8, 3, dtype=torch.uint8), weights_file, layout="NCHW",
                              device="cpu").shape == (2, 2048)
    with pytest.raises(ValueError, match="RGB"):
        inception_features(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), weights_file, layout="NCHW")
    with pytest.raises(ValueError, match="batch_size"):
        inception_features(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), weights_file, batch_size=0)
