"""DPMLabScheduler in unchanged Stable Diffusion pipelines built offline from tiny random-weight
components (UNet2DConditionModel + AutoencoderKL from configs; prompts given as embeddings, so no
text encoder): txt2img with CFG, img2img at strength 0.3 / 0.5 / 0.8, inpainting at strength < 1, a
step-end callback that edits latents, save -> load, a list of generators. Each is compared with
diffusers' scheduler of the same algorithm on the same grid, or with the same dpmlab solver run
directly through ``dpmlab.solvers.sample`` on the same network."""

import warnings

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)
from diffusers.utils import logging as dlog

from dpmlab.interop.diffusers import DPMLabScheduler
from dpmlab.models import Denoiser
from dpmlab.solvers import Problem, get, sample

dlog.set_verbosity_error()
warnings.filterwarnings("ignore", category=FutureWarning)

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
# (diffusers scheduler, its options, the dpmlab solver and options of the same algorithm)
PEERS = {
    "ddim": (DDIMScheduler, dict(clip_sample=False, set_alpha_to_one=True), "ddim", {}),
    "dpmpp2m": (DPMSolverMultistepScheduler, dict(solver_order=2), "dpm_solver_pp", dict(order=2)),
    "unipc": (UniPCMultistepScheduler, dict(solver_order=2, solver_type="bh2"), "unipc", dict(variant="bh2")),
}
GUIDE = 3.0


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).eval()
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(2, 3, 8, generator=g)
    neg = torch.randn(2, 3, 8, generator=g)
    image = torch.rand(2, 3, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.5).float()
    return dict(unet=unet, vae=vae, emb=emb, neg=neg, image=image, mask=mask)


def _pipe(cls, parts, scheduler):
    pipe = cls(
        vae=parts["vae"],
        text_encoder=None,
        tokenizer=None,
        unet=parts["unet"],
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _run(cls, parts, scheduler, steps=6, seed=0, **kw):
    pipe = _pipe(cls, parts, scheduler)
    gen = kw.pop("generator", torch.Generator().manual_seed(seed))
    extra = {} if cls is StableDiffusionPipeline else dict(image=parts["image"])
    if cls is StableDiffusionInpaintPipeline:
        extra["mask_image"] = parts["mask"]
    with torch.no_grad():
        out = pipe(
            prompt_embeds=parts["emb"],
            negative_prompt_embeds=parts["neg"],
            guidance_scale=GUIDE,
            num_inference_steps=steps,
            height=8,
            width=8,
            generator=gen,
            output_type="latent",
            **extra,
            **kw,
        )
    return out.images


def _pair(name):
    """diffusers' DDIM steps to ``t - N // n`` whatever the spacing (see test_parity_diffusers), so it
    is compared on the "leading" grid, where that is the next grid point; the others on "trailing"."""
    cls, opts, solver, sopts = PEERS[name]
    spacing = dict(timestep_spacing="leading", steps_offset=1) if name == "ddim" else dict(timestep_spacing="trailing")
    theirs = cls(**SD, **opts, **spacing)
    ours = DPMLabScheduler.from_config(theirs.config, solver=solver, solver_options=sopts)
    return theirs, ours


def _close(a, b, tol=2e-4):
    return float((a - b).abs().max() / b.abs().max()) < tol


@pytest.mark.parametrize("name", list(PEERS))
def test_txt2img_with_cfg_matches_diffusers(parts, name):
    theirs, ours = _pair(name)
    assert _close(_run(StableDiffusionPipeline, parts, ours), _run(StableDiffusionPipeline, parts, theirs))


@pytest.mark.parametrize("strength", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("name", ["ddim", "dpmpp2m", "unipc"])
def test_img2img_part_way_matches_diffusers(parts, name, strength):
    theirs, ours = _pair(name)
    got = _run(StableDiffusionImg2ImgPipeline, parts, ours, steps=10, strength=strength)
    want = _run(StableDiffusionImg2ImgPipeline, parts, theirs, steps=10, strength=strength)
    assert ours.begin_index == 10 - int(10 * strength)
    assert _close(got, want)


@pytest.mark.parametrize("name", ["ddim", "unipc"])
def test_inpainting_below_full_strength_matches_diffusers(parts, name):
    """The 4-channel inpainting pipeline re-imposes the known region on the latents after every step:
    the scheduler must step from the latents it is handed."""
    theirs, ours = _pair(name)
    got = _run(StableDiffusionInpaintPipeline, parts, ours, steps=8, strength=0.6)
    want = _run(StableDiffusionInpaintPipeline, parts, theirs, steps=8, strength=0.6)
    assert _close(got, want)


def _guided(parts, emb, neg):
    def eps(x, t):
        both = parts["unet"](torch.cat([x, x]), t.float().repeat(2), encoder_hidden_states=torch.cat([neg, emb]))
        u, c = both.sample.chunk(2)
        return u + GUIDE * (c - u)

    return eps


def test_heun_img2img_equals_the_solver_on_the_rest_of_the_grid(parts):
    """Heun (order 2, 2 evaluations per step): ``timesteps[t_start * 2:]`` starts the solver at grid
    point ``t_start``; the result is ``dpmlab.solvers.sample`` from the pipeline's noised latents."""
    sched = DPMLabScheduler(**SD, solver="heun", timestep_spacing="trailing")
    seen = []
    step = sched.step

    def record(model_output, timestep, sample, *a, **k):
        seen.append(sample.clone())
        return step(model_output, timestep, sample, *a, **k)

    sched.step = record
    got = _run(StableDiffusionImg2ImgPipeline, parts, sched, steps=5, strength=0.6)
    assert len(seen) == 2 * 3 - 1 and sched.begin_index == 4  # 3 Heun steps to sigma = 0
    den = Denoiser(_guided(parts, parts["emb"], parts["neg"]), sched.schedule, "eps")
    ts = sched.make_grid(5)[2:]
    with torch.no_grad():
        want = sample(Problem(den, sched.schedule), seen[0], ts, get("heun"))
    assert _close(got, want, 1e-4)


def test_step_end_callback_edits_are_used(parts):
    """A callback scaling the latents after step 2 changes the result exactly as diffusers' DDIM."""

    def halve(pipe, i, t, kw):
        return {"latents": kw["latents"] * 0.5} if i == 2 else {}

    theirs, ours = _pair("ddim")
    got = _run(StableDiffusionPipeline, parts, ours, callback_on_step_end=halve)
    want = _run(StableDiffusionPipeline, parts, theirs, callback_on_step_end=halve)
    plain = _run(StableDiffusionPipeline, parts, _pair("ddim")[1])
    assert _close(got, want) and not _close(got, plain, 1e-2)


def test_generator_list_for_a_stochastic_solver(parts):
    """One generator per sample: sample b's noise comes from generator b only."""
    sched = DPMLabScheduler(**SD, solver="sde_dpm_solver_pp", timestep_spacing="trailing")
    gens = [torch.Generator().manual_seed(s) for s in (5, 6)]
    a = _run(StableDiffusionPipeline, parts, sched, generator=gens)
    gens = [torch.Generator().manual_seed(s) for s in (5, 7)]
    b = _run(StableDiffusionPipeline, parts, sched, generator=gens)
    assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])


def test_save_pretrained_and_from_pretrained_round_trip(parts, tmp_path):
    sched = DPMLabScheduler(**SD, solver="dpm_solver_pp", grid="karras", budget="nfe")
    pipe = _pipe(StableDiffusionPipeline, parts, sched)
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    index = (tmp_path / "model_index.json").read_text()
    assert '"dpmlab.interop.diffusers"' in index  # diffusers resolves the class in our (imported) module
    kw = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None, image_encoder=None)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, local_files_only=True, **kw)
    assert type(loaded.scheduler) is DPMLabScheduler
    assert loaded.scheduler.config["grid"] == "karras" and loaded.scheduler.config["budget"] == "nfe"
    a = _run(StableDiffusionPipeline, parts, sched)
    b = _run(StableDiffusionPipeline, parts, loaded.scheduler)
    assert torch.equal(a, b)
