"""Command line (``cg-fast``, also ``python -m cg_fast``), one module per command where it is more than a few
lines: ``sample`` (the sharded sampling job, cli/sample.py), ``eval`` (scores of sample batches, cli/eval.py),
``bench`` (timing of methods x backends x batch sizes, cli/bench.py), ``export`` (ONNX / TensorRT engines
ahead of time, cli/export.py); ``demo`` (the built-in default job), ``train-testbed`` and ``plan`` live here.

    cg-fast sample --model 64x64_diffusion.pt --classifier 64x64_classifier.pt --num_samples 50000
    cg-fast eval runs/adm64/samples_50000x64x64x3.npz --ref VIRTUAL_imagenet64_labeled.npz --inception-weights W
    cg-fast bench --steps 50 --batch-sizes 1 16 --backends eager onnx     table, JSON and PNG (digits testbed)
    cg-fast export --model 64x64_diffusion.pt --batch-size 64             into the engine cache the sampler reads
    cg-fast demo                      policies compared on the trained digits testbed (~1.5 min)
    cg-fast demo --quick              a smaller run (fewer samples and steps)
    cg-fast demo --testbed gmm        policies compared on the exact Gaussian-mixture testbed (~30 s)
    cg-fast train-testbed --out DIR   retrain the shipped testbed weights (digits networks, GMM classifier)
    cg-fast plan compress --rate 5 --k 5 --steps 250     which steps a policy guides, and m_j
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from ..policies import POLICY_NAMES, gaps, make_policy
from .common import positive_int as _positive_int

# commands that take guided-diffusion's MODEL_FLAGS / CLASSIFIER_FLAGS verbatim (passed to models.adm.parse_flags)
FLAG_COMMANDS = ("sample", "bench", "export")

# Presets of the demos, documented one per line (what each option's default means).
DEMO_PRESETS = {
    "default": {"num_samples": 4000, "seeds": [0, 1, 2]},   # GMM: the table in the README
    "quick": {"num_samples": 800, "seeds": [0]},            # GMM: smoke run, a few seconds
}
DIGITS_PRESETS = {
    "default": {"num_samples": 500, "steps": "250", "seeds": [0]},  # digits: the main job, ~1.5 min
    "quick": {"num_samples": 100, "steps": "50", "seeds": [0]},     # digits: smoke run, a few seconds
}


def _path(value: str | None, default: str | Path) -> Path | None:
    """An output path option: None (not given) is the testbed's default, '' is none."""
    value = default if value is None else value
    return Path(value) if value else None


def _figure(args: argparse.Namespace, out: Path | None, default: str) -> Path | None:
    """The figure path: --plot, else beside the results file (out/run2.json -> out/run2.png), else ``default``.
    Both are checked for writing before any sampling."""
    from ..runs import check_writable
    if out is not None:
        check_writable(out, "results file")
    figure = _path(args.plot, out.with_suffix(".png") if out is not None else default)
    if figure is not None:
        if figure == out:
            raise ValueError(f"--plot and --out both name {out}: give the figure another name")
        check_writable(figure, "figure")
    return figure


def _demo(args: argparse.Namespace) -> int:
    return _demo_gmm(args) if args.testbed == "gmm" else _demo_digits(args)


def _demo_digits(args: argparse.Namespace) -> int:
    from ..demo import DigitsDemoConfig, format_digits_table, plot_digits_demo, run_digits_demo

    preset = dict(DIGITS_PRESETS["quick" if args.quick else "default"])
    for key, value in (("num_samples", args.samples), ("seeds", args.seeds), ("steps", args.steps)):
        if value is not None:
            preset[key] = value
    scale = {} if args.scale is None else {"scale": args.scale}
    cfg = DigitsDemoConfig(method=args.method, testbed=args.weights, **scale, **preset)
    out = _path(args.out, "out/demo.json")
    grids = out.parent if out is not None else None
    print(f"cg_fast demo: trained digits testbed (8x8, 10 classes), unconditional UNet + noisy classifier at "
          f"scale {cfg.scale}, {cfg.method} {cfg.steps} steps, {cfg.num_samples} samples x {len(cfg.seeds)} "
          f"seed(s)", flush=True)
    legend = ("FD: Fréchet distance to the 1,797 real digits in the judge's 64-d features (lower is better); per "
              "class: the same within each class, averaged (it also sees digits of the wrong class). judge acc: "
              "accuracy on the intended labels of a classifier of the guide's architecture trained on the other "
              "half of the data (off-sampling); MLP judge: another architecture; guide acc: the guiding "
              "classifier's own (on-sampling).")
    figure = _figure(args, out, "out/demo.png")
    return _run_and_report(
        lambda samples: run_digits_demo(cfg, out=out, grids=grids, progress=args.progress, keep_samples=samples),
        format_digits_table, legend, out, figure, plot_digits_demo,
        f"sample grids (a column per class): {grids}/{out.stem}_*.png" if out is not None else None)


def _demo_gmm(args: argparse.Namespace) -> int:
    from ..demo_gmm import DemoConfig, format_table, plot_demo, run_demo

    preset = dict(DEMO_PRESETS["quick" if args.quick else "default"])
    if args.samples is not None:
        preset["num_samples"] = args.samples
    if args.seeds is not None:
        preset["seeds"] = args.seeds
    cfg = DemoConfig(steps=args.steps or "250", method=args.method,
                     scale=1.0 if args.scale is None else args.scale, **preset)
    out = _path(args.out, "out/demo_gmm.json")
    print(f"cg_fast demo: exact Gaussian-mixture testbed ({cfg.num_classes} classes, d={cfg.dim}), "
          f"{cfg.method} {cfg.steps} steps, classifier scale {cfg.scale}, {cfg.num_samples} samples x "
          f"{len(cfg.seeds)} seeds", flush=True)
    legend = ("sliced W2: per-class sliced Wasserstein-2 to exact samples of p(x|y); the 'exact' row is the "
              f"noise floor (two exact sets). mean ± std over seeds {cfg.seeds}.")
    figure = _figure(args, out, "out/demo_gmm.png")
    return _run_and_report(lambda samples: run_demo(cfg, out=out, progress=args.progress, keep_samples=samples),
                           format_table, legend, out, figure, plot_demo)


def _run_and_report(run: Callable[[dict], dict], table: Callable[[dict], str], legend: str, out: Path | None,
                    figure: Path | None, plot: Callable[[dict, dict, Path], Path], extra: str | None = None) -> int:
    """Run a demo (``run(samples) -> results``), then print its table, legend, outputs and figure."""
    start = time.perf_counter()
    samples: dict = {}
    try:
        results = run(samples)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are in {out}" if out else "\ninterrupted", file=sys.stderr)
        return 130
    print()
    print(table(results))
    print(f"\n{legend} Total {time.perf_counter() - start:.1f} s.")
    if out:
        print(f"results: {out}" + (f"; {extra}" if extra else ""))
    if figure is not None:
        try:
            print(f"figure: {plot(results, samples, figure)}")
        except ImportError:
            print("figure skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


def _train_testbed(args: argparse.Namespace) -> int:
    from ..testbeds.digits_train import RECIPE, train_testbed
    from ..testbeds.gmm_trained import train_and_save_default

    only = args.only or [*RECIPE, "gmm"]
    unknown = [n for n in only if n not in RECIPE and n != "gmm"]
    if unknown:
        raise ValueError(f"unknown network(s) {unknown}: choose from {[*RECIPE, 'gmm']}")
    out = Path(args.out)
    start = time.perf_counter()
    try:
        digits = [n for n in only if n != "gmm"]
        if digits:
            train_testbed(out, only=digits, progress=args.progress)
        if "gmm" in only:
            print("training gmm: the Gaussian-mixture testbed's noisy classifier")
            train_and_save_default(out, progress=args.progress)
    except KeyboardInterrupt:
        print(f"\ninterrupted; networks finished so far are in {out}", file=sys.stderr)
        return 130
    print(f"done in {time.perf_counter() - start:.0f} s: {out} (use it with `cg-fast demo --weights {out}`)")
    return 0


def _plan(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("rate", args.rate), ("k", args.k), ("final", args.final),
                                ("fraction", args.fraction)) if v is not None}
    policy = make_policy(args.policy, **params)
    mask = policy.mask(args.steps)
    m = gaps(mask)
    print(f"{policy}: {sum(mask)} of {args.steps} steps guided (j = 0 is the noisiest step)")
    print("".join("#" if g else "." for g in mask))
    print("guided j:", [j for j, g in enumerate(mask) if g])
    print("compress multipliers m_j:", [mj for mj in m if mj])
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import eval as eval_cmd
    from . import bench, export, sample

    p = argparse.ArgumentParser(prog="cg-fast", description="Fast guided diffusion sampling with Compress Guidance")
    sub = p.add_subparsers(dest="command", required=True)
    sample.add_parser(sub)
    eval_cmd.add_parser(sub)
    bench.add_parser(sub)
    export.add_parser(sub)

    d = sub.add_parser("demo", help="compare guidance policies on a testbed (digits: trained; gmm: exact)")
    d.add_argument("--testbed", default="digits", choices=["digits", "gmm"],
                   help="digits (default): the shipped trained networks; gmm: the exact Gaussian mixture")
    d.add_argument("--quick", action="store_true",
                   help="small run (digits: 100 samples, 50 steps; gmm: 800 samples, one seed)")
    d.add_argument("--samples", type=_positive_int, default=None,
                   help="samples per run (default digits 500, gmm 4000; at least 2 per class)")
    d.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default digits 0; gmm 0 1 2)")
    d.add_argument("--steps", default=None, help="ADM respacing string (default '250')")
    d.add_argument("--method", default="ddpm", choices=["ddpm", "ddim", "dpmpp2m"], help="sampler (default ddpm)")
    d.add_argument("--scale", type=float, default=None,
                   help="classifier scale (default digits 16, full guidance's tuned scale; gmm 1 = exact)")
    d.add_argument("--weights", default=None,
                   help="digits: a folder written by `cg-fast train-testbed` (default: the shipped weights)")
    d.add_argument("--out", default=None,
                   help="results JSON, written after every run; a rerun with the same settings resumes, one with "
                        "other settings is refused (default out/demo.json, gmm out/demo_gmm.json; '' = none). "
                        "Digits sample grids <stem>_<policy>.png/.npz go beside it")
    d.add_argument("--progress", action="store_true", help="progress bar per sampling run")
    d.add_argument("--plot", default=None,
                   help="figure: quality vs cost and samples (default: the results file's name with .png, "
                        "out/demo.png, gmm out/demo_gmm.png; '' = none; needs matplotlib)")
    d.set_defaults(func=_demo)

    tr = sub.add_parser("train-testbed", help="retrain the shipped testbed weights (minutes on a CPU)")
    tr.add_argument("--out", default="out/testbed",
                    help="folder for digits_*.pt, digits.json, gmm_classifier.* (default out/testbed; the "
                         "demo reads it with --weights)")
    tr.add_argument("--only", nargs="+", default=None,
                    help="train only these: cond uncond guide judge judge_mlp gmm (default: all)")
    tr.add_argument("--progress", action="store_true", help="progress bar per network")
    tr.set_defaults(func=_train_testbed)

    q = sub.add_parser("plan", help="print which steps a guidance policy guides")
    q.add_argument("policy", choices=[n for n in POLICY_NAMES if n != "interval"])
    q.add_argument("--steps", type=int, default=250, help="number of sampling steps N (default 250)")
    q.add_argument("--rate", type=int, default=None, help="compress / uniform: about 1 guided step in RATE")
    q.add_argument("--k", type=float, default=None, help="compress: packing power (1 = uniform)")
    q.add_argument("--final", type=int, default=None, help="compress / uniform: last steps always guided")
    q.add_argument("--fraction", type=float, default=None, help="early_stop: fraction of steps guided")
    q.set_defaults(func=_plan)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command not in FLAG_COMMANDS:  # only these pass guided-diffusion's model flags through
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from ..backends import BackendUnavailable
    from ..models.loading import CheckpointError

    try:
        return args.func(args, extra) if args.command in FLAG_COMMANDS else args.func(args)
    except (ValueError, TypeError, CheckpointError, BackendUnavailable, FileNotFoundError) as e:
        print(f"cg-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
