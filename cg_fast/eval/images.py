"""Sample grids as PNG files, with no imaging dependency (PNG is zlib-compressed rows; RFC 2083).

    save_grid(samples, "out/grid.png", nrow=10, scale=4)   # samples [n, C, H, W] in [-1, 1], C = 1 or 3
"""
from __future__ import annotations

import os
import struct
import tempfile
import zlib
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["make_grid", "save_grid", "write_png"]


def make_grid(x: Tensor, nrow: int = 10, pad: int = 1, pad_value: float = 1.0) -> Tensor:
    """Tile images [n, C, H, W] into one [C, rows*(H+pad)+pad, nrow*(W+pad)+pad] image, row-major."""
    if x.dim() != 4:
        raise ValueError(f"make_grid needs images [n, C, H, W], got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    rows = max(1, -(-n // nrow))
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=x.dtype)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return grid


def write_png(pixels: Tensor, path: str | Path) -> Path:
    """Write uint8 pixels [H, W] (grey) or [H, W, 3] (RGB) as a PNG, atomically."""
    if pixels.dtype != torch.uint8 or pixels.dim() not in (2, 3) or (pixels.dim() == 3 and pixels.shape[2] != 3):
        raise ValueError(f"write_png needs uint8 [H, W] or [H, W, 3], got {pixels.dtype} {tuple(pixels.shape)}")
    h, w = pixels.shape[:2]
    colour = 2 if pixels.dim() == 3 else 0
    raw = pixels.reshape(h, -1).numpy()
    rows = b"".join(b"\x00" + raw[i].tobytes() for i in range(h))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(png)
    os.replace(tmp, path)
    return path


def save_grid(x: Tensor, path: str | Path, nrow: int = 10, scale: int = 4, pad: int = 1) -> Path:
    """Save images [n, C, H, W] in [-1, 1] (C = 1 or 3) as a PNG grid, each pixel drawn ``scale`` times."""
    x = x.detach().float().cpu()
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"save_grid needs images [n, 1 or 3, H, W], got shape {tuple(x.shape)}")
    grid = make_grid(x.clamp(-1, 1), nrow=nrow, pad=pad)
    if scale > 1:
        grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    pixels = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return write_png(pixels[0] if pixels.shape[0] == 1 else pixels.permute(1, 2, 0).contiguous(), path)
