"""Shared exponential-integrator math (the only copy): per-interval coefficients in float64, the phi
functions, Taylor weights for derivative estimates in ``lam``, and the singlestep updates of DPM-Solver
(noise form) and DPM-Solver++ (data form), written once for both forms. Every multistep method runs on the
one engine built on these coefficients, ``_multistep``.

Exact solution of the PF-ODE from ``s`` to ``t`` (``h = lam_t - lam_s``), data form::

    x_t = (sigma_t / sigma_s) x_s + sigma_t ∫ e^lam x0 dlam
        = (sigma_t / sigma_s) x_s + alpha_t sum_k h^(k+1) phi_{k+1}(-h) x0^(k)(lam_s)

noise form::

    x_t = (alpha_t / alpha_s) x_s - sigma_t sum_k h^(k+1) phi_{k+1}(h) eps^(k)(lam_s)

with ``phi_1(z) = (e^z - 1) / z`` and ``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``.

Both read ``x_t = a x_s + sum_k b_k D_k`` with the *scaled* derivatives ``D_k = h^k m^(k)(lam_s)`` of
the model output ``m`` (``x0`` or ``eps``); ``expint_coeffs`` gives ``a`` and ``b_k``:

    data:   a = sigma_t / sigma_s,  b_k =  alpha_t h phi_{k+1}(-h)
    noise:  a = alpha_t / alpha_s,  b_k = -sigma_t h phi_{k+1}(h)

A step to ``sigma = 0`` (``h = +inf``) is defined only at first order (``x_t = alpha_t x0``): every
higher term is ``inf * 0`` there (diffusers #9007), so callers lower the order on such steps.
``eta > 0`` (data form only) gives the SDE-DPM-Solver++ family of k-diffusion's ``dpmpp_*_sde``: with
``H = (1 + eta) h``, ``a = (sigma_t / sigma_s) e^{-eta h}``, ``b_k = alpha_t (1 + eta) h phi_{k+1}(-H)``,
plus noise ``sigma_t sqrt(1 - e^{-2 eta h}) z`` (added by the caller).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .._utils import f64
from ..schedules import NoiseSchedule

__all__ = [
    "Interval",
    "interval",
    "span",
    "point",
    "phi",
    "phi_data",
    "expint_coeffs",
    "taylor_weights",
    "lincomb",
    "multistep_order",
    "LOWER_ORDER_FINAL_BELOW",
    "singlestep_node",
    "singlestep_final",
    "singlestep_update",
    "output_fn",
    "Form",
    "FORMS",
    "SOLVER_TYPES",
    "THIRD_ORDER_TERMS",
]

Form = Literal["data", "noise"]  # integrate x0 (DPM-Solver++) or eps (DPM-Solver)
FORMS = ("data", "noise")
SOLVER_TYPES = ("midpoint", "heun")  # second-order coefficient: b_0 / 2 (paper) or b_1 (Taylor)
THIRD_ORDER_TERMS = ("taylor", "reference")  # multistep D2 weight: 2 b_2 (Taylor) or b_2 (authors' code)
LOWER_ORDER_FINAL_BELOW = 15  # multistep lower_order_final acts on grids with fewer steps (see dpm_solver_pp)


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
    """``(alpha, sigma, lam)`` at one time, as python floats (memoised: schedules are immutable, and
    a sampling loop revisits the same grid points, so each is computed once, not once per step)."""
    return _point(schedule, float(t))


@functools.lru_cache(maxsize=8192)
def _point(schedule: NoiseSchedule, t: float) -> tuple[float, float, float]:
    tt = f64(t)
    return float(schedule.alpha(tt)), float(schedule.sigma(tt)), float(schedule.lam(tt))


@functools.lru_cache(maxsize=8192)
def _span(schedule: NoiseSchedule, t: float, t_next: float) -> Interval:
    a, s, lam = _point(schedule, t)
    a1, s1, lam1 = _point(schedule, t_next)
    if s1 == 0.0:
        lam1 = math.inf
    return Interval(t, t_next, a, s, lam, a1, s1, lam1)


def span(schedule: NoiseSchedule, t: float | Tensor, t_next: float | Tensor) -> Interval:
    """Coefficients of the step ``t -> t_next`` between any two times."""
    return _span(schedule, float(t), float(t_next))


def interval(schedule: NoiseSchedule, ts: Tensor, i: int) -> Interval:
    """Coefficients of the step ``ts[i] -> ts[i + 1]``."""
    return span(schedule, ts[i], ts[i + 1])


def phi(z: float, k: int) -> float:
    """``phi_k(z)`` for real ``z`` of either sign or ``-inf`` (series for ``|z| < 1``)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if z == -math.inf:
        return 0.0  # the limit at a step to sigma = 0 in data form
    if not math.isfinite(z):
        raise ValueError(f"phi_{k} needs a finite argument or -inf, got {z}")
    if abs(z) < 1.0:  # phi_k(z) = sum_j z^j / (j + k)!: no cancellation (the recursion loses
        return sum(z**j / math.factorial(j + k) for j in range(30))  # ~1e-16/|z|^(k-1) for small z
    p = math.expm1(z) / z  # phi_1(z)
    for j in range(1, k):
        p = (p - 1.0 / math.factorial(j)) / z
    return p


def phi_data(h: float, k: int) -> float:
    """``phi_k(-h)`` for ``h >= 0``, including the step to sigma = 0 (``h = inf``: every phi_k -> 0,
    while ``h phi_1(-h) -> 1``; callers multiply by powers of h only in finite combinations)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if math.isinf(h):
        return 0.0
    return phi(-h, k)


def expint_coeffs(c: Interval, n: int, form: Form, *, eta: float = 0.0) -> tuple[float, tuple[float, ...]]:
    """``(a, (b_0, ..., b_{n-1}))`` of ``x_next = a x + sum_k b_k D_k`` over ``c`` (module docstring).
    Memoised (intervals are immutable; a sampling loop asks for each step's once per batch)."""
    return _expint_coeffs(c, n, form, float(eta))


@functools.lru_cache(maxsize=8192)
def _expint_coeffs(c: Interval, n: int, form: Form, eta: float) -> tuple[float, tuple[float, ...]]:
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {', '.join(FORMS)}")
    if eta != 0.0 and form != "data":
        raise ValueError(f"eta={eta} (SDE noise) is defined for the data form only")
    if not (eta >= 0.0 and math.isfinite(eta)):
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    h = c.h
    if c.sigma_next == 0.0:
        if n != 1:
            raise ValueError(f"an order-{n} exponential-integrator step to sigma = 0 is undefined; use order 1")
        if form == "data":
            return 0.0, (c.alpha_next,)  # x_next = alpha_next x0
        return c.alpha_ratio, (-c.alpha_next * c.sigma / c.alpha,)  # x_next = alpha_next (x - sigma eps) / alpha
    if form == "noise":
        b = [-c.sigma_next * math.expm1(h)] + [-c.sigma_next * h * phi(h, k + 1) for k in range(1, n)]
        return c.alpha_ratio, tuple(b)
    hh = (1.0 + eta) * h  # H = (1 + eta) h
    b = [-c.alpha_next * math.expm1(-hh)] + [c.alpha_next * hh * phi(-hh, k + 1) for k in range(1, n)]
    return c.sigma_ratio * math.exp(-eta * h), tuple(b)


def taylor_weights(r: Sequence[float]) -> list[list[float]]:
    """``W`` with ``D_j = sum_i W[j][i] m_i``: the scaled derivatives ``h^j p^(j)(lam)`` at ``lam`` of the
    polynomial through ``(lam + r_i h, m_i)``; ``r[0]`` must be 0 (the expansion point). Memoised: a sampling
    loop asks for the same nodes once per batch."""
    if len(r) < 1 or r[0] != 0.0 or len(set(r)) != len(r):
        raise ValueError(f"nodes r must start at 0 and be distinct, got {list(r)}")
    return [list(row) for row in _taylor_weights(tuple(float(v) for v in r))]


@functools.lru_cache(maxsize=4096)
def _taylor_weights(r: tuple[float, ...]) -> tuple[tuple[float, ...], ...]:
    n = len(r)
    vander = torch.tensor([[ri**j / math.factorial(j) for j in range(n)] for ri in r], dtype=torch.float64)
    return tuple(tuple(row) for row in torch.linalg.inv(vander).tolist())  # m_i = sum_j V[i][j] D_j


def lincomb(coeffs: Sequence[float], xs: Sequence[Tensor]) -> Tensor:
    """``sum_i coeffs[i] xs[i]`` (zero weights skipped)."""
    out: Tensor | None = None
    for w, x in zip(coeffs, xs, strict=True):
        if w != 0.0:
            out = w * x if out is None else out + w * x
    return out if out is not None else torch.zeros_like(xs[0])


def multistep_order(order: int, available: int, i: int, steps: int, lower_order_final: bool, to_zero: bool) -> int:
    """Order of multistep step ``i`` of ``steps``: warm-up (``available`` outputs), ``lower_order_final``
    on grids below ``LOWER_ORDER_FINAL_BELOW`` steps (last step 1, second last <= 2), 1 into sigma = 0."""
    k = min(order, available)
    if lower_order_final and steps < LOWER_ORDER_FINAL_BELOW:
        k = min(k, steps - i)
    return 1 if to_zero else k


def singlestep_node(sub: Interval, x: Tensor, ms: Sequence[Tensor], r: Sequence[float], form: Form) -> Tensor:
    """Intermediate value of a singlestep update at node ``j = len(ms)`` (``sub``: from the start to the
    node; ``r``: node ratios ``(0, r1[, r2])`` of the full step). Node 1: first order. Node 2 (DPM-Solver-3):
    ``a' x + b_0' m0 + (r2 / r1) b_1' (m1 - m0)`` on the sub-step."""
    j = len(ms)
    a, b = expint_coeffs(sub, j, form)
    if j == 1:
        return a * x + b[0] * ms[0]
    if j == 2:
        return a * x + b[0] * ms[0] + (r[2] / r[1]) * b[1] * (ms[1] - ms[0])
    raise ValueError(f"singlestep updates have at most 2 intermediate nodes, got node {j}")


def singlestep_final(
    c: Interval, x: Tensor, ms: Sequence[Tensor], r: Sequence[float], form: Form, *, solver_type: str = "midpoint"
) -> Tensor:
    """End of a singlestep update of order ``len(ms)`` from the outputs at its nodes.
    "midpoint" (DPM-Solver-2/3 of the paper): order 2 ``+ b_0 / (2 r1) (m1 - m0)``, order 3
    ``+ b_1 / r2 (m2 - m0)`` (third order needs ``r2 = 2/3``). "heun": Taylor weights through all nodes."""
    k = len(ms)
    a, b = expint_coeffs(c, k, form)
    out = a * x + b[0] * ms[0]
    if k == 1:
        return out
    if solver_type == "heun":
        w = taylor_weights(r[:k])
        return out + lincomb([sum(b[j] * w[j][i] for j in range(1, k)) for i in range(k)], ms)
    if k == 2:
        return out + (0.5 * b[0] / r[1]) * (ms[1] - ms[0])
    return out + (b[1] / r[2]) * (ms[2] - ms[0])


def output_fn(
    schedule: NoiseSchedule, denoise: Callable[[Tensor, float], Tensor], form: Form
) -> Callable[[Tensor, float], Tensor]:
    """The model output a form integrates: ``x0`` itself (data) or ``eps = (x - alpha x0) / sigma`` (noise)."""
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; allowed: {', '.join(FORMS)}")
    if form == "data":
        return denoise

    def eps(x: Tensor, t: float) -> Tensor:
        a, s, _ = point(schedule, t)
        return (x - a * denoise(x, t)) / s

    return eps


def singlestep_update(
    schedule: NoiseSchedule,
    fn: Callable[[Tensor, float], Tensor],
    x: Tensor,
    t: float,
    t_next: float,
    r: Sequence[float],
    form: Form,
    *,
    solver_type: str = "midpoint",
    known: Sequence[Tensor] = (),
) -> tuple[Tensor, list[Tensor]]:
    """One singlestep update of order ``len(r)`` from ``t`` to ``t_next`` with nodes at ``lam + r_j h``
    (``r[0] = 0``); ``fn(x, t)`` is the model output in ``form``; ``known`` outputs at the first nodes are
    reused. Returns the new ``x`` and the outputs at the nodes (``len(r) - len(known)`` evaluations)."""
    c = span(schedule, t, t_next)
    ms = list(known[:1]) or [fn(x, t)]
    rr = [0.0]
    for j in range(1, len(r)):
        t_j = float(schedule.t_of_lambda(f64(c.lam + r[j] * c.h)))
        sub = span(schedule, t, t_j)
        rr.append(sub.h / c.h)  # the node's actual ratio (round trip of t_of_lambda)
        u = None if j < len(known) else singlestep_node(sub, x, ms, [*rr, *r[j + 1 :]], form)
        ms.append(known[j] if u is None else fn(u, t_j))
    return singlestep_final(c, x, ms, rr, form, solver_type=solver_type), ms
