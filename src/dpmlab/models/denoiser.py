"""``Denoiser``: any network (eps, x0, v, score or flow prediction) on any schedule -> ``x0(x, t)``.

Parameterisation is data, not solver branches: solvers only ever see the data prediction ``x0``.
Conversions (all at the same ``(x_t, t)``, ``x = alpha x0 + sigma eps``):

* eps:   ``x0 = (x - sigma eps) / alpha``
* x0:    ``x0``
* v:     ``v = alpha eps - sigma x0``  ->  ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``
* score: ``score = -eps / sigma``      ->  ``x0 = (x + sigma^2 score) / alpha``
* flow:  ``u = dx/dt = alpha' x0 + sigma' eps`` -> ``x0 = (sigma' x - sigma u) / (sigma' alpha - sigma alpha')``
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import append_dims, f64
from ..schedules import DiscreteVP, NoiseSchedule

__all__ = ["Prediction", "Denoiser", "discrete_net_time"]


class Prediction(enum.Enum):
    EPS = "eps"
    X0 = "x0"
    V = "v"
    SCORE = "score"
    FLOW = "flow"


NetTime = Callable[[Tensor], Tensor]


def discrete_net_time(schedule: DiscreteVP) -> NetTime:
    """Continuous ``t`` to the (fractional) training index ``N t - 1`` that discrete networks take."""
    return schedule.t_to_index


def _identity(t: Tensor) -> Tensor:
    return t


class Denoiser(nn.Module):
    """Wrap ``net(x, net_time(t), **cond)`` predicting ``prediction`` into ``x0 = D(x, t, **cond)``.

    ``t`` may be a float, a 0-d tensor or a per-sample ``(B,)`` tensor of continuous schedule times.
    ``net_time`` maps continuous time to what the network was trained on; for a ``DiscreteVP`` it
    defaults to the training index ``N t - 1``. ``dtype`` (default: the net's parameter dtype, else the
    input's) is what the network is called in; the returned ``x0`` has the input's dtype.
    """

    def __init__(
        self,
        net: Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction: Prediction | str,
        *,
        net_time: NetTime | None = None,
        dtype: torch.dtype | None = None,
        data_shape: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__()
        try:
            self.prediction = Prediction(prediction)
        except ValueError:
            allowed = ", ".join(p.value for p in Prediction)
            raise ValueError(f"unknown prediction type {prediction!r}; allowed: {allowed}") from None
        self.net = net
        self.schedule = schedule
        if net_time is None:
            net_time = discrete_net_time(schedule) if isinstance(schedule, DiscreteVP) else _identity
        self.net_time = net_time
        self.dtype = dtype
        self.data_shape = data_shape

    def _net_dtype(self, x: Tensor) -> torch.dtype:
        if self.dtype is not None:
            return self.dtype
        if isinstance(self.net, nn.Module):
            for p in self.net.parameters():
                return p.dtype
        return x.dtype

    def forward(self, x: Tensor, t: Tensor | float, **cond: Any) -> Tensor:
        t = f64(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(
                f"t must be a scalar or of shape ({x.shape[0]},) for x of shape {tuple(x.shape)}, got {tuple(t.shape)}"
            )
        dt = self._net_dtype(x)
        out = self.net(x.to(dt), self.net_time(t).to(dt), **cond)
        if out.shape != x.shape:
            raise ValueError(f"network returned shape {tuple(out.shape)} for input of shape {tuple(x.shape)}")
        out = out.to(x.dtype)
        a = append_dims(self.schedule.alpha(t), x.ndim).to(x.dtype)
        s = append_dims(self.schedule.sigma(t), x.ndim).to(x.dtype)
        p = self.prediction
        if p is Prediction.X0:
            return out
        if p is Prediction.EPS:
            return (x - s * out) / a
        if p is Prediction.V:
            return (a * x - s * out) / (a * a + s * s)
        if p is Prediction.SCORE:
            return (x + s * s * out) / a
        da, ds = self.schedule.dalpha_dsigma_dt(t)
        da, ds = append_dims(da, x.ndim).to(x.dtype), append_dims(ds, x.ndim).to(x.dtype)
        return (ds * x - s * out) / (ds * a - s * da)
