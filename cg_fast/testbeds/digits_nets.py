"""The networks of the digits testbed: a small UNet denoiser, a noisy conv classifier, a noisy MLP judge.

All three follow cg_fast's protocols (``model(x, t, y=None)``, ``classifier(x, t) -> logits``, t the
ORIGINAL training timesteps [B]) and are capture-safe (no host syncs, no randomness in eval mode). They
are sized for 8x8 grey images on a CPU: a 250-step run of 500 samples takes seconds, not minutes.

    DigitsUNet        eps-prediction UNet, two resolutions (8x8, 4x4) with self-attention at 4x4;
                      class-conditional with a null label (= num_classes) for CFG, or unconditional.
    DigitsClassifier  noisy classifier (conv encoder, mean pool, 64-d feature layer, linear head); the guide
                      and the judge share this architecture and differ in seed and training half.
    DigitsMLPJudge    noisy classifier of a different architecture (an MLP on the flattened pixels).

Both classifiers expose ``features(x, t)``: the last hidden layer, used for Fréchet distance and
precision/recall (as Inception's pool features are used on ImageNet).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..models.cg_config import CGConfig
from ..models.nn import SinusoidalTimestepEmbedding

__all__ = ["DigitsUNet", "DigitsClassifier", "DigitsMLPJudge", "NetConfig", "build_net"]


@dataclass(frozen=True)
class NetConfig:
    """What rebuilds a testbed network from a saved file: ``kind`` names the class, the rest its arguments."""

    kind: str                 # "unet" | "classifier" | "mlp_judge"
    width: int = 32
    num_classes: int = 10
    class_cond: bool = True   # unet only
    channels: int = 1
    image_size: int = 8
    feature_dim: int = 64     # classifiers only


class _TimeEmbed(nn.Module):
    """t -> sinusoidal(width) -> MLP -> [B, dim] (ADM's time embedding, in miniature)."""

    def __init__(self, width: int, dim: int) -> None:
        super().__init__()
        self.sin = SinusoidalTimestepEmbedding(width)
        self.mlp = nn.Sequential(nn.Linear(width, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(self.sin(t))


class _ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the embedding as scale and shift after the second norm (ADM's
    ``use_scale_shift_norm``), a 1x1 skip where the width changes; the last conv starts at zero."""

    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int = 8) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class _Attention(nn.Module):
    """Single-head self-attention over the spatial positions, residual."""

    def __init__(self, ch: int, groups: int = 8) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(2, 3).unbind(1)  # [B, HW, C] each
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj(a.transpose(1, 2).reshape(b, c, h, w))


class DigitsUNet(nn.Module):
    """``model(x, t, y=None) -> eps``: 8x8 -> 4x4 -> 8x8 with skips, width w at 8x8 and 2w at 4x4.

    Class-conditional models embed y in [0, num_classes]; y = num_classes (or y = None) is the null label
    of classifier-free guidance, trained by dropping labels (cg_fast.testbeds.digits_train).
    """

    def __init__(self, width: int = 32, num_classes: int = 10, class_cond: bool = True, channels: int = 1,
                 image_size: int = 8) -> None:
        super().__init__()
        if image_size % 2:
            raise ValueError(f"DigitsUNet needs an even image size, got {image_size}")
        w, e = width, 4 * width
        self.config = NetConfig("unet", width, num_classes, class_cond, channels, image_size)
        self.num_classes, self.class_cond, self.channels = num_classes, class_cond, channels
        self.time = _TimeEmbed(w, e)
        self.label = nn.Embedding(num_classes + 1, e) if class_cond else None  # + 1: the null label
        self.inp = nn.Conv2d(channels, w, 3, padding=1)
        self.down1 = _ResBlock(w, w, e)
        self.down = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.down2 = _ResBlock(w, 2 * w, e)
        self.mid1 = _ResBlock(2 * w, 2 * w, e)
        self.attn = _Attention(2 * w)
        self.mid2 = _ResBlock(2 * w, 2 * w, e)
        self.up2 = _ResBlock(4 * w, 2 * w, e)
        self.up = nn.Conv2d(2 * w, 2 * w, 3, padding=1)
        self.up1 = _ResBlock(3 * w, w, e)
        self.out = nn.Sequential(nn.GroupNorm(8, w), nn.SiLU(), nn.Conv2d(w, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        emb = self.time(t)
        if self.label is not None:
            if y is None:
                y = torch.full_like(t, self.num_classes, dtype=torch.long)
            emb = emb + self.label(y)
        h0 = self.inp(x)
        h1 = self.down1(h0, emb)                       # 8x8, w
        h2 = self.down2(self.down(h1), emb)            # 4x4, 2w
        m = self.mid2(self.attn(self.mid1(h2, emb)), emb)
        u = self.up2(torch.cat([m, h2], dim=1), emb)   # 4x4, 2w
        u = self.up(F.interpolate(u, scale_factor=2.0, mode="nearest"))
        u = self.up1(torch.cat([u, h1], dim=1), emb)   # 8x8, w
        return self.out(u)


class DigitsClassifier(nn.Module):
    """``classifier(x, t) -> logits [B, K]``; ``features(x, t)`` -> [B, feature_dim] (the last hidden layer)."""

    def __init__(self, width: int = 16, num_classes: int = 10, channels: int = 1, image_size: int = 8,
                 feature_dim: int = 64) -> None:
        super().__init__()
        w, e = width, 4 * width
        self.config = NetConfig("classifier", width, num_classes, False, channels, image_size, feature_dim)
        self.num_classes = num_classes
        self.time = _TimeEmbed(w, e)
        self.inp = nn.Conv2d(channels, w, 3, padding=1)
        self.block1 = _ResBlock(w, w, e)
        self.down = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.block2 = _ResBlock(w, 2 * w, e)
        self.block3 = _ResBlock(2 * w, 2 * w, e)
        self.pool_norm = nn.GroupNorm(8, 2 * w)
        self.feat = nn.Linear(2 * w, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time(t)
        h = self.block1(self.inp(x), emb)
        h = self.block3(self.block2(self.down(h), emb), emb)
        return F.silu(self.feat(F.silu(self.pool_norm(h)).mean(dim=(2, 3))))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.head(self.features(x, t))


class DigitsMLPJudge(nn.Module):
    """A noisy classifier of another architecture: an MLP on the flattened pixels, t added to each hidden
    layer. ``features(x, t)`` -> [B, feature_dim]."""

    def __init__(self, width: int = 256, num_classes: int = 10, channels: int = 1, image_size: int = 8,
                 feature_dim: int = 64) -> None:
        super().__init__()
        d = channels * image_size * image_size
        self.config = NetConfig("mlp_judge", width, num_classes, False, channels, image_size, feature_dim)
        self.num_classes = num_classes
        self.time = _TimeEmbed(64, width)
        self.fc1 = nn.Linear(d, width)
        self.fc2 = nn.Linear(width, width)
        self.feat = nn.Linear(width, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time(t)
        h = F.silu(self.fc1(x.flatten(1)) + emb)
        h = F.silu(self.fc2(h) + emb)
        return F.silu(self.feat(h))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.head(self.features(x, t))


def build_net(config: NetConfig | dict) -> nn.Module:
    """The network a :class:`NetConfig` (or its dict, as saved) describes, with fresh weights."""
    cfg = config if isinstance(config, NetConfig) else NetConfig(**config)
    kw = {k: v for k, v in asdict(cfg).items() if k != "kind"}
    if cfg.kind == "unet":
        kw.pop("feature_dim")
        net: nn.Module = DigitsUNet(**kw)
    else:
        kw.pop("class_cond")
        if cfg.kind == "classifier":
            net = DigitsClassifier(**kw)
        elif cfg.kind == "mlp_judge":
            net = DigitsMLPJudge(**kw)
        else:
            raise ValueError(f"unknown testbed network kind {cfg.kind!r}: use 'unet', 'classifier' or 'mlp_judge'")
    net.cg_config = digits_cg_config(cfg)
    return net


def digits_cg_config(cfg: NetConfig) -> CGConfig:
    """The testbed's sampling conventions as a CGConfig: linear schedule over 1000 steps, eps prediction,
    fixed-large variance, clipping to [-1, 1], null label = num_classes for CFG (class-conditional UNet)."""
    unet = cfg.kind == "unet"
    return CGConfig(
        kind="digits-unet" if unet else "digits-classifier",
        learn_sigma=False,
        class_cond=unet and cfg.class_cond,
        num_classes=cfg.num_classes if (cfg.class_cond or not unet) else None,
        image_size=cfg.image_size,
        input_size=cfg.image_size,
        in_channels=cfg.channels,
        out_channels=cfg.channels if unet else cfg.num_classes,
        noise_schedule="linear",
        diffusion_steps=1000,
        null_label=cfg.num_classes if unet and cfg.class_cond else None,
        name=f"digits-{cfg.kind}" + ("" if not unet else "-cond" if cfg.class_cond else "-uncond"),
    )
