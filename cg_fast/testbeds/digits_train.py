"""Training of the digits testbed (``cg-fast train-testbed``): two UNets, two same-architecture noisy
classifiers on disjoint data halves, and a noisy MLP judge. Minutes on 2 CPU cores, no downloads.

Both objectives are those of the public checkpoints' code, on the linear 1000-step schedule:

    denoiser    E || eps - eps_theta(sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps, t, y) ||^2, t ~ U{0..T-1};
                the conditional UNet sees the null label with probability p_uncond (CFG training);
                the weights kept are an exponential moving average (ADM's ema_rate, here 0.999).
    classifier  cross-entropy of log p_phi(y | x_t, t) on x_t drawn the same way (guided-diffusion's
                noisy classifier), with one-pixel random shifts against over-fitting a 900-image half.

Every random number comes from generators seeded by the recipe, so a rerun reproduces the weights (up to
floating-point summation order, which depends on the thread count).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..schedules import NoiseSchedule
from .digits import NETWORKS, load_testbed, read_meta, save_net, testbed_header, write_meta
from .digits_data import DigitsData, load_digits_data
from .digits_nets import DigitsClassifier, DigitsMLPJudge, DigitsUNet

__all__ = ["TrainSpec", "RECIPE", "train_denoiser", "train_classifier", "classifier_accuracy", "denoiser_loss",
           "record_checks", "train_testbed"]


@dataclass(frozen=True)
class TrainSpec:
    """One network of the testbed: what it is, what data it sees and how long it trains."""

    kind: str                  # "unet" | "classifier" | "mlp_judge"
    data: str                  # "all" | "half_a" | "half_b"
    seed: int                  # weight init and every draw of training
    steps: int                 # optimiser steps
    width: int
    class_cond: bool = True    # unet only
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.0
    p_uncond: float = 0.1      # unet: null-label rate (CFG)
    ema: float = 0.999         # unet: EMA rate of the kept weights
    augment: bool = False      # classifiers: random one-pixel shifts


# The recipe of the shipped weights (cg_fast/testbeds/weights/digits_*.pt).
RECIPE: dict[str, TrainSpec] = {
    "cond": TrainSpec("unet", "all", seed=1, steps=5000, width=16, class_cond=True),
    "uncond": TrainSpec("unet", "all", seed=2, steps=5000, width=16, class_cond=False, p_uncond=0.0),
    "guide": TrainSpec("classifier", "half_a", seed=3, steps=3000, width=16, lr=1e-3, weight_decay=0.05,
                       augment=True),
    "judge": TrainSpec("classifier", "half_b", seed=4, steps=3000, width=16, lr=1e-3, weight_decay=0.05,
                       augment=True),
    "judge_mlp": TrainSpec("mlp_judge", "half_b", seed=5, steps=3000, width=256, lr=1e-3, weight_decay=0.05,
                           augment=True),
}


def _lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to 10% of the base rate."""
    if step < warmup:
        return base * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))


def _noisy(x0: Tensor, schedule: NoiseSchedule, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """x_t = sqrt(ab_t) x_0 + sqrt(1 - ab_t) eps with t ~ U{0..T-1}; returns (x_t, t, eps)."""
    ab = torch.from_numpy(schedule.alphas_cumprod).float()
    t = torch.randint(0, schedule.num_steps, (x0.shape[0],), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = ab[t].view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


def _shift(x: Tensor, gen: torch.Generator) -> Tensor:
    """Each image shifted by one of {-1, 0, 1} pixels in each direction (zero = background, -1 in [-1, 1])."""
    pad = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dx, dy = torch.randint(0, 3, (2, x.shape[0]), generator=gen)
    h, w = x.shape[-2:]
    rows = (dy[:, None] + torch.arange(h)[None])[:, None, :, None].expand(-1, x.shape[1], -1, w + 2)
    pad = pad.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None])[:, None, None, :].expand(-1, x.shape[1], h, -1)
    return pad.gather(3, cols)


def _progress(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step")


def _fit(model: nn.Module, spec: TrainSpec, batch_loss: Callable[[torch.Generator], Tensor], desc: str,
         progress: bool, ema: nn.Module | None = None) -> dict:
    """AdamW on ``batch_loss(gen)`` for ``spec.steps`` steps (warm-up + cosine learning rate), updating the
    EMA copy ``ema`` after each step; returns {final_loss (mean of the last 200 steps), seconds}."""
    gen = torch.Generator().manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
    model.train()
    losses: list[float] = []
    bar = _progress(spec.steps, progress, desc)
    start = time.perf_counter()
    for step in range(spec.steps):
        loss = batch_loss(gen)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, spec.steps, spec.lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():  # EMA of the weights (ADM keeps and samples with these)
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1.0 - spec.ema)
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    if bar is not None:
        bar.close()
    tail = losses[-200:]
    return {"final_loss": sum(tail) / len(tail), "seconds": time.perf_counter() - start}


def train_denoiser(model: DigitsUNet, x: Tensor, y: Tensor, schedule: NoiseSchedule, spec: TrainSpec,
                   progress: bool = False) -> tuple[DigitsUNet, dict]:
    """Train ``model`` (eps prediction) on images ``x`` [n, C, H, W] in [-1, 1]; returns the EMA copy (eval
    mode) and a log {final_loss (mean of the last 200 steps), seconds}."""
    ema = copy.deepcopy(model).eval().requires_grad_(False)

    def batch_loss(gen: torch.Generator) -> Tensor:
        idx = torch.randint(0, x.shape[0], (spec.batch,), generator=gen)
        xt, t, eps = _noisy(x[idx], schedule, gen)
        labels = None
        if model.class_cond:
            labels = y[idx].clone()
            drop = torch.rand(spec.batch, generator=gen) < spec.p_uncond
            labels[drop] = model.num_classes  # the null label
        return F.mse_loss(model(xt, t, labels), eps)

    return ema, _fit(model, spec, batch_loss, "denoiser", progress, ema)


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, schedule: NoiseSchedule, spec: TrainSpec,
                     progress: bool = False) -> tuple[nn.Module, dict]:
    """Train a noisy classifier ``model(x_t, t)`` on (x, y); returns it in eval mode and a log."""

    def batch_loss(gen: torch.Generator) -> Tensor:
        idx = torch.randint(0, x.shape[0], (spec.batch,), generator=gen)
        x0 = _shift(x[idx], gen) if spec.augment else x[idx]
        xt, t, _ = _noisy(x0, schedule, gen)
        return F.cross_entropy(model(xt, t), y[idx])

    info = _fit(model, spec, batch_loss, "classifier", progress)
    return model.eval(), info


def _noised(x: Tensor, schedule: NoiseSchedule, timesteps: tuple[int, ...], seed: int):
    """For each t: (t as a [n] long tensor, x_t, eps) with x_t = sqrt(ab_t) x + sqrt(1 - ab_t) eps, eps from
    one generator seeded by ``seed`` (the same draws for every network evaluated)."""
    gen = torch.Generator().manual_seed(seed)
    ab = torch.from_numpy(schedule.alphas_cumprod).float()
    for t in timesteps:
        eps = torch.randn(x.shape, generator=gen)
        yield torch.full((x.shape[0],), t, dtype=torch.long), ab[t].sqrt() * x + (1 - ab[t]).sqrt() * eps, eps


@torch.no_grad()
def classifier_accuracy(clf: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, schedule: NoiseSchedule,
                        timesteps: tuple[int, ...] = (0, 100, 250, 500, 750), seed: int = 0) -> dict[str, float]:
    """Accuracy of a noisy classifier on (x, y) noised to each timestep t (noise from ``seed``)."""
    out = {}
    for tt, xt, _ in _noised(x, schedule, timesteps, seed):
        out[str(int(tt[0]))] = float((clf(xt, tt).argmax(1) == y).float().mean())
    return out


@torch.no_grad()
def denoiser_loss(model: nn.Module, x: Tensor, y: Tensor | None, schedule: NoiseSchedule,
                  timesteps: tuple[int, ...] = (10, 100, 250, 500, 750, 990), seed: int = 0) -> dict[str, float]:
    """The training objective ||eps - eps_theta(x_t, t, y)||^2 on (x, y) at fixed timesteps (noise from
    ``seed``); y = None for an unconditional model."""
    out = {}
    for tt, xt, eps in _noised(x, schedule, timesteps, seed):
        pred = model(xt, tt, y) if y is not None else model(xt, tt)
        out[str(int(tt[0]))] = float(F.mse_loss(pred, eps))
    return out


def record_checks(root: Path, log: Callable[[str], None] = print) -> dict:
    """Measure what the tests check against (``checks`` in digits.json): every network's held-out metric
    at fixed seeds, and the judge's accuracy on 200 unguided DDIM-25 samples of the conditional UNet."""
    root = Path(root)
    tb = load_testbed(root)
    data = load_digits_data()
    schedule = tb.schedule
    checks: dict = {}
    for name, net in tb.nets.items():
        if name in ("cond", "uncond"):
            checks[name] = {"loss": denoiser_loss(net, data.x, data.y if name == "cond" else None, schedule)}
        else:
            held = "half_a" if tb.meta["networks"][name]["spec"]["data"] == "half_b" else "half_b"
            checks[name] = {"held_out_accuracy": classifier_accuracy(net, *data.subset(held), schedule)}
    y = tb.labels(200)
    x = tb.sampler("cond", "ddim25", "ddim").sample(tb.shape(200), y=y, generator=torch.Generator().manual_seed(0)).x
    checks["cond"]["ddim25_judge_acc"] = tb.score(x, y)["judge_acc"]
    meta = read_meta(root / "digits.json")
    meta["checks"] = checks
    write_meta(root / "digits.json", meta)
    log(f"checks recorded in {root / 'digits.json'}: cond DDIM-25 samples, judge accuracy "
        f"{checks['cond']['ddim25_judge_acc']:.3f}")
    return checks


def _build(spec: TrainSpec, data: DigitsData) -> nn.Module:
    torch.manual_seed(spec.seed)  # weight initialisation
    if spec.kind == "unet":
        return DigitsUNet(spec.width, data.num_classes, spec.class_cond)
    if spec.kind == "classifier":
        return DigitsClassifier(spec.width, data.num_classes)
    if spec.kind == "mlp_judge":
        return DigitsMLPJudge(spec.width, data.num_classes)
    raise ValueError(f"unknown network kind {spec.kind!r}")


def train_testbed(out_dir: Path, recipe: dict[str, TrainSpec] | None = None, only: list[str] | None = None,
                  progress: bool = False, log: Callable[[str], None] = print) -> dict:
    """Train the testbed's networks and write ``digits_<name>.pt`` and ``digits.json`` into ``out_dir``.

    ``only``: train these names of the recipe (the others' entries in an existing digits.json are kept).
    Returns the metadata written to digits.json (recipe, training logs, held-out accuracies).
    """
    recipe = dict(RECIPE if recipe is None else recipe)
    names = list(recipe) if only is None else only
    unknown = [n for n in names if n not in recipe]
    if unknown:
        raise ValueError(f"unknown testbed network(s) {unknown}: choose from {list(recipe)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = load_digits_data()
    schedule = NoiseSchedule.linear(1000)
    meta = read_meta(out_dir / "digits.json") if (out_dir / "digits.json").exists() else {}
    meta.setdefault("networks", {})
    meta.update(testbed_header())
    for name in names:
        spec = recipe[name]
        xs, ys = data.subset(spec.data)
        log(f"training {name}: {spec.kind} on {spec.data} ({len(ys)} images), {spec.steps} steps")
        net = _build(spec, data)
        if spec.kind == "unet":
            net, info = train_denoiser(net, xs, ys, schedule, spec, progress)
        else:
            net, info = train_classifier(net, xs, ys, schedule, spec, progress)
            held_out = {"half_a": "half_b", "half_b": "half_a"}.get(spec.data)
            if held_out is not None:
                hx, hy = data.subset(held_out)
                info["held_out"] = held_out
                info["held_out_accuracy"] = classifier_accuracy(net, hx, hy, schedule)
        info["parameters"] = sum(p.numel() for p in net.parameters())
        save_net(net, out_dir / f"digits_{name}.pt")
        meta["networks"][name] = {"spec": asdict(spec), "config": asdict(net.config), **info}
        write_meta(out_dir / "digits.json", meta)  # after every network: nothing lost on interruption
        log(f"  {name}: loss {info['final_loss']:.4f}, {info['seconds']:.0f} s"
            + (f", held-out accuracy {info['held_out_accuracy']}" if "held_out_accuracy" in info else ""))
    if all((out_dir / f"digits_{n}.pt").exists() for n in NETWORKS):
        meta["checks"] = record_checks(out_dir, log)
    return meta
