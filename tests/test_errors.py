"""Bad input raises ValueError / TypeError saying what to fix; NaN/inf is reported with its step."""
from __future__ import annotations

import pytest
import torch

from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, NonFiniteError, Sampler
from cg_fast.guidance import Full

SCHED = NoiseSchedule.linear(1000)
SHAPE = (2, 3, 8, 8)


@pytest.mark.parametrize("kw, match", [
    ({"method": "euler"}, "unknown sampling method"),
    ({"prediction": "score"}, "unknown prediction"),
    ({"variance": "learned"}, "unknown variance"),
    ({"steps": "abc"}, "bad respacing"),
    ({"steps": "2000"}, "cannot divide"),
    ({"eta": 0.5}, "eta is a DDIM parameter"),
    ({"kernels": "cuda"}, "unknown kernels"),
])
def test_bad_sampler_arguments(tiny_eps, kw, match):
    with pytest.raises(ValueError, match=match):
        Sampler(tiny_eps, SCHED, **kw)


def test_schedule_and_model_types(tiny_eps):
    with pytest.raises(TypeError, match="NoiseSchedule"):
        Sampler(tiny_eps, "linear")
    with pytest.raises(TypeError, match="callable"):
        Sampler(object(), SCHED)


@pytest.mark.parametrize("make, match", [
    (lambda c: ClassifierGuidance(c, 1.0, cache="lru"), "unknown cache mode"),
    (lambda c: ClassifierGuidance(c, 1.0, policy="compress"), "policy must be"),
    (lambda c: ClassifierGuidance(c, float("nan")), "scale"),
    (lambda c: ClassifierGuidance(c, 1.0, cache="reuse", decay=0.5), "momentum"),
    (lambda c: ClassifierGuidance(c, 1.0, cache="momentum", beta=1.5), "beta"),
    (lambda c: CFG(4.0, null_label=-1), "null_label"),
    (lambda c: CFG(4.0, channels=0), "channels"),
])
def test_bad_guidance_arguments(tiny_classifier, make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make(tiny_classifier)


def test_labels(tiny_eps, tiny_classifier):
    s = Sampler(tiny_eps, SCHED, "5")
    with pytest.raises(ValueError, match="labels y are required"):
        s.sample(SHAPE)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        s.sample(SHAPE, y=torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="integers"):
        s.sample(SHAPE, y=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="out of range"):
        s.sample(SHAPE, y=torch.tensor([1, 10]))  # TinyEps has num_classes = 10
    with pytest.raises(ValueError, match=">= 0"):
        s.sample(SHAPE, y=torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="null label"):
        s.sample(SHAPE, y=torch.tensor([3, 4]), guidance=CFG(4.0, null_label=4))
    # an unconditional model guided by a classifier: the range comes from the classifier's logits
    u = Sampler(lambda x, t: torch.zeros_like(x), SCHED, "5", class_cond=False)
    with pytest.raises(ValueError, match="10 classes"):
        u.sample(SHAPE, y=torch.tensor([0, 12]), guidance=ClassifierGuidance(tiny_classifier, 1.0))
    with pytest.raises(ValueError, match="class-conditional"):
        u.sample(SHAPE, y=torch.tensor([0, 1]), guidance=CFG(4.0, null_label=10))


def test_output_channel_checks(tiny_eps, tiny_eps_learned):
    y = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="pass learn_sigma=True"):
        Sampler(tiny_eps_learned, SCHED, "5").sample(SHAPE, y=y)
    with pytest.raises(ValueError, match="pass learn_sigma=False"):
        Sampler(tiny_eps, SCHED, "5", learn_sigma=True).sample(SHAPE, y=y)
    bad = Sampler(lambda x, t, y=None: torch.zeros(2, 5, 8, 8), SCHED, "5")
    with pytest.raises(ValueError, match="expected"):
        bad.sample(SHAPE, y=y)
    with pytest.raises(ValueError, match="noise has shape"):
        Sampler(tiny_eps, SCHED, "5").sample(SHAPE, y=y, noise=torch.zeros(3, 3, 8, 8))
    with pytest.raises(TypeError, match="guidance must be"):
        Sampler(tiny_eps, SCHED, "5").sample(SHAPE, y=y, guidance=Full())


def test_classifier_shape_check(tiny_eps):
    s = Sampler(tiny_eps, SCHED, "5")
    with pytest.raises(ValueError, match=r"logits of shape \[B, K\]"):
        s.sample(SHAPE, y=torch.tensor([0, 1]), guidance=ClassifierGuidance(lambda x, t: x.sum(), 1.0))


def test_nan_in_model_output_names_the_step(tiny_eps):
    calls = {"n": 0}

    def model(x, t, y=None):
        calls["n"] += 1
        out = tiny_eps(x, t, y)
        return out * float("nan") if calls["n"] == 4 else out

    s = Sampler(model, SCHED, "10")
    with pytest.raises(NonFiniteError, match=r"model output at sampling step j=3 \(timestep t="):
        s.sample(SHAPE, y=torch.tensor([0, 1]))
    calls["n"] = 0
    out = Sampler(model, SCHED, "10", check_finite=False).sample(SHAPE, y=torch.tensor([0, 1]))
    assert torch.isnan(out.x).all()


def test_inf_in_gradient_names_the_step(tiny_eps, tiny_classifier):
    def clf(x, t):
        logits = tiny_classifier(x, t)
        return logits * float("inf") if int(t[0]) < 500 else logits

    s = Sampler(tiny_eps, SCHED, "10")
    with pytest.raises(NonFiniteError, match="classifier gradient at sampling step j=5"):
        s.sample(SHAPE, y=torch.tensor([0, 1]), guidance=ClassifierGuidance(clf, 1.0, policy=Full()))


def test_deferred_check_reports_the_first_bad_step(tiny_eps):
    """The GPU default: flags stay on the device and are read once at the end (no per-step host sync)."""
    def model(x, t, y=None):
        out = tiny_eps(x, t, y)
        return out + float("inf") if int(t[0]) < 300 else out

    s = Sampler(model, SCHED, "10", check_finite="deferred")
    with pytest.raises(NonFiniteError, match=r"step j=7 \(timestep t=222\)"):
        s.sample(SHAPE, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="check_finite"):
        Sampler(model, SCHED, "10", check_finite="sometimes")
