"""Build ADM models from guided-diffusion's own command-line flags.

    FLAGS = "--attention_resolutions 32,16,8 --class_cond True --image_size 64 --learn_sigma True ..."
    unet = create_unet(**parse_flags(FLAGS).model)   # or create_unet(image_size=64, num_channels=192, ...)
    classifier = create_classifier(**parse_flags(FLAGS).classifier)
    sampler = cg_fast.Sampler.from_model(unet)       # schedule, steps, variance, clipping from the flags

Flag names, defaults and derived values (channel_mult by image size, attention resolutions given as pixel
resolutions, 1000 ImageNet classes, out_channels 6 with learn_sigma) are those of guided-diffusion's
`script_util`. `parse_flags(...).model` holds the network flags *and* the diffusion and sampling flags that
decide how the model must be sampled (`noise_schedule`, `diffusion_steps`, `predict_xstart`,
`timestep_respacing`, `clip_denoised`, `use_ddim`), so the model built from it carries them in
`model.cg_config` and `Sampler.from_model` uses them. `create_unet` / `create_classifier` accept every
guided-diffusion flag, so a whole flag dict can be passed; an unknown flag is an error with a did-you-mean.
`use_checkpoint` (gradient checkpointing) is accepted and has no effect: these models are for inference.
"""
from __future__ import annotations

import difflib
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .adm_unet import EncoderUNetModel, UNetModel
from .cg_config import CGConfig

__all__ = [
    "MODEL_DEFAULTS",
    "CLASSIFIER_DEFAULTS",
    "DIFFUSION_DEFAULTS",
    "SAMPLING_DEFAULTS",
    "NUM_CLASSES",
    "ParsedFlags",
    "parse_flags",
    "channel_mult_for",
    "create_unet",
    "create_classifier",
]

NUM_CLASSES = 1000  # ImageNet; guided-diffusion's NUM_CLASSES

MODEL_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    num_channels=128,
    num_res_blocks=2,
    num_heads=4,
    num_heads_upsample=-1,
    num_head_channels=-1,
    attention_resolutions="16,8",
    channel_mult="",
    dropout=0.0,
    class_cond=False,
    use_checkpoint=False,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_fp16=False,
    use_new_attention_order=False,
    learn_sigma=False,
)
CLASSIFIER_DEFAULTS: dict[str, Any] = dict(
    image_size=64,
    classifier_use_fp16=False,
    classifier_width=128,
    classifier_depth=2,
    classifier_attention_resolutions="32,16,8",
    classifier_use_scale_shift_norm=True,
    classifier_resblock_updown=True,
    classifier_pool="attention",
)
DIFFUSION_DEFAULTS: dict[str, Any] = dict(
    learn_sigma=False,
    diffusion_steps=1000,
    noise_schedule="linear",
    timestep_respacing="",
    use_kl=False,
    predict_xstart=False,
    rescale_timesteps=False,
    rescale_learned_sigmas=False,
)
# the sampling scripts' own flags (classifier_sample.py / image_sample.py)
SAMPLING_DEFAULTS: dict[str, Any] = dict(
    clip_denoised=True,
    num_samples=10000,
    batch_size=16,
    use_ddim=False,
    model_path="",
    classifier_path="",
    classifier_scale=1.0,
)
_ALL_DEFAULTS = {**SAMPLING_DEFAULTS, **DIFFUSION_DEFAULTS, **CLASSIFIER_DEFAULTS, **MODEL_DEFAULTS}

# channel multipliers guided-diffusion chooses by image size when channel_mult == ""
_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}
# not guided-diffusion flags: cg_fast options that create_unet / create_classifier also take
_EXTRA_OPTIONS = (
    "dtype",
    "channels_last",
    "num_classes",
    "in_channels",
    "classifier_channel_mult",
    "classifier_num_head_channels",
)


def _str2bool(v: str) -> bool:
    s = v.lower()
    if s in ("yes", "true", "t", "y", "1"):
        return True
    if s in ("no", "false", "f", "n", "0"):
        return False
    raise ValueError(f"boolean value expected, got {v!r}")


def _convert(name: str, value: str) -> Any:
    default = _ALL_DEFAULTS.get(name)
    if isinstance(default, bool):
        return _str2bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return value


# diffusion / sampling flags that decide how a network must be sampled: they go into its cg_config
_SAMPLING_OF_MODEL = ("clip_denoised", "use_ddim")
_SAMPLING_OF_CLASSIFIER = ("classifier_scale",)


@dataclass
class ParsedFlags:
    """A guided-diffusion flag string split by what each flag configures (only the flags given).

    `model` and `classifier` can be passed as they are to `create_unet` / `create_classifier`: `model` holds
    the UNet flags plus the diffusion flags and `clip_denoised` / `use_ddim` (how the UNet is sampled);
    `classifier` holds the classifier flags plus `noise_schedule` / `diffusion_steps` and `classifier_scale`.
    `diffusion` holds the diffusion flags alone; `other` the remaining sampling-script flags (paths, counts).
    Unknown flags are refused by `parse_flags`, so nothing given is ever dropped.
    """

    model: dict[str, Any] = field(default_factory=dict)
    classifier: dict[str, Any] = field(default_factory=dict)
    diffusion: dict[str, Any] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict)


def parse_flags(flags: str | Sequence[str]) -> ParsedFlags:
    """Parse "--image_size 64 --num_channels 192 --class_cond True ..." (also "--flag=value").

    Values are converted with the type of guided-diffusion's default (booleans accept True/False/yes/no/1/0).
    A flag guided-diffusion does not know raises ValueError naming the closest valid flag.
    """
    tokens = shlex.split(flags) if isinstance(flags, str) else list(flags)
    out = ParsedFlags()
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ValueError(f"parse_flags: expected a --flag, got {tok!r}")
        name, eq, value = tok[2:].partition("=")
        if not eq:
            if i + 1 >= len(tokens):
                raise ValueError(f"parse_flags: flag --{name} has no value")
            value = tokens[i + 1]
            i += 1
        i += 1
        name = name.replace("-", "_")
        if name not in _ALL_DEFAULTS:
            raise ValueError(f"parse_flags: unknown flag --{name}{_did_you_mean(name, _ALL_DEFAULTS)}; "
                             f"guided-diffusion's flags are: {', '.join(sorted(_ALL_DEFAULTS))}")
        try:
            converted = _convert(name, value)
        except ValueError as e:
            raise ValueError(f"parse_flags: bad value for --{name}: {e}") from None
        if name in MODEL_DEFAULTS or name in DIFFUSION_DEFAULTS or name in _SAMPLING_OF_MODEL:
            out.model[name] = converted
        if name in CLASSIFIER_DEFAULTS or name in ("noise_schedule", "diffusion_steps") \
                or name in _SAMPLING_OF_CLASSIFIER:
            out.classifier[name] = converted
        if name in DIFFUSION_DEFAULTS:
            out.diffusion[name] = converted
        if name in SAMPLING_DEFAULTS and name not in _SAMPLING_OF_MODEL + _SAMPLING_OF_CLASSIFIER:
            out.other[name] = converted
    return out


def _did_you_mean(name: str, valid) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1)
    return f" (did you mean --{close[0]}?)" if close else ""


def channel_mult_for(image_size: int, channel_mult: str | Sequence[float] = "") -> tuple[float, ...]:
    """guided-diffusion's channel multipliers: a "1,2,3,4" string, a sequence, or "" for the image-size default."""
    if isinstance(channel_mult, str):
        if channel_mult == "":
            if image_size not in _CHANNEL_MULT:
                raise ValueError(
                    f"no default channel_mult for image_size={image_size} (known: {sorted(_CHANNEL_MULT)}); "
                    'pass channel_mult, e.g. "1,2,2"'
                )
            return _CHANNEL_MULT[image_size]
        return tuple(float(m) if "." in m else int(m) for m in channel_mult.split(","))
    return tuple(channel_mult)


def _attention_ds(image_size: int, resolutions: str | Sequence[int]) -> tuple[int, ...]:
    """Attention resolutions are pixel sizes ("32,16,8"); the network wants downsampling factors."""
    if isinstance(resolutions, str):
        resolutions = [int(r) for r in resolutions.split(",") if r.strip()]
    return tuple(image_size // int(r) for r in resolutions)


def _check_names(flags: dict[str, Any], who: str) -> None:
    unknown = [k for k in flags if k not in _ALL_DEFAULTS and k not in _EXTRA_OPTIONS]
    if unknown:
        valid = sorted(_ALL_DEFAULTS) + list(_EXTRA_OPTIONS)
        hints = {k: difflib.get_close_matches(k, valid, n=1) for k in unknown}
        said = ", ".join(f"{k} (did you mean {h[0]}?)" if h else k for k, h in hints.items())
        raise TypeError(f"{who}: unknown flag(s) {said}; valid flags: {', '.join(valid)}")


def _sampling_fields(f: dict[str, Any]) -> dict[str, Any]:
    """The CGConfig fields that guided-diffusion's diffusion and sampling flags decide."""
    steps = int(f["diffusion_steps"])
    if f["rescale_timesteps"] and steps != 1000:
        raise ValueError("rescale_timesteps=True with diffusion_steps != 1000 feeds the network t * 1000 / "
                         "diffusion_steps, which cg_fast's samplers do not do; such a checkpoint is not supported")
    if f["noise_schedule"] not in ("linear", "cosine"):
        raise ValueError(f"unknown noise_schedule {f['noise_schedule']!r}: guided-diffusion has 'linear' and 'cosine'")
    return dict(
        noise_schedule=str(f["noise_schedule"]),
        diffusion_steps=steps,
        prediction="x0" if f["predict_xstart"] else "eps",
        variance="fixed_large",  # guided-diffusion's scripts never set sigma_small
        clip_denoised=bool(f["clip_denoised"]),
        method="ddim" if f["use_ddim"] else "ddpm",
        timestep_respacing=str(f["timestep_respacing"]) or None,
    )


def create_unet(
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    num_classes: int = NUM_CLASSES,
    in_channels: int = 3,
    **flags: Any,
) -> UNetModel:
    """An ADM UNet from guided-diffusion flags (`image_size`, `num_channels`, `class_cond`, ...), in eval mode.

    `dtype` overrides `use_fp16` for the convolution body (float32, float16 or bfloat16). `num_classes` and
    `in_channels` are not guided-diffusion flags (it fixes 1000 and 3); they exist for small test models.
    """
    _check_names(flags, "create_unet")
    f = {**_ALL_DEFAULTS, **MODEL_DEFAULTS, **flags}
    image_size = int(f["image_size"])
    out_channels = 2 * in_channels if f["learn_sigma"] else in_channels
    model = UNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=int(f["num_channels"]),
        out_channels=out_channels,
        num_res_blocks=int(f["num_res_blocks"]),
        attention_resolutions=_attention_ds(image_size, f["attention_resolutions"]),
        dropout=float(f["dropout"]),
        channel_mult=channel_mult_for(image_size, f["channel_mult"]),
        num_classes=num_classes if f["class_cond"] else None,
        use_fp16=bool(f["use_fp16"]),
        num_heads=int(f["num_heads"]),
        num_head_channels=int(f["num_head_channels"]),
        num_heads_upsample=int(f["num_heads_upsample"]),
        use_scale_shift_norm=bool(f["use_scale_shift_norm"]),
        resblock_updown=bool(f["resblock_updown"]),
        use_new_attention_order=bool(f["use_new_attention_order"]),
        dtype=dtype,
        channels_last=channels_last,
    )
    model.cg_config = CGConfig(
        kind="adm-unet",
        learn_sigma=bool(f["learn_sigma"]),
        class_cond=bool(f["class_cond"]),
        num_classes=num_classes if f["class_cond"] else None,
        image_size=image_size,
        input_size=image_size,
        in_channels=in_channels,
        out_channels=out_channels,
        **_sampling_fields(f),
    )
    return model.eval()


def create_classifier(
    *,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    num_classes: int = NUM_CLASSES,
    in_channels: int = 3,
    classifier_channel_mult: str | Sequence[float] = "",
    classifier_num_head_channels: int = 64,
    **flags: Any,
) -> EncoderUNetModel:
    """An ADM noisy-image classifier from guided-diffusion flags (`image_size`, `classifier_*`), in eval mode.

    Like guided-diffusion: 64 channels per attention head, no dropout, `classifier_depth` ResBlocks per level,
    channel multipliers by image size (a UNet's `channel_mult` flag is ignored, as guided-diffusion does).
    `dtype` overrides `classifier_use_fp16`. The classifier is `classifier(x, t) -> logits [B, num_classes]`.
    `num_classes`, `in_channels`, `classifier_channel_mult` and `classifier_num_head_channels` are not
    guided-diffusion flags; they exist for small test models.
    """
    _check_names(flags, "create_classifier")
    f = {**_ALL_DEFAULTS, **CLASSIFIER_DEFAULTS, **flags}
    image_size = int(f["image_size"])
    model = EncoderUNetModel(
        image_size=image_size,
        in_channels=in_channels,
        model_channels=int(f["classifier_width"]),
        out_channels=num_classes,
        num_res_blocks=int(f["classifier_depth"]),
        attention_resolutions=_attention_ds(image_size, f["classifier_attention_resolutions"]),
        channel_mult=channel_mult_for(image_size, classifier_channel_mult),
        use_fp16=bool(f["classifier_use_fp16"]),
        num_head_channels=classifier_num_head_channels,
        use_scale_shift_norm=bool(f["classifier_use_scale_shift_norm"]),
        resblock_updown=bool(f["classifier_resblock_updown"]),
        pool=str(f["classifier_pool"]),
        dtype=dtype,
        channels_last=channels_last,
    )
    model.cg_config = CGConfig(
        kind="adm-classifier",
        learn_sigma=False,
        class_cond=False,
        num_classes=num_classes,
        image_size=image_size,
        input_size=image_size,
        in_channels=in_channels,
        out_channels=num_classes,
        noise_schedule=str(_sampling_fields(f)["noise_schedule"]),
        diffusion_steps=int(f["diffusion_steps"]),
        guidance_scale=float(f["classifier_scale"]) if "classifier_scale" in flags else None,
    )
    return model.eval()
