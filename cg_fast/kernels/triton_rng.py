"""Counter-based noise in Triton: the block functions the fused step kernels (triton_step.py) call.

Stage 4 of the data flow, beside ``triton_step.py``. This module owns the Triton form of the counter layout of
:mod:`cg_fast.kernels.rng` (items 1-5): Philox4x32-10 through Triton's raw ``tl.philox`` with our counter
``(e >> 2, j, 0, 0)`` (``tl.randn`` / ``tl.randint4x`` fix three counter words, so they cannot express it),
one call per 4 elements, and Box-Muller per 2 elements. It reads the seed and the step index from device memory
(so a CUDA graph replays any step) and touches nothing else.

Precision: the words and uniforms are integer / exact; ``sqrt`` is ``sqrt_rn`` (IEEE); log / cos / sin are
libdevice's ``logf`` / ``cosf`` / ``sinf`` where compiled (``tl.log`` etc. may lower to approximate
instructions) and numpy's under the interpreter, within ``rng.NORMAL_TOL_ULP`` of the reference.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:  # triton is optional (see triton_step.py)
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - depends on the environment
    triton = tl = libdevice = None

__all__ = ["counter_normal_block", "counter_words_block", "counter_words_triton", "BLOCK"]

BLOCK = 1024  # elements per program of counter_words_triton (a multiple of 4, as any caller's block)


def _jit_interprets() -> bool:
    """Whether ``@triton.jit`` builds interpreted kernels: TRITON_INTERPRET=1 when this module was imported
    (triton_step uses the same answer). Triton decides at decoration time, so a later change of the variable
    does not affect these kernels."""
    if triton is None:
        return False

    @triton.jit
    def _probe():
        pass

    return type(_probe).__name__ == "InterpretedFunction"


_INTERPRETED = _jit_interprets()

if triton is not None:
    _LIBDEVICE = tl.constexpr(not _INTERPRETED)  # the interpreter has no libdevice

    @triton.jit
    def _noise_fn(v, FN: tl.constexpr):
        """log (FN 0), cos (1) or sin (2): libdevice where compiled, numpy's under the interpreter."""
        if _LIBDEVICE:
            if FN == 0:
                r = libdevice.log(v)
            elif FN == 1:
                r = libdevice.cos(v)
            else:
                r = libdevice.sin(v)
        else:
            if FN == 0:
                r = tl.log(v)
            elif FN == 1:
                r = tl.cos(v)
            else:
                r = tl.sin(v)
        return r

    @triton.jit
    def _uniform(w):
        """rng.py item 4: ``(2 (w >> 9) + 1) 2^-24`` in float32, exact (w uint32)."""
        return ((w >> 9) * 2 + 1).to(tl.float32) * 5.9604644775390625e-08

    @triton.jit
    def counter_words_block(seed_ptr, step_ptr, b, step_stride, blk, BLOCK: tl.constexpr):
        """The Philox words of elements ``[blk * BLOCK, (blk + 1) * BLOCK)`` of row ``b`` (rng.py items 1-3):
        four uint32 blocks of ``BLOCK // 4`` (BLOCK a multiple of 4), one Philox call per 4 elements."""
        seed = tl.load(seed_ptr + b)  # the row's sample seed (uint64 bits in an int64): key (lo, hi)
        step = tl.load(step_ptr + b * step_stride).to(tl.uint32)  # j, from device memory (CUDA graphs)
        q = (blk * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)  # counter word c0 = e >> 2
        zero = q * 0
        return tl.philox(seed, q, zero + step, zero, zero)  # counter (e >> 2, j, 0, DOMAIN_NOISE = 0)

    @triton.jit
    def counter_normal_block(seed_ptr, step_ptr, b, step_stride, blk, BLOCK: tl.constexpr):
        """z of elements ``[blk * BLOCK, (blk + 1) * BLOCK)`` of row ``b`` (rng.py items 2-5): float32 [BLOCK]."""
        w0, w1, w2, w3 = counter_words_block(seed_ptr, step_ptr, b, step_stride, blk, BLOCK)
        u1 = _uniform(tl.interleave(w0, w2))  # pair 2k: words (w0, w1); pair 2k + 1: (w2, w3)
        theta = _uniform(tl.interleave(w1, w3)) * 6.2831854820251465  # float32(2 pi)
        r = tl.sqrt_rn(_noise_fn(u1, 0) * -2.0)
        return tl.interleave(r * _noise_fn(theta, 1), r * _noise_fn(theta, 2))  # even e: r cos, odd e: r sin

    @triton.jit
    def _counter_words_kernel(seed_ptr, step_ptr, step_stride, w_ptr, quads, BLOCK: tl.constexpr):
        """The uint32 stream ``W`` (rng.py item 4) of each row, as the step kernels compute it."""
        b = tl.program_id(0).to(tl.int64)
        w0, w1, w2, w3 = counter_words_block(seed_ptr, step_ptr, b, step_stride, tl.program_id(1), BLOCK)
        k = tl.program_id(1) * (BLOCK // 4) + tl.arange(0, BLOCK // 4)
        m = k < quads
        row = w_ptr + b * 4 * quads + 4 * k
        tl.store(row, w0.to(tl.int64), mask=m)
        tl.store(row + 1, w1.to(tl.int64), mask=m)
        tl.store(row + 2, w2.to(tl.int64), mask=m)
        tl.store(row + 3, w3.to(tl.int64), mask=m)


def counter_words_triton(seeds: Tensor, step_index: int | Tensor, n: int) -> Tensor:
    """The stream words ``W[0, 4 ceil(n/4))`` per row as the step kernels compute them: int64 ``[B, 4 ceil(n/4)]``,
    equal to :func:`cg_fast.kernels.rng.noise_words` (the tests of the uint32 stream use it)."""
    if triton is None or not (seeds.device.type == "cuda" or _INTERPRETED):
        raise RuntimeError("counter_words_triton needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    quads = (n + 3) // 4
    jc = torch.as_tensor(step_index, dtype=torch.int64, device=seeds.device).reshape(-1)
    w = torch.empty((seeds.shape[0], 4 * quads), dtype=torch.int64, device=seeds.device)
    if w.numel():
        _counter_words_kernel[(seeds.shape[0], triton.cdiv(n, BLOCK))](
            seeds.contiguous(), jc, 1 if jc.numel() > 1 else 0, w, quads, BLOCK=BLOCK)
    return w
