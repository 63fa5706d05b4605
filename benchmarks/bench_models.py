"""Forward throughput of the model zoo on the CPU (tiny configs, random weights): eager vs torch.compile.

    .venv/bin/python -m pytest benchmarks/bench_models.py --benchmark-only -q

Each case times one forward pass of a batch under `torch.inference_mode()`; `extra_info` records images/s
(from the minimum, the statistic least disturbed by other processes). Runs on CG_BENCH_THREADS intra-op threads
(default 1: on a shared 2-core machine, OpenMP spinning against other processes makes multi-thread timings
swing by 10-100x).
The compiled variant is compiled and warmed up before timing (inductor, `fullgraph=True`); its first compile
costs tens of seconds on 2 cores. Speed does not depend on the weights. GPU entries (fp16/bf16, CUDA graphs)
use the same models with `dtype=` / `channels_last=` and belong to the GPU suite.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

import cg_fast.models as M
from cg_fast.models.testing import example_inputs, randomize_

BATCH = 8
THREADS = int(os.environ.get("CG_BENCH_THREADS", "1"))
MODELS = ["adm-tiny-cond", "adm-tiny-classifier", "dit-tiny"]
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _have_cxx() -> bool:
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("name", MODELS)
def test_forward_throughput(benchmark, name, mode):
    if mode == "compiled" and not _have_cxx():
        pytest.skip("inductor on the CPU needs a C++ compiler (g++ or clang++)")
    torch.manual_seed(0)
    model = randomize_(M.create(name), seed=0)
    inputs = example_inputs(model, BATCH)
    fn = model
    if mode == "compiled":
        torch._dynamo.reset()
        fn = torch.compile(model, fullgraph=True)
    with torch.inference_mode():
        want = model(*inputs)
        for _ in range(3):  # compile (if any) and warm up
            got = fn(*inputs)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

        def run():
            return fn(*inputs)

        benchmark.pedantic(run, rounds=30, iterations=3, warmup_rounds=2)
    benchmark.extra_info.update(
        model=name,
        mode=mode,
        batch=BATCH,
        threads=torch.get_num_threads(),
        images_per_s=BATCH / benchmark.stats.stats.min,
        torch=torch.__version__,
    )
