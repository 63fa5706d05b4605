"""The GPU suite: one script for the device machine (H100 / H200), under 6 minutes, JSON out.

    python benchmarks/gpu_suite.py --out "$OUT"            # then copy $OUT/gpu_suite.json to benchmarks/results/

Sections (each guarded: an error is recorded and the suite goes on; the JSON is rewritten after each):
  env          GPU, torch, triton versions
  correctness  pytest tests/test_gpu.py (whole-step graphs vs eager, Triton vs reference, graphed classifier)
  kernels      the Triton fused step vs the PyTorch reference and vs a copy of the same bytes (issue 4)
  forward      per-call ms of the denoisers and the classifier gradient, eager vs CUDA graph, fp16/bf16 (issue 3)
  sampling     whole 50-step DDPM runs: CompG (rate 5, k 1: 12 guided steps), full guidance and unguided, per
               backend (issue 5), with the targets of the issues and the peer figures of gpu-anchors.md
Random weights throughout (speed does not depend on them). Figures are comparable only within one run.
Models are built one at a time on the device and freed (with their captured graphs) before the next.

TensorRT runs only on request (``--backends tensorrt cudagraph eager``): an engine build per model and
batch takes minutes, more than this suite's budget, and cannot be interrupted by it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Peer figures (H200, gpu-anchors.md) and the issues' targets on an H200, seconds for 50 steps.
SAMPLING = {
    "adm64_b1": dict(model="adm-64-cond", clf="adm-64-classifier", batch=1, peer_full=7.05, target=0.6),
    "adm64_b64": dict(model="adm-64-cond", clf="adm-64-classifier", batch=64, peer_full=10.15, target=2.0),
    "adm256_b16": dict(model="adm-256-cond", clf="adm-256-classifier", batch=16, peer_full=13.21, target=5.5),
    "dit_b16": dict(model="dit-xl-2-256", clf=None, batch=16, peer_full=2.60, target=1.0),
    "dit_b1": dict(model="dit-xl-2-256", clf=None, batch=1, peer_full=0.78, target=0.3),
}
# Per-call targets (ms, H200) of the models issue.
FORWARD_TARGETS = {"adm64_unet_b64": 30.0, "adm64_unet_b1_graph": 7.0, "adm64_clf_grad_b64": 30.0,
                   "adm256_unet_b16": 90.0, "dit_b16_bf16": 14.0}


class Suite:
    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.budget, self.start = out, budget_s, time.perf_counter()
        self.results: dict[str, Any] = {"sections": {}, "errors": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "gpu_suite.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, self.out / "gpu_suite.json")

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        if self.elapsed() > self.budget:
            self.results["errors"][name] = f"skipped: time budget {self.budget:.0f} s spent"
            return
        t0 = time.perf_counter()
        print(f"== {name} (t = {self.elapsed():.0f} s)", flush=True)
        try:
            self.results["sections"][name] = fn()
        except Exception as e:  # record and go on: one broken section must not cost the others
            self.results["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
            print(f"   ERROR {type(e).__name__}: {e}", flush=True)
        self.results.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
        self.save()


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "?")
    except Exception as e:  # noqa: BLE001 - record, do not fail the section
        return f"unavailable ({type(e).__name__})"


def env() -> dict:
    return {"gpu": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "tensorrt": _version("tensorrt"), "onnxruntime": _version("onnxruntime"),
            "python": platform.python_version(),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)}


def correctness(timeout_s: float = 240.0) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py"],
                              cwd=ROOT, capture_output=True, text=True, timeout=timeout_s,
                              env={**os.environ, "TRITON_INTERPRET": "0"})
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return {"returncode": None, "timeout_s": timeout_s, "tail": out[-3000:]}
    return {"returncode": proc.returncode, "tail": proc.stdout[-3000:] + proc.stderr[-1000:]}


def kernels() -> dict:
    from bench_step_triton import bench_triton_vs_copy
    return bench_triton_vs_copy("cuda")


def time_ms(fn: Callable[[], Any], iters: int = 20, warmup: int = 3) -> float:
    """Median ms per call (CUDA events per call)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def _inputs(model, batch: int, with_y: bool = True):
    cfg = model.cg_config
    x = torch.randn(batch, *cfg.input_shape, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    y = torch.randint(0, cfg.num_classes or 1000, (batch,), device="cuda") if with_y else None
    return x, t, y


def _free() -> None:
    """Give the memory of the objects just dropped (weights, graph pools) back before the next model."""
    import gc
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def forward() -> dict:
    import cg_fast.models as M
    from cg_fast.backends.cudagraph import CUDAGraphClassifierGrad, CUDAGraphDenoiser

    res: dict[str, Any] = {"targets_ms_h200": FORWARD_TARGETS, "errors": {}}
    cases = [("adm64_unet", "adm-64-cond", None, (1, 64)), ("adm64_unet_bf16", "adm-64-cond", torch.bfloat16, (64,)),
             ("adm256_unet", "adm-256-cond", None, (16,)), ("dit", "dit-xl-2-256", torch.float32, (1, 16)),
             ("dit_bf16", "dit-xl-2-256", torch.bfloat16, (1, 16))]
    for label, name, dtype, batches in cases:  # each case guarded: one failure must not cost the others
        model = graphed = None
        try:
            model = M.create(name, dtype=dtype, device="cuda").eval()
            graphed = CUDAGraphDenoiser(model)
            for b in batches:
                x, t, y = _inputs(model, b)
                with torch.no_grad():
                    res[f"{label}_b{b}_eager_ms"] = time_ms(lambda: model(x, t, y))
                res[f"{label}_b{b}_graph_ms"] = time_ms(lambda: graphed(x, t, y))
        except Exception as e:  # noqa: BLE001
            res["errors"][label] = f"{type(e).__name__}: {e}"[:1000]
        model = graphed = x = t = y = None  # free the weights and graphs before the next model
        _free()
    for label, dtype in (("adm64_clf_grad_fp16", torch.float16), ("adm64_clf_grad_fp32", torch.float32)):
        clf = g = None
        try:
            clf = M.create("adm-64-classifier", dtype=dtype, device="cuda").eval()
            x, t, y = _inputs(clf, 64)

            def eager_grad():
                xi = x.detach().requires_grad_(True)
                lp = torch.log_softmax(clf(xi, t), -1).gather(1, y[:, None]).sum()
                return torch.autograd.grad(lp, xi)[0]

            res[f"{label}_b64_eager_ms"] = time_ms(eager_grad)
            g = CUDAGraphClassifierGrad(clf)
            res[f"{label}_b64_graph_ms"] = time_ms(lambda: g(x, t, y))
        except Exception as e:  # noqa: BLE001
            res["errors"][label] = f"{type(e).__name__}: {e}"[:1000]
        clf = g = x = t = y = None
        _free()
    return res


def sampling(backends: list[str], budget_end: float, suite: Suite) -> dict:
    import cg_fast.models as M
    from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler
    from cg_fast.guidance import Compress, Full

    res: dict[str, Any] = {}
    for wl, spec in SAMPLING.items():
        if suite.elapsed() > budget_end:
            res[wl] = "skipped: time budget"
            continue
        model = clf = sampler = first = again = None
        try:
            model = M.create(spec["model"], dtype=torch.bfloat16 if spec["clf"] is None else None,
                             device="cuda").eval()
            cfg = model.cg_config
            sched = NoiseSchedule.named(cfg.noise_schedule, cfg.diffusion_steps)
            clf = M.create(spec["clf"], dtype=torch.float16, device="cuda").eval() if spec["clf"] else None
        except Exception as e:  # noqa: BLE001
            res[wl] = f"error creating the models: {type(e).__name__}: {e}"[:1000]
            model = clf = None
            _free()
            continue
        b = spec["batch"]
        y = torch.randint(0, 1000, (b,), device="cuda")
        shape = (b, *cfg.input_shape)
        torch.cuda.reset_peak_memory_stats()

        def guidance(policy):
            if clf is not None:
                return ClassifierGuidance(clf, 1.0, policy=policy, cache="compress")
            return CFG(4.0, null_label=cfg.null_label, policy=policy, cache="drop", channels=3)

        entry: dict[str, Any] = {"peer_full_s_h200": spec["peer_full"], "target_compg_s_h200": spec["target"]}
        for backend in backends:
            if suite.elapsed() > budget_end:
                entry[backend] = "skipped: time budget"
                continue
            runs: dict[str, Any] = {}
            try:
                sampler = Sampler(model, sched, "50", learn_sigma=cfg.learn_sigma, clip_denoised=cfg.clip_denoised,
                                  backend=backend)
                for label, g in (("compg", guidance(Compress(rate=5, k=1))), ("full", guidance(Full())),
                                 ("unguided", None)):
                    # first: captures / builds / compiles; again: the steady state
                    first = sampler.sample(shape, y=y, guidance=g, generator=torch.Generator("cuda").manual_seed(0))
                    again = sampler.sample(shape, y=y, guidance=g, generator=torch.Generator("cuda").manual_seed(0))
                    runs[label] = {"first_s": round(first.stats.wall_time, 4), "s": round(again.stats.wall_time, 4),
                                   "denoiser_rows": again.stats.denoiser_rows,
                                   "classifier_grads": again.stats.classifier_grads,
                                   "same_samples_twice": bool(torch.equal(first.x, again.x)),
                                   "finite": bool(torch.isfinite(again.x).all())}
                    first = again = None
                runs["compg_over_unguided"] = runs["compg"]["s"] / runs["unguided"]["s"]
                runs["full_over_compg"] = runs["full"]["s"] / runs["compg"]["s"]
                runs["peer_full_over_compg"] = spec["peer_full"] / runs["compg"]["s"]
                entry[backend] = runs
            except Exception as e:  # noqa: BLE001
                entry[backend] = {**runs, "error": f"{type(e).__name__}: {e}"[:1000]}  # keep what was measured
            sampler = first = again = None  # its captured graphs and their memory pools go with it
            _free()
            suite.results["sections"]["sampling_partial"] = {**res, wl: entry}
            suite.save()
        entry["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res[wl] = entry
        print(f"   {wl}: {json.dumps(entry, default=str)[:400]}", flush=True)
        model = clf = sampler = None
        _free()
    suite.results["sections"].pop("sampling_partial", None)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    p.add_argument("--budget", type=float, default=330.0, help="seconds after which no new section starts")
    p.add_argument("--backends", nargs="+", default=["cudagraph", "eager"],
                   help="sampling backends (tensorrt, compile, onnx on request: engine builds and compiles take "
                        "minutes)")
    p.add_argument("--sections", nargs="+", default=["env", "correctness", "kernels", "forward", "sampling"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    backends = list(args.backends)
    suite = Suite(Path(args.out), args.budget)
    table = {"env": env, "kernels": kernels, "forward": forward,
             "correctness": lambda: correctness(max(30.0, min(240.0, args.budget - suite.elapsed()))),
             "sampling": lambda: sampling(backends, args.budget, suite)}
    for name in args.sections:
        suite.section(name, table[name])
    suite.save()
    print(json.dumps({k: v for k, v in suite.results.items() if k != "sections"}, indent=1, default=str)[:3000])
    print(f"wrote {Path(args.out) / 'gpu_suite.json'} in {suite.elapsed():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
