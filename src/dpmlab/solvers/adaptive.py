"""Adaptive step-size DPM-Solver (DPM-Solver-12 and DPM-Solver-23) — Lu et al., "DPM-Solver: A Fast ODE
Solver for Diffusion Probabilistic Model Sampling in Around 10 Steps", NeurIPS 2022, arXiv 2206.00927 (its
adaptive step-size schedule); the data form is the DPM-Solver++ variant (arXiv 2211.01095).

Not a fixed-grid ``Solver``: the driver ``solve_adaptive`` chooses its own steps in ``lam`` and reports
the evaluations it used. An embedded pair shares its evaluations: DPM-Solver-12 = DPM-Solver-1 inside
DPM-Solver-2 (``r1 = 1/2``), DPM-Solver-23 = DPM-Solver-2 (``r1 = 1/3``) inside DPM-Solver-3
(``r1 = 1/3, r2 = 2/3``); a trial step costs ``order`` evaluations. With ``x_lo``, ``x_hi`` the pair's
results and ``x_prev`` the last accepted ``x_lo`` (initially ``x``)::

    delta = max(atol, rtol max(|x_lo|, |x_prev|))
    E     = max over the batch of RMS((x_hi - x_lo) / delta)      accept when E <= 1 (x <- x_hi)
    h     <- min(theta h E^{-1/order}, lam_end - lam)

until ``|t - t_end| <= t_err``. Defaults are the authors' (``h_init = 0.05``, ``atol = 0.0078``,
``rtol = 0.05``, ``theta = 0.9``, ``t_err = 1e-5``).

Deviation from the authors' code: after a rejected step the model output at the unchanged start point is
reused (the code evaluates it again), so a rejection costs ``order - 1`` evaluations, not ``order``.
``t_end`` must have ``sigma > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._utils import f64, state_dtype
from ._expint import FORMS, SOLVER_TYPES, Form, output_fn, point, singlestep_update
from .base import Problem

__all__ = ["AdaptiveResult", "solve_adaptive"]


@dataclass(frozen=True)
class AdaptiveResult:
    x: Tensor  # (B, ...) solution at t_end
    nfe: int  # model evaluations used
    steps: int  # accepted steps
    rejected: int  # rejected trial steps
    ts: Tensor  # float64 times of the accepted points, t_start first


def solve_adaptive(
    problem: Problem,
    x: Tensor,
    t_start: float | None = None,
    t_end: float | None = None,
    *,
    order: int = 3,  # 2: DPM-Solver-12, 3: DPM-Solver-23
    form: Form = "noise",  # "noise" (DPM-Solver) | "data" (DPM-Solver++)
    h_init: float = 0.05,  # first trial step in lam
    atol: float = 0.0078,  # absolute tolerance (1/128: half a pixel level of [-1, 1] images)
    rtol: float = 0.05,  # relative tolerance
    theta: float = 0.9,  # safety factor of the step-size update
    t_err: float = 1e-5,  # stop when |t - t_end| <= t_err
    solver_type: str = "midpoint",  # "midpoint" | "heun" (second-order coefficient)
    max_nfe: int = 10_000,  # give up (RuntimeError) beyond this many evaluations
) -> AdaptiveResult:
    """Solve the PF-ODE from ``x`` at ``t_start`` (default ``t_max``) to ``t_end`` (default ``t_min``)."""
    sch = problem.schedule
    t0 = sch.t_max if t_start is None else float(t_start)
    t1 = sch.t_min if t_end is None else float(t_end)
    if order not in (2, 3):
        raise ValueError(f"order must be 2 (DPM-Solver-12) or 3 (DPM-Solver-23), got {order!r}")
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {', '.join(FORMS)}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; allowed: {', '.join(SOLVER_TYPES)}")
    if not (h_init > 0 and atol > 0 and rtol >= 0 and 0 < theta <= 1 and t_err > 0):
        raise ValueError(
            f"need h_init > 0, atol > 0, rtol >= 0, 0 < theta <= 1, t_err > 0; got h_init={h_init}, "
            f"atol={atol}, rtol={rtol}, theta={theta}, t_err={t_err}"
        )
    if point(sch, t1)[1] == 0.0 or point(sch, t0)[1] == 0.0:
        raise ValueError("the adaptive solver needs sigma > 0 at both ends; denoise to sigma = 0 separately")
    lam_s, lam_end = point(sch, t0)[2], point(sch, t1)[2]
    direction = 1.0 if lam_end > lam_s else -1.0
    lo_nodes, hi_nodes = ((0.0,), (0.0, 0.5)) if order == 2 else ((0.0, 1 / 3), (0.0, 1 / 3, 2 / 3))
    fn = output_fn(sch, problem.denoise, form)
    nfe0 = problem.nfe

    x = x.to(state_dtype(x.dtype))
    x_prev, s, m_s = x, t0, None  # m_s: model output at (x, s), kept across rejections
    h = direction * min(h_init, abs(lam_end - lam_s))
    ts, rejected = [t0], 0
    while abs(s - t1) > t_err:
        if problem.nfe - nfe0 > max_nfe:
            raise RuntimeError(f"adaptive DPM-Solver used more than max_nfe={max_nfe} evaluations")
        t = float(sch.t_of_lambda(f64(lam_s + h)))
        # lower-order solution, then the higher one reusing its evaluations
        x_lo, ms = singlestep_update(
            sch, fn, x, s, t, lo_nodes, form, solver_type=solver_type, known=() if m_s is None else (m_s,)
        )
        x_hi, _ = singlestep_update(sch, fn, x, s, t, hi_nodes, form, solver_type=solver_type, known=ms)
        delta = torch.clamp(rtol * torch.maximum(x_lo.abs(), x_prev.abs()), min=atol)
        err = float(((x_hi - x_lo) / delta).square().flatten(1).mean(1).sqrt().max())  # E
        if err <= 1.0:  # accept
            x, x_prev, s, m_s = x_hi, x_lo, t, None
            lam_s = point(sch, s)[2]
            ts.append(s)
        else:
            m_s, rejected = ms[0], rejected + 1
        factor = math.inf if err == 0.0 else theta * err ** (-1.0 / order)
        h = direction * min(factor * abs(h), abs(lam_end - lam_s))
    return AdaptiveResult(x=x, nfe=problem.nfe - nfe0, steps=len(ts) - 1, rejected=rejected, ts=f64(ts))
