"""DomainStudio — Zhu, Niu, Zhang et al., "DomainStudio: Fine-Tuning Diffusion Models for Domain-Driven Image
Generation using Limited Data", arXiv 2306.14153 (2023); authors' code bbzhu-jy16/DomainStudio (read at a877a21:
``Unconditional/guided_diffusion/gaussian_diffusion.py::training_fewshot_losses`` and ``get_wave``).

A pretrained (source) diffusion model is fine-tuned on about 10 images of a target domain while the frozen source
model stays in the loop. For a batch of shots ``x0``, one draw of ``t`` and ``eps`` and ``x_t = a x0 + s eps``,
both models predict ``x̂0`` (adapted ``x̂0_θ``, source ``x̂0_src``, same ``x_t``), and

    L = L_simple + λ_img L_img + λ_hf L_hf + λ_hfmse L_hfmse

* ``L_simple``: the base model's own denoising loss (eps / x0 / v target, ``dpmlab.training.losses``).
* ``L_img`` (relative distances, image level): over ``m`` batch members (``sim_size``; the authors pick 3 at
  random), cosine similarities ``c_ij`` of the flattened ``x̂0_i, x̂0_j`` (``i ≠ j``), a softmax over each row,
  ``p_i = softmax_j(c_ij(src))``, ``q_i = softmax_j(c_ij(θ))``, and ``KL(p ‖ q) = Σ p (log p - log q)`` summed
  and divided by the ``m (m - 1)`` entries (the authors' ``KLDivLoss(log q, p)`` with its default 'mean').
* ``L_hf``: the same on the Haar high-frequency part ``HF(x) = LH + HL + HH`` (orthonormal 2x2 Haar, stride 2,
  per channel: ``haar``).
* ``L_hfmse = mean |HF(x̂0_θ) - HF(x0)|²`` (high-frequency reconstruction of the shots).

Weights: the authors' defaults ``pair_weight = hf_pair_weight = 4``, ``hf_mse_weight = 1`` — but their total
multiplies the HF-MSE term by a further 0.05 (``terms["mse2"] * 0.05``), so the effective ``λ_hfmse`` is 0.05,
which is our default. Their ``L_vb`` (iDDPM learned variance) has no counterpart: dpmlab models have fixed
variances. Plain fine-tuning is the same objective with the three weights 0 (the baseline is a config change).

Choices of ours (the paper is silent or works at 256² on iDDPM): the base is a dpmlab model file (default the
shipped class-conditional MNIST UNet), used *unconditionally* through its null class (``label = None``; an int
conditions every step on that class instead); the target domain is made from MNIST by a fixed transform
(``to_domain``: ``"bold"`` = 3x3 grey dilation, ``"inverted"`` = contrast inverted), 10 shots chosen by a seeded
permutation (``shot_indices``); the ``sim_size`` members are chosen by the step's generator (``sim_size = 0``:
the whole batch). The authors also sample large t (> 500) with the source model; not done here — the adapted
model samples alone with any dpmlab solver.

Text-to-image variant (``domainstudio_t2i``, the authors' ``Text-to-Image/train_domainstudio.py``, a diffusers
DreamBooth fork): on a ``TextToImage`` latent model, DreamBooth's instance loss on the VAE-encoded shots with
``instance_prompt`` + ``prior_weight`` x the loss on latents the frozen model generated for ``class_prompt``, plus
the three terms on VAE-decoded x̂0 of the ``sim_size`` picked members (weights 1e2, 1e2, 0.1, prior 1, batch 4:
the authors' ``Text-to-Image/README.md``; their lr 5e-6 x 800 steps on Stable Diffusion). Our word-level
tokenizer has no rare token: the default binding is an in-vocabulary combination the caption grammar never makes
("a slanted upright digit"). The UNet is trained; VAE and text encoder stay frozen.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import dataclass_from_dict
from ..api import sample as api_sample
from ..models.denoiser import Denoiser
from ..models.hub import load as load_model
from ..models.hub import load_state
from ..models.nets import ModelSpec, Objective
from ..training.data import Dataset
from ..training.losses import PredictionLoss, make_loss
from . import Method, MethodRecipe, register_method, save_method_model, spec_denoiser

__all__ = [
    "DomainStudio",
    "DomainStudioObjective",
    "DomainStudioModel",
    "DomainStudioT2I",
    "DomainStudioT2IObjective",
    "DomainStudioT2IModel",
    "haar",
    "haar_inverse",
    "high_frequency",
    "pairwise_similarity_kl",
    "to_domain",
    "shot_indices",
    "domain_shots",
    "DOMAINS",
]

DOMAINS = ("bold", "inverted")


def _haar_filters(dtype: torch.dtype, device: torch.device) -> Tensor:
    """The four orthonormal 2x2 Haar filters LL, LH, HL, HH ``(4, 1, 2, 2)`` (rows: vertical, cols: horizontal)."""
    lo = torch.tensor([1.0, 1.0], dtype=dtype, device=device) / math.sqrt(2.0)
    hi = torch.tensor([-1.0, 1.0], dtype=dtype, device=device) / math.sqrt(2.0)
    return torch.stack([torch.outer(lo, lo), torch.outer(lo, hi), torch.outer(hi, lo), torch.outer(hi, hi)])[:, None]


def haar(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One level of the orthonormal 2-D Haar transform of ``x (B, C, H, W)`` (H, W even), per channel:
    ``(LL, LH, HL, HH)``, each ``(B, C, H/2, W/2)``; energy preserving, ``haar_inverse`` undoes it exactly."""
    if x.ndim != 4 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"haar needs images (B, C, H, W) with even H and W, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    out = F.conv2d(x.reshape(b * c, 1, h, w), _haar_filters(x.dtype, x.device), stride=2)
    out = out.reshape(b, c, 4, h // 2, w // 2)
    return out[:, :, 0], out[:, :, 1], out[:, :, 2], out[:, :, 3]


def haar_inverse(ll: Tensor, lh: Tensor, hl: Tensor, hh: Tensor) -> Tensor:
    """The image whose ``haar`` is ``(ll, lh, hl, hh)`` (the transposed convolution: the filters are orthonormal)."""
    b, c, h, w = ll.shape
    bands = torch.stack([ll, lh, hl, hh], 2).reshape(b * c, 4, h, w)
    return F.conv_transpose2d(bands, _haar_filters(ll.dtype, ll.device), stride=2).reshape(b, c, 2 * h, 2 * w)


def high_frequency(x: Tensor) -> Tensor:
    """DomainStudio's high-frequency part ``LH + HL + HH`` of ``x`` (half resolution)."""
    _, lh, hl, hh = haar(x)
    return lh + hl + hh


def _row_softmax_sims(x: Tensor) -> Tensor:
    """``(m, m - 1)``: row ``i`` the softmax over ``j ≠ i`` of the cosine similarities of flattened ``x_i, x_j``."""
    f = F.normalize(x.flatten(1), dim=1, eps=1e-12)
    s = f @ f.T
    m = s.shape[0]
    off = ~torch.eye(m, dtype=torch.bool, device=s.device)
    return torch.softmax(s[off].reshape(m, m - 1), dim=1)


def pairwise_similarity_kl(source: Tensor, adapted: Tensor) -> Tensor:
    """DomainStudio's relative-distance loss of two batches ``(m, ...)`` (same inputs, ``m >= 3``): the mean over
    the ``m (m - 1)`` entries of ``p (log p - log q)``, ``p`` / ``q`` the row-softmaxed pairwise cosine similarities
    of ``source`` / ``adapted`` (KL(source ‖ adapted) per row, summed, divided by ``m (m - 1)``). 0 iff the rows
    agree; invariant to permuting the batch."""
    if source.shape != adapted.shape or source.ndim < 2 or source.shape[0] < 3:
        raise ValueError(
            f"pairwise_similarity_kl needs two batches of one shape (m >= 3, ...), got "
            f"{tuple(source.shape)} and {tuple(adapted.shape)}"
        )
    p, q = _row_softmax_sims(source.detach()), _row_softmax_sims(adapted)
    return (p * (p.log() - q.log())).sum() / p.numel()


def to_domain(x: Tensor, domain: str) -> Tensor:
    """Images ``(B, 1, H, W)`` in [-1, 1] mapped to the target ``domain``: ``"bold"`` a 3x3 grey dilation
    (thicker strokes), ``"inverted"`` ``-x`` (white background)."""
    if domain == "bold":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    if domain == "inverted":
        return -x
    raise ValueError(f"unknown DomainStudio domain {domain!r}; allowed: {', '.join(DOMAINS)}")


def shot_indices(labels: Tensor | None, n_examples: int, shots: int, seed: int, label: int | None = None) -> Tensor:
    """The ``shots`` example indices of the few-shot set: a permutation seeded by ``seed`` (restricted to class
    ``label`` when given), first ``shots``."""
    pool = torch.arange(n_examples)
    if label is not None:
        if labels is None:
            raise ValueError(f"label={label} needs labelled data; the data has no labels")
        pool = pool[labels == label]
    if not 1 <= shots <= len(pool):
        raise ValueError(f"shots must be in [1, {len(pool)}] (the examples available), got {shots}")
    return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:shots]]


def domain_shots(
    dataset: Dataset, domain: str = "bold", shots: int = 10, seed: int = 0, label: int | None = None
) -> Tensor:
    """The few-shot target set: ``to_domain`` of the ``shot_indices`` images of ``dataset`` (deterministic)."""
    return to_domain(dataset.x[shot_indices(dataset.labels, len(dataset), shots, seed, label)], domain)


@dataclass(frozen=True)
class DomainStudio:
    """DomainStudio settings (a method recipe's ``method`` section); weights 0 = plain fine-tuning."""

    base: str = "mnist"  # the source model: a dpmlab.load name or path of a dpmlab model file / run folder
    domain: str = "bold"  # the target domain the shots are mapped to (DOMAINS)
    shots: int = 10  # number of target images
    shot_seed: int = 0  # seeds which images become the shots
    label: int | None = None  # None: use the base through its null class; int: condition on (and shoot) that class
    pair_weight: float = 4.0  # λ_img (authors: 4)
    hf_pair_weight: float = 4.0  # λ_hf (authors: 4)
    hf_mse_weight: float = 0.05  # λ_hfmse (authors: 1 x their extra factor 0.05)
    sim_size: int = 3  # batch members in the pairwise losses (authors: 3); 0: the whole batch

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"unknown DomainStudio domain {self.domain!r}; allowed: {', '.join(DOMAINS)}")
        for name in ("pair_weight", "hf_pair_weight", "hf_mse_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (v >= 0 and math.isfinite(v)):
                raise ValueError(f"DomainStudio {name} must be a finite number >= 0, got {v!r}")
        for name, lo in (("shots", 1), ("shot_seed", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"DomainStudio {name} must be an int >= {lo}, got {v!r}")
        s = self.sim_size
        if isinstance(s, bool) or not isinstance(s, int) or s in (1, 2) or s < 0:
            raise ValueError(f"DomainStudio sim_size must be 0 (whole batch) or an int >= 3, got {s!r}")
        if self.label is not None and (
            isinstance(self.label, bool) or not isinstance(self.label, int) or self.label < 0
        ):
            raise ValueError(f"DomainStudio label must be None or a class index >= 0, got {self.label!r}")

    @property
    def plain(self) -> bool:
        """All DomainStudio terms off: plain fine-tuning on the shots."""
        return not (self.pair_weight or self.hf_pair_weight or self.hf_mse_weight)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DomainStudio:
        return dataclass_from_dict(cls, d, what="DomainStudio method")


def _cond(spec: ModelSpec, label: int | None, b: int) -> dict[str, Tensor]:
    """The conditioning of ``b`` samples: the fixed ``label``, the null class, or nothing (unconditional base)."""
    if not spec.class_names:
        if label is not None:
            raise ValueError(f"label={label} given but the base model is unconditional")
        return {}
    k = len(spec.class_names)
    if label is not None and label >= k:
        raise ValueError(f"label must be in [0, {k - 1}] (the base model's classes), got {label}")
    return {"label": torch.full((b,), k if label is None else label, dtype=torch.int64)}


class _Replay(nn.Module):
    """A "network" that returns the output recorded from the loss's call, so x̂0 reuses that one evaluation."""

    def __init__(self, out: Tensor) -> None:
        super().__init__()
        self.out = out

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.out


class DomainStudioObjective:
    """Few-shot fine-tuning of the base network on the shots with the frozen source model in the loop."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        s: DomainStudio = recipe.settings
        self.recipe, self.settings, self.name = recipe, s, recipe.name
        base = load_model(s.base)
        spec = getattr(base, "spec", None)
        if not isinstance(base, Denoiser) or not isinstance(spec, ModelSpec) or not isinstance(base.net, nn.Module):
            raise ValueError(
                f"DomainStudio fine-tunes a trained dpmlab model file; {s.base!r} loads as {type(base).__name__}"
            )
        if tuple(spec.data_shape) != tuple(dataset.shape):
            raise ValueError(
                f"base model {s.base!r} makes samples of shape {spec.data_shape}, the data has {dataset.shape}"
            )
        _cond(spec, s.label, 1)  # validates label against the base
        self.spec, self.schedule = spec, base.schedule
        self.shots = domain_shots(dataset, s.domain, s.shots, s.shot_seed, s.label)
        self.source = spec.denoiser(base.net.requires_grad_(False).eval(), self.schedule)
        self.module: nn.Module = copy.deepcopy(base.net).requires_grad_(True)
        self.loss_fn = make_loss(spec)

    def __len__(self) -> int:
        return len(self.shots)

    def config(self) -> dict[str, Any]:
        return self.recipe.config()

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        """``x0`` the shots, ``t``, ``eps``, ``key`` (uniform; the ``sim_size`` smallest pick the pair members)."""
        b = len(idx)
        return {
            "x0": self.shots[idx],
            "t": self.loss_fn.draw(g, b),
            "eps": torch.randn((b, *self.shots.shape[1:]), generator=g),
            "key": torch.rand(b, generator=g),
        }

    def terms(self, module: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The loss terms (unweighted): ``simple``, ``img``, ``hf``, ``hfmse`` (the last three 0 when off)."""
        s, x0, t = self.settings, batch["x0"], batch["t"]
        cond = {k: v.to(x0.device) for k, v in _cond(self.spec, s.label, len(x0)).items()}
        seen: dict[str, Tensor] = {}

        def net(x: Tensor, tt: Tensor, **c: Any) -> Tensor:  # the loss's one call, replayed for x̂0
            seen["out"] = module(x, tt, **c)
            return seen["out"]

        out = {"simple": self.loss_fn(net, x0, t, batch["eps"], **cond).mean()}
        zero = x0.new_zeros(())
        if s.plain:
            return {**out, "img": zero, "hf": zero, "hfmse": zero}
        a = self.schedule.alpha(t).to(x0).reshape(-1, *[1] * (x0.ndim - 1))
        sg = self.schedule.sigma(t).to(x0).reshape(-1, *[1] * (x0.ndim - 1))
        x_t = a * x0 + sg * batch["eps"]
        x0_ad = self.spec.denoiser(_Replay(seen["out"]), self.schedule)(x_t, t, **cond)
        out["hfmse"] = (high_frequency(x0_ad) - high_frequency(x0)).square().mean() if s.hf_mse_weight else zero
        m = len(x0) if s.sim_size == 0 else s.sim_size
        if not (s.pair_weight or s.hf_pair_weight):
            return {**out, "img": zero, "hf": zero}
        if len(x0) < m or m < 3:
            raise ValueError(
                f"DomainStudio pairwise losses need a batch of >= max(sim_size, 3) = {max(m, 3)} "
                f"examples per process, got {len(x0)}"
            )
        pick = batch["key"].argsort()[:m]
        with torch.no_grad():
            x0_src = self.source.to(x0.device)(x_t[pick], t[pick], **{k: v[pick] for k, v in cond.items()})
        x0_ad = x0_ad[pick]
        out["img"] = pairwise_similarity_kl(x0_src, x0_ad) if s.pair_weight else zero
        out["hf"] = pairwise_similarity_kl(high_frequency(x0_src), high_frequency(x0_ad)) if s.hf_pair_weight else zero
        return out

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        s, tr = self.settings, self.terms(module, batch)
        return tr["simple"] + s.pair_weight * tr["img"] + s.hf_pair_weight * tr["hf"] + s.hf_mse_weight * tr["hfmse"]

    def _info(self) -> dict[str, Any]:
        return {"name": "domainstudio", "settings": self.settings.to_dict(), "spec": self.spec.to_dict()}

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        r = self.recipe
        shots = Dataset(f"{self.settings.domain} shots", self.shots)
        return save_method_model(Path(out_dir), ema, self._info(), r, shots, card)

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}


@dataclass(frozen=True)
class DomainStudioModel:
    """A DomainStudio-adapted model: ``denoiser`` (every dpmlab solver samples it) and its settings; ``sample``
    applies the conditioning it was tuned with (null class, or the fixed ``label``)."""

    denoiser: Denoiser
    settings: DomainStudio

    def sample(self, n: int = 64, **kwargs: Any) -> Tensor:
        """``dpmlab.sample(self.denoiser, n, cond=<the tuned conditioning>, **kwargs)``."""
        if "cond" in kwargs:
            raise ValueError("DomainStudioModel.sample sets cond itself (the label it was tuned with)")
        spec: ModelSpec = self.denoiser.spec  # type: ignore[assignment]
        return api_sample(self.denoiser, n, cond=_cond(spec, self.settings.label, n), **kwargs)

    @classmethod
    def from_file(cls, path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> DomainStudioModel:
        return cls(spec_denoiser(path, info["spec"], tensors), DomainStudio.from_dict(info["settings"]))


# --- the text-to-image variant (DreamBooth-style, on a TextToImage latent model) ------------------------------


@dataclass(frozen=True)
class DomainStudioT2I:
    """DomainStudio for a text-to-image latent model (a recipe's ``method`` section); weights 0 = DreamBooth."""

    base: str = "mnist_t2i"  # a dpmlab.load name or path of a diffusers-format text-to-image folder
    domain: str = "bold"  # DOMAINS; the shots are padded to the VAE's image size with the background
    shots: int = 10
    shot_seed: int = 0
    instance_prompt: str = "a slanted upright digit"  # the subject's binding (a combination absent from training)
    class_prompt: str = "a digit"  # prior preservation: the class the frozen source model generates
    class_images: int = 20  # prior-preservation latents, generated once by the source model (DDIM, class_nfe)
    class_nfe: int = 10
    prior_weight: float = 1.0  # DreamBooth's prior-preservation weight (authors: 1)
    pair_weight: float = 100.0  # λ_img on VAE-decoded x̂0 (authors' text-to-image code: 1e2)
    hf_pair_weight: float = 100.0  # λ_hf (authors: 1e2)
    hf_mse_weight: float = 0.1  # λ_hfmse (authors: 0.1)
    sim_size: int = 3

    def __post_init__(self) -> None:
        DomainStudio(
            domain=self.domain,
            shots=self.shots,
            shot_seed=self.shot_seed,
            pair_weight=self.pair_weight,
            hf_pair_weight=self.hf_pair_weight,
            hf_mse_weight=self.hf_mse_weight,
            sim_size=self.sim_size,
        )
        for name in ("instance_prompt", "class_prompt"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"DomainStudio {name} must be a non-empty string, got {getattr(self, name)!r}")
        for name in ("class_images", "class_nfe"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"DomainStudio {name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.prior_weight, int | float) and self.prior_weight >= 0):
            raise ValueError(f"DomainStudio prior_weight must be a number >= 0, got {self.prior_weight!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DomainStudioT2I:
        return dataclass_from_dict(cls, d, what="DomainStudio text-to-image method")


def _load_t2i(base: str) -> Any:
    from ..models.t2i import TextToImage

    model = load_model(base)
    if not isinstance(model, TextToImage):
        raise ValueError(
            f"DomainStudio text-to-image needs a text-to-image model; {base!r} loads as {type(model).__name__}"
        )
    return model


def _pad_to(x: Tensor, shape: tuple[int, ...], value: float) -> Tensor:
    dh, dw = shape[-2] - x.shape[-2], shape[-1] - x.shape[-1]
    if dh < 0 or dw < 0 or dh % 2 or dw % 2 or shape[0] != x.shape[1]:
        raise ValueError(f"cannot pad images {tuple(x.shape[1:])} to the model's image shape {shape}")
    return F.pad(x, (dw // 2, dw // 2, dh // 2, dh // 2), value=value)


class DomainStudioT2IObjective:
    """DreamBooth (instance loss on the encoded shots with ``instance_prompt`` + ``prior_weight`` x the loss on
    source-generated ``class_prompt`` latents) plus DomainStudio's terms on the VAE-decoded x̂0 of the instance
    batch; the UNet is trained, the VAE and text encoder stay frozen."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        s: DomainStudioT2I = recipe.settings
        self.recipe, self.settings, self.name = recipe, s, recipe.name
        self.base = _load_t2i(s.base)
        for p in (s.instance_prompt, s.class_prompt):
            self.base.check_prompt(p)
        shots = domain_shots(dataset, s.domain, s.shots, s.shot_seed)
        self.shots = _pad_to(shots, self.base.image_shape, float(shots.amin()))  # background = the darkest pixel
        self.z_shots = self.base.encode(self.shots)
        with torch.no_grad():
            self.z_class = api_sample(
                self.base, s.class_images, solver="ddim", nfe=s.class_nfe, seed=12345, cond={"prompt": s.class_prompt}
            )
            self.text = {
                k: self.base.encode_prompt(p, 1) for k, p in (("inst", s.instance_prompt), ("cls", s.class_prompt))
            }
        self.module: nn.Module = copy.deepcopy(self.base.unet).requires_grad_(True)
        self.loss_fn = PredictionLoss(self.base.schedule, Objective(self.base.prediction.value))

    def __len__(self) -> int:
        return len(self.shots)

    def config(self) -> dict[str, Any]:
        return self.recipe.config()

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        b, shape = len(idx), self.z_shots.shape[1:]
        return {
            "z0": self.z_shots[idx],
            "x0": self.shots[idx],
            "t": self.loss_fn.draw(g, b),
            "eps": torch.randn((b, *shape), generator=g),
            "key": torch.rand(b, generator=g),
            "z_cls": self.z_class[torch.randint(0, len(self.z_class), (b,), generator=g)],
            "t_cls": self.loss_fn.draw(g, b),
            "eps_cls": torch.randn((b, *shape), generator=g),
        }

    def terms(self, module: nn.Module, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        s, z0, t = self.settings, batch["z0"], batch["t"]
        dev, b = z0.device, len(z0)
        inst, cls = self.text["inst"].to(dev).expand(b, -1, -1), self.text["cls"].to(dev).expand(b, -1, -1)
        seen: dict[str, Tensor] = {}

        def unet(states: Tensor) -> Any:
            def net(x: Tensor, tt: Tensor, **_: Any) -> Tensor:
                seen["out"] = module(x, tt, encoder_hidden_states=states).sample
                return seen["out"]

            return net

        out = {
            "prior": self.loss_fn(unet(cls), batch["z_cls"], batch["t_cls"], batch["eps_cls"]).mean()
            if s.prior_weight
            else z0.new_zeros(())
        }
        out["simple"] = self.loss_fn(unet(inst), z0, t, batch["eps"]).mean()
        zero = z0.new_zeros(())
        if not (s.pair_weight or s.hf_pair_weight or s.hf_mse_weight):
            return {**out, "img": zero, "hf": zero, "hfmse": zero}
        sch = self.base.schedule
        z_t = sch.alpha(t).to(z0).reshape(-1, 1, 1, 1) * z0 + sch.sigma(t).to(z0).reshape(-1, 1, 1, 1) * batch["eps"]
        z0_ad = Denoiser(_Replay(seen["out"]), sch, self.base.prediction)(z_t, t)
        m = b if s.sim_size == 0 else s.sim_size
        if b < m or m < 3:
            raise ValueError(
                f"DomainStudio pairwise losses need a batch of >= max(sim_size, 3) = {max(m, 3)} "
                f"examples per process, got {b}"
            )
        pick = batch["key"].argsort()[:m]
        vae = self.base.vae.to(dev)
        x_ad = vae.decode(z0_ad[pick] / self.base.scaling_factor).sample  # decoded with gradients to the UNet
        out["hfmse"] = (high_frequency(x_ad) - high_frequency(batch["x0"][pick])).square().mean()
        with torch.no_grad():
            z0_src = self.base.to(dev)(z_t[pick], t[pick], encoder_hidden_states=inst[pick])
            x_src = vae.decode(z0_src / self.base.scaling_factor).sample  # unclamped, as the adapted side
        out["img"] = pairwise_similarity_kl(x_src, x_ad)
        out["hf"] = pairwise_similarity_kl(high_frequency(x_src), high_frequency(x_ad))
        return out

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        s, tr = self.settings, self.terms(module, batch)
        return (
            tr["simple"]
            + s.prior_weight * tr["prior"]
            + s.pair_weight * tr["img"]
            + s.hf_pair_weight * tr["hf"]
            + s.hf_mse_weight * tr["hfmse"]
        )

    def _info(self) -> dict[str, Any]:
        return {"name": "domainstudio_t2i", "settings": self.settings.to_dict()}

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        shots = Dataset(f"{self.settings.domain} shots", self.shots)
        return save_method_model(Path(out_dir), ema, self._info(), self.recipe, shots, card)

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}


@dataclass(frozen=True)
class DomainStudioT2IModel:
    """The adapted text-to-image model: ``model`` (a ``TextToImage`` with the tuned UNet) and its settings."""

    model: Any
    settings: DomainStudioT2I

    def sample(self, n: int = 16, *, prompt: str | None = None, decode: bool = True, **kwargs: Any) -> Tensor:
        """``n`` images (``decode``; else latents) for ``prompt`` (default: the instance prompt)."""
        z = api_sample(self.model, n, cond={"prompt": prompt or self.settings.instance_prompt}, **kwargs)
        return self.model.decode(z) if decode else z

    @classmethod
    def from_file(cls, path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> DomainStudioT2IModel:
        settings = DomainStudioT2I.from_dict(info["settings"])
        model = _load_t2i(settings.base)
        load_state(path, model.unet, tensors)
        return cls(model, settings)


register_method(
    Method("domainstudio", DomainStudio, DomainStudioObjective, DomainStudioModel.from_file, kind="finetune")
)
register_method(
    Method(
        "domainstudio_t2i", DomainStudioT2I, DomainStudioT2IObjective, DomainStudioT2IModel.from_file, kind="finetune"
    )
)
