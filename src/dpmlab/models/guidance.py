"""Denoiser wrappers (``DenoiserFn -> DenoiserFn``) that change the data prediction ``x0``.

* ``dynamic_threshold`` — dynamic thresholding of Saharia et al., "Photorealistic Text-to-Image Diffusion
  Models with Deep Language Understanding" (Imagen), NeurIPS 2022, arXiv 2205.11487, Sec. 2.3, as used by
  DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, Sec. 5). Per sample::

      s  = clamp(quantile_ratio(|x0|), min=max_value, max=s_max)
      x0 <- clamp(x0, -s, s) * max_value / s

  With ``max_value = 1`` (the default) this is exactly Imagen and the DPM-Solver reference code
  (``s = max(quantile, 1)``, ``x0 = clamp(x0, -s, s) / s``); diffusers' ``thresholding=True`` is
  ``max_value = 1, s_max = sample_max_value``. For ``max_value != 1`` the reference still divides by
  ``s`` alone (range ``[-1, 1]``); we rescale to ``[-max_value, max_value]`` so that data already inside
  that range pass unchanged. The quantile is computed in float32 at least (``torch.quantile`` needs it).
  Meant for pixel-space models and data-form solvers (DPM-Solver++, DDIM); unsuitable for latents.
  Noise-form solvers see the ``eps`` implied by the thresholded ``x0`` (the reference code skips them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._utils import append_dims
from ..typing import DenoiserFn

__all__ = ["DynamicThreshold", "dynamic_threshold"]


class _ModelWrapper:
    """A ``DenoiserFn -> DenoiserFn`` transform keeps the wrapped model's ``schedule`` and ``data_shape``."""

    model: DenoiserFn

    @property
    def schedule(self) -> Any:
        return self.model.schedule  # type: ignore[attr-defined]

    @property
    def data_shape(self) -> Any:
        return self.model.data_shape  # type: ignore[attr-defined]


class DynamicThreshold(_ModelWrapper):
    """``x0 = threshold(model(x, t, **cond))``; forwards the wrapped model's ``schedule``/``data_shape``."""

    def __init__(self, model: DenoiserFn, *, ratio: float = 0.995, max_value: float = 1.0, s_max: float = math.inf):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if not (0.0 < max_value < math.inf and s_max >= max_value):
            raise ValueError(f"need 0 < max_value <= s_max, got max_value={max_value}, s_max={s_max}")
        self.model, self.ratio, self.max_value, self.s_max = model, float(ratio), float(max_value), float(s_max)

    def threshold(self, x0: Tensor) -> Tensor:
        """Dynamic thresholding of a batch ``x0`` of shape ``(B, ...)``."""
        flat = x0.abs().reshape(x0.shape[0], -1).to(torch.promote_types(x0.dtype, torch.float32))
        s = torch.quantile(flat, self.ratio, dim=1)  # (B,) per-sample percentile of |x0|
        s = append_dims(s.clamp(min=self.max_value, max=self.s_max).to(x0.dtype), x0.ndim)
        return torch.minimum(torch.maximum(x0, -s), s) * (self.max_value / s)  # clamp to [-s, s], rescale

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.threshold(self.model(x, t, **cond))

    def __repr__(self) -> str:
        return f"DynamicThreshold({self.model!r}, ratio={self.ratio}, max_value={self.max_value}, s_max={self.s_max})"


def dynamic_threshold(
    model: DenoiserFn, ratio: float = 0.995, max_value: float = 1.0, *, s_max: float = math.inf
) -> DynamicThreshold:
    """Wrap ``model`` with dynamic thresholding (Imagen; DPM-Solver++): percentile ``ratio`` of ``|x0|``,
    data range ``[-max_value, max_value]``, optional cap ``s_max`` on the threshold (diffusers)."""
    return DynamicThreshold(model, ratio=ratio, max_value=max_value, s_max=s_max)


# --- classifier-free guidance (appended) ----------------------------------------------------------
class ClassifierFree(_ModelWrapper):
    """Classifier-free guidance — Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv 2207.12598 —
    in ``x0`` space: ``x0 = x0_u + w (x0_c - x0_u)``.

    Convention: ``w`` is the guidance scale of diffusers / DPM-Solver / DC-Solver (``eps_u + w (eps_c -
    eps_u)``); ``w = 1`` is the conditional model, ``w = 0`` the unconditional one. Ho & Salimans' ``w``
    is ours minus 1. At fixed ``(x, t)`` eps and x0 are affine in each other with the same coefficients
    for both models, so guiding x0 equals guiding eps. ``**cond`` is passed to both models."""

    def __init__(self, cond_model: DenoiserFn, uncond_model: DenoiserFn, scale: float) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        self.cond_model, self.uncond_model, self.scale = cond_model, uncond_model, float(scale)
        self.model = cond_model  # the wrapped model whose schedule and data shape are forwarded

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        x0_c = self.cond_model(x, t, **cond)
        if self.scale == 1.0:
            return x0_c
        x0_u = self.uncond_model(x, t, **cond)
        return x0_u + self.scale * (x0_c - x0_u)

    def __repr__(self) -> str:
        return f"ClassifierFree({self.cond_model!r}, {self.uncond_model!r}, scale={self.scale})"


def classifier_free(cond_model: DenoiserFn, uncond_model: DenoiserFn, scale: float) -> ClassifierFree:
    """``x0_u + scale (x0_c - x0_u)``: classifier-free guidance of two denoisers (``scale = 1``: no
    guidance, the conditional model; diffusers' ``guidance_scale`` convention)."""
    return ClassifierFree(cond_model, uncond_model, scale)


__all__ += ["ClassifierFree", "classifier_free"]


class Unconditional(_ModelWrapper):
    """The same model with its conditioning dropped (a class-conditional network then sees its null
    class): the ``uncond_model`` of classifier-free guidance for networks trained with label dropout."""

    def __init__(self, model: DenoiserFn) -> None:
        self.model = model

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.model(x, t)


__all__ += ["Unconditional"]


class WithCond(_ModelWrapper):
    """The same model with some conditioning replaced: ``model(x, t, **{**cond, **override})`` — e.g. a
    negative prompt as the ``uncond_model`` of classifier-free guidance."""

    def __init__(self, model: DenoiserFn, **override: Any) -> None:
        self.model, self.override = model, override

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.model(x, t, **{**cond, **self.override})

    def __repr__(self) -> str:
        return f"WithCond({self.model!r}, {', '.join(f'{k}={v!r}' for k, v in self.override.items())})"


def with_cond(model: DenoiserFn, **override: Any) -> WithCond:
    """``model`` with the keyword conditioning ``override`` replacing what the solver passes."""
    return WithCond(model, **override)


__all__ += ["WithCond", "with_cond"]
