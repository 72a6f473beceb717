"""Shared exponential-integrator math (the only copy): per-interval coefficients in float64 and
the phi functions, with the ``sigma_next = 0`` (``h = +inf``) limit handled here once.

Exact solution of the PF-ODE from ``s`` to ``t`` (``h = lam_t - lam_s``), data form::

    x_t = (sigma_t / sigma_s) x_s + sigma_t ∫ e^lam x0 dlam
        = (sigma_t / sigma_s) x_s + alpha_t sum_k h^(k+1) phi_{k+1}(-h) x0^(k)(lam_s)

noise form::

    x_t = (alpha_t / alpha_s) x_s - sigma_t sum_k h^(k+1) phi_{k+1}(h) eps^(k)(lam_s)

with ``phi_1(z) = (e^z - 1) / z`` and ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .._utils import f64
from ..schedules import NoiseSchedule

__all__ = ["Interval", "interval", "point", "phi_data"]


@dataclass(frozen=True)
class Interval:
    """Float64 coefficients of one step ``t -> t_next`` (python floats)."""

    t: float
    t_next: float
    alpha: float
    sigma: float
    lam: float
    alpha_next: float
    sigma_next: float
    lam_next: float  # +inf when sigma_next == 0

    @property
    def h(self) -> float:
        return self.lam_next - self.lam

    @property
    def sigma_ratio(self) -> float:
        """``sigma_next / sigma`` — 0 at a step to sigma = 0."""
        return self.sigma_next / self.sigma

    @property
    def alpha_ratio(self) -> float:
        return self.alpha_next / self.alpha


def point(schedule: NoiseSchedule, t: float | Tensor) -> tuple[float, float, float]:
    """``(alpha, sigma, lam)`` at one time, as python floats."""
    tt = f64(t)
    return float(schedule.alpha(tt)), float(schedule.sigma(tt)), float(schedule.lam(tt))


def interval(schedule: NoiseSchedule, ts: Tensor, i: int) -> Interval:
    """Coefficients of the step ``ts[i] -> ts[i + 1]``."""
    a, s, lam = point(schedule, ts[i])
    a1, s1, lam1 = point(schedule, ts[i + 1])
    if s1 == 0.0:
        lam1 = math.inf
    return Interval(float(ts[i]), float(ts[i + 1]), a, s, lam, a1, s1, lam1)


def phi_data(h: float, k: int) -> float:
    """``phi_k(-h)`` for ``h >= 0``, including the step to sigma = 0 (``h = inf``: every phi_k -> 0,
    while ``h phi_1(-h) -> 1``; callers multiply by powers of h only in finite combinations)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if math.isinf(h):
        return 0.0
    if abs(h) < 1e-2:  # series phi_k(z) = sum_j z^j / (j + k)!, z = -h: no cancellation
        return sum((-h) ** j / math.factorial(j + k) for j in range(12))
    p = -math.expm1(-h) / h  # phi_1(-h)
    for j in range(1, k):
        p = (1.0 / math.factorial(j) - p) / h
    return p
