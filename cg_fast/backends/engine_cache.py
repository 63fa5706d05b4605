"""On-disk cache of built engines (TensorRT), keyed by everything that invalidates one.

An engine is valid only for the weights it was built from, its static shapes and precision, the GPU it
was built on and the TensorRT version that built it. :class:`EngineKey` hashes those into a file name;
the entry is the engine blob plus a JSON sidecar with the key's fields and the blob's SHA-256.

- A corrupt entry (truncated blob, checksum mismatch, unreadable sidecar) is deleted and rebuilt.
- A stale entry cannot be found: any change of weights, shapes, dtype, GPU or TensorRT changes the key.
- Writes are atomic (temporary file in the same directory, then ``os.replace``), blob first, sidecar
  last, so a crash mid-write leaves no entry that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

__all__ = ["EngineKey", "EngineCache", "weights_hash", "default_cache_dir"]


def default_cache_dir() -> Path:
    """$CG_FAST_CACHE, else ~/.cache/cg_fast/engines."""
    root = os.environ.get("CG_FAST_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "cg_fast" / "engines"


def weights_hash(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state (names, shapes, dtypes and bytes of every parameter and buffer)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on."""

    weights: str                                  # weights_hash(model)
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # (input name, static shape)
    dtype: str                                    # "fp32" | "fp16" | "bf16"
    gpu: str                                      # torch.cuda.get_device_name(), compute capability
    trt_version: str                              # tensorrt.__version__
    extra: tuple[tuple[str, str], ...] = field(default=())

    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, default=list).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=list))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class EngineCache:
    """A directory of ``<digest>.engine`` blobs with ``<digest>.json`` sidecars."""

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.root.mkdir(parents=True, exist_ok=True)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        d = key.digest()
        return self.root / f"{d}.engine", self.root / f"{d}.json"

    def load(self, key: EngineKey) -> bytes | None:
        """The cached blob, or None if absent or invalid (an invalid entry is removed)."""
        blob_path, meta_path = self.paths(key)
        if not meta_path.exists() or not blob_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            blob = blob_path.read_bytes()
            ok = meta.get("key") == key.as_json() and meta.get("sha256") == hashlib.sha256(blob).hexdigest() \
                and meta.get("size") == len(blob)
        except (OSError, ValueError):
            ok = False
        if not ok:
            self.evict(key)
            return None
        return blob

    def store(self, key: EngineKey, blob: bytes) -> None:
        blob_path, meta_path = self.paths(key)
        _atomic_write(blob_path, blob)
        meta = {"key": key.as_json(), "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        _atomic_write(meta_path, json.dumps(meta, indent=1).encode())

    def evict(self, key: EngineKey) -> None:
        for p in self.paths(key):
            p.unlink(missing_ok=True)

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> tuple[bytes, bool]:
        """(blob, built): the cached engine, or a freshly built and stored one."""
        blob = self.load(key)
        if blob is not None:
            return blob, False
        blob = build()
        self.store(key, blob)
        return blob, True
