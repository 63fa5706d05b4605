"""The fused DPM-Solver++ 2M steps (csrc ``cg_fast::dpmpp2m_step``, Triton ``dpmpp2m_step_triton``) against
:func:`cg_fast.kernels.reference.dpmpp2m_step_ref` (spec §5 "DPM-Solver++", guidance as DDIM, spec §4/§6).

Every guide kind and cache situation x prediction x clip x learned variance, on rows of a 10-step linear table
with the guidance columns filled (first step: DPM_C1 = 0; middle steps: DPM_C1 != 0; last: x' = x0), with
``prev`` (the carried data prediction) checked as well as x' and ``h``; in-place ``out``, strides, fp16 / bf16
model outputs, the argument errors, and multi-step runs. csrc on the CPU is bitwise (no exp in this step); the
Triton kernels run under TRITON_INTERPRET=1 (fewer cases: the interpreter is slow). csrc tests are skipped when
the extension is not built, unless CG_FAST_REQUIRE_CSRC=1, where they fail (``needs_ext``).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cg_fast.kernels as kernels
from cg_fast import NoiseSchedule
from cg_fast.kernels import csrc_ops
from cg_fast.kernels.reference import dpmpp2m_step_ref
from cg_fast.kernels.table import NUM_COLS, Col, schedule_columns
from test_kernels_csrc import GUIDE_CASES, make_inputs, needs_ext  # shared inputs (no tests imported)

ROOT = Path(__file__).resolve().parents[1]

try:
    from cg_fast.kernels import triton_step
    _TRITON_CPU = triton_step.available() and triton_step._INTERPRETED
except ImportError:  # pragma: no cover - depends on the environment
    triton_step, _TRITON_CPU = None, False
needs_triton = pytest.mark.skipif(
    not _TRITON_CPU, reason="needs triton under TRITON_INTERPRET=1 (these tests feed CPU tensors; on a GPU the "
                            "compiled kernels are checked by tests/test_gpu.py::test_dpmpp2m_*)")

IMPLS = [pytest.param("csrc", marks=needs_ext), pytest.param("triton", marks=needs_triton)]


def step_fn(impl: str):
    return {"csrc": lambda: csrc_ops.dpmpp2m_step_csrc, "triton": lambda: triton_step.dpmpp2m_step_triton,
            "reference": lambda: dpmpp2m_step_ref}[impl]()


# -- inputs ------------------------------------------------------------------------------------------------------
_TABLE: list[torch.Tensor] = []


def table() -> torch.Tensor:
    """The 10-step linear schedule's table with guidance columns that differ per step (spec §4/§6)."""
    if not _TABLE:
        t = schedule_columns(NoiseSchedule.linear(1000).respace("10"))
        n = t.shape[0]
        t[:, Col.GUIDE_S] = torch.linspace(0.5, 3.0, n)
        t[:, Col.H_DECAY] = torch.linspace(0.3, 0.95, n)
        t[:, Col.G_WEIGHT] = torch.linspace(1.0, 0.2, n)
        _TABLE.append(t)
    return _TABLE[0].clone()


def coef_rows(batch: int) -> torch.Tensor:
    """A different step per batch row: the first (first order), middle ones (DPM_C1 != 0), the last (x' = x0)."""
    tab = table()
    idx = torch.tensor([0, 5, tab.shape[0] - 1, 7, 2, 8])[:batch]
    return tab[idx].contiguous()


def inputs(shape, *, guide="none", fresh=False, h=False, learned=False, seed=0, dtype=torch.float32):
    """make_inputs of test_kernels_csrc (x, model output, fresh, h) plus a random prev (so DPM_C1 matters)."""
    x, o, _, f, hh = make_inputs(shape, learned=learned, guide=guide, fresh=fresh, h=h, seed=seed, dtype=dtype)
    prev = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100))
    return x, o, f, hh, prev


def clone(t):
    return t.clone() if t is not None else None


def check(impl: str, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """csrc on the CPU: bitwise; Triton: float32 agreement (~1e-6 relative)."""
    assert got.dtype == torch.float32 and got.shape == want.shape, what
    if impl == "csrc":
        assert torch.equal(got, want), f"{what}: max |diff| {(got - want).abs().max().item():.3g}"
    else:
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale, msg=lambda m: f"{what}: {m}")


def run_both(impl, x, o, coef, *, prev, h=None, **kw):
    """The implementation and the reference on copies of the same state; compares x', prev and h."""
    p_ref, p_got, h_ref, h_got = prev.clone(), prev.clone(), clone(h), clone(h)
    want = dpmpp2m_step_ref(x.clone(), o, coef, prev=p_ref, h=h_ref, **kw)
    got = step_fn(impl)(x.clone(), o, coef, prev=p_got, h=h_got, **kw)
    check(impl, got, want, "x'")
    check(impl, p_got, p_ref, "prev")
    assert not torch.equal(p_ref, prev) or not coef.numel()  # prev was updated
    if h is not None:
        check(impl, h_got, h_ref, "h")


# -- every mode ------------------------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("guide,fresh,h", GUIDE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("learned", [False, True], ids=["fixedvar", "learnedvar"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_csrc_every_mode(prediction, learned, clip, guide, fresh, h):
    shape = (3, 3, 7, 5)
    x, o, f, hh, prev = inputs(shape, guide=guide, fresh=fresh, h=h, learned=learned)
    run_both("csrc", x, o, coef_rows(3), prev=prev, h=hh, guide=guide, fresh=f, prediction=prediction,
             learned_var=learned, clip=clip)


@needs_triton
@pytest.mark.parametrize("guide,fresh,h", GUIDE_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("clip,learned", [(True, False), (False, True)], ids=["clip-fixedvar", "noclip-learnedvar"])
@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_triton_every_mode(prediction, clip, learned, guide, fresh, h):
    shape = (3, 3, 7, 5)  # n = 105: one partial block
    x, o, f, hh, prev = inputs(shape, guide=guide, fresh=fresh, h=h, learned=learned)
    run_both("triton", x, o, coef_rows(3), prev=prev, h=hh, guide=guide, fresh=f, prediction=prediction,
             learned_var=learned, clip=clip)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("cfg_channels", [0, 2, 5])
@pytest.mark.parametrize("h", [False, True], ids=["noh", "h"])
def test_cfg_channels(impl, h, cfg_channels):
    """spec §6: CFG on the first ``cfg_channels`` channels only; h updated on all of them."""
    shape = (3, 4, 5, 6)
    x, o, f, hh, prev = inputs(shape, guide="cfg", fresh=True, h=h, learned=True, seed=1)
    run_both(impl, x, o, coef_rows(3), prev=prev, h=hh, guide="cfg", fresh=f, learned_var=True,
             cfg_channels=cfg_channels, clip=False)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(6, 13), (2, 3, 19, 23), (1, 1, 1, 1)], ids=lambda s: "x".join(map(str, s)))
def test_shapes(impl, shape):
    """Vectors, rows longer than one Triton block / csrc chunk (n = 1311), one element."""
    x, o, f, hh, prev = inputs(shape, guide="classifier", fresh=True, h=True, seed=2)
    run_both(impl, x, o, coef_rows(shape[0]), prev=prev, h=hh, guide="classifier", fresh=f)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("guide", ["classifier", "cfg"])
def test_low_precision_model_output(impl, dtype, guide):
    """fp16 / bf16 model outputs (and CFG unconditional outputs) are upcast as ``.float()``."""
    x, o, f, hh, prev = inputs((3, 3, 7, 5), guide=guide, fresh=True, h=True, learned=True, seed=3, dtype=dtype)
    assert o.dtype == dtype
    run_both(impl, x, o, coef_rows(3), prev=prev, h=hh, guide=guide, fresh=f, learned_var=True)


# -- in place, strides, coefficient views -----------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("guide", ["classifier", "cfg"])
def test_out_aliases_x_and_state_in_place(impl, guide):
    x, o, f, hh, prev = inputs((4, 3, 9, 11), guide=guide, fresh=True, h=True, seed=4)
    coef = coef_rows(4)
    p_ref, h_ref = prev.clone(), hh.clone()
    want = dpmpp2m_step_ref(x, o, coef, prev=p_ref, guide=guide, fresh=f, h=h_ref)
    x_io, p_io, h_io = x.clone(), prev.clone(), hh.clone()
    ptrs = (x_io.data_ptr(), p_io.data_ptr(), h_io.data_ptr())
    got = step_fn(impl)(x_io, o, coef, prev=p_io, guide=guide, fresh=f, h=h_io, out=x_io)
    assert got is x_io and (x_io.data_ptr(), p_io.data_ptr(), h_io.data_ptr()) == ptrs
    check(impl, x_io, want, "x' in place")
    check(impl, p_io, p_ref, "prev in place")
    check(impl, h_io, h_ref, "h in place")


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_prev_h_out_and_inputs(impl):
    """Non-contiguous x / model output are read through copies; prev, h and out keep their in-place semantics."""
    shape = (3, 3, 8, 6)
    x, o, f, hh, prev = inputs(shape, guide="classifier", fresh=True, h=True, learned=True, seed=5)
    coef = coef_rows(3)
    p_ref, h_ref = prev.clone(), hh.clone()
    want = dpmpp2m_step_ref(x, o, coef, prev=p_ref, guide="classifier", fresh=f, h=h_ref, learned_var=True)
    t = lambda v: v.transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731  same values, other strides
    x_t, o_t, p_t, h_t = t(x), t(o), t(prev), t(hh)
    out_t = torch.zeros(shape[0], shape[1], shape[3], shape[2]).transpose(2, 3)
    assert not any(v.is_contiguous() for v in (x_t, o_t, p_t, h_t, out_t))
    got = step_fn(impl)(x_t, o_t, coef, prev=p_t, guide="classifier", fresh=f, h=h_t, learned_var=True, out=out_t)
    assert got is out_t
    check(impl, out_t, want, "non-contiguous out")
    check(impl, p_t, p_ref, "non-contiguous prev")
    check(impl, h_t, h_ref, "non-contiguous h")


@pytest.mark.parametrize("impl", IMPLS)
def test_expanded_coef_row(impl):
    """The sampler's ``table[j].expand(B, -1)`` (stride 0)."""
    x, o, f, hh, prev = inputs((4, 3, 5, 5), guide="cfg", fresh=True, h=True, seed=6)
    coef = table()[6].expand(4, -1)
    run_both(impl, x, o, coef, prev=prev, h=hh, guide="cfg", fresh=f)


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_batch(impl):
    x = torch.zeros(0, 3, 4, 4)
    got = step_fn(impl)(x, x.clone(), table()[:0], prev=x.clone())
    assert got.shape == x.shape


# -- several steps: DPM_C1 != 0 rows, prev carried from step to step ---------------------------------------------------
def _model(x: torch.Tensor, j: int) -> torch.Tensor:
    """A deterministic stand-in denoiser (eps-prediction) that depends on x and the step."""
    return torch.tanh(0.7 * x + 0.1 * j) + 0.05 * torch.roll(x, 1, dims=-1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("guide,cache", [("none", None), ("classifier", "momentum"), ("cfg", "reuse")])
def test_multi_step_run(impl, guide, cache):
    """All 10 steps (first order, then second order, then x' = x0), fresh guidance every other step with a cache
    state (skipped steps decay h), out = x as the sampler does; x, prev and h compared after every step."""
    tab = table()
    assert (tab[:, Col.DPM_C1] != 0).sum() >= 5 and tab[0, Col.DPM_C1] == 0 and tab[-1, Col.DPM_C1] == 0
    shape = (2, 3, 6, 5)
    gen = torch.Generator().manual_seed(7)
    x0 = torch.randn(shape, generator=gen)
    state = {}
    for name in ("ref", "got"):
        state[name] = dict(x=x0.clone(), prev=torch.zeros(shape), h=torch.zeros(shape) if cache else None)
    for j in range(tab.shape[0]):
        coef = tab[j].expand(shape[0], -1)
        fresh_g = torch.randn(shape, generator=gen) if guide != "none" and j % 2 == 0 else None
        for name, fn in (("ref", dpmpp2m_step_ref), ("got", step_fn(impl))):
            s = state[name]
            o = _model(s["x"], j)
            fresh = None
            if fresh_g is not None:
                fresh = fresh_g if guide == "classifier" else o - 0.3 * fresh_g  # CFG: an unconditional output
            fn(s["x"], o, coef, prev=s["prev"], guide=guide, fresh=fresh, h=s["h"], out=s["x"])
        for key in ("x", "prev", "h"):
            if state["ref"][key] is not None:
                check(impl, state["got"][key], state["ref"][key], f"{key} after step {j}")
    assert torch.equal(state["ref"]["x"], state["ref"]["prev"])  # the last step lands on x' = x0


# -- dispatch ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_runs_the_fused_step(impl):
    assert kernels._load(impl)[2] is step_fn(impl)
    x, o, f, hh, prev = inputs((2, 3, 4, 4), guide="classifier", fresh=True, h=True, seed=8)
    p_ref, p_got = prev.clone(), prev.clone()
    want = dpmpp2m_step_ref(x, o, coef_rows(2), prev=p_ref, guide="classifier", fresh=f, h=hh.clone())
    got = kernels.step("dpmpp2m", x, o, coef_rows(2), None, prev=p_got, guide="classifier", fresh=f, h=hh.clone(),
                       impl=impl)
    check(impl, got, want, "dispatch")
    check(impl, p_got, p_ref, "prev")


# -- argument errors: those of the reference, before any state is touched ----------------------------------------------
@pytest.mark.parametrize("impl", [pytest.param("reference")] + IMPLS)
def test_argument_errors(impl):
    fn = step_fn(impl)
    shape = (2, 3, 4, 4)
    x, o, f, hh, prev = inputs(shape, guide="classifier", fresh=True, h=True)
    coef = coef_rows(2)
    h0, p0 = hh.clone(), prev.clone()
    cases = [
        (dict(prev=None), "dpmpp2m needs prev"),
        (dict(prev=prev.double()), "prev must be a float32 tensor of x's shape"),
        (dict(prev=prev[:1]), "prev must be a float32 tensor of x's shape"),
        (dict(prev=prev, noise=torch.randn(shape)), "dpmpp2m is deterministic"),
        (dict(prev=prev, seeds=torch.zeros(2, dtype=torch.int64), step_index=3), "dpmpp2m is deterministic"),
        (dict(prev=prev, step_index=3), "dpmpp2m is deterministic"),
        (dict(prev=prev, guide="bogus"), "unknown guide kind"),
        (dict(prev=prev, prediction="score"), "unknown prediction"),
        (dict(prev=prev, guide="none", fresh=f), "guide='none' takes neither"),
        (dict(prev=prev, guide="cfg", fresh=o, cfg_channels=-1), "cfg_channels must be >= 0"),
    ]
    for kw, msg in cases:
        kw.setdefault("guide", "classifier")
        with pytest.raises(ValueError, match=msg):
            fn(x, o, coef, kw.pop("noise", None), fresh=kw.pop("fresh", f), h=hh, **kw)
        assert torch.equal(hh, h0) and torch.equal(prev, p0), msg  # validated before any state is touched


@needs_ext
def test_csrc_op_errors():
    """The operator itself checks what the wrapper does not (messages prefixed with the op name)."""
    shape = (2, 3, 4, 4)
    x, o, f, hh, prev = inputs(shape, guide="classifier", fresh=True, h=True)
    coef = coef_rows(2)
    op = torch.ops.cg_fast.dpmpp2m_step
    h0, p0 = hh.clone(), prev.clone()
    cases = [
        (dict(prev=prev[:, :2]), "prev must have the shape of x"),
        (dict(prev=prev.double()), "prev must be float32"),
        (dict(coef=coef[:, :10]), rf"coef must have shape \[2, {NUM_COLS}\]"),
        (dict(model_out=o, learned_var=True), r"model_out \(learned_var=True: eps and variance channels\)"),
        (dict(h=hh[:1]), "h must have the shape of x"),
        (dict(guide="bogus"), "unknown guide kind 'bogus'"),
    ]
    for change, msg in cases:
        kw = dict(x=x, model_out=o, coef=coef, prev=prev, out=torch.empty_like(x), guide="classifier", fresh=f, h=hh)
        kw.update(change)
        args = [kw.pop(k) for k in ("x", "model_out", "coef", "prev", "out")]
        with pytest.raises(RuntimeError, match="^cg_fast::dpmpp2m_step: " + msg):
            op(*args, **kw)
        assert torch.equal(hh, h0) and torch.equal(prev, p0), msg


# -- opcheck / torch.compile (csrc) ------------------------------------------------------------------------------------
@needs_ext
def test_csrc_opcheck():
    x, o, f, hh, prev = inputs((2, 3, 5, 4), guide="classifier", fresh=True, h=True, learned=True)
    _, o_c, f_c, _, _ = inputs((2, 3, 5, 4), guide="cfg", fresh=True, dtype=torch.float16)
    coef = coef_rows(2)
    op = torch.ops.cg_fast.dpmpp2m_step.default
    for args, kw in [
        ((x, o, coef, prev.clone(), torch.empty_like(x)), dict(guide="classifier", fresh=f, h=hh.clone(),
                                                               learned_var=True)),
        ((x, o_c, coef, prev.clone(), torch.empty_like(x)), dict(guide="cfg", fresh=f_c, h=hh.clone(),
                                                                 cfg_channels=2, prediction="v", clip=False)),
    ]:
        torch.library.opcheck(op, args, kw)


@needs_ext
def test_csrc_torch_compile_fullgraph():
    x, o, f, hh, prev = inputs((2, 3, 8, 8), guide="classifier", fresh=True, h=True, seed=9)
    coef = coef_rows(2)

    def step(x, o, coef, g, h, prev):
        return csrc_ops.dpmpp2m_step_csrc(x, o, coef, prev=prev, guide="classifier", fresh=g, h=h) * 1.0

    h_e, p_e, h_c, p_c = hh.clone(), prev.clone(), hh.clone(), prev.clone()
    want = step(x, o, coef, f, h_e, p_e)
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True)(x, o, coef, f, h_c, p_c)
    assert torch.equal(got, want) and torch.equal(h_c, h_e) and torch.equal(p_c, p_e)
    assert not torch.equal(p_c, prev)  # the mutation of prev survived functionalisation


# -- CUDA: the per-element code on the host; the GPU where there is one ------------------------------------------------
_HOST_HARNESS = r"""
// Host build of the CUDA kernels' per-element code (csrc/step_element.h), METHOD_DPMPP2M (no exp, no noise).
#include <cmath>
#include <cstdint>
namespace cg_fast { inline float to_f32(float v) { return v; } }
#include "step_element.h"
struct HostExp { float operator()(float v) const { return std::exp(v); } };
extern "C" void dpmpp2m_host(const float* x, const float* model_out, const float* coef, const float* fresh,
                             float* h, float* prev, float* out, int64_t rows, int64_t n, int64_t o_row,
                             int64_t f_row, int64_t guided_limit, int guide, int prediction, int clip) {
  cg_fast::StepArgs p;
  p.x = x; p.model_out = model_out; p.coef = coef; p.fresh = fresh; p.h = h; p.prev = prev; p.out = out;
  p.rows = rows; p.n = n; p.o_row = o_row; p.f_row = f_row; p.guided_limit = guided_limit;
  p.method = cg_fast::METHOD_DPMPP2M; p.guide = guide; p.prediction = prediction; p.clip = clip != 0;
  for (int64_t idx = 0; idx < rows * n; ++idx) cg_fast::step_element<float, float>(p, idx, HostExp{});
}
"""


def test_cuda_element_math_on_host(tmp_path):
    """The CUDA kernel's per-element dpmpp2m code (csrc/step_element.h), built for the host with g++, is bitwise
    the reference in every mode (x', prev and h)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "harness.cpp").write_text(_HOST_HARNESS)
    lib_path = tmp_path / "harness.so"
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}",
           str(tmp_path / "harness.cpp"), "-o", str(lib_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr}"
    lib = ctypes.CDLL(str(lib_path))
    lib.dpmpp2m_host.argtypes = [ctypes.c_void_p] * 7 + [ctypes.c_int64] * 5 + [ctypes.c_int] * 3
    lib.dpmpp2m_host.restype = None
    shape = (3, 4, 7, 5)
    coef = coef_rows(3)
    checked = 0
    for prediction in ("eps", "x0", "v"):
        for learned in (False, True):
            for clip in (True, False):
                for guide, fresh, h in GUIDE_CASES:
                    x, o, f, hh, prev = inputs(shape, guide=guide, fresh=fresh, h=h, learned=learned)
                    cfg_channels = 3 if guide == "cfg" else None
                    kw = dict(guide=guide, fresh=f, prediction=prediction, learned_var=learned, clip=clip,
                              cfg_channels=cfg_channels)
                    p_ref, h_ref = prev.clone(), clone(hh)
                    want = dpmpp2m_step_ref(x, o, coef, prev=p_ref, h=h_ref, **kw)
                    rows, n = x.shape[0], x[0].numel()
                    out, p_got, h_got = torch.empty_like(x), prev.clone(), clone(hh)
                    oc, fc = o.contiguous(), f.float().contiguous() if f is not None else None
                    limit = cfg_channels * (n // shape[1]) if cfg_channels is not None else n
                    lib.dpmpp2m_host(x.data_ptr(), oc.data_ptr(), coef.data_ptr(),
                                     fc.data_ptr() if fc is not None else None,
                                     h_got.data_ptr() if h_got is not None else None, p_got.data_ptr(),
                                     out.data_ptr(), rows, n, oc[0].numel(), fc[0].numel() if fc is not None else 0,
                                     limit, ["none", "classifier", "cfg"].index(guide),
                                     ["eps", "x0", "v"].index(prediction), int(clip))
                    what = (prediction, learned, clip, guide, fresh, h)
                    assert torch.equal(out, want) and torch.equal(p_got, p_ref), what
                    assert h_ref is None or torch.equal(h_got, h_ref), what
                    checked += 1
    assert checked == 3 * 2 * 2 * len(GUIDE_CASES)


@pytest.mark.skipif(not (torch.cuda.is_available() and csrc_ops.available("cuda")),
                    reason="needs a GPU and the CUDA extension (cg_fast._C_cuda)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("guide,fresh,h", [("classifier", True, True), ("cfg", True, True), ("cfg", False, True),
                                           ("none", False, False)])
def test_cuda_matches_cpu_reference(dtype, guide, fresh, h):
    """No exp in this step and no FMA (--fmad=false): the CUDA op is the CPU reference bitwise."""
    shape = (3, 3, 33, 37)
    x, o, f, hh, prev = inputs(shape, guide=guide, fresh=fresh, h=h, learned=True, dtype=dtype)
    coef = coef_rows(3)
    p_ref, h_ref = prev.clone(), clone(hh)
    kw = dict(guide=guide, learned_var=True, cfg_channels=2 if guide == "cfg" else None)
    want = dpmpp2m_step_ref(x, o, coef, prev=p_ref, fresh=f, h=h_ref, **kw)
    dev = torch.device("cuda")
    p_dev, h_dev = prev.to(dev), hh.to(dev) if hh is not None else None
    got = csrc_ops.dpmpp2m_step_csrc(x.to(dev), o.to(dev), coef.to(dev), prev=p_dev,
                                     fresh=f.to(dev) if f is not None else None, h=h_dev, **kw)
    assert torch.equal(got.cpu(), want) and torch.equal(p_dev.cpu(), p_ref)
    if h_ref is not None:
        assert torch.equal(h_dev.cpu(), h_ref)


# -- Triton: the kernel compiles for a GPU (the interpreter accepts code the compiler rejects) -------------------------
_AOT_SCRIPT = r"""
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from cg_fast.kernels import triton_step as t
kernel = t._dpmpp2m_step_kernel
for odt, cx in [("fp32", dict(PRED=0, CLIP=True, GUIDE=1, HAS_FRESH=True, HAS_H=True)),
                ("bf16", dict(PRED=2, CLIP=False, GUIDE=2, HAS_FRESH=True, HAS_H=True))]:
    cx["BLOCK"] = t.BLOCK
    sig = {a: "*fp32" if a.endswith("_ptr") else "i32" for a in kernel.arg_names if a not in cx}
    sig["o_ptr"] = sig["f_ptr"] = "*" + odt
    sig.update({k: "constexpr" for k in cx})
    aligned = ["x_ptr", "o_ptr", "c_ptr", "p_ptr", "f_ptr", "h_ptr", "out_ptr", "n", "o_row", "f_row"]
    attrs = {(kernel.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    ptx = compile(ASTSource(kernel, sig, constexprs=cx, attrs=attrs), target=GPUTarget("cuda", 90, 32),
                  options={"enable_fp_fusion": False}).asm["ptx"]
    assert "ld.global.v4" in ptx, "no 128-bit loads"
    assert "div.full" not in ptx and "div.approx" not in ptx, "approximate division"
    assert "fma.rn.f32" not in ptx, "FMA contraction"
"""


@pytest.mark.slow
@needs_triton
def test_triton_kernel_compiles_for_a_gpu_without_one():
    pytest.importorskip("triton.backends.nvidia", reason="triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "0"
    proc = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
