"""DC-Solver ratio fit: the bounded 1-D search vs the authors' unbounded AdamW, scored on HELD-OUT noise.

For each (grid, NFE, fit seed) both methods fit ratios for UniPC-2 bh2 on gmm16 (10 fitting noises of
that seed); each fit is scored by the RMS error at sigma = 0 against the float64 reference ODE solution
on 256 held-out noises (seed 10_000, never used for fitting). Prints a markdown table.

    nohup nice .venv/bin/python benchmarks/dc_solver_fit.py > /tmp/dpm/dc_fit.log 2>&1 &
"""

from __future__ import annotations

import argparse
import math

import torch

import dpmlab.solvers as S
from dpmlab.api import make_grid
from dpmlab.calibrate.dc import fit_dc_ratios
from dpmlab.models.analytic import preset, reference_solution
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers.dc_solver import DynamicCompensation


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gmm16")
    ap.add_argument("--nfes", default="5,6,8,10")
    ap.add_argument("--grids", default="uniform_time,quadratic_time")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument(
        "--wide", type=float, nargs=2, default=None, help="also a bounded search in these wider bounds (e.g. 0.25 2.0)"
    )
    a = ap.parse_args()
    torch.set_num_threads(1)
    sch = DiscreteVP.from_preset("linear")
    model = preset(a.model).denoiser(sch)
    base = S.get("unipc", variant="bh2")
    x = torch.randn(a.n, model.data_shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(10_000))
    print(
        "| grid | NFE | UniPC-2 bh2 | DC bounded (0.5, 1.5) | DC AdamW (unbounded) | ratio range bounded | "
        "ratio range AdamW |\n|---|---|---|---|---|---|---|",
        flush=True,
    )
    for grid in a.grids.split(","):
        for nfe in map(int, a.nfes.split(",")):
            ts = make_grid(sch, grid, nfe, to_zero=True)
            ref = reference_solution(model, sch, x * float(sch.sigma(ts[:1])), float(ts[0]), 0.0).x

            def err(s: S.Solver, ts: torch.Tensor = ts, ref: torch.Tensor = ref) -> float:
                out = S.sample(S.Problem(model, sch), x * float(sch.sigma(ts[:1])), ts, s)
                return float((out - ref).pow(2).mean().sqrt())

            e0 = err(base)
            names = ["bounded", "adamw"] + (["wide"] if a.wide else [])
            res: dict[str, list[float]] = {m: [] for m in names}
            rng: dict[str, list[float]] = {m: [] for m in names}
            for seed in range(a.seeds):
                for m in names:
                    kw = {"method": "bounded", "bounds": tuple(a.wide)} if m == "wide" else {"method": m}
                    r = fit_dc_ratios(model, sch, base, nfe, grid=grid, seed=seed, ref_tol=1e-8, **kw)
                    res[m].append(err(DynamicCompensation(base, r)))
                    rng[m] += list(r.ratios[2:])

            def fmt(v: list[float]) -> str:
                mu = sum(v) / len(v)
                sd = math.sqrt(sum((u - mu) ** 2 for u in v) / max(len(v) - 1, 1))
                return f"{mu:.3e} ± {sd:.1e}"

            print(
                f"| {grid} | {nfe} | {e0:.3e} | {fmt(res['bounded'])} | {fmt(res['adamw'])} | "
                f"{min(rng['bounded']):.2f} – {max(rng['bounded']):.2f} | "
                f"{min(rng['adamw']):.2f} – {max(rng['adamw']):.2f} |"
                + (
                    f" wide {a.wide}: {fmt(res['wide'])}, ratios {min(rng['wide']):.2f} – {max(rng['wide']):.2f}"
                    if a.wide
                    else ""
                ),
                flush=True,
            )


if __name__ == "__main__":
    main()
