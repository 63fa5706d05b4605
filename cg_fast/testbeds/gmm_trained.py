"""A TRAINED (imperfect) noisy classifier for the Gaussian-mixture testbed.

:class:`~cg_fast.testbeds.gmm.GMMClassifier` is the exact posterior p(y | x_t). Real guided sampling uses a
network fitted to noisy samples, whose error is unknown. Here a small MLP is trained exactly as
guided-diffusion trains its noisy classifier (y ~ w, x_0 ~ p(x | y), t ~ U{0..T-1},
x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps, cross-entropy), so the effect of model-fitting error on guidance can
be measured against the known answer (:func:`evaluate_against_exact`).

    gmm, sched, clf = default_gmm_classifier()          # the demo's mixture + the shipped weights
    ClassifierGuidance(clf, 1.0, policy=Full(), cache="drop")

The shipped weights (``weights/gmm_classifier.pt``, with a ``.json`` recording how they were made and their
quality at save time) are rebuilt by :func:`train_and_save_default` (``cg-fast train-testbed``).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..schedules import NoiseSchedule
from .gmm import GaussianMixture

__all__ = ["GMMClassifierConfig", "GMMTrainedClassifier", "train_gmm_classifier", "evaluate_against_exact",
           "save_gmm_classifier", "load_gmm_classifier", "default_gmm_classifier", "train_and_save_default",
           "DEFAULT_WEIGHTS", "DEFAULT_GMM", "DEFAULT_SCHEDULE", "DEFAULT_TRAINING", "EVAL_TS"]

WEIGHTS_DIR = Path(__file__).parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "gmm_classifier.pt"

# The GMM demo's mixture, GaussianMixture.random(num_classes=8, dim=8, std=0.3, seed=0), and its schedule.
DEFAULT_GMM: dict[str, Any] = {"num_classes": 8, "dim": 8, "std": 0.3, "radius": 1.0, "mixture_seed": 0,
                               "equal_weights": True}
DEFAULT_SCHEDULE: dict[str, Any] = {"name": "linear", "num_timesteps": 1000}
# Hyper-parameters of the shipped weights (a few seconds on one CPU thread).
DEFAULT_TRAINING: dict[str, Any] = {"steps": 3000, "batch": 256, "lr": 3e-3, "seed": 0, "hidden": 64}
EVAL_TS: tuple[int, ...] = (0, 100, 250, 500, 750, 999)
EVAL_N = 20_000       # samples per t for the recorded evaluation
EVAL_SEED = 12_345    # the recorded evaluation's seed (tests draw fresh samples with other seeds)
_FORMAT = 1


@dataclass(frozen=True)
class GMMClassifierConfig:
    """Everything needed to rebuild a :class:`GMMTrainedClassifier` (saved beside its weights)."""

    dim: int
    num_classes: int
    hidden: int = 64            # width of each hidden layer
    depth: int = 2              # number of hidden layers
    emb_dim: int = 16           # sinusoidal embedding of t / num_timesteps (sin and cos halves)
    max_freq: float = 32.0      # highest embedding frequency, in half-turns over the whole t range
    num_timesteps: int = 1000   # T_train: t is divided by it

    def __post_init__(self) -> None:
        for name in ("dim", "num_classes", "hidden", "depth", "emb_dim", "num_timesteps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"GMMClassifierConfig.{name} must be a positive integer, got {v!r}")
        if self.emb_dim % 2:
            raise ValueError(f"GMMClassifierConfig.emb_dim must be even (sin and cos halves), got {self.emb_dim}")
        if not self.max_freq >= 1:
            raise ValueError(f"GMMClassifierConfig.max_freq must be >= 1, got {self.max_freq!r}")

    @classmethod
    def from_dict(cls, d: Any) -> "GMMClassifierConfig":
        """Validate a saved config: unknown or missing keys raise with the expected ones."""
        if not isinstance(d, dict):
            raise TypeError(f"classifier config must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown classifier config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        missing = {"dim", "num_classes"} - set(d)
        if missing:
            raise ValueError(f"classifier config lacks {sorted(missing)}")
        return cls(**d)


class GMMTrainedClassifier(nn.Module):
    """``classifier(x, t) -> logits [B, K]``: an MLP on (x flattened, sinusoidal embedding of t / T).

    t are ORIGINAL training timesteps ([B] or a scalar). Capture-safe: the forward pass only uses the
    module's own tensors (no host syncs, no new CPU tensors, no randomness), as CUDA-graph capture needs;
    the tests run it on the meta device, where either would raise. Logits are returned in x's dtype.
    """

    def __init__(self, config: GMMClassifierConfig) -> None:
        super().__init__()
        self.config = config
        half = config.emb_dim // 2
        freqs = math.pi * torch.exp(torch.linspace(0.0, math.log(config.max_freq), half, dtype=torch.float64))
        self.register_buffer("freqs", freqs.float(), persistent=False)  # rebuilt from the config
        layers: list[nn.Module] = []
        width = config.dim + config.emb_dim
        for _ in range(config.depth):
            layers += [nn.Linear(width, config.hidden), nn.SiLU()]
            width = config.hidden
        layers.append(nn.Linear(width, config.num_classes))
        self.net = nn.Sequential(*layers)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != self.config.dim:  # static shape check: no host sync
            raise ValueError(f"x has {h.shape[1]} features per sample but the classifier was built for "
                             f"dimension {self.config.dim}")
        dtype = self.freqs.dtype
        u = t.reshape(-1, 1).to(dtype).expand(h.shape[0], 1) * (1.0 / self.config.num_timesteps)
        ang = u * self.freqs
        inp = torch.cat([h.to(dtype), torch.sin(ang), torch.cos(ang)], dim=1)
        return self.net(inp).to(x.dtype)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run CPU ops on one intra-op thread (restored after): for these tiny matrices threads only add
    synchronisation (and stall badly on a busy machine), and results no longer depend on the thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- training -----------------------------------------------------------------------------------------------
def _noisy_batch(gmm: GaussianMixture, ab_table: Tensor, n: int, gen: torch.Generator,
                 t: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(x_t float32 [n, d], t long [n], y long [n]) with fresh y, x_0, t (unless given) and eps from ``gen``."""
    y = gmm.sample_labels(n, generator=gen)
    x0 = gmm.sample(y, generator=gen).double()
    if t is None:
        tt = torch.randint(0, ab_table.shape[0], (n,), generator=gen)
    else:
        tt = torch.full((n,), int(t), dtype=torch.long)
    eps = torch.randn(n, gmm.dim, generator=gen, dtype=torch.float64)
    ab = ab_table[tt][:, None]
    return (ab.sqrt() * x0 + (1 - ab).sqrt() * eps).float(), tt, y


def train_gmm_classifier(gmm: GaussianMixture, schedule: NoiseSchedule, *,
                         steps: int = DEFAULT_TRAINING["steps"], batch: int = DEFAULT_TRAINING["batch"],
                         lr: float = DEFAULT_TRAINING["lr"], seed: int = 0,
                         hidden: int = DEFAULT_TRAINING["hidden"], progress: bool = False,
                         log: Callable[[str], None] | None = None) -> GMMTrainedClassifier:
    """Train a noisy classifier on fresh samples of ``gmm`` every step (infinite data); returns it in eval mode.

    Adam with a cosine learning-rate decay to 0; all randomness (initial weights included) comes from a
    private generator seeded by ``seed``, and the global RNG is left untouched. Runs on the CPU on one
    thread (the model is tiny; the process's thread count is restored after), so the result is bitwise
    reproducible for a given seed on a given machine and torch build, whatever the thread setting.
    ``log`` receives a line with the running loss ten times per run; ``progress`` shows a tqdm bar.
    """
    for name, v in (("steps", steps), ("batch", batch)):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    config = GMMClassifierConfig(dim=gmm.dim, num_classes=gmm.num_classes, hidden=hidden,
                                 num_timesteps=schedule.num_steps)
    with _one_thread():
        return _train(gmm, schedule, config, steps, batch, lr, seed, progress, log)


def _train(gmm: GaussianMixture, schedule: NoiseSchedule, config: GMMClassifierConfig, steps: int, batch: int,
           lr: float, seed: int, progress: bool, log: Callable[[str], None] | None) -> GMMTrainedClassifier:
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # initial weights from the seed, global RNG restored after
        torch.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=gen)))
        clf = GMMTrainedClassifier(config)
    ab_table = torch.from_numpy(schedule.alphas_cumprod.copy())
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / steps)))

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="train GMM classifier", unit="step")
    every = max(1, steps // 10)
    running = 0.0
    clf.train()
    for i in range(steps):
        x, t, y = _noisy_batch(gmm, ab_table, batch, gen)
        loss = F.cross_entropy(clf(x, t), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if bar is not None:
            bar.update(1)
        if (i + 1) % every == 0 or i + 1 == steps:
            n_avg = (i % every) + 1
            if log is not None:
                log(f"step {i + 1}/{steps}: loss {running / n_avg:.4f}")
            if bar is not None:
                bar.set_postfix(loss=f"{running / n_avg:.4f}")
            running = 0.0
    if bar is not None:
        bar.close()
    return clf.eval()


# -- evaluation against the exact posterior -------------------------------------------------------------------
def _input_dtype(clf: Callable) -> torch.dtype:
    """The dtype a module computes in (its first floating parameter or buffer); float32 otherwise."""
    if isinstance(clf, nn.Module):
        for p in list(clf.parameters()) + list(clf.buffers()):
            if p.is_floating_point():
                return p.dtype
    return torch.float32


def _device(clf: Callable) -> torch.device:
    if isinstance(clf, nn.Module):
        for p in list(clf.parameters()) + list(clf.buffers()):
            return p.device
    return torch.device("cpu")


def evaluate_against_exact(clf: Callable[[Tensor, Tensor], Tensor], gmm: GaussianMixture,
                           schedule: NoiseSchedule, ts: Sequence[int] = EVAL_TS, n: int = EVAL_N,
                           seed: int = EVAL_SEED) -> dict[str, Any]:
    """Compare ``clf`` with the exact noisy classifier on ``n`` fresh noisy samples per timestep.

    Returns ``{"n", "seed", "ts", "per_t": {str(t): row}, "mean_kl"}`` where each row holds:
    ``kl`` (mean KL(exact posterior || clf), nats) and its standard error ``kl_se``; ``acc_exact`` /
    ``acc_trained`` (argmax == the true label); ``ce_exact`` / ``ce_trained`` (cross-entropy of the true
    label, nats; ``ce_trained - ce_exact`` estimates the same KL); ``agreement`` (same argmax).
    The exact classifier compared with itself gives KL 0 and equal accuracies. JSON-ready (str keys).
    ``clf`` gets x in the dtype and on the device of its parameters (float32 on the CPU for plain callables).
    """
    if not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2, got {n!r}")
    ts = [int(t) for t in ts]
    bad = [t for t in ts if not 0 <= t < schedule.num_steps]
    if bad:
        raise ValueError(f"timesteps {bad} outside the schedule's range [0, {schedule.num_steps})")
    exact = gmm.classifier(schedule)
    gen = torch.Generator().manual_seed(seed)
    ab_table = torch.from_numpy(schedule.alphas_cumprod.copy())
    dtype, dev = _input_dtype(clf), _device(clf)
    per_t: dict[str, dict[str, float]] = {}
    with _one_thread():  # CPU evaluation independent of the thread count (and quick on a busy machine)
        for t in ts:
            x, tt, y = _noisy_batch(gmm, ab_table, n, gen, t=t)
            with torch.no_grad():
                lp = torch.log_softmax(exact(x.double(), tt).double(), dim=1)
                lq = torch.log_softmax(clf(x.to(dev, dtype), tt.to(dev)).double().cpu(), dim=1)
            if lq.shape != lp.shape:
                raise ValueError(f"classifier returned logits of shape {tuple(lq.shape)}; "
                                 f"expected {tuple(lp.shape)} (one per mixture component)")
            p = lp.exp()
            kl = torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(1)
            rows = torch.arange(n)
            per_t[str(t)] = {
                "kl": float(kl.mean()),
                "kl_se": float(kl.std() / math.sqrt(n)),
                "acc_exact": float((lp.argmax(1) == y).double().mean()),
                "acc_trained": float((lq.argmax(1) == y).double().mean()),
                "ce_exact": float(-lp[rows, y].mean()),
                "ce_trained": float(-lq[rows, y].mean()),
                "agreement": float((lp.argmax(1) == lq.argmax(1)).double().mean()),
            }
    mean_kl = sum(r["kl"] for r in per_t.values()) / max(1, len(per_t))
    return {"n": n, "seed": seed, "ts": ts, "per_t": per_t, "mean_kl": mean_kl}


# -- saving and loading ------------------------------------------------------------------------------------
def _atomic_write(path: Path, write: Callable[[Any], None], mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; these are shipped package data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_gmm_classifier(clf: GMMTrainedClassifier, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``path`` (``{"config", "state_dict"}``) and ``path.with_suffix(".json")`` (``meta`` + config).

    ``meta`` must be JSON-serialisable (train_and_save_default records the mixture, schedule, training
    hyper-parameters and evaluation). Both files are written atomically. Returns ``path``.
    """
    if not isinstance(clf, GMMTrainedClassifier):
        raise TypeError(f"expected a GMMTrainedClassifier, got {type(clf).__name__}")
    path = Path(path)
    state = {k: v.detach().cpu().float().clone() for k, v in clf.state_dict().items()}
    payload = {"format": _FORMAT, "config": asdict(clf.config), "state_dict": state}
    record = {"format": _FORMAT, "config": asdict(clf.config), "torch": torch.__version__, **meta}
    text = json.dumps(record, indent=2)  # fail on a non-serialisable meta before writing anything
    _atomic_write(path, lambda f: torch.save(payload, f), "wb")
    _atomic_write(path.with_suffix(".json"), lambda f: f.write(text + "\n"), "w")
    return path


def load_gmm_classifier(path: str | Path | None = None) -> GMMTrainedClassifier:
    """Rebuild a saved classifier (default: the shipped weights) in eval mode, on the CPU."""
    path = DEFAULT_WEIGHTS if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no trained GMM classifier at {path}; create it with `cg-fast train-testbed` "
                                "(cg_fast.testbeds.gmm_trained.train_and_save_default) or pass the right path")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a torch file, or pickled objects beyond tensors and plain containers
        raise ValueError(f"{path} is not a saved GMM classifier (torch.load failed: {e}); "
                         "re-create it with `cg-fast train-testbed`") from e
    if not isinstance(payload, dict) or not {"config", "state_dict"} <= set(payload):
        raise ValueError(f"{path} is not a saved GMM classifier: expected a dict with 'config' and "
                         "'state_dict'; re-create it with `cg-fast train-testbed`")
    try:
        config = GMMClassifierConfig.from_dict(payload["config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad classifier config: {e}") from e
    clf = GMMTrainedClassifier(config)
    try:
        clf.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: the weights do not match their config {asdict(config)} ({e}); "
                         "the file is corrupt or was edited: re-create it with `cg-fast train-testbed`") from e
    return clf.eval()


def _demo_mixture(p: dict[str, Any]) -> GaussianMixture:
    return GaussianMixture.random(num_classes=p["num_classes"], dim=p["dim"], radius=p["radius"], std=p["std"],
                                  seed=p["mixture_seed"], equal_weights=p["equal_weights"])


def default_gmm_classifier(path: str | Path | None = None
                           ) -> tuple[GaussianMixture, NoiseSchedule, GMMTrainedClassifier]:
    """The demo's mixture and schedule, and the shipped trained classifier for them.

    Checks that the weights' ``.json`` records that same mixture (parameters and means) and schedule.
    """
    clf = load_gmm_classifier(path)
    pt = DEFAULT_WEIGHTS if path is None else Path(path)
    js = pt.with_suffix(".json")
    if not js.is_file():
        raise FileNotFoundError(f"{js} (the record of which mixture {pt.name} was trained on) is missing; "
                                "re-create both files with `cg-fast train-testbed`")
    record = json.loads(js.read_text())
    rec_gmm = {k: v for k, v in record.get("gmm", {}).items() if k in DEFAULT_GMM}
    if rec_gmm != DEFAULT_GMM or record.get("schedule") != DEFAULT_SCHEDULE:
        raise ValueError(f"{pt} was trained for mixture {rec_gmm} and schedule {record.get('schedule')}, "
                         f"not the demo's {DEFAULT_GMM} and {DEFAULT_SCHEDULE}; "
                         "retrain with `cg-fast train-testbed`")
    gmm = _demo_mixture(DEFAULT_GMM)
    means = torch.tensor(record["gmm"].get("means", []), dtype=torch.float64)
    if means.shape != gmm.means.shape or not torch.allclose(means, gmm.means, rtol=0, atol=1e-9):
        raise ValueError(f"the mixture recorded in {js} has different means from "
                         f"GaussianMixture.random({DEFAULT_GMM}) (did its sampling change?); "
                         "retrain with `cg-fast train-testbed`")
    if (clf.config.dim, clf.config.num_classes) != (gmm.dim, gmm.num_classes):
        raise ValueError(f"{pt} classifies {clf.config.num_classes} classes in dimension {clf.config.dim}, "
                         f"but the mixture has {gmm.num_classes} in dimension {gmm.dim}; retrain with "
                         "`cg-fast train-testbed`")
    sched = NoiseSchedule.named(DEFAULT_SCHEDULE["name"], DEFAULT_SCHEDULE["num_timesteps"])
    return gmm, sched, clf


def train_and_save_default(out_dir: str | Path | None = None, progress: bool = False,
                           log: Callable[[str], None] | None = print) -> Path:
    """Retrain the shipped classifier with :data:`DEFAULT_TRAINING` and write ``gmm_classifier.pt/.json``.

    ``out_dir`` defaults to the package's weights directory (overwriting the shipped files). The ``.json``
    records the mixture, schedule, hyper-parameters, seed, torch version, training time (one thread) and
    :func:`evaluate_against_exact` at save time. Returns the ``.pt`` path.
    """
    out = (WEIGHTS_DIR if out_dir is None else Path(out_dir)) / DEFAULT_WEIGHTS.name
    gmm = _demo_mixture(DEFAULT_GMM)
    sched = NoiseSchedule.named(DEFAULT_SCHEDULE["name"], DEFAULT_SCHEDULE["num_timesteps"])
    hp = dict(DEFAULT_TRAINING)
    start = time.perf_counter()
    clf = train_gmm_classifier(gmm, sched, progress=progress, log=log, **hp)
    seconds = time.perf_counter() - start
    evaluation = evaluate_against_exact(clf, gmm, sched)
    meta = {
        "gmm": {**DEFAULT_GMM, "means": gmm.means.tolist(), "weights": gmm.weights.tolist()},
        "schedule": dict(DEFAULT_SCHEDULE),
        "training": {**hp, "optimizer": "adam", "lr_schedule": "cosine to 0", "data": "fresh samples every step",
                     "threads": 1, "seconds": round(seconds, 2)},
        "evaluation": evaluation,
    }
    save_gmm_classifier(clf, out, meta)
    if log is not None:
        log(f"trained in {seconds:.1f} s; wrote {out} and {out.with_suffix('.json').name}")
        for t, r in evaluation["per_t"].items():
            log(f"  t={t:>4}: KL {r['kl']:.4f}  acc trained {r['acc_trained']:.3f} / exact {r['acc_exact']:.3f}")
    return out
