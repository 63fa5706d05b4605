"""Result files (cg_fast.runs) and the demos that use them: resume or refuse, never mix; atomic writes that do not
follow links; unreadable or unwritable outputs reported before any sampling (issue 11)."""
from __future__ import annotations

import json
import os

import pytest

from cg_fast import runs
from cg_fast.cli import main
from cg_fast.demo import DIGITS_RUNS, DigitsDemoConfig, run_digits_demo
from cg_fast.demo_gmm import DEMO_RUNS, DemoConfig, run_demo
from cg_fast.runs import RunError


def _no_sampling(monkeypatch):
    """Make any sampling run fail the test: the checks under test must come first."""
    from cg_fast.sampler import Sampler

    def sample(*a, **k):
        raise AssertionError("sampling started before the check")
    monkeypatch.setattr(Sampler, "sample", sample)


def test_fingerprint_is_stable_and_order_free():
    a = runs.fingerprint({"n": 500, "steps": "250", "seeds": [0, 1]})
    assert a == runs.fingerprint({"seeds": [0, 1], "steps": "250", "n": 500}) and len(a) == 16
    assert a != runs.fingerprint({"n": 60, "steps": "250", "seeds": [0, 1]})


def test_atomic_write_replaces_a_planted_link_and_keeps_the_old_file_on_error(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out" / "results.json"
    out.parent.mkdir()
    out.symlink_to(victim)
    runs.atomic_write_json(out, {"a": 1})
    assert victim.read_text() == "keep me" and not out.is_symlink() and json.loads(out.read_text()) == {"a": 1}

    def failing(f):
        f.write(b"half")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        runs.atomic_write(out, failing)
    assert json.loads(out.read_text()) == {"a": 1}
    assert sorted(p.name for p in out.parent.iterdir()) == ["results.json"]  # no temporary file left


def test_check_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunError, match="cannot write the output"):
        runs.check_writable(blocker / "sub" / "demo.json")
    with pytest.raises(RunError, match="is a folder"):
        runs.check_writable(tmp_path)
    assert runs.check_writable(tmp_path / "new" / "demo.json") == tmp_path / "new" / "demo.json"
    assert (tmp_path / "new").is_dir() and list((tmp_path / "new").iterdir()) == []


@pytest.mark.parametrize("content", ["null", "[]", "{not json", '{"config": {}}', '"text"'])
def test_resume_refuses_files_that_are_not_results(tmp_path, content):
    path = tmp_path / "r.json"
    path.write_text(content)
    with pytest.raises(RunError, match="move it aside or delete it"):
        runs.resume_or_refuse(path, {"n": 1}, kind="job")


def test_resume_same_settings_refuse_others(tmp_path):
    path = tmp_path / "r.json"
    assert runs.resume_or_refuse(path, {"n": 1}, kind="job") is None
    rec = runs.new_results({"n": 1, "steps": "5"}, kind="job")
    rec["runs"]["a"] = 3
    runs.atomic_write_json(path, rec)
    logs: list[str] = []
    assert runs.resume_or_refuse(path, {"steps": "5", "n": 1}, kind="job", log=logs.append)["runs"] == {"a": 3}
    assert logs == [f"resuming from {path}"]
    with pytest.raises(RunError, match=r"n: 1 -> 2.*another output path"):
        runs.resume_or_refuse(path, {"n": 2, "steps": "5"}, kind="job")
    with pytest.raises(RunError, match="not 'other job'"):
        runs.resume_or_refuse(path, {"n": 1, "steps": "5"}, kind="other job")


# -- the demos -------------------------------------------------------------------------------------------------
def test_gmm_demo_other_settings_refused_and_file_kept(tmp_path, monkeypatch):
    out = tmp_path / "demo.json"
    run_demo(DemoConfig(num_samples=32, steps="5", seeds=[0]), runs={"full": DEMO_RUNS["full"]}, out=out,
             log=lambda s: None)
    before = out.read_bytes()
    _no_sampling(monkeypatch)
    with pytest.raises(RunError, match="num_samples: 32 -> 48"):
        run_demo(DemoConfig(num_samples=48, steps="5", seeds=[0]), runs={"full": DEMO_RUNS["full"]}, out=out,
                 log=lambda s: None)
    assert out.read_bytes() == before


def test_digits_demo_files_follow_the_results_name_and_never_mix(tmp_path, monkeypatch):
    one = {"unguided": DIGITS_RUNS["unguided"]}
    cfg = DigitsDemoConfig(num_samples=20, steps="3", seeds=[0])
    run_digits_demo(cfg, runs=one, out=tmp_path / "a.json", grids=tmp_path, log=lambda s: None)
    a_npz = (tmp_path / "a_unguided.npz").read_bytes()
    run_digits_demo(DigitsDemoConfig(num_samples=20, steps="4", seeds=[0]), runs=one, out=tmp_path / "b.json",
                    grids=tmp_path, log=lambda s: None)
    assert (tmp_path / "a_unguided.npz").read_bytes() == a_npz  # the first run's samples are kept
    assert (tmp_path / "b_unguided.npz").exists() and (tmp_path / "b_unguided.png").exists()
    _no_sampling(monkeypatch)
    with pytest.raises(RunError, match="steps: '3' -> '4'"):
        run_digits_demo(DigitsDemoConfig(num_samples=20, steps="4", seeds=[0]), runs=one, out=tmp_path / "a.json",
                        grids=tmp_path, log=lambda s: None)
    assert (tmp_path / "a_unguided.npz").read_bytes() == a_npz


@pytest.mark.parametrize("testbed", ["digits", "gmm"])
@pytest.mark.parametrize("content", ["null", "[]"])
def test_cli_demo_reports_a_broken_results_file(tmp_path, capsys, monkeypatch, testbed, content):
    _no_sampling(monkeypatch)
    out = tmp_path / "demo.json"
    out.write_text(content)
    assert main(["demo", "--testbed", testbed, "--quick", "--out", str(out), "--plot", ""]) == 2
    err = capsys.readouterr().err
    assert "not a cg_fast demo" in err and "move it aside or delete it" in err
    assert out.read_text() == content


@pytest.mark.parametrize("testbed", ["digits", "gmm"])
def test_cli_demo_unwritable_out_fails_before_sampling(tmp_path, capsys, monkeypatch, testbed):
    _no_sampling(monkeypatch)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["demo", "--testbed", testbed, "--quick", "--out", str(blocker / "demo.json"), "--plot", ""]) == 2
    assert "cannot write" in capsys.readouterr().err
    # the figure path too
    ok = tmp_path / "ok.json"
    assert main(["demo", "--testbed", testbed, "--quick", "--out", str(ok), "--plot", str(blocker / "f.png")]) == 2
    assert "cannot write the figure" in capsys.readouterr().err and not ok.exists()


@pytest.mark.parametrize("samples", ["-5", "0", "two"])
def test_cli_demo_samples_must_be_positive(capsys, samples):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--samples", samples])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--samples" in err and "Traceback" not in err


@pytest.mark.parametrize("testbed, least", [("digits", 20), ("gmm", 16)])
def test_cli_demo_too_few_samples(tmp_path, capsys, monkeypatch, testbed, least):
    _no_sampling(monkeypatch)
    assert main(["demo", "--testbed", testbed, "--samples", "5", "--out", str(tmp_path / "d.json"),
                 "--plot", ""]) == 2
    assert f"at least {least}" in capsys.readouterr().err


def test_read_json_reports_unreadable_file(tmp_path):
    path = tmp_path / "r.json"
    path.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(RunError, match="cannot read"):
        runs.read_json(path)
    assert os.path.exists(path)


def test_digits_demo_settings_include_the_weights(tmp_path, monkeypatch):
    """A retrained testbed in the same --weights folder is other settings: its results are not resumed."""
    import shutil

    from cg_fast.testbeds.digits import WEIGHTS_DIR

    weights = tmp_path / "tb"
    shutil.copytree(WEIGHTS_DIR, weights)
    one = {"unguided": DIGITS_RUNS["unguided"]}
    cfg = DigitsDemoConfig(num_samples=20, steps="2", seeds=[0], testbed=str(weights))
    out = tmp_path / "d.json"
    run_digits_demo(cfg, runs=one, out=out, log=lambda s: None)
    assert runs.resume_or_refuse(out, {**json.loads(out.read_text())["config"]}, kind="cg_fast demo (digits)",
                                 log=lambda s: None) is not None
    judge = weights / "digits_judge.pt"
    judge.write_bytes(judge.read_bytes() + b"\0")  # "retrained" (any change of the bytes)
    _no_sampling(monkeypatch)
    with pytest.raises(RunError, match="weights: "):
        run_digits_demo(cfg, runs=one, out=out, log=lambda s: None)
