"""Timestep grids: plain functions ``(schedule, n, ...) -> ts``.

Each returns a float64 tensor of ``n + 1`` strictly decreasing times, from ``t_start`` (default
``schedule.t_max``) to ``t_end`` (default ``schedule.t_min``); a solver steps ``ts[i] -> ts[i+1]``.
Pass ``t_end=schedule.t_zero`` (or ``to_zero=True`` where offered) to end exactly at ``sigma = 0``.
Invalid requests raise ``ValueError`` naming the bad value.

* ``uniform_time``    DPM-Solver ``time_uniform``
* ``uniform_lambda``  DPM-Solver ``logSNR`` (uniform half log-SNR)
* ``quadratic_time``  DDIM's quadratic spacing in time
* ``karras``          EDM rho-spacing of ``sigma/alpha`` (Karras et al. 2022, eq. 5)
* ``linspace`` / ``leading`` / ``trailing``  diffusers' spacings over training indices (``DiscreteVP``;
  ``N`` counts the indices inside ``t_max``, 996 on the lambda-clipped cosine preset)
* ``from_list``       a user's grid, validated
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ._utils import f64
from .schedules import DiscreteVP, NoiseSchedule

__all__ = [
    "uniform_time",
    "uniform_lambda",
    "quadratic_time",
    "karras",
    "linspace",
    "leading",
    "trailing",
    "from_list",
    "check_grid",
    "GRIDS",
    "get_grid",
    "make_grid",
    "DISCRETE_GRIDS",
    "DEFAULT_GRID",
    "default_to_zero",
]


def check_grid(ts: Tensor, schedule: NoiseSchedule | None = None, *, decreasing: bool | None = True) -> Tensor:
    """Validate a grid: 1-d, >= 2 finite float times, strictly monotone (decreasing when
    ``decreasing`` is True, increasing when False, either when None), inside the schedule's domain."""
    ts = f64(ts)
    if ts.ndim != 1 or ts.numel() < 2:
        raise ValueError(f"a timestep grid must be 1-d with at least 2 points, got shape {tuple(ts.shape)}")
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"timestep grid has non-finite values: {ts.tolist()}")
    diffs = ts[1:] - ts[:-1]
    dec, inc = bool((diffs < 0).all()), bool((diffs > 0).all())
    ok = dec if decreasing is True else inc if decreasing is False else (dec or inc)
    if not ok:
        want = {True: "strictly decreasing", False: "strictly increasing", None: "strictly monotone"}[decreasing]
        bad = int(torch.nonzero(diffs >= 0 if decreasing is not False else diffs <= 0)[0]) if not (dec or inc) else 0
        raise ValueError(f"timestep grid must be {want}; got {ts.tolist()} (first violation at index {bad + 1})")
    if schedule is not None:
        lo = schedule.t_zero if schedule.t_zero is not None else schedule.t_min
        t_lo, t_hi = float(ts.min()), float(ts.max())
        if t_lo < lo - 1e-12 or t_hi > schedule.t_max + 1e-12:
            raise ValueError(
                f"timestep grid spans [{t_lo:g}, {t_hi:g}], outside the schedule's [{lo:g}, {schedule.t_max:g}]"
            )
    return ts


def _ends(schedule: NoiseSchedule, n: int, t_start: float | None, t_end: float | None) -> tuple[float, float]:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"number of steps must be a positive int, got {n!r}")
    ts = schedule.t_max if t_start is None else float(t_start)
    te = schedule.t_min if t_end is None else float(t_end)
    if not ts > te:
        raise ValueError(f"need t_start > t_end, got t_start={ts}, t_end={te}")
    return ts, te


def _finish(schedule: NoiseSchedule, ts: Tensor, t_start: float, t_end: float) -> Tensor:
    ts[0], ts[-1] = t_start, t_end  # exact endpoints despite round-off in transforms
    return check_grid(ts, schedule)


def uniform_time(
    schedule: NoiseSchedule, n: int, *, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    t0, t1 = _ends(schedule, n, t_start, t_end)
    return _finish(schedule, torch.linspace(t0, t1, n + 1, dtype=torch.float64), t0, t1)


def uniform_lambda(
    schedule: NoiseSchedule, n: int, *, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """Uniform in ``lam``. An end at ``sigma = 0`` (infinite ``lam``) is appended after ``n - 1``
    uniform steps down to ``schedule.t_min``."""
    t0, t1 = _ends(schedule, n, t_start, t_end)
    if schedule.t_zero is not None and t1 == schedule.t_zero:
        if n < 2:
            return _finish(schedule, f64([t0, t1]), t0, t1)
        inner = uniform_lambda(schedule, n - 1, t_start=t0, t_end=schedule.t_min)
        return _finish(schedule, torch.cat([inner, f64([t1])]), t0, t1)
    lam0, lam1 = schedule.lam(f64(t0)), schedule.lam(f64(t1))
    lams = lam0 + (lam1 - lam0) * torch.linspace(0, 1, n + 1, dtype=torch.float64)
    return _finish(schedule, schedule.t_of_lambda(lams), t0, t1)


def quadratic_time(
    schedule: NoiseSchedule, n: int, *, t_start: float | None = None, t_end: float | None = None
) -> Tensor:
    """``t_i = (sqrt(t_start) + i/n (sqrt(t_end) - sqrt(t_start)))^2``."""
    t0, t1 = _ends(schedule, n, t_start, t_end)
    u = torch.linspace(t0**0.5, t1**0.5, n + 1, dtype=torch.float64)
    return _finish(schedule, u * u, t0, t1)


def karras(
    schedule: NoiseSchedule,
    n: int,
    *,
    rho: float = 7.0,
    t_start: float | None = None,
    t_end: float | None = None,
    to_zero: bool = False,
) -> Tensor:
    """EDM spacing of ``s = sigma/alpha``: ``s_i = (s_max^(1/rho) + i/(m-1) (s_min^(1/rho) - s_max^(1/rho)))^rho``.
    With ``to_zero`` the last of the ``n`` steps goes to ``sigma = 0`` (EDM's ``t_N = 0``)."""
    if rho <= 0:
        raise ValueError(f"rho must be > 0, got {rho}")
    t0, t1 = _ends(schedule, n, t_start, t_end)
    if to_zero:
        if schedule.t_zero is None:
            raise ValueError(f"{schedule!r} never reaches sigma = 0; to_zero=True is impossible")
        if n < 2:
            return _finish(schedule, f64([t0, schedule.t_zero]), t0, schedule.t_zero)
        inner = karras(schedule, n - 1, rho=rho, t_start=t0, t_end=t1)
        return _finish(schedule, torch.cat([inner, f64([schedule.t_zero])]), t0, schedule.t_zero)
    s_max = float(schedule.sigma_over_alpha(f64(t0)))
    s_min = float(schedule.sigma_over_alpha(f64(t1)))
    ramp = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
    return _finish(schedule, schedule.t_of_sigma_over_alpha(s), t0, t1)


def _discrete(schedule: NoiseSchedule, name: str) -> DiscreteVP:
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(f"{name!r} spacing is defined over training indices and needs a DiscreteVP, got {schedule!r}")
    return schedule


def _n_indices(schedule: DiscreteVP) -> int:
    """Training indices inside ``t_max`` (fewer than ``n_train`` when ``lambda_min`` cut the table,
    e.g. 996 on the cosine preset); diffusers' ``num_train_timesteps`` for the same schedule."""
    return round(schedule.t_max * schedule.n_train)


def _from_indices(schedule: DiscreteVP, idx: Tensor, final: float | None) -> Tensor:
    ts = schedule.index_to_t(idx)
    end = 0.0 if final is None else float(final)
    return check_grid(torch.cat([ts, f64([end])]), schedule)


def linspace(schedule: NoiseSchedule, n: int, *, final: float | None = None) -> Tensor:
    """diffusers ``timestep_spacing="linspace"``: ``round(linspace(0, N-1, n))`` reversed, then ``final``
    (default ``t = 0``, i.e. ``sigma = 0``, as diffusers' ``final_sigmas_type="zero"``)."""
    s = _discrete(schedule, "linspace")
    _ends(s, n, None, None)
    idx = torch.linspace(0, _n_indices(s) - 1, n, dtype=torch.float64).round().flip(0)
    return _from_indices(s, idx, final)


def leading(schedule: NoiseSchedule, n: int, *, steps_offset: int = 0, final: float | None = None) -> Tensor:
    """diffusers ``leading``: ``arange(n) * (N // n) + steps_offset`` reversed, then ``final``."""
    s = _discrete(schedule, "leading")
    _ends(s, n, None, None)
    k = _n_indices(s)
    if n > k:
        raise ValueError(f"leading spacing needs n <= {k} training steps, got n={n}")
    idx = (torch.arange(n, dtype=torch.float64) * (k // n)).round().flip(0) + steps_offset
    return _from_indices(s, idx, final)


def trailing(schedule: NoiseSchedule, n: int, *, final: float | None = None) -> Tensor:
    """diffusers ``trailing``: ``round(arange(N, 0, -N/n)) - 1``, then ``final``."""
    s = _discrete(schedule, "trailing")
    _ends(s, n, None, None)
    k = _n_indices(s)
    if n > k:
        raise ValueError(f"trailing spacing needs n <= {k} training steps, got n={n}")
    idx = torch.round(torch.arange(k, 0, -k / n, dtype=torch.float64)) - 1
    return _from_indices(s, idx, final)


def from_list(schedule: NoiseSchedule, ts: Sequence[float] | Tensor) -> Tensor:
    """A user's grid (times, decreasing), validated against the schedule."""
    return check_grid(f64(list(ts) if not isinstance(ts, Tensor) else ts).clone(), schedule)


GridFn = Callable[..., Tensor]
GRIDS: dict[str, GridFn] = {
    "uniform_time": uniform_time,
    "uniform_lambda": uniform_lambda,
    "quadratic_time": quadratic_time,
    "karras": karras,
    "linspace": linspace,
    "leading": leading,
    "trailing": trailing,
}


def get_grid(name: str) -> GridFn:
    if name not in GRIDS:
        raise ValueError(f"unknown grid {name!r}; allowed: {', '.join(GRIDS)}")
    return GRIDS[name]


DISCRETE_GRIDS = ("linspace", "leading", "trailing")  # fixed by the training indices (diffusers' spacings)
# Measured best most often across solvers at NFE 4-20 on the analytic mixtures
# (docs/benchmarks/solvers.md): quadratic in time beats uniform-lambda, uniform-time and Karras there.
DEFAULT_GRID = "quadratic_time"


def default_to_zero(schedule: NoiseSchedule, t_end: float | None = None) -> bool:
    """The library's default end of a grid: ``sigma = 0`` (a last first-order step ``x = alpha x0``, as every
    peer library ends) wherever the schedule reaches it and no ``t_end`` was asked for."""
    return schedule.t_zero is not None and t_end is None


def make_grid(
    schedule: NoiseSchedule,
    grid: str,
    steps: int,
    *,
    to_zero: bool = False,
    t_start: float | None = None,
    t_end: float | None = None,
) -> Tensor:
    """A named grid of ``steps`` steps; ``to_zero`` ends it at ``sigma = 0``."""
    fn = get_grid(grid)
    if grid in DISCRETE_GRIDS:
        if t_start is not None or t_end is not None:
            raise ValueError(f"grid {grid!r} is fixed by the training indices; t_start/t_end are not allowed")
        return fn(schedule, steps, final=0.0 if to_zero else schedule.t_min)
    if to_zero:
        if schedule.t_zero is None:
            raise ValueError(f"{schedule!r} never reaches sigma = 0; to_zero=True is impossible")
        if t_end is not None:
            raise ValueError("give either t_end or to_zero=True, not both")
        if grid == "karras":
            return fn(schedule, steps, t_start=t_start, to_zero=True)
        return fn(schedule, steps, t_start=t_start, t_end=schedule.t_zero)
    return fn(schedule, steps, t_start=t_start, t_end=t_end)
