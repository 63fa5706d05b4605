"""benchmarks/gpu_bringup.sh's plumbing, in its dry-run mode (no GPU): every stage gets its own limited process,
a failed or timed-out stage costs only itself, the time budget holds, and $OUT stays within the device
tool's limits (at most 8 files, no more than 2 folders deep)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_bringup.sh"
STAGES = ["build", "triton", "graphs", "models", "csrc", "suite"]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _run(out: Path, **env) -> dict:
    full = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, **{k: str(v) for k, v in env.items()}}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], cwd=ROOT, env=full, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads((out / "bringup.json").read_text())


def _files(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.is_file()]


def test_all_stages_within_budget_and_file_limits(tmp_path):
    doc = _run(tmp_path)
    assert [s["stage"] for s in doc["stages"]] == STAGES and doc["ok"] and doc["dry_run"]
    assert doc["budget_s"] == 300
    caps = {s["stage"]: s["cap_s"] for s in doc["stages"]}
    assert sum(v for k, v in caps.items() if k != "suite") + 40 <= 300  # the suite is promised 40 s
    files = _files(tmp_path)
    assert len(files) <= 8 and all(len(p.relative_to(tmp_path).parts) <= 3 for p in files)
    assert {p.name for p in files} == {"bringup.log", "bringup.json"}  # models.json / gpu_suite.json: real runs
    log = (tmp_path / "bringup.log").read_text()
    for name in STAGES:
        assert f"===== {name} (limit" in log and f"===== {name}: exit 0" in log
    assert "setup.py build_ext --inplace" in log and "-k 'csrc_cuda or cuda_matches'" in log and "--name models.json" in log


def test_a_timed_out_or_failed_stage_costs_only_itself(tmp_path):
    # budget 225: the build is left 225 - 210 reserved - start-up (a few s) < 90 s, and sleeps past that
    doc = _run(tmp_path, BRINGUP_BUDGET=225, DRY_SLEEP_build=60, DRY_FAIL="graphs")
    by = {s["stage"]: s for s in doc["stages"]}
    assert by["build"]["timed_out"] and by["build"]["seconds"] <= 20
    assert by["graphs"]["returncode"] == 1 and not by["graphs"]["timed_out"]
    assert all(by[n]["returncode"] == 0 for n in ("triton", "models", "csrc", "suite")) and not doc["ok"]
    assert "***** build: timed out" in (tmp_path / "bringup.log").read_text()


def test_stages_without_time_left_are_skipped(tmp_path):
    doc = _run(tmp_path, BRINGUP_BUDGET=60)
    by = {s["stage"]: s for s in doc["stages"]}
    assert by["build"]["skipped"] and by["triton"]["skipped"]  # their reserve leaves them no time
    assert by["suite"]["returncode"] == 0  # the suite takes what is left
