"""``cg-fast eval``: score sample batches (``.npz``, as ``cg-fast sample`` writes) against a reference: FD,
precision/recall and an Inception-style score, from the digits judge's features (shipped) or from Inception
(torch-fidelity with a local weights file). One row per samples file, a table and a JSON record.

The work is :mod:`cg_fast.eval.score`; this module reads the command line, resumes or refuses the record
(:mod:`cg_fast.runs`) and reports.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

KIND = "cg-fast eval"
EXAMPLES = """\
examples:
  cg-fast eval runs/digits/samples_1000x8x8x1.npz --ref digits                 # the shipped digits judge
  cg-fast eval a.npz b.npz --ref VIRTUAL_imagenet64_labeled.npz --features inception \\
      --inception-weights weights-inception-2015-12-05-6726825d.pth             # needs cg_fast[fidelity]

A reference is a sample batch (arr_0 images: FD, precision/recall), precomputed statistics mu/sigma such
as the ADM evaluator's reference batches (FD from them; precision/recall only if the file also holds its
images, else FD only, and the output says so) or `digits` (the 1,797 real digits). The record (--out)
resumes: a rerun with the same reference and options keeps the rows of unchanged sample files; other
options on the same record are refused (pass another --out).
"""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    from .common import positive_int

    p = sub.add_parser("eval", help="FD, precision/recall and IS of sample batches against a reference",
                       description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    p.add_argument("samples", nargs="+", help="sample batch .npz file(s): arr_0 uint8 NHWC images, arr_1 labels")
    p.add_argument("--ref", required=True,
                   help="reference .npz (a sample batch, or mu/sigma statistics) or 'digits' (the real digits)")
    p.add_argument("--features", default="auto",
                   help="digits (the shipped judge: 8x8 grey), inception (torch-fidelity + --inception-weights) or "
                        "auto (default: digits for 8x8x1 samples, else inception)")
    p.add_argument("--inception-weights", default=None,
                   help="LOCAL Inception-V3 FID weights (weights-inception-2015-12-05-6726825d.pth); nothing is "
                        "downloaded")
    p.add_argument("--digits-weights", default=None,
                   help="digits: a folder from `cg-fast train-testbed` (default: the shipped weights)")
    p.add_argument("--k", type=positive_int, default=3, help="precision/recall: k of the k-NN manifolds (default 3)")
    p.add_argument("--is-splits", type=positive_int, default=None,
                   help="Inception-style score: parts averaged over (default digits 1, inception 10)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="inception: images per pass (default 64)")
    p.add_argument("--device", default=None, help="inception: cuda, cpu (default: cuda if available)")
    p.add_argument("--out", default=None,
                   help="JSON record (default out/eval_<reference name>.json; '' = none)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def _feature_kind(choice: str, first_sample: Path) -> str:
    from ..eval.score import FEATURES
    from .common import check_names

    if choice != "auto":
        return check_names([choice], FEATURES, "--features")[0]
    shape = _arr0_shape(first_sample)
    return "digits" if shape is not None and tuple(shape[1:]) == (8, 8, 1) else "inception"


def _arr0_shape(path: Path) -> tuple[int, ...] | None:
    """The shape of ``arr_0`` from its header alone (a 50k-image batch is not read twice); None if it cannot be
    read here (load_sample_batch then says what is wrong)."""
    import zipfile

    import numpy as np

    try:
        with zipfile.ZipFile(path) as zf, zf.open("arr_0.npy") as f:
            fmt = np.lib.format
            read = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
            return read(f)[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _files(paths: list[str]) -> list[Path]:
    out = []
    for s in paths:
        p = Path(s)
        if not p.is_file():
            raise FileNotFoundError(f"samples file {s!r} does not exist (or is not a file)")
        out.append(p)
    if len(set(map(str, out))) != len(out):
        raise ValueError("a samples file is named twice")
    return out


def run(args: argparse.Namespace) -> int:
    from ..eval.npz import load_sample_batch
    from ..eval.score import digits_extractor, inception_extractor, load_reference, score_batch
    from ..runs import atomic_write_json, check_writable, files_fingerprint, new_results, resume_or_refuse
    from .common import pick_device

    samples = _files(args.samples)
    kind = _feature_kind(args.features, samples[0])
    ref_is_file = Path(args.ref).exists()
    if not ref_is_file and args.ref != "digits":
        raise FileNotFoundError(f"reference {args.ref!r} does not exist (pass a .npz, or 'digits' for the real "
                                "digits)")
    if kind == "inception":
        device = pick_device(args.device)
        ext = inception_extractor(args.inception_weights, args.batch_size, device)
        weights = files_fingerprint([args.inception_weights])
    else:
        ext = digits_extractor(args.digits_weights)
        weights = files_fingerprint([Path(args.digits_weights) / "digits_judge.pt"]) if args.digits_weights \
            else "shipped"
    splits = args.is_splits or (10 if kind == "inception" else 1)
    settings = {"ref": args.ref, "ref_fingerprint": files_fingerprint([args.ref]) if ref_is_file else "digits",
                "features": kind, "weights": weights, "k": args.k, "is_splits": splits}
    out = _out_path(args.out, args.ref)
    record = None
    if out is not None:
        check_writable(out, "--out record")
        record = resume_or_refuse(out, settings, KIND, log=lambda s: print(s, file=sys.stderr)) \
            or new_results(settings, KIND)

    start = time.perf_counter()
    bar = _bar(not args.no_progress)
    tick = (lambda n: bar.update(n)) if bar is not None else None
    try:
        _say(bar, f"reference {args.ref}: {kind} features")
        ref = load_reference(args.ref, ext, tick)
        if ref.note:
            _say(bar, ref.note)
        rows = {}
        for path in samples:
            fp = files_fingerprint([path])
            done = record["runs"].get(str(path)) if record is not None else None
            if done is not None and done.get("file_fingerprint") == fp:
                rows[str(path)] = done
                continue
            _say(bar, f"scoring {path}")
            images, labels = load_sample_batch(path)
            rows[str(path)] = {"file_fingerprint": fp, **score_batch(images, labels, ref, ext, k=args.k,
                                                                       splits=splits, progress=tick)}
            if record is not None:
                record["runs"][str(path)] = rows[str(path)]
                record["note"] = ref.note
                atomic_write_json(out, record)
    finally:
        if bar is not None:
            bar.close()
    print(_table(rows, ref.features is not None))
    legend = (f"{kind} features ({ext.dim}-d) against {ref.name}; FD lower is better; precision/recall: k-NN "
              f"manifolds, k={args.k}; IS: exp E KL(p(y|x) || p(y)) over {splits} split(s)")
    print(f"\n{legend}. {time.perf_counter() - start:.1f} s.")
    if ref.note:
        print(ref.note)
    if out is not None:
        print(f"record: {out}")
    return 0


def _out_path(value: str | None, ref: str) -> Path | None:
    if value == "":
        return None
    if value is not None:
        return Path(value)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(ref).stem)
    return Path("out") / f"eval_{stem}.json"


def _bar(enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(desc="features", unit="img", dynamic_ncols=True, file=sys.stderr)


def _say(bar, text: str) -> None:
    (bar.write if bar is not None else print)(text, file=sys.stderr)


def _fmt(v: Any, digits: int = 4) -> str:
    return "–" if v is None else (f"{v:.{digits}g}" if isinstance(v, float) else str(v))


def _table(rows: dict[str, dict], with_pr: bool) -> str:
    acc = any("label_acc" in r for r in rows.values())
    head = ["samples", "n", "FD", *(["precision", "recall"] if with_pr else []), "IS", *(["judge acc"] if acc else [])]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name, _fmt(r["n"]), _fmt(r["fd"])]
        if with_pr:
            cells += [_fmt(r["precision"], 3), _fmt(r["recall"], 3)]
        cells.append("–" if r.get("is") is None else f"{r['is']:.3f} ± {r['is_std']:.3f}")
        if acc:
            cells.append(_fmt(r.get("label_acc"), 3))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
