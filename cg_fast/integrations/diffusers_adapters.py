"""diffusers models in cg_fast's Sampler: denoiser adapters, and the sampler settings read from a scheduler.

Owns three adapters that give diffusers networks cg_fast's denoiser protocol ``model(x, t, y=None) -> eps``
(t the original training timesteps, y labels), and :func:`diffusers_sampler`, which reads a diffusers
scheduler's config (betas, prediction type, clipping, variance, the timesteps it sets) into a
:class:`cg_fast.Sampler` with explicit timesteps (``Sampler(..., timesteps=...)``). It changes neither the
models nor the schedulers, and no weights are fetched: the models are passed in, built however the caller likes.

    UNet2DModelAdapter(unet)                               # labels -> class_labels (num_class_embeds)
    UNet2DConditionAdapter(unet, prompt_embeds, negative_prompt_embeds, added_cond_kwargs=...)
                                                           # label k -> prompt k, the null label -> the negative
    DiTAdapter(transformer)                                # DiTPipeline's convention: null class 1000, learned
                                                           # variance dropped before the scheduler step
    sampler = diffusers_sampler(adapter, scheduler, num_inference_steps=25)

Schedulers (spec §5): ``DDPMScheduler`` -> method "ddpm" (variance "fixed_small" / "fixed_large", or the
model's learned range with "learned_range"), ``DDIMScheduler`` -> "ddim" (``set_alpha_to_one=True``; with
``clip_sample`` cg_fast takes eps from the clipped x0, as diffusers' ``use_clipped_model_output=True``),
``DPMSolverMultistepScheduler`` (DPM-Solver++ 2M, ``final_sigmas_type="zero"``) -> "dpmpp2m". Anything else
raises with what would work.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import require

require("diffusers")

from ..sampler import Sampler  # noqa: E402
from ..schedules import NoiseSchedule  # noqa: E402

__all__ = ["UNet2DModelAdapter", "UNet2DConditionAdapter", "DiTAdapter", "diffusers_sampler", "sampler_settings"]

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small", "fixed_large": "fixed_large",
              "fixed_large_log": "fixed_large"}


def _labels(t: Tensor, x: Tensor) -> Tensor:
    return t.expand(x.shape[0]) if t.dim() == 0 else t


class UNet2DModelAdapter(nn.Module):
    """A diffusers ``UNet2DModel`` as ``model(x, t, y=None)``: y goes in as ``class_labels``.

    Args:
        unet:       the network (class-conditional when its config has ``num_class_embeds``).
        null_label: the label of the unconditional pass, for CFG (a model trained with label dropout); None: none.
    ``learn_sigma`` is True when the network returns 2C channels (eps and the variance interpolation).
    """

    def __init__(self, unet: nn.Module, null_label: int | None = None) -> None:
        super().__init__()
        self.unet = unet
        cfg = unet.config
        self.num_classes: int | None = cfg.num_class_embeds
        self.class_cond = self.num_classes is not None  # an unconditional UNet takes no labels (classifier guidance)
        self.null_label = null_label
        self.learn_sigma = cfg.out_channels == 2 * cfg.in_channels

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if self.num_classes is None:
            y = None
        return self.unet(x, _labels(t, x), class_labels=y).sample


class UNet2DConditionAdapter(nn.Module):
    """A diffusers ``UNet2DConditionModel`` (Stable Diffusion, SDXL) with given prompt embeddings as
    ``model(x, t, y=None)``: label ``k`` conditions on prompt ``k``, the null label ``K`` on the negative prompt.

    Args:
        unet:           the network.
        prompt_embeds:  [K, L, D], one row per prompt (label k -> row k): the text encoders' output, computed
                        beforehand (cg_fast runs no text encoder).
        negative_prompt_embeds: [L, D] or [1, L, D], the unconditional pass's (SDXL: zeros or the encoded
                        negative prompt); None: no CFG.
        added_cond_kwargs: SDXL's ``{"text_embeds": [K, P], "time_ids": [K, 6]}``, per prompt.
        negative_added_cond_kwargs: the same for the negative prompt ([P] / [1, P], [6] / [1, 6]).
    For CFG use ``CFG(w, ...)`` with the model's null label (``K``, filled in by the Sampler); the labels y of a
    batch pick the prompts, ``torch.arange(K)`` for one sample per prompt.
    """

    def __init__(self, unet: nn.Module, prompt_embeds: Tensor, negative_prompt_embeds: Tensor | None = None, *,
                 added_cond_kwargs: Mapping[str, Tensor] | None = None,
                 negative_added_cond_kwargs: Mapping[str, Tensor] | None = None) -> None:
        super().__init__()
        self.unet = unet
        if not isinstance(prompt_embeds, Tensor) or prompt_embeds.dim() != 3:
            raise ValueError("prompt_embeds must be a tensor [K, L, D] (one row per prompt), got "
                             f"{getattr(prompt_embeds, 'shape', type(prompt_embeds).__name__)}")
        k = prompt_embeds.shape[0]
        added = dict(added_cond_kwargs or {})
        for name, v in added.items():
            if not isinstance(v, Tensor) or v.shape[0] != k:
                raise ValueError(f"added_cond_kwargs[{name!r}] must have one row per prompt ({k}), got "
                                 f"{getattr(v, 'shape', type(v).__name__)}")
        rows = {"encoder_hidden_states": prompt_embeds, **added}
        if negative_prompt_embeds is not None:
            neg = {"encoder_hidden_states": negative_prompt_embeds, **dict(negative_added_cond_kwargs or {})}
            if set(neg) != set(rows):
                raise ValueError(f"negative_added_cond_kwargs must give the same entries as added_cond_kwargs "
                                 f"({sorted(added)}), got {sorted(set(neg) - {'encoder_hidden_states'})}")
            for name, v in neg.items():
                v = v.reshape(1, *rows[name].shape[1:])  # one negative prompt: the null label's row
                rows[name] = torch.cat([rows[name], v.to(rows[name])])
        for name, v in rows.items():  # buffers: they follow .to(device); the tables are indexed by label
            self.register_buffer(f"_table_{name}", v.detach().clone(), persistent=False)
        self._names = list(rows)
        self.num_classes = k
        self.null_label: int | None = k if negative_prompt_embeds is not None else None
        cfg = unet.config
        self.learn_sigma = cfg.out_channels == 2 * cfg.in_channels

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            raise ValueError("UNet2DConditionAdapter needs labels y: label k selects prompt k")
        cond = {name: getattr(self, f"_table_{name}")[y] for name in self._names}
        hidden = cond.pop("encoder_hidden_states")
        return self.unet(x, _labels(t, x), encoder_hidden_states=hidden,
                         added_cond_kwargs=cond or None).sample


class DiTAdapter(nn.Module):
    """A diffusers ``DiTTransformer2DModel`` as ``model(x, t, y)``, as ``DiTPipeline`` runs it.

    Args:
        transformer:   the network (``num_embeds_ada_norm`` classes; its label table holds the null class).
        keep_variance: keep the learned-variance channels (for a ``DDPMScheduler(variance_type="learned_range")``).
                       Default False: dropped before the scheduler step, as ``DiTPipeline`` does, so the
                       scheduler's own fixed variance is used.
    The null label is ``num_embeds_ada_norm`` (1000 for ImageNet DiT); CFG guides all latent channels, as
    ``DiTPipeline`` (cg_fast's DiT checkpoints default to DiT's own 3 of 4, spec §6).
    """

    def __init__(self, transformer: nn.Module, keep_variance: bool = False) -> None:
        super().__init__()
        self.transformer = transformer
        cfg = transformer.config
        if cfg.num_embeds_ada_norm is None:
            raise ValueError("DiTAdapter needs a class-conditional DiT (config.num_embeds_ada_norm set)")
        self.num_classes: int = cfg.num_embeds_ada_norm
        self.null_label: int = cfg.num_embeds_ada_norm
        self.channels = cfg.in_channels
        self.learned_variance = (cfg.out_channels or cfg.in_channels) == 2 * cfg.in_channels
        self.learn_sigma = self.learned_variance and keep_variance

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        out = self.transformer(x, timestep=_labels(t, x), class_labels=y).sample
        if self.learned_variance and not self.learn_sigma:
            out = out[:, :self.channels]  # DiTPipeline: the variance channels never reach the scheduler
        return out


def _fail(scheduler: Any, what: str) -> None:
    raise ValueError(f"{type(scheduler).__name__} with {what} has no cg_fast equivalent; cg_fast samples with "
                     "DDPMScheduler, DDIMScheduler (set_alpha_to_one=True) and DPMSolverMultistepScheduler "
                     "(algorithm_type='dpmsolver++', solver_order=2, final_sigmas_type='zero'): use "
                     "SchedulerClass.from_config(scheduler.config, ...) with those settings")


def sampler_settings(scheduler: Any, num_inference_steps: int) -> dict[str, Any]:
    """The :class:`cg_fast.Sampler` arguments that sample as ``scheduler`` does over ``num_inference_steps``:
    schedule, method, timesteps (those ``set_timesteps`` sets, on a copy of the scheduler), prediction,
    clip_denoised and, for DDPM, the fixed variance (``variance=None`` with ``learn_sigma=True`` for
    "learned_range")."""
    d = require("diffusers")
    cfg = scheduler.config
    name = type(scheduler).__name__
    scheduler = type(scheduler).from_config(cfg)  # a copy: the caller's scheduler keeps its own timesteps
    if cfg.get("prediction_type", "epsilon") not in _PREDICTIONS:
        _fail(scheduler, f"prediction_type={cfg.prediction_type!r}")
    for flag in ("thresholding", "rescale_betas_zero_snr"):
        if cfg.get(flag, False):
            _fail(scheduler, f"{flag}=True")
    scheduler.set_timesteps(num_inference_steps)
    timesteps = [int(t) for t in scheduler.timesteps]
    out: dict[str, Any] = dict(schedule=NoiseSchedule.from_betas(scheduler.betas.double().numpy()),
                               timesteps=timesteps, prediction=_PREDICTIONS[cfg.get("prediction_type", "epsilon")])
    clip = bool(cfg.get("clip_sample", False))
    if clip and float(cfg.get("clip_sample_range", 1.0)) != 1.0:
        _fail(scheduler, f"clip_sample_range={cfg.clip_sample_range} (cg_fast clips x0 to [-1, 1])")
    if isinstance(scheduler, d.DDPMScheduler):
        vt = cfg.variance_type
        if vt not in _VARIANCES and vt != "learned_range":
            _fail(scheduler, f"variance_type={vt!r}")
        out.update(method="ddpm", clip_denoised=clip, learn_sigma=vt == "learned_range",
                   variance=_VARIANCES.get(vt))
    elif isinstance(scheduler, d.DDIMScheduler):
        if not cfg.set_alpha_to_one:
            _fail(scheduler, "set_alpha_to_one=False (its last step lands on alpha_bar_0, cg_fast's on the clean "
                             "sample)")
        ratio = cfg.num_train_timesteps // num_inference_steps  # diffusers' DDIM steps t -> t - ratio
        if any(a - ratio != b for a, b in zip(timesteps, timesteps[1:])) or timesteps[-1] - ratio >= 0:
            _fail(scheduler, f"timestep_spacing={cfg.timestep_spacing!r} over {num_inference_steps} steps (its "
                             f"steps t -> t - {ratio} skip between its own timesteps); 'leading' or 'trailing' work")
        out.update(method="ddim", clip_denoised=clip, learn_sigma=False)
    elif isinstance(scheduler, d.DPMSolverMultistepScheduler):
        want = dict(algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
                    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
                    use_lu_lambdas=False, use_flow_sigmas=False, variance_type=None)
        for key, v in want.items():
            if cfg.get(key, v) != v:
                _fail(scheduler, f"{key}={cfg.get(key)!r}")
        out.update(method="dpmpp2m", clip_denoised=False, learn_sigma=False)
    else:
        raise ValueError(f"{name} has no cg_fast equivalent: use DDPMScheduler, DDIMScheduler or "
                         "DPMSolverMultistepScheduler (SchedulerClass.from_config(scheduler.config))")
    return out


def diffusers_sampler(model: nn.Module, scheduler: Any, num_inference_steps: int, **overrides: Any) -> Sampler:
    """A :class:`cg_fast.Sampler` over ``model`` (an adapter above, or any cg_fast denoiser) that steps as
    ``scheduler`` does over ``num_inference_steps``; ``overrides`` are Sampler keyword arguments (``eta=`` for
    DDIM, ``kernels=``, ``rng=``, ...). The model's learned-variance channels must match the scheduler's
    variance type (``DiTAdapter(keep_variance=True)`` for "learned_range")."""
    settings = sampler_settings(scheduler, num_inference_steps)
    own = getattr(model, "learn_sigma", None)
    if own is not None and own != settings["learn_sigma"]:
        raise ValueError(
            f"the model {'returns' if own else 'does not return'} learned-variance channels but "
            f"{type(scheduler).__name__} {'does not use' if own else 'uses'} them: "
            + ("drop them (DiTAdapter(keep_variance=False)) or use DDPMScheduler(variance_type='learned_range')"
               if own else "use DiTAdapter(keep_variance=True) or a fixed variance_type"))
    if getattr(model, "class_cond", None) is not None:
        settings["class_cond"] = model.class_cond
    settings.update(overrides)
    schedule = settings.pop("schedule")
    return Sampler(model, schedule, **settings)
