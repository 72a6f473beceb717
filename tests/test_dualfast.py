"""DualFast (Yu et al. 2025, arXiv 2506.13058): c = 0 is the base exactly, NFE is the base's, and the
correction is the implemented equation: the base step plus b_0 (x0~ - x0) on its first-order term."""

import math

import pytest
import torch

from dpmlab.models.analytic import preset
from dpmlab.schedules import LinearVP
from dpmlab.solvers import Problem, SeededNoise, get, iterate, sample
from dpmlab.solvers.dualfast import DualFast
from dpmlab.timesteps import karras, uniform_lambda

SCH = LinearVP()
MIX = preset("gmm16")
MODEL = MIX.denoiser(SCH)


def _x(n=16, seed=0):
    return torch.randn(n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("base", [get("ddim"), get("dpm_solver_pp", order=3), get("unipc"), get("ddpm")])
@pytest.mark.parametrize("to_zero", [False, True])
def test_c_zero_is_the_base_exactly(base, to_zero):
    ts = karras(SCH, 7, to_zero=to_zero)
    noise = SeededNoise(5, range(16))
    p_ref, p = Problem(MODEL, SCH, noise=noise), Problem(MODEL, SCH, noise=noise)
    ref = sample(p_ref, _x(), ts, base)
    out = sample(p, _x(), ts, DualFast(base=base, c=0.0))
    assert torch.equal(out, ref)
    assert p.nfe == p_ref.nfe == base.nfe(ts, SCH)
    p2 = Problem(MODEL, SCH, noise=noise)
    sample(p2, _x(), ts, DualFast(base=base, c=0.7))
    assert p2.nfe == p_ref.nfe  # zero extra evaluations


def _ddim_mixed(x, ts, c, prediction, tau):
    """DDIM run on the mixed output, written out directly from the equations."""
    m_first = m_prev = None
    for i in range(len(ts) - 1):
        t, t1 = ts[i], ts[i + 1]
        a, s, a1, s1 = SCH.alpha(t), SCH.sigma(t), SCH.alpha(t1), SCH.sigma(t1)
        x0 = MODEL(x, t.expand(x.shape[0]))
        m = x0 if prediction == "data" else (x - a * x0) / s
        m_tau = m_first if tau == "first" else m_prev
        ci = c * (ts[0] - t) / (ts[0] - ts[-1])
        mm = m if m_tau is None else (1 + ci) * m - ci * m_tau
        x0m = mm if prediction == "data" else (x - s * mm) / a
        x = a1 * x0m + s1 * (x - a * x0m) / s  # DDIM on the mixed output
        m_first = m if m_first is None else m_first
        m_prev = m
    return x


@pytest.mark.parametrize("prediction", ["noise", "data"])
@pytest.mark.parametrize("tau", ["first", "previous"])
def test_ddim_with_dualfast_is_ddim_on_the_mixed_output(prediction, tau):
    ts = uniform_lambda(SCH, 6)
    out = sample(Problem(MODEL, SCH), _x(), ts, DualFast(c=0.6, prediction=prediction, tau=tau))
    assert torch.allclose(out, _ddim_mixed(_x(), ts, 0.6, prediction, tau), atol=1e-10, rtol=0)


def test_multistep_correction_is_on_the_first_order_term_only():
    ts = uniform_lambda(SCH, 5)
    base = get("dpm_solver_pp", order=2)
    plain = list(iterate(Problem(MODEL, SCH), _x(), ts, base))
    solver = DualFast(base=base, c=1.0, prediction="data", c_schedule="constant")
    df = list(iterate(Problem(MODEL, SCH), _x(), ts, solver))
    assert torch.equal(df[0].x, plain[0].x)  # no earlier output at step 0
    x1 = plain[0].x  # same state before step 1: the difference is b_0 c (x0_1 - x0_0)
    x0_0, x0_1 = MODEL(_x(), ts[0].expand(16)), MODEL(x1, ts[1].expand(16))
    lam1, lam2 = SCH.lam(ts[1]), SCH.lam(ts[2])
    b0 = -SCH.alpha(ts[2]) * math.expm1(-float(lam2 - lam1))
    assert torch.allclose(df[1].x - plain[1].x, b0 * (x0_1 - x0_0), atol=1e-10, rtol=0)


def test_schedule_config_and_errors():
    ts = uniform_lambda(SCH, 4)
    s = DualFast(base=get("unipc"), c=0.8)
    assert [s.c_at(ts, i) for i in range(4)] == pytest.approx(
        [0.8 * float((ts[0] - ts[i]) / (ts[0] - ts[-1])) for i in range(4)])
    assert DualFast(c=0.3, c_schedule="constant").c_at(ts, 2) == 0.3
    assert get(**s.config()) == s and s.order == get("unipc").order
    a = sample(Problem(MODEL, SCH), _x(), ts, s)
    assert torch.equal(a, sample(Problem(MODEL, SCH), _x(), ts, s))
    for bad in ({"tau": "last"}, {"prediction": "v"}, {"c_schedule": "cosine"}, {"c": float("nan")}):
        with pytest.raises(ValueError):
            DualFast(**bad)
