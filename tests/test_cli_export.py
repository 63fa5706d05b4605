"""`cg-fast export`: the ONNX export lands in the cache the sampler reads (a later `cg-fast sample --backend onnx`
exports nothing), a rerun reuses it, TensorRT is skipped with its reason where it is missing, bad input says
what to do."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from cg_fast.backends import onnxrt
from cg_fast.cli import main

pytestmark = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None
                                or importlib.util.find_spec("onnxscript") is None, reason="needs onnx extras")
NO_TRT = importlib.util.find_spec("tensorrt") is None


def _no_more_exports(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("exported again: the ahead-of-time export was not reused")
    monkeypatch.setattr(onnxrt, "export_denoiser", refuse)


def test_export_then_sample_reuses_the_export(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("CG_FAST_CACHE", str(cache))
    rec = tmp_path / "export.json"
    assert main(["export", "--model", "digits-uncond", "--batch-size", "4", "--format", "auto",
                 "--json", str(rec), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    entries = json.loads(rec.read_text())["entries"]
    assert [(e["format"], e["batch"], e["with_y"], e["reused"]) for e in entries] == [("onnx", 4, False, False)]
    (onnx_file,) = cache.glob("onnx/*/model.onnx")
    assert entries[0]["path"] == str(onnx_file) and "| onnx | 4 |" in out
    if NO_TRT:
        assert "TensorRT engine skipped: TensorRT is not installed (pip install tensorrt" in out
    mtime = onnx_file.stat().st_mtime_ns

    _no_more_exports(monkeypatch)  # from here on an export would fail the test
    assert main(["export", "--model", "digits-uncond", "--batch-size", "4", "--format", "onnx",
                 "--json", str(rec)]) == 0
    assert json.loads(rec.read_text())["entries"][0]["reused"] is True
    assert main(["sample", "--model", "digits-uncond", "--classifier", "digits-guide", "--scale", "4",
                 "--steps", "3", "--num_samples", "8", "--batch_size", "4", "--backend", "onnx",
                 "--out", str(tmp_path / "run"), "--no-progress", "--grid", "0", "--device", "cpu"]) == 0
    with np.load(tmp_path / "run" / "samples_8x8x8x1.npz") as z:
        assert z["arr_0"].shape == (8, 8, 8, 1)
    assert list(cache.glob("onnx/*/model.onnx")) == [onnx_file] and onnx_file.stat().st_mtime_ns == mtime


def test_export_cfg_doubles_the_batch_of_a_conditional_model(tmp_path, capsys):
    rec = tmp_path / "x.json"
    assert main(["export", "--model", "digits-cond", "--batch-size", "2", "--cfg", "--format", "onnx",
                 "--cache-dir", str(tmp_path / "c"), "--json", str(rec)]) == 0
    entries = json.loads(rec.read_text())["entries"]
    assert [(e["batch"], e["with_y"]) for e in entries] == [(2, True), (4, True)]
    assert len(list((tmp_path / "c" / "onnx").glob("*/model.onnx"))) == 2


@pytest.mark.skipif(not NO_TRT, reason="TensorRT is installed")
def test_tensorrt_missing_is_a_clear_message(tmp_path, capsys):
    assert main(["export", "--model", "digits-uncond", "--format", "tensorrt", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--format tensorrt: TensorRT is not installed (pip install tensorrt" in err
    assert "--format onnx exports ONNX alone" in err
    assert not any(tmp_path.iterdir())  # nothing was written


@pytest.mark.parametrize("argv, message", [
    (["--format", "onxx"], "unknown --format 'onxx' (did you mean onnx?)"),
    (["--model", "digits-uncnd"], "did you mean digits-uncond"),
    (["--model", "digits-uncond", "--cfg"], "--cfg: classifier-free guidance needs a class-conditional model"),
    (["--model", "digits-uncond", "--device", "cuda:0"], None),
    (["--model_path", "no/such/file.pt"], "checkpoint 'no/such/file.pt' does not exist"),
    (["--model", "digits-uncond", "--num_chanels", "64"], "did you mean --num_channels"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, capsys, argv, message):
    if message is None:  # a CUDA device where there is none
        pytest.importorskip("torch")
        import torch
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        message = "no CUDA GPU is available here"
    assert main(["export", *argv, "--cache-dir", str(tmp_path / "c")]) == 2
    assert message in capsys.readouterr().err
    assert not list((tmp_path / "c").glob("onnx/*/model.onnx"))


def test_batch_size_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--model", "digits-uncond", "--batch-size", "0"])
    assert "must be at least 1" in capsys.readouterr().err
