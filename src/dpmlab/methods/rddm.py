"""RDDM — Jiawei Liu et al., "Residual Denoising Diffusion Models", CVPR 2024, arXiv 2308.13712;
authors' code nachifur/RDDM (``residual_denoising_diffusion_pytorch.py``).

Dual diffusion of the residual ``I_res = I_in - I_0`` (target ``I_0``, degraded input ``I_in``; ``I_in = 0``
for generation) and of noise, over training indices ``t = 0..T-1`` (the paper's 1..T):

    x_t = I_0 + abar_t I_res + bbar_t eps,    abar_t = sum_{i<=t} alpha_i,   bbar_t^2 = sum_{i<=t} beta_i^2,

so ``x_T = I_in + bbar_T eps``. Schedules (``coefficients``): alpha_i "decreased" (∝ T + 1 - i, sum 1), beta_i^2
"increased" (∝ i, sum ``sum_scale``; authors' default 1 for generation, 0.01 for restoration) or "average".
The network takes ``[x_t, I_in]`` (stacked on dim 1) and the index ``t`` and returns ``[I_res^, eps^]``; loss
``|I_res^ - I_res| + |eps^ - eps|`` (L1; L2 optional), elementwise mean (authors' ``pred_res_noise``).

Sampler (generalised DDIM, authors' ``ddim_sample``), from index t to s < t, ``alpha = abar_t - abar_s``,
``beta^2 = bbar_t^2 - bbar_s^2``:

    sigma^2 = eta beta^2 bbar_s^2 / bbar_t^2,
    x_s = x_t - alpha I_res^ - (bbar_t - sqrt(bbar_s^2 - sigma^2)) eps^ + sigma z,

on the authors' grid ``int(linspace(-1, T-1, steps+1))``; the last step returns ``I_0^ = x_t - abar_t I_res^ -
bbar_t eps^``. Coefficient transform (``RDDMSchedule.from_vp``): ``abar_t = 1 - sqrt(abar^DDPM_t)``,
``bbar_t = sqrt(1 - abar^DDPM_t)`` makes ``x_t`` the DDPM marginal for ``I_in = 0``; with ``I_res^ = -x0^`` and
the DDPM ``eps^`` (``predictor_from_denoiser``) the eta = 0 sampler is DDIM step for step. RDDM's eta is not DDIM's:
any per-step sigma gives the DDIM form, but eta = 1 here is ``abar^DDPM_s`` times the DDPM posterior variance.

Deviations from the authors' code: the network always sees ``[x_t, I_in]`` (zeros for generation) so that the
MLP and UNet serve both tasks; with ``clip`` the residual is clipped to ``[I_in - 1, I_in + 1]`` (data in
[-1, 1]) instead of ``[-1, 1]``, which is the same for generation but keeps bright pixels of dark inputs;
synthetic degradations (``Degradation``) replace the paired data sets.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import append_dims, counter_normal, dataclass_from_dict
from ..models.hub import load_state
from ..models.nets import build_net
from ..schedules import DiscreteVP
from ..solvers.base import SeededNoise
from ..training.data import Dataset
from ..typing import DenoiserFn
from . import Method, MethodRecipe, net_config_for, register_method, save_method_model

__all__ = [
    "Shape",
    "coefficients",
    "RDDMSchedule",
    "Degradation",
    "RDDM",
    "RDDMObjective",
    "RDDMModel",
    "rddm_step",
    "sample",
    "predictor_from_denoiser",
]

ResNoiseFn = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t, I_in, t index (B,)) -> (res, eps)


class Shape(enum.Enum):
    """How alpha_i or beta_i^2 vary with i (authors' ``gen_coefficients``)."""

    INCREASED = "increased"
    DECREASED = "decreased"
    AVERAGE = "average"


def coefficients(T: int, shape: Shape | str, sum_scale: float = 1.0) -> Tensor:
    """``(T,)`` float64 coefficients of the given shape summing to ``sum_scale``."""
    i = torch.arange(1, T + 1, dtype=torch.float64)
    w = {Shape.INCREASED: i, Shape.DECREASED: i.flip(0), Shape.AVERAGE: torch.ones_like(i)}[Shape(shape)]
    return w / w.sum() * sum_scale


@dataclass(frozen=True, eq=False)
class RDDMSchedule:
    """``abar_t`` and ``bbar_t^2`` at indices ``t = 0..T-1`` (float64); index -1 is the clean image (0, 0)."""

    alpha_cumsum: Tensor  # (T,) abar_t, non-decreasing in [0, 1]
    beta2_cumsum: Tensor  # (T,) bbar_t^2, increasing, > 0

    def __post_init__(self) -> None:
        a, b = self.alpha_cumsum.double(), self.beta2_cumsum.double()
        if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
            raise ValueError(f"alpha_cumsum and beta2_cumsum must be 1-d of one length >= 2, got {a.shape}, {b.shape}")
        if bool((a.diff() < 0).any() | (a < 0).any() | (a > 1).any()) or bool((b.diff() <= 0).any() | (b[0] <= 0)):
            raise ValueError("need 0 <= abar_t <= 1 non-decreasing and bbar_t^2 > 0 increasing")
        object.__setattr__(self, "alpha_cumsum", a)
        object.__setattr__(self, "beta2_cumsum", b)

    @classmethod
    def residual(
        cls,
        T: int = 1000,
        *,
        alpha: Shape | str = Shape.DECREASED,
        beta2: Shape | str = Shape.INCREASED,
        sum_scale: float = 1.0,
    ) -> RDDMSchedule:
        """The paper's schedule: cumulative sums of ``coefficients`` (clipped to [0, 1] as the authors do)."""
        if not (isinstance(T, int) and T >= 2) or not 0 < sum_scale <= 1:
            raise ValueError(f"need an int T >= 2 and 0 < sum_scale <= 1, got T={T!r}, sum_scale={sum_scale!r}")
        return cls(coefficients(T, alpha).cumsum(0).clip(0, 1), coefficients(T, beta2, sum_scale).cumsum(0).clip(0, 1))

    @classmethod
    def from_vp(cls, alphas_cumprod: Tensor) -> RDDMSchedule:
        """The transform that makes RDDM (``I_in = 0``) the DDPM with ``alphas_cumprod``."""
        ac = alphas_cumprod.double()
        return cls(1.0 - ac.sqrt(), 1.0 - ac)

    @property
    def T(self) -> int:
        return len(self.alpha_cumsum)

    def at(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(abar_t, bbar_t)`` at integer indices ``t`` (``-1``: both 0)."""
        t = torch.as_tensor(t, dtype=torch.int64)
        a = torch.cat([self.alpha_cumsum.new_zeros(1), self.alpha_cumsum]).to(t.device)[t + 1]
        b2 = torch.cat([self.beta2_cumsum.new_zeros(1), self.beta2_cumsum]).to(t.device)[t + 1]
        return a, b2.sqrt()

    def q_sample(self, x0: Tensor, x_in: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """``x_t = I_0 + abar_t (I_in - I_0) + bbar_t eps``."""
        a, b = (append_dims(c, x0.ndim).to(x0.dtype) for c in self.at(t))
        return x0 + a * (x_in - x0) + b * eps


class Kind(enum.Enum):
    """The synthetic degradation of ``Degradation``."""

    NONE = "none"  # generation: I_in = 0
    NOISE = "noise"  # I_in = I_0 + level z
    LOWLIGHT = "lowlight"  # pixels p in [0, 1] -> level p, plus noise z (I_in = level (I_0 + 1) - 1 + noise z)


@dataclass(frozen=True)
class Degradation:
    """Synthetic ``I_in`` from clean data in [-1, 1] (our stand-in for the paper's paired data sets)."""

    kind: Kind = Kind.NONE
    level: float = 0.25  # NOISE: noise std; LOWLIGHT: brightness factor
    noise: float = 0.05  # LOWLIGHT: sensor noise std

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", Kind(self.kind))
        if not (self.level >= 0 and self.noise >= 0):
            raise ValueError(f"degradation level and noise must be >= 0, got {self.level}, {self.noise}")

    def __call__(self, x0: Tensor, z: Tensor) -> Tensor:
        if self.kind is Kind.NONE:
            return torch.zeros_like(x0)
        if self.kind is Kind.NOISE:
            return x0 + self.level * z
        return self.level * (x0 + 1) - 1 + self.noise * z


@dataclass(frozen=True)
class RDDM:
    """RDDM settings (a method recipe's ``method`` section); authors' defaults."""

    net: str = "mlp"  # network kind: "mlp" or "unet"; input and output have twice the data's channels
    net_config: Mapping[str, Any] = field(default_factory=dict)  # data shape filled in from the data
    timesteps: int = 1000  # T
    alpha: Shape = Shape.DECREASED  # shape of alpha_i
    beta2: Shape = Shape.INCREASED  # shape of beta_i^2
    sum_scale: float | None = None  # bbar_T^2; None: 1 for generation, 0.01 for restoration
    loss: str = "l1"  # "l1" or "l2"
    degradation: Degradation = field(default_factory=Degradation)  # kind "none" = generation

    def __post_init__(self) -> None:
        for name, kind in (("alpha", Shape), ("beta2", Shape), ("degradation", Degradation)):
            v = getattr(self, name)
            object.__setattr__(self, name, kind(**v) if isinstance(v, Mapping) else kind(v) if kind is Shape else v)
        object.__setattr__(self, "net_config", dict(self.net_config))
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"RDDM loss must be 'l1' or 'l2', got {self.loss!r}")
        self.schedule()  # validates timesteps and sum_scale

    def schedule(self) -> RDDMSchedule:
        restore = self.degradation.kind is not Kind.NONE
        scale = self.sum_scale if self.sum_scale is not None else (0.01 if restore else 1.0)
        return RDDMSchedule.residual(self.timesteps, alpha=self.alpha, beta2=self.beta2, sum_scale=scale)

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "alpha": self.alpha.value,
            "beta2": self.beta2.value,
            "net_config": dict(self.net_config),
            "degradation": {**dataclasses.asdict(self.degradation), "kind": self.degradation.kind.value},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RDDM:
        return dataclass_from_dict(cls, d, what="RDDM method")


def rddm_step(
    x: Tensor,
    res: Tensor,
    eps: Tensor,
    a_t: float,
    a_s: float,
    b2_t: float,
    b2_s: float,
    sigma: float,
    z: Tensor | None,
) -> Tensor:
    """One generalised-DDIM RDDM step from index t to s with noise std ``sigma`` (``z`` may be None if 0)."""
    x_s = x - (a_t - a_s) * res - (math.sqrt(b2_t) - math.sqrt(b2_s - sigma**2)) * eps
    return x_s + sigma * z if sigma > 0 and z is not None else x_s


def sample(
    predict: ResNoiseFn,
    schedule: RDDMSchedule,
    x_in: Tensor,
    steps: int,
    *,
    eta: float = 0.0,
    seed: int = 0,
    clip: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
) -> Tensor:
    """RDDM's sampler from ``x_T = I_in + bbar_T z`` in ``steps`` evaluations; ``clip`` bounds ``I_0^`` to [-1, 1]
    (and the residual to ``[I_in - 1, I_in + 1]``). Noise of sample ``b`` depends only on ``(seed, b)``."""
    if not (isinstance(steps, int) and 1 <= steps <= schedule.T) or not eta >= 0:
        raise ValueError(f"need an int 1 <= steps <= T={schedule.T} and eta >= 0, got steps={steps!r}, eta={eta!r}")
    noise = SeededNoise(seed, torch.arange(len(x_in)))
    times = torch.linspace(-1, schedule.T - 1, steps + 1).int().tolist()[::-1]  # authors' grid, T-1 ... -1
    x = x_in + math.sqrt(float(schedule.beta2_cumsum[-1])) * counter_normal(
        seed, torch.arange(len(x_in)), 0, x_in.shape[1:], dtype=torch.float64
    ).to(x_in.dtype)
    for i, (t, s) in enumerate(zip(times[:-1], times[1:])):
        res, eps = predict(x, x_in, torch.full((len(x),), t, dtype=torch.int64))
        if clip:
            res = torch.minimum(torch.maximum(res, x_in - 1), x_in + 1)
        if s < 0:  # last step: I_0^ = x_t - abar_t I_res^ - bbar_t eps^
            a_t, b_t = (float(c) for c in schedule.at(torch.tensor(t)))
            x = x - a_t * res - b_t * eps
            x = x.clamp(-1, 1) if clip else x
        else:
            a_t, a_s = (float(schedule.alpha_cumsum[k]) for k in (t, s))
            b2_t, b2_s = (float(schedule.beta2_cumsum[k]) for k in (t, s))
            sigma = math.sqrt(eta * (b2_t - b2_s) * b2_s / b2_t)
            x = rddm_step(x, res, eps, a_t, a_s, b2_t, b2_s, sigma, noise(1 + 16 * i, x) if sigma > 0 else None)
        if callback is not None:
            callback(s, x)
    return x


def predictor_from_denoiser(model: DenoiserFn, schedule: DiscreteVP) -> ResNoiseFn:
    """A DDPM x0-denoiser as an RDDM predictor on ``RDDMSchedule.from_vp(schedule.alphas_cumprod)`` (``I_in = 0``):
    ``I_res^ = -x0^``, ``eps^ = (x - sqrt(abar) x0^) / sqrt(1 - abar)`` (the authors' pretrained-DDIM conversion)."""

    def predict(x: Tensor, x_in: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        tc = schedule.index_to_t(t)
        x0 = model(x, tc)
        ac = append_dims(schedule.alphas_cumprod[t], x.ndim).to(x.dtype)
        return -x0, (x - ac.sqrt() * x0) / (1 - ac).sqrt()

    return predict


def _predict(net: nn.Module, x: Tensor, x_in: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    out = net(torch.cat([x, x_in], 1), t.to(x.dtype))  # [I_res^, eps^] stacked on dim 1
    return out[:, : x.shape[1]], out[:, x.shape[1] :]


class RDDMObjective:
    """``TrainObjective`` of RDDM: draws ``t`` uniform in 0..T-1, ``eps``, the degradation noise; L1 (or L2) on
    the residual and the noise."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        s: RDDM = recipe.settings
        self.recipe, self.dataset, self.name = recipe, dataset, recipe.name
        self.settings = dataclasses.replace(s, net_config=net_config_for(s.net, s.net_config, dataset.shape, 2))
        self.schedule = s.schedule()
        torch.manual_seed(recipe.train.seed)
        self.module: nn.Module = build_net(s.net, self.settings.net_config)

    def __len__(self) -> int:
        return len(self.dataset)

    def config(self) -> dict[str, Any]:
        return self.recipe.config()

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        b, shape = len(idx), self.dataset.shape
        t = torch.randint(0, self.schedule.T, (b,), generator=g)
        eps = torch.randn((b, *shape), generator=g)
        x0 = self.dataset.x[idx]
        x_in = self.settings.degradation(x0, torch.randn((b, *shape), generator=g))
        return {"x0": x0, "x_in": x_in, "t": t, "eps": eps}

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        x0, x_in, t, eps = batch["x0"], batch["x_in"], batch["t"], batch["eps"]
        res_hat, eps_hat = _predict(module, self.schedule.q_sample(x0, x_in, t, eps), x_in, t)
        err = (lambda d: d.abs()) if self.settings.loss == "l1" else (lambda d: d.square())
        return err(res_hat - (x_in - x0)).mean() + err(eps_hat - eps).mean()

    def _info(self) -> dict[str, Any]:
        return {"name": "rddm", "settings": self.settings.to_dict(), "data_shape": list(self.dataset.shape)}

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        return save_method_model(out_dir, ema, self._info(), self.recipe, self.dataset, card)

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}


@dataclass(frozen=True)
class RDDMModel:
    """A trained RDDM: the dual-output ``net``, its settings and data shape."""

    net: nn.Module
    settings: RDDM
    data_shape: tuple[int, ...]

    @property
    def schedule(self) -> RDDMSchedule:
        return self.settings.schedule()

    def predict(self, x: Tensor, x_in: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(I_res^, eps^)`` at ``x_t``, input ``I_in`` and indices ``t`` ``(B,)``."""
        with torch.no_grad():
            return _predict(self.net, x, x_in, t)

    def degrade(self, x0: Tensor, *, seed: int = 0) -> Tensor:
        """The training degradation applied to clean ``x0`` (noise from ``(seed, row)``)."""
        return self.settings.degradation(x0, counter_normal(seed, torch.arange(len(x0)), 7, x0.shape[1:]).to(x0))

    def sample(
        self,
        x_in: Tensor | None = None,
        *,
        n: int | None = None,
        steps: int = 5,
        eta: float = 0.0,
        seed: int = 0,
        clip: bool | None = None,
    ) -> Tensor:
        """Restore ``x_in`` ``(B, *data_shape)``, or generate ``n`` samples (``I_in = 0``). ``clip`` defaults to
        True for image data (in [-1, 1]) as in the authors' code."""
        if (x_in is None) == (n is None):
            raise ValueError("give x_in (restoration) or n (generation), not both")
        if x_in is None:
            x_in = torch.zeros(int(n), *self.data_shape)  # type: ignore[arg-type]
        elif tuple(x_in.shape[1:]) != self.data_shape:
            raise ValueError(
                f"x_in must have shape (B, {', '.join(map(str, self.data_shape))}), got {tuple(x_in.shape)}"
            )
        clip = len(self.data_shape) == 3 if clip is None else clip
        return sample(self.predict, self.schedule, x_in.float(), steps, eta=eta, seed=seed, clip=clip)

    @classmethod
    def from_file(cls, path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> RDDMModel:
        s = RDDM.from_dict(info["settings"])
        net = build_net(s.net, s.net_config)
        load_state(path, net, tensors)
        return cls(net.eval().requires_grad_(False), s, tuple(info["data_shape"]))


register_method(Method("rddm", RDDM, RDDMObjective, RDDMModel.from_file))
