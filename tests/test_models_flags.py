"""guided-diffusion flags, DiT names and the named-config registry: parsing, defaults and errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cg_fast.models as M
from cg_fast.models import adm

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_layouts.json"
LAYOUTS = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}

# guided-diffusion README, 64x64 classifier-guided sampling command (MODEL_FLAGS + script flags + SAMPLE_FLAGS)
README_64 = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 --num_res_blocks 3 "
    "--resblock_updown True --use_new_attention_order True --use_fp16 True --use_scale_shift_norm True "
    "--classifier_scale 1.0 --classifier_path models/64x64_classifier.pt --classifier_depth 4 "
    "--model_path models/64x64_diffusion.pt --batch_size 4 --num_samples 100 --timestep_respacing 250"
)


def shapes(model):
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def test_parse_readme_command():
    f = adm.parse_flags(README_64)
    assert f.model["num_channels"] == 192 and f.model["use_fp16"] is True and f.model["dropout"] == 0.1
    assert f.model["attention_resolutions"] == "32,16,8" and f.model["learn_sigma"] is True
    assert f.diffusion == {"diffusion_steps": 1000, "learn_sigma": True, "noise_schedule": "cosine",
                           "timestep_respacing": "250"}
    # .model carries the diffusion flags too, so a model built from it samples with the cosine schedule
    assert {k: f.model[k] for k in f.diffusion} == f.diffusion
    assert f.classifier == {"classifier_depth": 4, "image_size": 64, "classifier_scale": 1.0,
                            "diffusion_steps": 1000, "noise_schedule": "cosine"}
    assert f.other == {"classifier_path": "models/64x64_classifier.pt",
                       "model_path": "models/64x64_diffusion.pt", "batch_size": 4, "num_samples": 100}


@pytest.mark.skipif(not LAYOUTS, reason="checkpoint layout fixture absent")
def test_readme_flags_build_the_published_models():
    f = adm.parse_flags(README_64)
    with torch.device("meta"):
        unet = adm.create_unet(**f.model)
        unet_all = adm.create_unet(**{**f.model, **f.diffusion, **f.classifier, **f.other})  # everything at once
        clf = adm.create_classifier(**f.classifier)
    assert shapes(unet) == shapes(unet_all) == LAYOUTS["adm_64x64_cond"]["state_dict"]
    assert shapes(clf) == LAYOUTS["adm_64x64_classifier"]["state_dict"]
    cfg = unet_all.cg_config
    got = (cfg.noise_schedule, cfg.timestep_respacing, cfg.learn_sigma, cfg.class_cond)
    assert got == ("cosine", "250", True, True)


def test_flag_syntax_and_values():
    f = adm.parse_flags(["--image_size=128", "--class_cond", "yes", "--use-fp16", "0", "--channel_mult", "1,2,2"])
    assert f.model == {"image_size": 128, "class_cond": True, "use_fp16": False, "channel_mult": "1,2,2"}
    assert f.classifier == {"image_size": 128}
    with pytest.raises(ValueError, match="unknown flag --unknown_flag"):
        adm.parse_flags("--unknown_flag 3")
    with pytest.raises(ValueError, match="did you mean --num_channels"):
        adm.parse_flags("--num_chanels 64")
    with pytest.raises(ValueError, match="boolean"):
        adm.parse_flags("--class_cond maybe")
    with pytest.raises(ValueError, match="has no value"):
        adm.parse_flags("--image_size")
    with pytest.raises(ValueError, match="expected a --flag"):
        adm.parse_flags("image_size 64")


def test_defaults_are_guided_diffusions():
    assert adm.MODEL_DEFAULTS["attention_resolutions"] == "16,8" and adm.MODEL_DEFAULTS["num_heads"] == 4
    assert adm.CLASSIFIER_DEFAULTS["classifier_attention_resolutions"] == "32,16,8"
    with torch.device("meta"):
        m = adm.create_unet()  # image_size 64, 128 channels, no learned sigma, unconditional
    assert m.out_channels == 3 and m.num_classes is None and m.model_channels == 128
    assert not hasattr(m, "label_emb") and m.cg_config.noise_schedule == "linear"
    assert adm.channel_mult_for(512) == (0.5, 1, 1, 2, 2, 4, 4)
    assert adm.channel_mult_for(32, "1,2,2,2") == (1, 2, 2, 2)


def test_flag_errors():
    with pytest.raises(TypeError, match="num_channel \\(did you mean num_channels\\?\\)"):
        adm.create_unet(num_channel=64)
    with pytest.raises(ValueError, match="no default channel_mult for image_size=32"):
        adm.create_unet(image_size=32)
    with pytest.raises(ValueError, match="not divisible by num_head_channels"):
        adm.create_unet(image_size=64, num_channels=32, num_head_channels=24)
    with pytest.raises(NotImplementedError, match="spatial"), torch.device("meta"):
        adm.create_classifier(classifier_pool="spatial")


def test_dit_names():
    assert len(M.dit.DIT_NAMES) == 12
    with torch.device("meta"):
        m = M.dit.create("DiT-S/8", input_size=32, num_classes=10, learn_sigma=False)
    assert (m.patch_size, len(m.blocks), m.out_channels, m.null_label) == (8, 12, 4, 10)
    assert m.pos_embed.shape == (1, 16, 384) and not m.pos_embed.requires_grad
    with pytest.raises(ValueError, match="valid names: DiT-XL/2"):
        M.dit.create("DiT-M/2")


def test_named_config_registry():
    assert {"adm-64-cond", "adm-128-cond", "adm-256-cond", "adm-256-uncond", "adm-512-cond", "adm-64-classifier",
            "adm-128-classifier", "adm-256-classifier", "adm-512-classifier", "dit-xl-2-256",
            "dit-xl-2-512"} <= set(M.list_configs(published_only=True))
    assert "adm-tiny-cond" not in M.list_configs(published_only=True)
    with pytest.raises(ValueError, match="did you mean adm-64-cond") as info:
        M.create("adm-64-conf")
    assert "dit-xl-2-512" in str(info.value)


def test_named_config_sampler_defaults():
    cfg = M.create("adm-64-cond", device="meta").cg_config
    assert (cfg.kind, cfg.noise_schedule, cfg.learn_sigma, cfg.clip_denoised) == ("adm-unet", "cosine", True, True)
    assert (cfg.num_classes, cfg.null_label, cfg.latent_scale, cfg.input_shape) == (1000, None, None, (3, 64, 64))
    assert (cfg.classifier, cfg.guidance_scale, cfg.timestep_respacing) == ("adm-64-classifier", 1.0, "250")
    u = M.create("adm-256-uncond", device="meta").cg_config
    assert (u.class_cond, u.num_classes, u.guidance_scale, u.noise_schedule) == (False, None, 10.0, "linear")
    c = M.create("adm-512-classifier", device="meta").cg_config
    assert (c.kind, c.num_classes, c.learn_sigma) == ("adm-classifier", 1000, False)
    d = M.create("dit-xl-2-512", device="meta").cg_config
    assert (d.kind, d.input_shape, d.image_size, d.out_channels) == ("dit", (4, 64, 64), 512, 8)
    assert (d.latent_scale, d.null_label, d.clip_denoised, d.noise_schedule) == (0.18215, 1000, False, "linear")
    assert M.create("adm-512-cond", device="meta").dtype == torch.float32  # published with use_fp16 False
    assert M.create("adm-256-cond", device="meta").dtype == torch.float16
