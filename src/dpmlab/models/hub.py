"""``load(name)``: models by name. Today: the analytic presets (exact denoisers on the continuous
linear VP schedule); trained weights shipped in ``assets/`` join here."""

from __future__ import annotations

from ..schedules import NoiseSchedule
from .analytic import PRESETS, AnalyticDenoiser, preset

__all__ = ["load", "available_models"]


def available_models() -> list[str]:
    return sorted(PRESETS)


def load(name: str, *, schedule: NoiseSchedule | None = None) -> AnalyticDenoiser:
    """A ready-to-sample model by name (see ``available_models()``)."""
    if name in PRESETS:
        return preset(name).denoiser(schedule)
    raise ValueError(f"unknown model {name!r}; available: {', '.join(available_models())}")
