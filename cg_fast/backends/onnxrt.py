"""ONNX Runtime backend: the denoiser exported once per static signature and run by an ORT session.

Export uses ``torch.onnx.export`` (the torch.export-based exporter, needs ``onnx`` and ``onnxscript``)
with static shapes: inputs ``x`` [B, C, ...] float, ``t`` [B] int64 and, for class-conditional calls,
``y`` [B] int64; output ``out``. Providers: "cpu" (CPUExecutionProvider) or "cuda" (CUDAExecutionProvider,
needs onnxruntime-gpu; inputs and outputs are bound on the device, no host copies). "auto" picks by the
tensors' device and raises if a CUDA tensor arrives without the CUDA provider (no silent slow path).

.. warning:: Shapes are fixed per export: each new (batch, shape, dtype, has-y) signature exports again
   (seconds for small models, minutes for large ones) -- once: exports are cached on disk and reused by later
   objects and processes.

The export cache (``cache_dir``, default ``$CG_FAST_CACHE/onnx`` or ``~/.cache/cg_fast/onnx``): one folder per
export, named by a hash of everything the graph depends on -- the weights' values (``weights_hash``), the
model's non-tensor settings (plain attributes of every submodule, e.g. a head count or a std), the source
files of its classes, the input shapes and dtypes, the opset and the torch / onnx versions. The folder holds
``model.onnx`` (and external weight data, for large models) and ``meta.json`` with the SHA-256 of every
file; it is written in a private temporary folder and renamed into place, so no reader sees half an export
and a link planted at its name is removed, never followed. An entry that fails its checksums is removed and
exported again. A cache folder that cannot be written gives one warning, and exports go to a temporary folder
removed with the object (no reuse).

In-place weight changes are noticed: every call compares the address and version counter of each
parameter and buffer (``load_state_dict``, ``copy_`` or any in-place update under ``no_grad`` bumps the
counter; ``.to()`` or assigning a new parameter changes the address; ~0.3 ms per call for the 542 tensors of
ADM-64) and, when one changed, hashes the weights again and uses (or exports) the graph of the new values.
Not seen, so call :meth:`OnnxDenoiser.refresh` after them: writes through ``param.data`` (they bypass the
version counter) and replacing a submodule; ``watch_weights=False`` skips the per-call check altogether. A
denoiser that is not an ``nn.Module`` (a plain function) has no weights to hash: it is exported per object
into a temporary folder and never reused; call ``refresh()`` after changing what it computes.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .engine_cache import _kind, remove_entry, state_signature, weights_hash

__all__ = ["OnnxDenoiser", "export_denoiser", "default_onnx_cache_dir", "model_fingerprint"]

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


def _check_cuda_provider(sess: Any) -> None:
    """ONNX Runtime drops a provider it cannot load (CUDA or cuDNN libraries missing or of another version)
    with no more than a log line and runs on the CPU: CUDA pointers bound to that session would be read as
    host memory. Raise instead, saying what to do."""
    active = list(sess.get_providers())
    if "CUDAExecutionProvider" not in active:
        raise RuntimeError(f"ONNX Runtime could not start its CUDA provider and fell back to {active}: the CUDA "
                           "and cuDNN libraries that onnxruntime-gpu was built for are missing or of another "
                           "version (see ONNX Runtime's log). Install the matching onnxruntime-gpu, or pass "
                           "backend_options={'provider': 'cpu'} (copies through host memory).")


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


def default_onnx_cache_dir() -> Path:
    """$CG_FAST_CACHE/onnx, else ~/.cache/cg_fast/onnx."""
    root = os.environ.get("CG_FAST_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "cg_fast") / "onnx"


_PLAIN = (bool, int, float, str, type(None))


def _settings(module: nn.Module) -> dict[str, Any]:
    """The plain (non-tensor) attributes of every submodule: what shapes the graph besides the weights."""
    out: dict[str, Any] = {}
    for name, mod in module.named_modules():
        for attr, value in sorted(vars(mod).items()):
            if attr.startswith("_") or attr == "training":
                continue
            if isinstance(value, _PLAIN) or (isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN)
                                                                                      for v in value)):
                out[f"{name}.{attr}"] = value
            elif hasattr(value, "__dataclass_fields__"):  # e.g. a model's cg_config
                out[f"{name}.{attr}"] = repr(value)
    return out


def _sources(module: nn.Module) -> str:
    """A hash of the source files (names and bytes, not where they are installed) that define the classes of
    ``module`` and its submodules."""
    h = hashlib.sha256()
    for path in sorted({inspect.getsourcefile(type(m)) or "" for m in module.modules()}):
        name = Path(path).name.encode()
        try:
            h.update(name + b"\0" + hashlib.sha256(Path(path).read_bytes()).digest())
        except OSError:
            h.update(name)
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over everything of ``model`` an exported graph bakes in: weight values, plain settings of every
    submodule, class names and their source files."""
    blob = json.dumps({"class": f"{type(model).__module__}.{type(model).__qualname__}", "weights": weights_hash(model),
                       "settings": _settings(model), "sources": _sources(model)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _file_digests(folder: Path) -> dict[str, list]:
    return {p.name: [p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()]
            for p in sorted(folder.iterdir()) if p.name != "meta.json"}


class OnnxDenoiser:
    """``model(x, t, y=None)`` run by ONNX Runtime (exports cached on disk; see the module docstring).

    ``exported`` and ``loaded`` count the graphs this object exported and those it found in the cache.
    """

    def __init__(self, model: Callable[..., Tensor], provider: str = "auto", cache_dir: str | None = None,
                 opset_version: int | None = None, session_options: Any = None, watch_weights: bool = True) -> None:
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
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_onnx_cache_dir()
        if not isinstance(model, nn.Module):
            self._private("a denoiser that is not an nn.Module has no weights to key a shared cache")
        else:
            try:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                tempfile.TemporaryDirectory(dir=self.cache_dir).cleanup()  # can we write here?
            except OSError as e:
                warnings.warn(f"ONNX export cache {self.cache_dir} is not writable ({type(e).__name__}: {e}); "
                              "exporting into a temporary folder without reuse. Set CG_FAST_CACHE (or "
                              "backend_options={'cache_dir': ...}) to a writable folder", RuntimeWarning,
                              stacklevel=2)
                self._private("unwritable cache")
        self._sessions: dict[tuple, Any] = {}
        self._signature: tuple | None = None  # state_signature at the last weights hash
        self._fingerprint = ""                # model_fingerprint for that signature
        self._generation = 0                  # refresh() count: keys a plain function's exports
        self.watch_weights = watch_weights
        self._modules = list(model.modules()) if isinstance(model, nn.Module) else []
        self.exported = 0
        self.loaded = 0

    def _private(self, why: str) -> None:
        """Export into a temporary folder removed with this object (no reuse)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="cg_fast_onnx_")
        self.cache_dir = Path(self._tmp.name)
        self.shared = False
        self.private_reason = why

    shared = True  # exports go to a cache shared by objects and processes

    def refresh(self) -> None:
        """Forget the sessions and hash the weights again at the next call: needed after changing weights
        through ``param.data`` (invisible to the version counters), or what a plain-function denoiser computes."""
        self._sessions.clear()
        self._signature = None
        self._generation += 1
        if isinstance(self.model, nn.Module):
            self._modules = list(self.model.modules())

    def _model_key(self) -> str:
        if self._signature is not None and not self.watch_weights:
            return self._fingerprint
        sig = state_signature(self._modules) if self._modules else (id(self.model),)
        if sig != self._signature:
            self._sessions.clear()  # graphs of the old weights
            if isinstance(self.model, nn.Module):
                self._fingerprint = model_fingerprint(self.model)
            else:
                self._fingerprint = f"callable-{id(self.model)}-{self._generation}"
            self._signature = sig
        return self._fingerprint

    def entry_path(self, x: Tensor, t: Tensor, y: Tensor | None) -> Path:
        """The cache folder of the export for this call's signature and the model's current weights."""
        import onnx

        key = {"model": self._model_key(), "x": [list(x.shape), str(x.dtype)], "t": [list(t.shape), str(t.dtype)],
               "y": None if y is None else [list(y.shape), str(y.dtype)], "opset": self.opset_version,
               "torch": torch.__version__, "onnx": onnx.__version__, "format": 1}
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        stem = "denoiser_" + "x".join(map(str, x.shape)) + f"_{str(x.dtype)[6:]}_{'y' if y is not None else 'noy'}"
        return self.cache_dir / f"{stem}-{digest}"

    def _valid(self, entry: Path) -> bool:
        """Is ``entry`` a complete export (a real folder whose files match meta.json)? Removes it if not."""
        kind = _kind(entry)
        if kind == "absent":
            return False
        try:
            ok = kind == "other" and entry.is_dir() and not entry.is_symlink()
            if ok:
                names = [p.name for p in entry.iterdir()]
                ok = "model.onnx" in names and all(_kind(entry / n) == "file" for n in names)
            if ok:
                meta = json.loads((entry / "meta.json").read_text())
                ok = isinstance(meta, dict) and meta.get("files") == _file_digests(entry)
        except (OSError, ValueError):
            ok = False
        if not ok:
            remove_entry(entry)
        return ok

    def _export_or_load(self, x: Tensor, t: Tensor, y: Tensor | None) -> Path:
        """The ``model.onnx`` of this signature: from the cache if a valid entry is there, else exported into a
        private folder and renamed into place (another process that got there first wins; its entry is used)."""
        entry = self.entry_path(x, t, y)
        if self._valid(entry):
            self.loaded += 1
            return entry / "model.onnx"
        tmp = Path(tempfile.mkdtemp(dir=self.cache_dir, prefix=f".{entry.name}.", suffix=".tmp"))
        try:
            export_denoiser(self.model, tmp / "model.onnx", x, t, y, self.opset_version)
            (tmp / "meta.json").write_text(json.dumps({"files": _file_digests(tmp)}, indent=1))
            try:
                os.rename(tmp, entry)  # atomic; fails if anything is at ``entry`` (never written through)
            except OSError:
                if not self._valid(entry):  # not another process's finished export: clear the name, retry once
                    os.rename(tmp, entry)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.exported += 1
        return entry / "model.onnx"

    def prepare(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Path:
        """Ahead of time (``cg-fast export``): the ``model.onnx`` of this call signature, exported into the cache
        unless a valid entry is there, without running it. ``exported`` / ``loaded`` count it as a call would."""
        return self._export_or_load(x, t, y)

    def _provider_for(self, device: torch.device) -> str:
        have = self._ort.get_available_providers()
        want = self.provider if self.provider != "auto" else ("cuda" if device.type == "cuda" else "cpu")
        if want == "cuda" and "CUDAExecutionProvider" not in have:
            raise RuntimeError("ONNX Runtime has no CUDAExecutionProvider here: pip install onnxruntime-gpu, "
                               "or pass backend_options={'provider': 'cpu'} (copies through host memory)")
        return want

    def _session(self, x: Tensor, t: Tensor, y: Tensor | None):
        key = (self._model_key(), tuple(x.shape), x.dtype, t.dtype, y is not None, str(x.device),
               self._provider_for(x.device))
        sess = self._sessions.get(key)
        if sess is None:
            # export with the tensors where they are: tracing CPU inputs through a CUDA model fails
            path = self._export_or_load(x, t, y)
            if key[-1] == "cuda":
                providers = [("CUDAExecutionProvider", {"device_id": x.device.index or 0})]
            else:
                providers = ["CPUExecutionProvider"]
            sess = self._ort.InferenceSession(str(path), sess_options=self.session_options, providers=providers)
            if key[-1] == "cuda":
                _check_cuda_provider(sess)
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
