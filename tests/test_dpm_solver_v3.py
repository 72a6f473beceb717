"""DPM-Solver-v3 (Zheng et al. 2023): degenerate statistics = DPM-Solver++ / DPM-Solver, the EMS
integrals, the EMS artifact (round trip, corrupt and mismatched files), fit_ems on the analytic
mixtures, convergence orders, honest NFE, the half-corrector."""

from __future__ import annotations

import json
import math

import pytest
import torch
from oracles import measured_order

import dpmlab.solvers as S
from dpmlab.calibrate.ems import fit_ems
from dpmlab.models.analytic import preset
from dpmlab.schedules import DiscreteVP, LinearVP
from dpmlab.solvers.dpm_solver_v3 import EMS, _Coeffs
from dpmlab.timesteps import karras, uniform_lambda, uniform_time

torch.set_num_threads(1)
SCH = DiscreteVP.from_preset("linear")
MODEL = preset("gmm16").denoiser(SCH)
X = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
GRIDS = {
    "lambda": uniform_lambda(SCH, 7),
    "karras-to-zero": karras(SCH, 9, to_zero=True),
    "time-to-zero": uniform_time(SCH, 6, t_end=0.0),
}


def run(solver: S.Solver, ts: torch.Tensor, model=MODEL, sch=SCH) -> torch.Tensor:
    return S.sample(S.Problem(model, sch), X * float(sch.sigma(ts[0])), ts, solver)


def constant_ems(l: float, s: float, b: float, knots: int = 50) -> EMS:
    lam = torch.linspace(float(SCH.lam(SCH.t_max)), float(SCH.lam(SCH.t_min)), knots, dtype=torch.float64)
    full = lambda v: torch.full((knots, 16), v, dtype=torch.float64)  # noqa: E731
    return EMS(lam, full(l), full(s), full(b), model="const")


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("lof", [True, False])
def test_data_degenerate_is_dpm_solver_pp(grid, order, lof):
    """l = 1, s = b = 0: DPM-Solver++ multistep (Taylor second-order coefficient, i.e. solver_type heun)."""
    ts = GRIDS[grid]
    v3 = run(S.get("dpm_solver_v3", order=order, use_corrector=False, lower_order_final=lof), ts)
    pp = run(S.get("dpm_solver_pp", order=order, solver_type="heun", lower_order_final=lof), ts)
    assert float((v3 - pp).abs().max()) < 1e-8


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("order", [2, 3])
def test_noise_degenerate_is_dpm_solver(grid, order):
    """l = 0, s = -1, b = 0 (paper App. A): DPM-Solver multistep in noise form; also as an EMS on knots."""
    ts = GRIDS[grid]
    ref = run(S.get("dpm_solver_multistep", order=order, solver_type="heun"), ts)
    for solver in (
        S.get("dpm_solver_v3", degenerate="noise", order=order, use_corrector=False),
        S.get("dpm_solver_v3", ems=constant_ems(0.0, -1.0, 0.0), order=order, use_corrector=False),
    ):
        assert float((run(solver, ts) - ref).abs().max()) < 1e-8
    # s = 0 instead of -1 expands e^{-lam} eps, not eps: a different (worse) solver
    other = run(S.get("dpm_solver_v3", ems=constant_ems(0.0, 0.0, 0.0), order=order, use_corrector=False), ts)
    assert float((other - ref).abs().max()) > 1e-3


def test_first_order_is_ddim():
    ts = GRIDS["lambda"]
    ddim = run(S.get("ddim"), ts)
    for kind in ("data", "noise"):
        assert float((run(S.get("dpm_solver_v3", degenerate=kind, order=1), ts) - ddim).abs().max()) < 1e-8


def test_integrals_match_fine_trapezoid():
    """E_k, Eb, ΔL, ΔS, β for random piecewise-linear l, s, b against a fine trapezoid rule."""
    g = torch.Generator().manual_seed(1)
    lam = torch.linspace(-3.0, 3.0, 13, dtype=torch.float64)
    co = _Coeffs(lam, *(torch.randn(13, 2, generator=g, dtype=torch.float64) * 0.7 for _ in range(3)))
    lam_s, lam_t, other = -0.37, 1.91, -1.52
    dL, E, Eb, dS, beta = co.integrals(lam_s, lam_t, [other], 2)
    n, i_s = 343_000, 115_000  # u[i_s] = lam_s
    u = torch.linspace(other, lam_t, n + 1, dtype=torch.float64)
    assert abs(float(u[i_s]) - lam_s) < 1e-12
    v = co.at(u)  # (n + 1, 3, 2): l, s, b

    def cum(y):  # trapezoid ∫_{lam_s}^{u} y
        c = torch.cat([torch.zeros_like(y[:1]), ((y[1:] + y[:-1]) / 2 * (u[1] - u[0])).cumsum(0)])
        return c - c[i_s]

    L, Sc = cum(v[:, 0]), cum(v[:, 1])
    bet = cum(torch.exp(-Sc) * v[:, 2])
    w = torch.exp(L + Sc)
    for k in range(3):
        want = cum(w * ((u - lam_s) ** k)[:, None])[-1] / math.factorial(k)
        assert torch.allclose(E[k], want, rtol=1e-8, atol=1e-10)
    assert torch.allclose(Eb, cum(w * bet)[-1], rtol=1e-8, atol=1e-10)
    assert torch.allclose(dL, L[-1], rtol=1e-10, atol=1e-12)
    assert torch.allclose(dS[0], Sc[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(beta[0], bet[0], rtol=1e-8, atol=1e-10)


# --- the EMS artifact --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ems16() -> EMS:
    mix = preset("gmm16")
    x0 = mix.sample(128, generator=torch.Generator().manual_seed(1))
    return fit_ems(MODEL, SCH, x0, n_points=128, grid_size=40, model_name="gmm16")


def test_fit_ems_on_the_mixture(ems16):
    assert ems16.lam.shape == (41,) and ems16.l.shape == ems16.s.shape == ems16.b.shape == (41, 16)
    assert all(bool(torch.isfinite(getattr(ems16, k)).all()) for k in "lsb")
    l = ems16.l.mean(1)
    assert abs(float(l[0]) - 1) < 0.02 and abs(float(l[-1])) < 0.05  # data prediction -> noise prediction
    assert ems16.model == "gmm16" and ems16.n_points == 128 and ems16.schedule == repr(SCH)


def test_fit_ems_l_is_exact_for_a_diagonal_gaussian():
    """Diagonal Jacobian: the Rademacher estimate of its diagonal is exact, l = sigma^2 / (alpha^2 tau^2 + sigma^2)."""
    mix = preset("gauss16")
    x0 = mix.sample(16, generator=torch.Generator().manual_seed(2))
    ems = fit_ems(mix.denoiser(SCH), SCH, x0, n_points=16, grid_size=10)
    t = SCH.t_of_lambda(ems.lam)[:, None]
    a2, s2 = SCH.alpha(t) ** 2, SCH.sigma(t) ** 2
    assert torch.allclose(ems.l, s2 / (a2 * mix.stds**2 + s2), atol=1e-10, rtol=0)


def test_fit_ems_from_trajectories_agrees_with_data(ems16):
    noise = torch.randn(128, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    traj = fit_ems(MODEL, SCH, noise, n_points=128, grid_size=40, source="noise", model_name="gmm16")
    assert torch.allclose(traj.l.mean(1), ems16.l.mean(1), atol=0.05)  # same marginals for an exact model


def test_ems_round_trip_and_config(tmp_path, ems16):
    path = tmp_path / "gmm16.ems.safetensors"
    ems16.save(path)
    back = EMS.load(path, model="gmm16")
    assert back == ems16 and back.grid_size == 40 and back.guidance_scale is None
    solver = S.get("dpm_solver_v3", ems=str(path))
    cfg = solver.config()
    assert json.loads(json.dumps(cfg)) == cfg and S.get(**cfg) == solver
    mem = S.get("dpm_solver_v3", ems=ems16)
    assert S.get(**mem.config()) == mem
    ts = uniform_lambda(SCH, 6, t_end=0.0)
    assert torch.equal(run(solver, ts), run(mem, ts))


def test_ems_errors(tmp_path, ems16):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable EMS"):
        EMS.load(bad)
    path = tmp_path / "e.safetensors"
    ems16.save(path)
    with pytest.raises(ValueError, match="'gmm16'.*'gmm64'"):
        EMS.load(path, model="gmm64")
    from safetensors.torch import save_file

    save_file({"lam": ems16.lam, "l": ems16.l}, str(bad), metadata={"format": "dpmlab.ems/1"})
    with pytest.raises(ValueError, match="tensors"):
        EMS.load(bad)
    save_file({k: getattr(ems16, k) for k in ("lam", "l", "s", "b")}, str(bad), metadata={"format": "other/9"})
    with pytest.raises(ValueError, match="format"):
        EMS.load(bad)
    nan = ems16.s.clone()
    nan[3, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        EMS(ems16.lam, ems16.l, nan, ems16.b)
    with pytest.raises(ValueError, match="one shape"):
        EMS(ems16.lam, ems16.l, ems16.s[:, :3], ems16.b)
    with pytest.raises(ValueError, match="increasing"):
        EMS(ems16.lam.flip(0), ems16.l, ems16.s, ems16.b)
    with pytest.raises(ValueError, match="outside the EMS range"):
        run(S.get("dpm_solver_v3", ems=ems16), uniform_lambda(SCH, 5, t_start=1.0, t_end=1e-4))
    with pytest.raises(ValueError, match="degenerate"):
        S.get("dpm_solver_v3", ems=ems16, degenerate="data")
    with pytest.raises(ValueError, match="order"):
        S.get("dpm_solver_v3", order=5)


# --- orders, NFE, corrector ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts, order, steps",
    [
        (dict(), 3, (24, 48, 96, 192)),  # predictor 3 + corrector 3 (pre-asymptotically ~3.5)
        (dict(order=2, use_corrector=False), 2, (12, 24, 48, 96)),
        (dict(pseudo_order=True, use_corrector=False), 2, (24, 48, 96, 192)),  # pseudo order 3 -> 2
        (dict(corrector_pseudo=True), 2, (24, 48, 96, 192)),
        (dict(degenerate="noise"), 3, (24, 48, 96, 192)),
    ],
    ids=lambda v: str(v),
)
def test_measured_convergence_order(opts, order, steps):
    slope, errs = measured_order(S.get("dpm_solver_v3", lower_order_final=False, **opts), steps=steps)
    assert order - 0.3 <= slope <= order + 0.6, f"{opts}: slope {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("to_zero", [False, True])
def test_honest_nfe_with_corrector(ems16, to_zero):
    calls = []

    def model(x, t, **c):
        calls.append(1)
        return MODEL(x, t)

    ts = uniform_lambda(SCH, 7, t_end=0.0 if to_zero else None)
    solver = S.get("dpm_solver_v3", ems=ems16, corrector_pseudo=True)
    out = run(solver, ts, model=model)
    assert len(calls) == 7 == solver.nfe(ts, SCH) and bool(torch.isfinite(out).all())


def test_half_corrector_acts_only_above_half_t_max():
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    full, half, none = (S.get("dpm_solver_v3", **o) for o in ({}, {"half_corrector": True}, {"use_corrector": False}))
    late = uniform_lambda(sch, 6, t_start=0.5)  # every point t <= 0.5
    assert torch.equal(run(half, late, model, sch), run(none, late, model, sch))
    early = uniform_lambda(sch, 6)
    assert not torch.allclose(run(half, early, model, sch), run(none, early, model, sch))
    assert not torch.allclose(run(half, early, model, sch), run(full, early, model, sch))


def test_fitted_first_order_beats_ddim(ems16):
    """App. G.2: DPM-Solver-v3-1 with the model's EMS is an improved DDIM."""
    from dpmlab.models.reference import reference_solution

    ts = uniform_lambda(SCH, 8, t_end=SCH.t_min)
    ref = reference_solution(MODEL, SCH, X * float(SCH.sigma(ts[0])), float(ts[0]), float(ts[-1])).x
    err = lambda s: float((run(s, ts) - ref).pow(2).mean().sqrt())  # noqa: E731
    assert err(S.get("dpm_solver_v3", ems=ems16, order=1)) < 0.9 * err(S.get("ddim"))
