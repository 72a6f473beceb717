"""DC-Solver — Zhao, Wang, Zhou & Lu, "DC-Solver: Improving Predictor-Corrector Diffusion Sampler via
Dynamic Compensation", ECCV 2024, arXiv 2409.03755; authors' code wl-zhao/DC-Solver (``f82d060``).

A predictor-corrector sampler (UniPC) buffers the model output ``m_i = m(x~_i, t_i)`` at the *predicted*
point while the trajectory continues from the *corrected* ``x_i^c``. Dynamic compensation (Sec. 3.2,
eqs. 9-10) replaces, before step ``i``, the newest buffered output by the Lagrange interpolation in the
model's time ``t`` of the last ``K + 1`` outputs (``K = dc_order``) at a shifted time::

    tau_i = t_{i-1} + rho_i (t_i - t_{i-1})                                   (rho_i = 1: no change)
    m~_i  = sum_{k=0..K} m_{i-k} prod_{j != k} (tau_i - t_{i-j}) / (t_{i-k} - t_{i-j})

and the base solver continues with ``m~_i`` in its buffer (the older entries are the compensated ones,
as in the authors' code; their corrector of step ``i - 1`` uses the plain ``m_i``). No extra evaluation;
steps ``i < K`` are left alone. Lagrange interpolation is invariant under affine maps of time, so our
``t`` gives the same ``m~`` as the authors' continuous or discrete (0..999) time labels.

How ``m~_i`` reaches the base (``DynamicCompensation(base, ratios)``, any deterministic base):

* a base that starts step ``i`` by evaluating the model at ``(x_i, t_i)`` (``dpm_solver_pp``, ``deis``,
  ``ddim``, UniPC's first step) gets a view of the problem whose first ``denoise`` returns the x0 that
  gives ``m~_i`` (in noise form ``x0 = (x_i - sigma_i eps~_i) / alpha_i``) — public interface only;
* a predictor-corrector base (``unipc``, ``unic``) does not call the model there: it reuses the
  corrector's evaluation. The solver protocol exposes it — ``base.pending_output(state)`` and
  ``base.with_pending_output(state, m)`` — and the compensated output replaces it through them; the
  wrapper never reads or writes a base's state fields.

Ratios are fitted per (model, grid, base, guidance) against ground-truth trajectories
(``dpmlab.calibrate.dc.fit_dc_ratios``) as a ``DCRatios`` artifact that records the grid, NFE and base
it was fitted on and is checked against them when sampling. The cascade polynomial regression
``CPRModel`` predicts ratios for unseen (NFE, guidance) — the authors' ``cascade_polynomial_regression``
of any degree ``P`` in the step fraction (their released file: ``P = 3``, 36 coefficients)::

    rho_i = sum_{a<=P, b<=2, c<=2} C[a][b][c] u^a g^(2-b) n^(2-c),  u = (i+1)/N, g = w/12, n = N/50   (i >= K)

``CPRModel.authors_sd21()`` loads their released coefficients (``diffusers/dc_solver/cpr_coeffs_path/
sd2.1.npy``, shipped as numbers in ``assets/dc_solver_cpr_sd2.1.json``; ``CPRModel.from_npy`` reads the
original file). Deviation: ratios are indexed by step (the authors' NFE = steps for UniPC without a final
corrector); the compensation space is the base's ``prediction`` (x0 for DPM-Solver++/DDIM/DEIS).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils import atomic_write
from ._expint import lincomb, point
from .base import FirstEvaluation, Problem, Solver, Wrapper, get, register

__all__ = ["DCRatios", "CPRModel", "DynamicCompensation", "lagrange_weights", "cpr_features"]

_VERSION = 2  # 2: DCRatios record grid, NFE, base and fit method
AUTHORS_CPR = "dc_solver_cpr_sd2.1.json"  # the authors' released CPR coefficients (assets/)
Rho = float | Tensor  # a ratio; a 0-d tensor while fitting by gradient


def lagrange_weights(nodes: Sequence[float], tau: Rho) -> list[Any]:
    """Weights ``w_k`` with ``p(tau) = sum_k w_k m_k`` for the polynomial through ``(nodes[k], m_k)``
    (floats, or 0-d tensors when ``tau`` is one)."""
    if len(set(nodes)) != len(nodes):
        raise ValueError(f"Lagrange nodes must be distinct, got {list(nodes)}")
    return [math.prod([(tau - tj) / (tk - tj) for j, tj in enumerate(nodes) if j != k]) for k, tk in enumerate(nodes)]


def cpr_features(
    steps: int, guidance: float, i: int, degree: int = 3, cfg_scale: float = 12.0, nfe_scale: float = 50.0
) -> list[float]:
    """The ``9 (degree + 1)`` monomials ``u^a g^(2-b) n^(2-c)`` of CPR (authors' coefficient order ``[a][b][c]``)."""
    u, g, n = (i + 1) / steps, guidance / cfg_scale, steps / nfe_scale
    return [u**a * g ** (2 - b) * n ** (2 - c) for a in range(degree + 1) for b in range(3) for c in range(3)]


# --- artifacts ---------------------------------------------------------------------------------------
def _save(path: str | os.PathLike[str], kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    header = {"format": kind, "version": str(_VERSION), "meta": json.dumps(meta)}
    with atomic_write(path) as tmp:
        save_file({k: v.detach().to(torch.float64).contiguous() for k, v in tensors.items()}, str(tmp), metadata=header)
    return path


def _load(
    path: str | os.PathLike[str], kind: str, versions: Sequence[str] = (str(_VERSION),)
) -> tuple[dict[str, Tensor], dict[str, Any], str]:
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
    if header.get("version") not in versions:
        raise ValueError(f"{path}: {kind} version {header.get('version')!r} is not supported (want {_VERSION})")
    try:
        meta = json.loads(header["meta"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: corrupt {kind} metadata ({e})") from e
    return tensors, meta, str(header["version"])


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


def _canonical(config: Any) -> str:
    return json.dumps(json.loads(json.dumps(config)), sort_keys=True)  # tuples -> lists, keys sorted


@dataclass(frozen=True)
class DCRatios:
    """Fitted compensation ratios ``rho_i`` (one per step) with what they were fitted on: the grid ``ts``,
    the ``nfe`` and the base solver's config (``solver``, JSON). ``ts``/``nfe``/``solver`` empty: not
    checked on use (CPR predictions, hand-written ratios)."""

    ratios: tuple[float, ...]  # rho_i; rho_i = 1 for i < dc_order
    dc_order: int = 2  # K of the interpolation the ratios were fitted with
    guidance: float = 1.0  # guidance scale of the fit (a CPR input)
    model: str = ""  # provenance: the model's name
    solver: str = ""  # the base solver's config (JSON); checked on use when set
    ts: tuple[float, ...] | None = None  # the grid fitted on; checked on use when set
    nfe: int | None = None  # the budget fitted at; checked on use when set
    fit: str = ""  # how: "bounded" | "adamw" | "cpr" | ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratios", _check_ratios(self.ratios, self.dc_order))
        if not math.isfinite(self.guidance):
            raise ValueError(f"guidance must be finite, got {self.guidance}")
        if self.ts is not None:
            object.__setattr__(self, "ts", _floats("ts", self.ts, len(self.ratios) + 1))
        if self.nfe is not None and (not isinstance(self.nfe, int) or self.nfe < 1):
            raise ValueError(f"nfe must be None or a positive int, got {self.nfe!r}")

    def to_dict(self) -> dict[str, Any]:
        return {
            f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DCRatios:
        allowed = {f.name for f in dataclasses.fields(cls)}
        if not set(d) <= allowed or "ratios" not in d:
            raise ValueError(f"DC ratios take keys {sorted(allowed)} ('ratios' required), got {sorted(d)}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def check(self, base: Solver[Any], ts: Tensor, nfe: int) -> None:
        """``ValueError`` unless these ratios were fitted for ``base`` on the grid ``ts`` at ``nfe``."""
        steps = len(ts) - 1
        refit = "refit them for this setting (dpmlab.calibrate.dc.fit_dc_ratios / dpmlab calibrate dc)"
        if len(self.ratios) != steps:
            raise ValueError(f"{len(self.ratios)} dc ratios for a grid of {steps} steps; {refit}")
        if self.ts is not None and not torch.allclose(
            torch.tensor(self.ts, dtype=torch.float64), ts.detach().cpu().to(torch.float64), rtol=1e-9, atol=1e-12
        ):
            got, want = ", ".join(f"{t:.4g}" for t in ts.tolist()), ", ".join(f"{t:.4g}" for t in self.ts)
            raise ValueError(f"dc ratios were fitted on the grid [{want}], not [{got}]; {refit}")
        if self.nfe is not None and nfe != self.nfe:
            raise ValueError(f"dc ratios were fitted at nfe={self.nfe}, this run uses nfe={nfe}; {refit}")
        if self.solver and _canonical(json.loads(self.solver)) != _canonical(base.config()):
            raise ValueError(f"dc ratios were fitted for base {self.solver}, not {json.dumps(base.config())}; {refit}")

    def save(self, path: str | os.PathLike[str]) -> Path:
        meta = {k: v for k, v in self.to_dict().items() if k != "ratios"}
        return _save(path, "dpmlab.dc_ratios", {"ratios": torch.tensor(self.ratios, dtype=torch.float64)}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, allow_unchecked: bool = False) -> DCRatios:
        """Read an artifact. Version-1 files (before ratios recorded their grid, NFE and base) are refused
        unless ``allow_unchecked=True``: then they load without those records and are not checked on use."""
        tensors, meta, version = _load(path, "dpmlab.dc_ratios", ("1", str(_VERSION)))
        if version == "1" and not allow_unchecked:
            raise ValueError(
                f"{path} is a version-1 dc_ratios artifact: it does not record the grid, NFE and base it "
                "was fitted on; refit it (dpmlab calibrate dc ... / fit_dc_ratios) or load it with "
                "DCRatios.load(path, allow_unchecked=True) to use it unchecked"
            )
        if set(tensors) != {"ratios"} or tensors["ratios"].ndim != 1:
            raise ValueError(f"{path}: a dc_ratios artifact holds one 1-d tensor 'ratios', got {sorted(tensors)}")
        try:
            return cls.from_dict({**meta, "ratios": tuple(tensors["ratios"].tolist())})
        except TypeError as e:
            raise ValueError(f"{path}: bad dc_ratios metadata ({e})") from e


@dataclass(frozen=True)
class CPRModel:
    """Cascade polynomial regression: ``rho_i`` as a polynomial in (step fraction, guidance, steps) of
    degree ``len(coeffs) / 9 - 1`` in the step fraction."""

    coeffs: tuple[float, ...]  # 9 (degree + 1) coefficients C[a][b][c], flattened (see cpr_features)
    dc_order: int = 2  # K: rho_i = 1 for i < K
    cfg_scale: float = 12.0  # guidance is divided by this (authors: 12)
    nfe_scale: float = 50.0  # steps are divided by this (authors: 50)
    model: str = ""  # provenance

    def __post_init__(self) -> None:
        c = _floats("coeffs", self.coeffs)
        if len(c) % 9:
            raise ValueError(f"coeffs must be 9 (degree + 1) finite numbers (27: quadratic, 36: cubic), got {len(c)}")
        object.__setattr__(self, "coeffs", c)
        _check_order(self.dc_order)
        if not (self.cfg_scale > 0 and self.nfe_scale > 0):
            raise ValueError(f"cfg_scale and nfe_scale must be > 0, got {self.cfg_scale}, {self.nfe_scale}")

    @property
    def degree(self) -> int:
        return len(self.coeffs) // 9 - 1

    def ratio(self, steps: int, guidance: float, i: int) -> float:
        if i < self.dc_order:
            return 1.0
        f = cpr_features(steps, guidance, i, self.degree, self.cfg_scale, self.nfe_scale)
        return sum(c * x for c, x in zip(self.coeffs, f))

    def predict(self, steps: int, guidance: float = 1.0) -> DCRatios:
        """Ratios for a grid of ``steps`` steps at guidance scale ``guidance`` (not tied to one grid)."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        rs = tuple(self.ratio(steps, guidance, i) for i in range(steps))
        return DCRatios(rs, self.dc_order, float(guidance), self.model, fit="cpr")

    def save(self, path: str | os.PathLike[str]) -> Path:
        meta = {
            "dc_order": self.dc_order,
            "cfg_scale": self.cfg_scale,
            "nfe_scale": self.nfe_scale,
            "model": self.model,
        }
        return _save(path, "dpmlab.dc_cpr", {"coeffs": torch.tensor(self.coeffs, dtype=torch.float64)}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CPRModel:
        tensors, meta, _ = _load(path, "dpmlab.dc_cpr", ("1", str(_VERSION)))
        if set(tensors) != {"coeffs"}:
            raise ValueError(f"{path}: a dc_cpr artifact holds exactly one tensor 'coeffs', got {sorted(tensors)}")
        try:
            c = tuple(tensors["coeffs"].reshape(-1).tolist())
            return cls(c, meta["dc_order"], meta["cfg_scale"], meta["nfe_scale"], meta["model"])
        except KeyError as e:
            raise ValueError(f"{path}: dc_cpr metadata lacks {e}") from e

    @classmethod
    def from_npy(cls, path: str | os.PathLike[str], model: str = "") -> CPRModel:
        """The authors' coefficient file (``cpr_coeffs_path/*.npy``, read without pickle)."""
        import numpy as np

        try:
            c = np.load(Path(path), allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path} is not a readable .npy coefficient file: {e}") from e
        return cls(tuple(c.reshape(-1).tolist()), model=model or Path(path).stem)

    @classmethod
    def authors_sd21(cls) -> CPRModel:
        """The authors' released CPR for Stable Diffusion 2.1 (UniPC-2 bh2 base, dc_order 2), shipped as numbers."""
        card = json.loads((resources.files("dpmlab") / "assets" / AUTHORS_CPR).read_text())
        return cls(tuple(card["coeffs"]), 2, 12.0, 50.0, card["model"])


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
    ratios: DCRatios | tuple[float, ...] | None = None  # rho_i per step: a DCRatios (checked on use) or numbers
    dc_order: int = 2  # K: Lagrange interpolation through K + 1 buffered outputs (paper default 2)

    paper = "Zhao et al. 2024, DC-Solver (arXiv 2409.03755)"
    order_test_options = {"base": {"name": "unipc", "lower_order_final": False, "final_corrector": True}}

    def pending_output(self, state: DCState) -> Tensor | None:
        return self.base.pending_output(state.base)  # the base's reused evaluation (compensated when stepping)

    def __post_init__(self) -> None:
        if isinstance(self.base, Mapping):  # from config(): {"name": ..., **options}
            object.__setattr__(self, "base", get(**self.base))
        if not isinstance(self.base, Solver) or self.base.is_stochastic():
            raise ValueError(f"base must be a deterministic Solver, got {self.base!r}")
        _check_order(self.dc_order)
        if isinstance(self.ratios, Mapping):  # from config()
            object.__setattr__(self, "ratios", DCRatios.from_dict(self.ratios))
        if isinstance(self.ratios, DCRatios):
            if self.ratios.dc_order != self.dc_order:
                raise ValueError(f"ratios were fitted with dc_order={self.ratios.dc_order}, solver has {self.dc_order}")
        elif self.ratios is not None:
            object.__setattr__(self, "ratios", _check_ratios(self.ratios, self.dc_order))

    @property
    def rhos(self) -> tuple[float, ...] | None:
        """The ratios as numbers (``None``: rho = 1, the base itself)."""
        return self.ratios.ratios if isinstance(self.ratios, DCRatios) else self.ratios

    def config(self) -> dict[str, Any]:
        out = super().config()
        if isinstance(self.ratios, DCRatios):
            out["ratios"] = self.ratios.to_dict()
        return out

    @property
    def form(self) -> str:
        """Space of the compensation: the base's ``prediction`` ("data" | "noise"), else data (x0)."""
        p = getattr(self.base, "prediction", "data")
        return p if p in ("data", "noise") else "data"

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> DCState:
        if isinstance(self.ratios, DCRatios):
            self.ratios.check(self.base, ts, self.nfe(ts, problem.schedule))
        elif self.ratios is not None and len(self.ratios) != len(ts) - 1:
            raise ValueError(f"{len(self.ratios)} dc ratios for a grid of {len(ts) - 1} steps; fit them for this grid")
        return DCState(base=self.base.init(problem, x, ts))

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: DCState) -> tuple[Tensor, DCState]:
        rhos = self.rhos
        return self.step_with(problem, x, ts, i, state, 1.0 if rhos is None else rhos[i])

    def step_with(
        self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: DCState, rho: Rho
    ) -> tuple[Tensor, DCState]:
        """One step with ratio ``rho`` (a 0-d tensor makes the result differentiable in it: the gradient fit)."""
        t = float(ts[i])
        active = len(state.ms) >= self.dc_order and (isinstance(rho, Tensor) or rho != 1.0)

        def compensate(m: Tensor) -> Tensor | None:  # eq. (10); None: unchanged
            if not active:
                return None
            tau = state.ts[-1] + rho * (t - state.ts[-1])  # eq. (9): t_{i-1} + rho_i (t_i - t_{i-1})
            w = lagrange_weights((t, *state.ts[::-1]), tau)
            return lincomb(w, (m, *state.ms[::-1]))

        pending = self.base.pending_output(state.base)
        if pending is not None:  # a PC base will reuse its corrector's evaluation: compensate that one
            m_dc = compensate(pending)
            m = pending if m_dc is None else m_dc
            base_state = state.base if m_dc is None else self.base.with_pending_output(state.base, m_dc)
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
        return x_next, DCState(base_next, (state.ts + (t,))[-k:], (state.ms + (m.detach(),))[-k:])
