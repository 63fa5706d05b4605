"""diffusers UNets in cg_fast's Sampler: the scheduler's settings read from its config, CompCFG on top.

    python -m cg_fast.integrations.examples.diffusers_sampler                     # offline: tiny random UNets, in seconds
    python -m cg_fast.integrations.examples.diffusers_sampler --model /local/ddpm  # a LOCAL folder with unet/ and scheduler/

``diffusers_sampler(adapter, scheduler, steps)`` gives a ``cg_fast.Sampler`` that steps as the scheduler does
(DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler), at the timesteps it sets. Two adapters:
``UNet2DModelAdapter`` (labels as class_labels) and ``UNet2DConditionAdapter`` (label k = prompt k, the null
label = the negative prompt; the prompt embeddings computed beforehand). Needs ``pip install 'cg_fast[diffusers]'``.
"""
from __future__ import annotations

import argparse

import torch

from cg_fast import CFG
from cg_fast.guidance import Compress
from cg_fast.integrations.diffusers import UNet2DConditionAdapter, UNet2DModelAdapter, diffusers_sampler


def class_conditional(folder: str | None, steps: int, scale: float) -> torch.Tensor:
    """A class-conditional UNet2DModel (with a null class for CFG) and its DDPMScheduler."""
    from diffusers import DDPMScheduler, UNet2DModel

    if folder:
        unet = UNet2DModel.from_pretrained(folder, subfolder="unet").eval()
        scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    else:
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, attention_head_dim=4,
                           num_class_embeds=11).eval()  # classes 0..9, 10 = the null class
        scheduler = DDPMScheduler(beta_schedule="linear")
    model = UNet2DModelAdapter(unet, null_label=unet.config.num_class_embeds - 1)
    sampler = diffusers_sampler(model, scheduler, steps)
    size = unet.config.sample_size
    y = torch.arange(4) % (unet.config.num_class_embeds - 1)
    with torch.no_grad():
        out = sampler.sample((4, unet.config.in_channels, size, size), y=y,
                             guidance=CFG(scale, policy=Compress(rate=5, k=1), cache="compress"),
                             generator=torch.Generator().manual_seed(0))
    print(f"UNet2DModel, {sampler.method} over {sampler.num_steps} steps: {out.stats.denoiser_passes} passes, "
          f"{len(out.stats.guided_steps)} guided")
    return out.x


def text_conditional(steps: int, scale: float) -> torch.Tensor:
    """A (tiny) Stable-Diffusion-style UNet2DConditionModel with given prompt embeddings, DPM-Solver++ 2M."""
    from diffusers import DPMSolverMultistepScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=4).eval()
    prompts = torch.randn(3, 5, 16)  # the text encoder's output for 3 prompts (computed elsewhere)
    negative = torch.zeros(5, 16)    # the unconditional pass's
    model = UNet2DConditionAdapter(unet, prompts, negative)
    sampler = diffusers_sampler(model, DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, final_sigmas_type="zero"), steps)
    with torch.no_grad():
        out = sampler.sample((3, 4, 8, 8), y=torch.arange(3), guidance=CFG(scale, policy=Compress(rate=5, k=1)),
                             generator=torch.Generator().manual_seed(0))
    print(f"UNet2DConditionModel, {sampler.method} over {sampler.num_steps} steps: "
          f"{out.stats.denoiser_passes} passes, {len(out.stats.guided_steps)} guided")
    return out.x


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a LOCAL folder with unet/ and scheduler/ (a class-conditional UNet2DModel "
                                    "whose last class is its null class); default: tiny random UNets, offline")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--scale", type=float, default=3.0)
    args = ap.parse_args(argv)
    class_conditional(args.model, args.steps, args.scale)
    if not args.model:
        text_conditional(args.steps, args.scale)


if __name__ == "__main__":
    main()
