"""Named configurations of the published checkpoints (and tiny ones for tests), and `CGConfig`, the
description of a model that samplers read from `model.cg_config`.

    model = cg_fast.models.create("adm-64-cond")        # guided-diffusion 64x64_diffusion.pt
    model.cg_config.noise_schedule                      # 'cosine'

Sampler defaults (`timestep_respacing`, `guidance_scale`) are the values of the authors' READMEs:
guided-diffusion's classifier_sample commands (250 steps; classifier scale 1.0 / 0.5 / 1.0 / 10.0 / 4.0) and
DiT's sample.py (250 DDPM steps, CFG scale 4.0; its FID runs use 1.5).
"""
from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from .cg_config import CGConfig

__all__ = ["CGConfig", "ModelSpec", "CONFIGS", "list_configs", "get_spec", "create"]


@dataclass(frozen=True)
class ModelSpec:
    """A named configuration: which factory, with which arguments, and the sampler defaults to attach."""

    family: Literal["adm-unet", "adm-classifier", "dit"]
    kwargs: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)
    published: bool = True
    description: str = ""


_ADM_COMMON = dict(
    attention_resolutions="32,16,8",
    learn_sigma=True,
    num_res_blocks=2,
    resblock_updown=True,
    use_scale_shift_norm=True,
    diffusion_steps=1000,
)


def _adm(image_size: int, cond: bool, scale: float, **flags: Any) -> ModelSpec:
    kw = {**_ADM_COMMON, "image_size": image_size, "class_cond": cond, "num_channels": 256, **flags}
    kw.setdefault("noise_schedule", "linear")
    kw.setdefault("use_fp16", True)
    what = "class-conditional" if cond else "unconditional"
    file = f"{image_size}x{image_size}_diffusion{'' if cond else '_uncond'}.pt"
    return ModelSpec(
        "adm-unet",
        kw,
        dict(timestep_respacing="250", guidance_scale=scale, classifier=f"adm-{image_size}-classifier"),
        description=f"guided-diffusion ImageNet {image_size}x{image_size} {what} UNet ({file})",
    )


def _classifier(image_size: int, **flags: Any) -> ModelSpec:
    return ModelSpec(
        "adm-classifier",
        {"image_size": image_size, **flags},  # the rest: guided-diffusion defaults (adm.CLASSIFIER_DEFAULTS),
        description=f"guided-diffusion ImageNet {image_size}x{image_size} noisy classifier "
        f"({image_size}x{image_size}_classifier.pt)",
    )


CONFIGS: dict[str, ModelSpec] = {
    "adm-64-cond": _adm(
        64, True, 1.0, num_channels=192, num_head_channels=64, num_res_blocks=3, dropout=0.1,
        use_new_attention_order=True, noise_schedule="cosine",
    ),
    "adm-128-cond": _adm(128, True, 0.5, num_heads=4),
    "adm-256-cond": _adm(256, True, 1.0, num_head_channels=64),
    "adm-256-uncond": _adm(256, False, 10.0, num_head_channels=64),
    "adm-512-cond": _adm(512, True, 4.0, num_head_channels=64, use_fp16=False),
    "adm-64-classifier": _classifier(64, classifier_depth=4),
    "adm-128-classifier": _classifier(128),
    "adm-256-classifier": _classifier(256),
    "adm-512-classifier": _classifier(512),
}
for _arch in ("xl", "l", "b", "s"):
    for _patch in (2, 4, 8):
        for _res in (256, 512):
            _published = _arch == "xl" and _patch == 2
            CONFIGS[f"dit-{_arch}-{_patch}-{_res}"] = ModelSpec(
                "dit",
                dict(name=f"DiT-{_arch.upper()}/{_patch}", input_size=_res // 8, image_size=_res),
                dict(timestep_respacing="250", guidance_scale=4.0),
                published=_published,
                description=f"DiT-{_arch.upper()}/{_patch} for {_res}x{_res} images"
                + (f" (DiT-XL-2-{_res}x{_res}.pt)" if _published else " (no released checkpoint)"),
            )

# Tiny models for tests and CPU benchmarks (random weights; no checkpoint).
_TINY_ADM = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
    num_head_channels=16, learn_sigma=True, resblock_updown=True, use_scale_shift_norm=True,
    use_new_attention_order=True, noise_schedule="linear", num_classes=10,
)
CONFIGS.update(
    {
        "adm-tiny-cond": ModelSpec(
            "adm-unet", {**_TINY_ADM, "class_cond": True}, dict(classifier="adm-tiny-classifier"),
            published=False, description="tiny class-conditional ADM UNet (16x16, 10 classes) for tests",
        ),
        "adm-tiny-uncond": ModelSpec(
            "adm-unet",
            {**_TINY_ADM, "class_cond": False, "learn_sigma": False, "resblock_updown": False,
             "use_scale_shift_norm": False, "use_new_attention_order": False, "num_heads": 2,
             "num_head_channels": -1},
            dict(classifier="adm-tiny-classifier"),
            published=False,
            description="tiny unconditional ADM UNet (conv resampling, legacy attention order) for tests",
        ),
        "adm-tiny-classifier": ModelSpec(
            "adm-classifier",
            dict(image_size=16, classifier_width=32, classifier_depth=1, classifier_channel_mult="1,2",
                 classifier_attention_resolutions="8", classifier_num_head_channels=16, num_classes=10),
            published=False, description="tiny ADM classifier (16x16, 10 classes) for tests",
        ),
        "dit-tiny": ModelSpec(
            "dit",
            dict(depth=2, hidden_size=64, num_heads=4, patch_size=2, input_size=8, num_classes=10,
                 image_size=64),
            dict(guidance_scale=4.0),
            published=False, description="tiny DiT (8x8x4 latents, 2 blocks, 10 classes) for tests",
        ),
    }
)


def list_configs(published_only: bool = False) -> list[str]:
    """Names accepted by `create`, sorted; `published_only` keeps those with a released checkpoint."""
    return sorted(n for n, s in CONFIGS.items() if s.published or not published_only)


def get_spec(name: str) -> ModelSpec:
    """The `ModelSpec` of a named config; a ValueError listing the valid names otherwise."""
    try:
        return CONFIGS[name]
    except KeyError:
        close = difflib.get_close_matches(name, CONFIGS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown model config {name!r}{hint}; valid names: {', '.join(list_configs())}") from None


def _build(spec: ModelSpec, dtype: torch.dtype | None, channels_last: bool) -> nn.Module:
    from . import adm, dit  # late import: adm and dit import CGConfig from here

    kw = dict(spec.kwargs)
    if spec.family == "adm-unet":
        return adm.create_unet(dtype=dtype, channels_last=channels_last, **kw)
    if spec.family == "adm-classifier":
        return adm.create_classifier(dtype=dtype, channels_last=channels_last, **kw)
    if channels_last:
        raise ValueError("channels_last applies to the ADM convolution networks, not to DiT")
    image_size = kw.pop("image_size", None)
    if "name" in kw:
        model = dit.create(**kw, dtype=dtype or torch.float32, image_size=image_size)
    else:
        model = dit.DiT(**kw, dtype=dtype or torch.float32).eval()
        model.cg_config = dit.dit_cg_config(model, image_size=image_size)
    return model


def create(
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    channels_last: bool = False,
) -> nn.Module:
    """Build the named model (random weights, eval mode) with its `cg_config`; load weights with `load`.

    dtype: compute dtype of the network body (None: the published setting, e.g. fp16 for ADM UNets with
    `use_fp16`). device: where to build it ("meta" builds no storage, to inspect a layout).
    channels_last: NHWC convolutions for ADM models (helps fp16/bf16 on GPUs).
    """
    spec = get_spec(name)
    builder: Callable[[], nn.Module] = lambda: _build(spec, dtype, channels_last)  # noqa: E731
    if device is not None:
        with torch.device(device):
            model = builder()
    else:
        model = builder()
    model.cg_config = replace(model.cg_config, name=name, **spec.defaults)
    return model
