"""The fused Triton step kernels against the PyTorch reference (spec §4-§6), under TRITON_INTERPRET=1 on the CPU.

Every mode of :func:`ddpm_step_ref` / :func:`ddim_step_ref` is compared on irregular shapes (not multiples of
the kernel's BLOCK), with per-row coefficients (a different table row for each batch row) and random guidance
columns. Low-precision model outputs are compared with the reference fed the same low-precision tensor. The
interpreter is slow: tensors are small and the sampling runs short.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from cg_fast import CFG, ClassifierGuidance, NoiseSchedule, Sampler  # noqa: E402
from cg_fast import kernels  # noqa: E402
from cg_fast.guidance import Compress, Full  # noqa: E402
from cg_fast.kernels.reference import ddim_step_ref, ddpm_step_ref  # noqa: E402
from cg_fast.kernels.table import NUM_COLS, Col, schedule_columns  # noqa: E402
from cg_fast.kernels import triton_step  # noqa: E402
from cg_fast.kernels.triton_step import BLOCK, ddim_step_triton, ddpm_step_triton  # noqa: E402

if not triton_step.available():  # pragma: no cover - conftest sets TRITON_INTERPRET=1
    pytest.skip("Triton cannot run here: no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)
if not triton_step._INTERPRETED:  # pragma: no cover - a GPU machine (conftest leaves the kernels compiled)
    pytest.skip("these tests feed CPU tensors to the interpreted kernels; on a GPU the compiled kernels are "
                "checked over every variant and dtype by tests/test_gpu.py", allow_module_level=True)

SHAPES = [(3, 3, 7, 5), (5, 13)]  # n = 105 and 13: partial blocks, a vector layout
# (name, step under test, reference, DDIM eta or None for DDPM)
METHODS = {
    "ddpm": (ddpm_step_triton, ddpm_step_ref, 0.0),
    "ddim-eta0": (ddim_step_triton, ddim_step_ref, 0.0),
    "ddim-eta1": (ddim_step_triton, ddim_step_ref, 1.0),
}
# (guide, has fresh, has h): every guide kind and cache mode (spec §4): drop/compress (fresh, no h),
# reuse/momentum at a guided step (fresh and h) and at a skipped step (h only)
MODES = {
    "none": ("none", False, False),
    "clf-fresh": ("classifier", True, False),
    "clf-h-fresh": ("classifier", True, True),
    "clf-h-skip": ("classifier", False, True),
    "cfg-fresh": ("cfg", True, False),
    "cfg-h-fresh": ("cfg", True, True),
    "cfg-h-skip": ("cfg", False, True),
}
_TABLES: dict[float, torch.Tensor] = {}


def table(eta: float) -> torch.Tensor:
    """The 50-step linear schedule's coefficient table (cached per eta)."""
    if eta not in _TABLES:
        _TABLES[eta] = schedule_columns(NoiseSchedule.linear(1000).respace("50"), eta=eta)
    return _TABLES[eta]


def coefficients(eta: float, batch: int, seed: int = 0, last_step: bool = False) -> torch.Tensor:
    """Per-row coefficients: a different table row per batch row, random guidance columns (spec §4-§6)."""
    gen = torch.Generator().manual_seed(seed)
    tab = table(eta)
    rows = torch.randint(0, tab.shape[0] - 1, (batch,), generator=gen)
    if last_step:
        rows[-1] = tab.shape[0] - 1  # NONZERO = 0: no noise on the last step
    coef = tab[rows].clone()
    coef[:, Col.GUIDE_S] = 0.5 + 2.5 * torch.rand(batch, generator=gen)
    coef[:, Col.H_DECAY] = torch.rand(batch, generator=gen)
    coef[:, Col.G_WEIGHT] = 0.2 + 2.0 * torch.rand(batch, generator=gen)
    return coef


def step_inputs(shape, *, learned: bool, guide: str, has_fresh: bool, has_h: bool, seed: int = 1,
                dtype: torch.dtype = torch.float32, fresh_dtype: torch.dtype | None = None) -> dict:
    """x, model output (eps and, with learned variance, the variance value in [-1, 1]), noise, fresh, h."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    batch, chans, spatial = shape[0], shape[1], tuple(shape[2:])
    o_shape = (batch, chans * (2 if learned else 1), *spatial)
    model_out = rnd(o_shape)
    if learned:
        model_out[:, chans:] = torch.tanh(model_out[:, chans:])
    fresh = None
    if has_fresh:
        fresh = rnd(shape) if guide == "classifier" else model_out + 0.3 * rnd(o_shape)  # CFG: eps_u like o
        fresh = fresh.to(fresh_dtype or (dtype if guide == "cfg" else torch.float32))
    return {"x": 1.5 * rnd(shape), "model_out": model_out.to(dtype), "noise": rnd(shape),
            "fresh": fresh, "h": rnd(shape) if has_h else None}


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """float32 agreement to ~1e-5 relative to the magnitudes involved."""
    got, want = got.detach(), want.detach()  # the reference keeps an autograd graph when the model has one
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{what}: {m}")


def run_both(method: str, inputs: dict, coef: torch.Tensor, **kw) -> None:
    """Run the kernel and the reference on copies of the same inputs; compare x_{t-1} and the state h."""
    kernel, ref, _ = METHODS[method]
    h_k = inputs["h"].clone() if inputs["h"] is not None else None
    h_r = inputs["h"].clone() if inputs["h"] is not None else None
    args = (inputs["x"], inputs["model_out"], coef, inputs["noise"])
    got = kernel(*args, fresh=inputs["fresh"], h=h_k, **kw)
    want = ref(*args, fresh=inputs["fresh"], h=h_r, **kw)
    assert got.dtype == torch.float32 and got.shape == inputs["x"].shape
    assert_close(got, want, "x_{t-1}")
    if h_r is not None:
        assert_close(h_k, h_r, "cache state h")


# -- every mode (spec §4-§6) ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("learned", [False, True], ids=["fixed-var", "learned-var"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("method", list(METHODS))
def test_guide_and_cache_modes_match_reference(method, mode, learned, shape):
    guide, has_fresh, has_h = MODES[mode]
    inputs = step_inputs(shape, learned=learned, guide=guide, has_fresh=has_fresh, has_h=has_h)
    coef = coefficients(METHODS[method][2], shape[0], last_step=True)
    run_both(method, inputs, coef, guide=guide, learned_var=learned)


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "no-clip"])
@pytest.mark.parametrize("learned", [False, True], ids=["fixed-var", "learned-var"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("method", list(METHODS))
def test_predictions_and_clip_match_reference(method, prediction, learned, clip):
    inputs = step_inputs((3, 3, 7, 5), learned=learned, guide="classifier", has_fresh=True, has_h=True, seed=2)
    coef = coefficients(METHODS[method][2], 3, seed=3)
    run_both(method, inputs, coef, guide="classifier", prediction=prediction, learned_var=learned, clip=clip)


@pytest.mark.parametrize("mode", ["clf-h-fresh", "cfg-h-fresh"])
@pytest.mark.parametrize("method", ["ddpm", "ddim-eta1"])
def test_rows_longer_than_one_block(method, mode):
    guide, has_fresh, has_h = MODES[mode]
    shape = (2, 3, 19, 23)  # n = 1311: one full block and a partial one
    assert shape[1] * shape[2] * shape[3] % BLOCK != 0
    inputs = step_inputs(shape, learned=True, guide=guide, has_fresh=has_fresh, has_h=has_h, seed=4)
    run_both(method, inputs, coefficients(METHODS[method][2], 2, seed=5), guide=guide, learned_var=True,
             cfg_channels=2 if guide == "cfg" else None)


# -- CFG channel restriction (spec §6) -----------------------------------------------------------------------
@pytest.mark.parametrize("cfg_channels", [None, 0, 1, 2, 3, 7])
@pytest.mark.parametrize("mode", ["cfg-fresh", "cfg-h-fresh", "cfg-h-skip"])
@pytest.mark.parametrize("method", ["ddpm", "ddim-eta0"])
def test_cfg_channel_restriction_matches_reference(method, mode, cfg_channels):
    """Outside the first ``cfg_channels`` channels eps = eps_c, while h is updated on every element."""
    guide, has_fresh, has_h = MODES[mode]
    inputs = step_inputs((3, 3, 7, 5), learned=True, guide=guide, has_fresh=has_fresh, has_h=has_h, seed=6)
    run_both(method, inputs, coefficients(METHODS[method][2], 3, seed=7), guide=guide, learned_var=True,
             cfg_channels=cfg_channels)


def test_cfg_restriction_leaves_other_channels_unguided_but_updates_h():
    inputs = step_inputs((2, 4, 3, 5), learned=False, guide="cfg", has_fresh=True, has_h=True, seed=8)
    coef = coefficients(0.0, 2, seed=9)
    h = inputs["h"].clone()
    guided = ddpm_step_triton(inputs["x"], inputs["model_out"], coef, inputs["noise"], guide="cfg",
                              fresh=inputs["fresh"], h=h, cfg_channels=3)
    plain = ddpm_step_triton(inputs["x"], inputs["model_out"], coef, inputs["noise"])
    assert torch.equal(guided[:, 3:], plain[:, 3:]), "channel 3 must get eps = eps_c"
    assert not torch.allclose(guided[:, :3], plain[:, :3])
    d = inputs["model_out"] - inputs["fresh"]
    a = inputs["h"] * coef[:, Col.H_DECAY, None, None, None] + d * coef[:, Col.G_WEIGHT, None, None, None]
    assert_close(h, a, "h on all channels")


def test_cfg_fresh_with_only_the_eps_channels():
    """The unconditional output may carry C channels even when model_out has 2C (only eps_u is read)."""
    inputs = step_inputs((3, 3, 7, 5), learned=True, guide="cfg", has_fresh=True, has_h=True, seed=10)
    inputs["fresh"] = inputs["fresh"][:, :3].clone()
    run_both("ddpm", inputs, coefficients(0.0, 3, seed=11), guide="cfg", learned_var=True)


# -- dtypes ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("mode", ["none", "clf-h-fresh", "cfg-h-fresh"])
@pytest.mark.parametrize("method", ["ddpm", "ddim-eta1"])
def test_low_precision_model_output(method, mode, dtype):
    """fp16 / bf16 model output (and CFG eps_u, classifier g) are upcast in the kernel, as ``.float()``."""
    guide, has_fresh, has_h = MODES[mode]
    inputs = step_inputs((3, 3, 7, 5), learned=True, guide=guide, has_fresh=has_fresh, has_h=has_h, seed=12,
                         dtype=dtype, fresh_dtype=dtype)
    assert inputs["model_out"].dtype == dtype
    run_both(method, inputs, coefficients(METHODS[method][2], 3, seed=13), guide=guide, learned_var=True)


# -- per-row coefficients, layouts, aliasing --------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ddpm", "ddim-eta1"])
def test_each_row_uses_its_own_coefficients(method):
    kernel, ref, eta = METHODS[method]
    inputs = step_inputs((3, 3, 7, 5), learned=True, guide="classifier", has_fresh=True, has_h=False, seed=14)
    coef = coefficients(eta, 3, seed=15)
    got = kernel(inputs["x"], inputs["model_out"], coef, inputs["noise"], guide="classifier",
                 fresh=inputs["fresh"], learned_var=True)
    for b in range(3):  # row b alone, with its own table row
        one = ref(inputs["x"][b:b + 1], inputs["model_out"][b:b + 1], coef[b:b + 1], inputs["noise"][b:b + 1],
                  guide="classifier", fresh=inputs["fresh"][b:b + 1], learned_var=True)
        assert_close(got[b:b + 1], one, f"row {b}")


def test_broadcast_and_expanded_coefficient_rows():
    """``coef`` may be one row [1, NUM_COLS] or ``table[j].expand(B, -1)`` (stride 0, no copy)."""
    inputs = step_inputs((3, 3, 7, 5), learned=True, guide="classifier", has_fresh=True, has_h=False, seed=16)
    row = coefficients(0.0, 1, seed=17)
    args = (inputs["x"], inputs["model_out"])
    kw = {"guide": "classifier", "fresh": inputs["fresh"], "learned_var": True}
    want = ddpm_step_ref(*args, row.expand(3, NUM_COLS).contiguous(), inputs["noise"], **kw)
    assert_close(ddpm_step_triton(*args, row, inputs["noise"], **kw), want, "coef [1, NUM_COLS]")
    assert_close(ddpm_step_triton(*args, row[0].expand(3, -1), inputs["noise"], **kw), want, "expanded coef")


@pytest.mark.parametrize("method", ["ddpm", "ddim-eta0"])
def test_out_aliases_x_and_h_is_updated_in_place(method):
    kernel, ref, eta = METHODS[method]
    inputs = step_inputs((3, 3, 7, 5), learned=True, guide="classifier", has_fresh=True, has_h=True, seed=18)
    coef = coefficients(eta, 3, seed=19)
    h_r = inputs["h"].clone()
    want = ref(inputs["x"], inputs["model_out"], coef, inputs["noise"], guide="classifier",
               fresh=inputs["fresh"], h=h_r, learned_var=True)
    x, h = inputs["x"].clone(), inputs["h"].clone()
    x_ptr, h_ptr = x.data_ptr(), h.data_ptr()
    got = kernel(x, inputs["model_out"], coef, inputs["noise"], guide="classifier", fresh=inputs["fresh"], h=h,
                 learned_var=True, out=x)
    assert got is x and x.data_ptr() == x_ptr and h.data_ptr() == h_ptr
    assert_close(x, want, "x updated in place")
    assert_close(h, h_r, "h updated in place")


def test_non_contiguous_inputs_h_and_out():
    """Non-contiguous tensors are copied to contiguous ones; h and out keep their in-place semantics."""
    gen = torch.Generator().manual_seed(20)
    chan_last = lambda c: torch.randn(3, 7, 5, c, generator=gen).permute(0, 3, 1, 2)  # noqa: E731
    x, noise, h, o, u = chan_last(3), chan_last(3), chan_last(3), chan_last(6), chan_last(6)  # [3, C, 7, 5] views
    o[:, 3:] = torch.tanh(o[:, 3:])
    assert not (x.is_contiguous() or h.is_contiguous() or o.is_contiguous())
    coef = coefficients(0.0, 3, seed=21)
    h_r = h.contiguous().clone()
    want = ddpm_step_ref(x, o, coef, noise, guide="cfg", fresh=u, h=h_r, learned_var=True, cfg_channels=2)
    out = torch.zeros(3, 7, 5, 3).permute(0, 3, 1, 2)  # non-contiguous [3, 3, 7, 5]
    got = ddpm_step_triton(x, o, coef, noise, guide="cfg", fresh=u, h=h, learned_var=True, cfg_channels=2,
                           out=out)
    assert got is out
    assert_close(out, want, "non-contiguous out")
    assert_close(h, h_r, "non-contiguous h")


def test_empty_batch():
    x = torch.zeros(0, 3, 4, 4)
    got = ddpm_step_triton(x, x.clone(), torch.zeros(0, NUM_COLS), x.clone())
    assert got.shape == x.shape


# -- argument errors ------------------------------------------------------------------------------------------
def _args(shape=(2, 3, 4, 4), learned=False):
    o_shape = (shape[0], shape[1] * (2 if learned else 1), *shape[2:])
    return torch.randn(shape), torch.randn(o_shape), coefficients(0.0, shape[0]), torch.randn(shape)


@pytest.mark.parametrize("call, error, match", [
    (lambda a: ddpm_step_triton(*a, guide="bogus"), ValueError, "unknown guide kind"),
    (lambda a: ddpm_step_triton(*a, fresh=a[0]), ValueError, "guide='none' takes neither"),
    (lambda a: ddim_step_triton(*a, prediction="score"), ValueError, "unknown prediction"),
    (lambda a: ddpm_step_triton(*a, learned_var=True), ValueError, "model_out has shape"),
    (lambda a: ddpm_step_triton(a[0], a[1], a[2], a[3][:1]), ValueError, "noise has shape"),
    (lambda a: ddpm_step_triton(a[0], a[1], a[2][:, :5], a[3]), ValueError, "coef has shape"),
    (lambda a: ddpm_step_triton(*a, guide="classifier", fresh=a[0][:, :2]), ValueError, "classifier gradient"),
    (lambda a: ddpm_step_triton(*a, guide="cfg", fresh=a[0][:, :2]), ValueError, "unconditional output"),
    (lambda a: ddpm_step_triton(*a, guide="cfg", h=a[0].double()), TypeError, "h has dtype"),
    (lambda a: ddpm_step_triton(*a, guide="cfg", h=a[0].clone(), cfg_channels=-1), ValueError, "cfg_channels"),
    (lambda a: ddpm_step_triton(a[0].double(), *a[1:]), TypeError, "x has dtype"),
    (lambda a: ddpm_step_triton(torch.randn(2), *a[1:]), ValueError, "x must have shape"),
    (lambda a: ddpm_step_triton(*a, out=a[0][:1]), ValueError, "out has shape"),
])
def test_bad_arguments_raise_with_what_to_fix(call, error, match):
    with pytest.raises(error, match=match):
        call(_args())


# -- dispatch and whole sampling runs -------------------------------------------------------------------------
def test_dispatch_runs_the_triton_kernels():
    assert kernels.available("triton")
    x, o, coef, z = _args()
    assert_close(kernels.step("ddim", x, o, coef, z, impl="triton"), ddim_step_ref(x, o, coef, z), "dispatch")


def _sample_both(sampler_kw: dict, guidance, model, shape=(3, 3, 8, 8), y=(1, 4, 7), seed=123):
    """The same seeded run with the reference and the Triton step kernels."""
    out = {}
    for impl in ("reference", "triton"):
        sampler = Sampler(model, NoiseSchedule.linear(1000), "20", kernels=impl, **sampler_kw)
        out[impl] = sampler.sample(shape, y=torch.tensor(y), guidance=guidance,
                                   generator=torch.Generator().manual_seed(seed))
    assert out["triton"].stats.summary()["guided_steps"] == out["reference"].stats.summary()["guided_steps"]
    return out["triton"].x, out["reference"].x


def test_sampling_run_classifier_momentum_learned_variance(tiny_eps_learned, tiny_classifier):
    guid = ClassifierGuidance(tiny_classifier, 3.0, policy=Compress(rate=4, k=1, final=2), cache="momentum",
                              beta=0.5, decay=0.9)
    got, want = _sample_both({"learn_sigma": True}, guid, tiny_eps_learned)
    assert_close(got, want, "DDPM + classifier (momentum)")


def test_sampling_run_ddim_classifier_compress(tiny_eps, tiny_classifier):
    guid = ClassifierGuidance(tiny_classifier, 2.0, policy=Compress(rate=5, k=2), cache="compress")
    got, want = _sample_both({"method": "ddim", "eta": 1.0}, guid, tiny_eps)
    assert_close(got, want, "DDIM eta=1 + classifier (compress)")


def test_sampling_run_cfg_reuse_with_channel_restriction(tiny_eps_learned):
    guid = CFG(scale=3.0, null_label=10, policy=Compress(rate=3, k=1), cache="reuse", channels=2)
    got, want = _sample_both({"learn_sigma": True}, guid, tiny_eps_learned)
    assert_close(got, want, "DDPM + CFG (reuse, 2 of 3 channels)")


def test_sampling_run_cfg_full_ddim(tiny_eps):
    guid = CFG(scale=2.0, null_label=10, policy=Full(), cache="drop", batched=False)
    got, want = _sample_both({"method": "ddim"}, guid, tiny_eps)
    assert_close(got, want, "DDIM + CFG (full)")


def test_without_interpreter_or_cuda_the_kernels_are_unavailable_and_say_why():
    """Imported without TRITON_INTERPRET on a machine without CUDA: available() is False, a call explains."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a CUDA device makes the compiled kernels available")
    code = ("import torch; from cg_fast.kernels import triton_step as t; assert not t.available()\n"
            "x = torch.zeros(1, 1, 2)\n"
            "try:\n    t.ddpm_step_triton(x, x, torch.zeros(1, t.NUM_COLS), x)\n"
            "except ValueError as e:\n    assert 'TRITON_INTERPRET=1' in str(e), e\nelse:\n    raise SystemExit(1)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


_AOT_SCRIPT = r"""
import sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from cg_fast.kernels import triton_step as t
variants = [  # (kernel, model-output dtype, constexprs): the widest paths of each family
    (t._ddpm_step_kernel, "fp32", dict(PRED=0, LEARNED=True, CLIP=True, GUIDE=1, HAS_FRESH=True, HAS_H=True)),
    (t._ddpm_step_kernel, "bf16", dict(PRED=2, LEARNED=True, CLIP=False, GUIDE=2, HAS_FRESH=True, HAS_H=True)),
    (t._ddim_step_kernel, "fp16", dict(PRED=0, CLIP=True, GUIDE=1, HAS_FRESH=False, HAS_H=True)),
    (t._ddim_step_kernel, "fp32", dict(PRED=1, CLIP=True, GUIDE=2, HAS_FRESH=True, HAS_H=False)),
    # counter-based noise in the kernel (cg_fast/kernels/rng.py)
    (t._ddpm_step_kernel, "fp32", dict(PRED=0, LEARNED=True, CLIP=True, GUIDE=1, HAS_FRESH=True, HAS_H=True,
                                       COUNTER=True)),
    (t._ddim_step_kernel, "fp32", dict(PRED=0, CLIP=True, GUIDE=1, HAS_FRESH=True, HAS_H=False, COUNTER=True)),
]
aligned = ["x_ptr", "o_ptr", "c_ptr", "z_ptr", "f_ptr", "h_ptr", "out_ptr", "n", "o_row", "f_row"]
for kernel, odt, cx in variants:
    cx["BLOCK"] = t.BLOCK
    cx.setdefault("COUNTER", False)
    sig = {a: "*fp32" if a.endswith("_ptr") else "i32" for a in kernel.arg_names if a not in cx}
    sig["o_ptr"] = sig["f_ptr"] = "*" + odt
    sig["seed_ptr"] = sig["step_ptr"] = "*i64"
    sig.update({k: "constexpr" for k in cx})
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    ptx = compile(ASTSource(kernel, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                  options={"enable_fp_fusion": False}).asm["ptx"]
    assert "ld.global.v4" in ptx, "no 128-bit loads"
    assert "div.full" not in ptx and "div.approx" not in ptx, "approximate division"
    assert kernel is t._ddpm_step_kernel or "div.rn.f32" in ptx
"""


@pytest.mark.slow
def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter accepts code the compiler rejects: compile the widest variants for sm_90 (no GPU needed)."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
