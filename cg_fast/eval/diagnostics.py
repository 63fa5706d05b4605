"""Model-fitting diagnostics per sampling step (spec §7), as sampler callbacks.

    diag = Diagnostics(sampler, y, probes={"guide": guide_clf, "judge": judge_clf})
    out = sampler.sample(shape, y=y, guidance=guid, callback=diag)
    diag.curves()   # {"j": [...], "guide_loss": [...], "judge_acc": [...], "cosine_j": [...], "cosine": [...]}

* :class:`ClassifierProbe` evaluates classifiers (no gradient) on x after every step: with the guiding
  classifier this is the on-sampling loss/accuracy of every step (the sampler itself sees it only at guided
  steps), with an independent one the off-sampling loss/accuracy. The probes' forward passes are
  diagnostics: they are not counted in the sampler's accounting and do not change the samples.
* :class:`GuidanceTrace` records the cosine similarity, per sample, between successive fresh guidance
  vectors (classifier gradients g_j, or CFG directions eps_c - eps_u) and their norms: how much the
  guidance a cache reuses has turned by the next guided step.
"""
from __future__ import annotations

import statistics
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ..guidance import ClassifierRecord, classifier_log_prob

__all__ = ["ClassifierProbe", "GuidanceTrace", "Diagnostics"]


class ClassifierProbe:
    """Callback: log p(y | x_{j+1}) and accuracy of each named classifier after every step j.

    Args:
        classifiers: name -> ``classifier(x, t) -> logits``.
        y:           the intended labels [B].
        timesteps:   the ORIGINAL timesteps in sampling order (``sampler.schedule.original_timesteps_in_
                     sampling_order()``); the state after step j is noised to level t_{j+1}, and the
                     final samples are evaluated at t = 0.

    ``records[name][j]`` is the record of x_j (j = 1 .. N; j = N: the final samples).
    """

    def __init__(self, classifiers: Mapping[str, Callable[[Tensor, Tensor], Tensor]], y: Tensor,
                 timesteps: list[int] | Tensor) -> None:
        self.classifiers = dict(classifiers)
        self.y = torch.as_tensor(y).long()
        self.timesteps = [int(t) for t in torch.as_tensor(timesteps).tolist()]
        self.records: dict[str, dict[int, ClassifierRecord]] = {name: {} for name in self.classifiers}

    def __call__(self, info: dict[str, Any]) -> None:
        j, x = info["j"], info["x"]
        t_next = self.timesteps[j + 1] if j + 1 < len(self.timesteps) else 0
        t = torch.full((x.shape[0],), t_next, dtype=torch.long, device=x.device)
        y = self.y.to(x.device)
        for name, clf in self.classifiers.items():
            self.records[name][j + 1] = classifier_log_prob(clf, x, t, y, check=(j == 0))


class GuidanceTrace:
    """Callback: cosine similarity between successive fresh guidance vectors, per sample, averaged.

    ``cosine[j]``: mean over the batch of cos(g_j, g_prev) at guided step j (g_prev the previous fresh
    guidance); ``norm[j]``: mean per-sample L2 norm of g_j. Needs the sampler's ``guidance`` callback key.
    """

    def __init__(self) -> None:
        self.cosine: dict[int, float] = {}
        self.norm: dict[int, float] = {}
        self._prev: Tensor | None = None

    def __call__(self, info: dict[str, Any]) -> None:
        g = info.get("guidance")
        if g is None:
            return
        g = g.detach().reshape(g.shape[0], -1).double()
        self.norm[info["j"]] = float(g.norm(dim=1).mean())
        if self._prev is not None:
            cos = torch.nn.functional.cosine_similarity(g, self._prev, dim=1, eps=1e-30)
            self.cosine[info["j"]] = float(cos.mean())
        self._prev = g


class Diagnostics:
    """Both callbacks in one (plus an optional user callback), with their results as plain lists."""

    def __init__(self, sampler: Any, y: Tensor, probes: Mapping[str, Callable[[Tensor, Tensor], Tensor]] | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None) -> None:
        ts = sampler.schedule.original_timesteps_in_sampling_order()
        self.probe = ClassifierProbe(probes or {}, y, ts)
        self.trace = GuidanceTrace()
        self.callback = callback

    def __call__(self, info: dict[str, Any]) -> None:
        self.probe(info)
        self.trace(info)
        if self.callback is not None:
            self.callback(info)

    def curves(self) -> dict[str, list]:
        """{"j": 1..N, "<name>_loss", "<name>_acc" per probe, "cosine_j", "cosine", "norm"} as lists."""
        out: dict[str, list] = {}
        for name, recs in self.probe.records.items():
            js = sorted(recs)
            out["j"] = js
            out[f"{name}_loss"] = [recs[j].loss for j in js]
            out[f"{name}_acc"] = [recs[j].accuracy for j in js]
        out["cosine_j"] = sorted(self.trace.cosine)
        out["cosine"] = [self.trace.cosine[j] for j in out["cosine_j"]]
        out["norm"] = [self.trace.norm[j] for j in sorted(self.trace.norm)]
        return out

    def mean_cosine(self) -> float | None:
        """Mean cosine similarity of successive fresh guidance over the run (None with < 2 guided steps)."""
        vals = list(self.trace.cosine.values())
        return statistics.fmean(vals) if vals else None
