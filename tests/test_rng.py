"""Counter-based noise (cg_fast/kernels/rng.py): the generator, the counter layout, and the fused kernels.

- Philox4x32-10 against Random123's published known-answer vectors, and against ``randomgen`` as an independent
  oracle for the counter layout (items 3 and 6 of rng.py) where it is installed.
- The uint32 stream of every implementation is the reference's: csrc/philox.h (shared by the csrc CPU and CUDA
  kernels, built for the host), Triton (interpreter). Normals: csrc CPU bitwise (torch's own log / cos / sin),
  the CUDA element code and Triton within ``NORMAL_TOL_ULP``.
- Fused steps with in-kernel noise equal the reference step fed with ``counter_normal``.
- Samples: the same alone, at any position in a batch of 8, after a restart at step j; graphed equals eager.
- Statistics of the normals at a fixed seed: mean, variance, Kolmogorov-Smirnov, no correlation across rows
  or steps.
"""
from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cg_fast import ClassifierGuidance, NoiseSchedule, Sampler
from cg_fast.guidance import Compress
from cg_fast.kernels import csrc_ops, rng
from cg_fast.kernels.reference import ddim_step_ref, ddpm_step_ref
from cg_fast.kernels.table import NUM_COLS, Col, schedule_columns

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = os.environ.get("CG_FAST_REQUIRE_CSRC", "") not in ("", "0")
needs_ext = pytest.mark.skipif(not csrc_ops.available() and not REQUIRED,
                               reason=f"csrc extension not built ({csrc_ops.load_error()})")


def _t(v: int) -> torch.Tensor:
    return torch.tensor([v], dtype=torch.int64)


def _hex(words) -> list[str]:
    return [f"{int(w):08x}" for w in words]


# -- Philox4x32-10 -------------------------------------------------------------------------------------------------
# Random123 1.14, examples/kat_vectors: "philox4x32 10 <ctr0..3> <key0..1> <out0..3>"
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     ("6627e8d5", "e169c58d", "bc57ac4c", "9b00dbd8")),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     ("408f276d", "41c83b0e", "a20bc7c6", "6d5451fd")),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     ("d16cfe09", "94fdcceb", "5001e420", "24126ea1")),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    assert tuple(_hex(rng.philox4x32(*map(_t, ctr), *map(_t, key)))) == want


def _randomgen_words(ctr: tuple[int, int, int, int], key: tuple[int, int]) -> list[int]:
    """Philox4x32-10 of one counter by randomgen (which increments its counter before each block)."""
    randomgen = pytest.importorskip("randomgen")
    c = ctr[0] | ctr[1] << 32 | ctr[2] << 64 | ctr[3] << 96
    bg = randomgen.Philox(key=key[0] | key[1] << 32, counter=(c - 1) % (1 << 128), number=4, width=32)
    return [int(v) for v in bg.random_raw(4)]


def test_noise_words_follow_the_layout_randomgen_oracle():
    """Item 3: element e at step j uses counter (e >> 2, j, 0, 0) and key (seed lo, seed hi)."""
    seeds = torch.tensor([0, 1, -1, 0x0123456789ABCDEF, -(1 << 63)], dtype=torch.int64)
    for j in (0, 1, 249, rng.XT_STEP):
        w = rng.noise_words(seeds, j, 10)
        for b, s in enumerate(seeds.tolist()):
            s &= (1 << 64) - 1
            for q in range(3):
                assert w[b, 4 * q:4 * q + 4].tolist() == _randomgen_words((q, j, 0, 0), (s & 0xFFFFFFFF, s >> 32))


def test_sample_seeds_follow_the_layout_randomgen_oracle():
    """Item 6: sample i of run S has seed w0 + 2^32 w1 of counter (i lo, i hi, 0, 1) under key S."""
    for run_seed in (0, 12345, (1 << 64) - 1):
        got = rng.sample_seeds(run_seed, [0, 1, 7, (1 << 40) + 3])
        for k, i in enumerate([0, 1, 7, (1 << 40) + 3]):
            w = _randomgen_words((i & 0xFFFFFFFF, i >> 32, 0, 1), (run_seed & 0xFFFFFFFF, run_seed >> 32))
            assert int(got[k]) & ((1 << 64) - 1) == w[0] | w[1] << 32


def test_sample_seeds_depend_on_run_seed_and_index_only():
    full = rng.sample_seeds(99, 16)
    assert torch.equal(rng.sample_seeds(99, [5, 6, 7]), full[5:8])
    assert torch.equal(rng.sample_seeds(99, torch.arange(16)), full)
    assert len(set(full.tolist())) == 16
    assert not torch.equal(rng.sample_seeds(100, 16), full)
    # pinned (checked against randomgen above): the harness and the Pipeline depend on these values
    pinned = [v & ((1 << 64) - 1) for v in rng.sample_seeds(0, 2).tolist() + rng.sample_seeds(2024, [3]).tolist()]
    assert pinned == [0x1348E23F2DCE73E5, 0x510C4549E9535BE3, 0x241F8026117E23BA]
    with pytest.raises(ValueError, match=">= 0"):
        rng.sample_seeds(0, [-1])


def test_uniforms_and_box_muller_follow_the_layout():
    """Items 4-5, recomputed in float64 from the words (the angle rounded to float32 first, as the layout says):
    within NORMAL_TOL_ULP of the reference's float32."""
    seeds = rng.sample_seeds(3, 4)
    n = 1001
    w = rng.noise_words(seeds, 17, n).double()
    u = (torch.floor(w / 512) * 2 + 1) * 2.0 ** -24
    assert torch.equal(u.float().double(), u)  # exact in float32
    r = torch.sqrt(-2 * torch.log(u[:, 0::2]))
    theta = (u[:, 1::2].float() * rng.TWO_PI_F32).double()
    want = torch.stack([r * torch.cos(theta), r * torch.sin(theta)], -1).reshape(4, -1)[:, :n]
    got = rng.counter_normal(seeds, 17, (4, n))
    assert got.dtype == torch.float32
    assert rng.ulp_distance(got, want).max() <= rng.NORMAL_TOL_ULP
    assert got.abs().max() <= math.sqrt(48 * math.log(2)) + 1e-6


def test_counter_normal_is_elementwise_in_shape_and_rows():
    seeds = rng.sample_seeds(11, 3)
    z = rng.counter_normal(seeds, 4, (3, 2, 5, 7))
    flat = rng.counter_normal(seeds, 4, (3, 70))
    assert torch.equal(z.reshape(3, -1), flat)
    assert torch.equal(rng.counter_normal(seeds, 4, (3, 33)), flat[:, :33])  # a prefix does not depend on n
    assert torch.equal(rng.counter_normal(seeds[1:2], 4, (1, 70)), flat[1:2])
    per_row = rng.counter_normal(seeds, torch.tensor([4, 5, 4]), (3, 70))
    assert torch.equal(per_row[[0, 2]], flat[[0, 2]])
    assert torch.equal(per_row[1], rng.counter_normal(seeds, 5, (3, 70))[1])


# -- statistics ------------------------------------------------------------------------------------------------------
def test_normal_statistics_at_a_fixed_seed():
    from scipy import stats

    seeds = rng.sample_seeds(2024, 8)
    n = 8192
    z0 = rng.counter_normal(seeds, 0, (8, n)).double()
    z1 = rng.counter_normal(seeds, 1, (8, n)).double()
    allz = torch.cat([z0.flatten(), z1.flatten()])
    count = allz.numel()
    assert abs(allz.mean().item()) < 4 / math.sqrt(count)
    assert abs(allz.var().item() - 1) < 4 * math.sqrt(2 / count)
    assert stats.kstest(allz.numpy(), "norm").pvalue > 1e-3
    tol = 4 / math.sqrt(n)
    corr = torch.corrcoef(torch.cat([z0, z1]))  # 16 series: rows at step 0 and at step 1
    off = corr - torch.eye(16, dtype=torch.float64)
    assert off.abs().max() < tol, "correlated rows or steps"
    for lag in (1, 2, 4):  # within a row, also across the pair / quad boundaries
        a, b = z0[:, :-lag].flatten(), z0[:, lag:].flatten()
        assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 4 / math.sqrt(a.numel())
    # the pair (r cos, r sin) is uncorrelated in its squares too (Box-Muller gives independent normals)
    sq = z0.flatten().reshape(-1, 2) ** 2
    assert abs(torch.corrcoef(sq.T)[0, 1].item()) < 4 / math.sqrt(sq.shape[0])


# -- the csrc kernels ------------------------------------------------------------------------------------------------
def _z_coef(batch: int) -> torch.Tensor:
    """A DDIM row whose output is z itself (x = o = 0, NONZERO = DDIM_SIGMA = 1)."""
    c = torch.zeros(batch, NUM_COLS)
    c[:, [Col.NONZERO, Col.DDIM_SIGMA, Col.SQRT_RECIP_AC, Col.SQRT_RECIPM1_AC]] = 1.0
    return c


def _z_from_step(fn, seeds, step_index, shape):
    x = torch.zeros(shape, device=seeds.device)
    return fn(x, x, _z_coef(shape[0]).to(seeds.device), None, seeds=seeds, step_index=step_index, clip=False)


@needs_ext
@pytest.mark.parametrize("shape", [(3, 1), (2, 3, 5, 7), (2, 2051), (1, 4, 33, 17)])
def test_csrc_cpu_normals_bitwise(shape):
    seeds = rng.sample_seeds(5, shape[0])
    for j in (0, 7, rng.XT_STEP):
        got = _z_from_step(csrc_ops.ddim_step_csrc, seeds, j, shape)
        assert torch.equal(got, rng.counter_normal(seeds, j, shape)), j
    steps = torch.arange(shape[0]) * 3 + 1  # one step index per row
    assert torch.equal(_z_from_step(csrc_ops.ddim_step_csrc, seeds, steps, shape),
                       rng.counter_normal(seeds, steps, shape))


@needs_ext
def test_csrc_cpu_normals_bitwise_on_the_portable_path():
    """The vectorised Philox (AVX-512 intrinsics) and the portable loop (ATEN_CPU_CAPABILITY=avx2 selects it)
    give the same z."""
    script = (
        "import torch; from cg_fast.kernels import csrc_ops, rng; import tests.test_rng as t\n"
        "s = rng.sample_seeds(5, 3); shape = (3, 2, 1031)\n"
        "assert torch.equal(t._z_from_step(csrc_ops.ddim_step_csrc, s, 9, shape), rng.counter_normal(s, 9, shape))\n"
    )
    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    res = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]


def _table(eta=1.0):
    t = schedule_columns(NoiseSchedule.linear(1000).respace("50"), eta=eta)
    t[:, Col.GUIDE_S] = 1.5
    t[:, Col.H_DECAY] = 0.5
    t[:, Col.G_WEIGHT] = 0.5
    return t


STEP_CASES = [  # (method, eta, learned_var, guide, fresh, h)
    ("ddpm", 0.0, False, "none", False, False),
    ("ddpm", 0.0, True, "classifier", True, True),
    ("ddim", 1.0, False, "cfg", True, False),
    ("ddim", 0.0, False, "classifier", False, True),  # eta = 0: no noise at all
]


def _step_inputs(shape, learned, guide, fresh, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, c = shape[0], shape[1]
    x = torch.randn(shape, generator=g)
    o = torch.randn((b, 2 * c, *shape[2:]) if learned else shape, generator=g)
    if learned:
        o[:, c:] = o[:, c:].tanh()
    f = torch.randn(o.shape if guide == "cfg" else shape, generator=g) if fresh else None
    hh = torch.randn(shape, generator=g) if h else None
    return x, o, f, hh


def _step_both(method, eta, learned, guide, fresh, h, impl_fn, shape, js):
    ref_fn = ddpm_step_ref if method == "ddpm" else ddim_step_ref
    tab = _table(eta)
    coef = tab[js].contiguous()  # per-row steps, the last one (no noise) included
    x, o, f, hh = _step_inputs(shape, learned, guide, fresh, h)
    seeds = rng.sample_seeds(1, shape[0])
    kw = dict(guide=guide, fresh=f, learned_var=learned)
    h_ref = hh.clone() if hh is not None else None
    h_got = hh.clone() if hh is not None else None
    want = ref_fn(x, o, coef, None, h=h_ref, seeds=seeds, step_index=js, **kw)
    got = impl_fn(x.clone(), o, coef, None, h=h_got, seeds=seeds, step_index=js, **kw)
    return want, got, h_ref, h_got


@needs_ext
@pytest.mark.parametrize("case", STEP_CASES, ids=str)
def test_csrc_step_with_counter_noise_bitwise(case):
    method = case[0]
    fn = csrc_ops.ddpm_step_csrc if method == "ddpm" else csrc_ops.ddim_step_csrc
    want, got, h_ref, h_got = _step_both(*case, fn, (3, 3, 19, 23), torch.tensor([0, 49, 20]))
    assert torch.equal(got, want)
    if h_ref is not None:
        assert torch.equal(h_got, h_ref)


@needs_ext
def test_csrc_counter_noise_argument_errors():
    x = torch.zeros(2, 3, 4)
    c = _z_coef(2)
    seeds = rng.sample_seeds(0, 2)
    with pytest.raises(ValueError, match="not both"):
        csrc_ops.ddim_step_csrc(x, x, c, x, seeds=seeds, step_index=0)
    with pytest.raises(ValueError, match="needs seeds"):
        csrc_ops.ddim_step_csrc(x, x, c, None)
    with pytest.raises(ValueError, match=r"shape \[2\]"):
        csrc_ops.ddim_step_csrc(x, x, c, None, seeds=seeds[:1], step_index=0)
    with pytest.raises(TypeError, match="int64"):
        csrc_ops.ddim_step_csrc(x, x, c, None, seeds=seeds.int(), step_index=0)
    with pytest.raises(ValueError, match="1 or 2"):
        csrc_ops.ddim_step_csrc(x, x, c, None, seeds=seeds, step_index=torch.zeros(3, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="cg_fast::ddim_step: noise is None"):  # the op checks it too
        torch.ops.cg_fast.ddim_step(x, x, c, None, torch.empty_like(x))


@needs_ext
def test_opcheck_with_counter_noise():
    x = torch.randn(2, 3, 5)
    o = torch.randn(2, 3, 5)
    coef = _table()[[3, 9]].contiguous()
    args = (x, o, coef, None, torch.empty_like(x))
    kwargs = dict(seeds=rng.sample_seeds(0, 2), step_index=torch.tensor([3]))
    torch.library.opcheck(torch.ops.cg_fast.ddpm_step.default, args, kwargs)


# -- the shared header csrc/philox.h on the host: the uint32 stream of the csrc CPU and CUDA kernels --------------
_HOST_HARNESS = r"""
#include <cstdint>
#include "philox.h"
extern "C" void words(uint64_t seed, uint32_t step, int64_t quads, int64_t* out) {
  for (int64_t q = 0; q < quads; ++q) {
    uint32_t c0 = static_cast<uint32_t>(q), c1 = step, c2 = 0, c3 = cg_fast::kDomainNoise;
    cg_fast::philox4x32_10(c0, c1, c2, c3, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    out[4 * q] = c0; out[4 * q + 1] = c1; out[4 * q + 2] = c2; out[4 * q + 3] = c3;
  }
}
extern "C" void normals(uint64_t seed, uint32_t step, int64_t n, float* out) {  // the CUDA kernel's element path
  for (int64_t e = 0; e < n; ++e) out[e] = cg_fast::counter_normal(seed, step, e);
}
"""


def test_philox_header_stream_and_element_normals_on_host(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    (tmp_path / "h.cpp").write_text(_HOST_HARNESS)
    cmd = [cxx, "-O2", "-std=c++17", "-ffp-contract=off", "-shared", "-fPIC", f"-I{ROOT / 'csrc'}",
           str(tmp_path / "h.cpp"), "-o", str(tmp_path / "h.so")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    lib = ctypes.CDLL(str(tmp_path / "h.so"))
    lib.words.argtypes = [ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int64, ctypes.c_void_p]
    lib.normals.argtypes = [ctypes.c_uint64, ctypes.c_uint32, ctypes.c_int64, ctypes.c_void_p]
    n = 1003
    for seed in rng.sample_seeds(8, 3).tolist() + [-1]:
        for j in (0, 31, rng.XT_STEP):
            w = torch.empty(4 * ((n + 3) // 4), dtype=torch.int64)
            lib.words(seed & ((1 << 64) - 1), j, w.numel() // 4, w.data_ptr())
            s = torch.tensor([seed])
            assert torch.equal(w, rng.noise_words(s, j, n)[0])
            z = torch.empty(n)
            lib.normals(seed & ((1 << 64) - 1), j, n, z.data_ptr())
            assert rng.ulp_distance(z, rng.counter_normal(s, j, (1, n))[0]).max() <= rng.NORMAL_TOL_ULP


# -- Triton (interpreter on the CPU) ---------------------------------------------------------------------------------
def _triton():
    """The Triton kernels under the interpreter (these tests use CPU tensors)."""
    from cg_fast.kernels import triton_step

    if not triton_step.available() or not triton_step._INTERPRETED:
        pytest.skip("needs triton under the interpreter (TRITON_INTERPRET=1); the GPU tests are below")
    return triton_step


def test_triton_stream_identical_and_normals_within_tolerance():
    ts = _triton()
    from cg_fast.kernels.triton_rng import counter_words_triton

    seeds = torch.tensor([0, -1, 0x0123456789ABCDEF], dtype=torch.int64)
    for j in (0, rng.XT_STEP):
        assert torch.equal(counter_words_triton(seeds, j, 1030), rng.noise_words(seeds, j, 1030))
    shape = (3, 2, 3, 173)  # n = 1038: two blocks, a ragged end
    for j in (5, torch.tensor([1, 2, 3])):
        got = _z_from_step(ts.ddim_step_triton, seeds, j, shape)
        assert rng.ulp_distance(got, rng.counter_normal(seeds, j, shape)).max() <= rng.NORMAL_TOL_ULP


@pytest.mark.parametrize("case", STEP_CASES[:3], ids=str)
def test_triton_step_with_counter_noise(case):
    ts = _triton()
    fn = ts.ddpm_step_triton if case[0] == "ddpm" else ts.ddim_step_triton
    want, got, h_ref, h_got = _step_both(*case, fn, (3, 2, 7, 9), torch.tensor([0, 49, 20]))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if h_ref is not None:
        assert torch.equal(h_got, h_ref)


# -- the sampler -----------------------------------------------------------------------------------------------------
SHAPE8 = (8, 3, 8, 8)


def _counter_sampler(model, kernels="auto", **kw):
    return Sampler(model, NoiseSchedule.linear(1000), "20", rng="counter", kernels=kernels, **kw)


def test_sample_alone_equals_its_row_in_any_batch(tiny_eps, tiny_classifier):
    s = _counter_sampler(tiny_eps)
    seeds = rng.sample_seeds(42, 8)
    y = torch.arange(8)
    guid = ClassifierGuidance(tiny_classifier, 2.0, policy=Compress(rate=5), cache="compress")
    batch = s.sample(SHAPE8, y=y, seeds=seeds, guidance=guid).x
    perm = torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])
    shuffled = s.sample(SHAPE8, y=y[perm], seeds=seeds[perm], guidance=guid).x
    torch.testing.assert_close(shuffled, batch[perm], rtol=0, atol=1e-5)
    for i in (0, 5, 7):
        alone = s.sample((1, *SHAPE8[1:]), y=y[i:i + 1], seeds=[int(seeds[i])], guidance=guid).x
        torch.testing.assert_close(alone[0], batch[i], rtol=0, atol=1e-5)


def test_restart_at_step_j_continues_the_same_samples(tiny_eps):
    """Steps j.. of a run resumed from x_j with the same seeds give the same samples: z_j depends on (seed, j)."""
    s = _counter_sampler(tiny_eps)
    seeds = rng.sample_seeds(7, 4)
    y = torch.arange(4)
    states = {}
    full = s.sample((4, 3, 8, 8), y=y, seeds=seeds,
                    callback=lambda info: states.__setitem__(info["j"], info["x"].clone())).x
    j0 = 11
    x = states[j0 - 1]  # x after steps 0..j0-1
    rows = s.table(None)
    ts = torch.as_tensor(s.schedule.original_timesteps_in_sampling_order())
    from cg_fast.kernels import ddpm_step

    for j in range(j0, s.num_steps):
        o = tiny_eps(x, ts[j].expand(4), y)
        x = ddpm_step(x, o, rows[j].expand(4, -1), None, seeds=seeds, step_index=j)
    torch.testing.assert_close(x, full, rtol=0, atol=1e-5)


def test_x_T_is_the_reserved_step_and_kernels_agree(tiny_eps):
    seeds = rng.sample_seeds(3, 2)
    shape = (2, 3, 8, 8)
    a = _counter_sampler(tiny_eps, kernels="reference").sample(shape, y=[1, 2], seeds=seeds).x
    b = _counter_sampler(tiny_eps, kernels="reference").sample(
        shape, y=[1, 2], seeds=seeds, noise=rng.counter_normal(seeds, rng.XT_STEP, shape)).x
    assert torch.equal(a, b)
    if csrc_ops.available():
        c = _counter_sampler(tiny_eps, kernels="csrc").sample(shape, y=[1, 2], seeds=seeds).x
        assert torch.equal(c, a)  # csrc CPU: bitwise the reference, noise included


def test_seeds_default_from_the_generator_and_errors(tiny_eps):
    s = _counter_sampler(tiny_eps)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = s.sample((2, 3, 8, 8), y=[0, 1], generator=gen()).x
    assert torch.equal(a, s.sample((2, 3, 8, 8), y=[0, 1], generator=gen()).x)
    with pytest.raises(ValueError, match="one per sample"):
        s.sample((2, 3, 8, 8), y=[0, 1], seeds=[1, 2, 3])
    with pytest.raises(TypeError, match="integers"):
        s.sample((2, 3, 8, 8), y=[0, 1], seeds=[1.5, 2])
    with pytest.raises(ValueError, match="rng='counter'"):
        Sampler(tiny_eps, NoiseSchedule.linear(1000), "20").sample((2, 3, 8, 8), y=[0, 1], seeds=[1, 2])
    with pytest.raises(ValueError, match="unknown rng"):
        Sampler(tiny_eps, NoiseSchedule.linear(1000), "20", rng="philox")


def test_counter_graphed_equals_eager(tiny_eps, monkeypatch):
    """CUDA-graph replay (CPU emulation): the seeds and the step index live in buffers, nothing re-captured."""
    from test_engine import EMU, EmulatedGraphRunner

    import cg_fast.sampler as sampler_mod

    monkeypatch.setattr(sampler_mod, "GraphRunner", EmulatedGraphRunner)
    monkeypatch.setattr(Sampler, "_resolve_backend", lambda self, dev: self.backend)
    seeds = rng.sample_seeds(9, 4)
    for kernels in ["reference"] + (["csrc"] if csrc_ops.available() else []):
        eager = _counter_sampler(tiny_eps, kernels=kernels, backend="eager")
        graph = _counter_sampler(tiny_eps, kernels=kernels, backend="cudagraph")
        before = EMU.captures
        want = eager.sample((4, 3, 8, 8), y=[0, 1, 2, 3], seeds=seeds).x
        assert torch.equal(graph.sample((4, 3, 8, 8), y=[0, 1, 2, 3], seeds=seeds).x, want)
        assert EMU.captures == before + 1  # one capture for 20 steps
        other = rng.sample_seeds(10, 4)  # the next run: new seeds copied into the captured buffer
        assert torch.equal(graph.sample((4, 3, 8, 8), y=[0, 1, 2, 3], seeds=other).x,
                           eager.sample((4, 3, 8, 8), y=[0, 1, 2, 3], seeds=other).x)
        assert EMU.captures == before + 1


# -- on a GPU (run by benchmarks/gpu_suite.py): the same stream, normals within tolerance, graphs ---------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu_impls() -> dict:
    impls = {}
    from cg_fast.kernels import triton_step

    if triton_step.available() and not triton_step._INTERPRETED:
        impls["triton"] = (triton_step.ddpm_step_triton, triton_step.ddim_step_triton)
    if csrc_ops.available("cuda"):
        impls["csrc"] = (csrc_ops.ddpm_step_csrc, csrc_ops.ddim_step_csrc)
    if not impls:
        pytest.skip("neither compiled Triton nor the csrc CUDA extension is available")
    return impls


@needs_cuda
def test_cuda_stream_and_normals_match_the_cpu_reference():
    seeds = torch.tensor([0, -1, 0x0123456789ABCDEF, 7], dtype=torch.int64)
    shape = (4, 3, 37, 29)
    want = rng.counter_normal(seeds, 11, shape)
    for name, (_, ddim) in _gpu_impls().items():
        got = _z_from_step(ddim, seeds.cuda(), torch.tensor([11], device="cuda"), shape)
        assert rng.ulp_distance(got.cpu(), want).max() <= rng.NORMAL_TOL_ULP, name
    if "triton" in _gpu_impls():
        from cg_fast.kernels.triton_rng import counter_words_triton

        w = counter_words_triton(seeds.cuda(), 11, 3 * 37 * 29)
        assert torch.equal(w.cpu(), rng.noise_words(seeds, 11, 3 * 37 * 29))
    # the reference itself on the GPU: the same words, normals within tolerance
    assert torch.equal(rng.noise_words(seeds.cuda(), 11, 100).cpu(), rng.noise_words(seeds, 11, 100))
    assert rng.ulp_distance(rng.counter_normal(seeds.cuda(), 11, shape).cpu(), want).max() <= rng.NORMAL_TOL_ULP


@needs_cuda
@pytest.mark.parametrize("case", STEP_CASES, ids=str)
def test_cuda_steps_with_counter_noise_match_the_cpu_reference(case):
    method, eta, learned, guide, fresh, h = case
    shape, js = (3, 2, 19, 23), torch.tensor([0, 49, 20])
    tab = _table(eta)
    coef = tab[js].contiguous()
    x, o, f, hh = _step_inputs(shape, learned, guide, fresh, h)
    seeds = rng.sample_seeds(1, shape[0])
    ref_fn = ddpm_step_ref if method == "ddpm" else ddim_step_ref
    want = ref_fn(x, o, coef, None, guide=guide, fresh=f, h=None if hh is None else hh.clone(), learned_var=learned,
                  seeds=seeds, step_index=js)
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    for name, fns in _gpu_impls().items():
        got = fns[0 if method == "ddpm" else 1](dev(x), dev(o), dev(coef), None, guide=guide, fresh=dev(f),
                                                 h=dev(hh), learned_var=learned, seeds=dev(seeds), step_index=dev(js))
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5, msg=name)


@needs_cuda
def test_cuda_counter_sampling_graphed_equals_eager_and_the_cpu(tiny_eps, monkeypatch):
    """Whole-step CUDA graphs replay the counter noise from the step-index buffer; a seed's samples on the GPU
    equal its CPU samples up to the networks' rounding."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    seeds = rng.sample_seeds(21, 4)
    y = torch.tensor([0, 1, 2, 3])
    cpu = _counter_sampler(tiny_eps).sample((4, 3, 8, 8), y=y, seeds=seeds).x
    model = tiny_eps.cuda()
    out = {}
    for backend in ("eager", "cudagraph"):
        s = _counter_sampler(model, backend=backend)
        out[backend] = s.sample((4, 3, 8, 8), y=y.cuda(), seeds=seeds, device="cuda").x
        again = s.sample((4, 3, 8, 8), y=y.cuda(), seeds=seeds, device="cuda").x  # replays the cached graphs
        assert torch.equal(again, out[backend])
    torch.testing.assert_close(out["cudagraph"], out["eager"], rtol=0, atol=1e-6)
    torch.testing.assert_close(out["eager"].cpu(), cpu, rtol=0, atol=1e-4)
