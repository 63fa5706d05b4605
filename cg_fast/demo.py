"""The built-in default job (``make demo``): guidance policies compared on the trained digits testbed.

An unconditional UNet guided by a noisy classifier (both shipped, cg_fast.testbeds.digits) draws 500
digits (50 per class) per policy. A second classifier of the same architecture, trained on the other half
of the data (the judge), and an MLP judge score the samples: their accuracy on the intended labels
(off-sampling accuracy, spec §7), next to the guiding classifier's own (on-sampling); the Fréchet distance
to the real digits in the judge's feature space. The table also gives the exact cost: denoiser passes,
classifier gradients, wall time. A PNG grid of samples per policy (a column per class) is written.

The Gaussian-mixture demo, whose answer is exact, is ``cg-fast demo --testbed gmm`` (cg_fast.demo_gmm).
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .demo_gmm import _mean_std
from .eval.images import save_grid
from .eval.npz import from_uint8, load_sample_batch, save_sample_batch
from .guidance import ClassifierGuidance, Compress, EarlyStop, Full, Policy, UniformSkip
from .runs import RunError, atomic_write_json, check_writable, files_fingerprint, new_results, resume_or_refuse
from .testbeds.digits import WEIGHTS_DIR, load_testbed

__all__ = ["DigitsDemoConfig", "DIGITS_RUNS", "check_digits_config", "sample_files", "run_digits_demo",
           "format_digits_table", "plot_digits_demo"]


@dataclass
class DigitsDemoConfig:
    """Run configuration, saved with the results."""

    num_samples: int = 500      # per run; labels cycle 0..9 (equal class counts)
    steps: str = "250"          # ADM respacing of the 1000-step linear schedule
    method: str = "ddpm"        # ddpm | ddim
    scale: float = 16.0         # classifier scale s for every policy: full guidance's best at DDPM 250 in the
                                # quality study (benchmarks/quality_study.py tunes it per policy)
    seeds: list[int] = field(default_factory=lambda: [0])
    testbed: str | None = None  # weights folder (cg-fast train-testbed --out); None: the shipped weights


# name -> (policy, cache); None: the unguided control
DIGITS_RUNS: dict[str, tuple[Policy, str] | None] = {
    "full": (Full(), "drop"),
    "compg": (Compress(rate=5, k=1), "compress"),
    "early stop": (EarlyStop(0.2), "drop"),
    "uniform skip": (UniformSkip(rate=5), "drop"),
    "unguided": None,
}


KIND = "cg_fast demo (digits)"  # the results file's kind: a GMM demo file is never resumed as a digits one
MIN_SAMPLES = 20  # 2 per class: the per-class Fréchet distance needs two samples of every class


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def check_digits_config(cfg: DigitsDemoConfig) -> None:
    """Refuse, before any sampling, settings the demo cannot run (ValueError saying which and why)."""
    if cfg.num_samples < MIN_SAMPLES:
        raise ValueError(f"samples per run must be at least {MIN_SAMPLES} (2 per class, for the per-class "
                         f"Fréchet distance); got {cfg.num_samples}")
    if not cfg.seeds:
        raise ValueError("give at least one seed")


def sample_files(grids: Path, stem: str, name: str) -> tuple[Path, Path]:
    """(PNG grid, npz batch) of policy ``name`` in folder ``grids``, named after the results file's ``stem``
    (``out/demo.json`` -> ``out/demo_full.png``), so runs with different results files never share them."""
    base = grids / f"{stem}_{_slug(name)}"
    return base.with_suffix(".png"), base.with_suffix(".npz")


def run_digits_demo(cfg: DigitsDemoConfig = DigitsDemoConfig(), runs: dict | None = None,
                    out: Path | None = None, grids: Path | None = None, log: Callable[[str], None] = print,
                    progress: bool = False, keep_samples: dict | None = None) -> dict:
    """Run every policy for every seed; returns (and, with ``out``, saves after each run) the results.

    Saved atomically after every (policy, seed): an interrupted demo keeps what it finished, and a rerun
    with the same ``out`` and configuration skips those runs; a rerun with another configuration is refused
    before sampling (:class:`cg_fast.runs.RunError`). ``grids``: a folder for one PNG grid of samples per
    policy and the samples themselves as an ADM evaluator batch (``<out stem>_<policy>.npz``, see
    :func:`sample_files`: arr_0 NHWC uint8, arr_1 labels; first seed; without ``out`` they are named
    ``demo_<policy>`` and nothing guards them). ``keep_samples``: receives the first seed's samples per policy.
    """
    runs = DIGITS_RUNS if runs is None else runs
    check_digits_config(cfg)
    stem = out.stem if out is not None else "demo"
    for path in ([] if out is None else [out]) + ([] if grids is None else [sample_files(grids, stem, "x")[0]]):
        check_writable(path)
    tb = load_testbed(cfg.testbed)
    # the settings: the configuration and the weights' bytes (a retrained testbed in the same folder is new)
    weights = files_fingerprint(list((WEIGHTS_DIR if cfg.testbed is None else Path(cfg.testbed)).glob("digits_*.pt")))
    settings = {**asdict(cfg), "weights": weights}
    results: dict = resume_or_refuse(out, settings, KIND, log) or new_results(settings, KIND)
    if out is not None and grids is not None and not results["runs"]:
        stale = [p for name in runs for p in sample_files(grids, stem, name) if p.exists()]
        if stale:  # no results file, but sample files of an earlier run: say so before replacing them
            log(f"replacing {len(stale)} sample files of an earlier run without results ({stale[0]}, ...)")
    sampler = tb.sampler("uncond", cfg.steps, cfg.method)
    y = tb.labels(cfg.num_samples)

    for name, spec in runs.items():
        per_seed = results["runs"].setdefault(name, {})
        if not isinstance(per_seed, dict):
            raise RunError(f"{out}: the runs of {name!r} are not a record per seed; move the file aside or delete it")
        png, saved = sample_files(grids, stem, name) if grids is not None else (None, None)
        if keep_samples is not None and str(cfg.seeds[0]) in per_seed and saved is not None and saved.exists():
            keep_samples[name] = from_uint8(load_sample_batch(saved)[0])  # a resumed run: its saved samples
        for seed in cfg.seeds:
            if str(seed) in per_seed:
                continue
            guid = None if spec is None else ClassifierGuidance(tb.guide, cfg.scale, policy=spec[0], cache=spec[1])
            res = sampler.sample(tb.shape(cfg.num_samples), y=y, guidance=guid, progress=progress,
                                 generator=torch.Generator().manual_seed(seed))
            with torch.no_grad():
                guide_logits = tb.guide(res.x, torch.zeros_like(y))
            summary = res.stats.summary()
            per_seed[str(seed)] = {
                **tb.score(res.x, y),
                "guide_acc": float((guide_logits.argmax(1) == y).float().mean()),
                **{k: summary[k] for k in ("denoiser_passes", "classifier_grads", "guided_steps", "wall_time")},
            }
            if seed == cfg.seeds[0]:
                if keep_samples is not None:
                    keep_samples[name] = res.x
                if grids is not None:
                    save_grid(res.x[:100], png, nrow=10, scale=4)
                    save_sample_batch(saved, res.x, y)  # ADM evaluator format
            if out is not None:
                atomic_write_json(out, results)
        log(f"  {name}: done")
    return results


def format_digits_table(results: dict) -> str:
    """A plain-text table: exact counts, wall time, quality (mean ± std over seeds where several)."""
    head = (f"{'policy':<13} {'guided':>6} {'denoiser':>8} {'clf grads':>9} {'time s':>7} {'FD (judge)':>14} "
            f"{'FD per class':>14} {'judge acc':>14} {'MLP judge acc':>14} {'guide acc':>9}")
    lines = [head, "-" * len(head)]

    def cell(rows: list[dict], key: str, fmt: str, width: int) -> str:
        m, s = _mean_std([r[key] for r in rows])
        text = f"{m:{fmt}}" + (f" ± {s:{fmt}}" if len(rows) > 1 else "")
        return f"{text:>{width}}"

    for name, per_seed in results["runs"].items():
        rows = list(per_seed.values())
        if not rows:
            continue
        r0 = rows[0]
        tm = statistics.fmean(r["wall_time"] for r in rows)
        lines.append(f"{name:<13} {r0['guided_steps']:>6} {r0['denoiser_passes']:>8} {r0['classifier_grads']:>9} "
                     f"{tm:>7.2f} {cell(rows, 'fd', '.2f', 14)} {cell(rows, 'fd_class', '.2f', 14)} "
                     f"{cell(rows, 'judge_acc', '.3f', 14)} "
                     f"{cell(rows, 'mlp_acc', '.3f', 14)} {cell(rows, 'guide_acc', '.3f', 9)}")
    return "\n".join(lines)


def plot_digits_demo(results: dict, samples: dict, path: Path) -> Path:
    """One figure: judge accuracy and FD per class against classifier gradients (top), and 10 samples per
    class per policy (bottom)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .eval.images import make_grid

    names = [n for n in results["runs"] if n in samples]
    cols = max(2, len(names))
    fig = plt.figure(figsize=(2.6 * cols, 6.6))
    grid_spec = fig.add_gridspec(2, cols, height_ratios=[1.1, 1])
    top = [fig.add_subplot(grid_spec[0, : cols // 2]), fig.add_subplot(grid_spec[0, cols // 2:])]
    for ax, key, label in ((top[0], "judge_acc", "judge accuracy (off-sampling, higher is better)"),
                           (top[1], "fd_class", "FD per class, judge features (lower is better)")):
        for name, per_seed in results["runs"].items():
            rows = list(per_seed.values())
            m, s = _mean_std([r[key] for r in rows])
            ax.errorbar(rows[0]["classifier_grads"], m, yerr=s, fmt="o", capsize=3)
            ax.annotate(name, (rows[0]["classifier_grads"], m), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.set_xlabel("classifier gradients")
        ax.set_title(label, fontsize=9)
    top[1].set_yscale("log")
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid_spec[1, i])
        grid = make_grid(samples[name][:100].cpu().clamp(-1, 1), nrow=10)
        ax.imshow(grid[0].numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_title(f"{name} (a column per class)", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
