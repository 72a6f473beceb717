"""Model-side methods: papers that change what is trained or where sampling starts. Each is one file with a
frozen settings dataclass, an objective for ``dpmlab.training.fit`` (the one trainer: EMA, checkpoints, exact
resume, processes) and a model class that samples the trained file, registered here by name:

* ``pfgmpp`` — PFGM++ (Xu et al., ICML 2023): the N+D-dimensional electric-field kernel on EDM's training,
  sampled by any deterministic dpmlab solver from the heavy-tailed prior (``PFGMPPModel``).
* ``rddm`` — Residual Denoising Diffusion Models (Liu et al., CVPR 2024): dual residual/noise diffusion for
  generation (input 0) and restoration (input = the degraded image), its own sampler (``RDDMModel``).
* ``diffusevae_vae`` / ``diffusevae`` — DiffuseVAE (Pandey et al., TMLR 2022): a conv VAE, then a DDPM
  conditioned on its reconstruction (Form-1 / Form-2), a ``Denoiser`` for every solver (``DiffuseVAEModel``).
* ``domainstudio`` — DomainStudio (Zhu et al., arXiv 2306.14153): few-shot fine-tuning with the frozen source
  model's pairwise-similarity (image and Haar high-frequency) and HF-reconstruction terms (``DomainStudioModel``).
* ``dpm_ot`` — DPM-OT (Li et al., ICCV 2023): semi-discrete OT to noised data at sigma_k, then a short solver
  tail on a given diffusion model (``DPMOTModel``).
* ``speedupnet`` — SpeedUpNet (Chai et al., ECCV 2024): a cross-attention adapter for the negative prompt,
  MSC-distilled from the CFG teacher; 4 steps without CFG, plug-and-play (``SpeedUpNetModel``, ``install``).

A *method recipe* (``recipes/methods/*.json`` or ``.toml``) is a training recipe whose ``method`` section names
a registered method and holds its settings::

    {"name": "...", "description": "...", "method": {"name": "pfgmpp", "D": 128, "net": "mlp", ...},
     "data": {... dpmlab.training.DataConfig}, "train": {... dpmlab.training.TrainConfig}}

``dpmlab train --recipe <it>`` (= ``train_recipe(load_recipe(path), out_dir)``) fits the method's objective;
the run folder gets ``checkpoint.safetensors`` and ``model.safetensors`` (format ``METHOD_FORMAT``: the EMA
weights, the method's name and settings) + ``model.json`` (the card). ``load(folder)`` returns the method's
model with its own ``sample``. ``dpmlab.load`` and ``dpmlab sample`` refuse these files on purpose: they would
sample PFGM++ from the Gaussian (D = inf) prior and cannot run RDDM's dual-output sampler.

Adding a method: a file with the settings dataclass (``to_dict`` / ``from_dict``), the objective and the
model's ``from_file``, ending in ``register_method(Method(...))``, and one import line at the end of this file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import atomic_write
from ..models.hub import CHECKPOINT_FORMAT, write_safetensors
from ..training.data import DataConfig, Dataset, load_data
from ..training.trainer import TrainConfig, TrainObjective, TrainResult, fit, net_config_for

__all__ = [
    "METHOD_FORMAT",
    "METHOD_KINDS",
    "method_kind",
    "Method",
    "MethodRecipe",
    "register_method",
    "available_methods",
    "load_recipe",
    "is_method_recipe",
    "train_recipe",
    "load",
    "save_method_model",
    "net_config_for",
]

METHOD_KINDS = ("train", "finetune", "prune", "distill")  # train: from scratch; the others start from a model
METHOD_FORMAT = "dpmlab.method/1"  # tensors: the network's state dict; metadata "method": name, settings, shape


@dataclass(frozen=True)
class Method:
    """A registered method: its settings class (the recipe's ``method`` section without ``name``), the
    objective built from a recipe and its data, and the loader of its model file."""

    name: str
    settings: type[Any]  # frozen dataclass with to_dict() and from_dict()
    objective: Callable[[MethodRecipe, Dataset], TrainObjective]
    from_file: Callable[[Path, Mapping[str, Any], Mapping[str, Tensor]], Any]  # (path, "method" meta, weights)
    kind: str = "train"  # METHOD_KINDS: the command that runs it (dpmlab train | finetune | prune | distill)

    def __post_init__(self) -> None:
        if self.kind not in METHOD_KINDS:
            raise ValueError(f"method kind {self.kind!r} not allowed; allowed: {', '.join(METHOD_KINDS)}")


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Register ``method`` under ``method.name``; a duplicate name raises."""
    if method.name in _REGISTRY:
        raise ValueError(f"method name {method.name!r} already registered")
    _REGISTRY[method.name] = method
    return method


def available_methods(kind: str | None = None) -> list[str]:
    """Registered method names (of one ``kind`` of ``METHOD_KINDS`` if given)."""
    if kind is not None and kind not in METHOD_KINDS:
        raise ValueError(f"method kind {kind!r} not allowed; allowed: {', '.join(METHOD_KINDS)}")
    return sorted(n for n, m in _REGISTRY.items() if kind is None or m.kind == kind)


def method_kind(name: str) -> str:
    """The kind (``METHOD_KINDS``) of the registered method ``name``."""
    return _method(name).kind


def _method(name: Any) -> Method:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(available_methods())}")
    return _REGISTRY[name]


@dataclass(frozen=True)
class MethodRecipe:
    """A method's training run: the method and its settings, data, optimisation."""

    name: str
    method: str  # a registered method name
    settings: Any  # that method's settings dataclass
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export_dtype: str = "float32"  # dtype of the exported weights: "float32" or "float16"
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.settings, _method(self.method).settings):
            raise ValueError(f"settings of method {self.method!r} must be {_method(self.method).settings.__name__}")
        if self.export_dtype not in ("float16", "float32"):
            raise ValueError(f"export_dtype must be 'float16' or 'float32', got {self.export_dtype!r}")

    def config(self) -> dict[str, Any]:
        """The objective's identity for resume: the recipe without ``train.steps`` (the one field that may change)."""
        d = self.to_dict()
        del d["train"]["steps"]
        return d

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "export_dtype": self.export_dtype,
            "method": {"name": self.method, **self.settings.to_dict()},
            "data": self.data.to_dict(),
            "train": {**dataclasses.asdict(self.train), "adam_betas": list(self.train.adam_betas)},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodRecipe:
        allowed = {"name", "description", "export_dtype", "method", "data", "train"}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(
                f"unknown method recipe fields: {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}"
            )
        if "name" not in d:
            raise ValueError("a recipe needs a name")
        m = d.get("method")
        if not isinstance(m, Mapping) or "name" not in m:
            raise ValueError(f"a method recipe needs a 'method' section with a name, got {m!r}")
        entry = _method(m["name"])
        train = dict(d.get("train", {}))
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        if set(train) - names:
            raise ValueError(
                f"unknown train fields: {', '.join(sorted(set(train) - names))}; allowed: {', '.join(sorted(names))}"
            )
        return cls(
            name=d["name"],
            method=entry.name,
            settings=entry.settings.from_dict({k: v for k, v in m.items() if k != "name"}),
            data=DataConfig.from_dict(d.get("data", {})),
            train=TrainConfig(**train),
            export_dtype=d.get("export_dtype", "float32"),
            description=d.get("description", ""),
        )


def _read_text(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"recipe {str(p)!r} does not exist")
    try:
        return tomllib.loads(p.read_text()) if p.suffix == ".toml" else json.loads(p.read_text())
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'} ({e})") from None


def is_method_recipe(path: str | os.PathLike[str]) -> bool:
    """Whether the recipe file at ``path`` has a ``method`` section."""
    d = _read_text(path)
    return isinstance(d, dict) and "method" in d


def load_recipe(path: str | os.PathLike[str]) -> MethodRecipe:
    """A method recipe from a ``.json`` or ``.toml`` file (``ValueError`` naming the file)."""
    try:
        return MethodRecipe.from_dict(_read_text(path))
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise ValueError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None


def train_recipe(
    recipe: MethodRecipe,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress: bool = True,
    callback: Callable[[int, float], bool | None] | None = None,
) -> TrainResult:
    """``fit`` the recipe's method objective into ``out_dir`` (``resume`` continues bit for bit)."""
    ds = dataset if dataset is not None else load_data(recipe.data)
    objective = _method(recipe.method).objective(recipe, ds)
    return fit(objective, recipe.train, out_dir, resume=resume, progress=progress, callback=callback)


def save_method_model(
    out_dir: Path,
    net: nn.Module,
    info: Mapping[str, Any],
    recipe: MethodRecipe,
    dataset: Dataset,
    card: Mapping[str, Any],
) -> Path:
    """Write ``model.safetensors`` (``net``'s weights in ``recipe.export_dtype``, format ``METHOD_FORMAT``, ``info``:
    name, settings, ...) and the card ``model.json`` (recipe, data, the trainer's ``card``, ``info``)."""
    dtype = torch.float16 if recipe.export_dtype == "float16" else torch.float32
    path = Path(out_dir) / "model.safetensors"
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in net.state_dict().items()
    }
    write_safetensors(path, tensors, {"format": METHOD_FORMAT, "method": json.dumps(dict(info))})
    full = {
        "name": recipe.name,
        "description": recipe.description,
        "recipe": recipe.to_dict(),
        "data": {**recipe.data.to_dict(), "examples": len(dataset), "shape": list(dataset.shape)},
        **card,
        "method": dict(info),
        "weights": path.name,
        "weights_dtype": recipe.export_dtype,
        "sample_with": f"dpmlab.methods.load({str(out_dir)!r}).sample(...)",
    }
    with atomic_write(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(full, indent=2) + "\n")
    return path


def spec_denoiser(
    path: Path,
    spec: Mapping[str, Any],
    tensors: Mapping[str, Tensor],
    *,
    edit: Callable[[nn.Module], nn.Module] | None = None,
) -> Any:
    """The frozen, eval-mode ``Denoiser`` of a method file whose network is a dpmlab ``ModelSpec`` (``spec``: its
    dict), with ``.spec`` set; ``edit`` changes the built network before the weights load (LD-Pruner's pruning)."""
    from ..models.hub import load_state
    from ..models.nets import ModelSpec

    ms = ModelSpec.from_dict(spec)
    net = ms.build_net()
    if edit is not None:
        net = edit(net)
    load_state(path, net, tensors)
    net.eval().requires_grad_(False)
    den = ms.denoiser(net)
    den.spec = ms  # type: ignore[assignment]
    return den


def load(path: str | os.PathLike[str]) -> Any:
    """The trained model of a method run: a run folder (``model.safetensors``, else the checkpoint's EMA
    weights), a method model file or a method checkpoint."""
    from safetensors import safe_open

    p = Path(path)
    if p.is_dir():
        p = p / "model.safetensors" if (p / "model.safetensors").is_file() else p / "checkpoint.safetensors"
    if not p.is_file():
        raise ValueError(f"{p}: no such method model file or run folder")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        info = json.loads(meta["method"]) if "method" in meta else None
    except Exception as e:
        raise ValueError(f"{p}: not a readable method model ({type(e).__name__}: {e})") from None
    fmt = meta.get("format")
    if info is None or fmt not in (METHOD_FORMAT, CHECKPOINT_FORMAT):
        raise ValueError(f"{p}: not a method model (format {fmt!r}); plain diffusion models load with dpmlab.load")
    if fmt == CHECKPOINT_FORMAT:
        tensors = {k[len("ema/") :]: v for k, v in tensors.items() if k.startswith("ema/")}
    return _method(info.get("name")).from_file(p, info, tensors)


# the methods register themselves (they import the helpers above)
from . import diffusevae as diffusevae  # noqa: E402
from . import domainstudio as domainstudio  # noqa: E402
from . import dpm_ot as dpm_ot  # noqa: E402
from . import ld_pruner as ld_pruner  # noqa: E402
from . import mmd_ddm as mmd_ddm  # noqa: E402
from . import pfgmpp as pfgmpp  # noqa: E402
from . import rddm as rddm  # noqa: E402
from . import speedupnet as speedupnet  # noqa: E402
