"""FewstepScheduler inside real diffusers pipelines built locally with tiny random weights (no download).

A ``DDPMPipeline`` with a small ``UNet2DModel``: the DDIM and DPM-Solver++(2M) presets through the
adapter (on the base scheduler's own time steps, ``spacing="diffusers"``) reproduce diffusers'
DDIMScheduler / DPMSolverMultistepScheduler to <= 1e-4 (float32 images in [0, 1]); any preset or a
schedule file through the pipeline equals ``fewstep.sample`` on the same network and noise; a
pipeline called twice with other settings equals fresh pipelines (no state carried over).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fewstep

diffusers = pytest.importorskip("diffusers")
from fewstep.integrations.diffusers import FewstepScheduler  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.filterwarnings("ignore::DeprecationWarning")]
TOL = 1e-4


def _unet() -> "diffusers.UNet2DModel":
    torch.manual_seed(0)
    return diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(8, 16),
                                 down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                                 norm_num_groups=4).eval()


def _pipe(scheduler) -> "diffusers.DDPMPipeline":
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.DDPMPipeline(unet=_UNET, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


_UNET = _unet()


def _run(pipe, n, seed=1):
    return pipe(batch_size=2, num_inference_steps=n, generator=torch.Generator().manual_seed(seed), output_type="np").images


def _base(prediction_type="epsilon"):
    return diffusers.DDIMScheduler(set_alpha_to_one=True, clip_sample=False, prediction_type=prediction_type)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("n", [6, 12])
def test_ddim_and_dpmpp_2m_reproduce_diffusers(n, prediction_type):
    base = _base(prediction_type)
    pipe = _pipe(base)
    ref = _run(pipe, n)
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "ddim", spacing="diffusers")
    assert abs(_run(pipe, n) - ref).max() <= TOL
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(base.config)
    ref2 = _run(pipe, n)
    assert abs(ref2 - ref).max() > 10 * TOL  # a different sampler: the comparison can tell them apart
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "dpmpp_2m", spacing="diffusers", final_order=1)
    assert abs(_run(pipe, n) - ref2).max() <= TOL


def _fewstep_direct(plan_or_name, n, seed=1, **opts):
    """fewstep.sample on the same network, noise schedule and initial noise as the pipeline."""
    sch = FewstepScheduler.from_pipeline(_pipe(_base()), "ddim")
    model = fewstep.Model(lambda x, t: _UNET(x, t).sample, sch.schedule, "eps")
    x_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        x = fewstep.sample(model, x_T, plan_or_name, nfe=None if isinstance(plan_or_name, fewstep.SolverSchedule) else n, seed=3, **opts)
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name,n,opts", [("unipc", 8, {}), ("heun", 9, {}), ("dpmpp_3m", 8, {"spacing": "karras"}), ("dpmpp_2m_sde", 10, {})])
def test_any_preset_through_the_pipeline_equals_fewstep_sample(name, n, opts):
    pipe = _pipe(_base())
    calls = []
    hook = _UNET.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe.scheduler = FewstepScheduler.from_pipeline(pipe, name, seed=3, **opts)
        out = _run(pipe, n)
    finally:
        hook.remove()
    assert len(calls) == n  # exactly the NFE asked for
    assert abs(out - _fewstep_direct(name, n, **opts)).max() <= TOL


def test_the_default_call_through_the_pipeline_equals_fewstep_sample():
    """No solver named: the pipeline runs what fewstep.sample(model, x_T, nfe=N) runs on latents of
    the network's shape (the default rule reads the data dimension from the network's config)."""
    pipe = _pipe(_base())
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe)
    assert pipe.scheduler.config.data_dim == 3 * 8 * 8
    for n in (5, 12):
        assert abs(_run(pipe, n) - _fewstep_direct(None, n)).max() <= TOL


def test_autotune_through_the_scheduler(tmp_path):
    pipe = _pipe(_base())
    opts = fewstep.AutotuneOptions(cache_dir=tmp_path, budget=1200)
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, autotune=opts)
    out = _run(pipe, 6)
    res = pipe.scheduler.autotune_result
    assert res is not None and not res.cached and 0 < res.evaluations <= 1200
    assert abs(out - _fewstep_direct(res.preset, 6, **res.options)).max() <= TOL  # the pipeline ran the choice
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, autotune=opts)
    _run(pipe, 6)
    assert pipe.scheduler.autotune_result.cached and pipe.scheduler.autotune_result.options == res.options
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "dpmpp_2m", autotune=opts)
    _run(pipe, 6)
    assert pipe.scheduler.autotune_result.preset == "dpmpp_2m"
    with pytest.raises(fewstep.ArgumentError, match="ready solver schedule"):
        FewstepScheduler.from_pipeline(pipe, fewstep.preset("ddim", 4, pipe.scheduler.schedule), autotune=True)


def test_a_schedule_file_runs_at_its_own_nfe(tmp_path):
    pipe = _pipe(_base())
    sch = FewstepScheduler.from_pipeline(pipe, "ddim")
    plan = fewstep.preset("deis", 7, sch.schedule)
    path = plan.save(tmp_path / "deis7.json")
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, fewstep.SolverSchedule.load(path))
    assert abs(_run(pipe, 7) - _fewstep_direct(plan, 7)).max() <= TOL
    with pytest.raises(fewstep.SolverError, match="7 model evaluations"):
        _run(pipe, 9)


def test_no_state_carries_over_between_calls(tmp_path):
    pipe = _pipe(_base())
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "unipc")
    first = _run(pipe, 8)
    second = _run(pipe, 5, seed=2)  # the same scheduler object, another NFE
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "dpmpp_2m")
    third = _run(pipe, 6, seed=3)
    for n, seed, solver, got in ((8, 1, "unipc", first), (5, 2, "unipc", second), (6, 3, "dpmpp_2m", third)):
        fresh = _pipe(_base())
        fresh.scheduler = FewstepScheduler.from_pipeline(fresh, solver)
        assert (got == _run(fresh, n, seed)).all()
    # the config round-trips (save_pretrained / from_pretrained, from_config)
    pipe.scheduler.save_pretrained(tmp_path / "sched")
    again = FewstepScheduler.from_pretrained(tmp_path / "sched")
    settings = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731  (diffusers' bookkeeping aside)
    assert settings(again.config) == settings(pipe.scheduler.config)
    pipe.scheduler = FewstepScheduler.from_config(again.config)
    assert (_run(pipe, 6, seed=3) == third).all()


def test_unknown_presets_and_options_are_refused_at_once():
    pipe = _pipe(_base())
    with pytest.raises(fewstep.SolverError, match="dpmpp_2mm"):
        FewstepScheduler.from_pipeline(pipe, "dpmpp_2mm")
    with pytest.raises(fewstep.ArgumentError, match="ordr"):
        FewstepScheduler.from_pipeline(pipe, "unipc", ordr=2)
    with pytest.raises(fewstep.ArgumentError, match="ordr"):
        FewstepScheduler.from_pipeline(pipe, ordr=2)
    FewstepScheduler.from_pipeline(pipe, "dpmpp_2m", spacing="diffusers")  # the base scheduler's grid: checked when the NFE is known


def test_misuse_is_refused():
    pipe = _pipe(_base())
    sch = FewstepScheduler.from_pipeline(pipe, "ddim")
    x = torch.zeros(1, 3, 8, 8)
    with pytest.raises(fewstep.SolverError, match="set_timesteps"):
        sch.step(x, 999, x)
    sch.set_timesteps(4)
    with pytest.raises(fewstep.SolverError, match="next evaluation"):
        sch.step(x, 5, x)
    with pytest.raises(fewstep.ArgumentError):
        FewstepScheduler.from_pipeline(pipe, fewstep.preset("ddim", 4, sch.schedule), spacing="karras")
    with pytest.raises(fewstep.ArgumentError, match="neither a DDPM-style"):
        ve = _pipe(_base())
        ve.scheduler = diffusers.ScoreSdeVeScheduler()
        FewstepScheduler.from_pipeline(ve, "ddim")


# ---- flow matching: a tiny SD3 transformer with classifier-free guidance, driven as StableDiffusion3Pipeline does ----
class _FlowPipe:
    """The denoising loop of diffusers' flow pipelines (StableDiffusion3Pipeline / Flux) with
    precomputed prompt embeddings (no text encoders needed): ``set_timesteps(n, mu=...)``, then per
    time step the transformer on the doubled batch, classifier-free guidance, ``scheduler.step``."""

    def __init__(self, scheduler, guidance=3.0):
        torch.manual_seed(0)
        self.transformer = diffusers.SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                                           num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                                           pooled_projection_dim=8, out_channels=4).eval()
        self.scheduler, self.guidance = scheduler, guidance
        g = torch.Generator().manual_seed(5)
        self.embeds = torch.cat([torch.zeros(2, 5, 16), torch.randn(2, 5, 16, generator=g)])
        self.pooled = torch.cat([torch.zeros(2, 8), torch.randn(2, 8, generator=g)])

    def velocity(self, latents, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(latents.shape[0])  # a pipeline's scalar or fewstep's per-row times
        with torch.no_grad():
            out = self.transformer(hidden_states=torch.cat([latents] * 2), timestep=torch.cat([t, t]),
                                   encoder_hidden_states=self.embeds, pooled_projections=self.pooled).sample
        uncond, cond = out.chunk(2)
        return uncond + self.guidance * (cond - uncond)

    def __call__(self, n, seed=1, mu=None):
        latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(seed))
        self.scheduler.set_timesteps(n, **({} if mu is None else {"mu": mu}))
        for t in self.scheduler.timesteps:
            latents = self.scheduler.step(self.velocity(latents, t), t, latents).prev_sample
        return latents


@pytest.mark.parametrize("n", [5, 10])
def test_flow_matching_with_guidance_reproduces_flow_match_euler(n):
    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref = _FlowPipe(base)(n)
    pipe = _FlowPipe(base)
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "ddim", spacing="diffusers")  # DDIM = Euler on a flow
    assert float((pipe(n) - ref).abs().max()) <= TOL
    # any other preset through the loop equals fewstep.sample on the guided transformer
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "unipc")
    got = pipe(n)
    model = fewstep.Model(lambda x, t: pipe.velocity(x, t * 1000.0), fewstep.FlowMatching(shift=3.0), "flow")
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    assert float((got - fewstep.sample(model, x_T, "unipc", nfe=n)).abs().max()) <= TOL
    plan = fewstep.preset("dpmpp_3m", n, model.schedule, spacing="uniform_t")  # a schedule file's plan
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, fewstep.SolverSchedule.from_json(plan.to_json()))
    assert float((pipe(n) - fewstep.sample(model, x_T, plan)).abs().max()) <= TOL


def test_flow_dynamic_shifting_takes_mu():
    base = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    ref = _FlowPipe(base)(6, mu=0.8)
    pipe = _FlowPipe(base)
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "ddim", spacing="diffusers")
    assert float((pipe(6, mu=0.8) - ref).abs().max()) <= TOL
    assert abs(pipe.scheduler.schedule.shift - 2.225540928492468) < 1e-12  # e^0.8
    with pytest.raises(fewstep.ArgumentError, match="mu"):
        pipe(6)


# ---- the direct path: the pipeline's denoiser as a fewstep model (parallel sampling, any preset) ----
def test_direct_path_on_a_ddpm_pipeline_equals_the_scheduler_and_runs_in_parallel():
    from fewstep.integrations.diffusers import sample as pipe_sample

    pipe = _pipe(_base())
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "unipc")
    via_scheduler = _run(pipe, 8)
    x_T = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    direct = pipe_sample(pipe, solver="unipc", nfe=8, latents=x_T)
    assert abs((direct / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() - via_scheduler).max() <= TOL
    seq = pipe_sample(pipe, solver="ddim", nfe=40, latents=x_T)
    par, info = pipe_sample(pipe, solver="ddim", nfe=40, latents=x_T, parallel=True, return_info=True)
    assert fewstep.rmse(par, seq) < fewstep.ParallelOptions().tol and info.extra["parallel"].rounds < 40


def test_direct_path_with_guidance_on_a_flow_transformer():
    from fewstep.integrations.diffusers import pipeline_model, sample as pipe_sample

    base = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = _FlowPipe(base)
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "dpmpp_2m")
    via_scheduler = pipe(8)
    cond = dict(guidance_scale=3.0, prompt_embeds=pipe.embeds[2:], negative_prompt_embeds=pipe.embeds[:2],
                pooled_prompt_embeds=pipe.pooled[2:], negative_pooled_prompt_embeds=pipe.pooled[:2])
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    direct = pipe_sample(pipe, solver="dpmpp_2m", nfe=8, latents=x_T, **cond)
    assert float((direct - via_scheduler).abs().max()) <= TOL
    seq = pipe_sample(pipe, solver="dpmpp_2m", nfe=30, latents=x_T, **cond)
    par = pipe_sample(pipe, solver="dpmpp_2m", nfe=30, latents=x_T, parallel=True, **cond)
    assert fewstep.rmse(par, seq) < fewstep.ParallelOptions().tol
    assert pipeline_model(pipe, **cond).prediction == "flow"
    with pytest.raises(fewstep.ArgumentError, match="prompt_embeds"):
        pipeline_model(pipe, guidance_scale=3.0)


# ---- a conditional Stable Diffusion pipeline: UNet2DConditionModel, a tiny CLIP text encoder, CFG ----
def _sd_pipe():
    import json
    import tempfile
    from pathlib import Path

    transformers = pytest.importorskip("transformers")
    folder = Path(tempfile.mkdtemp())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "c</w>": 4, "a": 5, "b": 6, "c": 7}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    torch.manual_seed(0)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                                  num_attention_heads=2, max_position_embeddings=8, projection_dim=16,
                                                                  bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    unet = diffusers.UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                                          down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                          cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4).eval()
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                                  up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 16), latent_channels=4,
                                  norm_num_groups=4, layers_per_block=1, sample_size=16).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=_base(),
                                                 safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _rel_max(a, b):
    """Largest difference relative to the largest value (the random tiny UNet under guidance 3 drives
    the latents to ~1e2)."""
    return float((a - b).abs().max() / b.abs().max())


def _sd_run(pipe, n, prompt="a b", seed=1):
    return pipe(prompt, num_inference_steps=n, guidance_scale=3.0, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(seed)).images


def test_stable_diffusion_pipeline_with_guidance():
    """A real StableDiffusionPipeline (tiny UNet2DConditionModel, CLIP text encoder, VAE; prompts, CFG
    3): DDIM and DPM-Solver++(2M) through FewstepScheduler reproduce diffusers' schedulers; the
    direct path with the prompt string equals the scheduler loop and runs in parallel."""
    from fewstep.integrations.diffusers import sample as pipe_sample

    pipe = _sd_pipe()
    base = pipe.scheduler
    ref = _sd_run(pipe, 6)
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "ddim", spacing="diffusers")
    assert _rel_max(_sd_run(pipe, 6), ref) <= TOL
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(base.config)
    ref2 = _sd_run(pipe, 6)
    assert _rel_max(ref2, ref) > 10 * TOL
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "dpmpp_2m", spacing="diffusers", final_order=1)
    assert _rel_max(_sd_run(pipe, 6), ref2) <= TOL
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "unipc")
    loop = _sd_run(pipe, 8)
    x_T = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    direct = pipe_sample(pipe, solver="unipc", nfe=8, latents=x_T, prompt="a b", guidance_scale=3.0)
    assert _rel_max(direct, loop) <= TOL
    seq = pipe_sample(pipe, solver="ddim", nfe=40, latents=x_T, prompt="a b", guidance_scale=3.0)
    par = pipe_sample(pipe, solver="ddim", nfe=40, latents=x_T, prompt="a b", guidance_scale=3.0, parallel=True)
    assert _rel_max(par, seq) < fewstep.ParallelOptions().tol
    plan = fewstep.SolverSchedule.from_json(fewstep.preset("deis", 7, pipe.scheduler.schedule).to_json())  # a schedule file
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, plan)
    assert _rel_max(_sd_run(pipe, 7), pipe_sample(pipe, solver=plan, latents=x_T, prompt="a b", guidance_scale=3.0)) <= TOL


def test_a_real_stable_diffusion_3_pipeline():
    """diffusers' StableDiffusion3Pipeline itself (tiny SD3 transformer, precomputed prompt embeddings,
    no text encoders or VAE needed for latents): DDIM through FewstepScheduler =
    FlowMatchEulerDiscreteScheduler (fixed and dynamic shift), DPM-Solver++(2M) =
    DPMSolverMultistepScheduler on flow sigmas (whose model times are integers: the adapter passes
    the base scheduler's own); UniPC runs with exactly the NFE asked and, with a fixed shift, equals
    the direct path on the pipeline's transformer."""
    pytest.importorskip("transformers")
    flow = _FlowPipe(None)
    dpm = diffusers.DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    for base, preset, opts in ((diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), "ddim", {}),
                               (diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), "ddim", {}),
                               (dpm, "dpmpp_2m", {"final_order": 1})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe = diffusers.StableDiffusion3Pipeline(transformer=flow.transformer, scheduler=base, vae=None, text_encoder=None, tokenizer=None,
                                                      text_encoder_2=None, tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
        pipe.set_progress_bar_config(disable=True)

        def run(n):
            return pipe(prompt_embeds=flow.embeds[2:], pooled_prompt_embeds=flow.pooled[2:], negative_prompt_embeds=flow.embeds[:2],
                        negative_pooled_prompt_embeds=flow.pooled[:2], guidance_scale=3.0, num_inference_steps=n, height=64, width=64,
                        output_type="latent", generator=torch.Generator().manual_seed(1)).images

        ref = run(6)
        pipe.scheduler = FewstepScheduler.from_pipeline(pipe, preset, spacing="diffusers", **opts)
        assert _rel_max(run(6), ref) <= TOL, (type(base).__name__, _rel_max(run(6), ref))
        pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "unipc")
        calls = []
        hook = flow.transformer.register_forward_hook(lambda *a: calls.append(1))
        try:
            got = run(7)
        finally:
            hook.remove()
        assert len(calls) == 7
        if not base.config.get("use_dynamic_shifting"):  # the pipeline's loop = the direct path on its transformer
            from fewstep.integrations.diffusers import sample as pipe_sample

            x_T = torch.randn((2, 16 // 4, 8, 8), generator=torch.Generator().manual_seed(1))
            direct = pipe_sample(pipe, solver="unipc", nfe=7, latents=x_T, guidance_scale=3.0, prompt_embeds=flow.embeds[2:],
                                 negative_prompt_embeds=flow.embeds[:2], pooled_prompt_embeds=flow.pooled[2:],
                                 negative_pooled_prompt_embeds=flow.pooled[:2])
            assert _rel_max(got, direct) <= TOL


def test_a_real_flux_pipeline():
    """diffusers' FluxPipeline (tiny FluxTransformer2DModel with the guidance embedding, packed latents,
    its own sigmas and dynamic shift passed to set_timesteps): DDIM through FewstepScheduler =
    FlowMatchEulerDiscreteScheduler; UniPC with exactly the NFE asked."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    tr = diffusers.FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                                          num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=True,
                                          axes_dims_rope=(2, 2, 4)).eval()
    base = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.FluxPipeline(scheduler=base, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=tr)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(3)
    pe, ppe = torch.randn(1, 5, 16, generator=g), torch.randn(1, 8, generator=g)

    def run(n):
        return pipe(prompt_embeds=pe, pooled_prompt_embeds=ppe, num_inference_steps=n, height=64, width=64, guidance_scale=3.5,
                    output_type="latent", generator=torch.Generator().manual_seed(1)).images

    ref = run(6)
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "ddim", spacing="diffusers")
    assert _rel_max(run(6), ref) <= TOL
    pipe.scheduler = FewstepScheduler.from_pipeline(pipe, "unipc")
    calls = []
    hook = tr.register_forward_hook(lambda *a: calls.append(1))
    try:
        out = run(5)
    finally:
        hook.remove()
    assert len(calls) == 5 and bool(torch.isfinite(out).all())


# ---- devices, generators and per-sample conditioning (issue 28) --------------------------------------
def _loop(sch, latents, n, generator=None):
    """A pipeline's loop on fixed latents: only the scheduler's noise can differ between runs."""
    sch.set_timesteps(n)
    for t in sch.timesteps:
        with torch.no_grad():
            out = _UNET(latents, t).sample
        latents = sch.step(out, t, latents, generator=generator).prev_sample
    return latents


def test_a_stochastic_preset_draws_fresh_noise_per_call_or_follows_the_generators():
    """Without a generator (and no ``seed`` in the config) every call draws a fresh seed from torch's
    global generator and records it; one torch.Generator keys the noise reproducibly; a list of
    them (one per sample) gives each sample the noise of its own generator."""
    pipe = _pipe(_base())
    sch = FewstepScheduler.from_pipeline(pipe, "dpmpp_2m_sde")
    lat = torch.randn((2, 3, 8, 8), generator=torch.Generator().manual_seed(1))
    a, seed_a = _loop(sch, lat, 6), sch.noise_seed
    b, seed_b = _loop(sch, lat, 6), sch.noise_seed
    assert seed_a != seed_b and not torch.equal(a, b)  # fresh noise per call
    torch.manual_seed(7)
    c = _loop(sch, lat, 6)
    torch.manual_seed(7)
    assert torch.equal(_loop(sch, lat, 6), c)  # torch.manual_seed repeats it
    model = fewstep.Model(lambda x, t: _UNET(x, t).sample, sch.schedule, "eps")
    with torch.no_grad():  # the recorded seed is the one used
        assert _rel_max(fewstep.sample(model, lat, "dpmpp_2m_sde", nfe=6, seed=seed_b), b) <= TOL
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    one = _loop(sch, lat, 6, g(3))
    assert torch.equal(_loop(sch, lat, 6, g(3)), one) and not torch.equal(_loop(sch, lat, 6, g(4)), one)
    pair = _loop(sch, lat, 6, [g(3), g(4)])
    other = _loop(sch, lat, 6, [g(3), g(5)])
    assert sch.noise_indices is not None and len(set(sch.noise_indices)) == 2
    assert _rel_max(pair[0], other[0]) <= TOL and _rel_max(pair[1], other[1]) > 100 * TOL
    alone = _loop(sch, lat[:1], 6, [g(3)])  # sample 0 with its own generator, in a batch of one
    assert _rel_max(alone[0], pair[0]) <= TOL
    with pytest.raises(fewstep.ArgumentError, match="generators for a batch"):
        _loop(sch, lat, 6, [g(3)])
    fixed = FewstepScheduler.from_pipeline(pipe, "dpmpp_2m_sde", seed=9)  # the config's seed wins
    assert torch.equal(_loop(fixed, lat, 6, g(3)), _loop(fixed, lat, 6)) and fixed.noise_seed == 9


def test_direct_path_parallel_micro_batches_keep_per_sample_prompts_aligned():
    """Two samples with their own prompts and guidance, parallel sampling with max_batch=3 (not a
    multiple of the batch): every call holds whole evaluations, so each row meets its own prompt,
    and parallel == sequential."""
    from fewstep.integrations.diffusers import sample as pipe_sample

    pipe = _FlowPipe(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0))
    cond = dict(guidance_scale=3.0, prompt_embeds=pipe.embeds[2:], negative_prompt_embeds=pipe.embeds[:2],
                pooled_prompt_embeds=pipe.pooled[2:], negative_pooled_prompt_embeds=pipe.pooled[:2])
    x_T = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1))
    seq = pipe_sample(pipe, solver="dpmpp_2m", nfe=10, latents=x_T, **cond)
    par = pipe_sample(pipe, solver="dpmpp_2m", nfe=10, latents=x_T, parallel=fewstep.ParallelOptions(window=4, max_batch=3, tol=0.0), **cond)
    assert _rel_max(par, seq) <= TOL  # float32 rounding of other batch sizes; a misaligned prompt moves it by O(1)
