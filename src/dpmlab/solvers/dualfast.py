"""DualFast — Yu, Luo, Wang & Zhao, "DualFast: Dual-Speedup Framework for Fast Sampling of Diffusion
Models", arXiv 2506.13058 (2025; submitted to ICLR 2025).

The sampling error has two parts: the discretization error (what a high-order base solver reduces) and
the approximation error of the network, which the paper finds smaller at higher noise levels. DualFast
mixes, at no extra evaluation, the model output at ``(x_i, t_i)`` with an output at an earlier, noisier
time ``tau``::

    eps~_i = (1 + c_i) eps(x_i, t_i) - c_i eps(x_tau, tau)          (prediction="noise")
    x0~_i  = (1 + c_i) x0(x_i, t_i)  - c_i x0(x_tau, tau)           (prediction="data")

and replaces, in the first-order (DDIM) part of the step ``x_{i+1} = alpha_{i+1} x0 + sigma_{i+1} eps``,

* ``replace="explicit"``: only the explicit output — ``x_{i+1} = base_step(x_i) + sigma_{i+1}
  (eps~_i - eps_i)`` (noise form; data form: ``+ alpha_{i+1} (x0~_i - x0_i)``). This is the reading the
  only equation-level source states: an ICLR 2025 review of the paper says the paper replaces the
  explicit eps and keeps the eps inside x0^;
* ``replace="both"`` (default): both, i.e. the base's first-order term on the mixed output —
  ``x_{i+1} = base_step(x_i) + b_0 (x0~_i - x0_i)``, ``b_0 = alpha_{i+1} (1 - e^{-h})``; for DDIM this is
  DDIM run on the mixed output. The default by measurement: "explicit" never beat its base on a model
  with a controlled error, for any c and tau tried, and diverges as the steps grow with ``tau="first"``
  (docs/methods/dualfast.md) — which contradicts the paper's reported gains.

Higher-order terms of a multistep base keep the plain outputs. ``tau = "first"``: the grid's first time
(``T``); ``"previous"``: the previous grid time. ``c_i``: ``"linear"`` ``c (t_0 - t_i) / (t_0 - t_N)`` or
``"constant"`` ``c`` (from the second step on). ``c = 0`` is the base exactly. The paper's ``tau`` and
``c_t`` schedule are not known (the method section could not be retrieved); they are options.

The wrapper uses the base's public ``init``/``step`` only: it evaluates ``x0(x_i, t_i)`` itself and hands
the base a view of the problem that answers a call with exactly those inputs from that evaluation (no
second call). A base that does not evaluate the model at ``(x_i, t_i)`` in its step — a
predictor-corrector (``unipc``, ``unic``) reuses its corrector's evaluation at the predicted point — would
cost an extra evaluation: refused with a ``ValueError`` (wrap ``unipc`` with ``use_corrector=False``).

Consistency: with ``c > 0`` the correction does not vanish as the steps shrink, except ``replace="both"``
with ``tau="previous"`` (a first-order method): DualFast targets the model's error, not the solver's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import f64
from ._expint import interval
from .base import Problem, Solver, Wrapper, get, register

__all__ = ["DualFast", "DualFastState", "REPLACES"]

TAUS = ("first", "previous")
C_SCHEDULES = ("linear", "constant")
PREDICTIONS = ("noise", "data")
REPLACES = ("explicit", "both")


@dataclass(frozen=True)
class DualFastState:
    base: Any = None  # the wrapped solver's state
    m_first: Tensor | None = None  # model output (eps or x0) at (x_0, t_0)
    m_prev: Tensor | None = None  # model output at the previous step's (x, t)


@dataclass(frozen=True)
class _Evaluated(Problem):
    """A view of a problem that answers a call at ``(x, t)`` — already evaluated by the wrapper — with that
    evaluation (not counted again); every other call passes through to ``parent``."""

    parent: Problem | None = None
    x: Tensor | None = None
    t: float = 0.0
    x0: Tensor | None = None
    hits: list[int] = field(default_factory=list)

    def _same(self, x: Tensor) -> bool:
        """The same point up to rounding (a base may rebuild x, e.g. ``alpha * (x / alpha)``): 16 ulp of its
        largest entry."""
        assert self.x is not None
        tol = 16 * torch.finfo(self.x.dtype).eps * float(self.x.abs().max())
        return bool((x - self.x).abs().max() <= tol)

    @classmethod
    def of(cls, problem: Problem, x: Tensor, t: float, x0: Tensor) -> _Evaluated:
        fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(Problem)}
        return cls(**fields, parent=problem, x=x, t=t, x0=x0)

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        assert self.parent is not None and self.x is not None and self.x0 is not None
        if x.shape == self.x.shape and bool((f64(t).reshape(-1) == self.t).all()) and self._same(x):
            self.hits.append(1)
            return self.x0.to(x.dtype)
        return self.parent.denoise(x, t)


@register("dualfast")
@dataclass(frozen=True)
class DualFast(Wrapper[DualFastState]):
    base: Solver[Any] = field(default_factory=lambda: get("ddim"))  # the wrapped solver
    c: float = 0.5  # mixing coefficient (its value at the end of sampling for c_schedule="linear")
    tau: str = "first"  # earlier time whose output is mixed in: "first" (T) | "previous"
    c_schedule: str = "linear"  # "linear" (grows from 0 at t_0 to c at t_N) | "constant"
    prediction: str = "noise"  # mix eps ("noise") or x0 ("data")
    replace: str = "both"  # "both": the DDIM part on the mixed output | "explicit": only its explicit output

    paper = "Yu et al. 2025, DualFast (arXiv 2506.13058)"
    # differs from its base and stays consistent (first order): mixing with the previous output, both terms.
    # Not DDIM with c = 0.5: on a uniform-lambda grid that is exactly DPM-Solver++(2M) (measured order 1.9)
    order_test_options: ClassVar[dict[str, Any]] = {
        "base": {"name": "dpm_solver_pp"},
        "c": 0.25,
        "tau": "previous",
        "c_schedule": "constant",
        "replace": "both",
    }

    def __post_init__(self) -> None:
        if isinstance(self.base, Mapping):  # from config(): {"name": ..., **options}
            object.__setattr__(self, "base", get(**self.base))
        if not isinstance(self.base, Solver):
            raise ValueError(f"base must be a Solver, got {self.base!r}")
        if isinstance(self.c, bool) or not isinstance(self.c, (int, float)) or not math.isfinite(self.c):
            raise ValueError(f"c must be a finite number, got {self.c!r}")
        for name, value, allowed in (
            ("tau", self.tau, TAUS),
            ("c_schedule", self.c_schedule, C_SCHEDULES),
            ("prediction", self.prediction, PREDICTIONS),
            ("replace", self.replace, REPLACES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")

    @property
    def order(self) -> int:
        """The base's order at ``c = 0``; else at most 1 (first order only for ``replace="both"``,
        ``tau="previous"``; otherwise nominal — the correction does not vanish as the steps shrink)."""
        return self.base.order if self.c == 0.0 else min(self.base.order, 1)

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> DualFastState:
        return DualFastState(base=self.base.init(problem, x, ts))

    def c_at(self, ts: Tensor, i: int) -> float:
        """``c_i`` of step ``i``."""
        if self.c_schedule == "constant":
            return float(self.c)
        t0, tn = float(ts[0]), float(ts[-1])
        return self.c * (t0 - float(ts[i])) / (t0 - tn)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: DualFastState) -> tuple[Tensor, Any]:
        if self.c == 0.0:
            x_next, base_state = self.base.step(problem, x, ts, i, state.base)
            return x_next, dataclasses.replace(state, base=base_state)
        c = interval(problem.schedule, ts, i)
        x0 = problem.denoise(x, c.t)  # x0(x_i, t_i); the base's own call there is answered from it
        view = _Evaluated.of(problem, x, c.t, x0)
        x_next, base_state = self.base.step(view, x, ts, i, state.base)
        if not view.hits:
            raise ValueError(
                f"dualfast: base {self.base.name!r} did not evaluate the model at (x_i, t_i) in step {i} "
                "(a predictor-corrector reuses its corrector's evaluation), so the correction would cost "
                "an extra evaluation; use a base that evaluates there (ddim, dpm_solver_pp, deis, heun, "
                "unipc with use_corrector=False, ...)"
            )
        m = x0 if self.prediction == "data" else (x - c.alpha * x0) / c.sigma  # the mixed output, plain
        m_tau = state.m_first if self.tau == "first" else state.m_prev
        if m_tau is not None:
            dm = self.c_at(ts, i) * (m - m_tau)  # m~ - m = c_i (m(x_i, t_i) - m(x_tau, tau))
            if self.replace == "explicit":  # x_{i+1} = alpha' x0 + sigma' eps: the explicit output only
                x_next = x_next + (c.sigma_next if self.prediction == "noise" else c.alpha_next) * dm
            else:  # the first-order term b_0 x0 on the mixed output
                dx0 = dm if self.prediction == "data" else (-c.sigma / c.alpha) * dm  # x0~ - x0
                b0 = c.alpha_next if c.sigma_next == 0 else -c.alpha_next * math.expm1(-c.h)
                x_next = x_next + b0 * dx0
        first = state.m_first if state.m_first is not None else m
        return x_next, DualFastState(base_state, first, m)
