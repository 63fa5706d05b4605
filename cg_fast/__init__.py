"""cg_fast: fast, exact guided diffusion sampling with Compress Guidance (CompG).

    from cg_fast import NoiseSchedule, Sampler, ClassifierGuidance, CFG
    sampler = Sampler.from_model(cg_fast.models.load_checkpoint("64x64_diffusion.pt"))
    from cg_fast.guidance import Full, Compress, EarlyStop, UniformSkip, Interval

The specification is docs/compress-guidance (spec §1-§8); module by stage of the data flow:
``schedules`` -> (the denoiser, ``models``) -> ``policies`` / ``cache`` / ``guidance`` -> ``kernels``, driven by
``sampler``. ``testbeds.gmm`` is an exactly solvable Gaussian-mixture testbed.
"""
from .guidance import CFG, ClassifierGuidance
from .pipeline import Pipeline, PipelineResult
from .sampler import ConfigOverrideWarning, NonFiniteError, SampleOutput, Sampler, SamplingStats
from .schedules import NoiseSchedule, SpacedSchedule

__version__ = "0.1.0"
__all__ = ["NoiseSchedule", "SpacedSchedule", "Sampler", "SampleOutput", "SamplingStats", "ClassifierGuidance",
           "CFG", "NonFiniteError", "ConfigOverrideWarning", "Pipeline", "PipelineResult", "__version__"]
