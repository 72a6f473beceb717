"""The one-line API: ``dpmlab.sample(model, n=64, solver="ddim", nfe=10, seed=0)``.

``nfe`` is the honest number of network evaluations per sample (warm-up, corrector and Heun's
second evaluations included); a budget the solver cannot meet exactly raises ``ValueError``.
Sample ``i``'s starting noise (and any step noise) depends only on ``(seed, i)``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._utils import counter_normal, f64
from .models.hub import load
from .schedules import NoiseSchedule
from .solvers.base import Problem, SeededNoise, Solver, StepInfo, get
from .solvers.base import sample as run
from .timesteps import DEFAULT_GRID, DISCRETE_GRIDS, GRIDS, check_grid, default_to_zero, make_grid
from .typing import DenoiserFn

if TYPE_CHECKING:
    from .calibrate.recipe import Recipe

__all__ = ["sample", "make_grid", "default_grid", "DISCRETE_GRIDS", "DEFAULT_GRID"]


def default_grid(model: str = "") -> str:
    """The grid ``sample`` uses when none is given: the one the card of the shipped model ``model`` names (the
    fixed grid its sampling recipe measured best, ``Recipe.default_grid``), else ``DEFAULT_GRID``."""
    if model:
        from .calibrate.recipe import model_default_grid

        g = model_default_grid(model)
        if g is not None:
            return g
    return DEFAULT_GRID


def _per_sample(v: Any, n: int) -> bool:
    if isinstance(v, Tensor):
        return bool(v.ndim) and v.shape[0] == n
    return isinstance(v, list | tuple) and len(v) == n


def _whole(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """``value`` must be an int (not a bool, not a float) in ``[lo, hi]``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be a whole number {rng}, got {value!r}")


def _to_device(model: DenoiserFn, device: torch.device | str) -> DenoiserFn:
    """A named model moved to ``device``: networks by ``.to``, analytic mixtures rebuilt there."""
    from .models.analytic import AnalyticDenoiser, GaussianMixture

    if isinstance(model, torch.nn.Module):
        return model.to(device)  # type: ignore[no-any-return]
    if isinstance(model, AnalyticDenoiser):
        gm = model.model
        moved = GaussianMixture(gm.weights.to(device), gm.means.to(device), gm.stds.to(device), name=gm.name)
        return AnalyticDenoiser(moved, model.schedule)
    return model


def sample(
    model: DenoiserFn | str,
    n: int = 64,
    *,
    solver: str | Solver[Any] = "ddim",
    nfe: int | None = 10,
    recipe: str | os.PathLike[str] | Recipe | None = None,
    seed: int = 0,
    grid: str | Tensor | None = None,
    schedule: NoiseSchedule | None = None,
    shape: tuple[int, ...] | None = None,
    t_start: float | None = None,
    t_end: float | None = None,
    to_zero: bool | None = None,
    cond: Mapping[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    x_T: Tensor | None = None,
    index_offset: int = 0,
    **solver_options: Any,
) -> Tensor:
    """Draw ``n`` samples with ``solver`` at exactly ``nfe`` network evaluations each.

    ``model``: a ``DenoiserFn`` carrying ``.schedule`` (and ``.data_shape``), or a model name for
    ``dpmlab.load``. ``grid``: a name in ``dpmlab.timesteps.GRIDS`` or an explicit decreasing tensor
    of times (then ``nfe`` may be ``None``); ``None``: the model's default (``default_grid``: the grid its
    card's sampling recipe measured best, else ``DEFAULT_GRID``). ``to_zero`` ends the grid at
    ``sigma = 0`` (default: yes where the schedule reaches it and no ``t_end`` is given; ``False`` stops at
    ``t_end`` / ``schedule.t_min``).
    ``cond``: keyword arguments for the model, e.g. ``{"label": labels}`` or
    ``{"prompt": "a bold seven"}``; a tensor with one row per sample, or a list of ``n`` items (prompts),
    is split along with the batches. Returns ``(n, *shape)`` in
    ``dtype`` promoted to >= float32. ``x_T``: the starting state itself, ``(n, *shape)`` at the grid's first
    time (already scaled by its sigma) instead of ``sigma(t_0) * noise(seed, i)`` — for fair comparisons and
    inversion round trips; ``seed`` then drives only the step noise of stochastic solvers.
    ``index_offset``: the returned rows are samples ``index_offset .. index_offset + n - 1`` of the
    seed's sequence (their noise is ``(seed, index_offset + i)``) — how ``dpmlab.parallel`` shards.
    Runs under ``torch.no_grad()`` (guidance that differentiates enables gradients itself); to differentiate
    through a sampler use ``dpmlab.solvers.differentiable``.
    ``solver="auto"``: the solver and grid of the model's sampling recipe at this ``nfe`` (and guidance scale,
    for a ``classifier_free`` model): ``recipe=`` (a path or ``dpmlab.calibrate.recipe.Recipe``), else the one
    shipped in the card of a model given by name (``dpmlab.calibrate.recipe``).
    """
    name = model if isinstance(model, str) else str(getattr(model, "name", "") or "")
    if isinstance(model, str):
        model = _to_device(load(model), device)
    sch = schedule if schedule is not None else getattr(model, "schedule", None)
    if not isinstance(sch, NoiseSchedule):
        raise ValueError("the model carries no .schedule; pass schedule=")
    shp = shape if shape is not None else getattr(model, "data_shape", None)
    if shp is None:
        raise ValueError("the model carries no .data_shape; pass shape=")
    _whole("n", n, 1)
    _whole("seed", seed, 0, 2**63 - 1)
    _whole("index_offset", index_offset, 0)
    if nfe is not None:
        _whole("nfe", nfe, 1)
    if batch_size is not None:
        _whole("batch_size", batch_size, 1)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch dtype (float16, bfloat16, float32, float64), got {dtype!r}")
    if to_zero is not None and not isinstance(to_zero, bool):
        raise ValueError(f"to_zero must be True, False or None, got {to_zero!r}")
    if isinstance(solver, str) and solver == "auto":
        if solver_options:
            raise ValueError(
                f"solver='auto' takes its solver from the recipe; options {sorted(solver_options)} do not apply"
            )
        if grid is not None or any(v is not None for v in (t_start, t_end, to_zero)):
            raise ValueError(
                "solver='auto' takes its grid from the recipe; grid, t_start, t_end and to_zero do not apply"
            )
        if nfe is None:
            raise ValueError("solver='auto' needs nfe (the recipe holds one solver and grid per NFE)")
        from .calibrate.recipe import resolve_recipe

        entry = resolve_recipe(model, nfe, recipe=recipe, name=name, schedule=sch)
        solver, grid = entry.solver(), entry.grid()
    elif recipe is not None:
        raise ValueError("recipe= is only used with solver='auto'")
    if grid is None:
        grid = default_grid(name)
    slv = get(solver, **solver_options) if isinstance(solver, str) else solver
    if solver_options and not isinstance(solver, str):
        raise ValueError("solver options are only accepted with a solver name; configure the instance instead")

    if isinstance(grid, str):
        if grid not in GRIDS:
            raise ValueError(f"unknown grid {grid!r}; allowed: {', '.join(GRIDS)}")
        zero = default_to_zero(sch, t_end) if to_zero is None else bool(to_zero)
        if nfe is None:
            raise ValueError("nfe is required with a named grid")
        steps = slv.steps_for_nfe(nfe, zero)
        ts = make_grid(sch, grid, steps, to_zero=zero, t_start=t_start, t_end=t_end)
    else:
        ts = check_grid(f64(grid), sch)
        if nfe is not None and slv.nfe(ts, sch) != nfe:
            raise ValueError(
                f"grid of {len(ts) - 1} steps costs {slv.nfe(ts, sch)} evaluations with {slv.name!r}, not nfe={nfe}"
            )

    if x_T is not None:
        if not isinstance(x_T, Tensor) or tuple(x_T.shape) != (n, *tuple(shp)):
            got = tuple(x_T.shape) if isinstance(x_T, Tensor) else type(x_T).__name__
            raise ValueError(f"x_T must be a tensor of shape {(n, *tuple(shp))} (n, *shape), got {got}")
        if not x_T.is_floating_point() or not bool(torch.isfinite(x_T).all()):
            raise ValueError("x_T must hold finite floating-point values")
    bs = batch_size or n
    sigma0 = float(sch.sigma(ts[:1]))
    outs = []
    with torch.no_grad():  # sampling needs no graph (guidance that differentiates enables its own)
        for lo in range(0, n, bs):
            idx = torch.arange(lo, min(n, lo + bs), dtype=torch.int64) + index_offset
            if x_T is not None:
                x = x_T[lo : lo + len(idx)].to(device=device, dtype=dtype)
            else:
                x = sigma0 * counter_normal(seed, idx, 0, shp, dtype=dtype, device=device)
            # per-sample conditioning (a tensor with one row per sample, e.g. labels, or a list of n prompts)
            # follows the batch
            bcond = {k: v[lo : lo + len(idx)] if _per_sample(v, n) else v for k, v in (cond or {}).items()}
            problem = Problem(model, sch, noise=SeededNoise(seed, idx), cond=bcond)
            out = run(problem, x, ts, slv, callback=callback)
            expected = slv.nfe(ts, sch)
            if problem.nfe != expected:  # honesty check: a solver's declared cost must be its real cost
                raise RuntimeError(f"solver {slv.name!r} used {problem.nfe} evaluations, declared {expected}")
            outs.append(out)
    return torch.cat(outs)
