"""Empirical model statistics (EMS) for DPM-Solver-v3 — Zheng, Lu, Chen & Zhu, NeurIPS 2023,
arXiv 2310.13268, Sec. 3.1 and App. C.1.1; procedure of the authors' ``compute_l`` / ``compute_f`` /
``compute_sb`` (ScoreSDE codebase, 2024).

On a ``lam``-uniform grid of ``grid_size + 1`` knots, from ``n_points`` samples ``x_lam`` per knot::

    l  = E[ v * (sigma d eps/dx v) ]                  Rademacher v: the diagonal of d(sigma eps)/dx (eq. 58)
    f  = (sigma eps - l x) / alpha
    f' = e^{-lam} ((l - 1) eps + eps') - l' x / alpha     eps' = d eps(x_lam, lam)/dlam along the ODE (eq. 62-63)
    s  = Cov(f, f') / Var(f),   b = E f' - s E f                                          (eq. 60-61)

``eps'`` is one forward-mode Jacobian-vector product with tangent ``(dx/dlam, 1)``,
``dx/dlam = (dlog alpha/dlam) x - sigma eps``; ``l'`` is the central difference of ``l`` on the grid,
smoothed by a moving average of half-width ``smooth`` in ``lam`` (the authors: 5 knots of 1200, about
0.04; a fixed knot count would smooth coarse grids far more). Per knot only the means
and covariances of ``(eps, eps', x)`` are kept, so ``l`` and ``(s, b)`` come from one pass (the authors
make two passes with fresh samples; the estimators are the same).

``source="data"``: ``x_or_noise`` are data samples ``x0`` noised to each knot, ``x = alpha x0 + sigma z``
(the paper's default, App. D). ``source="noise"``: ``x_or_noise`` is standard normal noise and the
samples follow the model's own ODE trajectories (DPM-Solver++ 3M on the EMS grid), i.e. the model
distribution of eq. (5). JVPs use ``torch.func.jvp``; models it cannot trace fall back to the
double-backward ``torch.autograd.functional.jvp``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from .._utils import append_dims, f64
from ..schedules import NoiseSchedule
from ..solvers.base import Problem, get, iterate
from ..solvers.dpm_solver_v3 import EMS
from ..typing import DenoiserFn

__all__ = ["fit_ems", "EMS", "SOURCES"]

SOURCES = ("data", "noise")


def _jvp(fn: Callable[..., Tensor], primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    try:
        res = torch.func.jvp(fn, primals, tangents)  # typed as a 2- or 3-tuple (has_aux); here (out, tangent)
        return res[0], res[1]
    except (RuntimeError, NotImplementedError):  # e.g. ops without forward-mode AD: double backward
        out, tan = torch.autograd.functional.jvp(fn, primals, tangents)
        return out.detach(), tan.detach()


def fit_ems(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    x_or_noise: Tensor,
    *,
    n_points: int = 1024,
    grid_size: int = 200,
    source: str = "data",
    t_start: float | None = None,
    t_end: float | None = None,
    batch_size: int = 512,
    smooth: float = 0.04,
    seed: int = 0,
    model_name: str | None = None,
    guidance_scale: float | None = None,
    cond: Mapping[str, Any] | None = None,
    progress: bool = False,
) -> EMS:
    """EMS of ``model`` (``x0 = model(x, t, **cond)``) on ``grid_size + 1`` knots uniform in ``lam``
    between ``t_start`` (default ``t_max``) and ``t_end`` (default ``t_min``), from the first
    ``n_points`` rows of ``x_or_noise`` (data for ``source="data"``, standard noise for ``"noise"``).
    Tensor entries of ``cond`` with one row per sample are split with the samples."""
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; allowed: {', '.join(SOURCES)}")
    if not (isinstance(grid_size, int) and grid_size >= 2 and isinstance(n_points, int) and n_points >= 2):
        raise ValueError(f"need int grid_size >= 2 and n_points >= 2, got {grid_size!r}, {n_points!r}")
    if x_or_noise.ndim < 2 or x_or_noise.shape[0] < n_points:
        raise ValueError(f"x_or_noise must hold >= n_points={n_points} samples (B, ...), got {tuple(x_or_noise.shape)}")
    t0 = schedule.t_max if t_start is None else float(t_start)
    t1 = schedule.t_min if t_end is None else float(t_end)
    lam = torch.linspace(float(schedule.lam(f64(t0))), float(schedule.lam(f64(t1))), grid_size + 1, dtype=torch.float64)
    if not (bool(torch.isfinite(lam).all()) and lam[-1] > lam[0]):
        raise ValueError(f"need finite lam with t_start > t_end, got t_start={t0}, t_end={t1}")
    ts = schedule.t_of_lambda(lam)
    ts[0], ts[-1] = t0, t1
    data = x_or_noise[:n_points].to(torch.float64)
    dev, shape, cond = data.device, tuple(data.shape[1:]), dict(cond or {})
    gen = torch.Generator().manual_seed(int(seed))

    def eps_fn(c: dict[str, Any]) -> Callable[[Tensor, Tensor], Tensor]:
        def eps(x: Tensor, lam_: Tensor) -> Tensor:  # eps(x, lam) = (x - alpha x0) / sigma
            t = schedule.t_of_lambda(lam_)
            a, s = append_dims(schedule.alpha(t), x.ndim), append_dims(schedule.sigma(t), x.ndim)
            return (x - a * model(x, t, **c).to(x.dtype)) / s

        return eps

    def states(rows: slice) -> Iterator[tuple[int, Tensor, dict[str, Any]]]:
        c = {
            k: v[rows] if isinstance(v, Tensor) and v.shape[:1] == (x_or_noise.shape[0],) else v
            for k, v in cond.items()
        }
        if source == "data":
            for j in range(grid_size + 1):
                z = torch.randn(data[rows].shape, generator=gen, dtype=torch.float64).to(dev)
                yield j, schedule.add_noise(data[rows], z, ts[j]).to(torch.float64), c
            return
        x = data[rows] * float(schedule.sigma(ts[:1]))
        yield 0, x, c
        with torch.no_grad():
            solver = get("dpm_solver_pp", order=3, lower_order_final=False)
            for info in iterate(Problem(model, schedule, cond=c), x, ts, solver):
                yield info.i + 1, info.x.to(torch.float64), c

    la = lambda q: schedule.log_alpha(schedule.t_of_lambda(q))  # noqa: E731
    dla = _jvp(la, (lam,), (torch.ones_like(lam),))[1].tolist()  # dlog alpha / dlam at the knots
    names = ("e", "d", "x", "ee", "ed", "ex", "dx", "xx")
    acc = {k: torch.zeros(grid_size + 1, *shape, dtype=torch.float64, device=dev) for k in ("l", *names)}
    from tqdm import tqdm

    bar = tqdm(
        total=-(-n_points // batch_size) * (grid_size + 1), desc="EMS", unit="knot", disable=not progress, leave=False
    )
    for lo in range(0, n_points, batch_size):
        for j, x, c in states(slice(lo, min(n_points, lo + batch_size))):
            bar.update(1)
            lam_j = lam[j].to(dev).expand(x.shape[0])
            sigma = float(schedule.sigma(ts[j]))
            v = (torch.randint(0, 2, x.shape, generator=gen) * 2 - 1).to(x)  # Rademacher
            eps_x = eps_fn(c)
            e, jv = _jvp(lambda y: eps_x(y, lam_j), (x,), (v,))  # noqa: B023
            _, d = _jvp(eps_x, (x, lam_j), (dla[j] * x - sigma * e, torch.ones_like(lam_j)))  # eps' along the ODE
            acc["l"][j] += (sigma * jv * v).sum(0)
            for k, val in zip(names, (e, d, x, e * e, e * d, e * x, d * x, x * x)):
                acc[k][j] += val.detach().sum(0)
    bar.close()
    m = {k: v / n_points for k, v in acc.items()}
    l = m["l"]
    dl = torch.gradient(l, spacing=(lam.to(dev),), dim=0)[0]  # l' = dl/dlam (central differences)
    half = round(smooth * grid_size / float(lam[-1] - lam[0]))  # half-width in knots
    if half > 0:  # moving average, truncated at the ends (authors' code)
        cs = torch.cat([torch.zeros_like(dl[:1]), dl.cumsum(0)])
        i = torch.arange(grid_size + 1, device=dev)
        lo_, hi_ = (i - half).clamp(min=0), (i + half + 1).clamp(max=grid_size + 1)
        dl = (cs[hi_] - cs[lo_]) / append_dims((hi_ - lo_).to(dl), dl.ndim)
    cov = {k: m[k] - m[k[0]] * m[k[1]] for k in ("ee", "ed", "ex", "dx", "xx")}
    lamc = append_dims(lam.to(dev), l.ndim)
    alpha = append_dims(schedule.alpha(ts).to(dev), l.ndim)
    a, A, c1, c2 = torch.exp(-lamc), torch.exp(-lamc) * (l - 1), -l / alpha, -dl / alpha  # f = a e + c1 x
    mean_f, mean_df = a * m["e"] + c1 * m["x"], A * m["e"] + a * m["d"] + c2 * m["x"]  # f' = A e + a d + c2 x
    var_f = a * a * cov["ee"] + 2 * a * c1 * cov["ex"] + c1 * c1 * cov["xx"]
    cov_f = (
        a * A * cov["ee"]
        + a * a * cov["ed"]
        + a * c2 * cov["ex"]
        + c1 * A * cov["ex"]
        + c1 * a * cov["dx"]
        + c1 * c2 * cov["xx"]
    )
    s = torch.where(var_f > 0, cov_f / var_f.clamp(min=1e-300), torch.zeros_like(var_f))
    b = mean_df - s * mean_f
    name = model_name if model_name is not None else repr(model)
    return EMS(
        lam=lam,
        l=l.cpu(),
        s=s.cpu(),
        b=b.cpu(),
        model=name,
        guidance_scale=guidance_scale,
        schedule=repr(schedule),
        n_points=n_points,
    )
