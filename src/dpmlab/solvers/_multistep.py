"""The one multistep exponential-integrator engine. DDIM, multistep DPM-Solver, DPM-Solver++ (ODE and SDE),
UniPC, UniC and USF are configurations of it: per step a ``Step`` (what is integrated, the predictor's
Taylor expansion, an optional corrector and its expansion) is handed to ``advance``, which keeps the buffer
of model outputs, evaluates the model (or reuses a pending corrector evaluation), and applies ``update``.
A method is its rule for the ``Step`` of step ``i`` — ``dpm_solver_rule``, ``unipc_rule`` or a searched
USF plan — the way diffrax writes ``Dopri5`` as a coefficient table over one Runge-Kutta engine.

The update from ``x_s`` at ``lam_s`` to ``lam_t`` (``h = lam_t - lam_s``, ``m`` = x0 or eps, ``a`` and ``b_k``
from ``_expint.expint_coeffs``)::

    x_t = a x_s + b_0 m_s + sum_{j=1..k-1} c_j b_j D_j                                (Taylor order k)
    D_j = h^j m^(j)(lam_s) of the polynomial through m_s and the E_j buffered outputs nearest to s

with ``r_q = (lam_q - lam_s) / h`` for the buffered outputs (``_expint.taylor_weights``), ``c_1`` the
relaxation of the first derivative (written in ``hh = -h`` for data, ``+h`` for noise prediction) and
``c_j`` (``j >= 2``) per-derivative weights, 1 unless a method's table says otherwise. A corrector
evaluates ``m`` at the predicted ``x~_t`` and redoes the update from ``x_s`` with its own expansion, its
estimates taking the new point (``r = 1``) first; "pseudo" buffers ``m(x~_t)`` for the next step (UniC:
no extra evaluation), "implicit" lets the next step evaluate at the corrected point.

The tables (tested against the papers' closed forms in tests/test_multistep_engine.py):

* DDIM = order 1.
* DPM-Solver(++) kM (Lu et al. 2022, Alg. 2 and the authors' 3M) = order k with ``E = (k-1, ..., k-1)``;
  2M "midpoint" weight ``b_0 / 2`` is the relaxation ``c_1 = phi_1(hh) / (2 phi_2(hh))``; 3M's
  "reference" third-order term (the authors' code: half the Taylor weight) is ``c_2 = 1/2``.
* SDE-DPM-Solver++ = the data form with ``eta > 0`` (``_expint``'s SDE coefficients) plus noise
  ``sigma_t sqrt(1 - e^{-2 eta h}) z``.
* UniPC-p (Zhao et al. 2023) = predictor order p with ``E = p - 1`` and a pseudo corrector of order p + 1
  with ``E = p``: solving UniPC's ``R a = b`` is interpolation, so ``B(h)`` cancels except where UniPC
  hard-codes ``a = 1/2`` (UniP-2 and UniC-1), which are the relaxations ``c_1`` "unipc-bh1"
  ``1 / (2 phi_2(hh))`` and "unipc-bh2" ``phi_1(hh) / (2 phi_2(hh))``.

A step to ``sigma = 0`` is first order (``x = alpha_t x0``); ``_expint.expint_coeffs`` refuses more.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import torch
from torch import Tensor

from ._expint import Interval, expint_coeffs, lincomb, multistep_order, phi, taylor_weights
from .base import Problem

__all__ = [
    "MAX_ORDER",
    "Prediction",
    "Relaxation",
    "Corrector",
    "Taylor",
    "Step",
    "Buffer",
    "relaxation_factor",
    "update",
    "advance",
    "dpm_solver_rule",
    "unipc_rule",
    "unic_expansion",
    "UNIPC_RELAXATIONS",
]

MAX_ORDER = 4  # Taylor orders 1..4 and at most 4 points per derivative estimate (USF's range)


class Prediction(StrEnum):
    DATA = "data"  # x0 (DPM-Solver++, UniPC default)
    NOISE = "noise"  # eps (DPM-Solver)
    V3 = "v3"  # DPM-Solver-v3's g of f = (sigma eps - l x) / alpha; only USF(ems=...) integrates it


class Relaxation(StrEnum):
    NONE = "none"
    DPM_SOLVER_2 = "dpmsolver-2"
    UNIPC_BH1 = "unipc-bh1"
    UNIPC_BH2 = "unipc-bh2"
    HALF_EXP = "0.5exp"
    NEG_HALF_EXP = "-0.5exp"
    LINEAR = "linear"  # 1 + coefficient * h (h = lam_t - lam_s > 0 in every form; USF's searched relaxation)


class Corrector(StrEnum):
    NONE = "none"
    PSEUDO = "pseudo"  # reuse the evaluation at the predicted point (UniC)
    IMPLICIT = "implicit"  # re-evaluate at the corrected point (next step: one more NFE)


@functools.lru_cache(maxsize=4096)
def relaxation_factor(rel: Relaxation, hh: float) -> float:
    """``c_1`` of the first-derivative term at ``hh`` (-h for data, +h for noise prediction); USF's
    formulas rewritten with phi functions against cancellation."""
    if rel is Relaxation.NONE:
        return 1.0
    if rel is Relaxation.LINEAR:
        raise ValueError("the linear relaxation needs its coefficient: use Taylor.factor")
    if rel in (Relaxation.DPM_SOLVER_2, Relaxation.UNIPC_BH2):
        return phi(hh, 1) / (2.0 * phi(hh, 2))
    if rel is Relaxation.UNIPC_BH1:
        return 1.0 / (2.0 * phi(hh, 2))
    return 1.0 + 0.5 * math.expm1(hh) if rel is Relaxation.HALF_EXP else 1.0 - 0.5 * math.expm1(hh)


def check_int(name: str, v: Any, lo: int, hi: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in {lo}..{hi}, got {v!r}")
    return v


@dataclass(frozen=True)
class Taylor:
    """One expansion: Taylor ``order`` k, estimate sizes ``points[j-1] = E_j`` for derivatives 1..k-1, the
    relaxation ``c_1`` and the weights ``c_j`` of the derivatives ``j >= 2`` (empty: all 1)."""

    order: int = 1  # k: terms up to the (k-1)-th derivative
    points: tuple[int, ...] = ()  # E_j >= j buffered outputs per derivative estimate
    relaxation: Relaxation = Relaxation.NONE  # c_1 (order >= 2 only)
    coefficient: float = 0.0  # c of the linear relaxation (0 for every other relaxation)
    weights: tuple[float, ...] = ()  # c_2, ..., c_{k-1} (empty: 1 each; DPM-Solver 3M "reference": (0.5,))

    def __post_init__(self) -> None:
        object.__setattr__(self, "relaxation", Relaxation(self.relaxation))
        if not isinstance(self.coefficient, int | float) or not math.isfinite(self.coefficient):
            raise ValueError(f"relaxation coefficient must be a finite number, got {self.coefficient!r}")
        if self.coefficient != 0 and self.relaxation is not Relaxation.LINEAR:
            raise ValueError(f"a relaxation coefficient ({self.coefficient}) needs relaxation 'linear'")
        object.__setattr__(self, "points", tuple(self.points))
        object.__setattr__(self, "weights", tuple(self.weights))
        check_int("Taylor order", self.order, 1, MAX_ORDER)
        if len(self.points) != self.order - 1:
            raise ValueError(f"order {self.order} needs {self.order - 1} derivative estimates, got {self.points}")
        for j, e in enumerate(self.points, 1):
            check_int(f"points for derivative {j}", e, j, MAX_ORDER)
        if self.relaxation is not Relaxation.NONE and self.order < 2:
            raise ValueError(f"relaxation {self.relaxation.value!r} needs a first-derivative term (order >= 2)")
        if self.weights and len(self.weights) != max(self.order - 2, 0):
            raise ValueError(f"order {self.order} has {max(self.order - 2, 0)} weights c_2.., got {self.weights}")
        if not all(isinstance(w, int | float) and math.isfinite(w) for w in self.weights):
            raise ValueError(f"derivative weights must be finite numbers, got {self.weights}")

    @classmethod
    def full(cls, order: int, relaxation: Relaxation = Relaxation.NONE, weights: tuple[float, ...] = ()) -> Taylor:
        """Every derivative from the same ``order - 1`` points (polynomial interpolation)."""
        return cls(order, (order - 1,) * (order - 1), relaxation, 0.0, weights)

    @property
    def need(self) -> int:
        return max(self.points, default=0)

    def factor(self, h: float, form: str) -> float:
        """``c_1`` at step size ``h > 0`` for the prediction ``form`` (data: ``hh = -h``, noise and v3: ``+h``)."""
        if self.relaxation is Relaxation.LINEAR:
            return 1.0 + self.coefficient * h
        return relaxation_factor(self.relaxation, -h if form == "data" else h)

    def factors(self, h: float, form: str) -> list[float]:
        """``[c_1, ..., c_{k-1}]``."""
        rest = list(self.weights) or [1.0] * max(self.order - 2, 0)
        return [self.factor(h, form), *rest] if self.order > 1 else []


@dataclass(frozen=True)
class Step:
    """One step of the engine: what it integrates, the predictor, and an optional corrector."""

    prediction: Prediction = Prediction.DATA
    predictor: Taylor = field(default_factory=Taylor)
    corrector: Corrector = Corrector.NONE
    correction: Taylor | None = None  # the corrector's expansion (order >= 2), iff corrector != NONE

    def __post_init__(self) -> None:
        object.__setattr__(self, "prediction", Prediction(self.prediction))
        object.__setattr__(self, "corrector", Corrector(self.corrector))
        for name in ("predictor", "correction"):
            if isinstance(getattr(self, name), Mapping):
                object.__setattr__(self, name, Taylor(**getattr(self, name)))
        if (self.corrector is Corrector.NONE) != (self.correction is None):
            raise ValueError(f"corrector {self.corrector.value!r} and correction {self.correction} disagree")
        if self.correction is not None and self.correction.order < 2:
            raise ValueError("a corrector's expansion needs order >= 2 (order 1 ignores the new evaluation)")


@dataclass(frozen=True)
class Buffer:
    """The engine's state: model outputs (as x0) at ``lams``, newest last, with the point ``x`` and the
    ``alpha``, ``sigma`` where each was evaluated (eps is derived, so both forms read the same buffer);
    ``pending``: the newest output is a pseudo corrector's evaluation at the current time."""

    lams: tuple[float, ...] = ()
    x0s: tuple[Tensor, ...] = ()
    xs: tuple[Tensor, ...] = ()
    alphas: tuple[float, ...] = ()
    sigmas: tuple[float, ...] = ()
    pending: bool = False

    def push(self, lam: float, x: Tensor, x0: Tensor, alpha: float, sigma: float, pending: bool) -> Buffer:
        k = MAX_ORDER + 1
        return Buffer(
            (*self.lams, lam)[-k:],
            (*self.x0s, x0)[-k:],
            (*self.xs, x)[-k:],
            (*self.alphas, alpha)[-k:],
            (*self.sigmas, sigma)[-k:],
            pending,
        )

    def settled(self) -> Buffer:
        return dataclasses.replace(self, pending=False) if self.pending else self

    def output(self, q: int, form: str) -> Tensor:
        """Output ``q`` (negative: from the newest) as x0 (data) or eps (noise)."""
        if form == "data":
            return self.x0s[q]
        return (self.xs[q] - self.alphas[q] * self.x0s[q]) / self.sigmas[q]

    def outputs(self, form: str, n: int) -> tuple[tuple[float, ...], tuple[Tensor, ...]]:
        """The ``n`` newest ``(lams, outputs)``, oldest first."""
        n = min(n, len(self.lams))
        return self.lams[-n:], tuple(self.output(q, form) for q in range(-n, 0))

    def with_newest(self, output: Tensor, form: str) -> Buffer:
        """The buffer with its newest output replaced (given in ``form``)."""
        x, alpha, sigma = self.xs[-1], self.alphas[-1], self.sigmas[-1]
        x0 = output if form == "data" else (x - sigma * output) / alpha
        return dataclasses.replace(self, x0s=(*self.x0s[:-1], x0))


def update(
    c: Interval,
    x: Tensor,
    lams: tuple[float, ...],
    ms: tuple[Tensor, ...],
    tay: Taylor,
    form: str,
    *,
    new: Tensor | None = None,
    eta: float = 0.0,
) -> Tensor:
    """One exponential-integrator update from the newest output ``ms[-1]`` (module docstring); ``new``: the
    corrector's output at ``(x~_t, t)``; ``eta``: the SDE coefficients (data form, noise added by the caller)."""
    a, b = expint_coeffs(c, tay.order, form, eta=eta)  # type: ignore[arg-type]
    m_s = ms[-1]
    out = torch.add(x * a, m_s, alpha=b[0]) if a != 0.0 else m_s * b[0]  # fused: this is the hot path
    if tay.order == 1:
        return out
    h = c.h
    pts = ([(1.0, new)] if new is not None else []) + [
        ((lams[-1 - q] - lams[-1]) / h, ms[-1 - q]) for q in range(1, len(ms))
    ]
    for j, c_j in enumerate(tay.factors((1.0 + eta) * h, form), 1):  # relaxations at the SDE's H = (1 + eta) h
        if len(pts) < tay.points[j - 1]:
            raise ValueError(f"derivative {j} needs {tay.points[j - 1]} outputs, the buffer holds {len(pts)}")
        r, mq = zip(*pts[: tay.points[j - 1]])
        d_j = lincomb(taylor_weights([0.0, *r])[j], [m_s, *mq])  # D_j = h^j m^(j)(lam_s), interpolation
        out = out.add_(d_j, alpha=b[j] * c_j)  # out is this function's own tensor
    return out


def advance(
    problem: Problem,
    x: Tensor,
    c: Interval,
    i: int,
    buf: Buffer,
    step: Step,
    *,
    first: Tensor | None = None,
    eta: float = 0.0,
) -> tuple[Tensor, Buffer]:
    """One engine step ``t_i -> t_{i+1}`` (data or noise prediction): push the output at ``(x, t_i)`` unless a
    pseudo corrector left it pending (``first``: an x0 given instead of evaluating, e.g. USF's analytical
    first step), predict, and correct if the step says so. ``eta > 0``: SDE step with ``problem.randn(i, x)``."""
    if step.prediction is Prediction.V3:
        raise ValueError("DPM-Solver-v3 prediction steps run only in USF(plan, ems=...)")
    form = step.prediction.value
    if not buf.pending:
        x0 = problem.denoise(x, c.t) if first is None else first
        buf = buf.push(c.lam, x, x0, c.alpha, c.sigma, False)
    need = 1 + max(step.predictor.need, step.correction.need if step.correction else 0)
    lams, ms = buf.outputs(form, need)
    x_pred = update(c, x, lams, ms, step.predictor, form, eta=eta)
    if eta > 0 and c.sigma_next > 0:  # SDE noise sigma_t sqrt(1 - e^{-2 eta h}) z
        x_pred = x_pred + c.sigma_next * math.sqrt(-math.expm1(-2.0 * eta * c.h)) * problem.randn(i, x)
    if step.correction is None:
        return x_pred, buf.settled()
    x0_t = problem.denoise(x_pred, c.t_next)  # the evaluation at the predicted point
    m_t = x0_t if form == "data" else (x_pred - c.alpha_next * x0_t) / c.sigma_next
    x_c = update(c, x, lams, ms, step.correction, form, new=m_t)
    if step.corrector is Corrector.PSEUDO:
        return x_c, buf.push(c.lam_next, x_pred, x0_t, c.alpha_next, c.sigma_next, True)
    return x_c, buf.settled()


# --- the methods' tables ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=4096)  # a sampling loop asks for the same step once per batch
def dpm_solver_rule(
    order: int,
    available: int,
    i: int,
    steps: int,
    *,
    lower_order_final: bool,
    to_zero: bool,
    form: str,
    solver_type: str = "midpoint",
    third_order_term: str = "taylor",
) -> Step:
    """Multistep DPM-Solver (noise) / DPM-Solver++ (data) step ``i``: order from ``_expint.multistep_order``;
    2M "midpoint" = relaxation dpmsolver-2, "heun" = none; 3M "reference" = ``c_2 = 1/2``."""
    k = multistep_order(order, available, i, steps, lower_order_final, to_zero)
    rel = Relaxation.DPM_SOLVER_2 if k == 2 and solver_type == "midpoint" else Relaxation.NONE
    weights = (0.5,) if k == 3 and third_order_term == "reference" else ()
    return Step(Prediction(form), Taylor.full(k, rel, weights))


@functools.lru_cache(maxsize=4096)
def unipc_rule(
    p: int,
    available: int,
    i: int,
    steps: int,
    *,
    variant: str,
    form: str,
    lower_order_final: bool,
    corrector: bool,
    final_corrector: bool,
    to_zero: bool,
) -> Step:
    """UniPC step ``i``: UniP-k with ``k = min(p, available, N - i)`` (``lower_order_final``: the authors
    apply it on every grid) and, except on the last step (unless ``final_corrector``) and into sigma = 0,
    the pseudo corrector UniC-k of order k + 1; bh1 / bh2 relax UniP-2 and UniC-1."""
    if to_zero:
        return Step(Prediction(form), Taylor())
    k = min(p, available, steps - i if lower_order_final else steps)
    pred = Taylor.full(k, UNIPC_RELAXATIONS[variant] if k == 2 else Relaxation.NONE)
    if not corrector or (i == steps - 1 and not final_corrector):
        return Step(Prediction(form), pred)
    return Step(Prediction(form), pred, Corrector.PSEUDO, unic_expansion(k, variant))


UNIPC_RELAXATIONS = {"bh1": Relaxation.UNIPC_BH1, "bh2": Relaxation.UNIPC_BH2}


def unic_expansion(p: int, variant: str) -> Taylor:
    """UniC-p: order p + 1 from the p buffered outputs and the new one (UniC-1: the bh relaxation)."""
    return Taylor(p + 1, (p,) * p, UNIPC_RELAXATIONS[variant] if p == 1 else Relaxation.NONE)
