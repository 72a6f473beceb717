"""DPM-Solver, DPM-Solver++ (ODE and SDE), DPM-Solver-fast and the adaptive DPM-Solver-12/23: the paper's
identities, measured convergence orders, NFE accounting, steps into sigma = 0 and the shared math."""

import math

import pytest
import torch
from oracles import measured_order, reference, rms

import dpmlab
from dpmlab.models.analytic import GaussianMixture, preset
from dpmlab.schedules import LinearVP
from dpmlab.solvers import Problem, SeededNoise, get, iterate, sample
from dpmlab.solvers._expint import (
    expint_coeffs,
    interval,
    phi,
    phi_data,
    taylor_weights,
)
from dpmlab.solvers.adaptive import solve_adaptive
from dpmlab.solvers.dpm_solver import fast_orders
from dpmlab.timesteps import karras, uniform_lambda, uniform_time

torch.set_num_threads(1)


def _x(n, dim, seed=0):
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


# --- identities -------------------------------------------------------------------------------
@pytest.mark.parametrize("to_zero", [False, True])
def test_first_order_is_ddim(to_zero):
    """DPM-Solver-1 = DPM-Solver++(1) = DDIM(eta=0) (= SDE-DPM-Solver++1 with eta=0)."""
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    x = _x(64, 16)
    ts = karras(sch, 10, to_zero=to_zero) if to_zero else uniform_time(sch, 10)
    ddim = sample(Problem(model, sch), x, ts, get("ddim"))
    for name, opts in [
        ("dpm_solver", {"order": 1}),
        ("dpm_solver_pp", {"order": 1}),
        ("sde_dpm_solver_pp", {"order": 1, "eta": 0.0}),
    ]:
        out = sample(Problem(model, sch), x, ts, get(name, **opts))
        assert (out - ddim).abs().max() < 1e-10, name


@pytest.mark.parametrize("order", [1, 2, 3])
def test_sde_with_eta_zero_is_the_ode_solver(order):
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    x, ts = _x(16, 16), uniform_lambda(sch, 12)
    ode = sample(Problem(model, sch), x, ts, get("dpm_solver_pp", order=order))
    sde = sample(Problem(model, sch), x, ts, get("sde_dpm_solver_pp", order=order, eta=0.0))
    assert torch.equal(ode, sde)


def test_fast_on_a_lambda_grid_is_singlestep_order_3():
    """Groups of three lambda-uniform grid intervals are DPM-Solver-3 steps with r1 = 1/3, r2 = 2/3."""
    mix, sch, x, _ = reference("smooth8")
    model = mix.denoiser(sch)
    fast = sample(Problem(model, sch), x, uniform_lambda(sch, 15), get("dpm_solver_fast", lower_order_final=False))
    single = sample(Problem(model, sch), x, uniform_lambda(sch, 5), get("dpm_solver", order=3))
    assert rms(fast, single) < 1e-10


# --- convergence order ------------------------------------------------------------------------
ORDERS = [  # (name, options, expected slope, steps): steps past the pre-asymptotic range
    ("dpm_solver", {"order": 1}, 1, (12, 24, 48, 96)),
    ("dpm_solver", {"order": 2}, 2, (12, 24, 48, 96)),
    ("dpm_solver", {"order": 2, "solver_type": "heun"}, 2, (12, 24, 48, 96)),
    ("dpm_solver", {"order": 3}, 3, (24, 48, 96, 192)),
    ("dpm_solver", {"order": 3, "solver_type": "heun"}, 3, (24, 48, 96, 192)),
    ("dpm_solver_fast", {"order": 2, "lower_order_final": False}, 2, (12, 24, 48, 96)),
    ("dpm_solver_fast", {"order": 3, "lower_order_final": False}, 3, (96, 192, 384)),
    ("dpm_solver_multistep", {"order": 2, "lower_order_final": False}, 2, (24, 48, 96, 192)),
    ("dpm_solver_multistep", {"order": 3, "lower_order_final": False}, 3, (24, 48, 96, 192)),
    ("dpm_solver_pp", {"order": 1}, 1, (12, 24, 48, 96)),
    ("dpm_solver_pp", {"order": 2, "lower_order_final": False}, 2, (12, 24, 48, 96)),
    ("dpm_solver_pp", {"order": 2, "lower_order_final": False, "solver_type": "heun"}, 2, (12, 24, 48, 96)),
    ("dpm_solver_pp", {"order": 3, "lower_order_final": False}, 3, (12, 24, 48, 96)),
    ("dpm_solver_pp_2s", {}, 2, (12, 24, 48, 96)),
    # the authors' third-order multistep weight (half the Taylor one) is only second order
    ("dpm_solver_pp", {"order": 3, "lower_order_final": False, "third_order_term": "reference"}, 2, (24, 48, 96, 192)),
    (
        "dpm_solver_multistep",
        {"order": 3, "lower_order_final": False, "third_order_term": "reference"},
        2,
        (24, 48, 96, 192),
    ),
]


@pytest.mark.parametrize(("name", "opts", "expected", "steps"), ORDERS, ids=lambda v: str(v))
def test_measured_order(name, opts, expected, steps):
    order, errs = measured_order(get(name, **opts), steps=steps)
    assert abs(order - expected) <= 0.3, f"{name} {opts}: measured {order:.2f} (errors {errs})"


# --- NFE accounting, grids into sigma = 0 -------------------------------------------------------
CONFIGS = [
    ("dpm_solver", {"order": 1}),
    ("dpm_solver", {"order": 2}),
    ("dpm_solver", {"order": 3}),
    ("dpm_solver_fast", {}),
    ("dpm_solver_fast", {"order": 2}),
    ("dpm_solver_fast", {"lower_order_final": False}),
    ("dpm_solver_multistep", {"order": 3}),
    ("dpm_solver_pp", {"order": 3}),
    ("dpm_solver_pp_2s", {}),
    ("sde_dpm_solver_pp", {"order": 3}),
]


@pytest.mark.parametrize(("name", "opts"), CONFIGS, ids=lambda v: str(v))
@pytest.mark.parametrize("steps", [1, 2, 5, 8])
def test_nfe_is_honest_and_steps_to_zero_are_finite(name, opts, steps):
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    solver = get(name, **opts)
    for ts in (uniform_time(sch, steps), uniform_time(sch, steps, t_end=0.0)):
        problem = Problem(model, sch, noise=SeededNoise(0, range(8)))
        out = sample(problem, _x(8, 16), ts, solver)
        assert problem.nfe == solver.nfe(ts, sch)
        assert bool(torch.isfinite(out).all())


@pytest.mark.parametrize(("name", "opts"), [("dpm_solver", {"order": 3}), ("dpm_solver_fast", {})])
def test_every_budget_is_reachable(name, opts):
    model = preset("gmm2d").denoiser(LinearVP())
    for nfe in range(1, 13):  # to t_min: multiples of 3; to sigma = 0 (the default): the last step is first order
        dpmlab.sample(model, 4, solver=name, nfe=nfe if name == "dpm_solver_fast" else 3 * nfe, to_zero=False, **opts)
        dpmlab.sample(model, 4, solver=name, nfe=nfe if name == "dpm_solver_fast" else 3 * nfe - 2, **opts)
    assert get("dpm_solver", order=3).nfe_for_steps(4, to_zero=True) == 10  # last step first order


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("dpm_solver", {"order": 3}),
        ("dpm_solver_multistep", {"order": 3}),
        ("dpm_solver_pp", {"order": 3}),
        ("dpm_solver_fast", {}),
    ],
)
def test_step_into_sigma_zero_is_alpha_x0(name, opts):
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    ts = karras(sch, 7, to_zero=True)
    infos = list(iterate(Problem(model, sch), _x(8, 16), ts, get(name, **opts)))
    x_prev = infos[-2].x
    assert (infos[-1].x - model(x_prev, torch.full((8,), float(ts[-2]), dtype=torch.float64))).abs().max() < 1e-12


def test_fast_order_lists():
    assert fast_orders(9, 3) == [3, 3, 2, 1]  # the paper's lists (NFE % 3 == 0, 1, 2)
    assert fast_orders(10, 3) == [3, 3, 3, 1]
    assert fast_orders(11, 3) == [3, 3, 3, 2]
    assert fast_orders(7, 2) == [2, 2, 2, 1]
    assert fast_orders(10, 3, lower_order_final=False) == [3, 3, 2, 2]
    assert fast_orders(11, 3, to_zero=True) == [3, 3, 3, 1, 1]
    for n in range(1, 30):
        for order in (2, 3):
            for lof in (True, False):
                for zero in (True, False):
                    orders = fast_orders(n, order, lower_order_final=lof, to_zero=zero)
                    assert sum(orders) == n and max(orders) <= order and (orders[-1] == 1 or not zero)


def test_lower_order_final_rule():
    """Below 15 steps the last multistep step is first order (here: equals a DDIM step)."""
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    x = _x(8, 16)
    for steps, lowered in ((8, True), (14, True), (15, False)):
        ts = uniform_time(sch, steps)
        infos = list(iterate(Problem(model, sch), x, ts, get("dpm_solver_pp", order=3)))
        ddim = sample(Problem(model, sch), infos[-2].x, ts[-2:], get("ddim"))
        assert bool((infos[-1].x - ddim).abs().max() < 1e-12) == lowered, steps


def test_inversion_round_trip():
    sch = LinearVP()
    mix = GaussianMixture([1.0], [[0.2, -0.3]], 0.7)
    model = mix.denoiser(sch)
    x0 = mix.sample_t(32, sch, sch.t_min, generator=torch.Generator().manual_seed(0))
    ts = uniform_lambda(sch, 40)
    noise = sample(Problem(model, sch), x0, ts.flip(0), get("dpm_solver_pp", order=2))
    back = sample(Problem(model, sch), noise, ts, get("dpm_solver_pp", order=2))
    assert rms(back, x0) < 1e-3


def test_options_are_validated():
    bad = [
        ("dpm_solver", {"order": 4}),
        ("dpm_solver", {"solver_type": "dpmsolver"}),
        ("dpm_solver", {"order": 2, "r2": 0.5}),
        ("dpm_solver", {"order": 3, "r1": 0.7, "r2": 0.5}),
        ("dpm_solver_fast", {"order": 1}),
        ("dpm_solver_multistep", {"order": 1}),
        ("dpm_solver_pp", {"order": 0}),
        ("dpm_solver_pp", {"third_order_term": "exact"}),
        ("dpm_solver_pp_2s", {"r1": 1.0}),
        ("sde_dpm_solver_pp", {"eta": -1.0}),
    ]
    for name, opts in bad:
        with pytest.raises(ValueError, match="allowed|must|need|no node"):
            get(name, **opts)


# --- SDE variants: moments of p0 --------------------------------------------------------------
@pytest.mark.parametrize("order", [1, 2, 3])
def test_sde_samples_match_p0_moments(order):
    mix = GaussianMixture(
        [1.0, 2.0, 1.0], [[-1.0, 0.5], [0.8, 0.8], [0.3, -1.2]], [[0.5, 0.3], [0.4, 0.6], [0.35, 0.45]]
    )
    sch = LinearVP()
    n = 2000
    problem = Problem(mix.denoiser(sch), sch, noise=SeededNoise(5, range(n)))
    out = sample(problem, _x(n, 2, seed=1), uniform_lambda(sch, 200), get("sde_dpm_solver_pp", order=order))
    mean, cov = mix.mean(), mix.cov()
    var = torch.diag(cov)
    assert ((out.mean(0) - mean) / (var / n).sqrt()).abs().max() < 4  # 4 standard errors
    se_cov = ((var[:, None] * var[None] + cov**2) / n).sqrt()
    assert ((torch.cov(out.T) - cov) / se_cov).abs().max() < 4


# --- adaptive DPM-Solver-12 / -23 -------------------------------------------------------------
@pytest.mark.parametrize("form", ["noise", "data"])
@pytest.mark.parametrize("order", [2, 3])
def test_adaptive_reaches_the_reference_and_saves_nfe_when_loose(form, order):
    mix, sch, x, ref = reference("smooth8")
    results = {}
    for tol in (1e-2, 1e-4):
        problem = Problem(mix.denoiser(sch), sch)
        res = solve_adaptive(problem, x, order=order, form=form, atol=tol, rtol=tol)
        assert res.nfe == problem.nfe
        assert res.ts[0] == sch.t_max and abs(float(res.ts[-1]) - sch.t_min) <= 1e-5
        results[tol] = (res.nfe, rms(res.x, ref))
        assert results[tol][1] < 2 * tol, (tol, results[tol])
    assert results[1e-2][0] < results[1e-4][0]
    default = solve_adaptive(Problem(mix.denoiser(sch), sch), x, order=order, form=form)
    assert default.nfe < results[1e-4][0] and rms(default.x, ref) < 2e-2


def test_adaptive_validates():
    sch = LinearVP()
    problem = Problem(preset("gmm2d").denoiser(sch), sch)
    with pytest.raises(ValueError, match="order"):
        solve_adaptive(problem, _x(2, 2), order=1)
    with pytest.raises(ValueError, match="sigma > 0"):
        solve_adaptive(problem, _x(2, 2), t_end=0.0)
    with pytest.raises(ValueError, match="form"):
        solve_adaptive(problem, _x(2, 2), form="eps")  # type: ignore[arg-type]


# --- shared exponential-integrator math (_expint) ---------------------------------------------
def test_phi_functions():
    for z in (-30.0, -2.0, -0.3, -1e-3, 0.0, 1e-3, 0.3, 2.0):
        exact = [(math.expm1(z)) / z if z else 1.0]
        for k in range(1, 4):
            exact.append((exact[-1] - 1 / math.factorial(k)) / z if abs(z) > 0.1 else None)
        for k in (1, 2, 3, 4):
            if exact[k - 1] is not None:
                assert phi(z, k) == pytest.approx(exact[k - 1], rel=1e-12)
            if abs(z) <= 2:  # the series converges without cancellation here
                series = sum(z**j / math.factorial(j + k) for j in range(40))
                assert phi(z, k) == pytest.approx(series, rel=1e-10)
    assert phi_data(0.5, 3) == phi(-0.5, 3) and phi_data(math.inf, 2) == 0.0


def test_taylor_weights_are_exact_on_polynomials():
    r = [0.0, -0.7, -1.9]
    w = taylor_weights(r)
    p = lambda u: 1.5 - 2.0 * u + 0.75 * u * u  # noqa: E731  (scaled: D0 = 1.5, D1 = -2, D2 = 1.5)
    d = [sum(w[j][i] * p(ri) for i, ri in enumerate(r)) for j in range(3)]
    assert d == pytest.approx([1.5, -2.0, 1.5], abs=1e-12)


def test_coefficients_into_sigma_zero():
    sch = LinearVP()
    c = interval(sch, uniform_time(sch, 4, t_end=0.0), 3)
    assert math.isinf(c.h)
    assert expint_coeffs(c, 1, "data") == (0.0, (c.alpha_next,))
    with pytest.raises(ValueError, match="order 1"):
        expint_coeffs(c, 2, "data")
    with pytest.raises(ValueError, match="data form"):
        expint_coeffs(c, 1, "noise", eta=1.0)
