"""DMCMC: our defaults vs the authors' recipe, option by option (gmm2d, 6 NFE, exact level posterior).

Mode-weight total variation ``tv`` (modes assigned by the exact posterior at ``t_min``) and sliced W2 to
20,000 exact samples, 2,000 samples, 3 seeds (mean ± std). Setup as ``benchmarks/dmcmc.py``: 50 levels on
``t in [0.05, 0.9]``, 2 Langevin-Gibbs steps, DPM-Solver++ on ``quadratic_time`` for the rest.

    nohup nice .venv/bin/python benchmarks/dmcmc_recipe.py > /tmp/dpm/dmcmc_recipe.log 2>&1 &
"""

from __future__ import annotations

import statistics

import torch

from dpmlab.metrics import sliced_wasserstein
from dpmlab.models.analytic import preset
from dpmlab.schedules import LinearVP
from dpmlab.solvers.dmcmc import ExactLevelPosterior, dmcmc_sample, level_grid

VARIANTS = {
    "ours (sample, last, relative 1.0)": {},
    "+ final_denoise": {"final_denoise": True},
    "step absolute 0.05": {"step": "absolute", "step_size": 0.05},
    "step absolute 0.2": {"step": "absolute", "step_size": 0.2},
    "gibbs argmax": {"gibbs": "argmax"},
    "keep lowest": {"keep": "lowest"},
    "authors (argmax, lowest, final_denoise)": {"gibbs": "argmax", "keep": "lowest", "final_denoise": True},
}


def main() -> None:
    torch.set_num_threads(1)
    sch, mix = LinearVP(), preset("gmm2d")
    model = mix.denoiser(sch)
    levels = level_grid(sch, 50, t_hi=0.9, t_lo=0.05)
    post = ExactLevelPosterior(mix, sch, levels)
    exact = mix.sample(20000, generator=torch.Generator().manual_seed(99))

    def tv(x: torch.Tensor) -> float:
        w, _, _ = mix._posterior(x.double(), sch, torch.full((x.shape[0],), sch.t_min, dtype=torch.float64))
        freq = torch.bincount(w.argmax(1), minlength=mix.n_components).double() / x.shape[0]
        return 0.5 * float((freq - mix.weights).abs().sum())

    print("| variant | tv | sw |\n|---|---|---|")
    for name, opts in VARIANTS.items():
        tvs, sws = [], []
        for seed in range(3):
            kw = {"langevin_steps": 2, "step_size": 1.0, "nfe_budget": 6, "grid": "quadratic_time", **opts}
            out, nfe, _ = dmcmc_sample(model, sch, 2000, levels=levels, level_posterior=post, seed=seed, **kw)
            assert nfe == 6
            tvs.append(tv(out))
            sws.append(float(sliced_wasserstein(out.double(), exact, 256, 0)))
        print(
            f"| {name} | {statistics.mean(tvs):.3f} ± {statistics.stdev(tvs):.3f} | "
            f"{statistics.mean(sws):.3f} ± {statistics.stdev(sws):.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
