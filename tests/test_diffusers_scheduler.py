"""DPMLabScheduler inside unchanged diffusers pipelines (offline, tiny random UNet2DModel): the images
equal running the same dpmlab solver directly on the same network."""

import json

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, UNet2DModel

from dpmlab.api import make_grid
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
    ts = make_grid(sch, scheduler.config.grid, solver.steps_for_nfe(nfe, True), to_zero=True)
    with torch.no_grad():
        return sample(Problem(den, sch), x, ts, solver)


@pytest.mark.parametrize("solver, options", [("ddim", {}), ("heun", {}), ("euler", {})])
@pytest.mark.parametrize("pipeline_cls", [DDPMPipeline, DDIMPipeline])
def test_pipeline_matches_direct_solver(unet, pipeline_cls, solver, options):
    nfe = 7 if solver == "heun" else 6
    pipe = pipeline_cls(unet=unet, scheduler=DDIMScheduler())
    pipe.scheduler = DPMLabScheduler.from_config(pipe.scheduler.config, solver=solver, solver_options=options)
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
    pipe = DDPMPipeline(unet=unet, scheduler=DPMLabScheduler(solver="ddpm"))
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        a = pipe(batch_size=1, generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="pt")
        b = pipe(batch_size=1, generator=torch.Generator().manual_seed(1), num_inference_steps=5, output_type="pt")
        c = pipe(batch_size=1, generator=torch.Generator().manual_seed(2), num_inference_steps=5, output_type="pt")
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)


def test_config_round_trip_and_errors(tmp_path):
    s = DPMLabScheduler(solver="heun", solver_options={"S_churn": 0.0}, grid="karras")
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
