"""Time-Shift Sampler — Li, Qu, Yao, Sun & Moens, "Alleviating Exposure Bias in Diffusion Models
through Sampling with Shifted Time Steps", ICLR 2024, arXiv 2305.15583.

Exposure bias: the sampler's ``x_t`` does not have the statistics of a true ``x_t``; a nearby time
``t_s`` is "better coupled" with it. The paper's rule (Alg. 1/2), per sample, at every step whose
training index exceeds the cutoff ``c``::

    t_s = argmin_{tau in {t_i + k / N : |k| <= w // 2}} | Var(x) - (1 - abar_tau) |

with ``Var(x)`` the variance over all coordinates of that sample and ``1 - abar = sigma^2`` (VP);
``N`` is the training-index resolution (``DiscreteVP.n_train``, else ``n_train``). ``data_var = v0``, the
data's mean per-sample variance over coordinates, generalises the target to ``alpha_tau^2 v0 +
sigma_tau^2``, the expected ``Var(x)`` of a true ``x_tau`` (0: the paper's rule).
The network is then evaluated at ``(x, t_s)`` and the step runs from ``t_s`` to the next grid time.

How a per-sample ``t_s`` flows through a base solver with scalar-time coefficients: the one
evaluation ``x0_s = x0(x, t_s)`` (``Problem.denoise`` takes ``(B,)`` times) fixes ``eps_s = (x -
alpha_s x0_s) / sigma_s``; the state is carried to the nominal time by the first-order (DDIM) flow map
that keeps ``(x0_s, eps_s)``, ``x~ = alpha_i x0_s + sigma_i eps_s``; the base then steps from ``x~`` at
``t_i`` and its first evaluation, at ``(x~, t_i)``, is served ``x0_s`` (no second call). For DDIM the
result is exactly TS-DDIM, ``x_next = alpha_next x0_s + sigma_next eps_s``, the paper's update; any base
whose step starts by evaluating at ``(x, t_i)`` (DDIM, DDPM, Heun, DPM-Solver(++), DEIS, PNDM, ...) can be
wrapped, and the NFE is the base's; bases that reuse a corrector's evaluation (UniPC, UniC) raise.
Samples with ``t_s = t_i`` go through unchanged.

Deviations from the authors' code (TS-DPM ``apply_time_shift`` / ``DPM_Solver.time_shift``): their
PNDM path moves the *target* of a step to a time chosen around the *next* index, their DPM-Solver path
takes the variance of the cached model output; we follow the paper's rule on the current state, keep
nominal ``lam`` values in multistep histories, and (like them) never shift the first step, which starts
from exact noise. The window is in training-index units of a time axis on ``[0, 1]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._utils import append_dims, f64
from ..schedules import NoiseSchedule
from .base import FirstEvaluation, Problem, Solver, Wrapper, get, register

__all__ = ["TimeShift", "shifted_time"]

PAPER = "Li et al. 2024, Time-Shift Sampler (arXiv 2305.15583)"


def shifted_time(
    schedule: NoiseSchedule, x: Tensor, t: float, window: int, n_train: int, data_var: float = 0.0
) -> Tensor:
    """Per-sample ``t_s`` (float64, ``(B,)``): the candidate ``t + k / n_train``, ``|k| <= window // 2``
    (clipped to the schedule), whose variance ``sigma^2 + data_var alpha^2`` is nearest to ``Var(x)``."""
    var = f64(x).flatten(1).var(dim=1)  # per-sample variance over all coordinates (unbiased, as the authors)
    k = torch.arange(-(window // 2), window // 2 + 1, dtype=torch.float64, device=x.device)
    cand = (t + k / n_train).clamp(schedule.t_min, schedule.t_max)  # (K,)
    target = schedule.sigma(cand) ** 2 + data_var * schedule.alpha(cand) ** 2  # 1 - abar_tau (+ alpha^2 v0)
    j = (var[:, None] - target[None, :]).abs().argmin(dim=1)  # ties: the smallest time
    return cand[j]


@register("time_shift")
@dataclass(frozen=True)
class TimeShift(Wrapper[Any]):
    base: Solver[Any] = field(default_factory=lambda: get("ddim"))  # the wrapped solver
    window: int = 30  # w: candidates t_i + k / N, |k| <= w // 2 (training indices); < 2 = no shift
    cutoff: int = 300  # c: shift only while the training index N t_i - 1 exceeds c
    n_train: int | None = None  # N; None: the schedule's n_train (DiscreteVP), else 1000
    data_var: float = 0.0  # v0 (data's mean per-sample variance): match alpha^2 v0 + sigma^2 (0 = the paper)

    paper = PAPER
    order_test_options: ClassVar[dict[str, Any]] = {"window": 0}

    def __post_init__(self) -> None:
        if isinstance(self.base, Mapping):  # from config(): {"name": ..., **options}
            object.__setattr__(self, "base", get(**self.base))
        if not isinstance(self.base, Solver):
            raise ValueError(f"base must be a Solver, got {self.base!r}")
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 0:
            raise ValueError(f"window must be an int >= 0, got {self.window!r}")
        if not isinstance(self.cutoff, int) or isinstance(self.cutoff, bool):
            raise ValueError(f"cutoff must be an int (a training index), got {self.cutoff!r}")
        if self.n_train is not None and (not isinstance(self.n_train, int) or self.n_train < 1):
            raise ValueError(f"n_train must be None or a positive int, got {self.n_train!r}")
        if not self.data_var >= 0.0:
            raise ValueError(f"data_var must be >= 0, got {self.data_var}")

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> Any:
        if self.window // 2 > 0 and problem.schedule.t_max > 1.0:
            raise ValueError(f"time_shift's window is in training indices of a [0, 1] time axis; {problem.schedule!r}")
        return self.base.init(problem, x, ts)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        sch, t = problem.schedule, float(ts[i])
        n = self.n_train or int(getattr(sch, "n_train", 1000))
        if self.window // 2 == 0 or i == 0 or t * n - 1.0 <= self.cutoff:
            return self.base.step(problem, x, ts, i, state)  # no shift: the base itself
        t_s = shifted_time(sch, x, t, self.window, n, self.data_var)  # (B,) per-sample shifted times
        if bool((t_s == t).all()):
            return self.base.step(problem, x, ts, i, state)
        x0_s = problem.denoise(x, t_s)  # x0(x, t_s): the step's one evaluation at the shifted times
        a_s, s_s = (append_dims(v, x.ndim).to(x.dtype) for v in (sch.alpha(t_s), sch.sigma(t_s)))
        eps_s = (x - a_s * x0_s) / s_s  # eps at the shifted times
        a, s = float(sch.alpha(f64(t))), float(sch.sigma(f64(t)))
        moved = append_dims(t_s != t, x.ndim).to(x.device)
        x_nom = torch.where(moved, a * x0_s + s * eps_s, x)  # to the nominal t_i keeping (x0_s, eps_s)
        view = FirstEvaluation.of(problem, t, lambda xx, evaluate: x0_s.to(xx.dtype), "time_shift")
        x_next, state = self.base.step(view, x_nom, ts, i, state)
        if not view.answers:
            raise ValueError(f"time_shift: base solver {self.base.name!r} did not evaluate the model at (x, t_i)")
        return x_next, state
