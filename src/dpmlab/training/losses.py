"""Training objectives: per-sample denoising losses.

* ``PredictionLoss`` — the "simple" loss of DDPM (Ho et al. 2020, arXiv 2006.11239, eq. 14) with an
  eps, x0 or v target (v: Salimans & Ho 2022, arXiv 2202.00512): draw ``t`` (a uniform training index
  for a ``DiscreteVP``, uniform in ``[t_min, t_max]`` otherwise), ``x_t = alpha x0 + sigma eps`` and
  regress the network's output on the target, unweighted.
* ``EDMLoss`` — EDM (Karras et al. 2022, arXiv 2206.00364, Sec. 5 and Table 1): ``ln sigma ~
  N(P_mean, P_std^2)``, ``x = x0 + sigma n``, preconditioned ``D = EDMPrecond(F)``, weight
  ``lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2``.

Randomness is injected: ``draw(generator, n)`` gives the noise levels and the trainer draws ``eps``, so
a global batch's randomness is a pure function of ``(seed, step)`` — the key to bit-exact resume and to
multi-process runs that equal a single process.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._utils import append_dims
from ..models.denoiser import discrete_net_time
from ..models.nets import EDMPrecond, ModelSpec, Objective
from ..schedules import DiscreteVP, NoiseSchedule

__all__ = ["DiffusionLoss", "PredictionLoss", "EDMLoss", "make_loss"]


class DiffusionLoss(ABC):
    """``loss(net, x0, t, eps, **cond) -> (B,)``; ``t`` from ``draw`` (float64, ``(B,)``)."""

    @abstractmethod
    def draw(self, generator: torch.Generator, n: int) -> Tensor:
        """``n`` noise levels (schedule times, or EDM sigmas), float64."""

    @abstractmethod
    def __call__(self, net: Callable[..., Tensor], x0: Tensor, t: Tensor, eps: Tensor, **cond: Any) -> Tensor: ...


def _mse(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).square().flatten(1).mean(1)  # (B,)


class PredictionLoss(DiffusionLoss):
    """Unweighted MSE to the eps / x0 / v target on ``schedule`` (DDPM's L_simple)."""

    def __init__(self, schedule: NoiseSchedule, objective: Objective) -> None:
        if objective is Objective.EDM:
            raise ValueError("use EDMLoss for the EDM objective")
        self.schedule = schedule
        self.objective = Objective(objective)
        self.net_time = discrete_net_time(schedule) if isinstance(schedule, DiscreteVP) else (lambda t: t)

    def draw(self, generator: torch.Generator, n: int) -> Tensor:
        sch = self.schedule
        if isinstance(sch, DiscreteVP):  # a uniform training index n in {0..N-1}; t = (n + 1) / N
            idx = torch.randint(0, sch.n_train, (n,), generator=generator)
            return sch.index_to_t(idx)
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        return sch.t_min + (sch.t_max - sch.t_min) * u

    def __call__(self, net: Callable[..., Tensor], x0: Tensor, t: Tensor, eps: Tensor, **cond: Any) -> Tensor:
        a = append_dims(self.schedule.alpha(t), x0.ndim).to(x0.dtype)
        s = append_dims(self.schedule.sigma(t), x0.ndim).to(x0.dtype)
        x_t = a * x0 + s * eps  # q(x_t | x0)
        out = net(x_t, self.net_time(t).to(x0.dtype), **cond)
        if self.objective is Objective.EPS:
            target = eps
        elif self.objective is Objective.X0:
            target = x0
        else:
            target = a * eps - s * x0  # v
        return _mse(out, target)


class EDMLoss(DiffusionLoss):
    """EDM's preconditioned, weighted denoising loss (Karras et al. 2022, eq. 8 and Table 1)."""

    def __init__(self, *, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2) -> None:
        if not (sigma_data > 0 and p_std > 0 and math.isfinite(p_mean)):
            raise ValueError(f"need sigma_data > 0 and p_std > 0, got sigma_data={sigma_data}, p_std={p_std}")
        self.sigma_data, self.p_mean, self.p_std = float(sigma_data), float(p_mean), float(p_std)

    def draw(self, generator: torch.Generator, n: int) -> Tensor:
        return torch.exp(self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=torch.float64))

    def __call__(self, net: Callable[..., Tensor], x0: Tensor, t: Tensor, eps: Tensor, **cond: Any) -> Tensor:
        sigma = t.to(x0.dtype)
        x = x0 + append_dims(sigma, x0.ndim) * eps
        d = EDMPrecond(net, self.sigma_data)(x, sigma, **cond)  # type: ignore[arg-type]
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2  # lambda(sigma)
        return weight * _mse(d, x0)


def make_loss(spec: ModelSpec, *, p_mean: float = -1.2, p_std: float = 1.2) -> DiffusionLoss:
    """The loss that trains a network of ``spec``."""
    if spec.objective is Objective.EDM:
        return EDMLoss(sigma_data=spec.sigma_data, p_mean=p_mean, p_std=p_std)
    return PredictionLoss(spec.make_schedule(), spec.objective)
