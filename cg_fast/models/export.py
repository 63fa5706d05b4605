"""ONNX export of cg_fast models with static shapes, and a parity check against ONNX Runtime on the CPU.

    path = export_onnx(model, "unet.onnx", batch_size=4)      # inputs x, t (, y); output "out"
    err = onnx_max_abs_diff(model, path, example_inputs(model, 4))

Warnings: shapes are fixed at export (batch size and resolution); labels are part of the graph only for
class-conditional denoisers (a DiT exported with y=None always uses the null class). The `torch.export`-based
exporter (`dynamo=True`) is used; it needs the `onnx` and `onnxscript` packages.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .testing import example_inputs as _example_inputs

__all__ = ["export_onnx", "onnx_max_abs_diff"]


def _require(module: str, pip: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ImportError(f"this needs the {module} package: pip install {pip}") from None


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    inputs: Sequence[torch.Tensor] | None = None,
    *,
    batch_size: int = 1,
    opset_version: int | None = None,
) -> Path:
    """Export `model` (eval mode) to `path` with the shapes of `inputs` (default: `example_inputs(model, B)`)."""
    _require("onnx", "onnx")
    _require("onnxscript", "onnxscript")
    inputs = tuple(inputs) if inputs is not None else _example_inputs(model, batch_size)
    names = ["x", "t", "y"][: len(inputs)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                model, inputs, dynamo=True, input_names=names, output_names=["out"], opset_version=opset_version
            )
    finally:
        model.train(was_training)
    path = Path(path)
    program.save(str(path))
    return path


def onnx_max_abs_diff(model: nn.Module, path: str | os.PathLike, inputs: Sequence[torch.Tensor]) -> float:
    """Largest |onnxruntime(path)(inputs) - model(inputs)| (CPU execution provider)."""
    _require("onnxruntime", "onnxruntime")
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), inputs)}
    got = torch.from_numpy(session.run(None, feeds)[0])
    with torch.no_grad():
        want = model(*inputs).detach().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"ONNX output shape {tuple(got.shape)} != model output shape {tuple(want.shape)}")
    return (got.double() - want.double()).abs().max().item()
