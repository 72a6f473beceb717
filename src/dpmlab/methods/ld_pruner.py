"""LD-Pruner — Castells, Song, Kim & Choi (Nota AI), "LD-Pruner: Efficient Pruning of Latent Diffusion Models
using Task-Agnostic Insights", CVPR 2024 Workshops (EDGE), arXiv 2404.11936. No public code: this file follows
the paper's description; details the available text does not fix are marked ASSUMPTION.

1. Operators: the network's blocks that keep their input's shape, so the identity can replace them — dpmlab's
   ``UNet.prunable_blocks()`` (residual and attention blocks), and in a diffusers ``UNet2DConditionModel``
   every ``attentions.j`` (transformer) block and every ``resnets.j`` whose in and out channels agree
   (``operators``). The paper also considers replacing an operator by a cheaper one; only removal is here.
2. Reference: run the whole sampler on a fixed set of inputs (labels or prompts × seeds) and keep the output
   *latents* (for a pixel model the samples themselves), ``L_ref`` ``(n, ...)``.
3. Score of operator o: regenerate with o bypassed (everything else, noise included, unchanged), ``L_o``, and

       score(o) = || mean(L_ref) - mean(L_o) ||_2 + || std(L_ref) - std(L_o) ||_2,

   mean and std element-wise over the n latents (``latent_score``). The paper's text: a task-agnostic score
   summing the change of the latents' mean and of their variability, blind to which sample is which.
   ASSUMPTION: element-wise statistics, standard deviation (not variance), L2 norms, equal weights.
4. Prune the k lowest-scoring operators (``prune``: replaced by ``Pruned`` identity modules, so their
   parameters leave the network and its file) and fine-tune the pruned network *from its kept weights*
   (``LDPrunerObjective`` on ``fit``): the model's own denoising loss plus output-level distillation from the
   frozen unpruned model on the same noisy input, ``L = L_task + lambda_kd ||f_student - f_teacher||^2``.
   ASSUMPTION: output-level distillation only, lambda_kd = 1 (as in Nota AI's BK-SDM); no feature KD.
   For a text-to-image base (``base: "mnist_t2i"`` or a diffusers folder) ``L_task`` is the base's own
   latent-diffusion loss (``training.t2i.LatentDiffusionObjective``: captioned-MNIST VAE latents, SD's
   scaled-linear schedule, the base's v / eps target, caption drop-out to the empty prompt) and the teacher is
   the unpruned ``UNet2DConditionModel`` on the same noisy latent, time and text states.

The scores are computed once when the objective is built (deterministic, so a resumed run recomputes the same
ones); ``prune=[...]`` in the settings skips scoring and removes the listed operators (baselines, reruns).
The pruned model is saved as safetensors (format ``dpmlab.method/1``) with a JSON card listing the pruned
operators and their scores; ``dpmlab.methods.load`` rebuilds it and every dpmlab solver samples it. A pruned
``UNet2DConditionModel`` file also records the base (name or absolute folder) and the UNet's config: loading
builds the UNet from that config, removes the listed operators, loads the weights, and pairs it with the
base's VAE, text encoder, tokenizer and schedule in a ``TextToImage`` (prompts, ``guided``, ``decode``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import atomic_write, dataclass_from_dict
from ..api import sample as api_sample
from ..models.denoiser import Denoiser
from ..models.hub import load as load_model
from ..models.hub import load_state, shipped_models, write_safetensors
from ..models.nets import ModelSpec
from ..models.t2i import TextToImage
from ..models.unet import UNet
from ..solvers.base import get
from ..training.data import Dataset
from ..training.losses import make_loss
from . import METHOD_FORMAT, Method, MethodRecipe, register_method, spec_denoiser

__all__ = [
    "LDPruner",
    "Pruned",
    "operators",
    "bypassed",
    "prune",
    "latent_score",
    "score_operators",
    "lowest",
    "parameter_count",
    "scoring_inputs",
    "LDPrunerObjective",
    "LDPrunedModel",
    "save_pruned",
    "T2I_PROMPTS",
]

# scoring prompts of a text-to-image base (captioned-MNIST grammar, dpmlab.training.captions): 20 prompts
T2I_PROMPTS = tuple(
    f"a {w} {d}"
    for w in ("bold", "thin")
    for d in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
)


class Pruned(nn.Module):
    """A removed operator: returns its input — for a diffusers attention block in the block's output structure
    (``(x,)`` with ``return_dict=False``, else an object with ``.sample``)."""

    same_shape = True  # dpmlab UNet: still listed by prunable_blocks()

    def __init__(self, structured: bool = False) -> None:
        super().__init__()
        self.structured = structured

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        if not self.structured:
            return x
        if not kwargs.get("return_dict", True):
            return (x,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=x)


def _is_diffusers_unet(net: nn.Module) -> bool:
    return all(hasattr(net, a) for a in ("down_blocks", "mid_block", "up_blocks"))


def operators(net: nn.Module) -> list[str]:
    """The prunable operators of ``net`` in forward order: ``UNet.prunable_blocks()``, or for a diffusers UNet
    the module paths of its transformer blocks and of its channel-preserving resnets."""
    if isinstance(net, UNet):
        return net.prunable_blocks()
    if not _is_diffusers_unet(net):
        raise ValueError(
            f"LD-Pruner prunes a dpmlab UNet or a diffusers UNet2DConditionModel, got {type(net).__name__}"
        )
    out = []
    for name, m in net.named_modules():
        parts = name.split(".")
        if len(parts) < 2 or parts[-2] not in ("resnets", "attentions") or not parts[-1].isdigit():
            continue
        if isinstance(m, Pruned) or parts[-2] == "attentions":
            out.append(name)
        elif getattr(m, "in_channels", None) == getattr(m, "out_channels", -1) and not (
            getattr(m, "up", False) or getattr(m, "down", False)
        ):
            out.append(name)

    def order(name: str) -> tuple[int, int, int, int]:  # down blocks, mid, up blocks; resnet j before attention j
        parts = name.split(".")
        section = {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}[parts[0]]
        block = int(parts[1]) if section != 1 else 0
        return section, block, int(parts[-1]), int(parts[-2] == "attentions")

    return sorted(out, key=order)


def _check(net: nn.Module, names: Iterable[str]) -> list[str]:
    names, allowed = list(names), operators(net)
    bad = [n for n in names if n not in allowed]
    if bad:
        raise ValueError(f"unknown or unprunable operators {', '.join(bad)}; allowed: {', '.join(allowed)}")
    if len(set(names)) != len(names):
        raise ValueError(f"operators listed twice: {names}")
    return names


def _slot(net: nn.Module, name: str) -> tuple[nn.ModuleList, int]:
    """The ``ModuleList`` holding operator ``name`` and its index there."""
    if isinstance(net, UNet):
        if name.startswith("mid."):
            return net.mid, int(name.split(".")[1])
        names = net.down_names if name.startswith("down.") else net.up_names
        return (net.down if name.startswith("down.") else net.up), names.index(name)
    parent, idx = name.rsplit(".", 1)
    holder = net.get_submodule(parent)
    assert isinstance(holder, nn.ModuleList)
    return holder, int(idx)


@contextlib.contextmanager
def bypassed(net: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Run ``net`` with the operators ``names`` replaced by the identity for the duration of the ``with`` block:
    ``UNet.hooks(bypass=...)``, or forward hooks that hand a diffusers block's input back as its output."""
    names = _check(net, names)
    if isinstance(net, UNet):
        with net.hooks(bypass=names):
            yield
        return

    def identity(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input_tensor"))
        if isinstance(output, Tensor):
            return x
        return (x,) if isinstance(output, tuple) else type(output)(sample=x)

    handles = [net.get_submodule(n).register_forward_hook(identity, with_kwargs=True) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def prune(net: nn.Module, names: Iterable[str]) -> nn.Module:
    """Replace the operators ``names`` of ``net`` (in place) by ``Pruned`` identity modules; returns ``net``.
    Their parameters leave ``net`` (and its ``state_dict``)."""
    for name in _check(net, names):
        holder, i = _slot(net, name)
        structured = not isinstance(net, UNet) and ".attentions." in name
        holder[i] = Pruned(structured)
    return net


def parameter_count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def latent_score(ref: Tensor, mod: Tensor) -> float:
    """LD-Pruner's score of a modification: ``|mean(ref) - mean(mod)|_2 + |std(ref) - std(mod)|_2`` with the
    mean and std element-wise over the ``n`` latents ``(n, ...)`` of each set (float64)."""
    if ref.shape != mod.shape or ref.ndim < 2 or ref.shape[0] < 2:
        raise ValueError(
            f"latent sets must have one shape (n >= 2, ...), got {tuple(ref.shape)} and {tuple(mod.shape)}"
        )
    r, m = ref.double().flatten(1), mod.double().flatten(1)
    return float((r.mean(0) - m.mean(0)).norm() + (r.std(0) - m.std(0)).norm())


def _net_of(model: Denoiser) -> nn.Module:
    net = getattr(model, "unet", None)
    net = net if isinstance(net, nn.Module) else model.net
    if not isinstance(net, nn.Module):
        raise ValueError(f"{type(model).__name__} carries no network module to prune")
    return net


def _latents(model: Denoiser, cond: Mapping[str, Any], n: int, solver: str, nfe: int, grid: str, seed: int) -> Tensor:
    with torch.no_grad():
        return api_sample(model, n, solver=solver, nfe=nfe, grid=grid, seed=seed, cond=cond)


def score_operators(
    model: Denoiser,
    cond: Mapping[str, Any],
    n: int,
    *,
    names: Sequence[str] | None = None,
    solver: str = "ddim",
    nfe: int = 10,
    grid: str = "quadratic_time",
    seed: int = 0,
) -> dict[str, float]:
    """``{operator: score}`` for ``names`` (default: all ``operators``) of ``model``'s network: ``n`` latents from
    ``solver`` at ``nfe`` with per-sample conditioning ``cond`` (labels / prompts, one row per sample) and noise
    seeded by ``(seed, index)``, with and without each operator."""
    net = _net_of(model)
    names = operators(net) if names is None else list(names)
    ref = _latents(model, cond, n, solver, nfe, grid, seed)
    scores = {}
    for name in names:
        with bypassed(net, [name]):
            scores[name] = latent_score(ref, _latents(model, cond, n, solver, nfe, grid, seed))
    return scores


def lowest(scores: Mapping[str, float], k: int) -> list[str]:
    """The ``k`` operators with the lowest scores (ties by name)."""
    if not 0 <= k <= len(scores):
        raise ValueError(f"k must be in [0, {len(scores)}] (the number of scored operators), got {k}")
    return sorted(scores, key=lambda n: (scores[n], n))[:k]


@dataclass(frozen=True)
class LDPruner:
    """LD-Pruner settings (a method recipe's ``method`` section)."""

    base: str = "mnist"  # the model to prune: a dpmlab.load name or path of a dpmlab model file / run folder
    k: int = 2  # operators to remove
    prune: tuple[str, ...] = ()  # explicit operators to remove (skips scoring; len must equal k)
    seeds: int = 8  # scoring inputs: every class label (or the null class; text-to-image: T2I_PROMPTS) x seeds
    solver: str = "ddim"  # scoring sampler (deterministic)
    nfe: int = 10  # scoring budget
    grid: str = "quadratic_time"  # scoring grid
    distill: float = 1.0  # weight of the output distillation from the unpruned model (0: task loss only)
    caption_dropout: float = 0.1  # text-to-image base: captions dropped to "" (its training recipe's 0.1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "prune", tuple(self.prune))
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"LD-Pruner k must be an int >= 0, got {self.k!r}")
        if self.prune and len(self.prune) != self.k:
            raise ValueError(f"LD-Pruner prune lists {len(self.prune)} operators but k={self.k}")
        if self.seeds < 1 or self.nfe < 1 or self.distill < 0:
            raise ValueError(
                f"LD-Pruner needs seeds >= 1, nfe >= 1, distill >= 0; got seeds={self.seeds}, "
                f"nfe={self.nfe}, distill={self.distill}"
            )
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"LD-Pruner caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        if get(self.solver).is_stochastic():
            raise ValueError(f"LD-Pruner scores with a deterministic solver; {self.solver!r} is stochastic")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "prune": list(self.prune)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LDPruner:
        return dataclass_from_dict(cls, d, what="LD-Pruner method", tuple_fields=("prune",))


def scoring_inputs(model: Denoiser, seeds: int) -> tuple[dict[str, Any], int]:
    """LD-Pruner's fixed inputs: every class label (or the null class) x ``seeds`` for a dpmlab model,
    ``T2I_PROMPTS`` x ``seeds`` for a text-to-image model."""
    if isinstance(model, TextToImage):
        return {"prompt": list(T2I_PROMPTS) * seeds}, len(T2I_PROMPTS) * seeds
    spec = getattr(model, "spec", None)
    k = len(spec.class_names) if isinstance(spec, ModelSpec) else 0
    labels = torch.arange(max(k, 1) * seeds) % max(k, 1)
    return ({"label": labels} if k else {}), len(labels)


def save_pruned(out_dir: str | Path, net: nn.Module, info: Mapping[str, Any], card: Mapping[str, Any]) -> Path:
    """``out_dir/model.safetensors`` (the pruned network's weights, format ``METHOD_FORMAT``, ``info`` with the
    pruned operators) and ``model.json`` (``card`` + ``info``)."""
    path = Path(out_dir) / "model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    write_safetensors(path, tensors, {"format": METHOD_FORMAT, "method": json.dumps(dict(info))})
    full = {
        **dict(card),
        "method": dict(info),
        "pruned": list(info["pruned"]),
        "weights": path.name,
        "sample_with": f"dpmlab.methods.load({str(out_dir)!r}).sample(...)",
    }
    with atomic_write(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(full, indent=2) + "\n")
    return path


def _base_ref(base: str) -> str:
    """How a pruned file names its base: a shipped name as is, a path made absolute."""
    return base if base in shipped_models() or not Path(base).exists() else str(Path(base).resolve())


class LDPrunerObjective:
    """Score (unless ``prune`` is given), prune the lowest ``k``, and fine-tune the pruned network from its kept
    weights with the model's loss + output distillation from the frozen unpruned network. A dpmlab UNet base
    trains on the recipe's data; a text-to-image base (``TextToImage``) on captioned MNIST with the latent loss of
    ``training.t2i`` (the recipe's data must then be ``mnist``)."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        s: LDPruner = recipe.settings
        self.recipe, self.dataset, self.name = recipe, dataset, recipe.name
        base = load_model(s.base)
        spec = getattr(base, "spec", None)
        self.t2i = isinstance(base, TextToImage)
        unet_file = isinstance(spec, ModelSpec) and isinstance(getattr(base, "net", None), UNet)
        if not isinstance(base, Denoiser) or not (self.t2i or unet_file):
            raise ValueError(
                f"LD-Pruner's objective fine-tunes a dpmlab UNet model file or a text-to-image "
                f"(diffusers) folder; {s.base!r} is neither"
            )
        self.spec = spec if isinstance(spec, ModelSpec) and not self.t2i else None
        if self.t2i and dataset.name != "mnist":
            raise ValueError(
                f"a text-to-image base fine-tunes on captioned MNIST; set data.name to 'mnist', got {dataset.name!r}"
            )
        if self.spec is not None and tuple(self.spec.data_shape) != tuple(dataset.shape):
            raise ValueError(
                f"base model {s.base!r} makes samples of shape {self.spec.data_shape}, the data has {dataset.shape}"
            )
        self.scores: dict[str, float] = {}
        if s.prune or not s.k:
            names = list(s.prune)
        else:
            cond, n = scoring_inputs(base, s.seeds)
            self.scores = score_operators(base, cond, n, solver=s.solver, nfe=s.nfe, grid=s.grid)
            names = lowest(self.scores, s.k)
        self.settings = dataclasses.replace(s, prune=tuple(names))
        net = _net_of(base)
        self.teacher = net.requires_grad_(False).eval()
        self.module: nn.Module = prune(copy.deepcopy(net), names).requires_grad_(True)
        self.params_before, self.params_after = parameter_count(self.teacher), parameter_count(self.module)
        if self.spec is not None:
            self.loss_fn = make_loss(self.spec)
        elif isinstance(base, TextToImage):
            self.latent = _latent_objective(base, self.module, s.caption_dropout)

    def __len__(self) -> int:
        return len(self.latent) if self.t2i else len(self.dataset)

    def config(self) -> dict[str, Any]:
        return self.recipe.config()

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        if self.t2i:  # captioned-MNIST latents, caption ids (dropped to "" at caption_dropout), t, noise
            return self.latent.draw(idx, g)
        b = len(idx)
        batch = {
            "x0": self.dataset.x[idx],
            "t": self.loss_fn.draw(g, b),
            "eps": torch.randn((b, *self.dataset.shape), generator=g),
        }
        if self.spec is not None and self.spec.class_names:
            if self.dataset.labels is None:
                raise ValueError("the base model is class-conditional but the data has no labels")
            batch["label"] = self.dataset.labels[idx]
        return batch

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        seen: dict[str, Any] = {}

        def student(x: Tensor, t: Tensor, **c: Any) -> Any:  # the task loss's call, recorded for the teacher
            out = module(x, t, **c)
            seen.update(x=x, t=t, c=c, out=getattr(out, "sample", out))  # diffusers UNets return .sample
            return out

        if self.t2i:
            task = self.latent.loss(student, batch)
        else:
            cond = {"label": batch["label"]} if "label" in batch else {}
            task = self.loss_fn(student, batch["x0"], batch["t"], batch["eps"], **cond).mean()
        if not self.settings.distill:
            return task
        teacher = self.teacher.to(seen["x"].device)
        with torch.no_grad():
            target = teacher(seen["x"], seen["t"], **seen["c"])
        target = getattr(target, "sample", target)
        return task + self.settings.distill * (seen["out"] - target).square().mean()

    def _info(self) -> dict[str, Any]:
        info = {
            "name": "ld_pruner",
            "settings": self.settings.to_dict(),
            "pruned": list(self.settings.prune),
            "scores": dict(self.scores),
            "parameters": {"before": self.params_before, "after": self.params_after},
        }
        if self.spec is not None:
            return {**info, "spec": self.spec.to_dict()}
        unet_config: Any = self.teacher.config  # diffusers' FrozenDict
        config = {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}
        return {**info, "base": _base_ref(self.settings.base), "unet_config": json.loads(json.dumps(config))}

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        r = self.recipe
        return save_pruned(
            out_dir, ema, self._info(), {"name": r.name, "description": r.description, "recipe": r.to_dict(), **card}
        )

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}


def _latent_objective(base: TextToImage, unet: nn.Module, caption_dropout: float) -> Any:
    """``training.t2i``'s latent-diffusion objective of ``base`` (its VAE and text encoder) training ``unet``."""
    from ..schedules import DiscreteVP
    from ..training.captions import captioned_mnist
    from ..training.t2i import LatentDiffusionObjective, T2IRecipe

    sd = DiscreteVP.from_preset("scaled_linear")
    if not (
        isinstance(base.schedule, DiscreteVP)
        and base.schedule.alphas_cumprod.shape == sd.alphas_cumprod.shape
        and torch.allclose(base.schedule.alphas_cumprod, sd.alphas_cumprod)
    ):
        raise ValueError(
            "the text-to-image base's schedule is not Stable Diffusion's scaled-linear one, which the "
            "latent-diffusion loss (dpmlab.training.t2i) trains on"
        )
    if base.prediction.value not in ("eps", "v"):
        raise ValueError(
            f"the text-to-image base predicts {base.prediction.value!r}; the latent loss trains 'eps' or 'v'"
        )
    recipe = T2IRecipe(prediction=base.prediction.value, caption_dropout=caption_dropout)
    return LatentDiffusionObjective(recipe, captioned_mnist(), base.vae, base.text_encoder, unet=unet)


@dataclass(frozen=True)
class LDPrunedModel:
    """A pruned (and fine-tuned) model: ``denoiser`` (every dpmlab solver samples it; for a text-to-image base a
    ``TextToImage`` — prompts, ``guided``, ``decode``) and the pruned operators."""

    denoiser: Denoiser
    pruned: tuple[str, ...]
    info: Mapping[str, Any]

    def sample(self, n: int = 64, **kwargs: Any) -> Tensor:
        """``dpmlab.sample(self.denoiser, n, **kwargs)``."""
        return api_sample(self.denoiser, n, **kwargs)

    @classmethod
    def from_file(cls, path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> LDPrunedModel:
        if "unet_config" in info:
            return cls(_pruned_text_to_image(path, info, tensors), tuple(info["pruned"]), dict(info))
        den = spec_denoiser(path, info["spec"], tensors, edit=lambda net: prune(net, info["pruned"]))
        return cls(den, tuple(info["pruned"]), dict(info))


def _pruned_text_to_image(path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> TextToImage:
    """The base's ``TextToImage`` with its UNet rebuilt from ``info["unet_config"]``, pruned by ``info["pruned"]``
    and loaded with ``tensors``."""
    from diffusers import UNet2DConditionModel

    base = load_model(info["base"])
    if not isinstance(base, TextToImage):
        raise ValueError(f"{path}: its base {info['base']!r} is not a text-to-image model")
    unet = prune(UNet2DConditionModel.from_config(dict(info["unet_config"])), info["pruned"])
    load_state(path, unet, tensors)
    unet.eval().requires_grad_(False)
    return TextToImage(
        unet,
        base.vae,
        base.text_encoder,
        base.tokenizer,
        base.schedule,
        base.prediction.value,
        name=f"{base.name}+ld_pruner",
    )


register_method(Method("ld_pruner", LDPruner, LDPrunerObjective, LDPrunedModel.from_file, kind="prune"))
