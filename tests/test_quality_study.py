"""The quality study's smoke mode: every method runs, tuning picks from the ladder, the report and figures are written,
and a rerun resumes instead of recomputing."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

STUDY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality_study.py"


def _load():
    spec = importlib.util.spec_from_file_location("quality_study", STUDY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quick_study_end_to_end(tmp_path, capsys):
    qs = _load()
    assert qs.main(["--quick", "--no-gmm", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    report = (tmp_path / "report.md").read_text()
    for method in list(qs.CG_METHODS) + list(qs.CFG_METHODS):
        assert f"| {method} |" in report, method
        evaluated = [k for k in runs if k.startswith("ddim25|") and k.split("|")[2] == method
                     and k.split("|")[4] != str(qs.TUNE_SEED)]
        assert len({k.split("|")[3] for k in evaluated}) == 1  # one (the tuned) scale per method and sampler
        assert len(evaluated) == len(qs.QUICK["seeds"])
    (full,) = [v for k, v in runs.items() if k.startswith("ddim25|cg|full|") and k.endswith("|0")]
    assert full["classifier_grads"] == 25 and full["denoiser_passes"] == 25
    assert "Matched budgets" not in report  # the quick mode has no DDPM 250 runs to match
    pytest.importorskip("matplotlib")
    assert (tmp_path / "quality_vs_grads.png").stat().st_size > 10_000

    # a rerun finds every run in results.json and computes nothing
    capsys.readouterr()
    assert qs.main(["--quick", "--no-gmm", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "fd_class" not in out


def test_ladder_search_finds_the_local_minimum(tmp_path):
    qs = _load()
    study = qs.Study.__new__(qs.Study)
    calls = []

    def fake_run(family, sampler, spec, method, mdef, scale, seed, diagnose=False):
        calls.append(scale)
        return {"fd_class": (scale - 16.0) ** 2}  # best at 16 on the ladder

    study.run = fake_run
    best = study.tune("cg", "s", ("1", "ddpm"), "m", None, qs.CG_SCALES)
    assert best == 16.0
    assert set(calls) <= set(qs.CG_SCALES) and 256.0 not in calls


def _load_calibrated():
    import sys

    sys.path.insert(0, str(STUDY.parent))
    spec = importlib.util.spec_from_file_location("quality_study_calibrated", STUDY.parent / "quality_study_calibrated.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_calibrated_study_smoke(tmp_path, capsys, monkeypatch):
    """The --calibrated design: matched gradient budgets, calibrations saved beside the results, targets judged,
    a rerun resumes (tiny sizes: 20 samples, one seed, one scale)."""
    cs = _load_calibrated()
    monkeypatch.setitem(cs.QUICK, "num_samples", 20)
    monkeypatch.setitem(cs.QUICK, "seeds", [0])
    monkeypatch.setitem(cs.QUICK, "cg_scales", [16.0])
    assert cs.main(["--quick", "--no-gmm", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    grads = {k.split("|")[2]: v["classifier_grads"] for k, v in runs.items()}
    assert grads == {"full": 25, "compg r3 k1": 10, "uniform skip r3": 10, "calibrated K10": 10}
    (cal,) = (tmp_path / "calibrations").glob("classifier-ddim25-s16-K10-*.json")
    assert len(json.loads(cal.read_text())["guided"]) == 10
    report = (tmp_path / "report.md").read_text()
    assert "### Targets (issue 19)" in report and "| calibrated K10 |" in report
    capsys.readouterr()
    assert cs.main(["--quick", "--no-gmm", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "fd_class" not in out
