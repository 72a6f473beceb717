"""Diffusers-format pixel-space models (``UNet2DModel`` / ``UNet2DConditionModel`` + a scheduler config)
as dpmlab ``Denoiser``s: the schedule and prediction type come from the scheduler config. ``dpmlab.load``
sends DDPM/DDIM pipeline folders here (Stable Diffusion folders go to ``models.t2i``); the same functions
are exported by ``dpmlab.interop.diffusers``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from ..schedules import schedule_from_config
from .denoiser import Denoiser

__all__ = ["denoiser_from_diffusers", "load_diffusers_folder"]

_PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def denoiser_from_diffusers(unet_or_pipeline: Any, scheduler_config: Mapping[str, Any] | None = None) -> Any:
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (or a pipeline holding ``unet`` and
    ``scheduler``) as a dpmlab ``Denoiser``: the schedule and prediction type come from the scheduler
    config; the network is called with the training index ``N t - 1`` as its timestep, and
    conditioning keywords (e.g. ``encoder_hidden_states``) are passed through."""
    unet = getattr(unet_or_pipeline, "unet", unet_or_pipeline)
    if scheduler_config is None:
        sched = getattr(unet_or_pipeline, "scheduler", None)
        if sched is None:
            raise ValueError("pass scheduler_config= (a diffusers scheduler config) with a bare UNet")
        scheduler_config = sched.config
    kind = scheduler_config.get("prediction_type", "epsilon")
    if kind not in _PREDICTIONS:
        raise ValueError(f"unsupported prediction_type {kind!r}; allowed: {', '.join(_PREDICTIONS)}")
    schedule = schedule_from_config(scheduler_config)

    def net(x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return unet(x, t, **cond).sample

    cfg = unet.config
    size = cfg.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return Denoiser(net, schedule, _PREDICTIONS[kind], dtype=unet.dtype, data_shape=(cfg.in_channels, *hw))


def load_diffusers_folder(path: str | Any) -> Any:
    """Load a diffusers-format folder from disk (``unet/`` + ``scheduler/scheduler_config.json``, or a
    bare UNet folder next to a scheduler config) as a ``Denoiser``. Never downloads; weights must be
    safetensors (pickled ``.bin`` weights are refused)."""
    import json
    from pathlib import Path

    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    unet_dir = root / "unet" if (root / "unet").is_dir() else root
    sched_file = next(
        (p for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json") if p.is_file()), None
    )
    if sched_file is None:
        raise ValueError(f"no scheduler/scheduler_config.json under {root}")
    unet_cfg_file = unet_dir / "config.json"
    if not unet_cfg_file.is_file():
        raise ValueError(f"no UNet config.json in {unet_dir}")
    if not any(unet_dir.glob("*.safetensors")):
        raise ValueError(f"no .safetensors weights in {unet_dir}; pickled weights are not loaded")
    unet_cfg = json.loads(unet_cfg_file.read_text())
    import diffusers

    cls_name = unet_cfg.get("_class_name", "UNet2DModel")
    if cls_name not in ("UNet2DModel", "UNet2DConditionModel"):
        raise ValueError(f"unsupported model class {cls_name!r}; allowed: UNet2DModel, UNet2DConditionModel")
    unet = getattr(diffusers, cls_name).from_pretrained(unet_dir, local_files_only=True, use_safetensors=True)
    return denoiser_from_diffusers(unet.eval(), json.loads(sched_file.read_text()))
