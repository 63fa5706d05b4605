"""Sample batches in the ADM evaluator's ``.npz`` format (openai/guided-diffusion, ``evaluations/``).

A batch file holds ``arr_0``: images, uint8 NHWC [n, H, W, C], and optionally ``arr_1``: integer class labels
[n] -- what guided-diffusion's ``image_sample.py`` writes with ``np.savez(path, images, labels)``.

``to_uint8`` converts model-space images (float NCHW in [-1, 1]) exactly as that script does:
``((x + 1) * 127.5).clamp(0, 255).to(uint8)`` -- the cast truncates, so 0.0 -> 127 -- then NCHW -> NHWC.
``from_uint8`` goes back to float NCHW in [-1, 1] (u / 127.5 - 1, guided-diffusion's loader convention).
"""
from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["to_uint8", "from_uint8", "save_sample_batch", "load_sample_batch"]

ArrayLike = Tensor | np.ndarray
_MAX_CHANNELS = 4  # grayscale, grayscale+alpha, RGB, RGBA; a larger "channel" axis means a layout mix-up


def _looks_channels_last(shape: tuple[int, ...]) -> bool:
    """[n, a, b, c] reads as NHWC rather than NCHW: square a x b with c <= 4 channels, while the NCHW reading
    would be a non-square b x c image (images here are square)."""
    _, a, b, c = shape
    return a == b and b != c and c <= _MAX_CHANNELS


def to_uint8(x: ArrayLike) -> Tensor:
    """Float NCHW images in [-1, 1] -> uint8 NHWC, as guided-diffusion's sample script (values are clamped)."""
    x = torch.as_tensor(x)
    if not x.is_floating_point():
        raise ValueError(f"to_uint8 expects float images in [-1, 1]; got dtype {x.dtype}")
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects NCHW images [n, C, H, W]; got shape {tuple(x.shape)}")
    if x.shape[1] > _MAX_CHANNELS or _looks_channels_last(tuple(x.shape)):
        raise ValueError(f"to_uint8 expects float NCHW images [n, C, H, W]; shape {tuple(x.shape)} looks like NHWC "
                         "(channels last): permute it with x.permute(0, 3, 1, 2)")
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf; a uint8 cast of those is meaningless")
    u = ((x.detach() + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return u.permute(0, 2, 3, 1).contiguous()


def _decode_table(dtype: torch.dtype) -> Tensor:
    """256 values t[u] ~= u / 127.5 - 1 in ``dtype`` with to_uint8(t[u]) == u.

    The correctly rounded u / 127.5 - 1 sometimes lands a hair below the integer after ``(x + 1) * 127.5``, and
    the truncating cast then gives u - 1; such entries are moved up one ulp at a time (one suffices in practice).
    """
    u = torch.arange(256)
    t = (u.double() / 127.5 - 1).to(dtype)
    for _ in range(4):
        bad = ((t + 1) * 127.5).clamp(0, 255).to(torch.uint8) != u
        if not bad.any():
            break
        t = torch.where(bad, torch.nextafter(t, torch.full_like(t, 2.0)), t)
    return t


def from_uint8(images: ArrayLike, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 NHWC images -> float NCHW in [-1, 1] (u / 127.5 - 1); ``to_uint8`` of the result gives them back.

    Each value is u / 127.5 - 1 rounded to ``dtype``, raised by one ulp where needed so that the truncating
    cast of ``to_uint8`` returns exactly u (a difference of ~6e-8 in float32).
    """
    u = torch.as_tensor(images)
    if u.dtype != torch.uint8:
        raise ValueError(f"from_uint8 expects uint8 images; got dtype {u.dtype}")
    if u.ndim != 4:
        raise ValueError(f"from_uint8 expects NHWC images [n, H, W, C]; got shape {tuple(u.shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype; got {dtype}")
    table = _decode_table(dtype).to(u.device)
    return table[u.long()].permute(0, 3, 1, 2).contiguous()


def _check_uint8_nhwc(images: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8; got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"{where}: images must be NHWC [n, H, W, C]; got shape {images.shape}")
    _, c, h, w = images.shape
    if images.shape[-1] > _MAX_CHANNELS or (h == w and c != h and c <= _MAX_CHANNELS):
        raise ValueError(f"{where}: uint8 images must be NHWC [n, H, W, C]; shape {images.shape} looks like NCHW "
                         "(channels first): permute it with x.permute(0, 2, 3, 1)")


def _check_labels(labels: np.ndarray, n: int, where: str) -> np.ndarray:
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{where}: labels must be a vector of {n} class indices; got shape {labels.shape}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_):
        raise ValueError(f"{where}: labels must be integers; got dtype {labels.dtype}")
    labels = labels.astype(np.int64, copy=False)
    if labels.size and labels.min() < 0:
        raise ValueError(f"{where}: labels must be class indices >= 0; got {int(labels.min())} at position "
                         f"{int(labels.argmin())}")
    return labels


def save_sample_batch(path: str | os.PathLike, images: ArrayLike, labels: ArrayLike | None = None) -> Path:
    """Write an ADM evaluator sample batch: ``arr_0`` = uint8 NHWC images, ``arr_1`` = int64 labels if given.

    ``images``: float NCHW in [-1, 1] (converted by ``to_uint8``) or uint8 NHWC (written as is). The file is
    written to a temporary name beside ``path`` and renamed over it, so readers never see a partial file.
    ``path`` is used exactly as given (no ``.npz`` is appended). Returns the path.
    """
    if isinstance(images, Tensor):
        arr = (to_uint8(images) if images.is_floating_point() else images.detach()).cpu().numpy()
    else:
        arr = np.asarray(images)
        if np.issubdtype(arr.dtype, np.floating):
            arr = to_uint8(torch.from_numpy(arr)).numpy()
    _check_uint8_nhwc(arr, "save_sample_batch")
    arrays = {"arr_0": arr}
    if labels is not None:
        lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
        arrays["arr_1"] = _check_labels(lab, arr.shape[0], "save_sample_batch")
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_sample_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Read an ADM evaluator sample batch: (uint8 NHWC images [n, H, W, C], int64 labels [n] or None)."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz sample batch ({type(e).__name__}: {e}); write it again "
                         "(save_sample_batch)") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{path} holds a single array, not an .npz archive with arr_0 (and arr_1)")
    with data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no arr_0 (it holds {sorted(data.files)}); an ADM sample batch stores "
                             "uint8 NHWC images as arr_0 -- write one with save_sample_batch")
        try:  # the members are read (and their CRCs checked) only here
            images = data["arr_0"]
            raw_labels = data["arr_1"] if "arr_1" in data.files else None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"{path} is damaged: its arrays cannot be read ({type(e).__name__}: {e}); write it "
                             "again (save_sample_batch)") from e
        _check_uint8_nhwc(images, str(path))
        labels = _check_labels(raw_labels, images.shape[0], str(path)) if raw_labels is not None else None
    return images, labels
