"""The command line: demo (quick preset), resume after interruption, plan."""
from __future__ import annotations

import json

from cg_fast.cli import main
from cg_fast.demo_gmm import DEMO_RUNS, DemoConfig, format_table, run_demo


def test_demo_quick_runs_and_writes_results(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--testbed", "gmm", "--quick", "--samples", "400", "--steps", "50", "--out", str(out),
                 "--plot", ""]) == 0
    text = capsys.readouterr().out
    assert "compg k=1" in text and "exact p(x|y)" in text
    res = json.loads(out.read_text())
    assert set(res["runs"]) == set(DEMO_RUNS)
    full, compg = res["runs"]["full"]["0"], res["runs"]["compg k=1"]["0"]
    assert full["classifier_grads"] == 50 and compg["classifier_grads"] == 12  # 50 // 5 + 2 final
    assert full["denoiser_passes"] == compg["denoiser_passes"] == 50


def test_demo_resumes_finished_runs(tmp_path):
    out = tmp_path / "demo.json"
    cfg = DemoConfig(num_samples=200, steps="20", seeds=[0])
    first = run_demo(cfg, runs={"full": DEMO_RUNS["full"]}, out=out, log=lambda s: None)
    logs = []
    second = run_demo(cfg, runs={"full": DEMO_RUNS["full"], "unguided": DEMO_RUNS["unguided"]}, out=out,
                      log=logs.append)
    assert any("resuming" in line for line in logs)
    assert second["runs"]["full"] == first["runs"]["full"]  # not recomputed
    assert "unguided" in second["runs"]
    assert "full" in format_table(second)


def test_plan_and_errors(capsys):
    assert main(["plan", "compress", "--rate", "5", "--k", "5"]) == 0
    assert "34 of 250 steps guided" in capsys.readouterr().out
    assert main(["plan", "compress", "--rate", "0"]) == 2
    assert "rate" in capsys.readouterr().err


def test_demo_figure(tmp_path):
    import pytest
    pytest.importorskip("matplotlib")
    from cg_fast.demo_gmm import plot_demo
    samples: dict = {}
    cfg = DemoConfig(num_samples=160, steps="10", seeds=[0, 1])
    res = run_demo(cfg, runs={k: DEMO_RUNS[k] for k in ("full", "compg k=1", "unguided")}, log=lambda s: None,
                   keep_samples=samples)
    assert {"full", "compg k=1", "exact p(x|y)"} <= set(samples) and samples["full"].shape == (160, 8)
    path = plot_demo(res, samples, tmp_path / "demo.png")
    assert path.stat().st_size > 10_000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
