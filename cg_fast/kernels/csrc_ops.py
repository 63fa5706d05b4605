"""C++ / CUDA fused step operators ``torch.ops.cg_fast.ddpm_step`` / ``ddim_step`` / ``dpmpp2m_step`` (built from
csrc/).

One memory pass per sampling step: predicted x0 (optional clip), posterior mean, fixed or learned variance,
guidance (classifier mean / score shift, or the CFG combine), the cache update of ``h`` (spec §4) and the noise,
with per-batch-row coefficients ``coef[B, NUM_COLS]`` (:mod:`cg_fast.kernels.table`). The wrappers here take
exactly the arguments of :func:`~cg_fast.kernels.reference.ddpm_step_ref` / ``ddim_step_ref`` /
``dpmpp2m_step_ref`` and compute the same values: on the CPU bitwise (same float32 operations in the same order,
the exp torch.exp uses), on CUDA up to ``expf`` rounding (DDIM and DPM-Solver++ 2M have no exp: bitwise there too).

Operator schemas (csrc/ops.cpp); ``out`` and ``h`` are written in place, nothing is returned::

    cg_fast::ddpm_step(Tensor x, Tensor model_out, Tensor coef, Tensor? noise, Tensor(a!) out, *,
                       str guide="none", Tensor? fresh=None, Tensor(b!)? h=None, str prediction="eps",
                       bool learned_var=False, bool clip=True, int? cfg_channels=None,
                       Tensor? seeds=None, Tensor? step_index=None) -> ()
    cg_fast::ddim_step(... the same ...) -> ()
    cg_fast::dpmpp2m_step(Tensor x, Tensor model_out, Tensor coef, Tensor(c!) prev, Tensor(a!) out, *,
                          str guide="none", Tensor? fresh=None, Tensor(b!)? h=None, str prediction="eps",
                          bool learned_var=False, bool clip=True, int? cfg_channels=None) -> ()

DPM-Solver++ 2M (spec §5 "DPM-Solver++") is deterministic (no noise, seeds or step index) and carries ``prev``,
float32 like x: read as the previous step's data prediction and overwritten with this step's (guided) x0.

Layout: ``x``, ``noise``, ``h``, ``out`` float32 of one shape [B, C, ...] (n = x[0].numel() per row);
``model_out`` [B, C, ...], or [B, 2C, ...] with ``learned_var`` (variance channel of element i at n + i);
``fresh`` the classifier gradient (shape of x) or, for CFG, the unconditional output (C or 2C channels).
``model_out`` / ``fresh`` may be float16 / bfloat16 / float32 (upcast exactly). Memory traffic per element
(fp32): read x, o (1x or 2x), z, [fresh], [h]; write x', [h] (dpmpp2m: read x, o, prev, [fresh], [h]; write
x', prev, [h]). Counter-based noise (``noise=None``, ``seeds``
int64 [B], ``step_index`` int64 with 1 or B values, on x's device): z is computed in the kernel from the counter
layout of :mod:`cg_fast.kernels.rng` (Philox4x32-10 + Box-Muller; csrc/philox.h), so the noise tensor is neither
drawn, written nor read (4 bytes less per element, and no separate random-number pass). On the CPU it is
bitwise ``rng.counter_normal`` (torch's own log / cos / sin, as for exp below); on CUDA within
``rng.NORMAL_TOL_ULP``. Seeds and step index are read by the kernel, so a CUDA graph replays later steps after a
copy into the step-index buffer.

exp on the CPU: the kernels call the function torch.exp calls on this build (MKL VML ``vmsExp`` in high-accuracy
mode in the PyTorch x86 wheels; SLEEF or std::exp without MKL), hence the bitwise agreement. The environment
variable ``CG_FAST_CSRC_EXP=sleef|std``, read once per process, selects another one: not bitwise (<= 1e-6
relative, tested), and with learned variance ``sleef`` is ~1.7x faster on AVX-512 (the two exps per element are
most of the kernel's time when the data are in cache). The same choice applies to the log / cos / sin of
counter-based noise (torch's vmsLn / vmsCos / vmsSin by default).

.. warning:: ``out`` may alias ``x`` (in-place step); it must not alias ``noise``, ``model_out``, ``fresh``,
   ``h`` or ``prev``.
.. warning:: The ops are registered for CPU and (where built) CUDA tensors. Under ``torch.compile`` they are
   traced through the fake implementations below and functionalised (they mutate only ``out``, ``h`` and
   ``prev``).
   With contiguous arguments they allocate nothing (the wrappers allocate ``out`` when it is None) and never
   synchronise, so CUDA graphs capture them.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .reference import check_no_noise_args, check_noise_args, check_prev_arg, check_step_args
from .table import NUM_COLS

__all__ = ["available", "ddpm_step_csrc", "ddim_step_csrc", "dpmpp2m_step_csrc", "load_error"]

# The compiled modules are empty: importing them only loads the shared libraries, whose static initialisers
# register the schemas (TORCH_LIBRARY in csrc/ops.cpp) and the kernels (TORCH_LIBRARY_IMPL per device) with
# the dispatcher. The ops are then reached as torch.ops.cg_fast.*, never through these modules.
try:
    from cg_fast import _C  # noqa: F401  (CPU kernels + schemas)
except ImportError as err:  # not built (isolated build, no compiler, CG_FAST_NO_CSRC=1, ...)
    _C = None
    _LOAD_ERROR: str | None = f"{type(err).__name__}: {err}"
else:
    _LOAD_ERROR = None
    try:
        from cg_fast import _C_cuda  # noqa: F401  (CUDA kernels; built only with a CUDA torch and nvcc)
    except ImportError:
        pass


def available(device: str | torch.device | None = None) -> bool:
    """Whether the compiled operators are loaded (``torch.ops.cg_fast.ddpm_step`` exists), and, for a ``device``
    ("cpu", "cuda", a torch.device), whether they have a kernel for that device type (CUDA needs cg_fast._C_cuda).
    """
    if _LOAD_ERROR is not None or not hasattr(torch.ops.cg_fast, "ddpm_step"):
        return False
    if device is None:
        return True
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(torch.device(device).type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("cg_fast::ddpm_step", key)


def load_error() -> str | None:
    """Why the extension could not be imported (None when it was)."""
    return _LOAD_ERROR


# -- fake (meta) implementations: shapes / dtypes only, for torch.compile and FakeTensor tracing -----------------
def _fake_step(x: Tensor, model_out: Tensor, coef: Tensor, noise: Tensor | None, out: Tensor, *,
               guide: str = "none", fresh: Tensor | None = None, h: Tensor | None = None, prediction: str = "eps",
               learned_var: bool = False, clip: bool = True, cfg_channels: int | None = None,
               seeds: Tensor | None = None, step_index: Tensor | None = None) -> None:
    torch._check(out.shape == x.shape, lambda: f"cg_fast step: out must have the shape of x {tuple(x.shape)}")
    torch._check(coef.dim() == 2 and coef.shape[1] == NUM_COLS,
                 lambda: f"cg_fast step: coef must have shape [B, {NUM_COLS}], got {tuple(coef.shape)}")
    if h is not None:
        torch._check(h.shape == x.shape, lambda: f"cg_fast step: h must have the shape of x {tuple(x.shape)}")
    return None


def _fake_dpmpp2m_step(x: Tensor, model_out: Tensor, coef: Tensor, prev: Tensor, out: Tensor, *,
                       guide: str = "none", fresh: Tensor | None = None, h: Tensor | None = None,
                       prediction: str = "eps", learned_var: bool = False, clip: bool = True,
                       cfg_channels: int | None = None) -> None:
    torch._check(prev.shape == x.shape, lambda: f"cg_fast step: prev must have the shape of x {tuple(x.shape)}")
    return _fake_step(x, model_out, coef, None, out, guide=guide, fresh=fresh, h=h, prediction=prediction,
                      learned_var=learned_var, clip=clip, cfg_channels=cfg_channels)


if _C is not None and not getattr(_C, "_cg_fast_fakes_registered", False):
    # Once per process (the flag lives on the extension module, which survives a reload of this file).
    torch.library.register_fake("cg_fast::ddpm_step", _fake_step)
    torch.library.register_fake("cg_fast::ddim_step", _fake_step)
    torch.library.register_fake("cg_fast::dpmpp2m_step", _fake_dpmpp2m_step)
    _C._cg_fast_fakes_registered = True


# -- typed wrappers with the reference signature --------------------------------------------------------------------
def _step_index(x: Tensor, step_index: int | Tensor | None) -> Tensor | None:
    """The step index as the int64 tensor the op reads (an int becomes a one-element tensor on x's device)."""
    if step_index is None or (isinstance(step_index, Tensor) and step_index.dtype == torch.int64):
        return step_index
    return torch.as_tensor(step_index, dtype=torch.int64, device=x.device).reshape(-1)


def _out_like(x: Tensor, out: Tensor | None) -> Tensor:
    if out is not None:
        return out
    return torch.empty(x.shape, dtype=torch.float32, device=x.device)


def ddpm_step_csrc(
    x: Tensor,
    model_out: Tensor,
    coef: Tensor,
    noise: Tensor | None,
    *,
    guide: str = "none",
    fresh: Tensor | None = None,
    h: Tensor | None = None,
    prediction: str = "eps",
    learned_var: bool = False,
    clip: bool = True,
    cfg_channels: int | None = None,
    out: Tensor | None = None,
    seeds: Tensor | None = None,
    step_index: int | Tensor | None = None,
) -> Tensor:
    """One fused DDPM ancestral step (ADM ``p_sample`` + ``condition_mean``; spec §5), returns x_{t-1}.

    Arguments and results as :func:`cg_fast.kernels.reference.ddpm_step_ref`: ``guide`` is "none",
    "classifier" (``fresh`` = classifier gradient g, or None at a skipped step) or "cfg" (``model_out`` the
    conditional output, ``fresh`` the unconditional one or None; spec §6, optionally on the first
    ``cfg_channels`` channels only). ``h`` (reuse / momentum cache, spec §4) is updated in place; ``out`` may
    alias ``x``.
    """
    check_step_args(guide, fresh, h, cfg_channels, prediction)
    check_noise_args(x, noise, seeds, step_index)
    out = _out_like(x, out)
    torch.ops.cg_fast.ddpm_step(x, model_out, coef, noise, out, guide=guide, fresh=fresh, h=h,
                                prediction=prediction, learned_var=learned_var, clip=clip,
                                cfg_channels=cfg_channels, seeds=seeds, step_index=_step_index(x, step_index))
    return out


def ddim_step_csrc(
    x: Tensor,
    model_out: Tensor,
    coef: Tensor,
    noise: Tensor | None,
    *,
    guide: str = "none",
    fresh: Tensor | None = None,
    h: Tensor | None = None,
    prediction: str = "eps",
    learned_var: bool = False,
    clip: bool = True,
    cfg_channels: int | None = None,
    out: Tensor | None = None,
    seeds: Tensor | None = None,
    step_index: int | Tensor | None = None,
) -> Tensor:
    """One fused DDIM step (ADM ``ddim_sample`` + ``condition_score``; spec §5), returns x_{t-1}.

    Classifier guidance shifts the score: ``eps' = eps - sqrt(1 - alpha_bar) * s * a``. Arguments as
    :func:`ddpm_step_csrc`; the variance channels of a learned-variance model are ignored, as in ADM.
    """
    check_step_args(guide, fresh, h, cfg_channels, prediction)
    check_noise_args(x, noise, seeds, step_index)
    out = _out_like(x, out)
    torch.ops.cg_fast.ddim_step(x, model_out, coef, noise, out, guide=guide, fresh=fresh, h=h,
                                prediction=prediction, learned_var=learned_var, clip=clip,
                                cfg_channels=cfg_channels, seeds=seeds, step_index=_step_index(x, step_index))
    return out


def dpmpp2m_step_csrc(
    x: Tensor,
    model_out: Tensor,
    coef: Tensor,
    noise: Tensor | None = None,
    *,
    prev: Tensor | None = None,
    guide: str = "none",
    fresh: Tensor | None = None,
    h: Tensor | None = None,
    prediction: str = "eps",
    learned_var: bool = False,
    clip: bool = True,
    cfg_channels: int | None = None,
    out: Tensor | None = None,
    seeds: Tensor | None = None,
    step_index: int | Tensor | None = None,
) -> Tensor:
    """One fused DPM-Solver++ 2M step (spec §5 "DPM-Solver++"), returns x at the next level.

    Arguments and results as :func:`cg_fast.kernels.reference.dpmpp2m_step_ref`: guidance as :func:`ddim_step_csrc`;
    ``prev`` (float32 like x) holds the previous step's data prediction and is overwritten with this step's;
    deterministic (``noise``, ``seeds`` and ``step_index`` must be None).
    """
    check_step_args(guide, fresh, h, cfg_channels, prediction)
    check_prev_arg(x, prev)
    check_no_noise_args(noise, seeds, step_index)
    out = _out_like(x, out)
    torch.ops.cg_fast.dpmpp2m_step(x, model_out, coef, prev, out, guide=guide, fresh=fresh, h=h,
                                   prediction=prediction, learned_var=learned_var, clip=clip,
                                   cfg_channels=cfg_channels)
    return out
