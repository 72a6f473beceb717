"""Differentiable sampling: a deterministic dpmlab solver run with gradients through all of its steps, so a
loss on the samples trains the network (MMD-DDM, Aiello, Valsesia & Magli 2023, arXiv 2301.07969, Sec. 3:
"the gradient of the MMD is backpropagated through the whole T'-step sampling chain"; authors' code
``functions/denoising.py::generalized_steps_diff`` and ``Model_gradient_checkpointing``).

The solver loop of ``solvers.base.sample`` is already written in differentiable torch operations (solver
coefficients are Python floats of the fixed grid; the state is a function of ``x`` and the model outputs), so
``sample_with_grad`` is that loop with one guard and one option (under ``torch.no_grad`` it is the plain loop):

* stochastic solvers are refused: a step that draws noise has no single gradient to report, and the fine-tune
  is defined for a fixed deterministic sampler (the paper uses DDIM with eta = 0);
* ``checkpoint=True`` wraps every step in ``torch.utils.checkpoint`` (non-reentrant): the activations inside
  a step are recomputed during the backward pass, so memory holds one step's activations plus the per-step
  states instead of all ``nfe`` network graphs. The gradient is the same up to float rounding (the
  recomputation is the same deterministic step; the tests check equality). The recomputation's model calls
  are not counted in ``problem.nfe``: that count stays the sampler's honest cost.

``Checkpointed`` is the wrapper doing the last point; it only uses its base's public ``init`` / ``step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from .base import Problem, Solver, Wrapper, sample

__all__ = ["Checkpointed", "sample_with_grad"]


@dataclass(frozen=True)
class Checkpointed(Wrapper[Any]):
    """``base`` with each step under ``torch.utils.checkpoint`` (non-reentrant): the same result and gradient,
    activations recomputed in the backward pass. Not registered: a training device, not a sampler of its own."""

    base: Solver[Any]

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> Any:
        return self.base.init(problem, x, ts)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        calls = [0]

        def run(x_in: Tensor) -> tuple[Tensor, Any]:
            n0 = problem.counter.n
            try:
                return self.base.step(problem, x_in, ts, i, state)
            finally:  # (torch may stop a recomputation early by raising; the count is restored then too)
                if calls[0]:  # a recomputation in the backward pass: not a sampler evaluation
                    problem.counter.n = n0
                calls[0] += 1

        out: tuple[Tensor, Any] = _checkpoint(run, x, use_reentrant=False)
        return out


def sample_with_grad(
    problem: Problem,
    x: Tensor,
    ts: Tensor,
    solver: Solver[Any],
    *,
    checkpoint: bool = False,
) -> Tensor:
    """Run the deterministic ``solver`` over ``ts`` from ``x`` (at ``ts[0]``) keeping the autograd graph of
    every step: ``d(loss of the result) / d(network parameters)`` and ``/ dx`` by ``loss.backward()``.
    ``checkpoint``: per-step activation checkpointing (less memory, one more forward pass per step in the
    backward pass, the same gradient). Returns ``(B, ...)`` like ``dpmlab.solvers.sample``."""
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a dpmlab Solver instance, got {type(solver).__name__}")
    if solver.is_stochastic():
        raise ValueError(
            f"solver {solver.name or type(solver).__name__!r} is stochastic; differentiable sampling "
            "needs a deterministic solver (e.g. ddim with eta=0)"
        )
    return sample(problem, x, ts, Checkpointed(solver) if checkpoint else solver)
