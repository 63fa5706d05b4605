"""Read a checkpoint's architecture from its layout (parameter names and shapes), and load a checkpoint file
without flags.

    model = cg_fast.models.load_checkpoint("64x64_diffusion.pt")      # the published config, recognised
    model = cg_fast.models.load_checkpoint("my_adm.pt", noise_schedule="cosine", num_head_channels=64)

What the layout shows (guided-diffusion flag names; DiT arguments):

    ADM UNet    num_channels      time_embed.0.weight [4C, C]
                class_cond        label_emb.weight present (its rows: num_classes)
                learn_sigma       out.2.weight has 2x the input channels
                channel_mult      the output channels of each level's first ResBlock / num_channels
                num_res_blocks    output blocks per level - 1 (levels: output blocks that upsample + 1)
                attention_resolutions  the levels whose blocks hold .1.qkv (pixel size = image_size / 2^level)
                resblock_updown   a ResBlock (in_layers) rather than a conv (op) does the downsampling
                use_scale_shift_norm  emb_layers.1 gives 2x the block's channels
                image_size        from channel_mult when it is guided-diffusion's default for a size
    ADM classifier  the same for classifier_*; image_size from the attention pool's positional embedding
    DiT         patch size, hidden size and depth (so the name "DiT-XL/2"), input_size from pos_embed,
                num_classes from the label table (one extra row: the null class), learn_sigma

What it does not show (not in any weight) and must be given when the layout is not a published one: the
attention heads (num_heads / num_head_channels), use_new_attention_order, and how the model was trained
(noise_schedule, diffusion_steps, predict_xstart). `load_checkpoint` then takes guided-diffusion's defaults and
says which it assumed (`AssumedSettingsWarning`). This module reads layouts only; `loading.py` reads files.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["LayoutInfo", "AssumedSettingsWarning", "infer_layout", "layout_differences", "load_checkpoint"]

# settings no weight shows, per family, with the value guided-diffusion / DiT uses when none is given
_UNSEEN = {
    "adm-unet": dict(num_heads=4, num_head_channels=-1, use_new_attention_order=False, noise_schedule="linear",
                     diffusion_steps=1000, predict_xstart=False),
    "adm-classifier": dict(noise_schedule="linear", diffusion_steps=1000),
    "dit": {},
}


_GROUPS = ({"num_heads", "num_head_channels"}, {"noise_schedule", "diffusion_steps", "predict_xstart"})
_FAMILY_NAMES = {"adm-unet": "an ADM UNet", "adm-classifier": "an ADM classifier", "dit": "a DiT"}


class AssumedSettingsWarning(UserWarning):
    """`load_checkpoint` built a model whose settings it could not read from the layout from defaults."""


@dataclass
class LayoutInfo:
    """What a state dict's layout says: the family, the settings read from it, and the ones it cannot show.

    ``flags`` uses guided-diffusion's flag names for ADM models (``create_unet`` / ``create_classifier``
    arguments) and ``dit.create``'s arguments for DiT (``name``, ``input_size``, ``num_classes``, ...).
    """

    family: str
    flags: dict[str, Any] = field(default_factory=dict)
    unseen: tuple[str, ...] = ()


def _shape(sd: Mapping[str, Any], key: str) -> tuple[int, ...] | None:
    v = sd.get(key)
    return tuple(v.shape) if v is not None else None


def family_of(sd: Mapping[str, Any]) -> str:
    """'dit' (pos_embed), 'adm-unet' (output_blocks) or 'adm-classifier' (input_blocks only); ValueError else."""
    if "pos_embed" in sd and any(k.startswith("blocks.") for k in sd):
        return "dit"
    if any(k.startswith("output_blocks.") for k in sd):
        return "adm-unet"
    if any(k.startswith("input_blocks.") for k in sd) and "time_embed.0.weight" in sd:
        return "adm-classifier"
    raise ValueError("the state dict is neither an ADM UNet, an ADM classifier nor a DiT (no input_blocks, "
                     "output_blocks or pos_embed keys)")


def _indices(sd: Mapping[str, Any], prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _subparts(sd: Mapping[str, Any], prefix: str) -> dict[int, set[str]]:
    """{sub-index m: names of its first-level children} for the modules under ``prefix``."""
    out: dict[int, set[str]] = {}
    for k in sd:
        if k.startswith(prefix):
            m, _, rest = k[len(prefix):].partition(".")
            if m.isdigit():
                out.setdefault(int(m), set()).add(rest.split(".")[0])
    return out


def _mult_str(mult: list[float]) -> str:
    return ",".join(str(int(m)) if float(m).is_integer() else str(m) for m in mult)


def _adm_levels(sd: Mapping[str, Any], width: int, nrb: int, levels: int) -> tuple[list[float], list[int], bool]:
    """(channel_mult, levels with attention, resblock_updown) from the input blocks."""
    mult, attn = [], []
    for lvl in range(levels):
        first = 1 + lvl * (nrb + 1)  # the first ResBlock of the level
        out_ch = _shape(sd, f"input_blocks.{first}.0.out_layers.3.weight")
        if out_ch is None:
            raise ValueError(f"unexpected ADM layout: no input_blocks.{first}.0.out_layers.3.weight")
        m = out_ch[0] / width
        mult.append(int(m) if m.is_integer() else m)
        if f"input_blocks.{first}.1.qkv.weight" in sd:
            attn.append(lvl)
    updown = levels > 1 and f"input_blocks.{nrb + 1}.0.in_layers.0.weight" in sd
    return mult, attn, updown


def _image_size_for(mult: list[float]) -> int | None:
    from .adm import _CHANNEL_MULT

    for size, default in _CHANNEL_MULT.items():
        if tuple(mult) == tuple(default):
            return size
    return None


def _infer_unet(sd: Mapping[str, Any]) -> LayoutInfo:
    width = _shape(sd, "time_embed.0.weight")[1]
    in_ch = _shape(sd, "input_blocks.0.0.weight")[1]
    out_ch = _shape(sd, "out.2.weight")[0]
    outs = _indices(sd, "output_blocks.")
    # an output block that upsamples ends in a ResBlock (in_layers) or a conv Upsample (conv) after its first part
    ups = [k for k in outs
           if any(part & {"in_layers", "conv"} for m, part in _subparts(sd, f"output_blocks.{k}.").items() if m > 0)]
    levels = len(ups) + 1
    nrb = len(outs) // levels - 1
    mult, attn, updown = _adm_levels(sd, width, nrb, levels)
    flags: dict[str, Any] = dict(num_channels=width, num_res_blocks=nrb, learn_sigma=out_ch == 2 * in_ch,
                                 class_cond="label_emb.weight" in sd, resblock_updown=updown,
                                 use_scale_shift_norm=_shape(sd, "input_blocks.1.0.emb_layers.1.weight")[0]
                                 == 2 * _shape(sd, "input_blocks.1.0.out_layers.3.weight")[0])
    if in_ch != 3:
        flags["in_channels"] = in_ch
    if flags["class_cond"]:
        flags["num_classes"] = _shape(sd, "label_emb.weight")[0]
    size = _image_size_for(mult)
    unseen = list(_UNSEEN["adm-unet"])
    if size is not None:
        flags["image_size"] = size
        flags["channel_mult"] = ""
        flags["attention_resolutions"] = ",".join(str(size // 2 ** lvl) for lvl in attn)
    else:
        flags["channel_mult"] = _mult_str(mult)
        flags["_attention_levels"] = attn  # pixel resolutions need image_size, which this layout cannot show
        unseen.insert(0, "image_size")
    return LayoutInfo("adm-unet", flags, tuple(unseen))


def _infer_classifier(sd: Mapping[str, Any]) -> LayoutInfo:
    width = _shape(sd, "time_embed.0.weight")[1]
    in_ch = _shape(sd, "input_blocks.0.0.weight")[1]
    n_in = len(_indices(sd, "input_blocks."))  # = levels * (depth + 1)
    pos = _shape(sd, "out.2.positional_embedding")
    flags: dict[str, Any] = dict(classifier_width=width)
    if pos is None:
        raise ValueError("only ADM classifiers with attention pooling (classifier_pool='attention', as published) "
                         "can be read from their layout; build others with create_classifier(**flags)")
    spatial = math.isqrt(pos[1] - 1)
    from .adm import _CHANNEL_MULT

    found = []
    for size, mult in _CHANNEL_MULT.items():  # image size: final resolution x 2^(levels-1), levels by size
        levels = len(mult)
        if n_in % levels or spatial * 2 ** (levels - 1) != size:
            continue
        depth = n_in // levels - 1
        # the block closing each level (but the last) downsamples: same channels (no skip), no attention
        downs = [(lvl + 1) * (depth + 1) for lvl in range(levels - 1)]
        if any(_subparts(sd, f"input_blocks.{i}.").keys() - {0}
               or f"input_blocks.{i}.0.skip_connection.weight" in sd for i in downs):
            continue
        if depth < 1 or any(f"input_blocks.{1 + lvl * (depth + 1)}.0.out_layers.3.weight" not in sd
                            for lvl in range(levels)):
            continue
        got, attn, updown = _adm_levels(sd, width, depth, levels)
        if tuple(got) == tuple(mult):
            found.append(dict(image_size=size, classifier_depth=depth, classifier_resblock_updown=updown,
                              classifier_attention_resolutions=",".join(str(size // 2 ** lvl) for lvl in attn)))
    if len(found) != 1:
        raise ValueError(f"this ADM classifier layout ({n_in} input blocks, final resolution {spatial}) matches "
                         f"{'no' if not found else 'more than one'} image size with guided-diffusion's channel "
                         "multipliers; build it with adm.create_classifier(**flags) and load it with "
                         "cg_fast.models.load")
    flags.update(found[0])
    flags["classifier_use_scale_shift_norm"] = (_shape(sd, "input_blocks.1.0.emb_layers.1.weight")[0]
                                                == 2 * _shape(sd, "input_blocks.1.0.out_layers.3.weight")[0])
    flags["num_classes"] = _shape(sd, "out.2.c_proj.weight")[0]
    if in_ch != 3:
        flags["in_channels"] = in_ch
    return LayoutInfo("adm-classifier", flags, tuple(_UNSEEN["adm-classifier"]))


def _infer_dit(sd: Mapping[str, Any]) -> LayoutInfo:
    from .dit import DIT_ARCHS

    hidden, in_ch, patch, _ = _shape(sd, "x_embedder.proj.weight")
    tokens = _shape(sd, "pos_embed")[1]
    depth = len(_indices(sd, "blocks."))
    out_ch = _shape(sd, "final_layer.linear.weight")[0] // (patch * patch)
    rows = _shape(sd, "y_embedder.embedding_table.weight")[0]
    arch = next((a for a, (d, h, _) in DIT_ARCHS.items() if d == depth and h == hidden), None)
    flags: dict[str, Any] = dict(input_size=math.isqrt(tokens) * patch, learn_sigma=out_ch == 2 * in_ch,
                                 in_channels=in_ch)
    # DiT's label table has a null row when trained with label dropout (class_dropout_prob > 0)
    # (DiT's training always uses 0.1; pass class_dropout_prob=0 for a table without one)
    flags["num_classes"] = rows - 1
    if arch is not None:
        flags["name"] = f"DiT-{arch}/{patch}"
    else:
        flags.update(depth=depth, hidden_size=hidden, patch_size=patch)
    return LayoutInfo("dit", flags, ())


def infer_layout(sd: Mapping[str, Any]) -> LayoutInfo:
    """The family and the settings a state dict's layout shows (see the module docstring)."""
    family = family_of(sd)
    try:
        return {"adm-unet": _infer_unet, "adm-classifier": _infer_classifier, "dit": _infer_dit}[family](sd)
    except (TypeError, KeyError, IndexError) as e:  # a key the family always has is missing
        raise ValueError(f"the state dict looks like a {family} but lacks parts of its layout ({e})") from None


def layout_differences(checkpoint: Mapping[str, Any], model: Mapping[str, Any]) -> list[str]:
    """"flag: checkpoint X, model Y" for each setting the two layouts show differently (family first)."""
    try:
        a, b = infer_layout(checkpoint), infer_layout(model)
    except ValueError:
        return []
    if a.family != b.family:
        return [f"the checkpoint is {_FAMILY_NAMES[a.family]} but the model is {_FAMILY_NAMES[b.family]}"]
    diffs = []
    for k in sorted(set(a.flags) | set(b.flags)):
        if k.startswith("_") or a.flags.get(k) == b.flags.get(k):
            continue
        diffs.append(f"{k}: checkpoint {a.flags.get(k)!r}, model {b.flags.get(k)!r}")
    return diffs


def _build(info: LayoutInfo, given: dict[str, Any], dtype: torch.dtype | None) -> nn.Module:
    from . import adm, dit

    flags = {k: v for k, v in info.flags.items() if not k.startswith("_")}
    if info.family == "dit":
        unknown = set(given) - {"class_dropout_prob", "dtype", "image_size"}
        if unknown:
            raise TypeError(f"load_checkpoint: a DiT takes no settings {sorted(unknown)} (its layout shows them all)")
        flags.update(given)
        if flags.get("class_dropout_prob", 0.1) == 0:
            flags["num_classes"] += 1  # no null row: every row is a class
        if "name" not in flags:
            raise ValueError(f"this DiT layout (depth {flags['depth']}, hidden size {flags['hidden_size']}) is none "
                             "of DiT-S/B/L/XL: build it with cg_fast.models.dit.DiT(...) and load it with load()")
        kw = dict(dtype=dtype or torch.float32)
        return dit.create(**flags, **kw)
    flags.update(given)
    attn_levels = info.flags.get("_attention_levels")
    if attn_levels is not None:
        if "image_size" not in given:
            raise ValueError(f"this ADM UNet's channel multipliers ({flags['channel_mult']}) are not guided-"
                             "diffusion's default for any image size, so its image size cannot be read from the "
                             "layout: pass image_size=...")
        flags.setdefault("attention_resolutions",
                         ",".join(str(int(given["image_size"]) // 2 ** lvl) for lvl in attn_levels))
    if info.family == "adm-unet":
        return adm.create_unet(dtype=dtype, **flags)
    return adm.create_classifier(dtype=dtype, **flags)


def load_checkpoint(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    **flags: Any,
) -> nn.Module:
    """A model built for, and loaded from, a checkpoint file (or state dict), with no flags needed.

    A published layout (guided-diffusion's ADM UNets and classifiers, DiT-XL/2; `checkpoint_layouts.json`)
    gives that named config with its published settings (schedule, heads, guidance defaults). Any other
    layout is read (see the module docstring); ``flags`` (guided-diffusion's flag names, e.g.
    ``noise_schedule="cosine"``, ``num_head_channels=64``; for DiT ``class_dropout_prob``) give what the
    layout cannot show, and a warning names each setting that was assumed instead. A flag that contradicts
    the layout ends in a `LayoutMismatchError` naming it. The model comes back in eval mode on ``device``,
    with its ``cg_config``, ready for ``Sampler.from_model``.
    """
    from .configs import CONFIGS, create
    from .loading import _strip_prefix, find_configs, load, read_checkpoint, unwrap_state_dict

    obj = read_checkpoint(source, "cpu") if isinstance(source, (str, os.PathLike)) else source
    sd = unwrap_state_dict(obj)
    sd = _strip_prefix(sd, {"time_embed.0.weight", "pos_embed", "input_blocks.0.0.weight"})
    info = infer_layout(sd)
    matches = find_configs(sd)
    matches = [n for n in matches if CONFIGS[n].published] or matches  # published first, then test configs
    if matches and not flags:
        model = create(matches[0], dtype=dtype, device="meta")
    else:
        # a group counts as answered when one of its settings is given (heads: either way of saying them)
        answered = set(flags)
        for group in _GROUPS:
            if answered & group:
                answered |= group
        assumed = [k for k in info.unseen if k not in answered and k != "image_size"]
        if assumed:
            defaults = {**_UNSEEN.get(info.family, {})}
            said = ", ".join(f"{k}={defaults[k]!r}" if k in defaults else k for k in assumed)
            warnings.warn(f"load_checkpoint: the checkpoint's layout does not show {said}; guided-diffusion's "
                          "defaults are used. Pass them (e.g. load_checkpoint(path, noise_schedule='cosine', "
                          "num_head_channels=64)) if the model was trained otherwise.",
                          AssumedSettingsWarning, stacklevel=2)
        with torch.device("meta"):
            model = _build(info, flags, dtype)
    return load(model, sd, device=device).eval()
