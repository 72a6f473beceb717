"""Inversion on the shipped class-conditional MNIST model: reconstruction and a label edit (CPU, small).

Data: 32 images of the MNIST-5k validation split (``mnist_5k_split``; the first 3-4 of each digit; the
shipped diffusion model was trained on all 5,000 images, so they are not held out from it, but the
edit evaluator below never saw them). Grids: ``uniform_time`` from t_max = 1
to t_min = 0.001 (the data sit at t_min; sigma there is 0.01). Noise: ``SeededNoise(0, range(32))``.

* ``recon``: invert with the true label, regenerate / sample back with the same label and guidance;
  RMS (pixels in [-1, 1], not clamped) and PSNR = 20 log10(2 / RMS) of the reconstruction, at 10 / 20 / 50
  steps, guidance w = 1 (conditional model) and w = 3.5 (the paper's source scale); edit-friendly DDPM
  vs DDIM inversion (solver ``ddim``) and, at w = 1, ``dpm_solver_pp`` as the inverting solver.
* ``edit``: 50 steps; invert with the true label at w_src = 3.5, regenerate from ``ts[skip]`` (the
  authors' T - skip) with a target label other than the source's (``(y + 1 + i % 9) % 10``) at w_tar = 3.5
  and 15 (the paper's target scale).
  Baselines at w_tar = 15: DDIM inversion to ``ts[skip]`` then DDIM sampling with the target, and
  SDEdit (fresh noise to ``ts[skip]``, DDPM sampling with the target). Outputs are clamped to [-1, 1]
  (as saved images); success = the independent evaluator (classifier B: another architecture and seed,
  used by nothing the edit runs) predicts the target label; preservation = RMS pixel distance to the
  source.

    nice -n 5 .venv/bin/python benchmarks/inversion.py recon|edit|all
prints markdown tables (copied into docs/methods/inversion.md).
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import Tensor

import dpmlab
from dpmlab.editing import guided, invert, invert_ddpm, regenerate
from dpmlab.metrics.features import evaluator_predictions, mnist_5k_split
from dpmlab.solvers import DDPM, SeededNoise, get, sample
from dpmlab.timesteps import uniform_time
from dpmlab.training.data import mnist5k

torch.set_num_threads(1)
N_IMG, SEED = 32, 0
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def rms(a: Tensor, b: Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


def psnr(e: float) -> float:
    return 20 * math.log10(2.0 / e) if e > 0 else math.inf


def setup() -> tuple[object, Tensor, Tensor]:
    ds = mnist5k()
    assert ds.labels is not None
    _, val = mnist_5k_split(ds.labels)
    per_digit = [val[ds.labels[val] == d] for d in range(10)]
    idx = torch.stack([per_digit[i % 10][i // 10] for i in range(N_IMG)])  # digits 0..9 in turn
    return dpmlab.load("mnist"), ds.x[idx], ds.labels[idx]


def noise() -> SeededNoise:
    return SeededNoise(SEED, range(N_IMG))


def recon() -> None:
    model, x0, y = setup()
    rows = []
    for w in (1.0, 3.5):
        for steps in (10, 20, 50):
            ts = uniform_time(model.schedule, steps)
            problem = guided(model, w, {"label": y}, noise=noise())
            inv = invert_ddpm(problem, x0, ts)
            e = rms(regenerate(problem, inv), x0)
            rows.append(("edit-friendly DDPM", w, steps, e))
            solvers = ("ddim", "dpm_solver_pp") if w == 1.0 else ("ddim",)
            for name in solvers:
                solver = get(name)
                e = rms(sample(problem, invert(problem, x0, ts, solver), ts, solver), x0)
                rows.append((f"DDIM inversion ({name})", w, steps, e))
            log(f"recon w={w} steps={steps} done; z var {float(inv.zs.var()):.2f}")
    print("| inversion | guidance w | steps | RMS | PSNR (dB) |\n|---|---|---|---|---|")
    for name, w, steps, e in rows:
        print(f"| {name} | {w:g} | {steps} | {e:.2e} | {psnr(e):.1f} |")


def edit() -> None:
    model, x0, y = setup()
    target = (y + 1 + torch.arange(N_IMG) % 9) % 10  # a label other than the source's
    steps, skips = 50, (0, 20, 25, 30, 35, 40)
    ts = uniform_time(model.schedule, steps)
    src = guided(model, 3.5, {"label": y}, noise=noise())

    def score(out: Tensor) -> tuple[float, float]:
        out = out.clamp(-1, 1)
        return float((evaluator_predictions(out) == target).float().mean()), rms(out, x0)

    inv = invert_ddpm(src, x0, ts)
    log(f"inverted; z var {float(inv.zs.var()):.2f} (first 10 steps {float(inv.zs[:10].var()):.2f})")
    rows: dict[tuple[str, int], tuple[float, float]] = {}
    for skip in skips:
        for w_tar in (3.5, 15.0):
            out = regenerate(guided(model, w_tar, {"label": target}), inv, skip=skip)
            rows[(f"edit-friendly, w_tar={w_tar:g}", skip)] = score(out)
        tar = guided(model, 15.0, {"label": target}, noise=SeededNoise(SEED + 1, range(N_IMG)))
        x_skip = invert(src, x0, ts[skip:], get("ddim"))
        rows[("DDIM inversion, w_tar=15", skip)] = score(sample(tar, x_skip, ts[skip:], get("ddim")))
        x_noisy = model.schedule.add_noise(x0, noise()(0, x0), ts[skip])  # SDEdit: fresh noise at ts[skip]
        rows[("SDEdit (DDPM), w_tar=15", skip)] = score(sample(tar, x_noisy, ts[skip:], DDPM()))
        log(f"edit skip={skip} done")
    methods = list(dict.fromkeys(m for m, _ in rows))
    head = " | ".join(f"skip {s} (t={float(ts[s]):.2f})" for s in skips)
    print(f"target accuracy / RMS to source, {steps} steps\n\n| method | {head} |\n|---|" + "---|" * len(skips))
    for m in methods:
        print(f"| {m} | " + " | ".join(f"{rows[(m, s)][0]:.2f} / {rows[(m, s)][1]:.3f}" for s in skips) + " |")


if __name__ == "__main__":
    part = sys.argv[1] if len(sys.argv) > 1 else "all"
    if part not in ("recon", "edit", "all"):
        raise SystemExit(f"usage: {sys.argv[0]} recon|edit|all (got {part!r})")
    if part in ("recon", "all"):
        recon()
    if part in ("edit", "all"):
        edit()
