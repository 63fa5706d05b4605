"""Compress Guidance as a diffusers guider: CompCFG inside diffusers' modular pipelines (spec §3, §4, §6).

Owns :class:`CompressGuidance`, a subclass of diffusers' ``ClassifierFreeGuidance``. It decides, per step, whether
the pipeline runs the unconditional batch (``num_conditions`` 2 at the steps a cg_fast policy guides, 1 elsewhere),
keeps the cached direction ``d = eps_c - eps_u`` and applies it with a cg_fast cache mode, from the plan the
Sampler's step kernels read (``cg_fast.CFG.plan``, i.e. :func:`cg_fast.cache.cache_plan`). It does not touch the
scheduler, the denoiser or the latents: the pipeline's loop stays diffusers' own.

    from cg_fast.guidance import Compress
    from cg_fast.integrations.diffusers import CompressGuidance
    guider = CompressGuidance(guidance_scale=5.0, policy=Compress(rate=5, k=1), cache="compress")
    pipe.update_components(guider=guider)      # a diffusers ModularPipeline (SDXL, ...)
    latents = pipe(..., output="latents")
    guider.stats.denoiser_passes, guider.stats.guided_steps

Per step j (spec §6, diffusers' formulation ``pred = eps_u + w (eps_c - eps_u)``, written as cg_fast forms it):

    guided j:   d_j = eps_c - eps_u,   a_j = H_DECAY_j * h + G_WEIGHT_j * d_j   (h <- a_j for reuse / momentum)
    skipped j:  a_j = H_DECAY_j * h (reuse / momentum), nothing for drop / compress
    pred_j   = eps_c + (w - 1) a_j   (w with ``use_original_formulation``, where pred = eps_c + w (eps_c - eps_u));
               where a_j is the fresh d_j itself, as diffusers writes it: eps_u + w d_j
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from . import require

require("diffusers")

from diffusers.configuration_utils import register_to_config  # noqa: E402
from diffusers.guiders import ClassifierFreeGuidance  # noqa: E402
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg  # noqa: E402

from ..cache import CachePlan, check_cache_args  # noqa: E402
from ..guidance import CFG  # noqa: E402
from ..policies import POLICY_NAMES, Policy, make_policy  # noqa: E402
from ..sampler import SamplingStats  # noqa: E402
from ..schedules import NoiseSchedule, SpacedSchedule  # noqa: E402

__all__ = ["CompressGuidance"]


def _as_policy(policy: Policy | str, policy_kwargs: dict[str, Any] | None) -> Policy:
    if isinstance(policy, Policy):
        if policy_kwargs:
            raise ValueError("policy_kwargs go with a policy name (policy='compress', policy_kwargs={'rate': 5}), "
                             "not with a policy object")
        return policy
    if isinstance(policy, str):
        return make_policy(policy, **(policy_kwargs or {}))
    raise TypeError(f"policy must be a cg_fast policy (Full(), Compress(rate=5, k=1), ...) or one of {POLICY_NAMES}, "
                    f"got {type(policy).__name__}")


def _policy_config(policy: Policy) -> tuple[str, dict[str, Any]]:
    """A JSON-able description (name, parameters) of ``policy``, for the guider's config."""
    params = dataclasses.asdict(policy) if dataclasses.is_dataclass(policy) else {}
    return policy.name, {k: v for k, v in params.items() if isinstance(v, (int, float, str, bool))}


class CompressGuidance(ClassifierFreeGuidance):
    """Classifier-free guidance computed at a cg_fast policy's steps and cached in between (spec §3, §4, §6).

    Args:
        guidance_scale:  w, as diffusers' ``ClassifierFreeGuidance`` (``eps_u + w (eps_c - eps_u)``).
        policy:          which steps run the unconditional batch: a cg_fast policy (``Full()``, ``Compress(rate,
                         k, final)``, ``EarlyStop``, ``UniformSkip``, ``Interval``, or any other
                         :class:`~cg_fast.policies.Policy`, e.g. a calibrated one), or its name with
                         ``policy_kwargs``. Default ``Compress(rate=5, k=1, final=2)``.
        cache:           what the other steps get (spec §4): "drop" (nothing), "compress" (the gap multipliers
                         m_j at the guided steps), "reuse" (zero-order hold of d), "momentum" (``beta``, ``decay``).
        scheduler:       the pipeline's scheduler, needed only by policies that read noise levels (``Interval``):
                         its training betas and the timesteps it set give sigma_t per step.
        guidance_rescale, use_original_formulation, start, stop, enabled: as ``ClassifierFreeGuidance``; a step
                         outside [start, stop) is not guided (the cache modes then treat it as skipped).

    After a run, :attr:`stats` holds the exact accounting (a :class:`cg_fast.SamplingStats`): ``denoiser_passes``
    (one per batch the pipeline ran), ``denoiser_rows`` and ``guided_steps``; :meth:`mask` gives the plan.
    """

    _input_predictions = ["pred_cond", "pred_uncond"]

    @register_to_config
    def __init__(
        self,
        guidance_scale: float = 7.5,
        policy: Policy | str = "compress",
        policy_kwargs: dict[str, Any] | None = None,
        cache: str = "drop",
        beta: float = 0.0,
        decay: float = 1.0,
        guidance_rescale: float = 0.0,
        use_original_formulation: bool = False,
        start: float = 0.0,
        stop: float = 1.0,
        enabled: bool = True,
        scheduler: Any = None,
    ) -> None:
        BaseGuidance.__init__(self, start, stop, enabled)
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) \
                or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        self.policy = _as_policy(policy, policy_kwargs)
        check_cache_args(cache, beta, decay)
        self.guidance_scale = float(guidance_scale)
        self.guidance_rescale = guidance_rescale
        self.use_original_formulation = use_original_formulation
        self.cache, self.beta, self.decay = cache, float(beta), float(decay)
        self.scheduler = scheduler
        # the plan comes from a cg_fast CFG, as the Sampler's does (guidance.plan(mask), spec §4)
        self._cfg = CFG(self.guidance_scale, null_label=0, policy=self.policy, cache=cache, beta=self.beta,
                        decay=self.decay, channels="all")
        # the config must stay JSON-able (repr, save_pretrained, new()): the policy as its name and parameters
        name, params = _policy_config(self.policy)
        # (and not marked as defaults, which from_config would drop): new() rebuilds the same guider
        defaults = [k for k in self.config.get("_use_default_values", []) if k not in ("policy", "policy_kwargs")]
        self.register_to_config(policy=name, policy_kwargs=params, scheduler=None, _use_default_values=defaults)
        self._mask: list[bool] | None = None
        self._plan: CachePlan | None = None
        self._h: torch.Tensor | None = None  # the cache state (reuse / momentum), spec §4
        self.stats = SamplingStats()

    # -- the plan (computed once per run, at step 0) --------------------------------------------------------
    def mask(self, num_inference_steps: int) -> list[bool]:
        """The guided steps of a run of ``num_inference_steps`` (sampling order, j = 0 the noisiest step)."""
        n = num_inference_steps
        try:
            mask = self.policy.mask(self._spaced(n) if self.scheduler is not None else n)
        except TypeError as e:
            if self.scheduler is None:
                raise TypeError(f"{type(self.policy).__name__} reads the noise level of every step: pass the "
                                "pipeline's scheduler, CompressGuidance(..., scheduler=pipe.scheduler)") from e
            raise
        if len(mask) != n:
            raise ValueError(f"the policy planned {len(mask)} steps for a run of {n}")
        lo, hi = int(self._start * n), int(self._stop * n)  # diffusers' start / stop window
        scale_on = not math.isclose(self.guidance_scale, 0.0 if self.use_original_formulation else 1.0)
        return [bool(g) and lo <= j < hi and scale_on for j, g in enumerate(mask)]

    def _spaced(self, n: int) -> SpacedSchedule:
        sched = self.scheduler
        ts = getattr(sched, "timesteps", None)
        if ts is None or len(ts) != n:
            raise ValueError(f"the scheduler has {0 if ts is None else len(ts)} timesteps set, not the run's {n}: "
                             "pass the pipeline's own scheduler, after its set_timesteps")
        ts = [int(round(float(t))) for t in ts]
        return NoiseSchedule.from_betas(sched.betas.double().numpy()).at_timesteps(ts)

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.LongTensor) -> None:
        super().set_state(step, num_inference_steps, timestep)
        if step == 0 or self._mask is None or len(self._mask) != num_inference_steps:
            self._mask = self.mask(num_inference_steps)
            self._plan = self._cfg.plan(self._mask)
            self._h = None
            self.stats = SamplingStats(guided_steps=[j for j, g in enumerate(self._mask) if g])

    # -- what the pipeline asks ----------------------------------------------------------------------------
    def _is_cfg_enabled(self) -> bool:
        """Whether this step runs the unconditional batch. Before the first step (the pipeline asking whether
        to prepare negative embeddings): whether any step can."""
        if not self._enabled:
            return False
        if self._step is None or self._mask is None:
            return not math.isclose(self.guidance_scale, 0.0 if self.use_original_formulation else 1.0)
        return self._mask[self._step]

    def __call__(self, data: list) -> GuiderOutput:
        out = super().__call__(data)  # checks len(data) == num_conditions, then forward(...)
        self.stats.denoiser_passes += len(data)
        self.stats.denoiser_rows += sum(int(d.noise_pred.shape[0]) for d in data)
        if self._mask is not None and self._step == len(self._mask) - 1:
            self._step = None  # the run is over: until the next one, num_conditions answers for a whole run
        return out

    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None) -> GuiderOutput:
        j, plan = self._step, self._plan
        if plan is None or j is None:
            raise RuntimeError("CompressGuidance.forward before set_state: the pipeline sets the step first")
        if not self._enabled:  # disabled by the pipeline (e.g. a guidance-distilled UNet): no guidance at all
            return GuiderOutput(pred=pred_cond, pred_cond=pred_cond, pred_uncond=pred_uncond)
        # spec §4: a_j = H_DECAY_j * h + G_WEIGHT_j * d_j; the step's weights as float32, as the step kernels
        h_decay, g_weight = float(torch.tensor(plan.h_decay[j])), float(torch.tensor(plan.g_weight[j]))
        a = None
        fresh_only = False  # a_j == d_j exactly: the fresh direction, once (full guidance, a first guided step)
        if pred_uncond is not None:
            d = pred_cond - pred_uncond
            fresh_only = g_weight == 1.0 and (self._h is None or h_decay == 0.0)
            a = d * g_weight if self._h is None else self._h * h_decay + d * g_weight
        elif self._h is not None:
            a = self._h * h_decay
        if plan.stateful and a is not None:
            self._h = a
        w = self.guidance_scale
        if fresh_only:  # written as diffusers' guider writes it, so full guidance is its samples to rounding
            pred = (pred_cond if self.use_original_formulation else pred_uncond) + w * d
        elif a is None:
            pred = pred_cond
        else:  # spec §6: eps_c + (w - 1) a_j (w for the original formulation)
            s = w if self.use_original_formulation else w - 1.0
            pred = pred_cond + float(torch.tensor(s)) * a
        if self.guidance_rescale > 0.0 and a is not None:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        state["guided_steps"] = len(self.stats.guided_steps)
        state["denoiser_passes"] = self.stats.denoiser_passes
        return state
