"""ADM: the UNet denoiser and the noisy-image classifier of Dhariwal & Nichol (2021), "Diffusion Models Beat
GANs on Image Synthesis", with the module tree and parameter names of OpenAI's guided-diffusion, so that its
public checkpoints load unchanged (`time_embed.0.weight`, `input_blocks.1.0.in_layers.2.weight`, ...).

Differences from the reference code, none of which changes the maths:
- the timestep frequencies are a device buffer (the reference builds a CPU tensor per call, which forbids CUDA
  graph capture);
- attention runs through `F.scaled_dot_product_attention` on a token-major [B, T, C] layout; the 1x1 conv
  weights of `qkv` / `proj_out` are applied as matrix products;
- the classifier's attention pool computes the query of its output token only (the reference computes all
  T+1 queries and keeps one);
- `dtype=torch.bfloat16` is offered beside ADM's `use_fp16`, and `channels_last=True` runs the convolution
  body in NHWC layout.

Restrictions (what keeps the forward capture-safe): static shapes per compiled/captured graph; inputs on the
model's device; `t` a [B] tensor (integer or float) of original training timesteps.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .nn import GroupNorm32, SinusoidalTimestepEmbedding, conv1x1_as_linear, zero_module

__all__ = [
    "Upsample",
    "Downsample",
    "ResBlock",
    "AttentionBlock",
    "AttentionPool2d",
    "TimestepEmbedSequential",
    "UNetModel",
    "EncoderUNetModel",
]


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """`nn.Sequential` that passes `emb` to the children that take it (ResBlocks)."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution when `use_conv` (parameter `conv`)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling: a stride-2 3x3 convolution when `use_conv` (parameter `op`), else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding (ADM, section 3 / appendix A).

    `in_layers` = [GroupNorm, SiLU, conv3x3]; `emb_layers` = [SiLU, Linear(emb, 2*out or out)];
    `out_layers` = [GroupNorm, SiLU, Dropout, zero-init conv3x3]. With `use_scale_shift_norm` ("adaptive group
    normalisation", AdaGN), `h = norm(h) * (1 + scale) + shift`; otherwise the embedding is added before the
    norm. `up` / `down` resample both paths after the first norm+SiLU (BigGAN-style up/down blocks).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False)
            self.x_upd: nn.Module = Upsample(channels, False)
        elif down:
            self.h_upd = Downsample(channels, False)
            self.x_upd = Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            GroupNorm32(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        norm_in, act_in, conv_in = self.in_layers
        h = act_in(norm_in(x))
        if self.updown:
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = conv_in(h)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm_out, act_out, drop, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = norm_out(h) * (1 + scale) + shift
        else:
            h = norm_out(h + emb_out)
        h = conv_out(drop(act_out(h)))
        return self.skip_connection(x) + h


def _num_heads(channels: int, num_heads: int, num_head_channels: int) -> int:
    if num_head_channels == -1:
        if channels % num_heads:
            raise ValueError(f"{channels} channels are not divisible by num_heads={num_heads}")
        return num_heads
    if channels % num_head_channels:
        raise ValueError(f"{channels} channels are not divisible by num_head_channels={num_head_channels}")
    return channels // num_head_channels


def _split_qkv(qkv: torch.Tensor, heads: int, new_order: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T, 3C] -> q, k, v as [B, heads, T, C/heads], in ADM's channel order.

    `new_order` (QKVAttention): channels are [3][heads][ch] (split q/k/v first, then heads).
    legacy (QKVAttentionLegacy): channels are [heads][3][ch] (split heads first).
    """
    b, t, c3 = qkv.shape
    ch = c3 // (3 * heads)
    if new_order:
        q, k, v = qkv.view(b, t, 3, heads, ch).unbind(2)
    else:
        q, k, v = qkv.view(b, t, heads, 3, ch).unbind(3)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual: `x + proj_out(attn(qkv(norm(x))))`; `proj_out` zero-initialised.

    Scores are `q.k / sqrt(ch)` with `ch` the head width (ADM scales q and k by ch^-1/4 each; same value).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
    ) -> None:
        super().__init__()
        self.channels = channels
        self.num_heads = _num_heads(channels, num_heads, num_head_channels)
        self.use_new_attention_order = use_new_attention_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, T, C]; free for channels-last x
        q, k, v = _split_qkv(conv1x1_as_linear(self.qkv, h), self.num_heads, self.use_new_attention_order)
        a = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, ch]
        a = a.transpose(1, 2).reshape(b, height * width, c)  # channel index = head * ch + i, as ADM
        out = conv1x1_as_linear(self.proj_out, a)
        return x + out.transpose(1, 2).reshape(b, c, height, width)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling (the ADM classifier head, `pool="attention"`).

    Tokens = [mean over space, every position] + `positional_embedding` ([C, T+1]); one attention layer with
    new-order qkv; the output is `c_proj` of token 0. Only token 0's query is computed.
    """

    def __init__(self, spatial_dim: int, embed_dim: int, num_head_channels: int, output_dim: int | None = None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spatial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = nn.Conv1d(embed_dim, 3 * embed_dim, 1)
        self.c_proj = nn.Conv1d(embed_dim, output_dim or embed_dim, 1)
        self.num_heads = _num_heads(embed_dim, 1, num_head_channels)
        self.spatial_dim = spatial_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, height, width = x.shape
        if height * width + 1 != self.positional_embedding.shape[1]:
            raise ValueError(
                f"AttentionPool2d expects {self.spatial_dim}x{self.spatial_dim} features, got {height}x{width}"
            )
        h = x.flatten(2)
        h = torch.cat([h.mean(dim=-1, keepdim=True), h], dim=-1) + self.positional_embedding[None].to(h.dtype)
        h = h.transpose(1, 2)  # [B, T+1, C]
        w, bias = self.qkv_proj.weight[..., 0], self.qkv_proj.bias
        heads, ch = self.num_heads, c // self.num_heads
        q = F.linear(h[:, :1], w[:c], bias[:c]).view(b, 1, heads, ch).transpose(1, 2)
        k, v = F.linear(h, w[c:], bias[c:]).view(b, -1, 2, heads, ch).unbind(2)
        a = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))  # [B, heads, 1, ch]
        return conv1x1_as_linear(self.c_proj, a.reshape(b, c))


def _convert_convs(modules: Iterable[nn.Module], dtype: torch.dtype) -> None:
    """Cast the weights of every convolution to `dtype` (ADM's `convert_to_fp16`: norms and linears stay)."""
    for root in modules:
        for m in root.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                m.to(dtype)


def _check_x_t(x: torch.Tensor, t: torch.Tensor, in_channels: int, multiple: int, who: str) -> torch.Tensor:
    if x.ndim != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{who}: x must be [B, {in_channels}, H, W], got {tuple(x.shape)}")
    if x.shape[2] % multiple or x.shape[3] % multiple:
        raise ValueError(f"{who}: H and W must be multiples of {multiple}, got {tuple(x.shape[2:])}")
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if t.shape != (x.shape[0],):
        raise ValueError(f"{who}: t must be a [B] tensor with B={x.shape[0]}, got {tuple(t.shape)}")
    return t


class _ADMBase(nn.Module):
    """Shared constructor pieces of the UNet and the classifier: embedding and encoder half."""

    def _build_encoder(
        self,
        *,
        in_channels: int,
        model_channels: int,
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        dropout: float,
        channel_mult: Sequence[float],
        conv_resample: bool,
        num_heads: int,
        num_head_channels: int,
        use_scale_shift_norm: bool,
        resblock_updown: bool,
        use_new_attention_order: bool,
        num_classes: int | None = None,
    ) -> tuple[int, int, list[int]]:
        """Build the embeddings, `input_blocks` and `middle_block`; return (channels, downsampling, skip chans)."""
        emb_dim = 4 * model_channels
        self.time_proj = SinusoidalTimestepEmbedding(model_channels)
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, emb_dim)

        def attention(ch: int) -> AttentionBlock:
            return AttentionBlock(ch, num_heads, num_head_channels, use_new_attention_order)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))])
        chans = [ch]
        ds = 1  # downsampling factor of the current level
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, dropout, out_ch, use_scale_shift_norm)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    ResBlock(ch, emb_dim, dropout, ch, use_scale_shift_norm, down=True)
                    if resblock_updown
                    else Downsample(ch, conv_resample)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
            attention(ch),
            ResBlock(ch, emb_dim, dropout, use_scale_shift_norm=use_scale_shift_norm),
        )
        return ch, ds, chans

    def _embed(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_embed(self.time_proj(t).to(self.time_embed[0].weight.dtype))

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the convolution body (ADM's `self.dtype`)."""
        return self.input_blocks[0][0].weight.dtype

    def _body_input(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(self.dtype)
        return h.contiguous(memory_format=torch.channels_last) if self.channels_last else h

    def _finish_init(self, body: list[nn.Module], dtype: torch.dtype, channels_last: bool) -> None:
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.channels_last = channels_last
        if dtype != torch.float32:
            _convert_convs(body, dtype)
        if channels_last:
            self.to(memory_format=torch.channels_last)


class UNetModel(_ADMBase):
    """The ADM denoiser: `model(x, t, y=None) -> [B, out_channels, H, W]` in `x.dtype`.

    Constructor arguments follow guided-diffusion's `UNetModel` (attention_resolutions are downsampling
    factors, e.g. {2, 4, 8}); build it from command-line flags with `cg_fast.models.adm.create_unet`.
    `dtype` is the dtype of the convolution body (`use_fp16=True` is `dtype=torch.float16`); embeddings, norms
    and the output head stay float32, as in ADM. An unconditional model ignores `y`.
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        num_classes: int | None = None,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        attention_resolutions = tuple(attention_resolutions)
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_classes = num_classes
        self.num_levels = len(channel_mult)
        ch, ds, chans = self._build_encoder(
            in_channels=in_channels,
            model_channels=model_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=attention_resolutions,
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
            num_classes=num_classes,
        )
        emb_dim = 4 * model_channels
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = int(model_channels * mult)
                layers: list[nn.Module] = [ResBlock(ch + chans.pop(), emb_dim, dropout, out_ch, use_scale_shift_norm)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads_upsample, num_head_channels, use_new_attention_order))
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, emb_dim, dropout, ch, use_scale_shift_norm, up=True)
                        if resblock_updown
                        else Upsample(ch, conv_resample)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        input_ch = int(channel_mult[0] * model_channels)
        self.out = nn.Sequential(
            GroupNorm32(ch), nn.SiLU(), zero_module(nn.Conv2d(input_ch, out_channels, 3, padding=1))
        )
        dtype = dtype or (torch.float16 if use_fp16 else torch.float32)
        self._finish_init([self.input_blocks, self.middle_block, self.output_blocks], dtype, channels_last)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = _check_x_t(x, t, self.in_channels, 2 ** (self.num_levels - 1), "UNetModel")
        emb = self._embed(t)
        if self.num_classes is not None:
            if y is None:
                raise ValueError("UNetModel: this model is class-conditional; pass y (a [B] tensor of labels)")
            if y.shape != t.shape:
                raise ValueError(f"UNetModel: y must be a [B] tensor, got {tuple(y.shape)}")
            emb = emb + self.label_emb(y)
        h = self._body_input(x)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        h = self.out(h.to(self.out[2].weight.dtype))
        return h.to(x.dtype)


class EncoderUNetModel(_ADMBase):
    """The ADM classifier: the UNet's encoder half and middle block, then a pooling head.

    `classifier(x, t) -> logits [B, out_channels]` in `x.dtype`. `pool` is "attention" (the released
    classifiers) or "adaptive" (global average pooling and a zero-init 1x1 conv).
    """

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: int,
        attention_resolutions: Iterable[int],
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2, 4, 8),
        conv_resample: bool = True,
        use_fp16: bool = False,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        pool: str = "adaptive",
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_levels = len(channel_mult)
        self.pool = pool
        ch, ds, _ = self._build_encoder(
            in_channels=in_channels,
            model_channels=model_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=tuple(attention_resolutions),
            dropout=dropout,
            channel_mult=channel_mult,
            conv_resample=conv_resample,
            num_heads=num_heads,
            num_head_channels=num_head_channels,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=use_new_attention_order,
        )
        if pool == "attention":
            if num_head_channels == -1:
                raise ValueError('pool="attention" needs num_head_channels (the released classifiers use 64)')
            head: nn.Module = AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels)
            self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), head)
        elif pool == "adaptive":
            self.out = nn.Sequential(
                GroupNorm32(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(nn.Conv2d(ch, out_channels, 1)),
                nn.Flatten(),
            )
        else:
            raise NotImplementedError(f'classifier pool "{pool}" is not supported; use "attention" or "adaptive"')
        dtype = dtype or (torch.float16 if use_fp16 else torch.float32)
        self._finish_init([self.input_blocks, self.middle_block], dtype, channels_last)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = _check_x_t(x, t, self.in_channels, 2 ** (self.num_levels - 1), "EncoderUNetModel")
        emb = self._embed(t)
        h = self._body_input(x)
        for block in self.input_blocks:
            h = block(h, emb)
        h = self.middle_block(h, emb)
        return self.out(h.to(self.out[0].weight.dtype)).to(x.dtype)
