"""A trained image testbed that ships with the package: handwritten digits (8x8, 10 classes).

    tb = cg_fast.testbeds.digits.load_testbed()    # the shipped weights; no training, no download
    sampler = tb.sampler("uncond", steps="250")   # an unconditional UNet ...
    guid = ClassifierGuidance(tb.guide, scale=2.0, policy=Compress(rate=5, k=1), cache="compress")
    out = sampler.sample(tb.shape(500), y=labels, guidance=guid, off_classifier=tb.judge)
    tb.score(out.x, labels)                        # FD, precision/recall, judge accuracies, IS

Five networks (cg_fast.testbeds.digits_nets), trained by ``cg-fast train-testbed``
(cg_fast.testbeds.digits_train) on scikit-learn's digits (cg_fast.testbeds.digits_data):

    cond       class-conditional UNet (null label 10 for CFG)
    uncond     unconditional UNet (for classifier guidance)
    guide      noisy classifier trained on half A of the data: the one that guides
    judge      the same architecture trained on half B with another seed: the one that judges
    judge_mlp  a noisy MLP trained on half B: a judge of a different architecture

Scores (``DigitsTestbed.score``) are computed at t = 0 with the judge's 64-d feature layer: Fréchet
distance and k-NN precision/recall to the 1,797 real digits, the judges' accuracy on the intended labels,
and an Inception-score-style score from the judge's logits.
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ..schedules import NoiseSchedule
from .digits_data import SPLIT_SEED, load_digits_data
from .digits_nets import build_net

__all__ = ["DigitsTestbed", "load_testbed", "WEIGHTS_DIR", "CALIBRATIONS_DIR", "NETWORKS", "save_net", "load_net"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
# calibrated policies of the shipped weights (cg_fast.calibration; keyed by a hash of the networks' weights)
CALIBRATIONS_DIR = WEIGHTS_DIR / "calibrations"
CALIBRATION_BATCH, CALIBRATION_SEED = 64, 1000
NETWORKS = ("cond", "uncond", "guide", "judge", "judge_mlp")


def save_net(net: nn.Module, path: Path) -> None:
    """``{"config": NetConfig as dict, "state_dict": ...}``, written atomically."""
    from dataclasses import asdict

    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    torch.save({"config": asdict(net.config), "state_dict": net.state_dict()}, tmp)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are package data
    os.replace(tmp, path)


def load_net(path: Path) -> nn.Module:
    """Rebuild a testbed network from :func:`save_net`'s file (eval mode, no gradients)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no testbed weights at {path}: run `cg-fast train-testbed --out {path.parent}` "
                                "to train them (minutes on a CPU), or use the shipped ones (load_testbed())")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path} is not a cg_fast testbed network file (expected keys 'config', 'state_dict')")
    net = build_net(blob["config"])
    net.load_state_dict(blob["state_dict"])
    return net.eval().requires_grad_(False)


def testbed_header() -> dict[str, Any]:
    """What digits.json records besides the networks: data, split and the versions that trained them."""
    return {"data": "sklearn.datasets.load_digits (8x8, values / 8 - 1)", "split_seed": SPLIT_SEED,
            "schedule": "linear 1000", "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def read_meta(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_meta(path: Path, meta: dict) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


@dataclass
class DigitsTestbed:
    """The five networks, their training schedule and metadata (digits.json), and the scoring."""

    schedule: NoiseSchedule
    nets: dict[str, nn.Module]
    meta: dict = field(default_factory=dict)

    cond = property(lambda self: self.nets["cond"])
    uncond = property(lambda self: self.nets["uncond"])
    guide = property(lambda self: self.nets["guide"])
    judge = property(lambda self: self.nets["judge"])
    judge_mlp = property(lambda self: self.nets["judge_mlp"])
    num_classes = 10

    @staticmethod
    def shape(n: int) -> tuple[int, int, int, int]:
        """The sample shape of n digits: [n, 1, 8, 8]."""
        return (n, 1, 8, 8)

    @staticmethod
    def labels(n: int) -> Tensor:
        """n labels cycling through 0..9 (equal class counts when n is a multiple of 10)."""
        return torch.arange(n) % 10

    def sampler(self, model: str = "uncond", steps: str | int = "250", method: str = "ddpm", **kw: Any):
        """A :class:`cg_fast.Sampler` for ``"uncond"`` (classifier guidance) or ``"cond"`` (CFG) with the
        testbed's conventions: linear schedule, eps prediction, fixed-large variance, clipping to [-1, 1]."""
        from ..sampler import Sampler

        if model not in ("uncond", "cond"):
            raise ValueError(f"model must be 'uncond' or 'cond', got {model!r}")
        return Sampler(self.nets[model], self.schedule, steps, method, class_cond=(model == "cond"),
                       clip_denoised=True, num_classes=10, **kw)

    def calibrated(self, sampler: Any, guidance: Any, budget: int, folder: str | Path | None = None,
                   allow_calibration: bool = False) -> Any:
        """The calibrated policy (issue 19) of ``guidance`` on ``sampler`` with ``budget`` guided steps, from
        ``folder`` (default: the calibrations shipped with the weights, CALIBRATIONS_DIR). The key holds a hash
        of the networks' weights, so retrained weights never get the shipped calibrations. Without a saved one:
        FileNotFoundError, or (``allow_calibration``) one full-guidance run of 64 samples, saved to ``folder``."""
        from ..calibration import calibrated_policy

        return calibrated_policy(sampler, guidance, budget, CALIBRATIONS_DIR if folder is None else folder,
                                 allow_calibration=allow_calibration, sample_shape=self.shape(1)[1:],
                                 batch=CALIBRATION_BATCH, seed=CALIBRATION_SEED, num_classes=self.num_classes)

    # -- scoring ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, x: Tensor, judge: str = "judge", batch: int = 2000) -> Tensor:
        """The judge's 64-d features of clean images x [n, 1, 8, 8] (t = 0), float64."""
        net = self.nets[judge]
        parts = [net.features(c, torch.zeros(c.shape[0], dtype=torch.long)) for c in x.split(batch)]
        return torch.cat(parts).double()

    @cached_property
    def reference(self) -> tuple[Tensor, Tensor]:
        """(features, labels) of the 1,797 real digits under the judge."""
        data = load_digits_data()
        return self.features(data.x), data.y

    def score(self, x: Tensor, y: Tensor, k: int = 3) -> dict[str, float]:
        """Quality of samples x [n, 1, 8, 8] meant to be of classes y [n].

        fd:            Fréchet distance to the real digits in the judge's feature space (lower is better).
        fd_class:      the same per class, averaged (sees samples of the wrong class).
        precision, recall: k-NN manifold precision/recall (Kynkäänniemi et al. 2019) against the real digits.
        judge_acc:     accuracy of the judge (same architecture as the guide, other data half) on y.
        mlp_acc:       accuracy of the MLP judge (another architecture) on y.
        is_score:      exp E KL(p(y|x) || p(y)) under the judge (10 is the maximum).
        """
        from ..eval import frechet_distance, inception_score, precision_recall

        x = x.detach().float().cpu()
        y = torch.as_tensor(y).cpu()
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digits samples must be [n, 1, 8, 8], got {tuple(x.shape)}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("samples contain NaN or inf")
        ref, ref_y = self.reference
        feats = self.features(x)
        zero = torch.zeros(x.shape[0], dtype=torch.long)
        with torch.no_grad():
            logits = self.judge(x, zero)
            mlp_logits = self.judge_mlp(x, zero)
        per_class = [frechet_distance(feats[y == c], ref[ref_y == c]) for c in torch.unique(y).tolist()]
        pr = precision_recall(ref, feats, k=k)
        is_mean, _ = inception_score(logits)
        return {
            "fd": float(frechet_distance(feats, ref)),
            "fd_class": float(sum(per_class) / len(per_class)),
            "precision": float(pr.precision),
            "recall": float(pr.recall),
            "judge_acc": float((logits.argmax(1) == y).float().mean()),
            "mlp_acc": float((mlp_logits.argmax(1) == y).float().mean()),
            "is_score": float(is_mean),
        }


def load_testbed(path: str | Path | None = None, networks: tuple[str, ...] = NETWORKS) -> DigitsTestbed:
    """Load the testbed's networks from ``path`` (default: the weights shipped inside the package)."""
    root = WEIGHTS_DIR if path is None else Path(path)
    meta_path = root / "digits.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"no digits testbed at {root} (digits.json missing): run `cg-fast train-testbed "
                                f"--out {root}`")
    unknown = [n for n in networks if n not in NETWORKS]
    if unknown:
        raise ValueError(f"unknown testbed network(s) {unknown}: choose from {list(NETWORKS)}")
    nets = {name: load_net(root / f"digits_{name}.pt") for name in networks}
    return DigitsTestbed(NoiseSchedule.linear(1000), nets, read_meta(meta_path))
