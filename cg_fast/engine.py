"""Execution engine: one sampling step as a program on static buffers, run eagerly or replayed as a CUDA graph.

The body of a step reads its inputs from fixed buffers and writes the new state in place:

    x, h  the state and the cache state (live across steps, updated in place by the fused step kernel)
    prev  DPM-Solver++ 2M only: the previous step's data prediction (live across steps, updated in place)
    z     the step's noise (drawn outside a graph, so eager and graph runs consume the same random numbers);
          None with counter-based noise, where instead
    seeds, step_index   the rows' sample seeds and the step j (int64, on the device) from which the fused
          kernel computes z itself (cg_fast.kernels.rng): a graph replays step j after a copy into step_index
    coef  the step's coefficient row [B, NUM_COLS] (table row j, see cg_fast.kernels.table)
    t     the original timesteps [B] (t2: the same twice, for the 2B CFG pass)

so the same code runs in three ways: eagerly (CPU, and any device), and on CUDA captured once per step
kind and replayed: a *skipped* step is one graph (denoiser + fused update), a *guided* step another
(denoiser + classifier forward/backward + fused update; for CFG the 2B denoiser pass + fused update).

.. warning:: Graph replay needs static shapes and a capture-safe model and classifier: no host
   synchronisation, no CPU tensors created, no branching on tensor values (cg_fast.models are). The
   model must not draw random numbers (put it in eval mode). One capture at a time per process.
.. warning:: Tensors returned by a replay (logits, flags) are the graph's own buffers: the runner copies
   them out before the next replay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["StepBuffers", "StepProgram", "EagerRunner", "GraphRunner", "module_signature"]


@dataclass
class StepBuffers:
    """The fixed tensors a step program reads and writes (see module docstring)."""

    x: Tensor
    z: Tensor | None
    coef: Tensor
    t: Tensor
    h: Tensor | None = None
    y: Tensor | None = None
    t2: Tensor | None = None
    y2: Tensor | None = None
    seeds: Tensor | None = None
    step_index: Tensor | None = None
    double_noise: bool = False  # draw noise for 2B rows, keep the first B (DiT's sample.py, DiTPipeline)
    prev: Tensor | None = None  # dpmpp2m: the previous data prediction (zeros before the first step)

    def draw_noise(self, generator: torch.Generator | None = None) -> None:
        """The step's noise into ``z``: randn is empty().normal_(), so this is the same random stream as
        guided-diffusion's one ``randn_like(x)`` per step. With ``double_noise`` the stream is that of
        ``randn_like`` on the doubled CFG batch [x; x], of which the conditional half's rows are kept."""
        if self.double_noise:
            z2 = torch.empty((2 * self.z.shape[0], *self.z.shape[1:]), dtype=self.z.dtype, device=self.z.device)
            self.z.copy_(z2.normal_(generator=generator)[: self.z.shape[0]])
        else:
            self.z.normal_(generator=generator)


@dataclass
class StepProgram:
    """One sampling step's body (spec §5-§6) over :class:`StepBuffers`.

    Args:
        model:        the denoiser ``model(x, t, y)`` (or ``model(x, t)`` when ``class_cond`` is False).
        step:         the step kernel, ``cg_fast.kernels.ddpm_step`` / ``ddim_step`` signature.
        step_kw:      the kernel's static keyword arguments (prediction, learned_var, clip, impl, ...).
        guide:        "none" | "classifier" | "cfg".
        classifier:   ``(x, t, y) -> (g, ClassifierRecord)``, the classifier gradient (classifier guidance).
        cfg_batched:  CFG guided steps as one 2B pass (else two B passes).
        draw_noise:   called inside the body where guided-diffusion draws the step noise (after the model
                      call); None when the caller fills ``z`` before the body (graph replay).
        check_output: called on the model output(s) the first time (shape checks, host-side only).
        expose_guidance: also return the fresh guidance of a guided step as ``out["guidance"]``: the
                      classifier gradient g_j, or the CFG direction eps_c - eps_u (guided channels only).
    """

    model: Callable[..., Tensor]
    step: Callable[..., Tensor]
    step_kw: dict[str, Any]
    guide: str = "none"
    class_cond: bool = True
    classifier: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Any]] | None = None
    cfg_batched: bool = True
    draw_noise: Callable[[], None] | None = None
    check_output: Callable[[Tensor, Tensor | None], None] | None = None
    expose_guidance: bool = False

    def __call__(self, b: StepBuffers, guided: bool) -> dict[str, Tensor]:
        """Run the step in place on ``b``. Returns device tensors only (no host sync): ``ok_model`` and, at
        classifier-guided steps, ``ok_grad``, ``log_prob`` and ``correct`` (the on-sampling record)."""
        with torch.no_grad():  # sampling builds no autograd graph (the classifier gradient enables its own)
            return self._body(b, guided)

    def _body(self, b: StepBuffers, guided: bool) -> dict[str, Tensor]:
        fresh: Tensor | None = None
        if self.guide == "cfg" and guided:
            if self.cfg_batched:
                o2 = self.model(torch.cat([b.x, b.x]), b.t2, b.y2)
                batch = b.x.shape[0]
                o, fresh = o2[:batch], o2[batch:]
            else:
                o = self.model(b.x, b.t, b.y)
                fresh = self.model(b.x, b.t, b.y2[b.x.shape[0]:])
        else:
            o = self.model(b.x, b.t, b.y) if self.class_cond else self.model(b.x, b.t)
        if self.check_output is not None:
            self.check_output(o, fresh)
        ok_model = torch.isfinite(o).all()
        if fresh is not None:
            ok_model = ok_model & torch.isfinite(fresh).all()
        if self.draw_noise is not None:
            self.draw_noise()  # guided-diffusion draws the step noise after the model call
        out: dict[str, Tensor] = {"ok_model": ok_model}
        if self.guide == "classifier" and guided:
            fresh, rec = self.classifier(b.x, b.t, b.y)
            out["log_prob"], out["correct"] = rec.log_prob, rec.correct
            out["ok_grad"] = torch.isfinite(fresh).all()
        if self.expose_guidance and fresh is not None:
            if self.guide == "cfg":  # the direction a = eps_c - eps_u on the guided channels (spec §6)
                c = self.step_kw.get("cfg_channels") or b.x.shape[1]
                out["guidance"] = o[:, :c] - fresh[:, :c]
            else:
                out["guidance"] = fresh.clone()
        if b.prev is not None:  # DPM-Solver++ 2M: deterministic, carries the previous data prediction
            self.step(b.x, o, b.coef, None, fresh=fresh, h=b.h, out=b.x, prev=b.prev, **self.step_kw)
        elif b.seeds is None:
            self.step(b.x, o, b.coef, b.z, fresh=fresh, h=b.h, out=b.x, **self.step_kw)
        else:  # counter-based noise, computed inside the step kernel from device buffers
            self.step(b.x, o, b.coef, None, fresh=fresh, h=b.h, out=b.x, seeds=b.seeds, step_index=b.step_index,
                      **self.step_kw)
        return out


class EagerRunner:
    """Runs the program directly: the CPU path, and the reference for graph replay."""

    def __init__(self, program: StepProgram, buffers: StepBuffers) -> None:
        self.program, self.buffers = program, buffers

    def run(self, guided: bool) -> dict[str, Tensor]:
        return self.program(self.buffers, guided)


class GraphRunner:
    """Captures the program once per step kind (skipped / guided) as a CUDA graph and replays it.

    The first call of each kind warms up (``warmup`` eager iterations, which also run the host-side checks
    and compile Triton kernels and pick cuDNN algorithms before anything is captured), then captures.
    Warm-up and capture run on one side stream of this runner, so per-stream library state (cuBLAS
    workspaces, handles) is created before the capture, and the captures sharing this runner's pool use the
    same stream, as the ``torch.cuda.graph`` docs ask. ``x`` and ``h`` are saved before the warm-up and
    restored after the capture (also when it fails), so the state advances exactly once per call (``prev``
    too, for DPM-Solver++).

    Both kinds share one memory pool. That is safe whatever order they are replayed in, since they never
    run concurrently (one stream) and every tensor a graph returns is kept alive in :attr:`graphs`, so the
    only memory two graphs can share is temporaries, dead when a replay ends.

    Everything runs under ``torch.cuda.device(x.device)``: the side stream, the warm-up, the capture and the
    replays use the buffers' device, not whichever device is current (a sampler on ``cuda:1``).

    ``meta`` holds whatever the caller wants to keep with the captured program (the sampler keeps the
    guidance object whose methods were captured).
    """

    #: CUDA graph primitives (``Stream``, ``stream``, ``current_stream``, ``CUDAGraph``, ``graph``,
    #: ``graph_pool_handle``). Tests substitute a CPU emulation of capture and replay.
    _api: Any = torch.cuda

    def __init__(self, program: StepProgram, buffers: StepBuffers, warmup: int = 2) -> None:
        if self._api is torch.cuda and buffers.x.device.type != "cuda":
            raise RuntimeError("GraphRunner needs CUDA tensors; use EagerRunner on the CPU")
        if warmup < 1:  # the first iteration runs host-side checks (a sync) that must not be captured
            raise ValueError(f"GraphRunner needs at least one warm-up iteration, got warmup={warmup}")
        self.program, self.buffers, self.warmup = program, buffers, warmup
        self.device = buffers.x.device  # captures, streams and replays live there, whichever device is current
        self.graphs: dict[bool, tuple[Any, dict[str, Tensor]]] = {}
        with self._api.device(self.device):
            self.pool = self._api.graph_pool_handle()
            self.stream = self._api.Stream(device=self.device)
        self.meta: dict[str, Any] = {}

    def _capture(self, guided: bool) -> tuple[Any, dict[str, Tensor]]:
        api, b = self._api, self.buffers
        state = [t for t in (b.x, b.h, b.prev) if t is not None]
        saved = [t.clone() for t in state]
        checker = self.program.check_output
        try:
            self.stream.wait_stream(api.current_stream(self.device))
            try:
                with api.stream(self.stream):
                    for _ in range(self.warmup):
                        self.program(b, guided)
            finally:
                api.current_stream(self.device).wait_stream(self.stream)
            self.program.check_output = None  # host-side: checked in the warm-up, not captured
            graph = api.CUDAGraph()
            with api.graph(graph, pool=self.pool, stream=self.stream):
                outs = self.program(b, guided)
        finally:
            self.program.check_output = checker
            for dst, src in zip(state, saved):  # undo the warm-up's steps
                dst.copy_(src)
        return graph, outs

    def run(self, guided: bool) -> dict[str, Tensor]:
        with self._api.device(self.device):
            if guided not in self.graphs:
                self.graphs[guided] = self._capture(guided)
            graph, outs = self.graphs[guided]
            graph.replay()
            return {k: v.clone() for k, v in outs.items()}  # the graph's own buffers: copy before the next replay


def module_signature(obj: Any) -> tuple:
    """What a captured graph bakes in about a model or classifier: its identity and the address, dtype
    and device of every parameter and buffer (a ``.half()`` or ``.to(device)`` replaces them, in-place
    weight loading keeps them). Part of the sampler's graph-cache key."""
    if not isinstance(obj, torch.nn.Module):
        return (id(obj),)
    tensors = list(obj.parameters()) + list(obj.buffers())
    return (id(obj), tuple((t.data_ptr(), t.dtype, str(t.device)) for t in tensors))
