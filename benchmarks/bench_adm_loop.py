"""Side by side on the CPU: cg_fast's sampler against guided-diffusion's own loop, same UNet, same seed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_adm_loop.py            # small ADM-64, batch 4, DDPM 50
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_adm_loop.py --steps 10 --repeats 1   # quick look

"guided-diffusion's loop" is ``tests/adm_oracle.py``, an independent transcription of its ``p_sample_loop``
(unfused float32 ops, tables looked up per step). Both loops call the same cg_fast ADM UNet (the ADM-64
architecture at a reduced width, random weights, float32), unguided, from the same seed, so they must give
the same samples bit for bit (checked). The two are run interleaved (oracle, sampler, oracle, ...) so that
a busy machine disturbs both alike. Besides the medians of the whole runs and their ratio, every UNet call
is timed, so the JSON also splits each run into the network (median ms per forward) and the loop around it
(ms per step outside the network: tables, step math, noise, checks). Everything is measured twice: on the
wall clock and as the CPU time of the sampling thread (``time.thread_time``; with one intra-op thread all
the work runs there). On a shared machine the wall-clock ratio of whole runs moves by tens of per cent from
run to run (other processes take the core away); the CPU-time figures are the ones to compare. One
intra-op thread (``--threads``).

Measured 2026-12-01 on the shared 2-core CPU machine (width 32, batch 4, DDPM 50, median of 3, samples
bitwise equal). Wall clock, whole runs: oracle 18.5 / 25.1 / 31.9 s and sampler 14.9 / 30.6 / 39.7 s in three
invocations of this script: ratios 0.80, 1.22 and 1.25 with nothing changed, so a 7 % difference of
wall-clock medians is noise here. Thread CPU time: whole runs 16.66 s vs 16.63 s (ratio 0.998); per UNet
forward 331.6 vs 339.3 ms (the same module on the same inputs: another run gave 318.4 vs 293.2 ms, so +-8 %
is this machine's noise even in CPU time); the loop around the network 2.66 ms per step for the oracle and
1.59 ms for the sampler with its fused csrc step (0.60x; 2.12 vs 2.01 ms with ``--kernels reference``). The
sampler adds no cost: what differs between the two loops is a fraction of a per cent of a step, in cg_fast's
favour.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # adm_oracle
sys.path.insert(0, str(ROOT))

# ADM-64's architecture (attention at 32/16/8, channel_mult 1,2,3,4, scale-shift norm, learned sigma) at a
# width a CPU runs in well under a second per forward.
SMALL_ADM64 = dict(image_size=64, class_cond=True, learn_sigma=True, num_channels=32, num_res_blocks=1,
                   num_head_channels=32, attention_resolutions="32,16,8", resblock_updown=True,
                   use_scale_shift_norm=True, use_new_attention_order=True, dropout=0.0)


def small_adm64(width: int = 32, seed: int = 0) -> torch.nn.Module:
    """The small ADM-64 UNet (float32, random weights, eval mode)."""
    from cg_fast.models import adm
    torch.manual_seed(seed)
    return adm.create_unet(dtype=torch.float32, **{**SMALL_ADM64, "num_channels": width}).eval()


CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def side_by_side(model: torch.nn.Module, *, batch: int = 4, steps: int = 50, repeats: int = 3,
                 image_size: int = 64, kernels: str = "auto", seed: int = 0,
                 clocks: tuple[str, ...] = ("wall", "cpu")) -> dict[str, Any]:
    """Seconds per run of the oracle loop and of ``Sampler.sample`` (interleaved), medians and their ratio."""
    from adm_oracle import Oracle, spaced_betas

    from cg_fast import NoiseSchedule, Sampler
    from cg_fast.schedules import space_timesteps

    forwards: list[float] = []

    clock = time.perf_counter

    def timed(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        start = clock()
        out = model(x, t, y)
        forwards.append(clock() - start)
        return out

    sched = NoiseSchedule.cosine(1000)
    betas, tmap = spaced_betas(sched.betas, set(space_timesteps(1000, str(steps))))
    oracle = Oracle(betas, tmap, learned=True)
    sampler = Sampler(timed, sched, str(steps), learn_sigma=True, kernels=kernels, backend="eager")
    shape = (batch, 3, image_size, image_size)
    y = torch.arange(batch) % 10
    names = ("oracle", "sampler")
    res: dict[str, Any] = {"batch": batch, "steps": steps, "repeats": repeats, "threads": torch.get_num_threads(),
                           "kernels": kernels}
    outs: dict[str, torch.Tensor] = {}
    for label in clocks:
        clock = CLOCKS[label]
        times: dict[str, list[float]] = {k: [] for k in names}
        net: dict[str, list[float]] = {k: [] for k in names}       # every forward's seconds
        loop: dict[str, list[float]] = {k: [] for k in names}      # per run: seconds outside the network
        for _ in range(repeats):
            for name in names:
                forwards.clear()
                torch.manual_seed(seed)
                start = clock()
                if name == "oracle":
                    outs[name] = oracle.loop(timed, shape, y=y)
                else:
                    outs[name] = sampler.sample(shape, y=y).x
                times[name].append(clock() - start)
                net[name].extend(forwards)
                loop[name].append(times[name][-1] - sum(forwards))
        for k in names:
            res[f"{label}_{k}_s"] = [round(v, 3) for v in times[k]]
            res[f"{label}_{k}_median_s"] = round(statistics.median(times[k]), 3)
            res[f"{label}_{k}_forward_median_ms"] = round(1e3 * statistics.median(net[k]), 2)
            res[f"{label}_{k}_loop_ms_per_step"] = round(1e3 * statistics.median(loop[k]) / steps, 3)
        for what in ("median_s", "forward_median_ms", "loop_ms_per_step"):
            res[f"{label}_{what}_sampler_over_oracle"] = round(
                res[f"{label}_sampler_{what}"] / res[f"{label}_oracle_{what}"], 4)
    res["bitwise_equal"] = bool(torch.equal(outs["oracle"], outs["sampler"]))
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=32, help="num_channels of the small ADM-64 (ADM's own: 192)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kernels", default="auto", help="cg_fast step kernels: auto (csrc on the CPU) or reference")
    p.add_argument("--clocks", nargs="+", default=["wall", "cpu"], choices=list(CLOCKS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    res = side_by_side(small_adm64(args.width), batch=args.batch, steps=args.steps, repeats=args.repeats,
                       kernels=args.kernels, clocks=tuple(args.clocks))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
