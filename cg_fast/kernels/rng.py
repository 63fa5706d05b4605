"""Counter-based noise: the step noise of a sample as a pure function of (sample seed, step, element).

Stage 4 of the data flow, beside :mod:`cg_fast.kernels.reference`. This module owns the counter layout below
and its pure-PyTorch reference; the fused step kernels (Triton ``triton_step.py``, csrc ``csrc/philox.h``)
compute the same uint32 words inside the step. It imports torch only and touches no sampler state.

Counter layout (what every implementation computes; enough to reimplement it)
-------------------------------------------------------------------------------
1. **Generator.** Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11; the
   Random123 and cuRAND generator): a 128-bit counter ``(c0, c1, c2, c3)`` and a 64-bit key ``(k0, k1)``
   give four uint32 words ``(w0, w1, w2, w3)``. Ten rounds of
   ``hi0:lo0 = 0xD2511F53 * c0``, ``hi1:lo1 = 0xCD9E8D57 * c2`` (64-bit products),
   ``(c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)``, the key bumped by
   ``(0x9E3779B9, 0xBB67AE85)`` (mod 2^32) between rounds.
2. **Key = sample seed.** A sample seed is a uint64 ``s`` (stored as int64, two's complement):
   ``k0 = s mod 2^32``, ``k1 = s >> 32``.
3. **Counter of step noise.** Element ``e`` (flat index into one sample, C-order of ``x[i]``) at sampling step
   ``j`` (spec §2: ``j = 0`` is the noisiest step) uses the call with counter
   ``(c0, c1, c2, c3) = (e >> 2, j, 0, 0)``, so a sample has at most 2^34 elements. x_T, the initial noise,
   is step ``XT_STEP = 0xFFFFFFFF`` (reserved: no sampling step has that index). ``c2`` is reserved (zero);
   ``c3`` is the domain word: 0 for noise, 1 for seed derivation (item 6).
4. **Words to uniforms.** Call ``q`` gives the stream words ``W[4q + m] = w_m``. A uniform of a word ``w`` is
   ``u(w) = (2 * (w >> 9) + 1) * 2^-24``, in (0, 1): the top 23 bits, exact in float32 (integer arithmetic,
   an exact int-to-float conversion, a power-of-two scale), identical everywhere.
5. **Box-Muller (float32).** Element ``e`` belongs to the pair ``p = e >> 1`` and uses ``a = W[2p]``,
   ``b = W[2p + 1]``: ``r = sqrt(-2 * log(u(a)))``, ``theta = u(b) * 6.2831855`` (2 pi rounded to float32),
   ``z_e = r * cos(theta)`` for even ``e``, ``r * sin(theta)`` for odd ``e``. Each of those is one float32
   operation, rounded in that order (no FMA); ``sqrt`` is correctly rounded (IEEE). ``|z| <= sqrt(48 ln 2)
   = 5.77`` (u >= 2^-24).
6. **Sample seeds from a run seed** (the harness and the Pipeline use this): sample ``i`` of a run with seed
   ``S`` (uint64) has seed ``w0 + 2^32 * w1`` of the call with key ``S`` and counter ``(i mod 2^32, i >> 32,
   0, 1)``. :func:`sample_seeds` computes it.

Tolerance. The uint32 words, the uniforms and the angle are bit-identical in every implementation and on
every device (integer operations, exact conversions, one float32 product); ``sqrt`` and the products are IEEE
float32. Only ``log``, ``cos`` and ``sin`` come from different math libraries: torch's own on the CPU (MKL VML
or SLEEF, so the csrc CPU kernel is bitwise this reference), numpy's under the Triton interpreter, CUDA's
``logf`` / ``cosf`` / ``sinf`` and libdevice on GPUs (<= 2 ulp each, no fast-math). The normals of two
implementations therefore agree within ``NORMAL_TOL_ULP`` = 8 float32 ulp of the value (<= 1e-6 relative; the
largest difference measured on 2M normals was 4 ulp, numpy against torch), checked as ``|z_a - z_b| <= 8 ulp(|z_b|)``.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["XT_STEP", "NORMAL_TOL_ULP", "DOMAIN_NOISE", "DOMAIN_SEED", "philox4x32", "sample_seeds",
           "as_seeds", "noise_words", "words_to_normal", "counter_normal", "ulp_distance"]

XT_STEP = 0xFFFFFFFF  # step index of x_T (layout item 3)
DOMAIN_NOISE, DOMAIN_SEED = 0, 1  # counter word c3 (layout items 3 and 6)
NORMAL_TOL_ULP = 8  # normals of two implementations differ by at most this many float32 ulp
TWO_PI_F32 = 6.2831854820251465  # float32(2 pi), layout item 5

_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key bumps (Weyl sequence)
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of the 64-bit product ``a * m`` (a: int64 tensor of uint32 values). The product is
    formed from 16-bit halves of ``a``, so that no int64 intermediate overflows."""
    p_lo = (a & 0xFFFF) * m  # < 2^48
    p_hi = (a >> 16) * m  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (((p_hi & 0xFFFF) << 16) + p_lo) & _MASK32
    return hi, lo


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor, k1: Tensor,
               rounds: int = 10) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` (layout item 1) on int64 tensors holding uint32 values (broadcast together).
    Returns the four output words as int64 tensors in [0, 2^32)."""
    c0, c1, c2, c3, k0, k1 = torch.broadcast_tensors(c0, c1, c2, c3, k0, k1)
    c0, c1, c2, c3, k0, k1 = (t.to(torch.int64) & _MASK32 for t in (c0, c1, c2, c3, k0, k1))
    for r in range(rounds):
        if r > 0:  # the key is bumped between rounds (Random123 philox4x32_R)
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(c0, _M0)
        hi1, lo1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _split_u64(v: Tensor) -> tuple[Tensor, Tensor]:
    """(low, high) uint32 words of int64 values read as uint64 (two's complement)."""
    return v & _MASK32, (v >> 32) & _MASK32


def _to_int64(u: int) -> int:
    """A uint64 as the int64 with the same bits."""
    u &= (1 << 64) - 1
    return u - (1 << 64) if u >= 1 << 63 else u


def sample_seeds(run_seed: int, indices: int | Sequence[int] | Tensor) -> Tensor:
    """Layout item 6: the seeds of samples ``indices`` (a count ``n`` means ``range(n)``) of the run with seed
    ``run_seed``, as an int64 tensor (uint64 bits). Sample ``i``'s seed depends on ``(run_seed, i)`` only, so
    a run split into shards or batches, or resumed, gives every sample the seed it would have had alone."""
    if isinstance(indices, int):
        indices = range(indices)
    idx = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices, dtype=torch.int64)
    if idx.numel() and int(idx.min()) < 0:
        raise ValueError(f"sample indices must be >= 0, got {int(idx.min())}")
    key = torch.tensor(_to_int64(int(run_seed)), dtype=torch.int64)
    k0, k1 = _split_u64(key)
    i_lo, i_hi = _split_u64(idx.cpu())
    w0, w1, _, _ = philox4x32(i_lo, i_hi, torch.zeros_like(i_lo), torch.full_like(i_lo, DOMAIN_SEED), k0, k1)
    return w0 | (w1 << 32)  # wraps to the int64 with the uint64's bits


def as_seeds(seeds: int | Sequence[int] | Tensor, batch: int, device: torch.device | str | None = None) -> Tensor:
    """Per-sample seeds as the int64 tensor ``[batch]`` the kernels take (values read as uint64)."""
    if isinstance(seeds, Tensor):
        if seeds.dtype.is_floating_point or seeds.dtype == torch.bool or seeds.dtype.is_complex:
            raise TypeError(f"seeds must be integers, got dtype {seeds.dtype}")
        t = seeds.to(torch.int64)
    else:
        if isinstance(seeds, int):
            seeds = [seeds]
        vals = []
        for s in seeds:
            if isinstance(s, bool) or not isinstance(s, int):
                raise TypeError(f"seeds must be integers, got {type(s).__name__}")
            if not -(1 << 63) <= s < (1 << 64):
                raise ValueError(f"a seed must fit in 64 bits, got {s}")
            vals.append(_to_int64(s))
        t = torch.tensor(vals, dtype=torch.int64)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"seeds must be one per sample: expected {batch}, got shape {tuple(t.shape)}")
    return t.to(device) if device is not None else t


def noise_words(seeds: Tensor, step_index: int | Tensor, n: int) -> Tensor:
    """The stream words ``W[0, 4 ceil(n/4))`` of every row (layout items 2-4): int64 ``[B, 4 ceil(n/4)]``.

    ``step_index``: an int, or an integer tensor of one value or one per row (``[B]``).
    """
    if n > 1 << 34:
        raise ValueError(f"a sample has {n} elements; the counter layout covers at most 2^34")
    dev = seeds.device
    quads = (n + 3) // 4
    k0, k1 = _split_u64(seeds.to(torch.int64).reshape(-1, 1))
    j = torch.as_tensor(step_index, dtype=torch.int64, device=dev).reshape(-1, 1) & _MASK32
    q = torch.arange(quads, dtype=torch.int64, device=dev).reshape(1, -1)
    zero = torch.zeros((), dtype=torch.int64, device=dev)
    w = philox4x32(q, j, zero, zero + DOMAIN_NOISE, k0, k1)
    return torch.stack(w, dim=-1).reshape(w[0].shape[0], 4 * quads)


def _uniform(w: Tensor) -> Tensor:
    """Layout item 4: ``(2 (w >> 9) + 1) 2^-24`` in float32, exact."""
    return ((w >> 9) * 2 + 1).to(torch.float32) * 2.0 ** -24


def words_to_normal(words: Tensor) -> Tensor:
    """Layout item 5: Box-Muller on pairs of words, ``[B, 2P]`` int64 -> ``[B, 2P]`` float32 normals."""
    u1, u2 = _uniform(words[:, 0::2]), _uniform(words[:, 1::2])
    # IEEE sqrt (layout item 5): torch.sqrt on MKL CPU builds is not correctly rounded; float64 sqrt rounded to
    # float32 is (double rounding is exact for sqrt)
    r = torch.sqrt((torch.log(u1) * -2.0).double()).float()
    theta = u2 * TWO_PI_F32
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1).reshape(words.shape)


def counter_normal(seeds: Tensor, step_index: int | Tensor, shape: Sequence[int]) -> Tensor:
    """Standard normal noise of ``shape`` ([B, ...]) at step ``step_index`` for rows with ``seeds`` ([B] int64):
    the reference of what the fused kernels draw in-kernel (layout items 2-5). On ``seeds``' device."""
    shape = tuple(int(s) for s in shape)
    if len(shape) < 1 or shape[0] != seeds.shape[0]:
        raise ValueError(f"shape {shape} must be batch-first with one seed per row ({seeds.shape[0]} seeds)")
    n = 1
    for s in shape[1:]:
        n *= s
    z = words_to_normal(noise_words(seeds, step_index, n))
    return z[:, :n].reshape(shape).contiguous()


def ulp_distance(a: Tensor, b: Tensor) -> Tensor:
    """``|a - b|`` in float32 ulp of ``|b|`` (for the tolerance above)."""
    b32, a32 = b.float(), a.float()
    ulp = torch.nextafter(b32.abs(), torch.tensor(float("inf"))) - b32.abs()
    return (a32 - b32).abs() / ulp
