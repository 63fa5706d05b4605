"""What `cg-fast sample` adds over a bare Sampler loop: per-sample seeds and labels, uint8 conversion, shard
files written by a background thread, the merge and run.json (issue target: at most 5 % of the sampling time).

Digits testbed (the unconditional UNet + the guide, classifier scale 16, CompG), batch 64, 256 samples in
shards of 128, 50 DDPM steps, counter-based noise in both. Both providers run in one session; compare the
medians as a ratio (the table's "harness" row over "bare loop").
"""
from __future__ import annotations

import pytest
import torch

from cg_fast import ClassifierGuidance, Sampler
from cg_fast.guidance import Compress
from cg_fast.harness import SampleJob, run_job
from cg_fast.kernels.rng import sample_seeds
from cg_fast.testbeds.digits import load_testbed

N, BATCH, SHARD, STEPS = 256, 64, 128, "50"


@pytest.fixture(scope="module")
def setup():
    tb = load_testbed(networks=("uncond", "guide"))
    sampler = Sampler.from_model(tb.nets["uncond"], steps=STEPS, rng="counter")
    guid = ClassifierGuidance(tb.nets["guide"], 16.0, policy=Compress(rate=5))
    return sampler, guid


@pytest.mark.parametrize("provider", ["bare loop", "harness"])
def test_harness_overhead(benchmark, setup, provider, tmp_path_factory):
    sampler, guid = setup
    benchmark.group = f"cg-fast sample vs a bare loop: digits, {N} samples, batch {BATCH}, DDPM {STEPS}, CPU"
    labels = torch.arange(N) % 10
    runs = [0]

    def bare():
        for b0 in range(0, N, BATCH):
            idx = range(b0, min(b0 + BATCH, N))
            sampler.sample((len(idx), 1, 8, 8), labels[b0:b0 + len(idx)], guid, seeds=sample_seeds(0, idx))

    def harness():
        runs[0] += 1  # a fresh folder each round: nothing is resumed
        out = tmp_path_factory.mktemp(f"h{runs[0]}")
        job = SampleJob(sampler, guid, shape=(1, 8, 8), num_samples=N, seed=0, out=out, settings={"n": N},
                        batch_size=BATCH, shard_size=SHARD, num_classes=10, progress=False, log=lambda s: None)
        run_job(job)

    benchmark.pedantic(bare if provider == "bare loop" else harness, rounds=3, warmup_rounds=1)
