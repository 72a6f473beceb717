"""Trainable networks as data: ``ModelSpec`` (network kind + config, training objective, schedule,
data shape) builds the network and wraps it into a ``Denoiser``; ``EDMPrecond`` is the EDM
preconditioning of Karras et al. 2022 (arXiv 2206.00364, Table 1 / Sec. 5).

The spec is what our model files store as JSON (see ``dpmlab.models.hub``), so a file is enough to
rebuild the exact sampler-ready model — no pickle, no code in the file.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import append_dims
from ..schedules import EDM, SCHEDULES, NoiseSchedule, get_schedule
from .denoiser import Denoiser, Prediction
from .mlp import MLP, MLPConfig
from .unet import UNet, UNetConfig

__all__ = ["Objective", "ModelSpec", "EDMPrecond", "NETS", "build_net"]

NETS: dict[str, tuple[type[Any], type[nn.Module]]] = {"unet": (UNetConfig, UNet), "mlp": (MLPConfig, MLP)}


class Objective(enum.Enum):
    """What the network is trained to output: a ``Prediction`` target, or EDM's preconditioned ``F``."""

    EPS = "eps"
    X0 = "x0"
    V = "v"
    EDM = "edm"


def build_net(kind: str, config: Mapping[str, Any]) -> nn.Module:
    """A fresh network ``NETS[kind]`` from its JSON config."""
    if kind not in NETS:
        raise ValueError(f"unknown network kind {kind!r}; allowed: {', '.join(NETS)}")
    cfg_cls, net_cls = NETS[kind]
    return net_cls(cfg_cls.from_dict(config))


class EDMPrecond(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with (Karras et al. 2022, Table 1)
    ``c_skip = sd^2 / (sigma^2 + sd^2)``, ``c_out = sigma sd / sqrt(sigma^2 + sd^2)``,
    ``c_in = 1 / sqrt(sigma^2 + sd^2)``, ``c_noise = ln(sigma) / 4``. ``x = x0 + sigma n`` (alpha = 1)."""

    def __init__(self, net: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for per-sample ``sigma`` ``(B,)``."""
        sd2 = self.sigma_data**2
        s2 = sigma * sigma
        return sd2 / (s2 + sd2), sigma * self.sigma_data / (s2 + sd2).sqrt(), 1 / (s2 + sd2).sqrt(), sigma.log() / 4

    def forward(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        f = self.net(append_dims(c_in, x.ndim) * x, c_noise, **cond)
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * f


@dataclass(frozen=True)
class ModelSpec:
    """Everything but the weights: enough to rebuild a sampler-ready ``Denoiser``."""

    net: str  # key of NETS
    net_config: Mapping[str, Any]  # the network's config as a JSON object
    objective: Objective  # what the network outputs
    schedule: str = "linear"  # a dpmlab.schedules.get_schedule name (ignored for EDM: EDM(sigma_data))
    data_shape: tuple[int, ...] = (2,)  # one sample's shape
    sigma_data: float = 0.5  # EDM only
    class_names: tuple[str, ...] = ()  # labels 0..K-1 (conditional models); K is the null class

    def __post_init__(self) -> None:
        if self.net not in NETS:
            raise ValueError(f"unknown network kind {self.net!r}; allowed: {', '.join(NETS)}")
        object.__setattr__(self, "objective", Objective(self.objective))
        object.__setattr__(self, "data_shape", tuple(int(s) for s in self.data_shape))
        object.__setattr__(self, "class_names", tuple(str(c) for c in self.class_names))
        object.__setattr__(self, "net_config", dict(self.net_config))
        if self.objective is not Objective.EDM and self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; allowed: {', '.join(SCHEDULES)}")

    def make_schedule(self) -> NoiseSchedule:
        if self.objective is Objective.EDM:
            return EDM(sigma_data=self.sigma_data)
        return get_schedule(self.schedule)

    def build_net(self) -> nn.Module:
        return build_net(self.net, self.net_config)

    def denoiser(self, net: nn.Module, schedule: NoiseSchedule | None = None) -> Denoiser:
        """Wrap a network of this spec into ``x0 = D(x, t, **cond)``."""
        sch = schedule if schedule is not None else self.make_schedule()
        if self.objective is Objective.EDM:
            if not isinstance(sch, EDM):
                raise ValueError(f"an EDM-preconditioned model samples on the EDM schedule, not {sch!r}")
            return Denoiser(EDMPrecond(net, self.sigma_data), sch, Prediction.X0, data_shape=self.data_shape)
        return Denoiser(net, sch, Prediction(self.objective.value), data_shape=self.data_shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            "net": self.net,
            "net_config": dict(self.net_config),
            "objective": self.objective.value,
            "schedule": self.schedule,
            "data_shape": list(self.data_shape),
            "sigma_data": self.sigma_data,
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelSpec:
        known = {"net", "net_config", "objective", "schedule", "data_shape", "sigma_data", "class_names"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelSpec fields: {', '.join(unknown)}")
        return cls(**d)
