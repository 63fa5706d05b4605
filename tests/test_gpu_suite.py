"""benchmarks/gpu_suite.py's parent side on the CPU: one process per section, a crash, a sticky error or a
hang costs that section only, and partial results of a cut-short section are kept."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402

# What each stand-in section does in its child process (the real ones need a GPU).
CHILDREN = {
    "env": "save({'sections': {'env': {'gpu': 'stand-in'}}, 'errors': {}})",
    "correctness": "save({'sections': {}, 'errors': {'correctness': 'AssertionError: boom'}})",
    "models": "import os; os._exit(3)",  # a crash (a sticky CUDA error aborts the process)
    "kernels": "save({'sections': {'kernels_partial': {'done': 1}}, 'errors': {}}); import time; time.sleep(60)",
    "forward": "save({'sections': {'forward': {'ms': 1.0}}, 'errors': {}})",
}


def _child(name: str, path: Path, timeout: float) -> list[str]:
    code = textwrap.dedent(f"""
        import json, pathlib
        def save(d):
            pathlib.Path({str(path)!r}).write_text(json.dumps(d))
        {CHILDREN[name]}
    """)
    return [sys.executable, "-c", code]


def test_each_section_in_its_own_process(tmp_path):
    names = ["env", "correctness", "models", "forward"]
    res = gpu_suite.run_sections(names, tmp_path, budget_s=120.0, extra=[], child=_child)
    saved = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert saved["sections"] == res["sections"] == {"env": {"gpu": "stand-in"}, "forward": {"ms": 1.0}}
    assert "boom" in saved["errors"]["correctness"]
    assert "exited with 3" in saved["errors"]["models"]  # the crash cost only its own section
    assert set(saved["errors"]) == {"correctness", "models"}
    runs = saved["section_runs"]
    assert runs["models"]["returncode"] == 3 and not runs["models"]["timed_out"]
    assert runs["env"]["returncode"] == 0
    assert list(tmp_path.iterdir()) == [tmp_path / "gpu_suite.json"]  # one file, no temporaries left


def test_a_hanging_section_is_killed_at_the_time_left_and_its_partial_results_kept(tmp_path):
    res = gpu_suite.run_sections(["kernels", "forward"], tmp_path, budget_s=8.0, extra=[], child=_child)
    assert res["section_runs"]["kernels"]["timed_out"] and "timed out" in res["errors"]["kernels"]
    assert res["sections"]["kernels_partial"] == {"done": 1}
    assert "forward" not in res["sections"] and "time budget" in res["errors"]["forward"]


@pytest.mark.parametrize("argv", [["--sections", "env"], ["--section", "env", "--section-json", "x.json"]])
def test_without_cuda_the_suite_says_so(argv, capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert gpu_suite.main(argv) == 2 and "no CUDA device" in capsys.readouterr().err
