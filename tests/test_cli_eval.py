"""`cg-fast eval`: FD, precision/recall and IS of sample batches equal numbers computed here independently
(numpy/scipy on the same features); the ADM reference layout gives FD only and says so; the Inception path's
plumbing runs through a stand-in torch-fidelity; bad input says what to do; the record resumes or refuses."""
from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import scipy.linalg
import torch

from cg_fast.cli import main
from cg_fast.eval import from_uint8, save_sample_batch
from cg_fast.eval import inception as inception_mod
from cg_fast.testbeds.digits import load_testbed
from cg_fast.testbeds.digits_data import load_digits_data


# -- independent references ----------------------------------------------------------------------------
def fd_scipy(a: np.ndarray, b: np.ndarray | None = None, mu2=None, s2=None) -> float:
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    if b is not None:
        mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fd_gram(a: np.ndarray, b: np.ndarray) -> float:
    """FD of high-dimensional features with few samples: the nonzero eigenvalues of S1 S2 are those of the small
    matrix A1 A2^T A2 A1^T / ((n1 - 1)(n2 - 1)) (A: centred features), so no D x D square root is needed."""
    a1, a2 = a - a.mean(0), b - b.mean(0)
    m = a1 @ a2.T @ a2 @ a1.T / ((len(a) - 1) * (len(b) - 1))
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvals(m).real, 0, None)).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (a1 ** 2).sum() / (len(a) - 1) + (a2 ** 2).sum() / (len(b) - 1) - 2 * tr_covmean)


def pr_bruteforce(real: np.ndarray, gen: np.ndarray, k: int = 3) -> tuple[float, float]:
    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself
    d = np.sqrt(((gen[:, None] - real[None]) ** 2).sum(-1))  # [gen, real]
    precision = (d <= radii(real)[None]).any(1).mean()
    recall = (d.T <= radii(gen)[None]).any(1).mean()
    return float(precision), float(recall)


def is_numpy(logits: np.ndarray) -> float:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(p.mean(0)))).sum(1).mean()))


@pytest.fixture(scope="module")
def digits_files(tmp_path_factory):
    """Two small sample batches and a reference batch of real (and perturbed) digits, uint8 NHWC."""
    d = tmp_path_factory.mktemp("digits")
    data = load_digits_data()
    g = torch.Generator().manual_seed(0)
    noisy = (data.x[60:120] + 0.4 * torch.randn(60, 1, 8, 8, generator=g)).clamp(-1, 1)
    save_sample_batch(d / "a.npz", data.x[:60], data.y[:60])
    save_sample_batch(d / "b.npz", noisy, data.y[60:120])
    save_sample_batch(d / "ref.npz", data.x[200:300])
    return d


def judge_outputs(path):
    tb = load_testbed(networks=("judge",))
    with np.load(path) as z:
        x = from_uint8(z["arr_0"])
        labels = z["arr_1"] if "arr_1" in z.files else None
    with torch.no_grad():
        logits = tb.judge(x, torch.zeros(len(x), dtype=torch.long)).double().numpy()
    return tb.features(x).numpy(), logits, labels


def test_two_batches_against_a_reference_batch(digits_files, tmp_path, capsys):
    d = digits_files
    rec = tmp_path / "eval.json"
    assert main(["eval", str(d / "a.npz"), str(d / "b.npz"), "--ref", str(d / "ref.npz"), "--out", str(rec),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("| /") for line in out.splitlines()) == 2 and "judge acc" in out  # a row per file
    runs = json.loads(rec.read_text())["runs"]
    ref_feats, _, _ = judge_outputs(d / "ref.npz")
    for name in ("a.npz", "b.npz"):
        feats, logits, labels = judge_outputs(d / name)
        got = runs[str(d / name)]
        assert got["n"] == 60
        assert got["fd"] == pytest.approx(fd_scipy(feats, ref_feats), rel=1e-6, abs=1e-9)
        p, r = pr_bruteforce(ref_feats, feats)
        assert (got["precision"], got["recall"]) == (pytest.approx(p), pytest.approx(r))
        assert got["is"] == pytest.approx(is_numpy(logits), rel=1e-6)
        assert got["label_acc"] == pytest.approx(float((logits.argmax(1) == labels).mean()))
    assert runs[str(d / "a.npz")]["fd"] < runs[str(d / "b.npz")]["fd"]  # noise moves the features away


def test_adm_reference_layout_gives_fd_only(digits_files, tmp_path, capsys):
    d = digits_files
    ref_feats, _, _ = judge_outputs(d / "ref.npz")
    mu, sigma = ref_feats.mean(0), np.cov(ref_feats, rowvar=False)
    np.savez(tmp_path / "VIRTUAL_digits.npz", mu=mu, sigma=sigma, mu_s=mu[:4], sigma_s=sigma[:4, :4])
    rec = tmp_path / "adm.json"
    assert main(["eval", str(d / "a.npz"), "--ref", str(tmp_path / "VIRTUAL_digits.npz"), "--out", str(rec),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "statistics only" in out and "FD only" in out and "precision" not in out.splitlines()[0]
    got = json.loads(rec.read_text())["runs"][str(d / "a.npz")]
    feats, _, _ = judge_outputs(d / "a.npz")
    assert got["fd"] == pytest.approx(fd_scipy(feats, mu2=mu, s2=sigma), rel=1e-6)
    assert got["precision"] is None and got["recall"] is None


def test_record_resumes_and_refuses_other_settings(digits_files, tmp_path, capsys, monkeypatch):
    d = digits_files
    rec = tmp_path / "r.json"
    args = ["eval", str(d / "a.npz"), "--ref", "digits", "--out", str(rec), "--no-progress"]
    assert main(args) == 0
    first = json.loads(rec.read_text())["runs"]
    from cg_fast.eval import score

    monkeypatch.setattr(score, "score_batch", lambda *a, **k: pytest.fail("a finished row was scored again"))
    assert main(args) == 0
    assert json.loads(rec.read_text())["runs"] == first
    capsys.readouterr()
    assert main([*args, "--k", "5"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "k: 3 -> 5" in err


# -- the Inception path, through a stand-in torch-fidelity -------------------------------------------------
def _stand_in(images_nchw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Features: per-channel means and stds, repeated to 2048; logits: 8 fixed projections of the means."""
    x = images_nchw.double() / 255
    stats = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)               # [b, 6]
    feats = stats.repeat(1, 342)[:, :2048] + 0.01 * torch.arange(2048, dtype=torch.double) * stats[:, :1]
    logits = 5 * stats[:, :3] @ torch.linspace(-1, 1, 24, dtype=torch.double).reshape(3, 8)
    return feats.float(), logits.float()


@pytest.fixture
def fake_fidelity(tmp_path, monkeypatch):
    calls = []

    class Extractor(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kw):
            super().__init__()
            calls.append((name, list(features_list), feature_extractor_weights_path))
            self.names = list(features_list)

        def forward(self, x):
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            f, lg = _stand_in(x)
            return tuple({"2048": f, "logits_unbiased": lg}[n] for n in self.names)

    sub = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    sub.FeatureExtractorInceptionV3 = Extractor
    pkg = types.ModuleType("torch_fidelity")
    pkg.feature_extractor_inceptionv3 = sub
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", sub)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stand-in")
    inception_mod._load_extractor.cache_clear()
    yield weights, calls
    inception_mod._load_extractor.cache_clear()


def test_inception_plumbing_with_a_stand_in_network(fake_fidelity, tmp_path):
    weights, calls = fake_fidelity
    g = torch.Generator().manual_seed(1)
    batches = {n: torch.randint(0, 256, (n_img, 12, 12, 3), dtype=torch.uint8, generator=g).numpy()
               for n, n_img in (("s.npz", 30), ("ref.npz", 40))}
    batches["s.npz"][:, :, :, 0] //= 2  # a darker red channel: features that differ from the reference's
    for name, arr in batches.items():
        save_sample_batch(tmp_path / name, arr)
    rec = tmp_path / "inc.json"
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception-weights",
                 str(weights), "--device", "cpu", "--batch-size", "7", "--out", str(rec), "--no-progress"]) == 0
    assert calls and all(c == ("inception-v3-compat", ["2048", "logits_unbiased"], str(weights.resolve()))
                         for c in calls)
    got = json.loads(rec.read_text())
    assert got["config"]["features"] == "inception" and got["config"]["is_splits"] == 10  # auto: not 8x8x1
    row = got["runs"][str(tmp_path / "s.npz")]
    f_s, lg_s = (t.double().numpy() for t in _stand_in(torch.from_numpy(batches["s.npz"]).permute(0, 3, 1, 2)))
    f_r, _ = (t.double().numpy() for t in _stand_in(torch.from_numpy(batches["ref.npz"]).permute(0, 3, 1, 2)))
    assert row["fd"] == pytest.approx(fd_gram(f_s, f_r), rel=1e-4)
    assert (row["precision"], row["recall"]) == tuple(pytest.approx(v) for v in pr_bruteforce(f_r, f_s))
    parts = [is_numpy(lg_s[i * 3:(i + 1) * 3]) for i in range(10)]
    assert row["is"] == pytest.approx(np.mean(parts), rel=1e-4) and row["is_std"] == pytest.approx(np.std(parts))


def test_inception_needs_a_local_weights_file(digits_files, capsys, tmp_path):
    assert main(["eval", str(digits_files / "a.npz"), "--ref", str(digits_files / "ref.npz"), "--features",
                 "inception", "--out", ""]) == 2
    assert "needs --inception-weights FILE" in capsys.readouterr().err


# -- errors ------------------------------------------------------------------------------------------------
def test_bad_input_says_what_to_do(digits_files, tmp_path, capsys):
    d = digits_files
    np.savez(tmp_path / "noarr.npz", images=np.zeros((4, 8, 8, 1), np.uint8))
    save_sample_batch(tmp_path / "rgb.npz", np.zeros((4, 16, 16, 3), np.uint8))
    np.savez(tmp_path / "inc_stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp_path / "half.npz", mu=np.zeros(64))
    a, ref = str(d / "a.npz"), str(d / "ref.npz")
    cases = [
        ([str(tmp_path / "missing.npz"), "--ref", ref], "samples file"),
        ([a, "--ref", str(tmp_path / "nope.npz")], "reference"),
        ([str(tmp_path / "noarr.npz"), "--ref", ref, "--features", "digits"], "has no arr_0"),
        ([a, "--ref", str(tmp_path / "noarr.npz")], "neither images (arr_0) nor statistics"),
        ([str(tmp_path / "rgb.npz"), "--ref", ref, "--features", "digits"], "take 8x8x1 images; these are 16x16x3"),
        ([a, "--ref", str(tmp_path / "inc_stats.npz")], "2048-d statistics but the digits features are 64-d"),
        ([a, "--ref", str(tmp_path / "half.npz")], "mu without sigma"),
        ([a, "--ref", ref, "--features", "digit"], "unknown --features 'digit' (did you mean digits?)"),
        ([a, "--ref", str(tmp_path / "single.npz")], "holds a single array, not an .npz archive"),
    ]
    with open(tmp_path / "single.npz", "wb") as f:
        np.save(f, np.zeros(3))
    for argv, message in cases:
        assert main(["eval", *argv, "--out", "", "--no-progress"]) == 2, argv
        assert message in capsys.readouterr().err, argv


def test_shape_mismatch_between_samples_and_reference(fake_fidelity, tmp_path, capsys):
    weights, _ = fake_fidelity
    save_sample_batch(tmp_path / "s.npz", np.zeros((12, 16, 16, 3), np.uint8))
    save_sample_batch(tmp_path / "r.npz", np.zeros((12, 12, 12, 3), np.uint8))
    assert main(["eval", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "r.npz"), "--inception-weights",
                 str(weights), "--device", "cpu", "--out", "", "--no-progress"]) == 2
    assert "samples are 16x16x3 images but the reference's are 12x12x3" in capsys.readouterr().err
