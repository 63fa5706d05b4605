"""Data safety (issue 11): the quality study's results are keyed by every setting and never mixed with or
overwritten by a smoke run; engine caches; checkpoints; sample files; metric inputs."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

from cg_fast.runs import RunError

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("quality_study", ROOT / "benchmarks" / "quality_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _no_sampling(monkeypatch):
    from cg_fast.sampler import Sampler

    def sample(*a, **k):
        raise AssertionError("sampling started before the check")
    monkeypatch.setattr(Sampler, "sample", sample)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- the quality study -----------------------------------------------------------------------------------------
def test_study_quick_run_writes_elsewhere_by_default(tmp_path, monkeypatch):
    qs = _study()
    shipped = _snapshot(qs.SHIPPED_OUT)
    monkeypatch.chdir(tmp_path)
    seen = []

    def stop(out, settings, log=print):
        seen.append((Path(out).resolve(), settings["num_samples"]))
        raise RunError("stop here")
    monkeypatch.setattr(qs, "Study", stop)
    assert qs.main(["--quick", "--no-gmm"]) == 2
    assert seen == [((tmp_path / "out" / "quality_study_quick").resolve(), qs.QUICK["num_samples"])]
    assert _snapshot(qs.SHIPPED_OUT) == shipped


def test_study_refuses_to_mix_settings_in_one_folder(tmp_path, monkeypatch, capsys):
    """A smoke run pointed at the full study's results is refused before sampling (the sample count, samplers and
    ladders are in the key): it neither adds 60-sample rows nor serves them to a 500-sample run."""
    qs = _study()
    for name in ("results.json", "gmm.json"):
        shutil.copy(qs.SHIPPED_OUT / name, tmp_path / name)
    before = _snapshot(tmp_path)
    _no_sampling(monkeypatch)
    assert qs.main(["--quick", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "num_samples: 4000 -> 400" in err and "another output path" in err  # gmm.json is checked first
    assert qs.main(["--quick", "--no-gmm", "--out", str(tmp_path)]) == 2
    assert "num_samples: 500 -> 60" in capsys.readouterr().err
    assert _snapshot(tmp_path) == before


def test_study_shipped_results_resume_under_the_current_settings():
    """The shipped results record the settings they were made with; the full study resumes them as they are."""
    from cg_fast.runs import resume_or_refuse

    qs = _study()
    study = qs.Study(qs.SHIPPED_OUT, qs.study_settings({}), log=lambda s: None)
    assert len(study.results) == 445 and study.num_samples == qs.NUM_SAMPLES
    gmm = resume_or_refuse(qs.SHIPPED_OUT / "gmm.json", qs.gmm_settings({}), qs.GMM_KIND, log=lambda s: None)
    assert set(gmm["runs"]) >= {"full (trained clf)", "unguided"}


@pytest.mark.parametrize("content", ["null", "[]"])
def test_study_broken_results_file_is_reported(tmp_path, monkeypatch, capsys, content):
    qs = _study()
    _no_sampling(monkeypatch)
    (tmp_path / "results.json").write_text(content)
    assert qs.main(["--quick", "--no-gmm", "--out", str(tmp_path)]) == 2
    assert "move it aside or delete it" in capsys.readouterr().err
    assert (tmp_path / "results.json").read_text() == content


# -- engine caches: TensorRT's EngineCache ----------------------------------------------------------------------
def _engine_key(**kw):
    from cg_fast.backends.engine_cache import EngineKey

    base = dict(weights="w", shapes=(("x", (2, 3, 8, 8)),), dtype="fp16", gpu="H200 sm_90", trt_version="10.9")
    return EngineKey(**{**base, **kw})


def _builder(calls: list):
    def build():
        calls.append(1)
        return b"engine" + bytes(range(40))
    return build


@pytest.mark.parametrize("sidecar", ["[]", "null", '"x"', "7"])
def test_engine_cache_sidecar_not_an_object_is_evicted_and_rebuilt(tmp_path, sidecar):
    from cg_fast.backends.engine_cache import EngineCache

    cache, key, calls = EngineCache(tmp_path), _engine_key(), []
    blob, _ = cache.get_or_build(key, _builder(calls))
    cache.paths(key)[1].write_text(sidecar)
    assert cache.load(key) is None and not any(p.exists() for p in cache.paths(key))
    assert cache.get_or_build(key, _builder(calls)) == (blob, True) and cache.load(key) == blob


def test_engine_cache_folder_or_link_in_place_of_a_file(tmp_path):
    from cg_fast.backends.engine_cache import EngineCache

    root, outside = tmp_path / "cache", tmp_path / "outside.bin"
    outside.write_bytes(b"not yours")
    cache, key, calls = EngineCache(root), _engine_key(), []
    blob_path, meta_path = cache.paths(key)
    blob_path.mkdir()
    (blob_path / "inner").write_text("x")
    blob, built = cache.get_or_build(key, _builder(calls))
    assert built and blob_path.is_file() and cache.load(key) == blob
    # a link planted at the blob's name is removed (not followed) on load, and replaced on store
    blob_path.unlink()
    blob_path.symlink_to(outside)
    assert cache.load(key) is None and not blob_path.exists() and outside.read_bytes() == b"not yours"
    blob_path.symlink_to(outside)
    cache.store(key, blob)
    assert not blob_path.is_symlink() and outside.read_bytes() == b"not yours" and cache.load(key) == blob


def test_engine_cache_unwritable_runs_uncached_with_one_warning(tmp_path, monkeypatch):
    from cg_fast.backends import engine_cache as ec

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning, match="not writable.*CG_FAST_CACHE") as rec:
        cache = ec.EngineCache(blocker / "engines")
        calls: list = []
        for _ in range(2):
            blob, built = cache.get_or_build(_engine_key(), _builder(calls))
            assert built and blob.startswith(b"engine")
    assert len(rec) == 1 and not cache.writable
    # a folder that exists but refuses writes (read-only): the finished engine is kept, with one warning

    def refuse(path, data):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(ec, "_atomic_write", refuse)
    cache2 = ec.EngineCache(tmp_path / "ro")
    with pytest.warns(RuntimeWarning, match="not writable") as rec:
        for _ in range(2):
            blob, built = cache2.get_or_build(_engine_key(), _builder(calls))
            assert built and blob.startswith(b"engine")
    assert len(rec) == 1


# -- engine caches: the ONNX Runtime backend ---------------------------------------------------------------------
def test_onnx_fingerprint_sees_values_and_settings():
    from cg_fast.backends.onnxrt import model_fingerprint
    from cg_fast.schedules import NoiseSchedule
    from cg_fast.testbeds import GaussianMixture

    sched = NoiseSchedule.linear(100)
    gmm = GaussianMixture.random(3, 2, std=0.3, seed=0)
    wide = GaussianMixture.random(3, 2, std=0.5, seed=0)  # same means (buffers), another std (a plain attribute)
    assert model_fingerprint(gmm.eps_model(sched)) == model_fingerprint(gmm.eps_model(sched))
    assert model_fingerprint(gmm.eps_model(sched)) != model_fingerprint(wide.eps_model(sched))


def test_onnx_cache_keyed_by_weights_reused_atomic_and_link_safe(tmp_path, tiny_eps):
    """One test, two exports: the cache is reused by a new object (as by a new process), an in-place
    load_state_dict is noticed, a write through .data needs refresh(), planted links are never followed and a
    corrupt entry is removed."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import torch

    from cg_fast.backends.onnxrt import OnnxDenoiser
    from cg_fast.testbeds.tiny import TinyConvEps

    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 2])
    eager = lambda: tiny_eps(x, t, y).detach()  # noqa: E731
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "model.onnx").write_bytes(b"keep")
    cache = tmp_path / "cache"
    first = OnnxDenoiser(tiny_eps, provider="cpu", cache_dir=cache)
    entry = first.entry_path(x, t, y)
    entry.symlink_to(victim, target_is_directory=True)
    torch.testing.assert_close(first(x, t, y), eager(), rtol=1e-5, atol=1e-5)
    assert (victim / "model.onnx").read_bytes() == b"keep" and entry.is_dir() and not entry.is_symlink()
    assert first.exported == 1 and not [p for p in cache.iterdir() if p.name.endswith(".tmp")]

    second = OnnxDenoiser(tiny_eps, provider="cpu", cache_dir=cache)  # a new object: nothing in memory
    torch.testing.assert_close(second(x, t, y), eager(), rtol=1e-5, atol=1e-5)
    assert (second.exported, second.loaded) == (0, 1)

    old = {k: v.clone() for k, v in tiny_eps.state_dict().items()}
    torch.manual_seed(7)
    tiny_eps.load_state_dict(TinyConvEps().state_dict())  # in place: same tensors, new values
    torch.testing.assert_close(second(x, t, y), eager(), rtol=1e-5, atol=1e-5)  # not the old graph
    assert second.exported == 1

    for name, p in tiny_eps.named_parameters():  # through .data: invisible to the version counters
        p.data.copy_(old[name])
    second.refresh()
    torch.testing.assert_close(second(x, t, y), eager(), rtol=1e-5, atol=1e-5)
    assert (second.exported, second.loaded) == (1, 2)  # the first export, found again

    # a damaged entry fails its checksums and is removed (then exported again on use)
    (entry / "model.onnx").write_bytes((entry / "model.onnx").read_bytes()[:100])
    assert not second._valid(entry) and not entry.exists()


def test_onnx_unwritable_cache_warns_once_and_exports_privately(tmp_path, tiny_eps):
    pytest.importorskip("onnxruntime")
    from cg_fast.backends.onnxrt import OnnxDenoiser

    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(RuntimeWarning, match="not writable") as rec:
        den = OnnxDenoiser(tiny_eps, provider="cpu", cache_dir=blocker / "onnx")
    assert len(rec) == 1 and not den.shared and den.cache_dir.is_dir()
    plain = OnnxDenoiser(lambda x, t, y=None: x, provider="cpu", cache_dir=tmp_path / "c")
    assert not plain.shared  # a plain function has no weights to key a shared cache


# -- checkpoints ---------------------------------------------------------------------------------------------------
def _tiny_state(seed: int):
    import torch

    from cg_fast.testbeds.tiny import TinyConvEps

    torch.manual_seed(seed)
    return TinyConvEps().eval()


def test_checkpoint_float_params_stored_as_int_are_refused(tmp_path):
    import torch

    from cg_fast.models.loading import CheckpointError, load

    sd = _tiny_state(0).state_dict()
    sd["inp.weight"] = (sd["inp.weight"] * 10).to(torch.int64)  # a cast back would be off by up to 1
    torch.save(sd, tmp_path / "int.pt")
    with pytest.raises(CheckpointError, match=r"as integers \(first: inp.weight \(torch.int64\)\).*Re-save"):
        load(_tiny_state(1), tmp_path / "int.pt")


def test_checkpoint_with_model_and_ema_says_which_it_loads(tmp_path):
    import torch

    from cg_fast.models.loading import load, read_checkpoint

    ema, raw = _tiny_state(0), _tiny_state(1)
    torch.save({"model": raw.state_dict(), "ema": ema.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.warns(UserWarning, match=r"loading 'ema'.*read_checkpoint\(path\)\['model'\]"):
        dst = load(_tiny_state(2), tmp_path / "ckpt.pt")
    assert torch.equal(dst.inp.weight, ema.inp.weight)
    dst = load(_tiny_state(2), read_checkpoint(tmp_path / "ckpt.pt")["model"])  # the way to the other one
    assert torch.equal(dst.inp.weight, raw.inp.weight)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_checkpoint_with_nan_weights_is_refused(tmp_path, value):
    import torch

    from cg_fast.models.loading import CheckpointError, load

    sd = _tiny_state(0).state_dict()
    sd["inp.bias"][1] = value
    torch.save(sd, tmp_path / "nan.pt")
    target = _tiny_state(1)
    before = target.inp.bias.clone()
    with pytest.raises(CheckpointError, match=r"NaN or infinite values in 1 tensors \(first: inp.bias\)"):
        load(target, tmp_path / "nan.pt")
    assert torch.equal(target.inp.bias, before)  # nothing was loaded


# -- sample files and metric inputs ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, dtype", [((4, 3, 4, 4), "uint8"), ((4, 1, 8, 8), "uint8"),
                                          ((4, 4, 4, 3), "float32"), ((4, 8, 8, 1), "float32")])
def test_save_sample_batch_refuses_the_wrong_layout(tmp_path, shape, dtype):
    import numpy as np
    import torch

    from cg_fast.eval.npz import save_sample_batch

    arr = np.zeros(shape, dtype=dtype)
    for images in (arr, torch.from_numpy(arr)):
        with pytest.raises(ValueError, match="permute"):
            save_sample_batch(tmp_path / "b.npz", images)
    assert not (tmp_path / "b.npz").exists()


def test_save_sample_batch_keeps_the_right_layouts(tmp_path):
    import numpy as np
    import torch

    from cg_fast.eval.npz import load_sample_batch, save_sample_batch

    save_sample_batch(tmp_path / "a.npz", np.zeros((2, 4, 4, 3), np.uint8), [0, 1])  # NHWC uint8
    save_sample_batch(tmp_path / "b.npz", torch.zeros(2, 3, 4, 4))                   # NCHW float
    assert load_sample_batch(tmp_path / "a.npz")[0].shape == load_sample_batch(tmp_path / "b.npz")[0].shape


def test_sample_batch_negative_labels_refused(tmp_path):
    import numpy as np

    from cg_fast.eval.npz import load_sample_batch, save_sample_batch

    images = np.zeros((3, 4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="labels must be class indices >= 0; got -1 at position 2"):
        save_sample_batch(tmp_path / "b.npz", images, np.array([0, 1, -1]))
    np.savez(tmp_path / "c.npz", images, np.array([0, -2, 1]))
    with pytest.raises(ValueError, match=">= 0"):
        load_sample_batch(tmp_path / "c.npz")


def test_damaged_npz_gives_a_clear_error(tmp_path):
    import numpy as np

    from cg_fast.eval.npz import load_sample_batch, save_sample_batch

    path = save_sample_batch(tmp_path / "b.npz", np.random.default_rng(0).integers(0, 255, (8, 8, 8, 3), np.uint8))
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0xFF  # a flipped byte inside arr_0: the CRC check fails on reading it
    damaged = tmp_path / "damaged.npz"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="damaged.*write it again"):
        load_sample_batch(damaged)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_sample_batch(truncated)


def test_sliced_wasserstein_refuses_nan():
    import torch

    from cg_fast.eval.sliced import conditional_sliced_wasserstein, sliced_wasserstein

    a, b = torch.randn(20, 3), torch.randn(20, 3)
    a[3, 1] = float("nan")
    with pytest.raises(ValueError, match="set a has NaN or infinite values in 1 of 20"):
        sliced_wasserstein(a, b)
    with pytest.raises(ValueError, match="NaN"):
        conditional_sliced_wasserstein(b, torch.arange(20) % 2, a, torch.arange(20) % 2)


def test_tensorrt_backend_notices_in_place_weight_changes(tiny_eps):
    """The TensorRT backend's staleness check (its engines need a GPU; the check does not)."""
    import torch

    from cg_fast.backends.engine_cache import state_signature, weights_hash
    from cg_fast.backends.tensorrt import TensorRTDenoiser
    from cg_fast.testbeds.tiny import TinyConvEps

    den = TensorRTDenoiser.__new__(TensorRTDenoiser)  # no TensorRT here: set up what the check uses
    den.model, den._modules = tiny_eps, list(tiny_eps.modules())
    den._signature, den.weights, den._engines = state_signature(den._modules), weights_hash(tiny_eps), {"sig": 1}
    den._check_weights()
    assert den._engines == {"sig": 1}  # nothing changed: no rehash, engines kept
    old = den.weights
    torch.manual_seed(3)
    tiny_eps.load_state_dict(TinyConvEps().state_dict())
    den._check_weights()
    assert den.weights == weights_hash(tiny_eps) != old and den._engines == {}
