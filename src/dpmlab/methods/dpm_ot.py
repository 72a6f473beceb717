"""DPM-OT — Zezeng Li, Shenghao Li, Zhanpeng Wang, Na Lei, Zhongxuan Luo & Xianfeng Gu, "DPM-OT: A New Diffusion
Probabilistic Model Based on Optimal Transport", ICCV 2023, arXiv 2307.11308; authors' code cognaclee/DPM-OT (read at
b7956eb: ``ot_utils/optimal_transport.py``, ``ot_utils/ot_util.py``, ``runners/ncsn_runner.py``), whose OT part is
AE-OT's (An et al., ICLR 2020).

Targets: training points noised to a late level ``sigma_k`` (VE units, ``sigma = sigma_t / alpha_t``):
``y_j = x_j + sigma_k eps_j``, ``j = 1..M``, weights ``nu_j = 1/M``. Semi-discrete OT from a source ``mu`` (uniform on
[0, 1]^D as in the authors' code, or N(0, I)) to ``sum_j nu_j delta_{y_j}``: the Brenier potential

    u_h(x) = max_j <x, y_j> + h_j,    T(x) = y_{argmax_j <x, y_j> + h_j},

with heights ``h`` minimising the convex energy ``E(h) = E_mu[u_h(X)] - sum_j nu_j h_j`` whose gradient is
``g_j(h) - nu_j``, ``g_j`` the mu-measure of cell j. ``OTObjective`` is that energy on ``dpmlab.training.fit``: the
source batch is the Monte-Carlo sample, autograd gives the histogram gradient ``g - nu`` and AdamW (lr 0.1, betas
0.9 / 0.999, no decay) is the authors' Adam on h; the trainer's EMA is a Polyak average of h. h starts at
``-<E_mu[u], y_j>`` (the source centred). ``fit_pot`` solves the
same problem with POT's ``ot.semidiscrete.solve_semidiscrete`` (averaged SGD, squared-Euclidean cost:
``h_j = (g_j - |y_j|^2) / 2`` for POT's potential g) — the cross-check of the tests.

Sampling: ``x_k = alpha_k T(u)`` for fresh ``u ~ mu``, then any dpmlab solver from ``t_k`` (``sigma_t / alpha_t =
sigma_k``) to 0 — the short tail. ``topk > 1`` (AE-OT's generation): among the next ``topk - 1`` cells of ``u`` pick
the one whose supporting plane's normal ``(y, -1)/|(y, -1)|`` makes the smallest angle with the winner's; if that angle,
normalised to [0, 1] by the fitted range, is at most ``angle_thresh`` the start is ``(1 - mix) y_1 + mix y_m``, else
``y_1`` (no interpolation across a large angle: a "singular" boundary between modes).

Deviations: the authors noise *test* images to the 10th-last of 232 NCSNv2 levels (sigma ~ 0.014 on CIFAR-10) and run
annealed Langevin (2 levels x 5 steps); here ``sigma_k`` is a setting, the model any dpmlab denoiser and the tail any
dpmlab solver. h starts at the centred-source value instead of 0 (in [0, 1]^784 the offsets ``<0.5, y_j>`` differ
by hundreds, which Adam at lr 0.1 needs thousands of steps to climb; the authors warm-start from a saved h). The
authors' stopping rule (|g - nu| < 8e-4, doubling the MC batch) is replaced by a fixed number of
trainer steps; the fit's |g - nu| and empty cells are reported in the model card. Their ``topk > 1`` path calls a
function missing from the repository; AE-OT's version (pairs from a batch, normalised by the batch's angle range,
weight ``dissim = 0.75`` in index order, unique first cells, shuffled) is made per-sample and batch-independent: the
angle range is measured once on a fixed source sample, ``mix`` (default 0.25) weights the neighbour.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import counter_normal, dataclass_from_dict
from ..models.hub import load as load_model
from ..models.hub import load_state
from ..solvers.base import Problem, SeededNoise, Solver, get
from ..solvers.base import sample as run
from ..timesteps import make_grid
from ..training.data import Dataset
from ..typing import DenoiserFn
from . import Method, MethodRecipe, register_method, save_method_model

__all__ = [
    "Source",
    "DPMOT",
    "BrenierPotential",
    "OTObjective",
    "DPMOTModel",
    "source_sample",
    "noised_targets",
    "fit_pot",
    "sample",
]

SOURCE_STREAM, TARGET_STREAM = 0x07A1, 0x07A2  # counter_normal streams of the source draws and the target noise


class Source(enum.Enum):
    UNIFORM = "uniform"  # uniform on [0, 1]^D (authors' code)
    NORMAL = "normal"  # N(0, I)


def source_sample(source: Source | str, idx: Tensor, dim: int, *, seed: int = 0) -> Tensor:
    """Source points ``(len(idx), dim)`` float64; row ``b`` depends only on ``(seed, idx[b])``."""
    z = counter_normal(seed, idx, SOURCE_STREAM, (dim,), dtype=torch.float64)
    return torch.special.ndtr(z) if Source(source) is Source.UNIFORM else z


def noised_targets(x: Tensor, sigma: float, *, seed: int = 0) -> Tensor:
    """``y_j = x_j + sigma eps_j`` flattened to ``(M, D)`` float64; ``eps_j`` from ``(seed, j)``."""
    flat = x.double().flatten(1)
    return flat + sigma * counter_normal(
        seed, torch.arange(len(x)), TARGET_STREAM, (flat.shape[1],), dtype=torch.float64
    )


@dataclass(frozen=True)
class DPMOT:
    """DPM-OT settings (a method recipe's ``method`` section)."""

    model: str | None = "digits8"  # the diffusion model of the tail (dpmlab.load name or path); None: pass one
    sigma: float = 0.5  # sigma_k (VE units) of the targets and of the tail's start
    n_targets: int | None = None  # M: a seeded random subset of the data (None: all of it)
    source: Source = Source.UNIFORM
    seed: int = 0  # the subset and the target noise

    def __post_init__(self) -> None:
        object.__setattr__(self, "source", Source(self.source))
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise ValueError(f"DPM-OT sigma must be a positive number, got {self.sigma!r}")
        if self.n_targets is not None and not (isinstance(self.n_targets, int) and self.n_targets >= 2):
            raise ValueError(f"DPM-OT n_targets must be an int >= 2 or None, got {self.n_targets!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "source": self.source.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DPMOT:
        return dataclass_from_dict(cls, d, what="DPM-OT method")

    def targets(self, data: Tensor) -> Tensor:
        """The noised targets ``(M, D)`` of ``data`` (N, ...)."""
        if self.n_targets is not None and self.n_targets > len(data):
            raise ValueError(f"DPM-OT n_targets={self.n_targets} exceeds the {len(data)} data points")
        pick = (
            torch.randperm(len(data), generator=torch.Generator().manual_seed(self.seed))[: self.n_targets]
            if self.n_targets is not None
            else torch.arange(len(data))
        )
        return noised_targets(data[pick.sort().values], self.sigma, seed=self.seed)


class BrenierPotential(nn.Module):
    """``u_h(x) = max_j <x, y_j> + h_j``: buffers ``targets`` (M, D), ``weights`` (M,), parameter ``h`` (M,)."""

    targets: Tensor
    weights: Tensor

    def __init__(self, targets: Tensor, weights: Tensor | None = None) -> None:
        super().__init__()
        m = len(targets)
        self.register_buffer("targets", targets.float().flatten(1).contiguous())
        self.register_buffer("weights", torch.full((m,), 1.0 / m) if weights is None else weights.float())
        self.h = nn.Parameter(torch.zeros(m))

    def forward(self, u: Tensor) -> Tensor:
        """Scores ``<u, y_j> + h_j`` ``(B, M)``."""
        return u.to(self.targets) @ self.targets.T + self.h

    def topk(self, u: Tensor, k: int = 1, *, chunk: int = 4096) -> Tensor:
        """Indices ``(B, k)`` of the ``k`` best cells of each source point (first: its Laguerre cell)."""
        with torch.no_grad():
            return torch.cat([self(c).topk(k, dim=1).indices for c in u.split(chunk)])

    def measure(self, u: Tensor) -> Tensor:
        """The fraction of the source sample ``u`` in each cell ``(M,)`` (Monte Carlo ``g(h)``)."""
        return torch.bincount(self.topk(u, 1)[:, 0], minlength=len(self.h)).double() / len(u)


class OTObjective:
    """``TrainObjective`` of the semi-discrete OT: the energy ``mean_b max_j(<u_b, y_j> + h_j) - <nu, h>`` on a
    source batch ``u`` (``train.batch_size`` = the Monte-Carlo batch)."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        self.recipe, self.dataset, self.name = recipe, dataset, recipe.name
        self.settings: DPMOT = recipe.settings
        self.potential = BrenierPotential(self.settings.targets(dataset.x))
        mean = 0.5 if self.settings.source is Source.UNIFORM else 0.0  # E[u] per coordinate
        with torch.no_grad():  # h_j = -<E u, y_j>: centre the source (removes an O(D) offset Adam would climb)
            self.potential.h.copy_(-mean * self.potential.targets.sum(1))
        self.module: nn.Module = self.potential

    def __len__(self) -> int:  # the source is continuous: a long epoch keeps the trainer's data order cheap
        return max(len(self.potential.h), 2**16)

    def config(self) -> dict[str, Any]:
        return self.recipe.config()

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        shape = (len(idx), self.potential.targets.shape[1])
        uniform = self.settings.source is Source.UNIFORM
        return {"u": torch.rand(shape, generator=g) if uniform else torch.randn(shape, generator=g)}

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        pot = self.potential  # the same parameters as module's (which may wrap it for processes)
        return module(batch["u"]).max(dim=1).values.mean() - (pot.weights * pot.h).sum()

    def _info(self) -> dict[str, Any]:
        return {"name": "dpm_ot", "settings": self.settings.to_dict(), "data_shape": list(self.dataset.shape)}

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        pot: BrenierPotential = ema  # type: ignore[assignment]
        n = min(200_000, max(100 * len(pot.h), 20_000))  # a perfect fit measures |g - nu| ~ mc_noise_l2
        err = (
            pot.measure(source_sample(self.settings.source, torch.arange(n), pot.targets.shape[1], seed=12345))
            - pot.weights.double()
        )
        nu = pot.weights.double()
        fit = {
            "mc_points": n,
            "g_minus_nu_l2": float(err.norm()),
            "mc_noise_l2": math.sqrt(float((nu * (1 - nu)).sum()) / n),
            "max_rel_error": float((err / nu).abs().max()),
            "empty_cells": int((err == -nu).sum()),
        }
        return save_method_model(out_dir, ema, {**self._info(), "fit": fit}, self.recipe, self.dataset, card)

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}


def fit_pot(
    targets: Tensor,
    source: Source | str = Source.UNIFORM,
    *,
    weights: Tensor | None = None,
    iters: int = 10_000,
    batch: int = 32,
    seed: int = 0,
) -> Tensor:
    """Brenier heights ``h`` (M,) from POT's semi-discrete solver (projected averaged SGD with decreasing entropic
    regularisation, squared-Euclidean cost), centred; the source is sampled from a seeded torch generator."""
    from ot.semidiscrete import solve_semidiscrete

    y = targets.double().flatten(1)
    g = torch.Generator().manual_seed(seed)
    uniform = Source(source) is Source.UNIFORM

    def draw(b: int) -> Tensor:
        shape = (b, y.shape[1])
        return (
            torch.rand(shape, generator=g, dtype=torch.float64)
            if uniform
            else torch.randn(shape, generator=g, dtype=torch.float64)
        )

    pot = solve_semidiscrete(
        y, draw, a_target=None if weights is None else weights.double(), max_iter=iters, batch_size=batch
    )
    h = (pot - y.square().sum(1)) / 2  # argmin |x - y|^2 - g = argmax <x, y> + (g - |y|^2) / 2
    return h - h.mean()


def _normals(y: Tensor) -> Tensor:
    n = torch.cat([y.double(), -torch.ones(len(y), 1, dtype=torch.float64)], 1)
    return n / n.norm(dim=1, keepdim=True)


@dataclass(frozen=True, eq=False)
class DPMOTModel:
    """A fitted DPM-OT: the ``potential``, the settings, the data shape, the tail's ``denoiser`` (``None``: pass one
    to ``sample``) and the range of neighbour-normal angles used by ``topk > 1``."""

    potential: BrenierPotential
    settings: DPMOT
    data_shape: tuple[int, ...]
    denoiser: DenoiserFn | None = None
    angle_range: tuple[float, float] = (0.0, math.pi)

    @classmethod
    def build(
        cls,
        potential: BrenierPotential,
        settings: DPMOT,
        data_shape: tuple[int, ...],
        denoiser: DenoiserFn | None = None,
        *,
        k: int = 5,
    ) -> DPMOTModel:
        """Measure the angle range on 4,096 fixed source points (their top-``k`` neighbours) and build."""
        pot = potential.eval().requires_grad_(False)
        k = min(k, len(pot.h))
        top = pot.topk(source_sample(settings.source, torch.arange(4096), pot.targets.shape[1], seed=54321), k)
        nm = _normals(pot.targets)
        theta = torch.acos((nm[top[:, :1]] * nm[top[:, 1:]]).sum(-1).clamp(-1, 1)) if k > 1 else torch.zeros(1)
        return cls(pot, settings, tuple(data_shape), denoiser, (float(theta.min()), float(theta.max())))

    def start(
        self, idx: Tensor, *, seed: int = 0, topk: int = 1, angle_thresh: float = 0.7, mix: float = 0.25
    ) -> tuple[Tensor, Tensor]:
        """The OT map of the source points ``idx`` (VE units, ``(B, *data_shape)`` float64) and their cells (B,)."""
        if not (isinstance(topk, int) and 1 <= topk <= len(self.potential.h)) or not 0 <= mix <= 1:
            raise ValueError(
                f"need an int 1 <= topk <= M={len(self.potential.h)} and 0 <= mix <= 1, got topk={topk!r}, mix={mix!r}"
            )
        y = self.potential.targets.double()
        top = self.potential.topk(source_sample(self.settings.source, idx, y.shape[1], seed=seed), topk)
        out = y[top[:, 0]]
        if topk > 1:
            nm = _normals(y)
            theta = torch.acos((nm[top[:, :1]] * nm[top[:, 1:]]).sum(-1).clamp(-1, 1))  # (B, topk - 1)
            lo, hi = self.angle_range
            best, m = ((theta - lo) / max(hi - lo, 1e-12)).min(dim=1)
            w = torch.where(best <= angle_thresh, mix, 0.0)[:, None].double()
            out = (1 - w) * out + w * y[top.gather(1, 1 + m[:, None])[:, 0]]
        return out.reshape(len(idx), *self.data_shape), top[:, 0]

    def sample(
        self,
        n: int = 64,
        *,
        denoiser: DenoiserFn | None = None,
        solver: str | Solver[Any] = "heun",
        nfe: int = 9,
        grid: str = "karras",
        seed: int = 0,
        topk: int = 1,
        angle_thresh: float = 0.7,
        mix: float = 0.25,
    ) -> Tensor:
        """See ``dpmlab.methods.dpm_ot.sample``; ``denoiser`` defaults to the settings' model."""
        den = denoiser if denoiser is not None else self.denoiser
        if den is None:
            raise ValueError("this DPM-OT model names no diffusion model (settings.model is None); pass denoiser=")
        return sample(
            self, den, n, solver=solver, nfe=nfe, grid=grid, seed=seed, topk=topk, angle_thresh=angle_thresh, mix=mix
        )

    @classmethod
    def from_file(cls, path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> DPMOTModel:
        s = DPMOT.from_dict(info["settings"])
        pot = BrenierPotential(tensors["targets"], tensors["weights"])
        load_state(path, pot, tensors)
        return cls.build(pot, s, tuple(info["data_shape"]), load_model(s.model) if s.model is not None else None)


def sample(
    ot: DPMOTModel,
    model: DenoiserFn,
    n: int = 64,
    *,
    solver: str | Solver[Any] = "heun",
    nfe: int = 9,
    grid: str = "karras",
    seed: int = 0,
    topk: int = 1,
    angle_thresh: float = 0.7,
    mix: float = 0.25,
) -> Tensor:
    """``n`` DPM-OT samples: ``x_k = alpha_k T(u)`` (``topk`` / ``angle_thresh`` / ``mix`` as in ``start``), then
    ``solver`` from ``t_k`` (``sigma_t / alpha_t = sigma_k``) to sigma = 0 on ``grid`` at exactly ``nfe`` evaluations.
    ``model``: an x0-denoiser with ``.schedule`` and ``.data_shape``. Sample ``i`` depends only on ``(seed, i)``."""
    sch = model.schedule  # type: ignore[attr-defined]
    if tuple(model.data_shape) != ot.data_shape:  # type: ignore[attr-defined]
        raise ValueError(f"the model samples shape {tuple(model.data_shape)}, the OT targets have {ot.data_shape}")  # type: ignore[attr-defined]
    slv = get(solver) if isinstance(solver, str) else solver
    t_k = float(sch.t_of_sigma_over_alpha(torch.tensor(ot.settings.sigma, dtype=torch.float64)))
    if not sch.t_min <= t_k <= sch.t_max:
        raise ValueError(f"sigma_k={ot.settings.sigma} lies outside the model's schedule {sch!r}")
    ts = make_grid(sch, grid, slv.steps_for_nfe(nfe, True), to_zero=True, t_start=t_k)
    idx = torch.arange(n)
    y, _ = ot.start(idx, seed=seed, topk=topk, angle_thresh=angle_thresh, mix=mix)
    x = (float(sch.alpha(torch.tensor(t_k, dtype=torch.float64))) * y).float()
    with torch.no_grad():
        return run(Problem(model, sch, noise=SeededNoise(seed, idx)), x, ts, slv)


register_method(Method("dpm_ot", DPMOT, OTObjective, DPMOTModel.from_file))
