"""BoundaryDiffusion on MNIST, the digit pair 4 vs 9, on the null-class (unconditional) ``mnist`` model.

    python benchmarks/boundary.py            # ~2 min on one CPU thread

(Bold vs thin, ``dpmlab.training.captions.thickness_class``, was tried first: its classes are ink mass
against *per-digit* tertiles, not a linear function of the pixels — a linear SVM reached only 0.70
held-out accuracy in pixel space and 0.61-0.76 in z/h, so the pair of digits is used instead.)

1. DDIM-invert labelled thin / bold training images once along ``1.0, 0.95, ..., 0.05, t_min`` and read
   z (and h, one extra evaluation) at several mixing steps t0: linear-SVM accuracy on held-out images
   per space and t0; the radius profile of the inverted latents against the forward marginal and the
   automatic mixing step.
2. At one t0, edit held-out 4s toward 9 (and 9s toward 4) onto the plane at a multiple of the median
   distance of the target side's training latents, in z and h; controls: no edit (reconstruction) and a
   random direction with the same per-sample displacement lengths. Flip rate: the independent evaluator
   (``MNISTClassifierB``) reads the target digit; preservation: the pixel RMS distance to the source and
   the ink mass ratio (result / source).
3. Unconditional control: fresh noise sampled to t0, pushed to either side of the boundary.
"""

from __future__ import annotations

import argparse
import time

import torch

import dpmlab
from dpmlab.editing import Latents, bottleneck, boundary_edit, fit_boundary, invert, sample_to
from dpmlab.editing.boundary import Boundary, MixingProfile
from dpmlab.metrics.features import evaluator_predictions, mnist_5k, mnist_5k_split
from dpmlab.models.guidance import Unconditional
from dpmlab.solvers import Problem, StepInfo, get
from dpmlab.training.captions import ink_mass

A, B = 4, 9  # label 0 = digit A, label 1 = digit B


def h_at(problem: Problem, z: torch.Tensor, t0: float) -> torch.Tensor:
    with bottleneck(problem.model.model.net) as cap, torch.no_grad():
        problem.denoise(z, t0)
    return cap[0]


def random_like(b: Boundary, seed: int) -> torch.Tensor:
    r = torch.randn(b.normal.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return r / r.norm()


def displaced(x: torch.Tensor, b: Boundary, d: float, direction: torch.Tensor) -> torch.Tensor:
    """``x`` moved by the boundary edit's per-sample length ``|d - dist(x)|`` along ``direction``."""
    length = (d - b.distance(x)).abs()
    return x + (length[:, None] * direction[None]).reshape(x.shape).to(x.dtype)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=100, help="training images per side")
    p.add_argument("--n-test", type=int, default=40, help="held-out images per side")
    p.add_argument("--t0", type=float, default=0.6, help="mixing step of the edit experiment")
    p.add_argument("--steps", type=int, default=12, help="DDIM steps from t0 to t_min when editing")
    args = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model = dpmlab.load("mnist")
    sch = model.schedule
    problem = Problem(Unconditional(model), sch)
    data = mnist_5k()
    train, val = mnist_5k_split(data.labels)

    def pick(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        sel = torch.cat([idx[data.labels[idx] == A][:n], idx[data.labels[idx] == B][:n]])
        return sel, (data.labels[sel] == B).long()

    tr, y_tr = pick(train, args.n_train)
    te, y_te = pick(val, args.n_test)
    x_all = torch.cat([data.images[tr], data.images[te]])

    # 1. one inversion along a fixed grid; z and h at each candidate t0; the radius profile
    t0s = [0.2, 0.4, 0.6, 0.8, 1.0]
    grid = torch.cat([torch.arange(20, 0, -1, dtype=torch.float64) * 0.05, torch.tensor([sch.t_min])])
    states: dict[float, torch.Tensor] = {}
    radii: list[tuple[float, float]] = [(sch.t_min, float(x_all.flatten(1).norm(dim=1).mean()) / 28)]

    def keep(info: StepInfo) -> None:
        radii.append((info.t_next, float(info.x.flatten(1).norm(dim=1).mean()) / 28))
        for t0 in t0s:
            if abs(info.t_next - t0) < 1e-9:
                states[t0] = info.x

    invert(problem, x_all, grid, get("ddim"), callback=keep)
    lat = {t0: Latents(states[t0], h_at(problem, states[t0], t0), t0) for t0 in t0s}
    ts_r = torch.tensor([t for t, _ in radii], dtype=torch.float64)
    m2 = float(x_all.pow(2).mean())
    prof = MixingProfile(
        ts_r,
        torch.tensor([r for _, r in radii], dtype=torch.float64),
        torch.sqrt(sch.alpha(ts_r) ** 2 * m2 + sch.sigma(ts_r) ** 2),
    )
    n_tr = len(tr)
    print(
        f"{A} vs {B} on the null-class mnist model: {n_tr // 2} + {n_tr // 2} training, "
        f"{len(te) // 2} + {len(te) // 2} held-out images; DDIM inversion on a 20-step grid"
    )
    print("\n| t0 | SVM held-out acc. (z) | SVM held-out acc. (h) | radius inverted / forward |")
    print("|---|---|---|---|")
    bounds = {}
    for t0 in t0s:
        L = lat[t0]
        zb = fit_boundary(L.z[:n_tr], y_tr, (L.z[n_tr:], y_te))
        hb = fit_boundary(L.h[:n_tr], y_tr, (L.h[n_tr:], y_te))
        bounds[t0] = (zb, hb)
        k = int(torch.argmin((ts_r - t0).abs()))
        print(
            f"| {t0:.1f} | {zb.test_accuracy:.3f} | {hb.test_accuracy:.3f} | "
            f"{float(prof.radius[k]):.3f} / {float(prof.radius_forward[k]):.3f} |"
        )
    print(
        f"| (pixels, t=0) | {fit_boundary(data.images[tr], y_tr, (data.images[te], y_te)).test_accuracy:.3f} | - | "
        f"{float(prof.radius[0]):.3f} / {float(prof.radius_forward[0]):.3f} |"
    )
    for tol in (0.05, 0.1, 0.2):
        print(
            f"automatic mixing step (radius gap to the forward marginal <= {tol:g} up to t_max): "
            f"{prof.mixing_step(tol):.2f}"
        )
    for tol in (0.01, 0.03):
        print(f"plateau step (inverted radius within {tol:g} of its t_max value): {prof.plateau_step(tol):.2f}")

    # 2. edits at one t0: boundary direction vs a random direction of the same length vs no edit
    t0 = args.t0
    zb, hb = bounds[t0]
    L = lat[t0]
    test_lat = Latents(L.z[n_tr:], L.h[n_tr:], t0)
    digits, src = data.labels[te], data.images[te]
    dz_side = {
        B: float(zb.distance(L.z[:n_tr])[y_tr == 1].median()),
        A: float(zb.distance(L.z[:n_tr])[y_tr == 0].median()),
    }
    dh_side = {
        B: float(hb.distance(L.h[:n_tr])[y_tr == 1].median()),
        A: float(hb.distance(L.h[:n_tr])[y_tr == 0].median()),
    }
    print(
        f"\nedits at t0 = {t0}: {args.steps} DDIM steps to t_min; median training distance: z {A}: "
        f"{dz_side[A]:.2f} / {B}: {dz_side[B]:.2f}, h {A}: {dh_side[A]:.2f} / {B}: {dh_side[B]:.2f}"
    )
    print("| source -> target | edit | distance (x median) | flip rate | pixel RMS to source | ink ratio |")
    print("|---|---|---|---|---|---|")
    rz, rh = random_like(zb, 1), random_like(hb, 2)

    def report(name: str, direction: str, mult: str, x: torch.Tensor, rows: torch.Tensor, target: int) -> None:
        x = x.clamp(-1, 1)
        flip = float((evaluator_predictions(x) == target).float().mean())
        rms = float((x - src[rows]).pow(2).mean().sqrt())
        ink = float((ink_mass(x) / ink_mass(src[rows])).mean())
        print(f"| {direction} | {name} | {mult} | {flip:.2f} | {rms:.3f} | {ink:.2f} |", flush=True)

    for source, target in ((A, B), (B, A)):
        rows = torch.nonzero(digits == source).flatten()
        sub = Latents(test_lat.z[rows], test_lat.h[rows], t0)
        direction = f"{source} -> {target}"
        recon = boundary_edit(problem, sub, 0.0, z_boundary=None, h_boundary=None, steps=args.steps)
        report("none (reconstruction)", direction, "-", recon, rows, target)
        for mult in (1.0, 2.0):
            dz, dh = mult * dz_side[target], mult * dh_side[target]
            x = boundary_edit(problem, sub, dz, z_boundary=zb, h_boundary=hb, h_distance=dh, steps=args.steps)
            report("boundary z+h", direction, f"{mult:g}", x, rows, target)
            zr, hr = displaced(sub.z, zb, dz, rz), displaced(sub.h, hb, dh, rh)
            x = boundary_edit(problem, Latents(zr, hr, t0), 0.0, z_boundary=None, h_boundary=None, steps=args.steps)
            report("random direction, same length", direction, f"{mult:g}", x, rows, target)
        x = boundary_edit(problem, sub, 2 * dz_side[target], z_boundary=zb, h_boundary=None, steps=args.steps)
        report("boundary z only", direction, "2", x, rows, target)
        x = boundary_edit(
            problem, sub, 0.0, z_boundary=None, h_boundary=hb, h_distance=2 * dh_side[target], steps=args.steps
        )
        report("boundary h only", direction, "2", x, rows, target)

    # 3. unconditional control: fresh samples pushed to either side
    fresh = sample_to(problem, torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(7)), t0, 12)
    print("\nunconditional control (40 fresh samples of the null-class model; digits read by the evaluator):")
    print(f"| push | reads {A} | reads {B} | other digits |")
    print("|---|---|---|---|")
    for name, side in (("none", None), (f"to the {A} side (2x median)", A), (f"to the {B} side (2x median)", B)):
        if side is None:
            x = boundary_edit(problem, fresh, 0.0, z_boundary=None, h_boundary=None, steps=args.steps)
        else:
            x = boundary_edit(
                problem,
                fresh,
                2 * dz_side[side],
                z_boundary=zb,
                h_boundary=hb,
                h_distance=2 * dh_side[side],
                steps=args.steps,
            )
        pred = evaluator_predictions(x.clamp(-1, 1))
        fa, fb = float((pred == A).float().mean()), float((pred == B).float().mean())
        print(f"| {name} | {fa:.2f} | {fb:.2f} | {1 - fa - fb:.2f} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
