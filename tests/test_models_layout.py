"""Parameter names and shapes of every model against the public checkpoints' layouts (meta device: no memory).

The layouts come from tests/fixtures/checkpoint_layouts.json, a copy of ../shared/fixtures/ (kept in the repo so
that a clean clone can run them); `test_fixture_copy_in_sync` checks the copy when the shared one is present.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cg_fast.models as M

HERE = Path(__file__).resolve().parent
IN_REPO = HERE / "fixtures" / "checkpoint_layouts.json"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "checkpoint_layouts.json"
FIXTURE = IN_REPO if IN_REPO.is_file() else SHARED
LAYOUTS: dict = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}
needs_fixture = pytest.mark.skipif(not LAYOUTS, reason=f"checkpoint layout fixture absent ({IN_REPO}, {SHARED})")

# fixture entry -> the named config that must reproduce it
NAMED = {
    "adm_64x64_cond": "adm-64-cond",
    "adm_128x128_cond": "adm-128-cond",
    "adm_256x256_cond": "adm-256-cond",
    "adm_256x256_uncond": "adm-256-uncond",
    "adm_512x512_cond": "adm-512-cond",
    "adm_64x64_classifier": "adm-64-classifier",
    "adm_128x128_classifier": "adm-128-classifier",
    "adm_256x256_classifier": "adm-256-classifier",
    "adm_512x512_classifier": "adm-512-classifier",
    "dit_DiT-XL_2_256": "dit-xl-2-256",
    "dit_DiT-XL_2_512": "dit-xl-2-512",
    "dit_DiT-S_2_256": "dit-s-2-256",
    "dit_DiT-B_4_256": "dit-b-4-256",
}


def layout(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def build_from_fixture_config(key: str, config: dict) -> torch.nn.Module:
    """Build the model the way a user would from the checkpoint's own published flags."""
    with torch.device("meta"):
        if key.startswith("dit_"):
            return M.dit.create(config["model"], config["latent_size"], config["num_classes"], config["learn_sigma"])
        if "classifier" in key:
            return M.adm.create_classifier(**config)
        return M.adm.create_unet(**config)


def assert_same_layout(model, entry):
    got, want = layout(model), entry["state_dict"]
    missing = [k for k in want if k not in got]
    extra = [k for k in got if k not in want]
    wrong = [(k, got[k], want[k]) for k in want if k in got and got[k] != want[k]]
    assert not (missing or extra or wrong), f"missing {missing[:5]}, extra {extra[:5]}, wrong shape {wrong[:5]}"
    assert list(got) == list(want), "same keys, different order"
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]


def test_fixture_present_in_repo():
    assert IN_REPO.is_file(), "tests/fixtures/checkpoint_layouts.json must be committed (CI runs on a clean clone)"


@pytest.mark.skipif(not (SHARED.is_file() and IN_REPO.is_file()), reason="shared fixture not present beside repo")
def test_fixture_copy_in_sync():
    assert json.loads(IN_REPO.read_text()) == json.loads(SHARED.read_text()), (
        "tests/fixtures/checkpoint_layouts.json differs from ../shared/fixtures/: copy the shared one over"
    )


@needs_fixture
@pytest.mark.parametrize("key", sorted(LAYOUTS))
def test_layout_from_published_flags(key):
    entry = LAYOUTS[key]
    model = build_from_fixture_config(key, entry["config"])
    assert next(model.parameters()).device.type == "meta"
    assert_same_layout(model, entry)


@needs_fixture
@pytest.mark.parametrize("key", sorted(LAYOUTS))
def test_layout_of_named_config(key):
    assert key in NAMED, f"fixture entry {key} has no named config in this test's table"
    entry, name = LAYOUTS[key], NAMED[key]
    model = M.create(name, device="meta")
    assert_same_layout(model, entry)
    cfg, flags = model.cg_config, entry["config"]
    assert cfg.name == name
    assert cfg.learn_sigma is bool(flags.get("learn_sigma", False))  # classifiers: no learned variance
    if cfg.kind == "adm-unet":
        assert cfg.class_cond is flags["class_cond"]
        assert cfg.noise_schedule == flags["noise_schedule"]
        assert cfg.image_size == cfg.input_size == flags["image_size"]
    elif cfg.kind == "dit":
        assert (cfg.image_size, cfg.input_size) == (flags["image_size"], flags["latent_size"])


@needs_fixture
@pytest.mark.parametrize("key", sorted(LAYOUTS))
def test_find_configs_names_the_layout(key):
    """The loader's mismatch diagnosis finds the config of each published layout (meta tensors: no memory)."""
    sd = {k: torch.empty(s, device="meta") for k, s in LAYOUTS[key]["state_dict"].items()}
    assert M.find_configs(sd) == [NAMED[key]]


@needs_fixture
def test_fp16_flag_does_not_change_layout():
    entry = LAYOUTS["adm_64x64_cond"]
    model = M.create("adm-64-cond", device="meta", dtype=torch.bfloat16)
    assert_same_layout(model, entry)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert dtypes["input_blocks.1.0.in_layers.2.weight"] == torch.bfloat16  # body convolutions
    assert dtypes["input_blocks.1.0.in_layers.0.weight"] == torch.float32  # norms stay float32
    assert dtypes["input_blocks.1.0.emb_layers.1.weight"] == torch.float32  # as ADM's convert_to_fp16
    assert dtypes["time_embed.0.weight"] == dtypes["out.2.weight"] == torch.float32


def test_every_named_config_builds_on_meta():
    for name in M.list_configs():
        model = M.create(name, device="meta")
        cfg = model.cg_config
        assert cfg.name == name and not model.training
        assert cfg.kind in ("adm-unet", "adm-classifier", "dit")
        if cfg.kind == "dit":
            assert cfg.latent_scale == 0.18215 and cfg.null_label == cfg.num_classes and not cfg.clip_denoised
        else:
            assert cfg.latent_scale is None and cfg.null_label is None and cfg.clip_denoised
