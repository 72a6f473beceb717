import math

import pytest
import torch

from dpmlab.models.analytic import PRESETS, EmpiricalData, GaussianMixture, preset
from dpmlab.models.reference import reference_solution
from dpmlab.schedules import EDM, LinearVP, NoiseSchedule


def _tweedie_by_autograd(mix: GaussianMixture, sch: NoiseSchedule, x, t):
    """E[x0|x_t] = (x + sigma^2 grad log p_t(x)) / alpha, with the score from autograd of log p_t."""
    xg = x.clone().requires_grad_(True)
    score = torch.autograd.grad(mix.log_prob(xg, sch, t).sum(), xg)[0]
    a, s = sch.alpha(t), sch.sigma(t)
    return (x + s * s * score) / a


@pytest.mark.parametrize("name", ["gmm2d", "gmm16"])
@pytest.mark.parametrize("t", [0.05, 0.3, 0.9])
def test_exact_denoiser_is_tweedie(name, t):
    mix, sch = preset(name), LinearVP()
    x = mix.sample_t(64, sch, t, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(mix.x0(x, sch, t), _tweedie_by_autograd(mix, sch, x, t), atol=1e-10)
    # score agrees with the same autograd
    xg = x.clone().requires_grad_(True)
    s_auto = torch.autograd.grad(mix.log_prob(xg, sch, t).sum(), xg)[0]
    assert torch.allclose(mix.score(x, sch, t), s_auto, atol=1e-9)


def test_sampling_and_moments():
    mix = preset("gmm16")
    x = mix.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0), mix.mean(), atol=0.02)
    assert torch.allclose(torch.cov(x.T), mix.cov(), atol=0.03)
    # p_t samples have the marginal's moments: alpha^2 Cov + sigma^2 I
    sch, t = LinearVP(), 0.4
    xt = mix.sample_t(200_000, sch, t, generator=torch.Generator().manual_seed(1))
    a, s = float(sch.alpha(t)), float(sch.sigma(t))
    assert torch.allclose(torch.cov(xt.T), a * a * mix.cov() + s * s * torch.eye(16, dtype=torch.float64), atol=0.03)


def test_log_prob_normalised_in_1d():
    mix = GaussianMixture([1.0, 3.0], [[-1.0], [2.0]], [0.3, 0.7])
    grid = torch.linspace(-8, 10, 20001, dtype=torch.float64)[:, None]
    dens = mix.log_prob(grid).exp()
    assert float(torch.trapezoid(dens, grid[:, 0])) == pytest.approx(1.0, abs=1e-8)


def test_empirical_data_is_ideal_denoiser():
    pts = torch.tensor([[0.0, 0.0], [1.0, 2.0], [-3.0, 1.0]], dtype=torch.float64)
    emp, sch = EmpiricalData(pts), EDM()
    # at small noise the ideal denoiser snaps to the nearest training point
    x = pts + 1e-3 * torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(emp.x0(x, sch, 0.01), pts, atol=1e-12)
    # at huge noise it returns the data mean
    assert torch.allclose(
        emp.x0(torch.zeros(1, 2, dtype=torch.float64), sch, 1e4), pts.mean(0, keepdim=True), atol=1e-6
    )
    with pytest.raises(ValueError, match="no density"):
        emp.log_prob(pts)


def test_reference_solver_against_exact_flow_map():
    g, sch = preset("gauss16"), LinearVP()
    x = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = g.exact_flow(x, sch, sch.t_max, sch.t_min)
    ref = reference_solution(g.denoiser(sch), sch, x, sch.t_max, sch.t_min)
    assert float((ref.x - exact).abs().max()) < 1e-8
    # also run backwards (inversion) and to sigma = 0
    back = reference_solution(g.denoiser(sch), sch, exact, sch.t_min, sch.t_max)
    assert float((back.x - x).abs().max()) < 1e-7
    to0 = reference_solution(g.denoiser(sch), sch, x, sch.t_max, 0.0)
    assert float((to0.x - g.exact_flow(x, sch, sch.t_max, 0.0)).abs().max()) < 1e-8


def test_reference_solver_converges_under_refinement_on_a_mixture():
    mix, sch = preset("gmm16"), LinearVP()
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = reference_solution(mix.denoiser(sch), sch, x, sch.t_max, sch.t_min, rtol=1e-9, atol=1e-9)
    b = reference_solution(mix.denoiser(sch), sch, x, sch.t_max, sch.t_min, rtol=1e-12, atol=1e-12)
    assert float((a.x - b.x).abs().max()) < 1e-7
    assert b.n_evals > a.n_evals


def test_presets_and_errors():
    for name in PRESETS:
        m = preset(name)
        assert m.dim in (2, 16, 64)
    with pytest.raises(ValueError, match="unknown analytic preset 'gmm3'"):
        preset("gmm3")
    with pytest.raises(ValueError, match="stds must be"):
        GaussianMixture([1.0], [[0.0, 0.0]], [[1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="expects x of shape"):
        preset("gmm16").x0(torch.zeros(3, 4), LinearVP(), 0.5)
    with pytest.raises(ValueError, match="only for a single Gaussian"):
        preset("gmm16").exact_flow(torch.zeros(1, 16), LinearVP(), 1.0, 0.5)
    assert math.isfinite(float(preset("gmm2d").log_prob(torch.zeros(1, 2, dtype=torch.float64))))
