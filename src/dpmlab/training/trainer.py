"""Training loop: a generic core (``fit``) that trains any ``TrainObjective`` — AdamW with linear warm-up,
gradient clipping, EMA, tqdm progress, atomic safetensors checkpoints, bit-exact ``resume``, multi-process
data parallelism through ``accelerate`` — and the diffusion objective (``DiffusionObjective``, ``train``).

An objective supplies the network (``module``), the number of examples, a JSON identity (``config``), the
global batch of a step (``draw``), the loss and the export; ``fit`` owns everything else.

Determinism by construction: the global batch of step ``s`` — which examples (an epoch-wise seeded
permutation) and whatever the objective draws from the step's generator (for diffusion: noise levels, noise,
label drop-out) — is a pure function of ``(seed, s)``, and the learning rate a pure function of ``s``. Each
of ``W`` processes takes its ``B / W`` slice of the same global batch and the gradients are averaged, so a
2-process run equals a 1-process run up to float rounding, and resuming from a checkpoint (model, EMA, AdamW
moments, step, torch RNG state) continues bit for bit.

A checkpoint is one safetensors file written through a temporary file and ``os.replace``: a kill at any
moment leaves the previous good checkpoint intact. Tensors: ``model/*``, ``ema/*``, ``optim/<i>/<key>``,
``rng/torch`` (uint8); JSON metadata: the objective's config, the train config, the objective's
``checkpoint_meta()`` (diffusion: spec and recipe), step, optimizer param groups, loss log, elapsed time.
Resume refuses a checkpoint whose objective config, or train config other than ``steps``, differs.

EMA and warm-up as in DDPM (Ho et al. 2020, arXiv 2006.11239) and ADM (Dhariwal & Nichol 2021,
arXiv 2105.05233); label drop-out for classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import signal
import threading
import time
import tomllib
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .._version import __version__
from ..models.hub import CHECKPOINT_FORMAT, load_state, save_model, write_safetensors
from ..models.nets import ModelSpec, Objective
from .data import DataConfig, Dataset, load_data
from .losses import DiffusionLoss, make_loss

__all__ = [
    "TrainConfig",
    "ModelConfig",
    "Recipe",
    "TrainResult",
    "TrainObjective",
    "DiffusionObjective",
    "fit",
    "train",
    "load_recipe",
    "read_checkpoint",
]

CHECKPOINT = "checkpoint.safetensors"
MODEL = "model.safetensors"


def _fields_from(cls: type[Any], d: Mapping[str, Any], what: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown {what} fields: {', '.join(unknown)}; allowed: {', '.join(sorted(names))}")
    return cls(**d)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (a recipe's ``train`` section)."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # global batch (split evenly over processes)
    lr: float = 2e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 100  # linear warm-up steps
    lr_decay: str = "constant"  # after warm-up: "constant" or "cosine" (to 0 at the last step)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables
    ema_decay: float = 0.999  # EMA decay (effective decay min(ema_decay, (1 + s) / (10 + s)))
    label_dropout: float = 0.1  # probability of training a labelled example as the null class (CFG)
    seed: int = 0  # seeds the initialisation, data order and noise
    checkpoint_every: int = 500  # steps between checkpoints (one is always written at the end)
    log_every: int = 50  # steps per logged mean loss
    p_mean: float = -1.2  # EDM objective: mean of ln(sigma)
    p_std: float = 1.2  # EDM objective: std of ln(sigma)

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"train.{name} must be a positive int, got {v!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"train.lr must be positive, got {self.lr!r}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ValueError("train.warmup, train.weight_decay and train.grad_clip must be >= 0")
        if self.lr_decay not in ("constant", "cosine"):
            raise ValueError(f"train.lr_decay must be 'constant' or 'cosine', got {self.lr_decay!r}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"train.label_dropout must be in [0, 1), got {self.label_dropout!r}")
        if not (isinstance(self.seed, int) and 0 <= self.seed < 2**31):
            raise ValueError(f"train.seed must be an int in [0, 2**31), got {self.seed!r}")
        if len(self.adam_betas) != 2 or not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas!r}")

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up, then constant or cosine."""
        lr = self.lr * min(1.0, (step + 1) / self.warmup) if self.warmup else self.lr
        if self.lr_decay == "cosine" and step >= self.warmup:
            frac = (step - self.warmup) / max(1, self.steps - self.warmup)
            lr *= 0.5 * (1.0 + math.cos(math.pi * frac))
        return lr


@dataclass(frozen=True)
class ModelConfig:
    """The network and objective (a recipe's ``model`` section)."""

    net: str = "unet"  # "unet" or "mlp"
    net_config: Mapping[str, Any] = field(default_factory=dict)  # the network's config fields
    objective: str = "eps"  # "eps", "x0", "v" or "edm"
    schedule: str = "linear"  # schedule name (dpmlab.schedules.get_schedule); EDM uses EDM(sigma_data)
    sigma_data: float = 0.5  # EDM only

    def __post_init__(self) -> None:
        if self.objective not in {o.value for o in Objective}:
            raise ValueError(f"unknown objective {self.objective!r}; allowed: {', '.join(o.value for o in Objective)}")
        object.__setattr__(self, "net_config", dict(self.net_config))


@dataclass(frozen=True)
class Recipe:
    """A whole training run: data, model, optimisation. Stored as JSON or TOML under ``recipes/``."""

    name: str
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    export_dtype: str = "float16"  # dtype of the exported model.safetensors: "float16" or "float32"
    description: str = ""

    def __post_init__(self) -> None:
        if self.export_dtype not in ("float16", "float32"):
            raise ValueError(f"export_dtype must be 'float16' or 'float32', got {self.export_dtype!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["adam_betas"] = list(self.train.adam_betas)
        d["model"]["net_config"] = dict(self.model.net_config)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Recipe:
        d = dict(d)
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            hint = "; a 'method' section makes a method recipe (dpmlab.methods.load_recipe)" if "method" in d else ""
            raise ValueError(f"unknown recipe fields: {', '.join(unknown)}{hint}")
        if "name" not in d:
            raise ValueError("a recipe needs a name")
        d["data"] = DataConfig.from_dict(d.get("data", {}))
        d["model"] = _fields_from(ModelConfig, d.get("model", {}), "model")
        d["train"] = _fields_from(TrainConfig, d.get("train", {}), "train")
        return cls(**d)


def load_recipe(path: str | os.PathLike[str]) -> Recipe:
    """A recipe from a ``.json`` or ``.toml`` file."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"recipe {str(p)!r} does not exist")
    try:
        text = p.read_text()
        d = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"{p}: not valid {'TOML' if p.suffix == '.toml' else 'JSON'} ({e})") from None
    try:
        return Recipe.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{p}: {e}") from None


@dataclass(frozen=True)
class TrainResult:
    out_dir: Path
    step: int  # steps done
    losses: tuple[tuple[int, float], ...]  # (last step of window, mean loss over the window)
    elapsed_s: float  # wall-clock seconds of training, summed over resumed runs
    stopped: bool  # the callback stopped the run early (no final checkpoint or export)

    @property
    def final_loss(self) -> float:
        return self.losses[-1][1] if self.losses else float("nan")


class TrainObjective(Protocol):
    """What ``fit`` trains: a network, a data set of ``len(objective)`` examples and a loss.

    ``fit`` owns the optimisation (data order, per-step generator, learning rate, AdamW over the
    ``requires_grad`` parameters of ``module``, clipping, EMA, checkpoints, resume, processes); the
    objective owns everything about the data, the model and the loss. Build ``module`` under a seeded
    global RNG (as ``DiffusionObjective`` does with ``torch.manual_seed(seed)``): ``fit`` saves and
    restores the global torch RNG in checkpoints but does not reseed it.
    """

    name: str  # run name (progress bar, card)
    module: nn.Module  # the trainable network: optimised (requires_grad parameters only), EMA'd, checkpointed

    def __len__(self) -> int:
        """Number of training examples: the epoch length of the seeded data order."""
        ...

    def config(self) -> dict[str, Any]:
        """JSON-able identity (data, model, loss settings); resume refuses a checkpoint whose saved one differs."""
        ...

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        """The global batch of one step: ``idx`` the ``(B,)`` int64 example indices, ``g`` the step's generator
        (seeded from ``(seed, step)``). Every returned tensor has leading dimension ``B``."""
        ...

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        """Scalar loss of this process's slice of the batch (on the device); ``module`` may be wrapped."""
        ...

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        """Write the final model from ``ema`` (the EMA copy of ``module``); ``card`` holds the generic facts."""
        ...

    def checkpoint_meta(self) -> dict[str, str]:
        """Extra checkpoint header entries, each value JSON text (``json.dumps(...)``); may be ``{}``."""
        ...


def _spec_for(recipe: Recipe, ds: Dataset) -> ModelSpec:
    """The model spec of ``recipe`` on data ``ds``, checking that net and data fit together."""
    m = recipe.model
    cfg = dict(m.net_config)
    k = int(cfg.get("num_classes", 0))
    if k and ds.labels is None:
        raise ValueError(f"model.net_config.num_classes={k} but dataset {ds.name!r} has no labels")
    if k and k != ds.num_classes:
        raise ValueError(f"model.net_config.num_classes={k} but dataset {ds.name!r} has {ds.num_classes} classes")
    if m.net == "unet":
        want = (cfg.get("in_channels", 1), cfg.get("image_size", 32), cfg.get("image_size", 32))
        if len(ds.shape) != 3 or ds.shape != tuple(want):
            raise ValueError(f"UNet in_channels/image_size give samples of shape {want}, data has {ds.shape}")
    elif m.net == "mlp" and tuple(cfg.get("data_shape", (2,))) != ds.shape:
        raise ValueError(f"MLP data_shape {tuple(cfg.get('data_shape', (2,)))} differs from the data's {ds.shape}")
    return ModelSpec(
        m.net, cfg, Objective(m.objective), m.schedule, ds.shape, m.sigma_data, ds.class_names if k else ()
    )


class DiffusionObjective:
    """A diffusion model of ``recipe`` on ``dataset``: the net built from the recipe's spec (initialised
    from ``torch.manual_seed(recipe.train.seed)``), the recipe's eps / x0 / v / EDM loss with label
    drop-out to the null class, exported as ``model.safetensors`` + ``model.json`` (``dpmlab.load``)."""

    def __init__(self, recipe: Recipe, dataset: Dataset) -> None:
        self.recipe, self.dataset = recipe, dataset
        self.name = recipe.name
        self.spec = _spec_for(recipe, dataset)
        tc = recipe.train
        torch.manual_seed(tc.seed)
        self.module: nn.Module = self.spec.build_net()
        self.loss_fn: DiffusionLoss = make_loss(self.spec, p_mean=tc.p_mean, p_std=tc.p_std)

    def __len__(self) -> int:
        return len(self.dataset)

    def config(self) -> dict[str, Any]:
        """The recipe without ``train.steps`` (the one field a resumed run may change)."""
        d = self.recipe.to_dict()
        del d["train"]["steps"]
        return d

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        """``x0``, noise levels ``t``, noise ``eps`` and (conditional nets) ``label``, dropped to the null
        class with probability ``train.label_dropout``; drawn from ``g`` in this order."""
        b = len(idx)
        t = self.loss_fn.draw(g, b)
        eps = torch.randn((b, *self.dataset.shape), generator=g)
        drop = torch.rand(b, generator=g) < self.recipe.train.label_dropout
        batch = {"x0": self.dataset.x[idx], "t": t, "eps": eps}
        if self.spec.class_names:
            assert self.dataset.labels is not None
            batch["label"] = torch.where(drop, len(self.spec.class_names), self.dataset.labels[idx])
        return batch

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        cond = {"label": batch["label"]} if "label" in batch else {}
        return self.loss_fn(module, batch["x0"], batch["t"], batch["eps"], **cond).mean()

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        ds, r = self.dataset, self.recipe
        full = {
            "name": r.name,
            "description": r.description,
            "data": {
                **r.data.to_dict(),
                "examples": len(ds),
                "shape": list(ds.shape),
                "skipped_files": len(ds.skipped),
            },
            "recipe": r.to_dict(),
            **{k: v for k, v in card.items() if k not in ("name", "train")},
        }
        dtype = torch.float16 if r.export_dtype == "float16" else torch.float32
        return save_model(Path(out_dir) / MODEL, ema, self.spec, dtype=dtype, card=full)

    def checkpoint_meta(self) -> dict[str, str]:
        # "spec" lets dpmlab.load(<run folder>) rebuild the net from a checkpoint
        return {"spec": json.dumps(self.spec.to_dict()), "recipe": json.dumps(self.recipe.to_dict())}


class _Dist:
    """Process group view: ``accelerate`` when launched with ``WORLD_SIZE > 1``, else a plain process."""

    def __init__(self) -> None:
        self.acc: Any = None
        self.rank, self.world = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            try:
                from accelerate import Accelerator
            except ImportError:
                raise ImportError("multi-process training needs accelerate: pip install 'dpmlab[train]'") from None
            self.acc = Accelerator(cpu=not torch.cuda.is_available())
            self.rank, self.world = self.acc.process_index, self.acc.num_processes

    @property
    def device(self) -> torch.device:
        return self.acc.device if self.acc is not None else torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.acc is not None:
            self.acc.wait_for_everyone()


def _optim_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """AdamW's state dict flattened: tensors ``optim/<param>/<key>`` + JSON for the rest."""
    sd = opt.state_dict()
    tensors, extra = {}, {}
    for idx, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim/{idx}/{key}"] = v.detach().cpu().contiguous()
            else:
                extra[f"{idx}/{key}"] = v
    return tensors, {"param_groups": sd["param_groups"], "extra": extra}


def _optim_state(tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, v in tensors.items():
        if name.startswith("optim/"):
            _, idx, key = name.split("/", 2)
            state.setdefault(int(idx), {})[key] = v
    for name, v in meta["extra"].items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A checkpoint's tensors and decoded metadata (``ValueError`` naming the file if it is bad)."""
    from safetensors import safe_open

    p = Path(path)
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise ValueError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{p}: not a dpmlab training checkpoint (format {meta.get('format')!r})")
    try:
        decoded = {k: json.loads(v) for k, v in meta.items() if k != "format"}
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: bad checkpoint metadata ({e})") from None
    return tensors, decoded


# header entries the trainer writes itself; an objective's checkpoint_meta() may not use them
_RESERVED_META = frozenset(
    {"format", "objective", "train", "step", "optim", "losses", "window", "elapsed_s", "cpu_s", "world_size", "dpmlab"}
)


def _train_dict(tc: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(tc)
    d["adam_betas"] = list(tc.adam_betas)
    return d


def _differences(saved: Any, now: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two JSON values differ, each with both values."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out: list[str] = []
        for k in sorted(set(saved) | set(now)):
            p = f"{prefix}.{k}" if prefix else k
            if k in saved and k in now:
                out += _differences(saved[k], now[k], p)
            else:
                out.append(f"{p} (saved {_shown(saved, k)}, now {_shown(now, k)})")
        return out
    if saved == now:
        return []
    return [f"{prefix or '<all>'} (saved {json.dumps(saved)[:80]}, now {json.dumps(now)[:80]})"]


def _shown(d: Mapping[str, Any], k: str) -> str:
    return json.dumps(d[k])[:80] if k in d else "absent"


def _saved_configs(path: Path, meta: Mapping[str, Any]) -> tuple[Any, Any]:
    """The objective and train configs a checkpoint was written with."""
    if "objective" in meta and "train" in meta:
        return meta["objective"], meta["train"]
    recipe = meta.get("recipe")
    if isinstance(recipe, dict) and isinstance(recipe.get("train"), dict):
        # written by train() before fit() existed: the recipe held both (DiffusionObjective.config() is the
        # recipe without train.steps)
        obj = {**recipe, "train": {k: v for k, v in recipe["train"].items() if k != "steps"}}
        return obj, recipe["train"]
    raise ValueError(f"{path}: the checkpoint records no objective and train config; cannot resume from it")


class _Run:
    """One training run's mutable state (module, EMA, optimizer, step) and its checkpoint I/O."""

    def __init__(self, objective: TrainObjective, tc: TrainConfig, out: Path, dist: _Dist) -> None:
        self.obj, self.tc, self.out, self.dist = objective, tc, out, dist
        self.n = len(objective)
        if self.n < 1:
            raise ValueError(f"objective {objective.name!r} has no training examples (len 0)")
        try:
            self.config = json.loads(json.dumps(objective.config()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"objective {objective.name!r}: config() is not JSON-able ({e})") from None
        self.train_config = _train_dict(tc)
        self.net = objective.module.to(dist.device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.params = [p for p in self.net.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError(f"objective {objective.name!r}: the module has no parameters with requires_grad")
        self.opt = torch.optim.AdamW(self.params, lr=tc.lr, betas=tc.adam_betas, weight_decay=tc.weight_decay)
        self._extra_meta()  # a bad checkpoint_meta() fails now, not at the first checkpoint
        self.step = 0
        self.losses: list[tuple[int, float]] = []
        self.window: list[float] = []  # losses of the steps since the last logged mean
        self.elapsed = 0.0  # wall-clock seconds of training, over all resumed runs
        self.cpu = 0.0  # CPU seconds of this process over the same span (wall-clock counts other load too)
        self._perm_cache: dict[int, Tensor] = {}

    # --- determinism: everything random about step s comes from (seed, s) -----------------------
    def _perm(self, epoch: int) -> Tensor:
        if epoch not in self._perm_cache:
            g = torch.Generator().manual_seed(stream_seed(self.tc.seed, 2 * epoch + 1))
            self._perm_cache = {e: p for e, p in self._perm_cache.items() if e == epoch - 1}
            self._perm_cache[epoch] = torch.randperm(self.n, generator=g)
        return self._perm_cache[epoch]

    def batch(self, step: int) -> dict[str, Tensor]:
        """This process's slice of the global batch of ``step``, on the device."""
        b, n = self.tc.batch_size, self.n
        pos = torch.arange(step * b, (step + 1) * b)
        idx = torch.cat([self._perm(int(e))[pos[pos // n == e] % n] for e in torch.unique(pos // n)])
        g = torch.Generator().manual_seed(stream_seed(self.tc.seed, 2 * step))
        drawn = self.obj.draw(idx, g)
        per = b // self.dist.world
        sl = slice(self.dist.rank * per, (self.dist.rank + 1) * per)
        out = {}
        for k, v in drawn.items():
            if not isinstance(v, Tensor) or v.dim() == 0 or v.shape[0] != b:
                got = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(
                    f"objective {self.obj.name!r}: draw() gave {k!r} as {got}; every entry must be a "
                    f"tensor with leading dimension batch_size={b}"
                )
            out[k] = v[sl].to(self.dist.device)
        return out

    def update_ema(self) -> None:
        decay = min(self.tc.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.net.parameters()):
                if p.requires_grad:  # frozen parameters never change: their EMA is the deep copy
                    p_ema.lerp_(p, 1.0 - decay)
            for b_ema, b in zip(self.ema.buffers(), self.net.buffers()):
                b_ema.copy_(b)

    # --- checkpoints ----------------------------------------------------------------------------
    def _extra_meta(self) -> dict[str, str]:
        extra = self.obj.checkpoint_meta()
        for k, v in extra.items():
            if k in _RESERVED_META:
                raise ValueError(
                    f"objective {self.obj.name!r}: checkpoint_meta() key {k!r} is the trainer's; "
                    f"reserved: {', '.join(sorted(_RESERVED_META))}"
                )
            try:
                json.loads(v)
            except (TypeError, json.JSONDecodeError):
                raise ValueError(
                    f"objective {self.obj.name!r}: checkpoint_meta()[{k!r}] must be JSON text "
                    f"(json.dumps(...)), got {v!r:.80}"
                ) from None
        return dict(extra)

    def save(self) -> None:
        tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()}
        tensors |= {f"ema/{k}": v.detach().cpu().contiguous() for k, v in self.ema.state_dict().items()}
        opt_tensors, opt_meta = _optim_tensors(self.opt)
        tensors |= opt_tensors
        tensors["rng/torch"] = torch.get_rng_state()
        meta = {
            "format": CHECKPOINT_FORMAT,
            "objective": json.dumps(self.config),
            "train": json.dumps(self.train_config),
            **self._extra_meta(),
            "step": json.dumps(self.step),
            "optim": json.dumps(opt_meta),
            "losses": json.dumps(self.losses),
            "window": json.dumps(self.window),
            "elapsed_s": json.dumps(self.elapsed),
            "cpu_s": json.dumps(self.cpu),
            "world_size": json.dumps(self.dist.world),
            "dpmlab": json.dumps(__version__),
        }
        write_safetensors(self.out / CHECKPOINT, tensors, meta)

    def restore(self) -> None:
        path = self.out / CHECKPOINT
        if not path.is_file():
            raise ValueError(f"cannot resume: {path} does not exist")
        tensors, meta = read_checkpoint(path)
        saved_obj, saved_train = _saved_configs(path, meta)
        rule = (
            "the checkpoint was written by a different recipe (only train.steps and train.checkpoint_every may "
            "change on resume)"
        )
        diff = [d for d in _differences(saved_obj, self.config) if not d.startswith("train.")]  # compared below
        if diff:
            raise ValueError(f"{path}: {rule}: objective {self.obj.name!r} config differs at {'; '.join(diff[:5])}")
        free = ("steps", "checkpoint_every")  # neither changes the trained weights
        diff = _differences(
            {k: v for k, v in saved_train.items() if k not in free} if isinstance(saved_train, dict) else saved_train,
            {k: v for k, v in self.train_config.items() if k not in free},
        )
        if diff:
            raise ValueError(f"{path}: {rule}: train config differs at {'; '.join(diff[:5])}")
        for prefix, module in (("model/", self.net), ("ema/", self.ema)):
            load_state(path, module, {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        try:
            self.opt.load_state_dict(_optim_state(tensors, meta["optim"]))
        except (KeyError, ValueError, RuntimeError) as e:
            raise ValueError(f"{path}: optimizer state does not fit ({e})") from None
        torch.set_rng_state(tensors["rng/torch"])
        self.step = int(meta["step"])
        self.losses = [(int(s), float(v)) for s, v in meta["losses"]]
        self.window = [float(v) for v in meta["window"]]
        self.elapsed = float(meta["elapsed_s"])
        self.cpu = float(meta.get("cpu_s", 0.0))

    def card(self) -> dict[str, Any]:
        """The generic facts of the run, for the objective's export."""
        return {
            "name": self.obj.name,
            "steps": self.step,
            "seed": self.tc.seed,
            "final_loss": self.losses[-1][1] if self.losses else None,
            "loss_window_steps": self.tc.log_every,
            "losses": list(self.losses),
            "train_time_s": round(self.elapsed, 1),
            "train_cpu_time_s": round(self.cpu, 1),
            "parameters": sum(p.numel() for p in self.ema.parameters()),
            "processes": self.dist.world,
            "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {platform.processor() or platform.system()}",
            "torch": torch.__version__,
            "dpmlab": __version__,
            "weights": "EMA",
            "train": copy.deepcopy(self.train_config),
        }


def net_config_for(
    net: str, config: Mapping[str, Any], shape: Sequence[int], channels: int = 1, *, num_classes: int | None = None
) -> dict[str, Any]:
    """``config`` with the data-dependent fields of network kind ``net`` filled in (given ones win): the MLP's
    ``data_shape``, the UNet's ``image_size`` / ``in_channels``, and ``num_classes`` if given. ``channels``
    multiplies the first data dimension (RDDM: input and output are two stacked images)."""
    shp = (shape[0] * channels, *shape[1:])
    if net == "mlp":
        derived: dict[str, Any] = {"data_shape": list(shp)}
    elif net == "unet":
        if len(shape) != 3:
            raise ValueError(f"a UNet needs image data (C, H, W); the data has samples of shape {tuple(shape)}")
        derived = {"image_size": shape[-1], "in_channels": shp[0]}
    else:
        raise ValueError(f"unknown network kind {net!r}; allowed: mlp, unet")
    if num_classes is not None:
        derived["num_classes"] = num_classes
    return {**derived, **config}


_MASK64 = (1 << 64) - 1


def stream_seed(seed: int, k: int) -> int:
    """The generator seed of draw ``k`` of a run seeded ``seed``: a splitmix64 hash of both, cut to 32 bits.
    torch's CPU generator (mt19937) keeps only the low 32 bits of a seed, so ``(seed << 32) + k`` would
    ignore ``seed`` entirely; the hash makes every (seed, k) give its own stream."""
    z = (seed * 0x9E3779B97F4A7C15 + k * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & 0xFFFFFFFF


class _Interrupts:
    """While training: SIGINT / SIGTERM only set ``signal`` (the loop checkpoints between steps and stops); a
    second SIGINT interrupts at once. Installed only in the main thread; ``restore`` puts the handlers back."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}


def fit(
    objective: TrainObjective,
    train: TrainConfig,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    progress: bool = True,
    callback: Callable[[int, float], bool | None] | None = None,
) -> TrainResult:
    """Train ``objective.module`` on ``objective``'s loss with the optimisation settings ``train`` into
    ``out_dir``: ``checkpoint.safetensors`` every ``train.checkpoint_every`` steps and at the end, then
    ``objective.export(ema, out_dir, card)``. ``resume`` continues from the checkpoint bit for bit (refused
    if the objective's ``config()`` or anything in ``train`` but ``steps`` changed). ``callback(step,
    loss)`` runs after every step; returning ``True`` stops at once, as if the process were killed.
    Launch with ``torchrun`` / ``accelerate`` (``WORLD_SIZE > 1``) for data-parallel training."""
    return _fit(objective, train, Path(out_dir), _Dist(), resume=resume, progress=progress, callback=callback)


def _fit(
    objective: TrainObjective,
    tc: TrainConfig,
    out: Path,
    dist: _Dist,
    *,
    resume: bool,
    progress: bool,
    callback: Callable[[int, float], bool | None] | None,
) -> TrainResult:
    if not isinstance(tc, TrainConfig):
        raise TypeError(f"fit needs a TrainConfig, got {type(tc).__name__}")
    missing = [
        a
        for a in ("name", "module", "__len__", "config", "draw", "loss", "export", "checkpoint_meta")
        if not hasattr(objective, a)
    ]
    if missing or not isinstance(objective.module, nn.Module):
        raise TypeError(
            f"fit needs a TrainObjective; {type(objective).__name__} lacks "
            f"{', '.join(missing) or 'an nn.Module as module'}"
        )
    if tc.batch_size % dist.world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {dist.world} processes")
    run = _Run(objective, tc, out, dist)
    if resume:
        run.restore()
        if run.step >= tc.steps:
            raise ValueError(
                f"{out / CHECKPOINT} is at step {run.step}, train.steps={tc.steps}: nothing to resume; "
                f"give more steps (--steps > {run.step}) to continue training"
            )
    elif (out / CHECKPOINT).exists():
        raise ValueError(f"{out / CHECKPOINT} exists; pass resume=True (--resume) or choose another folder")
    net: nn.Module = run.net
    opt: Any = run.opt
    if dist.acc is not None:
        net, opt = dist.acc.prepare(run.net, run.opt)

    from tqdm import tqdm

    bar = tqdm(
        total=tc.steps,
        initial=run.step,
        desc=objective.name,
        unit="step",
        disable=not (progress and dist.main),
        dynamic_ncols=True,
    )
    t_start, step_start, cpu_start = time.perf_counter(), run.step, time.process_time()
    stopped = False
    net.train()
    interrupt = _Interrupts()  # SIGINT / SIGTERM: finish the step, write the checkpoint, raise KeyboardInterrupt
    try:
        while run.step < tc.steps:
            if interrupt.signal is not None:
                run.elapsed += time.perf_counter() - t_start
                run.cpu += time.process_time() - cpu_start
                if dist.main:
                    run.save()
                bar.close()
                raise KeyboardInterrupt(
                    f"{interrupt.signal}: checkpoint written at step {run.step} to "
                    f"{out / CHECKPOINT}; continue with resume=True (--resume)"
                )
            batch = run.batch(run.step)
            for g in run.opt.param_groups:
                g["lr"] = tc.lr_at(run.step)
            loss = objective.loss(net, batch)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                got = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
                raise ValueError(f"objective {objective.name!r}: loss() must return a scalar tensor, got {got}")
            opt.zero_grad(set_to_none=True)
            if dist.acc is not None:
                dist.acc.backward(loss)
            else:
                loss.backward()
            if tc.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.params, tc.grad_clip)
            opt.step()
            run.update_ema()
            run.step += 1
            lv = float(loss.detach())
            run.window.append(lv)
            if run.step % tc.log_every == 0 or run.step == tc.steps:
                run.losses.append((run.step, sum(run.window) / len(run.window)))
                run.window = []
            now = time.perf_counter()
            if bar.n != run.step:
                rate = (run.step - step_start) * tc.batch_size / max(now - t_start, 1e-9)
                bar.set_postfix(loss=f"{lv:.4f}", img_s=f"{rate:.0f}", refresh=False)
                bar.update(1)
            if callback is not None and callback(run.step, lv):
                stopped = True
                break
            if run.step % tc.checkpoint_every == 0 or run.step == tc.steps:
                run.elapsed += now - t_start
                run.cpu += time.process_time() - cpu_start
                t_start, step_start, cpu_start = now, run.step, time.process_time()
                if dist.main:
                    run.save()
                dist.barrier()
    finally:
        interrupt.restore()
        bar.close()
    if not stopped:
        if dist.main:
            objective.export(run.ema, out, run.card())
        dist.barrier()
    return TrainResult(out, run.step, tuple(run.losses), run.elapsed, stopped)


def train(
    recipe: Recipe,
    out_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    dataset: Dataset | None = None,
    progress: bool = True,
    callback: Callable[[int, float], bool | None] | None = None,
) -> TrainResult:
    """Train ``recipe`` into ``out_dir`` (``checkpoint.safetensors`` every ``checkpoint_every`` steps and
    at the end; ``model.safetensors`` + ``model.json``: the EMA weights, loadable by
    ``dpmlab.load(out_dir)``). ``resume`` continues from the checkpoint bit for bit. ``callback(step,
    loss)`` runs after every step; returning ``True`` stops at once, as if the process were killed.
    Launch with ``torchrun`` / ``accelerate`` (``WORLD_SIZE > 1``) for data-parallel training.
    ``fit(DiffusionObjective(recipe, dataset), recipe.train, out_dir, ...)``."""
    out = Path(out_dir)
    dist = _Dist()
    ds = dataset if dataset is not None else load_data(recipe.data)
    if ds.skipped and dist.main:
        warnings.warn(f"{len(ds.skipped)} unreadable image files skipped (first: {ds.skipped[0]})", stacklevel=2)
    tc = recipe.train
    if tc.batch_size % dist.world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {dist.world} processes")
    return _fit(DiffusionObjective(recipe, ds), tc, out, dist, resume=resume, progress=progress, callback=callback)
