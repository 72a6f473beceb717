"""DEIS — Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator", ICLR 2023,
arXiv 2204.13902.

Implements the multistep exponential integrators tAB-DEIS and rhoAB-DEIS. In
``y = x / alpha`` and ``rho = sigma / alpha`` the PF-ODE is ``dy/drho = eps`` exactly (the
exponential integrator), and eps is extrapolated by the Lagrange polynomial through the last ``r``
evaluations in a variable ``u``::

    x_next = (alpha_next / alpha) x + alpha_next sum_j C_j eps_j,
    C_j    = int_{rho}^{rho_next} prod_{k != j} (u(rho') - u_k) / (u_j - u_k) drho'

* ``variant="t"``      tAB: ``u = t`` (the paper's main method)
* ``variant="rho"``    rhoAB: ``u = rho``
* ``variant="logrho"`` ``u = log rho = -lam``: diffusers' ``DEISMultistepScheduler(solver_type="logrho")``

The weights ``C_j`` are integrated by Gauss-Legendre quadrature in ``lam`` (``drho = -e^-lam dlam``;
the integrand is smooth in ``lam``) with 32 nodes in float64; order 1 (``C_0 = rho_next - rho``) is
DDIM. The first ``r - 1`` steps use the orders the history allows (as the authors' code).

Deviations: the authors' code integrates ``C_j`` by a 10^4-point left Riemann sum, we use
Gauss-Legendre. ``lower_order_final`` follows diffusers (not in the paper): with fewer than 15 steps
the last step is first order and the one before at most second order. A step to ``sigma = 0`` is
always first order (``x = alpha_next x0``; ``log rho`` is undefined there); diffusers never steps to
0 (its last target is ``abar[0]``, ``final_sigmas_type`` is not offered for DEIS).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._utils import f64
from ._expint import Interval, interval
from .base import Problem, Solver, register

VARIANTS = ("t", "rho", "logrho")
_NODES = 32  # Gauss-Legendre nodes per step


@functools.cache
def _gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights on [-1, 1] (float64)."""
    return np.polynomial.legendre.leggauss(n)


@dataclass(frozen=True)
class EpsHistory:
    us: tuple[float, ...] = ()  # interpolation variable u of each stored eps, oldest first
    eps: tuple[Tensor, ...] = ()


@register("deis")
@dataclass(frozen=True)
class DEIS(Solver[EpsHistory]):
    order: int = 3  # r + 1: eps extrapolated from the last `order` evaluations (1 = DDIM)
    variant: str = "t"  # "t" (tAB), "rho" (rhoAB) or "logrho" (diffusers)
    lower_order_final: bool = True  # diffusers: orders 1 and <= 2 on the last two steps when N < 15

    paper = "Zhang & Chen 2022, DEIS (arXiv 2204.13902)"
    order_test_options = {"lower_order_final": False}

    def __post_init__(self) -> None:
        if not isinstance(self.order, int) or not 1 <= self.order <= 4:
            raise ValueError(f"order must be an int in 1..4, got {self.order!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> EpsHistory:
        return EpsHistory()

    def _u(self, problem: Problem, lam: Tensor) -> Tensor:
        """The interpolation variable at half log-SNR ``lam`` (float64): t, rho = e^-lam or log rho."""
        if self.variant == "t":
            return problem.schedule.t_of_lambda(lam)
        return torch.exp(-lam) if self.variant == "rho" else -lam

    def weights(self, problem: Problem, c: Interval, us: tuple[float, ...]) -> list[float]:
        """``C_j`` for the nodes ``us`` (oldest first) over the step ``c``; the last node is at ``c.t``."""
        if len(us) == 1:
            return [c.sigma_next / c.alpha_next - c.sigma / c.alpha]  # rho_next - rho
        z, w = (torch.as_tensor(v, dtype=torch.float64) for v in _gauss_legendre(_NODES))
        lam_q = c.lam + 0.5 * c.h * (z + 1.0)  # quadrature nodes in lam
        drho = -torch.exp(-lam_q) * (0.5 * c.h) * w  # drho = -e^-lam dlam, times the weights
        u_q = self._u(problem, lam_q)
        out = []
        for j, uj in enumerate(us):  # Lagrange basis polynomial L_j(u)
            lj = torch.ones_like(u_q)
            for k, uk in enumerate(us):
                if k != j:
                    lj = lj * (u_q - uk) / (uj - uk)
            out.append(float((lj * drho).sum()))
        return out

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: EpsHistory) -> tuple[Tensor, EpsHistory]:
        c, n = interval(problem.schedule, ts, i), len(ts) - 1
        x0 = problem.denoise(x, c.t)  # data prediction at (x, t)
        if c.sigma_next == 0:  # step to sigma = 0: first order in data form
            return c.alpha_next * x0, state
        eps = (x - c.alpha * x0) / c.sigma  # noise prediction
        u = c.t if self.variant == "t" else float(self._u(problem, f64(c.lam)))  # this node's u
        hist = EpsHistory((state.us + (u,))[-self.order :], (state.eps + (eps,))[-self.order :])
        r = len(hist.eps)  # warm-up: the orders the history allows
        if self.lower_order_final and n < 15:
            r = min(r, n - i)  # diffusers: order 1 on the last step, <= 2 on the one before
        C = self.weights(problem, c, hist.us[-r:])
        x_next = c.alpha_ratio * x  # exponential integrator: (alpha_next/alpha) x + alpha_next sum C_j eps_j
        for Cj, ej in zip(C, hist.eps[-r:]):
            x_next = x_next + (c.alpha_next * Cj) * ej
        return x_next, hist
