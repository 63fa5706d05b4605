"""On-disk cache of built engines (TensorRT engines, AOTInductor ``.pt2`` packages), keyed by everything that
invalidates one.

An engine is valid only for the weights it was built from, its static shapes and precision, the GPU it
was built on and the TensorRT version that built it. :class:`EngineKey` hashes those into a file name;
the entry is the engine blob plus a JSON sidecar with the key's fields and the blob's SHA-256.

- A corrupt entry (truncated blob, checksum mismatch, a sidecar that is not the expected JSON object, a
  folder or a symbolic link where a file should be) is removed and rebuilt; links are removed, never followed.
- A stale entry cannot be found: any change of weights, shapes, dtype, GPU or TensorRT changes the key.
- Writes are atomic (temporary file in the same directory, then ``os.replace``), blob first, sidecar
  last, so a crash mid-write leaves no entry that looks complete; a link planted at an entry's name is
  replaced, not written through.
- A cache folder that cannot be created or written is not an error: the engine is built and used uncached,
  with one warning per cache saying what to do (``CG_FAST_CACHE`` or ``cache_dir``).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

__all__ = ["EngineKey", "EngineCache", "weights_hash", "state_signature", "default_cache_dir", "remove_entry"]


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


def state_signature(modules: list[torch.nn.Module]) -> tuple:
    """A cheap check for weight changes, made before every call by the backends that cache by weights: the
    address and version counter of every parameter and buffer of ``modules`` (a cached ``model.modules()``
    list; walking the module tree each call costs ~10x more). ``load_state_dict``, ``copy_`` or any in-place
    update bumps the version counter; ``.to()`` or a new parameter changes the address. Not seen: writes
    through ``param.data`` and replaced submodules. ~0.3 ms for the 542 tensors of ADM-64."""
    return tuple((t.data_ptr(), t._version) for m in modules
                 for t in (*m._parameters.values(), *m._buffers.values()) if t is not None)


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


def _kind(path: Path) -> str:
    """"file" (a regular file, links not followed), "absent" or "other" (folder, link, device...)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "absent"
    return "file" if stat.S_ISREG(mode) else "other"


def remove_entry(path: Path) -> None:
    """Remove whatever is at ``path`` without following links: a link is unlinked, a folder removed whole."""
    if _kind(path) == "absent":
        return
    if stat.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


class EngineCache:
    """A directory of ``<digest>.engine`` blobs (``suffix``) with ``<digest>.json`` sidecars (module docstring).

    ``writable`` is False when the folder cannot be created or written: loads miss, stores are skipped (one
    warning), and :meth:`get_or_build` still returns the built engine.
    """

    def __init__(self, root: str | os.PathLike | None = None, suffix: str = ".engine") -> None:
        self.root = Path(root) if root is not None else default_cache_dir()
        self.suffix = suffix  # of the blob file (".engine" for TensorRT, ".pt2" for AOTInductor packages)
        self.writable = True
        self._warned = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self._uncached(e)

    def _uncached(self, error: OSError) -> None:
        self.writable = False
        if not self._warned:
            self._warned = True
            warnings.warn(f"engine cache {self.root} is not writable ({type(error).__name__}: {error}); engines are "
                          "built and used without caching. Set CG_FAST_CACHE (or cache_dir) to a writable folder to "
                          "keep them", RuntimeWarning, stacklevel=3)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        d = key.digest()
        return self.root / f"{d}{self.suffix}", self.root / f"{d}.json"

    def load(self, key: EngineKey) -> bytes | None:
        """The cached blob, or None if absent or invalid (an invalid entry is removed)."""
        if not self.writable:
            return None
        blob_path, meta_path = self.paths(key)
        kinds = (_kind(blob_path), _kind(meta_path))
        if kinds != ("file", "file"):
            if kinds != ("absent", "absent"):
                self.evict(key)  # half an entry, or a folder or link in its place
            return None
        try:
            meta = json.loads(meta_path.read_text())
            blob = blob_path.read_bytes()
            ok = isinstance(meta, dict) and meta.get("key") == key.as_json() \
                and meta.get("sha256") == hashlib.sha256(blob).hexdigest() and meta.get("size") == len(blob)
        except (OSError, ValueError):
            ok = False
        if not ok:
            self.evict(key)
            return None
        return blob

    def store(self, key: EngineKey, blob: bytes) -> bool:
        """Store ``blob`` under ``key``; False (one warning per cache) if the folder cannot be written."""
        if not self.writable:
            return False
        blob_path, meta_path = self.paths(key)
        meta = {"key": key.as_json(), "sha256": hashlib.sha256(blob).hexdigest(), "size": len(blob)}
        try:
            for path in (blob_path, meta_path):
                if _kind(path) == "other" and stat.S_ISDIR(os.lstat(path).st_mode):
                    remove_entry(path)  # os.replace cannot put a file over a folder
            _atomic_write(blob_path, blob)
            _atomic_write(meta_path, json.dumps(meta, indent=1).encode())
        except OSError as e:
            self._uncached(e)
            return False
        return True

    def evict(self, key: EngineKey) -> None:
        """Remove the entry of ``key`` (blob and sidecar; folders and links in their place too)."""
        for p in self.paths(key):
            try:
                remove_entry(p)
            except OSError as e:
                self._uncached(e)

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> tuple[bytes, bool]:
        """(blob, built): the cached engine, or a freshly built one (stored when the folder is writable)."""
        blob = self.load(key)
        if blob is not None:
            return blob, False
        blob = build()
        self.store(key, blob)
        return blob, True
