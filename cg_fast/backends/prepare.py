"""Engines prepared ahead of time (``cg-fast export``): a denoiser's ONNX export, TensorRT engine or
AOTInductor package (and, for aoti, the classifier gradient's package) for the calls a sampler will make,
written into the caches the onnx, tensorrt and aoti backends read, so the first sampling run loads them instead
of exporting, building or compiling.

    sigs = call_signatures(model.cg_config, batch_sizes=[16], cfg=False)
    for entry in prepare_engines(model, sigs, formats=("onnx", "tensorrt")):
        print(entry.format, entry.batch, entry.path, "reused" if entry.reused else "written")

A signature is exactly what the sampler passes to the denoiser: ``x`` float32 [B, C, H, W] (the sampling state
is float32 whatever the network's dtype; that dtype is part of the weights, and so of the key), ``t`` int64 [B]
and, for class-conditional models, ``y`` int64 [B]; CFG's guided steps call it with the doubled batch 2B.
Another batch size (a final partial batch too) is another signature, exported at sampling time.

This module owns no cache format: keys and layouts are those of ``onnxrt.py`` (keyed by the weights' values),
``engine_cache.py`` (weights, shapes, precision, GPU, TensorRT version) and ``aoti.py`` (model fingerprint,
shapes, device, torch version; an EngineCache), reached through each backend's ``prepare``. The classifier
gradient (aoti only) is called at the guided steps with the B rows of a batch and labels.
"""
from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..models.cg_config import CGConfig

__all__ = ["FORMATS", "Signature", "Prepared", "call_signatures", "example_call", "cache_dirs",
           "tensorrt_unavailable", "prepare_engines"]

FORMATS = ("onnx", "tensorrt", "aoti")


@dataclass(frozen=True)
class Signature:
    """One denoiser call shape: ``batch`` rows, with labels ``y`` or without."""

    batch: int
    with_y: bool


@dataclass
class Prepared:
    """One cache entry made (or found) by :func:`prepare_engines`."""

    format: str            # "onnx" | "tensorrt" | "aoti"
    batch: int
    with_y: bool
    path: Path             # model.onnx, the engine blob or the .pt2 package
    reused: bool           # it was in the cache already (nothing exported or built)
    seconds: float
    bytes: int
    kind: str = "denoiser"  # or "classifier_grad" (aoti)

    def as_json(self) -> dict:
        return {"format": self.format, "kind": self.kind, "batch": self.batch, "with_y": self.with_y,
                "path": str(self.path),
                "reused": self.reused, "seconds": round(self.seconds, 3), "bytes": self.bytes}


def call_signatures(cfg: CGConfig, batch_sizes: Sequence[int], cfg_doubled: bool = False) -> list[Signature]:
    """The signatures a sampler calls ``cfg``'s denoiser with at these batch sizes (each B; with ``cfg_doubled``
    also 2B, the batched CFG pass of guided steps, which needs a class-conditional model)."""
    if cfg_doubled and not cfg.class_cond:
        raise ValueError("--cfg: classifier-free guidance needs a class-conditional model; this one takes no labels")
    sigs: list[Signature] = []
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch sizes must be positive integers, got {b!r}")
        for rows in ((b, 2 * b) if cfg_doubled else (b,)):
            sig = Signature(rows, cfg.class_cond)
            if sig not in sigs:
                sigs.append(sig)
    return sigs


def example_call(cfg: CGConfig, sig: Signature, device: torch.device | str) -> tuple:
    """(x, t, y) of signature ``sig`` on ``device``, with the dtypes the sampler uses."""
    x = torch.zeros(sig.batch, *cfg.input_shape, dtype=torch.float32, device=device)
    t = torch.zeros(sig.batch, dtype=torch.long, device=device)
    y = torch.zeros(sig.batch, dtype=torch.long, device=device) if sig.with_y else None
    return x, t, y


def cache_dirs(root: str | Path | None = None) -> dict[str, Path]:
    """Where each format is cached: the backends' defaults (``$CG_FAST_CACHE/onnx``, ``$CG_FAST_CACHE`` and
    ``$CG_FAST_CACHE/aoti``, or ``~/.cache/cg_fast/onnx``, ``~/.cache/cg_fast/engines`` and
    ``~/.cache/cg_fast/aoti``), or as if ``CG_FAST_CACHE`` were ``root``."""
    from .aoti import default_aoti_cache_dir
    from .engine_cache import default_cache_dir
    from .onnxrt import default_onnx_cache_dir

    if root is None:
        return {"onnx": default_onnx_cache_dir(), "tensorrt": default_cache_dir(), "aoti": default_aoti_cache_dir()}
    return {"onnx": Path(root) / "onnx", "tensorrt": Path(root), "aoti": Path(root) / "aoti"}


def tensorrt_unavailable(device: torch.device) -> str | None:
    """None if a TensorRT engine can be built on ``device``, else why not and what to do."""
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install tensorrt, on Linux with an NVIDIA GPU)"
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"TensorRT engines are built on a CUDA GPU (exporting on {device.type}; pass --device cuda)"
    return None


def prepare_engines(model: torch.nn.Module, signatures: Sequence[Signature], formats: Sequence[str] = ("onnx",),
                    device: torch.device | str = "cpu", cache_root: str | Path | None = None,
                    precision: str = "fp16", log: Callable[[str], None] = lambda s: None,
                    classifier: torch.nn.Module | None = None,
                    classifier_batches: Sequence[int] = ()) -> list[Prepared]:
    """Export (onnx), build (tensorrt, with ``precision``) or compile (aoti) ``model`` for every signature into
    the backends' caches (:func:`cache_dirs`); entries already there are reused. ``model`` must carry a
    ``cg_config``. With aoti, ``classifier`` adds its gradient package for each of ``classifier_batches`` (default:
    every signature's batch), the batch sizes of classifier guidance's guided steps; the other formats run the
    classifier in PyTorch and refuse it."""
    from .aoti import AotiClassifierGrad, AotiDenoiser
    from .onnxrt import OnnxDenoiser
    from .tensorrt import TensorRTDenoiser

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"unknown export format(s) {unknown}: use {FORMATS}")
    if classifier is not None and "aoti" not in formats:
        raise ValueError("a classifier is packaged by the aoti format only (onnx and tensorrt run it in PyTorch): "
                         "add format 'aoti', or leave the classifier out")
    device = torch.device(device)
    cfg: CGConfig = model.cg_config
    dirs = cache_dirs(cache_root)
    model = model.eval()
    out: list[Prepared] = []
    for fmt in formats:
        if fmt == "onnx":
            runner = OnnxDenoiser(model, provider="cpu", cache_dir=str(dirs["onnx"]))
            if not runner.shared:
                raise ValueError(f"the ONNX cache {dirs['onnx']} cannot be written ({runner.private_reason}): pass "
                                 "a writable --cache-dir (or set CG_FAST_CACHE)")
            count = lambda: runner.exported  # noqa: E731
        elif fmt == "aoti":
            runner = AotiDenoiser(model, cache_dir=dirs["aoti"])
            if not runner.cache.writable:
                raise ValueError(f"the package cache {dirs['aoti']} cannot be written: pass a writable --cache-dir "
                                 "(or set CG_FAST_CACHE)")
            count = lambda: runner.compiled  # noqa: E731
        else:
            why = tensorrt_unavailable(device)
            if why is not None:
                raise ValueError(why)
            runner = TensorRTDenoiser(model, precision=precision, cache_dir=dirs["tensorrt"])
            if not runner.cache.writable:
                raise ValueError(f"the engine cache {dirs['tensorrt']} cannot be written: pass a writable "
                                 "--cache-dir (or set CG_FAST_CACHE)")
            count = lambda: runner.built  # noqa: E731
        for sig in signatures:
            log(f"{fmt}: batch {sig.batch}{' with labels' if sig.with_y else ''} ...")
            before, start = count(), time.perf_counter()
            path = runner.prepare(*example_call(cfg, sig, device))
            out.append(Prepared(fmt, sig.batch, sig.with_y, Path(path), reused=count() == before,
                                seconds=time.perf_counter() - start, bytes=_size(Path(path))))
        if fmt == "aoti" and classifier is not None:
            grad = AotiClassifierGrad(classifier.to(device).eval(), cache_dir=dirs["aoti"])
            for batch in sorted(set(classifier_batches) or {s.batch for s in signatures}):
                log(f"aoti: classifier gradient, batch {batch} ...")
                x, t, _ = example_call(cfg, Signature(batch, False), device)
                before, start = grad.compiled, time.perf_counter()
                path = grad.prepare(x, t, torch.zeros_like(t))
                out.append(Prepared(fmt, batch, True, Path(path), reused=grad.compiled == before,
                                    seconds=time.perf_counter() - start, bytes=_size(Path(path)),
                                    kind="classifier_grad"))
    return out


def _size(path: Path) -> int:
    """Bytes of an entry: the file, plus external weight data beside an ONNX graph."""
    if path.name == "model.onnx":
        return sum(p.stat().st_size for p in path.parent.iterdir() if p.is_file())
    return path.stat().st_size
