"""The sampling loop: DDPM ancestral, DDIM and DPM-Solver++ 2M with guidance at planned steps (spec §3-§6).

Data flow per step j (j = 0 is the noisiest step):

    schedule table row j ──┐
    x_j ── denoiser(x_j, t_j, y) ── o_j ──┤
                 (CFG, guided j: also the unconditional pass -> fresh d_j)
    z_j = randn_like(x_j)                  ├── step kernel ──> x_{j+1}, h
    x_j ── classifier grad (guided j) ── g_j ┘

With ``generator=None`` the random numbers are drawn exactly as guided-diffusion draws them (``randn(*shape)``
for x_0, then one ``randn_like(x)`` per step, after the model call, the last one masked), so with full
guidance ``torch.manual_seed(s)`` reproduces its samples on the CPU bit for bit.

With ``Sampler(rng="counter")`` every random number of sample i is a function of its own seed alone
(:mod:`cg_fast.kernels.rng`): x_T at the reserved step index, z_j computed inside the fused step kernel, so a
sample does not depend on its batch, its position, a restart or the device.
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from . import backends
from . import kernels as kernels_mod
from .engine import EagerRunner, GraphRunner, StepBuffers, StepProgram, module_signature
from .guidance import CFG, ClassifierGuidance, ClassifierRecord, classifier_log_prob
from .guidance import _record as classifier_record
from .kernels import rng as rng_mod
from .kernels.table import NUM_COLS, VARIANCE_TYPES, Col, schedule_columns
from .models.cg_config import CGConfig
from .schedules import NoiseSchedule, SpacedSchedule

__all__ = ["Sampler", "SampleOutput", "SamplingStats", "NonFiniteError", "ConfigOverrideWarning", "METHODS",
           "RNG_MODES"]

METHODS = ("ddpm", "ddim", "dpmpp2m")  # dpmpp2m: DPM-Solver++ 2M (deterministic, multistep; spec §5)
RNG_MODES = ("torch", "counter")  # Sampler(rng=...): guided-diffusion's generator order, or counter-based
Guidance = ClassifierGuidance | CFG


class NonFiniteError(FloatingPointError):
    """NaN or inf in a model output or a classifier gradient; the message names the step."""


class ConfigOverrideWarning(UserWarning):
    """A sampler setting given by hand contradicts the model's ``cg_config`` (one warning per sampler)."""


# the settings a Sampler takes from the model's config, and their values for a model without one
_LEGACY_DEFAULTS: dict[str, Any] = dict(learn_sigma=False, clip_denoised=True, prediction="eps", class_cond=True,
                                        variance="fixed_large", num_classes=None)


@dataclass
class SamplingStats:
    """Exact accounting of one sampling run.

    denoiser_passes:  number of model calls.
    denoiser_rows:    total batch rows the model processed (a CFG guided step adds 2B, a skipped one B).
    classifier_grads: number of classifier forward+backward calls.
    guided_steps:     sampling-order indices j with fresh guidance.
    on_sampling:      j -> log p(y | x_j) and accuracy of the guiding classifier (where computed, spec §7).
    off_sampling:     j -> the same from an independent classifier, at every step (when one is given).
    wall_time:        seconds for the whole loop.
    """

    denoiser_passes: int = 0
    denoiser_rows: int = 0
    classifier_grads: int = 0
    guided_steps: list[int] = field(default_factory=list)
    on_sampling: dict[int, ClassifierRecord] = field(default_factory=dict)
    off_sampling: dict[int, ClassifierRecord] = field(default_factory=dict)
    wall_time: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Counts and final diagnostics as plain numbers (for tables and JSON)."""
        out: dict[str, Any] = {
            "denoiser_passes": self.denoiser_passes,
            "denoiser_rows": self.denoiser_rows,
            "classifier_grads": self.classifier_grads,
            "guided_steps": len(self.guided_steps),
            "wall_time": self.wall_time,
        }
        for name, recs in (("on_sampling", self.on_sampling), ("off_sampling", self.off_sampling)):
            if recs:
                last = recs[max(recs)]
                out[f"{name}_loss"] = last.loss
                out[f"{name}_accuracy"] = last.accuracy
        return out


@dataclass
class SampleOutput:
    x: Tensor
    stats: SamplingStats


def model_config(model: Any) -> CGConfig | None:
    """The model's :class:`~cg_fast.models.CGConfig` (``model.cg_config``), or None when it has none."""
    cfg = getattr(model, "cg_config", None)
    return cfg if isinstance(cfg, CGConfig) else None


def _num_classes_of(model: Any) -> int | None:
    k = getattr(model, "num_classes", None)
    return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None


def _settings(cfg: CGConfig | None, given: dict[str, Any], model: Any) -> tuple[dict[str, Any], list[str]]:
    """Each setting: given by hand, else the model config's, else the legacy default; and the contradictions."""
    from_cfg = cfg.sampler_settings() if cfg is not None else {}
    if from_cfg.get("num_classes") is None:
        from_cfg["num_classes"] = _num_classes_of(model)
    out, clashes = {}, []
    for key, default in _LEGACY_DEFAULTS.items():
        mine, theirs = given.get(key), from_cfg.get(key)
        out[key] = mine if mine is not None else theirs if theirs is not None else default
        if mine is not None and theirs is not None and mine != theirs and cfg is not None:
            clashes.append(f"{key}={mine!r} (the config says {theirs!r})")
    return out, clashes


def _check_schedule(cfg: CGConfig, schedule: NoiseSchedule) -> str | None:
    want = NoiseSchedule.named(cfg.noise_schedule, cfg.diffusion_steps)
    if schedule.num_steps == want.num_steps and np.allclose(schedule.betas, want.betas, rtol=1e-9, atol=0):
        return None
    return (f"a schedule of {schedule.num_steps} training steps that is not the config's {cfg.noise_schedule!r} "
            f"over {cfg.diffusion_steps} (use Sampler.from_model, or "
            f"NoiseSchedule.named({cfg.noise_schedule!r}, {cfg.diffusion_steps}))")


def _check_number(name: str, value: Any, *, lo: float | None = None, integer: bool = False) -> None:
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if ok and integer:
        ok = float(value) == int(value)
    if not ok or not math.isfinite(float(value)) or (lo is not None and value < lo):
        what = "an integer" if integer else "a finite number"
        bound = f" >= {lo}" if lo is not None else ""
        raise ValueError(f"{name} must be {what}{bound}, got {value!r}")


class Sampler:
    """Guided diffusion sampler over a respaced schedule (ADM conventions).

    The easy way in is :meth:`from_model`, which takes everything from the model's ``cg_config``. The
    constructor does the same for every setting left at None; a setting given by hand that contradicts the
    model's config is used, with one :class:`ConfigOverrideWarning`.

    Args:
        model:         ``model(x, t, y=None) -> Tensor``; t a long tensor [B] of ORIGINAL training timesteps.
        schedule:      the training :class:`NoiseSchedule` (e.g. ``NoiseSchedule.linear(1000)``).
        steps:         ADM respacing: "250", "50", "ddim25", "10,15,20", or an int. Default "250".
        method:        "ddpm" (ancestral), "ddim" or "dpmpp2m" (DPM-Solver++ 2M, as diffusers'
                       ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_order=2``,
                       ``final_sigmas_type="zero"``; pair it with ``timesteps=`` to sample at diffusers' steps).
        timesteps:     instead of ``steps``: the ORIGINAL training timesteps to visit, strictly descending (the
                       model is called at exactly these; the last step goes on to the clean sample). E.g.
                       ``cg_fast.schedules.linspace_timesteps(1000, 20)`` is diffusers' "linspace" spacing.
        eta:           DDIM noise (0.0 = deterministic).
        learn_sigma:   the model returns 2C channels (eps, v) with learned-range variance (ADM, DiT).
        clip_denoised: clamp predicted x0 to [-1, 1] (pixel models; not for latents).
        prediction:    what the model predicts: "eps", "x0" or "v".
        class_cond:    pass y to the model; False for an unconditional model guided by a classifier.
        variance:      fixed variance when not learn_sigma: "fixed_large" (ADM default) or "fixed_small".
        num_classes:   label range to validate y against.
                       These six: None (default) = the model's ``cg_config``, else for a model without one
                       learn_sigma=False, clip_denoised=True, prediction="eps", class_cond=True,
                       variance="fixed_large", num_classes=the model's ``num_classes`` attribute if any.
        off_classifier: an independent classifier whose loss/accuracy is recorded every step (spec §7).
        check_finite:  raise on NaN/inf in model outputs and gradients, naming the step. None (default):
                       every step on the CPU; on a GPU flags are kept on the device and checked once at
                       the end, so no step pays a host sync ("deferred" forces that mode). False: no check.
        kernels:       step-kernel implementation: "auto" (Triton on CUDA, csrc on CPU, else the reference),
                       "reference" (bitwise guided-diffusion on the CPU), "triton" or "csrc".
        backend:       how the denoiser runs (cg_fast.backends): "auto" (CUDA: cudagraph; CPU: eager;
                       TensorRT only when asked for), "eager", "cudagraph" (whole steps replayed as CUDA graphs),
                       "compile" (torch.compile), "onnx" (ONNX Runtime), "tensorrt", "aoti" (AOTInductor
                       packages of the denoiser and the classifier gradient, cached on disk). A requested backend
                       that cannot run raises with what to install; only "auto" falls back.
        backend_options: keyword options of the backend (e.g. {"mode": "max-autotune"} for compile).
        rng:           where the noise comes from. "torch" (default): torch's generator in guided-diffusion's
                       order (bitwise parity with it). "counter": per-sample seeds (``sample(seeds=...)``),
                       noise computed in the step kernel from (seed, step, element) (cg_fast.kernels.rng),
                       so samples do not depend on batch, position, restart or device.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: NoiseSchedule,
        steps: str | int | Sequence[int] | None = None,
        method: str = "ddpm",
        *,
        timesteps: Sequence[int] | None = None,
        eta: float = 0.0,
        learn_sigma: bool | None = None,
        clip_denoised: bool | None = None,
        prediction: str | None = None,
        class_cond: bool | None = None,
        variance: str | None = None,
        off_classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
        num_classes: int | None = None,
        check_finite: bool | str | None = None,
        kernels: str = "auto",
        backend: str = "auto",
        backend_options: dict[str, Any] | None = None,
        rng: str = "torch",
    ) -> None:
        if not callable(model):
            raise TypeError("model must be callable as model(x, t, y=None) -> Tensor")
        if not isinstance(schedule, NoiseSchedule):
            raise TypeError("schedule must be a cg_fast.NoiseSchedule (e.g. NoiseSchedule.linear(1000)), "
                            f"got {type(schedule).__name__}")
        cfg = model_config(model)
        if cfg is not None and not cfg.is_denoiser:
            raise ValueError(f"{cfg.describe()} is a classifier, not a denoiser: sample from the diffusion model "
                             "and pass the classifier as ClassifierGuidance(classifier, scale)")
        if timesteps is not None and steps is not None:
            raise ValueError("pass either steps (an ADM respacing such as '50') or timesteps (explicit original "
                             "timesteps, descending), not both")
        if steps is None and timesteps is None:
            steps = "250"
        if steps is not None and (isinstance(steps, bool)
                                  or not isinstance(steps, (str, int, np.integer, list, tuple, range))):
            raise TypeError(f"steps must be a respacing string ('250', 'ddim25', '10,15,20'), a positive int or "
                            f"a list of section counts, got {steps!r}")
        if method not in METHODS:
            raise ValueError(f"unknown sampling method {method!r}: use one of {METHODS}")
        _check_number("eta", eta, lo=0.0)
        for name, flag in (("learn_sigma", learn_sigma), ("clip_denoised", clip_denoised),
                           ("class_cond", class_cond)):
            if flag is not None and not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be True, False or None (the model's config), got {flag!r}")
        if num_classes is not None:
            _check_number("num_classes", num_classes, lo=1, integer=True)
        given = dict(learn_sigma=learn_sigma, clip_denoised=clip_denoised, prediction=prediction,
                     class_cond=class_cond, variance=variance, num_classes=num_classes)
        settings, clashes = _settings(cfg, given, model)
        if settings["prediction"] not in kernels_mod.PREDICTIONS:
            raise ValueError(f"unknown prediction {settings['prediction']!r}: use one of {kernels_mod.PREDICTIONS}")
        if settings["variance"] not in VARIANCE_TYPES:
            raise ValueError(f"unknown variance {settings['variance']!r}: use one of {VARIANCE_TYPES}")
        if method != "ddim" and eta != 0.0:
            raise ValueError("eta is a DDIM parameter: use method='ddim' or leave eta at 0.0")
        if cfg is not None:
            bad_schedule = _check_schedule(cfg, schedule)
            if bad_schedule:
                clashes.insert(0, bad_schedule)
            if clashes:
                warnings.warn(f"Sampler: settings given by hand contradict the config of {cfg.describe()}: "
                              f"{'; '.join(clashes)}. They are used as given; leave them out (or use "
                              "Sampler.from_model) to sample as the model's reference implementation does.",
                              ConfigOverrideWarning, stacklevel=3)
        self.model = model
        self.model_config = cfg
        self.base_schedule = schedule
        self.schedule: SpacedSchedule = (schedule.respace(steps) if timesteps is None
                                         else schedule.at_timesteps(timesteps))
        self.method = method
        self.eta = float(eta)
        self.learn_sigma = bool(settings["learn_sigma"])
        self.clip_denoised = bool(settings["clip_denoised"])
        self.prediction = settings["prediction"]
        self.class_cond = bool(settings["class_cond"])
        self.variance = settings["variance"]
        self.off_classifier = off_classifier
        self.num_classes = settings["num_classes"]
        if check_finite not in (None, True, False, "deferred"):
            raise ValueError(f"check_finite must be None (auto), True, False or 'deferred', got {check_finite!r}")
        self.check_finite = check_finite
        if kernels != "auto" and kernels not in kernels_mod.IMPLEMENTATIONS:
            raise ValueError(f"unknown kernels {kernels!r}: use 'auto' or one of {kernels_mod.IMPLEMENTATIONS}")
        self.kernels = kernels
        backends.check_name(backend)
        self.backend = backend
        self.backend_options = dict(backend_options or {})
        self._denoisers: dict[tuple[str, str], Callable[..., Tensor]] = {}
        self._graph_cache: dict[tuple, tuple[GraphRunner, StepBuffers]] = {}
        self._classifier_graphs: dict[tuple, Callable] = {}  # graphed classifier gradients (onnx/tensorrt/compile)
        self._columns = schedule_columns(self.schedule, variance=self.variance, eta=self.eta)
        if rng not in RNG_MODES:
            raise ValueError(f"unknown rng {rng!r}: use one of {RNG_MODES}")
        self.rng = rng

    @classmethod
    def from_model(
        cls,
        model: Callable[..., Tensor],
        steps: str | int | Sequence[int] | None = None,
        method: str | None = None,
        **overrides: Any,
    ) -> "Sampler":
        """A sampler that samples ``model`` as its reference implementation does, from ``model.cg_config``.

        Schedule (``noise_schedule`` over ``diffusion_steps``), learned variance, prediction, class
        conditioning, clipping, fixed variance and label range come from the config; so do the defaults of
        ``steps`` (the published ``timestep_respacing``, else every training step) and ``method`` (guided-
        diffusion's ``--use_ddim``). CFG's null label and guided channels follow the config at sampling time.
        ``overrides`` are the constructor's keyword arguments (``schedule=`` too); one that contradicts the
        config is used and warned about once (:class:`ConfigOverrideWarning`).

            model = cg_fast.models.load_checkpoint("64x64_diffusion.pt")
            sampler = Sampler.from_model(model, steps="ddim25", method="ddim")
        """
        cfg = model_config(model)
        if cfg is None:
            raise TypeError(
                f"{type(model).__name__} has no cg_config, so Sampler.from_model cannot know how to sample it: "
                "build it with cg_fast.models.create(name), cg_fast.models.load_checkpoint(path), "
                "adm.create_unet(**parse_flags(flags).model) or dit.create(name), or use "
                "Sampler(model, schedule, steps, method, learn_sigma=..., clip_denoised=..., ...) with its settings")
        schedule = overrides.pop("schedule", None)
        if schedule is None:
            schedule = NoiseSchedule.named(cfg.noise_schedule, cfg.diffusion_steps)
        if steps is None and overrides.get("timesteps") is None:
            steps = cfg.timestep_respacing or str(cfg.diffusion_steps)
        return cls(model, schedule, steps, method if method is not None else cfg.method, **overrides)

    @property
    def num_steps(self) -> int:
        return self.schedule.num_steps

    # -- planning -------------------------------------------------------------------------------------------
    def guided_mask(self, guidance: Guidance | None) -> list[bool]:
        """The guided-step mask of ``guidance``'s policy over this sampler's steps (sampling order)."""
        if guidance is None:
            return [False] * self.num_steps
        return guidance.policy.mask(self.schedule)

    def table(self, guidance: Guidance | None) -> Tensor:
        """The float32 ``[N, NUM_COLS]`` coefficient table for one run (schedule + guidance columns)."""
        table = self._columns.clone()
        if guidance is not None:
            plan = guidance.plan(self.guided_mask(guidance))
            table[:, Col.GUIDE_S] = guidance.guide_scale
            table[:, Col.H_DECAY] = torch.tensor(plan.h_decay, dtype=torch.float64).float()
            table[:, Col.G_WEIGHT] = torch.tensor(plan.g_weight, dtype=torch.float64).float()
        return table

    # -- backends -------------------------------------------------------------------------------------------
    def _resolve_backend(self, device: torch.device) -> str:
        return backends.resolve(self.backend, device)

    def _denoiser(self, backend: str, device: torch.device) -> Callable[..., Tensor]:
        """The model as run by ``backend`` (built once per backend and device, then reused)."""
        if backend in ("eager", "cudagraph"):  # cudagraph: the eager module, captured inside whole-step graphs
            return self.model
        key = (backend, str(device))
        if key not in self._denoisers:
            self._denoisers[key] = backends.make_denoiser(self.model, backend, **self.backend_options)
        return self._denoisers[key]

    # -- validation -----------------------------------------------------------------------------------------
    def resolve_cfg(self, cfg: CFG) -> CFG:
        """``cfg`` with its null label and guided channels filled in from the model (spec §6).

        ``null_label=None`` takes the model's null label (DiT: ``num_classes``); ``channels="auto"`` takes the
        model's convention (DiT's sample.py: the first 3 latent channels; other models: all channels).
        """
        mc = self.model_config
        own_null = mc.null_label if mc is not None else getattr(self.model, "null_label", None)
        if isinstance(own_null, bool) or not isinstance(own_null, int):
            own_null = None
        null = cfg.null_label
        if null is None:
            if own_null is None:
                raise ValueError("CFG needs the label of the unconditional pass, and this model declares none "
                                 "(no cg_config.null_label): pass CFG(..., null_label=N) for a model trained "
                                 "with label dropout, N its null class")
            null = own_null
        elif own_null is not None and null != own_null:
            if self.num_classes is not None and null > self.num_classes:
                raise ValueError(f"CFG null_label={null} is out of range for {mc.describe() if mc else 'the model'}"
                                 f" ({self.num_classes} classes, null label {own_null}): leave null_label out "
                                 "to use the model's")
            warnings.warn(f"CFG null_label={null} differs from the model's null label {own_null}",
                          ConfigOverrideWarning, stacklevel=3)
        elif own_null is None and mc is not None and self.num_classes is not None and null >= self.num_classes:
            raise ValueError(f"{mc.describe()} has {self.num_classes} classes and no null label (it was not trained "
                             "for classifier-free guidance; guided-diffusion's ADM models are not): use "
                             "ClassifierGuidance, or a model with a null class")
        channels = cfg.channels
        if channels == "auto":
            channels = mc.cfg_channels if mc is not None else None
        elif channels == "all":
            channels = None
        if null == cfg.null_label and channels == cfg.channels:
            return cfg
        return replace(cfg, null_label=null, channels=channels)

    def _labels(self, y: Any, batch: int, guidance: Guidance | None, device: torch.device) -> Tensor | None:
        needs = self.class_cond or guidance is not None
        if y is None:
            if needs:
                why = "the model is class-conditional" if self.class_cond else "guidance needs a target class"
                raise ValueError(f"labels y are required ({why}): pass y as a LongTensor of shape [{batch}]")
            return None
        if isinstance(y, int) and not isinstance(y, bool):
            y = torch.full((batch,), y, dtype=torch.long)
        y = torch.as_tensor(y)
        if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex:
            raise TypeError(f"labels y must be integers (a LongTensor), got dtype {y.dtype}")
        if y.dim() != 1 or y.shape[0] != batch:
            raise ValueError(f"labels y must have shape [{batch}] (one per sample), got {tuple(y.shape)}")
        y = y.to(device=device, dtype=torch.long)
        if batch and int(y.min()) < 0:
            raise ValueError(f"labels must be >= 0, got {int(y.min())}")
        if self.num_classes is not None and batch and int(y.max()) >= self.num_classes:
            raise ValueError(f"labels out of range: the model has {self.num_classes} classes, got label "
                             f"{int(y.max())}; labels must lie in [0, {self.num_classes})")
        if isinstance(guidance, CFG):
            if not self.class_cond:
                raise ValueError("CFG needs a class-conditional model (class_cond=True)")
            if bool((y == guidance.null_label).any()):
                raise ValueError(f"a label equals the CFG null label {guidance.null_label}; the null label is "
                                 "reserved for the unconditional pass")
        return y

    def _check_output(self, o: Tensor, x: Tensor, rows: int) -> None:
        c = x.shape[1] if x.dim() > 1 else 1
        if not isinstance(o, Tensor):
            raise TypeError(f"the model must return a Tensor, got {type(o).__name__}")
        want = c * (2 if self.learn_sigma else 1)
        if o.dim() == x.dim() and o.shape[0] == rows and tuple(o.shape[2:]) == tuple(x.shape[2:]) \
                and o.shape[1] == want:
            return
        spatial = tuple(x.shape[2:])
        if o.dim() == x.dim() and o.shape[0] == rows and tuple(o.shape[2:]) == spatial:
            if self.learn_sigma and o.shape[1] == c:
                raise ValueError(f"learn_sigma=True but the model returned {c} channels (not 2 x {c} = eps and "
                                 "variance): pass learn_sigma=False")
            if not self.learn_sigma and o.shape[1] == 2 * c:
                raise ValueError(f"the model returned {2 * c} channels (eps and variance, as ADM/DiT with "
                                 f"learn_sigma) for {c}-channel x: pass learn_sigma=True")
        raise ValueError(f"model output has shape {tuple(o.shape)}; expected [{rows}, {want}, *{spatial}] "
                         f"(C = {c} channels of x, or 2C with learn_sigma=True)")

    def _device(self, noise: Tensor | None, device: Any) -> torch.device:
        if device is not None:
            return torch.device(device)
        if noise is not None:
            return noise.device
        params = getattr(self.model, "parameters", None)
        if callable(params):
            for p in params():
                return p.device
        return torch.device("cpu")

    # -- the loop -------------------------------------------------------------------------------------------
    def sample(
        self,
        shape: Sequence[int],
        y: Tensor | Sequence[int] | int | None = None,
        guidance: Guidance | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        progress: bool = False,
        off_classifier: Callable[[Tensor, Tensor], Tensor] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        device: Any = None,
        seeds: Sequence[int] | Tensor | None = None,
    ) -> SampleOutput:
        """Draw samples of ``shape`` ([B, C, ...]) for labels ``y`` with optional guidance.

        Args:
            shape:      output shape, batch first; images [B, C, H, W] or vectors [B, d].
            y:          class labels [B] (required for class-conditional models and for guidance).
            guidance:   :class:`ClassifierGuidance`, :class:`CFG` or None (unguided).
            generator:  draw all noise from it (same order as the global RNG); None: global RNG.
            noise:      the initial x (as guided-diffusion's ``noise=``); drawn when None.
            progress:   show a progress bar.
            off_classifier: overrides the sampler's independent classifier for this run (spec §7).
            callback:   called after every step with {"j", "t", "x", "guided", "guidance"}; "guidance" is
                        the step's fresh guidance (classifier gradient g_j, or the CFG direction
                        eps_c - eps_u) at guided steps, else None (see cg_fast.eval.GuidanceTrace).
            device:     where to sample (default: the noise's, else the model's, else CPU).
            seeds:      ``rng="counter"`` only: one seed per sample (uint64 values); sample i's noise depends
                        on seeds[i] alone. For sample indices of a run seed S use
                        ``cg_fast.kernels.rng.sample_seeds(S, indices)``. None: the seeds of samples 0..B-1
                        of a run seed drawn from ``generator`` (or the global RNG).
        Returns:
            :class:`SampleOutput` with ``x`` (float32) and exact ``stats``.
        """
        if guidance is not None and not isinstance(guidance, (ClassifierGuidance, CFG)):
            raise TypeError(f"guidance must be ClassifierGuidance, CFG or None, got {type(guidance).__name__}")
        shape = _check_shape(shape)
        if noise is not None:
            noise = _as_noise(noise, shape)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if isinstance(guidance, CFG):
            guidance = self.resolve_cfg(guidance)
        dev = self._device(noise, device)
        batch, n = shape[0], self.num_steps
        y = self._labels(y, batch, guidance, dev)
        off_clf = off_classifier if off_classifier is not None else self.off_classifier
        cfg = guidance if isinstance(guidance, CFG) else None

        mask = self.guided_mask(guidance)
        stateful = guidance is not None and guidance.plan(mask).stateful
        rows = self.table(guidance).to(dev)[:, None, :].expand(n, batch, NUM_COLS).contiguous()
        ts = torch.as_tensor(self.schedule.original_timesteps_in_sampling_order(), device=dev)
        ts = ts[:, None].expand(n, batch).contiguous()  # t_j per row, original training timesteps
        y2 = ts2 = None
        if cfg is not None:
            y2 = torch.cat([y, torch.full_like(y, cfg.null_label)])
            ts2 = torch.cat([ts, ts], dim=1)
        backend = self._resolve_backend(dev)
        graphed = backend == "cudagraph"

        check = self.check_finite
        deferred = check == "deferred" or (check is None and dev.type != "cpu")
        immediate = check is True or (check is None and dev.type == "cpu")
        bad = torch.zeros(n, dtype=torch.bool, device=dev) if deferred else None

        # x at j = 0: ADM draws th.randn(*shape) unless noise is given.
        sample_seeds = _counter_seeds(self.rng, seeds, batch, generator, dev)
        if noise is not None:
            x = noise.detach().to(device=dev, dtype=torch.float32).clone()
        elif sample_seeds is not None:  # counter-based: x_T at the reserved step index (rng.py item 3)
            x = rng_mod.counter_normal(sample_seeds, rng_mod.XT_STEP, shape)
        elif generator is None:
            x = torch.randn(*shape, device=dev)
        else:
            x = torch.randn(shape, generator=generator, device=dev)
        runner, bufs = self._runner(backend, guidance, x, y, y2, rows[0], ts[0], None if ts2 is None else ts2[0],
                                    stateful, generator, expose=callback is not None,
                                    seeds=sample_seeds if self.method != "dpmpp2m" else None)
        # counter-based noise: the step index j per step (dpmpp2m draws no noise after x_T)
        step_js = torch.arange(n, device=dev) if bufs.seeds is not None else None

        stats = SamplingStats(guided_steps=[j for j, g in enumerate(mask) if g])
        rows_per_pass = 2 * batch if cfg is not None else batch
        start = time.perf_counter()
        for j in _progress(range(n), progress, self.method):
            guided = mask[j]
            if off_clf is not None:  # diagnostics at x_j, before the step (spec §7)
                stats.off_sampling[j] = classifier_log_prob(off_clf, bufs.x, ts[j], y, check=(j == 0))
            if graphed:  # static buffers: copy the step's inputs in, draw its noise outside the graph
                bufs.coef.copy_(rows[j])
                bufs.t.copy_(ts[j])
                if ts2 is not None:
                    bufs.t2.copy_(ts2[j])
                if bufs.z is not None:
                    bufs.draw_noise(generator)
                elif step_js is not None:
                    bufs.step_index.copy_(step_js[j:j + 1])
            else:
                bufs.coef, bufs.t = rows[j], ts[j]
                bufs.t2 = None if ts2 is None else ts2[j]
                if step_js is not None:
                    bufs.step_index = step_js[j:j + 1]
            out = runner.run(guided)  # x_{j+1} and h, in place (spec §4-§6)
            # exact accounting
            if cfg is not None and guided:
                stats.denoiser_passes += 1 if cfg.batched else 2
                stats.denoiser_rows += rows_per_pass
            else:
                stats.denoiser_passes += 1
                stats.denoiser_rows += batch
            if "log_prob" in out:
                stats.classifier_grads += 1
                stats.on_sampling[j] = ClassifierRecord(out["log_prob"], out["correct"])
            self._finite_flags(out, j, ts[j], immediate, bad)
            if callback is not None:
                callback({"j": j, "t": ts[j], "x": bufs.x, "guided": guided, "guidance": out.get("guidance")})
        if bad is not None and bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise NonFiniteError(f"NaN or inf in a model output or classifier gradient at sampling step j={j} "
                                 f"(timestep t={int(ts[j, 0])})")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stats.wall_time = time.perf_counter() - start
        # a captured graph's x buffer is reused by the next run: hand out a copy
        return SampleOutput(x=bufs.x.clone() if graphed else bufs.x, stats=stats)

    def _runner(self, backend: str, guidance: Guidance | None, x: Tensor, y: Tensor | None, y2: Tensor | None,
                coef0: Tensor, t0: Tensor, t20: Tensor | None, stateful: bool,
                generator: torch.Generator | None,
                expose: bool = False, seeds: Tensor | None = None) -> tuple[EagerRunner | GraphRunner, StepBuffers]:
        """The step program and its buffers, holding ``x`` (and y, h) for this run.

        Eager: built per run. CUDA graphs: built once per (shape, guidance kind, models, options) and kept,
        so later runs only copy their x and labels into the captured buffers and replay.
        """
        graphed = backend == "cudagraph"
        cfg = guidance if isinstance(guidance, CFG) else None
        clf = guidance if isinstance(guidance, ClassifierGuidance) else None
        # everything the captured program depends on (per-step numbers live in the buffers, not here)
        key = (tuple(x.shape), str(x.device), guidance.kind if guidance is not None else "none", stateful,
               cfg.batched if cfg else None, cfg.channels if cfg else None, cfg.doubled_noise if cfg else None,
               module_signature(clf.classifier) if clf else None, module_signature(self.model),
               self.method, self.prediction, self.learn_sigma, self.clip_denoised, self.class_cond,
               kernels_mod.resolve(x, self.kernels), y is None, expose, seeds is None) if graphed else None
        if graphed and key in self._graph_cache:
            runner, bufs = self._graph_cache[key]
            bufs.x.copy_(x)
            for state in (bufs.h, bufs.prev):
                if state is not None:
                    state.zero_()
            for dst, src in ((bufs.y, y), (bufs.y2, y2), (bufs.seeds, seeds)):
                if dst is not None:
                    dst.copy_(src)
            # the label check ran in the first capture's warm-up, maybe for another guidance object
            known = clf.num_classes if clf is not None else None
            if clf is not None and known is None:
                known = runner.meta["classifier"].num_classes
            if known is not None and int(y.max()) >= known:
                raise ValueError(f"labels out of range for the classifier: it has {known} classes but "
                                 f"got label {int(y.max())}")
            return runner, bufs

        deterministic = self.method == "dpmpp2m"
        bufs = StepBuffers(x=x, z=torch.empty_like(x) if seeds is None and not deterministic else None,
                           coef=coef0.clone(), t=t0.clone(),
                           h=torch.zeros_like(x) if stateful else None,
                           y=y.clone() if graphed and y is not None else y,  # graphs own their buffers
                           t2=None if t20 is None else t20.clone(), y2=y2,
                           seeds=None if seeds is None else seeds.clone(),
                           step_index=None if seeds is None else torch.zeros(1, dtype=torch.int64, device=x.device),
                           double_noise=bool(cfg is not None and cfg.doubled_noise),
                           prev=torch.zeros_like(x) if deterministic else None)
        first_grad = [True]
        grad_graph = backends.classifier_graph(clf.classifier, backend, x.device, self._classifier_graphs,
                                               module_signature(clf.classifier),
                                               self.backend_options) if clf is not None else None

        def classifier_grad(xx: Tensor, tt: Tensor, yy: Tensor):
            check, first_grad[0] = first_grad[0], False
            if grad_graph is None or check:
                return clf.gradient(xx, tt, yy, check=check)  # label/shape check once (a host sync)
            g, logits = grad_graph(xx, tt, yy)  # onnx / tensorrt / compile on CUDA: replayed from a graph
            return g, classifier_record(logits, yy)

        checked: set[str] = set()

        def check_output(o: Tensor, fresh: Tensor | None) -> None:
            for name, v in (("o", o), ("fresh", fresh)):
                if v is not None and name not in checked:
                    self._check_output(v, bufs.x, bufs.x.shape[0])
                    checked.add(name)

        kind = "none" if guidance is None else guidance.kind
        program = StepProgram(
            model=self._denoiser(backend, x.device), guide=kind, class_cond=self.class_cond,
            step=kernels_mod.step_function(self.method),
            step_kw=dict(impl=self.kernels, guide=kind, prediction=self.prediction,
                         learned_var=self.learn_sigma, clip=self.clip_denoised,
                         cfg_channels=cfg.channels if cfg is not None else None),
            classifier=classifier_grad if clf is not None else None,
            cfg_batched=cfg.batched if cfg is not None else True,
            # eager: the noise is drawn inside the body, where guided-diffusion draws it (dpmpp2m draws none)
            draw_noise=None if graphed or bufs.z is None else (lambda: bufs.draw_noise(generator)),
            check_output=check_output,
            expose_guidance=expose)
        if not graphed:
            return EagerRunner(program, bufs), bufs
        runner = GraphRunner(program, bufs)
        runner.meta["classifier"] = clf  # its gradient() is what the guided graph captures
        self._graph_cache[key] = (runner, bufs)
        return runner, bufs

    @staticmethod
    def _finite_flags(out: dict[str, Tensor], j: int, t: Tensor, immediate: bool, bad: Tensor | None) -> None:
        if immediate:
            for key, what in (("ok_model", "model output"), ("ok_grad", "classifier gradient")):
                if key in out and not bool(out[key]):
                    raise NonFiniteError(f"NaN or inf in the {what} at sampling step j={j} (timestep t={int(t[0])})")
        elif bad is not None:
            ok = out["ok_model"] & out["ok_grad"] if "ok_grad" in out else out["ok_model"]
            bad[j] = ~ok


def _counter_seeds(mode: str, seeds: Sequence[int] | Tensor | None, batch: int,
                   generator: torch.Generator | None, device: torch.device) -> Tensor | None:
    """The per-sample seeds of a ``rng="counter"`` run (int64 [B] on ``device``), None for ``rng="torch"``.

    Without ``seeds``: the seeds of samples 0..B-1 of a run seed drawn from ``generator`` (or the global RNG),
    so ``torch.manual_seed`` still fixes a counter-based run.
    """
    if mode != "counter":
        if seeds is not None:
            raise ValueError("seeds= needs counter-based noise: Sampler(..., rng='counter')")
        return None
    if seeds is None:
        gen_device = generator.device if generator is not None else "cpu"
        run_seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=gen_device))
        return rng_mod.sample_seeds(run_seed, batch).to(device)
    return rng_mod.as_seeds(seeds, batch, device)


def _progress(it: range, enabled: bool, desc: str):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=f"{desc} sampling", unit="step")


def _check_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, (torch.Size, tuple, list)) and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in shape):
        out = tuple(int(v) for v in shape)
        if len(out) >= 2 and all(v >= 1 for v in out):
            return out
    raise ValueError(f"shape must be [B, C, ...]: a tuple of at least two positive integers, got {shape!r}")


def _as_noise(noise: Any, shape: tuple[int, ...]) -> Tensor:
    if isinstance(noise, np.ndarray):
        noise = torch.from_numpy(noise)
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a torch.Tensor (or a numpy array) of shape {shape}, "
                        f"got {type(noise).__name__}")
    if not noise.dtype.is_floating_point:
        raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    if tuple(noise.shape) != shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)} but shape is {shape}")
    return noise
