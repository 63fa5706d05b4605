"""The digits testbed: data, networks, training, the shipped weights and their recorded checks, scoring, demo."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from cg_fast import ClassifierGuidance
from cg_fast.cli import main
from cg_fast.eval import load_sample_batch
from cg_fast.guidance import Full
from cg_fast.testbeds.digits import NETWORKS, load_net, load_testbed, save_net
from cg_fast.testbeds.digits_data import load_digits_data
from cg_fast.testbeds.digits_nets import DigitsClassifier, DigitsMLPJudge, DigitsUNet, build_net
from cg_fast.testbeds.digits_train import (RECIPE, classifier_accuracy, denoiser_loss, train_classifier,
                                           train_testbed)


@pytest.fixture(scope="module")
def tb():
    return load_testbed()


def test_data_range_and_disjoint_balanced_halves():
    d = load_digits_data()
    assert d.x.shape == (1797, 1, 8, 8) and d.x.min() == -1 and d.x.max() == 1
    xa, ya = d.subset("half_a")
    xb, yb = d.subset("half_b")
    assert len(ya) + len(yb) == 1797
    assert (torch.bincount(ya, minlength=10) - torch.bincount(yb, minlength=10)).abs().max() <= 1
    with pytest.raises(ValueError, match="half_a"):
        d.subset("half_c")


def test_networks_shapes_and_null_label():
    torch.manual_seed(0)
    unet = DigitsUNet(16).eval()
    x, t = torch.randn(5, 1, 8, 8), torch.randint(0, 1000, (5,))
    y = torch.arange(5)
    assert unet(x, t, y).shape == (5, 1, 8, 8)
    torch.testing.assert_close(unet(x, t), unet(x, t, torch.full_like(y, 10)))  # None = the null label
    for clf in (DigitsClassifier(16), DigitsMLPJudge(64)):
        assert clf(x, t).shape == (5, 10) and clf.features(x, t).shape == (5, 64)
    with pytest.raises(ValueError, match="kind"):
        build_net({"kind": "resnet"})


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = DigitsClassifier(16).eval()
    save_net(net, tmp_path / "c.pt")
    back = load_net(tmp_path / "c.pt")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 5, 900])
    assert torch.equal(net(x, t), back(x, t))
    with pytest.raises(FileNotFoundError, match="train-testbed"):
        load_net(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="train-testbed"):
        load_testbed(tmp_path)


def test_training_is_reproducible_and_learns():
    d = load_digits_data()
    spec = dataclasses.replace(RECIPE["guide"], steps=60)
    sched = load_testbed(networks=()).schedule
    nets = []
    for _ in range(2):
        torch.manual_seed(spec.seed)
        net, log = train_classifier(DigitsClassifier(16), *d.subset("half_a"), sched, spec)
        nets.append(net)
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    acc = classifier_accuracy(nets[0], *d.subset("half_b"), sched, timesteps=(0,))
    assert acc["0"] > 0.15  # 60 steps: chance is 0.10 +- 0.01 on these 901 images; trained is 0.98


def test_train_testbed_writes_loadable_networks(tmp_path):
    recipe = {name: dataclasses.replace(spec, steps=3) for name, spec in RECIPE.items()}
    meta = train_testbed(tmp_path, recipe, only=["guide", "judge_mlp"], log=lambda s: None)
    assert set(meta["networks"]) == {"guide", "judge_mlp"} and "held_out_accuracy" in meta["networks"]["guide"]
    tb = load_testbed(tmp_path, networks=("guide", "judge_mlp"))
    assert tb.guide(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown"):
        train_testbed(tmp_path, recipe, only=["vae"])


# -- the shipped weights -------------------------------------------------------------------------------------
def test_shipped_classifiers_reach_recorded_accuracy(tb):
    d = load_digits_data()
    for name in ("guide", "judge", "judge_mlp"):
        rec = tb.meta["checks"][name]["held_out_accuracy"]
        held = "half_b" if tb.meta["networks"][name]["spec"]["data"] == "half_a" else "half_a"
        got = classifier_accuracy(tb.nets[name], *d.subset(held), tb.schedule)
        for t, acc in rec.items():
            assert got[t] == pytest.approx(acc, abs=0.005), (name, t)
        assert got["0"] > 0.9, name  # clean held-out digits


def test_shipped_unets_reach_recorded_loss(tb):
    d = load_digits_data()
    for name in ("cond", "uncond"):
        rec = tb.meta["checks"][name]["loss"]
        got = denoiser_loss(tb.nets[name], d.x, d.y if name == "cond" else None, tb.schedule)
        for t, loss in rec.items():
            assert got[t] == pytest.approx(loss, rel=1e-3), (name, t)


def test_shipped_conditional_samples_are_the_right_digits(tb):
    y = tb.labels(200)
    x = tb.sampler("cond", "ddim25", "ddim").sample(tb.shape(200), y=y, generator=torch.Generator().manual_seed(0)).x
    acc = tb.score(x, y)["judge_acc"]
    assert acc == pytest.approx(tb.meta["checks"]["cond"]["ddim25_judge_acc"], abs=0.02)
    assert acc > 0.8


def test_classifier_guidance_steers_the_unconditional_model(tb):
    y = tb.labels(100)
    s = tb.sampler("uncond", "ddim25", "ddim")
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    free = tb.score(s.sample(tb.shape(100), y=y, generator=gen()).x, y)
    guided = tb.score(s.sample(tb.shape(100), y=y, guidance=ClassifierGuidance(tb.guide, 4.0, policy=Full(),
                                                                              cache="drop"), generator=gen()).x, y)
    assert free["judge_acc"] < 0.3 < 0.7 < guided["judge_acc"]


def test_score_of_real_digits(tb):
    d = load_digits_data()
    s = tb.score(d.x, d.y)
    assert s["fd"] == pytest.approx(0.0, abs=1e-6) and s["fd_class"] == pytest.approx(0.0, abs=1e-6)
    assert s["precision"] == 1.0 and s["recall"] == 1.0
    assert s["judge_acc"] > 0.95 and s["mlp_acc"] > 0.9 and s["is_score"] > 8.0
    with pytest.raises(ValueError, match=r"\[n, 1, 8, 8\]"):
        tb.score(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN"):
        tb.score(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4, dtype=torch.long))


def test_all_networks_ship():
    tb = load_testbed()
    assert set(tb.nets) == set(NETWORKS) and set(tb.meta["checks"]) == set(NETWORKS)


# -- the main job ----------------------------------------------------------------------------------------------
def test_demo_quick_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "--quick", "--samples", "40", "--steps", "20", "--out", str(out), "--plot",
                 str(tmp_path / "demo.png")]) == 0
    text = capsys.readouterr().out
    for name in ("full", "compg", "early stop", "uniform skip", "unguided", "FD (judge)", "judge acc"):
        assert name in text
    res = json.loads(out.read_text())
    full, compg = res["runs"]["full"]["0"], res["runs"]["compg"]["0"]
    assert full["classifier_grads"] == 20 and compg["classifier_grads"] == 6  # 20 // 5 + 2 final
    assert full["denoiser_passes"] == compg["denoiser_passes"] == 20
    assert res["runs"]["unguided"]["0"]["classifier_grads"] == 0
    for name in ("full", "compg", "early_stop", "uniform_skip", "unguided"):
        assert (tmp_path / f"demo_{name}.png").read_bytes()[:4] == b"\x89PNG"
    images, labels = load_sample_batch(tmp_path / "demo_compg.npz")
    assert images.shape == (40, 8, 8, 1) and images.dtype.name == "uint8" and list(labels) == [i % 10 for i in range(40)]
    pytest.importorskip("matplotlib")
    assert (tmp_path / "demo.png").stat().st_size > 10_000


def test_train_testbed_cli_rejects_unknown_networks(capsys):
    assert main(["train-testbed", "--only", "vae", "--out", "unused"]) == 2
    assert "unknown network" in capsys.readouterr().err
