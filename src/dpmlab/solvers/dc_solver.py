"""DC-Solver — Zhao, Wang, Zhou & Lu, "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via
Dynamic Compensation", ECCV 2024, arXiv 2409.03755.

A predictor-corrector sampler (UniPC) buffers the model output ``m_i = m(x~_i, t_i)`` at the *predicted*
point while the trajectory continues from the *corrected* ``x_i^c``. Dynamic compensation (Sec. 3.2,
eqs. 9-10) replaces, before step ``i``, the newest buffered output by the Lagrange interpolation in the
model's time ``t`` of the last ``K + 1`` outputs (``K = dc_order``) at a shifted time::

    tau_i = t_{i-1} + rho_i (t_i - t_{i-1})                                   (rho_i = 1: no change)
    m~_i  = sum_{k=0..K} m_{i-k} prod_{j != k} (tau_i - t_{i-j}) / (t_{i-k} - t_{i-j})

and the base solver continues with ``m~_i`` in its buffer (the older entries are the compensated ones,
as in the authors' code). No extra evaluation; steps ``i < K`` (buffer too short) are left alone.
Lagrange interpolation is invariant under affine maps of time, so our ``t`` gives the same ``m~`` as
the authors' continuous or discrete (0..999) time labels.

``DynamicCompensation(base, ratios)`` wraps any deterministic solver. How the compensated value
reaches the base's buffer (the hook):

* a predictor-corrector base whose state is a dataclass with a field ``m_next`` (``unipc``, ``unic``):
  that field is the evaluation the next step buffers instead of calling the model; it is replaced by
  ``m~_i`` (in the base's ``prediction`` form);
* any other base (``dpm_solver_pp``, ``deis``, ``ddim``, ...) must start step ``i`` by evaluating the
  model at ``(x_i, t_i)``: that first call, made through a view of the problem, returns ``m~_i``
  (converted to ``x0`` at ``x_i`` when the compensation runs in noise form).

The ratios are fitted per (model, grid, guidance) against ground-truth trajectories
(``dpmlab.calibrate.dc.fit_dc_ratios``) and saved as a ``DCRatios`` artifact; the cascade polynomial
regression ``CPRModel`` predicts them for unseen (steps, guidance scale)::

    rho_i = sum_{a,b,c} C[a][b][c] u^a g^(2-b) n^(2-c),  u = (i+1)/N, g = w / 12, n = N / 50   (i >= K)

(the authors' ``cascade_polynomial_regression``: 27 coefficients in their order; ``rho_i = 1`` for ``i < K``).
Deviations: ratios are indexed by step (the authors' NFE = steps for UniPC without a final corrector);
the compensation space is the base's ``prediction`` (x0 for DPM-Solver++/DDIM/DEIS).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils import atomic_write
from ._expint import lincomb, point
from .base import FirstEvaluation, Problem, Solver, Wrapper, get, register

__all__ = ["DCRatios", "CPRModel", "DynamicCompensation", "lagrange_weights", "cpr_features", "PENDING_FIELD"]

PENDING_FIELD = "m_next"  # a predictor-corrector base's reused evaluation (the hook, see module docstring)
_VERSION = 1


def lagrange_weights(nodes: Sequence[float], tau: float) -> list[float]:
    """Weights ``w_k`` with ``p(tau) = sum_k w_k m_k`` for the polynomial through ``(nodes[k], m_k)``."""
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"Lagrange nodes must be distinct, got {list(nodes)}")
    return [math.prod((tau - tj) / (tk - tj) for j, tj in enumerate(nodes) if j != k) for k, tk in enumerate(nodes)]


def cpr_features(steps: int, guidance: float, i: int, cfg_scale: float = 12.0, nfe_scale: float = 50.0) -> list[float]:
    """The 27 monomials ``u^a g^(2-b) n^(2-c)`` of CPR (authors' coefficient order ``[a][b][c]``)."""
    u, g, n = (i + 1) / steps, guidance / cfg_scale, steps / nfe_scale
    return [u**a * g ** (2 - b) * n ** (2 - c) for a in range(3) for b in range(3) for c in range(3)]


# --- artifacts ---------------------------------------------------------------------------------------
def _save(path: str | os.PathLike[str], kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    header = {"format": kind, "version": str(_VERSION), "meta": json.dumps(meta)}
    with atomic_write(path) as tmp:
        save_file({k: v.detach().to(torch.float64).contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    return path


def _load(path: str | os.PathLike[str], kind: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} artifact at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    if header.get("format") != kind:
        raise ValueError(f"{path} holds {header.get('format')!r}, expected a {kind!r} artifact")
    if header.get("version") != str(_VERSION):
        raise ValueError(f"{path}: {kind} version {header.get('version')!r} is not supported (want {_VERSION})")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt {kind} metadata ({e})") from e
    return tensors, meta


def _floats(name: str, v: Sequence[float] | Tensor, n: int | None = None) -> tuple[float, ...]:
    out = tuple(float(x) for x in (v.tolist() if isinstance(v, Tensor) else v))
    if (n is not None and len(out) != n) or not out or not all(math.isfinite(x) for x in out):
        raise ValueError(f"{name} must be {n or 'one or more'} finite numbers, got {out}")
    return out


def _check_order(dc_order: int) -> None:
    if not isinstance(dc_order, int) or not 1 <= dc_order <= 3:
        raise ValueError(f"dc_order must be an int in 1..3 (interpolation of dc_order + 1 outputs), got {dc_order!r}")


def _check_ratios(ratios: Sequence[float] | Tensor, dc_order: int) -> tuple[float, ...]:
    _check_order(dc_order)
    out = _floats("ratios", ratios)
    if any(r != 1.0 for r in out[:dc_order]):
        raise ValueError(f"ratios of the first dc_order={dc_order} steps must be 1 (nothing to interpolate), got {out}")
    return out


@dataclass(frozen=True)
class DCRatios:
    """Fitted compensation ratios ``rho_i`` (one per step) for one model, grid and guidance scale."""

    ratios: tuple[float, ...]  # rho_i; rho_i = 1 for i < dc_order
    dc_order: int = 2  # K of the interpolation the ratios were fitted with
    guidance: float = 1.0  # guidance scale of the fit (a CPR input)
    model: str = ""  # provenance: the model's name
    solver: str = ""  # provenance: the base solver's config (JSON)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", _check_ratios(self.ratios, self.dc_order))
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be finite, got {self.guidance}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        meta = {"dc_order": self.dc_order, "guidance": self.guidance, "model": self.model, "solver": self.solver}
        return _save(path, "dpmlab.dc_ratios", {"ratios": torch.tensor(self.ratios, dtype=torch.float64)}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DCRatios:
        tensors, meta = _load(path, "dpmlab.dc_ratios")
        if set(tensors) != {"ratios"} or tensors["ratios"].ndim != 1:
            raise ValueError(f"{path}: a dc_ratios artifact holds one 1-d tensor 'ratios', got {sorted(tensors)}")
        try:
            ratios = tuple(tensors["ratios"].tolist())
            return cls(ratios, meta["dc_order"], meta["guidance"], meta["model"], meta["solver"])
        except KeyError as e:
            raise ValueError(f"{path}: dc_ratios metadata lacks {e}") from e


@dataclass(frozen=True)
class CPRModel:
    """Cascade polynomial regression: ``rho_i`` as a polynomial in (step fraction, guidance, steps)."""

    coeffs: tuple[float, ...]  # 27 coefficients C[a][b][c], flattened (see cpr_features)
    dc_order: int = 2  # K: rho_i = 1 for i < K
    cfg_scale: float = 12.0  # guidance is divided by this (authors: 12)
    nfe_scale: float = 50.0  # steps are divided by this (authors: 50)
    model: str = ""  # provenance

    def __post_init__(self) -> None:
        object.__setattr__(self, "coeffs", _floats("coeffs", self.coeffs, 27))
        _check_order(self.dc_order)
        if not (self.cfg_scale > 0 and self.nfe_scale > 0):
            raise ValueError(f"cfg_scale and nfe_scale must be > 0, got {self.cfg_scale}, {self.nfe_scale}")

    def ratio(self, steps: int, guidance: float, i: int) -> float:
        if i < self.dc_order:
            return 1.0
        f = cpr_features(steps, guidance, i, self.cfg_scale, self.nfe_scale)
        return sum(c * x for c, x in zip(self.coeffs, f))

    def predict(self, steps: int, guidance: float = 1.0) -> DCRatios:
        """Ratios for a grid of ``steps`` steps at guidance scale ``guidance``."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        rs = tuple(self.ratio(steps, guidance, i) for i in range(steps))
        return DCRatios(rs, self.dc_order, float(guidance), self.model, "cpr")

    def save(self, path: str | os.PathLike[str]) -> Path:
        meta = {"dc_order": self.dc_order, "cfg_scale": self.cfg_scale, "nfe_scale": self.nfe_scale,
                "model": self.model}
        return _save(path, "dpmlab.dc_cpr", {"coeffs": torch.tensor(self.coeffs, dtype=torch.float64)}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CPRModel:
        tensors, meta = _load(path, "dpmlab.dc_cpr")
        if set(tensors) != {"coeffs"}:
            raise ValueError(f"{path}: a dc_cpr artifact holds exactly one tensor 'coeffs', got {sorted(tensors)}")
        try:
            c = tuple(tensors["coeffs"].reshape(-1).tolist())
            return cls(c, meta["dc_order"], meta["cfg_scale"], meta["nfe_scale"], meta["model"])
        except KeyError as e:
            raise ValueError(f"{path}: dc_cpr metadata lacks {e}") from e


# --- the wrapper -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DCState:
    base: Any  # the wrapped solver's state
    ts: tuple[float, ...] = ()  # times of the last dc_order buffered outputs, oldest first
    ms: tuple[Tensor, ...] = ()  # those outputs as the base buffered them (compensated)


@register("dc_solver")
@dataclass(frozen=True)
class DynamicCompensation(Wrapper[DCState]):
    base: Solver[Any] = field(default_factory=lambda: get("unipc"))  # the wrapped (predictor-corrector) solver
    ratios: tuple[float, ...] | None = None  # rho_i, one per step (or a DCRatios); None: rho = 1 (the base itself)
    dc_order: int = 2  # K: Lagrange interpolation through K + 1 buffered outputs (paper default 2)

    paper = "Zhao et al. 2024, DC-Solver (arXiv 2409.03755)"
    order_test_options = {"base": {"name": "unipc", "lower_order_final": False, "final_corrector": True}}

    def __post_init__(self) -> None:
        if isinstance(self.base, Mapping):  # from config(): {"name": ..., **options}
            object.__setattr__(self, "base", get(**self.base))
        if not isinstance(self.base, Solver) or self.base.is_stochastic():
            raise ValueError(f"base must be a deterministic Solver, got {self.base!r}")
        _check_order(self.dc_order)
        if isinstance(self.ratios, DCRatios):
            if self.ratios.dc_order != self.dc_order:
                raise ValueError(f"ratios were fitted with dc_order={self.ratios.dc_order}, solver has {self.dc_order}")
            object.__setattr__(self, "ratios", self.ratios.ratios)
        if self.ratios is not None:
            object.__setattr__(self, "ratios", _check_ratios(self.ratios, self.dc_order))

    @property
    def form(self) -> str:
        """Space of the compensation: the base's ``prediction`` ("data" | "noise"), else data (x0)."""
        p = getattr(self.base, "prediction", "data")
        return p if p in ("data", "noise") else "data"

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> DCState:
        if self.ratios is not None and len(self.ratios) != len(ts) - 1:
            raise ValueError(f"{len(self.ratios)} dc ratios for a grid of {len(ts) - 1} steps; fit them for this grid")
        return DCState(base=self.base.init(problem, x, ts))

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: DCState) -> tuple[Tensor, DCState]:
        t = float(ts[i])
        rho = 1.0 if self.ratios is None else self.ratios[i]
        active = rho != 1.0 and len(state.ms) >= self.dc_order

        def compensate(m: Tensor) -> Tensor | None:  # eq. (10); None: unchanged
            if not active:
                return None
            tau = state.ts[-1] + rho * (t - state.ts[-1])  # eq. (9): t_{i-1} + rho_i (t_i - t_{i-1})
            w = lagrange_weights((t, *state.ts[::-1]), tau)
            return lincomb(w, (m, *state.ms[::-1]))

        pending = getattr(state.base, PENDING_FIELD, None)
        if pending is not None:  # a PC base will buffer its corrector's evaluation: compensate it in place
            m_dc = compensate(pending)
            m = pending if m_dc is None else m_dc
            base_state = state.base if m_dc is None else dataclasses.replace(state.base, **{PENDING_FIELD: m_dc})
            x_next, base_next = self.base.step(problem, x, ts, i, base_state)
        else:  # the base evaluates at (x, t_i) first: serve the compensated output
            buffered: list[Tensor] = []
            a, s, _ = point(problem.schedule, t)

            def serve(xx: Tensor, evaluate: Callable[[], Tensor]) -> Tensor:
                x0 = evaluate()
                m = x0 if self.form == "data" else (xx - a * x0) / s
                m_dc = compensate(m)
                buffered.append(m if m_dc is None else m_dc)
                if m_dc is None:
                    return x0
                return m_dc if self.form == "data" else (xx - s * m_dc) / a  # the x0 giving m_dc

            view = FirstEvaluation.of(problem, t, serve, "dynamic compensation")
            x_next, base_next = self.base.step(view, x, ts, i, state.base)
            if not buffered:
                raise ValueError(f"dynamic compensation: base {self.base.name!r} never evaluated the model at (x, t_i)")
            m = buffered[0]
        k = self.dc_order
        return x_next, DCState(base_next, (state.ts + (t,))[-k:], (state.ms + (m,))[-k:])
