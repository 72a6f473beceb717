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
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    to_zero = schedule.t_zero is not None
    for e in entries:
        for nfe in nfes:
            try:
                steps = e.solver.steps_for_nfe(nfe, to_zero)
            except ValueError:
                continue  # this solver cannot meet this budget exactly
            ts = make_grid(schedule, e.grid, steps, to_zero=to_zero)
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
