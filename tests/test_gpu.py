"""GPU checks (CUDA graphs, whole-step replay, Triton on the device); skipped without CUDA.

Run on the device machine by benchmarks/gpu_suite.py (``pytest tests/test_gpu.py``). Tolerances: fp32
eager vs graph replay run the same kernels in the same order, so they agree to 1e-5 (the bound the issue
asks for; in practice bitwise). The Triton step vs the reference: float32 rounding, 1e-5.
The same graph logic is checked on the CPU against an emulation of capture and replay (tests/test_engine.py);
these tests are what only a GPU can say: that the captures succeed, and replay what eager runs.
"""
from __future__ import annotations

import pytest
import torch

from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.guidance import Compress, Full

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run by gpu_suite.py)")
SCHED = NoiseSchedule.linear(1000)


def _models(learn_sigma=True):
    from cg_fast.testbeds.tiny import TinyConvClassifier, TinyConvEps
    torch.manual_seed(0)
    return TinyConvEps(learn_sigma=learn_sigma, width=16).cuda().eval(), TinyConvClassifier(width=16).cuda().eval()


def _sample(backend, guidance, kernels="auto", method="ddpm", steps="20", sampler=None, seed=0, y=None):
    if sampler is None:
        model, _ = _models()
        sampler = Sampler(model, SCHED, steps, method, learn_sigma=True, backend=backend, kernels=kernels)
    y = torch.tensor([1, 2, 3, 4], device="cuda") if y is None else y
    return sampler.sample((4, 3, 16, 16), y=y, guidance=guidance,
                          generator=torch.Generator("cuda").manual_seed(seed))


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
@pytest.mark.parametrize("kind", ["classifier", "classifier-drop", "cfg", "cfg-unbatched", "none"])
def test_whole_step_graphs_equal_eager(method, kind):
    _, clf = _models()
    guid = {"classifier": ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="momentum", beta=0.2),
            "classifier-drop": ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="compress"),
            "cfg": CFG(3.0, null_label=10, policy=Compress(rate=5), channels=2),
            "cfg-unbatched": CFG(3.0, null_label=10, policy=Compress(rate=5), cache="reuse", batched=False),
            "none": None}[kind]
    eager = _sample("eager", guid, method=method)
    graph = _sample("cudagraph", guid, method=method)
    _close(graph.x, eager.x)
    assert graph.stats.classifier_grads == eager.stats.classifier_grads
    assert graph.stats.denoiser_rows == eager.stats.denoiser_rows
    for j, rec in eager.stats.on_sampling.items():
        _close(graph.stats.on_sampling[j].log_prob, rec.log_prob)


def test_cached_step_graphs_replay_for_later_runs():
    """Second and third runs replay the first run's graphs (new guidance objects, new labels, new scale)."""
    model, clf = _models()
    graph_s = Sampler(model, SCHED, "20", learn_sigma=True, backend="cudagraph")
    eager_s = Sampler(model, SCHED, "20", learn_sigma=True, backend="eager")
    y1 = torch.tensor([1, 2, 3, 4], device="cuda")
    first = _sample(None, ClassifierGuidance(clf, 2.0, policy=Compress(rate=5)), sampler=graph_s, y=y1)
    (runner, _), = graph_s._graph_cache.values()
    graphs = dict(runner.graphs)
    g2 = ClassifierGuidance(clf, 4.0, policy=Compress(rate=3), cache="drop")
    y2 = torch.tensor([9, 9, 0, 5], device="cuda")
    second = _sample(None, g2, sampler=graph_s, seed=3, y=y2)
    _close(second.x, _sample(None, g2, sampler=eager_s, seed=3, y=y2).x)
    third = _sample(None, g2, sampler=graph_s, seed=3, y=y2)
    assert torch.equal(third.x, second.x) and not torch.equal(first.x, second.x)
    assert runner.graphs.keys() == graphs.keys() and len(graph_s._graph_cache) == 1  # nothing recaptured
    assert all(runner.graphs[k][0] is graphs[k][0] for k in graphs)
    assert torch.equal(y1, torch.tensor([1, 2, 3, 4], device="cuda"))  # the caller's labels untouched


def test_whole_step_graphs_with_the_global_rng():
    model, clf = _models()
    guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="momentum", beta=0.2)
    out = {}
    for backend in ("eager", "cudagraph"):
        s = Sampler(model, SCHED, "20", learn_sigma=True, backend=backend)
        torch.manual_seed(5)
        out[backend] = s.sample((4, 3, 16, 16), y=torch.tensor([1, 2, 3, 4], device="cuda"), guidance=guid,
                                device="cuda").x
        out[backend + "_rng"] = torch.cuda.get_rng_state()
    _close(out["cudagraph"], out["eager"])
    assert torch.equal(out["cudagraph_rng"], out["eager_rng"])  # capture and replays draw no random numbers


def test_triton_equals_reference_kernels_on_gpu():
    _, clf = _models()
    guid = ClassifierGuidance(clf, 2.0, policy=Full(), cache="drop")
    ref = _sample("eager", guid, kernels="reference")
    tri = _sample("eager", guid, kernels="triton")
    torch.testing.assert_close(tri.x, ref.x, rtol=1e-5, atol=1e-5)


def test_graphed_denoiser_and_classifier_grad():
    from cg_fast.backends.cudagraph import CUDAGraphClassifierGrad, CUDAGraphDenoiser
    model, clf = _models()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    t = torch.full((4,), 500, device="cuda")
    y = torch.tensor([0, 1, 2, 3], device="cuda")
    den = CUDAGraphDenoiser(model)
    for _ in range(2):
        x = torch.randn_like(x)
        with torch.no_grad():
            want = model(x, t, y)
        torch.testing.assert_close(den(x, t, y), want)
    assert den.num_graphs == 1
    grad = CUDAGraphClassifierGrad(clf)
    for _ in range(2):
        x = torch.randn_like(x)
        g, logits = grad(x, t, y)
        xr = x.clone().requires_grad_(True)
        lp = torch.log_softmax(clf(xr, t), -1)[torch.arange(4, device="cuda"), y].sum()
        (want_g,) = torch.autograd.grad(lp, xr)
        torch.testing.assert_close(g, want_g)
        torch.testing.assert_close(logits, clf(x, t).detach())
    assert grad.num_graphs == 1


@pytest.mark.parametrize("backend", ["eager", "cudagraph"])
def test_deferred_nan_check_on_gpu(backend):
    from cg_fast import NonFiniteError
    model, _ = _models()

    def bad(x, t, y=None):
        return model(x, t, y) * torch.where(t < 300, float("nan"), 1.0)[:, None, None, None]

    s = Sampler(bad, SCHED, "10", learn_sigma=True, backend=backend)
    with pytest.raises(NonFiniteError, match="j=7"):
        s.sample((2, 3, 16, 16), y=torch.tensor([0, 1], device="cuda"), device="cuda")


def test_onnxruntime_cuda_provider_binds_device_memory():
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        pytest.importorskip(mod)
    import onnxruntime as ort
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the CUDA provider (pip install onnxruntime-gpu)")
    from cg_fast.backends.onnxrt import OnnxDenoiser
    model, _ = _models()
    den = OnnxDenoiser(model, provider="cuda")
    x, t, y = torch.randn(4, 3, 16, 16, device="cuda"), torch.full((4,), 321, device="cuda"), \
        torch.tensor([0, 3, 5, 9], device="cuda")
    with torch.no_grad():
        want = model(x, t, y)
    torch.testing.assert_close(den(x, t, y), want, rtol=1e-3, atol=1e-3)


def test_tensorrt_backend_matches_eager(tmp_path):
    pytest.importorskip("tensorrt")
    for mod in ("onnx", "onnxscript"):
        pytest.importorskip(mod)
    from cg_fast.backends.tensorrt import TensorRTDenoiser
    model, _ = _models()
    den = TensorRTDenoiser(model, precision="fp32", cache_dir=tmp_path, workspace_gb=1.0)
    x, t, y = torch.randn(4, 3, 16, 16, device="cuda"), torch.full((4,), 321, device="cuda"), \
        torch.tensor([0, 3, 5, 9], device="cuda")
    with torch.no_grad():
        want = model(x, t, y)
    got = den(x, t, y)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)  # TensorRT may use TF32 for fp32 layers
    assert den.built == 1
    TensorRTDenoiser(model, precision="fp32", cache_dir=tmp_path)(x, t, y)  # loaded from the cache
