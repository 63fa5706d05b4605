"""The matched-budget quality study: does guiding at ~1 step in 5 (CompG) keep the quality of full guidance?

Testbeds (shipped, no downloads): the trained digits testbed (cg_fast.testbeds.digits) for classifier
guidance (unconditional UNet + guide classifier) and CFG (conditional UNet); the Gaussian mixture with a
trained classifier (cg_fast.testbeds.gmm_trained), where the exact answer is known.

Protocol (fixed before any result was seen; nothing here is tuned to make a method win):
* every method runs at its OWN best scale, chosen from a grid on a separate tuning seed (100) by the
  class-conditional Fréchet distance ``fd_class`` (per-class FD to the real digits in the judge's features:
  sample quality and class correctness at once); it is then evaluated on seeds 0, 1, 2 (mean ± std);
* matched budgets: full guidance is also run with N = 27, 52 and 85 DDPM steps, which spend exactly the
  classifier gradients of CompG (rate 10, 5, 3; k = 1) at N = 250, so CompG at 250 steps is compared with
  full guidance at the same number of gradients;
* samplers DDPM 250, DDPM 50, DDIM 25 (eta 0); the judge, the MLP judge and the features never guide;
* diagnostics (spec §7) on seed 0 at DDPM 250: on-sampling (guide) and off-sampling (judge) loss per step,
  and the cosine similarity of successive fresh gradients.

    python benchmarks/quality_study.py                 # the full study (~40 min on 2 CPU cores); resumes
    python benchmarks/quality_study.py --quick         # a smoke run (seconds), into out/quality_study_quick
    python benchmarks/quality_study.py --calibrated    # the calibrated-policy study (issue 19), into
                                                       # benchmarks/results/calibrated (quality_study_calibrated.py)

Writes into ``--out`` (default benchmarks/results/quality_study, the shipped results; --quick:
out/quality_study_quick): results.json (every run, written after each), gmm.json, report.md (the tables),
quality_vs_grads.png and losses.png.

results.json and gmm.json record the settings that produced them (``config``: sample count, samplers and
their steps, every method's definition, the scale ladders, the tuning seed, a hash of the testbed weights;
see :func:`study_settings`). A rerun with the same settings resumes them (a run is keyed by sampler, family,
method, scale and seed within those settings); a rerun with other settings into the same folder is refused
before any sampling (cg_fast.runs.resume_or_refuse), so a smoke run can never add its rows to, or serve its
rows from, the shipped results.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from cg_fast import CFG, ClassifierGuidance
from cg_fast.eval import conditional_sliced_wasserstein
from cg_fast.eval.diagnostics import Diagnostics
from cg_fast.guidance import Compress, EarlyStop, Full, Interval, UniformSkip
from cg_fast.runs import (RunError, atomic_write_json, check_writable, files_fingerprint, new_results,
                          resume_or_refuse)
from cg_fast.sampler import Sampler
from cg_fast.testbeds.digits import WEIGHTS_DIR, load_testbed

# -- the study's design -------------------------------------------------------------------------------------
SAMPLERS = {"ddpm250": ("250", "ddpm"), "ddpm50": ("50", "ddpm"), "ddim25": ("ddim25", "ddim")}
# full guidance at N equal to CompG's gradient count at N = 250 (rate 10, 5, 3; k = 1)
MATCHED = {"ddpm27": ("27", "ddpm"), "ddpm52": ("52", "ddpm"), "ddpm85": ("85", "ddpm")}
# a sigma band around the centre (geometric mean) of Kynkaanniemi et al.'s (0.28, 5.42], narrowed to guide
# about a fifth of the steps (52 of 250), as the other ~1-in-5 methods do
INTERVAL = Interval(math.sqrt(0.28 * 5.42) / 1.75, math.sqrt(0.28 * 5.42) * 1.75)

CG_METHODS: dict[str, tuple[Any, str, dict]] = {
    "full": (Full(), "drop", {}),
    "compg r5 k1": (Compress(5, 1), "compress", {}),
    "compg r5 k3": (Compress(5, 3), "compress", {}),
    "compg r5 k5": (Compress(5, 5), "compress", {}),
    "compg r3 k1": (Compress(3, 1), "compress", {}),
    "compg r10 k1": (Compress(10, 1), "compress", {}),
    "early stop": (EarlyStop(0.2), "drop", {}),
    "uniform skip": (UniformSkip(5), "drop", {}),
    "interval": (INTERVAL, "drop", {}),
    "reuse r5 k1": (Compress(5, 1), "reuse", {}),
    "momentum r5 k1": (Compress(5, 1), "momentum", {"beta": 0.5, "decay": 1.0}),
}
# scale ladders: each method's scale is tuned by walking its ladder from START to a local minimum of fd_class
CG_SCALES = [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]

CFG_METHODS: dict[str, tuple[Any, str, dict]] = {
    "cfg full": (Full(), "drop", {}),
    "cfg compg r5 k1 (drop)": (Compress(5, 1), "drop", {}),
    "cfg compg r5 k1 (reuse)": (Compress(5, 1), "reuse", {}),
    "cfg early stop": (EarlyStop(0.2), "drop", {}),
    "cfg uniform skip": (UniformSkip(5), "drop", {}),
    "cfg interval": (INTERVAL, "drop", {}),
}
CFG_SCALES = [1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]

DIAG_METHODS = ("full", "compg r5 k1", "compg r5 k5", "early stop", "uniform skip")
TUNE_SEED = 100
SEEDS = [0, 1, 2]
NUM_SAMPLES = 500

GMM_SAMPLES, GMM_STEPS = 4000, "250"

QUICK = dict(samplers={"ddim25": ("ddim25", "ddim")}, matched={"ddpm10": ("10", "ddpm")}, num_samples=60,
             seeds=[0, 1], cg_scales=[2.0, 8.0], cfg_scales=[2.0, 3.0], gmm_samples=400, gmm_steps="25")
SHIPPED_OUT = Path(__file__).parent / "results" / "quality_study"
QUICK_OUT = Path("out") / "quality_study_quick"
KIND, GMM_KIND = "cg_fast quality study", "cg_fast quality study (gmm)"


def study_settings(q: dict) -> dict:
    """Every setting that changes a digits result or which scale the report shows (``q``: {} or QUICK)."""
    samplers = {**q.get("samplers", SAMPLERS), **q.get("matched", MATCHED)}
    methods = {**{f"cg:{k}": v for k, v in CG_METHODS.items()}, **{f"cfg:{k}": v for k, v in CFG_METHODS.items()}}
    return {"num_samples": q.get("num_samples", NUM_SAMPLES), "tune_seed": TUNE_SEED,
            "samplers": {k: list(v) for k, v in samplers.items()},
            "methods": {k: f"{p!r} cache={c} {kw}" for k, (p, c, kw) in methods.items()},
            "cg_scales": q.get("cg_scales", CG_SCALES), "cfg_scales": q.get("cfg_scales", CFG_SCALES),
            "testbed": files_fingerprint(list(WEIGHTS_DIR.glob("digits_*.pt")))}


def gmm_settings(q: dict) -> dict:
    """Every setting that changes the Gaussian-mixture section."""
    return {"num_samples": q.get("gmm_samples", GMM_SAMPLES), "steps": q.get("gmm_steps", GMM_STEPS),
            "seeds": q.get("seeds", SEEDS), "testbed": files_fingerprint(list(WEIGHTS_DIR.glob("gmm_classifier.*")))}


def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


class Study:
    """Runs (sampler, family, method, scale, seed) once each, keeping every result in results.json."""

    def __init__(self, out: Path, settings: dict, log: Callable[[str], None] = print, kind: str = KIND) -> None:
        """Opens ``out``/results.json: resumed if it holds the same ``settings`` (study_settings), refused
        (RunError, before any sampling) if it holds others, started if absent."""
        self.out, self.log = out, log
        self.path = check_writable(out / "results.json")
        self.record = resume_or_refuse(self.path, settings, kind, log) or new_results(settings, kind)
        self.results: dict[str, dict] = self.record["runs"]
        if self.results:
            log(f"resuming: {len(self.results)} runs already in {self.path}")
        self.tb = load_testbed()
        self.num_samples = num_samples = settings["num_samples"]
        self.y = self.tb.labels(num_samples)
        self.samplers: dict[tuple[str, str], Sampler] = {}
        self.started, self.done = time.perf_counter(), 0

    def sampler(self, model: str, name: str, spec: tuple[str, str]) -> Sampler:
        if (model, name) not in self.samplers:
            self.samplers[(model, name)] = self.tb.sampler(model, spec[0], spec[1])
        return self.samplers[(model, name)]

    def run(self, family: str, sampler: str, spec: tuple[str, str], method: str, mdef: tuple | None,
            scale: float, seed: int, diagnose: bool = False) -> dict:
        key = f"{sampler}|{family}|{method}|{scale:g}|{seed}"
        if key in self.results and (not diagnose or "curves" in self.results[key]):
            return self.results[key]
        model = "cond" if family == "cfg" or method.startswith("conditional") else "uncond"
        s = self.sampler(model, sampler, spec)
        guid = None
        if mdef is not None:
            policy, cache, kw = mdef
            policy = self.resolve(policy, family, s, scale)
            guid = (CFG(scale, null_label=10, policy=policy, cache=cache, **kw) if family == "cfg"
                    else ClassifierGuidance(self.tb.guide, scale, policy=policy, cache=cache, **kw))
        probes = {"guide": self.tb.guide, "judge": self.tb.judge} if diagnose else {}
        diag = Diagnostics(s, self.y, probes=probes)
        res = s.sample(self.tb.shape(self.num_samples), y=self.y, guidance=guid, callback=diag,
                       generator=torch.Generator().manual_seed(seed))
        summary = res.stats.summary()
        row = {**self.tb.score(res.x, self.y),
               **{k: summary[k] for k in ("denoiser_passes", "denoiser_rows", "classifier_grads", "guided_steps",
                                          "wall_time")},
               "mean_cosine": diag.mean_cosine()}
        if diagnose:
            row["curves"] = diag.curves()
        self.results[key] = row
        self.done += 1
        atomic_write_json(self.path, self.record, indent=1)
        el = time.perf_counter() - self.started
        self.log(f"[{self.done} runs, {el / 60:.1f} min] {key}: fd_class {row['fd_class']:.2f} fd {row['fd']:.2f} "
                 f"judge {row['judge_acc']:.3f} grads {row['classifier_grads']}")
        return row

    def resolve(self, policy: Any, family: str, sampler: Sampler, scale: float) -> Any:
        """The policy a run samples with (a hook: the calibrated study calibrates here)."""
        return policy

    def real_floor(self, seeds: list[int]) -> dict:
        """Scores of real digits, num_samples / 10 per class drawn (per seed) from the reference set itself:
        what the metrics give at this sample size for perfect samples (an optimistic floor)."""
        from cg_fast.testbeds.digits_data import load_digits_data

        data, per = load_digits_data(), self.num_samples // 10
        rows = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(seed)
            idx = torch.cat([(data.y == c).nonzero().flatten()[torch.randperm(int((data.y == c).sum()),
                                                                             generator=gen)[:per]] for c in range(10)])
            rows.append({**self.tb.score(data.x[idx], data.y[idx]), "classifier_grads": 0, "denoiser_rows": 0,
                         "denoiser_passes": 1, "mean_cosine": None})
        return {"scale": 0.0, "rows": rows}

    def tune(self, family: str, sampler: str, spec: tuple[str, str], method: str, mdef: tuple,
             ladder: list[float]) -> float:
        """Walk the scale ladder from its middle towards lower fd_class (tuning seed) until both neighbours
        of the current scale are worse or the ladder ends; every method gets the same search."""
        score = lambda i: self.run(family, sampler, spec, method, mdef, ladder[i], TUNE_SEED)["fd_class"]  # noqa: E731
        i = (len(ladder) - 1) // 2
        while True:
            nbrs = [k for k in (i - 1, i + 1) if 0 <= k < len(ladder)]
            if not nbrs:  # a one-scale ladder: nothing to tune
                return ladder[i]
            best = min(nbrs, key=score)
            if score(best) >= score(i):
                return ladder[i]
            i = best

    def tune_and_eval(self, family: str, sampler: str, spec: tuple[str, str], methods: dict, scales: list[float],
                      seeds: list[int]) -> None:
        for method, mdef in methods.items():
            best = self.tune(family, sampler, spec, method, mdef, scales)
            for seed in seeds:
                diagnose = family == "cg" and sampler == "ddpm250" and method in DIAG_METHODS and seed == seeds[0]
                self.run(family, sampler, spec, method, mdef, best, seed, diagnose)


def run_gmm(out: Path, num_samples: int, steps: str, seeds: list[int], log: Callable[[str], None]) -> dict:
    """Trained vs exact classifier on the Gaussian mixture (scale 1): quality against the exact p(x|y),
    and the on-sampling (trained) against off-sampling (exact) loss per step."""
    from cg_fast.testbeds.gmm_trained import default_gmm_classifier

    gmm, sched, trained = default_gmm_classifier()
    exact = gmm.classifier(sched)
    sampler = Sampler(gmm.eps_model(sched), sched, steps, "ddpm", class_cond=False, clip_denoised=False)
    y = torch.arange(num_samples) % gmm.num_classes
    runs = {"full (trained clf)": (trained, Full(), "drop"), "compg r5 k1 (trained clf)": (trained, Compress(5, 1), "compress"),
            "full (exact clf)": (exact, Full(), "drop"), "compg r5 k1 (exact clf)": (exact, Compress(5, 1), "compress"),
            "unguided": (None, None, None)}
    res: dict = {}
    for name, (clf, policy, cache) in runs.items():
        for seed in seeds:
            ref = gmm.sample(y, generator=torch.Generator().manual_seed(10_000 + seed))
            guid = None if clf is None else ClassifierGuidance(clf, 1.0, policy=policy, cache=cache)
            diag = Diagnostics(sampler, y, probes={"trained": trained, "exact": exact})
            o = sampler.sample((num_samples, gmm.dim), y=y, guidance=guid, callback=diag,
                               generator=torch.Generator().manual_seed(seed))
            row = {"sw": conditional_sliced_wasserstein(o.x, y, ref, y), "accuracy": gmm.posterior_accuracy(o.x, y),
                   "classifier_grads": o.stats.classifier_grads}
            if seed == seeds[0]:
                row["curves"] = diag.curves()
            res.setdefault(name, {})[str(seed)] = row
        log(f"gmm {name}: done")
    floor = []
    for seed in seeds:
        g = torch.Generator().manual_seed(10_000 + seed)
        a, b = gmm.sample(y, generator=g), gmm.sample(y, generator=g)
        floor.append(conditional_sliced_wasserstein(b, y, a, y))
    return {"runs": res, "sw_floor": floor}


# -- the report ---------------------------------------------------------------------------------------------
def _rows(results: dict, sampler: str, family: str, seeds: list[int]) -> dict[str, dict]:
    """method -> {scale, per-seed rows} for the evaluated (best) scale."""
    out: dict[str, dict] = {}
    for key, row in results.items():
        s, fam, method, scale, seed = key.split("|")
        if s != sampler or fam != family or int(seed) not in seeds:
            continue
        out.setdefault(method, {"scale": float(scale), "rows": []})["rows"].append(row)
    return out


METRICS = (("fd_class", "FD per class ↓", ".2f"), ("fd", "FD ↓", ".2f"), ("judge_acc", "judge acc ↑", ".3f"),
           ("mlp_acc", "MLP judge acc ↑", ".3f"), ("precision", "precision", ".3f"), ("recall", "recall", ".3f"),
           ("mean_cosine", "cos(fresh_j, fresh_prev)", ".3f"))


def _table(rows: dict[str, dict], title: str, batch: int, cost: str = "clf grads") -> list[str]:
    """cost: "clf grads" (classifier gradients) or "passes" (denoiser rows / batch: a CFG guided step is 2)."""
    head = "clf grads" if cost == "clf grads" else "denoiser cost (B-row passes)"
    lines = [f"### {title}", "", f"| method | scale | {head} | " + " | ".join(m[1] for m in METRICS) + " |",
             "|---|---|---|" + "---|" * len(METRICS)]
    for method, d in rows.items():
        cells = []
        for key, _, fmt in METRICS:
            values = [r[key] for r in d["rows"] if r.get(key) is not None]
            if not values:  # no guidance, or a single guided step: no successive pair
                cells.append("–")
                continue
            m, s = _ms(values)
            cells.append(f"{m:{fmt}} ± {s:{fmt}}")
        r0 = d["rows"][0]
        grads = r0["classifier_grads"] if cost == "clf grads" else f"{r0['denoiser_rows'] / batch:g}"
        lines.append(f"| {method} | {d['scale']:g} | {grads} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(out: Path, results: dict, gmm: dict | None, samplers: dict, matched: dict, seeds: list[int],
                 num_samples: int, floor: dict | None = None) -> Path:
    lines = ["# Quality study: guidance policies at their own best scale and at matched budgets", "",
             f"Digits testbed, {num_samples} samples per run (labels 0-9 cycling), seeds {seeds} (mean ± std); "
             f"scale chosen per method on seed {TUNE_SEED} by FD per class. FD: Fréchet distance to the 1,797 "
             "real digits in the judge's 64-d features; judge: same architecture as the guide, other data "
             "half; MLP judge: another architecture; precision/recall: k-NN manifolds, k = 3; cos: mean cosine "
             "similarity of successive fresh guidance (classifier gradients, or CFG directions eps_c - eps_u).", ""]
    unguided = {} if floor is None else {"real digits (from the reference set: a floor)": floor}
    for name in list(samplers) + list(matched):
        for fam in ("cg", "none"):
            rows = _rows(results, name, fam, seeds)
            if fam == "none":
                unguided.update({f"{name} {method}": d for method, d in rows.items()})
                continue
            if rows:
                lines += _table(rows, f"Classifier guidance, {name}", num_samples)
        cfg_rows = _rows(results, name, "cfg", seeds)
        if cfg_rows:
            lines += _table(cfg_rows, f"Classifier-free guidance (conditional UNet), {name}", num_samples, "passes")
    if unguided:
        lines += _table(unguided, "No guidance: the unconditional UNet, and the conditional one (CFG w = 1)",
                        num_samples, "passes")
    # matched budgets: CompG at N = 250 against full guidance at the same number of gradients
    base = _rows(results, "ddpm250", "cg", seeds)
    pairs = []
    for mname, full_sampler in (("compg r10 k1", "ddpm27"), ("compg r5 k1", "ddpm52"), ("compg r3 k1", "ddpm85")):
        full = _rows(results, full_sampler, "cg", seeds).get("full")
        if mname in base and full:
            pairs.append((mname, base[mname], full_sampler, full))
    if pairs:
        lines += ["### Matched budgets: CompG at DDPM 250 vs full guidance with as many gradients", "",
                  "| CompG (N = 250) | full guidance | clf grads | FD per class, CompG | FD per class, full | "
                  "judge acc, CompG | judge acc, full |", "|---|---|---|---|---|---|---|"]
        for mname, c, fs, f in pairs:
            fc, ff = _ms([r["fd_class"] for r in c["rows"]]), _ms([r["fd_class"] for r in f["rows"]])
            ac, af = _ms([r["judge_acc"] for r in c["rows"]]), _ms([r["judge_acc"] for r in f["rows"]])
            lines.append(f"| {mname} (s={c['scale']:g}) | {fs} (s={f['scale']:g}) | {c['rows'][0]['classifier_grads']}"
                         f" vs {f['rows'][0]['classifier_grads']} | {fc[0]:.2f} ± {fc[1]:.2f} | {ff[0]:.2f} ± {ff[1]:.2f}"
                         f" | {ac[0]:.3f} ± {ac[1]:.3f} | {af[0]:.3f} ± {af[1]:.3f} |")
        lines.append("")
    if gmm:
        fl = _ms(gmm["sw_floor"])
        lines += ["### Gaussian mixture, trained vs exact classifier (DDPM, scale 1)", "",
                  f"Sliced W2 to exact samples of p(x|y) (noise floor {fl[0]:.4f} ± {fl[1]:.4f}); accuracy under "
                  "the exact posterior.", "", "| run | clf grads | sliced W2 ↓ | posterior acc ↑ |", "|---|---|---|---|"]
        for name, per in gmm["runs"].items():
            rows = list(per.values())
            sw, ac = _ms([r["sw"] for r in rows]), _ms([r["accuracy"] for r in rows])
            lines.append(f"| {name} | {rows[0]['classifier_grads']} | {sw[0]:.4f} ± {sw[1]:.4f} | "
                         f"{ac[0]:.3f} ± {ac[1]:.3f} |")
        lines.append("")
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def plot(out: Path, results: dict, gmm: dict | None, samplers: dict, matched: dict, seeds: list[int]) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, len(samplers), figsize=(5.2 * len(samplers), 4.2), squeeze=False)
    for ax, name in zip(axes[0], samplers):
        rows = _rows(results, name, "cg", seeds)
        for method, d in rows.items():
            m, s = _ms([r["fd_class"] for r in d["rows"]])
            g = d["rows"][0]["classifier_grads"]
            ax.errorbar(g, m, yerr=s, fmt="s" if method == "full" else "o", capsize=3,
                        color="k" if method == "full" else None)
            ax.annotate(method, (g, m), textcoords="offset points", xytext=(4, 3), fontsize=7)
        if name == "ddpm250":  # full guidance's budget frontier: N = 27, 52, 85, 250
            pts = []
            for ms in list(matched) + ["ddpm250"]:
                f = _rows(results, ms, "cg", seeds).get("full")
                if f:
                    pts.append((f["rows"][0]["classifier_grads"], _ms([r["fd_class"] for r in f["rows"]])[0]))
            if len(pts) > 1:
                pts.sort()
                ax.plot(*zip(*pts), "k--", lw=1, label="full guidance at N = grads (DDPM)")
                ax.legend(fontsize=7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("classifier gradients")
        ax.set_ylabel("FD per class (judge features), lower is better")
        ax.set_title(f"classifier guidance, {name} (best scale each)", fontsize=9)
    fig.tight_layout()
    paths.append(out / "quality_vs_grads.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3 if gmm else 2, figsize=(15 if gmm else 10, 4))
    diag = {k.split("|")[2]: r["curves"] for k, r in results.items() if "curves" in r and k.startswith("ddpm250|cg")}
    for method, c in diag.items():
        line, = axes[0].plot(c["j"], c["guide_loss"], lw=1, label=f"{method} (guide, on)")
        axes[0].plot(c["j"], c["judge_loss"], lw=1, ls="--", color=line.get_color())
        if c["cosine"]:
            axes[1].plot(c["cosine_j"], c["cosine"], "-o", ms=2, lw=1, label=method)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("sampling step j (DDPM 250)")
    axes[0].set_title("on-sampling (solid, guide) vs off-sampling (dashed, judge) loss", fontsize=9)
    if diag:
        axes[0].legend(fontsize=7)
        axes[1].legend(fontsize=7)
    axes[1].set_xlabel("guided step j")
    axes[1].set_title("cosine similarity of successive fresh gradients", fontsize=9)
    if gmm:
        for name, per in gmm["runs"].items():
            c = next(r["curves"] for r in per.values() if "curves" in r)
            line, = axes[2].plot(c["j"], c["trained_loss"], lw=1, label=name)
            axes[2].plot(c["j"], c["exact_loss"], lw=1, ls="--", color=line.get_color())
        axes[2].set_yscale("log")
        axes[2].set_xlabel("sampling step j")
        axes[2].set_title("GMM: trained classifier (solid) vs exact posterior (dashed) loss", fontsize=9)
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "losses.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None,
                   help=f"results folder (default {SHIPPED_OUT.relative_to(Path(__file__).parent.parent)}; "
                        f"--quick: {QUICK_OUT}); a folder holding results of other settings is refused")
    p.add_argument("--quick", action="store_true", help="a smoke run: one sampler, tiny sizes (seconds)")
    p.add_argument("--no-gmm", action="store_true", help="skip the Gaussian-mixture section")
    p.add_argument("--calibrated", action="store_true",
                   help="the calibrated-policy study (issue 19) instead: benchmarks/quality_study_calibrated.py, "
                        "into benchmarks/results/calibrated (--quick: out/calibrated_quick)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--calibrated" in argv:  # its own options (--ship) are parsed there
        sys.path.insert(0, str(Path(__file__).parent))
        import quality_study_calibrated

        return quality_study_calibrated.main(argv)
    args = p.parse_args(argv)
    q = QUICK if args.quick else {}
    out = Path(args.out) if args.out else (QUICK_OUT if args.quick else SHIPPED_OUT)
    samplers, matched = q.get("samplers", SAMPLERS), q.get("matched", MATCHED)
    seeds, n = q.get("seeds", SEEDS), q.get("num_samples", NUM_SAMPLES)
    cg_scales, cfg_scales = q.get("cg_scales", CG_SCALES), q.get("cfg_scales", CFG_SCALES)
    try:  # every file is checked before any sampling
        gmm_path, gsettings = check_writable(out / "gmm.json"), gmm_settings(q)
        gmm_record = None if args.no_gmm else resume_or_refuse(gmm_path, gsettings, GMM_KIND, print)
        for name in ("report.md", "quality_vs_grads.png", "losses.png"):
            check_writable(out / name)
        study = Study(out, study_settings(q))
    except RunError as e:
        print(f"quality_study: error: {e}", file=sys.stderr)
        return 2
    try:
        for name, spec in samplers.items():
            study.tune_and_eval("cg", name, spec, CG_METHODS, cg_scales, seeds)
            for seed in seeds:
                study.run("none", name, spec, "unguided", None, 0.0, seed)
                study.run("none", name, spec, "conditional (w=1)", None, 1.0, seed)
            study.tune_and_eval("cfg", name, spec, CFG_METHODS, cfg_scales, seeds)
        for name, spec in matched.items():
            study.tune_and_eval("cg", name, spec, {"full": CG_METHODS["full"]}, cg_scales, seeds)
        gmm = None
        if not args.no_gmm:
            if gmm_record is None:
                gmm_record = {**new_results(gsettings, GMM_KIND),
                              **run_gmm(out, gsettings["num_samples"], gsettings["steps"], seeds, print)}
                atomic_write_json(gmm_path, gmm_record, indent=1)
            gmm = gmm_record
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are in {study.path} (a rerun resumes)", file=sys.stderr)
        return 130
    report = write_report(out, study.results, gmm, samplers, matched, seeds, n, study.real_floor(seeds))
    print(f"report: {report}")
    try:
        for path in plot(out, study.results, gmm, samplers, matched, seeds):
            print(f"figure: {path}")
    except ImportError:
        print("figures skipped: matplotlib is not installed", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
