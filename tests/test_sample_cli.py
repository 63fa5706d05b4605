"""`cg-fast sample`: checkpoints saved as the public files are -> an ADM-evaluator .npz; resume after a kill
gives the same bytes; 2 gloo ranks give the 1-process file; batch size does not change the samples; every
error says what to do."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cg_fast import harness
from cg_fast.cli import main
from cg_fast.models import create
from cg_fast.models.testing import randomize_

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Tiny ADM UNet + classifier with random weights, saved as guided-diffusion saves them (a state dict)."""
    d = tmp_path_factory.mktemp("ckpts")
    torch.save(randomize_(create("adm-tiny-cond"), seed=1).state_dict(), d / "unet.pt")
    torch.save(randomize_(create("adm-tiny-classifier"), seed=2).state_dict(), d / "classifier.pt")
    return d


def _args(ckpts: Path, out: Path, *more: str) -> list[str]:
    return ["sample", "--model", "adm-tiny-cond", "--model_path", str(ckpts / "unet.pt"),
            "--classifier", "adm-tiny-classifier", "--classifier_path", str(ckpts / "classifier.pt"),
            "--classifier_scale", "2.0", "--timestep_respacing", "4", "--num_samples", "6", "--batch_size", "4",
            "--shard-size", "3", "--out", str(out), "--no-progress", "--grid", "0", *more]


def _npz(out: Path) -> Path:
    (final,) = out.glob("samples_*.npz")
    return final


def test_checkpoints_to_adm_npz(ckpts, tmp_path):
    assert main(_args(ckpts, tmp_path / "run", "--policy", "full")) == 0
    final = _npz(tmp_path / "run")
    assert final.name == "samples_6x16x16x3.npz"
    with np.load(final) as z:
        assert z["arr_0"].shape == (6, 16, 16, 3) and z["arr_0"].dtype == np.uint8
        assert z["arr_1"].shape == (6,) and 0 <= z["arr_1"].min() and z["arr_1"].max() < 10
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["totals"]["classifier_grads"] == 2 * 4  # two shards of 3 (one batch each), 4 guided steps
    assert rec["totals"]["denoiser_rows"] == 6 * 4 and len(rec["runs"]) == 2
    assert rec["config"]["num_samples"] == 6 and "torch" in rec["versions"]


def test_interrupted_run_resumes_to_the_same_bytes(ckpts, tmp_path, monkeypatch):
    assert main(_args(ckpts, tmp_path / "whole")) == 0
    real = harness._sample_shard
    calls = [0]

    def dies_on_second(*a, **kw):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(harness, "_sample_shard", dies_on_second)
    assert main(_args(ckpts, tmp_path / "cut")) == 2  # "interrupted ... rerun the same command to resume"
    assert len(list((tmp_path / "cut" / "shards").glob("*.npz"))) == 1
    monkeypatch.setattr(harness, "_sample_shard", real)
    assert main(_args(ckpts, tmp_path / "cut")) == 0
    assert _npz(tmp_path / "cut").read_bytes() == _npz(tmp_path / "whole").read_bytes()


def _edge_safe_equal(a_u8, b_u8, a_float, tol=1e-4):
    """uint8 images equal except where the float sample lies within ``tol`` of a quantisation edge (the
    truncating cast of (x + 1) * 127.5 flips there under tiny differences): the exact form of 'the same
    samples to ``tol`` before quantisation'."""
    v = (a_float + 1) * 127.5  # NCHW
    near = np.abs(v - np.round(v)) < tol * 127.5
    near = near.transpose(0, 2, 3, 1)
    return bool(np.all((a_u8 == b_u8) | near))


def test_batch_size_does_not_change_the_samples(ckpts, tmp_path):
    assert main(_args(ckpts, tmp_path / "b4", "--keep-float")) == 0
    args6 = _args(ckpts, tmp_path / "b6", "--keep-float")
    args6[args6.index("--batch_size") + 1] = "6"
    args6[args6.index("--shard-size") + 1] = "6"  # another shard layout as well
    assert main(args6) == 0
    f4 = np.concatenate([np.load(p)["x"] for p in sorted((tmp_path / "b4" / "shards").glob("*.npz"))])
    f6 = np.concatenate([np.load(p)["x"] for p in sorted((tmp_path / "b6" / "shards").glob("*.npz"))])
    # the noise and labels are the same; the network's float rounding is not (oneDNN picks its convolution
    # kernels by batch size): measured up to 4e-5 on adm-tiny over 25 steps
    assert np.abs(f4 - f6).max() <= 2e-4
    u4, u6 = (np.load(_npz(tmp_path / d))["arr_0"] for d in ("b4", "b6"))
    assert _edge_safe_equal(u4, u6, f4, tol=2e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_ranks_give_the_one_process_file(ckpts, tmp_path):
    assert main(_args(ckpts, tmp_path / "one")) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "cg_fast", *_args(ckpts, tmp_path / "two")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads((tmp_path / "two" / "run.json").read_text())
    assert sorted(m["rank"] for m in rec["runs"].values()) == [0, 1]
    assert _npz(tmp_path / "two").read_bytes() == _npz(tmp_path / "one").read_bytes()


# -- errors -----------------------------------------------------------------------------------------------
def _err(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_errors_say_what_to_do(ckpts, tmp_path, capsys):
    out = tmp_path / "e"
    assert "does not exist" in _err(capsys, ["sample", "--model_path", str(tmp_path / "nope.pt"), "--out", str(out)])
    assert "did you mean adm-tiny-cond" in _err(capsys, ["sample", "--model", "adm-tny-cond", "--out", str(out)])
    assert "did you mean --num_channels" in _err(capsys, [*_args(ckpts, out), "--num_chanels", "32"])
    msg = _err(capsys, ["sample", "--model", "adm-tiny-uncond", "--model_path", str(ckpts / "unet.pt"),
                        "--out", str(out), "--no-progress"])
    assert "adm-tiny-cond" in msg  # the checkpoint does not fit: the message names the config that does
    assert "labels must lie in [0, 10)" in _err(capsys, [*_args(ckpts, out), "--class", "12"])
    assert "one option" in _err(capsys, [*_args(ckpts, out), "--num-fid-samples", "8"])
    assert "backend" in _err(capsys, [*_args(ckpts, out), "--backend", "tensorrt"]).lower()
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot write" in _err(capsys, _args(ckpts, blocker / "sub"))
    assert main(_args(ckpts, tmp_path / "s")) == 0
    assert "other settings" in _err(capsys, [*_args(ckpts, tmp_path / "s"), "--seed", "3"])


def test_out_of_memory_names_a_batch_size(ckpts, tmp_path, capsys, monkeypatch):
    from cg_fast.sampler import Sampler

    def oom(self, *a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(Sampler, "sample", oom)
    assert "--batch_size 2" in _err(capsys, _args(ckpts, tmp_path / "oom"))


def test_python_m_cg_fast_is_the_same_program():
    done = subprocess.run([sys.executable, "-m", "cg_fast", "sample", "--help"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert done.returncode == 0 and "--num-fid-samples" in done.stdout and "examples:" in done.stdout
