"""Fitting DC-Solver's compensation ratios and their cascade polynomial regression (Zhao et al.,
"DC-Solver: Improving Predictor-Corrector Diffusion Sampler via Dynamic Compensation", ECCV 2024,
arXiv 2409.03755, Sec. 3.3 and 3.4).

``fit_dc_ratios``: for ``n_datapoints`` starting noises (paper: 10) the ground-truth trajectory is the
float64 reference PF-ODE solution integrated grid point to grid point. Ratios are chosen greedily step
by step along the compensated trajectory: ``rho_i`` minimises

    || step_i(x_i; rho_i) - x_gt(t_{i+1}) ||^2           (predictor + its corrector for UniPC)

by one of two methods (``method``):

* ``"adamw"`` — the authors' (``find_optim_ratio``): AdamW, lr 0.1, from ``rho = 1``, unbounded, the last
  iterate after ``iters`` iterations (their diffusers scheduler: 20; their LDM code: 40); the gradient
  flows through the base step and the model (the model must be differentiable);
* ``"bounded"`` — a derivative-free 1-D search (a scan over ``bounds`` then bounded Brent), which
  never returns a ratio worse than ``rho = 1`` on the fitting data; the range (0.5, 1.5) is the diffusers
  port's ``tanh`` bound — the authors' own CPR predicts ratios down to 0.44 (NFE 10, CFG 7.5).

Which is better is measured in docs/methods/dc_solver.md (held-out noise); the default is the winner.
Their ground truth is a 200- or 999-step DDIM run at the nearest time; ours is the exact ODE at the
grid times. The result records the grid, NFE, base and method (``DCRatios.check`` on use).

``fit_cpr``: least squares for the ``9 (degree + 1)`` coefficients of the cascade polynomial
(``CPRModel``; the authors' released file: degree 3) over the ratios fitted on a grid of (steps,
guidance scale); the authors fit the same polynomial with ``curve_fit``. ``fit_cpr_grid`` runs the
whole pipeline.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ..models.reference import reference_solution
from ..schedules import NoiseSchedule
from ..solvers.base import Problem, Solver
from ..solvers.dc_solver import CPRModel, DCRatios, DynamicCompensation, cpr_features
from ..timesteps import make_grid
from ..typing import DenoiserFn

__all__ = ["fit_dc_ratios", "fit_cpr", "fit_cpr_grid", "ground_truth", "FIT_METHODS"]

FIT_METHODS = ("bounded", "adamw")


def ground_truth(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    x: Tensor,
    ts: Tensor,
    *,
    tol: float = 1e-10,
    cond: Mapping[str, Any] | None = None,
) -> list[Tensor]:
    """Reference states at every grid time ``ts[k]`` from ``x`` at ``ts[0]`` (float64); ``cond``: the model's
    keyword conditioning."""
    out = [x.double()]
    for k in range(1, len(ts)):
        out.append(
            reference_solution(
                model, schedule, out[-1], float(ts[k - 1]), float(ts[k]), rtol=tol, atol=tol, cond=dict(cond or {})
            ).x
        )
    return out


def _minimise(loss: Callable[[float], float], bounds: tuple[float, float], scan: int, xatol: float) -> float:
    """Scan (including 1) then refine by bounded Brent around the best point; the best value found."""
    from scipy.optimize import minimize_scalar

    lo, hi = bounds
    grid = sorted({*torch.linspace(lo, hi, scan).tolist(), 1.0})
    vals = [loss(r) for r in grid]
    k = min(range(len(grid)), key=vals.__getitem__)
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, len(grid) - 1)]
    best, f_best = grid[k], vals[k]
    if b > a:
        res = minimize_scalar(loss, bounds=(a, b), method="bounded", options={"xatol": xatol})
        if float(res.fun) < f_best:
            best = float(res.x)
    return best


def fit_dc_ratios(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    solver: Solver[Any],
    nfe: int,
    n_datapoints: int = 10,
    *,
    grid: str = "uniform_time",
    to_zero: bool = True,
    ts: Tensor | None = None,
    shape: tuple[int, ...] | None = None,
    dc_order: int = 2,
    bounds: tuple[float, float] = (0.5, 1.5),
    scan: int = 11,
    xatol: float = 1e-4,
    seed: int = 0,
    guidance: float = 1.0,
    model_name: str = "",
    ref_tol: float = 1e-10,
    method: str = "bounded",
    lr: float = 0.1,
    iters: int = 20,
    noise: Tensor | None = None,
    cond: Mapping[str, Any] | None = None,
) -> DCRatios:
    """Per-step ratios ``rho_i`` of ``DynamicCompensation(solver)`` at budget ``nfe`` on ``grid`` (or the
    given ``ts``), fitted on ``n_datapoints`` seeded starting noises of shape ``shape`` (default: the
    model's ``data_shape``) by ``method`` ("bounded" search in ``bounds`` or the authors' unbounded
    "adamw" with ``lr``, ``iters``). ``guidance`` and ``model_name`` are recorded in the artifact.
    ``noise``: the ``n_datapoints`` start states at ``ts[0]`` to fit on instead of the seeded draw (e.g. a
    recipe's ``calibration_noise`` fit set); ``cond``: the model's keyword conditioning (per-sample values
    with ``n_datapoints`` rows), used for the ground truth and the fit alike."""
    if method not in FIT_METHODS:
        raise ValueError(f"unknown method {method!r}; allowed: {', '.join(FIT_METHODS)}")
    if not (isinstance(iters, int) and iters >= 1 and lr > 0):
        raise ValueError(f"need iters >= 1 (int) and lr > 0, got iters={iters!r}, lr={lr!r}")
    base = solver.base if isinstance(solver, DynamicCompensation) else solver
    dc = DynamicCompensation(base, None, dc_order)
    if ts is None:
        ts = make_grid(schedule, grid, dc.steps_for_nfe(nfe, to_zero), to_zero=to_zero)
    elif dc.nfe(ts, schedule) != nfe:
        raise ValueError(f"the given grid costs {dc.nfe(ts, schedule)} evaluations, not nfe={nfe}")
    if method == "bounded" and not bounds[0] < 1.0 < bounds[1]:
        raise ValueError(f"bounds must contain 1 strictly inside, got {bounds}")
    shape = shape or getattr(model, "data_shape", None)
    if shape is None:
        raise ValueError("pass shape=: the model has no data_shape")
    if noise is None:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n_datapoints, *shape, dtype=torch.float64, generator=g) * float(schedule.sigma(ts[:1]))
    elif tuple(noise.shape) != (n_datapoints, *shape):
        raise ValueError(
            f"noise must have shape {(n_datapoints, *shape)} (n_datapoints, *shape), got {tuple(noise.shape)}"
        )
    else:
        x = noise.double()
    cond = dict(cond or {})
    gt = ground_truth(model, schedule, x, ts, tol=ref_tol, cond=cond)  # looser for networks: it dominates the cost
    problem = Problem(model, schedule, cond=cond)
    steps = len(ts) - 1
    ratios = [1.0] * steps
    state = dc.init(problem, x, ts)
    for i in range(steps):
        if i >= dc_order:
            if method == "bounded":

                def loss(r: float, i: int = i, x: Tensor = x, state: Any = state) -> float:
                    x_next, _ = dc.step_with(problem, x, ts, i, state, r)
                    return float((x_next - gt[i + 1]).pow(2).mean())

                ratios[i] = _minimise(loss, bounds, scan, xatol)
            else:
                ratios[i] = _adamw(dc, problem, x, ts, i, state, gt[i + 1], lr, iters)
        x, state = dc.step_with(problem, x, ts, i, state, ratios[i])
        x = x.detach()
    return DCRatios(
        tuple(ratios),
        dc_order,
        float(guidance),
        model_name,
        json.dumps(base.config()),
        tuple(float(t) for t in ts),
        dc.nfe(ts, schedule),
        method,
    )


def _adamw(
    dc: DynamicCompensation,
    problem: Problem,
    x: Tensor,
    ts: Tensor,
    i: int,
    state: Any,
    target: Tensor,
    lr: float,
    iters: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> float:
    """The authors' ratio search: AdamW (Loshchilov & Hutter; torch's defaults) on the unbounded ``rho``
    from 1, the last iterate. Written out for one scalar: ``torch.optim`` costs seconds to import."""
    rho, m, v = 1.0, 0.0, 0.0
    for k in range(1, iters + 1):
        r = torch.tensor(rho, dtype=torch.float64, requires_grad=True)
        with torch.enable_grad():
            x_next, _ = dc.step_with(problem, x, ts, i, state, r)
            (g,) = torch.autograd.grad((x_next - target).pow(2).mean(), r)
        g_f = float(g)
        rho *= 1.0 - lr * weight_decay  # decoupled weight decay
        m = betas[0] * m + (1 - betas[0]) * g_f
        v = betas[1] * v + (1 - betas[1]) * g_f * g_f
        rho -= lr / (1 - betas[0] ** k) * m / (math.sqrt(v / (1 - betas[1] ** k)) + eps)
    if not math.isfinite(rho):
        raise FloatingPointError(f"the AdamW ratio fit diverged at step {i}")
    return rho


def fit_cpr(
    fits: Sequence[DCRatios],
    *,
    degree: int = 3,
    cfg_scale: float = 12.0,
    nfe_scale: float = 50.0,
    ridge: float = 0.0,
    model_name: str = "",
) -> CPRModel:
    """Least-squares CPR coefficients reproducing ``fits`` (ratios at several step counts and guidance
    scales; all with the same ``dc_order``), of ``degree`` in the step fraction (the authors' file: 3).
    With too few distinct settings the minimum-norm solution is returned; ``ridge > 0`` adds Tikhonov
    damping."""
    if not isinstance(degree, int) or degree < 0:
        raise ValueError(f"degree must be an int >= 0, got {degree!r}")
    if not fits:
        raise ValueError("fit_cpr needs at least one DCRatios")
    orders = {f.dc_order for f in fits}
    if len(orders) != 1:
        raise ValueError(f"all fits must share one dc_order, got {sorted(orders)}")
    k = orders.pop()
    rows, target = [], []
    for f in fits:
        for i in range(k, len(f.ratios)):
            rows.append(cpr_features(len(f.ratios), f.guidance, i, degree, cfg_scale, nfe_scale))
            target.append(f.ratios[i])
    if not rows:
        raise ValueError(f"no step with i >= dc_order={k} in the fits: nothing to regress")
    a = torch.tensor(rows, dtype=torch.float64)
    b = torch.tensor(target, dtype=torch.float64)
    if ridge > 0:
        p = a.shape[1]
        a = torch.cat([a, ridge**0.5 * torch.eye(p, dtype=torch.float64)])
        b = torch.cat([b, torch.zeros(p, dtype=torch.float64)])
    coeffs = torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0]
    return CPRModel(tuple(coeffs.tolist()), k, cfg_scale, nfe_scale, model_name)


def fit_cpr_grid(
    make_model: Callable[[float], DenoiserFn],
    schedule: NoiseSchedule,
    solver: Solver[Any],
    nfes: Sequence[int],
    guidances: Sequence[float],
    *,
    ridge: float = 0.0,
    degree: int = 3,
    **fit_kwargs: Any,
) -> tuple[CPRModel, list[DCRatios]]:
    """Fit ratios at every (nfe, guidance) with ``make_model(guidance)``, then CPR over all of them."""
    fits = [
        fit_dc_ratios(make_model(w), schedule, solver, n, guidance=w, **fit_kwargs) for n in nfes for w in guidances
    ]
    return fit_cpr(fits, degree=degree, ridge=ridge, model_name=fit_kwargs.get("model_name", "")), fits
