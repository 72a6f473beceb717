"""DDIM — Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021, arXiv 2010.02502.

Implements eq. (12) with the eta-family of eq. (16), written on any schedule via
``h = lam_next - lam``:

    s      = eta * sigma_next * sqrt(1 - e^{-2h})            (eq. 16 in alpha/sigma form)
    x_next = alpha_next x0 + sqrt(sigma_next^2 - s^2) eps + s z

For ``eta = 0`` the update is computed in the equivalent exponential-integrator form
``x_next = (sigma_next/sigma) x - alpha_next expm1(-h) x0`` (= DPM-Solver++(1), = DPM-Solver-1),
which is exact at a step to ``sigma = 0`` (``x_next = alpha_next x0``). ``eta = 1`` is DDPM-like
ancestral sampling with the posterior variance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from ._expint import interval
from ._multistep import Taylor, update
from .base import Problem, Solver, register

FIRST_ORDER = Taylor()


@register("ddim")
@dataclass(frozen=True)
class DDIM(Solver[None]):
    eta: float = 0.0  # 0: deterministic DDIM; 1: ancestral (DDPM posterior variance)

    @property
    def order(self) -> int:
        return 1

    paper = "Song et al. 2021, DDIM (arXiv 2010.02502)"

    def __post_init__(self) -> None:
        if not (0.0 <= self.eta and math.isfinite(self.eta)):
            raise ValueError(f"eta must be a finite number >= 0, got {self.eta}")

    def is_stochastic(self) -> bool:
        return self.eta > 0

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: None) -> tuple[Tensor, None]:
        c = interval(problem.schedule, ts, i)
        x0 = problem.denoise(x, c.t)  # data prediction at (x, t)
        if self.eta == 0 or c.sigma_next == 0:
            # deterministic: the engine's first-order update, the exponential-integrator form of eq. (12)
            return update(c, x, (c.lam,), (x0,), FIRST_ORDER, "data"), None
        eps = (x - c.alpha * x0) / c.sigma  # noise prediction
        s = self.eta * c.sigma_next * math.sqrt(-math.expm1(-2.0 * c.h))  # eq. (16)
        if s > c.sigma_next:
            raise ValueError(f"eta={self.eta} gives noise std {s:.4g} above sigma_next={c.sigma_next:.4g}")
        direction = math.sqrt(c.sigma_next**2 - s * s)
        return c.alpha_next * x0 + direction * eps + s * problem.randn(i, x), None
