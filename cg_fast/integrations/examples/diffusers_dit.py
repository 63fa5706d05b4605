"""DiT through diffusers: cg_fast's CFG on a DiTTransformer2DModel samples as DiTPipeline does, and CompCFG.

    python -m cg_fast.integrations.examples.diffusers_dit                        # offline: a tiny random DiT, in seconds
    python -m cg_fast.integrations.examples.diffusers_dit --model /local/dit-256  # a LOCAL DiTPipeline folder (facebook/DiT-XL-2-256)

With full guidance and ``CFG(..., doubled_noise=True)`` the latents are DiTPipeline's for the same
``torch.manual_seed`` (all latent channels guided, the learned variance dropped before the scheduler step, null
class 1000); the script checks that, then samples with Compress(rate=5, k=1). Needs ``cg_fast[diffusers]``.
"""
from __future__ import annotations

import argparse

import torch

from cg_fast import CFG
from cg_fast.guidance import Compress, Full
from cg_fast.integrations.diffusers import DiTAdapter, diffusers_sampler


def load(folder: str | None):
    from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    if folder:
        return DiTPipeline.from_pretrained(folder)
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, norm_num_groups=4, sample_size=8, patch_size=2,
                                num_embeds_ada_norm=1000).eval()
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4).eval()
    return DiTPipeline(transformer=dit, vae=vae, scheduler=DDPMScheduler(beta_schedule="linear", clip_sample=False))


def main(argv: list[str] | None = None) -> float:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a LOCAL DiTPipeline folder; default: a tiny random DiT, offline")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=4.0)
    args = ap.parse_args(argv)
    pipe = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    labels = [207, 360, 387, 974]
    latent = pipe.transformer.config.sample_size
    shape = (len(labels), pipe.transformer.config.in_channels, latent, latent)

    seen = []  # DiTPipeline always decodes: read its latents where it hands them to the VAE
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, *a, **k: (seen.append(z * pipe.vae.config.scaling_factor), decode(z, *a, **k))[1]
    torch.manual_seed(0)
    with torch.no_grad():
        pipe(class_labels=labels, guidance_scale=args.scale, num_inference_steps=args.steps, output_type="pt")

    sampler = diffusers_sampler(DiTAdapter(pipe.transformer), pipe.scheduler, args.steps)
    torch.manual_seed(0)
    with torch.no_grad():
        full = sampler.sample(shape, y=labels, guidance=CFG(args.scale, policy=Full(), doubled_noise=True))
        comp = sampler.sample(shape, y=labels, guidance=CFG(args.scale, policy=Compress(rate=5, k=1),
                                                            doubled_noise=True))
    diff = float((full.x - seen[0]).abs().max())
    print(f"full CFG vs DiTPipeline: max |difference| {diff:.2e}, max |latent| {float(seen[0].abs().max()):.3g} "
          f"({full.stats.denoiser_rows} rows)")
    print(f"CompCFG: {comp.stats.denoiser_rows} rows, {len(comp.stats.guided_steps)} of {args.steps} steps guided")
    return diff


if __name__ == "__main__":
    main()
