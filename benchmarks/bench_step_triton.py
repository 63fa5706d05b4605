"""Step-kernel benchmarks: the fused step against the PyTorch reference and the bandwidth floor.

Run on a CUDA machine (``TRITON_INTERPRET`` unset):
    python -m pytest -q benchmarks/bench_step_triton.py --benchmark-only
    python benchmarks/bench_step_triton.py            # prints bench_triton_vs_copy() as JSON

The measured step is the most expensive one the sampler runs: DDPM ancestral, learned variance, classifier
guidance with the momentum cache at a guided step (spec §4/§5). The fused kernel reads x, eps, v, z, g, h and
writes x', h: 32 bytes per element in fp32. The ``copy`` provider clones a tensor of the same total bytes
(16 bytes per element read, 16 written), the floor that a memory-bound kernel can approach.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import pytest
import torch

from cg_fast import NoiseSchedule
from cg_fast.kernels.reference import ddpm_step_ref
from cg_fast.kernels.table import NUM_COLS, Col, schedule_columns

SIZES = {"64x3x64x64": (64, 3, 64, 64), "16x3x256x256": (16, 3, 256, 256)}
PROVIDERS = ("reference", "triton", "copy")
BYTES_PER_ELEMENT = 4 * (6 + 2)  # read x, eps, v, z, g, h; write x', h (fp32)


def _skip_reason() -> str | None:
    """Why the benchmark cannot give meaningful numbers here, or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA device: interpreter timings on the CPU mean nothing"
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 runs Triton through the CPU interpreter: timings mean nothing"
    try:
        from cg_fast.kernels import triton_step
    except ImportError as e:  # pragma: no cover
        return f"cannot import the Triton kernels: {e}"
    return None if triton_step.available() else "triton is not installed"


def step_inputs(shape: tuple[int, ...], device: str = "cuda") -> dict:
    """Inputs of one guided DDPM step: x, model output [B, 2C, ...], coefficients, z, g, h (spec §5)."""
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    batch, chans = shape[0], shape[1]
    model_out = rnd(batch, 2 * chans, *shape[2:])
    model_out[:, chans:].tanh_()
    row = schedule_columns(NoiseSchedule.linear(1000).respace("250"), eta=0.0)[125].clone()
    row[Col.GUIDE_S], row[Col.H_DECAY], row[Col.G_WEIGHT] = 1.0, 0.5, 0.5  # momentum, beta = 0.5 (spec §4)
    coef = row.to(device)[None].expand(batch, NUM_COLS)
    return {"x": rnd(*shape), "model_out": model_out, "coef": coef, "noise": rnd(*shape),
            "fresh": 0.1 * rnd(*shape), "h": 0.1 * rnd(*shape)}


def provider_fn(provider: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """One step of ``provider`` on ``inputs`` (h is updated in place at every call, as in sampling)."""
    kw = {"guide": "classifier", "fresh": inputs["fresh"], "h": inputs["h"], "learned_var": True}
    args = (inputs["x"], inputs["model_out"], inputs["coef"], inputs["noise"])
    if provider == "reference":
        return lambda: ddpm_step_ref(*args, **kw)
    if provider == "triton":
        from cg_fast.kernels.triton_step import ddpm_step_triton
        return lambda: ddpm_step_triton(*args, **kw)
    if provider == "copy":
        # same total bytes as the fused kernel: clone reads N * 16 bytes and writes N * 16 bytes
        src = torch.empty(inputs["x"].numel() * BYTES_PER_ELEMENT // 8, device=inputs["x"].device)
        return src.clone
    raise ValueError(f"unknown provider {provider!r}: use one of {PROVIDERS}")


def bytes_moved(shape: tuple[int, ...]) -> int:
    """Compulsory memory traffic of the fused step (the copy provider moves the same)."""
    n = 1
    for s in shape:
        n *= s
    return n * BYTES_PER_ELEMENT


# -- Triton ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_step_triton(benchmark, provider: str, size: str) -> None:
    """pytest-benchmark: one learned-variance DDPM step, classifier guidance, momentum cache."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    shape = SIZES[size]
    fn = provider_fn(provider, step_inputs(shape))
    fn()  # compile / warm the allocator
    torch.cuda.synchronize()

    def timed() -> None:
        fn()
        torch.cuda.synchronize()  # the step is asynchronous: time its completion

    benchmark.pedantic(timed, rounds=50, iterations=1, warmup_rounds=5)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update({"provider": provider, "shape": size, "bytes": bytes_moved(shape),
                                 "GB/s": bytes_moved(shape) / seconds / 1e9})


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


def bench_triton_vs_copy(device: str = "cuda", iters: int = 50) -> dict:
    """Reference, Triton and copy times (ms) at both sizes, with the ratios triton/copy and reference/triton.

    For the GPU suite script: returns a JSON-able dict keyed by size, plus the device and the bytes moved.
    """
    reason = _skip_reason()
    if reason is not None or not str(device).startswith("cuda"):
        raise RuntimeError(f"bench_triton_vs_copy cannot run: {reason or 'needs a CUDA device'}")
    result: dict = {"device": torch.cuda.get_device_name(device), "iters": iters,
                    "bytes_per_element": BYTES_PER_ELEMENT, "sizes": {}}
    for name, shape in SIZES.items():
        inputs = step_inputs(shape, device)
        ms = {p: _time_ms(provider_fn(p, inputs), iters) for p in PROVIDERS}
        gbps = {f"{p}_GBps": bytes_moved(shape) / (ms[p] * 1e-3) / 1e9 for p in PROVIDERS}
        result["sizes"][name] = {**{f"{p}_ms": ms[p] for p in PROVIDERS}, **gbps,
                                 "triton_over_copy": ms["triton"] / ms["copy"],
                                 "reference_over_triton": ms["reference"] / ms["triton"]}
    return result


if __name__ == "__main__":
    print(json.dumps(bench_triton_vs_copy(), indent=2))
