"""Fused Triton step kernels (stage 4 of the data flow): one memory pass per sampling step (spec §4-§6).

Motivation
----------
A guided sampler step is ~20 elementwise operations (predicted x0, clip, posterior mean, learned variance,
the cache update ``a = H_DECAY * h + G_WEIGHT * fresh``, the guidance shift, the noise term). Written in
PyTorch (:mod:`cg_fast.kernels.reference`) each op is its own kernel launch and its own pass over memory,
reading one or two full tensors and writing one: ~20 launches and roughly 10x the compulsory traffic. The
step is purely memory bound (a few FLOP per byte), so fusing it into one pass that reads every input once
and writes every output once is the whole optimisation: the fused step should run near ``x.clone()`` of the
same number of bytes (see ``benchmarks/bench_step_triton.py``).

Memory traffic per element (fp32 tensors; a fp16/bf16 model output or fresh guidance costs 2 bytes instead
of 4 per value read; the per-row coefficients are 21 floats per program, negligible):

    mode                                         read                         write      bytes
    DDPM, fixed variance, no guidance            x, eps, z                    x'         16
    DDPM, learned variance                       x, eps, v, z                 x'         20
    DDIM (learned variance channels not read)    x, eps, z                    x'         16
    DPM-Solver++ 2M (deterministic, no z)        x, eps, prev                 x', prev   20
    + classifier, fresh g, no cache (drop/comp.)  + g                                    +4
    + cache state h, skipped step (h <- H_DECAY h)  + h                       + h        +8
    + cache state h and fresh g (guided step)       + g, h                    + h        +12
    + CFG fresh (unconditional eps half only)     + eps_u                                +4
    + CFG with cache state                        as classifier: + h read and written    +8

Counter-based noise (``noise=None``, ``seeds``, ``step_index``; the layout of :mod:`cg_fast.kernels.rng`) reads
no z (-4 bytes): the kernels compute it with :func:`cg_fast.kernels.triton_rng.counter_normal_block` (the raw
``tl.philox`` on the layout's counter, Box-Muller with libdevice's log / cos / sin).

The benchmarked configuration (DDPM, learned variance, classifier guidance, momentum cache, guided step)
moves 32 bytes per element: read x, eps, v, z, g, h (24) and write x', h (8).

Layout (spec §5/§6): x, noise, h, out and classifier g are viewed as ``[B, n]`` with ``n = x[0].numel()``;
the model output and the CFG unconditional output as ``[B, k n]`` (``k = 2`` with learned variance: eps at
``[b, i]``, the variance value at ``[b, n + i]``; channels are the leading dim of a row, so the CFG channel
restriction ``cfg_channels = c`` of C channels guides exactly the elements ``i < c * (n // C)``). The grid is
2-D, ``(row b, block of i)``, so each program loads its row's coefficients ``coef[b, Col.*]`` once, as scalars.

.. warning:: Non-contiguous inputs are made contiguous by the launcher (a copy, outside the fused pass);
   a non-contiguous ``h`` or ``out`` (or an ``out`` that is not float32) is computed into a contiguous float32
   buffer and copied back, so their in-place semantics are kept at the price of an extra pass. ``coef`` may
   be any strided view (``table[j].expand(B, -1)`` costs nothing) with one row or B rows.

.. note:: Float32 throughout, op for op in the reference's order. So that a GPU run stays as close to the
   PyTorch reference as the CPU one, the kernels are compiled without FMA contraction
   (``enable_fp_fusion=False``), divide with ``div_rn`` (IEEE round to nearest; Triton's ``/`` may be
   approximate) and take ``exp`` from libdevice (``tl.exp`` lowers to the faster ``ex2.approx``). None of it
   costs time in a memory-bound kernel. Under the interpreter numpy's ``exp`` may differ from torch's by an
   ulp. The kernels are not differentiable: the result carries no autograd graph.

Host cost: a step's kernel runs for microseconds, so without CUDA graphs the Python around the launch can
dominate. The launcher validates a call signature (shapes, strides, dtypes, devices, modes) once and keeps
its launch plan; a later call of the same signature looks the plan up and launches, with no checks, copies
or allocations (``out`` given, contiguous tensors). ``benchmarks/bench_step_triton.py`` reports the host
cost beside the kernel time.

Under ``TRITON_INTERPRET=1`` (set before triton is imported) the same kernels run on CPU tensors through the
Triton interpreter (slow; for tests only).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .reference import check_no_noise_args, check_noise_args, check_prev_arg, check_step_args
from .table import NUM_COLS, Col
from .triton_rng import _INTERPRETED, counter_normal_block  # _INTERPRETED: TRITON_INTERPRET=1 at import

try:  # triton is optional: without it this module imports and available() says False
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = libdevice = None

__all__ = ["available", "ddpm_step_triton", "ddim_step_triton", "dpmpp2m_step_triton", "BLOCK"]

BLOCK = 1024  # elements per program: 8 per thread at 4 warps, 128-bit loads
_GUIDE_CODE = {"none": 0, "classifier": 1, "cfg": 2}  # constexpr GUIDE of the kernels
_PRED_CODE = {"eps": 0, "x0": 1, "v": 2}  # constexpr PRED of the kernels
_LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)  # accepted model-output / fresh dtypes
_MAX_GRID_Y = 65535  # CUDA limit on the second grid dimension (blocks of one row)


def available() -> bool:
    """Triton is importable and can run here: a CUDA device, or the interpreter (TRITON_INTERPRET=1)."""
    return triton is not None and (torch.cuda.is_available() or _INTERPRETED)


# -------------------------------------------------------------------------------------------------------------
# Compute kernels
# -------------------------------------------------------------------------------------------------------------
if triton is not None:
    # coefficient columns (cg_fast.kernels.table.Col) as compile-time constants
    _SQRT_RECIP_AC = tl.constexpr(int(Col.SQRT_RECIP_AC))
    _SQRT_RECIPM1_AC = tl.constexpr(int(Col.SQRT_RECIPM1_AC))
    _SQRT_AC = tl.constexpr(int(Col.SQRT_AC))
    _SQRT_1M_AC = tl.constexpr(int(Col.SQRT_1M_AC))
    _POST_C1 = tl.constexpr(int(Col.POST_C1))
    _POST_C2 = tl.constexpr(int(Col.POST_C2))
    _VAR = tl.constexpr(int(Col.VAR))
    _LOG_VAR = tl.constexpr(int(Col.LOG_VAR))
    _MIN_LOG = tl.constexpr(int(Col.MIN_LOG))
    _MAX_LOG = tl.constexpr(int(Col.MAX_LOG))
    _NONZERO = tl.constexpr(int(Col.NONZERO))
    _DDIM_SQRT_1M_AC = tl.constexpr(int(Col.DDIM_SQRT_1M_AC))
    _DDIM_SQRT_ACP = tl.constexpr(int(Col.DDIM_SQRT_ACP))
    _DDIM_DIR = tl.constexpr(int(Col.DDIM_DIR))
    _DDIM_SIGMA = tl.constexpr(int(Col.DDIM_SIGMA))
    _GUIDE_S = tl.constexpr(int(Col.GUIDE_S))
    _H_DECAY = tl.constexpr(int(Col.H_DECAY))
    _G_WEIGHT = tl.constexpr(int(Col.G_WEIGHT))
    _DPM_CX = tl.constexpr(int(Col.DPM_CX))
    _DPM_C0 = tl.constexpr(int(Col.DPM_C0))
    _DPM_C1 = tl.constexpr(int(Col.DPM_C1))
    # libdevice's expf (torch's exp on CUDA) where compiled; the interpreter has no libdevice, numpy's exp there
    _ACCURATE_EXP = tl.constexpr(not _INTERPRETED)

    @triton.jit
    def _exp(v):
        """``exp`` as accurate as ``torch.exp`` (tl.exp lowers to the faster, less accurate ex2.approx)."""
        if _ACCURATE_EXP:
            e = libdevice.exp(v)
        else:
            e = tl.exp(v)
        return e

    @triton.jit
    def _col(c_ptr, k: tl.constexpr, c_col):
        """Scalar coefficient ``coef[b, k]`` of this program's row (``c_ptr`` points at the row)."""
        return tl.load(c_ptr + k * c_col)

    @triton.jit
    def _applied_guidance(fresh, h_ptrs, mask, h_decay, g_weight, HAS_FRESH: tl.constexpr, HAS_H: tl.constexpr):
        """Spec §4: ``a = H_DECAY * h + G_WEIGHT * fresh`` (absent terms left out); ``h <- a`` in place."""
        if HAS_H:
            a = tl.load(h_ptrs, mask=mask, other=0.0) * h_decay
            if HAS_FRESH:
                a = a + fresh * g_weight
            tl.store(h_ptrs, a, mask=mask)
        else:
            a = fresh * g_weight
        return a

    @triton.jit
    def _cfg_combine(eps_c, u_ptrs, h_ptrs, i, mask, guided_limit, s, h_decay, g_weight,
                     HAS_FRESH: tl.constexpr, HAS_H: tl.constexpr):
        """Spec §6: ``eps = eps_c + (w - 1) a`` with ``a`` from ``d = eps_c - eps_u``, for ``i < guided_limit``.

        ``h`` is updated on every element, inside the guided channels or not (as the reference does).
        """
        d = eps_c
        if HAS_FRESH:
            d = eps_c - tl.load(u_ptrs, mask=mask, other=0.0).to(tl.float32)
        a = _applied_guidance(d, h_ptrs, mask, h_decay, g_weight, HAS_FRESH, HAS_H)
        return tl.where(i < guided_limit, eps_c + s * a, eps_c)

    @triton.jit
    def _pred_x0(x, o, sqrt_recip_ac, sqrt_recipm1_ac, sqrt_ac, sqrt_1m_ac, PRED: tl.constexpr, CLIP: tl.constexpr):
        """ADM ``p_mean_variance``: x0 from eps (PRED 0), x0 itself (1) or v (2); optionally clipped (spec §5)."""
        if PRED == 0:
            x0 = sqrt_recip_ac * x - sqrt_recipm1_ac * o
        elif PRED == 2:
            x0 = sqrt_ac * x - sqrt_1m_ac * o
        else:
            x0 = o
        if CLIP:
            x0 = tl.clamp(x0, -1.0, 1.0, propagate_nan=tl.PropagateNan.ALL)  # NaN kept, as torch.clamp
        return x0

    @triton.jit
    def _eps_from_x0(x, x0, sqrt_recip_ac, sqrt_recipm1_ac):
        """``eps = (SQRT_RECIP_AC x - x0) / SQRT_RECIPM1_AC`` with an IEEE division (ADM ``_predict_eps``)."""
        num = sqrt_recip_ac * x - x0
        return tl.math.div_rn(num, tl.broadcast_to(sqrt_recipm1_ac, num.shape))

    @triton.jit
    def _guided_x0_score_form(x, o_ptrs, f_ptrs, h_ptrs, i, mask, guided_limit, c_ptr, c_col,
                              sqrt_recip_ac, sqrt_recipm1_ac, sqrt_ac, sqrt_1m_ac, s, h_decay, g_weight,
                              PRED: tl.constexpr, CLIP: tl.constexpr, GUIDE: tl.constexpr,
                              HAS_FRESH: tl.constexpr, HAS_H: tl.constexpr):
        """The guided x0 of DDIM and DPM-Solver++ (reference ``_guided_x0_score_form``, spec §5-§6): CFG combines
        eps first; classifier guidance shifts the score, eps' = eps - sqrt(1 - alpha_bar) * (a * s), x0 from eps'."""
        eps = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GUIDE == 2:
            if HAS_FRESH or HAS_H:
                eps = _cfg_combine(eps, f_ptrs, h_ptrs, i, mask, guided_limit, s, h_decay, g_weight,
                                   HAS_FRESH, HAS_H)
        x0 = _pred_x0(x, eps, sqrt_recip_ac, sqrt_recipm1_ac, sqrt_ac, sqrt_1m_ac, PRED, CLIP)
        if GUIDE == 1:
            if HAS_FRESH or HAS_H:
                g = 0.0
                if HAS_FRESH:
                    g = tl.load(f_ptrs, mask=mask, other=0.0).to(tl.float32)
                a = _applied_guidance(g, h_ptrs, mask, h_decay, g_weight, HAS_FRESH, HAS_H)
                e = _eps_from_x0(x, x0, sqrt_recip_ac, sqrt_recipm1_ac)
                e = e - _col(c_ptr, _DDIM_SQRT_1M_AC, c_col) * (a * s)
                x0 = sqrt_recip_ac * x - sqrt_recipm1_ac * e
        return x0

    @triton.jit
    def _ddpm_step_kernel(
        x_ptr, o_ptr, c_ptr, z_ptr, f_ptr, h_ptr, out_ptr,  # f: classifier g or CFG eps_u; h: cache state
        n, o_row, f_row, c_row, c_col, guided_limit,      # row strides in elements; CFG: i < guided_limit
        seed_ptr, step_ptr, step_stride,                   # COUNTER: per-row seeds, step index (rng.py)
        PRED: tl.constexpr, LEARNED: tl.constexpr, CLIP: tl.constexpr, GUIDE: tl.constexpr,
        HAS_FRESH: tl.constexpr, HAS_H: tl.constexpr, BLOCK: tl.constexpr, COUNTER: tl.constexpr = False,
    ):
        """One DDPM ancestral step (ADM ``p_sample`` + ``condition_mean``, spec §5) on one block of one row."""
        b = tl.program_id(0).to(tl.int64)  # batch row
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # element within the row
        mask = i < n
        # this row's coefficients, loaded once as scalars (the compiler drops those a variant does not use)
        c_ptr += b * c_row
        sqrt_recip_ac, sqrt_recipm1_ac = _col(c_ptr, _SQRT_RECIP_AC, c_col), _col(c_ptr, _SQRT_RECIPM1_AC, c_col)
        sqrt_ac, sqrt_1m_ac = _col(c_ptr, _SQRT_AC, c_col), _col(c_ptr, _SQRT_1M_AC, c_col)
        post_c1, post_c2 = _col(c_ptr, _POST_C1, c_col), _col(c_ptr, _POST_C2, c_col)
        s, h_decay, g_weight = _col(c_ptr, _GUIDE_S, c_col), _col(c_ptr, _H_DECAY, c_col), _col(c_ptr, _G_WEIGHT, c_col)
        nonzero = _col(c_ptr, _NONZERO, c_col)

        x = tl.load(x_ptr + b * n + i, mask=mask, other=0.0)
        eps = tl.load(o_ptr + b * o_row + i, mask=mask, other=0.0).to(tl.float32)
        if GUIDE == 2:  # CFG combine before anything uses the model output (spec §6)
            if HAS_FRESH or HAS_H:  # else a is absent: eps = eps_c
                eps = _cfg_combine(eps, f_ptr + b * f_row + i, h_ptr + b * n + i, i, mask, guided_limit,
                                   s, h_decay, g_weight, HAS_FRESH, HAS_H)
        # 1. predicted x0 (optionally clipped), 2. posterior mean
        x0 = _pred_x0(x, eps, sqrt_recip_ac, sqrt_recipm1_ac, sqrt_ac, sqrt_1m_ac, PRED, CLIP)
        mean = post_c1 * x0 + post_c2 * x
        # 3. variance: learned-range interpolation in log space (spec §5), or the fixed column
        if LEARNED:
            v = tl.load(o_ptr + b * o_row + n + i, mask=mask, other=0.0).to(tl.float32)
            frac = (v + 1.0) * 0.5  # == (v + 1) / 2 exactly
            log_var = frac * _col(c_ptr, _MAX_LOG, c_col) + (1.0 - frac) * _col(c_ptr, _MIN_LOG, c_col)
            var = _exp(log_var)
        else:
            log_var = _col(c_ptr, _LOG_VAR, c_col)
            var = _col(c_ptr, _VAR, c_col)
        # 4. classifier guidance shifts the mean: mean + Var * (a * s)   (spec §5, ADM condition_mean)
        if GUIDE == 1:
            if HAS_FRESH or HAS_H:
                g = 0.0
                if HAS_FRESH:
                    g = tl.load(f_ptr + b * f_row + i, mask=mask, other=0.0).to(tl.float32)
                a = _applied_guidance(g, h_ptr + b * n + i, mask, h_decay, g_weight, HAS_FRESH, HAS_H)
                mean = mean + var * (a * s)
        # 5. x_{t-1} = mean + sqrt(Var) z, no noise on the last step; z read, or counter-based (rng.py)
        if COUNTER:
            z = counter_normal_block(seed_ptr, step_ptr, b, step_stride, tl.program_id(1), BLOCK)
        else:
            z = tl.load(z_ptr + b * n + i, mask=mask, other=0.0)
        x_next = mean + (nonzero * _exp(0.5 * log_var)) * z
        tl.store(out_ptr + b * n + i, x_next, mask=mask)

    @triton.jit
    def _ddim_step_kernel(
        x_ptr, o_ptr, c_ptr, z_ptr, f_ptr, h_ptr, out_ptr,
        n, o_row, f_row, c_row, c_col, guided_limit,
        seed_ptr, step_ptr, step_stride,
        PRED: tl.constexpr, CLIP: tl.constexpr, GUIDE: tl.constexpr,
        HAS_FRESH: tl.constexpr, HAS_H: tl.constexpr, BLOCK: tl.constexpr, COUNTER: tl.constexpr = False,
    ):
        """One DDIM step (ADM ``ddim_sample`` + ``condition_score``, spec §5) on one block of one row.

        Variance channels of a learned-variance output are never read (``o_row`` skips them).
        """
        b = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        c_ptr += b * c_row
        sqrt_recip_ac, sqrt_recipm1_ac = _col(c_ptr, _SQRT_RECIP_AC, c_col), _col(c_ptr, _SQRT_RECIPM1_AC, c_col)
        sqrt_ac, sqrt_1m_ac = _col(c_ptr, _SQRT_AC, c_col), _col(c_ptr, _SQRT_1M_AC, c_col)
        s, h_decay, g_weight = _col(c_ptr, _GUIDE_S, c_col), _col(c_ptr, _H_DECAY, c_col), _col(c_ptr, _G_WEIGHT, c_col)
        sqrt_acp, ddim_dir = _col(c_ptr, _DDIM_SQRT_ACP, c_col), _col(c_ptr, _DDIM_DIR, c_col)
        noise_scale = _col(c_ptr, _NONZERO, c_col) * _col(c_ptr, _DDIM_SIGMA, c_col)  # NONZERO * sigma, in order

        x = tl.load(x_ptr + b * n + i, mask=mask, other=0.0)
        x0 = _guided_x0_score_form(x, o_ptr + b * o_row + i, f_ptr + b * f_row + i, h_ptr + b * n + i, i, mask,
                                   guided_limit, c_ptr, c_col, sqrt_recip_ac, sqrt_recipm1_ac, sqrt_ac, sqrt_1m_ac,
                                   s, h_decay, g_weight, PRED, CLIP, GUIDE, HAS_FRESH, HAS_H)
        # x_prev = x0 sqrt(acp) + sqrt(1 - acp - sigma^2) eps + sigma z   (DDIM eq. 12)
        eps = _eps_from_x0(x, x0, sqrt_recip_ac, sqrt_recipm1_ac)
        mean = x0 * sqrt_acp + ddim_dir * eps
        if COUNTER:
            z = counter_normal_block(seed_ptr, step_ptr, b, step_stride, tl.program_id(1), BLOCK)
        else:
            z = tl.load(z_ptr + b * n + i, mask=mask, other=0.0)
        tl.store(out_ptr + b * n + i, mean + noise_scale * z, mask=mask)

    @triton.jit
    def _dpmpp2m_step_kernel(
        x_ptr, o_ptr, c_ptr, p_ptr, f_ptr, h_ptr, out_ptr,  # p: prev, the previous step's x0 (read, then x0)
        n, o_row, f_row, c_row, c_col, guided_limit,
        PRED: tl.constexpr, CLIP: tl.constexpr, GUIDE: tl.constexpr,
        HAS_FRESH: tl.constexpr, HAS_H: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One DPM-Solver++ 2M step (spec §5 "DPM-Solver++", guidance as DDIM) on one block of one row.

        Deterministic (no z); variance channels of a learned-variance output are never read.
        """
        b = tl.program_id(0).to(tl.int64)
        i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        c_ptr += b * c_row
        sqrt_recip_ac, sqrt_recipm1_ac = _col(c_ptr, _SQRT_RECIP_AC, c_col), _col(c_ptr, _SQRT_RECIPM1_AC, c_col)
        sqrt_ac, sqrt_1m_ac = _col(c_ptr, _SQRT_AC, c_col), _col(c_ptr, _SQRT_1M_AC, c_col)
        s, h_decay, g_weight = _col(c_ptr, _GUIDE_S, c_col), _col(c_ptr, _H_DECAY, c_col), _col(c_ptr, _G_WEIGHT, c_col)
        cx, c0, c1 = _col(c_ptr, _DPM_CX, c_col), _col(c_ptr, _DPM_C0, c_col), _col(c_ptr, _DPM_C1, c_col)

        x = tl.load(x_ptr + b * n + i, mask=mask, other=0.0)
        x0 = _guided_x0_score_form(x, o_ptr + b * o_row + i, f_ptr + b * f_row + i, h_ptr + b * n + i, i, mask,
                                   guided_limit, c_ptr, c_col, sqrt_recip_ac, sqrt_recipm1_ac, sqrt_ac, sqrt_1m_ac,
                                   s, h_decay, g_weight, PRED, CLIP, GUIDE, HAS_FRESH, HAS_H)
        # x' = CX x + C0 x0 + C1 (x0 - x0_prev) (multistep, data prediction), then prev <- the guided x0
        x0_prev = tl.load(p_ptr + b * n + i, mask=mask, other=0.0)
        x_next = cx * x + c0 * x0 + c1 * (x0 - x0_prev)
        tl.store(p_ptr + b * n + i, x0, mask=mask)
        tl.store(out_ptr + b * n + i, x_next, mask=mask)


# -------------------------------------------------------------------------------------------------------------
# Launchers
# -------------------------------------------------------------------------------------------------------------
def _check_tensor(name: str, t: Tensor, x: Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """``t`` is a tensor on x's device with one of ``dtypes``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}: put all step inputs on one device")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton step kernel takes {', '.join(map(str, dtypes))}")


def _check_shapes(x: Tensor, model_out: Tensor, coef: Tensor, noise: Tensor | None, guide: str, fresh: Tensor | None,
                  h: Tensor | None, learned_var: bool, cfg_channels: int | None, out: Tensor | None) -> None:
    """Shapes and dtypes the fused kernel relies on, with what to fix (ValueError / TypeError)."""
    if not isinstance(x, Tensor) or x.dim() < 2:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must have shape [B, C, ...] (batch first, channels second), got {shape}")
    _check_tensor("x", x, x, (torch.float32,))
    batch, chans, spatial = x.shape[0], x.shape[1], tuple(x.shape[2:])
    k = 2 if learned_var else 1
    _check_tensor("model_out", model_out, x, _LOW_PRECISION)
    want = (batch, k * chans, *spatial)
    if tuple(model_out.shape) != want:
        raise ValueError(f"model_out has shape {tuple(model_out.shape)}; expected {list(want)} (x's shape"
                         f"{', with 2C channels (eps, variance) since learned_var=True' if learned_var else ''})")
    if noise is not None:  # else counter-based noise (checked by check_noise_args)
        _check_tensor("noise", noise, x, (torch.float32,))
        if noise.shape != x.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)}; expected x's shape {tuple(x.shape)}")
    _check_tensor("coef", coef, x, (torch.float32,))
    if coef.dim() != 2 or coef.shape[0] not in (1, batch) or coef.shape[1] != NUM_COLS:
        raise ValueError(f"coef has shape {tuple(coef.shape)}; expected [{batch}, {NUM_COLS}] (one table row per "
                         f"batch row) or [1, {NUM_COLS}]")
    if fresh is not None:
        _check_tensor("fresh", fresh, x, _LOW_PRECISION)
        if guide == "classifier" and fresh.shape != x.shape:
            raise ValueError(f"fresh (the classifier gradient) has shape {tuple(fresh.shape)}; expected x's shape "
                             f"{tuple(x.shape)}")
        if guide == "cfg" and (fresh.dim() != x.dim() or fresh.shape[0] != batch or fresh.shape[1] < chans
                               or tuple(fresh.shape[2:]) != spatial):
            raise ValueError(f"fresh (the unconditional output) has shape {tuple(fresh.shape)}; expected "
                             f"[{batch}, C' >= {chans}, *{spatial}], laid out like model_out")
    if h is not None:
        _check_tensor("h", h, x, (torch.float32,))
        if h.shape != x.shape:
            raise ValueError(f"h (the cache state) has shape {tuple(h.shape)}; expected x's shape {tuple(x.shape)}")
    if cfg_channels is not None and (isinstance(cfg_channels, bool) or not isinstance(cfg_channels, int)
                                     or cfg_channels < 0):
        raise ValueError(f"cfg_channels must be a non-negative integer or None (all channels), got {cfg_channels!r}")
    if out is not None:
        if not isinstance(out, Tensor) or out.device != x.device:
            raise ValueError("out must be a Tensor on x's device")
        if out.shape != x.shape:
            raise ValueError(f"out has shape {tuple(out.shape)}; expected x's shape {tuple(x.shape)}")


def _check_runnable(x: Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter."""
    if triton is None:
        raise RuntimeError("triton is not installed: pip install triton (on the CPU it runs only under "
                           "TRITON_INTERPRET=1)")
    if x.device.type != "cuda" and not _INTERPRETED:
        raise ValueError(f"the Triton step kernels run on CUDA tensors (x is on {x.device}); on the CPU set "
                         "TRITON_INTERPRET=1 before importing cg_fast's kernels, or use the csrc / reference kernels")


def _guided_limit(n: int, chans: int, guide: str, cfg_channels: int | None) -> int:
    """CFG channel restriction (spec §6): elements ``i < c * (n // C)`` of a row are guided."""
    if guide != "cfg" or cfg_channels is None or cfg_channels >= chans:
        return n
    return cfg_channels * (n // chans)


@dataclass(frozen=True)
class _Plan:
    """Everything a launch needs that depends only on the call's signature (shapes, strides, dtypes, devices,
    modes): the grid-bound kernel, its scalar arguments and constexprs, and how ``h`` / ``out`` are written."""

    launch: Any                       # kernel[grid], or None for an empty batch / row
    scalars: tuple[int, ...]          # n, o_row, f_row, c_row, c_col, guided_limit
    constexprs: dict[str, Any]
    fast: bool                        # every tensor contiguous, out float32: no copies around the launch
    device_index: int | None          # CUDA device of x (the launch must run there), None on the CPU
    step_stride: int                  # COUNTER: 1 when step_index holds one value per row, else 0


_PLANS: dict[tuple, _Plan] = {}
_MAX_PLANS = 256  # signatures kept (a sampler uses a handful); the cache is cleared when it fills up


def _meta(t: Any) -> tuple | None:
    """What a plan depends on about one argument (the stride tuple also says whether it is contiguous); for a
    non-tensor (an int step index) only its type."""
    if t is None:
        return None
    if not isinstance(t, Tensor):
        return (type(t),)
    return (t.shape, t.stride(), t.dtype, t.device)


def _plan(family: str, x: Tensor, model_out: Tensor, coef: Tensor, noise: Tensor | None, guide: str,
          fresh: Tensor | None, h: Tensor | None, prediction: str, learned_var: bool, clip: bool,
          cfg_channels: int | None, out: Tensor | None, seeds: Tensor | None,
          step_index: int | Tensor | None, prev: Tensor | None = None) -> _Plan:
    """Validate a new signature and work out its launch (the slow path, once per signature)."""
    check_step_args(guide, fresh, h, cfg_channels if isinstance(cfg_channels, int) else None, prediction)
    dpm = family == "dpmpp2m"  # deterministic: prev instead of noise
    _check_shapes(x, model_out, coef, None if dpm else noise, guide, fresh, h, learned_var, cfg_channels, out)
    if dpm:
        check_prev_arg(x, prev)
        check_no_noise_args(noise, seeds, step_index)
    else:
        check_noise_args(x, noise, seeds, step_index)
    _check_runnable(x)
    batch, n = x.shape[0], math.prod(x.shape[1:])
    counter = noise is None and not dpm  # counter-based noise, computed in the kernel (rng.py layout)
    if counter and n > 1 << 34:
        raise ValueError(f"counter-based noise covers at most 2^34 elements per row, got {n}")
    launch = None
    if batch > 0 and n > 0:
        blocks = triton.cdiv(n, BLOCK)
        if blocks > _MAX_GRID_Y and x.device.type == "cuda":
            raise ValueError(f"a row of x has {n} elements, more than {_MAX_GRID_Y * BLOCK} that one launch covers")
        kernel = {"ddpm": _ddpm_step_kernel, "ddim": _ddim_step_kernel, "dpmpp2m": _dpmpp2m_step_kernel}[family]
        launch = kernel[(batch, blocks)]
    constexprs = dict(PRED=_PRED_CODE[prediction], CLIP=bool(clip), GUIDE=_GUIDE_CODE[guide],
                      HAS_FRESH=fresh is not None, HAS_H=h is not None, BLOCK=BLOCK, COUNTER=counter,
                      enable_fp_fusion=False)  # no FMA contraction: the reference's ops round one at a time
    if family == "ddpm":
        constexprs["LEARNED"] = bool(learned_var)
    if dpm:
        del constexprs["COUNTER"]
    scalars = (n, math.prod(model_out.shape[1:]), math.prod(fresh.shape[1:]) if fresh is not None else n,
               coef.stride(0) if coef.shape[0] > 1 else 0, coef.stride(1),
               _guided_limit(n, x.shape[1], guide, cfg_channels))
    fast = all(t is None or t.is_contiguous() for t in (x, model_out, noise, fresh, h, seeds, prev)) and \
        (out is None or (out.dtype == torch.float32 and out.is_contiguous()))
    step_stride = 1 if counter and isinstance(step_index, Tensor) and step_index.numel() > 1 else 0
    return _Plan(launch, scalars, constexprs, fast, x.device.index if x.device.type == "cuda" else None,
                 step_stride)


def _launch(family: str, x: Tensor, model_out: Tensor, coef: Tensor, noise: Tensor | None, *, guide: str,
            fresh: Tensor | None, h: Tensor | None, prediction: str, learned_var: bool, clip: bool,
            cfg_channels: int | None, out: Tensor | None, seeds: Tensor | None = None,
            step_index: int | Tensor | None = None, prev: Tensor | None = None) -> Tensor:
    """Validate (once per signature), lay out as [B, n] / [B, k n], allocate, launch on a (B, blocks) grid.

    The host cost matters at small sizes without CUDA graphs (the kernel itself runs for microseconds), so a
    signature seen before skips the checks and the argument arithmetic: its :class:`_Plan` is looked up by
    the shapes, strides, dtypes and devices of the tensors and the mode arguments, which is all the checks read.
    """
    key = (family, guide, prediction, bool(learned_var), bool(clip), cfg_channels, type(cfg_channels),
           _meta(x), _meta(model_out), _meta(coef), _meta(noise), _meta(fresh), _meta(h), _meta(out),
           _meta(seeds), _meta(step_index), _meta(prev))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(family, x, model_out, coef, noise, guide, fresh, h, prediction, learned_var, clip,
                     cfg_channels, out, seeds, step_index, prev)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    dpm = family == "dpmpp2m"
    counter = noise is None and not dpm
    if plan.fast:  # the hot path: no copies, no allocation when out is given
        xc, oc, zc, fc, hc, sc, pc = x, model_out, noise, fresh, h, seeds, prev
        dst = out if out is not None else torch.empty_like(x)
    else:
        xc, oc = x.contiguous(), model_out.contiguous()
        zc = None if counter or dpm else noise.contiguous()
        sc = seeds.contiguous() if counter else None
        fc = fresh.contiguous() if fresh is not None else None
        hc = h if h is None or h.is_contiguous() else h.contiguous()  # written back below when copied
        pc = prev if prev is None or prev.is_contiguous() else prev.contiguous()  # likewise
        direct = out is not None and out.dtype == torch.float32 and out.is_contiguous()
        dst = out if direct else torch.empty_like(xc, memory_format=torch.contiguous_format)
    if plan.launch is not None:
        if counter:
            jc = step_index if isinstance(step_index, Tensor) and step_index.dtype == torch.int64 \
                and step_index.is_contiguous() else torch.as_tensor(step_index, dtype=torch.int64, device=x.device)
            jc = jc.reshape(-1)
        if dpm:
            args = (xc, oc, coef, pc, fc if fc is not None else xc, hc if hc is not None else xc, dst,
                    *plan.scalars)
        else:
            args = (xc, oc, coef, xc if counter else zc, fc if fc is not None else xc,
                    hc if hc is not None else xc, dst, *plan.scalars, sc if counter else xc,
                    jc if counter else xc, plan.step_stride)
        if plan.device_index is None or plan.device_index == torch.cuda.current_device():
            plan.launch(*args, **plan.constexprs)
        else:  # Triton launches on the current device's stream: make it x's device (e.g. x on cuda:1)
            with torch.cuda.device(plan.device_index):
                plan.launch(*args, **plan.constexprs)
    if not plan.fast:
        if hc is not None and hc is not h:
            h.copy_(hc)
        if pc is not None and pc is not prev:
            prev.copy_(pc)
        if out is not None and dst is not out:
            return out.copy_(dst)
    return dst


def ddpm_step_triton(
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
    """One fused DDPM ancestral step (spec §5), returns x_{t-1}; semantics of
    :func:`cg_fast.kernels.reference.ddpm_step_ref`.

    Args:
        x:            x_t, float32 [B, C, ...].
        model_out:    eps / x0 / v (``prediction``), [B, C, ...] or [B, 2C, ...] with ``learned_var``;
                      float16, bfloat16 or float32 (upcast in the kernel).
        coef:         float32 [B, NUM_COLS] (or [1, NUM_COLS]) table rows, any strides.
        noise:        z, float32 like x; or None for counter-based noise computed in the kernel from
                      ``seeds`` (int64 [B], one sample seed per row) and ``step_index`` (an int, or an int64
                      tensor of 1 or B values on x's device, read by the kernel: CUDA graphs need no
                      re-capture per step); layout and tolerance in :mod:`cg_fast.kernels.rng`.
        guide:        "none" | "classifier" (``fresh`` = g like x) | "cfg" (``fresh`` = unconditional output
                      laid out like model_out, only its first C channels are read).
        fresh:        fresh guidance of this step, or None at a skipped step.
        h:            cache state (float32 like x), updated in place to ``a`` (spec §4), or None.
        cfg_channels: CFG on the first ``cfg_channels`` channels only (DiT: 3 of 4); None = all.
        out:          where to write x_{t-1} (may alias x); allocated when None.
    """
    return _launch("ddpm", x, model_out, coef, noise, guide=guide, fresh=fresh, h=h, prediction=prediction,
                   learned_var=learned_var, clip=clip, cfg_channels=cfg_channels, out=out, seeds=seeds,
                   step_index=step_index)


def ddim_step_triton(
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
    """One fused DDIM step (spec §5, ``eps' = eps - sqrt(1 - alpha_bar) s a``), returns x_{t-1}; semantics of
    :func:`cg_fast.kernels.reference.ddim_step_ref`. Arguments as :func:`ddpm_step_triton`; the variance
    channels of a learned-variance output are not read.
    """
    return _launch("ddim", x, model_out, coef, noise, guide=guide, fresh=fresh, h=h, prediction=prediction,
                   learned_var=learned_var, clip=clip, cfg_channels=cfg_channels, out=out, seeds=seeds,
                   step_index=step_index)


def dpmpp2m_step_triton(
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
    """One fused DPM-Solver++ 2M step (spec §5 "DPM-Solver++", guidance as DDIM), returns x at the next level;
    semantics of :func:`cg_fast.kernels.reference.dpmpp2m_step_ref`. One pass reads x, the model output, [fresh],
    [h] and ``prev`` (float32 like x, the previous step's data prediction) and writes x', [h] and ``prev`` <- this
    step's (guided) x0. Deterministic: ``noise``, ``seeds`` and ``step_index`` must be None. Other arguments as
    :func:`ddpm_step_triton`; the variance channels of a learned-variance output are not read.
    """
    return _launch("dpmpp2m", x, model_out, coef, noise, guide=guide, fresh=fresh, h=h, prediction=prediction,
                   learned_var=learned_var, clip=clip, cfg_channels=cfg_channels, out=out, seeds=seeds,
                   step_index=step_index, prev=prev)
