"""The GPU suite: one script for the device machine (H100 / H200), under 6 minutes, JSON out.

    python benchmarks/gpu_suite.py --out "$OUT"            # then copy $OUT/gpu_suite.json to benchmarks/results/

Every section runs in its own process (``--section NAME``, with a timeout), so a sticky CUDA error, a hang or
a crash costs that section only; the parent merges what each child wrote (partial results included) into
one ``gpu_suite.json``, rewritten after every section. Sections:
  env          GPU, torch, triton versions
  correctness  pytest tests/test_gpu.py (whole-step graphs vs eager, Triton vs reference over every variant,
               the CUDA csrc op eager and in a graph vs Triton, graphed classifier) and tests/test_rng.py
  models       small real models, eager vs whole-step CUDA graphs: ADM-64 fp16 with its classifier (CompG),
               DiT-XL/2 bf16 with CFG (random weights, 10 DDPM steps, batch 2), max difference and time
  kernels      the Triton fused step vs the PyTorch reference, the CUDA op and a copy of the same bytes, as
               CUDA-graph replays, plus the wrapper's host cost (benchmarks/bench_step_triton.py)
  rng          the Triton step with in-kernel counter-based noise vs normal_ + step vs a copy (issue 12)
  forward      per-call ms of the denoisers and the classifier gradient, eager vs CUDA graph, fp16/bf16
  sampling     whole 50-step DDPM runs: CompG (rate 5, k 1: 12 guided steps), full guidance and unguided, per
               backend, with the targets of the issues and the peer figures of gpu-anchors.md
Random weights throughout (speed does not depend on them). Figures are comparable only within one run.
Models are built one at a time on the device and freed (with their captured graphs) before the next.

Determinism: "the same samples twice" (sampling) and eager vs graph (models) are compared with a stated
tolerance (``SAME_TOL``), since the timing sections let cuDNN pick its fastest (not always deterministic)
algorithms; the bitwise flags are recorded beside them. The correctness tests run with deterministic cuDNN.

TensorRT runs only on request (``--backends tensorrt cudagraph eager``): an engine build per model and
batch takes minutes, more than this suite's budget, and cannot be interrupted by it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
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
SAME_TOL = 1e-2  # max |difference| of samples in [-1, 1] (latents: relative to their max) counted as the same
SECTIONS = ("env", "correctness", "models", "kernels", "rng", "forward", "sampling")
# Per-call targets (ms, H200) of the models issue.
FORWARD_TARGETS = {"adm64_unet_b64": 30.0, "adm64_unet_b1_graph": 7.0, "adm64_clf_grad_b64": 30.0,
                   "adm256_unet_b16": 90.0, "dit_b16_bf16": 14.0}


class Suite:
    """Results of one process, saved atomically to ``path`` after every change (partial results survive)."""

    def __init__(self, path: Path, budget_s: float) -> None:
        self.path, self.budget, self.start = path, budget_s, time.perf_counter()
        self.results: dict[str, Any] = {"sections": {}, "errors": {}}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2, default=str))
        os.replace(tmp, self.path)

    def section(self, name: str, fn: Callable[[], Any]) -> None:
        """Run one section in this process (the child side), recording its result or its error."""
        t0 = time.perf_counter()
        try:
            self.results["sections"][name] = fn()
        except Exception as e:  # record; the parent goes on with the next section
            self.results["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
            print(f"   ERROR {type(e).__name__}: {e}", flush=True)
        self.results.setdefault("section_s", {})[name] = round(time.perf_counter() - t0, 1)
        self.save()


def run_child(cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int | None, str]:
    """Run ``cmd`` in its own process group; (returncode or None on timeout, combined output). On timeout the
    whole group is killed (a pytest child's own children too)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out or ""


def run_sections(names: list[str], out: Path, budget_s: float, extra: list[str],
                 child: Callable[[str, Path, float], list[str]] | None = None, name: str = "gpu_suite.json") -> dict:
    """The parent: each section in a child process with the time left as its timeout; merged into
    ``out/name`` after every section. ``child(name, result_path, timeout)`` builds the command (tests
    substitute one)."""
    suite = Suite(out / name, budget_s)
    suite.results["section_runs"] = {}
    for section in names:
        left = budget_s - suite.elapsed()
        if left < 5:
            suite.results["errors"][section] = f"skipped: time budget {budget_s:.0f} s spent"
            suite.save()
            continue
        print(f"== {section} (t = {suite.elapsed():.0f} s, {left:.0f} s left)", flush=True)
        with tempfile.TemporaryDirectory(prefix="cg_fast_suite_") as tmp:
            path = Path(tmp) / f"{section}.json"
            cmd = child(section, path, left) if child else \
                [sys.executable, str(Path(__file__).resolve()), "--section", section, "--section-json", str(path),
                 "--budget", str(max(1.0, left - 10.0)), *extra]
            t0 = time.perf_counter()
            rc, output = run_child(cmd, left)
            print(output, end="" if output.endswith("\n") else "\n", flush=True)
            run = {"returncode": rc, "seconds": round(time.perf_counter() - t0, 1), "timed_out": rc is None}
            got = json.loads(path.read_text()) if path.exists() else {}
        suite.results["section_runs"][section] = run
        if section in got.get("sections", {}):
            suite.results["sections"][section] = got["sections"][section]
        for key, value in got.get("sections", {}).items():  # partial results of a cut-short section
            if key != section:
                suite.results["sections"].setdefault(key, value)
        err = got.get("errors", {}).get(section)
        if err is None and (rc != 0 or section not in got.get("sections", {})):
            why = "timed out" if rc is None else f"exited with {rc}"
            err = f"the section's process {why} (a crash or sticky CUDA error costs this section only)\n" \
                  + output[-2000:]
        if err is not None:
            suite.results["errors"][section] = err
        suite.save()
    return suite.results


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
    """pytest tests/test_gpu.py (its own module fixture makes cuDNN deterministic)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rc, out = run_child([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_gpu.py",
                         "tests/test_rng.py"],
                        timeout_s, env=env)
    return {"returncode": rc, "timed_out": rc is None, "tail": out[-3000:]}


def kernels() -> dict:
    from bench_step_triton import bench_triton_vs_copy
    return bench_triton_vs_copy("cuda")


def rng_kernels() -> dict:
    from bench_rng import bench_counter_gpu
    return bench_counter_gpu("cuda")


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
            graphed = CUDAGraphDenoiser(model, clone_outputs=False)  # replay only, as gpu-anchors.md
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
            g = CUDAGraphClassifierGrad(clf, clone_outputs=False)
            res[f"{label}_b64_graph_ms"] = time_ms(lambda: g(x, t, y))
        except Exception as e:  # noqa: BLE001
            res["errors"][label] = f"{type(e).__name__}: {e}"[:1000]
        clf = g = x = t = y = None
        _free()
    return res


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b|, relative to max |b| where that exceeds 1 (latents); inf when either is not finite."""
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        return float("inf")
    return float((a.float() - b.float()).abs().max()) / max(1.0, float(b.float().abs().max()))


def models(steps: int = 10, batch: int = 2) -> dict:
    """Small real models, eager vs whole-step CUDA graphs (same generator seed): ADM-64 fp16 with its classifier
    under CompG, DiT-XL/2 bf16 with CFG (channels 3). Max difference (``SAME_TOL``), times, counts."""
    import cg_fast.models as M
    from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler
    from cg_fast.guidance import Compress

    res: dict[str, Any] = {"tolerance": SAME_TOL, "steps": steps, "batch": batch, "errors": {}}
    cases = [("adm64_fp16_classifier", "adm-64-cond", torch.float16, "adm-64-classifier"),
             ("dit_xl2_bf16_cfg", "dit-xl-2-256", torch.bfloat16, None)]
    for label, name, dtype, clf_name in cases:
        model = clf = None
        try:
            torch.manual_seed(0)
            model = M.create(name, dtype=dtype, device="cuda").eval()
            cfg = model.cg_config
            clf = M.create(clf_name, device="cuda").eval() if clf_name else None
            guid = ClassifierGuidance(clf, 1.0, policy=Compress(rate=3)) if clf is not None else \
                CFG(4.0, null_label=cfg.null_label, policy=Compress(rate=3), channels=3)
            sched = NoiseSchedule.named(cfg.noise_schedule, cfg.diffusion_steps)
            y = torch.arange(batch, device="cuda") % 10
            entry: dict[str, Any] = {}
            outs = {}
            for backend in ("eager", "cudagraph"):
                s = Sampler(model, sched, str(steps), learn_sigma=cfg.learn_sigma, clip_denoised=cfg.clip_denoised,
                            backend=backend)
                out = s.sample((batch, *cfg.input_shape), y=y, guidance=guid,
                               generator=torch.Generator("cuda").manual_seed(0))
                again = s.sample((batch, *cfg.input_shape), y=y, guidance=guid,
                                 generator=torch.Generator("cuda").manual_seed(0))
                outs[backend] = out.x
                entry[backend] = {"first_s": round(out.stats.wall_time, 3), "s": round(again.stats.wall_time, 3),
                                  "classifier_grads": out.stats.classifier_grads,
                                  "denoiser_rows": out.stats.denoiser_rows,
                                  "finite": bool(torch.isfinite(out.x).all())}
                s = out = again = None
            entry["max_diff"] = max_diff(outs["cudagraph"], outs["eager"])
            entry["same"] = entry["max_diff"] <= SAME_TOL
            entry["bitwise"] = bool(torch.equal(outs["cudagraph"], outs["eager"]))
            res[label] = entry
            print(f"   {label}: {json.dumps(entry)}", flush=True)
        except Exception as e:  # noqa: BLE001 - one model's failure must not cost the other
            res["errors"][label] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"
        model = clf = outs = None
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
                    diff = max_diff(first.x, again.x)
                    runs[label] = {"first_s": round(first.stats.wall_time, 4), "s": round(again.stats.wall_time, 4),
                                   "denoiser_rows": again.stats.denoiser_rows,
                                   "classifier_grads": again.stats.classifier_grads,
                                   "max_diff_twice": diff, "same_samples_twice": diff <= SAME_TOL,
                                   "bitwise_twice": bool(torch.equal(first.x, again.x)),
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", str(ROOT / "benchmarks" / "results")))
    p.add_argument("--name", default="gpu_suite.json", help="file name of the merged results in --out")
    p.add_argument("--budget", type=float, default=330.0, help="seconds for all sections together")
    p.add_argument("--backends", nargs="+", default=["cudagraph", "eager"],
                   help="sampling backends (tensorrt, compile, onnx on request: engine builds and compiles take "
                        "minutes)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    p.add_argument("--section", choices=SECTIONS, help="(internal) run one section in this process")
    p.add_argument("--section-json", help="(internal) where the --section process writes its results")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device", file=sys.stderr)
        return 2
    if args.section is None:  # the parent: one child process per section
        extra = ["--backends", *args.backends]
        results = run_sections(list(args.sections), Path(args.out), args.budget, extra, name=args.name)
        print(json.dumps({k: v for k, v in results.items() if k != "sections"}, indent=1, default=str)[:3000])
        print(f"wrote {Path(args.out) / args.name} in {results['elapsed_s']:.0f} s")
        return 0
    os.environ.pop("TRITON_INTERPRET", None)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = args.section != "models"  # models: eager vs graph, same algorithms
    suite = Suite(Path(args.section_json), args.budget)
    table = {"env": env, "kernels": kernels, "rng": rng_kernels, "forward": forward, "models": models,
             "correctness": lambda: correctness(max(30.0, args.budget)),
             "sampling": lambda: sampling(list(args.backends), args.budget, suite)}
    suite.section(args.section, table[args.section])
    return 0


if __name__ == "__main__":
    sys.exit(main())
