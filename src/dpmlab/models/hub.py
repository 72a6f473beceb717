"""``load(name)``: models by name or path.

* analytic presets (exact denoisers on the continuous linear VP schedule): ``gmm2d``, ...;
* shipped trained weights in ``dpmlab/assets/<name>.safetensors`` (with a JSON card ``<name>.json``):
  ``digits8`` (unconditional 8x8 digits), ``mnist`` (class-conditional 28x28 MNIST, null class for
  classifier-free guidance);
* ``mnist_t2i``: a diffusers-format Stable Diffusion folder (text-to-image on latents, ``models/t2i.py``);
  any such folder loads by path too;
* a local file or folder we wrote: a model file (``save_model``) or a training checkpoint
  (``dpmlab.training``; its EMA weights are used). A folder is searched for ``model.safetensors``,
  then ``checkpoint.safetensors``.

Files are safetensors only — tensors plus a JSON ``ModelSpec`` in the header metadata; never pickle.
A corrupt or mismatched file raises ``ValueError`` naming the file and the problem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import atomic_write
from ..schedules import NoiseSchedule
from .analytic import PRESETS, AnalyticDenoiser, preset
from .denoiser import Denoiser
from .nets import ModelSpec

__all__ = [
    "load",
    "available_models",
    "shipped_models",
    "save_model",
    "read_spec",
    "MODEL_FORMAT",
    "CHECKPOINT_FORMAT",
    "load_state",
    "write_safetensors",
]

MODEL_FORMAT = "dpmlab.model/1"  # tensors: the network's state dict
CHECKPOINT_FORMAT = "dpmlab.checkpoint/1"  # tensors: "model/...", "ema/...", "optim/..." (dpmlab.training)


def _assets() -> Path:
    return Path(str(resources.files("dpmlab") / "assets"))


def _is_model_file(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == MODEL_FORMAT
    except Exception:
        return False


def shipped_models() -> list[str]:
    """Names of the trained diffusion models in ``dpmlab/assets``: dpmlab model files and diffusers-format
    folders (other assets, e.g. classifiers, are not listed)."""
    d = _assets()
    if not d.is_dir():
        return []
    files = [p.stem for p in d.glob("*.safetensors") if _is_model_file(p)]
    return sorted(files + [p.name for p in d.iterdir() if (p / "model_index.json").is_file()])


def available_models() -> list[str]:
    return sorted([*PRESETS, *shipped_models()])


def write_safetensors(path: str | os.PathLike[str], tensors: Mapping[str, Tensor], meta: Mapping[str, str]) -> None:
    """``safetensors`` ``save_file`` through ``atomic_write``, with normal file permissions (save_file
    itself creates files readable by their owner only)."""
    from safetensors.torch import save_file

    with atomic_write(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=dict(meta))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)


def save_model(
    path: str | os.PathLike[str],
    net: nn.Module,
    spec: ModelSpec,
    *,
    dtype: torch.dtype | None = None,
    card: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``net``'s weights (cast to ``dtype`` if given, e.g. ``torch.float16`` to halve the file)
    and ``spec`` to ``path`` (``.safetensors``), and ``card`` (plus the spec) to the ``.json`` beside
    it; both atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"model files end in .safetensors, got {path.name!r}")
    tensors = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in net.state_dict().items()
    }
    meta = {"format": MODEL_FORMAT, "spec": json.dumps(spec.to_dict())}
    write_safetensors(path, tensors, meta)
    full_card = {
        **dict(card or {}),
        "spec": spec.to_dict(),
        "weights": path.name,
        "weights_dtype": str(dtype or next(iter(tensors.values())).dtype).replace("torch.", ""),
    }
    with atomic_write(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(full_card, indent=2) + "\n")
    return path


def _read(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ValueError(f"{path}: no such model file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no items())
    except Exception as e:  # safetensors raises its own error types for a bad header or truncation
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, meta


def read_spec(path: str | os.PathLike[str], meta: Mapping[str, str]) -> ModelSpec:
    """The ``ModelSpec`` stored in a file's metadata (clear errors for missing or bad JSON)."""
    fmt = meta.get("format")
    if "method" in meta:  # written by dpmlab.methods (a layer above this one)
        try:
            name = json.loads(meta["method"]).get("name", "?")
        except (json.JSONDecodeError, AttributeError):
            name = "?"
        raise ValueError(
            f"{path}: a model of the method {name!r}; load it with dpmlab.methods.load(path) and sample "
            "with its .sample() (dpmlab.load and `dpmlab sample` take diffusion models)"
        )
    if fmt not in (MODEL_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(
            f"{path}: not a dpmlab model or checkpoint (format {fmt!r}; expected {MODEL_FORMAT!r} "
            f"or {CHECKPOINT_FORMAT!r})"
        )
    try:
        return ModelSpec.from_dict(json.loads(meta["spec"]))
    except (KeyError, json.JSONDecodeError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model spec in the file's metadata ({type(e).__name__}: {e})") from None


def load_state(path: str | os.PathLike[str], module: nn.Module, state: Mapping[str, Tensor]) -> None:
    """``module.load_state_dict(state)`` (cast to the module's dtypes), with mismatches reported as a
    ``ValueError`` naming ``path``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the network: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{path}: tensor {k!r} has shape {tuple(state[k].shape)}, the network needs {tuple(v.shape)}"
            )
    module.load_state_dict({k: state[k].to(own[k].dtype) for k in own})


def _resolve(name: str | os.PathLike[str]) -> Path | None:
    if isinstance(name, str) and name in shipped_models():
        folder = _assets() / name
        return folder if folder.is_dir() else _assets() / f"{name}.safetensors"
    p = Path(name)
    if (p / "model_index.json").is_file():
        return p  # a diffusers-format folder
    if p.is_dir():
        for cand in ("model.safetensors", "checkpoint.safetensors"):
            if (p / cand).is_file():
                return p / cand
        raise ValueError(f"{p}: folder holds neither model.safetensors nor checkpoint.safetensors")
    if p.suffix == ".safetensors" or p.exists():
        return p
    return None


def load(name: str | os.PathLike[str], *, schedule: NoiseSchedule | None = None) -> AnalyticDenoiser | Denoiser:
    """A ready-to-sample model (``.schedule``, ``.data_shape``) by name (see ``available_models()``) or
    path of a model file, checkpoint or folder we wrote, or of a diffusers-format Stable Diffusion folder
    (a latent ``TextToImage`` denoiser, ``dpmlab.models.t2i``). Trained networks are returned in float32
    and eval mode; pass ``schedule`` to sample on another schedule."""
    if isinstance(name, str) and name in PRESETS:
        return preset(name).denoiser(schedule)
    path = _resolve(name)
    if path is None:
        raise ValueError(
            f"unknown model {str(name)!r}: neither a name ({', '.join(available_models())}) "
            "nor an existing file or folder"
        )
    if path.is_dir():
        if schedule is not None:
            raise ValueError("schedule= is not supported for diffusers folders (their scheduler config fixes it)")
        if not (path / "vae").is_dir() and not (path / "text_encoder").is_dir():  # a DDPM/DDIM pipeline folder
            from .diffusers_folder import load_diffusers_folder

            return load_diffusers_folder(path)  # type: ignore[no-any-return]
        from .t2i import load_text_to_image

        return load_text_to_image(path, name=str(name))
    tensors, meta = _read(path)
    spec = read_spec(path, meta)
    if meta["format"] == CHECKPOINT_FORMAT:
        tensors = {k[len("ema/") :]: v for k, v in tensors.items() if k.startswith("ema/")}
    try:
        net = spec.build_net()
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: cannot build the network from its spec ({e})") from None
    load_state(path, net, tensors)
    net.eval().requires_grad_(False)
    den = spec.denoiser(net, schedule)
    # class names, objective, network config: what the file says about the model. torch types
    # nn.Module.__setattr__ as Tensor | Module only; plain attributes are fine at runtime.
    den.spec = spec  # type: ignore[assignment]
    return den
