"""Euler and Heun samplers of Karras, Aittala, Aila & Laine, "Elucidating the Design Space of
Diffusion-Based Generative Models", NeurIPS 2022, arXiv 2206.00364 (Algorithms 1 and 2).

Both integrate the PF-ODE in EDM coordinates ``y = x / alpha`` and ``s = sigma / alpha``
(``dy/ds = (y - x0) / s``), for any schedule; ``x = alpha y`` maps back. The noise level of a time
is ``s(t) = exp(-lam(t))`` and ``t(s) = t_of_lambda(-log s)``.

* ``euler``: one Euler step in ``s`` per model evaluation (k-diffusion ``sample_euler``); on every
  schedule this is algebraically DDIM(eta=0).
* ``heun``: Algorithm 2 — optional churn ``gamma = min(S_churn/N, sqrt(2) - 1)`` for
  ``S_tmin <= s <= S_tmax`` (noise ``sqrt(s_hat^2 - s^2) S_noise z``), an Euler step, then the
  trapezoidal (2nd-order) correction unless the step ends at ``sigma = 0``. ``S_tmin``/``S_tmax``
  are in noise level ``s``. NFE = 2N, or 2N - 1 when the grid ends at ``sigma = 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._expint import interval
from .base import Problem, Solver, register


@register("euler")
@dataclass(frozen=True)
class Euler(Solver[None]):
    @property
    def order(self) -> int:
        return 1

    paper = "Karras et al. 2022, EDM Algorithm 1 (arXiv 2206.00364)"

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: None) -> tuple[Tensor, None]:
        c = interval(problem.schedule, ts, i)
        s, s_next = c.sigma / c.alpha, c.sigma_next / c.alpha_next
        x0 = problem.denoise(x, c.t)
        # Euler step y' = y + (s' - s) (y - x0) / s with y = x / alpha, folded into two scalars:
        # x' = alpha' (s'/s) y + alpha' (1 - s'/s) x0
        r = s_next / s
        return torch.add(x * (c.alpha_next * r / c.alpha), x0, alpha=c.alpha_next * (1.0 - r)), None


@register("heun")
@dataclass(frozen=True)
class Heun(Solver[None]):
    S_churn: float = 0.0  # total churn; 0 = deterministic
    S_tmin: float = 0.0  # churn only for S_tmin <= s <= S_tmax
    S_tmax: float = math.inf
    S_noise: float = 1.0  # noise inflation

    @property
    def order(self) -> int:
        return 2

    evals_per_step = 2
    paper = "Karras et al. 2022, EDM Algorithm 2 (arXiv 2206.00364)"

    def __post_init__(self) -> None:
        if self.S_churn < 0 or self.S_noise < 0 or self.S_tmin < 0 or self.S_tmax < self.S_tmin:
            raise ValueError(
                f"need S_churn >= 0, S_noise >= 0 and 0 <= S_tmin <= S_tmax; got S_churn={self.S_churn}, "
                f"S_noise={self.S_noise}, S_tmin={self.S_tmin}, S_tmax={self.S_tmax}"
            )

    def is_stochastic(self) -> bool:
        return self.S_churn > 0

    def nfe_for_steps(self, steps: int, to_zero: bool) -> int:
        return 2 * steps - (1 if to_zero else 0)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: None) -> tuple[Tensor, None]:
        sch = problem.schedule
        c = interval(sch, ts, i)
        s_cur, s_next = c.sigma / c.alpha, c.sigma_next / c.alpha_next
        y = x / c.alpha
        # Increase noise temporarily.
        n_steps = len(ts) - 1
        gamma = min(self.S_churn / n_steps, math.sqrt(2.0) - 1.0) if self.S_tmin <= s_cur <= self.S_tmax else 0.0
        t_hat, s_hat, y_hat = c.t, s_cur, y
        if gamma > 0:
            s_hat = s_cur * (1.0 + gamma)
            t_hat = float(sch.t_of_sigma_over_alpha(s_hat))
            y_hat = y + math.sqrt(s_hat**2 - s_cur**2) * self.S_noise * problem.randn(i, x)
        a_hat = float(sch.alpha(t_hat))
        # Euler step.
        d_cur = (y_hat - problem.denoise(a_hat * y_hat, t_hat)) / s_hat
        y_next = y_hat + (s_next - s_hat) * d_cur
        # Apply 2nd order correction.
        if s_next != 0:
            d_prime = (y_next - problem.denoise(c.alpha_next * y_next, c.t_next)) / s_next
            y_next = y_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_prime)
        return c.alpha_next * y_next, None
