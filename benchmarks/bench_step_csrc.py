"""Fused csrc DDPM step vs the unfused PyTorch reference on the CPU (pytest-benchmark, one line per provider).

The case is the most expensive step of the project: learned variance (two channels of model output, two exps),
classifier guidance with the momentum cache (spec §4-§5: a = beta h + (1 - beta) g, h <- a, mean + Var s a).

Memory traffic of the fused step, per element (fp32): read x, o (eps and variance: 2x), z, g, h = 24 bytes, write
x', h = 8 bytes: 32 bytes. The reference performs ~25 tensor operations that each read and write whole tensors,
so the fused kernel should be several times faster; the issue's target is >= 3x. ``extra_info["GB/s"]`` is these
32 bytes per element over the median time (the same useful-bytes count for both providers).

    .venv/bin/python -m pytest benchmarks/bench_step_csrc.py --benchmark-only -q
"""
from __future__ import annotations

import pytest
import torch

from cg_fast.kernels import csrc_ops
from cg_fast.kernels.reference import ddpm_step_ref
from cg_fast.kernels.table import Col, schedule_columns
from cg_fast.schedules import NoiseSchedule

SHAPES = [(64, 3, 64, 64), (16, 3, 256, 256)]
BYTES_PER_ELEMENT = 4 * (1 + 2 + 1 + 1 + 1) + 4 * 2  # read x, o (2 channels), z, g, h; write x', h
ROUNDS = {"ref": 5, "csrc": 20}  # the reference takes ~0.1-0.3 s per call here (2 cores): keep runs short


def _inputs(shape):
    """One step's inputs: a mid-schedule table row per batch row, momentum weights (beta = 0.5)."""
    g = torch.Generator().manual_seed(0)
    b, c = shape[0], shape[1]
    table = schedule_columns(NoiseSchedule.linear(1000).respace("250"))
    table[:, Col.GUIDE_S] = 2.0
    table[:, Col.H_DECAY] = 0.5
    table[:, Col.G_WEIGHT] = 0.5
    coef = table[100].expand(b, -1).contiguous()
    x = torch.randn(shape, generator=g)
    o = torch.randn((b, 2 * c, *shape[2:]), generator=g)
    o[:, c:] = o[:, c:].tanh()  # the variance channel in [-1, 1]
    z = torch.randn(shape, generator=g)
    grad = torch.randn(shape, generator=g) * 1e-2
    h = torch.randn(shape, generator=g) * 1e-2
    return x, o, coef, z, grad, h


@pytest.fixture(params=sorted({1, torch.get_num_threads()}), ids=lambda n: f"{n}thr")
def threads(request):
    """torch's intra-op threads (used by both providers): 1 (stable on a shared machine) and the default."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("provider", ["ref", "csrc"])
def test_ddpm_step_learned_var_classifier_momentum(benchmark, provider, shape, threads):
    if provider == "csrc" and not csrc_ops.available():
        pytest.skip(f"csrc extension not built: {csrc_ops.load_error()}")
    step = csrc_ops.ddpm_step_csrc if provider == "csrc" else ddpm_step_ref
    x, o, coef, z, grad, h = _inputs(shape)

    def run():
        return step(x, o, coef, z, guide="classifier", fresh=grad, h=h, learned_var=True)

    benchmark.group = f"ddpm step, learned var + classifier + momentum: {'x'.join(map(str, shape))}, {threads} thr"
    benchmark.pedantic(run, rounds=ROUNDS[provider], warmup_rounds=1, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update({
        "provider": provider,
        "shape": list(shape),
        "threads": threads,
        "bytes": BYTES_PER_ELEMENT * x.numel(),
        "GB/s": round(BYTES_PER_ELEMENT * x.numel() / median / 1e9, 3),
    })
