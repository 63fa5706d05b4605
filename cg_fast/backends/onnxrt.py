"""ONNX Runtime backend: the denoiser exported once per static signature and run by an ORT session.

Export uses ``torch.onnx.export`` (the torch.export-based exporter, needs ``onnx`` and ``onnxscript``)
with static shapes: inputs ``x`` [B, C, ...] float, ``t`` [B] int64 and, for class-conditional calls,
``y`` [B] int64; output ``out``. Providers: "cpu" (CPUExecutionProvider) or "cuda" (CUDAExecutionProvider,
needs onnxruntime-gpu; inputs and outputs are bound on the device, no host copies). "auto" picks by the
tensors' device and raises if a CUDA tensor arrives without the CUDA provider (no silent slow path).

.. warning:: Shapes are fixed per export: each new (batch, shape, dtype, has-y) signature exports again
   (seconds for small models, minutes for large ones). Exported files live in ``cache_dir`` (default: a
   temporary directory removed with the object).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["OnnxDenoiser", "export_denoiser"]

PROVIDERS = ("auto", "cpu", "cuda")
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
              torch.int64: np.int64, torch.int32: np.int32}
# ONNX Runtime's type strings (NodeArg.type) -> torch dtypes that IOBinding can bind (numpy has no bfloat16)
_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(double)": torch.float64,
              "tensor(int64)": torch.int64, "tensor(int32)": torch.int32}


def _bound_dtype(arg: Any) -> torch.dtype:
    """The torch dtype of a session input/output (``NodeArg``), if IOBinding can bind it."""
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise TypeError(f"ONNX Runtime I/O binding of {arg.name!r} ({arg.type}) is not supported: the exported "
                        f"graph should take and return float32/float16 x and int64 t, y")
    return dtype


def run_bound(sess: Any, inputs: list[Tensor], device: torch.device) -> Tensor:
    """Run ``sess`` on ``inputs`` (in the session's input order) with IOBinding: inputs and the output are
    bound by device pointer, no host copies. ``device`` is where the tensors live ("cuda" for the CUDA
    provider; "cpu" works too, and is how the binding is tested without a GPU).

    Inputs are cast to the dtypes the graph declares; the output gets the graph's output dtype and (static)
    shape. ONNX Runtime runs on its own CUDA stream: PyTorch's current stream is synchronised first so the
    inputs are complete, and ``run_with_iobinding`` returns after ORT's stream has finished.
    """
    device_type = "cuda" if device.type == "cuda" else "cpu"
    dev_id = (device.index or 0) if device_type == "cuda" else 0
    args = sess.get_inputs()
    if len(args) != len(inputs):
        raise ValueError(f"the session takes {len(args)} inputs ({[a.name for a in args]}), got {len(inputs)}")
    # keep every bound tensor referenced until the run has finished
    bound = [v.to(device=device, dtype=_bound_dtype(a)).contiguous() for a, v in zip(args, inputs)]
    out_meta = sess.get_outputs()[0]
    if not all(isinstance(d, int) for d in out_meta.shape):
        raise RuntimeError(f"the exported graph's output {out_meta.name!r} has a dynamic shape {out_meta.shape}; "
                           "export with static shapes")
    out = torch.empty(list(out_meta.shape), dtype=_bound_dtype(out_meta), device=device)
    binding = sess.io_binding()
    for a, v in zip(args, bound):
        binding.bind_input(a.name, device_type, dev_id, _NP_DTYPES[v.dtype], tuple(v.shape), v.data_ptr())
    binding.bind_output(out_meta.name, device_type, dev_id, _NP_DTYPES[out.dtype], tuple(out.shape), out.data_ptr())
    if device_type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # ORT's stream does not wait for PyTorch's
    sess.run_with_iobinding(binding)
    return out


class _AsModule(nn.Module):
    """Wraps a denoiser callable (and fixes the has-y choice) for export."""

    def __init__(self, fn: Callable[..., Tensor], with_y: bool) -> None:
        super().__init__()
        self.fn = fn
        self.with_y = with_y

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.fn(x, t, y) if self.with_y else self.fn(x, t)


def export_denoiser(model: Callable[..., Tensor], path: str | os.PathLike, x: Tensor, t: Tensor,
                    y: Tensor | None = None, opset_version: int | None = None) -> Path:
    """Export ``model`` called as (x, t[, y]) to ``path`` with those static shapes (CPU tensors are used)."""
    for mod in ("onnx", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            raise ImportError(f"ONNX export needs the {mod} package: pip install {mod}") from None
    wrapper = _AsModule(model, y is not None).eval()
    inputs = tuple(v.detach() for v in (x, t, y) if v is not None)
    names = ["x", "t", "y"][: len(inputs)]
    with torch.no_grad():
        program = torch.onnx.export(wrapper, inputs, dynamo=True, input_names=names, output_names=["out"],
                                    opset_version=opset_version)
    path = Path(path)
    program.save(str(path))
    return path


class OnnxDenoiser:
    """``model(x, t, y=None)`` run by ONNX Runtime."""

    def __init__(self, model: Callable[..., Tensor], provider: str = "auto", cache_dir: str | None = None,
                 opset_version: int | None = None, session_options: Any = None) -> None:
        if provider not in PROVIDERS:
            raise ValueError(f"unknown ONNX Runtime provider {provider!r}: use one of {PROVIDERS}")
        try:
            import onnxruntime as ort
        except ImportError:
            raise ImportError("the onnx backend needs onnxruntime: pip install onnxruntime "
                              "(onnxruntime-gpu for the CUDA provider)") from None
        self._ort = ort
        self.model = model
        self.provider = provider
        self.opset_version = opset_version
        self.session_options = session_options
        if cache_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="cg_fast_onnx_")
            cache_dir = self._tmp.name
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._sessions: dict[tuple, Any] = {}

    def _provider_for(self, device: torch.device) -> str:
        have = self._ort.get_available_providers()
        want = self.provider if self.provider != "auto" else ("cuda" if device.type == "cuda" else "cpu")
        if want == "cuda" and "CUDAExecutionProvider" not in have:
            raise RuntimeError("ONNX Runtime has no CUDAExecutionProvider here: pip install onnxruntime-gpu, "
                               "or pass backend_options={'provider': 'cpu'} (copies through host memory)")
        return want

    def _session(self, x: Tensor, t: Tensor, y: Tensor | None):
        key = (tuple(x.shape), x.dtype, y is not None, str(x.device), self._provider_for(x.device))
        sess = self._sessions.get(key)
        if sess is None:
            name = "denoiser_" + "x".join(map(str, x.shape)) + f"_{str(x.dtype)[6:]}_{'y' if y is not None else 'noy'}.onnx"
            # export with the tensors where they are: tracing CPU inputs through a CUDA model fails
            path = export_denoiser(self.model, self.cache_dir / name, x, t, y, self.opset_version)
            if key[-1] == "cuda":
                providers = [("CUDAExecutionProvider", {"device_id": x.device.index or 0})]
            else:
                providers = ["CPUExecutionProvider"]
            sess = self._ort.InferenceSession(str(path), sess_options=self.session_options, providers=providers)
            self._sessions[key] = sess
        return sess, key[-1]

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        sess, provider = self._session(x, t, y)
        inputs = [v for v in (x, t.long(), None if y is None else y.long()) if v is not None]
        names = [i.name for i in sess.get_inputs()]
        if provider == "cpu":
            feeds = {n: v.detach().cpu().numpy() for n, v in zip(names, inputs)}
            return torch.from_numpy(sess.run(None, feeds)[0]).to(x.device)
        if x.device.type != "cuda":
            raise ValueError(f"the CUDA provider binds CUDA tensors, got x on {x.device}: pass "
                             "backend_options={'provider': 'cpu'} or sample on the GPU")
        return run_bound(sess, [v.detach() for v in inputs], x.device)  # device memory bound directly
