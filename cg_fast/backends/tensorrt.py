"""TensorRT backend: ONNX -> TensorRT engine per static signature, engines cached on disk.

Build: the denoiser is exported to ONNX (:func:`cg_fast.backends.onnxrt.export_denoiser`), parsed by
``tensorrt.OnnxParser`` and built with the requested precision flag ("fp16" or "bf16"; "fp32" adds none)
for exactly the shapes of the call (a static profile). Engines are cached by :class:`EngineCache` under a
key of the model-weights hash, shapes, precision, GPU name and compute capability and TensorRT version; a
stale engine is never found (the key changes), a corrupt one is deleted and rebuilt, writes are atomic.
In-place weight changes (``load_state_dict``) are noticed before every call
(:func:`~cg_fast.backends.engine_cache.state_signature`) and the weights hashed again; after writes through
``param.data`` call :meth:`TensorRTDenoiser.refresh`.

Run: inputs and the output stay on the GPU; ``execute_async_v3`` on the current CUDA stream. Inputs are
cast to the dtypes the engine declares (TensorRT 10 takes INT64 ``t``/``y`` as they are) and the output is
allocated with the engine's output dtype and shape.

.. warning:: Written against the TensorRT 10 Python API. It cannot run without an NVIDIA GPU and the
   ``tensorrt`` package; cg_fast's CI has neither, so only the cache logic is tested there.
.. warning:: TensorRT has no autograd: the classifier of classifier guidance stays in PyTorch (replayed
   from a CUDA graph by the sampler).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .engine_cache import EngineCache, EngineKey, state_signature, weights_hash

__all__ = ["TensorRTDenoiser", "PRECISIONS"]

PRECISIONS = ("fp32", "fp16", "bf16")


def _import_trt():
    try:
        import tensorrt as trt
    except ImportError:
        raise ImportError("the tensorrt backend needs NVIDIA TensorRT: pip install tensorrt "
                          "(Linux with an NVIDIA GPU)") from None
    return trt


def _torch_dtype(trt: Any, dt: Any) -> torch.dtype:
    """The torch dtype of a ``tensorrt.DataType`` (the members TensorRT 10 documents for I/O tensors)."""
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
             "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8, "BOOL": torch.bool}
    for name, torch_dtype in table.items():
        member = getattr(trt.DataType, name, None)
        if member is not None and dt == member:
            return torch_dtype
    raise TypeError(f"TensorRT I/O tensor of data type {dt} has no torch equivalent here")


class TensorRTDenoiser:
    """``model(x, t, y=None)`` run by a TensorRT engine built per static signature."""

    def __init__(self, model: Callable[..., Tensor], precision: str = "fp16",
                 cache_dir: str | os.PathLike | None = None, workspace_gb: float = 8.0,
                 opset_version: int | None = None) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"unknown TensorRT precision {precision!r}: use one of {PRECISIONS}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError("the tensorrt backend needs an nn.Module (its weights key the engine cache)")
        self.trt = _import_trt()
        if not torch.cuda.is_available():
            raise RuntimeError("the tensorrt backend needs a CUDA GPU")
        self.model = model
        self.precision = precision
        self.workspace = int(workspace_gb * (1 << 30))
        self.opset_version = opset_version
        self.cache = EngineCache(cache_dir)
        self._modules = list(model.modules())
        self._signature = state_signature(self._modules)
        self.weights = weights_hash(model)
        self.logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.runtime = self.trt.Runtime(self.logger)
        # signature -> (engine, context, input names, output name, input dtypes, output dtype)
        self._engines: dict[tuple, tuple[Any, Any, list[str], str, dict[str, torch.dtype], torch.dtype]] = {}
        self.built = 0  # engines built (not loaded from the cache) by this object

    def key(self, x: Tensor, t: Tensor, y: Tensor | None) -> EngineKey:
        dev = x.device if x.device.type == "cuda" else torch.device("cuda")
        major, minor = torch.cuda.get_device_capability(dev)
        shapes = tuple((n, tuple(v.shape)) for n, v in zip("xty", (x, t, y)) if v is not None)
        return EngineKey(weights=self.weights, shapes=shapes, dtype=self.precision,
                         gpu=f"{torch.cuda.get_device_name(dev)} sm_{major}{minor}",
                         trt_version=str(self.trt.__version__), extra=(("x_dtype", str(x.dtype)),))

    def _build(self, x: Tensor, t: Tensor, y: Tensor | None) -> bytes:
        from .onnxrt import export_denoiser

        trt = self.trt
        call_shapes = {n: tuple(v.shape) for n, v in zip("xty", (x, t, y)) if v is not None}
        # The whole build happens inside the temporary directory: a large model's weights are saved as
        # external data next to the .onnx file, and the parser (which owns the weights the network points
        # to) must stay alive until the engine is built. The inputs stay on the model's device: tracing
        # CPU inputs through a CUDA model fails.
        with tempfile.TemporaryDirectory(prefix="cg_fast_trt_") as tmp:
            path = export_denoiser(self.model, Path(tmp) / "denoiser.onnx", x, t, y, self.opset_version)
            builder = trt.Builder(self.logger)
            network = builder.create_network(0)  # TensorRT 10: always explicit batch, no flag needed
            parser = trt.OnnxParser(network, self.logger)
            if not parser.parse_from_file(str(path)):
                errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
                raise RuntimeError(f"TensorRT could not parse the exported ONNX graph: {errors}")
            config = builder.create_builder_config()
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, self.workspace)
            if self.precision == "fp16":
                config.set_flag(trt.BuilderFlag.FP16)
            elif self.precision == "bf16":
                config.set_flag(trt.BuilderFlag.BF16)
            # The export has static shapes; should an input still be dynamic (-1), pin it to the call's
            # shape with a min = opt = max profile (a network with dynamic inputs needs one).
            inputs = [network.get_input(i) for i in range(network.num_inputs)]
            dynamic = [inp for inp in inputs if any(int(d) < 0 for d in inp.shape)]
            if dynamic:
                profile = builder.create_optimization_profile()
                for inp in dynamic:
                    if inp.name not in call_shapes:
                        raise RuntimeError(f"the exported graph has an unexpected dynamic input {inp.name!r}")
                    shape = call_shapes[inp.name]
                    profile.set_shape(inp.name, shape, shape, shape)
                config.add_optimization_profile(profile)
            blob = builder.build_serialized_network(network, config)
            if blob is None:
                raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
            del parser
        self.built += 1
        return bytes(blob)

    def refresh(self) -> None:
        """Hash the weights again and drop the engines in memory (after writes through ``param.data``)."""
        self._modules = list(self.model.modules())
        self._signature = None
        self._check_weights()

    def _check_weights(self) -> None:
        """Engines of the old weights are dropped when the weights changed in place (see state_signature)."""
        signature = state_signature(self._modules)
        if signature != self._signature:
            self._signature, self.weights = signature, weights_hash(self.model)
            self._engines.clear()

    def _engine(self, x: Tensor, t: Tensor, y: Tensor | None):
        self._check_weights()
        sig = (tuple(x.shape), x.dtype, y is not None, x.device)
        if sig not in self._engines:
            key = self.key(x, t, y)
            for attempt in range(2):
                blob, _ = self.cache.get_or_build(key, lambda: self._build(x, t, y))
                engine = self.runtime.deserialize_cuda_engine(blob)
                if engine is not None:
                    break
                self.cache.evict(key)  # valid checksum but unusable (e.g. a foreign build): rebuild once
            else:
                raise RuntimeError("TensorRT could not deserialize a freshly built engine")
            context = engine.create_execution_context()
            if context is None:
                raise RuntimeError("TensorRT could not create an execution context (out of GPU memory?)")
            names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
            inputs = [n for n in names if engine.get_tensor_mode(n) == self.trt.TensorIOMode.INPUT]
            outputs = [n for n in names if n not in inputs]
            if len(outputs) != 1:
                raise RuntimeError(f"expected one engine output, got {outputs}")
            feeds = {"x": x, "t": t, "y": y}
            for n in inputs:  # dynamic inputs (see _build) take the call's shape
                if any(int(d) < 0 for d in engine.get_tensor_shape(n)):
                    context.set_input_shape(n, tuple(feeds[n].shape))
            in_dtypes = {n: _torch_dtype(self.trt, engine.get_tensor_dtype(n)) for n in inputs}
            out_dtype = _torch_dtype(self.trt, engine.get_tensor_dtype(outputs[0]))
            self._engines[sig] = (engine, context, inputs, outputs[0], in_dtypes, out_dtype)
        return self._engines[sig]

    def prepare(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Path:
        """Ahead of time (``cg-fast export``): build (or find in the cache) the engine of this call signature
        without running it; returns the cached blob's path. ``built`` counts a build."""
        if x.device.type != "cuda":
            raise ValueError(f"TensorRT engines are built from CUDA tensors, got x on {x.device}")
        with torch.cuda.device(x.device):
            self._engine(x, t, y)
        return self.cache.paths(self.key(x, t, y))[0]

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.device.type != "cuda":
            raise ValueError(f"the tensorrt backend runs on CUDA tensors, got x on {x.device}")
        with torch.cuda.device(x.device):  # TensorRT builds, deserializes and runs on the current device
            return self._run(x, t, y)

    def _run(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        _, context, inputs, output, in_dtypes, out_dtype = self._engine(x, t, y)
        given = {"x": x, "t": t, "y": y}
        # cast to what the engine declares; the tensors stay referenced until the call returns, and a freed
        # one is reused only by later work on this same stream (the caching allocator is stream-ordered)
        feeds = {n: given[n].to(device=x.device, dtype=in_dtypes[n]).contiguous() for n in inputs}
        for name in inputs:
            context.set_tensor_address(name, feeds[name].data_ptr())
        out = torch.empty(tuple(context.get_tensor_shape(output)), dtype=out_dtype, device=x.device)
        context.set_tensor_address(output, out.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(x.device).cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        return out
