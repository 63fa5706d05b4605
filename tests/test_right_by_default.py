"""Right by default: from a checkpoint (saved as the public files are) to the reference's samples, with no
setting typed twice, and every bad input refused where it enters with a message that says what to do."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from adm_oracle import Oracle, make_cond_fn, spaced_betas
from cg_fast import CFG, ClassifierGuidance, ConfigOverrideWarning, NoiseSchedule, Sampler
from cg_fast.guidance import Compress, Full
from cg_fast.models import (AssumedSettingsWarning, LayoutMismatchError, adm, create, infer_layout, list_configs,
                            load, load_checkpoint)
from cg_fast.models.testing import randomize_
from cg_fast.schedules import space_timesteps

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_layouts.json"
LAYOUTS = json.loads(FIXTURE.read_text()) if FIXTURE.is_file() else {}

# guided-diffusion's published 64x64 MODEL_FLAGS (cosine schedule), shrunk to a CPU-sized network: only the
# width, depth and head size differ, every flag that decides sampling is the published one
SMALL_64_FLAGS = (
    "--attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 --image_size 64 "
    "--learn_sigma True --noise_schedule cosine --num_channels 32 --num_head_channels 32 --num_res_blocks 1 "
    "--resblock_updown True --use_new_attention_order True --use_fp16 False --use_scale_shift_norm True"
)
SMALL_CLASSIFIER_FLAGS = ("--image_size 64 --classifier_width 64 --classifier_depth 1 --noise_schedule cosine "
                          "--classifier_scale 2.0")


def oracle(schedule: NoiseSchedule, steps: str, **kw) -> Oracle:
    betas, tmap = spaced_betas(schedule.betas, set(space_timesteps(schedule.num_steps, steps)))
    return Oracle(betas, tmap, **kw)


# -- every published config: the reference's schedule and settings ----------------------------------------
PUBLISHED_DENOISERS = [n for n in list_configs(published_only=True) if "classifier" not in n]
FIXTURE_NAME = {"adm-64-cond": "adm_64x64_cond", "adm-128-cond": "adm_128x128_cond",
                "adm-256-cond": "adm_256x256_cond", "adm-256-uncond": "adm_256x256_uncond",
                "adm-512-cond": "adm_512x512_cond", "dit-xl-2-256": "dit_DiT-XL_2_256",
                "dit-xl-2-512": "dit_DiT-XL_2_512"}


@pytest.mark.skipif(not LAYOUTS, reason="checkpoint layout fixture absent")
@pytest.mark.parametrize("name", PUBLISHED_DENOISERS)
def test_from_model_takes_the_reference_settings(name):
    ref = LAYOUTS[FIXTURE_NAME[name]]["config"]  # the authors' flags / arguments, recorded independently
    model = create(name, device="meta")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to override, so nothing to warn about
        s = Sampler.from_model(model)
    dit = name.startswith("dit")
    want = NoiseSchedule.named(ref.get("noise_schedule", "linear"), ref.get("diffusion_steps", 1000))
    assert np.array_equal(s.base_schedule.betas, want.betas)
    assert s.num_steps == 250 and s.method == "ddpm"  # the READMEs' timestep_respacing 250
    assert s.learn_sigma is ref["learn_sigma"] and s.prediction == "eps" and s.variance == "fixed_large"
    assert s.class_cond is (True if dit else ref["class_cond"])
    assert s.clip_denoised is (not dit)  # latents are never clipped
    assert s.num_classes == (1000 if (dit or ref["class_cond"]) else None)
    if dit:
        cfg = s.resolve_cfg(CFG(4.0))
        assert (cfg.null_label, cfg.channels) == (1000, 3)  # DiT's sample.py convention (spec §6)


# -- guided-diffusion end to end: flag string -> checkpoint file -> samples -------------------------------
@pytest.fixture(scope="module")
def small_adm(tmp_path_factory):
    """A small ADM UNet + classifier built from the (shrunk) published 64x64 flags, saved as state dicts."""
    d = tmp_path_factory.mktemp("ckpt")
    unet = randomize_(adm.create_unet(**adm.parse_flags(SMALL_64_FLAGS).model), seed=1)
    clf = randomize_(adm.create_classifier(**adm.parse_flags(SMALL_CLASSIFIER_FLAGS).classifier), seed=2)
    torch.save(unet.state_dict(), d / "64x64_diffusion.pt")
    torch.save(clf.state_dict(), d / "64x64_classifier.pt")
    return d


def _oracle_samples(unet, clf, steps, scale, seed, y):
    orc = oracle(NoiseSchedule.cosine(1000), steps, learned=True, fixed="large", clip=True, class_cond=True)
    torch.manual_seed(seed)
    return orc.loop(unet, (2, 3, 64, 64), y=y, cond_fn=make_cond_fn(clf, scale) if clf is not None else None)


def test_published_flag_string_gives_guided_diffusions_samples(small_adm):
    unet = load(adm.create_unet(**adm.parse_flags(SMALL_64_FLAGS).model), small_adm / "64x64_diffusion.pt")
    clf = load(adm.create_classifier(**adm.parse_flags(SMALL_CLASSIFIER_FLAGS).classifier),
               small_adm / "64x64_classifier.pt")
    assert unet.cg_config.noise_schedule == "cosine" and clf.cg_config.guidance_scale == 2.0
    y = torch.tensor([3, 7])
    want = _oracle_samples(unet, clf, "4", 2.0, 11, y)
    sampler = Sampler.from_model(unet, steps="4", kernels="reference")
    torch.manual_seed(11)
    got = sampler.sample((2, 3, 64, 64), y, ClassifierGuidance(clf, 2.0, policy=Full(), cache="drop")).x
    assert torch.equal(got, want), f"max diff {(got - want).abs().max():.3g}"
    # the old way in (a linear schedule typed by hand) is now a contradiction, and said so
    with pytest.warns(ConfigOverrideWarning, match="'cosine'"):
        Sampler(unet, NoiseSchedule.linear(1000), "4")


def test_load_checkpoint_reads_the_architecture(small_adm):
    path = small_adm / "64x64_diffusion.pt"
    with pytest.warns(AssumedSettingsWarning, match="noise_schedule='linear'"):
        guessed = load_checkpoint(path)  # the schedule is in no weight: the default is assumed, and said
    assert guessed.cg_config.noise_schedule == "linear"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        unet = load_checkpoint(path, noise_schedule="cosine", num_head_channels=32, use_new_attention_order=True)
        clf = load_checkpoint(small_adm / "64x64_classifier.pt", noise_schedule="cosine")
    cfg = unet.cg_config
    assert (cfg.kind, cfg.image_size, cfg.learn_sigma, cfg.class_cond, cfg.noise_schedule) == \
        ("adm-unet", 64, True, True, "cosine")
    assert clf.cg_config.kind == "adm-classifier" and clf.cg_config.image_size == 64
    y = torch.tensor([3, 7])
    want = _oracle_samples(unet, clf, "4", 2.0, 5, y)
    torch.manual_seed(5)
    got = Sampler.from_model(unet, steps="4", kernels="reference").sample(
        (2, 3, 64, 64), y, ClassifierGuidance(clf, 2.0, policy=Full(), cache="drop")).x
    assert torch.equal(got, want)


@pytest.mark.skipif(not LAYOUTS, reason="checkpoint layout fixture absent")
@pytest.mark.parametrize("key", sorted(LAYOUTS))
def test_layouts_of_the_public_checkpoints_are_recognised(key):
    """Every published layout is read back to a model with exactly its parameter names and shapes."""
    layout = {k: torch.empty(v, device="meta") for k, v in LAYOUTS[key]["state_dict"].items()}
    info = infer_layout(layout)
    flags = {k: v for k, v in info.flags.items() if not k.startswith("_")}
    with torch.device("meta"):
        if info.family == "dit":
            from cg_fast.models import dit
            model = dit.create(**flags)
        elif info.family == "adm-unet":
            model = adm.create_unet(**flags)
        else:
            model = adm.create_classifier(**flags)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == LAYOUTS[key]["state_dict"]
    cfg = LAYOUTS[key]["config"]
    if info.family == "adm-unet":
        assert (flags["num_channels"], flags["learn_sigma"], flags["class_cond"]) == \
            (cfg["num_channels"], cfg["learn_sigma"], cfg["class_cond"])
    if info.family == "dit":
        assert flags["name"] == cfg["model"] and flags["input_size"] == cfg["latent_size"]


def test_load_checkpoint_recognises_a_registered_layout(tmp_path):
    # a real DiT-XL/2 is 675M parameters: the tiny registered DiT stands in, saved as DiT's training does
    tiny = randomize_(create("dit-tiny"), seed=3)
    torch.save({"model": tiny.state_dict(), "ema": tiny.state_dict()}, tmp_path / "ckpt.pt")
    got = load_checkpoint(tmp_path / "ckpt.pt")
    assert got.cg_config.name == "dit-tiny" and not got.cg_config.clip_denoised
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), tiny.state_dict().values()))


# -- DiT: sample.py's samples from the same seed ---------------------------------------------------------
def _dit_sample_py(model, y, scale, steps, seed):
    """DiT's sample.py, transcribed: z for B rows, doubled; forward_with_cfg guides eps[:, :3]; every step
    draws randn_like on the 2B batch; the conditional half is kept; no clipping; learned variance."""
    def forward_with_cfg(x, t, yy):
        half = x[: len(x) // 2]
        out = model(torch.cat([half, half]), t, yy)
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond + scale * (cond - uncond)
        return torch.cat([torch.cat([half_eps, half_eps]), rest], dim=1)

    n = len(y)
    orc = oracle(NoiseSchedule.linear(1000), steps, learned=True, clip=False, class_cond=True)
    torch.manual_seed(seed)
    z = torch.randn(n, 4, 8, 8)
    y2 = torch.cat([y, torch.full_like(y, model.num_classes)])
    return orc.loop(forward_with_cfg, (2 * n, 4, 8, 8), y=y2, noise=torch.cat([z, z]))[:n]


def test_dit_cfg_defaults_give_dit_samples():
    model = randomize_(create("dit-tiny"), seed=4)  # 10 classes: the null label is 10, not 1000
    y = torch.tensor([1, 9, 4])
    want = _dit_sample_py(model, y, 4.0, "6", seed=21)
    sampler = Sampler.from_model(model, steps="6")
    assert not sampler.clip_denoised
    torch.manual_seed(21)
    got = sampler.sample((3, 4, 8, 8), y, CFG(4.0, policy=Full(), doubled_noise=True)).x
    # not bitwise: DiT forms eps_u + w (eps_c - eps_u), cg_fast eps_c + (w - 1)(eps_c - eps_u) (spec §6);
    # random weights give latents of a few hundred, so the float32 rounding is judged relative to that
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
    # all four channels is one option away, and differs
    torch.manual_seed(21)
    every = sampler.sample((3, 4, 8, 8), y, CFG(4.0, policy=Full(), doubled_noise=True, channels="all")).x
    assert (every - want).abs().max() > 1e-3 * want.abs().max()
    torch.manual_seed(21)  # and so is guided-diffusion's noise draw (B rows a step): another sample
    single = sampler.sample((3, 4, 8, 8), y, CFG(4.0, policy=Full())).x
    assert (single - want).abs().max() > 1e-3 * want.abs().max()
    # default CFG arguments (CompG policy, the model's null label) run on a 10-class DiT
    out = sampler.sample((3, 4, 8, 8), y, CFG(4.0))
    assert torch.isfinite(out.x).all() and out.x.abs().max() > 1.0  # latents are not clipped to [-1, 1]


def test_cfg_null_label_checks():
    model = randomize_(create("dit-tiny"), seed=4)
    sampler = Sampler.from_model(model, steps="3")
    with pytest.raises(ValueError, match="out of range"):
        sampler.sample((2, 4, 8, 8), [1, 2], CFG(4.0, null_label=1000))
    with pytest.warns(ConfigOverrideWarning, match="null label 10"):
        sampler.sample((2, 4, 8, 8), [1, 2], CFG(4.0, null_label=9))
    unet = create("adm-tiny-cond")  # guided-diffusion's ADM models have no null class
    with pytest.raises(ValueError, match="no null label"):
        Sampler.from_model(unet, steps="3").sample((1, 3, 16, 16), [0], CFG(4.0, null_label=10))
    with pytest.raises(ValueError, match="declares none"):
        Sampler(lambda x, t, y=None: x, NoiseSchedule.linear(1000), "3").sample((1, 3, 4, 4), [0], CFG(2.0))


# -- overrides and models without configs ----------------------------------------------------------------
def test_overrides_are_used_and_warned_once():
    model = create("dit-tiny")
    with pytest.warns(ConfigOverrideWarning) as rec:
        s = Sampler.from_model(model, steps="3", clip_denoised=True, learn_sigma=True)
    assert len(rec) == 1 and "clip_denoised=True" in str(rec[0].message)  # learn_sigma agrees: not listed
    assert s.clip_denoised is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = Sampler(model, NoiseSchedule.linear(1000), "3")  # no override: the config's settings
    assert not plain.clip_denoised and plain.learn_sigma
    with pytest.raises(TypeError, match="has no cg_config"):
        Sampler.from_model(lambda x, t, y=None: x)
    with pytest.raises(ValueError, match="is a classifier"):
        Sampler.from_model(create("adm-tiny-classifier"))


def test_digits_networks_carry_their_settings():
    from cg_fast.testbeds.digits import load_testbed

    tb = load_testbed(networks=("cond", "guide"))
    assert tb.nets["cond"].cg_config.null_label == 10 and tb.nets["guide"].cg_config.kind == "digits-classifier"
    y = tb.labels(4)
    torch.manual_seed(0)
    a = tb.sampler("cond", steps="5").sample(tb.shape(4), y).x
    torch.manual_seed(0)
    b = Sampler.from_model(tb.nets["cond"], steps="5").sample(tb.shape(4), y).x
    assert torch.equal(a, b)


# -- every number checked where it enters ----------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda clf: ClassifierGuidance(clf, float("inf")),
    lambda clf: ClassifierGuidance(clf, float("nan")),
    lambda clf: CFG(float("inf")),
    lambda clf: Compress(k=float("inf")),
    lambda clf: ClassifierGuidance(clf, 1.0, cache="momentum", decay=float("inf")),
    lambda clf: CFG(2.0, cache="momentum", beta=float("nan")),
], ids=["clf-inf", "clf-nan", "cfg-inf", "k-inf", "decay-inf", "beta-nan"])
def test_non_finite_numbers_are_refused(make, tiny_classifier):
    with pytest.raises(ValueError, match="finite"):
        make(tiny_classifier)


def test_sample_arguments_are_checked(tiny_eps):
    s = Sampler(tiny_eps, NoiseSchedule.linear(1000), "3", num_classes=10)
    with pytest.raises(ValueError, match="positive integers"):
        s.sample((4, 3, 8.5, 8), y=0)
    with pytest.raises(TypeError, match="respacing|steps"):
        Sampler(tiny_eps, NoiseSchedule.linear(1000), True)
    with pytest.raises(ValueError, match="eta"):
        Sampler(tiny_eps, NoiseSchedule.linear(1000), "3", "ddim", eta=float("nan"))
    with pytest.raises(TypeError, match="torch.Tensor"):
        s.sample((1, 3, 8, 8), y=0, noise=[[0.0]])
    noise = np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)
    torch.manual_seed(0)
    a = s.sample((2, 3, 8, 8), y=[1, 2], noise=noise).x  # numpy noise is taken as torch.from_numpy
    torch.manual_seed(0)
    b = s.sample((2, 3, 8, 8), y=[1, 2], noise=torch.from_numpy(noise)).x
    assert torch.equal(a, b)


def test_classifier_guidance_inside_inference_mode(tiny_eps, tiny_classifier):
    s = Sampler(tiny_eps, NoiseSchedule.linear(1000), "4", num_classes=10)
    g = ClassifierGuidance(tiny_classifier, 3.0, policy=Full())
    torch.manual_seed(2)
    want = s.sample((2, 3, 8, 8), [1, 2], g).x
    torch.manual_seed(2)
    with torch.inference_mode():
        got = s.sample((2, 3, 8, 8), [1, 2], g).x
    assert torch.equal(got, want)


def test_reference_kernel_refuses_a_changing_batch(tiny_eps):
    calls = [0]

    def shrinking(x, t, y=None):
        calls[0] += 1
        out = tiny_eps(x, t, y)
        return out if calls[0] == 1 else out[:1]  # one row too few after the first step

    s = Sampler(shrinking, NoiseSchedule.linear(1000), "3", kernels="reference", num_classes=10)
    with pytest.raises(ValueError, match="batch"):
        s.sample((2, 3, 8, 8), [1, 2])


# -- checkpoint files ------------------------------------------------------------------------------------
def test_safetensors_under_a_pt_name(tmp_path):
    from safetensors.torch import save_file

    model = randomize_(create("adm-tiny-classifier"), seed=1)
    save_file(model.state_dict(), str(tmp_path / "classifier.pt"))
    other = load(create("adm-tiny-classifier"), tmp_path / "classifier.pt")
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), model.state_dict().values()))


def test_mismatch_names_the_flag_and_fits_the_family(tmp_path):
    flags = adm.parse_flags(SMALL_64_FLAGS).model
    with torch.device("meta"):
        wide = adm.create_unet(**{**flags, "num_channels": 64})
        narrow = adm.create_unet(**flags)
        clf_a = adm.create_classifier(image_size=64, classifier_width=64, classifier_depth=1)
        clf_b = adm.create_classifier(image_size=64, classifier_width=128, classifier_depth=1)
    with pytest.raises(LayoutMismatchError, match="num_channels: checkpoint 64, model 32"):
        load(narrow, wide.state_dict())
    with pytest.raises(LayoutMismatchError) as err:
        load(clf_b, clf_a.state_dict())
    msg = str(err.value)
    assert "classifier_width: checkpoint 64, model 128" in msg and "MODEL_FLAGS" not in msg
    assert "create_classifier" in msg
    dit = create("dit-tiny", device="meta")
    with pytest.raises(LayoutMismatchError, match="checkpoint is an ADM UNet but the model is a DiT"):
        load(dit, narrow.state_dict())
