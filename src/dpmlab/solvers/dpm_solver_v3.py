"""DPM-Solver-v3 — Zheng, Lu, Chen & Zhu, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical
Model Statistics", NeurIPS 2023, arXiv 2310.13268: the multistep predictor-corrector (Algorithms 1-2).

With ``f = (sigma eps - l x) / alpha`` and the empirical model statistics (EMS) ``l, s, b`` (per dimension,
functions of ``lam``; ``dpmlab.calibrate.fit_ems``), ``ΔL = ∫_{lam_s} l``, ``ΔS = ∫_{lam_s} s``, the exact
solution (eq. 9) expanded in ``g = e^{-ΔS} f - β``, ``β(lam) = ∫_{lam_s}^{lam} e^{-ΔS} b`` (eq. 8) is (eq. 14)::

    x_t = alpha_t e^{-ΔL_t} [ x_s / alpha_s - Eb - sum_{k<=n} E_k g^(k)(lam_s) ]
    E_k = ∫_{lam_s}^{lam_t} e^{ΔL + ΔS} (lam - lam_s)^k / k!,    Eb = ∫_{lam_s}^{lam_t} e^{ΔL + ΔS} β

with ``g^(k)`` from the previous ``n`` points by the Vandermonde system (eq. 13) or, with ``pseudo``, ``k!``
times Newton divided differences (Theorem 3.4). The corrector re-solves the last step with the new point
(Algorithm 2, line 12: order k of the previous predictor, or pseudo order k + 1) and keeps the new point's
``f`` fixed (line 13); it costs no evaluation and never follows the final step. ``l = 1, s = b = 0`` is
DPM-Solver++ and ``l = 0, s = -1, b = 0`` DPM-Solver (App. A; ``s = -1``, not 0, makes ``g = e^{-lam_s} eps``).
Pseudo orders >= 3 converge at order 2 (measured; the paper gives no guarantee).

Deviations from the authors' code (thu-ml/DPM-Solver-v3 @ba16871):
* Any grid: the code rounds the timesteps to the EMS grid; we keep the caller's grid and interpolate
  ``l, s, b`` linearly in ``lam``. Integrals are taken panel-wise between EMS knots (ΔL, ΔS exactly; the
  rest by 8-point Gauss-Legendre, ``β`` at the nodes by its collocation matrix), exact for the interpolant
  to ~1e-12 where the code uses trapezoids; so degenerate EMS reproduce DPM-Solver(++) to round-off. Grid
  points outside the EMS range raise. A step into ``sigma = 0`` is first order, ``x = alpha_t x0``.
* ``lower_order_final`` follows the library's rule (below 15 steps; see ``dpm_solver_pp``), the code's
  applies at any step count.
* Half-corrector: the paper (Sec. 3.3) uses the corrector "only in the time region t <= 0.5"; the released
  code (root ``dpm_solver_v3.py`` and the Stable-Diffusion codebase) only where the corrected point has ``t > 0.5``.
  We follow the code, as ``t > t_max / 2``: on exact guided mixtures the corrector's gain comes from
  ``t <= 0.5`` and the code's half behaves like no corrector, which is what Table 11 shows for UniPC
  (half 0.59 ~ DPM-Solver++ 0.60, full 0.65); see docs/methods/dpm_solver_v3.md.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from .._utils import f64
from ._ems import DEGENERATE, EMS, EMS_FORMAT, _Coeffs
from ._expint import interval, lincomb, multistep_order, taylor_weights
from .base import Problem, Solver, register

__all__ = ["EMS", "DPMSolverV3", "EMS_FORMAT", "DEGENERATE"]


# the statistics (EMS) and their integrals live in ``_ems`` (shared with USF's v3 steps)
class _Point(NamedTuple):
    lam: float
    alpha: float
    x: Tensor  # state at lam
    f: Tensor  # (sigma eps - l x) / alpha; the corrector keeps it (Algorithm 2, line 13)


def _derivatives(g: list[Tensor], lams: list[float], pseudo: bool) -> list[Tensor]:
    """``g^(k)(lam_0)``, k = 1..n, from values at ``lams`` (eq. 13, or Theorem 3.4 when ``pseudo``)."""
    n = len(g) - 1
    if pseudo:
        D, out = list(g), []
        for k in range(1, n + 1):  # Newton divided differences D_0^(k)
            D = [(D[j + 1] - D[j]) / (lams[j + k] - lams[j]) for j in range(n - k + 1)]
            out.append(math.factorial(k) * D[0])
        return out
    h = lams[1] - lams[0] if n else 1.0
    W = taylor_weights([(v - lams[0]) / h for v in lams])  # scaled Taylor derivatives h^k g^(k)
    return [lincomb(W[k], g) / h**k for k in range(1, n + 1)]


@register("dpm_solver_v3")
@dataclass(frozen=True)
class DPMSolverV3(Solver[tuple[Any, ...]]):
    ems: EMS | str | None = None  # fitted EMS, the path of a saved one, or None (degenerate statistics)
    degenerate: str | None = None  # without ems: "data" (default; DPM-Solver++) or "noise" (DPM-Solver)
    order: int = 3  # predictor order (paper: 3 unconditional, 2 guided); warm-up with lower orders
    pseudo_order: bool = False  # predictor derivatives by the pseudo-order rule (Theorem 3.4)
    use_corrector: bool = True  # Algorithm 2 corrector, no extra evaluation
    corrector_pseudo: bool = False  # corrector of pseudo order k + 1 instead of order k
    half_corrector: bool = False  # corrector only where t > t_max / 2 (released code; module docstring)
    lower_order_final: bool = True  # orders 1, 2 at the last steps of grids with < 15 steps

    paper = "Zheng et al. 2023, DPM-Solver-v3 (arXiv 2310.13268)"
    # the corrector's measured slope on the registry's 12..96 steps is 3.4 (pre-asymptotic; 2.8-3.5 up to 2048
    # steps, tests/test_dpm_solver_v3.py), so the registry measures the predictor
    order_test_options: ClassVar[dict[str, Any]] = {"lower_order_final": False, "use_corrector": False}

    def __post_init__(self) -> None:
        if not isinstance(self.order, int) or isinstance(self.order, bool) or not 1 <= self.order <= 4:
            raise ValueError(f"order must be an int in 1..4, got {self.order!r}")
        if self.degenerate is not None and (self.ems is not None or self.degenerate not in DEGENERATE):
            raise ValueError(
                f"degenerate must be one of {sorted(DEGENERATE)} and only without ems, "
                f"got degenerate={self.degenerate!r} with ems={type(self.ems).__name__}"
            )
        if isinstance(self.ems, os.PathLike):
            object.__setattr__(self, "ems", os.fspath(self.ems))  # keep config() JSON-able
        stats = EMS.load(self.ems) if isinstance(self.ems, str) else self.ems
        if stats is not None and not isinstance(stats, EMS):
            raise TypeError(f"ems must be an EMS, a path or None, got {type(stats).__name__}")
        object.__setattr__(self, "_stats", stats)

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> tuple[Any, ...]:
        st: EMS | None = self._stats  # type: ignore[attr-defined]
        if st is None:
            co = _Coeffs(f64([0.0]), *(f64([v]) for v in DEGENERATE[self.degenerate or "data"]))
        else:
            if torch.broadcast_shapes(st.l.shape[1:], x.shape[1:]) != x.shape[1:]:
                raise ValueError(f"EMS of data shape {tuple(st.l.shape[1:])} do not fit samples {tuple(x.shape)}")
            lam = problem.schedule.lam(f64(ts))
            lo, hi = float(lam[torch.isfinite(lam)].min()), float(lam[torch.isfinite(lam)].max())
            if lo < float(st.lam[0]) - 1e-6 or hi > float(st.lam[-1]) + 1e-6:
                raise ValueError(
                    f"grid spans lam in [{lo:.4g}, {hi:.4g}], outside the EMS range "
                    f"[{float(st.lam[0]):.4g}, {float(st.lam[-1]):.4g}] of {st.model!r}; refit the EMS"
                )
            co = _Coeffs(st.lam, st.l, st.s, st.b)
        co.lam, co.lsb = co.lam.to(x.device), co.lsb.to(x.device)
        return (co, (), 0)  # coefficients, history of _Point (newest first), previous predictor order

    def _update(self, co: _Coeffs, pts: list[_Point], lam_t: float, alpha_t: float, pseudo: bool) -> Tensor:
        """Local approximation (Algorithm 1, eq. 14) from ``pts[0]`` to ``lam_t`` using g at ``pts``."""
        s = pts[0]
        dL, E, Eb, dS, beta = co.integrals(s.lam, lam_t, [p.lam for p in pts[1:]], len(pts) - 1)
        to = lambda v: v.to(s.x)  # noqa: E731
        g = [s.f] + [torch.exp(-to(a)) * p.f - to(bt) for a, bt, p in zip(dS, beta, pts[1:])]  # eq. (8)
        acc = to(Eb) + to(E[0]) * g[0]
        for k, d in enumerate(_derivatives(g, [p.lam for p in pts], pseudo), start=1):
            acc = acc + to(E[k]) * d
        return alpha_t * torch.exp(-to(dL)) * (s.x / s.alpha - acc)

    def _corrects(self, problem: Problem, t: float) -> bool:
        """Whether the corrector acts on the point at ``t`` (half-corrector: only while ``t > t_max / 2``)."""
        return not self.half_corrector or t > 0.5 * problem.schedule.t_max

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: tuple[Any, ...]) -> tuple[Tensor, Any]:
        co, hist, k_prev = state
        c = interval(problem.schedule, ts, i)
        x0 = problem.denoise(x, c.t)
        l_s = co.at(f64([c.lam]).to(co.lam.device))[0, 0].to(x)
        cur = _Point(c.lam, c.alpha, x, ((x - c.alpha * x0) - l_s * x) / c.alpha)  # f = (sigma eps - l x) / alpha
        k_c = k_prev + int(self.corrector_pseudo)  # corrector order (Algorithm 2, line 12)
        if self.use_corrector and k_c > 1 and self._corrects(problem, c.t):
            cur = cur._replace(
                x=self._update(co, [hist[0], cur, *hist[1 : k_c - 1]], c.lam, c.alpha, self.corrector_pseudo)
            )
        hist = (cur, *hist)[: self.order]
        k = multistep_order(self.order, len(hist), i, len(ts) - 1, self.lower_order_final, c.sigma_next == 0)
        if c.sigma_next == 0:  # x = alpha_t x0 with x0 = ((1 - l) x - alpha f) / alpha
            return c.alpha_next * ((1 - l_s) * cur.x - c.alpha * cur.f) / c.alpha, (co, hist, k)
        return self._update(co, list(hist[:k]), c.lam_next, c.alpha_next, self.pseudo_order), (co, hist, k)
