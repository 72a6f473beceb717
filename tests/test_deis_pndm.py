"""DEIS (Zhang & Chen 2022) and the PNDM family (Liu et al. 2022; PLMS; iPNDM): identities,
convergence orders, NFE, dtypes/shapes."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import CountingModel, check_image_sampling, measured_order, reference, rms, slope

import dpmlab.solvers as S
from dpmlab.models.analytic import preset
from dpmlab.schedules import LinearVP
from dpmlab.solvers._expint import interval
from dpmlab.timesteps import uniform_lambda, uniform_time

torch.set_num_threads(1)
SCH = LinearVP()
T_END = 1e-3
PNDMS = ("pndm", "s_pndm", "plms", "ipndm")
# 100 samples, reference solved to rtol = atol = 1e-12, lambda-uniform grids ending at T_END
ORACLE = dict(name="smooth4x8", n=100, t_end=T_END, tol=1e-12)


@pytest.mark.parametrize("variant", ["t", "rho", "logrho"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_convergence_order(order: int, variant: str) -> None:
    solver = S.get("deis", order=order, variant=variant, **S.solver_class("deis").order_test_options)
    ns = (64, 128, 256, 512) if order >= 3 else (32, 64, 128, 256)
    measured, errs = measured_order(solver, ns, **ORACLE)
    assert abs(measured - order) <= 0.3, f"DEIS-{order} ({variant}): measured {measured:.2f} ({errs})"


@pytest.mark.parametrize("name", PNDMS)
def test_pndm_family_is_second_order(name: str) -> None:
    solver = S.get(name)
    assert solver.order == 2
    measured, errs = measured_order(solver, (32, 64, 128, 256), **ORACLE)
    assert abs(measured - 2) <= 0.3, f"{name}: measured {measured:.2f} ({errs})"


@pytest.mark.parametrize("name", ["pndm", "plms"])
def test_pndm_fourth_order_on_a_grid_uniform_in_rho(name: str) -> None:
    """The AB4 weights average eps per step index; the transfer integrates it in rho = sigma/alpha:
    on a rho-uniform grid the two agree and PLMS/F-PNDM are fourth order (the reason for order = 2)."""
    t0, t1 = 0.5, 0.05
    mix, _, x, ref = reference("smooth4x8", 100, t_start=t0, t_end=t1, tol=1e-12)
    model = mix.denoiser(SCH)
    r0, r1 = float(SCH.sigma_over_alpha(t0)), float(SCH.sigma_over_alpha(t1))
    ns, errs = (16, 32, 64), []
    for n in ns:
        ts = SCH.t_of_sigma_over_alpha(torch.linspace(r0, r1, n + 1, dtype=torch.float64))
        ts[0], ts[-1] = t0, t1
        errs.append(rms(S.sample(S.Problem(model, SCH), x, ts, S.get(name)), ref))
    assert abs(slope(ns, errs) - 4) <= 0.3


@pytest.mark.parametrize("t_end", [SCH.t_min, 0.0])
def test_first_order_members_are_ddim(t_end: float) -> None:
    model = preset("gmm16").denoiser(SCH)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for ts in (uniform_time(SCH, 10, t_end=t_end), uniform_lambda(SCH, 7, t_end=t_end)):
        ddim = S.sample(S.Problem(model, SCH), x, ts, S.get("ddim"))
        for variant in ("t", "rho", "logrho"):
            deis = S.sample(S.Problem(model, SCH), x, ts, S.get("deis", order=1, variant=variant))
            assert float((deis - ddim).abs().max()) < 1e-10
        one = S.sample(S.Problem(model, SCH), x, ts[:2], S.get("ipndm"))  # iPNDM's first step is DDIM
        assert float((one - S.sample(S.Problem(model, SCH), x, ts[:2], S.get("ddim"))).abs().max()) < 1e-10


def test_plms_and_s_pndm_share_their_first_two_steps() -> None:
    model = preset("gmm16").denoiser(SCH)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ts = uniform_time(SCH, 2)
    a = S.sample(S.Problem(model, SCH), x, ts, S.get("plms"))
    b = S.sample(S.Problem(model, SCH), x, ts, S.get("s_pndm"))
    assert float((a - b).abs().max()) < 1e-12
    ts = uniform_time(SCH, 3)  # the third step is AB3 for PLMS, AB2 for S-PNDM
    a = S.sample(S.Problem(model, SCH), x, ts, S.get("plms"))
    b = S.sample(S.Problem(model, SCH), x, ts, S.get("s_pndm"))
    assert float((a - b).abs().max()) > 1e-8


def test_deis_weights() -> None:
    """Lagrange weights sum to rho_next - rho; logrho order 2 matches diffusers' closed form."""
    ts = uniform_lambda(SCH, 6)
    problem = S.Problem(preset("gmm16").denoiser(SCH), SCH)
    c_prev, c = interval(SCH, ts, 1), interval(SCH, ts, 2)
    rho = [math.exp(-c_prev.lam), math.exp(-c.lam), math.exp(-c.lam_next)]  # rho_s1, rho_s0, rho_t
    for variant, us in [("t", (c_prev.t, c.t)), ("rho", tuple(rho[:2])), ("logrho", (-c_prev.lam, -c.lam))]:
        w = S.get("deis", variant=variant).weights(problem, c, us)
        assert abs(sum(w) - (rho[2] - rho[1])) < 1e-12 * abs(rho[2] - rho[1])

    def ind_fn(t: float, b: float, cc: float) -> float:  # int (log t - log c) / (log b - log c) dt
        return t * (-math.log(cc) + math.log(t) - 1) / (math.log(b) - math.log(cc))

    s1, s0, t = rho
    closed = [ind_fn(t, s1, s0) - ind_fn(s0, s1, s0), ind_fn(t, s0, s1) - ind_fn(s0, s0, s1)]  # oldest first
    w = S.get("deis", variant="logrho").weights(problem, c, (-c_prev.lam, -c.lam))
    assert max(abs(a - b) for a, b in zip(w, closed)) < 1e-12


EXPECTED_NFE = {  # (steps, to_zero) -> evaluations
    "pndm": lambda n, z: 4 * min(n, 3) + max(n - 3, 0) - (3 if z and n <= 3 else 0),
    "s_pndm": lambda n, z: n + 1 - (1 if z and n == 1 else 0),
    "plms": lambda n, z: n + 1 - (1 if z and n == 1 else 0),
    "ipndm": lambda n, z: n,
    "deis": lambda n, z: n,
}


@pytest.mark.parametrize("to_zero", [False, True])
@pytest.mark.parametrize("name", list(EXPECTED_NFE))
def test_model_called_exactly_declared_times(name: str, to_zero: bool) -> None:
    solver = S.get(name)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for n in (1, 2, 3, 4, 7):
        counting = CountingModel(preset("gmm16").denoiser(SCH))
        ts = uniform_lambda(SCH, n, t_end=0.0 if to_zero else SCH.t_min)
        S.sample(S.Problem(counting, SCH), x, ts, solver)
        assert counting.calls == solver.nfe(ts, SCH) == EXPECTED_NFE[name](n, to_zero)
    assert solver.nfe_for_steps(50, False) == {"pndm": 59, "s_pndm": 51, "plms": 51}.get(name, 50)


@pytest.mark.parametrize("name, opts", [("deis", {}), ("deis", dict(variant="logrho")), *[(n, {}) for n in PNDMS]])
def test_dtypes_and_shapes(name: str, opts: dict) -> None:
    check_image_sampling(S.get(name, **opts), SCH)


def test_options_are_validated() -> None:
    for bad, word in [(dict(variant="lambda"), "lambda"), (dict(order=0), "0"), (dict(order=5), "5")]:
        with pytest.raises(ValueError, match=word):
            S.get("deis", **bad)
    with pytest.raises(ValueError, match="no option"):
        S.get("pndm", order=3)
