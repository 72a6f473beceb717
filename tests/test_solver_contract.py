"""Registry-driven contract: every registered solver, with no per-solver edits.

Shape/dtype kept, exact declared NFE, determinism under a seed, sample i independent of the batch,
``iterate`` equals ``sample``, config round trip, and the measured convergence order of every
deterministic solver (within +-0.3 of its declared ``order``)."""

import dataclasses

import pytest
import torch
from oracles import CountingModel, ImageModel, measured_order

import dpmlab
from dpmlab.models.analytic import preset
from dpmlab.schedules import LinearVP
from dpmlab.solvers import Problem, available, get, iterate, sample, solver_class
from dpmlab.timesteps import karras, uniform_lambda

NAMES = available()
DETERMINISTIC = [n for n in NAMES if not get(n, **solver_class(n).order_test_options).is_stochastic()]


def test_registry_has_the_foundation_solvers():
    assert {"ddpm", "ddim", "euler", "heun"} <= set(NAMES)
    for n in NAMES:
        cls = solver_class(n)
        assert cls.paper, f"{n} must cite its paper"
        assert cls.evals_per_step >= 1 and get(n).order >= 1


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("to_zero", [False, True])
def test_shape_dtype_and_exact_nfe(name, dtype, to_zero):
    sch = LinearVP()
    model = CountingModel(ImageModel(sch))
    solver = get(name)
    ts = karras(sch, 6, to_zero=to_zero)
    x = torch.randn(3, 1, 4, 4, dtype=dtype, generator=torch.Generator().manual_seed(0))
    problem = Problem(model, sch, noise=dpmlab.solvers.SeededNoise(0, range(3)))
    out = sample(problem, x, ts, solver)
    assert out.shape == x.shape and out.dtype == dtype
    assert bool(torch.isfinite(out).all())
    assert model.calls == solver.nfe(ts, sch) == problem.nfe


@pytest.mark.parametrize("name", NAMES)
def test_seeded_determinism_and_batch_independence(name):
    model = preset("gmm16").denoiser(LinearVP())
    kw = dict(solver=name, nfe=get(name).nfe_for_steps(5, True), seed=11)  # the default grid ends at sigma = 0
    a = dpmlab.sample(model, 64, **kw)
    b = dpmlab.sample(model, 64, **kw)
    c = dpmlab.sample(model, 64, batch_size=1, **kw)
    assert torch.equal(a, b)
    assert torch.allclose(a, c, atol=1e-6, rtol=0)  # same noise per sample, whatever the batch size
    d = dpmlab.sample(model, 64, **{**kw, "seed": 12})
    assert not torch.allclose(a, d)


@pytest.mark.parametrize("name", NAMES)
def test_iterate_equals_sample_and_config_round_trip(name):
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    solver = get(name)
    ts = uniform_lambda(sch, 5)
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    noise = dpmlab.solvers.SeededNoise(3, range(8))
    out = sample(Problem(model, sch, noise=noise), x, ts, solver)
    infos = list(iterate(Problem(model, sch, noise=noise), x, ts, solver))
    assert [i.i for i in infos] == list(range(5))
    assert torch.equal(infos[-1].x, out)
    cfg = solver.config()
    assert cfg["name"] == name
    assert get(**cfg) == solver
    assert set(cfg) - {"name"} == {f.name for f in dataclasses.fields(solver)}


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_measured_convergence_order(name):
    solver = get(name, **solver_class(name).order_test_options)
    order, errs = measured_order(solver)
    assert abs(order - solver.order) <= 0.3, f"{name}: measured order {order:.2f} (errors {errs})"


# Time-Shift and DualFast correct a *model* error: on an exact model their correction does not vanish with
# the step (measured default orders 0.04 and -0.61), so they are measured with a model error in
# test_time_shift.py / test_dualfast.py, not here.
MODEL_ERROR_CORRECTORS = {"time_shift", "dualfast"}
DEFAULT_DIFFERS = [
    n
    for n in DETERMINISTIC
    if n not in MODEL_ERROR_CORRECTORS
    and not get(n).is_stochastic()
    and get(n, **solver_class(n).order_test_options) != get(n)
]


@pytest.mark.parametrize("name", DEFAULT_DIFFERS)
def test_measured_convergence_order_in_the_default_configuration(name):
    """What a user gets: the default options reach at least the declared order (band -0.3, the registry
    contract's) and at most +0.8 above it (pre-asymptotic super-convergence on 12-96 steps: measured
    DPM-Solver-v3 3.72, DPM-Solver-fast 3.48, DPM-Solver-3 3.33; lower_order_final defaults lose <= 0.3)."""
    solver = get(name)
    order, errs = measured_order(solver)
    assert solver.order - 0.3 <= order <= solver.order + 0.8, f"{name}: default order {order:.2f} (errors {errs})"


# time_shift evaluates at a data-dependent shifted time by design (its docs), not at (x_i, t_i)
@pytest.mark.parametrize("name", [n for n in NAMES if not get(n).is_stochastic() and n != "time_shift"])
def test_a_step_without_a_pending_output_first_evaluates_at_its_start(name):
    """The wrapper protocol's written rule (``Solver.pending_output``): when it returns None, the step's
    FIRST model call is at ``(x_i, t_i)``; otherwise the step makes no call there (it reuses that output).
    Wrappers (DC-Solver, DualFast, UniC) rely on exactly this. (Heun recomputes x as alpha (x / alpha):
    equal to round-off.)"""
    sch = LinearVP()
    inner = ImageModel(sch)
    calls = []

    def model(x, t, **c):
        calls.append((x.clone(), t.clone()))
        return inner(x, t, **c)

    solver = get(name)
    ts = karras(sch, 6)
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    problem = Problem(model, sch)
    state = solver.init(problem, x, ts)
    for i in range(len(ts) - 1):
        pending = solver.pending_output(state)
        calls.clear()
        x_next, state = solver.step(problem, x, ts, i, state)
        at_start = [
            k
            for k, (xx, tt) in enumerate(calls)
            if torch.allclose(xx, x, rtol=0, atol=1e-12) and bool(((tt - ts[i]).abs() < 1e-12).all())
        ]
        if pending is None:
            assert calls and at_start[:1] == [0], (name, i)
        else:
            assert not at_start, (name, i)
        x = x_next
