"""`cg_fast.models.load`: file formats, checkpoint wrappers, prefixes, and the errors for bad checkpoints."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pytest
import torch

import cg_fast.models as M
from cg_fast.models.testing import example_inputs, randomize_

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_layouts.json"
_UNPICKLED = []


def _side_effect():
    _UNPICKLED.append(True)
    return "pwned"


class Payload:
    """Unpickling this would run `_side_effect`: a loader that unpickles arbitrary objects would call it."""

    def __reduce__(self):
        return (_side_effect, ())


def trained(name: str, seed: int = 0) -> torch.nn.Module:
    return randomize_(M.create(name), seed)


def assert_same_outputs(a, b):
    inputs = example_inputs(a, 2)
    with torch.no_grad():
        torch.testing.assert_close(a(*inputs), b(*inputs), atol=0, rtol=0)


@pytest.mark.parametrize("name", ["adm-tiny-cond", "adm-tiny-classifier", "dit-tiny"])
@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_torch_file_round_trip(tmp_path, name, suffix):
    src = trained(name)
    path = tmp_path / f"ckpt{suffix}"
    torch.save(src.state_dict(), path)
    dst = M.create(name)
    assert M.load(dst, path) is dst
    assert_same_outputs(src, dst)


def test_safetensors_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
    src = trained("adm-tiny-uncond")
    path = tmp_path / "w.safetensors"
    st.save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = M.load(M.create("adm-tiny-uncond"), path)
    assert_same_outputs(src, dst)


def test_state_dict_and_low_precision_target():
    src = trained("adm-tiny-cond")
    dst = M.load(M.create("adm-tiny-cond", dtype=torch.float16), src.state_dict())
    assert dst.input_blocks[1][0].in_layers[2].weight.dtype == torch.float16
    torch.testing.assert_close(dst.input_blocks[1][0].in_layers[2].weight.float(),
                               src.input_blocks[1][0].in_layers[2].weight, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("name", ["adm-tiny-cond", "dit-tiny"])
def test_meta_built_model_is_materialised_by_load(tmp_path, name):
    """create(..., device="meta") skips random initialisation; load allocates and fills it."""
    src = trained(name)
    path = tmp_path / "w.pt"
    torch.save(src.state_dict(), path)
    dst = M.load(M.create(name, device="meta"), path)
    assert all(p.device.type == "cpu" for p in (*dst.parameters(), *dst.buffers()))
    assert_same_outputs(src, dst)  # includes the rebuilt (non-persistent) timestep frequencies


def test_dit_training_checkpoint_loads_ema(tmp_path):
    """DiT's train.py saves {"model", "ema", "opt", "args" (an argparse.Namespace)}: sample with "ema"."""
    ema, raw = trained("dit-tiny", seed=1), trained("dit-tiny", seed=2)
    ckpt = {
        "model": raw.state_dict(),
        "ema": ema.state_dict(),
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "args": argparse.Namespace(model="DiT-XL/2", image_size=256, global_seed=0),
    }
    path = tmp_path / "0400000.pt"
    torch.save(ckpt, path)
    dst = M.load(M.create("dit-tiny"), path)
    assert_same_outputs(ema, dst)


def test_wrapped_state_dict(tmp_path):
    src = trained("adm-tiny-classifier")
    path = tmp_path / "wrapped.pt"
    torch.save({"state_dict": src.state_dict(), "step": 10}, path)
    assert_same_outputs(src, M.load(M.create("adm-tiny-classifier"), path))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod."])
def test_prefix_is_stripped_with_a_notice(tmp_path, prefix):
    src = trained("dit-tiny")
    path = tmp_path / "ddp.pt"
    torch.save({prefix + k: v for k, v in src.state_dict().items()}, path)
    with pytest.warns(UserWarning, match=f"stripped the prefix '{prefix}'"):
        dst = M.load(M.create("dit-tiny"), path)
    assert_same_outputs(src, dst)


def test_wrong_config_names_the_matching_one(tmp_path):
    path = tmp_path / "cond.pt"
    torch.save(trained("adm-tiny-cond").state_dict(), path)
    target = M.create("adm-tiny-uncond")
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(M.LayoutMismatchError) as info:
        M.load(target, path)
    err = info.value
    msg = str(err)
    assert "config 'adm-tiny-uncond'" in msg and "matches config 'adm-tiny-cond'" in msg
    assert "label_emb.weight" in err.unexpected and "label_emb.weight" in msg
    assert any(k == "out.2.weight" for k, _, _ in err.wrong_shape)  # 6 output channels vs 3
    assert "missing" in msg or not err.missing
    assert err.matching_configs == ["adm-tiny-cond"]
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), "a failed load changed weights"


@pytest.mark.skipif(not FIXTURE.is_file(), reason="checkpoint layout fixture absent")
def test_published_checkpoint_into_wrong_model_on_meta():
    """The classic mistake, at full size with no memory: the unconditional 256 UNet into the conditional one."""
    layouts = json.loads(FIXTURE.read_text())
    sd = {k: torch.empty(s, device="meta") for k, s in layouts["adm_256x256_uncond"]["state_dict"].items()}
    with pytest.raises(M.LayoutMismatchError, match="matches config 'adm-256-uncond'") as info:
        M.load(M.create("adm-256-cond", device="meta"), sd)
    assert info.value.missing == ["label_emb.weight"] and not info.value.unexpected


def test_unknown_layout_lists_keys_and_says_no_config_matches():
    sd = trained("dit-tiny").state_dict()
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    sd["extra.weight"] = torch.zeros(1)
    del sd["final_layer.linear.bias"]
    with pytest.raises(M.LayoutMismatchError) as info:
        M.load(M.create("dit-tiny"), sd)
    msg = str(info.value)
    assert "final_layer.linear.bias" in msg and "extra.weight" in msg
    assert "blocks.0.attn.qkv.weight checkpoint [3, 3] vs model [192, 64]" in msg
    assert "no registered config matches" in msg and info.value.matching_configs == []


def test_truncated_file(tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(trained("adm-tiny-cond").state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(M.CheckpointError, match="truncated"):
        M.load(M.create("adm-tiny-cond"), path)


def test_truncated_safetensors(tmp_path):
    st = pytest.importorskip("safetensors.torch", reason="safetensors not installed")
    path = tmp_path / "cut.safetensors"
    st.save_file(trained("dit-tiny").state_dict(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(M.CheckpointError, match="truncated"):
        M.load(M.create("dit-tiny"), path)


def test_arbitrary_objects_are_never_unpickled(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": trained("dit-tiny").state_dict(), "hook": Payload()}, path)
    with pytest.raises(M.CheckpointError, match="refusing to unpickle"):
        M.load(M.create("dit-tiny"), path)
    assert not _UNPICKLED


def test_missing_file_and_non_checkpoint(tmp_path):
    with pytest.raises(M.CheckpointError, match="not found"):
        M.load(M.create("dit-tiny"), tmp_path / "nope.pt")
    path = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(M.CheckpointError, match="no tensor state dict"):
        M.load(M.create("dit-tiny"), path)


def test_missing_safetensors_package_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\0" * 16)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        M.load(M.create("dit-tiny"), path)
