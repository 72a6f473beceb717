"""DPM-Solver-v3's empirical model statistics (``EMS``: ``l, s, b`` on a ``lam`` grid, saved as
safetensors) and the integrals of its update over piecewise-linear statistics (``_Coeffs``) — Zheng,
Lu, Chen et al., "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model Statistics",
NeurIPS 2023, arXiv 2310.13268. Shared by ``dpm_solver_v3`` and USF's v3 steps (``usf``); the solver and
the equations are documented in ``dpm_solver_v3``."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._utils import atomic_write, f64
from .._version import __version__

__all__ = ["EMS", "EMS_FORMAT", "DEGENERATE"]

EMS_FORMAT = "dpmlab.ems/1"
DEGENERATE = {"data": (1.0, 0.0, 0.0), "noise": (0.0, -1.0, 0.0)}  # (l, s, b): DPM-Solver++ / DPM-Solver
_TENSORS = ("lam", "l", "s", "b")


@dataclass(frozen=True, eq=False)
class EMS:
    """Empirical model statistics ``l, s, b`` (each ``(K, *data_shape)``) on a ``lam`` grid ``(K,)``."""

    lam: Tensor  # strictly increasing half log-SNR knots
    l: Tensor  # E diag(d(sigma eps)/dx)                      (eq. 5, 58)
    s: Tensor  # Cov(f', f) / Var(f)                           (eq. 11, 60)
    b: Tensor  # E f' - s E f                                  (eq. 61)
    model: str = ""  # name / hash of the model (and checkpoint) they were fitted on
    guidance_scale: float | None = None  # EMS are per guidance scale (paper, App. D.5)
    schedule: str = ""  # repr of the noise schedule
    n_points: int = 0  # datapoints per grid point
    version: str = __version__  # dpmlab version that fitted them

    def __post_init__(self) -> None:
        for k in _TENSORS:
            v = getattr(self, k)
            if not isinstance(v, Tensor) or not bool(torch.isfinite(v).all()):
                raise ValueError(f"EMS {k} must be a tensor of finite values, got {type(v).__name__}")
            object.__setattr__(self, k, v.detach().to(torch.float64).contiguous())
        if self.lam.ndim != 1 or self.lam.numel() < 2 or not bool((self.lam.diff() > 0).all()):
            raise ValueError(f"EMS lam must be a strictly increasing 1-d grid of >= 2 knots, got {self.lam.tolist()}")
        if not self.l.shape == self.s.shape == self.b.shape or self.l.shape[:1] != self.lam.shape:
            raise ValueError(
                f"EMS l, s, b need one shape ({self.lam.numel()}, ...), got "
                f"{[tuple(getattr(self, k).shape) for k in 'lsb']}"
            )

    @property
    def grid_size(self) -> int:
        return self.lam.numel() - 1

    def _meta(self) -> dict[str, str]:
        return {
            "format": EMS_FORMAT,
            "model": self.model,
            "guidance_scale": repr(self.guidance_scale),
            "schedule": self.schedule,
            "n_points": str(self.n_points),
            "grid_size": str(self.grid_size),
            "dpmlab_version": self.version,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EMS):
            return NotImplemented
        return self._meta() == other._meta() and all(
            getattr(self, k).shape == getattr(other, k).shape and torch.equal(getattr(self, k), getattr(other, k))
            for k in _TENSORS
        )

    def __hash__(self) -> int:
        return hash((self.model, self.schedule, tuple(self.l.shape)))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write a safetensors file (tensors ``lam, l, s, b``; metadata as strings) atomically."""
        from safetensors.torch import save_file

        with atomic_write(path) as tmp:
            save_file({k: getattr(self, k) for k in _TENSORS}, str(tmp), metadata=self._meta())

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, model: str | None = None) -> EMS:
        """Read and validate a saved EMS; ``model`` (if given) must equal the name it was fitted on."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta, tensors = fh.metadata() or {}, {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            raise ValueError(f"{path}: not a readable EMS file ({e})") from e
        if meta.get("format") != EMS_FORMAT:
            raise ValueError(f"{path}: format {meta.get('format')!r}, expected {EMS_FORMAT!r}")
        if sorted(tensors) != sorted(_TENSORS):
            raise ValueError(f"{path}: tensors {sorted(tensors)}, expected {sorted(_TENSORS)}")
        try:
            gs = meta.get("guidance_scale", "None")
            ems = cls(
                **tensors,
                model=meta.get("model", ""),
                guidance_scale=None if gs == "None" else float(gs),
                schedule=meta.get("schedule", ""),
                n_points=int(meta.get("n_points", "0")),
                version=meta.get("dpmlab_version", ""),
            )
            if int(meta.get("grid_size", "-1")) != ems.grid_size:
                raise ValueError(f"grid_size {meta.get('grid_size')} does not match {ems.grid_size + 1} knots")
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: invalid EMS: {e}") from e
        if model is not None and model != ems.model:
            raise ValueError(
                f"{path}: EMS were fitted on model {ems.model!r}, not on {model!r}; "
                "EMS must match the checkpoint and guidance scale"
            )
        return ems


# --- integrals of eq. (12) for piecewise-linear l, s, b ----------------------------------------------
_XI, _WI = np.polynomial.legendre.leggauss(8)
_C = torch.tensor((_XI + 1) / 2)  # Gauss-Legendre nodes on [0, 1]
_W = torch.tensor(_WI / 2)
_Q = torch.stack([_C ** (k + 1) / (k + 1) for k in range(8)], 1) @ torch.linalg.inv(
    torch.stack([_C**k for k in range(8)], 1)
)  # Q[m, q] = ∫_0^{c_m} Lagrange_q: collocation matrix
_H_MAX = 0.25  # widest panel in lam


class _Coeffs:
    """``l, s, b`` piecewise linear between knots ``lam`` (one knot: constants), float64."""

    def __init__(self, lam: Tensor, l: Tensor, s: Tensor, b: Tensor) -> None:
        self.lam, self.lsb = lam, torch.stack([l, s, b], 1)  # (K,), (K, 3, *feat)

    def at(self, q: Tensor) -> Tensor:
        """``(l, s, b)`` at ``q`` (Q,) -> (Q, 3, *feat)."""
        if self.lam.numel() == 1:
            return self.lsb.expand(q.numel(), *self.lsb.shape[1:])
        k = self.lam
        i = torch.searchsorted(k, q.contiguous()).clamp(1, k.numel() - 1)
        w = ((q - k[i - 1]) / (k[i] - k[i - 1])).reshape(-1, *[1] * (self.lsb.ndim - 1))
        return self.lsb[i - 1] + w * (self.lsb[i] - self.lsb[i - 1])

    def integrals(self, lam_s: float, lam_t: float, others: list[float], n: int) -> tuple[Any, ...]:
        """``ΔL_t, [E_0..E_n], Eb`` over ``[lam_s, lam_t]`` and ``ΔS, β`` at ``others`` (module docstring)."""
        pts, k = f64([lam_s, lam_t, *others]).to(self.lam.device), self.lam
        bp = torch.unique(torch.cat([pts, k[(k > pts.min()) & (k < pts.max())]]))  # panel ends, sorted
        w = bp.diff()
        cnt = torch.ceil(w / _H_MAX).long().clamp(min=1)
        j = torch.repeat_interleave(torch.arange(w.numel(), device=bp.device), cnt)
        q = torch.arange(j.numel(), device=bp.device) - torch.repeat_interleave(cnt.cumsum(0) - cnt, cnt)
        bp = torch.cat([bp[j] + w[j] * q / cnt[j], bp[-1:]])  # wide panels split evenly
        w, nf, (c, wq, qm) = bp.diff(), self.lsb.ndim - 2, (v.to(bp) for v in (_C, _W, _Q))
        col = lambda v: v.reshape(*v.shape, *[1] * nf)  # noqa: E731 - broadcast over the data dims
        nodes = bp[:-1, None] + w[:, None] * c  # (J, m)
        vb, vn = self.at(bp), self.at(nodes.reshape(-1)).reshape(*nodes.shape, *self.lsb.shape[1:])
        ls_b = torch.cat([torch.zeros_like(vb[:1, :2]), (col(w)[:, None] * (vb[:-1, :2] + vb[1:, :2]) / 2).cumsum(0)])
        ls_n = ls_b[:-1, None] + col(nodes - bp[:-1, None])[:, :, None] * (vb[:-1, None, :2] + vn[:, :, :2]) / 2
        idx = torch.searchsorted(bp, pts).tolist()  # every point is a panel end
        ls_n, ls_b = ls_n - ls_b[idx[0]], ls_b - ls_b[idx[0]]  # L, S relative to lam_s (exact)
        psi = torch.exp(-ls_n[:, :, 1]) * vn[:, :, 2]  # e^{-ΔS} b at the nodes
        beta_b = torch.cat([torch.zeros_like(psi[:1, 0]), (col(w) * torch.einsum("m,jm...->j...", wq, psi)).cumsum(0)])
        beta_n = beta_b[:-1, None] + col(w[:, None]) * torch.einsum("mq,jq...->jm...", qm, psi)
        beta_n, beta_b = beta_n - beta_b[idx[0]], beta_b - beta_b[idx[0]]
        lo, hi, sign = min(idx[:2]), max(idx[:2]), 1.0 if idx[1] > idx[0] else -1.0
        ew = sign * torch.exp(ls_n[lo:hi].sum(2)) * col(w[lo:hi, None] * wq)  # e^{ΔL+ΔS} x weights
        u = col(nodes[lo:hi] - lam_s)
        E = [(ew * u**p).sum((0, 1)) / math.factorial(p) for p in range(n + 1)]
        return (
            ls_b[idx[1], 0],
            E,
            (ew * beta_n[lo:hi]).sum((0, 1)),
            [ls_b[i, 1] for i in idx[2:]],
            [beta_b[i] for i in idx[2:]],
        )
