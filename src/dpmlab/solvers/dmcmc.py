"""Denoising MCMC — Kim & Ye, "Denoising MCMC for Accelerating Diffusion-Based Generative Models",
ICML 2023, arXiv 2209.14593. Instance: Denoising Langevin Gibbs (DLG).

A Markov chain on the product space ``(x, k)`` with target ``p(k) p_{t_k}(x)`` over a grid of noise
levels ``t_k`` (``level_grid``), alternating (each pair costs one network evaluation)::

    x <- x + (eta/2) grad log p_{t_k}(x) + sqrt(eta) z,   eta = step_size sigma_k^2   (Langevin on x)
    k ~ p(k | x) ∝ p(k) p_{t_k}(x)                                                    (Gibbs on k)

with ``grad log p_t(x) = (alpha_t x0(x, t) - x) / sigma_t^2``. After ``langevin_steps`` steps the chain's
state (``keep="last"``; ``"lowest"``: the lowest level seen, the authors' choice) is denoised by any
dpmlab solver on a grid from its ``t_k`` to the end (per-sample start times: grouped by level).
``p(k | x)`` comes from ``level_posterior``: exact for analytic mixtures (``ExactLevelPosterior``), else
a trained classifier (``dpmlab.models.noise_level``). Classifier calls are not counted as NFE (as in the paper); every
Langevin step and every integrator evaluation is.

The authors' recipe (notebook ``Sampling Demo.ipynb`` of 1202kbs/DMCMC ``370faba``) and ours — each of
theirs is an option; where our default differs it was measured (docs/methods/dmcmc.md):

* Langevin step: theirs a fixed ``eta = 0.8`` in the data coordinates of a VE model (``step="absolute"``:
  ``eta = step_size alpha_k^2`` in VP coordinates); ours by default relative to the level
  (``step="relative"``: ``eta = step_size sigma_k^2``), stable across the levels of a VP model;
* Gibbs step: their code takes the argmax of the level classifier (``gibbs="argmax"``); the paper and our
  default sample ``k ~ p(k | x)`` (``"sample"``) — only that keeps the chain's target law (tested);
* state handed to the integrator: theirs the lowest-noise state seen in the segment (``keep="lowest"``);
  ours by default the last (``"last"``): selecting states biased the mode weights in our measurement;
* persistent chains: theirs one chain per output slot, started by a full sampler run and continued
  forever; ours starts from pure noise at ``t_max`` unless a ``chain`` is passed (``start_chain`` is their
  start; pass the returned ``chain`` back to continue it) — a function call has no state to persist;
* integrator and final denoising: theirs Karras' stochastic Heun to ``sigma = 0`` then a Tweedie step
  ``x + s^2 score(x, s)`` at a small ``s``; ours any registered solver, and ``final_denoise=True`` ends
  with the Tweedie step ``x <- x0(x, t_end)`` (one more evaluation, counted; off by default as every
  dpmlab sampler, which ends at ``t_end`` or, with ``to_zero``, already at the denoised ``sigma = 0``).
Noise is per-sample seeded (``seed``, sample index), so results do not depend on the batch size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from .._utils import append_dims, counter_normal, f64
from ..models.analytic import GaussianMixture
from ..schedules import NoiseSchedule
from ..timesteps import get_grid, uniform_lambda
from ..typing import DenoiserFn
from .base import Problem, SeededNoise, Solver, get, sample

__all__ = ["level_grid", "ExactLevelPosterior", "Chain", "DMCMCResult", "langevin_gibbs", "start_chain", "dmcmc_sample"]

PAPER = "Kim & Ye 2023, Denoising MCMC (arXiv 2209.14593)"
GIBBS = ("sample", "argmax")
KEEP = ("last", "lowest")
STEPS = ("relative", "absolute")
CONTINUOUS_GRIDS = ("uniform_lambda", "uniform_time", "quadratic_time", "karras")
_STREAM = 1 << 20  # noise streams of the chain, far from the solvers' 1 + 16 i


class LevelPosterior(Protocol):
    def __call__(self, x: Tensor) -> Tensor: ...  # log p(k | x), (B, K)


def level_grid(
    schedule: NoiseSchedule, n_levels: int = 100, *, t_hi: float | None = None, t_lo: float | None = None
) -> Tensor:
    """``n_levels`` times, uniform in ``lam``, noisiest first (``t_hi`` .. ``t_lo``; the paper's grid is
    geometric in sigma, i.e. uniform in ``lam`` for VE models)."""
    return uniform_lambda(schedule, n_levels - 1, t_start=t_hi, t_end=t_lo)


class ExactLevelPosterior:
    """``log p(k | x) = log p(k) + log p_{t_k}(x) - logsumexp`` for a ``GaussianMixture`` (exact)."""

    def __init__(
        self, mixture: GaussianMixture, schedule: NoiseSchedule, levels: Tensor, log_prior: Tensor | None = None
    ) -> None:
        self.mixture, self.schedule, self.levels = mixture, schedule, f64(levels)
        k = self.levels.numel()
        self.log_prior = torch.full((k,), -math.log(k), dtype=torch.float64) if log_prior is None else f64(log_prior)

    def __call__(self, x: Tensor) -> Tensor:
        xf = f64(x).flatten(1)
        logp = torch.stack([self.mixture.log_prob(xf, self.schedule, float(t)) for t in self.levels], dim=1)
        return torch.log_softmax(logp + self.log_prior[None].to(logp.device), dim=1)  # (B, K)


@dataclass(frozen=True)
class Chain:
    x: Tensor  # (B, ...) state
    k: Tensor  # (B,) level index into the grid (0 = noisiest)


class DMCMCResult(NamedTuple):
    samples: Tensor  # (n, ...) denoised outputs
    nfe: int  # network evaluations per sample: Langevin steps + integrator
    chain: Chain  # the chain's last state, to continue it (persistent chains)


def _gibbs(level_posterior: LevelPosterior, x: Tensor, gibbs: str, seed: int, idx: Tensor, stream: int) -> Tensor:
    """``k ~ p(k | x)`` by the Gumbel-max trick with per-sample seeded uniforms, or the argmax."""
    logp = level_posterior(x).to(torch.float64)
    if gibbs == "argmax":
        return logp.argmax(dim=1)
    z = counter_normal(seed, idx, stream, logp.shape[1:], dtype=torch.float64).to(logp.device)
    u = (0.5 * torch.erfc(-z / math.sqrt(2.0))).clamp(1e-300, 1.0 - 1e-16)  # uniform(0, 1)
    return (logp - torch.log(-torch.log(u))).argmax(dim=1)  # Gumbel-max


def langevin_gibbs(
    problem: Problem,
    chain: Chain,
    levels: Tensor,
    level_posterior: LevelPosterior,
    *,
    steps: int,
    step_size: float,
    gibbs: str = "sample",
    keep: str = "last",
    seed: int = 0,
    idx: Tensor | None = None,
    step: str = "relative",
) -> tuple[Chain, Chain]:
    """``steps`` Langevin-Gibbs updates (one evaluation each); returns (last state, kept state).
    ``step``: ``eta = step_size sigma_k^2`` ("relative") or ``step_size alpha_k^2`` ("absolute": a fixed step
    in the data coordinates ``x / alpha``, the authors' VE recipe)."""
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; allowed: {', '.join(STEPS)}")
    x, k = chain.x, chain.k
    idx = torch.arange(x.shape[0]) if idx is None else idx
    sch, lv = problem.schedule, f64(levels)
    x_keep, k_keep = x, k
    for j in range(steps):
        t = lv[k.cpu()].to(x.device)  # (B,) per-sample level times
        a, s = (append_dims(v, x.ndim).to(x.dtype) for v in (sch.alpha(t), sch.sigma(t)))
        x0 = problem.denoise(x, t)  # one evaluation
        z = counter_normal(seed, idx, _STREAM + 2 * j, x.shape[1:], dtype=x.dtype).to(x.device)
        # x + (eta/2) (alpha x0 - x) / sigma^2 + sqrt(eta) z                                  (Langevin on x)
        if step == "relative":  # eta / sigma^2 and its square root
            rel: float | Tensor = step_size
            root: float | Tensor = math.sqrt(step_size)
        else:
            rel = step_size * (a / s) ** 2
            root = rel.sqrt()
        x = x + (0.5 * rel) * (a * x0 - x) + root * s * z
        k = _gibbs(level_posterior, x, gibbs, seed, idx, _STREAM + 2 * j + 1)  # Gibbs on the level
        if keep == "last":
            x_keep, k_keep = x, k
        else:  # the state of the lowest noise level seen (authors' code)
            lower = k > k_keep
            x_keep = torch.where(append_dims(lower, x.ndim), x, x_keep)
            k_keep = torch.where(lower, k, k_keep)
    return Chain(x, k), Chain(x_keep, k_keep)


def start_chain(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    n: int,
    *,
    levels: Tensor,
    k_init: int | None = None,
    solver: Solver[Any] | str = "dpm_solver_pp",
    steps: int = 30,
    seed: int = 0,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    cond: Mapping[str, Any] | None = None,
) -> tuple[Chain, int]:
    """A chain started the authors' way: a plain sampler run from noise at ``t_max`` down to level
    ``k_init`` (default: the middle of the grid). Returns the chain and the evaluations per chain it
    cost — paid once and amortised over every output of a persistent chain."""
    lv = f64(levels)
    k = lv.numel() // 2 if k_init is None else int(k_init)
    shp = shape if shape is not None else getattr(model, "data_shape", None)
    if shp is None:
        raise ValueError("the model carries no .data_shape; pass shape=")
    solver = get(solver) if isinstance(solver, str) else solver
    idx = torch.arange(n, dtype=torch.int64)
    x = float(schedule.sigma(f64(schedule.t_max))) * counter_normal(seed, idx, 0, tuple(shp), dtype=dtype)
    problem = Problem(model, schedule, noise=SeededNoise(seed, idx), cond=dict(cond or {}))
    x = sample(problem, x, uniform_lambda(schedule, steps, t_end=float(lv[k])), solver)
    return Chain(x, torch.full((n,), k, dtype=torch.int64)), problem.nfe


def dmcmc_sample(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    n: int,
    *,
    levels: Tensor,
    level_posterior: LevelPosterior,
    langevin_steps: int = 2,  # per output (the authors: 10 per output of a persistent chain)
    step_size: float = 1.0,  # eta / sigma_k^2 (measured best of 0.3, 0.5, 1.0 in benchmarks/dmcmc.py)
    integrator: Solver[Any] | str = "dpm_solver_pp",
    integrator_steps: int | None = None,
    nfe_budget: int | None = None,
    grid: str = "quadratic_time",
    to_zero: bool = False,
    gibbs: str = "sample",
    keep: str = "last",
    step: str = "relative",
    final_denoise: bool = False,
    chain: Chain | None = None,
    seed: int = 0,
    shape: tuple[int, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    cond: Mapping[str, Any] | None = None,
) -> DMCMCResult:
    """Draw ``n`` samples by Denoising Langevin Gibbs, then a short integration to data.

    Give ``integrator_steps`` or ``nfe_budget`` (total evaluations per sample, Langevin steps and the
    ``final_denoise`` evaluation included). ``chain``: continue this chain (``n`` rows) instead of
    starting from noise at ``t_max``.
    ``cond``: model conditioning; tensors with ``n`` rows are split with the samples.
    """
    if gibbs not in GIBBS or keep not in KEEP:
        raise ValueError(f"gibbs must be one of {GIBBS} and keep one of {KEEP}; got {gibbs!r}, {keep!r}")
    if not (isinstance(langevin_steps, int) and langevin_steps >= 0 and step_size > 0):
        raise ValueError(f"need langevin_steps >= 0 and step_size > 0, got {langevin_steps}, {step_size}")
    if step not in STEPS:
        raise ValueError(f"unknown step {step!r}; allowed: {', '.join(STEPS)}")
    if not isinstance(final_denoise, bool) or (final_denoise and to_zero):
        raise ValueError(
            f"final_denoise must be a bool and needs to_zero=False (a grid to sigma = 0 already ends "
            f"denoised), got final_denoise={final_denoise!r}, to_zero={to_zero!r}"
        )
    final = 1 if final_denoise else 0
    solver = get(integrator) if isinstance(integrator, str) else integrator
    if (integrator_steps is None) == (nfe_budget is None):
        raise ValueError("give exactly one of integrator_steps and nfe_budget")
    if integrator_steps is None:
        assert nfe_budget is not None
        integrator_steps = solver.steps_for_nfe(nfe_budget - langevin_steps - final, to_zero)
    lv = f64(levels)
    t_end = schedule.t_min
    if to_zero:
        if schedule.t_zero is None:
            raise ValueError(f"{schedule!r} never reaches sigma = 0; to_zero=True is impossible")
        t_end = schedule.t_zero
    if grid not in CONTINUOUS_GRIDS:
        raise ValueError(f"grid must be one of {CONTINUOUS_GRIDS} (the start time varies per level), got {grid!r}")
    if not float(lv.min()) > t_end:
        raise ValueError(f"every level must lie above the end time {t_end:g}; the lowest is {float(lv.min()):g}")
    shp = shape if shape is not None else getattr(model, "data_shape", None)
    if shp is None:
        raise ValueError("the model carries no .data_shape; pass shape=")
    idx = torch.arange(n, dtype=torch.int64)
    cond = dict(cond or {})

    def rows_of(r: Tensor) -> dict[str, Any]:
        return {k: v[r] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n else v for k, v in cond.items()}

    problem = Problem(model, schedule, cond=cond)
    if chain is None:  # pure noise at t_max, its level drawn from p(k | x)
        x = float(schedule.sigma(f64(schedule.t_max))) * counter_normal(seed, idx, 0, tuple(shp), dtype=dtype)
        chain = Chain(x, _gibbs(level_posterior, x, gibbs, seed, idx, _STREAM - 1))
    if chain.x.shape[0] != n:
        raise ValueError(f"chain has {chain.x.shape[0]} rows, n={n}")
    last, kept = langevin_gibbs(
        problem,
        chain,
        lv,
        level_posterior,
        steps=langevin_steps,
        step_size=step_size,
        gibbs=gibbs,
        keep=keep,
        seed=seed,
        idx=idx,
        step=step,
    )
    out = torch.empty_like(kept.x)
    grid_fn = get_grid(grid)
    zero_kw = {"to_zero": True} if grid == "karras" and to_zero else {"t_end": t_end}
    nfe_int = solver.nfe_for_steps(integrator_steps, to_zero)
    for k in torch.unique(kept.k).tolist():  # integrate each group of samples sharing a start level
        rows = (kept.k == k).nonzero().flatten()
        ts = grid_fn(schedule, integrator_steps, t_start=float(lv[k]), **zero_kw)
        sub = Problem(model, schedule, noise=SeededNoise(seed, idx[rows]), cond=rows_of(rows))
        out[rows] = sample(sub, kept.x[rows], ts, solver)
        if sub.nfe != nfe_int:
            raise RuntimeError(f"integrator {solver.name!r} used {sub.nfe} evaluations, declared {nfe_int}")
        if final_denoise:  # Tweedie at the end time: x <- E[x0 | x_t_end] (one evaluation)
            out[rows] = sub.denoise(out[rows], t_end).to(out.dtype)
    return DMCMCResult(out, problem.nfe + nfe_int + final, last)
