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
_NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


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
        key = (tuple(x.shape), x.dtype, y is not None, x.device.type, self._provider_for(x.device))
        sess = self._sessions.get(key)
        if sess is None:
            name = "denoiser_" + "x".join(map(str, x.shape)) + f"_{str(x.dtype)[6:]}_{'y' if y is not None else 'noy'}.onnx"
            path = export_denoiser(self.model, self.cache_dir / name, x.cpu(), t.cpu(),
                                   None if y is None else y.cpu(), self.opset_version)
            providers = ["CUDAExecutionProvider"] if key[-1] == "cuda" else ["CPUExecutionProvider"]
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
        # CUDA provider: bind device memory directly
        out_meta = sess.get_outputs()[0]
        out = torch.empty([int(d) for d in out_meta.shape], dtype=x.dtype, device=x.device)
        binding = sess.io_binding()
        dev_id = x.device.index or 0
        for n, v in zip(names, inputs):
            v = v.contiguous()
            binding.bind_input(n, "cuda", dev_id, _NP_DTYPES[v.dtype], tuple(v.shape), v.data_ptr())
        binding.bind_output(out_meta.name, "cuda", dev_id, _NP_DTYPES[out.dtype], tuple(out.shape), out.data_ptr())
        sess.run_with_iobinding(binding)
        return out
