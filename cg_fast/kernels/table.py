"""Per-step coefficient table shared by every step-kernel implementation (spec §4-§6).

One sampling step needs ~18 scalars per batch row: the schedule's coefficients (computed in float64, used
in float32 as ADM does, spec §5) and the guidance plan's coefficients (scale, cache weights, spec §4/§6).
They are precomputed once per sampling run into a float32 tensor ``table[N, NUM_COLS]`` in sampling order
(row ``j`` = step ``j``; ``j = 0`` is the noisiest step). A step kernel receives ``coef[B, NUM_COLS]``
(usually ``table[j].expand(B, -1)``), so different rows may sit at different timesteps, nothing is
computed on the host inside the loop, and a CUDA graph only needs the row copied into a static buffer.

Column meanings (x_t the state, o the model output, a the applied guidance):
    SQRT_RECIP_AC, SQRT_RECIPM1_AC   eps -> x0:  x0 = SQRT_RECIP_AC * x_t - SQRT_RECIPM1_AC * eps
    SQRT_AC, SQRT_1M_AC              v   -> x0:  x0 = SQRT_AC * x_t - SQRT_1M_AC * v
    POST_C1, POST_C2                 posterior mean  mu = POST_C1 * x0 + POST_C2 * x_t
    VAR, LOG_VAR                     fixed variance (ADM fixed-large or fixed-small) and its log
    MIN_LOG, MAX_LOG                 learned range:  log Var = frac * MAX_LOG + (1 - frac) * MIN_LOG  (§5)
    NONZERO                          0 on the last step (no noise there), else 1
    DDIM_SQRT_1M_AC                  float32 sqrt(1 - alpha_bar), for the score shift (§5, condition_score)
    DDIM_SQRT_ACP, DDIM_DIR          x_prev = x0 * DDIM_SQRT_ACP + DDIM_DIR * eps + DDIM_SIGMA * z
    DDIM_SIGMA
    GUIDE_S                          guidance scale: s (classifier) or w - 1 (CFG)
    H_DECAY, G_WEIGHT                cache update a = H_DECAY * h + G_WEIGHT * g   (§4; m_j for compress)
    DPM_CX, DPM_C0, DPM_C1           DPM-Solver++ 2M:  x' = DPM_CX * x + DPM_C0 * x0 + DPM_C1 * (x0 - x0_prev)
                                     (x0_prev: the previous step's data prediction; DPM_C1 = 0 on first-order
                                     steps: the first, and the last, which lands on sigma = 0 as x' = x0)
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np
import torch

from ..schedules import SpacedSchedule

__all__ = ["Col", "NUM_COLS", "schedule_columns", "VARIANCE_TYPES"]


class Col(IntEnum):
    SQRT_RECIP_AC = 0
    SQRT_RECIPM1_AC = 1
    SQRT_AC = 2
    SQRT_1M_AC = 3
    POST_C1 = 4
    POST_C2 = 5
    VAR = 6
    LOG_VAR = 7
    MIN_LOG = 8
    MAX_LOG = 9
    NONZERO = 10
    DDIM_SQRT_1M_AC = 11
    DDIM_SQRT_ACP = 12
    DDIM_DIR = 13
    DDIM_SIGMA = 14
    GUIDE_S = 15
    H_DECAY = 16
    G_WEIGHT = 17
    DPM_CX = 18
    DPM_C0 = 19
    DPM_C1 = 20


NUM_COLS = len(Col)
VARIANCE_TYPES = ("fixed_large", "fixed_small")


def schedule_columns(sched: SpacedSchedule, *, variance: str = "fixed_large", eta: float = 0.0) -> torch.Tensor:
    """The schedule part of the table: float32 ``[N, NUM_COLS]`` in sampling order, guidance columns zero.

    ``variance`` picks the fixed variance for models without learned variance, as ADM's ``sigma_small``
    flag: "fixed_large" (beta_t, with the first entry replaced by the posterior variance) is ADM's default.
    """
    if variance not in VARIANCE_TYPES:
        raise ValueError(f"unknown variance {variance!r}: use one of {VARIANCE_TYPES}")
    if not eta >= 0.0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    n = sched.num_steps
    ac = sched.alphas_cumprod
    acp = sched.alphas_cumprod_prev
    betas = sched.betas
    post_var = sched.posterior_variance
    post_log = sched.posterior_log_variance_clipped
    if variance == "fixed_large":
        var = np.append(post_var[1], betas[1:]) if n > 1 else betas.copy()
    else:
        var = post_var if n > 1 else betas.copy()
    log_var = np.log(var) if variance == "fixed_large" else post_log

    f64 = np.zeros((n, NUM_COLS), dtype=np.float64)
    f64[:, Col.SQRT_RECIP_AC] = np.sqrt(1.0 / ac)
    f64[:, Col.SQRT_RECIPM1_AC] = np.sqrt(1.0 / ac - 1)
    f64[:, Col.SQRT_AC] = np.sqrt(ac)
    f64[:, Col.SQRT_1M_AC] = np.sqrt(1.0 - ac)
    f64[:, Col.POST_C1] = betas * np.sqrt(acp) / (1.0 - ac)
    f64[:, Col.POST_C2] = (1.0 - acp) * np.sqrt(1.0 - betas) / (1.0 - ac)
    f64[:, Col.VAR] = var
    f64[:, Col.LOG_VAR] = log_var
    f64[:, Col.MIN_LOG] = post_log
    f64[:, Col.MAX_LOG] = np.log(betas)
    f64[:, Col.NONZERO] = (np.arange(n) != 0).astype(np.float64)  # respaced index i = 0 is the last step
    f64[:, [Col.DPM_CX, Col.DPM_C0, Col.DPM_C1]] = _dpmpp2m_columns(ac, acp)
    table = torch.from_numpy(f64).float()  # float64 -> float32, as ADM's _extract_into_tensor

    # DDIM coefficients are computed by ADM in float32 from float32 alpha_bars; do the same ops here.
    ac32 = torch.from_numpy(ac).float()
    acp32 = torch.from_numpy(acp).float()
    sigma = eta * torch.sqrt((1 - acp32) / (1 - ac32)) * torch.sqrt(1 - ac32 / acp32)
    table[:, Col.DDIM_SQRT_1M_AC] = (1 - ac32).sqrt()
    table[:, Col.DDIM_SQRT_ACP] = torch.sqrt(acp32)
    table[:, Col.DDIM_DIR] = torch.sqrt(1 - acp32 - sigma ** 2)
    table[:, Col.DDIM_SIGMA] = sigma
    return table.flip(0).contiguous()  # respaced order i -> sampling order j = N - 1 - i


def _dpmpp2m_columns(ac: np.ndarray, acp: np.ndarray) -> np.ndarray:
    """DPM-Solver++ 2M coefficients [n, 3] in respaced order (i = 0 is the last sampling step).

    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma), the step from the
    current noise level s to the next t (h = lambda_t - lambda_s) is, in data prediction (Lu et al. 2022,
    multistep second order, "midpoint" form as diffusers' DPMSolverMultistepScheduler):

        x_t = (sigma_t / sigma_s) x_s - alpha_t expm1(-h) D0 - 0.5 alpha_t expm1(-h) D1,
        D0 = x0_s,  D1 = (x0_s - x0_prev) / r,  r = h_prev / h   (h_prev: the previous step's h)

    First order (D1 dropped) at the first step (no previous prediction) and at the last, whose target is
    sigma = 0 (alpha_bar_prev = 1): there x_t = x0_s exactly ("lower order final", final sigma zero).
    """
    n = ac.shape[0]
    alpha_s, sigma_s = np.sqrt(ac), np.sqrt(1.0 - ac)
    alpha_t, sigma_t = np.sqrt(acp), np.sqrt(1.0 - acp)
    lam_s = np.log(alpha_s) - np.log(sigma_s)
    out = np.zeros((n, 3), dtype=np.float64)
    with np.errstate(divide="ignore"):
        lam_t = np.log(alpha_t) - np.log(sigma_t)  # +inf where sigma_t = 0
    h = lam_t - lam_s
    out[:, 0] = sigma_t / sigma_s
    out[:, 1] = -alpha_t * np.expm1(-h)  # alpha_t where h = inf
    # h_prev of respaced step i is the h of the step sampled before it, i + 1
    for i in range(1, n - 1):
        r = h[i + 1] / h[i]
        out[i, 2] = 0.5 * out[i, 1] / r
    return out
