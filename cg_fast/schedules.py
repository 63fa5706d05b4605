"""Noise schedules and timestep respacing (spec §2), with the float64 coefficient tables of ADM.

Stage 1 of the data flow: schedule -> denoiser -> guidance -> step kernel.

Everything here is plain float64 numpy, computed once. ``StepTable`` casts the per-step coefficients the
step kernels need to float32 (spec §5: "computed in float64 and used in float32, as ADM does"), so that a
sampling step only indexes a small device tensor.

Conventions (spec §2):
    T_train       number of training steps (1000); models are always called with an ORIGINAL timestep.
    N             number of respaced sampling steps.
    i = 0..N-1    index into the respaced schedule (i = 0 is the least noisy step).
    j = N-1-i     sampling-order index (j = 0 is the first, noisiest step).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["NoiseSchedule", "SpacedSchedule", "space_timesteps", "check_timesteps", "linspace_timesteps"]


class _Betas:
    """Tables shared by the training schedule and a respaced one (both hold float64 ``betas``)."""

    betas: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.betas.shape[0])

    @property
    def alphas_cumprod(self) -> np.ndarray:
        return np.cumprod(1.0 - self.betas, axis=0)


@dataclass(frozen=True, eq=False)
class NoiseSchedule(_Betas):
    """A discrete DDPM noise schedule: ``betas`` (float64, length T_train) and the tables derived from them.

    Build one with :meth:`linear`, :meth:`cosine` (ADM's definitions) or :meth:`from_betas`.
    """

    betas: np.ndarray

    def __post_init__(self) -> None:
        b = np.asarray(self.betas, dtype=np.float64)
        if b.ndim != 1 or b.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}")
        if not np.all(np.isfinite(b)) or np.any(b <= 0) or np.any(b > 1):
            raise ValueError("betas must be finite and lie in (0, 1]")
        object.__setattr__(self, "betas", b)

    # -- constructors (ADM `get_named_beta_schedule`) -------------------------------------------------------
    @classmethod
    def linear(cls, num_steps: int = 1000) -> "NoiseSchedule":
        """Ho et al.'s linear schedule, scaled so any ``num_steps`` spans the same range as 1000 steps."""
        _check_count(num_steps)
        scale = 1000 / num_steps
        return cls(np.linspace(scale * 0.0001, scale * 0.02, num_steps, dtype=np.float64))

    @classmethod
    def cosine(cls, num_steps: int = 1000, max_beta: float = 0.999) -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule: alpha_bar(t) = cos((t + 0.008) / 1.008 * pi / 2) ** 2."""
        _check_count(num_steps)

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
                 for i in range(num_steps)]
        return cls(np.array(betas, dtype=np.float64))

    @classmethod
    def from_betas(cls, betas: Sequence[float] | np.ndarray) -> "NoiseSchedule":
        """A schedule from explicit betas (any sequence of floats in (0, 1])."""
        return cls(np.asarray(betas, dtype=np.float64))

    @classmethod
    def named(cls, name: str, num_steps: int = 1000) -> "NoiseSchedule":
        """``"linear"`` or ``"cosine"``, as in guided-diffusion's ``--noise_schedule`` flag."""
        if name == "linear":
            return cls.linear(num_steps)
        if name == "cosine":
            return cls.cosine(num_steps)
        raise ValueError(f"unknown noise schedule {name!r}: use 'linear' or 'cosine'")

    def respace(self, steps: str | int | Sequence[int]) -> "SpacedSchedule":
        """The respaced schedule for an ADM respacing string ("250", "ddim25", "10,15,20") or step count."""
        use = space_timesteps(self.num_steps, steps)
        return SpacedSchedule.from_base(self, use)

    def at_timesteps(self, timesteps: Sequence[int] | np.ndarray) -> "SpacedSchedule":
        """The schedule over explicit ORIGINAL timesteps, given in sampling order (strictly descending).

        The sampler calls the model at exactly these timesteps and steps from each to the next, the last one
        to the clean sample (alpha_bar = 1). Unlike :meth:`respace`, a sequence here lists timesteps, not
        section counts."""
        return SpacedSchedule.from_base(self, check_timesteps(timesteps, self.num_steps))


def _check_count(n: int) -> None:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of steps must be a positive integer, got {n!r}")


def check_timesteps(timesteps: Sequence[int] | np.ndarray, num_timesteps: int) -> list[int]:
    """Explicit timesteps, checked: integers in [0, num_timesteps), strictly descending; returned ascending."""
    if isinstance(timesteps, (str, bytes)) or not hasattr(timesteps, "__len__"):
        raise TypeError(f"timesteps must be a sequence of integer timesteps (descending), got {timesteps!r}")
    values = np.asarray(timesteps)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"timesteps must be a non-empty 1-D sequence, got shape {values.shape}")
    if values.dtype == bool or not np.issubdtype(values.dtype, np.integer):
        if not (np.issubdtype(values.dtype, np.floating) and np.all(np.isfinite(values))
                and np.all(values == np.round(values))):
            raise TypeError(f"timesteps must be integers (original training timesteps), got {list(timesteps)!r}")
    ts = [int(v) for v in values]
    bad = [t for t in ts if not 0 <= t < num_timesteps]
    if bad:
        raise ValueError(f"timesteps must lie in [0, {num_timesteps - 1}] (the training schedule's range), "
                         f"got {bad[:5]}")
    if any(a <= b for a, b in zip(ts, ts[1:])):
        raise ValueError("timesteps must be strictly descending (sampling order, noisiest first), got "
                         f"{ts[:8]}{' ...' if len(ts) > 8 else ''}")
    return ts[::-1]


def linspace_timesteps(num_timesteps: int, num_steps: int) -> list[int]:
    """diffusers' ``timestep_spacing="linspace"``: ``num_steps`` timesteps from ``num_timesteps - 1`` down,
    evenly spaced and rounded (the last step then goes on to the clean sample). For ``Sampler(timesteps=...)``."""
    _check_count(num_timesteps)
    _check_count(num_steps)
    if num_steps > num_timesteps:
        raise ValueError(f"cannot take {num_steps} distinct timesteps out of {num_timesteps}")
    return [int(t) for t in np.linspace(0, num_timesteps - 1, num_steps + 1).round()[::-1][:-1]]


def space_timesteps(num_timesteps: int, section_counts: str | int | Sequence[int]) -> list[int]:
    """Which original timesteps a respaced sampler visits (ADM ``space_timesteps``), sorted ascending.

    ``section_counts`` is an int, a list of ints or a string: "250" (one section), "10,15,20" (the range
    split into equal sections, each strided evenly with that many steps), or "ddimN" (the stride ``s`` with
    ``len(range(0, T, s)) == N``, as DDIM's paper uses).
    """
    if isinstance(section_counts, str):
        text = section_counts.strip()
        if text.startswith("ddim"):
            try:
                desired = int(text[len("ddim"):])
            except ValueError:
                raise ValueError(f"bad respacing {section_counts!r}: expected 'ddimN' with an integer N") from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            if desired == num_timesteps:
                return list(range(num_timesteps))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride over {num_timesteps}")
        try:
            counts = [int(c) for c in text.split(",")]
        except ValueError:
            raise ValueError(
                f"bad respacing {section_counts!r}: use a step count like '250', sections like '10,15,20', "
                "or 'ddim25'") from None
    elif isinstance(section_counts, bool) or (not isinstance(section_counts, (int, np.integer))
                                               and any(isinstance(c, bool) for c in section_counts)):
        raise TypeError(f"respacing must be a step count, a list of section counts or a string like '250', "
                        f"got {section_counts!r}")
    elif isinstance(section_counts, (int, np.integer)):
        counts = [int(section_counts)]
    else:
        if any(not isinstance(c, (int, np.integer)) for c in section_counts):
            raise TypeError(f"respacing section counts must be integers, got {section_counts!r}")
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"respacing section counts must be positive integers, got {section_counts!r}")

    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start = 0
    taken: set[int] = set()
    for s, count in enumerate(counts):
        size = size_per + (1 if s < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide a section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            taken.add(start + round(cur))  # Python's round (banker's), as ADM
            cur += stride
        start += size
    return sorted(taken)


@dataclass(frozen=True, eq=False)
class SpacedSchedule(_Betas):
    """A respaced schedule: the diffusion over the kept timesteps, with ADM's float64 tables.

    ``timestep_map[i]`` is the ORIGINAL timestep of respaced index ``i``; models are called with it.
    The betas are recomputed from the kept alpha_bars (ADM ``SpacedDiffusion``), so that alpha_bar of the
    respaced chain equals the base alpha_bar at the kept steps.
    """

    betas: np.ndarray
    timestep_map: np.ndarray
    num_train_steps: int

    @classmethod
    def from_base(cls, base: NoiseSchedule, use_timesteps: Sequence[int]) -> "SpacedSchedule":
        keep = set(int(t) for t in use_timesteps)
        last = 1.0
        betas, tmap = [], []
        for i, ac in enumerate(base.alphas_cumprod):
            if i in keep:
                betas.append(1 - ac / last)
                last = ac
                tmap.append(i)
        return cls(np.array(betas, dtype=np.float64), np.array(tmap, dtype=np.int64), base.num_steps)

    # ADM GaussianDiffusion tables, float64 (names as in the DDPM/ADM papers).
    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def posterior_variance(self) -> np.ndarray:
        ac, acp = self.alphas_cumprod, self.alphas_cumprod_prev
        return self.betas * (1.0 - acp) / (1.0 - ac)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        # log of the posterior variance, with the first entry (0 at t = 0) replaced by the second.
        pv = self.posterior_variance
        if pv.shape[0] == 1:
            return np.log(np.maximum(pv, self.betas))
        return np.log(np.append(pv[1], pv[1:]))

    @property
    def sigmas(self) -> np.ndarray:
        """Noise level sigma_i = sqrt((1 - alpha_bar) / alpha_bar) of each respaced step (spec §3, interval)."""
        ac = self.alphas_cumprod
        return np.sqrt((1.0 - ac) / ac)

    def original_timesteps_in_sampling_order(self) -> np.ndarray:
        """``t_j`` for j = 0..N-1: the original timestep the model sees at sampling step j."""
        return self.timestep_map[::-1].copy()
