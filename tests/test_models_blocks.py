"""Numerical tests: each ADM / DiT block against an explicit computation of the papers' maths, then whole tiny
models against a reference forward composed from those explicit blocks (float32 tolerance)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import cg_fast.models as M
from cg_fast.models import adm_unet as U
from cg_fast.models import dit as D
from cg_fast.models.nn import GroupNorm32, SinusoidalTimestepEmbedding, sincos_2d_pos_embed
from cg_fast.models.testing import example_inputs, randomize_

ATOL = 2e-5
torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------------------
# explicit reference maths
# ----------------------------------------------------------------------------------------------------------
def ref_timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.tensor([math.exp(-math.log(10000.0) * i / half) for i in range(half)], dtype=torch.float64)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def ref_group_norm(x: torch.Tensor, weight, bias, groups: int = 32, eps: float = 1e-5) -> torch.Tensor:
    b, c = x.shape[:2]
    xg = x.double().reshape(b, groups, -1)
    mean = xg.mean(-1, keepdim=True)
    var = ((xg - mean) ** 2).mean(-1, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.ndim - 2)
    return y * weight.double().reshape(shape) + bias.double().reshape(shape)


def silu(x):
    return x * torch.sigmoid(x)


def nearest_up(x):
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def avg_down(x):
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).mean(dim=(3, 5))


def conv(x, layer, **kw):
    return F.conv2d(x, layer.weight.double(), layer.bias.double(), **kw)


def ref_resblock(blk: U.ResBlock, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    x, emb = x.double(), emb.double()
    h = silu(ref_group_norm(x, blk.in_layers[0].weight, blk.in_layers[0].bias))
    if isinstance(blk.h_upd, U.Upsample):
        h, x = nearest_up(h), nearest_up(x)
    elif isinstance(blk.h_upd, U.Downsample):
        h, x = avg_down(h), avg_down(x)
    h = conv(h, blk.in_layers[2], padding=1)
    lin = blk.emb_layers[1]
    e = (silu(emb) @ lin.weight.double().T + lin.bias.double())[:, :, None, None]
    norm = blk.out_layers[0]
    if blk.use_scale_shift_norm:
        c = blk.out_channels
        h = ref_group_norm(h, norm.weight, norm.bias) * (1 + e[:, :c]) + e[:, c:]
    else:
        h = ref_group_norm(h + e, norm.weight, norm.bias)
    h = conv(silu(h), blk.out_layers[3], padding=1)
    skip = x if isinstance(blk.skip_connection, torch.nn.Identity) else conv(x, blk.skip_connection)
    return skip + h


def ref_qkv_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """ADM's QKVAttention (new order) / QKVAttentionLegacy on [B, 3*C, T] -> [B, C, T]."""
    b, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (z.reshape(b * heads, ch, length) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, length).split(ch, dim=1)
    w = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(ch), dim=-1)
    return torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)


def conv1d(x, layer):  # x [B, C, T]
    return torch.einsum("oc,bct->bot", layer.weight[..., 0].double(), x) + layer.bias.double()[None, :, None]


def ref_attention_block(blk: U.AttentionBlock, x: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = x.shape
    xf = x.double().reshape(b, c, -1)
    qkv = conv1d(ref_group_norm(xf, blk.norm.weight, blk.norm.bias), blk.qkv)
    a = ref_qkv_attention(qkv, blk.num_heads, blk.use_new_attention_order)
    return (xf + conv1d(a, blk.proj_out)).reshape(b, c, hh, ww)


def ref_attention_pool(pool: U.AttentionPool2d, x: torch.Tensor) -> torch.Tensor:
    b, c = x.shape[:2]
    xf = x.double().reshape(b, c, -1)
    xf = torch.cat([xf.mean(-1, keepdim=True), xf], dim=-1) + pool.positional_embedding.double()[None]
    a = ref_qkv_attention(conv1d(xf, pool.qkv_proj), pool.num_heads, new_order=True)
    return conv1d(a, pool.c_proj)[:, :, 0]


def ref_layer_norm(x):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-6)


def lin(x, layer):
    return x @ layer.weight.double().T + layer.bias.double()


def ref_gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def ref_dit_attention(attn: D.Attention, x: torch.Tensor) -> torch.Tensor:
    b, t, d = x.shape
    hd = d // attn.num_heads
    qkv = lin(x, attn.qkv).reshape(b, t, 3, attn.num_heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    return lin((w @ v).transpose(1, 2).reshape(b, t, d), attn.proj)


def ref_dit_block(blk: D.DiTBlock, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    x, c = x.double(), c.double()
    mod = lin(silu(c), blk.adaLN_modulation[1])
    sh1, sc1, g1, sh2, sc2, g2 = (m[:, None] for m in mod.chunk(6, dim=1))
    x = x + g1 * ref_dit_attention(blk.attn, ref_layer_norm(x) * (1 + sc1) + sh1)
    h = ref_layer_norm(x) * (1 + sc2) + sh2
    return x + g2 * lin(ref_gelu_tanh(lin(h, blk.mlp.fc1)), blk.mlp.fc2)


def ref_final_layer(fl: D.FinalLayer, x, c):
    x, c = x.double(), c.double()
    shift, scale = lin(silu(c), fl.adaLN_modulation[1]).chunk(2, dim=1)
    return lin(ref_layer_norm(x) * (1 + scale[:, None]) + shift[:, None], fl.linear)


def ref_unpatchify(x: torch.Tensor, p: int, c: int) -> torch.Tensor:
    b, t, _ = x.shape
    g = int(math.isqrt(t))
    out = torch.empty(b, c, g * p, g * p, dtype=x.dtype)
    for i in range(g):
        for j in range(g):
            out[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p] = x[:, i * g + j].reshape(b, p, p, c).permute(0, 3, 1, 2)
    return out


def ref_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """MAE / DiT: meshgrid(w, h) ('xy'), first half of the channels from grid[0], sin then cos."""
    gw, gh = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="xy")

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([one_d(dim // 2, gw), one_d(dim // 2, gh)], dim=1)


def rand_params(module, seed=0):
    return randomize_(module, seed)


def close(a, b, atol=ATOL, rtol=1e-5):
    torch.testing.assert_close(a.double(), b.double(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------
# shared layers
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [32, 192, 256, 33])
def test_timestep_embedding_matches_formula(dim):
    t = torch.tensor([0, 1, 17, 500, 999])
    got = SinusoidalTimestepEmbedding(dim)(t)
    want = ref_timestep_embedding(t, dim)
    if dim % 2:
        want = F.pad(want, (0, 1))
    assert got.dtype == torch.float32 and got.shape == (5, dim)
    close(got, want, atol=2e-4)  # float32 arguments up to 999 rad
    assert torch.equal(got[0, : dim // 2], torch.ones(dim // 2))  # cos first: cos(0) = 1


def test_timestep_embedding_is_not_state_and_survives_casts():
    emb = SinusoidalTimestepEmbedding(64)
    assert emb.state_dict() == {}
    t = torch.tensor([3, 999])
    want = emb(t)
    emb.half()
    assert emb.freqs.dtype == torch.float32
    torch.testing.assert_close(emb(t), want)
    with torch.device("meta"):
        lazy = SinusoidalTimestepEmbedding(64)
    lazy.to_empty(device="cpu")  # no persistent state: the table must be rebuilt, not left uninitialised
    torch.testing.assert_close(lazy(t), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_group_norm32_in_float32(dtype):
    gn = GroupNorm32(64)
    rand_params(gn)
    x = torch.randn(2, 64, 5, 3) * 3 + 1
    got = gn(x.to(dtype))
    assert got.dtype == dtype and gn.weight.dtype == torch.float32
    tol = {torch.float32: ATOL, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    close(got, ref_group_norm(x.to(dtype).float(), gn.weight, gn.bias), atol=tol, rtol=tol)


def test_pos_embed_matches_mae_convention():
    for dim, grid in [(64, 4), (1152, 16)]:
        close(sincos_2d_pos_embed(dim, grid), ref_pos_embed(dim, grid), atol=1e-6)
    # row 0, column 1 differs from row 1, column 0: the two halves encode different axes
    pe = sincos_2d_pos_embed(64, 4)
    assert not torch.allclose(pe[1], pe[4])
    torch.testing.assert_close(pe[1, :32], pe[5, :32])  # same column -> same first half


# ----------------------------------------------------------------------------------------------------------
# ADM blocks
# ----------------------------------------------------------------------------------------------------------
# (AdaGN scale-shift, resampling, out channels); ADM's up/down ResBlocks keep the channel count
RESBLOCK_CASES = [(ss, ud, 32) for ss in (True, False) for ud in ("none", "up", "down")]
RESBLOCK_CASES += [(True, "none", 64), (False, "none", 64)]


@pytest.mark.parametrize("scale_shift,updown,out_ch", RESBLOCK_CASES)
def test_resblock(scale_shift, updown, out_ch):
    blk = U.ResBlock(32, 48, 0.0, out_ch, scale_shift, up=updown == "up", down=updown == "down")
    rand_params(blk, seed=1).eval()
    x, emb = torch.randn(2, 32, 8, 8), torch.randn(2, 48)
    got = blk(x, emb)
    size = {"none": 8, "up": 16, "down": 4}[updown]
    assert got.shape == (2, out_ch, size, size)
    close(got, ref_resblock(blk, x, emb))


@pytest.mark.parametrize("new_order", [True, False])
@pytest.mark.parametrize("heads,head_ch", [(1, -1), (4, -1), (1, 16)])
def test_attention_block(new_order, heads, head_ch):
    blk = U.AttentionBlock(64, heads, head_ch, new_order)
    rand_params(blk, seed=2)
    x = torch.randn(2, 64, 4, 6)
    assert blk.num_heads == (heads if head_ch == -1 else 64 // head_ch)
    close(blk(x), ref_attention_block(blk, x))
    # channels-last input gives the same result
    close(blk(x.contiguous(memory_format=torch.channels_last)), ref_attention_block(blk, x))


def test_attention_orders_differ():
    """The qkv channel order is part of the checkpoint format: the two orders must not coincide."""
    a = rand_params(U.AttentionBlock(64, 4, -1, True), seed=3)
    b = U.AttentionBlock(64, 4, -1, False)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 64, 4, 4)
    assert (a(x) - b(x)).abs().max() > 1e-3


def test_attention_pool():
    pool = U.AttentionPool2d(4, 64, 16, 10)
    rand_params(pool, seed=4)
    x = torch.randn(3, 64, 4, 4)
    got = pool(x)
    assert got.shape == (3, 10)
    close(got, ref_attention_pool(pool, x))
    with pytest.raises(ValueError, match="expects 4x4"):
        pool(torch.randn(1, 64, 8, 8))


def test_resample_with_conv():
    up, down = U.Upsample(32, True), U.Downsample(32, True)
    rand_params(up, 5), rand_params(down, 6)
    x = torch.randn(2, 32, 6, 6)
    close(up(x), conv(nearest_up(x.double()), up.conv, padding=1))
    close(down(x), conv(x.double(), down.op, stride=2, padding=1))
    close(U.Downsample(32, False)(x), avg_down(x))


# ----------------------------------------------------------------------------------------------------------
# DiT blocks
# ----------------------------------------------------------------------------------------------------------
def test_dit_block_and_final_layer():
    blk = rand_params(D.DiTBlock(64, 4), seed=7)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 64)
    close(blk(x, c), ref_dit_block(blk, x, c))
    fl = rand_params(D.FinalLayer(64, 2, 8), seed=8)
    close(fl(x, c), ref_final_layer(fl, x, c))


def test_dit_unpatchify_and_embedders():
    model = M.create("dit-tiny")
    x = torch.randn(2, 16, 2 * 2 * 8)
    torch.testing.assert_close(model.unpatchify(x), ref_unpatchify(x, 2, 8))
    rand_params(model, seed=9)
    t = torch.tensor([5, 900])
    mlp = model.t_embedder.mlp
    want = lin(silu(lin(ref_timestep_embedding(t, 256), mlp[0])), mlp[2])
    close(model.t_embedder(t), want, atol=1e-4)
    assert model.y_embedder.embedding_table.num_embeddings == 11  # 10 classes + the null class
    # patch embedding = a linear map of each flattened p x p patch
    z = torch.randn(1, 4, 8, 8)
    patches = z.reshape(1, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 16, 16)
    w = model.x_embedder.proj.weight.reshape(64, 16)
    close(model.x_embedder(z), patches.double() @ w.double().T + model.x_embedder.proj.bias.double())


# ----------------------------------------------------------------------------------------------------------
# whole tiny models against the explicit blocks composed as guided-diffusion / DiT compose them
# ----------------------------------------------------------------------------------------------------------
def ref_sequential(seq, h, emb):
    for layer in seq:
        if isinstance(layer, U.ResBlock):
            h = ref_resblock(layer, h, emb)
        elif isinstance(layer, U.AttentionBlock):
            h = ref_attention_block(layer, h)
        elif isinstance(layer, U.Upsample):
            h = nearest_up(h)
            h = conv(h, layer.conv, padding=1) if layer.use_conv else h
        elif isinstance(layer, U.Downsample):
            h = conv(h, layer.op, stride=2, padding=1) if isinstance(layer.op, torch.nn.Conv2d) else avg_down(h)
        elif isinstance(layer, torch.nn.Conv2d):
            h = conv(h, layer, padding=1)
        else:
            raise AssertionError(f"unexpected layer {type(layer)}")
    return h


def ref_embed(model, t):
    te = model.time_embed
    return lin(silu(lin(ref_timestep_embedding(t, model.model_channels), te[0])), te[2])


def ref_unet(model: U.UNetModel, x, t, y=None):
    emb = ref_embed(model, t)
    if model.num_classes is not None:
        emb = emb + model.label_emb.weight.double()[y]
    hs, h = [], x.double()
    for block in model.input_blocks:
        h = ref_sequential(block, h, emb)
        hs.append(h)
    h = ref_sequential(model.middle_block, h, emb)
    for block in model.output_blocks:
        h = ref_sequential(block, torch.cat([h, hs.pop()], dim=1), emb)
    h = silu(ref_group_norm(h, model.out[0].weight, model.out[0].bias))
    return conv(h, model.out[2], padding=1)


def ref_classifier(model: U.EncoderUNetModel, x, t):
    emb = ref_embed(model, t)
    h = x.double()
    for block in model.input_blocks:
        h = ref_sequential(block, h, emb)
    h = ref_sequential(model.middle_block, h, emb)
    h = silu(ref_group_norm(h, model.out[0].weight, model.out[0].bias))
    return ref_attention_pool(model.out[2], h)


def ref_dit(model: D.DiT, x, t, y):
    p = model.patch_size
    b = x.shape[0]
    g = model.input_size // p
    patches = x.double().reshape(b, model.in_channels, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, -1)
    w = model.x_embedder.proj.weight.double().flatten(1)
    h = patches @ w.T + model.x_embedder.proj.bias.double() + model.pos_embed.double()
    mlp = model.t_embedder.mlp
    c = lin(silu(lin(ref_timestep_embedding(t, 256), mlp[0])), mlp[2])
    c = c + model.y_embedder.embedding_table.weight.double()[y]
    for blk in model.blocks:
        h = ref_dit_block(blk, h, c)
    return ref_unpatchify(ref_final_layer(model.final_layer, h, c), p, model.out_channels)


@pytest.mark.parametrize("name", ["adm-tiny-cond", "adm-tiny-uncond"])
def test_unet_matches_reference_composition(name):
    model = rand_params(M.create(name), seed=10)
    inputs = example_inputs(model, 2, seed=1)
    got = model(*inputs)
    assert got.shape == (2, model.out_channels, 16, 16) and got.abs().mean() > 0.1
    close(got, ref_unet(model, *inputs), atol=1e-4, rtol=1e-4)


def test_classifier_matches_reference_composition():
    model = rand_params(M.create("adm-tiny-classifier"), seed=11)
    x, t = example_inputs(model, 3, seed=2)
    got = model(x, t)
    assert got.shape == (3, 10)
    close(got, ref_classifier(model, x, t), atol=1e-4, rtol=1e-4)


def test_dit_matches_reference_composition():
    model = rand_params(M.create("dit-tiny"), seed=12)
    x, t, y = example_inputs(model, 2, seed=3)
    y[1] = model.null_label
    got = model(x, t, y)
    assert got.shape == (2, 8, 8, 8)
    close(got, ref_dit(model, x, t, y), atol=1e-4, rtol=1e-4)


def test_classifier_input_gradient_matches_reference():
    """Classifier guidance differentiates log p(y | x_t) with respect to x_t: the gradient must be exact too."""
    model = rand_params(M.create("adm-tiny-classifier"), seed=13)
    x, t = example_inputs(model, 2, seed=6)
    y = torch.tensor([3, 7])
    x1 = x.clone().requires_grad_(True)
    torch.log_softmax(model(x1, t), dim=-1)[torch.arange(2), y].sum().backward()
    x2 = x.double().requires_grad_(True)
    torch.log_softmax(ref_classifier(model, x2, t), dim=-1)[torch.arange(2), y].sum().backward()
    assert x1.grad.abs().max() > 1e-3
    close(x1.grad, x2.grad, atol=1e-4, rtol=1e-3)
