"""Selective labels with domain constraints (Balachandar, Garg & Pierson, ICLR 2024, arXiv 2312.03878): the
uniform-unobservables model fitted with Pyro NUTS under none / prevalence / expertise / both constraints on
repeated synthetic data sets from the authors' generator (``dpmlab.apps.selective_labels.simulate``).

Per condition, pooled over data sets: RMSE of the posterior mean, coverage and mean width of the 90% equal-tailed
intervals, for the parameters the authors' notebook scores (beta_Y, beta_Delta on the intercept and the testing
feature, sigma), listed also for sigma alone; AUC on the untested group of the posterior-mean risk p(Y=1 | X)
against their (hidden) outcomes, beside the AUC of the true p(Y=1 | X) (the ceiling without Z). Paper's claim:
the constraints give tighter posteriors with correct coverage and lower error.

Usage: ``nice -n 10 python benchmarks/selective_labels.py [--datasets 3] [--n 1000] [--samples 100]
[--warmup 100] [--json out.json]``; the paper used N = 5000, 200 data sets and 4 Stan chains.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch

from dpmlab.apps import selective_labels as sl

torch.set_num_threads(1)
CONDITIONS = ("none", "prevalence", "expertise", "both")


def model_for(condition: str, sim: sl.Simulation) -> sl.SelectiveLabelsModel:
    prev = sim.prevalence if condition in ("prevalence", "both") else None
    tf = (0,) if condition in ("expertise", "both") else None  # the generator's beta_Delta: intercept + x1
    return sl.SelectiveLabelsModel(prevalence=prev, testing_features=tf)


def scored(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """beta_Y (all), beta_Delta (intercept, x1), sigma: the parameters of the authors' figure."""
    return torch.cat([p["beta_Y"], p["beta_Delta"][..., :2], p["sigma"][..., None]], dim=-1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--datasets", type=int, default=3)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--tree-depth", type=int, default=6)
    ap.add_argument("--json", help="write the table here")
    a = ap.parse_args()
    rows: dict[str, dict[str, list[float]]] = {
        c: {
            "err": [],
            "cover": [],
            "width": [],
            "err_s": [],
            "cover_s": [],
            "width_s": [],
            "auc": [],
            "div": [],
            "neff": [],
        }
        for c in CONDITIONS
    }
    oracle = []
    t0 = time.process_time()
    for k in range(a.datasets):
        sim = sl.simulate(sl.SyntheticConfig(n=a.n), seed=100 + k)
        untested = sim.data.T == 0
        truth = scored(sim.params)
        oracle.append(
            sl.auc(model_for("none", sim).expected_outcome(sim.params, sim.data.X)[untested], sim.Y_full[untested])
        )
        for c in CONDITIONS:
            post = sl.sample_posterior(
                model_for(c, sim),
                sim.data,
                num_samples=a.samples,
                warmup=a.warmup,
                seed=k,
                max_tree_depth=a.tree_depth,
                progress=False,
            )
            draws = scored(dict(post.samples))
            lo, hi = torch.quantile(draws, torch.tensor([0.05, 0.95], dtype=torch.float64), dim=0)
            r = rows[c]
            r["err"] += ((draws.mean(0) - truth) ** 2).tolist()
            r["cover"] += ((lo <= truth) & (truth <= hi)).double().tolist()
            r["width"] += (hi - lo).tolist()
            r["err_s"].append(float((draws.mean(0)[-1] - truth[-1]) ** 2))
            r["cover_s"].append(float((lo[-1] <= truth[-1]) & (truth[-1] <= hi[-1])))
            r["width_s"].append(float(hi[-1] - lo[-1]))
            r["auc"].append(sl.auc(post.risk(sim.data.X)[untested], sim.Y_full[untested]))
            r["div"].append(post.info["divergences"])
            r["neff"].append(post.info["min_n_eff"])
            print(
                f"  data set {k} {c:<10} sigma {float(post.samples['sigma'].mean()):.2f} "
                f"(true {float(sim.params['sigma']):.2f}), {time.process_time() - t0:.0f} CPU s",
                flush=True,
            )
    table = {}
    print(f"\nuniform model, N = {a.n}, {a.datasets} data sets, NUTS {a.warmup} + {a.samples} (1 chain)\n")
    print(
        "| constraint | RMSE | 90% coverage | 90% width | sigma RMSE | sigma coverage | sigma width | "
        "AUC untested | divergences | min n_eff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c in CONDITIONS:
        r = rows[c]
        t = {
            "rmse": math.sqrt(np.mean(r["err"])),
            "coverage": float(np.mean(r["cover"])),
            "width": float(np.mean(r["width"])),
            "sigma_rmse": math.sqrt(np.mean(r["err_s"])),
            "sigma_coverage": float(np.mean(r["cover_s"])),
            "sigma_width": float(np.mean(r["width_s"])),
            "auc": float(np.mean(r["auc"])),
            "divergences": float(np.mean(r["div"])),
            "min_n_eff": float(np.min(r["neff"])),
        }
        table[c] = t
        print(
            f"| {c} | {t['rmse']:.3f} | {t['coverage']:.2f} | {t['width']:.3f} | {t['sigma_rmse']:.3f} | "
            f"{t['sigma_coverage']:.2f} | {t['sigma_width']:.3f} | {t['auc']:.3f} | {t['divergences']:.1f} | "
            f"{t['min_n_eff']:.0f} |"
        )
    print(f"\nAUC of the true p(Y=1 | X) on the untested: {np.mean(oracle):.3f}; {time.process_time() - t0:.0f} CPU s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"settings": vars(a), "table": table, "oracle_auc": float(np.mean(oracle))}, fh, indent=2)


if __name__ == "__main__":
    main()
