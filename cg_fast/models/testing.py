"""Helpers for tests, benchmarks and backend checks: random weights that give non-trivial outputs, and
example inputs that match a model's `cg_config`.

The released models zero-initialise their output layers (ADM) or adaLN layers (DiT), so a freshly built model
returns zeros; `randomize_` fills every parameter so that each block contributes.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["randomize_", "example_inputs"]


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fill all parameters with deterministic random values of unit-scale effect; returns `model`.

    Matrices and kernels get N(0, 1/fan_in); norm weights 1 + N(0, 0.1^2); other vectors N(0, 0.1^2).
    DiT's fixed `pos_embed` is left as it is. Values are drawn on the CPU, so results do not depend on device.
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "pos_embed":
            continue
        if p.ndim >= 2:
            fan_in = p[0].numel()
            value = torch.randn(p.shape, generator=g) / fan_in**0.5
        elif "norm" in name or name.startswith("out.0") or ".in_layers.0" in name or ".out_layers.0" in name:
            value = 1 + 0.1 * torch.randn(p.shape, generator=g)
        else:
            value = 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(value.to(p.device, p.dtype))
    return model


def example_inputs(
    model: nn.Module,
    batch_size: int = 2,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ...]:
    """(x, t) for a classifier, (x, t, y) for a class-conditional denoiser, (x, t) otherwise.

    x ~ N(0, 1) of `cg_config.input_shape`; t uniform in 0..diffusion_steps-1; y uniform over the classes.
    """
    cfg = model.cg_config
    if device is None:
        device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, *cfg.input_shape), generator=g).to(device, dtype)
    t = torch.randint(0, cfg.diffusion_steps, (batch_size,), generator=g).to(device)
    if cfg.kind != "adm-classifier" and cfg.class_cond:
        y = torch.randint(0, cfg.num_classes, (batch_size,), generator=g).to(device)
        return x, t, y
    return x, t
