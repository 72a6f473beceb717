"""Analytic problems with exact or high-accuracy reference solutions — the oracles of the tests."""

from __future__ import annotations

import functools
import math

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


def start_noise(n: int, dim: int, seed: int = 0) -> Tensor:
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=8)
def reference(name: str, n: int = 128, seed: int = 0) -> tuple[GaussianMixture, NoiseSchedule, Tensor, Tensor]:
    """(mixture, schedule, x_T, x at t_min by a tight reference solve) for a named oracle."""
    mix = smooth_mixture() if name == "smooth8" else preset(name)
    sch = LinearVP()
    x = start_noise(n, mix.dim, seed)
    ref = reference_solution(mix.denoiser(sch), sch, x, sch.t_max, sch.t_min, rtol=1e-11, atol=1e-11)
    return mix, sch, x, ref.x


def rms(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def measured_order(
    solver: Solver, steps: tuple[int, ...] = (12, 24, 48, 96), name: str = "smooth8"
) -> tuple[float, list[float]]:
    """Least-squares slope of -log(RMS error) vs log(steps) on a lambda-uniform grid."""
    mix, sch, x, ref = reference(name)
    errs = []
    for n in steps:
        out = sample(Problem(mix.denoiser(sch), sch), x, uniform_lambda(sch, n), solver)
        errs.append(rms(out, ref))
    lx = torch.tensor([math.log(n) for n in steps], dtype=torch.float64)
    ly = torch.tensor([math.log(e) for e in errs], dtype=torch.float64)
    slope = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())
    return -slope, errs
