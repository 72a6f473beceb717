"""Sampling recipes: the solver and time grid chosen per (model, NFE) on held-out noise — ``solver="auto"``.

Issue 17 item 2. ``fit_recipe(model, nfes, fit_seed=a, select_seed=b)`` scores every candidate

* training-free solver (``DEFAULT_SOLVERS``: DDIM, DPM-Solver++ 2M/3M, UniPC p2/p3 with B(h) = bh1/bh2,
  DEIS, iPNDM, DPM-Solver-fast; each only at the NFE it meets exactly) on every fixed grid
  (``FIXED_GRIDS``, plus diffusers' ``trailing`` spacing on a discrete schedule), and
* for the ``learned_top`` solvers with the lowest fixed-grid error at that NFE, a learned grid
  (``dpmlab.calibrate.grid.fit_grid``, GITS dynamic programming refined end to end: ``"gits+e2e"``),

against the float64 reference ODE solution (``models.reference``) from the same start noise, and keeps the
candidate with the lowest RMS (or median) error. Noise discipline: learned grids are fitted on set A
(``calibration_noise(seed=fit_seed)``), every score — the ranking that decides which solvers get a learned
grid, and the final choice — is taken on set B (``seed=select_seed``); a set B that overlaps set A is refused
(``GridArtifact.check_held_out``). Both seeds are recorded; a report of the recipe's error must use a third.

Errors, as in ``dpmlab.bench``: the pooled RMS over samples and coordinates, and the median over samples of a
sample's own RMS error (on mixtures the pooled RMS is carried by the few samples that change mode).

A ``Recipe`` is a JSON artifact (format ``"dpmlab.recipe"``, version 1, written atomically): per NFE (and
guidance scale) the solver's ``config()``, the exact grid (ending at ``sigma = 0`` where the schedule reaches
it), where it came from, and the selection scores of every candidate. It is validated on use against the
model name, its schedule (``schedule_id``) and the NFE. Shipped models carry theirs in the model card under
``"sampling_recipes"`` (``shipped_recipe``); ``dpmlab.sample(model, nfe=..., solver="auto")`` uses it.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils import atomic_write
from ..models.reference import reference_solution
from ..schedules import DiscreteVP, NoiseSchedule
from ..solvers.base import Solver, get
from ..timesteps import check_grid, make_grid
from ..typing import DenoiserFn
from .grid import Teacher, _solver_config, calibration_noise, fit_grid, grid_errors, schedule_id, teacher_states

__all__ = [
    "DEFAULT_SOLVERS",
    "FIXED_GRIDS",
    "RECIPE_FORMAT",
    "RECIPE_VERSION",
    "Recipe",
    "RecipeEntry",
    "candidate_label",
    "fit_recipe",
    "model_default_grid",
    "resolve_recipe",
    "shipped_recipe",
]

RECIPE_FORMAT = "dpmlab.recipe"
RECIPE_VERSION = 1
CARD_KEY = "sampling_recipes"  # where a shipped model's card holds its recipe
LEARNED = "gits+e2e"
CRITERIA = ("rms", "median")
CALIBRATED = ("dc",)  # calibrated artifacts fit_recipe can add on top of a winner

# the training-free candidates (configs for dpmlab.solvers.get)
DEFAULT_SOLVERS: tuple[dict[str, Any], ...] = (
    {"name": "ddim"},
    {"name": "dpm_solver_pp", "order": 2},
    {"name": "dpm_solver_pp", "order": 3},
    {"name": "unipc", "predictor_order": 2, "variant": "bh1"},
    {"name": "unipc", "predictor_order": 2, "variant": "bh2"},
    {"name": "unipc", "predictor_order": 3, "variant": "bh1"},
    {"name": "unipc", "predictor_order": 3, "variant": "bh2"},
    {"name": "deis"},
    {"name": "ipndm"},
    {"name": "dpm_solver_fast"},
)
FIXED_GRIDS = ("quadratic_time", "uniform_lambda", "karras", "uniform_time")  # + "trailing" on a DiscreteVP


def candidate_label(cfg: Mapping[str, Any]) -> str:
    """``name(option=value, ...)`` with only the options that differ from the solver's defaults; a DC-Solver
    with fitted ratios is ``dc_solver[<its base's label>]`` (the ratios are in the config)."""
    if cfg["name"] == "dc_solver" and isinstance(cfg.get("base"), Mapping):
        return f"dc_solver[{candidate_label(cfg['base'])}]"
    default = get(str(cfg["name"])).config()
    diff = [f"{k}={v}" for k, v in cfg.items() if k != "name" and default.get(k) != v]
    return str(cfg["name"]) + (f"({', '.join(diff)})" if diff else "")


def _key(guidance: float | None) -> float | None:
    """``None`` and 1 both mean: no guidance."""
    return None if guidance is None or float(guidance) == 1.0 else float(guidance)


@dataclass(frozen=True)
class RecipeEntry:
    """The choice at one NFE (and guidance scale): solver config, exact grid, provenance, selection scores."""

    nfe: int
    solver_config: dict[str, Any]  # Solver.config(); dpmlab.solvers.get(**solver_config) rebuilds it
    ts: tuple[float, ...]  # the grid, strictly decreasing, ts[0] = t_max (ends at sigma = 0 where reachable)
    grid_name: str  # a name in dpmlab.timesteps.GRIDS, or "gits+e2e" (fitted on the recipe's fit noise)
    rms: float  # selection scores of the choice on the select noise
    median: float
    guidance: float | None = None  # classifier-free guidance scale (None: none)
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)  # every candidate: label -> (rms, median)

    def __post_init__(self) -> None:
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
            raise ValueError(f"nfe must be a positive int, got {self.nfe!r}")
        check_grid(torch.tensor(self.ts, dtype=torch.float64))

    @property
    def label(self) -> str:
        return f"{candidate_label(self.solver_config)} @ {self.grid_name}"

    def solver(self) -> Solver[Any]:
        return get(**self.solver_config)

    def grid(self) -> Tensor:
        return torch.tensor(self.ts, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "nfe": self.nfe,
            "guidance": self.guidance,
            "solver": dict(self.solver_config),
            "grid": self.grid_name,
            "ts": list(self.ts),
            "rms": self.rms,
            "median": self.median,
            "scores": {k: list(v) for k, v in self.scores.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RecipeEntry:
        try:
            return cls(
                nfe=d["nfe"],
                solver_config=dict(d["solver"]),
                ts=tuple(float(t) for t in d["ts"]),
                grid_name=str(d["grid"]),
                rms=float(d["rms"]),
                median=float(d["median"]),
                guidance=_key(d.get("guidance")),
                scores={str(k): (float(v[0]), float(v[1])) for k, v in dict(d.get("scores", {})).items()},
            )
        except (KeyError, TypeError, IndexError) as e:
            raise ValueError(f"invalid recipe entry: {e!r}") from e


@dataclass(frozen=True)
class Recipe:
    """Per NFE (and guidance scale) the solver and grid to sample ``model`` with (see the module docstring)."""

    model: str  # the model name it was fitted for
    schedule: str  # schedule_id() of its noise schedule
    entries: tuple[RecipeEntry, ...]
    seeds: dict[str, dict[str, int]] = field(default_factory=dict)  # {"fit"|"select": {"seed", "start", "n"}}
    criterion: str = "rms"
    cond: str = ""  # the conditioning it was fitted with, in words
    provenance: dict[str, Any] = field(default_factory=dict)  # command, CPU seconds, reference tolerance, ...

    def __post_init__(self) -> None:
        keys = [(e.nfe, e.guidance) for e in self.entries]
        if len(set(keys)) != len(keys):
            raise ValueError(f"a recipe holds one entry per (nfe, guidance); got duplicates in {keys}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}")

    def nfes(self, guidance: float | None = None) -> tuple[int, ...]:
        g = _key(guidance)
        return tuple(sorted(e.nfe for e in self.entries if e.guidance == g))

    def guidances(self) -> tuple[float | None, ...]:
        return tuple(dict.fromkeys(e.guidance for e in self.entries))

    def entry(self, nfe: int, guidance: float | None = None) -> RecipeEntry:
        g = _key(guidance)
        for e in self.entries:
            if e.nfe == nfe and e.guidance == g:
                return e
        have = self.nfes(g)
        what = "no guidance" if g is None else f"guidance {g:g}"
        if not have:
            scales = ", ".join("none" if s is None else f"{s:g}" for s in self.guidances())
            raise ValueError(f"the recipe for {self.model!r} has no entry with {what}; it has guidance: {scales}")
        raise ValueError(
            f"the recipe for {self.model!r} has no entry for nfe={nfe} ({what}); it has nfe {', '.join(map(str, have))}"
        )

    def default_grid(self) -> str | None:
        """The model's default fixed grid: the continuous grid (``FIXED_GRIDS``: usable with any ``t_start`` /
        ``t_end``) whose best training-free solver has the lowest geometric-mean selection error over the
        recipe's unguided NFEs (None: no such grid scored at all of them). What ``dpmlab.sample`` uses for this
        model when no grid is given (``model_default_grid``)."""
        best: dict[str, dict[int, float]] = {}
        entries = [e for e in self.entries if e.guidance is None] or list(self.entries)
        for e in entries:
            for label, (rms, _) in e.scores.items():
                g = label.rsplit(" @ ", 1)[-1]
                if g in FIXED_GRIDS and math.isfinite(rms) and rms > 0:
                    best.setdefault(g, {})[e.nfe] = min(best.get(g, {}).get(e.nfe, math.inf), rms)
        full = {g: d for g, d in best.items() if len(d) == len(entries)}
        if not full:
            return None
        return min((g for g in FIXED_GRIDS if g in full), key=lambda g: sum(math.log(v) for v in full[g].values()))

    def solver(self, nfe: int, guidance: float | None = None) -> Solver[Any]:
        return self.entry(nfe, guidance).solver()

    def grid(self, nfe: int, guidance: float | None = None) -> Tensor:
        return self.entry(nfe, guidance).grid()

    def check(self, model: str | None = None, schedule: NoiseSchedule | None = None) -> None:
        """Raise ``ValueError`` unless this recipe was fitted for ``model`` (and ``schedule``, if given); every
        entry's grid must cost exactly its NFE with its solver."""
        if model is not None and self.model and model != self.model:
            raise ValueError(f"recipe fitted for model {self.model!r}, not {model!r}")
        if schedule is not None:
            if schedule_id(schedule) != self.schedule:
                raise ValueError(f"recipe fitted on schedule {self.schedule}, not {schedule_id(schedule)}")
            for e in self.entries:
                got = e.solver().nfe(e.grid(), schedule)
                if got != e.nfe:
                    raise ValueError(f"recipe entry for nfe={e.nfe} ({e.label}) costs {got} evaluations, not {e.nfe}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": RECIPE_FORMAT,
            "version": RECIPE_VERSION,
            "model": self.model,
            "schedule": self.schedule,
            "criterion": self.criterion,
            "cond": self.cond,
            "seeds": {k: dict(v) for k, v in self.seeds.items()},
            "provenance": dict(self.provenance),
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "recipe") -> Recipe:
        if not isinstance(d, Mapping) or d.get("format") != RECIPE_FORMAT or d.get("version") != RECIPE_VERSION:
            raise ValueError(f"{where} is not a {RECIPE_FORMAT!r} version {RECIPE_VERSION} artifact")
        try:
            return cls(
                model=str(d["model"]),
                schedule=str(d["schedule"]),
                entries=tuple(RecipeEntry.from_dict(e) for e in d["entries"]),
                seeds={str(k): dict(v) for k, v in dict(d.get("seeds", {})).items()},
                criterion=str(d.get("criterion", "rms")),
                cond=str(d.get("cond", "")),
                provenance=dict(d.get("provenance", {})),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"{where}: invalid recipe ({e!r})") from e

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        if path.suffix != ".json":
            raise ValueError(f"recipe path must end in .json, got {str(path)!r}")
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], *, model: str | None = None, schedule: NoiseSchedule | None = None
    ) -> Recipe:
        """Read and validate (``check(model, schedule)``)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a recipe from {path}: {e}") from e
        rec = cls.from_dict(d, where=str(path))
        rec.check(model, schedule)
        return rec


def model_card(model_name: str) -> Path | None:
    """The card of a shipped model: ``assets/<name>.json`` (weights files) or ``assets/<name>/model_card.json``
    (diffusers-format folders such as ``mnist_t2i``); None if there is none."""
    if not isinstance(model_name, str) or not model_name.isidentifier():
        return None
    assets = Path(str(resources.files("dpmlab") / "assets"))
    for card in (assets / f"{model_name}.json", assets / model_name / "model_card.json"):
        if card.is_file():
            return card
    return None


def shipped_recipe(model_name: str) -> Recipe | None:
    """The recipe in the card of a shipped model (``model_card``, key ``"sampling_recipes"``), or None."""
    card = model_card(model_name)
    if card is None:
        return None
    d = json.loads(card.read_text()).get(CARD_KEY)
    if d is None:
        return None
    return Recipe.from_dict(d, where=f"{card} [{CARD_KEY!r}]")


def model_default_grid(model_name: str) -> str | None:
    """The default grid the card of a shipped model names (``Recipe.default_grid`` of its recipe), or None."""
    rec = shipped_recipe(model_name)
    return rec.default_grid() if rec is not None else None


def resolve_recipe(
    model: DenoiserFn,
    nfe: int,
    *,
    recipe: str | os.PathLike[str] | Recipe | None = None,
    name: str = "",
    schedule: NoiseSchedule | None = None,
) -> RecipeEntry:
    """The entry ``solver="auto"`` samples ``model`` (named ``name``) with at ``nfe``: from ``recipe`` (a path or
    a ``Recipe``), else from the recipe shipped in the model's card; checked against the name and ``schedule``.
    A ``classifier_free`` model selects the entry of its guidance scale."""
    from ..models.guidance import ClassifierFree

    if recipe is None:
        rec = shipped_recipe(name) if name else None
        if rec is None:
            raise ValueError(
                f"solver='auto' needs a sampling recipe: model {name or type(model).__name__!r} ships none; "
                "pass a recipe (dpmlab calibrate recipe)"
            )
    elif isinstance(recipe, Recipe):
        rec = recipe
    elif isinstance(recipe, str | os.PathLike):
        rec = Recipe.load(recipe)
    else:
        raise ValueError(f"recipe must be a path or a Recipe, got {type(recipe).__name__}")
    rec.check(name or None, schedule if schedule is not None else getattr(model, "schedule", None))
    guidance = model.scale if isinstance(model, ClassifierFree) else None
    return rec.entry(nfe, guidance)


def _errors(err: Tensor, dim: int) -> tuple[float, float]:
    """(pooled RMS, median per-sample RMS) from per-sample L2 errors (``grid_errors``) in ``dim`` coordinates."""
    return float(err.pow(2).mean().div(dim).sqrt()), float(err.median() / math.sqrt(dim))


def _progress(progress: Callable[[str], None] | bool | None, total: int) -> tuple[Callable[[str], None], Any]:
    if callable(progress):
        return progress, None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="cand", desc="recipe", leave=False)

        def tick(msg: str) -> None:
            bar.set_postfix_str(msg[:60])
            bar.update(1)

        return tick, bar
    return (lambda msg: None), None


def fit_recipe(
    model: DenoiserFn | str,
    nfes: Sequence[int],
    *,
    fit_seed: int,
    select_seed: int,
    n_fit: int = 64,
    n_select: int = 64,
    candidates: Sequence[Solver[Any] | Mapping[str, Any] | str] | None = None,
    grids: Sequence[str] | None = None,
    learned: bool = True,
    learned_top: int = 2,
    progress: Callable[[str], None] | bool | None = None,
    cond: Mapping[str, Any] | None = None,
    cond_note: str = "",
    guidance: float | None = None,
    model_name: str = "",
    schedule: NoiseSchedule | None = None,
    shape: Sequence[int] | None = None,
    criterion: str = "rms",
    ref_tol: float | None = None,
    grid_options: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
    calibrated: Sequence[str] = (),
) -> Recipe:
    """Choose, per NFE in ``nfes``, the solver and grid with the lowest ``criterion`` error on held-out noise.

    ``model``: a ``DenoiserFn`` with ``.schedule`` / ``.data_shape`` or a name for ``dpmlab.load`` (then it is
    also the recipe's ``model_name``). Learned grids are fitted on ``n_fit`` noises of ``fit_seed``; every
    candidate is scored on ``n_select`` noises of ``select_seed`` (must differ from ``fit_seed``).
    ``candidates``: solvers (default ``DEFAULT_SOLVERS``); ``grids``: fixed grid names (default ``FIXED_GRIDS``,
    plus ``trailing`` on a discrete schedule); ``learned``: also fit ``gits+e2e`` grids for the ``learned_top``
    best solvers per NFE (``grid_options`` go to ``fit_grid``). ``cond``: model keyword arguments (per-sample
    ones have ``max(n_fit, n_select)`` rows: the first ``n_select`` select, the first ``n_fit`` fit). ``guidance``:
    a classifier-free guidance scale (the entries are keyed by it). ``ref_tol``: the reference solver's
    rtol = atol (default 1e-9 for an analytic model, 1e-5 for a network: its error is then far below the errors
    compared).
    ``progress``: a callback taking a message per candidate, or ``True`` for a tqdm bar.
    ``calibrated``: calibrated artifacts tried on top of each NFE's winner, kept only if they lower its error on
    the select noise: ``"dc"`` — DC-Solver ratios (``calibrate.dc.fit_dc_ratios``) for the winning solver on
    its grid, fitted on the ``n_fit`` noises of ``fit_seed`` (set A, with its ``cond`` rows)."""
    from ..models.hub import load

    t_cpu, t_wall = time.process_time(), time.perf_counter()
    if isinstance(model, str):
        model_name = model_name or model
        model = load(model)
    sch = schedule if schedule is not None else getattr(model, "schedule", None)
    if not isinstance(sch, NoiseSchedule):
        raise ValueError("the model carries no .schedule; pass schedule=")
    shp = tuple(shape) if shape is not None else tuple(getattr(model, "data_shape", None) or ())
    if not shp:
        raise ValueError("the model carries no .data_shape; pass shape=")
    for name, v in (("fit_seed", fit_seed), ("select_seed", select_seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {v!r}")
    for name, v in (("n_fit", n_fit), ("n_select", n_select), ("learned_top", learned_top)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
    if fit_seed == select_seed:
        raise ValueError(f"fit_seed and select_seed must differ (selection on held-out noise); both are {fit_seed}")
    if not nfes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in nfes):
        raise ValueError(f"nfes must be a non-empty list of positive ints, got {list(nfes)!r}")
    if len(set(nfes)) != len(nfes):
        raise ValueError(f"nfes has duplicates: {list(nfes)!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    bad = sorted(set(calibrated) - set(CALIBRATED))
    if bad or isinstance(calibrated, str):
        raise ValueError(f"unknown calibrated artifact(s) {bad or calibrated!r}; allowed: {', '.join(CALIBRATED)}")
    cfgs = [_solver_config(c) for c in (DEFAULT_SOLVERS if candidates is None else candidates)]
    if not cfgs:
        raise ValueError("candidates is empty; give at least one solver")
    labels = [candidate_label(c) for c in cfgs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"candidates has duplicates: {', '.join(labels)}")
    for c in cfgs:
        if get(**c).is_stochastic():
            raise ValueError(f"solver {c['name']!r} is stochastic; a recipe chooses among deterministic solvers")
    grid_names = list(FIXED_GRIDS if grids is None else grids)
    if grids is None and isinstance(sch, DiscreteVP):
        grid_names.append("trailing")
    to_zero = sch.t_zero is not None
    for g in grid_names:
        make_grid(sch, g, 2, to_zero=to_zero)  # a bad name or a discrete grid on a continuous schedule: now
    fine_steps = int(dict(grid_options or {}).get("fine_steps", 40))  # fit_grid's default
    if learned:  # a learned grid places its steps on the fine grid: refuse now, not after hours of fitting
        need = {
            k: max((get(**c).steps_for_nfe(k, to_zero) for c in cfgs if _meets(get(**c), k, to_zero)), default=0)
            for k in nfes
        }
        k_max = max(need, key=need.__getitem__)
        if need[k_max] > fine_steps:
            raise ValueError(
                f"fine_steps={fine_steps} is fewer than the {need[k_max]} steps of nfe={k_max}; "
                f"pass grid_options={{'fine_steps': {need[k_max]}}} or more"
            )
    if ref_tol is None:
        from ..models.analytic import AnalyticDenoiser

        ref_tol = 1e-9 if isinstance(model, AnalyticDenoiser) else 1e-5
    g_key = _key(guidance)
    if g_key is not None:
        from ..models.guidance import Unconditional, classifier_free

        guided = getattr(model, "guided", None)
        model = guided(g_key) if callable(guided) else classifier_free(model, Unconditional(model), g_key)
    rows = max(n_fit, n_select)  # per-sample conditioning: the first n_select rows select, the first n_fit fit

    def per_sample(v: Any) -> bool:
        return isinstance(v, list | tuple) or (isinstance(v, Tensor) and v.ndim > 0)

    cond = dict(cond or {})
    for k, v in cond.items():
        if per_sample(v) and len(v) != rows:
            raise ValueError(
                f"cond[{k!r}] has {len(v)} rows; per-sample conditioning needs max(n_fit, n_select) = {rows}"
            )
    cond_sel = {k: v[:n_select] if per_sample(v) else v for k, v in cond.items()}
    cond_fit = {k: v[:n_fit] if per_sample(v) else v for k, v in cond.items()}

    # set B: the select noise and its reference end points (set A is drawn only for the learned grids)
    x_sel = calibration_noise(sch, shp, n_select, seed=select_seed)
    t_end = float(sch.t_zero) if sch.t_zero is not None else sch.t_min
    ref = reference_solution(model, sch, x_sel, sch.t_max, t_end, rtol=ref_tol, atol=ref_tol, cond=cond_sel).x
    dim = math.prod(shp)
    fit_seeds = {"seed": fit_seed, "start": 0, "n": n_fit}
    x_fit = calibration_noise(sch, shp, n_fit, seed=fit_seed) if learned else None
    teacher: Teacher | None = None  # set A's fine-grid ODE states: integrated once, shared by every learned grid

    def score(slv: Solver[Any], ts: Tensor) -> tuple[float, float]:
        return _errors(grid_errors(model, sch, slv, ts, x_sel, ref, cond=cond_sel), dim)

    meets = {nfe: [c for c in cfgs if _meets(get(**c), nfe, to_zero)] for nfe in nfes}
    total = sum(len(grid_names) * len(m) + (min(learned_top, len(m)) if learned else 0) for m in meets.values())
    total += len(nfes) * len(calibrated)
    tick, bar = _progress(progress, total)
    entries = []
    crit = 0 if criterion == "rms" else 1
    try:
        for nfe in nfes:
            scores: dict[str, tuple[float, float]] = {}
            choices: dict[str, tuple[dict[str, Any], str, Tensor]] = {}
            best_per_solver: dict[str, float] = {}
            for c in meets[nfe]:  # the solvers that meet this budget exactly
                slv = get(**c)
                steps = slv.steps_for_nfe(nfe, to_zero)
                for g in grid_names:
                    ts = make_grid(sch, g, steps, to_zero=to_zero)
                    lab = f"{candidate_label(c)} @ {g}"
                    scores[lab] = score(slv, ts)
                    choices[lab] = (c, g, ts)
                    best_per_solver[candidate_label(c)] = min(
                        best_per_solver.get(candidate_label(c), math.inf), scores[lab][crit]
                    )
                    tick(f"NFE {nfe}: {lab}")
            if not scores:
                raise ValueError(f"no candidate solver meets nfe={nfe} exactly")
            if learned:
                assert x_fit is not None
                top = sorted(best_per_solver, key=lambda s: best_per_solver[s])[:learned_top]
                if teacher is None:
                    teacher = teacher_states(
                        model, sch, x_fit, fine_steps, to_zero=to_zero, ref_tol=ref_tol, cond=cond_fit
                    )
                for c in cfgs:
                    if candidate_label(c) not in top:
                        continue
                    art = fit_grid(
                        model,
                        sch,
                        c,
                        nfe,
                        x_fit,
                        method=LEARNED,
                        to_zero=to_zero,
                        cond=cond_fit,
                        model_name=model_name,
                        seeds=fit_seeds,
                        ref_tol=ref_tol,
                        teacher=teacher,
                        **dict(grid_options or {}),
                    )
                    art.check_held_out(select_seed, 0, n_select)  # never select on the fitting noise
                    lab = f"{candidate_label(c)} @ {LEARNED}"
                    ts = art.grid()
                    scores[lab] = score(get(**c), ts)
                    choices[lab] = (c, LEARNED, ts)
                    tick(f"NFE {nfe}: {lab}")
            finite = [k for k in scores if math.isfinite(scores[k][crit])]
            if not finite:
                raise ValueError(f"every candidate diverged at nfe={nfe}")
            win = min(finite, key=lambda k: scores[k][crit])
            c, g, ts = choices[win]
            if "dc" in calibrated:  # DC-Solver ratios for the winner on its grid, fitted on set A, kept if better on B
                from .dc import fit_dc_ratios

                x_dc = x_fit if x_fit is not None else calibration_noise(sch, shp, n_fit, seed=fit_seed)
                ratios = fit_dc_ratios(
                    model, sch, get(**c), nfe, n_fit, ts=ts, shape=shp, ref_tol=ref_tol, noise=x_dc, cond=cond_fit
                )
                dc_cfg: dict[str, Any] = {"name": "dc_solver", "base": dict(c), "ratios": list(ratios.ratios)}
                lab = f"{candidate_label(dc_cfg)} @ {g}"
                scores[lab] = score(get(**dc_cfg), ts)
                choices[lab] = (dc_cfg, g, ts)
                tick(f"NFE {nfe}: {lab}")
                if math.isfinite(scores[lab][crit]) and scores[lab][crit] < scores[win][crit]:
                    win, (c, g, ts) = lab, choices[lab]
            entries.append(
                RecipeEntry(
                    nfe=nfe,
                    solver_config=dict(c),
                    ts=tuple(ts.tolist()),
                    grid_name=g,
                    rms=scores[win][0],
                    median=scores[win][1],
                    guidance=g_key,
                    scores=scores,
                )
            )
    finally:
        if bar is not None:
            bar.close()
    prov = {
        "reference": f"float64 Dormand-Prince, rtol = atol = {ref_tol:g}",
        "cpu_seconds": round(time.process_time() - t_cpu, 1),
        "wall_seconds": round(time.perf_counter() - t_wall, 1),
        "torch_threads": torch.get_num_threads(),
        "learned": {"method": LEARNED, "top": learned_top, **dict(grid_options or {})} if learned else None,
        "calibrated": list(calibrated),
        **dict(provenance or {}),
    }
    return Recipe(
        model=model_name,
        schedule=schedule_id(sch),
        entries=tuple(entries),
        seeds={"fit": fit_seeds, "select": {"seed": select_seed, "start": 0, "n": n_select}},
        criterion=criterion,
        cond=cond_note or ", ".join(sorted(cond)),
        provenance=prov,
    )


def _meets(solver: Solver[Any], nfe: int, to_zero: bool) -> bool:
    try:
        solver.steps_for_nfe(nfe, to_zero)
    except ValueError:
        return False
    return True
