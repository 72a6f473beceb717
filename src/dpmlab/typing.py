"""Protocols shared by every layer, and the notation used throughout dpmlab.

Notation (fixed; solvers use these names):

=========  ==========================================================================
``x``      the state ``x_t``, shape ``(B, ...)``; ``q(x_t | x0) = N(alpha(t) x0, sigma(t)^2 I)``
``t``      continuous schedule time (never sigma, never -log sigma); ``t_next`` the target
``lam``    half log-SNR ``log(alpha / sigma)``; ``lam_next`` at ``t_next``; ``h = lam_next - lam``
``x0``     the data prediction ``E[x0 | x_t]`` — the only model output a solver ever sees
``eps``    the noise prediction ``(x - alpha x0) / sigma``
``i``      step index: a step goes from ``ts[i]`` to ``ts[i + 1]``
``r``      a ratio of step sizes in ``lam``
=========  ==========================================================================
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor

__all__ = ["DenoiserFn", "NoiseSampler"]


@runtime_checkable
class DenoiserFn(Protocol):
    """``x0 = model(x, t, **cond)``: ``x`` of shape ``(B, ...)``, ``t`` float64 of shape ``(B,)``."""

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor: ...


@runtime_checkable
class NoiseSampler(Protocol):
    """``z = noise(stream, like)``: standard normal noise shaped like ``like``; each call site passes
    its own integer ``stream`` so draws are reproducible and independent."""

    def __call__(self, stream: int, like: Tensor) -> Tensor: ...
