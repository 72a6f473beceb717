"""PNDM — Liu, Ren, Lin & Zhao, "Pseudo Numerical Methods for Diffusion Models on Manifolds",
ICLR 2022, arXiv 2202.09778.

Every method keeps DDIM's transfer ``phi(x, e, t, t')`` (the paper's eq. 9, written on any schedule)
and improves only the gradient part ``e`` with classical combinations of eps evaluations::

    phi(x, e, t, t') = (alpha'/alpha) x + (sigma' - alpha' sigma / alpha) e

* ``pndm``   F-PNDM: 3 pseudo Runge-Kutta steps (4 NFE each; midpoint ``t_m = (t + t')/2``:
  ``e1 = eps(x, t)``, ``e2 = eps(phi(x, e1, t, t_m), t_m)``, ``e3 = eps(phi(x, e2, t, t_m), t_m)``,
  ``e4 = eps(phi(x, e3, t, t'), t')``, ``e = (e1 + 2 e2 + 2 e3 + e4) / 6``), then pseudo linear
  multistep ``e = (55 e_0 - 59 e_-1 + 37 e_-2 - 9 e_-3) / 24`` (1 NFE). NFE = 4 min(N, 3) + max(N - 3, 0).
* ``s_pndm`` S-PNDM: one pseudo improved-Euler step (``e = (e1 + eps(phi(x, e1, t, t'), t')) / 2``,
  2 NFE), then ``e = (3 e_0 - e_-1) / 2``. NFE = N + 1.
* ``plms``   diffusers' ``PNDMScheduler(skip_prk_steps=True)`` (CompVis/crowsonkb PLMS, Stable
  Diffusion v1): the improved-Euler first step, then Adams-Bashforth 2, 3, then 4. NFE = N + 1.
* ``ipndm``  iPNDM of Zhang & Chen (DEIS, arXiv 2204.13902): no warm-up stages, Adams-Bashforth
  1, 2, 3, then 4 from the start. NFE = N.

The Adams-Bashforth weights are those of a uniform grid whatever the grid is (as in the paper and
diffusers). Because the transfer integrates eps against ``d(sigma/alpha)`` while the weights average
it in step index, the methods are second order on a generic grid (measured; F-PNDM and PLMS are
fourth order only on a grid uniform in ``sigma/alpha``); ``order = 2`` is declared.

A warm-up step that ends at ``sigma = 0`` would evaluate eps there, which is undefined: it is
replaced by the pseudo multistep step the history allows (1 NFE; DDIM on a one-step grid).
Multistep steps to ``sigma = 0`` are well defined and kept (diffusers' ``set_alpha_to_one=True``
does the same).

Deviations from diffusers: it steps between integer training indices with a fixed stride
``T // N`` (``prev = t - T // N``, the midpoint ``t - T // N // 2``, the last step to ``abar[0]``, or
to ``abar = 1`` with ``set_alpha_to_one``); we step along the given grid, the midpoint being the
arithmetic mean of continuous times. Pass the matching grid for parity. The authors' code indexes
``alphas_cump[t + 1]`` of a padded table (the same times, shifted by one index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ._expint import point
from .base import Problem, Solver, register

# Adams-Bashforth weights on a uniform grid, newest evaluation first
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


@dataclass(frozen=True)
class _Pseudo(Solver[tuple[Tensor, ...]]):
    """Pseudo numerical method: ``n_warmup`` pseudo one-step steps with ``stages`` evaluations
    (4: Runge-Kutta, 2: improved Euler), then pseudo Adams-Bashforth of order up to ``max_ab``.
    The state is the tuple of past eps at the grid points (oldest first)."""

    n_warmup: ClassVar[int]
    stages: ClassVar[int]
    max_ab: ClassVar[int]

    @property
    def order(self) -> int:
        return 2

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> tuple[Tensor, ...]:
        return ()

    def _warmup(self, i: int, n: int, to_zero: bool) -> bool:
        """Whether step i is a multi-stage warm-up step (never on a step to sigma = 0)."""
        return i < self.n_warmup and self.stages > 1 and not (to_zero and i == n - 1)

    def nfe_for_steps(self, steps: int, to_zero: bool) -> int:
        return sum(self.stages if self._warmup(i, steps, to_zero) else 1 for i in range(steps))

    def step(
        self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: tuple[Tensor, ...]
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        sch, n = problem.schedule, len(ts) - 1
        t, t_next = float(ts[i]), float(ts[i + 1])
        a, s, _ = point(sch, t)
        a_next, s_next, _ = point(sch, t_next)

        def eps(x_: Tensor, tt: float, a_: float, s_: float) -> Tensor:  # e_theta from the data prediction
            return (x_ - a_ * problem.denoise(x_, tt)) / s_

        def transfer(e: Tensor, a1: float, s1: float) -> Tensor:  # phi(x, e, t, t'), eq. (9)
            return (a1 / a) * x + (s1 - a1 * s / a) * e

        e1 = eps(x, t, a, s)  # eps at the grid point: the multistep history
        ets = (state + (e1,))[-4:]
        if self._warmup(i, n, s_next == 0):
            if self.stages == 2:  # pseudo improved Euler
                e2 = eps(transfer(e1, a_next, s_next), t_next, a_next, s_next)
                e = 0.5 * (e1 + e2)
            else:  # pseudo Runge-Kutta (4 stages)
                t_m = 0.5 * (t + t_next)
                a_m, s_m, _ = point(sch, t_m)
                e2 = eps(transfer(e1, a_m, s_m), t_m, a_m, s_m)
                e3 = eps(transfer(e2, a_m, s_m), t_m, a_m, s_m)
                e4 = eps(transfer(e3, a_next, s_next), t_next, a_next, s_next)
                e = (e1 + 2.0 * e2 + 2.0 * e3 + e4) / 6.0
        else:  # pseudo linear multistep: Adams-Bashforth of the order the history allows
            w = _AB[min(len(ets), self.max_ab)]
            e = sum(wk * ek for wk, ek in zip(w, reversed(ets)))  # type: ignore[assignment]
        return transfer(e, a_next, s_next), ets


@register("pndm")
@dataclass(frozen=True)
class FPNDM(_Pseudo):
    n_warmup, stages, max_ab = 3, 4, 4
    paper = "Liu et al. 2022, PNDM: F-PNDM (arXiv 2202.09778)"


@register("s_pndm")
@dataclass(frozen=True)
class SPNDM(_Pseudo):
    n_warmup, stages, max_ab = 1, 2, 2
    paper = "Liu et al. 2022, PNDM: S-PNDM (arXiv 2202.09778)"


@register("plms")
@dataclass(frozen=True)
class PLMS(_Pseudo):
    n_warmup, stages, max_ab = 1, 2, 4
    paper = "Liu et al. 2022, PNDM: PLMS as in diffusers PNDMScheduler(skip_prk_steps=True) (arXiv 2202.09778)"


@register("ipndm")
@dataclass(frozen=True)
class IPNDM(_Pseudo):
    n_warmup, stages, max_ab = 0, 1, 4
    paper = "Zhang & Chen 2022, DEIS: iPNDM (arXiv 2204.13902)"
