"""S³ — solver schedule search over USF plans (Liu, Ning, Yang & Wang, "A Unified Sampling Framework for
Solver Searching of Diffusion Probabilistic Models", ICLR 2024, arXiv 2312.07243, Sec. 4).

Evolutionary search at a fixed NFE. A candidate is a ``Plan`` with its timesteps; the population starts
from fixed solvers (``Preset``: DPM-Solver++ 2M/3M, UniPC-2 bh1/bh2, UniPC-3) on several grids, keeps
an elite, draws parents from the better half, crosses them per step (uniform crossover, as the
authors) and mutates each step's decisions with probability ``p_mutate`` (prediction type; Taylor order
with the authors' prior {1: .2, 2: .4, 3: .3, 4: .1}; estimate sizes; first-derivative relaxation;
corrector none/pseudo and its order; AFS) and the timesteps (jitter of the interior ``lam`` points).
Plans are repaired to stay feasible and at the target NFE.

The decision space of the authors' released schedules is searched too: the "linear" relaxation
``c_1 = 1 + c h`` with its coefficient (drawn from N(0, 0.25^2) — the released values lie in [-0.03, 0.5] —
and jittered), every AFS kind ("zero_x0"; "eps_x"; "mean_x0" when ``afs_mean=`` gives the dataset mean),
and DPM-Solver-v3 prediction steps when ``ems=`` gives the model's EMS (without one the v3 prediction is
not proposed: it cannot run).

Fitness: RMS error at the grid's end against the float64 reference solution on ``n_samples`` seeded
starting noises (the authors: FID of 1000 samples). The optional learned predictor (the paper's
performance predictor; not in the public code) is a ridge regression of log-fitness on one-hot plan
features: each generation proposes ``proposals`` times more offspring and evaluates only the best-
predicted ones. Not searched (supported by USF): implicit correctors and a corrector on the last step
(they change the step count at fixed NFE), skip coefficients (model surgery).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..models.reference import reference_solution
from ..schedules import NoiseSchedule
from ..solvers.base import Problem, sample
from ..solvers.dpm_solver_v3 import EMS
from ..solvers.usf import AFS, MAX_ORDER, USF, Corrector, Plan, Prediction, Preset, Relaxation, Step, Taylor
from ..timesteps import make_grid
from ..typing import DenoiserFn

__all__ = ["S3Result", "fit_s3_plan", "initial_plans"]

ORDER_PRIOR = {1: 0.2, 2: 0.4, 3: 0.3, 4: 0.1}  # the authors' mutation prior on Taylor orders
RELAXATIONS = (
    Relaxation.NONE,
    Relaxation.DPM_SOLVER_2,
    Relaxation.UNIPC_BH1,
    Relaxation.HALF_EXP,
    Relaxation.NEG_HALF_EXP,
    Relaxation.LINEAR,
)
LINEAR_SCALE = 0.25  # std of a new linear-relaxation coefficient (the released ones: -0.021 .. 0.5)
GRIDS = ("uniform_lambda", "uniform_time", "quadratic_time")


@dataclass(frozen=True)
class S3Result:
    plan: Plan  # the best plan found (carries its timesteps and the model name)
    fitness: float  # its RMS error on the search samples
    baselines: dict[str, float]  # fitness of every initial preset/grid
    history: tuple[float, ...]  # best fitness after each generation
    evaluations: int  # fitness evaluations made
    selection: float | None = None  # select_n > 0: the plan's RMS error on the selection noise (a second set)
    held_out: float | None = None  # report_n > 0: its RMS error on a third set, used for nothing else


def initial_plans(schedule: NoiseSchedule, nfe: int, to_zero: bool, model: str = "") -> dict[str, Plan]:
    """The fixed solvers the search starts from, as plans with timesteps, by label."""
    presets = {
        "dpm_solver_pp_2m": Preset.dpm_solver_pp(2),
        "dpm_solver_pp_3m": Preset.dpm_solver_pp(3),
        "unipc_bh1": Preset.unipc(2, "bh1"),
        "unipc_bh2": Preset.unipc(2, "bh2"),
        "unipc_3": Preset.unipc(3),
    }
    out = {}
    for g in GRIDS:
        ts = tuple(make_grid(schedule, g, nfe, to_zero=to_zero).tolist())
        for name, p in presets.items():
            out[f"{name}@{g}"] = dataclasses.replace(p.expand(nfe, to_zero), ts=ts, model=model)
    return out


def _repair(steps: Sequence[Step], to_zero: bool) -> tuple[Step, ...]:
    """Clamp every decision into the feasible set; no corrector on the last step (fixed NFE)."""
    out = []
    for i, s in enumerate(steps):
        last = i == len(steps) - 1
        if last and to_zero:  # first order, data or noise (v3 is undefined at sigma = 0)
            out.append(Step(Prediction.DATA if s.prediction is Prediction.V3 else s.prediction))
            continue
        k = min(s.predictor.order, i + 1, MAX_ORDER)
        pts = tuple(min(max(e, j), i) for j, e in enumerate((s.predictor.points + (k - 1,) * k)[: k - 1], 1))
        pred = _relaxed(Taylor(k, pts), s.predictor)
        if s.correction is None or last:
            out.append(Step(s.prediction, pred))
            continue
        kc = min(max(s.correction.order, 2), i + 2, MAX_ORDER)
        cp = tuple(min(max(e, j), i + 1) for j, e in enumerate((s.correction.points + (kc - 1,) * kc)[: kc - 1], 1))
        out.append(Step(s.prediction, pred, Corrector.PSEUDO, _relaxed(Taylor(kc, cp), s.correction)))
    return tuple(out)


def _relaxed(tay: Taylor, like: Taylor) -> Taylor:
    """``tay`` with ``like``'s relaxation (and linear coefficient) where it has a first derivative."""
    if tay.order < 2 or like.relaxation is Relaxation.NONE:
        return tay
    return dataclasses.replace(tay, relaxation=like.relaxation, coefficient=like.coefficient)


class _Search:
    def __init__(
        self,
        schedule: NoiseSchedule,
        nfe: int,
        to_zero: bool,
        rng: random.Random,
        p: float,
        *,
        v3: bool = False,
        afs_mean: tuple[float, ...] | None = None,
    ) -> None:
        self.schedule, self.nfe, self.to_zero, self.rng, self.p = schedule, nfe, to_zero, rng, p
        self.predictions = [Prediction.DATA, Prediction.NOISE] + ([Prediction.V3] if v3 else [])
        self.afs_kinds = [AFS.ZERO_X0, AFS.EPS_X] + ([AFS.MEAN_X0] if afs_mean is not None else [])
        self.afs_mean = afs_mean
        self.lam_lo = float(schedule.lam(torch.tensor(schedule.t_max, dtype=torch.float64)))
        self.lam_hi = float(schedule.lam(torch.tensor(schedule.t_min, dtype=torch.float64)))

    def _lams(self, ts: tuple[float, ...]) -> list[float]:
        """``lam`` of the interior points ``ts[1:-1]`` (the ends stay fixed)."""
        return self.schedule.lam(torch.tensor(ts[1:-1], dtype=torch.float64)).tolist() if len(ts) > 2 else []

    def _times(self, lams: list[float], t_first: float, t_last: float) -> tuple[float, ...] | None:
        """A grid from sorted, clipped interior ``lams``; None if the points collide."""
        lams = sorted(min(max(v, self.lam_lo + 1e-6), self.lam_hi) for v in lams)
        inner = self.schedule.t_of_lambda(torch.tensor(lams, dtype=torch.float64)).tolist() if lams else []
        new = (t_first, *inner, t_last)
        return new if all(b < a for a, b in zip(new, new[1:])) else None

    def mutate(self, plan: Plan) -> Plan:
        rng, steps, ts, afs = self.rng, list(plan.steps), plan.ts, plan.afs
        assert ts is not None
        if rng.random() < self.p / 2:  # AFS toggle: one step more (or less) at the same NFE
            lams = self._lams(ts)
            if afs is AFS.NONE:
                lams = [0.5 * (self.lam_lo + (lams[0] if lams else self.lam_hi)), *lams]
                afs2 = rng.choice(self.afs_kinds)
                new, steps2 = self._times(lams, ts[0], ts[-1]), [steps[0], *steps]
            elif rng.random() < 0.5 and len(self.afs_kinds) > 1:  # another kind of analytical first step
                new, steps2, afs2 = ts, steps, rng.choice([a for a in self.afs_kinds if a is not afs])
            else:
                new, steps2, afs2 = (ts[0], *ts[2:]), [steps[0], *steps[2:]], AFS.NONE
            if new is not None and len(steps2) >= 1 and len(new) == len(steps2) + 1:
                ts, steps, afs = new, steps2, afs2
        for i, s in enumerate(steps):
            if rng.random() >= self.p:
                continue
            what = rng.choice(("prediction", "order", "points", "relaxation", "corrector"))
            if what == "prediction":
                s = dataclasses.replace(s, prediction=rng.choice(self.predictions))
            elif what == "order":
                k = rng.choices(list(ORDER_PRIOR), weights=list(ORDER_PRIOR.values()))[0]
                s = dataclasses.replace(s, predictor=Taylor.full(min(k, i + 1, MAX_ORDER)))
            elif what == "points" and s.predictor.order > 1:
                pts = tuple(rng.randint(j, max(j, min(i, MAX_ORDER))) for j in range(1, s.predictor.order))
                s = dataclasses.replace(s, predictor=dataclasses.replace(s.predictor, points=pts))
            elif what == "relaxation" and s.predictor.order >= 2:
                old = s.predictor
                if old.relaxation is Relaxation.LINEAR and rng.random() < 0.5:  # jitter the coefficient
                    tay = dataclasses.replace(old, coefficient=old.coefficient + rng.gauss(0.0, LINEAR_SCALE / 4))
                else:
                    rel = rng.choice(RELAXATIONS)
                    coef = rng.gauss(0.0, LINEAR_SCALE) if rel is Relaxation.LINEAR else 0.0
                    tay = dataclasses.replace(old, relaxation=rel, coefficient=coef)
                s = dataclasses.replace(s, predictor=tay)
            elif what == "corrector":  # the authors' rule: the corrector's order is the predictor's + 1
                kc = min(s.predictor.order + 1, MAX_ORDER)
                s = Step(
                    s.prediction,
                    s.predictor,
                    *((Corrector.NONE, None) if s.correction else (Corrector.PSEUDO, Taylor.full(kc))),
                )
            steps[i] = s
        if rng.random() < self.p:  # jitter the interior log-SNR points
            gap = (self.lam_hi - self.lam_lo) / len(steps)
            ts = self._times([v + rng.gauss(0.0, 0.3 * gap) for v in self._lams(ts)], ts[0], ts[-1]) or ts
        return self._plan(steps, ts, afs, plan.model)

    def _plan(self, steps: Sequence[Step], ts: tuple[float, ...] | None, afs: AFS, model: str) -> Plan:
        return Plan(_repair(steps, self.to_zero), ts, afs, model, self.afs_mean if afs is AFS.MEAN_X0 else None)

    def crossover(self, a: Plan, b: Plan) -> Plan:
        if len(a.steps) != len(b.steps):
            return a
        steps = [sa if self.rng.random() < 0.5 else sb for sa, sb in zip(a.steps, b.steps)]
        ts = a.ts if self.rng.random() < 0.5 else b.ts
        return self._plan(steps, ts, a.afs, a.model)


def _features(plan: Plan, width: int) -> list[float]:
    """One-hot decisions per step, padded to ``width`` steps, plus AFS (the predictor's input)."""
    f: list[float] = [float(plan.afs is a) for a in AFS if a is not AFS.NONE]
    for i in range(width):
        s = plan.steps[i] if i < len(plan.steps) else None
        f += [float(s is not None and s.prediction is p) for p in (Prediction.DATA, Prediction.V3)]
        f += [float(s is not None and s.predictor.order == k) for k in range(1, MAX_ORDER + 1)]
        f += [float(s is not None and s.predictor.relaxation is r) for r in RELAXATIONS]
        f += [float(s is not None and s.correction is not None and s.correction.order == k) for k in range(2, 5)]
    return f


def _ridge(xs: list[list[float]], ys: list[float], lam: float = 1e-2) -> Callable[[list[float]], float]:
    a = torch.tensor(xs, dtype=torch.float64)
    a = torch.cat([a, torch.ones(len(xs), 1, dtype=torch.float64)], 1)
    y = torch.tensor(ys, dtype=torch.float64)
    w = torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1], dtype=torch.float64), a.T @ y)
    return lambda f: float(torch.tensor([*f, 1.0], dtype=torch.float64) @ w)


def fit_s3_plan(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    nfe: int,
    *,
    n_samples: int = 256,
    seed: int = 0,
    population: int = 16,
    generations: int = 10,
    elite: int = 4,
    p_mutate: float = 0.3,
    predictor: bool = False,
    proposals: int = 4,
    to_zero: bool = True,
    shape: tuple[int, ...] | None = None,
    model_name: str = "",
    search_seed: int = 0,
    initial: dict[str, Plan] | None = None,
    ref_tol: float = 1e-10,
    progress: bool = False,
    select_n: int = 0,
    report_n: int = 0,
    ems: EMS | None = None,
    afs_mean: Tensor | None = None,
) -> S3Result:
    """Search a USF plan of exactly ``nfe`` evaluations for ``model`` (see module docstring). The search
    scores candidates on ``n_samples`` noises drawn from ``seed``; with ``select_n > 0`` the returned plan is
    the best of the final elite and the initial presets on ``select_n`` *other* noises (a searched plan
    over-fits its search noise), and ``report_n > 0`` measures the returned plan on a third set used for
    nothing else. The three sets are disjoint draws (generators ``seed``, ``seed + 1``, ``seed + 2``).
    ``ems``: the model's DPM-Solver-v3 statistics (``calibrate.fit_ems``) — the search then also proposes v3
    prediction steps; ``afs_mean``: one sample's dataset-mean x0 — the search then also proposes AFS "mean_x0"."""
    shape = shape or getattr(model, "data_shape", None)
    if shape is None:
        raise ValueError("pass shape=: the model has no data_shape")
    if not 1 <= elite < population:
        raise ValueError(f"need 1 <= elite < population, got elite={elite}, population={population}")
    for name, v in (("n_samples", n_samples), ("select_n", select_n), ("report_n", report_n)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "n_samples" else 0):
            raise ValueError(f"{name} must be a whole number >= {1 if name == 'n_samples' else 0}, got {v!r}")
    if ems is not None and not isinstance(ems, EMS):
        raise ValueError(f"ems must be a dpmlab EMS (calibrate.fit_ems) or None, got {type(ems).__name__}")
    mean = None
    if afs_mean is not None:
        mean = tuple(torch.as_tensor(afs_mean, dtype=torch.float64).flatten().tolist())
        if len(mean) != math.prod(shape):
            want = math.prod(shape)
            raise ValueError(f"afs_mean has {len(mean)} values, one sample of shape {tuple(shape)} has {want}")
    t0 = schedule.t_max
    t1 = schedule.t_zero if to_zero and schedule.t_zero is not None else schedule.t_min

    def noise_set(n: int, k: int) -> tuple[Tensor, Tensor]:  # (start noise, reference end point)
        x = torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + k))
        x = x * float(schedule.sigma(torch.tensor(t0, dtype=torch.float64)))
        return x, reference_solution(model, schedule, x, t0, t1, rtol=ref_tol, atol=ref_tol).x

    def error(plan: Plan, xr: tuple[Tensor, Tensor]) -> float:
        try:
            out = sample(Problem(model, schedule), xr[0], plan.grid(), USF(plan, ems=ems))
            err = float((out - xr[1]).pow(2).mean().sqrt())
        except (FloatingPointError, ValueError, RuntimeError):
            err = math.inf
        return err if math.isfinite(err) else math.inf

    search_set = noise_set(n_samples, 0)
    seen: dict[Plan, float] = {}

    def fitness(plan: Plan) -> float:
        if plan not in seen:
            seen[plan] = error(plan, search_set)
        return seen[plan]

    init = initial or initial_plans(schedule, nfe, to_zero, model_name)
    if any(p.nfe != nfe for p in init.values()):
        raise ValueError(f"every initial plan must use nfe={nfe}")
    baselines = {k: fitness(p) for k, p in init.items()}
    search = _Search(schedule, nfe, to_zero, random.Random(search_seed), p_mutate, v3=ems is not None, afs_mean=mean)
    pop = sorted(init.values(), key=fitness)[:population]
    while len(pop) < population:
        pop.append(search.mutate(search.rng.choice(pop)))
    width = nfe + 1
    history = []
    from tqdm import tqdm

    for _ in tqdm(range(generations), desc="S3 search", unit="generation", disable=not progress, leave=False):
        pop = sorted(pop, key=fitness)
        parents = pop[: max(2, population // 2)]
        n_new = population - elite
        kids = [
            search.mutate(search.crossover(*search.rng.sample(parents, 2)))
            for _ in range(n_new * (proposals if predictor else 1))
        ]
        if predictor and len(seen) >= 8:
            finite = [(p, f) for p, f in seen.items() if math.isfinite(f)]
            guess = _ridge([_features(p, width) for p, _ in finite], [math.log(f) for _, f in finite])
            kids = sorted(kids, key=lambda p: guess(_features(p, width)))
        pop = pop[:elite] + kids[:n_new]
        history.append(min(fitness(p) for p in pop))
    best = min(pop, key=fitness)
    selection = held_out = None
    if select_n:  # choose on a second noise set among the elite and the presets
        select_set = noise_set(select_n, 1)
        candidates = list(dict.fromkeys(sorted(pop, key=fitness)[:elite] + list(init.values())))
        scored = {p: error(p, select_set) for p in candidates}
        best = min(candidates, key=lambda p: scored[p])
        selection = scored[best]
    if report_n:
        held_out = error(best, noise_set(report_n, 2))
    return S3Result(best, fitness(best), baselines, tuple(history), len(seen), selection, held_out)
