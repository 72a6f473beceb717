"""DualFast — Yu, Luo, Wang & Zhao, "DualFast: Dual-Speedup Framework for Fast Sampling of Diffusion
Models", arXiv 2506.13058 (2025).

The sampling error has two parts: the discretization error (what a high-order base solver reduces) and
the approximation error of the network, which the paper finds smaller at higher noise levels. DualFast
corrects the model output of the base's first-order term, at no extra evaluation, with an output cached
at an earlier, noisier time ``tau``::

    eps~(x_i, t_i) = (1 + c_i) eps(x_i, t_i) - c_i eps(x_tau, tau)          (prediction="noise")
    x0~(x_i, t_i)  = (1 + c_i) x0(x_i, t_i)  - c_i x0(x_tau, tau)           (prediction="data")

and the step is the base's step plus the change of its first-order term, written in data form::

    x_next = base_step(x_i) + b_0 (x0~ - x0),   b_0 = alpha_next (1 - e^{-h})   (alpha_next into sigma = 0)

with ``x0~ = (x - sigma_i eps~) / alpha_i`` in the noise form. For DDIM this is DDIM run on the mixed
output; for a multistep / higher-order base the difference terms keep the plain outputs (they account
for the discretization error). The output mixed is the one in the base's first-order term: its
evaluation at ``(x_i, t_i)``, or for UniPC the corrector's evaluation at ``t_i`` that it reuses.
``tau = "first"``: the grid's first time (``T``); ``"previous"``: the previous grid time. ``c_i`` grows
as sampling approaches low noise: ``"linear"`` ``c_i = c (t_0 - t_i) / (t_0 - t_N)``, or ``"constant"``
``c_i = c`` (from the second step on; ``c = 0`` is the base exactly).

Provenance and deviations: the mixing rule and the growing ``c_t`` are implemented as summarised in the
project's research notes (samplers.md §10, marked there as a secondary source); the paper's full text
and code could not be retrieved here, so the exact ``c_t`` schedule, the default ``c`` and the choice of
``tau`` are not verified against it. ``c``, ``tau``, ``c_schedule`` and ``prediction`` are therefore
options; see docs/methods/dualfast.md for what was measured. The correction is not consistent: with
``c > 0`` the sampler does not converge to the model's ODE solution as the steps shrink — it is meant to
compensate the model's error, not the solver's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from ._expint import interval
from .base import Problem, Solver, Wrapper, get, register

__all__ = ["DualFast", "DualFastState"]

TAUS = ("first", "previous")
C_SCHEDULES = ("linear", "constant")
PREDICTIONS = ("noise", "data")


@dataclass(frozen=True)
class DualFastState:
    base: Any = None  # the wrapped solver's state
    m_first: Tensor | None = None  # model output (eps or x0) at (x_0, t_0)
    m_prev: Tensor | None = None  # model output at the previous step's (x, t)
    pending: tuple[Tensor, Tensor] | None = None  # (x, x0) of a call at the next grid time (UniPC's corrector)


class _Recorder:
    """A model wrapper that records every call ``(x, t, x0)`` (no extra evaluation)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls: list[tuple[Tensor, Tensor, Tensor]] = []

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        out = self.model(x, t, **cond)
        self.calls.append((x, t, out))
        return out

    def at(self, t: float) -> list[tuple[Tensor, Tensor]]:
        return [(x, out) for x, tt, out in self.calls if bool((tt == t).all())]


@register("dualfast")
@dataclass(frozen=True)
class DualFast(Wrapper[DualFastState]):
    base: Solver[Any] = field(default_factory=lambda: get("ddim"))  # the wrapped solver
    c: float = 0.5  # mixing coefficient (its value at the end of sampling for c_schedule="linear")
    tau: str = "first"  # earlier time whose cached output is mixed in: "first" (T) | "previous"
    c_schedule: str = "linear"  # "linear" (grows from 0 at t_0 to c at t_N) | "constant"
    prediction: str = "noise"  # mix eps ("noise") or x0 ("data")

    paper = "Yu et al. 2025, DualFast (arXiv 2506.13058)"
    order_test_options: ClassVar[dict[str, Any]] = {"c": 0.0}

    def __post_init__(self) -> None:
        if isinstance(self.base, Mapping):  # from config(): {"name": ..., **options}
            object.__setattr__(self, "base", get(**self.base))
        if not isinstance(self.base, Solver):
            raise ValueError(f"base must be a Solver, got {self.base!r}")
        if not math.isfinite(self.c):
            raise ValueError(f"c must be finite, got {self.c}")
        for name, value, allowed in (("tau", self.tau, TAUS), ("c_schedule", self.c_schedule, C_SCHEDULES),
                                     ("prediction", self.prediction, PREDICTIONS)):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> DualFastState:
        return DualFastState(base=self.base.init(problem, x, ts))

    def c_at(self, ts: Tensor, i: int) -> float:
        """``c_i`` of step ``i``."""
        if self.c_schedule == "constant":
            return self.c
        t0, tn = float(ts[0]), float(ts[-1])
        return self.c * (t0 - float(ts[i])) / (t0 - tn)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: DualFastState) -> tuple[Tensor, Any]:
        if self.c == 0.0:
            x_next, base_state = self.base.step(problem, x, ts, i, state.base)
            return x_next, dataclasses.replace(state, base=base_state)
        c = interval(problem.schedule, ts, i)
        rec = _Recorder(problem.model)
        x_next, base_state = self.base.step(dataclasses.replace(problem, model=rec), x, ts, i, state.base)
        now = rec.at(c.t)  # the base's evaluation at t_i, or the one it reused from the last step (UniPC)
        pair = now[0] if now and (rec.calls[0][1] == c.t).all() else state.pending
        if pair is None:
            raise ValueError(f"dualfast: base solver {self.base.name!r} made no model evaluation at t_i")
        x_i, x0 = pair
        x0 = x0.to(x.dtype)  # x0(x_i, t_i): the output in the base's first-order term
        m = x0 if self.prediction == "data" else (x_i - c.alpha * x0) / c.sigma  # the mixed output, plain
        m_tau = state.m_first if self.tau == "first" else state.m_prev
        if m_tau is not None:
            c_i = self.c_at(ts, i)
            dm = c_i * (m - m_tau)  # m~ - m = c_i (m(x_i, t_i) - m(x_tau, tau))
            dx0 = dm if self.prediction == "data" else (-c.sigma / c.alpha) * dm  # x0~ - x0
            b0 = c.alpha_next if c.sigma_next == 0 else -c.alpha_next * math.expm1(-c.h)  # first-order weight
            x_next = x_next + b0 * dx0
        first = state.m_first if state.m_first is not None else m
        ahead = rec.at(c.t_next)
        return x_next, DualFastState(base_state, first, m, ahead[-1] if ahead else None)
