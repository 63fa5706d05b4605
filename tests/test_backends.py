"""Denoiser backends on the CPU: selection and errors, ONNX Runtime sampling parity, compile, engine cache."""
from __future__ import annotations

import json

import pytest
import torch

from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler, backends
from cg_fast.backends import BackendUnavailable
from cg_fast.backends.engine_cache import EngineCache, EngineKey, weights_hash
from cg_fast.guidance import Compress
from cg_fast.testbeds import GaussianMixture

SCHED = NoiseSchedule.linear(1000)
CPU = torch.device("cpu")


def test_selection_on_cpu():
    assert backends.resolve("auto", CPU) == "eager"
    assert backends.resolve("eager", CPU) == "eager"
    for name in ("cudagraph", "tensorrt"):
        with pytest.raises(BackendUnavailable, match="CUDA"):
            backends.resolve(name, CPU)
    with pytest.raises(ValueError, match="unknown backend"):
        backends.check_name("openvino")
    with pytest.raises(ValueError, match="unknown backend"):
        Sampler(lambda x, t: x, SCHED, backend="openvino")


def test_auto_on_cuda_means_cuda_graphs_even_with_tensorrt_installed(monkeypatch):
    """TensorRT builds an engine per model and shape (minutes): auto never picks it, only a request does."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backends, "_has", lambda m: True)  # tensorrt, onnx, onnxscript all importable
    cuda = torch.device("cuda")
    assert backends.why_unavailable("tensorrt", cuda) is None
    assert backends.resolve("auto", cuda) == "cudagraph"
    assert backends.resolve("tensorrt", cuda) == "tensorrt"
    assert backends.resolve("auto", CPU) == "eager"


def test_requested_backend_that_cannot_run_raises(tiny_eps):
    s = Sampler(tiny_eps, SCHED, "5", backend="cudagraph")
    with pytest.raises(BackendUnavailable, match="needs a CUDA device"):
        s.sample((2, 3, 8, 8), y=torch.tensor([0, 1]))


def test_onnx_missing_package_message(monkeypatch):
    monkeypatch.setattr(backends, "_has", lambda m: m != "onnxruntime")
    with pytest.raises(BackendUnavailable, match="pip install onnxruntime"):
        backends.resolve("onnx", CPU)


def _run(sampler, guidance, shape, y):
    return sampler.sample(shape, y=y, guidance=guidance, generator=torch.Generator().manual_seed(0)).x


@pytest.mark.parametrize("guide", ["classifier", "cfg"])
def test_onnx_sampling_equals_eager_tiny_conv(tiny_eps_learned, tiny_classifier, guide):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    y = torch.tensor([1, 2])
    guid = ClassifierGuidance(tiny_classifier, 2.0, policy=Compress(rate=3)) if guide == "classifier" \
        else CFG(3.0, null_label=10, policy=Compress(rate=3))
    kw = dict(steps="8", learn_sigma=True)
    eager = _run(Sampler(tiny_eps_learned, SCHED, backend="eager", **kw), guid, (2, 3, 8, 8), y)
    onnx = _run(Sampler(tiny_eps_learned, SCHED, backend="onnx", **kw), guid, (2, 3, 8, 8), y)
    torch.testing.assert_close(onnx, eager, rtol=1e-4, atol=1e-4)


def test_onnx_sampling_equals_eager_gmm():
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    gmm = GaussianMixture.random(4, 3)
    y = torch.arange(6) % 4
    kw = dict(steps="10", class_cond=False, clip_denoised=False)
    guid = ClassifierGuidance(gmm.classifier(SCHED), 1.0, policy=Compress(rate=2))
    eager = _run(Sampler(gmm.eps_model(SCHED), SCHED, backend="eager", **kw), guid, (6, 3), y)
    onnx = _run(Sampler(gmm.eps_model(SCHED), SCHED, backend="onnx", **kw), guid, (6, 3), y)
    torch.testing.assert_close(onnx, eager, rtol=1e-5, atol=1e-5)


def test_onnx_exports_once_per_signature(tiny_eps):
    pytest.importorskip("onnxruntime")
    from cg_fast.backends.onnxrt import OnnxDenoiser
    den = OnnxDenoiser(tiny_eps, provider="cpu")
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 2])
    a = den(x, t, y)
    b = den(x + 1, t, y)
    assert len(den._sessions) == 1 and not torch.equal(a, b)
    torch.testing.assert_close(b, tiny_eps(x + 1, t, y), rtol=1e-5, atol=1e-5)
    den(torch.randn(3, 3, 8, 8), torch.tensor([5, 5, 5]), torch.tensor([1, 2, 3]))
    assert len(den._sessions) == 2
    with pytest.raises(ValueError, match="provider"):
        OnnxDenoiser(tiny_eps, provider="tpu")


@pytest.mark.slow
def test_compile_backend_equals_eager(tiny_eps):
    y = torch.tensor([1, 2])
    eager = _run(Sampler(tiny_eps, SCHED, "5", backend="eager"), None, (2, 3, 8, 8), y)
    comp = _run(Sampler(tiny_eps, SCHED, "5", backend="compile"), None, (2, 3, 8, 8), y)
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-5)


# -- TensorRT engine cache (the logic; building needs TensorRT and a GPU) --------------------------------------
def _key(**kw):
    base = dict(weights="w", shapes=(("x", (2, 3, 8, 8)), ("t", (2,))), dtype="fp16", gpu="H200 sm_90",
                trt_version="10.9")
    base.update(kw)
    return EngineKey(**base)


def test_engine_key_changes_with_everything_it_depends_on():
    k = _key()
    assert k.digest() == _key().digest()
    for change in (dict(weights="w2"), dict(shapes=(("x", (4, 3, 8, 8)), ("t", (4,)))), dict(dtype="bf16"),
                   dict(gpu="H100 sm_90"), dict(trt_version="10.10")):
        assert _key(**change).digest() != k.digest(), change


def test_weights_hash(tiny_eps):
    h = weights_hash(tiny_eps)
    assert h == weights_hash(tiny_eps)
    with torch.no_grad():
        tiny_eps.inp.weight[0, 0, 0, 0] += 1e-3
    assert weights_hash(tiny_eps) != h
    assert weights_hash(tiny_eps.to(torch.bfloat16)) != h


def test_engine_cache_store_load_corrupt_and_rebuild(tmp_path):
    cache = EngineCache(tmp_path)
    k = _key()
    builds = []

    def build():
        builds.append(1)
        return b"engine-bytes-" + bytes(range(50))

    blob, built = cache.get_or_build(k, build)
    assert built and cache.load(k) == blob
    assert cache.get_or_build(k, build) == (blob, False) and len(builds) == 1
    assert not list(tmp_path.glob("*.tmp")), "atomic writes leave no temporary files"
    # a stale entry is never found: another key misses
    assert cache.load(_key(trt_version="11.0")) is None
    # a corrupt (truncated) blob is detected by its checksum, removed and rebuilt
    blob_path, meta_path = cache.paths(k)
    blob_path.write_bytes(blob[:10])
    assert cache.load(k) is None and not blob_path.exists() and not meta_path.exists()
    assert cache.get_or_build(k, build) == (blob, True) and len(builds) == 2
    # an unreadable sidecar, too
    meta_path.write_text("{not json")
    assert cache.load(k) is None
    # a sidecar written for another key (e.g. a hash collision or a copied file) is rejected
    cache.store(k, blob)
    meta = json.loads(meta_path.read_text())
    meta["key"]["gpu"] = "other"
    meta_path.write_text(json.dumps(meta))
    assert cache.load(k) is None


def test_failed_build_stores_nothing(tmp_path):
    cache = EngineCache(tmp_path)

    def build():
        raise RuntimeError("builder failed")

    with pytest.raises(RuntimeError, match="builder failed"):
        cache.get_or_build(_key(), build)
    assert list(tmp_path.iterdir()) == []


def test_tensorrt_backend_without_tensorrt(tiny_eps):
    pytest.importorskip("torch")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here; this test checks the message when it is not")
    except ImportError:
        pass
    from cg_fast.backends.tensorrt import TensorRTDenoiser
    with pytest.raises(ImportError, match="pip install tensorrt"):
        TensorRTDenoiser(tiny_eps)


@pytest.mark.parametrize("name, guide", [("adm-tiny-cond", "classifier"), ("dit-tiny", "cfg")])
def test_onnx_sampling_equals_eager_tiny_adm_and_dit(name, guide):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import cg_fast.models as M
    from cg_fast.models.testing import randomize_

    torch.manual_seed(0)
    model = randomize_(M.create(name), seed=1).eval()
    cfg = model.cg_config
    sched = NoiseSchedule.named(cfg.noise_schedule, cfg.diffusion_steps)
    y = torch.tensor([1, 3])
    if guide == "classifier":
        clf = randomize_(M.create(cfg.classifier), seed=2).eval()
        guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=3))
    else:
        guid = CFG(4.0, null_label=cfg.null_label, policy=Compress(rate=3), channels=3)
    kw = dict(steps="6", learn_sigma=cfg.learn_sigma, clip_denoised=cfg.clip_denoised)
    shape = (2, *cfg.input_shape)
    eager = _run(Sampler(model, sched, backend="eager", **kw), guid, shape, y)
    onnx = _run(Sampler(model, sched, backend="onnx", **kw), guid, shape, y)
    # One forward agrees to ~5e-6 (test_models_onnx); CFG multiplies eps differences by w = 4 and six
    # ancestral steps accumulate them, so the samples are compared at 1e-3.
    tol = 1e-4 if guide == "classifier" else 1e-3
    torch.testing.assert_close(onnx, eager, rtol=tol, atol=tol)


def test_onnx_cuda_provider_falling_back_to_the_cpu_is_an_error(monkeypatch, tiny_eps):
    """onnxruntime-gpu whose CUDA provider cannot load runs the session on the CPU; CUDA pointers must never
    be bound to it."""
    pytest.importorskip("onnxruntime")
    from cg_fast.backends import onnxrt

    made = []

    class Session:
        def __init__(self, path, sess_options=None, providers=None):
            made.append(providers)

        def get_providers(self):
            return ["CPUExecutionProvider"]  # what ORT reports after dropping the CUDA provider

    fake_ort = type("FakeOrt", (), {"InferenceSession": Session,
                                    "get_available_providers": staticmethod(
                                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])})
    monkeypatch.setattr(onnxrt, "export_denoiser", lambda model, path, *a: path)
    den = onnxrt.OnnxDenoiser(tiny_eps, provider="cuda")
    den._ort = fake_ort
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5, 5]), torch.tensor([1, 2])
    with pytest.raises(RuntimeError, match="fell back to"):
        den._session(x, t, y)
    assert made and made[0][0][0] == "CUDAExecutionProvider" and not den._sessions
