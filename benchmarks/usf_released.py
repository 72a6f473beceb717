"""USF released schedules (thu-nics/USF, CIFAR-10 ScoreSDE NFE 5 / 10) on dpmlab's analytic gmm16.

The schedules were searched for a CIFAR-10 network, so no win over DPM-Solver++ / UniPC is expected here;
this checks that they load, run and what their ODE error is. RMSE against the float64 Dormand-Prince
reference from the same x_T, on the schedule's own time grid (from t_T to its last time), n = 256 draws,
mean +- standard error of the per-draw RMSE. DPM-Solver-v3 steps run with an EMS fitted on gmm16
(``fit_ems``, 1024 data points, 200 intervals) or are substituted (v3=data / v3=noise); the UNet skip
coefficients are dropped (no UNet); AFS "average_x0" uses the gmm16 mean.

Run: ``.venv/bin/python benchmarks/usf_released.py [--n 256]``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

import dpmlab.solvers as S
from dpmlab.calibrate.ems import fit_ems
from dpmlab.models.analytic import preset
from dpmlab.models.reference import reference_solution
from dpmlab.schedules import LinearVP
from dpmlab.solvers.usf import USF, Plan, Preset
from dpmlab.timesteps import make_grid


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    sch = LinearVP(0.1, 20.0, t_min=1e-4)  # the ScoreSDE VP schedule (continuous time)
    gmm = preset("gmm16")
    model = gmm.denoiser(sch)
    ems = fit_ems(
        model,
        sch,
        gmm.sample(1024, generator=torch.Generator().manual_seed(123)),
        n_points=1024,
        grid_size=200,
        t_start=1.0,
        t_end=1e-4,
        model_name="gmm16",
    )
    rows = ["| schedule | NFE | solver | RMSE vs reference (mean +- s.e.) |", "|---|---|---|---|"]
    for nfe in (5, 10):
        base = Plan.from_authors(f"cifar10_sde_nfe{nfe}", v3="data", drop_skip=True, afs_mean=gmm.mean())
        t_T, t_end = base.ts[0], base.ts[-1]  # type: ignore[index]
        x = torch.randn(a.n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(nfe))
        x = x * float(sch.sigma(torch.tensor(t_T, dtype=torch.float64)))
        ref = reference_solution(model, sch, x, t_T, t_end, rtol=1e-10, atol=1e-10).x

        def err(out: torch.Tensor, ref: torch.Tensor = ref) -> str:
            e = (out - ref).pow(2).mean(1).sqrt()
            return f"{e.mean():.4g} +- {e.std() / len(e) ** 0.5:.2g}"

        kept = Plan.from_authors(f"cifar10_sde_nfe{nfe}", drop_skip=True, afs_mean=gmm.mean())
        cands: list[tuple[str, torch.Tensor, USF]] = [
            ("USF released (v3 with fitted EMS, own grid)", kept.grid(), USF(kept, ems=ems))
        ]
        for v3 in ("data", "noise"):
            p = Plan.from_authors(f"cifar10_sde_nfe{nfe}", v3=v3, drop_skip=True, afs_mean=gmm.mean())
            assert p.nfe == nfe
            cands.append((f"USF released (v3->{v3}, own grid)", p.grid(), USF(p)))
        for name, pre in (
            ("DPM-Solver++ 2M", Preset.dpm_solver_pp(2)),
            ("DPM-Solver++ 3M", Preset.dpm_solver_pp(3)),
            ("UniPC-2 bh1", Preset.unipc(2)),
            ("UniPC-3 bh2", Preset.unipc(3, "bh2")),
        ):
            for grid in ("uniform_lambda", "quadratic_time"):
                usf = USF(pre)
                steps = usf.steps_for_nfe(nfe, False)
                ts = make_grid(sch, grid, steps, t_start=t_T, t_end=t_end)
                cands.append((f"{name} ({grid})", ts, usf))
        for label, ts, usf in cands:
            out = S.sample(S.Problem(model, sch), x, ts, usf)
            assert torch.isfinite(out).all()
            rows.append(f"| cifar10_sde_nfe{nfe} | {nfe} | {label} | {err(out)} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
