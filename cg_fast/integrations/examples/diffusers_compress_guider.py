"""Compress Guidance inside a diffusers modular pipeline (SDXL): the unconditional batch at a few steps only.

    python -m cg_fast.integrations.examples.diffusers_compress_guider                      # offline: a tiny random UNet, in seconds
    python -m cg_fast.integrations.examples.diffusers_compress_guider --model /local/sdxl  # a LOCAL SDXL folder (diffusers layout)

The guider is installed with ``pipe.update_components(guider=...)``; diffusers' own loop, scheduler and blocks
run unchanged. It prints the denoiser passes of full CFG and of CompCFG (Compress(rate=5, k=1), compress cache).
Needs ``pip install 'cg_fast[diffusers]'`` (and transformers, which diffusers' SDXL blocks import).
"""
from __future__ import annotations

import argparse

import torch

from cg_fast.guidance import Compress, Full
from cg_fast.integrations.diffusers import CompressGuidance


def tiny_pipeline():
    """diffusers' SDXL core denoise blocks (no text encoder, VAE or decoder) on a tiny random UNet, and
    precomputed prompt embeddings standing in for the text encoders' output."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLCoreDenoiseStep)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4).eval()
    pipe = StableDiffusionXLCoreDenoiseStep().init_pipeline()
    pipe.update_components(unet=unet, scheduler=DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, final_sigmas_type="zero"))
    inputs = dict(prompt_embeds=torch.randn(1, 5, 16), pooled_prompt_embeds=torch.randn(1, 8),
                  negative_prompt_embeds=torch.zeros(1, 5, 16), negative_pooled_prompt_embeds=torch.zeros(1, 8),
                  height=64, width=64, output="latents")
    return pipe, inputs


def real_pipeline(folder: str, prompt: str):
    from diffusers import ModularPipeline

    pipe = ModularPipeline.from_pretrained(folder)
    pipe.load_components(torch_dtype=torch.float16 if torch.cuda.is_available() else torch.float32)
    if torch.cuda.is_available():
        pipe.to("cuda")
    return pipe, dict(prompt=prompt, output="images")


def main(argv: list[str] | None = None) -> dict[str, int]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a LOCAL SDXL folder (diffusers layout); default: a tiny random UNet, offline")
    ap.add_argument("--prompt", default="a photo of an astronaut riding a horse")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--scale", type=float, default=5.0)
    args = ap.parse_args(argv)
    pipe, inputs = real_pipeline(args.model, args.prompt) if args.model else tiny_pipeline()
    passes = {}
    for name, policy, cache in (("full CFG", Full(), "drop"), ("CompCFG", Compress(rate=5, k=1), "compress")):
        guider = CompressGuidance(guidance_scale=args.scale, policy=policy, cache=cache)
        pipe.update_components(guider=guider)
        pipe(**inputs, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(0))
        passes[name] = guider.stats.denoiser_passes
        print(f"{name:9s}: {guider.stats.denoiser_passes} denoiser passes, "
              f"{len(guider.stats.guided_steps)} of {args.steps} steps guided")
    return passes


if __name__ == "__main__":
    main()
