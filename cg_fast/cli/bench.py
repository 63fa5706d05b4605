"""``cg-fast bench``: guidance methods x backends x batch sizes on one model: a terminal table, a JSON record and
a PNG of time against the cost that does not depend on quality (denoiser rows, classifier gradients), with
CompG / unguided and CompG / full guidance measured side by side in one run.

The model is named with the options of ``cg-fast sample`` (default: the shipped digits testbed, unconditional
UNet guided by its classifier). The measuring is :func:`cg_fast.measure.measure`; this module reads the command
line, writes the outputs and reports.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

KIND = "cg-fast bench"
EXAMPLES = """\
examples:
  cg-fast bench                                           # digits testbed, unguided / full / CompG, CPU or GPU
  cg-fast bench --steps 50 --batch-sizes 1 16 64 --backends eager onnx --rounds 10
  cg-fast bench --model 64x64_diffusion.pt --classifier 64x64_classifier.pt --steps 250 --batch-sizes 64 \\
      --backends cudagraph tensorrt --dtype float16 --out out/bench_adm64.json

Medians over --rounds with the spread (min to max); the --warmup runs per case are timed and reported apart.
Ratios are paired within each round (the methods of one backend and batch run back to back, in an order that
rotates). A rerun with the same settings replaces the record; other settings on the same --out are refused.
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from .common import positive_int
    from .sample import add_model_args

    p = sub.add_parser("bench", help="time guidance methods x backends x batch sizes on one model (table, JSON, "
                       "PNG)", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_model_args(p)
    b = p.add_argument_group("benchmark")
    b.add_argument("--methods", nargs="+", default=["unguided", "full", "compg"],
                   help="unguided, full, compg (CompG rate 5, k 1), uniform, early_stop (default: the first three)")
    b.add_argument("--backends", nargs="+", default=["auto"],
                   help="auto (default: cudagraph on CUDA, eager on the CPU), eager, cudagraph, compile, onnx, "
                        "tensorrt, aoti")
    b.add_argument("--batch-sizes", "--batch_size", dest="batch_sizes", nargs="+", type=positive_int, default=[16],
                   help="batch sizes (default 16)")
    b.add_argument("--steps", "--timestep_respacing", default=None,
                   help="respacing: '50', 'ddim25' (default: the model's published setting)")
    b.add_argument("--guidance", default="auto", choices=["auto", "classifier", "cfg"],
                   help="auto (default): classifier guidance with a classifier, else CFG")
    b.add_argument("--scale", type=float, default=None, help="guidance scale (default: the published setting)")
    b.add_argument("--rounds", type=positive_int, default=5, help="timed rounds per case (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="warm-up runs per case, timed apart (default 1; with 0 one-time costs such as graph "
                        "capture or ONNX export land in the first round)")
    b.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="network dtype (default: the published setting)")
    b.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    b.add_argument("--seed", type=int, default=0, help="run seed of the (counter-based) noise (default 0)")
    b.add_argument("--out", default="out/bench.json", help="JSON record (default out/bench.json)")
    b.add_argument("--plot", default=None,
                   help="PNG figure (default: the record's name with .png; '' = none; needs matplotlib)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _networks(args: argparse.Namespace, extra: list[str], dtype):
    """(model, classifier or None, identity for the settings), as cg-fast sample builds them."""
    from ..models.adm import parse_flags
    from .sample import _classifier, _denoiser

    flags = parse_flags(extra)
    if args.model is None and not args.checkpoint and args.classifier is None and not args.classifier_path:
        args.model, args.classifier = "digits-uncond", "digits-guide"  # the shipped testbed: no downloads
    model, ident = _denoiser(args, flags, dtype)
    clf, clf_ident = _classifier(args, flags, dtype)
    return model, clf, {**ident, **clf_ident}


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    import torch

    from .. import backends
    from ..measure import METHODS, Case, measure
    from ..runs import atomic_write_json, check_writable, new_results, resume_or_refuse
    from .common import check_names, pick_device
    from .sample import list_models

    if args.list_models:
        print(list_models())
        return 0
    methods = check_names(args.methods, list(METHODS), "method")
    names = check_names(args.backends, backends.BACKENDS, "backend")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be 0 or more, got {args.warmup}")
    device = pick_device(args.device)
    resolved = list(dict.fromkeys(backends.resolve(n, device) for n in names))  # unavailable: what to install
    out = Path(args.out) if args.out else None
    figure = None if args.plot == "" else Path(args.plot) if args.plot else (
        out.with_suffix(".png") if out is not None else None)
    for path, what in ((out, "--out record"), (figure, "--plot figure")):
        if path is not None:
            check_writable(path, what)
    if figure is not None and figure == out:
        raise ValueError(f"--plot and --out both name {out}: give the figure another name")

    dtype = None if args.dtype is None else getattr(torch, args.dtype)
    model, clf, ident = _networks(args, extra or [], dtype)
    model = model.to(device).eval()
    cfg = model.cg_config
    kind = args.guidance
    if kind == "auto":
        kind = "classifier" if clf is not None else "cfg"
    if kind == "classifier" and clf is None:
        raise ValueError("--guidance classifier needs --classifier or --classifier_path")
    if kind == "cfg" and (clf is not None or not cfg.class_cond or cfg.null_label is None):
        raise ValueError("CFG needs a class-conditional model with a null label and no classifier; for classifier "
                         "guidance pass --classifier")
    if clf is not None:
        clf = clf.to(device).eval()
    scale = args.scale if args.scale is not None else (
        cfg.guidance_scale or (clf.cg_config.guidance_scale if clf is not None else None)
        or (1.0 if kind == "classifier" else 4.0))
    num_classes = clf.cg_config.num_classes if clf is not None else cfg.num_classes
    cases = [Case(m, b, n) for b in resolved for n in args.batch_sizes for m in methods]
    settings = {**ident, "methods": methods, "backends": resolved, "batch_sizes": args.batch_sizes,
                "steps": args.steps or cfg.timestep_respacing or str(cfg.diffusion_steps), "guidance": kind,
                "scale": scale, "rounds": args.rounds, "warmup": args.warmup, "dtype": args.dtype,
                "device": str(device), "seed": args.seed, "shape": list(cfg.input_shape)}
    if out is not None:  # refused before any measuring if the record holds other settings; the same: replaced
        resume_or_refuse(out, settings, KIND, log=lambda s: None)

    total = len(cases) * (args.rounds + args.warmup)
    print(f"cg_fast bench: {len(methods)} method(s) x {len(resolved)} backend(s) x {len(args.batch_sizes)} batch "
          f"size(s), {settings['steps']} steps, {kind} guidance at scale {scale}, {args.rounds} round(s) + "
          f"{args.warmup} warm-up, on {_device_name(device)}", file=sys.stderr, flush=True)
    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="bench", unit="run", dynamic_ncols=True, file=sys.stderr)
    start = time.perf_counter()
    try:
        result = measure(model, clf, cases, kind=kind, scale=scale, steps=args.steps, rounds=args.rounds,
                         warmup=args.warmup, device=device, seed=args.seed, num_classes=num_classes,
                         tick=(lambda label: (bar.set_postfix_str(label), bar.update(1))) if bar else None)
    finally:
        if bar is not None:
            bar.close()
    took = time.perf_counter() - start
    rows, ratios = [r.as_json() for r in result.results], result.ratios()
    print(_table(rows))
    if ratios:
        print()
        print(_ratio_table(ratios))
    print(f"\nmedian over {args.rounds} round(s) [min to max]; warm-up ({args.warmup} run(s) per case) excluded, "
          f"shown apart. Ratios paired within rounds. {took:.1f} s on {_device_name(device)}.")
    if out is not None:
        record = new_results(settings, KIND)
        record.update(runs={f"{r['method']}|{r['backend']}|{r['batch']}": r for r in rows}, ratios=ratios,
                      device_name=_device_name(device), seconds=took, versions=_versions())
        atomic_write_json(out, record)
        print(f"record: {out}")
    if figure is not None:
        try:
            title = f"{settings['steps']} steps, {_device_name(device)}"
            print(f"figure: {plot_bench(rows, figure, title)}")
        except ImportError:
            print("figure skipped: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    import platform

    import torch

    from .. import __version__

    return {"cg_fast": __version__, "torch": torch.__version__, "python": platform.python_version()}


def _span(s: dict) -> str:
    return f"{s['median']:.3g} [{s['min']:.3g} to {s['max']:.3g}]"


def _table(rows: list[dict]) -> str:
    head = ["backend", "batch", "method", "guided steps", "denoiser rows", "clf grads", "time s", "ms / image",
            "warm-up s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        warm = ", ".join(f"{w:.3g}" for w in r["warmup"]) or "–"
        lines.append(f"| {r['backend']} | {r['batch']} | {r['method']} | {r['guided_steps']} | {r['denoiser_rows']} "
                     f"| {r['classifier_grads']} | {_span(r)} | {1e3 * r['per_image']:.3g} | {warm} |")
    return "\n".join(lines)


def _ratio_table(ratios: list[dict]) -> str:
    keys = [k for k in ("compg/unguided", "compg/full") if any(k in r for r in ratios)]
    names = {"compg/unguided": "CompG / unguided", "compg/full": "CompG / full guidance"}
    lines = ["| backend | batch | " + " | ".join(names[k] for k in keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in ratios:
        lines.append(f"| {r['backend']} | {r['batch']} | " + " | ".join(_span(r[k]) if k in r else "–" for k in keys)
                     + " |")
    return "\n".join(lines)


def plot_bench(rows: list[dict], path: Path, title: str) -> Path:
    """Median time (min-max bars) against denoiser rows and against classifier gradients; a colour per method,
    a marker per backend, batch sizes annotated. Written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..runs import atomic_write_bytes

    methods = list(dict.fromkeys(r["method"] for r in rows))
    backend_names = list(dict.fromkeys(r["backend"] for r in rows))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    markers = {b: "osD^v<>"[i % 7] for i, b in enumerate(backend_names)}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in ((axes[0], "denoiser_rows", "denoiser rows per run"),
                           (axes[1], "classifier_grads", "classifier gradients per run")):
        for r in rows:
            err = [[r["median"] - r["min"]], [r["max"] - r["median"]]]
            ax.errorbar(r[key], r["median"], yerr=err, fmt=markers[r["backend"]], color=colours[r["method"]],
                        capsize=3)
            ax.annotate(f"b{r['batch']}", (r[key], r["median"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("time per run, s (median, min to max)")
    handles = [plt.Line2D([], [], color=colours[m], marker="o", ls="", label=m) for m in methods]
    handles += [plt.Line2D([], [], color="grey", marker=markers[b], ls="", label=b) for b in backend_names]
    axes[1].legend(handles=handles, fontsize=8, loc="best")
    fig.suptitle(f"cg-fast bench: {title}")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return atomic_write_bytes(path, buf.getvalue())
