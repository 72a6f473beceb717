"""S³ over the released decision space vs S³ over the base space, on held-out noise (docs/methods/usf_s3.md).

The released CIFAR-10 schedules use DPM-Solver-v3 prediction steps, the ``linear`` relaxation with a
searched coefficient and the ``eps_x`` / ``mean_x0`` analytical first steps. ``fit_s3_plan`` proposes them
when given the model's EMS (``ems=``) and the dataset mean (``afs_mean=``). Same budget, same search seeds;
the returned plan is chosen on a second noise set (``select_n``) and reported on a third (``report_n``).

    .venv/bin/python benchmarks/s3_space.py [--models gmm16] [--nfes 5,8] [--n 128] [--generations 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dpmlab.calibrate.ems import fit_ems
from dpmlab.calibrate.s3 import fit_s3_plan
from dpmlab.models.analytic import preset
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers.usf import Prediction, Relaxation

torch.set_num_threads(1)


def describe(plan) -> str:
    v3 = sum(s.prediction is Prediction.V3 for s in plan.steps)
    lin = sum(s.predictor.relaxation is Relaxation.LINEAR for s in plan.steps)
    return f"afs {plan.afs.value}, {v3} v3 steps, {lin} linear"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="gmm16")
    ap.add_argument("--nfes", default="5,8")
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--search-seeds", default="0,1")
    args = ap.parse_args()
    sch = DiscreteVP.from_preset("linear")
    print(f"RMS at sigma = 0 on {args.n} held-out noises (third set); mean over search seeds {args.search_seeds}\n")
    print("| model | NFE | base space | released space | released winners |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        mix = preset(name)
        model = mix.denoiser(sch)
        data = mix.sample(1024, generator=torch.Generator().manual_seed(7))
        ems = fit_ems(model, sch, data, n_points=1024, grid_size=100, t_end=sch.t_min, model_name=name)
        mean = mix.mean()
        for nfe in map(int, args.nfes.split(",")):
            t0 = time.time()
            cells: dict[str, list[float]] = {"base": [], "released": []}
            winners = []
            for s in map(int, args.search_seeds.split(",")):
                for kind, extra in (("base", {}), ("released", {"ems": ems, "afs_mean": mean})):
                    res = fit_s3_plan(
                        model,
                        sch,
                        nfe,
                        n_samples=args.n,
                        seed=0,
                        search_seed=s,
                        generations=args.generations,
                        select_n=args.n,
                        report_n=args.n,
                        model_name=name,
                        **extra,
                    )
                    assert res.held_out is not None
                    cells[kind].append(res.held_out)
                    if kind == "released":
                        winners.append(describe(res.plan))
            fmt = {k: f"{statistics.mean(v):.3e} ({', '.join(f'{e:.3e}' for e in v)})" for k, v in cells.items()}
            print(f"| {name} | {nfe} | {fmt['base']} | {fmt['released']} | {'; '.join(winners)} |", flush=True)
            print(f"{name} NFE {nfe}: {time.time() - t0:.0f}s", flush=True, file=sys.stderr)


if __name__ == "__main__":
    main()
