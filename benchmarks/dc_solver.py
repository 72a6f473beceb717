"""DC-Solver vs UniPC (and the best diffusers scheduler) on the analytic mixtures, with and without
classifier-free guidance — the experiment of docs/methods/dc_solver.md.

Setup: discrete linear schedule (1e-4..0.02, 1000 steps), grids ending at sigma = 0; RMS error at
sigma = 0 against the float64 reference ODE solution of the (guided) model, on ``--n`` held-out
starting noises (seed 1). Ratios are fitted on 10 other starting noises (seed 0, the paper's 10
datapoints) per (model, guidance, NFE, grid). Guidance: a two-class mixture — class 0 is the first half
of the preset's components, the unconditional model is the whole mixture — guided in x0 space with
scale w (w = 1: the conditional model). CPR is fitted on all (NFE, w) of a model/grid and evaluated at
unseen settings.

    .venv/bin/python benchmarks/dc_solver.py [--n 256] [--quick]
prints markdown tables.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

import dpmlab
from dpmlab.api import make_grid
from dpmlab.bench.harness import peer_rows
from dpmlab.calibrate.dc import fit_cpr, fit_dc_ratios
from dpmlab.models.analytic import GaussianMixture, preset, reference_solution
from dpmlab.models.guidance import classifier_free
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import Problem, get, sample
from dpmlab.solvers.dc_solver import DynamicCompensation

torch.set_num_threads(1)
NFES = (4, 5, 6, 8, 10)
GUIDANCE = (None, 1.0, 3.0, 7.0)  # None: the unconditional mixture, no guidance
UNSEEN = ((7, 5.0), (9, 2.0))  # CPR test settings (steps, w) not in the fitting grid
BASE = get("unipc", variant="bh2")  # UniPC-2 bh2: diffusers' and DC-Solver's diffusers default


def models(name: str, sch: DiscreteVP) -> dict[str, Any]:
    mix = preset(name)
    k = mix.n_components // 2
    cond = GaussianMixture(mix.weights[:k], mix.means[:k], mix.stds[:k], name=f"{name}-class0").denoiser(sch)
    uncond = mix.denoiser(sch)
    return {
        ("none" if w is None else f"w={w:g}"): (uncond if w is None else classifier_free(cond, uncond, w))
        for w in GUIDANCE
    }


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def run(name: str, sch: DiscreteVP, grids: tuple[str, ...], n: int, peers: bool) -> list[str]:
    dim = preset(name).dim
    x = torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = [f"## {name}", ""]
    for grid in grids:
        out += [
            f"### grid `{grid}`",
            "",
            "| guidance | solver | " + " | ".join(f"NFE {k}" for k in NFES) + " |",
            "|---" * (len(NFES) + 2) + "|",
        ]
        fits = []
        for label, model in models(name, sch).items():
            t0 = time.time()
            ref = reference_solution(model, sch, x, sch.t_max, 0.0).x
            rows: dict[str, list[str]] = {"UniPC-2 bh1": [], "UniPC-2 bh2": [], "DC-Solver (UniPC-2 bh2)": []}
            for nfe in NFES:
                ts = make_grid(sch, grid, nfe, to_zero=True)
                xs = x * float(sch.sigma(ts[:1]))
                for lab, s in (("UniPC-2 bh1", get("unipc")), ("UniPC-2 bh2", BASE)):
                    rows[lab].append(f"{rms(sample(Problem(model, sch), xs, ts, s), ref):.3e}")
                w = 1.0 if label == "none" else float(label[2:])
                r = fit_dc_ratios(model, sch, BASE, nfe, grid=grid, guidance=w, model_name=f"{name}/{label}")
                if label != "none":
                    fits.append(r)
                e = rms(sample(Problem(model, sch), xs, ts, DynamicCompensation(BASE, r)), ref)
                rows["DC-Solver (UniPC-2 bh2)"].append(f"{e:.3e}")
            if peers:
                rows["best diffusers"] = best_peer(model, sch, x)
            out += [f"| {label} | {lab} | " + " | ".join(v) + " |" for lab, v in rows.items()]
            print(f"{name} {grid} {label}: {time.time() - t0:.0f}s", file=sys.stderr)
        out += ["", *cpr_table(name, sch, grid, fits, x), ""]
    return out


def best_peer(model: Any, sch: DiscreteVP, x: torch.Tensor) -> list[str]:
    t_idx0 = float(sch.index_to_t(0.0))
    mid = reference_solution(model, sch, x, sch.t_max, t_idx0).x
    end = reference_solution(model, sch, mid, t_idx0, 0.0).x
    rows = peer_rows(model, sch, x, {0.0: end, t_idx0: mid}, NFES)
    cells = []
    for k in NFES:
        cand = [r for r in rows if r.nfe == k and r.rms == r.rms]
        best = min(cand, key=lambda r: r.rms) if cand else None
        cells.append(f"{best.rms:.3e} ({best.label})" if best else "—")
    return cells


def cpr_table(name: str, sch: DiscreteVP, grid: str, fits: list, x: torch.Tensor) -> list[str]:
    """CPR fitted on every guided (NFE, w) of this grid, evaluated at unseen settings."""
    cpr = fit_cpr(fits, model_name=name)
    res = [abs(a - b) for f in fits for a, b in zip(cpr.predict(len(f.ratios), f.guidance).ratios, f.ratios)]
    out = [
        f"CPR on {len(fits)} fitted settings: mean |rho_CPR - rho_fit| = {sum(res) / len(res):.3f}.",
        "",
        "| unseen (NFE, w) | UniPC-2 bh2 | DC (CPR ratios) | DC (fitted ratios) |",
        "|---|---|---|---|",
    ]
    ms = models(name, sch)
    for nfe, w in UNSEEN:
        k = preset(name).n_components // 2
        mix = preset(name)
        cond = GaussianMixture(mix.weights[:k], mix.means[:k], mix.stds[:k]).denoiser(sch)
        model = classifier_free(cond, ms["none"], w)
        ts = make_grid(sch, grid, nfe, to_zero=True)
        ref = reference_solution(model, sch, x, sch.t_max, 0.0).x
        xs = x * float(sch.sigma(ts[:1]))
        fit = fit_dc_ratios(model, sch, BASE, nfe, grid=grid, guidance=w)
        errs = [
            rms(sample(Problem(model, sch), xs, ts, s), ref)
            for s in (BASE, DynamicCompensation(BASE, cpr.predict(nfe, w)), DynamicCompensation(BASE, fit))
        ]
        out.append(f"| ({nfe}, {w:g}) | " + " | ".join(f"{e:.3e}" for e in errs) + " |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="gmm16 and one grid only")
    ap.add_argument("--no-peers", action="store_true")
    args = ap.parse_args()
    sch = DiscreteVP.from_preset("linear")
    names = ("gmm16",) if args.quick else ("gmm16", "gmm64")
    grids = ("uniform_time",) if args.quick else ("uniform_time", "quadratic_time")
    lines = [f"RMS error at sigma = 0, {args.n} held-out samples; ratios fitted on 10 datapoints.", ""]
    for name in names:
        lines += run(name, sch, grids, args.n, not args.no_peers)
    try:
        dpmlab.load("mnist")
        lines.append("mnist: available but not benchmarked here (see docs).")
    except ValueError as e:
        lines.append(f"mnist: not benchmarked — dpmlab.load('mnist') failed: {e}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
