"""SDA: diffusion-driven test-time adaptation by synthetic-domain alignment — Guo, Wang, Shi et al.,
"Everything to the Synthetic: Diffusion-driven Test-time Adaptation via Synthetic-Domain Alignment", CVPR 2025,
arXiv 2406.04295; authors' code SHI-Labs/Diffusion-Driven-Test-Time-Adaptation-via-Synthetic-Domain-Alignment
(``image_align_DDA/guided_diffusion/gaussian_diffusion.py::p_sample_loop_progressive``, ``scripts/align.sh``,
``mmpretrain/configs/_SDAconfigs``, ``eval/evaluation.py::ensemble_from_logits``). Built on DDA (Gao et al.,
"Back to the Source: Diffusion-Driven Adaptation to Test-Time Corruption", CVPR 2023, arXiv 2207.03442).

**DDA projection** (``project``) of an input ``x_in`` with an *unconditional* model (a class-conditional dpmlab
model runs as its null class): noise it to ``t_start`` (theirs: step 50 of 100, ``t = 0.5``), then at every
solver step ``t_i -> t_{i+1}``::

    x0     = clip(D(x_i, t_i), -1, 1)                                        the model's data prediction
    x_next = solver_step(x_i, x0)                                            (DDIM by default; theirs: DDPM)
    x_next = x_next - s grad_{x_i} || LP(x_in) - LP(x0(x_i)) ||_2             low-pass structure guidance

``LP`` = down-sampling by ``D`` and up-sampling back (theirs: ``D = 4`` at 256², ``s = 6``, 100 respaced steps).

**SDA.** (1) Generate a labelled synthetic set with the *conditional* model (theirs: DiT-XL/2, 50 per class, CFG
1.0 — i.e. no guidance), (2) push it through the same unconditional DDA projection, (3) fine-tune the source
classifier on it (SGD, momentum 0.9, weight decay 1e-4). At test time the prediction is the plain sum of logits
``f_source(x) + f_synthetic(project(x))`` (their ``"sda"`` mode). DDA's own self-ensemble is
``f_source(x) + f_source(project(x))`` (DDA's ``--select sum``).

Deviations / assumptions: ``LP`` is a block mean followed by nearest up-sampling (an exact orthogonal projection,
so ``LP(LP(x)) = LP(x)``; theirs: antialiased cubic ``resize_right``); the norm is per sample (theirs: one norm
over the whole batch, which couples the samples of a batch); any dpmlab solver whose step first evaluates the
model at ``(x_i, t_i)`` can carry the guidance (default DDIM, ``eta = 0``, 10 steps for CPU budgets); ``scale``
is in the paper's units, and its default (6, the paper's) was checked on 28x28 digits (``docs/apps/sda.md``).
The fine-tuning runs a few hundred steps with a larger learning rate than the paper's 5e-4 (a small CNN, not an
ImageNet network), without augmentation. The classifier adapted here is ``dpmlab.metrics.load_mnist_classifier()``
(never the independent evaluator B); accuracies are measured against ground-truth labels.

The **corruption suite** (``corrupt``) is ours, modelled on ImageNet-C's definitions (Hendrycks & Dietterich,
ICLR 2019) and rescaled to 28x28 digits: 10 pure, seeded functions with 5 severities.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import atomic_write, counter_normal
from ..models.guidance import Unconditional, classifier_free
from ..solvers.base import FirstEvaluation, Problem, SeededNoise, get
from ..timesteps import uniform_time
from ..typing import DenoiserFn

__all__ = [
    "CORRUPTIONS",
    "corrupt",
    "corrupted_mnist",
    "lowpass",
    "DDAConfig",
    "project",
    "FinetuneConfig",
    "synthetic_set",
    "finetune_classifier",
    "logits",
    "ensemble_logits",
    "evaluate",
    "main",
]


# --- corruption suite -----------------------------------------------------------------------------------------
def _gens(seed: int, n: int, stream: int) -> list[torch.Generator]:
    """One generator per sample: row ``b``'s randomness depends only on ``(seed, b, stream)``."""
    return [
        torch.Generator().manual_seed(int(np.random.SeedSequence((seed, stream, b)).generate_state(1)[0]))
        for b in range(n)
    ]


def _rand(seed: int, like: Tensor, stream: int) -> Tensor:
    return torch.stack([torch.rand(like.shape[1:], generator=g) for g in _gens(seed, like.shape[0], stream)])


def _gaussian_noise(u: Tensor, c: float, seed: int) -> Tensor:
    return u + c * counter_normal(seed, torch.arange(u.shape[0]), 1, u.shape[1:])


def _shot_noise(u: Tensor, c: float, seed: int) -> Tensor:
    return torch.stack([torch.poisson(ub * c, generator=g) / c for ub, g in zip(u, _gens(seed, u.shape[0], 2))])


def _impulse_noise(u: Tensor, c: float, seed: int) -> Tensor:
    r, v = _rand(seed, u, 3), _rand(seed, u, 4)  # which pixels (nested in c), salt or pepper
    return torch.where(r < c, (v < 0.5).to(u.dtype), u)


def _gaussian_blur(u: Tensor, c: float, seed: int) -> Tensor:
    r = math.ceil(3 * c)
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=u.dtype) / c) ** 2)
    k = k / k.sum()
    ch = u.shape[1]
    h = F.conv2d(F.pad(u, (r, r, 0, 0)), k.view(1, 1, 1, -1).expand(ch, 1, 1, -1), groups=ch)
    return F.conv2d(F.pad(h, (0, 0, r, r)), k.view(1, 1, -1, 1).expand(ch, 1, -1, 1), groups=ch)


def _motion_blur(u: Tensor, c: float, seed: int) -> Tensor:
    n, _, h, w = u.shape
    angle = torch.stack([torch.rand((), generator=g) for g in _gens(seed, n, 5)]) * math.pi  # (N,)
    offsets = torch.linspace(-(c - 1) / 2, (c - 1) / 2, int(c))  # pixels along the line
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    out = torch.zeros_like(u)
    for o in offsets:  # average of the image shifted along the line (bilinear, black outside)
        dx, dy = (o * torch.cos(angle) * 2 / (w - 1)), (o * torch.sin(angle) * 2 / (h - 1))
        grid = torch.stack([xs + dx.view(-1, 1, 1), ys + dy.view(-1, 1, 1)], dim=-1)  # (N, H, W, 2)
        out = out + F.grid_sample(u, grid.to(u.dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out / len(offsets)


def _contrast(u: Tensor, c: float, seed: int) -> Tensor:
    m = u.mean(dim=(1, 2, 3), keepdim=True)
    return (u - m) * c + m


def _brightness(u: Tensor, c: float, seed: int) -> Tensor:
    return u + c


def _fog(u: Tensor, c: float, seed: int) -> Tensor:
    n, ch, h, w = u.shape
    field = torch.zeros(n, 1, h, w, dtype=u.dtype)
    for k, (size, amp) in enumerate([(4, 1.0), (7, 0.5)]):  # two octaves of smooth noise
        z = torch.stack([torch.randn(1, size, size, generator=g) for g in _gens(seed, n, 6 + k)])
        field = field + amp * F.interpolate(z.to(u.dtype), size=(h, w), mode="bicubic", align_corners=False)
    lo, hi = field.amin(dim=(2, 3), keepdim=True), field.amax(dim=(2, 3), keepdim=True)
    return (u + c * (field - lo) / (hi - lo)) / (1 + c)


def _pixelate(u: Tensor, c: float, seed: int) -> Tensor:
    h, w = u.shape[-2:]
    small = F.adaptive_avg_pool2d(u, (max(1, round(h * c)), max(1, round(w * c))))
    return F.interpolate(small, size=(h, w), mode="nearest")


_JPEG_Q = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float64,
)


def _jpeg(u: Tensor, c: float, seed: int) -> Tensor:
    """8x8 block DCT with the JPEG luminance table at quality ``c`` (IJG scaling), rounded, inverted."""
    n, ch, h, w = u.shape
    k = torch.arange(8, dtype=torch.float64)
    dct = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / 16) * math.sqrt(2 / 8)  # (8, 8) orthonormal
    dct[0] /= math.sqrt(2)
    q = torch.floor((_JPEG_Q * (5000 / c if c < 50 else 200 - 2 * c) + 50) / 100).clamp(min=1)
    ph, pw = -h % 8, -w % 8
    x = F.pad(u.double() * 255 - 128, (0, pw, 0, ph), mode="replicate")  # (N, C, H', W')
    blocks = x.unfold(2, 8, 8).unfold(3, 8, 8)  # (N, C, H'/8, W'/8, 8, 8)
    coef = dct @ blocks @ dct.T
    rec = dct.T @ (torch.round(coef / q) * q) @ dct
    out = rec.permute(0, 1, 2, 4, 3, 5).reshape(x.shape)[..., :h, :w]
    return ((out + 128) / 255).to(u.dtype)


# name -> (function on [0, 1] images, parameters of severities 1..5)
CORRUPTIONS: dict[str, tuple[Callable[[Tensor, float, int], Tensor], tuple[float, ...]]] = {
    "gaussian_noise": (_gaussian_noise, (0.2, 0.35, 0.5, 0.7, 1.0)),  # noise std
    "shot_noise": (_shot_noise, (2, 1, 0.5, 0.3, 0.2)),  # photons at full intensity (black stays noiseless)
    "impulse_noise": (_impulse_noise, (0.05, 0.1, 0.2, 0.3, 0.4)),  # share of salt-and-pepper pixels
    "gaussian_blur": (_gaussian_blur, (0.8, 1.2, 1.6, 2.0, 2.5)),  # blur std in pixels
    "motion_blur": (_motion_blur, (5, 7, 9, 11, 13)),  # line length in pixels, random angle per image
    "contrast": (_contrast, (0.5, 0.4, 0.3, 0.2, 0.1)),  # contrast factor about the image mean
    "brightness": (_brightness, (0.2, 0.35, 0.5, 0.65, 0.8)),  # added intensity
    "fog": (_fog, (0.5, 1.0, 1.5, 2.0, 3.0)),  # weight of a smooth random field
    "pixelate": (_pixelate, (0.5, 0.4, 0.3, 0.2, 0.15)),  # resolution factor (box down, nearest up)
    "jpeg": (_jpeg, (10, 5, 2, 1.25, 1)),  # JPEG quality
}


def _check_images(x: Any, what: str = "images") -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.dtype.is_floating_point:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{what} must be a float tensor (N, C, H, W), got {got}")
    if x.numel() and not (bool(torch.isfinite(x).all()) and float(x.min()) >= -1 - 1e-5 and float(x.max()) <= 1 + 1e-5):
        lo, hi = float(x.min()), float(x.max())
        raise ValueError(f"{what} must be finite and in [-1, 1], got range [{lo:.4g}, {hi:.4g}]")
    return x


def _check_corruption(corruption: str, severity: int) -> None:
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; allowed: {', '.join(CORRUPTIONS)}")
    if not (isinstance(severity, int) and not isinstance(severity, bool) and 1 <= severity <= 5):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")


def corrupt(x: Tensor, corruption: str, severity: int = 3, *, seed: int = 0) -> Tensor:
    """``corruption`` (a name in ``CORRUPTIONS``) at ``severity`` 1..5 of images ``x (N, C, H, W)`` in [-1, 1]
    (dpmlab's MNIST range); the result has the same shape and range. Row ``b``'s randomness depends only on
    ``(seed, b)``; the input is not modified."""
    _check_corruption(corruption, severity)
    _check_images(x)
    fn, params = CORRUPTIONS[corruption]
    u = (x.detach().cpu().float() + 1) / 2  # [0, 1], background 0 (as ImageNet-C's pixel range)
    return (fn(u, float(params[severity - 1]), int(seed)).clamp(0, 1) * 2 - 1).to(x.dtype).to(x.device)


def corrupted_mnist(
    corruption: str, severity: int = 3, *, seed: int = 0, per_class: int | None = None
) -> tuple[Tensor, Tensor]:
    """The held-out part of ``mnist_5k_split`` (50 per digit; ``per_class`` keeps the first k of each),
    corrupted: ``(images (N, 1, 28, 28) in [-1, 1], labels (N,))``."""
    from ..metrics.features import mnist_5k, mnist_5k_split

    _check_corruption(corruption, severity)
    if per_class is not None and not (isinstance(per_class, int) and 1 <= per_class <= 50):
        raise ValueError(f"per_class must be an int in 1..50 (held-out images per digit), got {per_class!r}")
    data = mnist_5k()
    _, val = mnist_5k_split(data.labels)
    if per_class is not None:
        val = torch.cat([val[data.labels[val] == c][:per_class] for c in range(10)]).sort().values
    return corrupt(data.images[val], corruption, severity, seed=seed), data.labels[val]


# --- DDA projection -------------------------------------------------------------------------------------------
def lowpass(x: Tensor, factor: int) -> Tensor:
    """``LP(x)``: mean over ``factor x factor`` blocks, repeated back to full size (an orthogonal projection:
    ``LP(LP(x)) = LP(x)``, constants unchanged). ``H`` and ``W`` must be multiples of ``factor``."""
    if not (isinstance(factor, int) and not isinstance(factor, bool) and factor >= 1):
        raise ValueError(f"low-pass factor must be a positive int, got {factor!r}")
    h, w = x.shape[-2:]
    if h % factor or w % factor:
        raise ValueError(f"low-pass factor {factor} must divide the image size {h}x{w}")
    if factor == 1:
        return x
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


@dataclass(frozen=True)
class DDAConfig:
    """The DDA projection's settings (paper: ``t_start = 0.5``, ``D = 4`` at 256², ``s = 6``, 100 steps)."""

    t_start: float = 0.5  # noise level the input is diffused to (N / T = 50 / 100)
    steps: int = 10  # solver steps from t_start to sigma = 0 (paper: 50 of 100 respaced DDPM steps)
    lowpass: int = 4  # D, the down-sampling factor of the structure guidance (28 -> 7)
    scale: float = 6.0  # s, step against grad || LP(x_in) - LP(x0) ||_2 (paper: 6; 2..6 similar on digits)
    solver: str = "ddim"  # any dpmlab solver whose step first evaluates the model at (x_i, t_i)
    clip_denoised: bool = True  # clip x0 to [-1, 1] (guided-diffusion's clip_denoised)

    def __post_init__(self) -> None:
        if not (isinstance(self.t_start, int | float) and 0.0 <= self.t_start <= 1.0):
            raise ValueError(f"t_start must be in [0, 1], got {self.t_start!r}")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not (isinstance(self.lowpass, int) and self.lowpass >= 1):
            raise ValueError(f"lowpass must be a positive int, got {self.lowpass!r}")
        if not (isinstance(self.scale, int | float) and math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"scale must be finite and >= 0, got {self.scale!r}")
        get(self.solver)  # unknown names raise here

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DDAConfig:
        return cls(**_known(cls, d))


def _known(cls: type, d: Mapping[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(cls)}
    extra = sorted(set(d) - names)
    if extra:
        raise ValueError(f"unknown {cls.__name__} field(s) {', '.join(extra)}; allowed: {', '.join(sorted(names))}")
    return dict(d)


def project(
    model: DenoiserFn,
    x: Tensor,
    config: DDAConfig = DDAConfig(),
    *,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = False,
) -> Tensor:
    """DDA: project images ``x (N, C, H, W)`` in [-1, 1] toward the unconditional model's domain (the model is
    called without conditioning: a class-conditional dpmlab network runs as its null class). Row ``b``'s noise
    depends only on ``(seed, b)``. ``t_start = 0`` returns ``x`` unchanged."""
    _check_images(x)
    sch = getattr(model, "schedule", None)
    if sch is None:
        raise ValueError(f"the model carries no .schedule; got {type(model).__name__}")
    if config.t_start > float(sch.t_max):
        raise ValueError(f"t_start={config.t_start} is above the schedule's t_max={float(sch.t_max):g}")
    lowpass(x[:1], config.lowpass)  # the factor must divide the image size
    if config.t_start == 0.0:
        return x.clone()
    uncond, solver = Unconditional(model), get(config.solver)
    t_end = sch.t_zero if sch.t_zero is not None else sch.t_min
    ts = uniform_time(sch, config.steps, t_start=float(config.t_start), t_end=float(t_end))
    outs = []
    from tqdm import tqdm

    bar = tqdm(total=x.shape[0], desc="DDA projection", unit="img", disable=not progress, leave=False)
    for lo in range(0, x.shape[0], batch_size):
        idx = torch.arange(lo, min(x.shape[0], lo + batch_size))
        outs.append(_project_batch(uncond, solver, sch, x[idx], idx, ts, config, seed))
        bar.update(len(idx))
    bar.close()
    return torch.cat(outs)


def _project_batch(
    model: DenoiserFn, solver: Any, sch: Any, x_in: Tensor, idx: Tensor, ts: Tensor, config: DDAConfig, seed: int
) -> Tensor:
    problem = Problem(model, sch, noise=SeededNoise(seed, idx))
    eps = counter_normal(seed, idx, 0, x_in.shape[1:], dtype=x_in.dtype, device=x_in.device)
    x = sch.add_noise(x_in, eps, ts[0]).to(x_in.dtype)  # forward diffusion q(x_t0 | x_in)
    ref = lowpass(x_in, config.lowpass)  # LP(x_in)
    state = solver.init(problem, x, ts)
    for i in range(len(ts) - 1):
        grad: list[Tensor] = []

        def answer(xq: Tensor, evaluate: Callable[[], Tensor], grad: list[Tensor] = grad) -> Tensor:
            x0 = evaluate()  # D(x_i, t_i), built on the graph of x_i
            if config.clip_denoised:
                x0 = x0.clamp(-1, 1)
            if config.scale > 0:  # grad_{x_i} sum_b || LP(x_in) - LP(x0(x_i)) ||_2
                dist = torch.linalg.vector_norm((ref - lowpass(x0, config.lowpass)).flatten(1), dim=1)
                grad.append(torch.autograd.grad(dist.sum(), xq)[0])
            return x0.detach()

        with torch.enable_grad():
            xi = x.detach().requires_grad_(config.scale > 0)
            step_problem = FirstEvaluation.of(problem, float(ts[i]), answer, "the DDA guidance")
            x, state = solver.step(step_problem, xi, ts, i, state)  # x_{i+1} = solver step with clipped x0
        x = x.detach()
        if grad:
            x = x - config.scale * grad[0]  # structure guidance
    return x.clamp(-1, 1) if config.clip_denoised else x


# --- synthetic data, fine-tuning, the ensemble ----------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    """SDA stage 1: the synthetic labelled set and the fine-tuning of the source classifier."""

    per_class: int = 50  # synthetic images per class (paper: 50 per ImageNet class)
    gen_steps: int = 10  # DDIM steps of the class-conditional generator
    gen_guidance: float = 1.0  # classifier-free guidance scale (1 = the conditional model, as the paper)
    steps: int = 300  # optimiser steps
    batch_size: int = 64  # paper: 64
    lr: float = 5e-3  # SGD learning rate (paper: 5e-4 for ImageNet networks over 30 epochs)
    momentum: float = 0.9  # paper
    weight_decay: float = 1e-4  # paper

    def __post_init__(self) -> None:
        for name in ("per_class", "gen_steps", "steps", "batch_size"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("gen_guidance", "lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        if self.lr == 0:
            raise ValueError("lr must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> FinetuneConfig:
        return cls(**_known(cls, d))


def synthetic_set(
    model: DenoiserFn,
    config: FinetuneConfig = FinetuneConfig(),
    projection: DDAConfig = DDAConfig(),
    *,
    num_classes: int = 10,
    seed: int = 0,
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Class-conditional samples ``(per_class * num_classes)`` of ``model`` (``cond={"label": y}``), pushed
    through the unconditional DDA projection: ``(images, labels)``."""
    from ..api import sample

    labels = torch.arange(num_classes).repeat_interleave(config.per_class)
    gen = model if config.gen_guidance == 1.0 else classifier_free(model, Unconditional(model), config.gen_guidance)
    x = sample(
        gen, n=len(labels), solver="ddim", nfe=config.gen_steps, seed=seed, cond={"label": labels}, batch_size=250
    ).clamp(-1, 1)
    return project(model, x, projection, seed=seed + 1, progress=progress), labels


def finetune_classifier(
    classifier: nn.Module, images: Tensor, labels: Tensor, config: FinetuneConfig = FinetuneConfig(), *, seed: int = 0
) -> nn.Module:
    """A fine-tuned copy of ``classifier`` (cross-entropy, SGD with momentum and weight decay, ``config.steps``
    shuffled mini-batches); the input classifier is not modified. Returned in eval mode."""
    _check_images(images)
    if labels.shape != (images.shape[0],) or labels.dtype != torch.long:
        raise ValueError(
            f"labels must be int64 of shape ({images.shape[0]},), got {tuple(labels.shape)} {labels.dtype}"
        )
    model = copy.deepcopy(classifier).train()
    opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(labels), generator=gen), 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout
        for _ in range(config.steps):
            if pos + config.batch_size > len(order):
                order, pos = torch.randperm(len(labels), generator=gen), 0
            b = order[pos : pos + config.batch_size]
            pos += config.batch_size
            loss = F.cross_entropy(model(images[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def logits(classifier: nn.Module, x: Tensor, *, batch_size: int = 500) -> Tensor:
    """``classifier(x)`` in eval mode without gradients, batched."""
    with torch.no_grad():
        return torch.cat([classifier.eval()(b) for b in x.split(batch_size)])


def ensemble_logits(a: Tensor, b: Tensor) -> Tensor:
    """SDA's (and DDA's ``sum``) ensemble: the plain sum of two logit tensors ``(N, K)``."""
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two logit tensors of the same shape (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    return a + b


def evaluate(
    source: nn.Module, finetuned: nn.Module | None, x: Tensor, x_proj: Tensor, labels: Tensor
) -> dict[str, float]:
    """Accuracies against ``labels``: ``source`` (raw input), ``dda`` (source on the projection), ``dda_ensemble``
    (source(raw) + source(proj)), and with ``finetuned``: ``sda_finetuned`` (finetuned(proj)), ``sda``
    (source(raw) + finetuned(proj), the paper's ensemble), ``sda_ft_both`` (finetuned(raw) + finetuned(proj))."""
    if x.shape != x_proj.shape or labels.shape != (x.shape[0],):
        raise ValueError(
            f"x {tuple(x.shape)}, x_proj {tuple(x_proj.shape)} and labels {tuple(labels.shape)} "
            f"must describe the same N images"
        )
    src_raw, src_proj = logits(source, x), logits(source, x_proj)

    def acc(z: Tensor) -> float:
        return float((z.argmax(1) == labels).float().mean())

    out = {"source": acc(src_raw), "dda": acc(src_proj), "dda_ensemble": acc(ensemble_logits(src_raw, src_proj))}
    if finetuned is not None:
        ft_raw, ft_proj = logits(finetuned, x), logits(finetuned, x_proj)
        out |= {
            "sda_finetuned": acc(ft_proj),
            "sda": acc(ensemble_logits(src_raw, ft_proj)),
            "sda_ft_both": acc(ensemble_logits(ft_raw, ft_proj)),
        }
    return out


# --- command line ---------------------------------------------------------------------------------------------
def _save_tensors(path: Path, tensors: dict[str, Tensor], card: dict[str, Any]) -> None:
    import safetensors.torch

    with atomic_write(path) as tmp:
        tmp.write_bytes(
            safetensors.torch.save(
                {k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "dpmlab.sda.images/1"}
            )
        )
    with atomic_write(path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")


def _load_images(path: str) -> tuple[Tensor, Tensor, dict[str, Any]]:
    import safetensors

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"image file not found: {p}")
    try:
        with safetensors.safe_open(str(p), framework="pt") as fh:
            meta, t = fh.metadata() or {}, {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{p}: not a readable safetensors file ({e})") from None
    if meta.get("format") != "dpmlab.sda.images/1" or set(t) != {"images", "labels"}:
        raise ValueError(f"{p}: not an image file written by 'sda corrupt' (format {meta.get('format')!r})")
    card = json.loads(p.with_suffix(".json").read_text()) if p.with_suffix(".json").is_file() else {}
    return t["images"], t["labels"], card


def _check_out(path: str | None, overwrite: bool, suffix: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.suffix != suffix:
        raise ValueError(f"output {p} must end in {suffix}")
    if p.exists() and not overwrite:
        raise ValueError(f"{p} exists; pass --overwrite to replace it")
    if p.parent.exists() and not p.parent.is_dir():
        raise ValueError(f"cannot write {p}: {p.parent} is not a folder")
    return p


def _add_projection(p: argparse.ArgumentParser) -> None:
    d = DDAConfig()
    p.add_argument("--t-start", type=float, default=d.t_start, help="noise level of the projection (0..1)")
    p.add_argument("--proj-steps", type=int, default=d.steps, help="solver steps of the projection")
    p.add_argument("--lowpass", type=int, default=d.lowpass, help="low-pass factor D")
    p.add_argument("--scale", type=float, default=d.scale, help="structure-guidance scale s")
    p.add_argument("--solver", default=d.solver)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dpmlab.apps.sda", description="SDA / DDA diffusion-driven test-time adaptation on MNIST digits"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("corrupt", help="write corrupted held-out MNIST images (safetensors + JSON card)")
    c.add_argument("--corruption", required=True, choices=list(CORRUPTIONS))
    c.add_argument("--severity", type=int, default=3)
    c.add_argument("--per-class", type=int, default=None, help="held-out images per digit (max 50)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", required=True, help="output .safetensors")
    c.add_argument("--overwrite", action="store_true")
    f = sub.add_parser("finetune", help="synthetic set -> DDA projection -> fine-tuned classifier (safetensors)")
    ft = FinetuneConfig()
    f.add_argument("--model", default="mnist", help="class-conditional dpmlab model with a null class")
    f.add_argument("--per-class", type=int, default=ft.per_class)
    f.add_argument("--gen-steps", type=int, default=ft.gen_steps)
    f.add_argument("--steps", type=int, default=ft.steps, help="fine-tuning steps")
    f.add_argument("--lr", type=float, default=ft.lr)
    f.add_argument("--batch-size", type=int, default=ft.batch_size)
    _add_projection(f)
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--out", required=True, help="output classifier .safetensors")
    f.add_argument("--overwrite", action="store_true")
    e = sub.add_parser("eval", help="accuracy of source / DDA / SDA on an image file from 'corrupt'")
    e.add_argument("data", help=".safetensors written by 'corrupt'")
    e.add_argument("--classifier", help="fine-tuned classifier from 'finetune' (omit: source and DDA only)")
    e.add_argument("--model", default="mnist")
    _add_projection(e)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--out", help="results .json")
    e.add_argument("--overwrite", action="store_true")
    return p


def _projection(a: argparse.Namespace) -> DDAConfig:
    return DDAConfig(t_start=a.t_start, steps=a.proj_steps, lowpass=a.lowpass, scale=a.scale, solver=a.solver)


def _cmd_corrupt(a: argparse.Namespace) -> int:
    out = _check_out(a.out, a.overwrite, ".safetensors")
    assert out is not None
    x, y = corrupted_mnist(a.corruption, a.severity, seed=a.seed, per_class=a.per_class)
    _save_tensors(
        out,
        {"images": x, "labels": y},
        {
            "corruption": a.corruption,
            "severity": a.severity,
            "seed": a.seed,
            "n": len(y),
            "data": "mnist_5k held-out split (mnist_5k_split)",
        },
    )
    print(f"wrote {out}: {len(y)} images, {a.corruption} severity {a.severity}")
    return 0


def _cmd_finetune(a: argparse.Namespace) -> int:
    from ..metrics.features import load_mnist_classifier, save_mnist_classifier
    from ..models.hub import load

    out = _check_out(a.out, a.overwrite, ".safetensors")
    assert out is not None
    proj = _projection(a)
    cfg = FinetuneConfig(per_class=a.per_class, gen_steps=a.gen_steps, steps=a.steps, lr=a.lr, batch_size=a.batch_size)
    model = load(a.model)
    x, y = synthetic_set(model, cfg, proj, seed=a.seed, progress=True)
    clf = finetune_classifier(load_mnist_classifier(), x, y, cfg, seed=a.seed)
    card = {
        "method": "SDA (Guo et al., CVPR 2025) fine-tuned source classifier",
        "model": a.model,
        "finetune": cfg.to_dict(),
        "projection": proj.to_dict(),
        "seed": a.seed,
        "source": "dpmlab.metrics.load_mnist_classifier()",
    }
    save_mnist_classifier(clf, out, card)
    print(f"wrote {out}: fine-tuned on {len(y)} projected synthetic images")
    return 0


def _cmd_eval(a: argparse.Namespace) -> int:
    from ..metrics.features import load_mnist_classifier
    from ..models.hub import load

    out = _check_out(a.out, a.overwrite, ".json")
    proj = _projection(a)
    x, y, card = _load_images(a.data)
    ft = load_mnist_classifier(a.classifier) if a.classifier else None
    x_proj = project(load(a.model), x, proj, seed=a.seed, progress=True)
    res = evaluate(load_mnist_classifier(), ft, x, x_proj, y)
    for k, v in res.items():
        print(f"{k:<16}{v:.4f}")
    if out is not None:
        with atomic_write(out) as tmp:
            tmp.write_text(json.dumps({"data": card, "projection": proj.to_dict(), "accuracy": res}, indent=2) + "\n")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    torch.set_num_threads(1)
    run = {"corrupt": _cmd_corrupt, "finetune": _cmd_finetune, "eval": _cmd_eval}[a.cmd]
    try:
        return run(a)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
