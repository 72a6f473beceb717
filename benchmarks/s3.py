"""S³-searched USF plans vs the best fixed solver and the best diffusers scheduler on the analytic
mixtures — the experiment of docs/methods/usf_s3.md.

Setup: discrete linear schedule (1e-4..0.02, 1000 steps), grids ending at sigma = 0. The search uses
``--n`` starting noises (seed 0, the fitness set); every number in the table is the RMS error at
sigma = 0 against the float64 reference on ``--n`` *other* noises (seed 1). The "best fixed solver" is
chosen among every deterministic registered solver on every grid in GRIDS by its error on the fitness
set, then evaluated on the test set (the oracle best on the test set is also shown).

    .venv/bin/python benchmarks/s3.py [--n 256] [--generations 15] [--quick] [--plans DIR]
prints markdown tables (and saves the plans as JSON artifacts under DIR).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from dpmlab.api import make_grid
from dpmlab.bench.harness import peer_rows
from dpmlab.calibrate.s3 import fit_s3_plan, initial_plans
from dpmlab.models.analytic import preset, reference_solution
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import Problem, available, get, sample
from dpmlab.solvers.usf import USF, Plan

torch.set_num_threads(1)
NFES = (4, 5, 6, 8, 10)
GRIDS = ("uniform_lambda", "uniform_time", "quadratic_time", "karras")
SKIP = {"usf", "dc_solver"}  # wrappers whose defaults duplicate UniPC


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def fixed_solvers(model: Any, sch: DiscreteVP, nfe: int, sets: list[tuple[torch.Tensor, torch.Tensor]]) -> list:
    """(label, fit error, test error) of every deterministic solver x grid meeting ``nfe`` exactly."""
    out = []
    for name in available():
        s = get(name)
        if name in SKIP or s.is_stochastic():
            continue
        try:
            steps = s.steps_for_nfe(nfe, True)
        except ValueError:
            continue
        for g in GRIDS:
            ts = make_grid(sch, g, steps, to_zero=True)
            try:
                errs = [rms(sample(Problem(model, sch), x * float(sch.sigma(ts[:1])), ts, s), ref) for x, ref in sets]
            except (ValueError, FloatingPointError, RuntimeError):
                continue
            out.append((f"{name} @{g}", *errs))
    return out


def run(name: str, sch: DiscreteVP, n: int, generations: int, peers: bool, plans: Path | None) -> list[str]:
    mix = preset(name)
    model = mix.denoiser(sch)
    sets = []
    for seed in (0, 1):
        x = torch.randn(n, mix.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        sets.append(
            (x, reference_solution(model, sch, x * float(sch.sigma(torch.tensor(sch.t_max))), sch.t_max, 0.0).x)
        )
    x_test, ref_test = sets[1]
    peer = {}
    if peers:
        t_idx0 = float(sch.index_to_t(0.0))
        mid = reference_solution(model, sch, x_test, sch.t_max, t_idx0).x
        end = reference_solution(model, sch, mid, t_idx0, 0.0).x
        for r in peer_rows(model, sch, x_test, {0.0: end, t_idx0: mid}, NFES):
            if r.rms == r.rms and (r.nfe not in peer or r.rms < peer[r.nfe].rms):
                peer[r.nfe] = r
    out = [
        f"## {name}",
        "",
        "| NFE | S³ plan | S³ + predictor | best initial preset | best fixed solver "
        "(chosen on fit set) | oracle best fixed (test) | best diffusers |",
        "|---|---|---|---|---|---|---|",
    ]
    for nfe in NFES:
        t0 = time.time()
        cells = []
        for pred in (False, True):
            res = fit_s3_plan(
                model, sch, nfe, n_samples=n, seed=0, generations=generations, predictor=pred, model_name=name
            )
            out_t = sample(
                Problem(model, sch), x_test * float(sch.sigma(torch.tensor(sch.t_max))), res.plan.grid(), USF(res.plan)
            )
            cells.append(f"{rms(out_t, ref_test):.3e} (fit {res.fitness:.3e}, {res.evaluations} evals)")
            if plans is not None and not pred:
                res.plan.save(plans / f"s3_{name}_nfe{nfe}.json")
            best_init = min(res.baselines, key=res.baselines.__getitem__)
        init_plan: Plan = initial_plans(sch, nfe, True, name)[best_init]
        e_init = rms(
            sample(
                Problem(model, sch),
                x_test * float(sch.sigma(torch.tensor(sch.t_max))),
                init_plan.grid(),
                USF(init_plan),
            ),
            ref_test,
        )
        fixed = fixed_solvers(model, sch, nfe, sets)
        by_fit = min(fixed, key=lambda r: r[1])
        by_test = min(fixed, key=lambda r: r[2])
        p = peer.get(nfe)
        out.append(
            f"| {nfe} | {cells[0]} | {cells[1]} | {e_init:.3e} ({best_init}) | {by_fit[2]:.3e} ({by_fit[0]}) "
            f"| {by_test[2]:.3e} ({by_test[0]}) | " + (f"{p.rms:.3e} ({p.label})" if p else "—") + " |"
        )
        print(f"{name} NFE {nfe}: {time.time() - t0:.0f}s", file=sys.stderr)
    return out + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--generations", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="gmm16 only")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--plans", type=Path, default=None, help="folder for the searched plans (JSON)")
    args = ap.parse_args()
    sch = DiscreteVP.from_preset("linear")
    lines = [f"RMS error at sigma = 0 on {args.n} held-out samples; search fitness on {args.n} others.", ""]
    for name in ("gmm16",) if args.quick else ("gmm16", "gmm64"):
        lines += run(name, sch, args.n, args.generations, not args.no_peers, args.plans)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
