"""MMD-DDM — Aiello, Valsesia & Magli, "Fast Inference in Denoising Diffusion Models via MMD Finetuning",
arXiv 2301.07969 (2023); authors' code diegovalsesia/MMD-DDM (read at b69d55b: ``runners/diffusion.py::
train_cifar``, ``functions/denoising.py::generalized_steps_diff``, ``functions/losses.py::KID``).

A pretrained diffusion model is fine-tuned *for one sampler at one budget*: draw noise ``z`` and a real batch
``x``; generate ``x̂ = S_theta(z)`` with the fixed deterministic sampler (DDIM, T' = 4..5 steps) keeping the
graph of all T' steps (``dpmlab.solvers.differentiable.sample_with_grad``); map both through a frozen feature
network ``phi``; minimise the unbiased MMD² (``dpmlab.metrics.distances.mmd2_unbiased``)

    L(theta) = MMD²_u(phi(S_theta(z_1..m)), phi(x_1..m))
             = Σ_{i≠j} k(a_i, a_j)/(m(m-1)) + Σ_{i≠j} k(b_i, b_j)/(m(m-1)) - 2 Σ_{i,j} k(a_i, b_j)/m²,

with KID's kernel ``k(a, b) = (a·b/F + 1)³`` (``kernel="poly"``) or ``exp(-|a - b|²/F)`` (``kernel="rbf"``, the
authors' ``KID_rbf``). The fine-tuned weights are then used with that same sampler.

Facts carried over from the authors' code: DDIM with eta = 0 on ``range(0, T, T // T')`` followed by a last
step to ``alpha = 1`` (dpmlab: grid ``"leading"`` with ``to_zero``); samples clamped to the data range before
the features; features cast to float64; Adam at lr 5e-6, batch 64 (CIFAR-10 config), gradient-norm clip 0.5
in the loop (1.0 in the config); no EMA — the recipes set ``train.ema_decay = 0`` so the exported (EMA) weights
are the trained ones.

Deviations and choices of ours: the features are those of our shipped MNIST classifier (``features =
"mnist_classifier"``, 128-d penultimate layer) instead of Inception-V3 / CLIP, or raw pixels (``"pixels"``);
they are centered at the training data's mean and divided by one RMS scale (``normalize``; Inception's pool
features are O(1) and KID's ``a·b/F + 1`` assumes so — our classifier's give ``a·b/F ≈ 19``, whose cube made
the batch-32 estimate noise-dominated: measured, strongly negative losses);
the evaluation uses a *different* network (classifier B) and pixel KID so the score is not the training
target; for a class-conditional base, samples are generated with labels of independently drawn training
examples (``conditional``, default True; the authors' models are unconditional) — not with the real batch's
own labels, which would correlate the two samples and bias the estimate low; any
deterministic dpmlab solver and named grid may be chosen (the objective refuses stochastic ones). The
exported model is a plain dpmlab model file (``dpmlab.load`` / ``dpmlab sample`` take it); its card names the
sampler it was tuned for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import dataclass_from_dict
from ..api import sample as api_sample
from ..metrics.distances import PolynomialKernel, RBFKernel, mmd2_unbiased
from ..metrics.features import load_mnist_classifier
from ..models.denoiser import Denoiser
from ..models.hub import load as load_model
from ..models.hub import save_model
from ..models.nets import ModelSpec
from ..solvers.base import Problem, Solver, get
from ..solvers.differentiable import sample_with_grad
from ..timesteps import make_grid
from ..training.data import Dataset
from . import Method, MethodRecipe, register_method, spec_denoiser

__all__ = ["MMDDDM", "MMDDDMObjective", "MMDDDMModel", "feature_map", "normalized", "tuned_grid"]

KERNELS = ("poly", "rbf")
FEATURES = ("mnist_classifier", "pixels")
FeatureFn = Callable[[Tensor], Tensor]  # images (B, C, H, W) -> features (B, F), differentiable


@dataclass(frozen=True)
class MMDDDM:
    """MMD-DDM settings (a method recipe's ``method`` section); defaults: the paper's DDIM at T' = 5."""

    base: str = "mnist"  # the pretrained model: a dpmlab.load name or the path of a dpmlab model / run folder
    solver: str = "ddim"  # the fixed sampler, a deterministic registered solver
    nfe: int = 5  # the budget T' (network evaluations per sample)
    grid: str = "leading"  # authors: range(0, T, T // T') then a last step to sigma = 0
    kernel: str = "poly"  # "poly": KID's (a·b/F + 1)^degree; "rbf": exp(-gamma |a - b|²)
    degree: int = 3  # polynomial kernel degree
    gamma: float | None = None  # kernel scale; None: 1 / F
    features: str = "mnist_classifier"  # "mnist_classifier" (shipped classifier, 128-d) or "pixels"
    conditional: bool = True  # class-conditional base: labels drawn from the data's labels (else: null class)
    checkpoint: bool = False  # per-step activation checkpointing in the differentiable sampler
    clamp: float | None = 1.0  # clamp samples to [-clamp, clamp] before the features (data range); None: off
    normalize: bool = True  # center features at the data's mean and divide by their RMS spread (one scalar)

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"MMD-DDM kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.features not in FEATURES:
            raise ValueError(f"MMD-DDM features must be one of {', '.join(FEATURES)}, got {self.features!r}")
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
            raise ValueError(f"MMD-DDM nfe must be a positive int, got {self.nfe!r}")
        if self.clamp is not None and not self.clamp > 0:
            raise ValueError(f"MMD-DDM clamp must be positive or None, got {self.clamp!r}")
        self.make_kernel()  # validates degree / gamma
        if self.make_solver().is_stochastic():
            raise ValueError(f"MMD-DDM needs a deterministic solver; {self.solver!r} is stochastic")

    def make_kernel(self) -> PolynomialKernel | RBFKernel:
        return PolynomialKernel(self.degree, self.gamma) if self.kernel == "poly" else RBFKernel(self.gamma)

    def make_solver(self) -> Solver[Any]:
        return get(self.solver)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MMDDDM:
        return dataclass_from_dict(cls, d, what="MMD-DDM method")


def tuned_grid(model: Denoiser, settings: MMDDDM) -> Tensor:
    """The grid the model is tuned for: ``settings.grid`` ending at sigma = 0 with exactly ``settings.nfe``
    evaluations of ``settings.solver``."""
    steps = settings.make_solver().steps_for_nfe(settings.nfe, True)
    return make_grid(model.schedule, settings.grid, steps, to_zero=True)


def feature_map(name: str) -> FeatureFn:
    """``images (B, C, H, W) -> (B, F)`` with gradients to the images: the frozen shipped MNIST classifier's
    penultimate features, or the pixels."""
    if name == "pixels":
        return lambda x: x.flatten(1)
    if name != "mnist_classifier":
        raise ValueError(f"unknown MMD-DDM features {name!r}; allowed: {', '.join(FEATURES)}")
    clf = load_mnist_classifier().eval().requires_grad_(False)

    def phi(x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != (1, 28, 28):
            raise ValueError(f"features 'mnist_classifier' take (B, 1, 28, 28) images, got {tuple(x.shape)}")
        return clf.to(x.device).features(x)

    return phi


def normalized(phi: FeatureFn, reference: Tensor, *, batch_size: int = 500) -> FeatureFn:
    """``(phi(x) - mu) / s``: ``mu`` the mean of ``phi`` over ``reference`` images, ``s`` the root mean square of
    the centered features (one scalar, so the geometry of the feature space is kept); fixed at construction."""
    with torch.no_grad():
        f = torch.cat([phi(b) for b in reference.split(batch_size)]).double()
    mu = f.mean(0)
    s = float((f - mu).square().mean().sqrt())
    if not s > 0:
        raise ValueError("the reference features are constant; cannot normalise them (set normalize=false)")
    return lambda x: (phi(x).double() - mu.to(x.device)) / s


def _load_base(base: str) -> Denoiser:
    model = load_model(base)
    spec = getattr(model, "spec", None)
    if not isinstance(model, Denoiser) or not isinstance(spec, ModelSpec):
        raise ValueError(
            f"MMD-DDM fine-tunes a trained dpmlab model file (dpmlab.load with a spec); {base!r} "
            f"loads as {type(model).__name__}"
        )
    return model


class MMDDDMObjective:
    """The MMD-DDM fine-tune on ``fit``: the base network (all parameters trainable), the fixed sampler and grid,
    the frozen feature map; ``draw`` gives the real images, their labels and the starting noise."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        s: MMDDDM = recipe.settings
        self.recipe, self.settings, self.dataset, self.name = recipe, s, dataset, recipe.name
        base = _load_base(s.base)
        self.spec: ModelSpec = base.spec  # type: ignore[assignment]
        if tuple(self.spec.data_shape) != tuple(dataset.shape):
            raise ValueError(
                f"base model {s.base!r} makes samples of shape {self.spec.data_shape}, the data has {dataset.shape}"
            )
        self.conditional = bool(s.conditional and self.spec.class_names)
        if self.conditional and dataset.labels is None:
            raise ValueError(
                f"base model {s.base!r} is class-conditional and conditional=true, but the data "
                f"{dataset.name!r} has no labels; set method.conditional=false"
            )
        self.schedule = base.schedule
        assert isinstance(base.net, nn.Module)
        self.module: nn.Module = base.net.requires_grad_(True)
        self.ts = tuned_grid(base, s)
        self.solver = s.make_solver()
        self.kernel = s.make_kernel()
        phi = feature_map(s.features)
        ref = dataset.x[torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))[:2000]]
        self.phi = normalized(phi, ref.clamp(-s.clamp, s.clamp) if s.clamp else ref) if s.normalize else phi

    def __len__(self) -> int:
        return len(self.dataset)

    def config(self) -> dict[str, Any]:
        return self.recipe.config()

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        """``x0`` the real images, ``z`` the sampler's standard-normal start (scaled by sigma(ts[0]) in ``loss``),
        ``label`` the generated batch's labels: those of *other*, independently drawn examples (conditional) or
        the null class. (The real batch's own labels would pair every sample with a same-class real image: the
        cross term of MMD²_u then includes matched pairs and the estimate is biased low — measured.)"""
        b = len(idx)
        z = torch.randn((b, *self.dataset.shape), generator=g)
        batch = {"x0": self.dataset.x[idx], "z": z}
        if self.conditional:
            assert self.dataset.labels is not None
            batch["label"] = self.dataset.labels[torch.randint(0, len(self.dataset), (b,), generator=g)]
        elif self.spec.class_names:
            batch["label"] = torch.full((b,), len(self.spec.class_names), dtype=torch.int64)
        return batch

    def generate(self, module: nn.Module, z: Tensor, label: Tensor | None = None) -> Tensor:
        """The tuned sampler's output from standard-normal ``z`` with the graph of every step."""
        den = self.spec.denoiser(module, self.schedule)
        problem = Problem(den, self.schedule, cond={} if label is None else {"label": label})
        x = float(self.schedule.sigma(self.ts[:1])) * z
        return sample_with_grad(problem, x, self.ts, self.solver, checkpoint=self.settings.checkpoint)

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        fake = self.generate(module, batch["z"], batch.get("label"))
        real = batch["x0"]
        if self.settings.clamp is not None:
            c = self.settings.clamp
            fake, real = fake.clamp(-c, c), real.clamp(-c, c)
        return mmd2_unbiased(self.phi(fake), self.phi(real), self.kernel)

    def _info(self) -> dict[str, Any]:
        return {"name": "mmd_ddm", "settings": self.settings.to_dict(), "spec": self.spec.to_dict()}

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        s, r = self.settings, self.recipe
        dtype = torch.float16 if r.export_dtype == "float16" else torch.float32
        full = {
            "name": r.name,
            "description": r.description,
            "recipe": r.to_dict(),
            **card,
            "method": self._info(),
            "tuned_for": {"solver": s.solver, "nfe": s.nfe, "grid": s.grid, "to_zero": True},
            "sample_with": f"dpmlab sample --model {out_dir} --solver {s.solver} --nfe {s.nfe} --grid {s.grid} "
            "--to-zero",
        }
        return save_model(Path(out_dir) / "model.safetensors", ema, self.spec, dtype=dtype, card=full)

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}


@dataclass(frozen=True)
class MMDDDMModel:
    """A fine-tuned model read back from an MMD-DDM checkpoint: ``denoiser`` and the settings it was tuned with.
    (The exported ``model.safetensors`` is a plain model file: ``dpmlab.load`` it.)"""

    denoiser: Denoiser
    settings: MMDDDM

    def sample(
        self, n: int = 64, *, seed: int = 0, cond: Mapping[str, Any] | None = None, batch_size: int | None = None
    ) -> Tensor:
        """``n`` samples with the sampler and budget the model was tuned for."""
        s = self.settings
        return api_sample(
            self.denoiser,
            n,
            solver=s.solver,
            nfe=s.nfe,
            grid=s.grid,
            to_zero=True,
            seed=seed,
            cond=cond,
            batch_size=batch_size,
        )

    @classmethod
    def from_file(cls, path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> MMDDDMModel:
        return cls(spec_denoiser(path, info["spec"], tensors), MMDDDM.from_dict(info["settings"]))


register_method(Method("mmd_ddm", MMDDDM, MMDDDMObjective, MMDDDMModel.from_file, kind="finetune"))
