"""Load public checkpoints into cg_fast models, safely and with errors that say what is wrong.

    model = cg_fast.models.create("adm-64-cond")
    cg_fast.models.load(model, "64x64_diffusion.pt")

Accepted: a `.pt` / `.pth` / `.bin` file read with `torch.load(weights_only=True)` (no arbitrary object is ever
unpickled; `argparse.Namespace`, which DiT training checkpoints keep under "args", is the one class allowed), a
`.safetensors` file, or an in-memory state dict. Wrapped checkpoints are unwrapped: DiT training checkpoints
({"model", "ema", "opt", "args"}) give their "ema" weights, with a warning naming the choice (pass
``read_checkpoint(path)["model"]`` for the raw weights); "state_dict" / "model" wrappers are opened. A key
prefix that every key carries and the model lacks ("module." from DistributedDataParallel, "_orig_mod." from
torch.compile) is stripped with a warning. A model built on the meta device is materialised by `load` itself,
which skips the random initialisation of a large model (seconds on a CPU). Refused, with a `CheckpointError`
naming the tensors: floating-point parameters stored as integers (a cast would silently change the values)
and NaN or infinite values.
"""
from __future__ import annotations

import argparse
import functools
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["CheckpointError", "LayoutMismatchError", "load", "read_checkpoint", "unwrap_state_dict", "find_configs"]

# wrapper keys tried in order: DiT keeps EMA weights (the ones to sample with) under "ema"
_WRAPPER_KEYS = ("ema", "state_dict", "model", "module", "net")
_STRIPPABLE_PREFIXES = ("module.", "_orig_mod.", "model.")
_SHOW = 5  # keys listed per category in a mismatch error


class CheckpointError(RuntimeError):
    """A checkpoint could not be read or does not fit the model."""


class LayoutMismatchError(CheckpointError):
    """The checkpoint's keys or shapes differ from the model's; `matching_configs` names configs that fit."""

    def __init__(
        self,
        message: str,
        missing: list[str],
        unexpected: list[str],
        wrong_shape: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        matching_configs: list[str],
    ) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.wrong_shape = wrong_shape
        self.matching_configs = matching_configs


def read_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Any:
    """Read a checkpoint file without unpickling arbitrary objects (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):  # by content, whatever the name says
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ImportError(
                f"reading {path.name} needs the safetensors package: pip install safetensors"
            ) from None
        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:  # safetensors raises its own error type for truncated headers and data
            raise CheckpointError(f"could not read {path}: {e} (truncated or not a safetensors file?)") from e
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        text = str(e)
        if "weights_only" in text or "Weights only" in text or "Unsupported global" in text:
            detail = next((ln.strip() for ln in text.splitlines() if "Unsupported global" in ln), "")
            raise CheckpointError(
                f"refusing to unpickle {path}: it holds Python objects other than tensors and containers, and "
                "cg_fast loads with torch.load(weights_only=True). Save a plain state_dict (or .safetensors) "
                f"instead. {detail}".rstrip()
            ) from e
        raise CheckpointError(
            f"could not read {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} "
            "(is the file truncated, or not a PyTorch checkpoint?)"
        ) from e


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with the 8-byte little-endian length of a JSON header that opens with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    n = int.from_bytes(head[:8], "little")
    return 2 <= n <= path.stat().st_size - 8


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """The tensor state dict inside a checkpoint object (plain, or wrapped under "ema"/"state_dict"/"model")."""
    seen = 0
    while not _is_state_dict(obj):
        if not isinstance(obj, Mapping) or seen > 3:
            raise CheckpointError(f"checkpoint holds no state dict of tensors (got {type(obj).__name__})")
        found = [k for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)]
        inner = obj[found[0]] if found else None
        if len(found) > 1:
            warnings.warn(
                f"cg_fast.models.load: the checkpoint holds weights under {found}; loading {found[0]!r}"
                + (" (the EMA weights, the ones to sample with)" if found[0] == "ema" else "")
                + f". To load another, pass read_checkpoint(path)[{found[1]!r}] instead of the path",
                stacklevel=3,
            )
        if inner is None:
            keys = ", ".join(map(str, list(obj)[:10]))
            raise CheckpointError(
                f"checkpoint is a dict with keys [{keys}] but no tensor state dict under any of {_WRAPPER_KEYS}"
            )
        obj = inner
        seen += 1
    return dict(obj)


def _strip_prefix(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    changed = True
    while changed and not (set(sd) & model_keys):
        changed = False
        for prefix in _STRIPPABLE_PREFIXES:
            if all(k.startswith(prefix) for k in sd) and not any(k.startswith(prefix) for k in model_keys):
                warnings.warn(
                    f"cg_fast.models.load: stripped the prefix {prefix!r} from all {len(sd)} checkpoint keys",
                    stacklevel=3,
                )
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
                break
    return sd


@functools.lru_cache(maxsize=None)
def _config_layout(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from .configs import create

    model = create(name, device="meta")
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def find_configs(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of registered configs whose parameter names and shapes are exactly those of `state_dict`.

    Layouts are built on the meta device (no memory) and cached; only configs of the checkpoint's family
    (DiT has `pos_embed`, ADM UNets `output_blocks`, ADM classifiers neither) with the same key count are built.
    """
    from .configs import CONFIGS

    layout = {k: tuple(v.shape) for k, v in state_dict.items()}
    if "pos_embed" in layout:
        family = "dit"
    elif any(k.startswith("output_blocks.") for k in layout):
        family = "adm-unet"
    else:
        family = "adm-classifier"
    found = []
    for name, spec in CONFIGS.items():
        if spec.family != family:
            continue
        if spec.family == "dit" and "pos_embed" in layout:
            # cheap pre-filter on hidden size and token count before building
            n_tokens = layout["pos_embed"][1]
            if (spec.kwargs.get("input_size", 0) // _dit_patch(spec.kwargs)) ** 2 != n_tokens:
                continue
        cand = _config_layout(name)
        if len(cand) == len(layout) and all(layout.get(k) == s for k, s in cand):
            found.append(name)
    return found


def _dit_patch(kwargs: Mapping[str, Any]) -> int:
    if "patch_size" in kwargs:
        return int(kwargs["patch_size"])
    return int(str(kwargs["name"]).rsplit("/", 1)[1])


def _fmt_shape(s: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def load(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Any],
    *,
    map_location: str | torch.device = "cpu",
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load `source` (a checkpoint path or a state dict) into `model` exactly; returns `model`.

    Every parameter must be present with its shape and no extra key may remain; otherwise a
    `LayoutMismatchError` lists the first missing, unexpected and wrong-shape keys and names the registered
    config whose layout matches the checkpoint, if there is one. Tensors are cast to the model's dtypes.
    A model built on the meta device (`create(name, device="meta")`, no random initialisation) is materialised
    on `device` (default: `map_location`) once the checkpoint is known to fit, then filled.
    """
    obj = read_checkpoint(source, map_location) if isinstance(source, (str, os.PathLike)) else source
    sd = unwrap_state_dict(obj)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    sd = _strip_prefix(sd, set(own))
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [(k, tuple(sd[k].shape), own[k]) for k in own if k in sd and tuple(sd[k].shape) != own[k]]
    if missing or unexpected or wrong:
        raise _mismatch_error(model, sd, missing, unexpected, wrong)
    own_t = model.state_dict()
    as_int = [f"{k} ({sd[k].dtype})" for k in own if own_t[k].is_floating_point() and not sd[k].is_floating_point()]
    if as_int:
        raise CheckpointError(
            f"checkpoint stores {len(as_int)} floating-point parameters as integers (first: "
            f"{', '.join(as_int[:_SHOW])}); casting them would change the weights silently. Re-save the checkpoint "
            "with its float tensors"
        )
    bad = [k for k, v in sd.items() if v.is_floating_point() and not v.is_meta and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(
            f"checkpoint has NaN or infinite values in {len(bad)} tensors (first: {', '.join(bad[:_SHOW])}): the "
            "file is damaged or the training diverged; refusing to load them"
        )
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        # allocate without initialising; non-persistent buffers (timestep frequencies) rebuild themselves
        model.to_empty(device=device if device is not None else map_location)
    model.load_state_dict(sd, strict=True)
    return model


def _mismatch_error(model, sd, missing, unexpected, wrong) -> LayoutMismatchError:
    cfg = getattr(model, "cg_config", None)
    who = type(model).__name__ + (f" (config {cfg.name!r})" if cfg is not None and cfg.name else "")
    lines = [
        f"checkpoint does not fit {who}: {len(missing)} missing, {len(unexpected)} unexpected, "
        f"{len(wrong)} wrong-shape keys"
    ]
    if missing:
        lines.append(f"  missing (first {min(_SHOW, len(missing))}): {', '.join(missing[:_SHOW])}")
    if unexpected:
        lines.append(f"  unexpected (first {min(_SHOW, len(unexpected))}): {', '.join(unexpected[:_SHOW])}")
    if wrong:
        shown = ", ".join(f"{k} checkpoint {_fmt_shape(a)} vs model {_fmt_shape(b)}" for k, a, b in wrong[:_SHOW])
        lines.append(f"  wrong shape (first {min(_SHOW, len(wrong))}): {shown}")
    from .layout import family_of, layout_differences

    diffs = layout_differences(sd, model.state_dict())
    if diffs:
        lines.append("  what differs (as the layouts show it): " + "; ".join(diffs))
    matches = find_configs(sd)
    try:
        family = family_of(sd)
    except ValueError:
        family = None
    if matches:
        lines.append(
            f"  the checkpoint's layout matches config {', '.join(repr(m) for m in matches)}: "
            f"build it with cg_fast.models.create({matches[0]!r})"
        )
    else:
        n = sum(math.prod(v.shape) for v in sd.values())
        build = {
            "adm-unet": "cg_fast.models.adm.create_unet(**parse_flags(MODEL_FLAGS).model) with its MODEL_FLAGS",
            "adm-classifier": "cg_fast.models.adm.create_classifier(**parse_flags(CLASSIFIER_FLAGS).classifier) "
                              "with its CLASSIFIER_FLAGS",
            "dit": "cg_fast.models.dit.create(name, input_size=...) with the name shown by the layout",
        }.get(family, "the model class it was saved from")
        lines.append(
            f"  no registered config matches this layout ({len(sd)} tensors, {n:,} values); build the model with "
            f"{build}, or let cg_fast.models.load_checkpoint(path) read the architecture from the file"
        )
    return LayoutMismatchError("\n".join(lines), missing, unexpected, wrong, matches)
