"""The one multistep engine (``dpmlab.solvers._multistep``) against the papers' closed forms.

DDIM, multistep DPM-Solver / DPM-Solver++ (ODE and SDE), UniPC, UniC and USF's presets all run on the
engine; the oracles below are independent closed-form implementations written from the papers'
equations (DPM-Solver++ Alg. 2 / the authors' 3M; UniPC's ``R a = b`` system with ``B(h)``), sharing
nothing with the engine but ``expint_coeffs`` and ``phi`` (tested against quadrature in
test_dpm_solver.py). Each solver is compared in float64, step by step, on an analytic mixture, for
every option that changes its table."""

from __future__ import annotations

import math

import pytest
import torch

from dpmlab.models.analytic import preset
from dpmlab.schedules import LinearVP
from dpmlab.solvers import Problem, SeededNoise, get, sample
from dpmlab.solvers._expint import expint_coeffs, interval, phi
from dpmlab.solvers._multistep import Buffer, Relaxation, Step, Taylor, advance, update
from dpmlab.timesteps import uniform_lambda, uniform_time

torch.set_num_threads(1)
SCH = LinearVP()
MODEL = preset("gmm16").denoiser(SCH)
X = 80.0 * torch.randn(12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
TOL = 1e-11  # float64 agreement of two exact formulas (rounding differs: Vandermonde inverse, phi series); a
# wrong coefficient moves results by > 1e-4


# --- closed forms ------------------------------------------------------------------------------------
def _dpm_multistep(x, ts, order, form, solver_type, third, lof, eta=0.0, seed=0):
    """DPM-Solver++ Alg. 2 (data) / multistep DPM-Solver (noise), 2M: D1 = (m0 - m1)/r0 with weight b_0/2
    ("midpoint") or b_1 ("heun"); 3M: D1 = D1_0 + r0/(r0+r1)(D1_0 - D1_1), D2 = (D1_0 - D1_1)/(r0+r1), weights
    b_1 and 2 b_2 ("taylor") or b_2 ("reference")."""
    problem = Problem(MODEL, SCH, noise=SeededNoise(seed, torch.arange(len(x))))
    hist, n = [], len(ts) - 1
    for i in range(n):
        c = interval(SCH, ts, i)
        x0 = MODEL(x, c.t)
        m = x0 if form == "data" else (x - c.alpha * x0) / c.sigma
        hist = [(c.lam, m), *hist][:order]
        k = min(order, len(hist))
        if lof and n < 15:
            k = min(k, n - i)
        if c.sigma_next == 0:
            k = 1
        a, b = expint_coeffs(c, k, form, eta=eta)
        (l0, m0), h = hist[0], c.h
        out = a * x + b[0] * m0
        if k >= 2:
            r0 = (l0 - hist[1][0]) / h
            d1_0 = (m0 - hist[1][1]) / r0
        if k == 2:
            out = out + (0.5 * b[0] if solver_type == "midpoint" else b[1]) * d1_0
        if k == 3:
            r1 = (hist[1][0] - hist[2][0]) / h
            d1_1 = (hist[1][1] - hist[2][1]) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            out = out + b[1] * d1 + (2.0 * b[2] if third == "taylor" else b[2]) * d2
        if eta > 0 and c.sigma_next > 0:
            out = out + c.sigma_next * math.sqrt(-math.expm1(-2.0 * eta * c.h)) * problem.randn(i, x)
        x = out
    return x


def _uni(x, c, lams, ms, p, variant, form, m_t=None):
    """UniP-p / UniC-p (Zhao et al. 2023, B(h) form): x^(1) - alpha_t B(h) sum a_k D_k with R a = b."""
    m0, data = ms[-1], form == "data"
    if c.sigma_next == 0:
        x0 = m0 if data else (x - c.sigma * m0) / c.alpha
        return c.alpha_next * x0
    h = c.h
    hh = -h if data else h
    x1 = (
        c.sigma_ratio * x - c.alpha_next * math.expm1(hh) * m0
        if data
        else c.alpha_ratio * x - c.sigma_next * math.expm1(hh) * m0
    )
    rks = [(lams[-1 - k] - lams[-1]) / h for k in range(1, p)]
    D = [(ms[-1 - k] - m0) / rk for k, rk in zip(range(1, p), rks)]
    if m_t is not None:
        rks, D = rks + [1.0], D + [m_t - m0]
    if not D:
        return x1
    B_h = hh if variant == "bh1" else math.expm1(hh)
    if len(D) == 1:
        a = [0.5]
    else:
        rhs = torch.tensor(
            [math.factorial(i) * hh * phi(hh, i + 1) / B_h for i in range(1, len(D) + 1)], dtype=torch.float64
        )
        rows = torch.tensor([[rk**i for rk in rks] for i in range(len(D))], dtype=torch.float64)
        a = torch.linalg.solve(rows, rhs).tolist()
    return x1 - ((c.alpha_next if data else c.sigma_next) * B_h) * sum(ak * Dk for ak, Dk in zip(a, D))


def _unipc(x, ts, p, variant, form, lof=True, corrector=True):
    lams, ms, m_next, n = (), (), None, len(ts) - 1
    for i in range(n):
        c = interval(SCH, ts, i)
        m0 = m_next
        if m0 is None:
            x0 = MODEL(x, c.t)
            m0 = x0 if form == "data" else (x - c.alpha * x0) / c.sigma
        lams, ms = (lams + (c.lam,))[-p:], (ms + (m0,))[-p:]
        k = min(p, len(ms), n - i if lof else n)
        x_pred = _uni(x, c, lams, ms, k, variant, form)
        if not corrector or c.sigma_next == 0 or i == n - 1:
            x, m_next = x_pred, None
            continue
        x0_t = MODEL(x_pred, c.t_next)
        m_next = x0_t if form == "data" else (x_pred - c.alpha_next * x0_t) / c.sigma_next
        x = _uni(x, c, lams, ms, k, variant, form, m_next)
    return x


def _run(name, ts, **kw):
    return sample(Problem(MODEL, SCH, noise=SeededNoise(0, torch.arange(len(X)))), X, ts, get(name, **kw))


def _grids():
    return [("uniform_time", uniform_time(SCH, 9)), ("to_zero", uniform_lambda(SCH, 7, t_end=SCH.t_zero))]


# --- the solvers on the engine = their closed forms ----------------------------------------------------
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("third", ["taylor", "reference"])
@pytest.mark.parametrize("lof", [True, False])
def test_dpm_solver_pp_and_multistep_dpm_solver_are_the_closed_form(order, solver_type, third, lof):
    for _, ts in _grids():
        opts = dict(order=order, solver_type=solver_type, third_order_term=third, lower_order_final=lof)
        got = _run("dpm_solver_pp", ts, **opts)
        want = _dpm_multistep(X, ts, order, "data", solver_type, third, lof)
        assert (got - want).abs().max() < TOL * want.abs().max()
        got = _run("dpm_solver_multistep", ts, **opts)
        want = _dpm_multistep(X, ts, order, "noise", solver_type, third, lof)
        assert (got - want).abs().max() < TOL * want.abs().max()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_sde_dpm_solver_pp_is_the_closed_form(order):
    ts = uniform_time(SCH, 9)
    got = _run("sde_dpm_solver_pp", ts, order=order, eta=1.0)
    want = _dpm_multistep(X, ts, order, "data", "midpoint", "taylor", True, eta=1.0)
    assert (got - want).abs().max() < TOL * want.abs().max()


@pytest.mark.parametrize("p", [1, 2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("form", ["data", "noise"])
def test_unipc_is_the_closed_form(p, variant, form):
    for _, ts in _grids():
        got = _run("unipc", ts, predictor_order=p, variant=variant, prediction=form)
        want = _unipc(X, ts, p, variant, form)
        assert (got - want).abs().max() < TOL * want.abs().max(), (p, variant, form)
    ts = uniform_time(SCH, 9)
    got = _run("unipc", ts, predictor_order=p, variant=variant, prediction=form, use_corrector=False)
    want = _unipc(X, ts, p, variant, form, corrector=False)
    assert (got - want).abs().max() < TOL * want.abs().max()


def test_ddim_is_the_first_order_table():
    for _, ts in _grids():
        want = X
        for i in range(len(ts) - 1):
            c = interval(SCH, ts, i)
            x0 = MODEL(want, c.t)
            eps = (want - c.alpha * x0) / c.sigma
            want = c.alpha_next * x0 + c.sigma_next * eps  # eq. (12) with eta = 0
        got = _run("ddim", ts)
        assert (got - want).abs().max() < 1e-9 * want.abs().max()


# --- the engine's own pieces -------------------------------------------------------------------------
def test_relaxation_and_weights_enter_as_the_table_says():
    """c_1 scales the first-derivative term and c_2 the second: changing either moves the update by exactly
    the corresponding term."""
    ts = uniform_time(SCH, 6)
    c = interval(SCH, ts, 3)
    lams = tuple(interval(SCH, ts, i).lam for i in (1, 2, 3))
    ms = tuple(MODEL(X, float(ts[i])) for i in (1, 2, 3))
    plain = update(c, X, lams, ms, Taylor.full(3), "data")
    half = update(c, X, lams, ms, Taylor.full(3, weights=(0.5,)), "data")
    lin = update(c, X, lams, ms, Taylor(3, (2, 2), Relaxation.LINEAR, 0.7), "data")
    _, b = expint_coeffs(c, 3, "data")
    d2 = (plain - update(c, X, lams, ms, Taylor.full(3, weights=(0.0,)), "data")) / b[2]
    assert (plain - half - 0.5 * b[2] * d2).abs().max() < 1e-9 * plain.abs().max()
    d1 = (plain - update(c, X, lams, ms, Taylor(3, (2, 2), "linear", -1.0 / c.h), "data")) / b[1]
    assert (lin - plain - 0.7 * c.h * b[1] * d1).abs().max() < 1e-9 * plain.abs().max()
    with pytest.raises(ValueError, match="weights"):
        Taylor(3, (2, 2), weights=(0.5, 0.5))


def test_advance_counts_evaluations_and_keeps_the_pending_output():
    """A pseudo corrector costs one evaluation and leaves it pending; the next step reuses it (no call)."""
    ts = uniform_time(SCH, 4)
    problem = Problem(MODEL, SCH)
    rule = Step("data", Taylor(), "pseudo", Taylor(2, (1,)))
    x1, buf = advance(problem, X, interval(SCH, ts, 0), 0, Buffer(), rule)
    assert problem.nfe == 2 and buf.pending and len(buf.lams) == 2
    x2, buf = advance(problem, x1, interval(SCH, ts, 1), 1, buf, Step("data", Taylor.full(2)))
    assert problem.nfe == 2 and not buf.pending  # the corrector's evaluation was reused
    with pytest.raises(ValueError, match="needs 2 outputs"):
        update(interval(SCH, ts, 0), X, buf.lams[-1:], buf.x0s[-1:], Taylor(3, (2, 2)), "data")
