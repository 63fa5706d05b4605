"""CUDA-graph replay of a denoiser forward and of a classifier's gradient, per static input signature.

Each distinct (shape, dtype, device, has-y) signature is captured once: warm-up on a side stream, then
``torch.cuda.graph`` capture with persistent input buffers. A call copies its inputs into the buffers and
replays; a replay launches the whole network at once (at batch 1 ADM-64 is ~10x faster than eager,
``shared/docs/gpu-anchors.md``, since the eager forward is bound by kernel launches).

Each call returns tensors of its own (a copy of the graph's static outputs, one device copy per call): a
caller may hold two results of one signature, as CFG's two unbatched passes do (the conditional output must
survive the unconditional call). ``clone_outputs=False`` returns the static outputs themselves, overwritten
by the next replay of the same signature, for callers that consume a result before the next call.
Capture, warm-up and replay run on the device of the inputs (``torch.cuda.device(x.device)``), whichever
device is current.
.. warning:: The module must be capture-safe: no host synchronisation, no CPU tensors created per call,
   no branching on tensor values (cg_fast.models are; guided-diffusion's own UNet is not).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["CUDAGraphDenoiser", "CUDAGraphClassifierGrad"]


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    inputs: tuple[Tensor | None, ...]
    outputs: tuple[Tensor, ...]


def _signature(*tensors: Tensor | None) -> tuple:
    return tuple(None if t is None else (tuple(t.shape), t.dtype, t.device) for t in tensors)


def _capture(api: Any, fn: Callable[..., tuple[Tensor, ...]], inputs: tuple[Tensor | None, ...], warmup: int,
             pool, stream, device: torch.device) -> _Captured:
    """Warm up on ``stream`` (cuDNN/cuBLAS choices, Triton compiles, autograd state), then capture on it."""
    static = tuple(None if t is None else t.detach().clone() for t in inputs)
    stream.wait_stream(api.current_stream(device))
    try:
        with api.stream(stream):
            for _ in range(warmup):
                fn(*static)
    finally:
        api.current_stream(device).wait_stream(stream)
    graph = api.CUDAGraph()
    with api.graph(graph, pool=pool, stream=stream):
        outputs = fn(*static)
    return _Captured(graph, static, outputs)


class _Graphed:
    #: CUDA graph primitives; tests substitute a CPU emulation of capture and replay.
    _api: Any = torch.cuda

    def __init__(self, warmup: int = 3, clone_outputs: bool = True) -> None:
        if self._api is torch.cuda and not torch.cuda.is_available():
            raise RuntimeError("CUDA graphs need a CUDA device")
        if warmup < 1:
            raise ValueError(f"CUDA graph capture needs at least one warm-up iteration, got warmup={warmup}")
        self.warmup = warmup
        self.clone_outputs = clone_outputs
        self._graphs: dict[tuple, _Captured] = {}
        # per device: the memory pool all its signatures share (their outputs are all kept alive) and the
        # stream of every warm-up and capture
        self._pools: dict[torch.device, tuple[Any, Any]] = {}

    def _pool_and_stream(self, device: torch.device) -> tuple[Any, Any]:
        if device not in self._pools:
            self._pools[device] = (self._api.graph_pool_handle(), self._api.Stream(device=device))
        return self._pools[device]

    def _replay(self, fn: Callable[..., tuple[Tensor, ...]], *inputs: Tensor | None) -> tuple[Tensor, ...]:
        for t in inputs:
            if t is not None and t.device.type != "cuda" and self._api is torch.cuda:
                raise ValueError(f"CUDA graph replay needs CUDA tensors, got a tensor on {t.device}")
        device = next(t.device for t in inputs if t is not None)
        key = _signature(*inputs)
        with self._api.device(device):  # capture and replay on the inputs' device, not the current one
            cap = self._graphs.get(key)
            if cap is None:
                pool, stream = self._pool_and_stream(device)
                cap = self._graphs[key] = _capture(self._api, fn, inputs, self.warmup, pool, stream, device)
            else:
                for dst, src in zip(cap.inputs, inputs):
                    if dst is not None:
                        dst.copy_(src)
            cap.graph.replay()
            if self.clone_outputs:
                return tuple(t.clone() for t in cap.outputs)
        return cap.outputs

    @property
    def num_graphs(self) -> int:
        """How many signatures have been captured."""
        return len(self._graphs)


class CUDAGraphDenoiser(_Graphed):
    """``model(x, t, y=None)`` replayed from a CUDA graph captured per input signature."""

    def __init__(self, model: Callable[..., Tensor], warmup: int = 3, clone_outputs: bool = True) -> None:
        super().__init__(warmup, clone_outputs)
        self.model = model

    def _forward(self, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor]:
        with torch.no_grad():
            return (self.model(x, t) if y is None else self.model(x, t, y),)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self._replay(self._forward, x, t, y)[0]


class CUDAGraphClassifierGrad(_Graphed):
    """``(x, t, y) -> (g, logits)``: the classifier's forward + backward to x, replayed from a graph.

    g = grad_x log softmax(classifier(x, t))[y] (ADM's cond_fn without the scale). TensorRT has no
    autograd, so the classifier stays in PyTorch; this graph makes its cost a single replay.
    """

    def __init__(self, classifier: Callable[[Tensor, Tensor], Tensor], warmup: int = 3,
                 clone_outputs: bool = True, eager_fallback: bool = False) -> None:
        super().__init__(warmup, clone_outputs)
        self.classifier = classifier
        self.eager_fallback = eager_fallback
        #: why the gradient runs eagerly (a capture failed and ``eager_fallback`` was set), else None
        self.eager_reason: str | None = None

    def _grad(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            logits = self.classifier(x_in, t)
            selected = torch.log_softmax(logits, dim=-1).gather(1, y.view(-1, 1)).sum()
            (g,) = torch.autograd.grad(selected, x_in)
        return g, logits.detach()

    def __call__(self, x: Tensor, t: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if self.eager_reason is not None:
            return self._grad(x, t, y)
        try:
            g, logits = self._replay(self._grad, x, t, y)
        except Exception as err:  # a classifier that cannot be captured (host syncs, CPU tensors, ...)
            if not self.eager_fallback or self.num_graphs:
                raise
            self.eager_reason = f"{type(err).__name__}: {err}"
            warnings.warn(f"cg_fast: the classifier gradient could not be captured in a CUDA graph "
                          f"({self.eager_reason[:300]}); it runs eagerly. Make the classifier capture-safe "
                          "(no host syncs, no CPU tensors per call; cg_fast.models are) to replay it.",
                          RuntimeWarning, stacklevel=2)
            return self._grad(x, t, y)
        return g, logits
