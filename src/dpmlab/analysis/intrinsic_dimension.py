"""Intrinsic dimension from a diffusion model — the normal-space estimator of Stanczuk, Batzolis, Deveney &
Schönlieb, "Your diffusion model secretly knows the dimension of the data manifold" (arXiv 2212.12611), and the
flow-map Jacobian spectrum of Horvat & Pfister, "On gauge freedom, conservativity and intrinsic dimensionality
estimation in diffusion models" (ICLR 2024, arXiv 2402.03845).

Normal-space estimator (``normal_space_id``), at a data point x0 and a small time t:

    x_i = alpha(t) x0 + sigma(t) eps_i,   i = 1..K        (K perturbations; default K = 4 D)
    S = [s(x_1, t), ..., s(x_K, t)]                       (stacked scores, K x D)
    singular values s_1 >= ... >= s_D of S;  n_hat = argmax_i (s_i - s_{i+1});  k_hat = D - n_hat

Near a d-dimensional manifold the score points back onto it, ~ -(normal offset) / sigma^2, so D - d singular
values are ~1/sigma and d are O(1). A gauge part (``analysis.gauge``) adds ~1/sigma components that need not lie
in the normal space and can fill the gap: the estimator reads the field, not the density.

Flow-map Jacobian (``flow_jacobian_spectrum``): singular values of d phi(x_T) / d x_T for the probability-flow
map phi from t_start to t_end, by autograd through any dpmlab solver; as t_end -> 0, d of them saturate (tangent)
and D - d go to 0 (normal), and ``largest_gap`` counts the saturating ones.

Deviations: the gap rule can return only 1 <= k_hat <= D - 1 (as in the reference); scores of x0-predicting models
are ``(alpha x0_hat - x) / sigma^2``. Command line: ``python -m dpmlab.analysis.intrinsic_dimension --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils import f64
from ..schedules import EDM, NoiseSchedule
from ..solvers.base import Problem, Solver, StepInfo, get, sample
from ..timesteps import karras
from ..typing import DenoiserFn
from .gauge import DegenerateGaussian, ScoreFn, SkewGauge, random_skew

__all__ = ["IDEstimate", "normal_space_id", "largest_gap", "flow_jacobian_spectrum", "score_of", "main"]


@dataclass(frozen=True)
class IDEstimate:
    dimension: int  # k_hat = D - normal_dimension
    normal_dimension: int  # n_hat: singular values above the largest gap
    singular_values: Tensor  # (min(K, D),) descending


def largest_gap(sv: Tensor) -> int:
    """Number of values above the largest drop ``sv[i] - sv[i + 1]`` of a descending spectrum (1..len - 1)."""
    if sv.ndim != 1 or sv.numel() < 2:
        raise ValueError(f"need a 1-d spectrum of at least 2 values, got shape {tuple(sv.shape)}")
    return int(torch.argmax(sv[:-1] - sv[1:])) + 1


def score_of(model: DenoiserFn, schedule: NoiseSchedule, data_shape: Sequence[int]) -> ScoreFn:
    """The score ``(alpha x0_hat - x) / sigma^2`` of a dpmlab model, on flattened ``(B, D)`` inputs."""
    shape = tuple(int(s) for s in data_shape)

    def score(x: Tensor, t: Tensor) -> Tensor:
        xs = x.reshape(x.shape[0], *shape)
        x0 = model(xs, t).reshape(x.shape)
        a, s = schedule.alpha(t)[:, None].to(x.dtype), schedule.sigma(t)[:, None].to(x.dtype)
        return (a * x0 - x) / (s * s)

    return score


def normal_space_id(
    score: ScoreFn,
    x0: Tensor,
    t: float,
    schedule: NoiseSchedule,
    *,
    num_samples: int | None = None,
    generator: torch.Generator | None = None,
) -> IDEstimate:
    """The estimator at one point ``x0`` (D,); ``score(x (K, D), t (K,))``."""
    if x0.ndim != 1:
        raise ValueError(f"x0 must be one point of shape (D,), got {tuple(x0.shape)}")
    D = x0.shape[0]
    K = 4 * D if num_samples is None else int(num_samples)
    if K < 2 or D < 2:
        raise ValueError(f"need D >= 2 and num_samples >= 2, got D = {D}, num_samples = {K}")
    if not schedule.t_min <= t <= schedule.t_max:
        raise ValueError(f"t = {t} outside the schedule's [{schedule.t_min:g}, {schedule.t_max:g}]")
    tt = f64([t]).expand(K)
    eps = torch.randn(K, D, generator=generator, dtype=torch.float64).to(x0.dtype)
    x = schedule.alpha(tt)[:, None].to(x0.dtype) * x0 + schedule.sigma(tt)[:, None].to(x0.dtype) * eps
    with torch.no_grad():
        S = score(x, tt)  # (K, D)
    if not bool(torch.isfinite(S).all()):
        raise FloatingPointError(f"the score is not finite at t = {t}")
    sv = torch.linalg.svdvals(f64(S))
    n = largest_gap(sv)
    return IDEstimate(D - n, n, sv)


def flow_jacobian_spectrum(problem: Problem, x: Tensor, ts: Tensor, solver: Solver) -> Tensor:  # type: ignore[type-arg]
    """Singular values (B, D), descending, of the Jacobian of ``sample(problem, ., ts, solver)`` at each row of
    ``x`` (B, D): D backward passes through the solver."""
    if x.ndim != 2:
        raise ValueError(f"x must have shape (B, D), got {tuple(x.shape)}")
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        out = sample(problem, xg, ts, solver)
        D = x.shape[1]
        rows = [torch.autograd.grad(out[:, j].sum(), xg, retain_graph=j + 1 < D)[0] for j in range(D)]
    return torch.linalg.svdvals(torch.stack(rows, dim=1).detach())


# --- command line ---------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpmlab.analysis.intrinsic_dimension",
        description="Intrinsic dimension from scores (normal-space estimator) and gauge demos",
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("gaussian", help="closed-form demo: data on a d-dim subspace of R^D, score vs score + gauge")
    g.add_argument("--D", type=int, default=6)
    g.add_argument("--d", type=int, default=2)
    g.add_argument("--t", type=float, default=0.01, help="noise level of the estimator (EDM: t = sigma)")
    g.add_argument("--points", type=int, default=20)
    g.add_argument("--num-samples", type=int, help="perturbations per point (default 4 D)")
    g.add_argument("--gauge", type=float, default=1.0, help="strength of the gauge field f(q) A C^-1 x")
    g.add_argument("--sample-n", type=int, default=0, help="also sample this many points by the PF-ODE (heun)")
    g.add_argument("--steps", type=int, default=200)
    g.add_argument("--seed", type=int, default=0)
    m = sub.add_parser("model", help="the estimator on a dpmlab model at given data points")
    m.add_argument("model", help="a dpmlab.load name or path")
    m.add_argument("--points", required=True, help=".npy file of data points (N, *data_shape)")
    m.add_argument("--t", type=float, help="estimator time (default: where sigma/alpha = 0.01, at least t_min)")
    m.add_argument("--num-samples", type=int)
    m.add_argument("--limit", type=int, default=20, help="use the first N points")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--out", help="JSON with each point's estimate and spectrum")
    return p


def _cmd_gaussian(a: argparse.Namespace) -> int:
    from tqdm import tqdm

    if not 1 <= a.d < a.D:
        raise ValueError(f"need 1 <= d < D, got d = {a.d}, D = {a.D}")
    sch = EDM()
    data = DegenerateGaussian.random(a.D, a.d, sch, seed=a.seed)
    gauge = SkewGauge(data, random_skew(a.D, seed=a.seed + 1), strength=a.gauge)
    fields: dict[str, ScoreFn] = {"score": data.score, "score + gauge": lambda x, t: data.score(x, t) + gauge(x, t)}
    g = torch.Generator().manual_seed(a.seed)
    points = data.sample(a.points, generator=g)
    print(f"data: d = {a.d} subspace of R^{a.D}; estimator at sigma = {a.t}, {a.num_samples or 4 * a.D} perturbations")
    for name, fn in fields.items():
        ks = [
            normal_space_id(fn, p, a.t, sch, num_samples=a.num_samples, generator=g).dimension
            for p in tqdm(points, desc=name, leave=False)
        ]
        hist = {k: ks.count(k) for k in sorted(set(ks))}
        print(f"  {name:<14} k_hat counts {hist}  (true {a.d})")
    if a.sample_n:
        ts = karras(sch, a.steps, t_start=sch.t_max, t_end=sch.t_min)
        x1 = torch.randn(a.sample_n, a.D, generator=g, dtype=torch.float64) * math.sqrt(1 + sch.t_max**2)
        target = data.cov_t(0.0)
        for name, fn in fields.items():
            with tqdm(total=a.steps, desc=f"sampling ({name})", leave=False) as bar:

                def tick(_info: StepInfo, bar: Any = bar) -> None:
                    bar.update()

                out = sample(Problem(data.denoiser(fn), sch), x1, ts, get("heun"), callback=tick)
            cov = out.T @ out / a.sample_n
            off = float(((out - (out @ data.basis) @ data.basis.T) ** 2).sum(1).mean())
            print(
                f"  {name:<14} max |Cov - UU^T| = {float((cov - target).abs().max()):.4f}, "
                f"off-manifold energy {off:.2e}"
            )
    return 0


def _cmd_model(a: argparse.Namespace) -> int:
    import numpy as np
    from tqdm import tqdm

    from ..models.hub import load

    model = load(a.model)
    shape = tuple(getattr(model, "data_shape", None) or ())
    if not shape:
        raise ValueError(f"model {a.model!r} does not declare its data_shape")
    path = Path(a.points)
    if not path.is_file():
        raise FileNotFoundError(f"no points file {path}")
    pts = torch.as_tensor(np.load(path, allow_pickle=False), dtype=torch.float32)
    if pts.shape[0] == 0:
        raise ValueError(f"{path} holds no points")
    if tuple(pts.shape[1:]) != shape and pts[0].numel() != math.prod(shape):
        raise ValueError(f"points have shape {tuple(pts.shape[1:])}, the model expects {shape}")
    pts = pts.reshape(pts.shape[0], -1)[: a.limit]
    sch = model.schedule
    t = max(sch.t_min, float(sch.t_of_sigma_over_alpha(f64(0.01)))) if a.t is None else a.t
    score = score_of(model, sch, shape)
    g = torch.Generator().manual_seed(a.seed)
    ests = [normal_space_id(score, p, t, sch, num_samples=a.num_samples, generator=g) for p in tqdm(pts, desc="points")]
    ks = [e.dimension for e in ests]
    print(
        f"{len(ks)} points, D = {pts.shape[1]}, t = {t:.4g}: k_hat median {sorted(ks)[len(ks) // 2]}, "
        f"min {min(ks)}, max {max(ks)}"
    )
    if a.out:
        Path(a.out).write_text(
            json.dumps([{"dimension": e.dimension, "singular_values": e.singular_values.tolist()} for e in ests])
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    torch.set_num_threads(1)
    try:
        return _cmd_gaussian(a) if a.cmd == "gaussian" else _cmd_model(a)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
