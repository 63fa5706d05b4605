"""Guidance policies (spec §3): which sampling steps compute fresh guidance.

A policy is a pure function of the number of steps ``N`` (and, for :class:`Interval`, of the schedule's
noise levels) computed once before the loop, so control flow inside the loop is static. Masks are in
sampling order: index ``j = 0`` is the first, noisiest step; the paper counts ``t = N - 1 - j``.

:class:`Calibrated` is the one policy that is measured rather than written down: its guided steps and their
weights come from a calibration run (:mod:`cg_fast.calibration`), and its weights replace the compress
multipliers ``m_j`` (spec §4). This module only holds the result; the measuring run and the DP live there.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Union

from .schedules import SpacedSchedule

__all__ = ["Policy", "Full", "Compress", "EarlyStop", "UniformSkip", "Interval", "Calibrated", "gaps",
           "make_policy", "POLICY_NAMES"]

Steps = Union[int, SpacedSchedule]


def _num_steps(steps: Steps) -> int:
    n = steps.num_steps if isinstance(steps, SpacedSchedule) else steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"number of sampling steps must be a positive integer, got {steps!r}")
    return n


class Policy(ABC):
    """Base class: ``mask(N)`` says which of the N sampling steps (j = 0..N-1) get fresh guidance."""

    name: str = "policy"

    @abstractmethod
    def mask(self, steps: Steps) -> list[bool]:
        """Guided-step mask in sampling order; ``steps`` is N or a :class:`SpacedSchedule`."""

    def guided_steps(self, steps: Steps) -> list[int]:
        """Sampling-order indices ``j`` with fresh guidance."""
        return [j for j, g in enumerate(self.mask(steps)) if g]

    def weights(self, steps: Steps) -> list[float] | None:
        """Per-step weights that replace the compress multipliers ``m_j`` (spec §4), 0 where not guided;
        None (every policy but :class:`Calibrated`): ``cache="compress"`` uses the gaps ``m_j``."""
        return None


def gaps(mask: list[bool]) -> list[int]:
    """Compress multipliers (spec §4): ``m_j`` = distance to the next guided step, 0 where not guided.

    The last guided step counts to the end, so ``sum(m) == N`` whenever step 0 is guided.
    """
    n = len(mask)
    m = [0] * n
    nxt = n
    for j in range(n - 1, -1, -1):
        if mask[j]:
            m[j] = nxt - j
            nxt = j
    return m


def _check_final(final: int) -> int:
    if isinstance(final, bool) or not isinstance(final, int) or final < 0:
        raise ValueError(f"final must be an integer >= 0 (the number of last steps always guided), got {final!r}")
    return final


def _final_steps(n: int, final: int) -> set[int]:
    # t in {0 .. final-1}  <=>  j in {N-final .. N-1}
    return {n - 1 - t for t in range(min(final, n))}


@dataclass(frozen=True)
class Full(Policy):
    """Fresh guidance at every step (the ADM / DiT baseline)."""

    name = "full"

    def mask(self, steps: Steps) -> list[bool]:
        return [True] * _num_steps(steps)


@dataclass(frozen=True)
class Compress(Policy):
    """CompG schedule (spec §3): ``|G| = N // rate`` steps packed early by the power ``k``, plus ``final``.

    ``G = { N-1 - floor(c * i^k) : i = 0..|G|-1 } U { 0..final-1 }`` in the paper's t, with
    ``c = N / |G|^k``. ``k = 1`` is uniform; ``k > 1`` packs guided steps into the noisy start.
    Counts for N = 250, rate 5: k=1 -> 52, k=2 -> 49, k=3 -> 43, k=4 -> 38, k=5 -> 34, k=6 -> 30.
    If ``N < rate``, one step (j = 0) is kept so that the schedule is never empty.
    """

    rate: int = 5
    k: float = 1
    final: int = 2
    name = "compress"

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int) or self.rate < 1:
            raise ValueError(f"Compress rate must be an integer >= 1 (guide about 1 step in `rate`), got {self.rate!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, float)) or not 0 < self.k < math.inf:
            raise ValueError(f"Compress k must be a finite number > 0 (1 = uniform, >1 = packed early), "
                             f"got {self.k!r}")
        _check_final(self.final)

    def mask(self, steps: Steps) -> list[bool]:
        n = _num_steps(steps)
        size = max(1, n // self.rate)
        c = n / size ** self.k
        guided = {math.floor(c * i ** self.k) for i in range(size)}  # j = N-1-t = floor(c i^k)
        guided |= _final_steps(n, self.final)
        return [j in guided for j in range(n)]


@dataclass(frozen=True)
class EarlyStop(Policy):
    """Guide the first ``ceil(fraction * N)`` steps only (the paper's ES baseline)."""

    fraction: float = 0.2
    name = "early_stop"

    def __post_init__(self) -> None:
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float)) \
                or not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"EarlyStop fraction must lie in [0, 1], got {self.fraction!r}")

    def mask(self, steps: Steps) -> list[bool]:
        n = _num_steps(steps)
        count = math.ceil(self.fraction * n - 1e-9)  # tolerate 0.2 * 250 = 50.000000000000007
        return [j < count for j in range(n)]


@dataclass(frozen=True)
class UniformSkip(Policy):
    """Guide where ``(t + 1) % rate == 0`` or ``t < final`` (the paper's UG baseline), t = N-1-j."""

    rate: int = 5
    final: int = 2
    name = "uniform"

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int) or self.rate < 1:
            raise ValueError(f"UniformSkip rate must be an integer >= 1, got {self.rate!r}")
        _check_final(self.final)

    def mask(self, steps: Steps) -> list[bool]:
        n = _num_steps(steps)
        return [((n - 1 - j) + 1) % self.rate == 0 or (n - 1 - j) < self.final for j in range(n)]


@dataclass(frozen=True)
class Interval(Policy):
    """Guide where sigma_t = sqrt((1 - alpha_bar) / alpha_bar) lies in [lo, hi] (Kynkaanniemi et al. 2024).

    Needs the respaced schedule: ``mask(sampler.schedule)``.
    """

    lo: float = 0.0
    hi: float = math.inf
    name = "interval"

    def __post_init__(self) -> None:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (self.lo, self.hi)) \
                or not (0.0 <= self.lo <= self.hi) or math.isnan(self.hi):
            raise ValueError(f"Interval needs 0 <= lo <= hi, got lo={self.lo!r}, hi={self.hi!r}")

    def mask(self, steps: Steps) -> list[bool]:
        if not isinstance(steps, SpacedSchedule):
            raise TypeError("Interval.mask needs the respaced schedule (sigma per step), not a step count: "
                            "pass sampler.schedule")
        sig = steps.sigmas[::-1]  # sampling order
        return [bool(self.lo <= s <= self.hi) for s in sig]


@dataclass(frozen=True)
class Calibrated(Policy):
    """K guided steps and their weights, chosen by a calibration run (:mod:`cg_fast.calibration`).

    ``Calibrated(budget=K)`` alone is a request: sampling with it raises until it is calibrated. Get a usable
    one from ``cg_fast.calibration.calibrate(sampler, guidance, budget=K).policy`` (one full-guidance run on a
    small batch) or ``load_calibration(folder, key).policy`` (a saved JSON; no run at sampling time).

    Fields: ``guided`` the sampling-order indices j of the K guided steps (increasing, j = 0 first),
    ``step_weights`` their weights w_a (one per guided step), ``num_steps`` the N they were chosen for.
    With ``cache="compress"`` (the default of the calibrated method) the weights replace the gaps m_j in the
    G_WEIGHT column; with ``drop`` / ``reuse`` / ``momentum`` only the mask is used.
    """

    budget: int
    guided: tuple[int, ...] = ()
    step_weights: tuple[float, ...] = ()
    num_steps: int | None = None
    name = "calibrated"

    def __post_init__(self) -> None:
        if isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1:
            raise ValueError(f"Calibrated budget must be an integer >= 1 (the number of guided steps), "
                             f"got {self.budget!r}")
        if not self.guided:
            return
        n, g = self.num_steps, list(self.guided)
        if not isinstance(n, int) or n < 1 or len(g) != len(self.step_weights) or len(g) > self.budget \
                or g != sorted(set(g)) or g[0] < 0 or g[-1] >= n:
            raise ValueError(f"Calibrated needs increasing guided steps in [0, num_steps), one weight each and at "
                             f"most budget={self.budget} of them; got guided={self.guided!r}, "
                             f"step_weights={self.step_weights!r}, num_steps={n!r}")

    def _check(self, steps: Steps) -> int:
        n = _num_steps(steps)
        if not self.guided:
            raise ValueError("Calibrated(budget=...) has not been calibrated: use "
                             "cg_fast.calibration.calibrate(sampler, guidance, budget).policy, or "
                             "load_calibration(folder, key).policy for a saved one")
        if n != self.num_steps:
            raise ValueError(f"this calibration chose steps for N = {self.num_steps} sampling steps, not {n}: "
                             "calibrate for this sampler (steps and method are part of the calibration's key)")
        return n

    def mask(self, steps: Steps) -> list[bool]:
        n = self._check(steps)
        guided = set(self.guided)
        return [j in guided for j in range(n)]

    def weights(self, steps: Steps) -> list[float]:
        n = self._check(steps)
        w = [0.0] * n
        for j, wj in zip(self.guided, self.step_weights):
            w[j] = float(wj)
        return w


POLICY_NAMES = ("full", "compress", "early_stop", "uniform", "interval")


def make_policy(name: str, **params) -> Policy:
    """A policy from its name (CLI and configs): full, compress, early_stop, uniform, interval."""
    classes = {"full": Full, "compress": Compress, "early_stop": EarlyStop, "uniform": UniformSkip,
               "interval": Interval}
    if name not in classes:
        raise ValueError(f"unknown guidance policy {name!r}: use one of {POLICY_NAMES}")
    return classes[name](**params)
