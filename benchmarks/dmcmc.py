"""Denoising MCMC (DLG, arXiv 2209.14593) vs plain sampling at equal NFE on mixtures with well
separated modes, with the exact level posterior (and a trained level classifier on ``gmm2d``).

Mixtures: ``gmm2d`` (9 modes, ring + centre, weights 1:2:...:3) and ``sep16`` (16-d, 5 modes
separated by ~5 standard units, weights 0.1..0.3). Schedule: continuous linear VP, end at ``t = 1e-3``.
Metrics over ``--seeds`` seeds (mean ± std): ``tv`` — total-variation distance between the
fraction of samples per mode (assigned by the exact posterior at ``t_min``) and the true weights;
``sw`` — sliced Wasserstein-2 to 20,000 exact samples. Floors: exact samples of the same size.

Plain rows: the solver from noise at ``t_max`` on the bracketed grid. DMCMC rows (integrator
DPM-Solver++ on ``quadratic_time`` unless named; Langevin step ``eta = 1.0 sigma_k^2``; exact level
posterior unless named; 50 levels uniform in ``lam`` on ``t in [0.05, 0.9]``): ``L`` Langevin-Gibbs steps
(1 NFE each), then the integrator for the rest of the budget from the chain's level. ``fresh``: a new
chain per sample from noise at ``t_max``, everything counted; ``L=0`` is the ablation "integrate from the
level the Gibbs step reads off pure noise". ``persistent``: the authors' use — chains started by a plain
30-NFE run to the middle level plus 20 burn-in steps (not counted, amortised), then 4 rounds of outputs
per chain at ``nfe`` each. ``keep=lowest``: denoise the lowest-level state seen (authors' code) instead of
the last one.

Usage: ``nice -n 10 python benchmarks/dmcmc.py [--n 2000] [--seeds 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dpmlab
from dpmlab.metrics.distances import sliced_wasserstein
from dpmlab.models.analytic import GaussianMixture, preset
from dpmlab.models.noise_level import fit_noise_level_classifier
from dpmlab.schedules import LinearVP
from dpmlab.solvers import Problem
from dpmlab.solvers.dmcmc import ExactLevelPosterior, dmcmc_sample, langevin_gibbs, level_grid, start_chain

torch.set_num_threads(1)
SCH = LinearVP()


def sep16() -> GaussianMixture:
    g = torch.Generator().manual_seed(16)
    means = 1.25 * torch.randn(5, 16, generator=g, dtype=torch.float64)
    return GaussianMixture([0.1, 0.15, 0.2, 0.25, 0.3], means, 0.25, name="sep16")


def metrics(mix: GaussianMixture, x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    w, _, _ = mix._posterior(x.double(), SCH, torch.full((x.shape[0],), SCH.t_min, dtype=torch.float64))
    freq = torch.bincount(w.argmax(1), minlength=mix.n_components).double() / x.shape[0]
    return 0.5 * float((freq - mix.weights).abs().sum()), sliced_wasserstein(x.double(), ref, 128, 0)


def fmt(vals: list[tuple[float, float]]) -> str:
    tv, sw = zip(*vals)

    def sd(v: tuple[float, ...]) -> float:
        return statistics.stdev(v) if len(v) > 1 else 0.0

    return f"{statistics.mean(tv):.3f}±{sd(tv):.3f} / {statistics.mean(sw):.3f}±{sd(sw):.3f}"


def table(mix, ref, levels, post, clf, nfe: int, n: int, seeds) -> dict[str, list[tuple[float, float]]]:
    """Every sampler at ``nfe`` evaluations per sample (per output): name -> metrics per seed."""
    model = mix.denoiser(SCH)
    samplers = {}
    for solver, grid in (
        ("dpm_solver_pp", "quadratic_time"),
        ("dpm_solver_pp", "uniform_lambda"),
        ("unipc", "quadratic_time"),
        ("unipc", "uniform_lambda"),
        ("ddpm", "quadratic_time"),
    ):
        samplers[f"plain {solver} [{grid}]"] = lambda s, solver=solver, grid=grid: dpmlab.sample(
            model, n, solver=solver, nfe=nfe, seed=s, grid=grid
        )
    opts = dict(
        levels=levels, level_posterior=post, langevin_steps=2, step_size=1.0, nfe_budget=nfe, grid="quadratic_time"
    )

    def fresh(s: int, **kw) -> torch.Tensor:  # a new chain per sample, from noise at t_max
        return dmcmc_sample(model, SCH, n, seed=s, **{**opts, **kw}).samples

    samplers["fresh L=0 (no MCMC: level read off the noise)"] = lambda s: fresh(s, langevin_steps=0)
    samplers["fresh L=2"] = fresh
    samplers["fresh L=2 + unipc"] = lambda s: fresh(s, integrator="unipc")
    samplers["fresh L=2 keep=lowest"] = lambda s: fresh(s, keep="lowest")
    samplers["fresh L=2 keep=lowest gibbs=argmax (authors')"] = lambda s: fresh(s, keep="lowest", gibbs="argmax")
    if clf is not None:
        samplers["fresh L=2 trained classifier"] = lambda s: fresh(s, level_posterior=clf.log_posterior)

    def persistent(s: int, rounds: int = 4, **kw) -> torch.Tensor:
        """start_chain (30 NFE) + 20 burn-in steps, not counted; then ``rounds`` outputs per chain."""
        o = {**opts, **kw}
        chain, _ = start_chain(model, SCH, n // rounds, levels=levels, seed=1000 + s)
        chain, _ = langevin_gibbs(
            Problem(model, SCH), chain, levels, o["level_posterior"], steps=20, step_size=o["step_size"], seed=2000 + s
        )
        outs = []
        for r in range(rounds):
            res = dmcmc_sample(model, SCH, n // rounds, seed=100 * s + r, chain=chain, **o)
            chain = res.chain
            outs.append(res.samples)
        return torch.cat(outs)

    samplers["persistent L=2"] = persistent
    samplers["persistent L=2 step=0.3"] = lambda s: persistent(s, step_size=0.3)
    samplers["persistent L=2 keep=lowest"] = lambda s: persistent(s, keep="lowest")
    return {name: [metrics(mix, fn(s), ref) for s in seeds] for name, fn in samplers.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    t0 = time.time()
    seeds = range(args.seeds)
    for mix in (preset("gmm2d"), sep16()):
        ref = mix.sample(20000, generator=torch.Generator().manual_seed(99))
        levels = level_grid(SCH, 50, t_hi=0.9, t_lo=0.05)
        post = ExactLevelPosterior(mix, SCH, levels)
        floor = [
            metrics(mix, mix.sample_t(args.n, SCH, SCH.t_min, generator=torch.Generator().manual_seed(s)), ref)
            for s in seeds
        ]
        clf = None
        if mix.dim == 2:
            data = mix.sample(20000, generator=torch.Generator().manual_seed(7))
            clf = fit_noise_level_classifier(data, SCH, levels, steps=2000, width=128, depth=3, seed=0)
        print(f"## {mix.name} (n={args.n}, {args.seeds} seeds): tv / sw; exact samples: {fmt(floor)}\n")
        for nfe in (6, 10, 20):
            print(f"### NFE {nfe}\n\n| sampler | tv / sw |\n|---|---|")
            for name, vals in table(mix, ref, levels, post, clf, nfe, args.n, seeds).items():
                print(f"| {name} | {fmt(vals)} |")
            print()
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
