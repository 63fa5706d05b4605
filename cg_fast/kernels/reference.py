"""Pure-PyTorch reference of the sampler step: the semantics every fused kernel must reproduce.

Stage 4 of the data flow (schedule -> denoiser -> guidance -> step kernel). The operations and their
order are those of OpenAI guided-diffusion's ``p_sample`` / ``ddim_sample`` with ``cond_fn`` (float32 math on
coefficients cast from float64), so that with full guidance a seeded run reproduces its samples bit for bit
on the CPU. The cached-guidance update of spec §4 is done in the same call.

Notation (spec §2, §4-§6), per batch row, ``coef`` columns named by :class:`~cg_fast.kernels.table.Col`:
    x        x_t, the float32 state                     o      model output (eps, x0 or v; + variance channels)
    g        fresh classifier gradient (guided steps)    d      eps_c - eps_u, fresh CFG direction
    h        cache state (reuse / momentum), in place    a      applied guidance = H_DECAY * h + G_WEIGHT * g
    s        GUIDE_S: classifier scale s, or w - 1 for CFG
Memory traffic of one DDPM step (fp32, n elements): read x, o (1x or 2x), z, [g], [h]; write x', [h].

DPM-Solver++ 2M (:func:`dpmpp2m_step_ref`) is deterministic: it takes no noise, and carries one more state
tensor, ``prev`` (the previous step's data prediction x0, float32 like x), updated in place like ``h``.

Noise ``z``: a tensor like x (``noise=``), or counter-based (``noise=None, seeds=, step_index=``): z is then
:func:`cg_fast.kernels.rng.counter_normal` of the rows' seeds at step ``step_index`` (the counter layout of
:mod:`cg_fast.kernels.rng`), which the fused kernels compute in-kernel instead of reading it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .rng import counter_normal
from .table import Col

__all__ = ["ddpm_step_ref", "ddim_step_ref", "dpmpp2m_step_ref", "check_step_args", "check_prev_arg", "check_no_noise_args", "check_noise_args", "GUIDE_KINDS", "PREDICTIONS"]

GUIDE_KINDS = ("none", "classifier", "cfg")
PREDICTIONS = ("eps", "x0", "v")


def _col(coef: Tensor, k: Col, ndim: int) -> Tensor:
    """Column ``k`` of the per-row table, shaped [B, 1, ..., 1] to broadcast against x."""
    return coef[:, int(k)].reshape(-1, *([1] * (ndim - 1)))


def _applied_guidance(coef: Tensor, fresh: Tensor | None, h: Tensor | None, ndim: int) -> Tensor | None:
    """Spec §4: ``a = H_DECAY * h + G_WEIGHT * fresh`` (terms that are absent are left out); ``h <- a``.

    drop / compress have no state: a = m_j * g at guided steps, nothing elsewhere. reuse / momentum keep h:
    the table's weights are (0, 1) at the first guided step, (beta, 1 - beta) at later ones and (gamma, 0)
    at skipped ones. ``0 * h + 1 * g`` equals ``g`` exactly, so full guidance stays bitwise vanilla.
    """
    if h is None:
        return None if fresh is None else fresh * _col(coef, Col.G_WEIGHT, ndim)
    a = h * _col(coef, Col.H_DECAY, ndim)
    if fresh is not None:
        a = a + fresh * _col(coef, Col.G_WEIGHT, ndim)
    h.copy_(a)
    return a


def _split(model_out: Tensor, channels: int, learned_var: bool) -> tuple[Tensor, Tensor | None]:
    o = model_out.float()
    if learned_var:
        return o[:, :channels], o[:, channels:]
    return o, None


def _cfg_combine(eps_c: Tensor, uncond_out: Tensor | None, coef: Tensor, h: Tensor | None,
                 cfg_channels: int | None) -> Tensor:
    """Spec §6: ``eps = eps_c + (w - 1) * a`` with ``a`` the cached direction, on the first channels only."""
    c = eps_c.shape[1]
    d = None
    if uncond_out is not None:
        d = eps_c - uncond_out.float()[:, :c]
    a = _applied_guidance(coef, d, h, eps_c.dim())
    if a is None:
        return eps_c
    guided = eps_c + _col(coef, Col.GUIDE_S, eps_c.dim()) * a
    if cfg_channels is None or cfg_channels >= c:
        return guided
    return torch.cat([guided[:, :cfg_channels], eps_c[:, cfg_channels:]], dim=1)


def _pred_x0(x: Tensor, o: Tensor, coef: Tensor, prediction: str, clip: bool) -> Tensor:
    nd = x.dim()
    if prediction == "eps":
        x0 = _col(coef, Col.SQRT_RECIP_AC, nd) * x - _col(coef, Col.SQRT_RECIPM1_AC, nd) * o
    elif prediction == "v":
        x0 = _col(coef, Col.SQRT_AC, nd) * x - _col(coef, Col.SQRT_1M_AC, nd) * o
    elif prediction == "x0":
        x0 = o
    else:
        raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")
    return x0.clamp(-1, 1) if clip else x0


def _eps_from_x0(x: Tensor, x0: Tensor, coef: Tensor) -> Tensor:
    nd = x.dim()
    return (_col(coef, Col.SQRT_RECIP_AC, nd) * x - x0) / _col(coef, Col.SQRT_RECIPM1_AC, nd)


def _guided_x0_score_form(x: Tensor, model_out: Tensor, coef: Tensor, guide: str, fresh: Tensor | None,
                          h: Tensor | None, prediction: str, learned_var: bool, clip: bool,
                          cfg_channels: int | None) -> Tensor:
    """The guided data prediction of DDIM and DPM-Solver++ (spec §5-§6): CFG combines eps first; classifier
    guidance shifts the score, ``eps' = eps - sqrt(1 - alpha_bar) * (a * s)`` (ADM ``condition_score``), and x0
    is recomputed from eps'. Variance channels of a learned-variance output are ignored; ``h`` is updated."""
    nd = x.dim()
    eps_or_o, _ = _split(model_out, x.shape[1], learned_var)
    if guide == "cfg":
        eps_or_o = _cfg_combine(eps_or_o, fresh, coef, h, cfg_channels)
    x0 = _pred_x0(x, eps_or_o, coef, prediction, clip)
    if guide == "classifier":
        a = _applied_guidance(coef, fresh, h, nd)
        if a is not None:
            eps = _eps_from_x0(x, x0, coef)
            eps = eps - _col(coef, Col.DDIM_SQRT_1M_AC, nd) * (a * _col(coef, Col.GUIDE_S, nd))
            x0 = _col(coef, Col.SQRT_RECIP_AC, nd) * x - _col(coef, Col.SQRT_RECIPM1_AC, nd) * eps
    return x0


def check_step_args(guide: str, fresh: Tensor | None, h: Tensor | None, cfg_channels: int | None,
                    prediction: str, x: Tensor | None = None, model_out: Tensor | None = None) -> None:
    """The argument errors every implementation raises (ValueError, in this order), before any state (h) is
    touched. ``x`` / ``model_out``: their batch sizes must agree (shapes only: no host sync)."""
    if x is not None and model_out is not None and model_out.shape[0] != x.shape[0]:
        raise ValueError(f"model output has batch {model_out.shape[0]} but x has batch {x.shape[0]}: the model "
                         "must return one row per input row")
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}: use one of {PREDICTIONS}")
    if cfg_channels is not None and cfg_channels < 0:
        raise ValueError(f"cfg_channels must be >= 0 or None (all channels), got {cfg_channels}")
    if guide not in GUIDE_KINDS:
        raise ValueError(f"unknown guide kind {guide!r}: use one of {GUIDE_KINDS}")
    if guide == "none" and (fresh is not None or h is not None):
        raise ValueError("guide='none' takes neither fresh guidance nor a cache state")


def check_noise_args(x: Tensor, noise: Tensor | None, seeds: Tensor | None,
                     step_index: int | Tensor | None) -> None:
    """Either a noise tensor or counter-based noise (``seeds`` int64 [B] and ``step_index``, an int or an integer
    tensor of 1 or B values, on x's device): the errors every implementation raises (ValueError / TypeError)."""
    if noise is not None:
        if seeds is not None or step_index is not None:
            raise ValueError("pass either noise or (seeds, step_index) for counter-based noise, not both")
        return
    if seeds is None or step_index is None:
        raise ValueError("noise is None: counter-based noise needs seeds (int64 [B]) and step_index")
    if not isinstance(seeds, Tensor) or seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be an int64 tensor, got {getattr(seeds, 'dtype', type(seeds).__name__)}")
    batch = x.shape[0] if x.dim() else 0
    if seeds.dim() != 1 or seeds.shape[0] != batch:
        raise ValueError(f"seeds must have shape [{batch}] (one per batch row), got {tuple(seeds.shape)}")
    if seeds.device != x.device:
        raise ValueError(f"seeds is on {seeds.device} but x is on {x.device}")
    if isinstance(step_index, Tensor):
        if step_index.dtype.is_floating_point or step_index.dtype.is_complex or step_index.dtype == torch.bool:
            raise TypeError(f"step_index must be an integer tensor, got dtype {step_index.dtype}")
        if step_index.numel() not in (1, batch):
            raise ValueError(f"step_index must hold 1 or {batch} (one per row) values, got {step_index.numel()}")
        if step_index.device != x.device:
            raise ValueError(f"step_index is on {step_index.device} but x is on {x.device}")
    elif isinstance(step_index, bool) or not isinstance(step_index, int):
        raise TypeError(f"step_index must be an int or an integer tensor, got {type(step_index).__name__}")


def _noise(x: Tensor, noise: Tensor | None, seeds: Tensor | None, step_index: int | Tensor | None) -> Tensor:
    """The step's z: the given tensor, or the counter-based normals of rng.py's layout."""
    check_noise_args(x, noise, seeds, step_index)
    if noise is not None:
        return noise
    return counter_normal(seeds, step_index, x.shape)


def ddpm_step_ref(
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
    """One DDPM ancestral step (ADM ``p_sample`` + ``condition_mean``; spec §5), returns x_{t-1}.

    guide="classifier": ``fresh`` is the classifier gradient g at x_t (or None at a skipped step);
    guide="cfg": ``model_out`` is the conditional output and ``fresh`` the unconditional one (or None).
    ``h`` (reuse/momentum cache) is updated in place. ``out`` may alias ``x``. ``noise=None`` with ``seeds``
    (int64 [B]) and ``step_index`` (int, or 1 or B integers): counter-based z (:mod:`cg_fast.kernels.rng`).
    """
    check_step_args(guide, fresh, h, cfg_channels, prediction, x, model_out)
    noise = _noise(x, noise, seeds, step_index)
    nd = x.dim()
    eps_or_o, v = _split(model_out, x.shape[1], learned_var)
    if guide == "cfg":
        eps_or_o = _cfg_combine(eps_or_o, fresh, coef, h, cfg_channels)
    # 1. predicted x0 (optionally clipped), 2. posterior mean  (ADM p_mean_variance)
    x0 = _pred_x0(x, eps_or_o, coef, prediction, clip)
    mean = _col(coef, Col.POST_C1, nd) * x0 + _col(coef, Col.POST_C2, nd) * x
    # 3. variance: fixed, or learned-range interpolation in log space (spec §5)
    if v is not None:
        frac = (v + 1) / 2
        log_var = frac * _col(coef, Col.MAX_LOG, nd) + (1 - frac) * _col(coef, Col.MIN_LOG, nd)
        var = torch.exp(log_var)
    else:
        log_var = _col(coef, Col.LOG_VAR, nd).expand_as(x)
        var = _col(coef, Col.VAR, nd)
    # 4. classifier guidance shifts the mean: mean + Var * (s * a)   (spec §5, ADM condition_mean)
    if guide == "classifier":
        a = _applied_guidance(coef, fresh, h, nd)
        if a is not None:
            mean = mean + var * (a * _col(coef, Col.GUIDE_S, nd))
    # 5. x_{t-1} = mean + sqrt(Var) z, no noise on the last step
    x_next = mean + _col(coef, Col.NONZERO, nd) * torch.exp(0.5 * log_var) * noise
    if out is not None:
        return out.copy_(x_next)
    return x_next


def ddim_step_ref(
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
    """One DDIM step (ADM ``ddim_sample`` + ``condition_score``; spec §5), returns x_{t-1}.

    Classifier guidance shifts the score: ``eps' = eps - sqrt(1 - alpha_bar) * s * a``. Arguments as
    :func:`ddpm_step_ref`; variance channels of a learned-variance model are ignored, as in ADM.
    """
    check_step_args(guide, fresh, h, cfg_channels, prediction, x, model_out)
    noise = _noise(x, noise, seeds, step_index)
    nd = x.dim()
    x0 = _guided_x0_score_form(x, model_out, coef, guide, fresh, h, prediction, learned_var, clip, cfg_channels)
    eps = _eps_from_x0(x, x0, coef)
    mean = x0 * _col(coef, Col.DDIM_SQRT_ACP, nd) + _col(coef, Col.DDIM_DIR, nd) * eps
    x_next = mean + _col(coef, Col.NONZERO, nd) * _col(coef, Col.DDIM_SIGMA, nd) * noise
    if out is not None:
        return out.copy_(x_next)
    return x_next


def check_prev_arg(x: Tensor, prev: Tensor | None) -> None:
    """``prev``, DPM-Solver++'s carried data prediction: a float32 tensor shaped like x, on x's device."""
    if prev is None:
        raise ValueError("dpmpp2m needs prev: a float32 buffer shaped like x (zeros before the first step) that "
                         "carries the previous step's data prediction")
    if not isinstance(prev, Tensor) or prev.shape != x.shape or prev.dtype != torch.float32 \
            or prev.device != x.device:
        raise ValueError(f"prev must be a float32 tensor of x's shape {tuple(x.shape)} on {x.device}, got "
                         f"{getattr(prev, 'dtype', type(prev).__name__)} {tuple(getattr(prev, 'shape', ()))}")


def check_no_noise_args(noise: Tensor | None, seeds: Tensor | None, step_index: int | Tensor | None) -> None:
    """DPM-Solver++ 2M is deterministic: ``noise``, ``seeds`` and ``step_index`` must all be None."""
    if noise is not None or seeds is not None or step_index is not None:
        raise ValueError("dpmpp2m is deterministic: pass noise=None and no seeds / step_index")


def dpmpp2m_step_ref(
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
    """One DPM-Solver++ 2M step (data prediction, multistep; spec §5 "DPM-Solver++"), returns x at the next level.

    Guidance enters the data prediction, as in DDIM: CFG combines the eps outputs first (spec §6); classifier
    guidance shifts the score, ``eps' = eps - sqrt(1 - alpha_bar_t) * s * a`` (ADM ``condition_score``), and x0 is
    recomputed from eps'. The guided x0 is what the multistep update uses and what ``prev`` keeps, so a cached
    guidance state (``h``) also reaches the next step's correction term through ``prev``.

    Deterministic: ``noise``, ``seeds`` and ``step_index`` are accepted for a common signature and must be None.
    Other arguments as :func:`ddpm_step_ref`; variance channels of a learned-variance model are ignored.
    """
    check_step_args(guide, fresh, h, cfg_channels, prediction, x, model_out)
    check_prev_arg(x, prev)
    check_no_noise_args(noise, seeds, step_index)
    nd = x.dim()
    x0 = _guided_x0_score_form(x, model_out, coef, guide, fresh, h, prediction, learned_var, clip, cfg_channels)
    x_next = (_col(coef, Col.DPM_CX, nd) * x + _col(coef, Col.DPM_C0, nd) * x0
              + _col(coef, Col.DPM_C1, nd) * (x0 - prev))
    prev.copy_(x0)
    if out is not None:
        return out.copy_(x_next)
    return x_next
