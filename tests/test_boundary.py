"""BoundaryDiffusion (Zhu et al., NeurIPS 2023): the edit lands at the requested signed distance from
the SVM plane, held-out accuracy on a separable toy, h-space hooks (dpmlab UNet and diffusers mid_block)
with replacement in the first call only, and the mixing-step search."""

import math

import pytest
import torch
from oracles import mixture

from dpmlab.editing import (
    Boundary,
    bottleneck,
    boundary_edit,
    fit_boundary,
    invert_to,
    mixing_profile,
    sample_to,
)
from dpmlab.editing.boundary import MixingProfile
from dpmlab.models.denoiser import Denoiser
from dpmlab.models.unet import UNet, UNetConfig
from dpmlab.schedules import LinearVP
from dpmlab.solvers import Problem, get, sample
from dpmlab.timesteps import uniform_time

torch.set_num_threads(1)


def _blobs(n, d=20, sep=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    direction = torch.randn(d, generator=g)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) + sep * (y[:, None] - 0.5) * direction / direction.norm()
    return x.reshape(n, 4, 5), y


def test_edit_lands_at_the_requested_signed_distance_from_the_svm_plane():
    x, y = _blobs(200)
    bd = fit_boundary(x, y)
    from sklearn.svm import SVC

    svm = SVC(kernel="linear").fit(x.reshape(200, -1).numpy(), y.numpy())  # the same fit, read independently
    w = torch.tensor(svm.coef_[0])
    decision = torch.from_numpy(svm.decision_function(x.reshape(200, -1).numpy()))
    assert torch.allclose(bd.distance(x), decision / w.norm())
    pts = torch.randn(7, 4, 5, dtype=torch.float64)
    for d in (-2.5, 0.0, 1.5):
        moved = bd.move(pts, d)
        assert torch.allclose(bd.distance(moved), torch.full((7,), d, dtype=torch.float64), atol=1e-12)
        step = (moved - pts).reshape(7, -1)
        assert torch.allclose(step, (step @ bd.normal)[:, None] * bd.normal[None], atol=1e-12)  # along the normal
    per_sample = torch.linspace(-1, 1, 7, dtype=torch.float64)
    assert torch.allclose(bd.distance(bd.move(pts, per_sample)), per_sample, atol=1e-12)
    assert bool((bd.distance(bd.move(pts, 3.0)) > 0).all()) and set(
        svm.predict(bd.move(pts, 3.0).reshape(7, -1).numpy())
    ) == {1}


def test_held_out_accuracy_above_chance_on_a_separable_toy_and_at_chance_on_noise():
    x, y = _blobs(200, sep=6.0, seed=1)  # Bayes accuracy Phi(3) = 0.9987
    bd = fit_boundary(x[:100], y[:100], (x[100:], y[100:]))
    assert bd.test_accuracy > 0.9 and bd.train_accuracy > 0.9
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(200, 4, 5, generator=g, dtype=torch.float64)
    shuffled = fit_boundary(noise[:100], y[:100], (noise[100:], y[100:]))  # labels carry no information
    assert shuffled.test_accuracy < 0.7
    assert math.isnan(fit_boundary(x, y).test_accuracy)
    with pytest.raises(ValueError, match="both classes 0 and 1"):
        fit_boundary(x, torch.zeros(200, dtype=torch.long))
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4, 5\)"):
        bd.distance(torch.zeros(3, 20))


def _tiny_unet_problem():
    torch.manual_seed(0)
    net = UNet(UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=1, groups=4))
    with torch.no_grad():  # the zero-initialised output layers would hide the bottleneck from the output
        for m in net.modules():
            if isinstance(m, torch.nn.Conv2d) and float(m.weight.abs().sum()) == 0:
                m.weight.normal_(0, 0.05)
    net.eval().requires_grad_(False)
    sch = LinearVP()
    return Problem(Denoiser(net, sch, "eps", data_shape=(1, 8, 8)), sch), net


def test_latents_edit_and_first_call_replacement_on_a_dpmlab_unet():
    problem, net = _tiny_unet_problem()
    x0 = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    lat = invert_to(problem, x0, 0.5, 8)
    ts = uniform_time(problem.schedule, 8, t_start=0.5)
    assert torch.allclose(lat.z, sample(problem, x0, ts.flip(0), get("ddim")))  # DDIM inversion to t0
    with net.hooks(capture=["mid"]) as feats:
        problem.denoise(lat.z, 0.5)
    assert lat.h.shape == (6, 16, 4, 4) and torch.equal(lat.h, feats["mid"][0])
    recon = sample(problem, lat.z, ts, get("ddim"))
    assert torch.equal(boundary_edit(problem, lat, 0.0, z_boundary=None, h_boundary=None, steps=8), recon)
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    hb, zb = fit_boundary(lat.h, labels), fit_boundary(lat.z, labels)
    same = boundary_edit(problem, lat, hb.distance(lat.h), z_boundary=None, h_boundary=hb, steps=8)
    assert torch.equal(same, recon)  # moving h onto its own distance is the identity
    # the edited h is used in the first network call only: DDIM's first step by hand, then plain sampling
    h_new = hb.move(lat.h, 2.0)
    with net.hooks(bottleneck=lambda h, emb: h_new):
        x1 = sample(problem, lat.z, ts[:2], get("ddim"))
    manual = sample(problem, x1, ts[1:], get("ddim"))
    edited = boundary_edit(problem, lat, 2.0, z_boundary=None, h_boundary=hb, steps=8)
    assert torch.allclose(edited, manual, atol=1e-6) and not torch.allclose(edited, recon, atol=1e-4)
    both = boundary_edit(problem, lat, 2.0, z_boundary=zb, h_boundary=hb, steps=8)
    assert both.shape == x0.shape and not torch.allclose(both, edited)
    fresh = sample_to(problem, torch.randn(3, 1, 8, 8), 0.5, 8)  # unconditional control: latents of noise
    assert fresh.z.shape == (3, 1, 8, 8) and fresh.h.shape == (3, 16, 4, 4) and fresh.t0 == 0.5


def test_diffusers_mid_block_hook_captures_and_replaces_the_first_call():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
    ).eval()
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10, 10])
    with torch.no_grad():
        ref = unet(x, t).sample
        with bottleneck(unet) as cap:
            assert torch.equal(unet(x, t).sample, ref)
        h = cap[0]
        with bottleneck(unet, replace=h + 1.0) as cap2:
            first, second = unet(x, t).sample, unet(x, t).sample
    assert h.shape == (2, 16, 4, 4) and torch.equal(cap2[0], h) and len(cap2) == 2
    assert not torch.allclose(first, ref) and torch.equal(second, ref)
    assert not unet.mid_block._forward_hooks  # removed on exit
    with pytest.raises(ValueError, match="no h-space in Linear"):
        with bottleneck(torch.nn.Linear(2, 2)):
            pass


def test_mixing_profile_of_an_exact_model_on_its_own_data_mixes_everywhere():
    """Exact mixture denoiser, data from the mixture, fine DDIM grid: inverted latents follow the forward
    marginal, so the radius gap is small at every t. Data that are not the model's (scaled by 3) invert to
    latents that never reach the Gaussian radius (no mixing step by the gap), but whose radius stops
    changing part-way (the plateau step)."""
    mix, sch = mixture("smooth8"), LinearVP()
    problem = Problem(mix.denoiser(sch), sch)
    x0 = mix.sample(400, generator=torch.Generator().manual_seed(4))
    ts = uniform_time(sch, 100)
    prof = mixing_profile(problem, x0, ts)
    assert prof.ts.shape == (101,) and bool((prof.ts[1:] > prof.ts[:-1]).all())
    assert float(prof.gap.max()) < 0.05 and prof.mixing_step(0.05) == pytest.approx(sch.t_min)
    assert abs(float(prof.radius_forward[-1]) - 1.0) < 0.02  # the Gaussian radius sqrt(D) at t_max
    off = mixing_profile(problem, 3.0 * x0, ts)
    assert float(off.gap[-1]) > 1.0 and math.isnan(off.mixing_step(0.05))
    assert sch.t_min + 0.1 < off.plateau_step(0.01) < sch.t_max - 0.1


def test_mixing_step_rule():
    ts = torch.linspace(0.1, 1.0, 6, dtype=torch.float64)
    fwd = torch.ones(6, dtype=torch.float64)
    prof = MixingProfile(ts, 1 + torch.tensor([0.5, 0.2, 0.04, 0.1, 0.03, 0.01], dtype=torch.float64), fwd)
    assert prof.mixing_step(0.05) == pytest.approx(float(ts[4]))
    assert prof.plateau_step(0.05) == pytest.approx(float(ts[4]))  # radius[-1] = 1.01: changes 0.49 ... 0.02
    assert prof.mixing_step(0.25) == pytest.approx(float(ts[1]))
    assert math.isnan(MixingProfile(ts, fwd * 2, fwd).mixing_step(0.05))
    with pytest.raises(ValueError, match="tol must be > 0"):
        prof.mixing_step(0.0)
    with pytest.raises(ValueError, match="unit vector"):
        Boundary(torch.ones(4), 0.0, (4,), 1.0, 1.0)
