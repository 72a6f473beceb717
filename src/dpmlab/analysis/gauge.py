"""Gauge freedom of learned score fields — Horvat & Pfister, "On gauge freedom, conservativity and intrinsic
dimensionality estimation in diffusion models", ICLR 2024, arXiv 2402.03845.

A vector field ``s = grad log p_t + g`` drives the same probability-flow ODE / reverse SDE marginals as the true
score whenever the gauge condition holds::

    div(p_t g) = 0        (equivalently  div g + g . grad log p_t = 0)

because the continuity / Fokker-Planck equations see the drift only through ``div(p_t v)``: sampling is exact
without conservativity. Here, for a zero-mean Gaussian ``p_t = N(0, C_t)`` (``DegenerateGaussian``: data on a
d-dimensional subspace of R^D, ``C_t = alpha^2 s^2 U U^T + sigma^2 I``), the gauge fields

    g(x, t) = f(q) A C_t^-1 x,    q = x^T C_t^-1 x,    A = -A^T,    any scalar f

satisfy it exactly: ``g . grad log p_t = -f (C^-1 x)^T A (C^-1 x) = 0`` and ``div g = 2 f'(q) (C^-1 x)^T A C^-1 x
+ f tr(A C^-1) = 0`` (``SkewGauge``). For an isotropic Gaussian (d = D) this is a rotation field. A constant f
keeps the field linear and the stacked-score rank unchanged; the default ``f(q) = 2 cos q`` does not, so it breaks
the normal-space dimension estimator (``analysis.intrinsic_dimension``) while sampling stays exact — the paper's
point that local manifold information needs the conservative part (or a conservative model,
``analysis.conservative``).

``divergence`` and ``gauge_residual`` check the condition for any field by autograd (exact trace of the Jacobian).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .._utils import f64
from ..models.denoiser import Denoiser, Prediction
from ..schedules import NoiseSchedule

__all__ = [
    "DegenerateGaussian",
    "SkewGauge",
    "random_skew",
    "cos_profile",
    "divergence",
    "gauge_residual",
    "score_denoiser",
    "ScoreFn",
]

ScoreFn = Callable[[Tensor, Tensor], Tensor]  # (x (B, D), t (B,)) -> (B, D)


def cos_profile(q: Tensor) -> Tensor:
    """``f(q) = 2 cos q``: the non-constant gauge profile of the research notes."""
    return 2.0 * torch.cos(q)


class DegenerateGaussian:
    """Data ``x0 = U (s z)``, ``z ~ N(0, I_d)``: a Gaussian on the span of the orthonormal ``basis`` U (D, d),
    with exact score, denoiser, samples and probability-flow map on ``schedule`` (float64)."""

    def __init__(self, basis: Tensor, schedule: NoiseSchedule, *, scale: float = 1.0) -> None:
        u = f64(basis)
        if u.ndim != 2 or not 1 <= u.shape[1] <= u.shape[0]:
            raise ValueError(f"basis must have shape (D, d) with 1 <= d <= D, got {tuple(u.shape)}")
        if not torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-10):
            raise ValueError("basis columns must be orthonormal (U^T U = I)")
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.basis, self.schedule, self.scale = u, schedule, float(scale)

    @classmethod
    def random(
        cls, D: int, d: int, schedule: NoiseSchedule, *, seed: int = 0, scale: float = 1.0
    ) -> DegenerateGaussian:
        """A uniformly random d-dimensional subspace of R^D."""
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))
        return cls(q, schedule, scale=scale)

    @property
    def dim(self) -> int:
        return int(self.basis.shape[0])

    @property
    def intrinsic_dim(self) -> int:
        return int(self.basis.shape[1])

    def _variances(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """alpha (B, 1), tangent variance alpha^2 s^2 + sigma^2 and normal variance sigma^2, each (B, 1)."""
        a, sg = self.schedule.alpha(t)[:, None], self.schedule.sigma(t)[:, None]
        return a, a * a * self.scale**2 + sg * sg, sg * sg

    def _t(self, x: Tensor, t: Tensor | float) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"x must have shape (B, {self.dim}), got {tuple(x.shape)}")
        tt = f64(t, device=x.device)
        return tt.expand(x.shape[0]) if tt.ndim == 0 else tt

    def precision(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``C_t^-1 x`` (B, D): tangent part / (alpha^2 s^2 + sigma^2) + normal part / sigma^2."""
        tt = self._t(x, t)
        _, vt, vn = self._variances(tt)
        xf = f64(x)
        tan = (xf @ self.basis) @ self.basis.T
        return tan / vt + (xf - tan) / vn

    def score(self, x: Tensor, t: Tensor | float) -> Tensor:
        """``grad log p_t(x) = -C_t^-1 x`` (exact)."""
        return (-self.precision(x, t)).to(x.dtype)

    def denoiser(self, score: ScoreFn | None = None) -> Denoiser:
        """The exact model (or ``score``, e.g. score + gauge) as a dpmlab ``Denoiser`` (``Prediction.SCORE``)."""
        return score_denoiser(self.score if score is None else score, self.schedule, (self.dim,))

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        z = torch.randn(n, self.intrinsic_dim, generator=generator, dtype=torch.float64)
        return self.scale * z @ self.basis.T

    def sample_t(self, n: int, t: float, *, generator: torch.Generator | None = None) -> Tensor:
        """Exact samples of ``p_t``."""
        x0 = self.sample(n, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64)
        return self.schedule.add_noise(x0, eps, t)

    def cov_t(self, t: float) -> Tensor:
        _, vt, vn = (v[0, 0] for v in self._variances(f64([t])))
        p = self.basis @ self.basis.T
        return vt * p + vn * (torch.eye(self.dim, dtype=torch.float64) - p)

    def flow_singular_values(self, t_from: float, t_to: float) -> Tensor:
        """Singular values (descending) of the exact PF-ODE flow map ``x_{t_from} -> x_{t_to}``: it scales
        tangent directions by sqrt(v_T(t_to) / v_T(t_from)) and normal ones by sigma(t_to) / sigma(t_from)."""
        _, vt, vn = self._variances(f64([t_from, t_to]))
        sv = torch.cat(
            [
                (vt[1] / vt[0]).sqrt().expand(self.intrinsic_dim),
                (vn[1] / vn[0]).sqrt().expand(self.dim - self.intrinsic_dim),
            ]
        )
        return sv.sort(descending=True).values

    def exact_flow(self, x: Tensor, t_from: float, t_to: float) -> Tensor:
        """The exact probability-flow map (all ``C_t`` share one eigenbasis: ``x -> C_to^1/2 C_from^-1/2 x``)."""
        _, vt, vn = self._variances(f64([t_from, t_to]))
        xf = f64(x)
        tan = (xf @ self.basis) @ self.basis.T
        return (tan * (vt[1] / vt[0]).sqrt() + (xf - tan) * (vn[1] / vn[0]).sqrt()).to(x.dtype)


def random_skew(D: int, *, seed: int = 0) -> Tensor:
    """A random skew-symmetric matrix (D, D) with unit Frobenius norm per sqrt(D)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(D, D, generator=g, dtype=torch.float64)
    a = m - m.T
    return a * math.sqrt(D) / torch.linalg.matrix_norm(a)


@dataclass(frozen=True)
class SkewGauge:
    """``g(x, t) = strength f(q) A C_t^-1 x``: a field with ``div(p_t g) = 0`` for ``p_t = model``'s marginal."""

    model: DegenerateGaussian
    A: Tensor  # (D, D) skew-symmetric
    strength: float = 1.0
    profile: Callable[[Tensor], Tensor] = field(default=cos_profile)  # f(q)

    def __post_init__(self) -> None:
        A = f64(self.A)
        D = self.model.dim
        if A.shape != (D, D):
            raise ValueError(f"A must have shape ({D}, {D}), got {tuple(A.shape)}")
        if not torch.allclose(A, -A.T, atol=1e-12):
            raise ValueError(f"A must be skew-symmetric (A = -A^T); max |A + A^T| = {float((A + A.T).abs().max()):.3g}")
        object.__setattr__(self, "A", A)

    def __call__(self, x: Tensor, t: Tensor | float) -> Tensor:
        w = self.model.precision(x, t)  # C^-1 x, (B, D)
        q = (f64(x) * w).sum(1, keepdim=True)
        return (self.strength * self.profile(q) * (w @ self.A.T)).to(x.dtype)


def divergence(fn: ScoreFn, x: Tensor, t: Tensor | float) -> Tensor:
    """``div_x fn(x, t)`` (B,), exactly: the trace of the Jacobian by D backward passes."""
    tt = f64(t, device=x.device)
    tt = tt.expand(x.shape[0]) if tt.ndim == 0 else tt
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        out = fn(xg, tt)
        div = torch.zeros(x.shape[0], dtype=out.dtype)
        for j in range(x.shape[1]):
            (gj,) = torch.autograd.grad(out[:, j].sum(), xg, retain_graph=j + 1 < x.shape[1])
            div = div + gj[:, j]
    return div.detach()


def gauge_residual(fn: ScoreFn, score: ScoreFn, x: Tensor, t: Tensor | float) -> Tensor:
    """``div(p_t fn) / p_t = div fn + fn . grad log p_t`` (B,): zero exactly for a gauge field."""
    tt = f64(t, device=x.device)
    tt = tt.expand(x.shape[0]) if tt.ndim == 0 else tt
    return divergence(fn, x, tt) + (f64(fn(x, tt)) * f64(score(x, tt))).sum(1)


class _ScoreNet:
    def __init__(self, score: ScoreFn) -> None:
        self.score = score

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        return self.score(x, t)


def score_denoiser(score: ScoreFn, schedule: NoiseSchedule, data_shape: tuple[int, ...]) -> Denoiser:
    """Any score function as a dpmlab model: ``Denoiser(net=score, Prediction.SCORE)`` (``x0 = (x + sigma^2
    score) / alpha``), so every dpmlab solver samples it."""
    return Denoiser(_ScoreNet(score), schedule, Prediction.SCORE, data_shape=data_shape)
