"""diffusers interop: schedules from scheduler configs, and running an unchanged diffusers scheduler
on any dpmlab model (for parity tests and peer benchmarks).

The model side is a dpmlab ``DenoiserFn`` (returns ``x0``); it is presented to the scheduler in the
scheduler's own ``prediction_type`` (epsilon, sample or v_prediction) at the VP state the scheduler
feeds its network (``scale_model_input``), with the training index ``n`` mapped to ``t = (n+1)/N``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .._utils import f64
from ..schedules import DiscreteVP, betas_for_preset
from ..typing import DenoiserFn

__all__ = ["schedule_from_config", "run_scheduler", "PeerRun", "scheduler_grid"]

_BETA_PRESETS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def schedule_from_config(config: Mapping[str, Any]) -> DiscreteVP:
    """The ``DiscreteVP`` of a diffusers scheduler config (no lambda clipping, as diffusers)."""
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr=True gives alpha = 0 at the last step; not supported by DiscreteVP")
    if config.get("trained_betas") is not None:
        return DiscreteVP(betas=f64(list(config["trained_betas"])))
    n = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "linear")
    if kind not in _BETA_PRESETS:
        raise ValueError(f"unsupported beta_schedule {kind!r}; allowed: {', '.join(_BETA_PRESETS)}")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = betas_for_preset("cosine", n)
    return DiscreteVP(betas=betas)


def scheduler_grid(timesteps: Tensor, schedule: DiscreteVP, final_t: float) -> Tensor:
    """Continuous-time grid visiting a scheduler's (de-duplicated) timesteps, then ``final_t``."""
    seen: list[float] = []
    for t in timesteps.tolist():
        if not seen or seen[-1] != t:
            seen.append(float(t))
    return torch.cat([schedule.index_to_t(f64(seen)), f64([final_t])])


@dataclass(frozen=True)
class PeerRun:
    x: Tensor  # final sample
    nfe: int  # network evaluations made by the scheduler loop


def run_scheduler(
    scheduler: Any,
    model: DenoiserFn,
    schedule: DiscreteVP,
    x: Tensor,
    num_inference_steps: int,
    *,
    generator: torch.Generator | None = None,
    step_kwargs: Mapping[str, Any] | None = None,
) -> PeerRun:
    """Run a diffusers scheduler's standard loop with ``model`` from the starting noise ``x`` (unit
    variance; scaled by ``init_noise_sigma`` here)."""
    scheduler.set_timesteps(num_inference_steps)
    pred = scheduler.config.get("prediction_type", "epsilon")
    n_train = schedule.n_train
    sample = x * scheduler.init_noise_sigma
    nfe = 0
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(sample, t)  # the VP state the network sees
        tc = ((f64(t) + 1.0) / n_train).expand(x.shape[0])
        x0 = model(x_in, tc)
        nfe += 1
        a = schedule.alpha(tc[:1]).to(x_in.dtype)
        s = schedule.sigma(tc[:1]).to(x_in.dtype)
        eps = (x_in - a * x0) / s
        if pred == "epsilon":
            out = eps
        elif pred == "sample":
            out = x0
        elif pred == "v_prediction":
            out = a * eps - s * x0
        else:
            raise ValueError(f"unsupported prediction_type {pred!r}")
        kwargs = dict(step_kwargs or {})
        if generator is not None:
            kwargs["generator"] = generator
        sample = scheduler.step(out, t, sample, **kwargs).prev_sample
    return PeerRun(x=sample, nfe=nfe)
