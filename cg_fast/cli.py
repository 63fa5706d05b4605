"""Command line: ``cg-fast demo`` (the built-in default job) and ``cg-fast plan`` (inspect a policy).

    cg-fast demo                      policies compared on the exact Gaussian-mixture testbed (~30 s)
    cg-fast demo --quick              a smaller run (fewer samples, one seed)
    cg-fast plan compress --rate 5 --k 5 --steps 250     which steps a policy guides, and m_j
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .policies import POLICY_NAMES, gaps, make_policy

# Presets of the demo, documented one per line (what each option's default means).
DEMO_PRESETS = {
    "default": {"num_samples": 4000, "seeds": [0, 1, 2]},   # the table in the README
    "quick": {"num_samples": 800, "seeds": [0]},            # smoke run, a few seconds
}


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, format_table, run_demo

    preset = dict(DEMO_PRESETS["quick" if args.quick else "default"])
    if args.samples is not None:
        preset["num_samples"] = args.samples
    if args.seeds is not None:
        preset["seeds"] = args.seeds
    cfg = DemoConfig(steps=args.steps, method=args.method, scale=args.scale, **preset)
    out = Path(args.out) if args.out else None
    print(f"cg_fast demo: exact Gaussian-mixture testbed ({cfg.num_classes} classes, d={cfg.dim}), "
          f"{cfg.method} {cfg.steps} steps, classifier scale {cfg.scale}, {cfg.num_samples} samples x "
          f"{len(cfg.seeds)} seeds", flush=True)
    start = time.perf_counter()
    samples: dict = {}
    try:
        results = run_demo(cfg, out=out, progress=args.progress, keep_samples=samples)
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are in {out}" if out else "\ninterrupted", file=sys.stderr)
        return 130
    print()
    print(format_table(results))
    print(f"\nsliced W2: per-class sliced Wasserstein-2 to exact samples of p(x|y); the 'exact' row is the "
          f"noise floor (two exact sets). mean ± std over seeds {cfg.seeds}. Total {time.perf_counter() - start:.1f} s.")
    if out:
        print(f"results: {out}")
    if args.plot:
        try:
            from .demo import plot_demo
            print(f"figure: {plot_demo(results, samples, Path(args.plot))}")
        except ImportError:
            print("figure skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
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
    p = argparse.ArgumentParser(prog="cg-fast", description="Fast guided diffusion sampling with Compress Guidance")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="compare guidance policies on the exact Gaussian-mixture testbed")
    d.add_argument("--quick", action="store_true", help="small run: 800 samples, one seed")
    d.add_argument("--samples", type=int, default=None, help="samples per run (default 4000)")
    d.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2)")
    d.add_argument("--steps", default="250", help="ADM respacing string (default '250')")
    d.add_argument("--method", default="ddpm", choices=["ddpm", "ddim"], help="sampler (default ddpm)")
    d.add_argument("--scale", type=float, default=1.0, help="classifier scale (default 1 = exact)")
    d.add_argument("--out", default="out/demo.json",
                   help="results JSON, written after every run; a rerun resumes (default out/demo.json; '' = none)")
    d.add_argument("--progress", action="store_true", help="progress bar per sampling run")
    d.add_argument("--plot", default="out/demo.png",
                   help="figure: quality vs cost and samples (default out/demo.png; '' = none; needs matplotlib)")
    d.set_defaults(func=_demo)

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
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError) as e:
        print(f"cg-fast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
