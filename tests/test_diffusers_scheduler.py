"""DPMLabScheduler inside unchanged diffusers pipelines (offline, tiny random UNet2DModel): the images
equal running the same dpmlab solver directly on the same network."""

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel

from dpmlab.interop.diffusers import DPMLabScheduler, schedule_from_config
from dpmlab.models import Denoiser
from dpmlab.solvers import Problem, get, sample


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()


def _direct(unet, scheduler, x, nfe):
    """The same dpmlab solver run directly on the network wrapped as a Denoiser."""
    sch = schedule_from_config(scheduler.config)
    den = Denoiser(lambda xx, t: unet(xx, t).sample, sch, "eps")
    solver = get(scheduler.config.solver, **(scheduler.config.solver_options or {}))
    ts = scheduler.make_grid(solver.steps_for_nfe(nfe, True))
    with torch.no_grad():
        return sample(Problem(den, sch), x, ts, solver)


@pytest.mark.parametrize("solver, options", [("ddim", {}), ("heun", {}), ("euler", {})])
@pytest.mark.parametrize("pipeline_cls", [DDPMPipeline, DDIMPipeline])
def test_pipeline_matches_direct_solver(unet, pipeline_cls, solver, options):
    nfe = 7 if solver == "heun" else 6
    pipe = pipeline_cls(unet=unet, scheduler=DDIMScheduler(clip_sample=False))
    pipe.scheduler = DPMLabScheduler.from_config(
        pipe.scheduler.config, solver=solver, solver_options=options, grid="quadratic_time", budget="nfe"
    )
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        out = pipe(batch_size=2, generator=gen, num_inference_steps=nfe, output_type="pt").images
    x = torch.randn((2, 1, 8, 8), generator=torch.Generator().manual_seed(3))
    direct = _direct(unet, pipe.scheduler, x, nfe)
    expect = (direct / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
    got = out if out.shape == expect.shape else out.permute(0, 2, 3, 1)
    assert len(pipe.scheduler.timesteps) == nfe
    assert float((got - expect).abs().max()) < 1e-4  # float32 rounding of differently ordered arithmetic


def test_stochastic_solver_uses_pipeline_generator(unet):
    pipe = DDPMPipeline(unet=unet, scheduler=DPMLabScheduler(solver="ddpm", budget="nfe"))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        a = pipe(batch_size=1, generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="pt")
        b = pipe(batch_size=1, generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="pt")
        c = pipe(batch_size=1, generator=torch.Generator().manual_seed(2), num_inference_steps=5, output_type="pt")
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_config_round_trip_and_errors(tmp_path):
    s = DPMLabScheduler(solver="heun", solver_options={"S_churn": 0.0}, grid="karras", budget="nfe")
    s.save_config(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert cfg["solver"] == "heun" and cfg["grid"] == "karras"
    s2 = DPMLabScheduler.from_pretrained(tmp_path)
    assert s2.solver == s.solver
    with pytest.raises(ValueError, match="cannot use exactly nfe=8"):
        s.set_timesteps(8)
    with pytest.raises(ValueError, match="unknown solver"):
        DPMLabScheduler(solver="dpm++")
    with pytest.raises(ValueError, match="unknown prediction_type"):
        DPMLabScheduler(prediction_type="flow")
    s.set_timesteps(7)
    assert len(s.timesteps) == 7 and s.order == 2
    with pytest.raises(ValueError, match="eta=0.5"):
        s.step(torch.zeros(1, 2), s.timesteps[0], torch.zeros(1, 2), eta=0.5)
    x0 = torch.ones(3, 2)
    noisy = s.add_noise(x0, torch.zeros(3, 2), torch.tensor([999]))
    assert torch.allclose(noisy, x0 * s.schedule.alpha(torch.tensor(1.0, dtype=torch.float64)).float())


def test_diffusers_unet_as_denoiser_and_folder_loading(unet, tmp_path):
    from dpmlab.interop.diffusers import denoiser_from_diffusers, load_diffusers_folder

    sched = DDIMScheduler(prediction_type="v_prediction")
    den = denoiser_from_diffusers(unet, sched.config)
    assert den.data_shape == (1, 8, 8) and den.prediction.value == "v"
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([0.5, 0.25], dtype=torch.float64)
    with torch.no_grad():
        v = unet(x, den.schedule.t_to_index(t).float()).sample
        a = den.schedule.alpha(t).float()[:, None, None, None]
        s = den.schedule.sigma(t).float()[:, None, None, None]
        assert torch.allclose(den(x, t), a * x - s * v, atol=1e-5)
    unet.save_pretrained(tmp_path / "unet", safe_serialization=True)
    sched.save_config(tmp_path / "scheduler")
    loaded = load_diffusers_folder(tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(x, t), den(x, t), atol=1e-6)
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ValueError, match="no .safetensors weights"):
        load_diffusers_folder(tmp_path)
    with pytest.raises(ValueError, match="no scheduler"):
        load_diffusers_folder(tmp_path / "unet")


# --- diffusers semantics: steps, start noise, config options ------------------------------------
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.mark.parametrize("solver, steps, evals", [("heun", 8, 15), ("dpm_solver_pp_2s", 20, 39), ("ddim", 50, 50)])
def test_num_inference_steps_counts_steps_by_default(solver, steps, evals):
    s = DPMLabScheduler(solver=solver)
    s.set_timesteps(steps)
    assert len(s.timesteps) == evals and s.num_inference_steps == steps
    nfe = DPMLabScheduler(solver=solver, budget="nfe")
    nfe.set_timesteps(evals)
    assert torch.equal(nfe.timesteps, s.timesteps)
    with pytest.raises(ValueError, match="unknown budget 'evals'"):
        DPMLabScheduler(budget="evals")


def test_start_noise_and_add_noise_match_diffusers():
    ours, theirs = DPMLabScheduler(**SD), DDIMScheduler(**SD)
    assert ours.init_noise_sigma == theirs.init_noise_sigma == 1.0
    assert torch.allclose(ours.alphas_cumprod, theirs.alphas_cumprod)
    x0, noise = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0, 500, 999])
    assert torch.allclose(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-6)


def test_timestep_spacing_and_steps_offset_are_honoured():
    for spacing, offset in [("leading", 1), ("trailing", 0), ("leading", 0)]:
        theirs = DDIMScheduler(**SD, timestep_spacing=spacing, steps_offset=offset)
        ours = DPMLabScheduler.from_config(theirs.config)
        theirs.set_timesteps(10)
        ours.set_timesteps(10)
        assert ours.grid_name == spacing
        assert torch.equal(ours.timesteps.long(), theirs.timesteps)
    explicit = DPMLabScheduler.from_config(DDIMScheduler(**SD, timestep_spacing="leading").config, grid="karras")
    assert explicit.grid_name == "karras"


def test_zero_snr_and_grid_changing_options_are_refused_by_name():
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True"):
        DPMLabScheduler.from_config(DDIMScheduler(rescale_betas_zero_snr=True).config)
    from diffusers import DPMSolverMultistepScheduler

    with pytest.raises(ValueError, match="use_karras_sigmas=True; use grid='karras'"):
        DPMLabScheduler.from_config(DPMSolverMultistepScheduler(use_karras_sigmas=True).config)
    with pytest.raises(ValueError, match="final_sigmas_type='sigma_min'; use to_zero=False"):
        DPMLabScheduler.from_config(DPMSolverMultistepScheduler(final_sigmas_type="sigma_min").config)
    with pytest.raises(ValueError, match="unknown timestep_spacing 'uniform'"):
        DPMLabScheduler(timestep_spacing="uniform")
    with pytest.raises(ValueError, match="clip_sample=True and thresholding=True"):
        DPMLabScheduler(clip_sample=True, thresholding=True)


@pytest.mark.parametrize("peer", ["ddim_clip", "dpmpp_threshold"])
def test_clip_sample_and_thresholding_match_diffusers(peer):
    """Honoured on x0 before the solver sees it: equal to diffusers' DDIM with
    ``use_clipped_model_output=True`` and to DPM-Solver++ (a data-form update) with thresholding."""
    from diffusers import DPMSolverMultistepScheduler

    g = torch.Generator().manual_seed(0)
    x, eps = 3 * torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    if peer == "ddim_clip":
        theirs = DDIMScheduler(
            set_alpha_to_one=True, clip_sample=True, clip_sample_range=0.5, timestep_spacing="leading"
        )
        ours, kw = DPMLabScheduler.from_config(theirs.config, solver="ddim"), dict(use_clipped_model_output=True)
    else:
        theirs = DPMSolverMultistepScheduler(thresholding=True, timestep_spacing="trailing")
        ours, kw = DPMLabScheduler.from_config(theirs.config, solver="dpm_solver_pp"), {}
    outs = []
    for s in (theirs, ours):
        s.set_timesteps(5)
        y = x
        for t in s.timesteps:
            y = s.step(eps * (1 + t / 1000), t, y, **kw).prev_sample
        outs.append(y)
    assert float((outs[0] - outs[1]).abs().max()) < 1e-4
    plain = DPMLabScheduler.from_config(theirs.config, clip_sample=False, thresholding=False)
    plain.set_timesteps(5)
    y = x
    for t in plain.timesteps:
        y = plain.step(eps * (1 + t / 1000), t, y).prev_sample
    assert float((y - outs[1]).abs().max()) > 0.1  # the option changed the result


def test_data_dependent_solver_is_refused():
    """time_shift picks its times from the data; the pipeline's timesteps are fixed beforehand."""
    s = DPMLabScheduler(solver="time_shift")
    with pytest.raises(ValueError, match="chooses its evaluation times from the data"):
        s.set_timesteps(10)


def test_begin_index_checks_and_misuse():
    s = DPMLabScheduler(solver="pndm")
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="cannot start at timesteps\\[5\\]"):
        s.set_begin_index(5)
    h = DPMLabScheduler(solver="heun")
    h.set_timesteps(4)
    with pytest.raises(ValueError, match="cannot start at timesteps\\[3\\]"):
        h.set_begin_index(3)  # Heun's second evaluation of step 1
    h.set_begin_index(4)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="expected timesteps\\[4\\]"):
        h.step(x, h.timesteps[0], x)
    h.set_timesteps(1)
    h.step(x, h.timesteps[0], x)
    with pytest.raises(ValueError, match="after the last evaluation"):
        h.step(x, h.timesteps[0], x)
