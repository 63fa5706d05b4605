"""Layers shared by the ADM UNet, the ADM classifier and DiT.

Every forward here is capture-safe: no host synchronisation, no tensor created on the CPU, no Python branch
on a tensor value. That is what lets `torch.cuda.graph`, `torch.compile(fullgraph=True)` and ONNX export
take the models whole.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SinusoidalTimestepEmbedding",
    "GroupNorm32",
    "zero_module",
    "sincos_2d_pos_embed",
    "conv1x1_as_linear",
]


def _frequencies(half: int, max_period: float, device: torch.device | str | None) -> torch.Tensor:
    # freqs_i = exp(-ln(max_period) * i / half), i = 0 .. half-1 (Vaswani et al. 2017; ADM and DiT alike)
    i = torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(i * (-math.log(max_period) / half))


class SinusoidalTimestepEmbedding(nn.Module):
    """Sinusoidal embedding of (integer or fractional) timesteps: `[cos(t f), sin(t f)]`, cosine first.

    `dim` is the output width (ADM: `model_channels`; DiT: 256). The frequencies live in a non-persistent
    float32 buffer, so nothing is built on the host per call and nothing appears in `state_dict()`. The buffer
    stays float32 and is recomputed whenever the module moves (`.to`, `.half()`, `.to_empty()`), so a cast
    model or one materialised from the meta device still embeds exactly.
    """

    freqs: torch.Tensor

    def __init__(self, dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        if dim < 2:
            raise ValueError(f"SinusoidalTimestepEmbedding: dim must be >= 2, got {dim}")
        self.dim = dim
        self.max_period = max_period
        self.register_buffer("freqs", _frequencies(dim // 2, max_period, None), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        super()._apply(fn, recurse)
        # keep the table exact and in float32 whatever the cast or materialisation was
        self.freqs = _frequencies(self.dim // 2, self.max_period, self.freqs.device)
        return self

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float()[:, None] * self.freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if self.dim % 2:
            emb = F.pad(emb, (0, 1))
        return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype (ADM's `normalization`: 32 groups).

    The affine parameters stay float32 when the rest of the network runs in fp16/bf16.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5) -> None:
        super().__init__(num_groups, num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero all parameters of `module` and return it (ADM's zero-initialised output convolutions)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def conv1x1_as_linear(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """Apply a kernel-1 `Conv1d` (weight [out, in, 1]) to `x` laid out as [..., tokens, in].

    ADM stores its attention projections as 1x1 convolutions; on the token-major layout that
    `F.scaled_dot_product_attention` wants, the same weights are a plain matrix product.
    """
    return F.linear(x, conv.weight[..., 0], conv.bias)


def sincos_2d_pos_embed(dim: int, grid_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, [grid_size**2, dim] float32 (MAE / DiT convention).

    Token `r * grid_size + c` (row r, column c) gets `[emb_1d(c), emb_1d(r)]`, each half of width dim/2, with
    `emb_1d(p) = [sin(p w), cos(p w)]`, `w_i = 10000^(-i / (dim/4))`. Computed in float64, like the reference.
    """
    if dim % 4:
        raise ValueError(f"sincos_2d_pos_embed: dim must be divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))
    pos = torch.arange(grid_size, dtype=torch.float64, device=device)
    cols = pos.repeat(grid_size)  # column index of each token
    rows = pos.repeat_interleave(grid_size)  # row index of each token

    def emb_1d(p: torch.Tensor) -> torch.Tensor:
        out = p[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([emb_1d(cols), emb_1d(rows)], dim=1).float()
