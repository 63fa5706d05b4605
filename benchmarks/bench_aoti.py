"""Ahead-of-time packages and the C++ runner on the CPU, side by side in one run (digits testbed: unconditional
UNet guided by its classifier, CompG rate 5, DDIM 20 steps, batch 4):

- cold start, process start -> first sample, in fresh subprocesses: eager, ``compile`` (fresh inductor cache:
  what a new machine pays) and ``aoti`` (packages made beforehand by ``cg-fast export --format aoti``, so the
  process only loads them), and ``cg_fast_run``, the C++ runner as a program (no Python; built first, not
  timed). Target: aoti the fastest of the compiled paths.
- per step after warm-up: the Python loop with eager, compile and aoti networks (target: aoti <= 1.2x eager),
  and the C++ runner over the same packages (target: no slower than the Python loop with aoti).

Compare the medians within each group. Under a shared machine's load pytest-benchmark's back-to-back rounds
are noisy; ``python benchmarks/bench_aoti.py`` runs the per-step comparison interleaved (every round runs every
path once) and prints the medians and each path's largest difference from eager.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import pytest
import torch

from cg_fast import ClassifierGuidance, Sampler
from cg_fast.guidance import Compress
from cg_fast.testbeds.digits import load_testbed

STEPS, METHOD, BATCH = "ddim20", "ddim", 4
SEEDS = list(range(BATCH))

COLD = """
import time, sys
t0 = float(sys.argv[2])
import torch
from cg_fast import ClassifierGuidance, Sampler
from cg_fast.guidance import Compress
from cg_fast.testbeds.digits import load_testbed
tb = load_testbed(networks=("uncond", "guide"))
s = Sampler.from_model(tb.nets["uncond"], steps="{steps}", method="{method}", rng="counter", backend=sys.argv[1])
g = ClassifierGuidance(tb.nets["guide"], 4.0, policy=Compress(rate=5, k=1))
s.sample(({batch}, 1, 8, 8), y=torch.arange({batch}), guidance=g, seeds=list(range({batch})))
print("first sample after", time.time() - t0)
""".format(steps=STEPS, method=METHOD, batch=BATCH)


@pytest.fixture(scope="module")
def cache():
    """A fresh package cache with the aoti packages exported (as `cg-fast export --format aoti` would)."""
    root = tempfile.mkdtemp(prefix="cg_fast_bench_aoti_")
    env = {**os.environ, "CG_FAST_CACHE": root}
    subprocess.run([sys.executable, "-m", "cg_fast", "export", "--model", "digits-uncond", "--classifier",
                    "digits-guide", "--batch-size", str(BATCH), "--format", "aoti"], env=env, check=True,
                   capture_output=True)
    return root


@pytest.mark.parametrize("backend", ["eager", "compile", "aoti"])
def test_cold_start(benchmark, cache, backend):
    benchmark.group = f"cold start: process start -> first sample (digits uncond + guide, {STEPS}, batch {BATCH})"

    def run():
        env = {**os.environ, "CG_FAST_CACHE": cache,
               "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="cg_fast_bench_inductor_")}
        subprocess.run([sys.executable, "-c", COLD, backend, repr(time.time())], env=env, check=True,
                       capture_output=True)

    benchmark.pedantic(run, rounds=2 if backend != "compile" else 1, iterations=1)


def test_cold_start_cpp_program(benchmark, cache, tmp_path_factory):
    from cg_fast.runner import build_program, runner_unavailable, save_plan

    if runner_unavailable():
        pytest.skip(runner_unavailable())
    benchmark.group = f"cold start: process start -> first sample (digits uncond + guide, {STEPS}, batch {BATCH})"
    root = tmp_path_factory.mktemp("program")
    exe = build_program(root / "build")
    tb = load_testbed(networks=("uncond", "guide"))
    sampler = Sampler.from_model(tb.nets["uncond"], steps=STEPS, method=METHOD, rng="counter")
    guid = ClassifierGuidance(tb.nets["guide"], 4.0, policy=Compress(rate=5, k=1))
    from cg_fast.backends.aoti import AotiClassifierGrad, AotiDenoiser

    x, t = torch.zeros(BATCH, 1, 8, 8), torch.zeros(BATCH, dtype=torch.long)
    den = AotiDenoiser(tb.nets["uncond"], cache_dir=os.path.join(cache, "aoti")).prepare(x, t, None)
    grad = AotiClassifierGrad(tb.nets["guide"], cache_dir=os.path.join(cache, "aoti")).prepare(x, t, t)
    plan = save_plan(sampler, guid, root / "plan.pt")
    args = [str(exe), str(plan), str(root / "x.pt"), str(den), "--grad", str(grad), "--seeds",
            ",".join(map(str, SEEDS)), "--labels", ",".join(map(str, range(BATCH))), "--shape", "1,8,8"]
    benchmark.pedantic(lambda: subprocess.run(args, check=True, capture_output=True), rounds=2, iterations=1)


@pytest.fixture(scope="module")
def nets(cache):
    os.environ["CG_FAST_CACHE"] = cache
    tb = load_testbed(networks=("uncond", "guide"))
    return tb.nets["uncond"], ClassifierGuidance(tb.nets["guide"], 4.0, policy=Compress(rate=5, k=1))


@pytest.mark.parametrize("backend", ["eager", "compile", "aoti"])
def test_per_step_python_loop(benchmark, nets, backend):
    model, guid = nets
    benchmark.group = f"per step after warm-up (whole {STEPS} run, batch {BATCH}; divide by 20)"
    sampler = Sampler.from_model(model, steps=STEPS, method=METHOD, rng="counter", backend=backend)
    y = torch.arange(BATCH)
    run = lambda: sampler.sample((BATCH, 1, 8, 8), y=y, guidance=guid, seeds=SEEDS)  # noqa: E731
    run()  # warm-up: compile / load
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)


def test_per_step_cpp_runner(benchmark, nets):
    from cg_fast.runner import CppRunner, runner_unavailable

    why = runner_unavailable()
    if why:
        pytest.skip(why)
    model, guid = nets
    benchmark.group = f"per step after warm-up (whole {STEPS} run, batch {BATCH}; divide by 20)"
    sampler = Sampler.from_model(model, steps=STEPS, method=METHOD, rng="counter")
    runner = CppRunner(sampler, guid, BATCH)
    y = torch.arange(BATCH)
    run = lambda: runner.sample(y, SEEDS)  # noqa: E731
    run()
    benchmark.pedantic(run, rounds=10, iterations=1, warmup_rounds=1)


def side_by_side(rounds: int = 15) -> dict[str, float]:
    """Per-step medians (ms) of eager, compile, aoti (Python loop) and the C++ runner, rounds interleaved."""
    import statistics

    from cg_fast.runner import CppRunner

    os.environ.setdefault("CG_FAST_CACHE", tempfile.mkdtemp(prefix="cg_fast_bench_aoti_"))
    tb = load_testbed(networks=("uncond", "guide"))
    guid = ClassifierGuidance(tb.nets["guide"], 4.0, policy=Compress(rate=5, k=1))
    y, n = torch.arange(BATCH), 20
    runs = {}
    for backend in ("eager", "compile", "aoti"):
        s = Sampler.from_model(tb.nets["uncond"], steps=STEPS, method=METHOD, rng="counter", backend=backend)
        runs[backend] = lambda s=s: s.sample((BATCH, 1, 8, 8), y=y, guidance=guid, seeds=SEEDS).x
    runner = CppRunner(Sampler.from_model(tb.nets["uncond"], steps=STEPS, method=METHOD, rng="counter"), guid, BATCH)
    runs["cpp runner"] = lambda: runner.sample(y, SEEDS)
    outs = {k: f() for k, f in runs.items()}  # warm-up: compile / load
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for k, f in runs.items():
            start = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) * 1000 / n for k, v in times.items()}
    for k in runs:
        print(f"{k:11s} {medians[k]:6.2f} ms/step (min {min(times[k]) * 1000 / n:.2f}), "
              f"max |x - eager| {(outs[k] - outs['eager']).abs().max().item():.1e}")
    return medians


if __name__ == "__main__":
    side_by_side()
