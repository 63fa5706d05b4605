"""Inception-V3 pool features (2048-D) for ImageNet-scale FID, through the optional ``torch-fidelity``.

``inception_features`` runs torch-fidelity's ``FeatureExtractorInceptionV3`` (the TensorFlow FID network of
2015-12-05 ported to PyTorch, with TF-compatible resizing to 299x299) on uint8 images and returns its ``'2048'``
pool features, ready for ``FeatureStats.from_features`` / ``frechet_distance``.

Nothing is downloaded at run time: the weights come from a LOCAL file that you pass -- torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (its release v0.2.0; pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth`` carries the same SHA-256 prefix). Fetch it once on a machine with
internet access.

Install with ``pip install cg_fast[fidelity]`` (or ``pip install torch-fidelity``). torch-fidelity depends on
torchvision, whose wheels are pinned to matching torch versions: next to some torch builds (e.g. a CPU-only or a
very new torch) pip may fail to find a compatible torchvision or try to replace torch; install a torchvision
that matches your torch first, then ``pip install --no-deps torch-fidelity``.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

__all__ = ["inception_features", "inception_features_and_logits", "INCEPTION_WEIGHTS_FILE"]

ArrayLike = Tensor | np.ndarray

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
_EXTRACTOR_NAME = "inception-v3-compat"  # torch-fidelity's registry name of this extractor
_FEATURE = "2048"                        # the final average pool: the FID features
_FEATURE_DIM = 2048
_LOGITS = "logits_unbiased"              # the classifier logits torch-fidelity's Inception score uses


def _missing_weights(detail: str) -> str:
    return (f"{detail}. cg_fast never downloads anything at run time: pass weights_path= a local copy of the "
            f"Inception-V3 FID weights ({INCEPTION_WEIGHTS_FILE} from torch-fidelity's release v0.2.0, or "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth), fetched once on a machine with internet access")


def _extractor_class():
    """torch-fidelity's FeatureExtractorInceptionV3, with a clear error when the package is absent or too old."""
    try:
        mod = importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")
    except ImportError as e:
        raise ImportError("inception_features needs the optional package torch-fidelity: "
                          "pip install torch-fidelity (or pip install cg_fast[fidelity]); it pulls torchvision, "
                          "which must match your torch build") from e
    cls = mod.FeatureExtractorInceptionV3
    # Older releases swallow unknown keywords and would download the weights: refuse them.
    if "feature_extractor_weights_path" not in inspect.signature(cls.__init__).parameters:
        raise ImportError("this torch-fidelity is too old to load Inception weights from a local file "
                          "(no feature_extractor_weights_path); pip install -U torch-fidelity")
    return cls


@functools.lru_cache(maxsize=1)
def _load_extractor(cls, weights: str, mtime_ns: int, device: str, outputs: tuple[str, ...] = (_FEATURE,)
                    ) -> torch.nn.Module:
    """The network on ``device``; cached so that batch-by-batch callers load the weights once."""
    net = cls(_EXTRACTOR_NAME, list(outputs), feature_extractor_weights_path=weights)
    return net.to(device).eval()


def _to_uint8_nchw(images: ArrayLike, layout: str) -> Tensor:
    """uint8 NCHW RGB tensor (on the CPU) from uint8 NCHW or NHWC images with 1 or 3 channels."""
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8:
        raise ValueError(f"inception_features expects uint8 images in 0..255; got dtype {x.dtype} "
                         "(convert model-space floats in [-1, 1] with cg_fast.eval.to_uint8)")
    if x.ndim != 4:
        raise ValueError(f"inception_features expects images [n, C, H, W] or [n, H, W, C]; "
                         f"got shape {tuple(x.shape)}")
    if layout == "auto":
        first, last = x.shape[1] in (1, 3), x.shape[-1] in (1, 3)
        if first == last:
            raise ValueError(f"cannot tell whether shape {tuple(x.shape)} is NCHW or NHWC; "
                             "pass layout='NCHW' or layout='NHWC'")
        layout = "NCHW" if first else "NHWC"
    elif layout not in ("NCHW", "NHWC"):
        raise ValueError(f"layout must be 'auto', 'NCHW' or 'NHWC'; got {layout!r}")
    if layout == "NHWC":
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # grayscale -> RGB by repeating the channel
    elif x.shape[1] != 3:
        raise ValueError(f"Inception-V3 takes RGB (or grayscale) images; got {x.shape[1]} channels "
                         f"in {layout} shape {tuple(x.shape)}")
    return x


def inception_features(images: ArrayLike, weights_path: str | os.PathLike | None, batch_size: int = 64,
                       device: str | torch.device | None = None,
                       layout: Literal["auto", "NCHW", "NHWC"] = "auto") -> Tensor:
    """Inception-V3 pool features [n, 2048] (float32, CPU) of uint8 images [n, 3 or 1, H, W] or [n, H, W, 3 or 1].

    ``weights_path``: local Inception weights file (see the module doc; required, nothing is downloaded).
    ``batch_size``: images per forward pass. ``device``: default CUDA when available, else CPU.
    ``layout``: 'auto' infers NCHW/NHWC from where the 1- or 3-channel axis is.
    """
    return _run(images, weights_path, batch_size, device, layout, (_FEATURE,))[0]


def inception_features_and_logits(images: ArrayLike, weights_path: str | os.PathLike | None, batch_size: int = 64,
                                  device: str | torch.device | None = None,
                                  layout: Literal["auto", "NCHW", "NHWC"] = "auto") -> tuple[Tensor, Tensor]:
    """(pool features [n, 2048], class logits [n, K]) in one pass, as :func:`inception_features`; the logits are
    torch-fidelity's ``logits_unbiased``, what its Inception score uses (``cg_fast.eval.inception_score``)."""
    feats, logits = _run(images, weights_path, batch_size, device, layout, (_FEATURE, _LOGITS))
    return feats, logits


def _run(images: ArrayLike, weights_path: str | os.PathLike | None, batch_size: int,
         device: str | torch.device | None, layout: str, outputs: tuple[str, ...]) -> list[Tensor]:
    """The extractor's ``outputs`` (feature names) for ``images``, each [n, dim] float32 on the CPU."""
    if weights_path is None:
        raise ValueError(_missing_weights("inception_features needs weights_path"))
    weights = Path(weights_path).expanduser()
    if not weights.is_file():
        raise FileNotFoundError(_missing_weights(f"Inception weights file {str(weights)!r} does not exist"))
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got {batch_size!r}")
    x = _to_uint8_nchw(images, layout)
    cls = _extractor_class()
    dev = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    net = _load_extractor(cls, str(weights.resolve()), weights.stat().st_mtime_ns, str(dev),
                          *((outputs,) if outputs != (_FEATURE,) else ()))
    parts: list[list[Tensor]] = [[] for _ in outputs]
    with torch.inference_mode():
        for i in range(0, x.shape[0], batch_size):
            batch = x[i:i + batch_size].contiguous().to(dev)
            got = net(batch)
            got = list(got) if isinstance(got, (tuple, list)) else [got]  # a tuple, one entry per feature
            if len(got) < len(outputs):
                raise RuntimeError(f"the Inception extractor returned {len(got)} output(s) for {list(outputs)}; "
                                   "check the torch-fidelity version")
            for name, part, out in zip(outputs, parts, got):
                if name == _FEATURE and out.shape != (batch.shape[0], _FEATURE_DIM):
                    raise RuntimeError(f"the Inception extractor returned shape {tuple(out.shape)}, expected "
                                       f"({batch.shape[0]}, {_FEATURE_DIM}); check the torch-fidelity version")
                if out.ndim != 2 or out.shape[0] != batch.shape[0]:
                    raise RuntimeError(f"the Inception extractor's {name!r} has shape {tuple(out.shape)}, expected "
                                       f"({batch.shape[0]}, K); check the torch-fidelity version")
                part.append(out.float().cpu())
    if x.shape[0] == 0:
        return [torch.empty(0, _FEATURE_DIM)] + [torch.empty(0, 0) for _ in outputs[1:]]
    return [torch.cat(p) for p in parts]
