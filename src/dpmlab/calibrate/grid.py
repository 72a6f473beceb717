"""Learned time discretisation: fit the time grid of a (model, solver, NFE) from calibration noise.

Two methods, both scored against the float64 reference ODE solution (``models.reference``):

* ``"gits"`` — GITS (Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling", ICML
  2024, arXiv 2405.11326, Sec. 4): a fine grid ``tau_0 > ... > tau_M`` (uniform in ``lam``, ``fine_steps``
  points, then ``sigma = 0`` with ``to_zero``) and the teacher trajectory ``x*(tau_m)`` of every
  calibration noise (here the exact ODE, grid point to grid point). The cost of a coarse step ``i -> j``
  is the local error of ONE solver step from the teacher state,

      c[i, j] = mean_n || step(x*_n(tau_i); tau_i -> tau_j) - x*_n(tau_j) ||_2 ,

  and the grid of ``K`` steps is the path ``0 = m_0 < ... < m_K = M`` minimising ``sum_k c[m_{k-1}, m_k]``,
  found exactly by dynamic programming (``dp_path``) in ``O(K M^2)``. No gradients, one pass over the data.
* ``"gits+e2e"`` — the GITS grid refined on the solver's GLOBAL error (the objective of LD3, Tong et al.,
  "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025): coordinate descent, one interior point
  at a time by golden-section search in ``lam`` between its neighbours, of

      L(ts) = mean_n || Psi_ts(x_T,n) - x*_n(0) ||_2       (the full K-step solve on the calibration noise).

  Unlike LD3 this is gradient-free (dpmlab's solver coefficients are floats of the grid, so there is no
  gradient with respect to the times) and has no soft teacher-forcing slack. Coordinate descent is local:
  it starts from the best, on the calibration loss, of the GITS grid and the named grids ``START_GRIDS``.
  It is solver-aware: a multistep solver's first step is first order, so the GITS costs of ``ddim``,
  ``dpm_solver_pp`` and ``unipc`` coincide; only the refinement sees the higher-order steps.
* ``"ld3"`` — the refinement above with LD3's soft teacher forcing (Sec. 3.2 of the paper): the student
  starts from ``x'_n`` in a ball around the calibration noise, ``||x'_n - x_T,n|| <= r sigma_T sqrt(d)``,
  and the loss is ``mean_n || Psi_ts(x'_n) - x*_n(0) ||_2``. Rounds alternate (``rounds``): ``x'`` by
  projected Adam through the solver (needs a differentiable model), then the times by the coordinate
  descent. The slack spares the few parameters (the times) from fitting what the input can absorb. The
  grid is used on the plain noise ``x_T``; ``r`` (``radius``) is ours, the paper tunes it per dataset.

Both aggregate the per-sample L2 error by its mean (not the root mean square): on mixtures the RMS is
carried by the few samples that change mode, which a grid cannot fix and should not chase.

A fit returns a ``GridArtifact``: the grid plus what it was fitted for (model name, solver config, NFE,
schedule, method, the calibration seeds and fine-grid size), saved as JSON or safetensors
(``save`` / ``load``) and validated on use (``check``). ``calibration_noise`` draws counter-based seeded
noise so that a held-out set is a disjoint ``(seed, index)`` range; ``GridArtifact.check_held_out``
refuses to score a grid on the noise it was fitted on.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils import atomic_write, counter_normal, f64
from ..models.reference import reference_solution
from ..schedules import NoiseSchedule
from ..solvers.base import Problem, Solver, get, sample
from ..timesteps import check_grid, make_grid
from ..typing import DenoiserFn

__all__ = [
    "GRID_FORMAT",
    "GRID_VERSION",
    "METHODS",
    "GridArtifact",
    "Teacher",
    "calibration_noise",
    "cost_matrix",
    "dp_path",
    "fit_grid",
    "grid_errors",
    "fine_grid",
    "schedule_id",
    "teacher_states",
]

GRID_FORMAT = "dpmlab.grid"
GRID_VERSION = 1
METHODS = ("gits", "gits+e2e", "ld3")
START_GRIDS = ("quadratic_time", "uniform_lambda", "uniform_time", "karras")  # refinement starts, with GITS's


def _solver_config(solver: Solver[Any] | Mapping[str, Any] | str) -> dict[str, Any]:
    if isinstance(solver, Solver):
        return solver.config()
    if isinstance(solver, str):
        return get(solver).config()
    if isinstance(solver, Mapping):
        return get(**dict(solver)).config()
    raise ValueError(f"solver must be a Solver, its name or its config dict, got {type(solver).__name__}")


def schedule_id(schedule: NoiseSchedule) -> str:
    """The schedule's repr plus ``lam`` at five times: tells apart schedules whose repr coincides."""
    ts = torch.linspace(schedule.t_min, schedule.t_max, 5, dtype=torch.float64)
    return f"{schedule!r} lam=" + ",".join(f"{v:.9g}" for v in schedule.lam(ts).tolist())


@dataclass(frozen=True)
class GridArtifact:
    """A fitted time grid and what it was fitted for."""

    ts: tuple[float, ...]  # strictly decreasing times, ts[0] = t_max
    model: str  # model name ("" = unnamed: then check() cannot verify it)
    solver: dict[str, Any]  # the solver's config() (name + options)
    nfe: int
    schedule: str  # schedule_id() of the noise schedule
    method: str
    init: str = "gits"  # the grid the refinement started from (the best on the calibration loss)
    seeds: dict[str, int] = field(default_factory=dict)  # calibration noise: {"seed", "start", "n"}
    fine_steps: int = 0
    fit_seconds: float = 0.0
    fit_error: float = math.nan  # mean per-sample L2 error of the fitted grid on the calibration noise

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown grid method {self.method!r}; allowed: {', '.join(METHODS)}")
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
            raise ValueError(f"nfe must be a positive int, got {self.nfe!r}")
        check_grid(torch.tensor(self.ts, dtype=torch.float64))

    def grid(self) -> Tensor:
        return torch.tensor(self.ts, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ts": list(self.ts),
            "model": self.model,
            "solver": dict(self.solver),
            "nfe": self.nfe,
            "schedule": self.schedule,
            "method": self.method,
            "init": self.init,
            "seeds": dict(self.seeds),
            "fine_steps": self.fine_steps,
            "fit_seconds": self.fit_seconds,
            "fit_error": self.fit_error,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GridArtifact:
        d = dict(d)
        try:
            d["ts"] = tuple(float(t) for t in d["ts"])
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise ValueError(f"invalid grid artifact: {e}") from e

    def check(
        self, model: str, solver: Solver[Any] | Mapping[str, Any] | str, nfe: int, schedule: NoiseSchedule | None = None
    ) -> None:
        """Raise ``ValueError`` unless this grid was fitted for ``model``, ``solver`` (same config), ``nfe``
        (and ``schedule``, if given)."""
        if self.model and model != self.model:
            raise ValueError(f"grid fitted for model {self.model!r}, not {model!r}")
        cfg = _solver_config(solver)
        if cfg != self.solver:
            raise ValueError(f"grid fitted for solver {self.solver}, not {cfg}")
        if nfe != self.nfe:
            raise ValueError(f"grid fitted for nfe={self.nfe}, not nfe={nfe}")
        if schedule is not None and schedule_id(schedule) != self.schedule:
            raise ValueError(f"grid fitted on schedule {self.schedule}, not {schedule_id(schedule)}")
        if schedule is not None and get(**cfg).nfe(self.grid(), schedule) != nfe:
            raise ValueError(f"grid of {len(self.ts) - 1} steps does not use nfe={nfe} with this solver")

    def check_held_out(self, seed: int, start: int, n: int) -> None:
        """Refuse noise ``counter_normal(seed, start .. start + n - 1)`` that overlaps the calibration set."""
        if not self.seeds:
            return
        s, a, m = self.seeds["seed"], self.seeds["start"], self.seeds["n"]
        if seed == s and start < a + m and a < start + n:
            raise ValueError(
                f"noise (seed={seed}, indices {start}..{start + n - 1}) overlaps the calibration "
                f"noise (seed={s}, indices {a}..{a + m - 1}); score on held-out noise"
            )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """``.json`` or ``.safetensors`` (the grid as a float64 tensor, the rest as JSON metadata)."""
        path = Path(path)
        if path.suffix not in (".json", ".safetensors"):
            raise ValueError(f"grid artifact path must end in .json or .safetensors, got {str(path)!r}")
        meta = {"format": GRID_FORMAT, "version": GRID_VERSION, **self.to_dict()}
        with atomic_write(path) as tmp:
            if path.suffix == ".json":
                tmp.write_text(json.dumps(meta, indent=1))
            else:
                from safetensors.torch import save_file

                del meta["ts"]
                save_file({"ts": self.grid()}, str(tmp), metadata={"grid": json.dumps(meta)})
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        model: str | None = None,
        solver: Solver[Any] | Mapping[str, Any] | str | None = None,
        nfe: int | None = None,
    ) -> GridArtifact:
        """Read and validate; ``model`` / ``solver`` / ``nfe``, if all given, are checked (``check``)."""
        path = Path(path)
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as f:
                    d = json.loads((f.metadata() or {}).get("grid", "null"))
                    if isinstance(d, dict):
                        d["ts"] = f.get_tensor("ts").tolist()
            else:
                d = json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001 — OSError, JSONDecodeError, safetensors' own SafetensorError
            raise ValueError(f"cannot read a grid artifact from {path}: {e}") from e
        if not isinstance(d, dict) or d.pop("format", None) != GRID_FORMAT or d.pop("version", None) != GRID_VERSION:
            raise ValueError(f"{path} is not a {GRID_FORMAT!r} version {GRID_VERSION} artifact")
        art = cls.from_dict(d)
        if model is not None and solver is not None and nfe is not None:
            art.check(model, solver, nfe)
        return art


def calibration_noise(schedule: NoiseSchedule, shape: Sequence[int], n: int, *, seed: int, start: int = 0) -> Tensor:
    """``n`` float64 start states at ``t_max``: ``sigma(t_max) * z``, row ``b`` depending only on
    ``(seed, start + b)`` (counter-based), so ``start`` ranges give disjoint sets."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    z = counter_normal(seed, torch.arange(start, start + n), 0, tuple(shape), dtype=torch.float64)
    return z * float(schedule.sigma(f64(schedule.t_max)))


def fine_grid(schedule: NoiseSchedule, fine_steps: int, *, to_zero: bool = True) -> Tensor:
    """GITS's fine grid: uniform in ``lam`` from ``t_max`` to ``t_min`` (then one step to ``sigma = 0``)."""
    if isinstance(fine_steps, bool) or not isinstance(fine_steps, int) or fine_steps < 2:
        raise ValueError(f"fine_steps must be an int >= 2, got {fine_steps!r}")
    return make_grid(schedule, "uniform_lambda", fine_steps, to_zero=to_zero)


@dataclass(frozen=True)
class Teacher:
    """The exact ODE states ``states[m] = x*(fine[m])`` of a set of calibration noises on GITS's fine grid
    (``states[0]`` is the noise, ``states[-1]`` the reference end point), computed once by ``teacher_states``
    and shared by every ``fit_grid`` on that noise (each solver and NFE of a recipe)."""

    fine: Tensor
    states: tuple[Tensor, ...]
    ref_tol: float
    cond: Mapping[str, Any] = field(default_factory=dict)

    def check(
        self,
        schedule: NoiseSchedule,
        noise: Tensor,
        fine_steps: int,
        to_zero: bool,
        ref_tol: float,
        cond: Mapping[str, Any] | None = None,
    ) -> None:
        """Raise a one-line ``ValueError`` unless this teacher was computed for exactly these inputs."""
        fine = fine_grid(schedule, fine_steps, to_zero=to_zero)
        if self.fine.shape != fine.shape or not torch.equal(self.fine, fine):
            raise ValueError(
                f"teacher was computed on a {len(self.fine)}-point fine grid; fine_steps={fine_steps}, "
                f"to_zero={to_zero} gives {len(fine)} points (or other times)"
            )
        x = f64(noise)
        if self.states[0].shape != x.shape or not torch.equal(self.states[0], x):
            raise ValueError("teacher was computed for other calibration noise than the noise given")
        if self.ref_tol != ref_tol:
            raise ValueError(f"teacher was computed with ref_tol={self.ref_tol:g}, not ref_tol={ref_tol:g}")
        cond = dict(cond or {})

        def same(a: Any, b: Any) -> bool:
            if isinstance(a, Tensor) or isinstance(b, Tensor):
                return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and torch.equal(a, b)
            return bool(a == b)

        if sorted(cond) != sorted(self.cond) or not all(same(cond[k], self.cond[k]) for k in cond):
            raise ValueError(
                f"teacher was computed with cond {sorted(self.cond)} (or other values) than the fit's {sorted(cond)}"
            )


def teacher_states(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    noise: Tensor,
    fine_steps: int = 40,
    *,
    to_zero: bool = True,
    ref_tol: float = 1e-9,
    cond: Mapping[str, Any] | None = None,
) -> Teacher:
    """The teacher of ``fit_grid``: the exact ODE (float64 Dormand-Prince, ``rtol = atol = ref_tol``) from
    ``noise`` at ``t_max``, integrated fine-grid point to fine-grid point. Pass it to ``fit_grid(teacher=)`` to
    fit several solvers and NFEs on the same noise without integrating again (its ``cond`` must be the
    fit's)."""
    fine = fine_grid(schedule, fine_steps, to_zero=to_zero)
    states = [f64(noise)]
    for k in range(1, len(fine)):
        states.append(
            reference_solution(
                model,
                schedule,
                states[-1],
                float(fine[k - 1]),
                float(fine[k]),
                rtol=ref_tol,
                atol=ref_tol,
                cond=dict(cond or {}),
            ).x
        )
    return Teacher(fine=fine, states=tuple(states), ref_tol=ref_tol, cond=dict(cond or {}))


def _errors(out: Tensor, ref: Tensor) -> Tensor:
    return (f64(out) - ref).flatten(1).norm(dim=1)


def cost_matrix(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    solver: Solver[Any],
    fine: Tensor,
    teacher: Sequence[Tensor],
    *,
    cond: Mapping[str, Any] | None = None,
) -> Tensor:
    """``c[i, j]`` (``i < j``): mean per-sample L2 error of one ``solver`` step ``fine[i] -> fine[j]`` from the
    teacher state; ``inf`` below the diagonal."""
    m = len(fine)
    c = torch.full((m, m), math.inf, dtype=torch.float64)
    problem = Problem(model, schedule, cond=dict(cond or {}))
    with torch.no_grad():
        for i in range(m - 1):
            for j in range(i + 1, m):
                out = sample(problem, teacher[i], fine[[i, j]], solver)
                c[i, j] = float(_errors(out, teacher[j]).mean())
    return c


def dp_path(cost: Tensor, steps: int) -> list[int]:
    """Indices ``0 = m_0 < ... < m_steps = M - 1`` minimising ``sum_k cost[m_{k-1}, m_k]`` (exact DP)."""
    m = cost.shape[0]
    if cost.ndim != 2 or cost.shape[1] != m:
        raise ValueError(f"cost must be a square matrix, got shape {tuple(cost.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= m - 1:
        raise ValueError(f"steps must be an int in [1, {m - 1}] for a {m}-point fine grid, got {steps!r}")
    best = torch.full((steps + 1, m), math.inf, dtype=torch.float64)
    arg = torch.zeros((steps + 1, m), dtype=torch.int64)
    best[0, 0] = 0.0
    for k in range(1, steps + 1):
        tot = best[k - 1][:, None] + cost  # tot[i, j]: reach i in k-1 steps, then i -> j
        best[k], arg[k] = tot.min(dim=0)
    if not math.isfinite(float(best[steps, m - 1])):
        raise ValueError(f"no finite path of {steps} steps through the cost matrix")
    path = [m - 1]
    for k in range(steps, 0, -1):
        path.append(int(arg[k, path[-1]]))
    return path[::-1]


def grid_errors(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    solver: Solver[Any],
    ts: Tensor,
    x: Tensor,
    x_ref: Tensor,
    *,
    cond: Mapping[str, Any] | None = None,
) -> Tensor:
    """Per-sample L2 error of ``solver`` on ``ts`` from ``x`` against the reference end points ``x_ref``
    (``inf`` where the solve fails)."""
    try:
        with torch.no_grad():
            out = sample(Problem(model, schedule, cond=dict(cond or {})), x, ts, solver)
        err = _errors(out, x_ref)
    except (FloatingPointError, ValueError, RuntimeError):
        return torch.full((x.shape[0],), math.inf, dtype=torch.float64)
    return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))


def _golden(loss: Callable[[float], float], lo: float, hi: float, x0: float, iters: int) -> tuple[float, float]:
    """Golden-section search of ``loss`` on ``[lo, hi]``; returns the best point seen (``x0`` included)."""
    g = (math.sqrt(5) - 1) / 2
    seen = {x0: loss(x0)}
    a, b = lo, hi
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = loss(c), loss(d)
    seen[c], seen[d] = fc, fd
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = seen[c] = loss(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = seen[d] = loss(d)
    x = min(seen, key=lambda k: seen[k])
    return x, seen[x]


def _refine(
    loss: Callable[[Tensor], float], schedule: NoiseSchedule, ts: Tensor, sweeps: int, iters: int
) -> tuple[Tensor, float]:
    """Coordinate descent over the interior points in ``lam`` (first and last points fixed)."""
    ts = ts.clone()
    lam_min_t = float(schedule.lam(f64(schedule.t_min)))
    best = loss(ts)
    for _ in range(sweeps):
        for k in range(1, len(ts) - 1):
            lam_prev = float(schedule.lam(ts[k - 1]))
            lam_next = float(schedule.lam(ts[k + 1]))
            hi = lam_next if math.isfinite(lam_next) else lam_min_t
            span = hi - lam_prev
            lo_k, hi_k = lam_prev + 0.02 * span, hi - (0.02 * span if math.isfinite(lam_next) else 0.0)

            def at(lam: float, k: int = k, base: Tensor = ts) -> Tensor:
                out = base.clone()
                out[k] = schedule.t_of_lambda(f64(lam))
                return out

            def f(lam: float) -> float:
                cand = at(lam)
                return loss(cand) if bool((cand[1:] < cand[:-1]).all()) else math.inf

            lam_k, val = _golden(f, lo_k, hi_k, float(schedule.lam(ts[k])), iters)
            if val < best:
                ts, best = at(lam_k), val
    return ts, best


def _slack(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    solver: Solver[Any],
    ts: Tensor,
    x: Tensor,
    ref: Tensor,
    radius: float,
    iters: int,
    cond: Mapping[str, Any],
) -> Tensor:
    """LD3's student inputs: ``argmin_{||x' - x|| <= radius} mean_n ||Psi_ts(x'_n) - ref_n||`` by projected Adam."""
    delta = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=radius / 10)
    problem = Problem(model, schedule, cond=dict(cond))
    for _ in range(iters):
        with torch.enable_grad():
            loss = _errors(sample(problem, x + delta, ts, solver), ref).mean()
            opt.zero_grad()
            loss.backward()
        opt.step()
        with torch.no_grad():
            norm = delta.flatten(1).norm(dim=1).clamp_min(1e-30)
            delta.mul_((radius / norm).clamp(max=1.0).view(-1, *[1] * (x.ndim - 1)))
    return (x + delta).detach()


def fit_grid(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    solver: Solver[Any] | Mapping[str, Any] | str,
    nfe: int,
    noise: Tensor,
    *,
    method: str = "gits",
    fine_steps: int = 40,
    to_zero: bool = True,
    cond: Mapping[str, Any] | None = None,
    model_name: str = "",
    seeds: Mapping[str, int] | None = None,
    ref_tol: float = 1e-9,
    sweeps: int = 2,
    golden_iters: int = 12,
    radius: float = 0.05,
    rounds: int = 2,
    inner_iters: int = 20,
    teacher: Teacher | None = None,
) -> GridArtifact:
    """Fit the grid of ``solver`` at exactly ``nfe`` evaluations for ``model`` on the calibration start
    states ``noise`` (at ``t_max``; see ``calibration_noise``, whose ``(seed, start, n)`` go in ``seeds``).
    ``method``: ``"gits"``, ``"gits+e2e"`` or ``"ld3"`` (module docstring; ``radius``, ``rounds``,
    ``inner_iters`` are LD3's). ``teacher``: the fine-grid ODE states of ``noise`` from ``teacher_states``
    (computed here when not given; refused unless computed for this noise, fine grid and ``ref_tol``)."""
    if method not in METHODS:
        raise ValueError(f"unknown grid method {method!r}; allowed: {', '.join(METHODS)}")
    if noise.ndim < 2 or noise.shape[0] < 1:
        raise ValueError(f"noise must have shape (N, ...) with N >= 1, got {tuple(noise.shape)}")
    if seeds is not None and set(seeds) != {"seed", "start", "n"}:
        raise ValueError(f"seeds must have the keys seed, start, n; got {sorted(seeds)}")
    cfg = _solver_config(solver)
    slv = get(**cfg)
    if slv.is_stochastic():
        raise ValueError(f"solver {cfg['name']!r} is stochastic; a grid is fitted for a deterministic solver")
    steps = slv.steps_for_nfe(nfe, to_zero)
    if steps > fine_steps:
        raise ValueError(f"fine_steps={fine_steps} is fewer than the {steps} steps to place; raise fine_steps")
    t_start = time.perf_counter()
    if teacher is None:
        teacher = teacher_states(model, schedule, noise, fine_steps, to_zero=to_zero, ref_tol=ref_tol, cond=cond)
    else:
        teacher.check(schedule, noise, fine_steps, to_zero, ref_tol, cond)
    fine, states = teacher.fine, teacher.states
    cost = cost_matrix(model, schedule, slv, fine, states, cond=cond)
    ts = fine[dp_path(cost, steps)]

    def loss(grid: Tensor) -> float:
        return float(grid_errors(model, schedule, slv, grid, states[0], states[-1], cond=cond).mean())

    init = "gits"
    if method != "gits":  # the refinement is local: start from the best of the DP grid and the named grids
        starts = {"gits": ts, **{g: make_grid(schedule, g, steps, to_zero=to_zero) for g in START_GRIDS}}
        init = min(starts, key=lambda g: loss(starts[g]))
        ts = starts[init]
    if method == "gits+e2e":
        ts, err = _refine(loss, schedule, ts, sweeps, golden_iters)
    elif method == "ld3":
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius!r}")
        x_start = states[0]
        rad = radius * float(schedule.sigma(f64(schedule.t_max))) * math.sqrt(x_start[0].numel())
        for _ in range(rounds):
            x_start = _slack(model, schedule, slv, ts, states[0], states[-1], rad, inner_iters, cond or {})

            def soft(grid: Tensor, xs: Tensor = x_start) -> float:
                return float(grid_errors(model, schedule, slv, grid, xs, states[-1], cond=cond).mean())

            ts, _ = _refine(soft, schedule, ts, sweeps, golden_iters)
        err = loss(ts)
    else:
        err = loss(ts)
    if slv.nfe(ts, schedule) != nfe:
        raise RuntimeError(f"fitted grid uses {slv.nfe(ts, schedule)} evaluations, not {nfe}")
    return GridArtifact(
        ts=tuple(ts.tolist()),
        model=model_name,
        solver=cfg,
        nfe=nfe,
        schedule=schedule_id(schedule),
        method=method,
        init=init,
        seeds=dict(seeds or {}),
        fine_steps=fine_steps,
        fit_seconds=time.perf_counter() - t_start,
        fit_error=err,
    )


def brute_force_path(cost: Tensor, steps: int) -> list[int]:
    """Exhaustive reference for ``dp_path`` (tests, tiny grids only)."""
    m = cost.shape[0]
    best, arg = math.inf, None
    for mid in itertools.combinations(range(1, m - 1), steps - 1):
        path = [0, *mid, m - 1]
        v = sum(float(cost[a, b]) for a, b in itertools.pairwise(path))
        if v < best:
            best, arg = v, path
    if arg is None:
        raise ValueError(f"no path of {steps} steps on {m} points")
    return arg
