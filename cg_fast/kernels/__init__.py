"""Step kernels (stage 4 of the data flow): one fused memory pass per sampling step.

Three implementations share one signature (that of :func:`ddpm_step_ref` / :func:`ddim_step_ref`;
:func:`dpmpp2m_step_ref` adds the ``prev`` state and takes no noise):

    reference  plain PyTorch, the semantics (spec §4-§6); bitwise guided-diffusion on the CPU
    triton     fused Triton kernels (cg_fast/kernels/triton_step.py), default on CUDA tensors
    csrc       C++ (OpenMP) / CUDA operators torch.ops.cg_fast.* built from csrc/, default on CPU tensors

:func:`ddpm_step` / :func:`ddim_step` / :func:`dpmpp2m_step` / :func:`step` pick one per call: Triton for CUDA tensors, csrc for
CPU tensors, the reference otherwise or when the preferred one is not installed (with one warning). The
environment variable ``CG_FAST_KERNELS=reference|triton|csrc`` (or the ``impl=`` argument, or
``Sampler(kernels=...)``) forces one; a forced implementation that is unavailable raises.

Noise: every implementation takes either ``noise`` (a tensor like x) or ``noise=None`` with ``seeds`` (int64 [B])
and ``step_index``: counter-based noise of the layout in :mod:`cg_fast.kernels.rng`, computed inside the fused
kernels (the reference computes it with :func:`cg_fast.kernels.rng.counter_normal`).
"""
from __future__ import annotations

import importlib
import os
import warnings
from typing import Callable

import torch
from torch import Tensor

from .reference import GUIDE_KINDS, PREDICTIONS, ddim_step_ref, ddpm_step_ref, dpmpp2m_step_ref
from .table import NUM_COLS, Col, schedule_columns

__all__ = ["ddpm_step", "ddim_step", "dpmpp2m_step", "step", "ddpm_step_ref", "ddim_step_ref", "dpmpp2m_step_ref",
           "Col", "NUM_COLS", "schedule_columns", "GUIDE_KINDS", "PREDICTIONS", "IMPLEMENTATIONS", "STEP_METHODS",
           "available", "resolve", "step_function"]

IMPLEMENTATIONS = ("reference", "triton", "csrc")
STEP_METHODS = ("ddpm", "ddim", "dpmpp2m")  # the step families, in the order of the function tuples below
# name -> (module, (ddpm, ddim, dpmpp2m) function names, availability function name)
_MODULES = {
    "reference": None,
    "triton": ("cg_fast.kernels.triton_step", ("ddpm_step_triton", "ddim_step_triton", "dpmpp2m_step_triton"),
               "available"),
    "csrc": ("cg_fast.kernels.csrc_ops", ("ddpm_step_csrc", "ddim_step_csrc", "dpmpp2m_step_csrc"), "available"),
}
_INSTALL_HINT = {
    "triton": "pip install triton (on the CPU it runs only under TRITON_INTERPRET=1)",
    "csrc": "reinstall with the extension built: make install (pip install --no-build-isolation -e .)",
}
_loaded: dict[str, tuple[Callable, ...] | None] = {"reference": (ddpm_step_ref, ddim_step_ref, dpmpp2m_step_ref)}
_warned: set[str] = set()
_device_check: dict[str, Callable] = {}


def _load(name: str) -> tuple[Callable, ...] | None:
    """The (ddpm, ddim, dpmpp2m) functions of an implementation, or None when it cannot run in this process."""
    if name not in _loaded:
        mod_name, fn_names, avail_name = _MODULES[name]
        try:
            mod = importlib.import_module(mod_name)
            ok = getattr(mod, avail_name)()
        except ImportError:
            ok = False
        _loaded[name] = tuple(getattr(mod, fn) for fn in fn_names) if ok else None
        if ok:
            _device_check[name] = getattr(mod, avail_name)
    return _loaded[name]


def available(name: str, device: str | torch.device | None = None) -> bool:
    """Whether implementation ``name`` can run in this process (and on ``device``'s type, if given)."""
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown kernel implementation {name!r}: use one of {IMPLEMENTATIONS}")
    if _load(name) is None:
        return False
    if device is None or name == "reference":
        return True
    if name == "csrc":  # the CUDA operators are a separate extension (cg_fast._C_cuda)
        return bool(_device_check[name](device))
    return True


def resolve(x: Tensor, impl: str | None = None) -> str:
    """Which implementation a step on ``x`` runs: ``impl``, else $CG_FAST_KERNELS, else by device."""
    forced = impl if impl not in (None, "auto") else os.environ.get("CG_FAST_KERNELS") or None
    if forced is not None:
        if forced not in IMPLEMENTATIONS:
            raise ValueError(f"unknown kernel implementation {forced!r} (from impl= or CG_FAST_KERNELS): "
                             f"use one of {IMPLEMENTATIONS} or 'auto'")
        if not available(forced, x.device):
            raise RuntimeError(f"kernel implementation {forced!r} was requested but is not available: "
                               f"{_INSTALL_HINT.get(forced, '')}")
        return forced
    preferred = {"cuda": "triton", "cpu": "csrc"}.get(x.device.type)
    if preferred is None:
        return "reference"
    if available(preferred, x.device):
        return preferred
    if x.device.type == "cuda" and available("csrc", x.device):
        return "csrc"
    if preferred not in _warned:
        _warned.add(preferred)
        warnings.warn(f"cg_fast: the {preferred} step kernels are not available, using the PyTorch reference "
                      f"(slower, same results). To enable them: {_INSTALL_HINT[preferred]}", RuntimeWarning,
                      stacklevel=3)
    return "reference"


def ddpm_step(x: Tensor, model_out: Tensor, coef: Tensor, noise: Tensor | None, *, impl: str | None = None,
              **kw) -> Tensor:
    """One fused DDPM step; arguments as :func:`cg_fast.kernels.reference.ddpm_step_ref`."""
    return _load(resolve(x, impl))[0](x, model_out, coef, noise, **kw)


def ddim_step(x: Tensor, model_out: Tensor, coef: Tensor, noise: Tensor | None, *, impl: str | None = None,
              **kw) -> Tensor:
    """One fused DDIM step; arguments as :func:`cg_fast.kernels.reference.ddim_step_ref`."""
    return _load(resolve(x, impl))[1](x, model_out, coef, noise, **kw)


def dpmpp2m_step(x: Tensor, model_out: Tensor, coef: Tensor, noise: Tensor | None = None, *,
                 impl: str | None = None, **kw) -> Tensor:
    """One fused DPM-Solver++ 2M step; arguments as :func:`cg_fast.kernels.reference.dpmpp2m_step_ref`."""
    return _load(resolve(x, impl))[2](x, model_out, coef, noise, **kw)


_BY_METHOD = {"ddpm": ddpm_step, "ddim": ddim_step, "dpmpp2m": dpmpp2m_step}


def step_function(method: str) -> Callable[..., Tensor]:
    """The dispatching step function of a sampling method ("ddpm", "ddim" or "dpmpp2m")."""
    try:
        return _BY_METHOD[method]
    except KeyError:
        raise ValueError(f"unknown sampling method {method!r}: use one of {STEP_METHODS}") from None


def step(method: str, x: Tensor, model_out: Tensor, coef: Tensor, noise: Tensor | None, **kw) -> Tensor:
    """``ddpm_step``, ``ddim_step`` or ``dpmpp2m_step`` by ``method`` name."""
    return step_function(method)(x, model_out, coef, noise, **kw)
