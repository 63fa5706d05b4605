"""Timing of guided sampling, behind ``cg-fast bench``: guidance methods x backends x batch sizes on one model.

    cases = [Case(m, b, n) for b in ("eager",) for n in (16,) for m in ("unguided", "full", "compg")]
    result = measure(model, classifier, cases, steps="50", rounds=5)
    result.ratios()    # per (backend, batch): CompG / unguided and CompG / full, paired within each round

How it is measured:

- **Side by side.** Every round runs every case once, the methods of one (backend, batch) back to back and in an
  order rotated each round, so drift on a shared machine (other jobs, clocks, heat) hits all methods alike. A
  ratio is formed within each round (CompG's time over the unguided or fully guided run of the same round),
  then summarised: median over rounds and its spread (min to max).
- **Warm-up apart.** ``warmup`` runs per case before the rounds (CUDA graph capture, ONNX export, Triton
  compilation, allocator growth) are timed and reported, never mixed into the medians.
- **Cost without quality.** Each case also records the exact accounting of one run (denoiser passes and rows,
  classifier gradients, guided steps), which does not depend on timing.
- Wall time of ``Sampler.sample`` from a synchronised start; ``sample`` synchronises CUDA before returning.
  Noise is counter-based with fixed seeds, so every round samples the same thing.

This module measures and summarises; command lines, tables and figures are ``cg_fast.cli.bench``'s.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .guidance import CFG, ClassifierGuidance
from .kernels.rng import sample_seeds
from .policies import Compress, EarlyStop, Full, Policy, UniformSkip
from .sampler import Sampler

__all__ = ["METHODS", "Case", "CaseResult", "BenchResult", "make_guidance", "measure", "summary"]

# name -> (policy, cache of classifier guidance) or None: the unguided run. CFG uses its own default cache (drop).
METHODS: dict[str, tuple[Policy, str] | None] = {
    "unguided": None,
    "full": (Full(), "drop"),                          # fresh guidance at every step
    "compg": (Compress(rate=5, k=1), "compress"),      # CompG: about one step in five, skipped steps compressed
    "uniform": (UniformSkip(rate=5), "drop"),          # every 5th step, nothing in between
    "early_stop": (EarlyStop(0.2), "drop"),            # the first 20 % of the steps
}


@dataclass(frozen=True)
class Case:
    """One configuration: a method of :data:`METHODS`, a backend name, a batch size."""

    method: str
    backend: str
    batch: int


@dataclass
class CaseResult:
    """The times of one case (seconds) and the accounting of one of its runs."""

    case: Case
    times: list[float] = field(default_factory=list)     # one per round
    warmup: list[float] = field(default_factory=list)    # the warm-up runs, excluded from the summary
    denoiser_passes: int = 0
    denoiser_rows: int = 0
    classifier_grads: int = 0
    guided_steps: int = 0

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self.case), **summary(self.times), "times": self.times, "warmup": self.warmup,
                "denoiser_passes": self.denoiser_passes, "denoiser_rows": self.denoiser_rows,
                "classifier_grads": self.classifier_grads, "guided_steps": self.guided_steps,
                "per_image": statistics.median(self.times) / self.case.batch if self.times else None}


def summary(values: Sequence[float]) -> dict[str, float | None]:
    """Median and spread (min, max) of ``values``; None for each when there are none."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


@dataclass
class BenchResult:
    """All cases of one run, in the order they were given."""

    results: list[CaseResult]
    rounds: int

    def get(self, method: str, backend: str, batch: int) -> CaseResult | None:
        return next((r for r in self.results if r.case == Case(method, backend, batch)), None)

    def ratios(self, of: str = "compg", to: Sequence[str] = ("unguided", "full")) -> list[dict[str, Any]]:
        """Per (backend, batch) holding ``of``: ``of``'s time over each of ``to``'s, paired per round (median,
        min, max over rounds); a missing baseline is left out."""
        rows = []
        for r in self.results:
            if r.case.method != of:
                continue
            row: dict[str, Any] = {"backend": r.case.backend, "batch": r.case.batch}
            for base in to:
                b = self.get(base, r.case.backend, r.case.batch)
                if b is not None:
                    row[f"{of}/{base}"] = summary([t / u for t, u in zip(r.times, b.times)])
            rows.append(row)
        return rows


def make_guidance(method: str, kind: str, scale: float, classifier: Any = None) -> ClassifierGuidance | CFG | None:
    """The guidance object of ``method`` for guidance ``kind`` ("classifier" or "cfg") at ``scale``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: use one of {list(METHODS)}")
    spec = METHODS[method]
    if spec is None:
        return None
    policy, cache = spec
    if kind == "classifier":
        if classifier is None:
            raise ValueError("classifier guidance needs a classifier")
        return ClassifierGuidance(classifier, scale, policy=policy, cache=cache)
    if kind == "cfg":
        return CFG(scale, policy=policy)
    raise ValueError(f"unknown guidance kind {kind!r}: 'classifier' or 'cfg'")


def measure(model: torch.nn.Module, classifier: Any, cases: Sequence[Case], *, kind: str = "classifier",
            scale: float = 1.0, steps: str | None = None, rounds: int = 5, warmup: int = 1,
            device: torch.device | str = "cpu", seed: int = 0, num_classes: int | None = None,
            tick: Callable[[str], None] | None = None) -> BenchResult:
    """Time every case ``rounds`` times after ``warmup`` runs each (see the module doc). ``model`` carries its
    ``cg_config`` (``Sampler.from_model``); ``steps`` overrides its respacing. ``tick(label)`` is called after
    every run (progress)."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be at least 1 and warmup at least 0, got rounds={rounds}, warmup={warmup}")
    if not cases:
        raise ValueError("no cases to measure")
    device = torch.device(device)
    cfg = model.cg_config
    shape = cfg.input_shape
    classes = num_classes or cfg.num_classes or 1
    samplers = {b: Sampler.from_model(model, steps=steps, rng="counter", backend=b)
                for b in dict.fromkeys(c.backend for c in cases)}
    guidance = {m: make_guidance(m, kind, scale, classifier) for m in dict.fromkeys(c.method for c in cases)}
    results = {c: CaseResult(c) for c in cases}

    def run(c: Case) -> float:
        y = torch.arange(c.batch) % classes if (cfg.class_cond or guidance[c.method] is not None) else None
        seeds = sample_seeds(seed, range(c.batch))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        out = samplers[c.backend].sample((c.batch, *shape), y, guidance[c.method], seeds=seeds, device=device)
        took = time.perf_counter() - start  # sample() synchronises CUDA before it returns
        r = results[c]
        r.denoiser_passes, r.denoiser_rows = out.stats.denoiser_passes, out.stats.denoiser_rows
        r.classifier_grads, r.guided_steps = out.stats.classifier_grads, len(out.stats.guided_steps)
        if tick is not None:
            tick(f"{c.method} {c.backend} b{c.batch}")
        return took

    groups: dict[tuple[str, int], list[Case]] = {}
    for c in cases:
        groups.setdefault((c.backend, c.batch), []).append(c)
    for c in cases:
        results[c].warmup = [run(c) for _ in range(warmup)]
    for r in range(rounds):
        for group in groups.values():
            k = r % len(group)
            for c in group[k:] + group[:k]:  # rotated each round: no method always runs first
                results[c].times.append(run(c))
    return BenchResult([results[c] for c in cases], rounds)
