"""DualFast readings: which output the mixed eps~ replaces ("explicit" only vs "both") and which earlier
output it mixes in (tau = "first" | "previous"), on gmm16 with controlled model errors.

Model errors (as in benchmarks/time_shift_dualfast.py): ``exact``; ``blur`` x0^ = (1 - g a^2) x0* + g a^2 x0_lin
(g = 0.3; error growing as the noise falls, the paper's finding); ``eps_scale`` eps^ = (1 + 0.03 sigma) eps*.
Score: RMS at the grid's end against the EXACT model's reference ODE solution from the same noise (the
paper's "total error"), on 500 noises (seed 1234), uniform-time grids, c = 0.5, linear c schedule.

    nohup nice .venv/bin/python benchmarks/dualfast_readings.py > /tmp/dpm/dualfast_readings.log 2>&1 &
"""

from __future__ import annotations

import torch

from dpmlab.models.analytic import GaussianMixture, preset, reference_solution
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import Problem, get, sample
from dpmlab.solvers.dualfast import DualFast
from dpmlab.timesteps import uniform_time

NFES = (5, 8, 10, 20, 50)


class Biased:
    def __init__(self, mix: GaussianMixture, sch: DiscreteVP, kind: str) -> None:
        self.mix, self.schedule, self.kind = mix, sch, kind
        self.data_shape = (mix.dim,)
        self.mu, self.v = mix.mean(), torch.diagonal(mix.cov())

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        sch = self.schedule
        a, s = sch.alpha(t)[:, None], sch.sigma(t)[:, None]
        x0 = self.mix.x0(x, sch, t)
        if self.kind == "exact":
            return x0
        if self.kind == "eps_scale":
            return (x - s * (x - a * x0) / s * (1.0 + 0.03 * s)) / a
        x0_lin = self.mu + a * self.v / (a * a * self.v + s * s) * (x - a * self.mu)  # Wiener denoiser
        g = 0.3 * a * a
        return (1 - g) * x0 + g * x0_lin


def main() -> None:
    torch.set_num_threads(1)
    mix, sch = preset("gmm16"), DiscreteVP.from_preset("linear")
    exact = mix.denoiser(sch)
    x = torch.randn(500, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1234))
    readings = [(r, tau) for r in ("explicit", "both") for tau in ("first", "previous")]
    variants = [("base", None)] + [(f"{r}/{tau}", (r, tau)) for r, tau in readings]
    for kind in ("blur", "eps_scale", "exact"):
        model = Biased(mix, sch, kind)
        for bname in ("ddim", "dpm_solver_pp"):
            print(f"\n{kind} / {bname}\n\n| variant | " + " | ".join(f"NFE {n}" for n in NFES) + " |")
            print("|---|" + "---|" * len(NFES), flush=True)
            refs = {}
            for nfe in NFES:
                ts = uniform_time(sch, nfe)
                refs[nfe] = (ts, reference_solution(exact, sch, x, float(ts[0]), float(ts[-1]), rtol=1e-8, atol=1e-8).x)
            for name, opt in variants:
                row = []
                for nfe in NFES:
                    ts, ref = refs[nfe]
                    base = get(bname)
                    s = base if opt is None else DualFast(base=base, c=0.5, replace=opt[0], tau=opt[1])
                    out = sample(Problem(model, sch), x, ts, s)
                    row.append(f"{float((out - ref).pow(2).mean().sqrt()):.3f}")
                print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
