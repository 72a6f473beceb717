"""Analytic data distributions with exact denoisers: the oracles of dpmlab's tests and a tool for
anyone studying samplers.

``GaussianMixture(weights, means, stds)``: ``p0 = sum_k pi_k N(mu_k, diag(s_k^2))`` (``stds`` a
scalar, ``(K,)`` isotropic or ``(K, D)`` diagonal). On any schedule ``p_t`` is again a mixture with
``C_k = alpha^2 s_k^2 + sigma^2`` and the posterior mean is exact::

    w_k(x) ∝ pi_k N(x; alpha mu_k, C_k)
    E[x0 | x_t = x] = sum_k w_k (mu_k + alpha s_k^2 / C_k (x - alpha mu_k))

``EmpiricalData(points)`` is the zero-width mixture on a finite set (EDM's "ideal denoiser").
Everything is computed in float64; outputs take the input's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._utils import append_dims, f64
from ..schedules import LinearVP, NoiseSchedule
from .reference import ReferenceResult, reference_solution

__all__ = [
    "GaussianMixture",
    "EmpiricalData",
    "AnalyticDenoiser",
    "preset",
    "PRESETS",
    "reference_solution",
    "ReferenceResult",
]


class GaussianMixture:
    """A Gaussian mixture with exact denoiser, score, sampling and log-density on any schedule."""

    def __init__(
        self,
        weights: Sequence[float] | Tensor,
        means: Sequence[Sequence[float]] | Tensor,
        stds: float | Sequence[float] | Tensor,
        *,
        name: str = "gmm",
    ) -> None:
        w = f64(weights)
        mu = torch.as_tensor(means, dtype=torch.float64)  # = f64(means); f64 is typed for flat sequences only
        if mu.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(mu.shape)}")
        k, d = mu.shape
        if w.shape != (k,) or not bool((w > 0).all()):
            raise ValueError(f"weights must be {k} positive numbers, got shape {tuple(w.shape)}")
        s = f64(stds)
        if s.ndim == 0:
            s = s.expand(k, d)
        elif s.shape == (k,):
            s = s[:, None].expand(k, d)
        elif s.shape != (k, d):
            raise ValueError(f"stds must be a scalar, ({k},) or ({k}, {d}); got {tuple(s.shape)}")
        if not bool((s >= 0).all()):
            raise ValueError("stds must be >= 0")
        self.weights = w / w.sum()
        self.means = mu
        self.stds = s.contiguous()
        self.name = name

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    # --- moments and sampling ---------------------------------------------------------------
    def mean(self) -> Tensor:
        return self.weights @ self.means

    def cov(self) -> Tensor:
        m = self.mean()
        diff = self.means - m
        within = torch.diag((self.weights[:, None] * self.stds**2).sum(0))
        return within + (self.weights[:, None] * diff).T @ diff

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact samples of ``p0`` (float64, shape ``(n, D)``)."""
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return self.means[comp] + self.stds[comp] * z

    def sample_t(
        self, n: int, schedule: NoiseSchedule, t: float, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Exact samples of ``p_t``."""
        x0 = self.sample(n, generator=generator)
        eps = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
        return schedule.add_noise(x0, eps, t)

    # --- exact quantities at (x_t, t) -----------------------------------------------------------
    def _posterior(self, x: Tensor, schedule: NoiseSchedule, t: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Responsibilities ``w`` (B, K), ``C`` (B, K, D) and ``alpha`` (B, 1, 1) at ``x`` (B, D)."""
        x = f64(x)
        t = f64(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        a = schedule.alpha(t)[:, None, None]  # (B, 1, 1)
        sg = schedule.sigma(t)[:, None, None]
        var = a * a * self.stds[None] ** 2 + sg * sg  # (B, K, D)
        diff = x[:, None, :] - a * self.means[None]  # (B, K, D)
        logp = -0.5 * ((diff * diff) / var + torch.log(2 * math.pi * var)).sum(-1)  # (B, K)
        logp = logp + torch.log(self.weights)[None]
        return torch.softmax(logp, dim=1), var, a

    def _flat(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim or x.ndim != 2:
            raise ValueError(f"{self.name} expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        return x

    def x0(self, x: Tensor, schedule: NoiseSchedule, t: Tensor | float) -> Tensor:
        """``E[x0 | x_t = x]`` (exact)."""
        xf = f64(self._flat(x))
        out = torch.empty_like(xf)
        t = f64(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        chunk = max(1, 2_000_000 // max(1, self.n_components * self.dim))
        for lo in range(0, xf.shape[0], chunk):
            xs, ts = xf[lo : lo + chunk], t[lo : lo + chunk]
            w, var, a = self._posterior(xs, schedule, ts)
            diff = xs[:, None, :] - a * self.means[None]
            comp = self.means[None] + a * self.stds[None] ** 2 / var * diff  # (B, K, D)
            out[lo : lo + chunk] = (w[..., None] * comp).sum(1)
        return out.to(x.dtype)

    def eps(self, x: Tensor, schedule: NoiseSchedule, t: Tensor | float) -> Tensor:
        x0 = f64(self.x0(x, schedule, t))
        return schedule.eps_from_x0(f64(x), x0, t).to(x.dtype)

    def score(self, x: Tensor, schedule: NoiseSchedule, t: Tensor | float) -> Tensor:
        """``grad_x log p_t(x)`` (exact)."""
        t64 = f64(t, device=x.device)
        if t64.ndim == 0:
            t64 = t64.expand(x.shape[0])
        sg = append_dims(schedule.sigma(t64), 2)
        return (-f64(self.eps(x, schedule, t64)) / sg).to(x.dtype)

    def log_prob(self, x: Tensor, schedule: NoiseSchedule | None = None, t: Tensor | float = 0.0) -> Tensor:
        """``log p_t(x)``; without a schedule, ``log p0(x)`` (needs every std > 0)."""
        xf = f64(self._flat(x))
        if schedule is None:
            var = (self.stds**2)[None].expand(xf.shape[0], -1, -1)
            diff = xf[:, None, :] - self.means[None]
        else:
            tt = f64(t, device=x.device)
            if tt.ndim == 0:
                tt = tt.expand(x.shape[0])
            a = schedule.alpha(tt)[:, None, None]
            sg = schedule.sigma(tt)[:, None, None]
            var = a * a * self.stds[None] ** 2 + sg * sg
            diff = xf[:, None, :] - a * self.means[None]
        logp = -0.5 * ((diff * diff) / var + torch.log(2 * math.pi * var)).sum(-1) + torch.log(self.weights)[None]
        return torch.logsumexp(logp, dim=1)

    def exact_flow(self, x: Tensor, schedule: NoiseSchedule, t_from: float, t_to: float) -> Tensor:
        """Exact PF-ODE flow map — only for a single Gaussian (K = 1): standardised coordinates
        ``(x - alpha mu) / sqrt(alpha^2 s^2 + sigma^2)`` are conserved."""
        if self.n_components != 1:
            raise ValueError("exact_flow exists in closed form only for a single Gaussian (K = 1)")
        xf = f64(self._flat(x))
        a0, s0 = schedule.alpha(f64(t_from)), schedule.sigma(f64(t_from))
        a1, s1 = schedule.alpha(f64(t_to)), schedule.sigma(f64(t_to))
        mu, sd = self.means[0], self.stds[0]
        scale = torch.sqrt((a1**2 * sd**2 + s1**2) / (a0**2 * sd**2 + s0**2))
        return (a1 * mu + scale * (xf - a0 * mu)).to(x.dtype)

    def denoiser(self, schedule: NoiseSchedule | None = None) -> AnalyticDenoiser:
        """The exact ``x0(x, t)`` on ``schedule`` (default: continuous linear VP) as a dpmlab model."""
        return AnalyticDenoiser(self, schedule if schedule is not None else LinearVP())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, K={self.n_components}, D={self.dim})"


class EmpiricalData(GaussianMixture):
    """The ideal denoiser of a finite data set: a uniform mixture of Diracs at ``points`` (N, D)."""

    def __init__(self, points: Tensor | Sequence[Sequence[float]], *, name: str = "empirical") -> None:
        p = torch.as_tensor(points, dtype=torch.float64)  # = f64(points); f64 is typed for flat sequences only
        if p.ndim != 2 or p.shape[0] < 1:
            raise ValueError(f"points must have shape (N, D) with N >= 1, got {tuple(p.shape)}")
        super().__init__(torch.ones(p.shape[0], dtype=torch.float64), p, 0.0, name=name)

    def log_prob(self, x: Tensor, schedule: NoiseSchedule | None = None, t: Tensor | float = 0.0) -> Tensor:
        if schedule is None:
            raise ValueError("an empirical distribution has no density at t = 0; pass a schedule and t > 0")
        return super().log_prob(x, schedule, t)


class AnalyticDenoiser:
    """A ``DenoiserFn`` bound to a schedule: ``x0 = D(x, t)``; carries ``schedule`` and ``data_shape``."""

    def __init__(self, model: GaussianMixture, schedule: NoiseSchedule) -> None:
        self.model, self.schedule = model, schedule
        self.data_shape: tuple[int, ...] = (model.dim,)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        if cond:
            raise TypeError(f"analytic model {self.model.name!r} takes no conditioning, got {sorted(cond)}")
        return self.model.x0(x, self.schedule, t)

    def __repr__(self) -> str:
        return f"AnalyticDenoiser({self.model!r}, {self.schedule!r})"


def _gmm2d() -> GaussianMixture:
    ang = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
    means = torch.cat([torch.stack([1.5 * ang.cos(), 1.5 * ang.sin()], 1), torch.zeros(1, 2, dtype=torch.float64)])
    weights = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    stds = torch.tensor([0.08] * 8 + [0.2], dtype=torch.float64)
    return GaussianMixture(weights, means, stds, name="gmm2d")


def _random_gmm(name: str, dim: int, k: int, seed: int) -> GaussianMixture:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, dim, generator=g, dtype=torch.float64) * 0.8
    stds = 0.2 + 0.4 * torch.rand(k, dim, generator=g, dtype=torch.float64)
    weights = 0.5 + torch.rand(k, generator=g, dtype=torch.float64)
    return GaussianMixture(weights, means, stds, name=name)


def _gauss16() -> GaussianMixture:
    g = torch.Generator().manual_seed(16)
    mean = torch.randn(1, 16, generator=g, dtype=torch.float64) * 0.5
    stds = 0.3 + 0.5 * torch.rand(1, 16, generator=g, dtype=torch.float64)
    return GaussianMixture([1.0], mean, stds, name="gauss16")


PRESETS = {
    "gmm2d": _gmm2d,  # 8 modes on a ring + one at the centre: for pictures
    "gmm16": lambda: _random_gmm("gmm16", 16, 8, 16),  # for measurement
    "gmm64": lambda: _random_gmm("gmm64", 64, 10, 64),  # for measurement
    "gauss16": _gauss16,  # single diagonal Gaussian: exact flow map
}


def preset(name: str) -> GaussianMixture:
    """A named analytic mixture: ``gmm2d``, ``gmm16``, ``gmm64``, ``gauss16``."""
    if name not in PRESETS:
        raise ValueError(f"unknown analytic preset {name!r}; allowed: {', '.join(PRESETS)}")
    return PRESETS[name]()
