"""``cg-fast sample``: the 50k-sample job from real checkpoints, sharded, resumable, under torchrun.

guided-diffusion's and DiT's own command lines are accepted verbatim; where their flag and a cg_fast option
mean the same thing they are aliases of one option (giving both with different values is an error). Model
and classifier flags that shape a network (guided-diffusion's MODEL_FLAGS / CLASSIFIER_FLAGS) pass through to
``cg_fast.models.adm.parse_flags``, which refuses an unknown flag with a did-you-mean. The work itself is
:mod:`cg_fast.harness`; this module only turns a command line into a :class:`~cg_fast.harness.SampleJob`.
"""
from __future__ import annotations

import argparse
import difflib
import sys
import time
from pathlib import Path
from typing import Any

import torch
from ..sampler import METHODS

EXAMPLES = """\
examples:
  # guided-diffusion's classifier_sample.py command, verbatim (64x64, CompG instead of full guidance):
  cg-fast sample --attention_resolutions 32,16,8 --class_cond True --diffusion_steps 1000 --dropout 0.1 \\
      --image_size 64 --learn_sigma True --noise_schedule cosine --num_channels 192 --num_head_channels 64 \\
      --num_res_blocks 3 --resblock_updown True --use_new_attention_order True --use_fp16 True \\
      --use_scale_shift_norm True --classifier_scale 1.0 --classifier_path 64x64_classifier.pt \\
      --classifier_depth 4 --model_path 64x64_diffusion.pt --batch_size 64 --num_samples 50000 \\
      --timestep_respacing 250 --policy compress --rate 5 --out runs/adm64
  # the same from the checkpoints alone (the layouts are recognised):
  cg-fast sample --model 64x64_diffusion.pt --classifier 64x64_classifier.pt --num_samples 50000
  # DiT's sample_ddp.py flags, 8 GPUs, CFG on the steps CompG picks, decoded with a local VAE folder:
  torchrun --nproc_per_node 8 -m cg_fast sample --model DiT-XL/2 --ckpt DiT-XL-2-256x256.pt --image-size 256 \\
      --cfg-scale 1.5 --num-fid-samples 50000 --per-proc-batch-size 32 --vae sd-vae-ft-ema/ --out runs/dit
  # the digits testbed that ships with cg_fast (no downloads):
  cg-fast sample --model digits-uncond --classifier digits-guide --scale 16 --num_samples 1000 --out runs/digits

A rerun of the same command resumes (finished shards are kept); another command on the same --out is
refused. Output: OUT/samples_NxHxWxC.npz (arr_0 uint8 NHWC, arr_1 labels: the ADM evaluator's format),
OUT/run.json (settings, versions, per-shard timings, denoiser rows, classifier gradients), OUT/shards/.
"""

# canonical option -> its spellings (cg_fast's first); values given under several spellings must agree
ALIASES: dict[str, tuple[str, ...]] = {
    "num_samples": ("--num-samples", "--num_samples", "--num-fid-samples"),
    "batch_size": ("--batch-size", "--batch_size", "--per-proc-batch-size"),
    "steps": ("--steps", "--timestep_respacing", "--num-sampling-steps"),
    "checkpoint": ("--checkpoint", "--model_path", "--ckpt"),
    "classifier_path": ("--classifier-path", "--classifier_path"),
    "scale": ("--scale", "--classifier_scale", "--cfg-scale"),
    "seed": ("--seed", "--global-seed"),
    "out": ("--out", "--sample-dir"),
    "image_size_dit": ("--image-size",),
}
POLICY_PARAMS = {"compress": ("rate", "k", "final"), "uniform": ("rate", "final"), "early_stop": ("fraction",),
                 "interval": ("lo", "hi"), "full": ()}
_CKPT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
TESTBED_MODELS = {"digits-cond": "cond", "digits-uncond": "uncond"}
TESTBED_CLASSIFIERS = {"digits-guide": "guide", "digits-judge": "judge"}


def add_model_args(p: argparse.ArgumentParser, classifier: bool = True) -> None:
    """The options that name the networks, shared by sample, bench and export: one model spec builds the same
    network (and so the same weights hash, the key of the engine caches) in every command."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help="a named config (--list-models), a checkpoint file, a DiT architecture "
                        "(DiT-XL/2, with --ckpt) or a testbed network (digits-cond, digits-uncond)")
    g.add_argument(*ALIASES["checkpoint"], dest="checkpoint", action="append", default=None,
                   help="the denoiser's checkpoint (guided-diffusion --model_path, DiT --ckpt)")
    if classifier:
        g.add_argument("--classifier", default=None,
                       help="a named classifier config, a checkpoint file, or digits-guide (classifier guidance)")
        g.add_argument(*ALIASES["classifier_path"], dest="classifier_path", action="append", default=None,
                       help="the classifier's checkpoint (guided-diffusion --classifier_path)")
    g.add_argument(*ALIASES["image_size_dit"], dest="image_size_dit", action="append", type=int, default=None,
                   help="DiT: image size in pixels, 256 or 512 (latents are 1/8 of it)")
    g.add_argument("--random-weights", action="store_true",
                   help="a named config with random weights (smoke tests; no checkpoint)")
    g.add_argument("--list-models", action="store_true", help="print the named configs and exit")


def list_models() -> str:
    """The names --model and --classifier accept, one a line."""
    from ..models import list_configs

    return "\n".join([*list_configs(), *TESTBED_MODELS, *TESTBED_CLASSIFIERS,
                      "DiT-XL/2 (and DiT-{S,B,L,XL}/{2,4,8}) with --ckpt"])


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("sample", help="sample N images from a checkpoint with a guidance policy (sharded, "
                       "resumable, torchrun)", description=__doc__.split("\n\n")[0], epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_model_args(p)

    s = p.add_argument_group("sampling")
    s.add_argument(*ALIASES["num_samples"], dest="num_samples", action="append", type=int, default=None,
                   help="total number of samples over all processes (default 50000)")
    s.add_argument(*ALIASES["batch_size"], dest="batch_size", action="append", type=int, default=None,
                   help="batch size per process (default 16); it does not change the samples")
    s.add_argument(*ALIASES["steps"], dest="steps", action="append", default=None,
                   help="respacing: '250', 'ddim25', '10,15,20' (default: the model's published setting)")
    s.add_argument("--method", choices=list(METHODS), default=None,
                   help="sampler (default: the model's); dpmpp2m = DPM-Solver++ 2M")
    s.add_argument("--use_ddim", default=None, help="guided-diffusion's flag: True means --method ddim")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM noise (default 0)")
    s.add_argument("--clip_denoised", default=None, help="guided-diffusion's flag (default: the model's)")
    s.add_argument(*ALIASES["seed"], dest="seed", action="append", type=int, default=None,
                   help="run seed: sample i's noise and label depend on (seed, i) only (default 0)")
    s.add_argument("--class", dest="klass", type=int, nargs="+", default=None,
                   help="class label(s), cycled over the samples (default: uniform random per sample)")

    gd = p.add_argument_group("guidance")
    gd.add_argument(*ALIASES["scale"], dest="scale", action="append", type=float, default=None,
                    help="classifier scale s, or CFG scale w (default: the published setting)")
    gd.add_argument("--guidance", choices=["auto", "classifier", "cfg", "none"], default="auto",
                    help="auto (default): classifier guidance with a classifier, CFG when a CFG scale > 1 is "
                         "given, else none")
    gd.add_argument("--policy", default="compress", choices=sorted(POLICY_PARAMS),
                    help="which steps get fresh guidance (default compress)")
    gd.add_argument("--rate", type=int, default=None, help="compress / uniform: about 1 guided step in RATE (5)")
    gd.add_argument("--k", type=float, default=None, help="compress: packing power (1)")
    gd.add_argument("--final", type=int, default=None, help="compress / uniform: last steps always guided (2)")
    gd.add_argument("--fraction", type=float, default=None, help="early_stop: fraction of steps guided")
    gd.add_argument("--lo", type=float, default=None, help="interval: lowest sigma guided")
    gd.add_argument("--hi", type=float, default=None, help="interval: highest sigma guided")
    gd.add_argument("--cache", default=None, choices=["drop", "compress", "reuse", "momentum"],
                    help="what skipped steps get (default: compress for classifier guidance, drop for CFG)")
    gd.add_argument("--beta", type=float, default=0.0, help="momentum: weight of the old state")
    gd.add_argument("--decay", type=float, default=1.0, help="momentum: decay at skipped steps")
    gd.add_argument("--cfg-channels", default="auto",
                    help="CFG: auto (the model's convention; DiT 3), all, or a number of leading channels")
    gd.add_argument("--null-label", type=int, default=None, help="CFG: the unconditional label (the model's)")

    e = p.add_argument_group("execution and output")
    e.add_argument(*ALIASES["out"], dest="out", action="append", default=None,
                   help="output folder (default out/sample)")
    e.add_argument("--shard-size", type=int, default=1000, help="samples per shard file (default 1000)")
    e.add_argument("--backend", default="auto", help="auto | eager | cudagraph | compile | onnx | tensorrt | aoti")
    e.add_argument("--kernels", default="auto", help="step kernels: auto | reference | csrc | triton")
    e.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="network compute dtype (default: the published setting)")
    e.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda:LOCAL_RANK if available)")
    e.add_argument("--vae", default=None,
                   help="latent models: a LOCAL diffusers AutoencoderKL folder to decode with (needs "
                        "cg_fast[diffusers]); without it the latents are saved")
    e.add_argument("--keep-float", action="store_true", help="also keep the float samples in the shards")
    e.add_argument("--grid", type=int, default=64, help="PNG grid of the first N images (0: none; default 64)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


# -- argument reconciliation ------------------------------------------------------------------------------
def _one(args: argparse.Namespace, name: str, default: Any = None) -> Any:
    """The value of an option given under any of its spellings; an error if they disagree."""
    values = getattr(args, name)
    if not values:
        return default
    distinct = list(dict.fromkeys(values))
    if len(distinct) > 1:
        raise ValueError(f"{' / '.join(ALIASES[name])} are one option, given with different values {distinct}: "
                         "give it once")
    return distinct[0]


def _bool_flag(value: str | None, name: str) -> bool | None:
    if value is None:
        return None
    from ..models.adm import _str2bool

    try:
        return _str2bool(value)
    except ValueError:
        raise ValueError(f"--{name} takes True or False, got {value!r}") from None


def _policy(args: argparse.Namespace):
    from ..policies import make_policy

    params = {k: getattr(args, k) for k in ("rate", "k", "final", "fraction", "lo", "hi")
              if getattr(args, k) is not None}
    stray = [k for k in params if k not in POLICY_PARAMS[args.policy]]
    if stray:
        raise ValueError(f"--{', --'.join(stray)} do(es) not apply to --policy {args.policy} (it takes "
                         f"{', '.join('--' + k for k in POLICY_PARAMS[args.policy]) or 'no parameters'})")
    return make_policy(args.policy, **params)


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _file(path: str, what: str) -> Path:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"{what} {path!r} does not exist (or is not a file)")
    return p


# -- building the models ----------------------------------------------------------------------------------
def _denoiser(args, flags, dtype) -> tuple[torch.nn.Module, dict[str, Any]]:
    """(model, its identity for the settings fingerprint)."""
    from ..models import CONFIGS, adm, create, dit, get_spec, load, load_checkpoint
    from ..runs import files_fingerprint

    ckpt = _one(args, "checkpoint")
    name = args.model
    if name is not None and (Path(name).is_file() or Path(name).suffix in _CKPT_SUFFIXES):
        if ckpt is not None:
            raise ValueError(f"--model {name} is a checkpoint file and --model_path/--ckpt {ckpt} another: give one")
        ckpt, name = name, None
    ident: dict[str, Any] = {"model": name, "model_flags": flags.model or None}
    if ckpt is not None:
        ident["checkpoint"] = files_fingerprint([_file(ckpt, "checkpoint")])
    if name in TESTBED_MODELS:
        from ..testbeds.digits import load_testbed

        if ckpt is not None or flags.model:
            raise ValueError(f"--model {name} is the shipped testbed network: it takes no checkpoint or model flags")
        return load_testbed(networks=(TESTBED_MODELS[name],)).nets[TESTBED_MODELS[name]], ident
    if name is not None and name.lower().startswith("dit-") and "/" in name:  # an architecture: DiT-XL/2
        image_size = _one(args, "image_size_dit", flags.model.get("image_size", 256))
        if image_size % 8:
            raise ValueError(f"--image-size must be a multiple of 8 (DiT latents are 1/8 of it), got {image_size}")
        ident["image_size"] = image_size
        model = dit.create(name, input_size=image_size // 8, dtype=dtype or torch.float32)
        return _load_or_refuse(model, ckpt, args, load), ident
    if name is not None:
        if name not in CONFIGS:
            close = difflib.get_close_matches(name, list(CONFIGS) + list(TESTBED_MODELS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"--model {name!r} is no named config, DiT architecture, testbed network or existing "
                             f"checkpoint file{hint}; see cg-fast sample --list-models")
        if get_spec(name).family == "adm-classifier":
            raise ValueError(f"--model {name} is a classifier: pass it as --classifier")
        return _load_or_refuse(create(name, dtype=dtype), ckpt, args, load), ident
    if ckpt is None:
        raise ValueError("no model: pass --model (a named config, checkpoint file, DiT-XL/2 or digits-cond) or "
                         "--model_path / --ckpt")
    arch = {k: v for k, v in flags.model.items()
            if k in adm.MODEL_DEFAULTS and k not in ("learn_sigma", "use_checkpoint")}
    if arch:  # guided-diffusion's MODEL_FLAGS: build exactly that network
        return load(adm.create_unet(dtype=dtype, **flags.model), ckpt), ident
    return load_checkpoint(ckpt, dtype=dtype, **flags.diffusion), ident


def _load_or_refuse(model, ckpt, args, load):
    if ckpt is not None:
        return load(model, ckpt)
    if not args.random_weights:
        raise ValueError("no checkpoint: pass --model_path/--ckpt FILE (nothing is downloaded), or "
                         "--random-weights for a smoke run")
    from ..models.testing import randomize_

    return randomize_(model)


def _classifier(args, flags, dtype) -> tuple[torch.nn.Module | None, dict[str, Any]]:
    from ..models import CONFIGS, adm, create, get_spec, load, load_checkpoint
    from ..runs import files_fingerprint

    name, path = args.classifier, _one(args, "classifier_path")
    if name is not None and (Path(name).is_file() or Path(name).suffix in _CKPT_SUFFIXES):
        if path is not None:
            raise ValueError(f"--classifier {name} and --classifier_path {path}: give one")
        name, path = None, name
    if name is None and path is None:
        return None, {}
    ident: dict[str, Any] = {"classifier": name, "classifier_flags": flags.classifier or None}
    if path is not None:
        ident["classifier_checkpoint"] = files_fingerprint([_file(path, "classifier checkpoint")])
    if name in TESTBED_CLASSIFIERS:
        from ..testbeds.digits import load_testbed

        return load_testbed(networks=(TESTBED_CLASSIFIERS[name],)).nets[TESTBED_CLASSIFIERS[name]], ident
    if name is not None:
        if name not in CONFIGS:
            close = difflib.get_close_matches(name, list(CONFIGS) + list(TESTBED_CLASSIFIERS), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise ValueError(f"--classifier {name!r} is no named config, testbed network or existing file{hint}")
        if get_spec(name).family != "adm-classifier":
            raise ValueError(f"--classifier {name} is not a classifier config")
        return _load_or_refuse(create(name, dtype=dtype), path, args, load), ident
    arch = {k: v for k, v in flags.classifier.items() if k.startswith("classifier_") and k != "classifier_scale"}
    if arch:
        return load(adm.create_classifier(dtype=dtype, **flags.classifier), path), ident
    return load_checkpoint(path, dtype=dtype, **{k: v for k, v in flags.diffusion.items()
                                                 if k in ("noise_schedule", "diffusion_steps")}), ident


def _vae_decoder(folder: str, latent_scale: float, device):
    try:
        from diffusers.models import AutoencoderKL
    except ImportError:
        raise ValueError("--vae needs diffusers: pip install 'cg_fast[diffusers]'") from None
    if not Path(folder).is_dir():
        raise ValueError(f"--vae {folder!r} is not a folder: pass a LOCAL diffusers AutoencoderKL folder (with "
                         "config.json and the weights); nothing is downloaded")
    vae = AutoencoderKL.from_pretrained(folder, local_files_only=True).to(device).eval()

    def decode(z):
        return vae.decode(z.to(vae.dtype) / latent_scale).sample.float()
    return decode


# -- the command ------------------------------------------------------------------------------------------
def build_job(args: argparse.Namespace, extra: list[str]):
    """(SampleJob, rank, world) from the parsed command line and the pass-through guided-diffusion flags."""
    from ..guidance import CFG, ClassifierGuidance
    from ..harness import SampleJob, dist_rank_world
    from ..models.adm import parse_flags
    from ..sampler import Sampler

    flags = parse_flags(extra)  # refuses unknown flags, with a did-you-mean
    use_ddim = _bool_flag(args.use_ddim, "use_ddim")
    if use_ddim is not None and args.method is not None and (args.method == "ddim") != use_ddim:
        raise ValueError(f"--use_ddim {args.use_ddim} and --method {args.method} disagree: give one")
    method = "ddim" if use_ddim else args.method
    clip = _bool_flag(args.clip_denoised, "clip_denoised")
    if clip is not None:
        flags.model["clip_denoised"] = clip
    num_samples = _one(args, "num_samples", 50_000)
    batch = _one(args, "batch_size", 16)
    seed = _one(args, "seed", 0)
    out = Path(_one(args, "out", "out/sample"))
    dtype = _dtype(args.dtype)

    rank, world = dist_rank_world()
    device = torch.device(args.device) if args.device else (
        torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
    from .. import backends

    backends.check_name(args.backend)
    backends.resolve(args.backend, device)  # an unavailable backend says what to install, before any loading
    model, ident = _denoiser(args, flags, dtype)
    clf, clf_ident = _classifier(args, flags, dtype)
    model = model.to(device)
    cfg = model.cg_config
    steps = _one(args, "steps") or None
    sampler = Sampler.from_model(model, steps=steps, method=method, eta=args.eta, rng="counter",
                                 kernels=args.kernels, backend=args.backend,
                                 **({"clip_denoised": clip} if clip is not None else {}))
    scale = _one(args, "scale")
    kind = args.guidance
    if kind == "auto":
        kind = "classifier" if clf is not None else ("cfg" if scale is not None and scale > 1 else "none")
    policy = _policy(args)
    guidance = None
    if kind == "classifier":
        if clf is None:
            raise ValueError("--guidance classifier needs --classifier or --classifier_path")
        clf = clf.to(device)
        s = scale if scale is not None else (cfg.guidance_scale or clf.cg_config.guidance_scale or 1.0)
        guidance = ClassifierGuidance(clf, s, policy=policy, cache=args.cache or "compress", beta=args.beta,
                                      decay=args.decay)
        num_classes = clf.cg_config.num_classes
    elif kind == "cfg":
        if clf is not None:
            raise ValueError("--guidance cfg takes no classifier")
        ch = args.cfg_channels
        channels = int(ch) if ch not in ("auto", "all") else ch
        guidance = CFG(scale if scale is not None else (cfg.guidance_scale or 4.0), null_label=args.null_label,
                       policy=policy, cache=args.cache or "drop", beta=args.beta, decay=args.decay,
                       channels=channels)
        guidance = sampler.resolve_cfg(guidance)
        num_classes = cfg.num_classes
    else:
        num_classes = cfg.num_classes if cfg.class_cond else None
    if args.klass is not None and num_classes is not None and any(not 0 <= c < num_classes for c in args.klass):
        raise ValueError(f"--class {args.klass}: labels must lie in [0, {num_classes})")
    decode = None
    if args.vae is not None:
        if cfg.latent_scale is None:
            raise ValueError("--vae applies to latent models (DiT); this model samples pixels")
        decode = _vae_decoder(args.vae, cfg.latent_scale, device)
    settings = {
        **ident, **clf_ident, "steps": sampler.schedule.num_steps, "respacing": str(steps or cfg.timestep_respacing),
        "method": sampler.method, "eta": sampler.eta, "clip_denoised": sampler.clip_denoised,
        "guidance": kind, "guidance_repr": repr(guidance) if guidance is not None else None,
        "num_samples": num_samples, "seed": seed, "labels": args.klass, "dtype": args.dtype,
        "backend": args.backend, "shard_size": args.shard_size, "vae": args.vae, "shape": list(cfg.input_shape),
        "random_weights": bool(args.random_weights),
    }
    job = SampleJob(sampler, guidance, shape=cfg.input_shape, num_samples=num_samples, seed=seed, out=out,
                    settings=settings, batch_size=batch, shard_size=args.shard_size, num_classes=num_classes,
                    labels=args.klass, device=device, decode=decode, latent=cfg.latent_scale is not None,
                    keep_float=args.keep_float, progress=not args.no_progress and rank == 0)
    return job, rank, world


def run(args: argparse.Namespace, extra: list[str] | None = None) -> int:
    from ..harness import run_job

    if args.list_models:
        print(list_models())
        return 0
    start = time.perf_counter()
    job, rank, world = build_job(args, extra or [])
    record = run_job(job, rank, world)
    if rank != 0:
        return 0
    took = time.perf_counter() - start
    t = record["totals"]
    final = job.out / record["output"]
    print(f"{job.num_samples} samples in {took:.1f} s ({job.num_samples / max(took, 1e-9):.1f} img/s this run "
          f"incl. loading); denoiser rows {t['denoiser_rows']}, classifier gradients {t['classifier_grads']}")
    print(f"samples: {final}\nrecord: {job.out / 'run.json'}")
    if job.latent and job.decode is None:
        print("these are DiT latents (float16). Decode them with a local diffusers AutoencoderKL folder: rerun "
              "with --vae DIR into another --out, or in Python AutoencoderKL.from_pretrained(DIR)"
              ".decode(torch.from_numpy(arr_0).float() / 0.18215).sample", file=sys.stderr)
    elif args.grid > 0:
        _grid(final, job.out / "grid.png", args.grid)
    return 0


def _grid(npz: Path, png: Path, n: int) -> None:
    import numpy as np

    from ..eval.images import save_grid
    from ..eval.npz import from_uint8

    with np.load(npz) as z:
        arr = z["arr_0"][:n]
    if arr.shape[-1] not in (1, 3):
        return
    save_grid(from_uint8(arr), png, nrow=min(8, len(arr)), scale=max(1, 64 // arr.shape[1]))
    print(f"grid: {png}")
