import math

import pytest
import torch

from dpmlab.schedules import EDM, SCHEDULES, VE, DiscreteVP, Flow, LinearVP, betas_for_preset, get_schedule

ALL = [get_schedule(n) for n in SCHEDULES]


@pytest.mark.parametrize("sch", ALL, ids=SCHEDULES)
def test_t_of_lambda_round_trip(sch):
    t = torch.linspace(sch.t_min, sch.t_max, 2001, dtype=torch.float64)
    lam = sch.lam(t)
    assert bool((lam[1:] < lam[:-1]).all()), "lambda must be strictly decreasing in t"
    assert torch.allclose(sch.t_of_lambda(lam), t, rtol=0, atol=1e-12 * max(1.0, sch.t_max))
    # and the other way round, on lambdas
    lam2 = torch.linspace(float(lam[-1]), float(lam[0]), 501, dtype=torch.float64)
    assert torch.allclose(sch.lam(sch.t_of_lambda(lam2)), lam2, rtol=0, atol=1e-9)


@pytest.mark.parametrize("sch", ALL, ids=SCHEDULES)
def test_lam_is_log_alpha_over_sigma(sch):
    t = torch.linspace(sch.t_min, sch.t_max, 101, dtype=torch.float64)
    assert torch.allclose(sch.lam(t), torch.log(sch.alpha(t) / sch.sigma(t)), atol=1e-12)
    if sch.is_vp:
        assert torch.allclose(sch.alpha(t) ** 2 + sch.sigma(t) ** 2, torch.ones_like(t), atol=1e-14)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_discrete_reproduces_betas(name):
    betas = betas_for_preset(name)
    sch = DiscreteVP(betas=betas)
    n = torch.arange(1000, dtype=torch.float64)
    abar = sch.alpha(sch.index_to_t(n)) ** 2
    assert torch.allclose(abar, torch.cumprod(1 - betas, 0), rtol=1e-12)
    assert torch.allclose(sch.betas, betas, rtol=1e-10, atol=1e-15)
    assert torch.allclose(DiscreteVP(alphas_cumprod=torch.cumprod(1 - betas, 0)).betas, betas, rtol=1e-10, atol=1e-15)


def test_discrete_presets_values():
    assert float(betas_for_preset("linear")[0]) == pytest.approx(1e-4)
    assert float(betas_for_preset("linear")[-1]) == pytest.approx(0.02)
    assert float(betas_for_preset("scaled_linear")[0]) == pytest.approx(0.00085)
    assert float(betas_for_preset("scaled_linear")[-1]) == pytest.approx(0.012)
    cos = DiscreteVP.from_preset("cosine")
    assert float(cos.lam(torch.tensor(cos.t_max))) >= -5.1  # lambda clipping
    assert cos.t_max < 1.0


def test_sigma_zero_end_and_continuous_formulas():
    for sch in (DiscreteVP.from_preset("linear"), LinearVP(), EDM(), Flow()):
        assert float(sch.sigma(torch.tensor(sch.t_zero, dtype=torch.float64))) == 0.0
        assert math.isinf(float(sch.lam(torch.tensor(sch.t_zero, dtype=torch.float64))))
        assert float(sch.t_of_lambda(torch.tensor(math.inf, dtype=torch.float64))) == pytest.approx(
            sch.t_zero, abs=1e-15
        )
    lin = LinearVP()
    t = torch.tensor(0.5, dtype=torch.float64)
    assert float(lin.log_alpha(t)) == pytest.approx(-0.25 * 0.25 * 19.9 - 0.5 * 0.5 * 0.1)
    assert float(VE().sigma(torch.tensor(1.0))) == pytest.approx(50.0)
    assert float(EDM().sigma(torch.tensor(3.0))) == 3.0 and float(EDM().alpha(torch.tensor(3.0))) == 1.0
    assert float(Flow().alpha(torch.tensor(0.25))) == pytest.approx(0.75)


def test_conversions_round_trip():
    sch = LinearVP()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, dtype=torch.float64, generator=g)
    eps = torch.randn(5, 3, dtype=torch.float64, generator=g)
    t = torch.rand(5, dtype=torch.float64, generator=g) * 0.9 + 0.05
    x = sch.add_noise(x0, eps, t)
    assert torch.allclose(sch.x0_from_eps(x, eps, t), x0)
    assert torch.allclose(sch.eps_from_x0(x, x0, t), eps)
    v = sch.v_from_x0_eps(x0, eps, t)
    assert torch.allclose(sch.x0_from_v(x, v, t), x0)
    ve = VE()  # v-conversion is general, not only VP
    xv = ve.add_noise(x0, eps, t)
    assert torch.allclose(ve.x0_from_v(xv, ve.v_from_x0_eps(x0, eps, t), t), x0)


def test_bad_schedule_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        DiscreteVP()
    with pytest.raises(ValueError, match="betas"):
        DiscreteVP(betas=[0.1, 1.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        DiscreteVP(alphas_cumprod=[0.9, 0.95])
    with pytest.raises(ValueError, match="unknown schedule 'foo'"):
        get_schedule("foo")
    with pytest.raises(ValueError, match="beta0"):
        LinearVP(beta0=5, beta1=1)
