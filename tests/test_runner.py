"""The C++ runner (csrc/runner/, cg_fast._runner) equals the Python sampler with counter-based noise on tiny
configs: DDPM with classifier guidance and the compress cache, DDIM with the momentum cache (a cache state h)
and with batched CFG (the reuse cache), and
unguided DDPM; it counts the same denoiser passes and classifier gradients.

Skipped when the extension was not built (no compiler at install time), unless CG_FAST_REQUIRE_RUNNER=1.
Packages are compiled once per session into the session's cache (shared with tests/test_aoti.py).
"""
from __future__ import annotations

import os

import pytest
import torch

from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.guidance import Compress
from cg_fast.runner import CppRunner, runner_inputs, runner_unavailable
from conftest import TinyClassifier, make_tiny

WHY = runner_unavailable()
pytestmark = pytest.mark.skipif(WHY is not None and not os.environ.get("CG_FAST_REQUIRE_RUNNER"),
                                reason=WHY or "")
B, SHAPE = 2, (3, 8, 8)
SEEDS = [11, 12]
Y = torch.tensor([1, 7])


@pytest.fixture(scope="module")
def nets():
    model = make_tiny(0)
    torch.manual_seed(2)
    return model, TinyClassifier().eval()


def _python(sampler: Sampler, guidance):
    out = sampler.sample((B, *SHAPE), y=Y, guidance=guidance, seeds=SEEDS)
    return out.x, out.stats


@pytest.mark.parametrize("method,cache,stateful", [("ddpm", "compress", False), ("ddim", "momentum", True)])
def test_classifier_guidance_with_cache_equals_the_python_sampler(nets, method, cache, stateful):
    model, clf = nets
    sampler = Sampler(model, NoiseSchedule.linear(1000), "8", method, rng="counter")
    guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=3, k=1), cache=cache)
    runner = CppRunner(sampler, guid, B, shape=SHAPE)
    assert runner.inputs["config"]["stateful"] == stateful and runner.inputs["config"]["guide"] == "classifier"
    got = runner.sample(Y, SEEDS)
    want, stats = _python(sampler, guid)
    assert (got - want).abs().max().item() < 1e-5
    assert runner.stats == {"denoiser_passes": stats.denoiser_passes, "classifier_grads": stats.classifier_grads}
    # and the Python loop over the same packages (backend="aoti")
    aoti = Sampler(model, NoiseSchedule.linear(1000), "8", method, rng="counter", backend="aoti")
    assert (got - _python(aoti, guid)[0]).abs().max().item() < 1e-5


def test_cfg_batched_ddim_equals_the_python_sampler(nets):
    model, _ = nets
    sampler = Sampler(model, NoiseSchedule.linear(1000), "6", "ddim", rng="counter")
    cfg = CFG(3.0, null_label=10, policy=Compress(rate=2, k=1), cache="reuse")
    runner = CppRunner(sampler, cfg, B, shape=SHAPE)
    assert len(runner.package_paths["denoisers"]) == 2  # B and the 2B pass of the guided steps
    want, stats = _python(sampler, cfg)
    assert (runner.sample(Y, SEEDS) - want).abs().max().item() < 1e-5
    assert runner.stats["denoiser_passes"] == stats.denoiser_passes


def test_unguided_and_a_seed_alone(nets):
    model, _ = nets
    sampler = Sampler(model, NoiseSchedule.linear(1000), "5", rng="counter")
    runner = CppRunner(sampler, None, B, shape=SHAPE)
    got = runner.sample(Y, SEEDS)
    assert (got - _python(sampler, None)[0]).abs().max().item() < 1e-5
    swapped = runner.sample(Y.flip(0), SEEDS[::-1])  # a sample depends on its seed and label only
    assert (swapped.flip(0) - got).abs().max().item() < 1e-5


def test_inputs_and_errors(nets):
    model, clf = nets
    sampler = Sampler(model, NoiseSchedule.linear(1000), "5", rng="counter")
    inp = runner_inputs(sampler, ClassifierGuidance(clf, 1.0, policy=Compress(rate=2, k=1)))
    assert inp["table"].shape[0] == inp["timesteps"].shape[0] == inp["guided"].shape[0] == 5
    from cg_fast import _runner

    with pytest.raises(RuntimeError, match="classifier-gradient package"):
        _runner.Runner({2: "/nonexistent.pt2"}, "", guide="classifier")
    with pytest.raises(RuntimeError, match="unknown method"):
        _runner.Runner({2: "/nonexistent.pt2"}, "", method="euler")


def test_plan_file_round_trip(nets, tmp_path):
    """save_plan writes what the C++ side reads back (cg_fast::runner::load_plan)."""
    from cg_fast import _runner
    from cg_fast.runner import save_plan

    model, clf = nets
    sampler = Sampler(model, NoiseSchedule.linear(1000), "5", "ddim", rng="counter")
    guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=2, k=1), cache="momentum")
    want = runner_inputs(sampler, guid)
    config, table, timesteps, guided = _runner.load_plan(str(save_plan(sampler, guid, tmp_path / "plan.pt")))
    assert config == want["config"]
    assert torch.equal(table, want["table"]) and torch.equal(timesteps, want["timesteps"])
    assert torch.equal(guided, want["guided"])


@pytest.mark.skipif(not os.environ.get("CG_FAST_TEST_PROGRAM"),
                    reason="compiles cg_fast_run (1-3 min): set CG_FAST_TEST_PROGRAM=1")
def test_the_program_samples_without_python(nets, tmp_path):
    """cg_fast_run (csrc/runner/main.cpp, libtorch only) reads the plan and packages and writes the Python
    sampler's samples."""
    import subprocess

    from cg_fast.runner import build_program, save_plan

    model, clf = nets
    sampler = Sampler(model, NoiseSchedule.linear(1000), "8", "ddpm", rng="counter")
    guid = ClassifierGuidance(clf, 2.0, policy=Compress(rate=3, k=1), cache="compress")
    paths = CppRunner(sampler, guid, B, shape=SHAPE).package_paths
    exe = build_program(tmp_path / "build")
    plan, out = save_plan(sampler, guid, tmp_path / "plan.pt"), tmp_path / "x.pt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    subprocess.run([str(exe), str(plan), str(out), paths["denoisers"][B], "--grad", paths["classifier_grad"],
                    "--seeds", ",".join(map(str, SEEDS)), "--labels", ",".join(map(str, Y.tolist())),
                    "--shape", ",".join(map(str, SHAPE))], check=True, env=env, capture_output=True)
    want, _ = _python(sampler, guid)
    assert (torch.load(out) - want).abs().max().item() < 1e-5
