"""The C++ runner from Python: :class:`CppRunner` runs a :class:`~cg_fast.Sampler`'s whole CompG loop in C++
(``csrc/runner/``, module ``cg_fast._runner``) over AOTInductor packages of the denoiser and the classifier
gradient, with counter-based noise, so its samples equal ``Sampler(rng="counter")``'s to float rounding.

    runner = CppRunner(sampler, guidance, batch=4)     # packages: compiled into the aoti cache, or loaded
    x = runner.sample(y, seeds)                         # == sampler.sample(..., seeds=seeds).x  (1e-5)
    runner.package_paths          # {"denoisers": {B: path}, "classifier_grad": path}: cg_fast::runner::Runner's

Without Python at run time: :func:`save_plan` writes the inputs to one file, and ``cg_fast_run`` (the program of
``csrc/runner/main.cpp``, :func:`build_program` compiles it against libtorch) samples from the plan and the
packages.

This module owns the translation Sampler -> runner inputs (config, table, timesteps, mask); the loop is C++.
CPU only; the extension is optional (``setup.py``): :func:`runner_unavailable` says why it is missing.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .guidance import CFG, ClassifierGuidance
from .kernels import rng as rng_mod
from .sampler import Sampler

__all__ = ["CppRunner", "runner_unavailable", "runner_inputs", "save_plan", "build_program"]

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def runner_unavailable() -> str | None:
    """None if the C++ runner extension can be imported, else why not and what to do."""
    try:
        from . import _runner  # noqa: F401
    except ImportError as e:
        return (f"the C++ runner extension cg_fast._runner is not built ({e}): it needs a C++ compiler when "
                "cg_fast is installed (make install; CG_FAST_REQUIRE_RUNNER=1 makes a failed build an error)")
    return None


def runner_inputs(sampler: Sampler, guidance: ClassifierGuidance | CFG | None) -> dict[str, Any]:
    """The loop's inputs that a Sampler derives for one guidance: ``config`` (keyword arguments of
    ``cg_fast._runner.Runner``), ``table`` float32 [N, NUM_COLS], ``timesteps`` int64 [N] and ``guided``
    bool [N]."""
    if isinstance(guidance, CFG):
        guidance = sampler.resolve_cfg(guidance)
    mask = sampler.guided_mask(guidance)
    kind = "none" if guidance is None else guidance.kind
    cfg = guidance if isinstance(guidance, CFG) else None
    config = dict(method=sampler.method, guide=kind, prediction=sampler.prediction, learned_var=sampler.learn_sigma,
                  clip=sampler.clip_denoised, class_cond=sampler.class_cond,
                  stateful=bool(guidance is not None and guidance.plan(mask).stateful),
                  cfg_batched=cfg.batched if cfg is not None else True,
                  cfg_channels=cfg.channels if cfg is not None else None,
                  null_label=cfg.null_label if cfg is not None else -1)
    if cfg is not None and cfg.doubled_noise:
        raise ValueError("the C++ runner draws counter-based noise; CFG(doubled_noise=True) is torch-generator "
                         "order only: leave it False")
    ts = torch.as_tensor(sampler.schedule.original_timesteps_in_sampling_order(), dtype=torch.int64)
    return {"config": config, "table": sampler.table(guidance).float().contiguous(), "timesteps": ts.contiguous(),
            "guided": torch.tensor(mask, dtype=torch.bool)}


def save_plan(sampler: Sampler, guidance: ClassifierGuidance | CFG | None, path: str | os.PathLike) -> Path:
    """Write :func:`runner_inputs` to ``path`` (``torch.save`` of a dict), the file ``cg_fast::runner::load_plan``
    and ``cg_fast_run`` read."""
    inp = runner_inputs(sampler, guidance)
    path = Path(path)
    torch.save({"config": inp["config"], "table": inp["table"], "timesteps": inp["timesteps"],
                "guided": inp["guided"]}, path)
    return path


def build_program(build_dir: str | os.PathLike, verbose: bool = False) -> Path:
    """Compile ``cg_fast_run`` (csrc/runner/main.cpp + the runner + its copy of the CPU step kernels) against the
    installed libtorch into ``build_dir``; returns the executable. Needs the source tree (an editable install)
    and a C++ compiler; takes a minute or two."""
    from torch.utils.cpp_extension import load

    sources = [CSRC / "runner" / name for name in ("main.cpp", "runner.cpp", "step_kernels.cpp")]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"the C++ runner's sources are not here ({', '.join(missing)}): build_program needs "
                                "cg_fast's source tree (pip install -e .)")
    Path(build_dir).mkdir(parents=True, exist_ok=True)
    flags = ["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fno-math-errno", "-fopenmp"]
    exe = load("cg_fast_run", [str(p) for p in sources], extra_cflags=flags, extra_ldflags=["-fopenmp"],
               build_directory=str(build_dir), is_python_module=False, is_standalone=True, verbose=verbose)
    return Path(exe)


class CppRunner:
    """A sampler's loop for one guidance and one batch size, run by the C++ runner (see the module docstring).

    Args:
        sampler:   a :class:`Sampler` (its model an ``nn.Module``); its method, settings and schedule are used.
        guidance:  :class:`ClassifierGuidance` (the classifier an ``nn.Module``), :class:`CFG` or None.
        batch:     the batch size B the packages are made for (CFG batched: also 2B).
        shape:     one sample's shape (default: the model's ``cg_config.input_shape``).
        cache_dir: the aoti package cache (default ``$CG_FAST_CACHE/aoti``).
    """

    def __init__(self, sampler: Sampler, guidance: ClassifierGuidance | CFG | None, batch: int,
                 shape: Sequence[int] | None = None, cache_dir: str | None = None) -> None:
        why = runner_unavailable()
        if why is not None:
            raise RuntimeError(why)
        from . import _runner
        from .backends.aoti import AotiClassifierGrad, AotiDenoiser

        if shape is None:
            cfg = getattr(sampler.model, "cg_config", None)
            if cfg is None:
                raise ValueError("pass shape= (one sample's shape, e.g. (3, 8, 8)): the model has no cg_config")
            shape = cfg.input_shape
        self.shape = (int(batch), *map(int, shape))
        self.inputs = runner_inputs(sampler, guidance)
        c = self.inputs["config"]
        den = AotiDenoiser(sampler.model, cache_dir=cache_dir)
        x = torch.zeros(self.shape)
        t = torch.zeros(batch, dtype=torch.int64)
        y = torch.zeros(batch, dtype=torch.int64) if c["class_cond"] else None
        paths = {int(batch): den.prepare(x, t, y)}
        if c["guide"] == "cfg" and c["cfg_batched"]:
            paths[2 * int(batch)] = den.prepare(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]))
        grad = ""
        if c["guide"] == "classifier":
            grad = str(AotiClassifierGrad(guidance.classifier, cache_dir=cache_dir).prepare(
                x, t, torch.zeros(batch, dtype=torch.int64)))
        self.package_paths = {"denoisers": {b: str(p) for b, p in paths.items()}, "classifier_grad": grad}
        self._runner = _runner.Runner(self.package_paths["denoisers"], grad, **c)

    def sample(self, y: Tensor | Sequence[int] | None, seeds: Tensor | Sequence[int]) -> Tensor:
        """Samples [B, ...] for labels ``y`` and per-sample ``seeds`` (as ``Sampler.sample(seeds=...)``)."""
        b = self.shape[0]
        s = rng_mod.as_seeds(seeds, b, torch.device("cpu"))
        yy = None if y is None else torch.as_tensor(y, dtype=torch.int64).reshape(b)
        i = self.inputs
        return self._runner.sample(i["table"], i["timesteps"], i["guided"], s, yy, list(self.shape))

    @property
    def stats(self) -> dict[str, int]:
        """Denoiser passes and classifier gradients of the last :meth:`sample`."""
        return {"denoiser_passes": self._runner.denoiser_passes, "classifier_grads": self._runner.classifier_grads}
