"""`Pipeline`: cg_fast inside a service. Load once, warm up, then answer many small requests from many threads.

    pipe = Pipeline.from_config("dit-xl-2-256", checkpoint="DiT-XL-2-256x256.pt", guidance="cfg", scale=4.0,
                                steps="50", batch_sizes=(1, 2, 4, 8), device="cuda")
    pipe.warmup()                                    # every compile / capture / allocation happens here
    result = pipe([207, 360], seeds=[1, 2])          # from any thread; result.images, result.stats, .timings

Design:
- One worker thread owns the sampler; callers only enqueue a request and wait on its future, so the sampler,
  its CUDA-graph buffers and its caches are never shared between threads.
- Requests that agree on everything but labels and seeds (steps, method, policy, scale, output) are
  micro-batched: the worker takes up to ``max_batch`` rows that arrive within ``max_wait_ms`` of the first.
  Rows are padded to the smallest warmed batch size that holds them (a larger request is split), so memory is
  bounded by the warmed sizes and nothing new is captured or compiled after ``warmup``.
- Noise is counter-based (``Sampler(rng="counter")``): a sample depends on its seed alone, so a request gets
  the samples it would get alone. Bitwise when it is padded to the same batch size either way (the rows of a
  batch are computed independently by the same kernels); otherwise to the networks' batch-size rounding (about
  1e-6 on the CPU), well within 1e-5.
- A request's labels are checked when it is submitted: a bad one fails alone, its micro-batch runs without it.

This module knows nothing of command lines; it imports the sampler, models, guidance and policies.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from .guidance import CFG, ClassifierGuidance
from .kernels.rng import sample_seeds
from .policies import Policy, make_policy
from .sampler import Sampler

__all__ = ["Pipeline", "PipelineResult"]

_REQUEST_KEYS = ("steps", "method", "scale", "policy", "output")


@dataclass
class PipelineResult:
    """One request's answer.

    images:  [n, C, H, W] float32 in [-1, 1] (``output="float"``) or uint8 NHWC (``output="uint8"``); latents
             for a latent model without a decoder.
    labels, seeds: what each row was sampled with.
    stats:   this request's share of the accounting: denoiser rows and classifier gradients of its rows, and
             the micro-batch it ran in (rows, padding).
    timings: seconds spent queued, sampling (its micro-batch) and decoding.
    """

    images: Tensor
    labels: Tensor
    seeds: Tensor
    stats: dict[str, Any]
    timings: dict[str, float]


@dataclass
class _Request:
    labels: Tensor
    seeds: Tensor
    options: dict[str, Any]
    future: Future
    submitted: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> tuple:
        return tuple(repr(self.options.get(k)) for k in _REQUEST_KEYS)


class Pipeline:
    """A warmed-up sampler behind a thread-safe, micro-batching ``__call__`` (see the module docstring).

    Args:
        model:        the denoiser (with a ``cg_config``, as cg_fast's models have).
        classifier:   for classifier guidance (``guidance="classifier"``), else None.
        guidance:     "auto" (classifier if given, else CFG when the model has a null label, else none),
                      "classifier", "cfg" or "none".
        scale:        the guidance scale (default: the model's published one, else 1 / 4 for CFG).
        policy:       a cg_fast policy (default ``Compress(rate=5)``); cache: the cache mode (default as the
                      guidance's).
        steps, method: sampling steps and method (default: the model's published setting).
        batch_sizes:  the batch sizes warmed up and used; requests are padded to one of them or split.
        max_batch:    the most rows one micro-batch holds (default the largest batch size).
        max_wait_ms:  how long the first request of a micro-batch waits for company.
        output:       "float" or "uint8" (ADM's quantisation, NHWC).
        decode:       latents -> images (e.g. a VAE), run per request after sampling; None: none.
        device, backend, kernels: as Sampler's.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        classifier: torch.nn.Module | None = None,
        guidance: str = "auto",
        scale: float | None = None,
        policy: Policy | None = None,
        cache: str | None = None,
        steps: str | int | None = None,
        method: str | None = None,
        batch_sizes: Sequence[int] = (1, 2, 4, 8, 16),
        max_batch: int | None = None,
        max_wait_ms: float = 5.0,
        output: str = "float",
        decode: Any = None,
        device: str | torch.device | None = None,
        backend: str = "auto",
        kernels: str = "auto",
    ) -> None:
        sizes = sorted({int(b) for b in batch_sizes})
        if not sizes or sizes[0] < 1:
            raise ValueError(f"batch_sizes must be positive integers, got {batch_sizes!r}")
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        self.model = model.to(self.device).eval()
        self.classifier = classifier.to(self.device).eval() if classifier is not None else None
        self.sampler = Sampler.from_model(self.model, steps=steps, method=method, rng="counter", backend=backend,
                                          kernels=kernels)
        self.config = self.model.cg_config
        self.batch_sizes = tuple(sizes)
        self.max_batch = int(max_batch or sizes[-1])
        self.max_wait = max_wait_ms / 1000.0
        self.decode = decode
        self._default = {"steps": steps, "method": method, "scale": scale, "policy": policy, "output": output}
        self._kind = self._guidance_kind(guidance)
        self._cache = cache
        self._samplers: dict[tuple, Sampler] = {}
        self._warm: set[tuple] = set()
        self.counters = {"warmup_signatures": 0, "new_signatures_after_warmup": 0, "requests": 0, "batches": 0,
                         "padded_rows": 0}
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._seed_counter = itertools.count()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._serve, name="cg_fast-pipeline", daemon=True)
        self._worker.start()

    # -- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, name: str, *, checkpoint: str | None = None, classifier: str | None = None,
                    classifier_checkpoint: str | None = None, random_weights: bool = False,
                    dtype: torch.dtype | None = None, **options: Any) -> "Pipeline":
        """A pipeline from a named config (``cg_fast.models.list_configs()``) or a checkpoint file.

        ``checkpoint`` loads the weights (a named config needs one unless ``random_weights``); a ``name`` that
        is a file is loaded with ``load_checkpoint``. ``classifier`` / ``classifier_checkpoint`` likewise.
        """
        from pathlib import Path

        from .models import create, load, load_checkpoint
        from .models.testing import randomize_

        def build(n: str | None, ckpt: str | None) -> torch.nn.Module | None:
            if n is None and ckpt is None:
                return None
            if n is None or Path(n).is_file():
                return load_checkpoint(ckpt or n, dtype=dtype)
            m = create(n, dtype=dtype)
            if ckpt is not None:
                return load(m, ckpt)
            if not random_weights:
                raise ValueError(f"{n}: pass checkpoint=... (nothing is downloaded), or random_weights=True")
            return randomize_(m)

        return cls(build(name, checkpoint), classifier=build(classifier, classifier_checkpoint), **options)

    def _guidance_kind(self, kind: str) -> str:
        if kind == "auto":
            kind = "classifier" if self.classifier is not None else ("cfg" if self.config.null_label is not None
                                                                     else "none")
        if kind not in ("classifier", "cfg", "none"):
            raise ValueError(f"guidance must be 'auto', 'classifier', 'cfg' or 'none', got {kind!r}")
        if kind == "classifier" and self.classifier is None:
            raise ValueError("guidance='classifier' needs a classifier")
        return kind

    # -- per-request settings -------------------------------------------------------------------------------
    def _options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = set(overrides) - set(_REQUEST_KEYS)
        if unknown:
            raise TypeError(f"unknown request option(s) {sorted(unknown)}: a request may override {_REQUEST_KEYS}")
        opts = {**self._default, **{k: v for k, v in overrides.items() if v is not None}}
        if isinstance(opts["policy"], str):
            opts["policy"] = make_policy(opts["policy"])
        if opts["output"] not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {opts['output']!r}")
        return opts

    def _sampler_for(self, opts: dict[str, Any]) -> Sampler:
        key = (opts["steps"], opts["method"])
        if key == (self._default["steps"], self._default["method"]):
            return self.sampler
        if key not in self._samplers:
            self._samplers[key] = Sampler.from_model(self.model, steps=opts["steps"], method=opts["method"],
                                                     rng="counter", backend=self.sampler.backend,
                                                     kernels=self.sampler.kernels)
        return self._samplers[key]

    def _guidance(self, opts: dict[str, Any]) -> ClassifierGuidance | CFG | None:
        from .guidance import Compress

        policy = opts["policy"] if opts["policy"] is not None else Compress(rate=5)
        scale = opts["scale"]
        if self._kind == "classifier":
            s = scale if scale is not None else (self.config.guidance_scale or 1.0)
            return ClassifierGuidance(self.classifier, s, policy=policy, cache=self._cache or "compress")
        if self._kind == "cfg":
            w = scale if scale is not None else (self.config.guidance_scale or 4.0)
            return self.sampler.resolve_cfg(CFG(w, policy=policy, cache=self._cache or "drop"))
        return None

    def _num_classes(self) -> int | None:
        if self._kind == "classifier":
            return self.classifier.cg_config.num_classes if hasattr(self.classifier, "cg_config") else None
        return self.config.num_classes

    # -- public API -----------------------------------------------------------------------------------------
    def warmup(self, batch_sizes: Sequence[int] | None = None, **overrides: Any) -> dict[str, int]:
        """Run every batch size once (for the default options, or ``overrides``), so that everything compiled,
        captured or allocated is done now. Returns the counters."""
        for b in batch_sizes or self.batch_sizes:
            if b not in self.batch_sizes:
                raise ValueError(f"warmup batch size {b} is not one of the pipeline's batch_sizes {self.batch_sizes}")
            labels = torch.zeros(b, dtype=torch.long)
            self._submit(labels, torch.zeros(b, dtype=torch.int64), overrides, warm=True).result()
        return dict(self.counters)

    def __call__(self, labels: Sequence[int] | Tensor | int, seeds: Sequence[int] | Tensor | None = None,
                 **overrides: Any) -> PipelineResult:
        """Sample one image per label; ``seeds`` (one per label) make the request reproducible (default: fresh
        seeds from the pipeline's counter). ``overrides``: steps, method, scale, policy, output."""
        labels = torch.as_tensor([labels] if isinstance(labels, int) else labels, dtype=torch.long).reshape(-1)
        n = labels.numel()
        if n == 0:
            raise ValueError("a request needs at least one label")
        if seeds is None:
            with self._lock:
                start = next(self._seed_counter)
                for _ in range(n - 1):
                    next(self._seed_counter)
            seeds = sample_seeds(0x5EED, range(start, start + n))
        from .kernels.rng import as_seeds

        seeds = as_seeds(seeds, n)
        k = self._num_classes()
        if k is not None and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ValueError(f"labels must lie in [0, {k}), got {labels.tolist()}")
        return self._submit(labels, seeds, overrides).result()

    def memory(self) -> dict[str, Any]:
        """What the pipeline holds: samplers, captured graphs (per sampler) and device memory in use."""
        samplers = [self.sampler, *self._samplers.values()]
        out: dict[str, Any] = {"samplers": len(samplers), "graphs": sum(len(s._graph_cache) for s in samplers),
                               "batch_sizes": self.batch_sizes, "signatures": len(self._warm)}
        if self.device.type == "cuda":
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return out

    def close(self) -> None:
        """Stop the worker (pending requests are answered first)."""
        self._queue.put(None)
        self._worker.join()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- the worker -----------------------------------------------------------------------------------------
    def _submit(self, labels: Tensor, seeds: Tensor, overrides: dict[str, Any], warm: bool = False) -> Future:
        if not self._worker.is_alive():
            raise RuntimeError("the pipeline is closed")
        fut: Future = Future()
        opts = self._options(overrides)
        opts["_warm"] = warm
        self._queue.put(_Request(labels, seeds, opts, fut))
        return fut

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            group, rows, held = [first], first.labels.numel(), []
            deadline = time.perf_counter() + self.max_wait
            while rows < self.max_batch:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    held.append(nxt)
                    break
                if nxt.key == first.key and rows + nxt.labels.numel() <= self.max_batch:
                    group.append(nxt)
                    rows += nxt.labels.numel()
                else:
                    held.append(nxt)
            for r in held:  # other settings wait for their own batch (order kept)
                self._queue.put(r)
            try:
                self._run_group(group)
            except BaseException as e:  # noqa: BLE001 -- answer every waiting caller
                for r in group:
                    if not r.future.done():
                        r.future.set_exception(e)

    def _run_group(self, group: list[_Request]) -> None:
        opts = group[0].options
        sampler = self._sampler_for(opts)
        guidance = self._guidance(opts)
        labels = torch.cat([r.labels for r in group])
        seeds = torch.cat([r.seeds for r in group])
        start = time.perf_counter()
        outs, stats_total = [], {"denoiser_rows": 0, "classifier_grads": 0}
        for c0 in range(0, labels.numel(), self.batch_sizes[-1]):  # split what no batch size holds
            lab, sd = labels[c0:c0 + self.batch_sizes[-1]], seeds[c0:c0 + self.batch_sizes[-1]]
            size = next(b for b in self.batch_sizes if b >= lab.numel())
            pad = size - lab.numel()
            if pad:  # padding rows: label 0, seeds that no request uses
                lab = torch.cat([lab, torch.zeros(pad, dtype=lab.dtype)])
                sd = torch.cat([sd, torch.full((pad,), -1, dtype=sd.dtype)])
            sig = (size, tuple(repr(opts.get(k)) for k in _REQUEST_KEYS))
            if sig not in self._warm:
                self._warm.add(sig)
                self.counters["warmup_signatures" if opts["_warm"] else "new_signatures_after_warmup"] += 1
            y = lab.to(self.device) if (self.config.class_cond or guidance is not None) else None
            out = sampler.sample((size, *self.config.input_shape), y, guidance, seeds=sd, device=self.device)
            outs.append(out.x[: size - pad] if pad else out.x)
            stats_total["denoiser_rows"] += out.stats.denoiser_rows
            stats_total["classifier_grads"] += out.stats.classifier_grads
            self.counters["padded_rows"] += pad
        x = torch.cat(outs)
        sampling = time.perf_counter() - start
        self.counters["batches"] += 1
        self.counters["requests"] += 0 if opts["_warm"] else len(group)
        rows = labels.numel()
        offset = 0
        for r in group:
            n = r.labels.numel()
            xi = x[offset:offset + n]
            offset += n
            t_dec = time.perf_counter()
            if self.decode is not None:
                with torch.no_grad():
                    xi = self.decode(xi)
            if opts["output"] == "uint8":
                from .eval.npz import to_uint8

                xi = to_uint8(xi)
            share = n / rows
            r.future.set_result(PipelineResult(
                images=xi.detach().cpu() if self.device.type != "cpu" else xi.detach().clone(),
                labels=r.labels, seeds=r.seeds,
                stats={"denoiser_rows": stats_total["denoiser_rows"] * share,
                       "classifier_grads": stats_total["classifier_grads"],
                       "batch_rows": rows, "requests_in_batch": len(group)},
                timings={"queue": start - r.submitted, "sampling": sampling, "decode": time.perf_counter() - t_dec}))
