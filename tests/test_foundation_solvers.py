import pytest
import torch
from oracles import reference, rms

import dpmlab
from dpmlab.models.analytic import preset
from dpmlab.schedules import EDM, DiscreteVP, LinearVP
from dpmlab.solvers import DDIM, DDPM, Euler, Heun, Problem, SeededNoise, iterate, sample
from dpmlab.timesteps import karras, quadratic_time, trailing, uniform_lambda


@pytest.mark.parametrize("sch", [LinearVP(), DiscreteVP.from_preset("linear"), EDM()], ids=["vp", "disc", "edm"])
def test_ddim_equals_euler_in_edm_coordinates(sch):
    """DDIM(eta=0) is the Euler step of dy/ds = (y - x0)/s with y = x/alpha, s = sigma/alpha."""
    mix = preset("gmm16")
    model = mix.denoiser(sch)
    x = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * float(
        sch.sigma(sch.t_max)
    )
    ts = quadratic_time(sch, 9)
    a = sample(Problem(model, sch), x, ts, DDIM())
    # the Euler step written out by hand here, independently of dpmlab's Euler class
    y = x / sch.alpha(ts[0])
    for i in range(9):
        s, s1 = float(sch.sigma_over_alpha(ts[i])), float(sch.sigma_over_alpha(ts[i + 1]))
        x0 = model(float(sch.alpha(ts[i])) * y, ts[i].expand(32))
        y = y + (s1 - s) * (y - x0) / s
    b = float(sch.alpha(ts[-1])) * y
    assert float((a - b).abs().max()) < 1e-10
    c = sample(Problem(model, sch), x, ts, Euler())
    assert float((a - c).abs().max()) < 1e-10


def test_step_to_sigma_zero_is_the_denoised_estimate():
    sch = DiscreteVP.from_preset("linear")
    model = preset("gmm16").denoiser(sch)
    ts = trailing(sch, 4)  # ends at t = 0, sigma = 0
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for solver in (DDIM(), DDIM(eta=1.0), DDPM(), Heun(), Euler()):
        problem = Problem(model, sch, noise=SeededNoise(0, range(len(x))))
        steps = list(iterate(problem, x, ts, solver))
        out, before = steps[-1].x, steps[-2].x  # the last step goes from ts[-2] to sigma = 0
        assert float(sch.sigma(ts[-1:])) == 0.0
        x0 = model(before, ts[-2].expand(len(x)))
        assert float((out - x0).abs().max()) < 1e-12, solver  # exactly the denoised estimate, no noise added


def _moments_ok(x, mix, tol_mean, tol_cov):
    x = x.double()
    assert float((x.mean(0) - mix.mean()).abs().max()) < tol_mean
    assert float((torch.cov(x.T) - mix.cov()).abs().max()) < tol_cov


@pytest.mark.parametrize(
    "solver",
    [DDPM(), DDPM(variance="fixed_large"), DDIM(eta=1.0), Heun(S_churn=40.0)],
    ids=["ddpm_small", "ddpm_large", "ddim_eta1", "heun_churn"],
)
def test_stochastic_solvers_match_p0_moments(solver):
    mix = preset("gmm2d")
    sch = LinearVP()
    model = mix.denoiser(sch)
    n = 4000
    nfe = 200
    x = dpmlab.sample(model, n, solver=solver, nfe=nfe, seed=0, grid="uniform_time", to_zero=False)
    # sampling error of the mean ~ std/sqrt(n) ~ 0.015; allow 4 standard errors + discretisation
    _moments_ok(x, mix, 0.06, 0.08)


def test_ddpm_variances_differ_and_both_are_noisy():
    model = preset("gmm2d").denoiser(LinearVP())
    a = dpmlab.sample(model, 16, solver="ddpm", nfe=20, seed=0)
    b = dpmlab.sample(model, 16, solver=DDPM(variance="fixed_large"), nfe=20, seed=0)
    assert not torch.allclose(a, b)
    sch = model.schedule
    x = torch.randn(16, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = uniform_lambda(sch, 20)
    for solver in (DDPM(), DDPM(variance="fixed_large")):  # same start, different step noise -> different samples
        one = sample(Problem(model, sch, noise=SeededNoise(1, range(16))), x, ts, solver)
        two = sample(Problem(model, sch, noise=SeededNoise(2, range(16))), x, ts, solver)
        assert float((one - two).abs().max()) > 1e-2


def test_heun_is_more_accurate_than_euler_at_equal_nfe():
    mix, sch, x, ref = reference("gmm16")
    model = mix.denoiser(sch)
    e = sample(Problem(model, sch), x, uniform_lambda(sch, 20), Euler())
    h = sample(Problem(model, sch), x, uniform_lambda(sch, 10), Heun())
    assert rms(h, ref) < rms(e, ref)


def test_edm_heun_on_edm_schedule_with_karras_to_zero():
    sch = EDM()
    mix = preset("gmm2d")
    model = mix.denoiser(sch)
    ts = karras(sch, 18, to_zero=True)
    assert Heun().nfe(ts, sch) == 35  # 2N - 1, the EDM paper's count
    x = 80.0 * torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = sample(Problem(model, sch), x, ts, Heun())
    _moments_ok(out, mix, 0.08, 0.1)


def test_ddim_eta_noise_std_formula():
    # eta=1 on VP equals DDPM's posterior variance (fixed_small) step for step
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    x = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = uniform_lambda(sch, 7)
    a = sample(Problem(model, sch, noise=SeededNoise(1, range(16))), x, ts, DDIM(eta=1.0))
    b = sample(Problem(model, sch, noise=SeededNoise(1, range(16))), x, ts, DDPM())
    assert float((a - b).abs().max()) < 1e-10
