"""PFGM++ — Xu, Liu, Tian, Tong, Tegmark & Jaakkola, "PFGM++: Unlocking the Potential of Physics-Inspired
Generative Models", ICML 2023, arXiv 2302.04265; authors' code Newbeeer/pfgmpp (built on NVlabs/edm).

Data ``y`` in R^N is augmented by D dimensions; the electric field of the data in N+D dimensions defines the
generative ODE. With ``r`` the norm of the augmented coordinates, the perturbation kernel is

    p_r(x | y) ∝ 1 / (||x - y||^2 + r^2)^((N+D)/2),

sampled as in the authors' ``training/loss.py``: radius ``R = r sqrt(b / (1 - b))``, ``b ~ Beta(N/2, D/2)``,
times a uniform direction ``u``: ``x = y + R u``. (The same law is a multivariate Student-t with D degrees of
freedom and scale ``sigma = r / sqrt(D)``: ``||x - y||^2 / (N sigma^2) ~ F(N, D)``, coordinate variance
``sigma^2 D / (D - 2)``; the tests use this closed form.)

Alignment ``r = sigma sqrt(D)``: as D -> inf the kernel tends to N(y, sigma^2 I), so EDM's sigma-based training
(``ln sigma ~ N(P_mean, P_std^2)``, preconditioning, loss weight ``(sigma^2 + sd^2) / (sigma sd)^2``) is reused
with ``x = y + sigma eps~``, ``eps~ = (R / sigma) u`` (``kernel_noise``). ``D = inf`` is EDM exactly (``eps~ = eps``).

Why dpmlab's sigma-solvers sample PFGM++. At ``x~ = (x, z)``, ``||z|| = r``, the field of the data is
``E ∝ ∫ (x~ - y~) / ||x~ - y~||^(N+D) p(y) dy`` with ``y~ = (y, 0)``; its x part over its radial z part is

    dx/dr = E_x / E_r = (x - E_{p_r}[y | x]) / r,

because ``||x~ - y~||^-(N+D) = (||x - y||^2 + r^2)^-((N+D)/2) ∝ p_r(x | y)`` (one normaliser for all y). The
network minimises ``E ||D(y + n, sigma) - y||^2``, ``n ~ p_r``, so ``D(x, sigma) = E_{p_r}[y | x]``; with
``r = sigma sqrt(D)``, ``dr = sqrt(D) dsigma``:

    dx/dsigma = (x - D(x, sigma)) / sigma,

EDM's probability-flow ODE with the x0 prediction ``D``. Every deterministic dpmlab solver on the EDM schedule
integrates it; only the start differs: the prior ``p_{r_max}`` around 0 at ``r_max = sigma_max sqrt(D)``
(``prior``). Stochastic solvers add Gaussian noise (the D = inf kernel); ``sample`` refuses them for finite D.
Robustness experiment (``generate_alpha.py``): ``x <- x + alpha sigma_i z`` before every step (``NoiseInjection``).

Deviations from the authors' code: ``b`` is not clipped to ``[1e-3, 1 - 1e-3]`` (that clip changes the kernel
when N is small and D large: N = 2, D = 2048 has E[b] ~ 1e-3); the Beta draws come from numpy generators
seeded from the trainer's per-step generator (training) or from ``(seed, sample index)`` (prior).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .._utils import append_dims, counter_normal, dataclass_from_dict
from ..models.denoiser import Denoiser
from ..models.hub import load_state
from ..models.nets import ModelSpec
from ..schedules import EDM
from ..solvers.base import Problem, SeededNoise, Solver, Wrapper, get
from ..solvers.base import sample as run
from ..timesteps import make_grid
from ..training.data import Dataset
from ..training.trainer import DiffusionObjective, ModelConfig, Recipe
from ..typing import DenoiserFn
from . import Method, MethodRecipe, net_config_for, register_method, save_method_model

__all__ = ["PFGMPP", "PFGMPPObjective", "PFGMPPModel", "NoiseInjection", "kernel_noise", "prior", "sample"]


@dataclass(frozen=True)
class PFGMPP:
    """PFGM++ settings (a method recipe's ``method`` section); paper defaults (EDM's sigma range)."""

    D: float = 128.0  # augmented dimensions (> 0); math.inf (JSON "inf") is EDM
    net: str = "mlp"  # network kind: "mlp" or "unet"
    net_config: Mapping[str, Any] = field(default_factory=dict)  # its config; data shape filled in from the data
    sigma_data: float = 0.5  # EDM preconditioning
    sigma_min: float = 0.002  # end of the sampling grid
    sigma_max: float = 80.0  # start of the sampling grid; the prior sits at r_max = sigma_max sqrt(D)

    def __post_init__(self) -> None:
        d = math.inf if self.D in ("inf", math.inf) else self.D
        if isinstance(d, bool) or not isinstance(d, int | float) or not d > 0:
            raise ValueError(f"PFGM++ D must be a positive number or 'inf', got {self.D!r}")
        object.__setattr__(self, "D", float(d))
        object.__setattr__(self, "net_config", dict(self.net_config))
        if not 0 < self.sigma_min < self.sigma_max or not self.sigma_data > 0:
            raise ValueError(
                f"need 0 < sigma_min < sigma_max and sigma_data > 0, got sigma_min={self.sigma_min}, "
                f"sigma_max={self.sigma_max}, sigma_data={self.sigma_data}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "D": "inf" if math.isinf(self.D) else self.D,
            "net_config": dict(self.net_config),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PFGMPP:
        return dataclass_from_dict(cls, d, what="PFGM++ method")


def kernel_noise(eps: Tensor, D: float, rng: np.random.Generator) -> Tensor:
    """``eps~ = n / sigma`` for ``n ~ p_r(. | 0)``, ``r = sigma sqrt(D)``: the direction of each row of ``eps``
    ``(B, *shape)`` (uniform if ``eps`` is Gaussian) times ``sqrt(D b / (1 - b))``, ``b ~ Beta(N/2, D/2)``
    drawn from ``rng``; ``eps`` itself for ``D = inf``."""
    if math.isinf(D):
        return eps
    n = eps[0].numel()
    b = np.minimum(rng.beta(n / 2, D / 2, size=eps.shape[0]), np.nextafter(1.0, 0.0))
    radius = torch.from_numpy(np.sqrt(D * b / (1.0 - b))).to(eps.device)  # R / sigma, float64
    e = eps.double()
    return (e * append_dims(radius / e.flatten(1).norm(dim=1), e.ndim)).to(eps.dtype)


def prior(
    idx: Tensor,
    shape: tuple[int, ...],
    D: float,
    sigma_max: float,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Starting points ``(len(idx), *shape)`` from ``p_{r_max}(. | 0)``, ``r_max = sigma_max sqrt(D)``: radius
    then direction; row ``b`` depends only on ``(seed, idx[b])``. ``D = inf``: ``sigma_max z``, the same start
    as ``dpmlab.sample``."""
    if math.isinf(D):
        return sigma_max * counter_normal(seed, idx, 0, shape, dtype=dtype)
    z = counter_normal(seed, idx, 0, shape, dtype=torch.float64)  # the direction
    rngs = [np.random.default_rng([int(seed), int(i), 0x9F6]) for i in idx.tolist()]
    eps = torch.cat([kernel_noise(z[k : k + 1], D, rng) for k, rng in enumerate(rngs)]) if len(z) else z
    return (sigma_max * eps).to(dtype)


@dataclass(frozen=True)
class NoiseInjection(Wrapper[Any]):
    """``x <- x + alpha sigma(t_i) z`` before each step of ``base`` (the paper's robustness test)."""

    base: Solver[Any]
    alpha: float = 0.0  # relative noise per step

    def __post_init__(self) -> None:
        if not (self.alpha >= 0 and math.isfinite(self.alpha)):
            raise ValueError(f"noise injection alpha must be a finite number >= 0, got {self.alpha!r}")

    def is_stochastic(self) -> bool:
        return self.alpha > 0 or self.base.is_stochastic()

    def init(self, problem: Problem, x: Tensor, ts: Tensor) -> Any:
        return self.base.init(problem, x, ts)

    def step(self, problem: Problem, x: Tensor, ts: Tensor, i: int, state: Any) -> tuple[Tensor, Any]:
        if self.alpha > 0:
            x = x + self.alpha * float(problem.schedule.sigma(ts[i])) * problem.randn(i, x, sub=15)
        return self.base.step(problem, x, ts, i, state)


def sample(
    model: DenoiserFn,
    n: int = 64,
    *,
    D: float,
    solver: str | Solver[Any] = "heun",
    nfe: int = 35,
    grid: str = "karras",
    seed: int = 0,
    alpha: float = 0.0,
    batch_size: int | None = None,
) -> Tensor:
    """``n`` PFGM++ samples: the prior at ``r_max = sigma(ts[0]) sqrt(D)``, then ``solver`` (deterministic for
    finite D) on ``grid`` to sigma = 0 at exactly ``nfe`` evaluations, with noise injection ``alpha``. ``model``:
    the x0 prediction on an EDM schedule (``.schedule``, ``.data_shape``). Paper default: Heun, 35 NFE, Karras."""
    slv = get(solver) if isinstance(solver, str) else solver
    if not math.isinf(D) and slv.is_stochastic():
        raise ValueError(
            f"solver {slv.name!r} is stochastic (Gaussian noise = the D = inf kernel); PFGM++ with "
            f"D={D:g} samples its ODE: use a deterministic solver, and alpha= for noise injection"
        )
    sch, shape = model.schedule, tuple(model.data_shape)  # type: ignore[attr-defined]
    if not isinstance(sch, EDM):
        raise ValueError(f"PFGM++ samples in sigma on an EDM schedule, got {sch!r}")
    slv = NoiseInjection(slv, alpha) if alpha else slv
    ts = make_grid(sch, grid, slv.steps_for_nfe(nfe, True), to_zero=True)
    outs, bs = [], batch_size or n
    for lo in range(0, n, bs):
        idx = torch.arange(lo, min(n, lo + bs))
        x = prior(idx, shape, D, float(sch.sigma(ts[0])), seed=seed)
        problem = Problem(model, sch, noise=SeededNoise(seed, idx))
        outs.append(run(problem, x, ts, slv))
    return torch.cat(outs)


class PFGMPPObjective(DiffusionObjective):
    """EDM's objective with the PFGM++ perturbation: ``DiffusionObjective`` (EDM preconditioning and weight,
    ``train.p_mean`` / ``p_std``) whose Gaussian ``eps`` is replaced by ``kernel_noise`` (one more draw from the
    step's generator); for ``D = inf`` it is the EDM ``DiffusionObjective`` draw for draw."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        s: PFGMPP = recipe.settings
        self.method_recipe = recipe
        self.settings = dataclasses.replace(s, net_config=net_config_for(s.net, s.net_config, dataset.shape))
        model = ModelConfig(net=s.net, net_config=self.settings.net_config, objective="edm", sigma_data=s.sigma_data)
        super().__init__(Recipe(recipe.name, recipe.data, model, recipe.train, description=recipe.description), dataset)

    def config(self) -> dict[str, Any]:
        return self.method_recipe.config()

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        batch = super().draw(idx, g)
        if not math.isinf(self.settings.D):
            rng = np.random.default_rng(int(torch.randint(0, 2**62, (), generator=g)))
            batch["eps"] = kernel_noise(batch["eps"], self.settings.D, rng)
        return batch

    def _info(self) -> dict[str, Any]:
        return {"name": "pfgmpp", "settings": self.settings.to_dict(), "spec": self.spec.to_dict()}

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        return save_method_model(out_dir, ema, self._info(), self.method_recipe, self.dataset, card)

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}  # no "spec": dpmlab.load must not sample it as EDM


@dataclass(frozen=True)
class PFGMPPModel:
    """A trained PFGM++ model: ``denoiser`` (x0 on ``EDM(sigma_min, sigma_max, sigma_data)``) and its settings."""

    denoiser: Denoiser
    settings: PFGMPP

    def prior(self, n: int, *, seed: int = 0) -> Tensor:
        return prior(
            torch.arange(n), tuple(self.denoiser.data_shape or ()), self.settings.D, self.settings.sigma_max, seed=seed
        )

    def sample(
        self,
        n: int = 64,
        *,
        solver: str | Solver[Any] = "heun",
        nfe: int = 35,
        grid: str = "karras",
        seed: int = 0,
        alpha: float = 0.0,
        batch_size: int | None = None,
    ) -> Tensor:
        """See ``dpmlab.methods.pfgmpp.sample``."""
        return sample(
            self.denoiser,
            n,
            D=self.settings.D,
            solver=solver,
            nfe=nfe,
            grid=grid,
            seed=seed,
            alpha=alpha,
            batch_size=batch_size,
        )

    @classmethod
    def from_file(cls, path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> PFGMPPModel:
        s = PFGMPP.from_dict(info["settings"])
        spec = ModelSpec.from_dict(info["spec"])
        net = spec.build_net()
        load_state(path, net, tensors)
        net.eval().requires_grad_(False)
        sch = EDM(sigma_min=s.sigma_min, sigma_max=s.sigma_max, sigma_data=s.sigma_data)
        return cls(spec.denoiser(net, sch), s)


register_method(Method("pfgmpp", PFGMPP, PFGMPPObjective, PFGMPPModel.from_file))
