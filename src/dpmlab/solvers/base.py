"""Solver core: ``Problem`` (what is solved), ``Solver`` (how it is stepped), ``sample``/``iterate``
(the loop over a grid ``ts`` — where the steps fall), the registry, and seeded noise.

A solver is a small frozen dataclass with an explicit ``step(problem, x, ts, i, state) -> (x, state)``
that moves ``x`` from ``ts[i]`` to ``ts[i + 1]``. The solver calls the model through
``problem.denoise`` (which counts evaluations and checks the output); all state is explicit.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import Tensor

from .._utils import counter_normal, f64, state_dtype
from ..schedules import NoiseSchedule
from ..timesteps import check_grid
from ..typing import DenoiserFn, NoiseSampler

__all__ = [
    "Problem",
    "Solver",
    "StepInfo",
    "SeededNoise",
    "sample",
    "iterate",
    "register",
    "get",
    "available",
    "solver_class",
    "ends_at_zero",
    "Wrapper",
    "FirstEvaluation",
]

S = TypeVar("S")


@dataclass
class _Counter:
    n: int = 0


class SeededNoise:
    """Per-sample seeded Gaussian noise: row ``b`` of every draw depends only on
    ``(seed, indices[b], stream)`` — not on batch size or order (counter-based, see ``counter_normal``)."""

    def __init__(self, seed: int, indices: Tensor | range | list[int]) -> None:
        self.seed = int(seed)
        self.indices = torch.as_tensor(list(indices) if isinstance(indices, range) else indices, dtype=torch.int64)

    def __call__(self, stream: int, like: Tensor) -> Tensor:
        if like.shape[0] != self.indices.shape[0]:
            raise ValueError(f"noise for {like.shape[0]} samples requested, sampler has {self.indices.shape[0]}")
        z = counter_normal(self.seed, self.indices, stream, like.shape[1:], dtype=torch.float64, device=like.device)
        return z.to(dtype=like.dtype)  # drawn where the sample lives (the counter makes it device-independent)


@dataclass(frozen=True)
class Problem:
    """What is solved: a denoiser ``x0 = model(x, t, **cond)`` on a schedule, with an optional noise
    sampler for stochastic solvers (default ``torch.randn_like``)."""

    model: DenoiserFn
    schedule: NoiseSchedule
    noise: NoiseSampler | None = None
    cond: Mapping[str, Any] = field(default_factory=dict)
    check_finite: bool = True
    counter: _Counter = field(default_factory=_Counter, compare=False, repr=False)

    @property
    def nfe(self) -> int:
        """Model evaluations made through ``denoise`` so far."""
        return self.counter.n

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        """One network evaluation: ``x0`` at ``(x, t)``; ``t`` scalar or per-sample ``(B,)``."""
        t = f64(t)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        self.counter.n += 1
        out = self.model(x, t, **self.cond)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(
                f"model returned {got} for x of shape {tuple(x.shape)}; it must return x0 of the same shape"
            )
        if self.check_finite and not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise FloatingPointError(
                f"model returned {bad} non-finite values at t={float(t[0]):.6g} (evaluation {self.counter.n})"
            )
        return out.to(x.dtype)

    def randn(self, i: int, like: Tensor, sub: int = 0) -> Tensor:
        """Noise for step ``i`` (``sub`` separates several draws within one step)."""
        if not 0 <= sub < 16:
            raise ValueError(f"sub-stream must be in [0, 16), got {sub}")
        if self.noise is None:
            return torch.randn_like(like)
        return self.noise(1 + 16 * i + sub, like)


@dataclass(frozen=True)
class FirstEvaluation(Problem):
    """A wrapper's view of the problem for one step of its base solver (UniC, Time-Shift, dynamic
    compensation): the base's first model evaluation, which must be at ``(x, t0)``, is answered by
    ``answer(x, evaluate)`` — ``evaluate()`` makes the real call, so an answer that does not call it
    costs no evaluation; later calls pass through. ``answers`` records ``(x, x0)`` of that first call."""

    parent: Problem | None = None
    t0: float = 0.0
    answer: Callable[[Tensor, Callable[[], Tensor]], Tensor] | None = None
    who: str = "this wrapper"
    answers: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @classmethod
    def of(
        cls, problem: Problem, t0: float, answer: Callable[[Tensor, Callable[[], Tensor]], Tensor], who: str
    ) -> FirstEvaluation:
        fields = {f.name: getattr(problem, f.name) for f in dataclasses.fields(Problem)}
        return cls(**fields, parent=problem, t0=float(t0), answer=answer, who=who)

    def denoise(self, x: Tensor, t: Tensor | float) -> Tensor:
        assert self.parent is not None and self.answer is not None
        if self.answers:
            return self.parent.denoise(x, t)
        t_all = f64(t).reshape(-1)
        if not bool((t_all == self.t0).all()):
            raise ValueError(
                f"{self.who} needs a base solver whose step first evaluates the model at (x, t_i), "
                f"t_i={self.t0:.6g}; its first call was at t={float(t_all[0]):.6g}"
            )
        parent = self.parent
        x0 = self.answer(x, lambda: parent.denoise(x, t))
        self.answers.append((x, x0))
        return x0


@dataclass(frozen=True)
class StepInfo:
    i: int  # step index: ts[i] -> ts[i + 1]
    t: float
    t_next: float
    x: Tensor  # state at t_next
    nfe: int  # evaluations so far


def ends_at_zero(schedule: NoiseSchedule, ts: Tensor) -> bool:
    """Whether the grid's last point is a ``sigma = 0`` time."""
    return bool(schedule.sigma(f64(ts[-1])) == 0)


@dataclass(frozen=True)
class Solver(ABC, Generic[S]):
    """Base of every solver. Subclasses are frozen dataclasses whose fields are the paper's options."""

    name: ClassVar[str] = ""
    evals_per_step: ClassVar[int] = 1
    stochastic: ClassVar[bool] = False
    paper: ClassVar[str] = ""
    # options under which the registry-driven convergence test measures ``order`` (e.g. switch off
    # lower-order final steps); subclasses override.
    order_test_options: ClassVar[dict[str, Any]] = {}

    @property
    def order(self) -> int:
        """Convergence order of the deterministic solver. Defined one way per kind of solver: a dataclass
        field where the paper makes it the option (``order: int = 3``: DPM-Solver-k, DEIS, DPM-Solver-v3),
        else a read-only property computed from the options (DDIM: 1, UniPC: p + 1, a wrapper: its base's)."""
        return 1

    def is_stochastic(self) -> bool:
        return self.stochastic

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> S:
        """Initial solver state (history buffers etc.); ``None`` for one-step solvers."""
        return None  # type: ignore[return-value]

    @abstractmethod
    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: S) -> tuple[Tensor, S]:
        """Advance ``x`` from ``ts[i]`` to ``ts[i + 1]``."""

    def nfe_for_steps(self, steps: int, to_zero: bool) -> int:
        """Honest number of model evaluations for ``steps`` steps (``to_zero``: the grid ends at sigma = 0)."""
        return self.evals_per_step * steps

    def pending_output(self, state: S) -> Tensor | None:
        """The model output the next ``step`` will REUSE instead of evaluating the model at ``(x_i, t_i)``
        (a predictor-corrector's corrector evaluation), in the solver's own output form; ``None`` when the
        next step evaluates the model itself (then a wrapper reaches that output through the problem's
        ``denoise``). Part of the wrapper protocol, with ``with_pending_output``."""
        return None

    def with_pending_output(self, state: S, output: Tensor) -> S:
        """``state`` whose pending output (``pending_output``) is replaced by ``output``; only for a state
        that has one."""
        raise ValueError(f"solver {self.name!r} reuses no model output; nothing to replace")

    def nfe(self, ts: Tensor, schedule: NoiseSchedule) -> int:
        return self.nfe_for_steps(len(ts) - 1, ends_at_zero(schedule, ts))

    def steps_for_nfe(self, nfe: int, to_zero: bool) -> int:
        """Number of steps that uses exactly ``nfe`` evaluations; ``ValueError`` when none does."""
        if not isinstance(nfe, int) or isinstance(nfe, bool) or nfe < 1:
            raise ValueError(f"nfe must be a positive int, got {nfe!r}")
        counts = {n: self.nfe_for_steps(n, to_zero) for n in range(1, nfe + 2)}
        for n, c in counts.items():
            if c == nfe:
                return n
        feasible = sorted(set(counts.values()))
        near = [c for c in feasible if c < nfe][-1:] + [c for c in feasible if c > nfe][:1]
        where = " on a grid ending at sigma=0" if to_zero else ""
        other = to_zero and any(self.nfe_for_steps(n, False) == nfe for n in range(1, nfe + 1))
        raise ValueError(
            f"solver {self.name!r} cannot use exactly nfe={nfe}{where}; "
            f"nearest possible budgets: {', '.join(map(str, near)) or 'none'}"
            + ("; a grid ending at t_min (to_zero=False, --no-to-zero) can" if other else "")
        )

    def config(self) -> dict[str, Any]:
        """``{"name": ..., **options}`` — round-trips through ``get(**config)``."""
        out: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.config() if isinstance(v, Solver) else v
        return out


@dataclass(frozen=True)
class Wrapper(Solver[S]):
    """Base of modifiers that wrap another solver held in the subclass's ``base`` field (Time-Shift,
    DualFast, dynamic compensation): the declared order, stochasticity and NFE are the base's."""

    @property
    def order(self) -> int:
        return self.base.order  # type: ignore[attr-defined,no-any-return]

    def is_stochastic(self) -> bool:
        return self.base.is_stochastic()  # type: ignore[attr-defined,no-any-return]

    def nfe_for_steps(self, steps: int, to_zero: bool) -> int:
        return self.base.nfe_for_steps(steps, to_zero)  # type: ignore[attr-defined,no-any-return]


# --- registry ------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Solver[Any]]] = {}

SolverT = TypeVar("SolverT", bound=type)


def register(name: str) -> Callable[[SolverT], SolverT]:
    """Class decorator registering a solver under ``name``; duplicate names raise."""

    def deco(cls: SolverT) -> SolverT:
        if name in _REGISTRY:
            raise ValueError(f"solver name {name!r} already registered by {_REGISTRY[name].__qualname__}")
        cls.name = name  # type: ignore[attr-defined]
        _REGISTRY[name] = cls  # type: ignore[assignment]
        return cls

    return deco


def available() -> list[str]:
    """Names of all registered solvers."""
    return sorted(_REGISTRY)


def solver_class(name: str) -> type[Solver[Any]]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(available())}")
    return _REGISTRY[name]


def get(name: str, **options: Any) -> Solver[Any]:
    """Construct a registered solver; unknown options raise ``ValueError`` listing the allowed ones."""
    cls = solver_class(name)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"solver {name!r} has no option(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed)) or 'none'}"
        )
    hints = _option_hints(cls)
    for key, value in options.items():
        hint = hints.get(key)
        if hint is not None and _matches(value, hint) is False:
            raise ValueError(
                f"solver {name!r} option {key}={value!r} ({type(value).__name__}) has the wrong type; "
                f"allowed: {_hint_name(hint)}"
            )
    return cls(**options)


def _option_hints(cls: type) -> dict[str, Any]:
    """The dataclass fields' resolved annotations ({} if one cannot be resolved: then nothing is checked)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an annotation naming a type-checking-only import
        return {}
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.name in hints}


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether ``value`` fits the annotation ``hint``: bools are not numbers, ints are floats, JSON lists are
    tuples; ``None`` where the annotation is not one of those simple kinds (not checked)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is typing.Literal:  # the right type: the solver's own check names the allowed values
        return None if any(type(value) is type(a) for a in args) else False
    if origin is typing.Union or origin is types.UnionType:
        found = [_matches(value, a) for a in args]
        return True if any(found) else (False if all(f is False for f in found) else None)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (tuple, list) or origin in (tuple, list):
        return isinstance(value, (tuple, list))
    return None


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


# --- the loop ------------------------------------------------------------------------------------
def iterate(problem: Problem, x: Tensor, ts: Tensor, solver: Solver[Any]) -> Iterator[StepInfo]:
    """Step ``solver`` along ``ts`` from ``x`` (at ``ts[0]``), yielding after every step.

    The state is kept in the model dtype promoted to at least float32."""
    ts = check_grid(ts, problem.schedule, decreasing=None)
    if x.ndim < 2:
        raise ValueError(f"x must have shape (B, ...) with a batch dimension, got {tuple(x.shape)}")
    x = x.to(state_dtype(x.dtype))
    state = solver.init(problem, x, ts)
    for i in range(len(ts) - 1):
        x, state = solver.step(problem, x, ts, i, state)
        yield StepInfo(i=i, t=float(ts[i]), t_next=float(ts[i + 1]), x=x, nfe=problem.nfe)


def sample(
    problem: Problem,
    x: Tensor,
    ts: Tensor,
    solver: Solver[Any],
    *,
    callback: Callable[[StepInfo], None] | None = None,
) -> Tensor:
    """Run ``solver`` over the whole grid ``ts`` and return the final state."""
    out = x
    for info in iterate(problem, x, ts, solver):
        if callback is not None:
            callback(info)
        out = info.x
    return out
