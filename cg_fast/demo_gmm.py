"""The built-in default job: guidance policies compared on the exact Gaussian-mixture testbed.

An unconditional exact eps model guided by the exact noisy classifier at scale 1 samples p(x | y)
exactly (up to discretisation), so every policy can be scored against the known answer: sliced
Wasserstein-2 to exact samples of p(x | y) (per class) and accuracy under the exact posterior p(y | x_0).
Each configuration runs with several seeds; the table reports mean ± std.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .guidance import ClassifierGuidance, Compress, EarlyStop, Full, Policy, UniformSkip
from .eval.sliced import conditional_sliced_wasserstein
from .runs import RunError, atomic_write_json, check_writable, new_results, resume_or_refuse
from .sampler import Sampler
from .schedules import NoiseSchedule
from .testbeds.gmm import GaussianMixture

__all__ = ["DemoConfig", "DEMO_RUNS", "check_config", "run_demo", "format_table", "plot_demo"]


@dataclass
class DemoConfig:
    """Run configuration, saved with the results."""

    num_classes: int = 8        # mixture components = classes
    dim: int = 8                # data dimension
    std: float = 0.3            # per-class isotropic std (means on the unit sphere)
    num_samples: int = 4000     # samples per run (equal class counts)
    steps: str = "250"          # ADM respacing of the 1000-step linear schedule
    method: str = "ddpm"        # ddpm | ddim
    scale: float = 1.0          # classifier scale s (1 = exact conditional)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    mixture_seed: int = 0


# name -> (policy, cache, extra kwargs); "none" is the unguided control
DEMO_RUNS: dict[str, tuple[Policy | None, str, dict]] = {
    "full": (Full(), "drop", {}),
    "compg k=1": (Compress(rate=5, k=1), "compress", {}),
    "compg k=5": (Compress(rate=5, k=5), "compress", {}),
    "early stop": (EarlyStop(0.2), "drop", {}),
    "uniform skip": (UniformSkip(rate=5), "drop", {}),
    "reuse k=1": (Compress(rate=5, k=1), "reuse", {}),
    "momentum k=1": (Compress(rate=5, k=1), "momentum", {"beta": 0.5, "decay": 1.0}),
    "unguided": (None, "drop", {}),
}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


KIND = "cg_fast demo (gmm)"  # the results file's kind: a digits demo file is never resumed as a GMM one


def check_config(cfg: DemoConfig) -> None:
    """Refuse, before any sampling, settings the demo cannot run (ValueError saying which and why)."""
    if cfg.num_classes < 2 or cfg.dim < 1 or not cfg.std > 0:
        raise ValueError(f"the mixture needs num_classes >= 2, dim >= 1 and std > 0; got {cfg.num_classes}, "
                         f"{cfg.dim}, {cfg.std}")
    if cfg.num_samples < 2 * cfg.num_classes:
        raise ValueError(f"samples per run must be at least {2 * cfg.num_classes} (2 per class, for the per-class "
                         f"sliced Wasserstein distance); got {cfg.num_samples}")
    if not cfg.seeds:
        raise ValueError("give at least one seed")


def run_demo(cfg: DemoConfig = DemoConfig(), runs: dict | None = None, out: Path | None = None,
             log: Callable[[str], None] = print, progress: bool = False,
             keep_samples: dict | None = None) -> dict:
    """Run every configuration for every seed; returns (and, with ``out``, saves after each run) results.

    Results are written atomically after every (configuration, seed), so an interrupted demo keeps what
    it finished; a rerun with the same ``out`` and configuration skips the runs already there, and a rerun
    with another configuration is refused before sampling (:class:`cg_fast.runs.RunError`; see cg_fast.runs).
    ``keep_samples``: a dict that receives the first seed's samples per configuration (for pictures).
    """
    runs = DEMO_RUNS if runs is None else runs
    check_config(cfg)
    if out is not None:
        check_writable(out, "results file")
    results: dict = resume_or_refuse(out, asdict(cfg), KIND, log) or {**new_results(asdict(cfg), KIND),
                                                                      "reference": {}}
    if not isinstance(results.setdefault("reference", {}), dict):
        raise RunError(f"{out} has no valid 'reference' section; move it aside or delete it")
    sched = NoiseSchedule.linear(1000)
    gmm = GaussianMixture.random(cfg.num_classes, cfg.dim, std=cfg.std, seed=cfg.mixture_seed)
    y = torch.arange(cfg.num_samples) % cfg.num_classes
    sampler = Sampler(gmm.eps_model(sched), sched, cfg.steps, cfg.method, class_cond=False,
                      clip_denoised=False)
    clf = gmm.classifier(sched)

    # exact references per seed, and the noise floor (two independent exact sets)
    refs = {}
    if keep_samples is not None:
        keep_samples["_labels"], keep_samples["_gmm"] = y, gmm
    for seed in cfg.seeds:
        g = torch.Generator().manual_seed(10_000 + seed)
        refs[seed] = gmm.sample(y, generator=g)
        if str(seed) not in results["reference"]:
            other = gmm.sample(y, generator=g)
            results["reference"][str(seed)] = {
                "sw_floor": conditional_sliced_wasserstein(other, y, refs[seed], y),
                "accuracy": gmm.posterior_accuracy(refs[seed], y),
            }

    for name, (policy, cache, extra) in runs.items():
        per_seed = results["runs"].setdefault(name, {})
        if not isinstance(per_seed, dict):
            raise RunError(f"{out}: the runs of {name!r} are not a record per seed; move the file aside or delete it")
        for seed in cfg.seeds:
            if str(seed) in per_seed:
                continue
            guid = None if policy is None else ClassifierGuidance(clf, cfg.scale, policy=policy, cache=cache,
                                                                  **extra)
            res = sampler.sample((cfg.num_samples, cfg.dim), y=y, guidance=guid, progress=progress,
                                 generator=torch.Generator().manual_seed(seed))
            if keep_samples is not None and seed == cfg.seeds[0]:
                keep_samples[name] = res.x
            per_seed[str(seed)] = {
                "sw": conditional_sliced_wasserstein(res.x, y, refs[seed], y),
                "accuracy": gmm.posterior_accuracy(res.x, y),
                **{k: v for k, v in res.stats.summary().items() if not k.startswith(("on_", "off_"))},
            }
            if out is not None:
                atomic_write_json(out, results)
        if keep_samples is not None and "exact p(x|y)" not in keep_samples:
            keep_samples["exact p(x|y)"] = refs[cfg.seeds[0]]
        log(f"  {name}: done")
    return results


def format_table(results: dict) -> str:
    """A plain-text table: mean ± std over seeds of quality, exact counts, wall time."""
    head = f"{'policy':<14} {'guided':>6} {'denoiser':>8} {'clf grads':>9} {'time s':>7} " \
           f"{'sliced W2 (lower better)':>26} {'posterior acc':>16}"
    lines = [head, "-" * len(head)]
    ref = results["reference"].values()
    floor = _mean_std([r["sw_floor"] for r in ref])
    acc = _mean_std([r["accuracy"] for r in ref])
    lines.append(f"{'exact p(x|y)':<14} {'':>6} {'':>8} {'':>9} {'':>7} "
                 f"{floor[0]:>17.4f} ± {floor[1]:.4f} {acc[0]:>9.4f} ± {acc[1]:.4f}")
    for name, per_seed in results["runs"].items():
        rows = list(per_seed.values())
        sw, ac = _mean_std([r["sw"] for r in rows]), _mean_std([r["accuracy"] for r in rows])
        tm = statistics.fmean(r["wall_time"] for r in rows)
        r0 = rows[0]
        lines.append(f"{name:<14} {r0['guided_steps']:>6} {r0['denoiser_passes']:>8} {r0['classifier_grads']:>9} "
                     f"{tm:>7.2f} {sw[0]:>17.4f} ± {sw[1]:.4f} {ac[0]:>9.4f} ± {ac[1]:.4f}")
    return "\n".join(lines)


def plot_demo(results: dict, samples: dict, path: Path) -> Path:
    """Two panels: quality against classifier gradients (mean ± std over seeds), and samples projected on the
    plane of the two leading principal directions of the class means, coloured by label."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, *grid) = plt.subplots(1, 5, figsize=(20, 4.2), gridspec_kw={"width_ratios": [1.6, 1, 1, 1, 1]})
    floor = _mean_std([r["sw_floor"] for r in results["reference"].values()])
    ax.axhspan(floor[0] - floor[1], floor[0] + floor[1], color="0.85", label="exact noise floor")
    for name, per_seed in results["runs"].items():
        rows = list(per_seed.values())
        sw = _mean_std([r["sw"] for r in rows])
        ax.errorbar(rows[0]["classifier_grads"], sw[0], yerr=sw[1], fmt="o", capsize=3)
        ax.annotate(name, (rows[0]["classifier_grads"], sw[0]), textcoords="offset points", xytext=(5, 4),
                    fontsize=8)
    ax.set_xlabel("classifier gradients (forward + backward)")
    ax.set_ylabel("sliced W2 to exact p(x|y)  (lower is better)")
    ax.set_yscale("log")
    ax.set_title("quality vs guidance cost")
    ax.legend(loc="upper right", fontsize=8)

    gmm, y = samples.get("_gmm"), samples.get("_labels")
    means = gmm.means - gmm.means.mean(0)
    basis = torch.linalg.svd(means, full_matrices=False).Vh[:2].T.float()  # d x 2
    for axis, name in zip(grid, ["exact p(x|y)", "full", "compg k=1", "early stop"]):
        if name in samples:
            p = samples[name].float() @ basis
            axis.scatter(p[:, 0], p[:, 1], c=y, s=2, cmap="tab10", alpha=0.6)
        axis.set_title(name)
        axis.set_xticks([])
        axis.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
