"""High-accuracy reference solution of the probability-flow ODE, in float64.

With ``y = x / alpha`` and ``lam = log(alpha / sigma)`` the PF-ODE reads (Karras et al. 2022 in
log-noise time)::

    dy/dlam = x0(alpha(lam) y, t(lam)) - y

which is smooth and well scaled over the whole trajectory. It is integrated with the adaptive
Dormand-Prince 5(4) pair (Dormand & Prince 1980; FSAL, standard PI-free controller) with tight
tolerances; one step size is shared by the batch and chosen from the worst sample. A grid end at
``sigma = 0`` (``lam = +inf``) is reached by integrating to ``lam_cap`` where ``sigma/alpha = e^-lam_cap``
is far below float64 resolution of the data, then taking ``x = alpha y``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._utils import f64
from ..schedules import NoiseSchedule
from ..typing import DenoiserFn

__all__ = ["reference_solution", "ReferenceResult"]

# Dormand-Prince 5(4) tableau.
_C = (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0)
_A = (
    (),
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_B5 = _A[6] + (0.0,)
_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
_E = tuple(b5 - b4 for b5, b4 in zip(_B5, _B4))


@dataclass(frozen=True)
class ReferenceResult:
    x: Tensor  # (B, ...) float64 solution at t_end
    n_evals: int  # model evaluations used (per sample)
    n_steps: int  # accepted steps
    n_rejected: int


def reference_solution(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    x: Tensor,
    t_start: float,
    t_end: float,
    *,
    rtol: float = 1e-10,
    atol: float = 1e-10,
    lam_cap: float = 20.0,
    max_steps: int = 100_000,
    cond: dict | None = None,
) -> ReferenceResult:
    """Solve the PF-ODE from ``x`` at ``t_start`` to ``t_end`` (either direction) in float64."""
    cond = cond or {}
    x = f64(x)
    b = x.shape[0]
    lam0 = float(schedule.lam(f64(t_start)))
    lam1 = float(schedule.lam(f64(t_end)))
    if not math.isfinite(lam0):
        raise ValueError(f"cannot start the reference ODE at t={t_start}, where sigma = 0")
    lam1 = min(lam1, lam_cap) if lam1 > lam0 else max(lam1, -lam_cap)
    direction = 1.0 if lam1 > lam0 else -1.0

    n_evals = 0

    def f(lam: float, y: Tensor) -> Tensor:
        nonlocal n_evals
        n_evals += 1
        lam_t = torch.full((b,), lam, dtype=torch.float64, device=x.device)
        t = schedule.t_of_lambda(lam_t)
        a = float(schedule.alpha(t[:1]))
        x0 = f64(model(a * y, t, **cond))
        if not bool(torch.isfinite(x0).all()):
            raise FloatingPointError(f"model returned non-finite values at lam={lam:.6g} in the reference solve")
        return x0 - y

    a0 = float(schedule.alpha(f64(t_start)))
    y = x / a0
    lam = lam0
    k1 = f(lam, y)
    h = direction * min(0.01, abs(lam1 - lam0))
    steps = rejected = 0
    while direction * (lam1 - lam) > 1e-14:
        if steps + rejected >= max_steps:
            raise RuntimeError(f"reference solve did not finish in {max_steps} steps (rtol={rtol}, atol={atol})")
        if direction * (lam + h - lam1) > 0:
            h = lam1 - lam
        ks = [k1]
        for j in range(1, 7):
            yj = y + h * sum(a * k for a, k in zip(_A[j], ks) if a != 0.0)
            ks.append(f(lam + _C[j] * h, yj))
        y_new = y + h * sum(bb * k for bb, k in zip(_B5, ks) if bb != 0.0)
        err = h * sum(e * k for e, k in zip(_E, ks) if e != 0.0)
        scale = atol + rtol * torch.maximum(y.abs(), y_new.abs())
        err_norm = float((err / scale).pow(2).flatten(1).mean(1).sqrt().max())
        if err_norm <= 1.0:
            y, lam, k1 = y_new, lam + h, ks[6]
            steps += 1
        else:
            rejected += 1
        factor = 5.0 if err_norm == 0 else min(5.0, max(0.2, 0.9 * err_norm ** (-1 / 5)))
        h = h * factor
    a1 = float(schedule.alpha(f64(t_end)))
    return ReferenceResult(x=a1 * y, n_evals=n_evals, n_steps=steps, n_rejected=rejected)
