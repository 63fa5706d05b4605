"""``cg-fast export``: a model's ONNX export (and, where TensorRT exists, its engine), or its AOTInductor packages
(``--format aoti``: the denoiser and, with ``--classifier``, the classifier gradient) for given batch sizes,
written into the caches the sampler reads, so ``cg-fast sample --backend onnx|tensorrt|aoti`` starts at once.

The model is named with the options of ``cg-fast sample`` (the same network, so the same weights hash: the
caches' key). The work is :func:`cg_fast.backends.prepare.prepare_engines`; this module only reads the
command line and reports.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

EXAMPLES = """\
examples:
  cg-fast export --model 64x64_diffusion.pt --batch-size 64 --dtype float16     # ONNX (+ engine on a GPU)
  cg-fast export --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --batch-size 32 --cfg --format tensorrt
  cg-fast export --model digits-uncond --batch-size 16 --format onnx            # the shipped testbed
  cg-fast export --model digits-uncond --classifier digits-guide --batch-size 16 --format aoti   # .pt2 packages

Then `cg-fast sample` with the same model options, --backend onnx (tensorrt, aoti) and the same --batch_size
loads the exports instead of making them (a final partial batch, num_samples % batch_size, is another shape
and is exported when it is reached). --cache-dir DIR is the same as CG_FAST_CACHE=DIR for the sampler
(ONNX in DIR/onnx, engines in DIR, AOTInductor packages in DIR/aoti).
"""

FORMAT_CHOICES = ("auto", "onnx", "tensorrt", "aoti", "all")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from .common import positive_int
    from .sample import add_model_args

    p = sub.add_parser("export", help="ONNX export and TensorRT engine of a model into the sampler's engine cache",
                       description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_model_args(p, classifier=True)
    e = p.add_argument_group("export")
    e.add_argument("--batch-size", "--batch_size", "--per-proc-batch-size", dest="batch_sizes", nargs="+",
                   type=positive_int, default=[16], help="batch size(s) the sampler will run (default 16)")
    e.add_argument("--cfg", action="store_true",
                   help="also the doubled batch 2B that classifier-free guidance runs at its guided steps")
    e.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="network dtype, as cg-fast sample --dtype (default: the published setting)")
    e.add_argument("--format", default="auto",
                   help="auto (default): ONNX, plus the TensorRT engine where TensorRT and a GPU exist (else "
                        "skipped, with the reason); onnx; tensorrt; aoti (AOTInductor .pt2 packages of the denoiser "
                        "and, with --classifier, of the classifier gradient); all (onnx and tensorrt, TensorRT "
                        "required)")
    e.add_argument("--precision", default="fp16", choices=["fp32", "fp16", "bf16"],
                   help="TensorRT engine precision (default fp16, what --backend tensorrt uses)")
    e.add_argument("--device", default=None, help="where to export: cuda, cuda:1, cpu (default: cuda if available)")
    e.add_argument("--cache-dir", default=None,
                   help="cache root, as CG_FAST_CACHE (ONNX in DIR/onnx, engines in DIR; default $CG_FAST_CACHE, "
                        "else ~/.cache/cg_fast)")
    e.add_argument("--json", default=None, help="also write what was prepared to this JSON file")
    p.set_defaults(func=run)
    return p


def _formats(choice: str, device) -> tuple[list[str], str | None]:
    """(formats to prepare, why TensorRT is skipped or None)."""
    from ..backends.prepare import tensorrt_unavailable
    from .common import check_names

    (choice,) = check_names([choice], FORMAT_CHOICES, "--format")
    why = tensorrt_unavailable(device)
    if choice == "auto":
        return (["onnx"], why) if why else (["onnx", "tensorrt"], None)
    if choice == "aoti":
        return ["aoti"], None
    if choice in ("tensorrt", "all") and why:
        raise ValueError(f"--format {choice}: {why}; --format onnx exports ONNX alone")
    return (["onnx", "tensorrt"] if choice == "all" else [choice]), None


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    import torch

    from .. import backends
    from ..backends.prepare import call_signatures, cache_dirs, prepare_engines
    from ..models.adm import parse_flags
    from ..runs import atomic_write_json, check_writable
    from .common import pick_device
    from .sample import _classifier, _denoiser, list_models

    if args.list_models:
        print(list_models())
        return 0
    device = pick_device(args.device)
    formats, skipped = _formats(args.format, device)
    wants_classifier = args.classifier is not None or args.classifier_path
    if wants_classifier and "aoti" not in formats:
        raise ValueError("--classifier is packaged by --format aoti only (onnx and tensorrt run the classifier in "
                         "PyTorch): pass --format aoti, or leave --classifier out")
    if "onnx" in formats:
        backends.resolve("onnx", device)  # missing onnx / onnxruntime / onnxscript: says what to install
    if "aoti" in formats:
        backends.resolve("aoti", device)
    if args.json:
        check_writable(args.json, "--json file")
    flags = parse_flags(extra or [])  # guided-diffusion MODEL_FLAGS; refuses unknown ones with a did-you-mean
    model, _ = _denoiser(args, flags, None if args.dtype is None else getattr(torch, args.dtype))
    model = model.to(device).eval()
    clf = None
    if wants_classifier:
        clf, _ = _classifier(args, flags, None if args.dtype is None else getattr(torch, args.dtype))
        clf = clf.to(device).eval()
    sigs = call_signatures(model.cg_config, args.batch_sizes, args.cfg)
    print(f"exporting {type(model).__name__} ({args.model or 'checkpoint'}) for {len(sigs)} call shape(s) on "
          f"{device}: {', '.join(formats)}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    entries = prepare_engines(model, sigs, formats, device, args.cache_dir, args.precision,
                              log=lambda s: print(s, file=sys.stderr, flush=True), classifier=clf,
                              classifier_batches=args.batch_sizes)
    rows = [e.as_json() for e in entries]
    print(_table(rows))
    if skipped:
        print(f"TensorRT engine skipped: {skipped}. The ONNX export above is what --backend onnx reads.")
    dirs = cache_dirs(args.cache_dir)
    print(f"caches: {', '.join(f'{f} {dirs[f]}' for f in formats)} ({time.perf_counter() - start:.1f} s). "
          f"`cg-fast sample` with the same model options, --backend {formats[-1]} and --batch_size "
          f"{args.batch_sizes[0]} loads them" + (f" (set CG_FAST_CACHE={args.cache_dir})" if args.cache_dir else ""))
    if args.json:
        atomic_write_json(args.json, {"kind": "cg-fast export", "model": args.model, "dtype": args.dtype,
                                      "device": str(device), "entries": rows, "tensorrt_skipped": skipped})
        print(f"record: {Path(args.json)}")
    return 0


def _table(rows: list[dict]) -> str:
    lines = ["| format | batch | labels | status | s | MB | path | kind |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['format']} | {r['batch']} | {'y' if r['with_y'] else '-'} | "
                     f"{'reused' if r['reused'] else 'written'} | {r['seconds']:.1f} | {r['bytes'] / 1e6:.2f} | "
                     f"{r['path']} | {r['kind']} |")
    return "\n".join(lines)
