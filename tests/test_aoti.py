"""The aoti backend: AOTInductor packages of the denoiser and of the classifier gradient equal eager to 1e-5, are
keyed by the weights (a weight change gives a new package, never a stale one), are loaded (not compiled) by a
second object, and serve the Sampler, `cg-fast export --format aoti` and the Pipeline.

Each compile takes ~15-45 s on a shared 2-core machine, so packages are made once per session (the session's
CG_FAST_CACHE, tests/conftest.py) and shared by the tests here and in tests/test_runner.py.
"""
from __future__ import annotations

import json

import pytest
import torch

from cg_fast import ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.backends import BACKENDS, resolve
from cg_fast.backends.aoti import AotiClassifierGrad, AotiDenoiser, package_key
from cg_fast.guidance import Compress
from conftest import TinyClassifier, make_tiny

B = 2


def _inputs(batch: int = B):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(batch, 3, 8, 8, generator=g)
    t = torch.tensor([10, 700] * (batch // 2), dtype=torch.long)
    y = torch.tensor([1, 7] * (batch // 2), dtype=torch.long)
    return x, t, y


@pytest.fixture(scope="session")
def tiny_pair():
    """The tiny denoiser and classifier of the aoti tests (fixed weights), with their packages compiled once."""
    model = make_tiny(0)
    torch.manual_seed(2)
    clf = TinyClassifier().eval()
    x, t, y = _inputs()
    den, grad = AotiDenoiser(model), AotiClassifierGrad(clf)
    den.prepare(x, t, y)
    grad.prepare(x, t, y)
    return model, clf


def test_registered_and_available():
    assert "aoti" in BACKENDS and resolve("aoti", "cpu") == "aoti"


def test_denoiser_package_equals_eager_and_is_loaded_not_compiled(tiny_pair):
    model, _ = tiny_pair
    x, t, y = _inputs()
    den = AotiDenoiser(model)
    out = den(x, t, y)
    with torch.no_grad():
        want = model(x, t, y)
    assert out.shape == want.shape and (out - want).abs().max().item() < 1e-5
    assert (den.compiled, den.loaded) == (0, 1)  # the session fixture compiled it: this object only loads


def test_classifier_gradient_package_equals_eager(tiny_pair):
    _, clf = tiny_pair
    x, t, y = _inputs()
    grad = AotiClassifierGrad(clf)
    g, logits = grad(x, t, y)
    g_want, _ = ClassifierGuidance(clf, 1.0).gradient(x, t, y)
    assert (g - g_want).abs().max().item() < 1e-5 * max(1.0, g_want.abs().max().item())
    assert (logits - clf(x, t)).abs().max().item() < 1e-5
    assert (grad.compiled, grad.loaded) == (0, 1)


def test_key_holds_shapes_device_kind_and_torch_version(tiny_pair):
    model, _ = tiny_pair
    x, t, y = _inputs()
    den = AotiDenoiser(model)
    key = den.key(x, t, y)
    assert key.trt_version == f"torch {torch.__version__}" and ("kind", "denoiser") in key.extra
    assert dict(key.shapes) == {"x": (B, 3, 8, 8), "t": (B,), "y": (B,)}
    others = [den.key(*_inputs(4)), den.key(x, t, None), den.key(x.double(), t, y),
              package_key(key.weights, "classifier_grad", {"x": x, "t": t, "y": y}, x.device)]
    assert len({key.digest(), *(k.digest() for k in others)}) == 5
    assert den.cache.paths(key)[0].suffix == ".pt2"


def test_changed_weights_give_a_new_package(tiny_pair):
    model, _ = tiny_pair
    model = make_tiny(0)  # same weights as the fixture's: its package is found
    x, t, y = _inputs()
    den = AotiDenoiser(model)
    before = den(x, t, y)
    old = den.key(x, t, y)
    with torch.no_grad():
        model.outp.bias.add_(0.25)  # in place: the version counter shows it, no refresh() needed
    new = den.key(x, t, y)
    assert new.digest() != old.digest()
    after = den(x, t, y)
    with torch.no_grad():
        want = model(x, t, y)
    assert den.compiled == 1 and (after - want).abs().max().item() < 1e-5
    assert (after - before).abs().min().item() > 0.2  # not the stale package
    assert den.cache.paths(old)[0].exists() and den.cache.paths(new)[0].exists()


def test_a_damaged_package_is_compiled_again(tiny_pair):
    _, clf = tiny_pair
    x, t, y = _inputs()
    grad = AotiClassifierGrad(clf)
    path = grad.cache.paths(grad.key(x, t, y))[0]
    path.write_bytes(path.read_bytes()[:1000])  # truncated: its SHA-256 no longer matches the sidecar
    g, _ = grad(x, t, y)
    assert grad.compiled == 1 and (g - ClassifierGuidance(clf, 1.0).gradient(x, t, y)[0]).abs().max().item() < 1e-5


def test_sampler_aoti_equals_eager_with_classifier_guidance(tiny_pair):
    model, clf = tiny_pair
    sched = NoiseSchedule.linear(1000)
    guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=3, k=1), cache="compress")
    y = torch.tensor([1, 7])
    outs = {}
    for backend in ("eager", "aoti"):
        s = Sampler(model, sched, "8", rng="counter", backend=backend)
        outs[backend] = s.sample((B, 3, 8, 8), y=y, guidance=guid, seeds=[11, 12])
    assert (outs["aoti"].x - outs["eager"].x).abs().max().item() < 1e-5
    assert outs["aoti"].stats.classifier_grads == outs["eager"].stats.classifier_grads > 1


def test_export_cli_then_pipeline_serves_from_the_packages(tmp_path, monkeypatch, capsys):
    """`cg-fast export --format aoti` writes the digits denoiser's and classifier gradient's packages; a Pipeline
    with backend="aoti" then samples from them without compiling, and equals the eager Pipeline."""
    from cg_fast import Pipeline
    from cg_fast.cli import main
    from cg_fast.backends import aoti
    from cg_fast.testbeds.digits import load_testbed

    rec = tmp_path / "export.json"
    assert main(["export", "--model", "digits-uncond", "--classifier", "digits-guide", "--batch-size", "2",
                 "--format", "aoti", "--json", str(rec)]) == 0
    entries = json.loads(rec.read_text())["entries"]
    assert [(e["format"], e["kind"], e["batch"], e["reused"]) for e in entries] == [
        ("aoti", "denoiser", 2, False), ("aoti", "classifier_grad", 2, False)]
    assert "| aoti | 2 |" in capsys.readouterr().out

    def refuse(*a, **k):
        raise AssertionError("compiled again: the ahead-of-time package was not reused")

    monkeypatch.setattr(aoti._Packaged, "_build", refuse)
    tb = load_testbed(networks=("uncond", "guide"))
    samples = {}
    for backend in ("aoti", "eager"):
        with Pipeline(tb.nets["uncond"], classifier=tb.nets["guide"], scale=4.0, steps="6", batch_sizes=(2,),
                      backend=backend, device="cpu") as pipe:
            samples[backend] = pipe([3, 5], seeds=[1, 2]).images
    assert (samples["aoti"] - samples["eager"]).abs().max().item() < 1e-4


def test_export_refuses_a_classifier_for_formats_that_run_it_in_pytorch(capsys):
    from cg_fast.cli import main

    assert main(["export", "--model", "digits-uncond", "--classifier", "digits-guide", "--format", "onnx"]) == 2
    assert "--format aoti" in capsys.readouterr().err


def test_a_plain_function_is_refused_with_what_to_do():
    with pytest.raises(TypeError, match="nn.Module"):
        AotiDenoiser(lambda x, t, y=None: x)
