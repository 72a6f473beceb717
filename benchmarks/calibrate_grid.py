"""Learned time grids (GITS DP, GITS + end-to-end refinement) vs fixed grids, on HELD-OUT noise.

For each model, solver and NFE: a grid is fitted on ``--n-cal`` calibration noises (counter-based seed 0) and
every grid is scored on ``--n-test`` other noises (seed 1, refused if they overlap) against the float64
reference ODE solution at sigma = 0. Reported: RMS error over all coordinates, and the median of the
per-sample RMS error, as "RMS / median"; plus the fitting cost in seconds (one thread).

    python benchmarks/calibrate_grid.py --models gmm16 gmm64 --out runs/calibrate_grid.json
"""

from __future__ import annotations

import argparse
import json
import math

import torch

from dpmlab.calibrate.grid import METHODS, calibration_noise, fit_grid, grid_errors
from dpmlab.models.analytic import preset
from dpmlab.models.reference import reference_solution
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import get
from dpmlab.timesteps import make_grid

FIXED = ("quadratic_time", "uniform_lambda", "uniform_time", "karras")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["gmm16", "gmm64"])
    ap.add_argument("--solvers", nargs="+", default=["ddim", "dpm_solver_pp", "unipc"])
    ap.add_argument("--nfes", nargs="+", type=int, default=[4, 5, 6, 8, 10])
    ap.add_argument("--n-cal", type=int, default=128)
    ap.add_argument("--n-test", type=int, default=512)
    ap.add_argument("--fine-steps", type=int, default=40)
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--ref-tol", type=float, default=1e-9)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        if name == "mnist":  # the shipped network, unconditional (null class), on its own schedule
            import dpmlab

            model = dpmlab.load("mnist")
            sch, shape = model.schedule, tuple(model.data_shape)
        else:
            sch = DiscreteVP.from_preset("linear")
            model = preset(name).denoiser(sch)
            shape = (preset(name).dim,)
        dim = math.prod(shape)
        seeds = {"seed": 0, "start": 0, "n": args.n_cal}
        x_cal = calibration_noise(sch, shape, args.n_cal, seed=0)
        x_test = calibration_noise(sch, shape, args.n_test, seed=1)
        tol = args.ref_tol
        ref = reference_solution(model, sch, x_test, sch.t_max, sch.t_zero, rtol=tol, atol=tol).x
        for sv in args.solvers:
            slv = get(sv)
            for nfe in args.nfes:
                steps = slv.steps_for_nfe(nfe, True)
                grids = {g: make_grid(sch, g, steps, to_zero=True) for g in FIXED}
                cost = {}
                for method in args.methods:
                    art = fit_grid(
                        model,
                        sch,
                        sv,
                        nfe,
                        x_cal,
                        method=method,
                        fine_steps=args.fine_steps,
                        model_name=name,
                        seeds=seeds,
                        ref_tol=tol,
                    )
                    art.check_held_out(1, 0, args.n_test)  # seed 1 is disjoint from the calibration seed 0
                    art.check(name, sv, nfe, sch)
                    grids[method] = art.grid()
                    cost[method] = art.fit_seconds
                for g, ts in grids.items():
                    e = grid_errors(model, sch, slv, ts, x_test, ref) / math.sqrt(dim)  # per-sample RMS
                    rows.append(
                        {
                            "model": name,
                            "solver": sv,
                            "nfe": nfe,
                            "grid": g,
                            "rms": float(e.pow(2).mean().sqrt()),
                            "median": float(e.median()),
                            "fit_s": cost.get(g, 0.0),
                            "ts": ts.tolist(),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows, args.nfes))


def table(rows: list[dict], nfes: list[int]) -> str:
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for sv in dict.fromkeys(r["solver"] for r in rows if r["model"] == model):
            sub = [r for r in rows if r["model"] == model and r["solver"] == sv]
            out += [
                "",
                f"**{model}, {sv}** — held-out RMS / median per-sample RMS error",
                "",
                "| grid | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
                "|---|" + "---|" * len(nfes),
            ]
            for g in dict.fromkeys(r["grid"] for r in sub):
                cells = []
                for k in nfes:
                    r = next((r for r in sub if r["grid"] == g and r["nfe"] == k), None)
                    best = min((q["rms"] for q in sub if q["nfe"] == k), default=math.inf)
                    c = "—" if r is None else f"{r['rms']:.3g} / {r['median']:.3g}"
                    cells.append(f"**{c}**" if r is not None and r["rms"] == best else c)
                out.append(f"| {g} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Fitting cost (seconds, one thread, incl. the teacher trajectories)",
        "",
        "| model | solver | method | " + " | ".join(f"NFE {k}" for k in nfes) + " |",
        "|---|---|---|" + "---|" * len(nfes),
    ]
    for model in dict.fromkeys(r["model"] for r in rows):
        for sv in dict.fromkeys(r["solver"] for r in rows if r["model"] == model):
            for g in dict.fromkeys(r["grid"] for r in rows if r["fit_s"] > 0):
                cells = [
                    f"{r['fit_s']:.1f}"
                    for k in nfes
                    for r in rows
                    if r["model"] == model and r["solver"] == sv and r["grid"] == g and r["nfe"] == k
                ]
                out.append(f"| {model} | {sv} | {g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
