"""AOTInductor backend: the denoiser and the classifier gradient as compiled ``.pt2`` packages, cached on disk.

A package is made once per static call signature (``torch.export`` + ``aoti_compile_and_package``, seconds to
minutes: a C++ compile) and loaded by every later object and process (``aoti_load_package``, milliseconds), so
a new process serves its first sample without compiling. ``cg-fast export --format aoti`` makes them ahead of
time. Two kinds:

    denoiser         (x, t[, y]) -> out                  every step
    classifier_grad  (x, t, y) -> (g, logits)            guided steps of classifier guidance: g the gradient of
                                                         log_softmax(classifier(x, t))[rows, y] summed, w.r.t. x

The cache is :class:`~cg_fast.backends.engine_cache.EngineCache` (atomic writes, SHA-256 checked on every
load, corrupt or half-written entries removed and rebuilt) in ``$CG_FAST_CACHE/aoti`` (default
``~/.cache/cg_fast/aoti``; ``cache_dir=`` overrides), entries ``<digest>.pt2`` + ``<digest>.json``. The key
(:class:`EngineKey`) holds what a package bakes in: the model's fingerprint (weight values and dtypes, plain
settings and class sources: :func:`~cg_fast.backends.onnxrt.model_fingerprint`), the input shapes and dtypes,
the device, the kind and the torch version, so no stale package is ever served: after a weight change the key
changes. In-place weight changes are noticed per call (version counters, as the onnx backend); writes through
``param.data`` need :meth:`refresh`.

This module owns the backend objects and the key; how a model becomes a package is
:mod:`cg_fast.models.export` (``denoiser_program``, ``classifier_grad_program``, ``aoti_package``).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .engine_cache import EngineCache, EngineKey, state_signature

__all__ = ["AotiDenoiser", "AotiClassifierGrad", "make_classifier_grad", "default_aoti_cache_dir", "package_key",
           "FORMAT_VERSION"]

FORMAT_VERSION = "1"  # bump when what a package computes or how it is called changes


def default_aoti_cache_dir() -> Path:
    """$CG_FAST_CACHE/aoti, else ~/.cache/cg_fast/aoti."""
    root = os.environ.get("CG_FAST_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "cg_fast") / "aoti"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} sm{''.join(map(str, torch.cuda.get_device_capability(device)))}"
    return device.type


def package_key(fingerprint: str, kind: str, inputs: dict[str, Tensor | None], device: torch.device) -> EngineKey:
    """The cache key of one package: model fingerprint, input shapes and dtypes, device, kind, torch version.
    (``EngineKey.trt_version`` is TensorRT's field; here it holds the torch version.)"""
    shapes = tuple((name, tuple(v.shape)) for name, v in inputs.items() if v is not None)
    dtypes = ",".join(f"{name}:{str(v.dtype)[6:]}" for name, v in inputs.items() if v is not None)
    return EngineKey(weights=fingerprint, shapes=shapes, dtype=dtypes, gpu=_device_name(device),
                     trt_version=f"torch {torch.__version__}",
                     extra=(("kind", kind), ("format", f"aoti-{FORMAT_VERSION}")))


def _load(path: Path) -> Any:
    """The package's runner, ``runner.run([tensors]) -> [tensors]``: the loader that ``aoti_load_package`` wraps,
    taken directly, so that serving never imports ``torch._inductor`` (~2 s of a cold start)."""
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)


class _Packaged:
    """Shared machinery: key per call signature, compile-or-load through the cache, loaded packages kept."""

    kind = ""

    def __init__(self, model: nn.Module, cache_dir: str | os.PathLike | None = None,
                 watch_weights: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"the aoti backend needs an nn.Module (its weights key the package cache), got "
                            f"{type(model).__name__}: wrap the function in a module, or use backend='eager'")
        self.model = model
        self.cache = EngineCache(cache_dir if cache_dir is not None else default_aoti_cache_dir(), suffix=".pt2")
        self.watch_weights = watch_weights
        self._modules = list(model.modules())
        self._signature: tuple | None = None
        self._fingerprint = ""
        self._loaded: dict[str, Any] = {}
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.compiled = 0  # packages this object compiled (not found in the cache)
        self.loaded = 0    # packages this object loaded from the cache

    def refresh(self) -> None:
        """Hash the weights again at the next call (needed after writes through ``param.data``)."""
        self._loaded.clear()
        self._signature = None
        self._modules = list(self.model.modules())

    def fingerprint(self) -> str:
        from .onnxrt import model_fingerprint

        if self._signature is not None and not self.watch_weights:
            return self._fingerprint
        sig = state_signature(self._modules)
        if sig != self._signature:
            self._loaded.clear()  # packages of the old weights
            self._fingerprint = model_fingerprint(self.model)
            self._signature = sig
        return self._fingerprint

    def _inputs(self, x: Tensor, t: Tensor, y: Tensor | None) -> dict[str, Tensor | None]:
        return {"x": x, "t": t, "y": y}

    def key(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> EngineKey:
        return package_key(self.fingerprint(), self.kind, self._inputs(x, t, y), x.device)

    def _program(self, x: Tensor, t: Tensor, y: Tensor | None) -> torch.export.ExportedProgram:
        raise NotImplementedError

    def _build(self, x: Tensor, t: Tensor, y: Tensor | None) -> bytes:
        from ..models.export import aoti_package

        with tempfile.TemporaryDirectory(prefix="cg_fast_aoti_") as tmp:
            path = aoti_package(self._program(x, t, y), Path(tmp) / "package.pt2")
            self.compiled += 1
            return path.read_bytes()

    def prepare(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Path:
        """Ahead of time (``cg-fast export``): the cached package of this call signature, compiled unless a
        valid entry is there; not loaded. ``compiled`` counts a compile."""
        key = self.key(x, t, y)
        blob, _ = self.cache.get_or_build(key, lambda: self._build(x, t, y))
        path = self.cache.paths(key)[0]
        if not self.cache.writable:  # uncached: keep the package in a private folder for this object
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="cg_fast_aoti_")
            path = Path(self._tmp.name) / f"{key.digest()}.pt2"
            path.write_bytes(blob)
        return path

    def _runner(self, x: Tensor, t: Tensor, y: Tensor | None) -> Any:
        key = self.key(x, t, y)
        digest = key.digest()
        run = self._loaded.get(digest)
        if run is None:
            before = self.compiled
            path = self.prepare(x, t, y)
            if self.compiled == before:
                self.loaded += 1
            run = _load(path)
            self._loaded[digest] = run
        return run


class AotiDenoiser(_Packaged):
    """``model(x, t, y=None)`` run from an AOTInductor package (see the module docstring).

    ``compiled`` / ``loaded`` count the packages this object compiled and those it found in the cache."""

    kind = "denoiser"

    def _program(self, x: Tensor, t: Tensor, y: Tensor | None) -> torch.export.ExportedProgram:
        from ..models.export import denoiser_program

        return denoiser_program(self.model.eval(), x, t, y)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        x, t = x.detach().contiguous(), t.long().contiguous()
        y = None if y is None else y.long().contiguous()
        run = self._runner(x, t, y)
        with torch.no_grad():
            return run.run([x, t] if y is None else [x, t, y])[0]


class AotiClassifierGrad(_Packaged):
    """The classifier gradient ``(x, t, y) -> (g, logits)`` run from an AOTInductor package: what
    ``ClassifierGuidance.gradient`` computes (forward + backward to the input), for the guided steps."""

    kind = "classifier_grad"

    def _program(self, x: Tensor, t: Tensor, y: Tensor | None) -> torch.export.ExportedProgram:
        from ..models.export import classifier_grad_program

        if y is None:
            raise ValueError("the classifier gradient needs labels y")
        return classifier_grad_program(self.model.eval(), x, t, y)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x, t, y = x.detach().contiguous(), t.long().contiguous(), y.long().contiguous()
        run = self._runner(x, t, y)
        with torch.no_grad():
            g, logits = run.run([x, t, y])
        return g, logits


def make_classifier_grad(classifier: Callable[[Tensor, Tensor], Tensor], **options: Any) -> AotiClassifierGrad:
    """The packaged gradient of ``classifier`` (options: ``cache_dir``, ``watch_weights``)."""
    return AotiClassifierGrad(classifier, **{k: v for k, v in options.items() if k in ("cache_dir", "watch_weights")})
