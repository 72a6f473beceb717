"""Held-out bench (issue 14): per NFE, the best dpmlab and the best diffusers configuration are chosen
on one noise set (seed 0) and their RMS error vs the reference reported on another (seed 1); the
diffusers peers run on the benchmarked model's own schedule from the reference's starting state.

    python benchmarks/bench_held_out.py [--schedules linear,scaled_linear,cosine] [--n 64]
"""

from __future__ import annotations

import argparse
import sys

import torch

from dpmlab.bench.harness import default_entries, held_out_best, run_bench
from dpmlab.models.analytic import preset
from dpmlab.schedules import DiscreteVP


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--schedules", default="linear,scaled_linear,cosine")
    p.add_argument("--model", default="gmm16")
    p.add_argument("--nfes", default="5,8,10,15,20")
    p.add_argument("--n", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    nfes = [int(k) for k in args.nfes.split(",")]
    for name in args.schedules.split(","):
        sch = DiscreteVP.from_preset(name)
        model = preset(args.model).denoiser(sch)
        runs = [
            run_bench(model, sch, model.data_shape, default_entries(), nfes, n=args.n, seed=s, name=args.model)
            for s in (0, 1)
        ]
        held = held_out_best(*runs)
        print(f"\n### {args.model}, {name} schedule (chosen on seed 0, reported on seed 1, n={args.n})\n")
        print("| NFE | best dpmlab | RMS | best diffusers | RMS | ratio |")
        print("|---|---|---|---|---|---|")
        for k in nfes:
            d = [r for r in held.rows if r.library == "dpmlab" and r.nfe == k]
            f = [r for r in held.rows if r.library == "diffusers" and r.nfe == k]
            if d and f:
                ratio = f[0].rms / d[0].rms
                print(f"| {k} | {d[0].label[6:]} | {d[0].rms:.3e} | {f[0].label[6:]} | {f[0].rms:.3e} | {ratio:.2f} |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
