"""Ahead-of-time exports of cg_fast models with static shapes: ONNX (with a parity check against ONNX Runtime
on the CPU) and AOTInductor ``.pt2`` packages (the denoiser, and the classifier gradient: forward + backward).

    path = export_onnx(model, "unet.onnx", batch_size=4)      # inputs x, t (, y); output "out"
    err = onnx_max_abs_diff(model, path, example_inputs(model, 4))
    aoti_package(denoiser_program(model, x, t, y), "unet.pt2")            # torch._inductor.aoti_load_package
    aoti_package(classifier_grad_program(clf, x, t, y), "grad.pt2")      # (x, t, y) -> (g, logits)

The classifier gradient is ``g = grad_x log_softmax(classifier(x, t))[y]`` (what ``ClassifierGuidance.gradient``
computes): ``torch.export`` refuses ``autograd.grad``, so ``torch.func.grad`` is traced with ``make_fx`` (the
parameters through ``functional_call``, baked in as constants) and the traced graph is exported.

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

__all__ = ["export_onnx", "onnx_max_abs_diff", "denoiser_program", "classifier_grad_program", "aoti_package"]


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


class _Call(nn.Module):
    """``model(x, t)`` or ``model(x, t, y)`` as a module's forward (for ``torch.export``)."""

    def __init__(self, model: nn.Module, with_y: bool) -> None:
        super().__init__()
        self.model, self.with_y = model, with_y

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x, t, y) if self.with_y else self.model(x, t)


def denoiser_program(model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor | None = None) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model(x, t[, y])`` (eval mode, no grad) with these static shapes."""
    args = tuple(v.detach() for v in (x, t, y) if v is not None)
    with torch.no_grad():
        return torch.export.export(_Call(model, y is not None).eval(), args, strict=False)


def classifier_grad_program(classifier: nn.Module, x: torch.Tensor, t: torch.Tensor,
                            y: torch.Tensor) -> torch.export.ExportedProgram:
    """``(x, t, y) -> (g, logits)`` exported: ``g`` the gradient of ``log_softmax(classifier(x, t))[rows, y]``
    summed over rows with respect to ``x`` (ClassifierGuidance.gradient), ``logits`` the forward's output."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.func import functional_call, grad

    params = {k: v.detach() for k, v in classifier.named_parameters()}
    buffers = {k: v.detach() for k, v in classifier.named_buffers()}

    def selected(x_in: torch.Tensor, t_in: torch.Tensor, y_in: torch.Tensor):
        logits = functional_call(classifier, (params, buffers), (x_in, t_in))
        log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
        rows = torch.arange(logits.shape[0], device=logits.device)
        return log_probs[rows, y_in.view(-1)].sum(), logits

    def gradient(x_in: torch.Tensor, t_in: torch.Tensor, y_in: torch.Tensor):
        g, logits = grad(selected, argnums=0, has_aux=True)(x_in, t_in, y_in)
        return g, logits

    args = (x.detach(), t.detach(), y.detach())
    with torch.enable_grad():
        graph = make_fx(gradient)(*args)
    return torch.export.export(graph, args, strict=False)


def aoti_package(program: torch.export.ExportedProgram, path: str | os.PathLike) -> Path:
    """Compile ``program`` with AOTInductor into the ``.pt2`` package ``path`` (seconds to minutes: a C++
    compile). Load it with ``torch._inductor.aoti_load_package(path)``, or from C++ (AOTIModelPackageLoader)."""
    path = Path(path)
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path
