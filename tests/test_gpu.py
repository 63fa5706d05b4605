"""GPU checks (CUDA graphs, whole-step replay, Triton on the device); skipped without CUDA.

Run on the device machine by benchmarks/gpu_suite.py (``pytest tests/test_gpu.py``). Tolerances: fp32
eager vs graph replay run the same kernels in the same order, so they agree to 1e-5 (the bound the issue
asks for; in practice bitwise). The Triton step vs the reference: float32 rounding, 1e-5.
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


def _sample(backend, guidance, kernels="auto", method="ddpm", steps="20"):
    model, _ = _models()
    s = Sampler(model, SCHED, steps, method, learn_sigma=True, backend=backend, kernels=kernels)
    y = torch.tensor([1, 2, 3, 4], device="cuda")
    return s.sample((4, 3, 16, 16), y=y, guidance=guidance, generator=torch.Generator("cuda").manual_seed(0))


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
@pytest.mark.parametrize("kind", ["classifier", "cfg", "none"])
def test_whole_step_graphs_equal_eager(method, kind):
    _, clf = _models()
    guid = {"classifier": ClassifierGuidance(clf, 2.0, policy=Compress(rate=5), cache="momentum", beta=0.2),
            "cfg": CFG(3.0, null_label=10, policy=Compress(rate=5)), "none": None}[kind]
    eager = _sample("eager", guid, method=method)
    graph = _sample("cudagraph", guid, method=method)
    torch.testing.assert_close(graph.x, eager.x, rtol=1e-5, atol=1e-5)
    assert graph.stats.classifier_grads == eager.stats.classifier_grads
    assert graph.stats.denoiser_rows == eager.stats.denoiser_rows
    for j, rec in eager.stats.on_sampling.items():
        torch.testing.assert_close(graph.stats.on_sampling[j].log_prob, rec.log_prob, rtol=1e-5, atol=1e-5)


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
    g, logits = grad(x, t, y)
    xr = x.clone().requires_grad_(True)
    lp = torch.log_softmax(clf(xr, t), -1)[torch.arange(4, device="cuda"), y].sum()
    (want_g,) = torch.autograd.grad(lp, xr)
    torch.testing.assert_close(g, want_g)


def test_deferred_nan_check_on_gpu():
    from cg_fast import NonFiniteError
    model, _ = _models()

    def bad(x, t, y=None):
        return model(x, t, y) * torch.where(t < 300, float("nan"), 1.0)[:, None, None, None]

    s = Sampler(bad, SCHED, "10", learn_sigma=True, backend="eager")
    with pytest.raises(NonFiniteError, match="j=7"):
        s.sample((2, 3, 16, 16), y=torch.tensor([0, 1], device="cuda"), device="cuda")
