"""DPM-Solver — Lu, Zhou, Bao, Chen, Li & Zhu, "DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic
Model Sampling in Around 10 Steps", NeurIPS 2022, arXiv 2206.00927. Noise-prediction form (``m = eps``).

With ``h = lam_next - lam`` the exact solution is ``x_t = (alpha_t/alpha_s) x_s - alpha_t ∫ e^{-lam} eps dlam``
(eq. 3.4); the solvers Taylor-expand ``eps`` in ``lam`` (coefficients in ``_expint``):

* ``dpm_solver`` (singlestep DPM-Solver-1/2/3): order 1 (= DDIM), 2 (``r1 = 1/2``) or
  3 (``r1 = 1/3, r2 = 2/3``), intermediate nodes at ``lam + r h``; a step of order k costs k evaluations.
  DPM-Solver-2: ``u = (alpha_{s1}/alpha_s) x - sigma_{s1}(e^{r1 h} - 1) eps_s``,
  ``x_t = (alpha_t/alpha_s) x - sigma_t (e^h - 1) eps_s - sigma_t/(2 r1) (e^h - 1)(eps(u, s1) - eps_s)``.
* ``dpm_solver_fast`` (DPM-Solver-fast, the paper's order allocation for a fixed NFE): a grid of N steps
  costs N evaluations; consecutive grid intervals are grouped into singlestep updates of orders
  ``[3]*(K-2) + [2, 1]`` (N % 3 == 0), ``[3]*(K-1) + [1]`` (N % 3 == 1), ``[3]*(K-1) + [2]`` (N % 3 == 2),
  ``K = N // 3 + 1`` (order 2: ``[2]*(N//2)`` plus ``[1]`` if N is odd). A group's inner grid points are
  its intermediate nodes, so each ``step`` makes one evaluation and returns the stage value at the next
  grid point.
* ``dpm_solver_multistep`` (multistep DPM-Solver, introduced with DPM-Solver++, arXiv 2211.01095):
  orders 2 and 3, warm-up with lower orders, one evaluation per step.

``solver_type`` "midpoint" is the paper's "dpmsolver" coefficient and "heun" the "taylor" one
(diffusers' names). A step to ``sigma = 0`` is first order (the noise-form higher terms are undefined
there, diffusers #9007); on such grids a singlestep solver costs ``order (N - 1) + 1`` evaluations.

Deviations from the authors' code: the singlestep inner nodes are always at fixed ``lam`` ratios ``r``
(the code places them uniformly in the grid's own spacing between outer points); ``dpm_solver_fast`` takes
the N-step grid and groups it (the code's ``time_uniform`` branch, exactly; with ``logSNR`` the code instead
spaces K outer points uniformly); the multistep third-order term has the Taylor weight (the code's is half
of it and measures as second order; ``third_order_term="reference"`` restores it for parity);
``lower_order_final`` applies below 15 steps (see ``dpm_solver_pp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from ._expint import (
    SOLVER_TYPES,
    THIRD_ORDER_TERMS,
    interval,
    output_fn,
    singlestep_final,
    singlestep_node,
    singlestep_update,
    span,
)
from ._multistep import Buffer, advance, dpm_solver_rule
from .base import Problem, Solver, ends_at_zero, register

PAPER = "Lu et al. 2022, DPM-Solver (arXiv 2206.00927)"


def _eps(problem: Problem, x: Tensor, t: float) -> Tensor:
    """Noise prediction ``eps = (x - alpha x0) / sigma`` from one model evaluation."""
    return output_fn(problem.schedule, problem.denoise, "noise")(x, t)


def _check(order: int, allowed: tuple[int, ...], solver_type: str) -> None:
    if order not in allowed:
        raise ValueError(f"order must be one of {allowed}, got {order!r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; allowed: {', '.join(SOLVER_TYPES)}")


@register("dpm_solver")
@dataclass(frozen=True)
class DPMSolver(Solver[None]):
    order: int = 3  # 1, 2 or 3 (DPM-Solver-k); k evaluations per step
    r1: float | None = None  # first node ratio; default 1/2 (order 2) or 1/3 (order 3)
    r2: float | None = None  # second node ratio (order 3); default 2/3
    solver_type: str = "midpoint"  # "midpoint" (paper's "dpmsolver") | "heun" ("taylor")

    paper = PAPER
    # The registry's steps (12..96) are pre-asymptotic for "midpoint" order 3 (errors fall 16x from 12 to
    # 24 steps: slope 3.33; 3.02 from 24 steps on, tests/test_dpm_solver.py); "heun" is also third order.
    order_test_options: ClassVar[dict[str, Any]] = {"solver_type": "heun"}

    def __post_init__(self) -> None:
        _check(self.order, (1, 2, 3), self.solver_type)
        r = self.nodes()
        if any(not 0.0 < v < 1.0 for v in r[1:]) or list(r) != sorted(set(r)):
            raise ValueError(f"node ratios must satisfy 0 < r1 < r2 < 1, got r1={self.r1}, r2={self.r2}")
        if (self.order < 3 and self.r2 is not None) or (self.order < 2 and self.r1 is not None):
            raise ValueError(f"order {self.order} has no node ratio r1={self.r1}, r2={self.r2}")

    def nodes(self) -> tuple[float, ...]:
        """``(0, r1[, r2])`` for this order."""
        r1 = self.r1 if self.r1 is not None else (0.5 if self.order == 2 else 1.0 / 3.0)
        return (0.0, r1, self.r2 if self.r2 is not None else 2.0 / 3.0)[: self.order]

    def nfe_for_steps(self, steps: int, to_zero: bool) -> int:
        return self.order * steps - ((self.order - 1) if to_zero else 0)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: None) -> tuple[Tensor, None]:
        c = interval(problem.schedule, ts, i)
        r = self.nodes() if c.sigma_next > 0 else (0.0,)  # first order into sigma = 0
        fn = output_fn(problem.schedule, problem.denoise, "noise")  # eps(x, t)
        x_next, _ = singlestep_update(problem.schedule, fn, x, c.t, c.t_next, r, "noise", solver_type=self.solver_type)
        return x_next, None


def fast_orders(steps: int, order: int, *, lower_order_final: bool = True, to_zero: bool = False) -> list[int]:
    """Orders of the singlestep groups for an N-step grid (sum = N). ``lower_order_final=False``
    keeps every group at order >= 2 (``[3]*(m-1) + [2, 2]`` for N = 3m + 1); ``to_zero`` splits a
    last group of order k > 1 into ``[k - 1, 1]``."""
    if order not in (2, 3) or steps < 1:
        raise ValueError(f"need order 2 or 3 and steps >= 1, got order={order}, steps={steps}")
    m, rem = divmod(steps, order)
    if order == 2 or rem == 2 or (rem == 1 and m == 0):
        orders = [order] * m + ([rem] if rem else [])
    elif not lower_order_final:
        orders = [3] * m if rem == 0 else [3] * (m - 1) + [2, 2]
    else:
        orders = [3] * (m - 1) + [2, 1] if rem == 0 else [3] * m + [1]
    if to_zero and orders[-1] > 1:
        orders[-1:] = [orders[-1] - 1, 1]
    return orders


@register("dpm_solver_fast")
@dataclass(frozen=True)
class DPMSolverFast(Solver[tuple[Any, ...]]):
    order: int = 3  # highest order of a group (2 or 3)
    lower_order_final: bool = True  # the paper's order lists ending in [..., 2, 1] / [..., 1]
    solver_type: str = "midpoint"  # "midpoint" | "heun"

    paper = PAPER
    # as dpm_solver: "midpoint" reaches slope 3 only from ~96 steps (32 groups) on; see the tests
    order_test_options: ClassVar[dict[str, Any]] = {"lower_order_final": False, "solver_type": "heun"}

    def __post_init__(self) -> None:
        _check(self.order, (2, 3), self.solver_type)

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> tuple[Any, ...]:
        orders = fast_orders(
            len(ts) - 1,
            self.order,
            lower_order_final=self.lower_order_final,
            to_zero=ends_at_zero(problem.schedule, ts),
        )
        starts = [sum(orders[:g]) for g in range(len(orders))]
        return (tuple(zip(starts, orders)), None)  # groups (first step, order); group in progress

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: tuple[Any, ...]) -> tuple[Tensor, Any]:
        groups, run = state
        b, k = next((b, k) for b, k in groups if b <= i < b + k)
        j = i - b  # position inside the group
        x_s, ms = (x, []) if j == 0 else run
        ms = [*ms, _eps(problem, x, float(ts[i]))]  # output at node j
        sch = problem.schedule
        c = span(sch, ts[b], ts[b + k])
        r = [span(sch, ts[b], ts[b + n]).h / c.h for n in range(k)]  # nodes are the grid points
        if j == k - 1:
            return singlestep_final(c, x_s, ms, r, "noise", solver_type=self.solver_type), (groups, None)
        return singlestep_node(span(sch, ts[b], ts[i + 1]), x_s, ms, r, "noise"), (groups, (x_s, ms))


@register("dpm_solver_multistep")
@dataclass(frozen=True)
class DPMSolverMultistep(Solver[Buffer]):
    order: int = 2  # 2 or 3 (warm-up with lower orders)
    lower_order_final: bool = True  # orders 1, 2 at the last steps of grids with < 15 steps
    solver_type: str = "midpoint"  # "midpoint" | "heun" (second-order coefficient)
    third_order_term: str = "taylor"  # "taylor" (third order) | "reference" (authors' code)

    paper = "Lu et al. 2022, multistep DPM-Solver in DPM-Solver++ (arXiv 2211.01095), noise form"
    order_test_options: ClassVar[dict[str, Any]] = {"lower_order_final": False}

    def __post_init__(self) -> None:
        _check(self.order, (2, 3), self.solver_type)
        if self.third_order_term not in THIRD_ORDER_TERMS:
            raise ValueError(f"unknown third_order_term {self.third_order_term!r}; allowed: {THIRD_ORDER_TERMS}")

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> Buffer:
        return Buffer()  # the engine's buffer of outputs (read as eps)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: Buffer) -> tuple[Tensor, Buffer]:
        c = interval(problem.schedule, ts, i)
        rule = dpm_solver_rule(
            self.order,
            len(state.lams) + 1,
            i,
            len(ts) - 1,
            lower_order_final=self.lower_order_final,
            to_zero=c.sigma_next == 0,
            form="noise",
            solver_type=self.solver_type,
            third_order_term=self.third_order_term,
        )
        return advance(problem, x, c, i, state, rule)
