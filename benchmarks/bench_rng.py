"""Counter-based noise inside the csrc step vs today's ``normal_`` + fused step, on the CPU (pytest-benchmark).

Two providers per case, side by side in one group:

    normal_+step  ``z.normal_()`` (torch's generator, guided-diffusion's stream), then the fused csrc step reading z
    counter       the fused csrc step with ``noise=None, seeds, step_index``: Philox4x32-10 and Box-Muller inside
                  the step's memory pass (cg_fast/kernels/rng.py), so z is neither written nor read

Cases: the plain DDPM step (fixed variance, no guidance: where the noise is the largest share of the time) and
the most expensive one (learned variance, classifier guidance, momentum cache), at 64x3x64x64 and 16x3x256x256.
The issue asks for ``counter`` to be no slower than ``normal_+step``.

    .venv/bin/python -m pytest benchmarks/bench_rng.py --benchmark-only -q

On a GPU, :func:`bench_counter_gpu` (``python benchmarks/bench_rng.py``; the GPU suite's ``rng`` section) times
the Triton step with in-kernel noise against ``normal_`` + the Triton step and against a copy of the bytes the
counter step moves; the issue's target is counter <= 1.3x the copy.
"""
from __future__ import annotations

import json
import math
from typing import Callable

import pytest
import torch

from cg_fast.kernels import csrc_ops, rng
from cg_fast.kernels.table import Col, schedule_columns
from cg_fast.schedules import NoiseSchedule

SHAPES = [(64, 3, 64, 64), (16, 3, 256, 256)]
CASES = {
    "plain": dict(learned_var=False),
    "learned+momentum": dict(learned_var=True, guide="classifier"),
}


def _inputs(shape, case):
    g = torch.Generator().manual_seed(0)
    b, c = shape[0], shape[1]
    table = schedule_columns(NoiseSchedule.linear(1000).respace("250"))
    table[:, Col.GUIDE_S] = 2.0
    table[:, Col.H_DECAY] = 0.5
    table[:, Col.G_WEIGHT] = 0.5
    coef = table[100].expand(b, -1).contiguous()
    x = torch.randn(shape, generator=g)
    kw = dict(CASES[case])
    o = torch.randn((b, 2 * c, *shape[2:]) if kw["learned_var"] else shape, generator=g)
    if kw["learned_var"]:
        o[:, c:] = o[:, c:].tanh()
    if kw.get("guide") == "classifier":
        kw["fresh"] = torch.randn(shape, generator=g) * 1e-2
        kw["h"] = torch.randn(shape, generator=g) * 1e-2
    return x, o, coef, kw


@pytest.fixture(params=sorted({1, torch.get_num_threads()}), ids=lambda n: f"{n}thr")
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("provider", ["normal_+step", "counter"])
def test_step_noise(benchmark, provider, case, shape, threads):
    if not csrc_ops.available():
        pytest.skip(f"csrc extension not built: {csrc_ops.load_error()}")
    x, o, coef, kw = _inputs(shape, case)
    out = torch.empty_like(x)
    z = torch.empty_like(x)
    gen = torch.Generator().manual_seed(1)
    seeds = rng.sample_seeds(1, shape[0])
    step_index = torch.tensor([100])

    if provider == "counter":
        def run():
            return csrc_ops.ddpm_step_csrc(x, o, coef, None, seeds=seeds, step_index=step_index, out=out, **kw)
    else:
        def run():
            z.normal_(generator=gen)
            return csrc_ops.ddpm_step_csrc(x, o, coef, z, out=out, **kw)

    benchmark.group = f"step + noise, {case}: {'x'.join(map(str, shape))}, {threads} thr"
    benchmark.pedantic(run, rounds=15, warmup_rounds=2, iterations=1)
    benchmark.extra_info.update({"provider": provider, "case": case, "shape": list(shape), "threads": threads})


# -- GPU: the Triton step with in-kernel noise vs normal_ + step vs a copy of the same bytes ----------------------
def _bytes_per_element(case: str) -> int:
    """fp32 bytes the counter step moves per element: read x, o (1x or 2x), [g, h]; write x', [h]."""
    return 4 * (1 + 1 + 1) if case == "plain" else 4 * (1 + 2 + 1 + 1 + 2)


def _time_ms(fn: Callable[[], object], iters: int) -> float:
    """Mean milliseconds per call, CUDA events around ``iters`` back-to-back calls after a warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def bench_counter_gpu(device: str = "cuda", iters: int = 50) -> dict:
    """ms per call of ``copy`` (the counter step's bytes), ``normal_+triton``, ``counter`` (Triton, in-kernel
    noise) and, where built, ``counter_csrc`` (the csrc CUDA kernel), per case and shape; JSON-able."""
    from cg_fast.kernels.triton_step import ddpm_step_triton

    result: dict = {"device": torch.cuda.get_device_name(device), "iters": iters, "cases": {}}
    for case in CASES:
        for shape in SHAPES:
            x, o, coef, kw = (t.to(device) if isinstance(t, torch.Tensor) else t for t in _inputs(shape, case))
            kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            out, z = torch.empty_like(x), torch.empty_like(x)
            seeds = rng.sample_seeds(1, shape[0]).to(device)
            step_index = torch.tensor([100], device=device)
            src = torch.empty(x.numel() * _bytes_per_element(case) // 8, device=device)
            fns = {
                "copy": src.clone,
                "normal_+triton": lambda: ddpm_step_triton(x, o, coef, z.normal_(), out=out, **kw),
                "counter": lambda: ddpm_step_triton(x, o, coef, None, seeds=seeds, step_index=step_index, out=out,
                                                    **kw),
            }
            if csrc_ops.available(device):
                fns["counter_csrc"] = lambda: csrc_ops.ddpm_step_csrc(x, o, coef, None, seeds=seeds,
                                                                      step_index=step_index, out=out, **kw)
            ms = {name: _time_ms(fn, iters) for name, fn in fns.items()}
            row = {f"{k}_ms": round(v, 4) for k, v in ms.items()}
            row["counter_over_copy"] = round(ms["counter"] / ms["copy"], 3)
            row["counter_over_normal_step"] = round(ms["counter"] / ms["normal_+triton"], 3)
            row["bytes"] = x.numel() * _bytes_per_element(case)
            result["cases"][f"{case}:{'x'.join(map(str, shape))}"] = row
            del x, o, coef, kw, out, z, src
    result["target_counter_over_copy"] = 1.3
    result["worst_counter_over_copy"] = max(r["counter_over_copy"] for r in result["cases"].values())
    result["meets_target"] = bool(result["worst_counter_over_copy"] <= 1.3 and not math.isnan(
        result["worst_counter_over_copy"]))
    return result


if __name__ == "__main__":
    print(json.dumps(bench_counter_gpu(), indent=2))
