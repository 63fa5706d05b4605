"""cg_fast in diffusers, and diffusers models in cg_fast (the ``[diffusers]`` extra; tested: diffusers 0.42.1).

The entry point of the integration; it re-exports the two halves and owns nothing else:

- :class:`CompressGuidance` (``diffusers_guider``): Compress Guidance as a diffusers guider, for modular
  pipelines (``pipe.update_components(guider=CompressGuidance(...))``): the unconditional batch only at the
  steps a cg_fast policy guides, the cached direction with every cache mode in between (spec §3-§4, §6).
- adapters and :func:`diffusers_sampler` (``diffusers_adapters``): ``UNet2DModel``, ``UNet2DConditionModel`` (with
  given prompt embeddings) and ``DiTTransformer2DModel`` in :class:`cg_fast.Sampler`, with their scheduler's
  settings read from its config.

Importing this module without diffusers raises an ImportError that says how to install it; ``import cg_fast``
never imports it.
"""
from __future__ import annotations

from . import require

require("diffusers")

from .diffusers_adapters import (  # noqa: E402
    DiTAdapter,
    UNet2DConditionAdapter,
    UNet2DModelAdapter,
    diffusers_sampler,
    sampler_settings,
)
from .diffusers_guider import CompressGuidance  # noqa: E402

__all__ = ["CompressGuidance", "UNet2DModelAdapter", "UNet2DConditionAdapter", "DiTAdapter", "diffusers_sampler",
           "sampler_settings"]
