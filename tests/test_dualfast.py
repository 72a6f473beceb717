"""DualFast (Yu et al. 2025, arXiv 2506.13058): c = 0 is the base exactly, NFE is the base's (the base's
call at (x_i, t_i) is answered from the wrapper's own evaluation), both readings ("explicit": only the
explicit eps of the DDIM update; "both": DDIM on the mixed output) equal their written-out updates, a
base that does not evaluate at (x_i, t_i) is refused, and with a model error the correction changes the
result and its measured order."""

import math

import pytest
import torch
from oracles import slope

from dpmlab.models.analytic import preset, reference_solution
from dpmlab.schedules import LinearVP
from dpmlab.solvers import Problem, SeededNoise, get, iterate, sample, solver_class
from dpmlab.solvers.dualfast import DualFast
from dpmlab.timesteps import karras, uniform_lambda

SCH = LinearVP()
MIX = preset("gmm16")
MODEL = MIX.denoiser(SCH)


def _x(n=16, seed=0):
    return torch.randn(n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


BASES = [get("ddim"), get("dpm_solver_pp", order=3), get("unipc", use_corrector=False), get("ddpm"), get("heun")]


@pytest.mark.parametrize("base", BASES, ids=lambda b: b.name)
@pytest.mark.parametrize("to_zero", [False, True])
def test_c_zero_is_the_base_exactly_and_nfe_is_the_base(base, to_zero):
    ts = karras(SCH, 7, to_zero=to_zero)
    noise = SeededNoise(5, range(16))
    p_ref, p = Problem(MODEL, SCH, noise=noise), Problem(MODEL, SCH, noise=noise)
    ref = sample(p_ref, _x(), ts, base)
    out = sample(p, _x(), ts, DualFast(base=base, c=0.0))
    assert torch.equal(out, ref)
    assert p.nfe == p_ref.nfe == base.nfe(ts, SCH)
    for replace in ("explicit", "both"):
        p2 = Problem(MODEL, SCH, noise=noise)
        assert not torch.equal(sample(p2, _x(), ts, DualFast(base=base, c=0.7, replace=replace)), ref)
        assert p2.nfe == p_ref.nfe  # zero extra evaluations: the base's call at (x_i, t_i) is the wrapper's


def test_a_base_that_reuses_an_evaluation_is_refused():
    ts = uniform_lambda(SCH, 5)
    with pytest.raises(ValueError, match="base 'unipc' did not evaluate the model at \\(x_i, t_i\\) in step 1"):
        sample(Problem(MODEL, SCH), _x(), ts, DualFast(base=get("unipc"), c=0.5))


def _ddim_mixed(x, ts, c, prediction, tau, replace):
    """DDIM x' = alpha' x0 + sigma' eps with the mixed output, written out from the equations: "explicit"
    replaces only the explicit output (eps in noise form, x0 in data form), "both" runs DDIM on it."""
    m_first = m_prev = None
    for i in range(len(ts) - 1):
        t, t1 = ts[i], ts[i + 1]
        a, s, a1, s1 = SCH.alpha(t), SCH.sigma(t), SCH.alpha(t1), SCH.sigma(t1)
        x0 = MODEL(x, t.expand(x.shape[0]))
        eps = (x - a * x0) / s
        m = x0 if prediction == "data" else eps
        m_tau = m_first if tau == "first" else m_prev
        ci = c * (ts[0] - t) / (ts[0] - ts[-1])
        mm = m if m_tau is None else (1 + ci) * m - ci * m_tau
        if replace == "both":
            x0m = mm if prediction == "data" else (x - s * mm) / a
            x_next = a1 * x0m + s1 * (x - a * x0m) / s
        elif prediction == "noise":
            x_next = a1 * x0 + s1 * mm
        else:
            x_next = a1 * mm + s1 * eps
        x, m_first, m_prev = x_next, (m if m_first is None else m_first), m
    return x


@pytest.mark.parametrize("replace", ["explicit", "both"])
@pytest.mark.parametrize("prediction", ["noise", "data"])
@pytest.mark.parametrize("tau", ["first", "previous"])
def test_ddim_with_dualfast_is_the_written_out_update(replace, prediction, tau):
    ts = uniform_lambda(SCH, 6)
    out = sample(Problem(MODEL, SCH), _x(), ts, DualFast(c=0.6, prediction=prediction, tau=tau, replace=replace))
    assert torch.allclose(out, _ddim_mixed(_x(), ts, 0.6, prediction, tau, replace), atol=1e-10, rtol=0)
    other = "both" if replace == "explicit" else "explicit"
    assert not torch.allclose(out, _ddim_mixed(_x(), ts, 0.6, prediction, tau, other), atol=1e-4)


@pytest.mark.parametrize("replace", ["explicit", "both"])
def test_multistep_correction_is_on_the_first_order_term_only(replace):
    ts = uniform_lambda(SCH, 5)
    base = get("dpm_solver_pp", order=2)
    plain = list(iterate(Problem(MODEL, SCH), _x(), ts, base))
    solver = DualFast(base=base, c=1.0, prediction="noise", c_schedule="constant", replace=replace)
    df = list(iterate(Problem(MODEL, SCH), _x(), ts, solver))
    assert torch.equal(df[0].x, plain[0].x)  # no earlier output at step 0
    x1 = plain[0].x  # same state before step 1: the difference is coef * c (eps_1 - eps_0)
    a0, s0, a1, s1 = (f(ts[k]) for k in (0, 1) for f in (SCH.alpha, SCH.sigma))
    eps0, eps1 = (_x() - a0 * MODEL(_x(), ts[0].expand(16))) / s0, (x1 - a1 * MODEL(x1, ts[1].expand(16))) / s1
    a2, s2 = SCH.alpha(ts[2]), SCH.sigma(ts[2])
    b0 = -a2 * math.expm1(-float(SCH.lam(ts[2]) - SCH.lam(ts[1])))
    coef = s2 if replace == "explicit" else -b0 * s1 / a1
    assert torch.allclose(df[1].x - plain[1].x, coef * (eps1 - eps0), atol=1e-10, rtol=0)


class _Blurred:
    """The exact denoiser blended with the linear (Wiener) one by 0.3 alpha^2: a model error that grows as
    the noise falls (the paper's finding; benchmarks/dualfast_readings.py "blur")."""

    def __init__(self):
        self.mu, self.v = MIX.mean(), torch.diagonal(MIX.cov())
        self.schedule, self.data_shape = SCH, (16,)

    def __call__(self, x, t, **cond):
        a, s = SCH.alpha(t)[:, None], SCH.sigma(t)[:, None]
        lin = self.mu + a * self.v / (a * a * self.v + s * s) * (x - a * self.mu)
        return (1 - 0.3 * a * a) * MODEL(x, t) + 0.3 * a * a * lin


def _reference(model):
    ts = uniform_lambda(SCH, 12)
    x = _x(16, 9) * float(SCH.sigma(ts[0]))
    return x, reference_solution(model, SCH, x, float(ts[0]), float(ts[-1]), rtol=1e-10, atol=1e-10).x


def _order(solver, model, x_ref, steps=(12, 24, 48, 96)):
    """Slope of the RMS error against the model's own float64 reference ODE solution, lambda-uniform grids
    (measured: DualFast 1.14, its base DPM-Solver++(2M) 1.82)."""
    x, ref = x_ref
    errs = [
        float((sample(Problem(model, SCH), x, uniform_lambda(SCH, k), solver) - ref).pow(2).mean().sqrt())
        for k in steps
    ]
    return slope(steps, errs), errs


def test_order_with_a_model_error_differs_from_the_base():
    """The registry's order options (c = 0.25, tau = previous, both, on DPM-Solver++(2M)) on a model with an
    error: first order where its base is second order — the correction is applied and stays consistent.
    Band +-0.3: the registry contract's."""
    solver = get("dualfast", **solver_class("dualfast").order_test_options)
    assert solver.c != 0 and solver.order == 1 and solver.base.order == 2
    ref = _reference(_Blurred())
    order, errs = _order(solver, _Blurred(), ref)
    base_order, base_errs = _order(solver.base, _Blurred(), ref)
    assert abs(order - 1) <= 0.3 and abs(base_order - 2) <= 0.3, (order, errs, base_order, base_errs)


def test_schedule_config_and_errors():
    ts = uniform_lambda(SCH, 4)
    s = DualFast(base=get("dpm_solver_pp"), c=0.8)
    assert s.replace == "both"  # the default reading (docs/methods/dualfast.md: why)
    assert [s.c_at(ts, i) for i in range(4)] == pytest.approx(
        [0.8 * float((ts[0] - ts[i]) / (ts[0] - ts[-1])) for i in range(4)]
    )
    assert DualFast(c=0.3, c_schedule="constant").c_at(ts, 2) == 0.3
    assert get(**s.config()) == s and s.order == 1 and DualFast(c=0.0, base=get("dpm_solver_pp")).order == 2
    a = sample(Problem(MODEL, SCH), _x(), ts, s)
    assert torch.equal(a, sample(Problem(MODEL, SCH), _x(), ts, s))
    for bad, msg in (
        ({"tau": "last"}, "unknown tau 'last'; allowed: first, previous"),
        ({"prediction": "v"}, "unknown prediction 'v'; allowed: noise, data"),
        ({"c_schedule": "cosine"}, "unknown c_schedule 'cosine'; allowed: linear, constant"),
        ({"replace": "all"}, "unknown replace 'all'; allowed: explicit, both"),
        ({"c": float("nan")}, "c must be a finite number, got nan"),
    ):
        with pytest.raises(ValueError, match=msg):
            DualFast(**bad)
