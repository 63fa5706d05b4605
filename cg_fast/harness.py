"""The sharded sampling job behind ``cg-fast sample``: N samples from one sampler, in shards, resumable, across
ranks, into an ADM-evaluator ``.npz``.

    job = SampleJob(sampler, guidance, shape=(3, 64, 64), num_samples=50_000, seed=0, out=Path("out/run"),
                    settings={...every setting that changes a sample...})
    result = run_job(job)                       # rank 0 of 1; under torchrun: run_job(job, *dist_rank_world())

Layout of ``out`` (every file written atomically, so an interrupted run leaves whole files only):

    run.json                       the settings (fingerprint), versions, and after the merge per-shard timings
                                   and totals of denoiser rows and classifier gradients
    shards/shard_00000.npz ...     samples [k*S, (k+1)*S): arr_0 images (uint8 NHWC) or latents, arr_1 labels,
                                   meta (JSON: fingerprint, timing, accounting); S = shard_size
    samples_{N}x{H}x{W}x{C}.npz    the merged batch (arr_0, arr_1), guided-diffusion's file name; latents_... for
                                   latent models without a decoder

Each sample's noise depends on (seed, sample index) only (``Sampler(rng="counter")``, seeds from
``cg_fast.kernels.rng.sample_seeds``) and so does its label (drawn once for the whole run from the seed), so the
result does not depend on the batch size, the number of ranks or restarts. Shard k belongs to rank k mod W; a
rerun skips the shards whose files exist with the run's fingerprint, and rank 0 merges once all exist. The
merged file's bytes are a function of the shards' (fixed zip timestamps). Shard files are written by a
background thread while the next batch samples. This module knows nothing of command lines (``cg_fast.cli``).
"""
from __future__ import annotations

import io
import json
import os
import platform
import sys
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from . import __version__
from .eval.npz import to_uint8
from .guidance import CFG, ClassifierGuidance
from .kernels.rng import sample_seeds
from .runs import RunError, atomic_write, atomic_write_json, check_writable, fingerprint, new_results, \
    resume_or_refuse
from .sampler import Sampler

__all__ = ["SampleJob", "run_job", "shard_ranges", "run_labels", "dist_rank_world", "write_npz", "JOB_KIND"]

JOB_KIND = "cg-fast sample"
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # fixed timestamps: the same arrays give the same file bytes


@dataclass
class SampleJob:
    """One sampling job. ``settings`` must hold every setting that changes a sample (the CLI builds it); it
    is the job's identity: a rerun with other settings on the same ``out`` is refused.

    sampler:     built with ``rng="counter"`` (per-sample noise; the job refuses another rng).
    guidance:    ClassifierGuidance, CFG or None.
    shape:       one sample's shape (C, H, W) in the sampler's space (latents for DiT).
    labels:      None: drawn for the whole run from ``seed`` (uniform over ``num_classes``); an int: every
                 sample that class; a list: cycled over the samples (DiT's sample.py class list).
    decode:      latents -> images in [-1, 1] (a VAE), or None. ``latent``: the sampler's output is a latent
                 (saved as float16 ``latents_*.npz`` when ``decode`` is None).
    keep_float:  also store the float samples in the shards (``x``) beside the uint8 images.
    """

    sampler: Sampler
    guidance: ClassifierGuidance | CFG | None
    shape: tuple[int, ...]
    num_samples: int
    seed: int
    out: Path
    settings: dict[str, Any]
    batch_size: int = 16
    shard_size: int = 1000
    num_classes: int | None = None
    labels: int | list[int] | None = None
    device: torch.device | str | None = None
    decode: Callable[[Tensor], Tensor] | None = None
    latent: bool = False
    keep_float: bool = False
    progress: bool = True
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))

    def __post_init__(self) -> None:
        for name in ("num_samples", "batch_size", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if getattr(self.sampler, "rng", None) != "counter":
            raise ValueError("a sharded job needs Sampler(..., rng='counter'): with torch's generator a sample "
                             "would depend on its batch, its rank and restarts")
        self.out = Path(self.out)


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) sample indices of each shard."""
    return [(s, min(s + shard_size, num_samples)) for s in range(0, num_samples, shard_size)]


def run_labels(seed: int, num_samples: int, num_classes: int | None, labels: int | list[int] | None) -> np.ndarray:
    """The label of every sample of the run (int64 [num_samples]); a function of (seed, sample index) only."""
    if labels is None:
        if num_classes is None:
            return np.zeros(num_samples, dtype=np.int64)
        # a generator of its own, seeded by (seed, "labels"): independent of every noise stream
        return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0x6C61626C]).integers(
            0, num_classes, size=num_samples, dtype=np.int64)
    if isinstance(labels, int):
        return np.full(num_samples, labels, dtype=np.int64)
    return np.resize(np.asarray(labels, dtype=np.int64), num_samples)


def dist_rank_world() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, initialising torch.distributed when there are several
    ranks (NCCL on GPUs, gloo on CPUs); (0, 1) without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` with fixed zip timestamps, written atomically: equal arrays give equal bytes."""
    def write(f) -> None:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name, arr in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(arr, order="C"), allow_pickle=False)
                zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_TIME), buf.getvalue())
    return atomic_write(path, write)


def _read_shard(path: Path, fp: str) -> dict[str, Any] | None:
    """A finished shard of this run (its arrays and meta), or None when it must be (re)done."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("fingerprint") != fp:
                return None
            return {"arr_0": z["arr_0"], "arr_1": z["arr_1"], "meta": meta,
                    **({"x": z["x"]} if "x" in z.files else {})}
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None  # a damaged shard (e.g. disk full during a copy) is redone


def _final_name(job: SampleJob, first: np.ndarray) -> str:
    dims = "x".join(str(d) for d in first.shape[1:])
    what = "latents" if job.latent and job.decode is None else "samples"
    return f"{what}_{job.num_samples}x{dims}.npz"


def _versions() -> dict[str, str]:
    return {"cg_fast": __version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version()}


def _prepare(job: SampleJob, rank: int, world: int) -> str:
    """Check the output before any sampling; refuse another job's folder. Returns the fingerprint."""
    fp = fingerprint(job.settings)
    record = job.out / "run.json"
    if rank == 0:
        if job.out.exists() and not job.out.is_dir():
            raise RunError(f"--out {job.out} is a file; pass a folder")
        check_writable(job.out / "shards" / "shard_00000.npz", "output folder")
        old = resume_or_refuse(record, job.settings, JOB_KIND, log=job.log)
        if old is None:
            rec = new_results(job.settings, JOB_KIND)
            rec["versions"] = _versions()
            atomic_write_json(record, rec)
    _barrier(world)
    if rank != 0:
        resume_or_refuse(record, job.settings, JOB_KIND, log=lambda s: None)
    return fp


def _sample_shard(job: SampleJob, start: int, end: int, labels: np.ndarray, bar) -> tuple[dict, dict]:
    """Sample indices [start, end) in batches; (arrays, meta) of the shard."""
    images, floats = [], []
    counts = {"denoiser_passes": 0, "denoiser_rows": 0, "classifier_grads": 0}
    t0 = time.perf_counter()
    for b0 in range(start, end, job.batch_size):
        b1 = min(b0 + job.batch_size, end)
        idx = range(b0, b1)
        y = torch.as_tensor(labels[b0:b1]) if (job.num_classes is not None or job.guidance is not None) else None
        try:
            out = job.sampler.sample((b1 - b0, *job.shape), y, job.guidance, seeds=sample_seeds(job.seed, idx),
                                     device=job.device)
        except torch.OutOfMemoryError as e:
            raise RunError(f"out of GPU memory at batch size {job.batch_size}: rerun with --batch_size "
                           f"{max(1, job.batch_size // 2)} (the run resumes; batch size does not change the samples)"
                           ) from e
        for k in counts:
            counts[k] += getattr(out.stats, k)
        x = out.x
        if job.keep_float:
            floats.append(x.float().cpu().numpy())
        if job.decode is not None:
            with torch.no_grad():
                x = job.decode(x)
        images.append(x.float().cpu().numpy().astype(np.float16) if job.latent and job.decode is None
                      else to_uint8(x).cpu().numpy())
        if bar is not None:
            bar.update(b1 - b0)
    arrays = {"arr_0": np.concatenate(images), "arr_1": labels[start:end]}
    if floats:
        arrays["x"] = np.concatenate(floats)
    meta = {"start": start, "end": end, "seconds": time.perf_counter() - t0, **counts}
    return arrays, meta


def run_job(job: SampleJob, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Run (or resume) ``job`` as rank ``rank`` of ``world``; rank 0 merges and returns the run record
    (other ranks return their own shards' record)."""
    fp = _prepare(job, rank, world)
    labels = run_labels(job.seed, job.num_samples, job.num_classes, job.labels)
    shards = shard_ranges(job.num_samples, job.shard_size)
    shard_dir = job.out / "shards"
    mine = [(k, s, e) for k, (s, e) in enumerate(shards) if k % world == rank]
    todo = [(k, s, e) for k, s, e in mine if _read_shard(shard_dir / f"shard_{k:05d}.npz", fp) is None]
    if len(todo) < len(mine):
        job.log(f"rank {rank}: {len(mine) - len(todo)} of {len(mine)} shards already done, resuming")
    bar = None
    if job.progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(e - s for _, s, e in todo), desc=f"sampling (rank {rank})" if world > 1 else "sampling",
                   unit="img", dynamic_ncols=True)
    pending: list[Future] = []
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="cg_fast-writer") as writer:
            for k, s, e in todo:
                arrays, meta = _sample_shard(job, s, e, labels, bar)
                meta.update(fingerprint=fp, rank=rank)
                arrays["meta"] = np.array(json.dumps(meta))
                pending.append(writer.submit(write_npz, shard_dir / f"shard_{k:05d}.npz", arrays))
                pending = [f for f in pending if not f.done() or f.result() is None]  # surface write errors
            for f in pending:
                f.result()
    except KeyboardInterrupt:
        raise RunError(f"interrupted: finished shards are kept in {shard_dir}; rerun the same command to resume") \
            from None
    finally:
        if bar is not None:
            bar.close()
    _barrier(world)
    if rank != 0:
        return {"rank": rank, "shards": [k for k, _, _ in mine]}
    return _merge(job, fp, shards)


def _merge(job: SampleJob, fp: str, shards: list[tuple[int, int]]) -> dict[str, Any]:
    shard_dir = job.out / "shards"
    parts, missing = [], []
    for k in range(len(shards)):
        got = _read_shard(shard_dir / f"shard_{k:05d}.npz", fp)
        (missing.append(k) if got is None else parts.append(got))
    if missing:
        raise RunError(f"{len(missing)} shard(s) are missing (first: {missing[:5]}), e.g. a rank was lost: rerun "
                       "the same command to redo them; finished shards are kept")
    arr0 = np.concatenate([p["arr_0"] for p in parts])
    arr1 = np.concatenate([p["arr_1"] for p in parts])
    final = job.out / _final_name(job, arr0)
    write_npz(final, {"arr_0": arr0, "arr_1": arr1})
    metas = [p["meta"] for p in parts]
    record = resume_or_refuse(job.out / "run.json", job.settings, JOB_KIND, log=lambda s: None) \
        or new_results(job.settings, JOB_KIND)
    record.setdefault("versions", _versions())
    record["runs"] = {f"shard_{k:05d}": m for k, m in enumerate(metas)}
    record["totals"] = {key: sum(m[key] for m in metas)
                        for key in ("denoiser_passes", "denoiser_rows", "classifier_grads", "seconds")}
    record["output"] = final.name
    atomic_write_json(job.out / "run.json", record)
    return record
