"""`cg-fast bench` on the digits testbed, one round: a table, a JSON record and a PNG appear, the accounting is
exact, the CompG ratios are finite; bad names and unavailable backends are refused before any measuring.
No speed is claimed here: the times of a shared CPU are only checked to be positive and finite."""
from __future__ import annotations

import json
import math

import pytest
import torch

from cg_fast.cli import main
from cg_fast.measure import Case, measure
from cg_fast.testbeds.digits import load_testbed

STEPS = 5


def test_one_round_on_the_digits_testbed(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--steps", str(STEPS), "--batch-sizes", "2", "3", "--rounds", "1", "--warmup", "1",
                 "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| backend | batch | method |" in text and "CompG / unguided" in text and "CompG / full guidance" in text
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rec = json.loads(out.read_text())
    assert rec["kind"] == "cg-fast bench" and rec["config"]["backends"] == ["eager"]  # auto on the CPU
    runs = rec["runs"]
    assert len(runs) == 3 * 2
    for batch in (2, 3):
        un, full, compg = (runs[f"{m}|eager|{batch}"] for m in ("unguided", "full", "compg"))
        for r in (un, full, compg):
            assert len(r["times"]) == 1 and len(r["warmup"]) == 1
            assert r["median"] > 0 and r["min"] <= r["median"] <= r["max"]
            assert r["denoiser_rows"] == STEPS * batch and r["denoiser_passes"] == STEPS
        assert (un["classifier_grads"], full["classifier_grads"]) == (0, STEPS)
        assert 0 < compg["classifier_grads"] < STEPS and compg["guided_steps"] == compg["classifier_grads"]
    assert len(rec["ratios"]) == 2
    for row in rec["ratios"]:
        for key in ("compg/unguided", "compg/full"):
            assert all(math.isfinite(row[key][s]) and row[key][s] > 0 for s in ("median", "min", "max"))


def test_cfg_on_the_conditional_model_and_no_figure(tmp_path, capsys):
    out = tmp_path / "cfg.json"
    assert main(["bench", "--model", "digits-cond", "--steps", "3", "--batch-sizes", "2", "--rounds", "1",
                 "--warmup", "0", "--methods", "full", "compg", "--out", str(out), "--plot", "",
                 "--no-progress"]) == 0
    rec = json.loads(out.read_text())
    assert rec["config"]["guidance"] == "cfg" and not out.with_suffix(".png").exists()
    assert rec["runs"]["full|eager|2"]["denoiser_rows"] == 3 * 2 * 2  # every step a 2B pass
    assert rec["runs"]["full|eager|2"]["warmup"] == []
    (row,) = rec["ratios"]
    assert "compg/full" in row and "compg/unguided" not in row  # no unguided run asked for
    assert "CompG / unguided" not in capsys.readouterr().out


def test_rounds_interleave_methods():
    """Every round runs each method of a (backend, batch) once, the order rotating, warm-up runs first."""
    tb = load_testbed(networks=("uncond", "guide"))
    order = []
    cases = [Case(m, "eager", 2) for m in ("unguided", "full", "compg")]
    res = measure(tb.uncond, tb.guide, cases, steps="2", rounds=3, warmup=1, tick=order.append)
    assert order[:3] == ["unguided eager b2", "full eager b2", "compg eager b2"]  # warm-up
    rounds = [order[3 + 3 * r: 6 + 3 * r] for r in range(3)]
    assert [r[0].split()[0] for r in rounds] == ["unguided", "full", "compg"]
    assert all(sorted(r) == sorted(order[:3]) for r in rounds)
    assert all(len(r.times) == 3 and len(r.warmup) == 1 for r in res.results)


def test_a_rerun_with_other_settings_is_refused(tmp_path, capsys):
    out = tmp_path / "b.json"
    base = ["bench", "--steps", "2", "--batch-sizes", "2", "--rounds", "1", "--warmup", "0", "--out", str(out),
            "--plot", "", "--no-progress", "--methods", "compg"]
    assert main(base) == 0
    assert main(base) == 0  # the same settings: measured again, replaced
    assert main([*base, "--rounds", "2"]) == 2
    assert "other settings" in capsys.readouterr().err and json.loads(out.read_text())["config"]["rounds"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--methods", "compgg"], "unknown method 'compgg' (did you mean compg?)"),
    (["--backends", "eagr"], "unknown backend 'eagr' (did you mean eager?)"),
    (["--model", "digits-uncond"], "CFG needs a class-conditional model"),
    (["--model", "digits-cond", "--classifier", "digits-gide"], "did you mean digits-guide"),
    (["--warmup", "-1"], "--warmup must be 0 or more"),
])
def test_bad_input_is_refused_before_measuring(tmp_path, capsys, argv, message):
    out = tmp_path / "x.json"
    assert main(["bench", *argv, "--steps", "2", "--out", str(out), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_an_unavailable_backend_says_so(tmp_path, capsys):
    assert main(["bench", "--backends", "cudagraph", "--device", "cpu", "--out", str(tmp_path / "x.json")]) == 2
    assert "backend 'cudagraph' needs a CUDA device" in capsys.readouterr().err
