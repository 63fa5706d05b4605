"""`CGConfig`: everything a sampler needs to know about a model, carried by the model as `model.cg_config`.

Every model cg_fast builds carries one (named configs, guided-diffusion flags, DiT names, the digits testbed's
networks), and `cg_fast.Sampler` reads it, so that a checkpoint samples correctly without its settings being
typed again. This module owns the description only: it imports nothing from the rest of cg_fast, which ends
the import circle between `configs` and the `adm` / `dit` builders.

    model.cg_config.noise_schedule   # 'cosine' for guided-diffusion's 64x64 model
    model.cg_config.sampler_settings()  # the Sampler keyword arguments it implies
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Literal

__all__ = ["CGConfig", "SAMPLER_FIELDS"]

# CGConfig field -> Sampler keyword argument, for the settings a sampler takes from the model's config
SAMPLER_FIELDS: dict[str, str] = {
    "learn_sigma": "learn_sigma",
    "prediction": "prediction",
    "class_cond": "class_cond",
    "clip_denoised": "clip_denoised",
    "variance": "variance",
    "num_classes": "num_classes",
}


@dataclass(frozen=True)
class CGConfig:
    """What a sampler needs to know about a model (attached to every created model as `model.cg_config`).

    kind: 'adm-unet' | 'adm-classifier' | 'dit' | 'digits-unet' | 'digits-classifier'.
    learn_sigma: the output has 2*in_channels channels, eps then the variance interpolation v.
    class_cond: the denoiser takes labels y. num_classes: labels y accepted (classifier: logits), None if none.
    image_size: pixel resolution; input_size: spatial size of the model input (latent size for DiT).
    noise_schedule: 'linear' | 'cosine' over diffusion_steps training steps (t is always in 0..steps-1).
    prediction: what the network predicts, 'eps' | 'x0' | 'v' (guided-diffusion's --predict_xstart gives 'x0').
    variance: fixed variance when not learn_sigma, 'fixed_large' (guided-diffusion's scripts) | 'fixed_small'.
    clip_denoised: clamp predicted x0 to [-1, 1] (pixel models). latent_scale: VAE latent scale (DiT 0.18215).
    null_label: the unconditional label for classifier-free guidance (DiT: num_classes), None if none.
    cfg_channels: how many leading channels CFG guides by the model's own convention (DiT's sample.py: 3 of
        the 4 latent channels, spec §6); None = all channels.
    method: the sampler of the published setting, 'ddpm' | 'ddim' (guided-diffusion's --use_ddim) | 'dpmpp2m'.
    timestep_respacing, guidance_scale, classifier: sampler defaults of the published setting (None: none).
    """

    kind: Literal["adm-unet", "adm-classifier", "dit", "digits-unet", "digits-classifier"]
    learn_sigma: bool
    class_cond: bool
    num_classes: int | None
    image_size: int
    input_size: int
    in_channels: int
    out_channels: int
    noise_schedule: Literal["linear", "cosine"] = "linear"
    diffusion_steps: int = 1000
    prediction: Literal["eps", "x0", "v"] = "eps"
    variance: Literal["fixed_large", "fixed_small"] = "fixed_large"
    clip_denoised: bool = True
    latent_scale: float | None = None
    null_label: int | None = None
    cfg_channels: int | None = None
    method: Literal["ddpm", "ddim", "dpmpp2m"] = "ddpm"
    name: str | None = None
    timestep_respacing: str | None = None
    guidance_scale: float | None = None
    classifier: str | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one model input."""
        return (self.in_channels, self.input_size, self.input_size)

    @property
    def is_denoiser(self) -> bool:
        """False for classifiers (they guide a denoiser; they cannot be sampled from)."""
        return not self.kind.endswith("classifier")

    def sampler_settings(self) -> dict[str, Any]:
        """The `Sampler` keyword arguments this config implies (see `SAMPLER_FIELDS`)."""
        return {arg: getattr(self, f) for f, arg in SAMPLER_FIELDS.items()}

    def describe(self) -> str:
        """A one-line summary for messages: the name if any, else the kind."""
        return repr(self.name) if self.name else f"a {self.kind} model"

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))
