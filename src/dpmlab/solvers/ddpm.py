"""DDPM ancestral sampling — Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models",
NeurIPS 2020, arXiv 2006.11239 (Algorithm 2), on any sub-grid (iDDPM respacing, arXiv 2102.09672).

For a step ``t -> t_next`` (``t_next < t``) let ``alpha_{t|n} = alpha / alpha_next`` and
``sigma_{t|n}^2 = sigma^2 - alpha_{t|n}^2 sigma_next^2`` (on a VP grid this is the respaced
``beta' = 1 - abar_t / abar_next``). The posterior ``q(x_next | x_t, x0)`` has

    mean     = (alpha_{t|n} sigma_next^2 / sigma^2) x + (alpha_next sigma_{t|n}^2 / sigma^2) x0
    variance = sigma_{t|n}^2 sigma_next^2 / sigma^2   ("fixed_small", beta-tilde)
             | sigma_{t|n}^2                          ("fixed_large", beta)

and the sample is ``mean + std z``. The step to ``sigma = 0`` adds no noise (Algorithm 2, t = 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from torch import Tensor

from ._expint import interval
from .base import Problem, Solver, register

VARIANCES = ("fixed_small", "fixed_large")


def posterior(problem: Problem, x: Tensor, ts: Tensor, i: int) -> tuple[Tensor, float, float]:
    """``(mean, var_small, var_large)`` of ``q(x_next | x, x0_hat(x, ts[i]))`` for the step ``ts[i] ->
    ts[i + 1]`` (one model evaluation; the module docstring's formulas) — the one copy, also used by
    edit-friendly inversion (``dpmlab.editing``)."""
    c = interval(problem.schedule, ts, i)
    if not c.t_next < c.t:
        raise ValueError("DDPM ancestral sampling needs a decreasing grid")
    x0 = problem.denoise(x, c.t)
    if c.sigma_next == 0:
        return c.alpha_next * x0, 0.0, 0.0
    a_tn = c.alpha / c.alpha_next
    # sigma_{t|n}^2 = sigma^2 (1 - e^{-2h}), computed with expm1 for small steps
    var_tn = -(c.sigma**2) * math.expm1(-2.0 * c.h)
    mean = (a_tn * c.sigma_next**2 / c.sigma**2) * x + (c.alpha_next * var_tn / c.sigma**2) * x0
    return mean, var_tn * c.sigma_next**2 / c.sigma**2, var_tn


@register("ddpm")
@dataclass(frozen=True)
class DDPM(Solver[None]):
    variance: Literal["fixed_small", "fixed_large"] = "fixed_small"  # posterior (beta~) or prior (beta)

    @property
    def order(self) -> int:
        return 1

    stochastic = True
    paper = "Ho et al. 2020, DDPM (arXiv 2006.11239)"

    def __post_init__(self) -> None:
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; allowed: {', '.join(VARIANCES)}")

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: None) -> tuple[Tensor, None]:
        mean, var_small, var_large = posterior(problem, x, ts, i)
        if var_large == 0.0:  # the step to sigma = 0 adds no noise
            return mean, None
        var = var_small if self.variance == "fixed_small" else var_large
        return mean + math.sqrt(var) * problem.randn(i, x), None
