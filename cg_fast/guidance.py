"""Guidance (stage 3 of the data flow): classifier guidance and classifier-free guidance (spec §4-§6).

A guidance object holds the *what* (classifier and scale, or CFG scale and null label), the *when* (a
policy from :mod:`cg_fast.policies`, re-exported here) and the *what in between* (a cache mode from
:mod:`cg_fast.cache`). It computes fresh guidance only at the policy's steps; the step kernel applies it.

    from cg_fast.guidance import Full, Compress, EarlyStop, UniformSkip, Interval, Calibrated
    ClassifierGuidance(classifier, scale=1.0, policy=Compress(rate=5, k=1, final=2), cache="compress")
    CFG(scale=4.0, policy=Compress(rate=5, k=1), cache="drop")   # null label and channels: the model's
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import CACHE_MODES, CachePlan, cache_plan, check_cache_args
from .policies import Calibrated, Compress, EarlyStop, Full, Interval, Policy, UniformSkip, make_policy

__all__ = ["ClassifierGuidance", "CFG", "ClassifierRecord", "classifier_log_prob",
           "Full", "Compress", "EarlyStop", "UniformSkip", "Interval", "Calibrated", "Policy", "make_policy",
           "CACHE_MODES"]


@dataclass
class ClassifierRecord:
    """One classifier evaluation at step j (spec §7): log p(y | x_j) and whether argmax == y, per row."""

    log_prob: Tensor
    correct: Tensor

    @property
    def loss(self) -> float:
        """Cross-entropy averaged over the batch."""
        return float(-self.log_prob.float().mean())

    @property
    def accuracy(self) -> float:
        return float(self.correct.float().mean())


def _record(logits: Tensor, y: Tensor) -> ClassifierRecord:
    log_probs = F.log_softmax(logits.float(), dim=-1)
    rows = torch.arange(logits.shape[0], device=logits.device)
    return ClassifierRecord(log_probs[rows, y].detach(), (logits.argmax(dim=-1) == y).detach())


def _check_logits(logits: Tensor, batch: int, y: Tensor, who: str) -> None:
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != batch:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"{who} must return logits of shape [B, K] = [{batch}, K], got {shape}")
    k = logits.shape[1]
    if bool((y >= k).any()):
        raise ValueError(f"labels out of range for the {who}: it has {k} classes but got label "
                         f"{int(y.max())}; labels must lie in [0, {k})")


def classifier_log_prob(classifier: Callable, x: Tensor, t: Tensor, y: Tensor,
                        check: bool = True) -> ClassifierRecord:
    """Evaluate a classifier without gradient (off-sampling diagnostics, spec §7).

    ``check`` validates the logits' shape and the label range (a host sync: do it once, not every step).
    """
    with torch.no_grad():
        logits = classifier(x, t)
    if check:
        _check_logits(logits, x.shape[0], y, "off-sampling classifier")
    return _record(logits, y)


@dataclass
class ClassifierGuidance:
    """Classifier guidance (Dhariwal & Nichol 2021) with a policy and a cache mode (spec §3-§5).

    Args:
        classifier: ``classifier(x, t) -> logits [B, K]``, t the original training timesteps.
        scale:      s, the classifier scale (``--classifier_scale`` of guided-diffusion).
        policy:     which steps compute g_j (default: CompG, ``Compress(rate=5, k=1, final=2)``).
        cache:      drop | compress | reuse | momentum (spec §4); compress is the paper's method.
        beta:       momentum weight of the old state (cache='momentum').
        decay:      gamma, applied to h at skipped steps (cache='momentum').
    """

    classifier: Callable[[Tensor, Tensor], Tensor]
    scale: float = 1.0
    policy: Policy = field(default_factory=Compress)
    cache: str = "compress"
    beta: float = 0.0
    decay: float = 1.0
    num_classes: int | None = field(default=None, init=False, repr=False)  # seen at the first gradient
    kind = "classifier"

    def __post_init__(self) -> None:
        if not callable(self.classifier):
            raise TypeError("classifier must be callable as classifier(x, t) -> logits [B, K]")
        _check_common(self)

    @property
    def guide_scale(self) -> float:
        """The GUIDE_S column: s."""
        return float(self.scale)

    def plan(self, mask: list[bool]) -> CachePlan:
        """Per-step cache weights for ``mask`` (a calibrated policy's weights replace m_j under compress)."""
        return cache_plan(mask, self.cache, self.beta, self.decay, self.policy.weights(len(mask)))

    def gradient(self, x: Tensor, t: Tensor, y: Tensor, check: bool = True) -> tuple[Tensor, ClassifierRecord]:
        """g = grad_x log softmax(classifier(x, t))[y] (one forward + backward), and the on-sampling record.

        ``check`` validates the logits' shape and the label range (a host sync: once per run suffices).
        """
        if torch.is_inference_mode_enabled():
            # autograd is off for good inside inference_mode; step out of it for this one backward pass,
            # on copies (inference tensors cannot be recorded for backward)
            with torch.inference_mode(False):
                try:
                    g, rec = self.gradient(x.clone(), t.clone(), y.clone(), check)
                except RuntimeError as e:
                    if "nference" not in str(e):
                        raise
                    raise RuntimeError(
                        "classifier guidance needs autograd, and the classifier's parameters were created under "
                        "torch.inference_mode(), which cannot be differentiated: build or load the classifier "
                        "outside inference_mode, and sample under torch.no_grad() instead") from e
            return g.clone(), rec
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = self.classifier(x_in, t)
            if check:
                _check_logits(logits, x.shape[0], y, "classifier")
                self.num_classes = int(logits.shape[1])
            log_probs = F.log_softmax(logits, dim=-1)
            selected = log_probs[torch.arange(len(logits), device=logits.device), y.view(-1)]
            (g,) = torch.autograd.grad(selected.sum(), x_in)
        return g, _record(logits.detach(), y)


@dataclass
class CFG:
    """Classifier-free guidance with the DiT convention ``eps = eps_u + w (eps_c - eps_u)`` (spec §6).

    Args:
        scale:      w (1 = conditional only).
        null_label: the label of the unconditional pass; None (default): the model's own
                    (``cg_config.null_label``, ``num_classes`` for DiT), filled in by the Sampler.
        policy:     which steps run the unconditional pass (default: ``Compress(rate=5, k=1)``).
        cache:      drop (the authors' code) | compress | reuse | momentum.
        channels:   how many leading channels are guided: "auto" (default) = the model's convention (DiT's
                    sample.py guides 3 of its 4 latent channels; other models all), "all" or None = every
                    channel, or an int n (the first n).
        batched:    run the conditional and unconditional passes as one 2B batch (else two passes).
        doubled_noise: draw each step's noise for the doubled 2B batch and use the first B rows, as DiT's
                    sample.py and diffusers' DiTPipeline do, so that the same seed gives their samples
                    (default False: one B-row draw per step, as guided-diffusion).
    """

    scale: float = 4.0
    null_label: int | None = None
    policy: Policy = field(default_factory=Compress)
    cache: str = "drop"
    beta: float = 0.0
    decay: float = 1.0
    channels: int | str | None = "auto"
    batched: bool = True
    doubled_noise: bool = False
    kind = "cfg"

    def __post_init__(self) -> None:
        _check_common(self)
        if self.null_label is not None and (isinstance(self.null_label, bool) or not isinstance(self.null_label, int)
                                            or self.null_label < 0):
            raise ValueError(f"null_label must be a non-negative integer or None (the model's), "
                             f"got {self.null_label!r}")
        ch = self.channels
        if not (ch is None or ch in ("auto", "all") or (isinstance(ch, int) and not isinstance(ch, bool) and ch >= 1)):
            raise ValueError(f"channels must be 'auto' (the model's convention), 'all', None (all) or a positive "
                             f"integer, got {ch!r}")
        for name in ("batched", "doubled_noise"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def guide_scale(self) -> float:
        """The GUIDE_S column: w - 1, since eps = eps_c + (w - 1) a (spec §6)."""
        return float(self.scale) - 1.0

    def plan(self, mask: list[bool]) -> CachePlan:
        """Per-step cache weights for ``mask`` (a calibrated policy's weights replace m_j under compress)."""
        return cache_plan(mask, self.cache, self.beta, self.decay, self.policy.weights(len(mask)))


def _check_common(g) -> None:
    if not isinstance(g.policy, Policy):
        raise TypeError(f"policy must be a cg_fast.guidance policy (Full(), Compress(...), ...), got "
                        f"{type(g.policy).__name__}")
    if isinstance(g.scale, bool) or not isinstance(g.scale, (int, float)) or not math.isfinite(g.scale):
        raise ValueError(f"scale must be a finite number, got {g.scale!r}")
    check_cache_args(g.cache, g.beta, g.decay)
