"""Analytic problems with exact or high-accuracy reference solutions — the oracles of the tests —
and the small model wrappers the solver tests share."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dpmlab.models.analytic import GaussianMixture, preset
from dpmlab.models.reference import reference_solution
from dpmlab.schedules import LinearVP, NoiseSchedule
from dpmlab.solvers import Problem, Solver, sample
from dpmlab.timesteps import uniform_lambda

torch.set_num_threads(1)


def smooth_mixture() -> GaussianMixture:
    """Broad, overlapping 4-component mixture in 8-D: smooth denoiser, no mode flipping at coarse
    steps, so convergence orders show from a few steps on."""
    g = torch.Generator().manual_seed(8)
    means = torch.randn(4, 8, generator=g, dtype=torch.float64)
    stds = 0.6 + 0.4 * torch.rand(4, 8, generator=g, dtype=torch.float64)
    return GaussianMixture([1.0, 2.0, 1.5, 0.5], means, stds, name="smooth8")


def smooth_isotropic_mixture() -> GaussianMixture:
    """4 equal-weight isotropic components in 8-D (stds 0.6-1.0, means ~N(0, 1)): no mode flipping at
    coarse steps. The oracle of the UniPC, DEIS and PNDM order tests (their asymptotic ranges were
    set on it)."""
    g = torch.Generator().manual_seed(3)
    means = torch.randn(4, 8, generator=g, dtype=torch.float64)
    stds = 0.6 + 0.4 * torch.rand(4, generator=g, dtype=torch.float64)
    return GaussianMixture(torch.ones(4), means, stds, name="smooth4x8")


MIXTURES = {"smooth8": smooth_mixture, "smooth4x8": smooth_isotropic_mixture}


def mixture(name: str) -> GaussianMixture:
    """A named oracle mixture: one of ``MIXTURES`` or a ``dpmlab`` preset."""
    return MIXTURES[name]() if name in MIXTURES else preset(name)


def start_noise(n: int, dim: int, seed: int = 0) -> Tensor:
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def reference(
    name: str,
    n: int = 128,
    seed: int = 0,
    *,
    t_start: float | None = None,
    t_end: float | None = None,
    tol: float = 1e-11,
) -> tuple[GaussianMixture, NoiseSchedule, Tensor, Tensor]:
    """(mixture, schedule, x at t_start, x at t_end by a tight reference solve, rtol = atol = tol) for
    a named oracle on ``LinearVP``; the ends default to the schedule's t_max and t_min. Cached."""
    sch = LinearVP()
    t0 = sch.t_max if t_start is None else float(t_start)
    t1 = sch.t_min if t_end is None else float(t_end)
    return _reference(name, n, seed, t0, t1, float(tol))


@functools.lru_cache(maxsize=8)
def _reference(
    name: str, n: int, seed: int, t_start: float, t_end: float, tol: float
) -> tuple[GaussianMixture, NoiseSchedule, Tensor, Tensor]:
    mix, sch = mixture(name), LinearVP()
    x = start_noise(n, mix.dim, seed)
    ref = reference_solution(mix.denoiser(sch), sch, x, t_start, t_end, rtol=tol, atol=tol)
    return mix, sch, x, ref.x


def rms(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def slope(steps: Sequence[int], errs: Sequence[float]) -> float:
    """Least-squares slope of -log(error) against log(steps): the measured convergence order."""
    lx = torch.tensor([math.log(n) for n in steps], dtype=torch.float64)
    ly = torch.tensor([math.log(e) for e in errs], dtype=torch.float64)
    lc = lx - lx.mean()
    return -float((lc * (ly - ly.mean())).sum() / (lc * lc).sum())


def measured_order(
    solver: Solver,
    steps: Sequence[int] = (12, 24, 48, 96),
    name: str = "smooth8",
    *,
    n: int = 128,
    t_end: float | None = None,
    tol: float = 1e-11,
) -> tuple[float, list[float]]:
    """(order, RMS errors): the ``slope`` of the errors against a ``reference(name, n, t_end=t_end,
    tol=tol)`` solve from t_max on lambda-uniform grids of ``steps`` steps ending at ``t_end``."""
    mix, sch, x, ref = reference(name, n, t_end=t_end, tol=tol)
    errs = []
    for k in steps:
        out = sample(Problem(mix.denoiser(sch), sch), x, uniform_lambda(sch, k, t_end=t_end), solver)
        errs.append(rms(out, ref))
    return slope(steps, errs), errs


class CountingModel:
    """Wraps a model (with ``schedule`` and ``data_shape``) and counts its evaluations in ``calls``."""

    def __init__(self, model) -> None:
        self.model, self.calls = model, 0
        self.schedule, self.data_shape = model.schedule, model.data_shape

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        self.calls += 1
        return self.model(x, t, **cond)


class ImageModel:
    """An exact model on images: the 16-D ``gmm16`` denoiser applied to (B, 1, 4, 4) batches."""

    def __init__(self, schedule: NoiseSchedule) -> None:
        self.model = preset("gmm16").denoiser(schedule)
        self.schedule, self.data_shape = schedule, (1, 4, 4)

    def __call__(self, x: Tensor, t: Tensor, **cond) -> Tensor:
        return self.model(x.reshape(x.shape[0], -1), t, **cond).reshape(x.shape)


def check_image_sampling(solver: Solver, schedule: NoiseSchedule, f32_tol: float = 1e-4) -> None:
    """Sampling (16, 1, 4, 4) images with ``ImageModel`` keeps shape and dtype (float32 and float64),
    stays finite, matches sampling the flattened (16, 16) batch with the ``gmm16`` denoiser, and
    float32 agrees with float64 to ``f32_tol``."""
    x64 = torch.randn(16, 1, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ts = uniform_lambda(schedule, 8, t_end=0.0)
    flat_model = preset("gmm16").denoiser(schedule)
    outs = {}
    for dtype in (torch.float32, torch.float64):
        img = sample(Problem(ImageModel(schedule), schedule), x64.to(dtype), ts, solver)
        flat = sample(Problem(flat_model, schedule), x64.reshape(16, 16).to(dtype), ts, solver)
        assert img.shape == x64.shape and img.dtype == dtype and flat.shape == (16, 16) and flat.dtype == dtype
        assert torch.isfinite(img).all()
        assert float((img.reshape(16, 16) - flat).abs().max()) < 1e-5
        outs[dtype] = img
    assert float((outs[torch.float32] - outs[torch.float64]).abs().max()) < f32_tol
