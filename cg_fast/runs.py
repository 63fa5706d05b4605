"""Result files that are never lost, overwritten, mixed or served stale: settings fingerprints, resume-or-refuse,
atomic writes.

A results file (JSON) records the settings that produced it. A rerun with the same settings resumes it; a rerun
with other settings is refused before any work is done, with a message saying how to keep both. Every write goes
to a temporary file in the same folder that is then renamed over the target, so a reader (or a crash) never sees
a half-written file, and a symbolic link planted at the target's name is replaced, never written through.

    check_writable(out)                                   # before any sampling: fail now, not after an hour
    results = resume_or_refuse(out, settings, kind="my job") or new_results(settings, kind="my job")
    ...                                                   # do the work not yet in results["runs"]
    atomic_write_json(out, results)                       # after every finished piece

Used by the demos (``cg_fast.demo``, ``cg_fast.demo_gmm``) and the quality study; meant for any job that writes
results in pieces (e.g. sample shards: one file per shard, each carrying the job's fingerprint).

This module owns files only: the standard library, no torch, no sampling.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["RunError", "fingerprint", "files_fingerprint", "atomic_write", "atomic_write_bytes", "atomic_write_json",
           "check_writable", "read_json", "resume_or_refuse", "new_results", "settings_diff"]


class RunError(ValueError):
    """A results file cannot be used as asked (other settings, unreadable, unwritable); the message says what to do."""


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(settings: Mapping[str, Any]) -> str:
    """A short stable hash (16 hex digits) of JSON-able ``settings``: equal settings give equal fingerprints,
    whatever the key order. Non-JSON values are hashed by ``str``."""
    return hashlib.sha256(_canonical(settings).encode()).hexdigest()[:16]


def files_fingerprint(paths: list[str | os.PathLike]) -> str:
    """A short hash (16 hex digits) of the names and bytes of ``paths`` (e.g. the weight files a job reads), for
    its settings: results made with other weights are then never resumed."""
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        h.update(path.name.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()[:16]


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None], mode: int = 0o644) -> Path:
    """Write ``path`` through ``write(f)`` on a temporary file in the same folder, then rename it over ``path``.

    The rename is atomic: readers see the old file or the new one, never a part. A symbolic link at ``path`` is
    replaced by the file, never followed. The folder is created if needed. On any error the temporary file is
    removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        raise RunError(f"cannot write {path}: it is a folder; pass a file name")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda f: f.write(data), mode)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write_bytes(path, json.dumps(obj, indent=indent).encode())


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Make sure a file can be written at ``path`` (creating its folder), before any long work; returns ``path``.

    Raises :class:`RunError` saying why not: the folder cannot be created (e.g. a parent is a file), is not
    writable, or ``path`` is a folder. A probe file is created and removed in the folder.
    """
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        raise RunError(f"{what} {path} is a folder; pass a file name (e.g. {path / 'results.json'})")
    for parent in path.parents:  # the nearest existing ancestor must be a folder
        if parent.exists():
            if not parent.is_dir():
                raise RunError(f"cannot write the {what} {path}: {parent} is a file, not a folder; pass another "
                               "location")
            break
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise RunError(f"cannot write the {what} {path}: {e.strerror or e} ({type(e).__name__}); pass a "
                       "writable location") from e
    return path


def read_json(path: str | os.PathLike, what: str = "results file") -> Any:
    """The JSON value in ``path``; :class:`RunError` (saying to move the file aside) if it cannot be read."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RunError(f"cannot read the {what} {path} ({type(e).__name__}: {e}); move it aside or delete it to "
                       "start over, or pass another output path") from e


def settings_diff(old: Mapping[str, Any], new: Mapping[str, Any], show: int = 4) -> str:
    """The settings that differ, as ``name: old -> new`` (at most ``show`` of them)."""
    keys = sorted(set(old) | set(new), key=str)
    diffs = [f"{k}: {old.get(k, '(absent)')!r} -> {new.get(k, '(absent)')!r}" for k in keys
             if _canonical(old.get(k)) != _canonical(new.get(k)) or (k in old) != (k in new)]
    more = f" (and {len(diffs) - show} more)" if len(diffs) > show else ""
    return "; ".join(diffs[:show]) + more


def new_results(settings: Mapping[str, Any], kind: str) -> dict:
    """An empty results record: ``{"kind", "fingerprint", "config", "runs": {}}``."""
    return {"kind": kind, "fingerprint": fingerprint(settings), "config": dict(settings), "runs": {}}


def resume_or_refuse(path: str | os.PathLike | None, settings: Mapping[str, Any], kind: str,
                     log: Callable[[str], None] = print) -> dict | None:
    """The results record saved at ``path`` by an earlier run of ``kind`` with the same ``settings``; None when
    there is no file (start fresh with :func:`new_results`).

    Refuses (:class:`RunError`), before any work, a file that is unreadable, holds something other than a
    results record (``null``, ``[]``, another job's results), or was made with other settings: the message names
    the settings that differ and how to keep both (another output path) or start over (delete the file).
    """
    if path is None:
        return None
    path = Path(path)
    if not path.exists():
        return None
    old = read_json(path)
    if not isinstance(old, dict) or not isinstance(old.get("config"), dict) or not isinstance(old.get("runs"), dict):
        shown = json.dumps(old)[:60]
        raise RunError(f"{path} is not a {kind} results file (it holds {shown}); move it aside or delete it, or "
                       "pass another output path")
    if old.get("kind", kind) != kind:
        raise RunError(f"{path} holds results of {old['kind']!r}, not {kind!r}: pass another output path")
    if _canonical(old["config"]) != _canonical(dict(settings)):
        raise RunError(f"{path} holds results made with other settings ({settings_diff(old['config'], settings)}); "
                       "this run would mix them. To keep both, pass another output path; to replace them, delete "
                       f"{path} (and the files written beside it)")
    old.setdefault("kind", kind)
    old["fingerprint"] = fingerprint(settings)
    log(f"resuming from {path}")
    return old
