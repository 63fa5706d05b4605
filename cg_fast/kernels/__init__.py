"""Step kernels (stage 4 of the data flow): one fused pass per sampling step.

``ddpm_step`` / ``ddim_step`` dispatch to an implementation; all share the signature of the pure-PyTorch
reference in :mod:`cg_fast.kernels.reference`, which defines the semantics (spec §4-§6).
"""
from __future__ import annotations

from .reference import GUIDE_KINDS, PREDICTIONS, ddim_step_ref, ddpm_step_ref
from .table import NUM_COLS, Col, schedule_columns

__all__ = ["ddpm_step", "ddim_step", "ddpm_step_ref", "ddim_step_ref", "Col", "NUM_COLS",
           "schedule_columns", "GUIDE_KINDS", "PREDICTIONS"]

ddpm_step = ddpm_step_ref
ddim_step = ddim_step_ref
