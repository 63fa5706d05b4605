"""The Triton step wrapper's host side: per-signature launch plans, no work on the hot path, x's device.

The kernel itself is replaced by a recording stub where the test is about the host (what the wrapper does
around the launch); the results are checked against the reference with the real (interpreted) kernel.
"""
from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton", reason="triton is not installed (pip install triton)")

from cg_fast.kernels import triton_step  # noqa: E402
from cg_fast.kernels.reference import ddpm_step_ref  # noqa: E402
from cg_fast.kernels.table import NUM_COLS, Col, schedule_columns  # noqa: E402
from cg_fast import NoiseSchedule  # noqa: E402

if not triton_step.available():  # pragma: no cover - conftest sets TRITON_INTERPRET=1 without CUDA
    pytest.skip("Triton cannot run here", allow_module_level=True)

DEV = "cpu" if triton_step._INTERPRETED else "cuda"


def _inputs(shape=(2, 3, 5, 7), seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(DEV)  # noqa: E731
    row = schedule_columns(NoiseSchedule.linear(1000).respace("50"))[20].clone()
    row[Col.GUIDE_S], row[Col.H_DECAY], row[Col.G_WEIGHT] = 2.0, 0.5, 0.5
    o = rnd(shape[0], 2 * shape[1], *shape[2:])
    o[:, shape[1]:].tanh_()
    return dict(x=rnd(*shape), model_out=o, coef=row.to(DEV)[None].expand(shape[0], NUM_COLS), noise=rnd(*shape),
                fresh=rnd(*shape), h=rnd(*shape), out=torch.empty(shape, device=DEV))


def _call(i, **over):
    kw = dict(guide="classifier", fresh=i["fresh"], h=i["h"], learned_var=True, out=i["out"])
    kw.update(over)
    return triton_step.ddpm_step_triton(i["x"], i["model_out"], i["coef"], i["noise"], **kw)


class _Ops(TorchDispatchMode):
    """Records every ATen op that runs (allocations, copies, checks that touch tensors)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


class _StubKernel:
    """Stands in for a Triton kernel: records the grid and the arguments of each launch."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kw: self.launches.append((grid, args, kw))


def test_repeated_calls_use_one_plan_and_match_the_reference():
    triton_step._PLANS.clear()
    i = _inputs()
    for step in range(3):
        h_ref = i["h"].clone()
        want = ddpm_step_ref(i["x"], i["model_out"], i["coef"], i["noise"], guide="classifier", fresh=i["fresh"],
                             h=h_ref, learned_var=True)
        got = _call(i)
        assert got is i["out"]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(i["h"], h_ref, rtol=1e-5, atol=1e-5)
    assert len(triton_step._PLANS) == 1
    _call(_inputs((3, 3, 5, 7)))  # another shape: another plan
    _call(i, fresh=None)          # a skipped step (h only): another plan
    assert len(triton_step._PLANS) == 3


def test_hot_path_checks_nothing_and_touches_no_tensor(monkeypatch):
    """A known signature skips validation and runs no ATen op around the launch (no copies, no allocation)."""
    triton_step._PLANS.clear()
    stub = _StubKernel()
    monkeypatch.setattr(triton_step, "_ddpm_step_kernel", stub)
    checks = []
    real = triton_step._check_shapes
    monkeypatch.setattr(triton_step, "_check_shapes", lambda *a: (checks.append(1), real(*a)))
    i = _inputs()
    _call(i)
    assert len(checks) == 1 and len(stub.launches) == 1
    with _Ops() as rec:
        for _ in range(5):
            _call(i)
    assert rec.ops == [] and len(checks) == 1 and len(stub.launches) == 6
    grid, args, kw = stub.launches[-1]
    n = 3 * 5 * 7
    assert grid == (2, 1) and args[7:13] == (n, 2 * n, n, 0, 1, n)  # row strides; coef expanded: c_row = 0
    assert kw["HAS_FRESH"] and kw["HAS_H"] and kw["LEARNED"] and kw["enable_fp_fusion"] is False
    assert args[6] is i["out"] and args[5] is i["h"]


def test_a_bad_call_is_still_rejected_after_a_good_one_of_a_similar_signature():
    triton_step._PLANS.clear()
    i = _inputs()
    _call(i, guide="cfg", fresh=i["model_out"], cfg_channels=1)
    with pytest.raises(ValueError, match="cfg_channels"):
        _call(i, guide="cfg", fresh=i["model_out"], cfg_channels=-1)
    with pytest.raises(ValueError, match="cfg_channels"):
        _call(i, guide="cfg", fresh=i["model_out"], cfg_channels=True)  # == 1, but not an integer
    with pytest.raises(TypeError, match="h has dtype"):
        _call(i, h=i["h"].double())
    with pytest.raises(ValueError, match="noise has shape"):
        triton_step.ddpm_step_triton(i["x"], i["model_out"], i["coef"], i["noise"][:1], learned_var=True)


def test_non_contiguous_arguments_take_the_copying_path():
    triton_step._PLANS.clear()
    i = _inputs()
    h_nc = i["h"].transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    h_ref = i["h"].clone()
    want = ddpm_step_ref(i["x"], i["model_out"], i["coef"], i["noise"], guide="classifier", fresh=i["fresh"],
                         h=h_ref, learned_var=True)
    for _ in range(2):  # the second call hits the plan of the non-contiguous signature
        h = h_nc.clone().transpose(2, 3).contiguous().transpose(2, 3)
        got = _call(i, h=h)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(h, h_ref, rtol=1e-5, atol=1e-5)
    assert not next(iter(triton_step._PLANS.values())).fast


def test_launch_runs_on_the_device_of_x(monkeypatch):
    """Triton launches on the current device: a plan for cuda:1 switches to it when cuda:0 is current."""
    seen = []
    values = dict(launch=lambda *a, **k: seen.append(("launch", torch.cuda.current_device())),
                  scalars=(1,) * 6, constexprs={}, fast=True, device_index=1, counter=False, step_stride=0)
    plan = triton_step._Plan(**{f.name: values[f.name] for f in dataclasses.fields(triton_step._Plan)})
    state = {"current": 0}

    @contextlib.contextmanager
    def device(index):
        before, state["current"] = state["current"], index
        seen.append(("enter", index))
        try:
            yield
        finally:
            state["current"] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    i = _inputs()
    monkeypatch.setattr(triton_step, "_PLANS", _AlwaysPlan(plan))
    _call(i)
    assert seen == [("enter", 1), ("launch", 1)] and state["current"] == 0
    seen.clear()
    state["current"] = 1  # already current: no switch
    _call(i)
    assert seen == [("launch", 1)]


class _AlwaysPlan(dict):
    def __init__(self, plan):
        super().__init__()
        self.plan = plan

    def get(self, key, default=None):
        return self.plan
