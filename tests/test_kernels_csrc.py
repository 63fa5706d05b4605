"""The csrc step operators (torch.ops.cg_fast.ddpm_step / ddim_step) against the PyTorch reference.

On the CPU the fused kernels must equal :mod:`cg_fast.kernels.reference` BITWISE (same float32 operations in the
same order, the exp that torch.exp uses): every mode, odd shapes, per-row coefficients, in-place aliasing,
float16 / bfloat16 model outputs, and whole sampling runs. Plus: ``torch.library.opcheck``, ``torch.compile``,
argument errors, the fallback when the extension is missing, and a compile-only check of the CUDA kernels
(nvcc, no GPU needed). Tests that need the built extension are skipped (with the reason) when it is not built,
unless CG_FAST_REQUIRE_CSRC=1, where they fail instead.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import cg_fast.kernels as kernels
from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.guidance import Compress, Full
from cg_fast.kernels import csrc_ops
from cg_fast.kernels.reference import ddim_step_ref, ddpm_step_ref
from cg_fast.kernels.table import NUM_COLS, Col, schedule_columns

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("CG_FAST_REQUIRE_CSRC", "") not in ("", "0")
needs_ext = pytest.mark.skipif(
    not csrc_ops.available() and not REQUIRED,
    reason=f"csrc extension not built ({csrc_ops.load_error()}); build it with "
           "`pip install --no-build-isolation -e .`",
)

FNS = {"ddpm": (ddpm_step_ref, csrc_ops.ddpm_step_csrc), "ddim": (ddim_step_ref, csrc_ops.ddim_step_csrc)}


# -- inputs ------------------------------------------------------------------------------------------------------
def table(eta: float = 0.0, variance: str = "fixed_large") -> torch.Tensor:
    """A 50-step linear-schedule table with the guidance columns filled (values differ per step)."""
    t = schedule_columns(NoiseSchedule.linear(1000).respace("50"), variance=variance, eta=eta)
    n = t.shape[0]
    t[:, Col.GUIDE_S] = torch.linspace(0.5, 3.0, n)
    t[:, Col.H_DECAY] = torch.linspace(0.3, 0.95, n)
    t[:, Col.G_WEIGHT] = torch.linspace(1.0, 0.2, n)
    return t


def per_row_coef(tab: torch.Tensor, batch: int) -> torch.Tensor:
    """Different table rows (timesteps) per batch row, including the first and the last (no noise) step."""
    idx = torch.tensor([0, tab.shape[0] - 1, 17, 31, 5, 44, 23, 9, 38][:batch])
    if batch > len(idx):
        idx = torch.arange(batch) % tab.shape[0]
    return tab[idx].contiguous()


def make_inputs(shape, *, learned: bool, guide: str, fresh: bool, h: bool, seed: int = 0,
                dtype=torch.float32, fresh_channels_2x: bool = False):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[0], shape[1]
    x = torch.randn(shape, generator=g)
    z = torch.randn(shape, generator=g)
    o_shape = (b, 2 * c, *shape[2:]) if learned else tuple(shape)
    o = torch.randn(o_shape, generator=g) * 1.5  # > 1 in places, so clip matters
    if learned:
        o[:, c:] = torch.rand((b, c, *shape[2:]), generator=g) * 2.2 - 1.1  # the variance channel, ~[-1, 1]
    f = None
    if fresh:  # classifier: g like x; CFG: the unconditional output, C or 2C channels (learned variance)
        two_c = guide == "cfg" and (learned or fresh_channels_2x)
        f = torch.randn((b, 2 * c, *shape[2:]) if two_c else tuple(shape), generator=g)
    hh = torch.randn(shape, generator=g) if h else None
    return x, o.to(dtype), z, (f.to(dtype) if (f is not None and guide == "cfg") else f), hh


def run_both(method, x, o, coef, z, *, h=None, **kw):
    """Reference and csrc results (and their h states) from the same inputs."""
    ref_fn, csrc_fn = FNS[method]
    h_ref = h.clone() if h is not None else None
    h_got = h.clone() if h is not None else None
    want = ref_fn(x.clone(), o, coef, z, h=h_ref, **kw)
    got = csrc_fn(x.clone(), o, coef, z, h=h_got, **kw)
    return want, got, h_ref, h_got


def assert_bitwise(want, got, h_ref=None, h_got=None):
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert torch.equal(got, want), f"max |diff| {(got - want).abs().max().item():.3g}"
    if h_ref is not None:
        assert torch.equal(h_got, h_ref), f"h: max |diff| {(h_got - h_ref).abs().max().item():.3g}"


# (guide, fresh given, h given): every guide kind with every cache situation of spec §4 / §6
GUIDE_CASES = [
    ("none", False, False),
    ("classifier", True, False),   # drop / compress: a = m_j g
    ("classifier", True, True),    # reuse / momentum, guided step
    ("classifier", False, True),   # reuse / momentum, skipped step
    ("classifier", False, False),  # drop, skipped step: nothing applied
    ("cfg", True, False),
    ("cfg", True, True),
    ("cfg", False, True),
    ("cfg", False, False),
]
METHODS = [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)]


# -- every mode, bitwise -------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("guide,fresh,h", GUIDE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("learned", [False, True], ids=["fixedvar", "learnedvar"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("method,eta", METHODS, ids=["ddpm", "ddim-eta0", "ddim-eta1"])
def test_every_mode_bitwise(method, eta, prediction, learned, clip, guide, fresh, h):
    shape = (3, 3, 7, 5)
    coef = per_row_coef(table(eta), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=learned, guide=guide, fresh=fresh, h=h)
    kw = dict(guide=guide, fresh=f, prediction=prediction, learned_var=learned, clip=clip)
    assert_bitwise(*run_both(method, x, o, coef, z, h=hh, **kw))


@needs_ext
@pytest.mark.parametrize("variance", ["fixed_large", "fixed_small"])
def test_fixed_small_variance_bitwise(variance):
    shape = (4, 3, 6, 6)
    coef = per_row_coef(table(variance=variance), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=False, guide="classifier", fresh=True, h=True, seed=3)
    assert_bitwise(*run_both("ddpm", x, o, coef, z, h=hh, guide="classifier", fresh=f))


# -- shapes, chunking, threads ---------------------------------------------------------------------------------------
SHAPES = [
    (5, 13),          # vectors [B, d]
    (3, 3, 7, 5),     # odd image
    (1, 1, 1, 1),     # one element
    (2, 3, 33, 37),   # several chunks per row, ragged last chunk
    (9, 3, 33, 37),   # > 32k elements: the OpenMP path
]


@needs_ext
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", [
    ("ddpm", True, "classifier", True, True),
    ("ddpm", False, "cfg", True, True),
    ("ddim", False, "classifier", True, True),
    ("ddim", True, "cfg", True, False),
], ids=["ddpm-learned-clf", "ddpm-cfg", "ddim-clf", "ddim-learned-cfg"])
def test_shapes_bitwise(shape, case):
    method, learned, guide, fresh, h = case
    coef = per_row_coef(table(1.0 if method == "ddim" else 0.0), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=learned, guide=guide, fresh=fresh, h=h, seed=1)
    assert_bitwise(*run_both(method, x, o, coef, z, h=hh, guide=guide, fresh=f, learned_var=learned))


@needs_ext
def test_single_thread_equals_multi_thread():
    shape = (9, 3, 33, 37)
    coef = per_row_coef(table(), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=True, guide="classifier", fresh=True, h=True, seed=2)
    outs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            h1 = hh.clone()
            outs.append((csrc_ops.ddpm_step_csrc(x, o, coef, z, guide="classifier", fresh=f, h=h1, learned_var=True),
                         h1))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])


@needs_ext
def test_zero_batch():
    coef = torch.zeros(0, NUM_COLS)
    x = torch.zeros(0, 3, 4, 4)
    got = csrc_ops.ddpm_step_csrc(x, x.clone(), coef, x.clone())
    assert got.shape == x.shape


# -- CFG channel restriction (spec §6) ----------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("cfg_channels", [None, 0, 1, 3, 4, 7])
@pytest.mark.parametrize("learned,fresh_2x", [(False, False), (False, True), (True, True)],
                         ids=["C", "fresh2C", "learned"])
@pytest.mark.parametrize("h", [False, True], ids=["noh", "h"])
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_cfg_channels_bitwise(method, h, learned, fresh_2x, cfg_channels):
    shape = (3, 4, 5, 6)  # C = 4 (as DiT latents, which guide 3 of 4)
    coef = per_row_coef(table(), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=learned, guide="cfg", fresh=True, h=h, seed=4,
                                 fresh_channels_2x=fresh_2x)
    assert_bitwise(*run_both(method, x, o, coef, z, h=hh, guide="cfg", fresh=f, learned_var=learned,
                             cfg_channels=cfg_channels, clip=False))


@needs_ext
def test_cfg_channels_on_vectors():
    shape = (4, 10)  # [B, d]: channels are the d entries
    coef = per_row_coef(table(), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=False, guide="cfg", fresh=True, h=True, seed=5)
    assert_bitwise(*run_both("ddpm", x, o, coef, z, h=hh, guide="cfg", fresh=f, cfg_channels=3))


@needs_ext
def test_cfg_channels_ignored_by_classifier_guidance():
    shape = (3, 4, 5, 6)
    coef = per_row_coef(table(), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=True, guide="classifier", fresh=True, h=True, seed=10)
    assert_bitwise(*run_both("ddpm", x, o, coef, z, h=hh, guide="classifier", fresh=f, learned_var=True,
                             cfg_channels=1))


# -- in place, strides, dtypes ------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_in_place_out_aliases_x(method):
    shape = (4, 3, 9, 11)
    coef = per_row_coef(table(1.0), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=True, guide="classifier", fresh=True, h=True, seed=6)
    ref_fn, csrc_fn = FNS[method]
    h_ref, h_got = hh.clone(), hh.clone()
    want = ref_fn(x.clone(), o, coef, z, guide="classifier", fresh=f, h=h_ref, learned_var=True)
    x_io = x.clone()
    ptr = x_io.data_ptr()
    got = csrc_fn(x_io, o, coef, z, guide="classifier", fresh=f, h=h_got, learned_var=True, out=x_io)
    assert got is x_io and x_io.data_ptr() == ptr
    assert_bitwise(want, x_io, h_ref, h_got)


@needs_ext
def test_non_contiguous_out_h_and_inputs():
    shape = (3, 3, 8, 6)
    coef_full = torch.cat([per_row_coef(table(), 3), torch.zeros(3, 5)], dim=1)[:, :NUM_COLS]  # strided rows
    x, o, z, f, hh = make_inputs(shape, learned=True, guide="classifier", fresh=True, h=True, seed=7)
    h_ref = hh.clone()
    want = ddpm_step_ref(x, o, coef_full, z, guide="classifier", fresh=f, h=h_ref, learned_var=True)
    out_t = torch.zeros(shape[0], shape[1], shape[3], shape[2]).transpose(2, 3)  # non-contiguous out
    h_t = hh.clone().transpose(2, 3).contiguous().transpose(2, 3)                 # non-contiguous h, same values
    x_t = x.transpose(2, 3).contiguous().transpose(2, 3)
    got = csrc_ops.ddpm_step_csrc(x_t, o, coef_full, z, guide="classifier", fresh=f, h=h_t, learned_var=True,
                                  out=out_t)
    assert got is out_t
    assert_bitwise(want, out_t, h_ref, h_t)


@needs_ext
def test_expanded_coef_row():
    shape = (4, 3, 5, 5)
    tab = table()
    coef = tab[12].expand(shape[0], -1)  # the sampler's usual table[j].expand(B, -1)
    x, o, z, f, hh = make_inputs(shape, learned=False, guide="classifier", fresh=True, h=True)
    assert_bitwise(*run_both("ddpm", x, o, coef, z, h=hh, guide="classifier", fresh=f))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,learned,guide", [("ddpm", True, "cfg"), ("ddpm", False, "classifier"),
                                                  ("ddim", True, "cfg"), ("ddim", False, "none")])
def test_low_precision_model_output(dtype, method, learned, guide):
    shape = (3, 3, 7, 5)
    coef = per_row_coef(table(1.0), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=learned, guide=guide, fresh=guide != "none",
                                 h=guide != "none", dtype=dtype, seed=8)
    assert o.dtype == dtype and (f is None or guide != "cfg" or f.dtype == dtype)
    assert_bitwise(*run_both(method, x, o, coef, z, h=hh, guide=guide, fresh=f, learned_var=learned))


@needs_ext
def test_mixed_dtypes_model_out_fp16_fresh_fp32():
    shape = (2, 3, 6, 7)
    coef = per_row_coef(table(), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=True, guide="classifier", fresh=True, h=True, seed=9)
    o16 = o.half()
    assert_bitwise(*run_both("ddpm", x, o16, coef, z, h=hh, guide="classifier", fresh=f, learned_var=True))
    assert_bitwise(*run_both("ddpm", x, o16, coef, z, h=hh, guide="cfg", fresh=o.bfloat16(), learned_var=True))


# -- errors ------------------------------------------------------------------------------------------------------------
@needs_ext
def test_argument_errors():
    shape = (2, 3, 4, 4)
    coef = per_row_coef(table(), 2)
    x, o, z, f, hh = make_inputs(shape, learned=False, guide="classifier", fresh=True, h=True)
    step = csrc_ops.ddpm_step_csrc
    with pytest.raises(ValueError, match="unknown guide kind"):
        step(x, o, coef, z, guide="bogus")
    with pytest.raises(ValueError, match="guide='none' takes neither"):
        step(x, o, coef, z, fresh=f)
    with pytest.raises(ValueError, match="unknown prediction"):
        step(x, o, coef, z, prediction="score")
    with pytest.raises(ValueError, match="cfg_channels must be >= 0"):
        step(x, o, coef, z, guide="cfg", fresh=o, cfg_channels=-1)
    h0 = hh.clone()
    with pytest.raises(ValueError):  # validated before h is touched, as the reference
        step(x, o, coef, z, guide="classifier", fresh=f, h=hh, prediction="score")
    assert torch.equal(hh, h0)
    op_errors = [
        (dict(model_out=torch.randn(2, 6, 4, 4)), "model_out must have 48 elements per batch row"),
        (dict(model_out=o, learned_var=True), r"model_out \(learned_var=True: eps and variance channels\) must have 96"),
        (dict(coef=coef[:, :10]), rf"coef must have shape \[2, {NUM_COLS}\]"),
        (dict(coef=coef[:1]), rf"coef must have shape \[2, {NUM_COLS}\]"),
        (dict(noise=z[:, :2]), "noise must have the shape of x"),
        (dict(x=x.double()), "x must be float32"),
        (dict(model_out=o.int()), "model_out must be float32, float16 or bfloat16"),
        (dict(guide="classifier", fresh=torch.randn(2, 5)), r"fresh \(the guidance\) must have 48 elements"),
        (dict(guide="classifier", fresh=f, h=torch.randn(2, 3, 4, 5)), "h must have the shape of x"),
        (dict(x=x[0, 0, 0]), "x must be batch-first"),
    ]
    for change, msg in op_errors:
        kw = dict(x=x, model_out=o, coef=coef, noise=z)
        kw.update(change)
        args = [kw.pop(k) for k in ("x", "model_out", "coef", "noise")]
        with pytest.raises(RuntimeError, match="^cg_fast::ddpm_step: " + msg):
            step(*args, **kw)
    with pytest.raises(RuntimeError, match="^cg_fast::ddim_step: unknown guide kind 'bogus'"):
        torch.ops.cg_fast.ddim_step(x, o, coef, z, torch.empty_like(x), guide="bogus")
    with pytest.raises(RuntimeError, match="^cg_fast::ddpm_step: cfg_channels must be >= 0"):
        torch.ops.cg_fast.ddpm_step(x, o, coef, z, torch.empty_like(x), guide="cfg", fresh=o, cfg_channels=-1)
    h0 = hh.clone()
    with pytest.raises(RuntimeError, match="^cg_fast::ddpm_step: noise must have the shape of x"):
        torch.ops.cg_fast.ddpm_step(x, o, coef, z[:1], torch.empty_like(x), guide="classifier", fresh=f, h=hh)
    assert torch.equal(hh, h0)  # every check runs before the kernel touches h


# -- opcheck / torch.compile --------------------------------------------------------------------------------------
def _opcheck_cases():
    shape = (2, 3, 5, 4)
    coef = per_row_coef(table(1.0), 2)
    x, o, z, f, hh = make_inputs(shape, learned=True, guide="classifier", fresh=True, h=True)
    _, o_c, _, f_c, _ = make_inputs(shape, learned=False, guide="cfg", fresh=True, h=False, dtype=torch.float16)
    return [
        ((x, o, coef, z, torch.empty_like(x)), dict(guide="classifier", fresh=f, h=hh.clone(), learned_var=True)),
        ((x, o_c, coef, z, torch.empty_like(x)), dict(guide="cfg", fresh=f_c, h=hh.clone(), cfg_channels=2,
                                                      prediction="v", clip=False)),
        ((x, o, coef, z, torch.empty_like(x)), dict(learned_var=True, prediction="x0")),
    ]


@needs_ext
@pytest.mark.parametrize("name", ["ddpm_step", "ddim_step"])
def test_opcheck(name):
    op = getattr(torch.ops.cg_fast, name).default
    for args, kwargs in _opcheck_cases():
        torch.library.opcheck(op, args, kwargs)


@needs_ext
def test_torch_compile_fullgraph():
    shape = (2, 3, 8, 8)
    coef = per_row_coef(table(), 2)
    x, o, z, f, hh = make_inputs(shape, learned=True, guide="classifier", fresh=True, h=True, seed=11)

    def step(x, o, coef, z, g, h):
        y = csrc_ops.ddpm_step_csrc(x, o, coef, z, guide="classifier", fresh=g, h=h, learned_var=True)
        return y * 1.0

    h_eager, h_comp = hh.clone(), hh.clone()
    want = step(x, o, coef, z, f, h_eager)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(x, o, coef, z, f, h_comp)
    assert torch.equal(got, want) and torch.equal(h_comp, h_eager)
    assert not torch.equal(h_comp, hh)  # the mutation of h survived functionalisation


# -- whole sampling runs --------------------------------------------------------------------------------------------
def _sample(model, kernels_impl, guidance, *, steps="20", method="ddpm", learned=False, shape=(2, 3, 8, 8),
            **kw):
    sampler = Sampler(model, NoiseSchedule.linear(1000), steps, method, learn_sigma=learned, kernels=kernels_impl,
                      **kw)
    gen = torch.Generator().manual_seed(1234)
    return sampler.sample(shape, y=torch.tensor([1, 7][: shape[0]]), guidance=guidance, generator=gen)


@needs_ext
@pytest.mark.parametrize("learned", [False, True], ids=["eps", "eps+learned-var"])
@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sampler_compg_momentum_equals_reference(method, learned, tiny_eps, tiny_eps_learned, tiny_classifier):
    model = tiny_eps_learned if learned else tiny_eps
    guid = ClassifierGuidance(tiny_classifier, 2.0, policy=Compress(rate=4, k=2), cache="momentum", beta=0.5,
                              decay=0.9)
    steps = "ddim20" if method == "ddim" else "20"
    kw = dict(eta=0.5) if method == "ddim" else {}
    want = _sample(model, "reference", guid, steps=steps, method=method, learned=learned, **kw)
    got = _sample(model, "csrc", guid, steps=steps, method=method, learned=learned, **kw)
    assert torch.equal(got.x, want.x), f"max |diff| {(got.x - want.x).abs().max().item():.3g}"
    assert got.stats.classifier_grads == want.stats.classifier_grads


@needs_ext
@pytest.mark.parametrize("cache,channels", [("drop", None), ("momentum", 2), ("reuse", None)])
def test_sampler_cfg_equals_reference(cache, channels, tiny_eps):
    extra = dict(beta=0.3, decay=0.8) if cache == "momentum" else {}
    guid = CFG(scale=3.0, null_label=10, policy=Compress(rate=3), cache=cache, channels=channels, **extra)
    want = _sample(tiny_eps, "reference", guid)
    got = _sample(tiny_eps, "csrc", guid)
    assert torch.equal(got.x, want.x), f"max |diff| {(got.x - want.x).abs().max().item():.3g}"


@needs_ext
def test_sampler_auto_picks_csrc_on_cpu(tiny_eps, tiny_classifier, monkeypatch):
    monkeypatch.delenv("CG_FAST_KERNELS", raising=False)
    assert kernels.resolve(torch.zeros(1, 1)) == "csrc"
    guid = ClassifierGuidance(tiny_classifier, 1.0, policy=Full(), cache="drop")
    assert torch.equal(_sample(tiny_eps, "auto", guid).x, _sample(tiny_eps, "reference", guid).x)


# -- exp: the default is torch.exp's own function; the others are within an ulp or two -----------------------------
@needs_ext
@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sleef", "std"])
def test_other_exp_implementations_within_tolerance(impl):
    """CG_FAST_CSRC_EXP=sleef|std (what torch.exp is on builds without MKL) stays within 1e-6."""
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_kernels_csrc import make_inputs, per_row_coef, table
        from cg_fast.kernels import csrc_ops
        from cg_fast.kernels.reference import ddpm_step_ref
        shape = (4, 3, 16, 16)
        coef = per_row_coef(table(), 4)
        x, o, z, f, h = make_inputs(shape, learned=True, guide="classifier", fresh=True, h=True)
        want = ddpm_step_ref(x, o, coef, z, guide="classifier", fresh=f, h=h.clone(), learned_var=True)
        got = csrc_ops.ddpm_step_csrc(x, o, coef, z, guide="classifier", fresh=f, h=h.clone(), learned_var=True)
        print((got - want).abs().max().item())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    """)
    env = dict(os.environ, CG_FAST_CSRC_EXP=impl)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


# -- the extension missing -----------------------------------------------------------------------------------------
def _csrc_ops_without_extension(monkeypatch):
    """A fresh copy of cg_fast.kernels.csrc_ops whose `from cg_fast import _C` fails."""
    import cg_fast

    for name in ("_C", "_C_cuda"):
        monkeypatch.delattr(cg_fast, name, raising=False)  # else `from cg_fast import _C` finds the attribute
        monkeypatch.setitem(sys.modules, f"cg_fast.{name}", None)  # importing a None entry raises ImportError
    spec = importlib.util.spec_from_file_location("cg_fast.kernels._csrc_ops_missing",
                                                  ROOT / "cg_fast" / "kernels" / "csrc_ops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@needs_ext
def test_available_per_device():
    assert csrc_ops.available() and csrc_ops.available("cpu") and csrc_ops.available(torch.device("cpu"))
    assert csrc_ops.available("meta") is False
    has_cuda_ext = importlib.util.find_spec("cg_fast._C_cuda") is not None
    assert csrc_ops.available("cuda") is has_cuda_ext


def test_missing_extension_reports_unavailable(monkeypatch):
    mod = _csrc_ops_without_extension(monkeypatch)
    assert mod.available() is False and mod.available("cpu") is False
    assert "cg_fast._C" in mod.load_error()


def test_missing_extension_falls_back_to_reference_with_one_warning(monkeypatch):
    mod = _csrc_ops_without_extension(monkeypatch)
    monkeypatch.setitem(sys.modules, "cg_fast.kernels.csrc_ops", mod)
    monkeypatch.setattr(kernels, "_loaded", {"reference": kernels._loaded["reference"]})
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.delenv("CG_FAST_KERNELS", raising=False)
    assert kernels.available("csrc") is False
    shape = (2, 3, 4, 4)
    coef = per_row_coef(table(), 2)
    x, o, z, f, hh = make_inputs(shape, learned=False, guide="classifier", fresh=True, h=False)
    with pytest.warns(RuntimeWarning, match="csrc step kernels are not available"):
        got = kernels.ddpm_step(x, o, coef, z, guide="classifier", fresh=f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only one warning per process
        again = kernels.ddpm_step(x, o, coef, z, guide="classifier", fresh=f)
    want = ddpm_step_ref(x, o, coef, z, guide="classifier", fresh=f)
    assert torch.equal(got, want) and torch.equal(again, want)
    with pytest.raises(RuntimeError, match="'csrc' was requested but is not available"):
        kernels.ddpm_step(x, o, coef, z, impl="csrc")


def test_extension_built_when_required():
    if not REQUIRED:
        pytest.skip("set CG_FAST_REQUIRE_CSRC=1 to require the built extension")
    assert csrc_ops.available(), csrc_ops.load_error()


# -- CUDA ---------------------------------------------------------------------------------------------------------
def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").exists():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def test_cuda_kernel_compiles(tmp_path):
    """The torch-independent CUDA kernels (csrc/cuda/step.cu) compile with nvcc alone, for sm_90."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    cmd = [nvcc, "-c", "-arch=sm_90", "-O3", "--fmad=false", "-std=c++17", "-Xcompiler", "-Wall",
           str(ROOT / "csrc" / "cuda" / "step.cu"), "-o", str(tmp_path / "step.o")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout}\n{res.stderr}"
    assert (tmp_path / "step.o").stat().st_size > 0


_HOST_HARNESS = r"""
// Host build of the CUDA kernels' per-element code (csrc/step_element.h), for checking it without a GPU.
#include <cmath>
#include <cstdint>
namespace cg_fast { inline float to_f32(float v) { return v; } }
#include "step_element.h"
#ifdef CG_HOST_EXP_MKL
extern "C" void vmsExp(int n, const float* a, float* r, long long mode);  // what torch.exp calls
struct HostExp { float operator()(float v) const { float r; vmsExp(1, &v, &r, 0x2 | 0x00140000 | 0x100); return r; } };
#else
struct HostExp { float operator()(float v) const { return std::exp(v); } };
#endif
extern "C" void step_host(const float* x, const float* model_out, const float* coef, const float* noise,
                          const float* fresh, float* h, float* out, int64_t rows, int64_t n, int64_t o_row,
                          int64_t f_row, int64_t guided_limit, int method, int guide, int prediction,
                          int learned_var, int clip) {
  cg_fast::StepArgs p;
  p.x = x; p.model_out = model_out; p.coef = coef; p.noise = noise; p.fresh = fresh; p.h = h; p.out = out;
  p.rows = rows; p.n = n; p.o_row = o_row; p.f_row = f_row; p.guided_limit = guided_limit;
  p.method = method; p.guide = guide; p.prediction = prediction;
  p.learned_var = learned_var != 0; p.clip = clip != 0;
  for (int64_t idx = 0; idx < rows * n; ++idx) cg_fast::step_element<float, float>(p, idx, HostExp{});
}
"""


def test_cuda_element_math_on_host(tmp_path):
    """The CUDA kernels' per-element code (csrc/step_element.h), built for the host with g++, equals the
    reference in every mode: bitwise where it can call torch's exp (MKL builds), else within 1e-6."""
    import ctypes

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "harness.cpp"
    src.write_text(_HOST_HARNESS)
    lib_path = tmp_path / "harness.so"
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}", str(src),
           "-o", str(lib_path)]
    mkl = torch.backends.mkl.is_available()
    if mkl:
        torch_lib = Path(torch.__file__).parent / "lib"
        cmd[1:1] = ["-DCG_HOST_EXP_MKL"]
        cmd += [f"-L{torch_lib}", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    lib = ctypes.CDLL(str(lib_path))
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
    lib.step_host.argtypes = [ptr] * 7 + [i64] * 5 + [i32] * 5
    lib.step_host.restype = None

    def host_step(method, x, o, coef, z, *, guide="none", fresh=None, h=None, prediction="eps",
                  learned_var=False, clip=True, cfg_channels=None):
        rows, n = x.shape[0], x[0].numel()
        out = torch.empty_like(x)
        o = o.float().contiguous()
        f = fresh.float().contiguous() if fresh is not None else None
        c = x.shape[1]
        limit = cfg_channels * (n // c) if (cfg_channels is not None and cfg_channels < c) else n
        lib.step_host(x.data_ptr(), o.data_ptr(), coef.contiguous().data_ptr(), z.data_ptr(),
                      f.data_ptr() if f is not None else None, h.data_ptr() if h is not None else None,
                      out.data_ptr(), rows, n, o[0].numel(), f[0].numel() if f is not None else 0, limit,
                      ["ddpm", "ddim"].index(method), ["none", "classifier", "cfg"].index(guide),
                      ["eps", "x0", "v"].index(prediction), int(learned_var), int(clip))
        return out

    shape = (3, 4, 7, 5)
    checked = 0
    for method, eta in METHODS:
        coef = per_row_coef(table(eta), shape[0])
        for prediction in ("eps", "x0", "v"):
            for learned in (False, True):
                for clip in (True, False):
                    for guide, fresh, h in GUIDE_CASES:
                        x, o, z, f, hh = make_inputs(shape, learned=learned, guide=guide, fresh=fresh, h=h)
                        kw = dict(guide=guide, fresh=f, prediction=prediction, learned_var=learned, clip=clip,
                                  cfg_channels=3 if guide == "cfg" else None)
                        h_ref = hh.clone() if hh is not None else None
                        h_got = hh.clone() if hh is not None else None
                        want = FNS[method][0](x, o, coef, z, h=h_ref, **kw)
                        got = host_step(method, x, o, coef, z, h=h_got, **kw)
                        if h_ref is not None:
                            assert torch.equal(h_got, h_ref)
                        if mkl or method == "ddim":  # DDIM has no exp
                            assert torch.equal(got, want), (method, eta, prediction, learned, clip, guide)
                        else:
                            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
                        checked += 1
    assert checked == len(METHODS) * 3 * 2 * 2 * len(GUIDE_CASES)


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and csrc_ops.available("cuda")


@pytest.mark.skipif(not _cuda_ready(), reason="needs a GPU and the CUDA extension (cg_fast._C_cuda)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,learned,guide,fresh,h", [
    ("ddpm", True, "classifier", True, True), ("ddpm", False, "cfg", True, True),
    ("ddim", False, "classifier", True, False), ("ddim", True, "cfg", False, True),
])
def test_cuda_matches_cpu_reference(dtype, method, learned, guide, fresh, h):
    """Same float32 operations (no FMA: --fmad=false) except exp (expf): a few ulp from the CPU reference."""
    shape = (3, 3, 33, 37)
    coef = per_row_coef(table(1.0), shape[0])
    x, o, z, f, hh = make_inputs(shape, learned=learned, guide=guide, fresh=fresh, h=h, dtype=dtype)
    if f is not None and guide == "classifier":
        f = f.to(dtype)
    want, _, h_ref, _ = run_both(method, x, o, coef, z, h=hh, guide=guide, fresh=f, learned_var=learned,
                                 cfg_channels=2 if guide == "cfg" else None)
    dev = torch.device("cuda")
    h_dev = hh.to(dev) if hh is not None else None
    got = FNS[method][1](x.to(dev), o.to(dev), coef.to(dev), z.to(dev), guide=guide,
                         fresh=f.to(dev) if f is not None else None, h=h_dev, learned_var=learned,
                         cfg_channels=2 if guide == "cfg" else None)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    if h_ref is not None:
        assert torch.equal(h_dev.cpu(), h_ref)  # the cache update has no exp: bitwise
