"""USF — Liu, Ning, Yang & Wang, "A Unified Sampling Framework for Solver Searching of Diffusion
Probabilistic Models", ICLR 2024, arXiv 2312.07243 (Sec. 3, Alg. 1; authors' ``uni_sampler.py``).

A multistep exponential integrator whose every step is a typed decision (a ``Plan``). Step ``i`` from
``x_s`` at ``t_i`` to ``t_{i+1}`` (``h = lam_{i+1} - lam_i``, ``m`` = x0 or eps, ``_expint`` coefficients)::

    x_t = a x_s + b_0 m_s + sum_{j=1..k-1} b_j c_j D_j                   (Taylor order k, eq. 5)
    D_j = h^j m^(j)(lam_s)  of the polynomial through m_s and the E_j outputs m_q at r_q (E_j >= j)

with ``r_q = (lam_q - lam_s) / h`` over the ``E_j`` buffered outputs nearest to ``s`` (USF's Taylor
system "Difference_E", solved by ``_expint.taylor_weights``) and ``c_1`` the relaxation of the first
derivative (``c_j = 1`` for ``j > 1``), in ``hh = -h`` (data) or ``+h`` (noise): dpmsolver-2 =
unipc-bh2 ``phi_1(hh) / (2 phi_2(hh))``, unipc-bh1 ``1 / (2 phi_2(hh))``, 0.5exp ``1 + expm1(hh)/2``,
-0.5exp ``1 - expm1(hh)/2`` (USF's formulas, rewritten with phi functions against cancellation).
A corrector evaluates ``m`` at the predicted ``x~_t`` and redoes the update from ``x_s`` with its own
expansion, whose estimates take the new point (``r = 1``) first; "pseudo" buffers ``m(x~_t)`` for the
next step (no extra NFE), "implicit" lets the next step evaluate at the corrected point (one more).
AFS (analytical first step) sets ``x0(x_T, T) := 0`` (``eps = x_T / sigma_T``).

Equivalences (tested to 1e-10): DDIM = order 1 everywhere; DPM-Solver++ 2M = order 2, ``E = (1,)``,
dpmsolver-2 relaxation ("midpoint"; none = "heun"); 3M = order 3, ``E = (2, 2)``; UniPC-p = predictor
order p, ``E = p - 1``, pseudo corrector order p + 1, ``E = p`` — since solving UniPC's ``R a = b`` is
interpolation, ``B(h)`` matters only where UniPC hard-codes ``a = 1/2`` (UniP-2, UniC-1), which are the
bh1 / bh2 relaxations. ``Preset`` writes these solvers as plans for any grid.

The authors' released schedules also use: the "linear" relaxation ``c_1 = 1 + c h`` (``h > 0`` in
every form, a searched coefficient ``c``); AFS "eps_x" (their "zero_x0": ``eps(x_T, T) := x_T``) and
"mean_x0" (their "average_x0": ``x0(x_T, T) :=`` a given dataset mean). ``Plan.from_authors`` converts
their schedule dicts (``docs/methods/usf_s3.md`` lists every field).

Prediction "v3" (DPM-Solver-v3's ``f = (sigma eps - l x) / alpha`` with the EMS ``l, s, b`` passed as
``USF(plan, ems=...)``): eq. 14 of DPM-Solver-v3 in ``g = e^{-ΔS} f - β`` with ``g^(j)`` from USF's
estimates and ``c_1`` in ``+h``; the integrals are ``dpm_solver_v3``'s (interpolated EMS, where the
authors round to EMS knots).

Not implemented (refused with an error naming what is missing): start points other than the newest
output (USF's singlestep schedules) and the per-resolution UNet skip-connection scaling
("skip_coefficients", model surgery, not a solver step).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils import atomic_write
from ._ems import EMS, _Coeffs
from ._expint import Interval, interval, lincomb, taylor_weights
from ._multistep import (
    MAX_ORDER,
    Buffer,
    Corrector,
    Prediction,
    Relaxation,
    Step,
    Taylor,
    advance,
    check_int,
    dpm_solver_rule,
    relaxation_factor,
    unipc_rule,
)
from .base import Problem, Solver, ends_at_zero, register

__all__ = [
    "Prediction",
    "Relaxation",
    "Corrector",
    "AFS",
    "Family",
    "Taylor",
    "Step",
    "Plan",
    "Preset",
    "USF",
    "relaxation_factor",
]

PLAN_FORMAT, PLAN_VERSION = "dpmlab.usf_plan", 1


class AFS(StrEnum):
    NONE = "none"
    ZERO_X0 = "zero_x0"  # x0(x_T, T) := 0 saves the first evaluation
    EPS_X = "eps_x"  # eps(x_T, T) := x_T (the authors' "zero_x0")
    MEAN_X0 = "mean_x0"  # x0(x_T, T) := Plan.afs_mean (the authors' "average_x0": the dataset mean)


class Family(StrEnum):
    DDIM = "ddim"
    DPM_SOLVER_PP = "dpm_solver_pp"
    UNIPC = "unipc"


@dataclass(frozen=True)
class Plan:
    """A solver schedule: one ``Step`` per step, optional times ``ts`` (len(steps) + 1, decreasing)."""

    steps: tuple[Step, ...]
    ts: tuple[float, ...] | None = None  # None: any grid of len(steps) + 1 points
    afs: AFS = AFS.NONE  # analytical first step
    model: str = ""  # provenance: the model a searched plan belongs to
    afs_mean: tuple[float, ...] | None = None  # the x0 of AFS "mean_x0" (one sample, flattened), else None

    def __post_init__(self) -> None:
        steps = tuple(Step(**s) if isinstance(s, Mapping) else s for s in self.steps)
        object.__setattr__(self, "steps", steps)
        object.__setattr__(self, "afs", AFS(self.afs))
        if (self.afs is AFS.MEAN_X0) != (self.afs_mean is not None):
            raise ValueError(f"afs_mean is required for afs 'mean_x0' and only for it (afs={self.afs.value!r})")
        if self.afs_mean is not None:
            mean = tuple(float(v) for v in self.afs_mean)
            if not mean or not all(math.isfinite(v) for v in mean):
                raise ValueError("afs_mean must be a non-empty sequence of finite numbers")
            object.__setattr__(self, "afs_mean", mean)
        if not steps or not all(isinstance(s, Step) for s in steps):
            raise ValueError("a plan needs one or more Step values")
        if self.ts is not None:
            ts = tuple(float(t) for t in self.ts)
            object.__setattr__(self, "ts", ts)
            if len(ts) != len(steps) + 1 or not all(math.isfinite(t) and t >= 0 for t in ts):
                raise ValueError(f"ts must be {len(steps) + 1} finite times >= 0, got {ts}")
            if any(b >= a for a, b in zip(ts, ts[1:])):
                raise ValueError(f"ts must be strictly decreasing, got {ts}")
        for i, s in enumerate(steps):  # step i has i earlier outputs (+ the corrector's new one)
            if s.predictor.need > i:
                raise ValueError(f"step {i}: predictor needs {s.predictor.need} earlier outputs, only {i} exist")
            if s.correction is not None and s.correction.need > i + 1:
                raise ValueError(f"step {i}: corrector needs {s.correction.need} outputs, only {i + 1} exist")

    @property
    def nfe(self) -> int:
        """Evaluations: one per step start (unless AFS or a pseudo corrector provided it) + one per corrector."""
        starts = sum(
            not ((i == 0 and self.afs is not AFS.NONE) or (i > 0 and self.steps[i - 1].corrector is Corrector.PSEUDO))
            for i in range(len(self.steps))
        )
        return starts + sum(s.corrector is not Corrector.NONE for s in self.steps)

    @property
    def order(self) -> int:
        return max(max(s.predictor.order, s.correction.order if s.correction else 1) for s in self.steps)

    def grid(self) -> Tensor:
        if self.ts is None:
            raise ValueError("this plan fixes no timesteps; pass a grid of len(steps) + 1 times")
        return torch.tensor(self.ts, dtype=torch.float64)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if self.afs_mean is None:  # plans without it keep the version-1 layout
            del d["afs_mean"]
        return {"nfe": self.nfe, **d}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """JSON artifact (format, version, model, nfe, afs, ts, steps)."""
        path = Path(path)
        with atomic_write(path) as tmp:
            tmp.write_text(json.dumps({"format": PLAN_FORMAT, "version": PLAN_VERSION, **self.to_dict()}, indent=1))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model: str | None = None, nfe: int | None = None) -> Plan:
        """Read and validate a saved plan; ``model`` / ``nfe``, if given, must match the artifact's."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read a USF plan from {path}: {e}") from e
        if not isinstance(d, dict) or d.pop("format", None) != PLAN_FORMAT or d.pop("version", None) != PLAN_VERSION:
            raise ValueError(f"{path} is not a {PLAN_FORMAT!r} version {PLAN_VERSION} artifact")
        saved_nfe = d.pop("nfe", None)
        try:
            plan = cls(**d)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid plan: {e}") from e
        if saved_nfe != plan.nfe:
            raise ValueError(f"{path}: recorded nfe={saved_nfe} but the plan costs {plan.nfe} evaluations")
        if model is not None and plan.model != model:
            raise ValueError(f"{path}: plan was searched for model {plan.model!r}, not {model!r}")
        if nfe is not None and plan.nfe != nfe:
            raise ValueError(f"{path}: plan uses nfe={plan.nfe}, not {nfe}")
        return plan

    @classmethod
    def from_authors(
        cls,
        source: str | os.PathLike[str] | Mapping[str, Any],
        *,
        afs_mean: Tensor | list[float] | None = None,
        v3: str | None = None,
        drop_skip: bool = False,
    ) -> Plan:
        """A plan from the authors' ``uni_sampler`` decisions (their ``load_decision`` dict).

        ``source``: the dict itself (tensors or lists), a JSON file holding it (bare or under
        ``"decisions"``), or a released name shipped in ``dpmlab/assets/usf_<name>.json``
        (``"cifar10_sde_nfe5"``, ``"cifar10_sde_nfe10"``). ``afs_mean``: the dataset-mean x0 that AFS
        "average_x0" needs. ``v3``: None keeps DPM-Solver-v3 prediction steps (sampling then needs
        ``USF(plan, ems=...)``); "data" or "noise" replaces them (then NOT the authors' solver).
        ``drop_skip``: ignore UNet skip coefficients != 1.
        """
        d = _authors_decisions(source)
        return cls(**_convert_authors(d, afs_mean, v3, drop_skip))


ASSETS = Path(__file__).resolve().parent.parent / "assets"
_AUTHORS_PRED = {"data_prediction": Prediction.DATA, "noise_prediction": Prediction.NOISE}
_AUTHORS_AFS = {"no_afs": AFS.NONE, "zero_x0": AFS.EPS_X, "average_x0": AFS.MEAN_X0}


def _authors_decisions(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(source, Mapping):
        d: Any = source
    else:
        path = Path(source)
        if not path.is_file() and isinstance(source, str) and (ASSETS / f"usf_{source}.json").is_file():
            path = ASSETS / f"usf_{source}.json"
        try:
            d = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read authors' USF decisions from {source}: {e}") from e
    if isinstance(d, Mapping) and "decisions" in d:
        d = d["decisions"]
    if not isinstance(d, Mapping) or "timesteps" not in d or "orders" not in d:
        raise ValueError("authors' USF decisions need at least 'timesteps' and 'orders'")
    return {k: v.tolist() if isinstance(v, Tensor) else v for k, v in d.items()}


def _authors_taylor(where: str, order: int, derivs: list[Any] | None, corrector: bool) -> Taylor:
    """Their ``derivative_types`` list -> a Taylor; active points must be the nearest (our convention)."""
    derivs = list(derivs or [])
    if len(derivs) != order - 1:
        raise ValueError(f"{where}: order {order} needs {order - 1} derivative types, got {len(derivs)}")
    points, rel, coef = [], Relaxation.NONE, 0.0
    for j, dt in enumerate(derivs, 1):
        if not isinstance(dt, Mapping):
            raise ValueError(f"{where}: derivative {j} type must be a dict, got {dt!r}")
        est = str(dt.get("estimate", ""))
        if not est.startswith("Difference_") or not est[11:].isdigit():
            raise ValueError(f"{where}: derivative {j} estimate {est!r} is not 'Difference_<E>'")
        e = int(est[11:])
        near = ({-1} | set(range(-3, -e - 2, -1))) if corrector else set(range(-2, -e - 2, -1))
        act = dt.get("active_points")
        if act is not None and set(act) != near:
            raise ValueError(f"{where}: active points {act} are not the {e} nearest outputs (only those are supported)")
        points.append(e)
        if j == 1:  # the authors relax the first derivative only
            r = dt.get("relaxation")
            rel = Relaxation.NONE if r in (None, "no_relaxation") else Relaxation(r)
            coef = float(dt.get("relaxation_coefficient", 0.0)) if rel is Relaxation.LINEAR else 0.0
    return Taylor(order, tuple(points), rel, coef)


def _convert_authors(
    d: dict[str, Any], afs_mean: Tensor | list[float] | None, v3: str | None, drop_skip: bool
) -> dict[str, Any]:
    ts = [float(t) for t in d["timesteps"]]
    n = len(ts) - 1
    for key in ("orders", "prediction_types", "start_points", "derivative_types", "corrector_types"):
        if d.get(key) is None or len(d[key]) != n:
            raise ValueError(f"authors' decisions: {key!r} must list {n} steps (one per interval of timesteps)")
    if v3 not in (None, "data", "noise"):
        raise ValueError(f"v3 must be None (keep v3 steps), 'data' or 'noise', got {v3!r}")
    skip = [float(v) for v in d.get("skip_coefficients") or []]
    if any(v != 1.0 for v in skip) and not drop_skip:
        raise ValueError(
            f"skip_coefficients {skip} scale a ScoreSDE NCSN++ UNet's skip connections (model "
            "surgery, not a solver step); pass drop_skip=True to sample without them"
        )
    steps = []
    for i in range(n):
        pt = d["prediction_types"][i]
        if pt == "dpmsolver_v3_prediction":
            pred = Prediction.V3 if v3 is None else Prediction(v3)
        elif pt in _AUTHORS_PRED:
            pred = _AUTHORS_PRED[pt]
        else:
            raise ValueError(f"step {i}: unknown prediction type {pt!r}")
        if d["start_points"][i] != -1:
            raise ValueError(f"step {i}: start point {d['start_points'][i]} (singlestep) is not supported, only -1")
        k = check_int(f"step {i} order", d["orders"][i], 1, MAX_ORDER)
        predictor = _authors_taylor(f"step {i} predictor", k, d["derivative_types"][i], False)
        c = d["corrector_types"][i] or {"type": "no_corrector"}
        if not isinstance(c, Mapping):
            raise ValueError(f"step {i}: corrector type must be a dict, got {c!r}")
        if c.get("type") == "no_corrector":
            steps.append(Step(pred, predictor))
            continue
        if c.get("type") not in ("pseudo", "implicit") or c.get("start_point") != -2:
            raise ValueError(f"step {i}: corrector {c} unsupported (type pseudo/implicit, start point -2)")
        kc = check_int(f"step {i} corrector order", c.get("taylor_order"), 2, MAX_ORDER)
        corr = _authors_taylor(f"step {i} corrector", kc, c.get("derivative_type"), True)
        steps.append(Step(pred, predictor, Corrector(c["type"]), corr))
    afs_name = d.get("afs", "no_afs")
    if afs_name not in _AUTHORS_AFS:
        raise ValueError(f"unknown afs {afs_name!r}; allowed: {sorted(_AUTHORS_AFS)}")
    afs = _AUTHORS_AFS[afs_name]
    mean = None
    if afs is AFS.MEAN_X0:
        if afs_mean is None:
            raise ValueError("afs 'average_x0' needs the dataset-mean x0: pass afs_mean=")
        mean = tuple(float(v) for v in torch.as_tensor(afs_mean, dtype=torch.float64).flatten())
    return {"steps": tuple(steps), "ts": tuple(ts), "afs": afs, "model": "authors' schedule", "afs_mean": mean}


@dataclass(frozen=True)
class Preset:
    """A fixed solver as a rule giving a ``Plan`` for any grid (warm-up, lower_order_final, sigma = 0)."""

    family: Family = Family.UNIPC
    order: int = 2  # DPM-Solver++ order | UniP order p (UniPC-p: corrector order p + 1) | DDIM: 1
    prediction: Prediction = Prediction.DATA
    relaxation: Relaxation = Relaxation.UNIPC_BH1  # order-2 terms: UniPC bh1/bh2; DPM-Solver++ midpoint/none
    lower_order_final: bool = True
    final_corrector: bool = False  # UniPC: also correct the last step (1 extra NFE)

    def __post_init__(self) -> None:
        for name, kind in (("family", Family), ("prediction", Prediction), ("relaxation", Relaxation)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        check_int("preset order", self.order, 1, 1 if self.family is Family.DDIM else 3)
        allowed = {
            Family.DDIM: (Relaxation.NONE,),
            Family.DPM_SOLVER_PP: (Relaxation.DPM_SOLVER_2, Relaxation.NONE),
            Family.UNIPC: (Relaxation.UNIPC_BH1, Relaxation.UNIPC_BH2),
        }[self.family]
        if self.relaxation not in allowed:
            raise ValueError(
                f"a {self.family.value} preset takes relaxation {', '.join(r.value for r in allowed)}, "
                f"got {self.relaxation.value!r}"
            )

    @classmethod
    def ddim(cls) -> Preset:
        return cls(Family.DDIM, 1, relaxation=Relaxation.NONE)

    @classmethod
    def dpm_solver_pp(cls, order: int = 2, solver_type: str = "midpoint", lower_order_final: bool = True) -> Preset:
        rel = {"midpoint": Relaxation.DPM_SOLVER_2, "heun": Relaxation.NONE}[solver_type]
        return cls(Family.DPM_SOLVER_PP, order, Prediction.DATA, rel, lower_order_final)

    @classmethod
    def unipc(cls, p: int = 2, variant: str = "bh1", prediction: str = "data", **kw: bool) -> Preset:
        rel = {"bh1": Relaxation.UNIPC_BH1, "bh2": Relaxation.UNIPC_BH2}[variant]
        return cls(Family.UNIPC, p, Prediction(prediction), rel, **kw)

    def expand(self, steps: int, to_zero: bool) -> Plan:
        """The plan of this preset on a grid of ``steps`` steps: the engine's rule of the family, step by step."""
        out = []
        for i in range(steps):
            zero = to_zero and i == steps - 1  # a step to sigma = 0 is first order, uncorrected
            if self.family is Family.DDIM:
                out.append(Step(self.prediction, Taylor()))
            elif self.family is Family.DPM_SOLVER_PP:
                solver_type = "midpoint" if self.relaxation is Relaxation.DPM_SOLVER_2 else "heun"
                out.append(
                    dpm_solver_rule(
                        self.order,
                        i + 1,
                        i,
                        steps,
                        lower_order_final=self.lower_order_final,
                        to_zero=zero,
                        form=self.prediction.value,
                        solver_type=solver_type,
                    )
                )
            else:
                variant = {Relaxation.UNIPC_BH1: "bh1", Relaxation.UNIPC_BH2: "bh2"}[self.relaxation]
                out.append(
                    unipc_rule(
                        self.order,
                        i + 1,
                        i,
                        steps,
                        variant=variant,
                        form=self.prediction.value,
                        lower_order_final=self.lower_order_final,
                        corrector=True,
                        final_corrector=self.final_corrector,
                        to_zero=zero,
                    )
                )
        return Plan(tuple(out))


# --- the solver ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class USFState:
    plan: Plan  # the plan for this grid
    co: Any = None  # the EMS coefficients (dpm_solver_v3._Coeffs) when the plan has v3 steps
    buf: Buffer = field(default_factory=Buffer)  # the engine's buffer of outputs


def _afs_x0(plan: Plan, x: Tensor, alpha: float, sigma: float) -> Tensor | None:
    """The first output given by the analytical first step (None: evaluate the model)."""
    if plan.afs is AFS.ZERO_X0:
        return torch.zeros_like(x)
    if plan.afs is AFS.EPS_X:  # eps := x_T, so x0 = (x_T - sigma x_T) / alpha
        return (x - sigma * x) / alpha
    if plan.afs is AFS.MEAN_X0:
        mean = torch.tensor(plan.afs_mean, dtype=x.dtype, device=x.device)
        if mean.numel() != x[0].numel():
            raise ValueError(f"afs_mean has {mean.numel()} values, a sample has {x[0].numel()}")
        return mean.reshape(x.shape[1:]).expand_as(x).clone()
    return None


def _f(co: Any, lam: float, x: Tensor, alpha: float, x0: Tensor) -> Tensor:
    """DPM-Solver-v3's ``f = (sigma eps - l x) / alpha = ((1 - l) x - alpha x0) / alpha`` at ``lam``."""
    lv = co.at(torch.tensor([lam], dtype=torch.float64, device=co.lam.device))[0, 0].to(x)
    return ((1 - lv) * x - alpha * x0) / alpha


def _update_v3(c: Interval, x: Tensor, state: USFState, tay: Taylor, new: Tensor | None = None) -> Tensor:
    """A v3 step (DPM-Solver-v3 eq. 14) with USF's derivative estimates of ``g`` and relaxation (+h)."""
    co, h, buf = state.co, c.h, state.buf
    others = [buf.lams[-1 - q] for q in range(1, len(buf.lams))]
    d_l, e, e_b, d_s, beta = co.integrals(c.lam, c.lam_next, [c.lam_next, *others], tay.order - 1)
    to = lambda v: v.to(x)  # noqa: E731
    fs = [_f(co, lam, xq, aq, x0) for lam, xq, aq, x0 in zip(buf.lams, buf.xs, buf.alphas, buf.x0s)]
    g_s = fs[-1]
    g_old = [torch.exp(-to(d_s[q])) * fs[-1 - q] - to(beta[q]) for q in range(1, len(fs))]
    pts = ([(1.0, torch.exp(-to(d_s[0])) * new - to(beta[0]))] if new is not None else []) + [
        ((others[q - 1] - c.lam) / h, g) for q, g in enumerate(g_old, 1)
    ]
    acc = to(e_b) + to(e[0]) * g_s
    for j, c_j in enumerate(tay.factors(h, "v3"), 1):
        r, gq = zip(*pts[: tay.points[j - 1]])
        d_j = lincomb(taylor_weights([0.0, *r])[j], [g_s, *gq]) / h**j  # g^(j)(lam_s)
        acc = acc + to(e[j]) * c_j * d_j
    return c.alpha_next * torch.exp(-to(d_l)) * (x / c.alpha - acc)


@register("usf")
@dataclass(frozen=True)
class USF(Solver[USFState]):
    plan: Plan | Preset = field(default_factory=Preset)  # a (searched) Plan, or a Preset rule for any grid
    ems: EMS | str | None = None  # DPM-Solver-v3's statistics (or their path), needed iff the plan has v3 steps

    paper = "Liu et al. 2024, USF / S3 (arXiv 2312.07243)"
    order_test_options = {"plan": Preset(lower_order_final=False, final_corrector=True)}

    def __post_init__(self) -> None:
        if isinstance(self.plan, Mapping):
            d = dict(self.plan)
            object.__setattr__(self, "plan", Preset(**d) if "family" in d else Plan(**d))
        if not isinstance(self.plan, Plan | Preset):
            raise ValueError(f"plan must be a Plan or a Preset, got {self.plan!r}")
        if isinstance(self.ems, os.PathLike):
            object.__setattr__(self, "ems", os.fspath(self.ems))  # keep config() JSON-able
        stats = EMS.load(self.ems) if isinstance(self.ems, str) else self.ems
        if stats is not None and not isinstance(stats, EMS):
            raise ValueError(f"ems must be a dpmlab EMS (calibrate.fit_ems), its path or None, got {type(stats)}")
        object.__setattr__(self, "_stats", stats)

    def config(self) -> dict[str, Any]:
        """The plan or preset as a dict (``USF(plan=that dict)`` rebuilds it) and ``ems`` (None, a path, or the EMS)."""
        return {"name": self.name, "plan": dataclasses.asdict(self.plan), "ems": self.ems}

    @property
    def order(self) -> int:
        p = self.plan
        if isinstance(p, Plan):
            return p.order
        return {Family.DDIM: 1, Family.DPM_SOLVER_PP: p.order, Family.UNIPC: p.order + 1}[p.family]

    def plan_for(self, steps: int, to_zero: bool) -> Plan:
        if isinstance(self.plan, Preset):
            return self.plan.expand(steps, to_zero)
        if steps != len(self.plan.steps):
            raise ValueError(f"the plan has {len(self.plan.steps)} steps, the grid {steps}")
        return self.plan

    def nfe_for_steps(self, steps: int, to_zero: bool) -> int:
        return self.plan_for(steps, to_zero).nfe

    def steps_for_nfe(self, nfe: int, to_zero: bool) -> int:
        if isinstance(self.plan, Plan):
            if self.plan.nfe != nfe:
                raise ValueError(f"this plan uses exactly nfe={self.plan.nfe}, not {nfe}")
            return len(self.plan.steps)
        return super().steps_for_nfe(nfe, to_zero)

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> USFState:
        to_zero = ends_at_zero(problem.schedule, ts)
        plan = self.plan_for(len(ts) - 1, to_zero)
        if plan.ts is not None and not torch.allclose(plan.grid(), ts.double().cpu(), rtol=0, atol=1e-12):
            raise ValueError(f"the grid differs from the plan's timesteps {plan.ts}; sample on plan.grid()")
        last = plan.steps[-1]
        if to_zero and (
            last.predictor.order != 1 or last.corrector is not Corrector.NONE or last.prediction is Prediction.V3
        ):
            raise ValueError("the step to sigma = 0 must be first order, data or noise, without a corrector")
        v3 = [i for i, s in enumerate(plan.steps) if s.prediction is Prediction.V3]
        if not v3:
            return USFState(plan)
        st: EMS | None = self._stats  # type: ignore[attr-defined]
        if st is None:
            raise ValueError(
                f"steps {v3} use DPM-Solver-v3 prediction: pass USF(plan, ems=...) with the "
                "model's EMS (dpmlab.calibrate.fit_ems)"
            )
        if torch.broadcast_shapes(st.l.shape[1:], x.shape[1:]) != x.shape[1:]:
            raise ValueError(f"EMS of data shape {tuple(st.l.shape[1:])} do not fit samples {tuple(x.shape)}")
        lam = problem.schedule.lam(ts.double())
        lo, hi = float(lam.min()), float(lam.max())
        if lo < float(st.lam[0]) - 1e-6 or hi > float(st.lam[-1]) + 1e-6:
            raise ValueError(
                f"grid spans lam in [{lo:.4g}, {hi:.4g}], outside the EMS range "
                f"[{float(st.lam[0]):.4g}, {float(st.lam[-1]):.4g}]; refit the EMS"
            )
        co = _Coeffs(st.lam.to(x.device), st.l.to(x.device), st.s.to(x.device), st.b.to(x.device))
        return USFState(plan, co)

    def pending_output(self, state: USFState) -> Tensor | None:
        """The pseudo corrector's evaluation the next step reuses, as x0 (USF's steps mix forms)."""
        return state.buf.x0s[-1] if state.buf.pending else None

    def with_pending_output(self, state: USFState, output: Tensor) -> USFState:
        if not state.buf.pending:
            raise ValueError("USF: this state holds no pending corrector evaluation to replace")
        return dataclasses.replace(state, buf=state.buf.with_newest(output, "data"))

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: USFState) -> tuple[Tensor, USFState]:
        st, c = state.plan.steps[i], interval(problem.schedule, ts, i)
        first = _afs_x0(state.plan, x, c.alpha, c.sigma) if i == 0 else None  # the analytical first step
        if st.prediction is not Prediction.V3:  # data / noise: the engine's step
            x_next, buf = advance(problem, x, c, i, state.buf, st, first=first)
            return x_next, dataclasses.replace(state, buf=buf)
        buf = state.buf  # DPM-Solver-v3 prediction: the engine's buffer, v3's integrals
        if not buf.pending:
            x0 = problem.denoise(x, c.t) if first is None else first
            buf = buf.push(c.lam, x, x0, c.alpha, c.sigma, False)
        state = dataclasses.replace(state, buf=buf)
        x_pred = _update_v3(c, x, state, st.predictor)
        if st.correction is None:
            return x_pred, dataclasses.replace(state, buf=buf.settled())
        x0_t = problem.denoise(x_pred, c.t_next)  # the evaluation at the predicted point
        x_c = _update_v3(c, x, state, st.correction, new=_f(state.co, c.lam_next, x_pred, c.alpha_next, x0_t))
        if st.corrector is Corrector.PSEUDO:
            pushed = buf.push(c.lam_next, x_pred, x0_t, c.alpha_next, c.sigma_next, True)
            return x_c, dataclasses.replace(state, buf=pushed)
        return x_c, dataclasses.replace(state, buf=buf.settled())
