"""Denoiser backends (stage 2 of the data flow): the same call signature as the eager model.

    eager      the module as it is
    cudagraph  CUDA graphs: the sampler replays whole steps (denoiser + classifier + fused update);
               :class:`~cg_fast.backends.cudagraph.CUDAGraphDenoiser` graphs the denoiser alone
    compile    ``torch.compile`` (option ``mode``: default, reduce-overhead, max-autotune)
    onnx       exported with ``torch.onnx.export`` and run by ONNX Runtime (CPU or CUDA provider)
    tensorrt   ONNX -> TensorRT engine (fp16/bf16, static shapes), engines cached on disk
    aoti       AOTInductor ``.pt2`` packages of the denoiser and of the classifier gradient (forward +
               backward), compiled once per static shape and cached on disk: a new process loads, never compiles
    auto       CUDA -> cudagraph (ready after one capture per step kind); CPU -> eager. TensorRT is never
               picked by auto: its engine build takes minutes per model and shape, so it runs only when asked.

A backend asked for by name that cannot run here raises :class:`BackendUnavailable` saying what to
install; nothing falls back silently except ``auto``.

The classifier of classifier guidance stays in PyTorch (TensorRT and ONNX have no autograd). With the
backends that do not capture whole steps (onnx, tensorrt, compile) on CUDA, its forward + backward is still
replayed from a CUDA graph (:func:`classifier_graph`); with cudagraph it is part of the guided step's graph;
with aoti it runs from its own package (:class:`~cg_fast.backends.aoti.AotiClassifierGrad`), on any device.
"""
from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["BACKENDS", "BackendUnavailable", "check_name", "why_unavailable", "resolve", "make_denoiser",
           "classifier_graph"]

BACKENDS = ("auto", "eager", "cudagraph", "compile", "onnx", "tensorrt", "aoti")


class BackendUnavailable(RuntimeError):
    """A backend was requested that cannot run on this machine; the message says what to install."""


def check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}: use one of {BACKENDS}")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def why_unavailable(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else the reason and what to do."""
    check_name(name)
    cuda = device.type == "cuda" and torch.cuda.is_available()
    if name in ("auto", "eager", "compile"):
        return None
    if name == "aoti":
        if not hasattr(torch._C, "_aoti"):  # (not torch._inductor: importing it costs ~2 s of a cold start)
            return f"backend 'aoti' needs torch >= 2.6 (AOTInductor packages), found {torch.__version__}"
        return None
    if name == "cudagraph":
        return None if cuda else f"backend 'cudagraph' needs a CUDA device (sampling on {device.type})"
    if name == "onnx":
        missing = [m for m in ("onnx", "onnxruntime", "onnxscript") if not _has(m)]
        if missing:
            return f"backend 'onnx' needs {', '.join(missing)}: pip install {' '.join(missing)}"
        return None
    if name == "tensorrt":
        if not cuda:
            return f"backend 'tensorrt' needs a CUDA device (sampling on {device.type})"
        if not _has("tensorrt"):
            return "backend 'tensorrt' needs TensorRT's Python package: pip install tensorrt (with a CUDA GPU)"
        missing = [m for m in ("onnx", "onnxscript") if not _has(m)]
        if missing:
            return f"backend 'tensorrt' exports through ONNX: pip install {' '.join(missing)}"
        return None
    raise AssertionError(name)


def resolve(name: str, device: torch.device | str) -> str:
    """The concrete backend ``name`` means on ``device`` ("auto" picks; others are checked)."""
    device = torch.device(device)
    check_name(name)
    if name == "auto":
        return "cudagraph" if device.type == "cuda" and torch.cuda.is_available() else "eager"
    why = why_unavailable(name, device)
    if why is not None:
        raise BackendUnavailable(why)
    return name


def make_denoiser(model: Callable[..., Tensor], name: str, **options: Any) -> Callable[..., Tensor]:
    """Wrap ``model`` in backend ``name`` (no device resolution: use :func:`resolve` first)."""
    check_name(name)
    if name == "eager":
        return model
    if name == "cudagraph":
        from .cudagraph import CUDAGraphDenoiser
        return CUDAGraphDenoiser(model, **options)
    if name == "compile":
        from .compiled import CompiledDenoiser
        return CompiledDenoiser(model, **options)
    if name == "onnx":
        from .onnxrt import OnnxDenoiser
        return OnnxDenoiser(model, **options)
    if name == "tensorrt":
        from .tensorrt import TensorRTDenoiser
        return TensorRTDenoiser(model, **options)
    if name == "aoti":
        from .aoti import AotiDenoiser
        return AotiDenoiser(model, **options)
    raise ValueError("backend 'auto' must be resolved first: backends.resolve('auto', device)")


def classifier_graph(classifier: Callable[[Tensor, Tensor], Tensor], backend: str, device: torch.device,
                     cache: dict[Any, Any], key: Any, options: dict[str, Any] | None = None,
                     ) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None:
    """The classifier gradient ``(x, t, y) -> (g, logits)`` replayed from a CUDA graph, for the denoiser
    backends that leave the classifier out of their graphs (onnx, tensorrt, compile) on CUDA, or run from an
    AOTInductor package (aoti, any device; ``options``: the backend's, e.g. ``cache_dir``); None where the
    gradient runs otherwise (eager; cudagraph, which captures it inside the guided step; the CPU).

    ``cache`` (owned by the caller, e.g. the sampler) keeps one graphed gradient per ``key`` (the classifier's
    :func:`cg_fast.engine.module_signature`), so later runs replay what the first captured.
    """
    if backend == "aoti":
        if not isinstance(classifier, torch.nn.Module):
            return None  # a plain function has no weights to key a package: it runs eagerly
        if key not in cache:
            from .aoti import make_classifier_grad
            cache[key] = make_classifier_grad(classifier, **(options or {}))
        return cache[key]
    from .cudagraph import CUDAGraphClassifierGrad

    graphs_here = device.type == "cuda" or CUDAGraphClassifierGrad._api is not torch.cuda  # (tests emulate)
    if backend in ("eager", "cudagraph") or not graphs_here:
        return None
    if key not in cache:
        cache[key] = CUDAGraphClassifierGrad(classifier, eager_fallback=True)  # warns if it cannot be captured
    return cache[key]
