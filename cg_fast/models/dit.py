"""DiT: the latent Diffusion Transformer of Peebles & Xie (2023), "Scalable Diffusion Models with Transformers",
with the parameter names of the released checkpoints (`pos_embed`, `x_embedder.proj.weight`,
`blocks.N.attn.qkv.weight`, `blocks.N.adaLN_modulation.1.weight`, `final_layer.linear.weight`, ...).

    model = create("DiT-XL/2", input_size=32)   # 256x256 images, 32x32x4 latents
    out = model(z, t, y)                        # [B, 8, 32, 32]: eps then variance channels

`y = None` (or labels equal to `num_classes`) selects the learned null class used for classifier-free
guidance. Label dropout for training is not implemented: these models are for inference.

Differences from the reference code, none of which changes the maths: attention through
`F.scaled_dot_product_attention`; timestep frequencies in a device buffer (capture-safe); optional
`dtype=torch.bfloat16/float16` for the patch embedding, the blocks and the final linear layer, with the
residual stream, the LayerNorms and the conditioning embedders kept in float32 (as autocast would).
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .cg_config import CGConfig
from .nn import SinusoidalTimestepEmbedding, sincos_2d_pos_embed

__all__ = ["DiT", "DiTBlock", "FinalLayer", "DIT_ARCHS", "DIT_NAMES", "create", "modulate"]

# name -> (depth, hidden_size, num_heads), DiT paper table 1
DIT_ARCHS: dict[str, tuple[int, int, int]] = {
    "XL": (28, 1152, 16),
    "L": (24, 1024, 16),
    "B": (12, 768, 12),
    "S": (12, 384, 6),
}
DIT_NAMES: tuple[str, ...] = tuple(f"DiT-{a}/{p}" for a in DIT_ARCHS for p in (2, 4, 8))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation `x * (1 + scale) + shift`, with [B, D] shift/scale broadcast over tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    # LayerNorm without affine, eps 1e-6, computed in float32
    return F.layer_norm(x.float(), (x.shape[-1],), eps=1e-6)


class PatchEmbed(nn.Module):
    """Non-overlapping p x p patches -> tokens: `proj` is a conv with kernel = stride = p. [B,C,H,W] -> [B,T,D]."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of width 256 (cosine first) -> `mlp` = Linear, SiLU, Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.freq = SinusoidalTimestepEmbedding(frequency_embedding_size)
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.freq(t).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """`embedding_table` with `num_classes + 1` rows when trained with label dropout; row `num_classes` is null."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.has_null = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(self.has_null), hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    """Multi-head self-attention: `qkv` (channels [3][heads][ch]), scaled dot product, `proj`."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.num_heads, d // self.num_heads).unbind(2)
        a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """`fc1`, GELU (tanh approximation), `fc2`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (DiT section 3.2).

    `adaLN_modulation(c)` gives shift/scale/gate for attention and MLP:
    `x += gate_msa * attn(modulate(norm1(x)))`, `x += gate_mlp * mlp(modulate(norm2(x)))`.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.attn = Attention(hidden_size, num_heads)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        wdt = self.attn.qkv.weight.dtype  # compute dtype of the block; x (the residual stream) keeps its own
        mod = self.adaLN_modulation(c.to(wdt))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        h = modulate(_layer_norm(x), shift_msa, scale_msa).to(wdt)
        x = x + gate_msa.unsqueeze(1) * self.attn(h)
        h = modulate(_layer_norm(x), shift_mlp, scale_mlp).to(wdt)
        return x + gate_mlp.unsqueeze(1) * self.mlp(h)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) of the last LayerNorm, then `linear` to p*p*out_channels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        wdt = self.linear.weight.dtype
        shift, scale = self.adaLN_modulation(c.to(wdt)).chunk(2, dim=1)
        return self.linear(modulate(_layer_norm(x), shift, scale).to(wdt))


class DiT(nn.Module):
    """Diffusion Transformer: `model(x, t, y=None) -> [B, out_channels, H, W]` in `x.dtype`.

    `input_size` is the latent side (32 for 256x256 images). `out_channels = 2 * in_channels` with
    `learn_sigma`. `class_dropout_prob > 0` adds the null-class row used for classifier-free guidance.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not a multiple of patch_size {patch_size}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.learn_sigma = learn_sigma
        self.num_classes = num_classes
        self.num_heads = num_heads
        grid = input_size // patch_size
        # fixed sin-cos table; a Parameter (not trained) because the checkpoints store it as one
        self.pos_embed = nn.Parameter(sincos_2d_pos_embed(hidden_size, grid)[None], requires_grad=False)
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self._init_weights()
        if dtype != torch.float32:
            for m in (self.x_embedder, self.blocks, self.final_layer):
                m.to(dtype)

    @torch.no_grad()
    def _init_weights(self) -> None:
        # DiT's initialisation: xavier-uniform linears, N(0, 0.02) embeddings, zero adaLN and output layers
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[1].weight)
            nn.init.zeros_(block.adaLN_modulation[1].bias)
        for p in (*self.final_layer.adaLN_modulation[1].parameters(), *self.final_layer.linear.parameters()):
            nn.init.zeros_(p)

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the transformer blocks (the residual stream stays float32)."""
        return self.x_embedder.proj.weight.dtype

    @property
    def null_label(self) -> int | None:
        """The label of the unconditional (null) class, or None when the model has no null row."""
        return self.num_classes if self.y_embedder.has_null else None

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, p*p*C] -> [B, C, H, W] (token-major patches, channels last within a patch)."""
        b, p, c = x.shape[0], self.patch_size, self.out_channels
        g = self.input_size // p
        x = x.reshape(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)  # n h w p q c -> n c h p w q
        return x.reshape(b, c, g * p, g * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.input_size, self.input_size):
            want = (self.in_channels, self.input_size, self.input_size)
            raise ValueError(f"DiT: x must be [B, {', '.join(map(str, want))}], got {tuple(x.shape)}")
        b = x.shape[0]
        if t.ndim == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"DiT: t must be a [B] tensor with B={b}, got {tuple(t.shape)}")
        if y is None:
            if self.null_label is None:
                raise ValueError("DiT: y is required (this model has no null class for unconditional calls)")
            y = torch.full_like(t, self.null_label, dtype=torch.long)
        elif y.shape != (b,):
            raise ValueError(f"DiT: y must be a [B] tensor with B={b}, got {tuple(y.shape)}")
        h = self.x_embedder(x) + self.pos_embed  # float32 residual stream [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c)).to(x.dtype)


def _parse_name(name: str) -> tuple[int, int, int, int]:
    m = re.fullmatch(r"DiT-(XL|L|B|S)/(2|4|8)", name.strip(), flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"unknown DiT model {name!r}; valid names: {', '.join(DIT_NAMES)}")
    depth, hidden, heads = DIT_ARCHS[m.group(1).upper()]
    return depth, hidden, heads, int(m.group(2))


def create(
    name: str,
    input_size: int = 32,
    num_classes: int = 1000,
    learn_sigma: bool = True,
    *,
    in_channels: int = 4,
    class_dropout_prob: float = 0.1,
    dtype: torch.dtype = torch.float32,
    image_size: int | None = None,
) -> DiT:
    """A DiT by its paper name ("DiT-XL/2", "DiT-S/4", ...), in eval mode, with `cg_config` attached.

    `input_size` is the latent side; `image_size` (pixels, for `cg_config`) defaults to 8 * input_size, the
    downsampling factor of the Stable Diffusion VAE that DiT uses.
    """
    depth, hidden, heads, patch = _parse_name(name)
    model = DiT(
        input_size=input_size,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        class_dropout_prob=class_dropout_prob,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        dtype=dtype,
    )
    model.cg_config = dit_cg_config(model, image_size=image_size)
    return model.eval()


def dit_cg_config(model: DiT, image_size: int | None = None, **defaults) -> CGConfig:
    """The sampler-facing description of a DiT (latent model: linear schedule, no clipping, scale 0.18215,
    CFG on the first 3 latent channels with the null label `num_classes`, as DiT's sample.py)."""
    return CGConfig(
        kind="dit",
        learn_sigma=model.learn_sigma,
        class_cond=True,
        num_classes=model.num_classes,
        image_size=image_size or 8 * model.input_size,
        input_size=model.input_size,
        in_channels=model.in_channels,
        out_channels=model.out_channels,
        noise_schedule="linear",
        diffusion_steps=1000,
        clip_denoised=False,
        latent_scale=0.18215,
        null_label=model.null_label,
        # DiT's forward_with_cfg guides the first 3 output channels of the 4 latent ones (spec §6)
        cfg_channels=3 if model.in_channels > 3 else None,
        **defaults,
    )
