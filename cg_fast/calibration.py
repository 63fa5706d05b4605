"""Calibrated guidance: choose the K guided steps and their weights by measurement (issue 19).

This module owns the measuring run, the dynamic programme and the calibration files; the resulting policy
(:class:`cg_fast.policies.Calibrated`: a mask and weights) lives in ``policies.py``, and sampling with it is
the ordinary sampler with ``cache="compress"``, the weights replacing the gap multipliers m_j (spec §4).
It must not touch the sampler's loop or the step kernels.

**What is measured.** One run with full guidance (every step guided, spec §3 ``full``) on a small batch
records, at every step j, the shift that guidance applies to the sampler's state:

    u_j = rho_j * c_j * a_j            a_j: the fresh guidance (classifier gradient g_j, or d_j = eps_c - eps_u)

* ``c_j`` is d x_{j+1} / d a_j, the step's guidance coefficient (spec §5-§6), linearised (clipping ignored):
  DDPM classifier ``Var_j * s``; DDIM / DPM-Solver++ classifier: the score shift ``-sqrt(1 - ab_j) s a`` moves
  x0 by ``(1 - ab_j) / sqrt(ab_j) * s a``, and x_{j+1} by that times ``dx_{j+1}/dx0`` (DDIM:
  ``sqrt(ab_prev) - DIR / sqrt(1/ab - 1)``; DPM-Solver++: ``C0 + C1``, the part of the multistep correction
  that lands on the next state); CFG ``eps = eps_c + (w-1) a`` moves x0 by ``-sqrt(1/ab - 1) (w - 1) a``
  (eps prediction; v and x0 predictions likewise) and x_{j+1} by ``dx_{j+1}/dx0`` times that (DDPM: POST_C1).
* ``rho_j`` (``transport_mode``): ``"none"`` (default) compares the shifts in x-space, ``rho_j = 1``, as
  written in issue 19 (``u_t = c_t g_t``). ``"gaussian"`` carries each shift to the clean sample through the
  posterior mean of isotropic Gaussian data, ``rho_j = sqrt(ab) v / (ab v + 1 - ab)`` at the level x_{j+1} lies
  on (``v`` the per-coordinate variance of the calibration run's own samples), which discounts the early,
  noisy steps whose shifts the denoiser largely absorbs.

**What is minimised.** With ``G[t, t'] = E_i <u_t^i, u_t'^i>`` (the mean over the calibration batch), the
N steps are cut into K segments ``[l_k, r_k)``; each is served by one guided step ``a_k`` inside it, which
applies ``w_k a_{a_k}`` in place of the whole segment's guidance, and

    J(a, w) = sum_k E || sum_{t in [l_k, r_k)} u_t  -  w_k u_{a_k} ||^2

is minimised over the cuts, the guided steps and the weights (one scalar per guided step, shared by the
batch, since the coefficient table is). ``anchor="free"`` (default) lets a_k be any step of its segment (a
midpoint rule: the guided step may stand in for steps before it too); ``anchor="first"`` fixes a_k = l_k,
compress's structure (a guided step stands in for itself and the skipped steps after it, spec §4; step 0 is
then always guided). For given cuts and a_k, w_k is a least-squares fit in closed form,
``w_k = sum_{t in seg} G[t, a_k] / G[a_k, a_k]``, leaving the residual
``sum_{t,t' in seg} G[t, t'] - (sum_{t in seg} G[t, a_k])^2 / G[a_k, a_k]``. The table of segment costs takes
O(N^3) (prefix sums of G, minimised over a_k) and the cuts an exact O(K N^2) dynamic programme. With constant
u (``G`` all equal) every residual is 0 and, anchored first, w_k is the segment's length: compress's m_j.
Ties go to the earliest cut and the earliest guided step, so a calibration is a deterministic function of G.
What J ignores: how a shift made at step j is transformed by the later steps (beyond rho), clipping, and the
sample-to-sample spread of the best weight (w is shared).

**Files.** A calibration is a small JSON (:func:`save_calibration`, atomic) keyed by the model, the
classifier (or CFG), the scale, the method, the steps (original timesteps), eta, the budget, the anchor and
transport, and the calibration batch, labels and seed (:func:`calibration_key`); :func:`load_calibration` refuses a file whose key
differs. The digits testbed ships its calibrations in ``cg_fast/testbeds/weights/calibrations/``.

**Cost.** The measuring run is full guidance on ``batch`` rows: N denoiser passes and N classifier gradients
of ``batch`` rows (for CFG, N passes of 2 x batch rows). With batch 64 that is 64 / 50,000 = 0.13 % of the
denoiser rows of a 50k-sample run and 0.13 % x N/K of its classifier-gradient rows (0.64 % at K = N/5, 1.2 %
at K = N/10: use ``batch=32`` there to stay under 1 %); the record states its own counts (``cost``).
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .guidance import CFG, ClassifierGuidance
from .kernels.table import Col
from .policies import Calibrated, Full, gaps
from .runs import RunError, atomic_write_json, fingerprint, read_json, settings_diff

__all__ = ["Calibration", "calibrate", "calibration_key", "save_calibration", "load_calibration",
           "calibrated_policy", "shift_coefficients", "transport", "record_gram", "segment_costs", "choose_steps",
           "segment_weights", "objective", "module_fingerprint", "KIND"]

KIND = "cg_fast calibration"
Guidance = ClassifierGuidance | CFG


# -- the dynamic programme (pure NumPy) ---------------------------------------------------------------------
def _check_gram(gram: np.ndarray) -> np.ndarray:
    g = np.asarray(gram, dtype=np.float64)
    if g.ndim != 2 or g.shape[0] != g.shape[1] or g.shape[0] < 1 or not np.isfinite(g).all():
        raise ValueError(f"gram must be a finite square [N, N] matrix, got shape {g.shape}")
    return g


ANCHORS = ("free", "first")
TRANSPORTS = ("none", "gaussian")


def segment_costs(gram: np.ndarray, anchor: str = "free") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residual, weight and guided step of every segment ``[l, r)`` (arrays [N + 1, N + 1]; +inf / 0 / -1
    where r <= l).

    ``anchor="first"``: the segment is guided at its first step l (compress's structure, spec §4);
    ``"free"``: at the step a in [l, r) with the least residual (the earliest of equal ones). For a guided step
    a, ``weight = sum_{t in [l, r)} G[t, a] / G[a, a]`` (0 where G[a, a] = 0: no guidance to scale) and
    ``cost = sum_{t, t' in [l, r)} G[t, t'] - weight * sum_{t in [l, r)} G[t, a]``.
    """
    if anchor not in ANCHORS:
        raise ValueError(f"unknown anchor {anchor!r}: use one of {ANCHORS}")
    g = _check_gram(gram)
    n = g.shape[0]
    q = np.zeros((n + 1, n + 1))
    q[1:, 1:] = g.cumsum(0).cumsum(1)  # q[r, r'] = sum_{t < r, t' < r'} G
    p = np.zeros((n + 1, n))
    p[1:] = g.cumsum(0)  # p[r, a] = sum_{t < r} G[t, a]
    l_idx, r_idx = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    sq = q[r_idx, r_idx] - q[l_idx, r_idx] - q[r_idx, l_idx] + q[l_idx, l_idx]  # E||S_lr||^2
    diag = np.diag(g)
    best_cost = np.full((n + 1, n + 1), np.inf)
    best_w = np.zeros((n + 1, n + 1))
    best_a = np.full((n + 1, n + 1), -1, dtype=np.int64)
    for a in range(n) if anchor == "free" else [None]:
        av = l_idx.clip(max=n - 1) if a is None else np.full_like(l_idx, a)
        cross = p[r_idx, av] - p[l_idx, av]  # E<S_lr, u_a>
        d = diag[av]
        w = np.where(d > 0, cross / np.where(d > 0, d, 1.0), 0.0)
        cost = np.maximum(sq - w * cross, 0.0)
        inside = (r_idx > l_idx) & (av >= l_idx) & (av < r_idx)
        better = inside & (cost < best_cost)
        best_cost = np.where(better, cost, best_cost)
        best_w = np.where(better, w, best_w)
        best_a = np.where(better, av, best_a)
    return best_cost, best_w, best_a


def choose_steps(gram: np.ndarray, budget: int, anchor: str = "free") -> tuple[list[int], list[float], float]:
    """The K = min(budget, N) guided steps and weights minimising J (module docstring).

    Exact dynamic programme over segment ends: ``best[k, r]`` = least J of steps [0, r) cut into k segments,
    ``best[k, r] = min_l best[k-1, l] + cost[l, r]`` (ties: the earliest cut). Returns (guided steps in
    increasing order, their weights, J).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be an integer >= 1 (the number of guided steps), got {budget!r}")
    cost, weight, rep = segment_costs(gram, anchor)
    n = cost.shape[0] - 1
    k_max = min(int(budget), n)
    best = np.full((k_max + 1, n + 1), np.inf)
    arg = np.zeros((k_max + 1, n + 1), dtype=np.int64)
    best[1, 1:] = cost[0, 1:]
    for k in range(2, k_max + 1):
        # cand[l, r] = best[k-1, l] + cost[l, r]; np.argmin keeps the first (earliest) of equal minima
        cand = best[k - 1][:, None] + cost
        arg[k] = np.argmin(cand, axis=0)
        best[k] = cand[arg[k], np.arange(n + 1)]
    cuts, r = [], n
    for k in range(k_max, 1, -1):
        r = int(arg[k, r])
        cuts.append(r)
    starts = [0] + cuts[::-1]
    ends = starts[1:] + [n]
    guided = [int(rep[a, b]) for a, b in zip(starts, ends)]
    weights = [float(weight[a, b]) for a, b in zip(starts, ends)]
    return guided, weights, float(best[k_max, n])


def segment_weights(gram: np.ndarray, mask: Sequence[bool]) -> list[float]:
    """The least-squares weights (per step, 0 where not guided) of a given guided-step ``mask``, each guided
    step standing in for itself and the skipped steps up to the next one (``anchor="first"``).

    Steps before the first guided step have no guided step to stand in for them (they stay unguided).
    """
    _, weight, _ = segment_costs(gram, "first")
    starts = [j for j, m in enumerate(mask) if m]
    ends = starts[1:] + [len(mask)]
    w = [0.0] * len(mask)
    for a, b in zip(starts, ends):
        w[a] = float(weight[a, b])
    return w


def objective(gram: np.ndarray, weights: Sequence[float], mask: Sequence[bool] | None = None) -> float:
    """J for any policy, given its per-step weights (G_WEIGHT under compress) and guided-step ``mask``
    (default: where the weight is not 0).

    Each guided step stands in for itself and the skipped steps up to the next guided one; skipped steps
    before the first guided step count as missed (their whole shift is the residual).
    """
    g = _check_gram(gram)
    n = g.shape[0]
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"weights must have N = {n} entries, got {w.shape}")
    starts = [j for j in range(n) if (w[j] != 0.0 if mask is None else mask[j])]
    bounds = ([(0, starts[0] if starts else n, None)] if not starts or starts[0] > 0 else []) + [
        (a, b, a) for a, b in zip(starts, starts[1:] + [n])]
    total = 0.0
    for lo, hi, a in bounds:
        if hi <= lo:
            continue
        sq = g[lo:hi, lo:hi].sum()
        if a is None:
            total += sq
        else:
            total += sq - 2.0 * w[a] * g[lo:hi, a].sum() + w[a] ** 2 * g[a, a]
    return float(total)


# -- the measuring run ----------------------------------------------------------------------------------------
def shift_coefficients(sampler: Any, guidance: Guidance) -> np.ndarray:
    """``c_j`` per step (float64 [N], sampling order): the shift of x_{j+1} per unit of applied guidance a_j,
    linearised (clipping ignored; module docstring). Includes the scale (s, or w - 1 for CFG)."""
    tab = sampler.table(None).double().numpy()
    col = lambda k: tab[:, int(k)]  # noqa: E731
    s = guidance.guide_scale
    sra, srm1 = col(Col.SQRT_RECIP_AC), col(Col.SQRT_RECIPM1_AC)
    method = sampler.method
    if method == "ddpm":
        dxn_dx0 = col(Col.POST_C1)
    elif method == "ddim":
        dxn_dx0 = col(Col.DDIM_SQRT_ACP) - col(Col.DDIM_DIR) / srm1
    else:  # dpmpp2m
        dxn_dx0 = col(Col.DPM_C0) + col(Col.DPM_C1)
    if isinstance(guidance, ClassifierGuidance):
        if method == "ddpm":
            return col(Col.VAR) * s  # mean' = mean + Var s a (spec §5); learned variance: its fixed column
        # eps' = eps - sqrt(1 - ab) s a  =>  x0' = x0 + sqrt(1/ab - 1) sqrt(1 - ab) s a
        return dxn_dx0 * srm1 * col(Col.DDIM_SQRT_1M_AC) * s
    # CFG: eps = eps_c + (w - 1) a (spec §6), through the prediction's map to x0
    dx0_do = {"eps": -srm1, "x0": np.ones_like(sra), "v": -col(Col.SQRT_1M_AC)}[sampler.prediction]
    return dxn_dx0 * dx0_do * s


def transport(sampler: Any, data_var: float | None) -> np.ndarray:
    """``rho_j`` per step (float64 [N]): d x0 / d x_{j+1} of the posterior mean for data of per-coordinate
    variance ``data_var`` (isotropic Gaussian data), ``sqrt(ab) v / (ab v + 1 - ab)`` at the level x_{j+1} lies
    on (ab = 1 after the last step: rho = 1). ``data_var=None``: all 1 (shifts compared in x-space)."""
    ab = np.asarray(sampler.schedule.alphas_cumprod_prev, dtype=np.float64)[::-1].copy()  # sampling order
    if data_var is None:
        return np.ones_like(ab)
    if not data_var > 0:
        raise ValueError(f"data_var must be > 0, got {data_var!r}")
    return np.sqrt(ab) * data_var / (ab * data_var + 1.0 - ab)


def record_gram(sampler: Any, guidance: Guidance, shape: Sequence[int], y: Tensor, *,
                transport_mode: str = "none", generator: torch.Generator | None = None,
                device: Any = None) -> tuple[np.ndarray, dict]:
    """One full-guidance run of ``guidance`` (policy replaced by :class:`Full`, cache ``drop``) on ``shape``;
    returns ``G[t, t'] = mean_i <u_t^i, u_t'^i>`` (float64 [N, N]) and the run's counts (and ``data_var``, the
    per-coordinate variance of its samples, which the "gaussian" transport uses)."""
    if transport_mode not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport_mode!r}: use one of {TRANSPORTS}")
    full = replace(guidance, policy=Full(), cache="drop", beta=0.0, decay=1.0)
    coef = shift_coefficients(sampler, full)
    n = sampler.num_steps
    u: list[Tensor | None] = [None] * n

    def keep(info: dict) -> None:
        a = info["guidance"]
        if a is not None:
            u[info["j"]] = a.detach().reshape(a.shape[0], -1).double().cpu() * float(coef[info["j"]])

    out = sampler.sample(shape, y=y, guidance=full, generator=generator, callback=keep, device=device)
    missing = [j for j, v in enumerate(u) if v is None]
    if missing:
        raise RuntimeError(f"the calibration run returned no guidance at steps {missing[:5]}")
    data_var = float(out.x.double().var(dim=0).mean()) if transport_mode == "gaussian" else None
    rho = torch.from_numpy(transport(sampler, data_var))
    flat = torch.stack(u) * rho[:, None, None]  # [N, B, D]
    gram = torch.einsum("tbd,sbd->ts", flat, flat).numpy() / flat.shape[1]
    st = out.stats
    return gram, {"denoiser_passes": st.denoiser_passes, "denoiser_rows": st.denoiser_rows,
                  "classifier_grads": st.classifier_grads,
                  "classifier_rows": st.classifier_grads * shape[0], "wall_time": round(st.wall_time, 3),
                  "data_var": data_var}


# -- records, keys and files ----------------------------------------------------------------------------------
def module_fingerprint(obj: Any) -> str:
    """A short hash (16 hex digits) of a module's parameters and buffers (names, shapes, bytes): the default
    identity of a model or classifier in a calibration key. Non-modules: their type name."""
    if not isinstance(obj, torch.nn.Module):
        return f"{type(obj).__module__}.{type(obj).__qualname__}"
    h = hashlib.sha256()
    for name, t in list(obj.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def calibration_key(sampler: Any, guidance: Guidance, budget: int, *, batch: int = 64, seed: int = 0,
                    y: Tensor | None = None, anchor: str = "free", transport_mode: str = "none",
                    model_id: str | None = None, classifier_id: str | None = None) -> dict[str, Any]:
    """Everything a calibration depends on: model, classifier (or CFG null label and channels), scale, method,
    steps (the original timesteps visited), eta, variance, budget, and the calibration batch and seed.

    ``model_id`` / ``classifier_id``: names that identify the networks (default: a hash of their weights,
    :func:`module_fingerprint`). Use the same ids when saving and loading."""
    if isinstance(guidance, CFG):
        guidance = sampler.resolve_cfg(guidance)
        guide = {"kind": "cfg", "null_label": guidance.null_label, "channels": guidance.channels}
    else:
        guide = {"kind": "classifier",
                 "classifier": classifier_id or module_fingerprint(guidance.classifier)}
    return {"model": model_id or module_fingerprint(sampler.model), **guide, "scale": float(guidance.scale),
            "method": sampler.method, "eta": sampler.eta, "variance": sampler.variance,
            "prediction": sampler.prediction,
            "steps": [int(t) for t in sampler.schedule.original_timesteps_in_sampling_order()],
            "budget": int(budget), "batch": int(batch), "seed": int(seed), "anchor": anchor,
            "transport": transport_mode,
            "labels": "cycling" if y is None else fingerprint({"y": torch.as_tensor(y).tolist()})}


@dataclass
class Calibration:
    """A calibration: its key, the chosen steps and weights, and what they achieve.

    objective:        J of the chosen steps and weights (module docstring).
    objective_none:   J of guiding nothing, ``E || sum_t u_t ||^2`` (the scale of J).
    objective_even:   J of K evenly spread steps with compress's gaps as weights (a formula at the same budget).
    cost:             the measuring run's counts (denoiser passes and rows, classifier gradients and rows, s).
    """

    key: dict[str, Any]
    guided: list[int]
    weights: list[float]
    objective: float
    objective_none: float
    objective_even: float
    cost: dict[str, Any] = field(default_factory=dict)

    @property
    def policy(self) -> Calibrated:
        """The policy to sample with (``cache="compress"`` applies the weights)."""
        return Calibrated(budget=int(self.key["budget"]), guided=tuple(self.guided),
                          step_weights=tuple(self.weights), num_steps=len(self.key["steps"]))

    def to_json(self) -> dict[str, Any]:
        return {"kind": KIND, "fingerprint": fingerprint(self.key), "key": self.key, "guided": self.guided,
                "weights": self.weights, "objective": self.objective, "objective_none": self.objective_none,
                "objective_even": self.objective_even, "cost": self.cost}

    @classmethod
    def from_json(cls, d: Any, where: str = "calibration") -> "Calibration":
        if not isinstance(d, dict) or d.get("kind") != KIND or not isinstance(d.get("key"), dict):
            raise RunError(f"{where} is not a {KIND} file")
        try:
            cal = cls(key=d["key"], guided=[int(j) for j in d["guided"]], weights=[float(w) for w in d["weights"]],
                      objective=float(d["objective"]), objective_none=float(d["objective_none"]),
                      objective_even=float(d["objective_even"]), cost=dict(d.get("cost", {})))
            cal.policy  # validates the steps and weights
        except (KeyError, TypeError, ValueError) as e:
            raise RunError(f"{where} is a broken {KIND} file ({type(e).__name__}: {e}); delete it and "
                           "calibrate again") from e
        return cal


def _even_mask(n: int, k: int) -> list[bool]:
    guided = {int(np.floor(i * n / k)) for i in range(k)}
    return [j in guided for j in range(n)]


def calibrate(sampler: Any, guidance: Guidance, budget: int, *, sample_shape: Sequence[int], batch: int = 64,
              y: Tensor | None = None, seed: int = 0, num_classes: int | None = None, anchor: str = "free",
              transport_mode: str = "none", model_id: str | None = None, classifier_id: str | None = None,
              device: Any = None) -> Calibration:
    """Measure where ``guidance`` matters on ``sampler`` and choose ``budget`` guided steps and weights.

    One full-guidance run of ``batch`` samples of ``sample_shape`` (one sample: (C, H, W), or (d,)) with labels
    ``y`` (default 0, 1, ... cycling through ``num_classes`` or the sampler's classes) and noise from
    ``torch.Generator().manual_seed(seed)``, then the dynamic programme of :func:`choose_steps`. Same
    arguments, same result (the run is seeded). ``anchor`` and ``transport_mode``: see the module docstring.
    Sample with ``replace(guidance, policy=cal.policy, cache="compress")``.
    """
    if isinstance(guidance, CFG):
        guidance = sampler.resolve_cfg(guidance)
    given_y = y
    k = num_classes or sampler.num_classes
    if y is None:
        if k is None:
            raise ValueError("calibrate needs labels y (or num_classes) for the calibration batch")
        y = torch.arange(batch) % k
    y = torch.as_tensor(y).long()
    if y.shape != (batch,):
        raise ValueError(f"y must have shape [{batch}] (one label per calibration sample), got {tuple(y.shape)}")
    key = calibration_key(sampler, guidance, budget, batch=batch, seed=seed, y=given_y, anchor=anchor,
                          transport_mode=transport_mode, model_id=model_id, classifier_id=classifier_id)
    shape = (batch, *(int(v) for v in sample_shape))
    start = time.perf_counter()
    gram, cost = record_gram(sampler, guidance, shape, y, transport_mode=transport_mode,
                             generator=torch.Generator().manual_seed(seed), device=device)
    guided, weights, obj = choose_steps(gram, budget, anchor)
    n = gram.shape[0]
    even = _even_mask(n, min(budget, n))
    cost["calibration_s"] = round(time.perf_counter() - start, 3)
    return Calibration(key=key, guided=guided, weights=weights, objective=obj,
                       objective_none=objective(gram, [0.0] * n),
                       objective_even=objective(gram, [float(m) for m in gaps(even)]), cost=cost)


def _file_name(key: dict[str, Any]) -> str:
    return (f"{key['kind']}-{key['method']}{len(key['steps'])}-s{key['scale']:g}-K{key['budget']}-"
            f"{fingerprint(key)}.json")


def save_calibration(cal: Calibration, folder: str | Path) -> Path:
    """Write ``cal`` into ``folder`` (atomic; one file per key, named after it) and return the path."""
    return atomic_write_json(Path(folder) / _file_name(cal.key), cal.to_json(), indent=1)


def load_calibration(where: str | Path, key: dict[str, Any]) -> Calibration:
    """The saved calibration of ``key`` from a folder (or a file). Raises :class:`FileNotFoundError` when there
    is none, and :class:`~cg_fast.runs.RunError` (naming what differs) for a file whose key is not ``key``."""
    path = Path(where)
    if path.is_dir() or not path.suffix:
        path = path / _file_name(key)
    if not path.exists():
        raise FileNotFoundError(f"no calibration for this key at {path}: run cg_fast.calibration.calibrate(...) "
                                "and save_calibration(...) first")
    cal = Calibration.from_json(read_json(path, "calibration file"), str(path))
    if fingerprint(cal.key) != fingerprint(key):
        raise RunError(f"{path} was calibrated for other settings ({settings_diff(cal.key, key)}); it would guide "
                       "the wrong steps: calibrate for these settings")
    return cal


def calibrated_policy(sampler: Any, guidance: Guidance, budget: int, folder: str | Path, *,
                      allow_calibration: bool = True, **kw: Any) -> Calibrated:
    """The calibrated policy for these settings: loaded from ``folder``, else (``allow_calibration``)
    calibrated now and saved there. A service passes ``allow_calibration=False``: no run at sampling time."""
    key_kw = {k: kw[k] for k in ("batch", "seed", "y", "anchor", "transport_mode", "model_id", "classifier_id")
              if k in kw}
    key = calibration_key(sampler, guidance, budget, **key_kw)
    try:
        return load_calibration(folder, key).policy
    except FileNotFoundError:
        if not allow_calibration:
            raise
    cal = calibrate(sampler, guidance, budget, **kw)
    save_calibration(cal, folder)
    return cal.policy
