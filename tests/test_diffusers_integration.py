"""cg_fast.integrations.diffusers: the CompressGuidance guider in diffusers' SDXL modular blocks, the adapters
in cg_fast's Sampler against diffusers' own loops (DiTPipeline, UNet2DModel with DDPM / DDIM), and the extra's
import guard.

Offline: every model is tiny and built from a config dict here; nothing is downloaded. diffusers comes from the
``[diffusers]`` extra and transformers from ``[test]`` (diffusers' SDXL modular blocks import it; no text encoder
is built); without them these tests skip, except the blocked-import test, which needs neither.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from cg_fast import CFG
from cg_fast.guidance import Compress, EarlyStop, Full, Interval, UniformSkip

W = 5.0  # guidance scale (diffusers' and DiT's convention: eps_u + w (eps_c - eps_u))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run on one thread: on shared cores, several threads per 8x8 convolution cost more in
    contention than they save (measured here: 0.3 s against 10-50 s per SDXL run under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _diffusers():
    return pytest.importorskip("diffusers", reason="the [diffusers] extra is not installed (make test installs it)")


def _integration():
    _diffusers()
    import cg_fast.integrations.diffusers as integ

    return integ


# -- tiny models, from config dicts -------------------------------------------------------------------------
def _tiny_sdxl_unet():
    d = _diffusers()
    torch.manual_seed(0)
    unet = d.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=(2, 4), norm_num_groups=4, addition_embed_type="text_time",
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4).eval()
    return _settled(unet, 4, _sdxl_dpm().alphas_cumprod)


def _settled(model, channels: int, alphas_cumprod: torch.Tensor | None = None):
    """Make a random network's output the exact eps of N(0, I) data, sqrt(1 - alpha_bar_t) x, plus 0.3 times
    its own (a forward hook, so diffusers' pipelines and cg_fast's adapters see the same model). Random networks
    alone predict eps unrelated to x, and their samples grow to tens or hundreds, where float32 rounding alone
    exceeds an absolute 1e-5; with this the samples stay O(1), as a trained model's (tests/test_dpmpp.py's
    TinyDenoiser). ``alphas_cumprod``: the training schedule's (default: linear betas over 1000 steps)."""
    if alphas_cumprod is None:
        alphas_cumprod = _diffusers().DDPMScheduler(beta_schedule="linear").alphas_cumprod
    sqrt_1m_ab = (1 - alphas_cumprod).sqrt()

    def hook(mod, args, kwargs, out):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t).long().expand(x.shape[0])
        o = out[0] if isinstance(out, tuple) else out.sample
        o = torch.cat([sqrt_1m_ab[t].view(-1, 1, 1, 1) * x + 0.3 * o[:, :channels], o[:, channels:]], dim=1)
        if isinstance(out, tuple):  # return_dict=False, as diffusers' SDXL blocks call it
            return (o, *out[1:])
        out.sample = o
        return out

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def _tiny_dit():
    d = _diffusers()
    torch.manual_seed(1)
    dit = d.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                   num_layers=2, norm_num_groups=4, sample_size=8, patch_size=2,
                                   num_embeds_ada_norm=1000).eval()
    return _settled(dit, 4)


def _tiny_unet2d(num_class_embeds: int | None = 11):
    d = _diffusers()
    torch.manual_seed(2)
    unet = d.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                         down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                         up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                         norm_num_groups=4, attention_head_dim=4, num_class_embeds=num_class_embeds).eval()
    return _settled(unet, 3)


# -- the guider in diffusers' SDXL modular blocks ------------------------------------------------------------
B, N_SDXL, SIZE = 2, 8, 64  # 64 px -> 8x8 latents (diffusers' default vae_scale_factor 8, no VAE component)


def _sdxl_dpm():
    """SDXL's training betas; DPM-Solver++ 2M ending on sigma = 0, the solver cg_fast's dpmpp2m equals."""
    return _diffusers().DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", timestep_spacing="leading")


@pytest.fixture(scope="module")
def sdxl():
    """diffusers' SDXL core denoise blocks (``StableDiffusionXLCoreDenoiseStep``: input, set_timesteps, prepare
    latents, additional conditioning, the denoise loop), i.e. ``StableDiffusionXLAutoBlocks`` without its text
    encoder, VAE-encoder and decode blocks, run on precomputed prompt embeddings: no text encoder or tokenizer
    exists offline, and these are the blocks that call the guider. One tiny UNet2DConditionModel."""
    _diffusers()
    pytest.importorskip("transformers", reason="diffusers' SDXL modular blocks import transformers ([test] extra)")
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLCoreDenoiseStep)

    unet = _tiny_sdxl_unet()
    pipe = StableDiffusionXLCoreDenoiseStep().init_pipeline()
    pipe.update_components(unet=unet, scheduler=_sdxl_dpm())
    g = torch.Generator().manual_seed(3)
    emb = dict(prompt_embeds=torch.randn(B, 5, 16, generator=g), pooled_prompt_embeds=torch.randn(B, 8, generator=g),
               negative_prompt_embeds=torch.randn(1, 5, 16, generator=g).expand(B, -1, -1).contiguous(),
               negative_pooled_prompt_embeds=torch.randn(1, 8, generator=g).expand(B, -1).contiguous())
    latents = torch.randn(B, 4, SIZE // 8, SIZE // 8, generator=g)
    calls: list[int] = []  # rows of every UNet call, to check what the guider asked for
    unet.register_forward_hook(lambda mod, args, out: calls.append(int(args[0].shape[0])))
    return pipe, unet, emb, latents, calls


def _run_sdxl(sdxl, guider):
    pipe, _, emb, latents, calls = sdxl
    pipe.update_components(guider=guider)
    calls.clear()
    out = pipe(**emb, latents=latents.clone(), num_inference_steps=N_SDXL, height=SIZE, width=SIZE,
               output="latents")
    return out, list(calls)


def _sdxl_sampler(sdxl):
    """The same network and scheduler in cg_fast's Sampler: label k = prompt k, the null label = the negative."""
    integ = _integration()
    _, unet, emb, _, _ = sdxl
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * B, dtype=torch.float32)  # SDXL's add_time_ids
    model = integ.UNet2DConditionAdapter(
        unet, emb["prompt_embeds"], emb["negative_prompt_embeds"][0],
        added_cond_kwargs={"text_embeds": emb["pooled_prompt_embeds"], "time_ids": time_ids},
        negative_added_cond_kwargs={"text_embeds": emb["negative_pooled_prompt_embeds"][0], "time_ids": time_ids[0]})
    return integ.diffusers_sampler(model, _sdxl_dpm(), N_SDXL)


@torch.no_grad()
def test_sdxl_full_cfg_equals_diffusers_guider(sdxl):
    """Full policy, drop cache: CompressGuidance is diffusers' ClassifierFreeGuidance (to 1e-6), two passes a step."""
    d = _diffusers()
    integ = _integration()
    want, calls_want = _run_sdxl(sdxl, d.ClassifierFreeGuidance(guidance_scale=W))
    guider = integ.CompressGuidance(guidance_scale=W, policy=Full(), cache="drop")
    got, calls = _run_sdxl(sdxl, guider)
    assert calls == calls_want == [B] * (2 * N_SDXL)
    assert guider.stats.denoiser_passes == 2 * N_SDXL and guider.stats.guided_steps == list(range(N_SDXL))
    assert 0.1 < want.abs().mean() and want.abs().max() < 10  # O(1) latents
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


POLICIES = [(Compress(rate=3, k=1, final=1), "drop"), (Compress(rate=3, k=2, final=1), "compress"),
            (Compress(rate=4, k=1), "reuse"), (Compress(rate=3, k=1, final=1), "momentum"),
            (EarlyStop(fraction=0.4), "compress"), (UniformSkip(rate=3, final=1), "reuse"),
            (Interval(lo=0.5, hi=20.0), "momentum"), (Full(), "compress")]


@torch.no_grad()
@pytest.mark.parametrize("policy, cache", POLICIES, ids=[f"{p.name}-{c}" for p, c in POLICIES])
def test_sdxl_comp_cfg_plans_and_equals_cg_fast_sampler(sdxl, policy, cache):
    """Every cache mode and policy: the unconditional batch runs exactly at the planned steps (one pass there,
    two elsewhere), and the latents equal cg_fast's Sampler with the UNet2DConditionModel adapter and the same
    DPMSolverMultistepScheduler, to 1e-5 (``CFG(batched=False)``: two B-row passes, as the pipeline runs them)."""
    integ = _integration()
    kw = dict(beta=0.5, decay=0.9) if cache == "momentum" else {}
    pipe = sdxl[0]
    guider = integ.CompressGuidance(guidance_scale=W, policy=policy, cache=cache, scheduler=pipe.scheduler, **kw)
    got, calls = _run_sdxl(sdxl, guider)
    sampler = _sdxl_sampler(sdxl)
    guid = CFG(W, policy=policy, cache=cache, batched=False, **kw)
    mask = sampler.guided_mask(guid)
    assert 0 < sum(mask) <= N_SDXL and guider.mask(N_SDXL) == mask
    assert guider.stats.guided_steps == [j for j, g in enumerate(mask) if g]
    assert len(calls) == guider.stats.denoiser_passes == N_SDXL + sum(mask)
    assert guider.stats.denoiser_rows == B * (N_SDXL + sum(mask))
    assert guider.num_conditions == 2  # after the run: the next one's encoders prepare negative embeddings
    out = sampler.sample(tuple(sdxl[3].shape), y=torch.arange(B), guidance=guid, noise=sdxl[3].clone())
    assert out.stats.denoiser_rows == guider.stats.denoiser_rows
    assert got.abs().max() < 10  # O(1) latents
    torch.testing.assert_close(got, out.x, rtol=1e-5, atol=1e-5)


def test_guider_config_round_trips_and_interval_needs_the_scheduler():
    integ = _integration()
    g = integ.CompressGuidance(guidance_scale=3.0, policy=Compress(rate=4, k=2, final=1), cache="momentum", beta=0.3)
    assert "compress" in repr(g)  # the config stays JSON-able
    h = g.new(guidance_scale=2.0)
    assert h.policy == Compress(rate=4, k=2, final=1) and h.cache == "momentum" and h.beta == 0.3
    assert g.mask(12) == Compress(rate=4, k=2, final=1).mask(12)
    assert g.num_conditions == 2  # before a run: the pipeline prepares negative embeddings
    with pytest.raises(TypeError, match="scheduler=pipe.scheduler"):
        integ.CompressGuidance(policy=Interval(lo=0.5, hi=5.0)).mask(10)
    with pytest.raises(ValueError, match="cache mode"):
        integ.CompressGuidance(cache="hold")
    assert integ.CompressGuidance(guidance_scale=1.0, policy=Full()).mask(4) == [False] * 4  # w = 1: nothing
    # the cache arithmetic alone (spec §4, §6), eps_c = 1, eps_u = 0, w = 3: reuse holds d through skipped
    # steps, drop applies nothing there, compress applies m_j = 2 at the guided steps
    c, u = torch.ones(1, 2), torch.zeros(1, 2)
    for cache, want in (("reuse", [3.0] * 4), ("drop", [3.0, 1.0, 3.0, 1.0]), ("compress", [5.0, 1.0, 5.0, 1.0])):
        r = integ.CompressGuidance(guidance_scale=3.0, policy=UniformSkip(rate=2, final=0), cache=cache)
        assert r.mask(4) == [True, False, True, False]
        preds = []
        for j in range(4):
            r.set_state(j, 4, torch.tensor(999 - j))
            preds.append(float(r.forward(c, u if r.num_conditions == 2 else None).pred[0, 0]))
        assert preds == want, cache
    r.disable()
    r.set_state(1, 4, torch.tensor(998))
    assert r.num_conditions == 1 and float(r.forward(c).pred[0, 0]) == 1.0


# -- DiT: DiTPipeline's samples from cg_fast's Sampler ---------------------------------------------------------
DIT_SCHEDULERS = {
    # DDPM: stochastic, so the doubled batch's noise matters (fixed_small variance, 10 "leading" steps)
    "DDPMScheduler": dict(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                          variance_type="fixed_small"),
    # DPM-Solver++ 2M (deterministic), the solver of DiTPipeline's documented usage, ending on sigma = 0
    "DPMSolverMultistepScheduler": dict(num_train_timesteps=1000, beta_schedule="linear",
                                        algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero"),
}


@torch.no_grad()
@pytest.mark.parametrize("scheduler", list(DIT_SCHEDULERS))
def test_dit_pipeline_parity(scheduler):
    """cg_fast's CFG on a tiny DiTTransformer2DModel (num_embeds_ada_norm=1000) reproduces DiTPipeline with the
    named scheduler (10 steps) for the same seed, to 1e-5: all 4 latent channels guided, the learned variance
    dropped before the scheduler step, null class 1000, the step noise drawn for the doubled batch
    (``CFG(..., doubled_noise=True)``). DiTPipeline 0.42 always decodes (it has no ``output_type="latent"``), so
    its latents are read where it hands them to the VAE's ``decode``."""
    d = _diffusers()
    integ = _integration()
    dit = _tiny_dit()
    sched = getattr(d, scheduler)(**DIT_SCHEDULERS[scheduler])
    torch.manual_seed(0)
    vae = d.AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4, sample_size=16).eval()
    seen = []
    decode = vae.decode
    vae.decode = lambda z, *a, **k: (seen.append(z.clone()), decode(z, *a, **k))[1]
    pipe = d.DiTPipeline(transformer=dit, vae=vae, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 999, 0]
    torch.manual_seed(7)  # DiTPipeline draws x_T from the generator and the steps' noise from the global RNG
    pipe(class_labels=labels, guidance_scale=W, num_inference_steps=10, generator=None, output_type="pt")
    want = seen[0] * vae.config.scaling_factor

    model = integ.DiTAdapter(dit)
    sampler = integ.diffusers_sampler(model, getattr(d, scheduler).from_config(sched.config), 10)
    assert not sampler.learn_sigma and sampler.method == ("ddpm" if scheduler == "DDPMScheduler" else "dpmpp2m")
    torch.manual_seed(7)
    out = sampler.sample((3, 4, 8, 8), y=labels, guidance=CFG(W, policy=Full(), doubled_noise=True))
    assert out.stats.denoiser_rows == 2 * 3 * 10
    assert 0.1 < want.abs().mean() and want.abs().max() < 10  # O(1) latents
    torch.testing.assert_close(out.x, want, rtol=1e-5, atol=1e-5)


# -- UNet2DModel: diffusers' DDPM / DDIM loops -----------------------------------------------------------------
def _diffusers_loop(unet, sched, x, y, *, w=None, null=None, generator=None, **step_kw):
    for t in sched.timesteps:
        if w is None:
            eps = unet(x, t, class_labels=y).sample
        else:
            e_c, e_u = unet(torch.cat([x, x]), t, class_labels=torch.cat([y, torch.full_like(y, null)])).sample.chunk(2)
            eps = e_u + w * (e_c - e_u)
        x = sched.step(eps, t, x, generator=generator, **step_kw).prev_sample
    return x


@torch.no_grad()
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "cfg"])
def test_unet2d_ddpm_loop_parity(guided):
    """A class-conditional UNet2DModel with diffusers' DDPMScheduler (fixed_small, clip_sample, 8 "leading"
    steps), seeded through one generator, against cg_fast's Sampler with the adapter, to 1e-5."""
    d = _diffusers()
    integ = _integration()
    unet = _tiny_unet2d()
    sched = d.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True)
    sched.set_timesteps(8)
    y = torch.tensor([1, 4])
    g = torch.Generator().manual_seed(11)
    x_t = torch.randn(2, 3, 8, 8, generator=g)
    want = _diffusers_loop(unet, sched, x_t, y, w=W if guided else None, null=10, generator=g)
    sampler = integ.diffusers_sampler(integ.UNet2DModelAdapter(unet, null_label=10), sched, 8)
    assert sampler.clip_denoised and sampler.variance == "fixed_small"
    guid = CFG(W, policy=Full()) if guided else None
    got = sampler.sample((2, 3, 8, 8), y=y, guidance=guid, generator=torch.Generator().manual_seed(11)).x
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_unet2d_ddim_loop_parity():
    """An unconditional UNet2DModel with diffusers' DDIMScheduler (clip_sample, set_alpha_to_one, 10 "leading"
    steps, eta 0, ``use_clipped_model_output=True`` as ADM) against cg_fast's DDIM, to 1e-5."""
    d = _diffusers()
    integ = _integration()
    unet = _tiny_unet2d(num_class_embeds=None)
    sched = d.DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=True, set_alpha_to_one=True)
    sched.set_timesteps(10)
    x_t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    want = _diffusers_loop(unet, sched, x_t, None, eta=0.0, use_clipped_model_output=True)
    sampler = integ.diffusers_sampler(integ.UNet2DModelAdapter(unet), sched, 10)
    assert sampler.method == "ddim" and not sampler.class_cond
    torch.testing.assert_close(sampler.sample(x_t.shape, noise=x_t).x, want, rtol=1e-5, atol=1e-5)


def test_unsupported_schedulers_say_what_works():
    d = _diffusers()
    integ = _integration()
    model = integ.UNet2DModelAdapter(_tiny_unet2d())
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        integ.diffusers_sampler(model, d.EulerDiscreteScheduler(), 10)
    with pytest.raises(ValueError, match="set_alpha_to_one"):
        integ.diffusers_sampler(model, d.DDIMScheduler(set_alpha_to_one=False), 10)
    with pytest.raises(ValueError, match="'leading' or 'trailing'"):  # DDIM steps t -> t - 1000 // n
        integ.diffusers_sampler(model, d.DDIMScheduler(timestep_spacing="linspace"), 10)
    trailing = integ.diffusers_sampler(model, d.DDIMScheduler(timestep_spacing="trailing"), 10)
    assert trailing.schedule.original_timesteps_in_sampling_order().tolist()[:2] == [999, 899]
    with pytest.raises(ValueError, match="solver_order"):
        integ.diffusers_sampler(model, d.DPMSolverMultistepScheduler(solver_order=3), 10)
    with pytest.raises(ValueError, match=r"\[K, L, D\]"):
        integ.UNet2DConditionAdapter(_tiny_sdxl_unet(), torch.randn(5, 16))
    with pytest.raises(ValueError, match="one row per prompt"):
        integ.UNet2DConditionAdapter(_tiny_sdxl_unet(), torch.randn(2, 5, 16),
                                     added_cond_kwargs={"text_embeds": torch.randn(3, 8)})
    with pytest.raises(ValueError, match="keep_variance=True"):
        integ.diffusers_sampler(integ.DiTAdapter(_tiny_dit()), d.DDPMScheduler(variance_type="learned_range"), 10)


@pytest.mark.parametrize("name", ["diffusers_compress_guider", "diffusers_sampler", "diffusers_dit"])
def test_examples_run_offline(name, capsys):
    """Each example's offline default (tiny random models built from configs), at 4 steps."""
    _diffusers()
    if name == "diffusers_compress_guider":
        pytest.importorskip("transformers", reason="diffusers' SDXL modular blocks import transformers ([test] extra)")
    import importlib

    mod = importlib.import_module(f"cg_fast.integrations.examples.{name}")
    result = mod.main(["--steps", "4"])
    if name == "diffusers_compress_guider":
        assert result["CompCFG"] < result["full CFG"] == 8
    assert "guided" in capsys.readouterr().out


# -- without diffusers ------------------------------------------------------------------------------------------
def test_blocked_diffusers_import_says_how_to_install_and_cg_fast_works():
    """With ``import diffusers`` failing, the extra's import says how to install it, and cg_fast samples."""
    code = textwrap.dedent("""
        import sys
        sys.modules["diffusers"] = None  # blocks the import, as if the extra were not installed
        import torch
        import cg_fast
        from cg_fast import CFG, Sampler, NoiseSchedule
        from cg_fast.guidance import Compress
        try:
            import cg_fast.integrations.diffusers
        except ImportError as e:
            assert "pip install 'cg_fast[diffusers]'" in str(e), str(e)
            assert e.name == "diffusers"
        else:
            raise AssertionError("cg_fast.integrations.diffusers imported without diffusers")

        def model(x, t, y=None):
            return 0.1 * x + (0.0 if y is None else 0.01 * y.float().view(-1, 1))

        s = Sampler(model, NoiseSchedule.linear(1000), "10", clip_denoised=False, num_classes=3)
        out = s.sample((4, 2), y=torch.tensor([0, 1, 0, 1]), guidance=CFG(2.0, null_label=2, policy=Compress(2, 1)))
        assert torch.isfinite(out.x).all() and out.stats.denoiser_passes == 10
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_import_cg_fast_does_not_import_diffusers():
    code = ("import sys, cg_fast, cg_fast.sampler, cg_fast.guidance, cg_fast.integrations, cg_fast.cli; "
            "print('diffusers' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "False"
