"""Error-vs-NFE harness: dpmlab solvers and peer libraries from the same starting noise, against one
reference solution.

* Reference: the float64 Dormand–Prince PF-ODE solve (``reference_solution``) — exact up to its
  tolerance for analytic models; for networks the same integrator at a looser tolerance.
* Error: RMS over samples and dimensions of ``x_solver - x_ref`` at the grid's end (``sigma = 0``).
* Overhead: wall-clock time per step of the solver with a free model (``x0 = 0``), i.e. what the
  sampler itself costs, on the model's data shape.
* Peers: diffusers schedulers, run unchanged on the benchmarked model's own discrete schedule
  (``peer_scheduler``: its betas as ``trained_betas``, cut where a ``lambda_min`` truncates it) and
  from the reference's starting state, each with its default configuration and a tuned one; the NFE
  of a peer is counted, not assumed. Any other schedule with peers raises: both sides must solve
  the same ODE.
* Selection bias: ``held_out_best`` picks the best configuration per NFE on one run (one noise set)
  and reports its error from another run (another seed).
* ``auto_report`` (issue 17): a calibrated sampler (``dpmlab.calibrate.recipe``), the best fixed dpmlab
  solver on the default grid and the best diffusers configuration, the latter two chosen per NFE on a
  selection noise set, all three scored on one report noise set that shares no sample with any noise used
  for fitting or selection (counter-based ``NoiseSet``).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from .._utils import atomic_write
from ..api import DEFAULT_GRID, make_grid
from ..models.reference import reference_solution
from ..schedules import DiscreteVP, NoiseSchedule
from ..solvers.base import Problem, Solver, get, sample
from ..typing import DenoiserFn

__all__ = [
    "Entry",
    "Row",
    "BenchResult",
    "run_bench",
    "default_entries",
    "PEERS",
    "peer_rows",
    "peer_scheduler",
    "held_out_best",
    "NoiseSet",
    "AutoSampler",
    "AutoReport",
    "Cell",
    "references",
    "Selection",
    "select_configs",
    "auto_report",
]


@dataclass(frozen=True)
class Entry:
    """One dpmlab configuration to benchmark."""

    label: str
    solver: Solver[Any]
    grid: str = DEFAULT_GRID


@dataclass(frozen=True)
class Row:
    library: str  # "dpmlab" | "diffusers"
    label: str
    nfe: int
    rms: float
    overhead_ms: float = float("nan")  # per step, free model
    fd: float = float("nan")  # image models: a feature Frechet distance to the reference samples (e.g. FD-MNIST)
    median: float = float("nan")  # median over samples of each sample's RMS error (robust to a few mode switches)


@dataclass
class BenchResult:
    model: str
    n: int
    seed: int
    rows: list[Row] = field(default_factory=list)
    reference_evals: int = 0

    def best(self, library: str, nfe: int) -> Row | None:
        cands = [r for r in self.rows if r.library == library and r.nfe == nfe]
        return min(cands, key=lambda r: r.rms) if cands else None

    def table(self) -> list[list[str]]:
        nfes = sorted({r.nfe for r in self.rows})
        labels = list(dict.fromkeys((r.library, r.label) for r in self.rows))
        out = [["library", "solver", *[f"NFE {k}" for k in nfes]]]
        for lib, lab in labels:
            cells = {r.nfe: r.rms for r in self.rows if (r.library, r.label) == (lib, lab)}
            out.append([lib, lab, *[f"{cells[k]:.3e}" if k in cells else "—" for k in nfes]])
        return out

    def median_table(self) -> list[list[str]]:
        """Like ``table`` with the median per-sample RMS error: on mixtures the pooled RMS is carried by the
        few samples that change mode; the median shows the typical sample."""
        nfes = sorted({r.nfe for r in self.rows})
        labels = list(dict.fromkeys((r.library, r.label) for r in self.rows))
        out = [["library", "solver", *[f"NFE {k}" for k in nfes]]]
        for lib, lab in labels:
            cells = {r.nfe: r.median for r in self.rows if (r.library, r.label) == (lib, lab)}
            out.append([lib, lab, *[f"{cells[k]:.3e}" if k in cells else "—" for k in nfes]])
        return out

    def fd_table(self) -> list[list[str]] | None:
        """Like ``table`` with the feature Frechet distance, when the rows carry one."""
        if all(r.fd != r.fd for r in self.rows):  # all NaN
            return None
        nfes = sorted({r.nfe for r in self.rows})
        labels = list(dict.fromkeys((r.library, r.label) for r in self.rows))
        out = [["library", "solver", *[f"NFE {k}" for k in nfes]]]
        for lib, lab in labels:
            cells = {r.nfe: r.fd for r in self.rows if (r.library, r.label) == (lib, lab)}
            out.append([lib, lab, *[f"{cells[k]:.2f}" if k in cells else "—" for k in nfes]])
        return out

    def markdown(self) -> str:
        t = self.table()
        lines = ["| " + " | ".join(t[0]) + " |", "|" + "---|" * len(t[0])]
        lines += ["| " + " | ".join(r) + " |" for r in t[1:]]
        return "\n".join(lines)

    def write(self, stem: str | Path) -> list[Path]:
        """Write ``stem.csv``, ``stem.json`` and ``stem.png`` (error vs NFE, log-log)."""
        stem = Path(stem)
        paths = [stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".png")]
        with atomic_write(paths[0]) as tmp, open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(asdict(self.rows[0])))
            w.writeheader()
            w.writerows(asdict(r) for r in self.rows)
        with atomic_write(paths[1]) as tmp:
            meta = {"model": self.model, "n": self.n, "seed": self.seed, "reference_evals": self.reference_evals}
            tmp.write_text(json.dumps({**meta, "rows": [asdict(r) for r in self.rows]}, indent=1))
        self.plot(paths[2])
        return paths

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
        for lib, lab in dict.fromkeys((r.library, r.label) for r in self.rows):
            pts = sorted((r.nfe, r.rms) for r in self.rows if (r.library, r.label) == (lib, lab))
            style = "-o" if lib == "dpmlab" else "--x"
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], style, label=f"{lab} ({lib})", ms=3)
        ax.set_xlabel("NFE")
        ax.set_ylabel("RMS error vs reference")
        ax.set_title(f"{self.model}: error vs NFE (n={self.n})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)


def default_entries(names: Sequence[str] | None = None) -> list[Entry]:
    """dpmlab configurations: every deterministic registered solver with its defaults, or ``names``."""
    from ..solvers.base import available

    chosen = list(names) if names else [n for n in available() if not get(n).is_stochastic()]
    return [Entry(n, get(n)) for n in chosen]


def _exact_grid(e: Entry, schedule: NoiseSchedule, nfe: int) -> Tensor | None:
    """The entry's grid at exactly ``nfe`` evaluations (ending at ``sigma = 0`` where the schedule reaches it),
    or None when its solver cannot meet that budget exactly."""
    to_zero = schedule.t_zero is not None
    try:
        steps = e.solver.steps_for_nfe(nfe, to_zero)
    except ValueError:
        return None
    return make_grid(schedule, e.grid, steps, to_zero=to_zero)


def _errors(out: Tensor, ref: Tensor) -> tuple[float, float]:
    """Pooled RMS error and the median over samples of each sample's RMS error."""
    sq = (out.double() - ref.double()).pow(2).flatten(1).mean(1)
    return float(sq.mean().sqrt()), float(sq.sqrt().median())


def _overhead_ms(solver: Solver[Any], schedule: NoiseSchedule, ts: Tensor, shape: tuple[int, ...]) -> float:
    def free(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return torch.zeros_like(x)

    x = torch.randn(1, *shape)
    sample(Problem(free, schedule, check_finite=False), x, ts, solver)  # warm-up
    t0 = time.perf_counter()
    reps = 3
    for _ in range(reps):
        sample(Problem(free, schedule, check_finite=False), x, ts, solver)
    return (time.perf_counter() - t0) / reps / (len(ts) - 1) * 1e3


# --- peers -------------------------------------------------------------------------------------
# (label, diffusers class name, kwargs); the "default" rows use diffusers' defaults except for
# clip_sample (pixel clipping would corrupt an unbounded model).
PEERS: list[tuple[str, str, dict[str, Any]]] = [
    ("DDIM default", "DDIMScheduler", {"clip_sample": False}),
    ("DDIM trailing", "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}),
    ("DPM++2M default", "DPMSolverMultistepScheduler", {}),
    ("DPM++2M lu-lambdas", "DPMSolverMultistepScheduler", {"use_lu_lambdas": True}),
    ("DPM++3M", "DPMSolverMultistepScheduler", {"solver_order": 3}),
    (
        "DPM-Solver 2M (eps)",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"},
    ),
    ("DPM-Solver singlestep", "DPMSolverSinglestepScheduler", {}),
    ("UniPC bh2 default", "UniPCMultistepScheduler", {}),
    ("UniPC bh1 order 3", "UniPCMultistepScheduler", {"solver_type": "bh1", "solver_order": 3}),
    ("DEIS default", "DEISMultistepScheduler", {}),
    ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    ("Heun (k-diffusion style)", "HeunDiscreteScheduler", {}),
    ("Euler", "EulerDiscreteScheduler", {}),
]


def peer_schedule_config(schedule: NoiseSchedule) -> dict[str, Any]:
    """diffusers config entries that put a peer on ``schedule``: its betas as ``trained_betas``, up to
    the last training index inside ``t_max`` (a ``lambda_min`` truncation removes the top indices)."""
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(
            f"diffusers peers need a discrete VP schedule (DiscreteVP), got {schedule!r}; pass peers=False"
        )
    k = round(schedule.t_max * schedule.n_train)
    return {"num_train_timesteps": k, "trained_betas": schedule.betas[:k].tolist()}


def peer_scheduler(cls_name: str, kwargs: dict[str, Any], schedule: NoiseSchedule) -> Any:
    """The diffusers scheduler ``cls_name(**kwargs)`` on ``schedule`` (see ``peer_schedule_config``)."""
    import diffusers

    return getattr(diffusers, cls_name)(**peer_schedule_config(schedule), **kwargs)


def _steps_for(scheduler: Any, nfe: int) -> int | None:
    for n in range(1, nfe + 2):
        try:
            scheduler.set_timesteps(n)
        except Exception:  # noqa: BLE001 - some schedulers reject small n; try the next
            continue
        if len(scheduler.timesteps) == nfe:
            return n
    return None


def _final_t(scheduler: Any, schedule: DiscreteVP) -> float:
    """Where a diffusers scheduler's loop ends: sigma = 0 (t = 0) or training index 0 (t = 1/N)."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is not None:
        return 0.0 if float(sigmas[-1]) == 0.0 else float(schedule.index_to_t(0.0))
    return 0.0 if scheduler.config.get("set_alpha_to_one", False) else float(schedule.index_to_t(0.0))


def peer_rows(
    model: DenoiserFn,
    schedule: DiscreteVP,
    x: Tensor,
    refs: dict[float, Tensor],
    nfes: Sequence[int],
    peers: Sequence[tuple[str, str, dict[str, Any]]] = PEERS,
    quality: Callable[[Tensor, Tensor], float] | None = None,
) -> list[Row]:
    """Run each diffusers peer at each NFE it can meet exactly, on ``schedule`` from the state ``x``
    (the reference's start: unit noise times ``sigma(t_max)``); ``refs`` maps end time -> reference."""
    import warnings

    from diffusers.utils import logging as dlog

    from ..interop.diffusers import run_scheduler

    dlog.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")

    rows = []
    peer_schedule_config(schedule)  # refuses schedules a peer cannot share
    for label, cls_name, kwargs in peers:
        for nfe in nfes:
            sch = peer_scheduler(cls_name, kwargs, schedule)
            steps = _steps_for(sch, nfe)
            if steps is None:
                continue
            try:  # run_scheduler multiplies by init_noise_sigma, the VP scale 1 in the peer's variable
                run = run_scheduler(sch, model, schedule, x, steps)
            except Exception:  # noqa: BLE001 - a peer failing at some NFE is recorded as missing
                continue
            ref = refs[_final_t(sch, schedule)]
            if run.nfe == nfe:
                rms, med = _errors(run.x.double(), ref)
                fd = _quality(quality, run.x, ref)
                rows.append(Row("diffusers", label, nfe, rms, fd=fd, median=med))
    return rows


def _quality(quality: Callable[[Tensor, Tensor], float] | None, x: Tensor, ref: Tensor) -> float:
    if quality is None or not bool(torch.isfinite(x).all()):
        return float("nan")  # a diverged row (e.g. a peer returning NaN) has no distribution distance
    return float(quality(x.float(), ref.float()))


def run_bench(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    shape: tuple[int, ...],
    entries: Sequence[Entry],
    nfes: Sequence[int],
    *,
    n: int = 256,
    seed: int = 0,
    name: str = "model",
    peers: bool = True,
    ref_tol: float = 1e-10,
    progress: Callable[[str], None] | None = None,
    quality: Callable[[Tensor, Tensor], float] | None = None,
) -> BenchResult:
    """Benchmark ``entries`` (and diffusers peers on a ``DiscreteVP``) at each NFE in ``nfes``.
    ``quality(samples, reference_samples)`` adds a distribution distance per row (``Row.fd``)."""
    if peers:
        peer_schedule_config(schedule)  # a clear error, before any work, for a schedule peers cannot share
    x = torch.randn(n, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    t_start = schedule.t_max
    t_end = schedule.t_zero if schedule.t_zero is not None else schedule.t_min
    ref = reference_solution(
        model, schedule, x * float(schedule.sigma(t_start)), t_start, t_end, rtol=ref_tol, atol=ref_tol
    )
    result = BenchResult(model=name, n=n, seed=seed, reference_evals=ref.n_evals)
    for e in entries:
        for nfe in nfes:
            ts = _exact_grid(e, schedule, nfe)
            if ts is None:
                continue  # this solver cannot meet this budget exactly
            out = sample(Problem(model, schedule), x * float(schedule.sigma(ts[0])), ts, e.solver)
            rms, med = _errors(out, ref.x)
            fd = _quality(quality, out, ref.x)
            result.rows.append(Row("dpmlab", e.label, nfe, rms, _overhead_ms(e.solver, schedule, ts, shape), fd, med))
        if progress:
            progress(e.label)
    if peers and isinstance(schedule, DiscreteVP):
        try:
            import diffusers  # noqa: F401
        except ImportError:
            peers = False
        if peers:
            # the same trajectory, split at training index 0 where some schedulers stop
            t_idx0 = float(schedule.index_to_t(0.0))
            mid = reference_solution(
                model, schedule, x * float(schedule.sigma(t_start)), t_start, t_idx0, rtol=ref_tol, atol=ref_tol
            )
            end = reference_solution(model, schedule, mid.x, t_idx0, 0.0, rtol=ref_tol, atol=ref_tol)
            x0 = x * float(schedule.sigma(t_start))  # the reference's starting state
            result.rows.extend(peer_rows(model, schedule, x0, {0.0: end.x, t_idx0: mid.x}, nfes, quality=quality))
    return result


def held_out_best(select: BenchResult, report: BenchResult) -> BenchResult:
    """Per library and NFE, the configuration with the lowest error in ``select`` (one noise set),
    with its error taken from ``report`` (another noise set, e.g. another seed): the headline figure
    carries no selection bias. Rows are labelled ``best: <label>``."""
    if select.seed == report.seed:
        raise ValueError(f"select and report must use different noise sets; both have seed={select.seed}")
    out = BenchResult(model=report.model, n=report.n, seed=report.seed, reference_evals=report.reference_evals)
    for lib, nfe in dict.fromkeys((r.library, r.nfe) for r in select.rows):
        chosen = select.best(lib, nfe)
        assert chosen is not None
        same = [r for r in report.rows if (r.library, r.label, r.nfe) == (lib, chosen.label, nfe)]
        if not same:
            raise ValueError(f"the report run has no row {lib} / {chosen.label} at NFE {nfe}")
        r = same[0]
        out.rows.append(Row(lib, f"best: {r.label}", nfe, r.rms, r.overhead_ms, r.fd, r.median))
    return out


# --- held-out report: a calibrated sampler vs the best fixed dpmlab solver vs the best peer (issue 17) ----
@dataclass(frozen=True)
class NoiseSet:
    """Counter-based start noise: samples ``start .. start + n - 1`` of ``seed`` (``sigma(t_max) * z``, as
    ``calibrate.grid.calibration_noise`` and ``dpmlab.sample`` draw it). Two sets with different seeds, or
    disjoint index ranges, share no sample."""

    seed: int
    n: int
    start: int = 0

    def __post_init__(self) -> None:
        for k in ("seed", "n", "start"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "n" else 0):
                raise ValueError(f"NoiseSet.{k} must be a {'positive' if k == 'n' else 'non-negative'} int, got {v!r}")

    def overlaps(self, other: NoiseSet) -> bool:
        return self.seed == other.seed and self.start < other.start + other.n and other.start < self.start + self.n

    def draw(self, schedule: NoiseSchedule, shape: Sequence[int]) -> Tensor:
        """``(n, *shape)`` float64 start states at ``t_max``."""
        from ..calibrate.grid import calibration_noise

        return calibration_noise(schedule, shape, self.n, seed=self.seed, start=self.start)

    def to_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "n": self.n, "start": self.start}


class AutoSampler(Protocol):
    """What the report needs of a calibrated sampler (``dpmlab.calibrate.recipe.Recipe``): per NFE a
    solver and its grid (float64 times from ``t_max`` to ``sigma = 0``)."""

    def solver(self, nfe: int) -> Solver[Any]: ...

    def grid(self, nfe: int) -> Tensor: ...


class _Bound:
    """``model`` with fixed keyword conditioning (one row per sample of the set it is bound to)."""

    def __init__(self, model: DenoiserFn, cond: Mapping[str, Any] | None) -> None:
        self.model, self.cond = model, dict(cond or {})

    def __call__(self, x: Tensor, t: Tensor, **kw: Any) -> Tensor:
        return self.model(x, t, **self.cond, **kw)


def references(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    x: Tensor,
    *,
    ref_tol: float,
    cond: Mapping[str, Any] | None = None,
) -> dict[float, Tensor]:
    """The float64 reference of the start states ``x`` (at ``t_max``): at the end time (``sigma = 0`` where
    the schedule reaches it) and, on a ``DiscreteVP``, at training index 0 where some diffusers schedulers
    stop — the one trajectory, split there. ``cond``: the model's keyword conditioning (one row per sample)."""
    model = _Bound(model, cond) if cond else model
    t_end = schedule.t_zero if schedule.t_zero is not None else schedule.t_min
    if not isinstance(schedule, DiscreteVP) or schedule.t_zero is None:
        return {
            float(t_end): reference_solution(model, schedule, x, schedule.t_max, t_end, rtol=ref_tol, atol=ref_tol).x
        }
    t_idx0 = float(schedule.index_to_t(0.0))
    mid = reference_solution(model, schedule, x, schedule.t_max, t_idx0, rtol=ref_tol, atol=ref_tol)
    end = reference_solution(model, schedule, mid.x, t_idx0, float(t_end), rtol=ref_tol, atol=ref_tol)
    return {float(t_end): end.x, t_idx0: mid.x}


def _sq(out: Tensor, ref: Tensor) -> Tensor:
    """Per-sample mean squared error ``(n,)`` in float64 (``_errors`` aggregates it)."""
    return (out.double() - ref.double()).pow(2).flatten(1).mean(1)


@dataclass
class Cell:
    """One (contender, NFE) on a noise set: the configuration, its output and per-sample squared error."""

    contender: str  # "auto" | "dpmlab" | "diffusers"
    label: str
    nfe: int
    out: Tensor  # (n, *shape) at the end of the solve
    sq: Tensor  # (n,) per-sample mean squared error against the reference

    @property
    def rms(self) -> float:
        return float(self.sq.mean().sqrt())

    @property
    def median(self) -> float:
        return float(self.sq.sqrt().median())


def _dpmlab_cell(
    model: DenoiserFn,
    schedule: NoiseSchedule,
    x: Tensor,
    refs: Mapping[float, Tensor],
    solver: Solver[Any],
    ts: Tensor,
    nfe: int,
    contender: str,
    label: str,
) -> Cell:
    if abs(float(ts[0]) - schedule.t_max) > 1e-12:
        raise ValueError(f"{label}: the grid starts at t={float(ts[0])}, not at t_max={schedule.t_max}")
    end = float(ts[-1])
    if end not in refs:
        raise ValueError(f"{label}: the grid ends at t={end}; the reference is at {sorted(refs)}")
    problem = Problem(model, schedule)
    with torch.no_grad():
        out = sample(problem, x, ts, solver)
    if problem.nfe != nfe:
        raise RuntimeError(f"{label}: used {problem.nfe} evaluations, not nfe={nfe}")
    return Cell(contender, label, nfe, out, _sq(out, refs[end]))


def _peer_cell(
    model: DenoiserFn,
    schedule: DiscreteVP,
    x: Tensor,
    refs: Mapping[float, Tensor],
    peer: tuple[str, str, dict[str, Any]],
    nfe: int,
) -> Cell | None:
    """A diffusers peer at exactly ``nfe`` evaluations, or ``None`` where it cannot meet it (or fails)."""
    import warnings

    from diffusers.utils import logging as dlog

    from ..interop.diffusers import run_scheduler

    dlog.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module="diffusers")
    label, cls_name, kwargs = peer
    sch = peer_scheduler(cls_name, kwargs, schedule)
    steps = _steps_for(sch, nfe)
    if steps is None:
        return None
    try:
        with torch.no_grad():
            run = run_scheduler(sch, model, schedule, x, steps)
    except Exception:  # noqa: BLE001 - a peer failing at some NFE is recorded as missing
        return None
    if run.nfe != nfe:
        return None
    return Cell("diffusers", label, nfe, run.x, _sq(run.x, refs[_final_t(sch, schedule)]))


def _finite_best(cells: Sequence[Cell]) -> Cell | None:
    ok = [c for c in cells if bool(torch.isfinite(c.sq).all())]
    return min(ok, key=lambda c: c.rms) if ok else None


@dataclass
class AutoReport:
    """The three contenders per NFE on one report noise set, with what each was chosen on."""

    model: str
    noise: dict[str, NoiseSet]  # "report", "select" (dpmlab / peer choice), and the auto sampler's own sets
    cells: list[Cell]  # on the report set: contender in ("auto", "dpmlab", "diffusers")
    selection: list[Cell]  # every candidate on the select set (outputs dropped)
    reference: Tensor  # (n, *shape) the reference at sigma = 0 on the report set
    seconds: dict[str, float] = field(default_factory=dict)

    def cell(self, contender: str, nfe: int) -> Cell | None:
        return next((c for c in self.cells if c.contender == contender and c.nfe == nfe), None)

    def ratio(self, nfe: int, of: str = "auto", to: str = "diffusers") -> float:
        a, b = self.cell(of, nfe), self.cell(to, nfe)
        return a.rms / b.rms if a is not None and b is not None else float("nan")

    def ratio_ci(
        self, nfe: int, of: str = "auto", to: str = "diffusers", *, reps: int = 2000, seed: int = 0, level: float = 0.95
    ) -> tuple[float, float]:
        """Paired bootstrap interval of ``rms(of) / rms(to)`` over the report samples (both on the same noise)."""
        a, b = self.cell(of, nfe), self.cell(to, nfe)
        if a is None or b is None:
            return float("nan"), float("nan")
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, len(a.sq), (reps, len(a.sq)), generator=g)
        r = (a.sq[idx].mean(1) / b.sq[idx].mean(1)).sqrt()
        q = torch.quantile(r, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=r.dtype))
        return float(q[0]), float(q[1])

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "model": self.model,
                "contender": c.contender,
                "label": c.label,
                "nfe": c.nfe,
                "rms": c.rms,
                "median": c.median,
            }
            for c in self.cells
        ]


@dataclass
class Selection:
    """Every dpmlab entry and diffusers peer on a selection noise set (errors only), and the best per NFE."""

    noise: NoiseSet
    cells: list[Cell]
    seconds: dict[str, float] = field(default_factory=dict)

    def chosen(self) -> dict[tuple[str, int], str]:
        """``(library, nfe) -> label`` of the configuration with the lowest finite RMS error."""
        out = {}
        for lib, nfe in dict.fromkeys((c.contender, c.nfe) for c in self.cells):
            best = _finite_best([c for c in self.cells if c.contender == lib and c.nfe == nfe])
            if best is not None:
                out[(lib, nfe)] = best.label
        return out


def _set_runs(
    model: DenoiserFn,
    schedule: DiscreteVP,
    x: Tensor,
    refs: Mapping[float, Tensor],
    nfe: int,
    entries: Sequence[Entry],
    peers: Sequence[tuple[str, str, dict[str, Any]]],
) -> list[Cell]:
    """``entries`` (on their grids, ending at ``sigma = 0``) and ``peers`` at ``nfe`` from the start states ``x``."""
    cells = []
    for e in entries:
        ts = _exact_grid(e, schedule, nfe)
        if ts is None:
            continue  # this solver cannot meet this budget exactly
        cells.append(_dpmlab_cell(model, schedule, x, refs, e.solver, ts, nfe, "dpmlab", e.label))
    for p in peers:
        c = _peer_cell(model, schedule, x, refs, p, nfe)
        if c is not None:
            cells.append(c)
    return cells


def select_configs(
    model: DenoiserFn,
    schedule: DiscreteVP,
    shape: Sequence[int],
    nfes: Sequence[int],
    *,
    select: NoiseSet,
    entries: Sequence[Entry] | None = None,
    peers: Sequence[tuple[str, str, dict[str, Any]]] = PEERS,
    cond: Callable[[NoiseSet], Mapping[str, Any]] | None = None,
    ref_tol: float = 1e-10,
    name: str = "model",
    progress: Callable[[str], None] | None = None,
) -> Selection:
    """Run every entry (default: every deterministic solver on ``DEFAULT_GRID``) and peer at each NFE on the
    noise set ``select`` against its reference; ``Selection.chosen()`` is the best per library and NFE."""
    peer_schedule_config(schedule)  # refuses a schedule the peers cannot share
    entries = list(entries) if entries is not None else default_entries()
    bound = _Bound(model, cond(select) if cond else None)
    x = select.draw(schedule, shape)
    t0 = time.perf_counter()
    refs = references(bound, schedule, x, ref_tol=ref_tol)
    seconds = {"selection reference": time.perf_counter() - t0}
    t0 = time.perf_counter()
    cells = []
    for nfe in nfes:
        for c in _set_runs(bound, schedule, x, refs, nfe, entries, peers):
            c.out = c.out[:0]  # keep the errors, not the samples
            cells.append(c)
        if progress:
            progress(f"{name} selection (seed {select.seed}): NFE {nfe}")
    seconds["selection runs"] = time.perf_counter() - t0
    return Selection(select, cells, seconds)


def auto_report(
    model: DenoiserFn,
    schedule: DiscreteVP,
    shape: Sequence[int],
    auto: AutoSampler,
    nfes: Sequence[int],
    *,
    report: NoiseSet,
    select: NoiseSet | Selection,
    used: Mapping[str, NoiseSet] | None = None,
    entries: Sequence[Entry] | None = None,
    peers: Sequence[tuple[str, str, dict[str, Any]]] = PEERS,
    cond: Callable[[NoiseSet], Mapping[str, Any]] | None = None,
    ref_tol: float = 1e-10,
    report_refs: Mapping[float, Tensor] | None = None,
    auto_nfes: Sequence[int] | None = None,
    name: str = "model",
    progress: Callable[[str], None] | None = None,
) -> AutoReport:
    """Per NFE, on the noise set ``report`` against its float64 reference (``sigma = 0``):

    * ``auto``: ``auto.solver(nfe)`` on ``auto.grid(nfe)`` (a calibrated sampler, fitted / selected on the
      noise sets ``used``, e.g. ``{"fit": ..., "select": ...}``);
    * ``dpmlab``: of ``entries`` (default: every deterministic solver on ``DEFAULT_GRID``, ending at
      ``sigma = 0``), the one with the lowest RMS error on ``select``;
    * ``diffusers``: of ``peers``, on ``schedule`` from the same start states, the one lowest on ``select``.

    ``select``: the selection noise set, or a ``select_configs`` result already run on it. ``report`` must
    share no sample with it or with any set in ``used`` (``ValueError``); only the chosen configurations run
    on ``report``. ``cond(noise_set)`` gives the model's keyword conditioning for a set (one row per sample,
    e.g. ``{"label": labels}``). ``report_refs``: the ``references`` of the report set, if already computed.
    ``auto_nfes``: the NFEs ``auto`` covers (default: all of ``nfes``); the others get no ``auto`` cell."""
    sel_noise = select.noise if isinstance(select, Selection) else select
    used = dict(used or {})
    for k, s in {"select": sel_noise, **used}.items():
        if report.overlaps(s):
            raise ValueError(f"the report noise {report.to_dict()} overlaps the {k} noise {s.to_dict()}")
    peer_schedule_config(schedule)  # refuses a schedule the peers cannot share
    entries = list(entries) if entries is not None else default_entries()
    t_end = 0.0 if schedule.t_zero is not None else float(schedule.t_min)
    auto_nfes = list(nfes if auto_nfes is None else auto_nfes)
    if not set(auto_nfes) <= set(nfes):
        raise ValueError(f"auto_nfes {auto_nfes} must be a subset of nfes {list(nfes)}")
    for nfe in auto_nfes:  # the calibrated sampler's grids, checked before any work
        ts, slv = auto.grid(nfe), auto.solver(nfe)
        if abs(float(ts[0]) - schedule.t_max) > 1e-12 or float(ts[-1]) != t_end:
            raise ValueError(
                f"auto grid at NFE {nfe} runs t={float(ts[0])} -> {float(ts[-1])}, not at t_max={schedule.t_max} "
                f"-> {t_end}"
            )
        if slv.nfe(ts, schedule) != nfe:
            raise ValueError(f"auto at NFE {nfe}: {slv.name} on its grid costs {slv.nfe(ts, schedule)} evaluations")
    if not isinstance(select, Selection):
        select = select_configs(
            model,
            schedule,
            shape,
            nfes,
            select=select,
            entries=entries,
            peers=peers,
            cond=cond,
            ref_tol=ref_tol,
            name=name,
            progress=progress,
        )
    chosen = select.chosen()
    seconds = dict(select.seconds)
    bound = _Bound(model, cond(report) if cond else None)
    x = report.draw(schedule, shape)
    t0 = time.perf_counter()
    if report_refs is None:
        refs = references(bound, schedule, x, ref_tol=ref_tol)
        seconds["report reference"] = time.perf_counter() - t0
    else:
        refs = dict(report_refs)
        if any(tuple(r.shape) != tuple(x.shape) for r in refs.values()) or t_end not in refs:
            raise ValueError(f"report_refs must map end times (incl. {t_end}) to tensors of shape {tuple(x.shape)}")
    t0 = time.perf_counter()
    cells: list[Cell] = []
    for nfe in nfes:
        ent = [e for e in entries if chosen.get(("dpmlab", nfe)) == e.label]
        prs = [p for p in peers if chosen.get(("diffusers", nfe)) == p[0]]
        cells += _set_runs(bound, schedule, x, refs, nfe, ent, prs)
        if nfe in auto_nfes:
            slv = auto.solver(nfe)
            cells.append(_dpmlab_cell(bound, schedule, x, refs, slv, auto.grid(nfe), nfe, "auto", _describe(slv)))
        if progress:
            progress(f"{name} report (seed {report.seed}): NFE {nfe}")
    seconds["report runs"] = time.perf_counter() - t0
    noise = {"report": report, "select": select.noise, **used}
    return AutoReport(name, noise, cells, select.cells, refs[t_end], seconds)


def _describe(solver: Solver[Any]) -> str:
    """``name(option=value, ...)`` with the options that differ from the solver's defaults."""
    import dataclasses

    opts = []
    for f in dataclasses.fields(solver):
        v = getattr(solver, f.name)
        if f.default is not dataclasses.MISSING and v == f.default:
            continue
        text = v.name if isinstance(v, Solver) else type(v).__name__ if isinstance(v, Tensor) else repr(v)
        opts.append(f"{f.name}={text if len(text) < 40 else type(v).__name__}")
    return f"{solver.name}({', '.join(opts)})" if opts else solver.name
