"""The side-by-side benchmark of cg_fast's sampler and guided-diffusion's loop (benchmarks/bench_adm_loop.py):
one short run, the same samples bit for bit, every figure present."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_adm_loop import side_by_side, small_adm64  # noqa: E402


def test_side_by_side_runs_and_agrees_bitwise():
    torch.set_num_threads(1)
    res = side_by_side(small_adm64(32), batch=1, steps=2, repeats=1)
    assert res["bitwise_equal"]
    for clock in ("wall", "cpu"):
        for k in ("oracle", "sampler"):
            assert res[f"{clock}_{k}_median_s"] > 0 and res[f"{clock}_{k}_forward_median_ms"] > 0
        assert res[f"{clock}_median_s_sampler_over_oracle"] > 0
