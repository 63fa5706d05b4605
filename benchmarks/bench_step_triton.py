"""Step-kernel benchmarks: the fused step against the PyTorch reference, the CUDA op and the bandwidth floor.

Run on a CUDA machine (``TRITON_INTERPRET`` unset; the conftest leaves it unset where CUDA exists):
    python -m pytest -q benchmarks/bench_step_triton.py --benchmark-only
    python benchmarks/bench_step_triton.py            # prints bench_triton_vs_copy() as JSON

The measured step is the most expensive one the sampler runs: DDPM ancestral, learned variance, classifier
guidance with the momentum cache at a guided step (spec §4/§5). The fused kernel reads x, eps, v, z, g, h and
writes x', h: 32 bytes per element in fp32. The ``copy`` provider clones a tensor of the same total bytes
(16 bytes per element read, 16 written), the floor that a memory-bound kernel can approach.

How it is timed. The kernel runs for 6-25 µs at these sizes while a Python call of the wrapper costs tens of
µs on the host, so back-to-back eager calls would time the host, not the kernel. Every provider is therefore
captured as a CUDA graph of ``INNER`` launches and timed as graph replays with CUDA events (no host work
between launches, as in the sampler's graphed steps). The inputs rotate among enough copies that one pass
over them exceeds three times the L2 cache, so the small size is not timed out of L2. The wrapper's host
cost (what an un-graphed step pays at batch 1) is measured separately, on the host clock: the whole wrapper,
and Triton's own launch of the same kernel with the wrapper's arguments.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import time
from typing import Callable

import pytest
import torch

from cg_fast import NoiseSchedule
from cg_fast.kernels.reference import ddpm_step_ref
from cg_fast.kernels.table import NUM_COLS, Col, schedule_columns

SIZES = {"64x3x64x64": (64, 3, 64, 64), "16x3x256x256": (16, 3, 256, 256)}
PROVIDERS = ("reference", "triton", "csrc", "copy")
BYTES_PER_ELEMENT = 4 * (6 + 2)  # read x, eps, v, z, g, h; write x', h (fp32)
INNER = 20  # launches per captured graph


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


def provider_available(provider: str, device: str | torch.device = "cuda") -> bool:
    """Whether ``provider`` can run on ``device`` (csrc needs the CUDA extension cg_fast._C_cuda)."""
    if provider == "csrc":
        from cg_fast import kernels
        return kernels.available("csrc", torch.device(device))
    return provider in PROVIDERS


def step_inputs(shape: tuple[int, ...], device: str | torch.device = "cuda", seed: int = 0) -> dict:
    """Inputs of one guided DDPM step: x, model output [B, 2C, ...], coefficients, z, g, h (spec §5)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device)  # noqa: E731
    batch, chans = shape[0], shape[1]
    model_out = rnd(batch, 2 * chans, *shape[2:])
    model_out[:, chans:].tanh_()
    row = schedule_columns(NoiseSchedule.linear(1000).respace("250"), eta=0.0)[125].clone()
    row[Col.GUIDE_S], row[Col.H_DECAY], row[Col.G_WEIGHT] = 1.0, 0.5, 0.5  # momentum, beta = 0.5 (spec §4)
    coef = row.to(device)[None].expand(batch, NUM_COLS)
    x = rnd(*shape)
    return {"x": x, "model_out": model_out, "coef": coef, "noise": rnd(*shape),
            "fresh": 0.1 * rnd(*shape), "h": 0.1 * rnd(*shape), "out": torch.empty_like(x)}


def provider_fn(provider: str, inputs: dict) -> Callable[[], torch.Tensor]:
    """One step of ``provider`` on ``inputs`` into ``inputs["out"]`` (h updated in place, as in sampling)."""
    kw = {"guide": "classifier", "fresh": inputs["fresh"], "h": inputs["h"], "learned_var": True,
          "out": inputs["out"]}
    args = (inputs["x"], inputs["model_out"], inputs["coef"], inputs["noise"])
    if provider == "reference":
        return lambda: ddpm_step_ref(*args, **kw)
    if provider == "triton":
        from cg_fast.kernels.triton_step import ddpm_step_triton
        return lambda: ddpm_step_triton(*args, **kw)
    if provider == "csrc":
        from cg_fast.kernels.csrc_ops import ddpm_step_csrc
        return lambda: ddpm_step_csrc(*args, **kw)
    if provider == "copy":
        # same total bytes as the fused kernel: a copy reads N * 16 bytes and writes N * 16 bytes
        n = inputs["x"].numel() * BYTES_PER_ELEMENT // 8
        src = torch.empty(n, device=inputs["x"].device).normal_()
        dst = torch.empty_like(src)
        return lambda: dst.copy_(src)
    raise ValueError(f"unknown provider {provider!r}: use one of {PROVIDERS}")


def bytes_moved(shape: tuple[int, ...]) -> int:
    """Compulsory memory traffic of the fused step (the copy provider moves the same)."""
    return math.prod(shape) * BYTES_PER_ELEMENT


def input_sets(shape: tuple[int, ...], device: str | torch.device = "cuda") -> list[dict]:
    """Enough independent input sets that one pass over them moves three times the L2 cache."""
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 60 << 20) or (60 << 20)
    count = max(1, math.ceil(3 * l2 / bytes_moved(shape)))
    return [step_inputs(shape, device, seed=i) for i in range(count)]


def graphed(fns: list[Callable[[], object]], inner: int = INNER) -> Callable[[], None]:
    """A CUDA graph of ``inner`` launches cycling through ``fns``; returns its replay (after warm-up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:  # compile Triton, create handles and allocator blocks before the capture
            fn()
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(inner):
            fns[i % len(fns)]()
    return graph.replay


def replay_us(replay: Callable[[], None], inner: int = INNER, reps: int = 30) -> float:
    """Median µs per launch: CUDA events around each replay of a graph of ``inner`` launches."""
    for _ in range(3):
        replay()
    torch.cuda.synchronize()
    per = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        replay()
        b.record()
        b.synchronize()
        per.append(a.elapsed_time(b) * 1e3 / inner)
    return statistics.median(per)


def host_us(fn: Callable[[], object], iters: int = 200) -> float:
    """µs of host time per call, back to back (the device may lag; it is synchronised outside the timing)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    host = (time.perf_counter() - start) / iters * 1e6
    torch.cuda.synchronize()
    return host


def eager_us(fn: Callable[[], object], iters: int = 200) -> float:
    """µs per call of back-to-back eager calls, CUDA events (what an un-graphed sampler pays)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / iters


def triton_launch_only(inputs: dict) -> Callable[[], object]:
    """Triton's own launch of the step kernel with the arguments the wrapper computed (no wrapper checks)."""
    from cg_fast.kernels import triton_step
    triton_step._PLANS.clear()
    provider_fn("triton", inputs)()  # builds the wrapper's plan for this signature, the only one now
    (plan,) = triton_step._PLANS.values()
    i = inputs
    args = (i["x"], i["model_out"], i["coef"], i["noise"], i["fresh"], i["h"], i["out"], *plan.scalars)
    return lambda: plan.launch(*args, **plan.constexprs)


def host_costs(device: str | torch.device = "cuda") -> dict:
    """The wrapper's host cost at batch 1 (where it matters: no graph, a tiny kernel), split from Triton's."""
    inputs = step_inputs((1, 3, 64, 64), device)
    res = {"shape": "1x3x64x64", "wrapper_host_us": host_us(provider_fn("triton", inputs)),
           "triton_launch_host_us": host_us(triton_launch_only(inputs)),
           "wrapper_eager_us": eager_us(provider_fn("triton", inputs)),
           "reference_eager_us": eager_us(provider_fn("reference", inputs))}
    res["wrapper_own_us"] = res["wrapper_host_us"] - res["triton_launch_host_us"]
    return res


class _NoLaunch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` does nothing (times the wrapper alone)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def test_wrapper_host_cost(benchmark, monkeypatch) -> None:
    """The Python wrapper's own host cost per call, the kernel launch stubbed out (runs anywhere, CPU tensors
    under the interpreter or CUDA tensors): a known signature costs a plan lookup and nothing else."""
    from cg_fast.kernels import triton_step
    if not triton_step.available():
        pytest.skip("triton cannot run here (no CUDA, TRITON_INTERPRET not 1)")
    monkeypatch.setattr(triton_step, "_ddpm_step_kernel", _NoLaunch())
    triton_step._PLANS.clear()
    device = "cuda" if torch.cuda.is_available() and not triton_step._INTERPRETED else "cpu"
    fn = provider_fn("triton", step_inputs((1, 3, 64, 64), device))
    fn()
    benchmark.pedantic(lambda: [fn() for _ in range(100)], rounds=20, iterations=1, warmup_rounds=2)
    benchmark.extra_info.update({"us_per_call": benchmark.stats.stats.median / 100 * 1e6, "device": device})


# -- pytest-benchmark -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("provider", PROVIDERS)
def test_step_triton(benchmark, provider: str, size: str) -> None:
    """One learned-variance DDPM step, classifier guidance, momentum cache; timed as graph replays."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    if not provider_available(provider):
        pytest.skip(f"provider {provider} is not built here (the CUDA extension cg_fast._C_cuda)")
    shape = SIZES[size]
    replay = graphed([provider_fn(provider, inp) for inp in input_sets(shape)])

    def timed() -> None:
        replay()
        torch.cuda.synchronize()

    benchmark.pedantic(timed, rounds=30, iterations=1, warmup_rounds=3)
    seconds = benchmark.stats.stats.median / INNER
    benchmark.extra_info.update({"provider": provider, "shape": size, "launches_per_round": INNER,
                                 "us_per_launch": seconds * 1e6, "bytes": bytes_moved(shape),
                                 "GB/s": bytes_moved(shape) / seconds / 1e9})


def bench_triton_vs_copy(device: str = "cuda") -> dict:
    """Per-launch µs of every provider at both sizes (graph replays), ratios, and the wrapper's host cost.

    For the GPU suite: returns a JSON-able dict keyed by size, plus the device, the bytes moved and
    ``host`` (:func:`host_costs`).
    """
    reason = _skip_reason()
    if reason is not None or not str(device).startswith("cuda"):
        raise RuntimeError(f"bench_triton_vs_copy cannot run: {reason or 'needs a CUDA device'}")
    providers = [p for p in PROVIDERS if provider_available(p, device)]
    result: dict = {"device": torch.cuda.get_device_name(device), "timing": f"CUDA graph of {INNER} launches, "
                    "median of 30 replays, inputs rotated past L2", "bytes_per_element": BYTES_PER_ELEMENT,
                    "providers": providers, "sizes": {}}
    for name, shape in SIZES.items():
        sets = input_sets(shape, device)
        us = {p: replay_us(graphed([provider_fn(p, inp) for inp in sets])) for p in providers}
        row = {"input_sets": len(sets), **{f"{p}_us": round(us[p], 2) for p in providers},
               **{f"{p}_GBps": round(bytes_moved(shape) / (us[p] * 1e-6) / 1e9, 1) for p in providers},
               "triton_over_copy": round(us["triton"] / us["copy"], 3),
               "reference_over_triton": round(us["reference"] / us["triton"], 2)}
        if "csrc" in us:
            row["csrc_over_triton"] = round(us["csrc"] / us["triton"], 3)
        result["sizes"][name] = row
        sets = None
        torch.cuda.empty_cache()
    result["host"] = host_costs(device)
    return result


if __name__ == "__main__":
    print(json.dumps(bench_triton_vs_copy(), indent=2))
