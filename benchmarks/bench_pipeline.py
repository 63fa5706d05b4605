"""cg_fast.Pipeline on the CPU, side by side in one run (digits testbed, conditional UNet, CFG-CompG, 50 DDIM
steps):

- overhead: one 16-row request through the pipeline vs the same bare ``Sampler.sample`` call (target <= 2 %);
- throughput: 8 concurrent 1-row requests, micro-batched, vs the same 8 served one at a time (target >= 2x).

Compare the medians within each group as ratios.
"""
from __future__ import annotations

import threading

import pytest
import torch

from cg_fast import CFG, Pipeline, Sampler
from cg_fast.guidance import Compress
from cg_fast.kernels.rng import sample_seeds
from cg_fast.testbeds.digits import load_testbed

STEPS = "ddim50"


@pytest.fixture(scope="module")
def setup():
    net = load_testbed(networks=("cond",)).nets["cond"]
    pipe = Pipeline(net, guidance="cfg", scale=2.0, policy=Compress(rate=5), steps=STEPS, method="ddim",
                    batch_sizes=(1, 2, 4, 8, 16), max_wait_ms=20, device="cpu")
    pipe.warmup()
    sampler = Sampler.from_model(net, steps=STEPS, method="ddim", rng="counter")
    yield pipe, sampler
    pipe.close()


@pytest.mark.parametrize("provider", ["bare sampler", "pipeline"])
def test_overhead_batch16(benchmark, setup, provider):
    pipe, sampler = setup
    benchmark.group = f"Pipeline overhead: one 16-row request, digits cond UNet, CFG-CompG, {STEPS}, CPU"
    labels, seeds = torch.arange(16) % 10, sample_seeds(0, 16)
    guid = sampler.resolve_cfg(CFG(2.0, policy=Compress(rate=5)))

    def bare():
        return sampler.sample((16, 1, 8, 8), labels, guid, seeds=seeds).x

    def piped():
        return pipe(labels, seeds=seeds).images

    benchmark.pedantic(bare if provider == "bare sampler" else piped, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("provider", ["one at a time", "8 threads, micro-batched"])
def test_throughput_8_single_requests(benchmark, setup, provider):
    pipe, _ = setup
    benchmark.group = f"8 one-row requests, digits cond UNet, CFG-CompG, {STEPS}, CPU"

    def sequential():
        for i in range(8):
            pipe([i], seeds=[i])

    def concurrent():
        threads = [threading.Thread(target=pipe, args=([i],), kwargs={"seeds": [i]}) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    benchmark.pedantic(sequential if provider == "one at a time" else concurrent, rounds=5, warmup_rounds=1)
    benchmark.extra_info["batches_so_far"] = pipe.counters["batches"]
