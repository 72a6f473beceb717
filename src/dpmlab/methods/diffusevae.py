"""DiffuseVAE — Pandey, Mukherjee, Rai & Kumar, "DiffuseVAE: Efficient, Controllable and High-Fidelity Generation
from Low-Dimensional Latents", TMLR 2022, arXiv 2201.00308; authors' code kpandey008/DiffuseVAE (read at 8e6d251:
``main/models/vae.py``, ``main/models/diffusion/{ddpm,ddpm_form2,wrapper}.py``, ``main/expde.py``).

Stage 1 (method ``diffusevae_vae``, ``VAEObjective``): a small conv VAE on images mapped to [0, 1], loss per image

    sum_pixels (Dec(z) - x)^2 + beta KL(N(mu, diag e^logvar) || N(0, I)),   z = mu + e^(logvar / 2) e,

(the authors' sum-reduced MSE + ``alpha`` * KL, averaged over the batch instead of summed: Adam is invariant to it).

Stage 2 (method ``diffusevae``, ``DiffuseVAEObjective``): the VAE frozen, ``x^ = 2 Dec(z) - 1`` (z sampled from
q(z|x)) is concatenated to the UNet's input channels (``UNetConfig.cond_channels``) and, with probability
``cfg_drop``, replaced by zeros (the authors' ``cfd_rate``). Eps prediction, L2 loss, discrete linear VP schedule:

    Form-1:  x_t = alpha_t x_0 + sigma_t eps
    Form-2:  x_t = alpha_t x_0 + (1 - alpha_t) x^ + sigma_t eps      (paper; x_T ~ N(x^, I))

Form-2 is a DDPM on the residual ``y = x_0 - x^``: ``x_t - x^ = alpha_t y + sigma_t eps``. The solvers therefore see
Form-2 in residual coordinates ``s = x - x^`` (start ``N(0, I)``, x0 prediction ``y^``) and the sample is ``s_0 + x^``;
Form-1 is an ordinary conditional Denoiser. Both are a ``Denoiser`` with ``cond={"x_hat": x^}``: every dpmlab solver
samples them. Classifier-free guidance ``x0_u + w (x0_c - x0_u)`` with ``x0_u`` at ``x^ = 0`` (our ``w`` = the
authors' ``1 + guidance_weight``; ``w = 1`` is the conditional model). Generation: ``z ~ N(0, I)`` or the post-hoc
"expressive prior" ``LatentGMM`` (authors' ``expde.py``: a scikit-learn GaussianMixture, 10 full-covariance
components, fitted on sampled training latents). Controllable synthesis: fix the DDPM noise (``noise_ids``), vary z.

Deviations: the authors' Form-2 code draws ``x_t = alpha_t x_0 + x^ + sigma_t eps`` (not the paper's ``(1 - alpha_t)
x^``), i.e. a DDPM on ``x_0`` whose input is shifted by ``x^``; since the first convolution is linear in its input
channels, ``[x_t, x^]`` and ``[x_t - x^, x^]`` span the same networks, so that variant is Form-1 up to a
re-parameterisation of one layer; we implement the paper's equation. No latent-vector conditioning (``z_cond``, off
by default in the authors' configs); small conv VAE instead of their hierarchical ResNet VAE; L2 loss only.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import append_dims, counter_normal, dataclass_from_dict
from ..models.denoiser import Denoiser, Prediction
from ..models.guidance import classifier_free, with_cond
from ..models.hub import load_state, write_safetensors
from ..models.nets import Objective
from ..models.unet import UNet, UNetConfig
from ..schedules import DiscreteVP, get_schedule
from ..solvers.base import Problem, SeededNoise, Solver, get
from ..solvers.base import sample as run
from ..timesteps import DEFAULT_GRID, default_to_zero, make_grid
from ..training.data import Dataset
from ..training.losses import PredictionLoss
from ..typing import DenoiserFn
from . import Method, MethodRecipe, load, register_method, save_method_model

__all__ = [
    "Form",
    "VAEStage",
    "ConvVAE",
    "VAEObjective",
    "DiffuseVAE",
    "DiffuseVAEObjective",
    "DiffuseVAEModel",
    "LatentGMM",
    "Clipped",
    "q_sample",
]

Z_STREAM = 0x5A17  # counter_normal stream of the prior latents z (solvers use 0 and 1 + 16 i + sub)
ENC_STREAM = 0x5A18  # stream of the encoder's reparameterisation noise in reconstruct()


class Form(enum.Enum):
    FORM1 = "form1"  # x_t = alpha x0 + sigma eps, conditioned on x^
    FORM2 = "form2"  # x_t = alpha x0 + (1 - alpha) x^ + sigma eps: a DDPM on x0 - x^


def q_sample(x0: Tensor, x_hat: Tensor, alpha: Tensor, sigma: Tensor, eps: Tensor, form: Form | str) -> Tensor:
    """``x_t`` of the form's forward process (``alpha``, ``sigma`` broadcastable to ``x0``), in x coordinates."""
    shift = (1 - alpha) * x_hat if Form(form) is Form.FORM2 else 0.0
    return alpha * x0 + shift + sigma * eps


# --- stage 1: the VAE ------------------------------------------------------------------------------
@dataclass(frozen=True)
class VAEStage:
    """Settings of ``diffusevae_vae`` (a method recipe's ``method`` section); the image shape comes from the data."""

    latent_dim: int = 16  # size of z
    width: int = 32  # channels of the first conv; doubled at every down-sampling
    downs: int = 2  # stride-2 convolutions (the image side must be divisible by 2**downs)
    beta: float = 1.0  # KL weight (the authors' "alpha", default 1)

    def __post_init__(self) -> None:
        for name in ("latent_dim", "width", "downs"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= (0 if name == "downs" else 1)):
                raise ValueError(f"VAE {name} must be an int >= {0 if name == 'downs' else 1}, got {v!r}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise ValueError(f"VAE beta must be a finite number >= 0, got {self.beta!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VAEStage:
        return dataclass_from_dict(cls, d, what="DiffuseVAE VAE method")


class ConvVAE(nn.Module):
    """Conv encoder ``(B, C, H, W)`` in [0, 1] -> ``(mu, logvar)`` ``(B, latent_dim)`` each; decoder z -> [0, 1]
    (sigmoid, as the authors'). ``settings``, ``shape`` = (C, H, W)."""

    def __init__(self, settings: VAEStage, shape: tuple[int, ...]) -> None:
        super().__init__()
        c, h, w = shape
        k = 2**settings.downs
        if h != w or h % k:
            raise ValueError(f"the VAE needs square images with side divisible by 2**downs={k}, got shape {shape}")
        self.settings, self.shape = settings, (c, h, w)
        ch, side = settings.width * k, h // k
        enc: list[nn.Module] = [nn.Conv2d(c, settings.width, 3, padding=1), nn.SiLU()]
        dec: list[nn.Module] = []
        for i in range(settings.downs):
            a = settings.width * 2**i
            enc += [nn.Conv2d(a, 2 * a, 3, stride=2, padding=1), nn.SiLU()]
            dec = [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(2 * a, a, 3, padding=1), nn.SiLU(), *dec]
        self.enc = nn.Sequential(*enc, nn.Flatten(), nn.Linear(ch * side * side, 2 * settings.latent_dim))
        self.dec_in = nn.Linear(settings.latent_dim, ch * side * side)
        self.dec = nn.Sequential(*dec, nn.Conv2d(settings.width, c, 3, padding=1))
        self._side = (ch, side)

    def encode(self, x01: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.enc(x01).chunk(2, dim=1)
        return mu, logvar

    def decode(self, z: Tensor) -> Tensor:
        ch, side = self._side
        h = F.silu(self.dec_in(z)).reshape(len(z), ch, side, side)
        return torch.sigmoid(self.dec(h))  # (B, C, H, W) in [0, 1]

    def forward(self, x01: Tensor, e: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(Dec(z), mu, logvar)`` with ``z = mu + e^(logvar / 2) e`` (the reparameterisation trick)."""
        mu, logvar = self.encode(x01)
        return self.decode(mu + (0.5 * logvar).exp() * e), mu, logvar

    @staticmethod
    def kl(mu: Tensor, logvar: Tensor) -> Tensor:
        """``KL(N(mu, diag e^logvar) || N(0, I))`` per row ``(B,)`` (closed form)."""
        return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(1)

    def x_hat(self, x: Tensor, e: Tensor) -> Tensor:
        """The conditioning signal of data ``x`` in [-1, 1]: ``2 Dec(mu + e^(logvar/2) e) - 1``."""
        return 2 * self(x * 0.5 + 0.5, e)[0] - 1


class VAEObjective:
    """``TrainObjective`` of stage 1: ``sum (Dec(z) - x)^2 + beta KL`` per image in [0, 1], batch mean."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        self.recipe, self.dataset, self.name = recipe, dataset, recipe.name
        self.settings: VAEStage = recipe.settings
        torch.manual_seed(recipe.train.seed)
        self.module: nn.Module = ConvVAE(self.settings, dataset.shape)

    def __len__(self) -> int:
        return len(self.dataset)

    def config(self) -> dict[str, Any]:
        return self.recipe.config()

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        return {"x0": self.dataset.x[idx], "e": torch.randn(len(idx), self.settings.latent_dim, generator=g)}

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        x01 = batch["x0"] * 0.5 + 0.5
        rec, mu, logvar = module(x01, batch["e"])
        return ((rec - x01).square().flatten(1).sum(1) + self.settings.beta * ConvVAE.kl(mu, logvar)).mean()

    def _info(self) -> dict[str, Any]:
        return {"name": "diffusevae_vae", "settings": self.settings.to_dict(), "data_shape": list(self.dataset.shape)}

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        return save_method_model(out_dir, ema, self._info(), self.recipe, self.dataset, card)

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}


def _vae_from_file(path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> ConvVAE:
    vae = ConvVAE(VAEStage.from_dict(info["settings"]), tuple(info["data_shape"]))
    load_state(path, vae, tensors)
    return vae.eval().requires_grad_(False)


# --- stage 2: the conditional DDPM ------------------------------------------------------------------
@dataclass(frozen=True)
class DiffuseVAE:
    """Settings of ``diffusevae`` (a method recipe's ``method`` section); authors' defaults where they apply."""

    vae: str = "runs/diffusevae_vae_digits8"  # the trained stage-1 run folder or model file
    form: Form = Form.FORM1
    net_config: Mapping[str, Any] = field(default_factory=dict)  # UNetConfig; image size and channels filled in
    schedule: str = "linear"  # the DDPM schedule (dpmlab.schedules.get_schedule name; T = 1000 linear default)
    cfg_drop: float = 0.0  # probability of training with x^ = 0 (classifier-free guidance; authors' cfd_rate)

    def __post_init__(self) -> None:
        object.__setattr__(self, "form", Form(self.form))
        object.__setattr__(self, "net_config", dict(self.net_config))
        if not 0.0 <= self.cfg_drop < 1.0:
            raise ValueError(f"DiffuseVAE cfg_drop must be in [0, 1), got {self.cfg_drop!r}")
        if not isinstance(get_schedule(self.schedule), DiscreteVP):
            raise ValueError(f"DiffuseVAE trains on a discrete DDPM schedule, got {self.schedule!r}")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "form": self.form.value, "net_config": dict(self.net_config)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiffuseVAE:
        return dataclass_from_dict(cls, d, what="DiffuseVAE method")


class DiffuseVAENet(nn.Module):
    """The stage-2 module: the frozen ``vae`` and the conditional ``unet`` (what the trainer optimises)."""

    def __init__(self, vae: ConvVAE, unet: UNet) -> None:
        super().__init__()
        self.vae, self.unet = vae.requires_grad_(False), unet

    def forward(self, x: Tensor, t: Tensor, x_hat: Tensor | None = None) -> Tensor:
        return self.unet(x, t, x_cond=x_hat)  # type: ignore[no-any-return]


def _unet_config(s: DiffuseVAE, shape: tuple[int, ...]) -> dict[str, Any]:
    if len(shape) != 3:
        raise ValueError(f"DiffuseVAE needs image data (C, H, W), the data has shape {shape}")
    return {"image_size": shape[-1], "in_channels": shape[0], "cond_channels": shape[0], **s.net_config}


class DiffuseVAEObjective:
    """``TrainObjective`` of stage 2: eps-prediction L2 of Form-1 or Form-2 with x^ from the frozen VAE."""

    def __init__(self, recipe: MethodRecipe, dataset: Dataset) -> None:
        s: DiffuseVAE = recipe.settings
        self.recipe, self.dataset, self.name = recipe, dataset, recipe.name
        self.settings = dataclasses.replace(s, net_config=_unet_config(s, dataset.shape))
        vae = load(s.vae)
        if not isinstance(vae, ConvVAE) or vae.shape != dataset.shape:
            raise ValueError(f"DiffuseVAE vae {s.vae!r} must be a diffusevae_vae run on data of shape {dataset.shape}")
        self.vae_digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in vae.state_dict().values())).hexdigest()
        torch.manual_seed(recipe.train.seed)
        self.net = DiffuseVAENet(vae, UNet(UNetConfig.from_dict(self.settings.net_config)))
        self.module: nn.Module = self.net
        self.loss_fn = PredictionLoss(get_schedule(s.schedule), Objective.EPS)

    def __len__(self) -> int:
        return len(self.dataset)

    def config(self) -> dict[str, Any]:
        return {**self.recipe.config(), "vae_sha256": self.vae_digest}

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        b = len(idx)
        t = self.loss_fn.draw(g, b)
        eps = torch.randn((b, *self.dataset.shape), generator=g)
        e = torch.randn(b, self.net.vae.settings.latent_dim, generator=g)
        keep = (torch.rand(b, generator=g) >= self.settings.cfg_drop).float()
        return {"x0": self.dataset.x[idx], "t": t, "eps": eps, "e": e, "keep": keep}

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        x0 = batch["x0"]
        with torch.no_grad():  # the frozen VAE (module may wrap self.net for processes)
            x_hat = self.net.vae.x_hat(x0, batch["e"]) * append_dims(batch["keep"], x0.ndim)
        y = x0 - x_hat if self.settings.form is Form.FORM2 else x0  # Form-2: a DDPM on the residual
        return self.loss_fn(module, y, batch["t"], batch["eps"], x_hat=x_hat).mean()

    def _info(self) -> dict[str, Any]:
        return {
            "name": "diffusevae",
            "settings": self.settings.to_dict(),
            "data_shape": list(self.dataset.shape),
            "vae_settings": self.net.vae.settings.to_dict(),
        }

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        return save_method_model(out_dir, ema, self._info(), self.recipe, self.dataset, card)

    def checkpoint_meta(self) -> dict[str, str]:
        return {"method": json.dumps(self._info())}


# --- the post-hoc latent prior ----------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class LatentGMM:
    """A Gaussian mixture on the VAE latents (the paper's "expressive prior"): ``weights`` (K,), ``means`` (K, d),
    ``covariances`` (K, d, d), float64."""

    weights: Tensor
    means: Tensor
    covariances: Tensor

    @classmethod
    def fit(cls, z: Tensor, n_components: int = 10, *, seed: int = 0) -> LatentGMM:
        """scikit-learn's full-covariance ``GaussianMixture`` fitted on latents ``z`` (N, d) (authors' settings)."""
        from sklearn.mixture import GaussianMixture

        if not (isinstance(n_components, int) and 1 <= n_components <= len(z)):
            raise ValueError(f"n_components must be an int in [1, {len(z)}], got {n_components!r}")
        gmm = GaussianMixture(n_components, covariance_type="full", random_state=seed).fit(z.double().numpy())
        return cls(*(torch.from_numpy(a).double() for a in (gmm.weights_, gmm.means_, gmm.covariances_)))

    def sample(self, idx: Tensor, *, seed: int = 0) -> Tensor:
        """Latents ``(len(idx), d)``; row ``b`` depends only on ``(seed, idx[b])``."""
        u = torch.special.ndtr(counter_normal(seed, idx, Z_STREAM + 1, (1,), dtype=torch.float64))[:, 0]
        k = torch.searchsorted(self.weights.cumsum(0)[:-1].contiguous(), u.contiguous(), right=True)
        e = counter_normal(seed, idx, Z_STREAM, (self.means.shape[1],), dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covariances)
        return (self.means[k] + (chol[k] @ e[:, :, None])[:, :, 0]).float()

    def save(self, path: str | Path) -> None:
        write_safetensors(
            path,
            {"weights": self.weights, "means": self.means, "covariances": self.covariances},
            {"format": "dpmlab.latent_gmm/1"},
        )

    @classmethod
    def load(cls, path: str | Path) -> LatentGMM:
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["weights"], t["means"], t["covariances"])


# --- the trained model ----------------------------------------------------------------------------
class Clipped:
    """``x0`` clipped to the data range [-1, 1] in x coordinates (the authors' ``clip_denoised``); Form-2's residual
    prediction ``y^`` is clipped as ``clamp(y^ + x^, -1, 1) - x^``. Keeps the model's ``schedule`` / ``data_shape``."""

    def __init__(self, model: DenoiserFn, form: Form) -> None:
        self.model, self.form = model, form
        self.schedule, self.data_shape = model.schedule, model.data_shape  # type: ignore[attr-defined]

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        shift = cond.get("x_hat") if self.form is Form.FORM2 else None
        x0 = self.model(x, t, **cond)
        return x0.clamp(-1, 1) if shift is None else (x0 + shift).clamp(-1, 1) - shift


@dataclass(frozen=True, eq=False)
class DiffuseVAEModel:
    """A trained DiffuseVAE: the frozen ``vae``, the conditional eps ``denoiser`` (``cond={"x_hat": x^}``; Form-2 in
    residual coordinates ``s = x - x^``) and the settings."""

    vae: ConvVAE
    denoiser: Denoiser
    settings: DiffuseVAE

    @property
    def latent_dim(self) -> int:
        return self.vae.settings.latent_dim

    def decode(self, z: Tensor) -> Tensor:
        """``x^ = 2 Dec(z) - 1`` in [-1, 1]."""
        with torch.no_grad():
            return 2 * self.vae.decode(z.float()) - 1

    def reconstruct(self, x: Tensor, *, seed: int = 0) -> Tensor:
        """``x^`` of data ``x`` in [-1, 1] with z drawn from q(z | x) (noise from ``(seed, row)``)."""
        e = counter_normal(seed, torch.arange(len(x)), ENC_STREAM, (self.latent_dim,))
        with torch.no_grad():
            return self.vae.x_hat(x.float(), e)

    def latents(self, n: int, *, seed: int = 0, prior: LatentGMM | None = None) -> Tensor:
        """``n`` prior latents: ``N(0, I)`` or ``prior``; row ``i`` depends only on ``(seed, i)``."""
        idx = torch.arange(n)
        return (
            prior.sample(idx, seed=seed)
            if prior is not None
            else counter_normal(seed, idx, Z_STREAM, (self.latent_dim,))
        )

    def fit_prior(self, x: Tensor, n_components: int = 10, *, seed: int = 0) -> LatentGMM:
        """The paper's expressive prior: a ``LatentGMM`` on latents of data ``x`` sampled from q(z | x) (the authors'
        ``extract_latents.py`` + ``expde.py``)."""
        e = counter_normal(seed, torch.arange(len(x)), ENC_STREAM, (self.latent_dim,))
        with torch.no_grad():
            mu, logvar = self.vae.encode(x.float() * 0.5 + 0.5)
        return LatentGMM.fit(mu + (0.5 * logvar).exp() * e, n_components, seed=seed)

    def guided(self, scale: float = 1.0) -> DenoiserFn:
        """The denoiser under classifier-free guidance ``x0_u + scale (x0_c - x0_u)`` (``x0_u``: ``x^ = 0``)."""
        if scale == 1.0:
            return self.denoiser
        return classifier_free(self.denoiser, with_cond(self.denoiser, x_hat=None), scale)

    def sample(
        self,
        n: int | None = None,
        *,
        z: Tensor | None = None,
        prior: LatentGMM | None = None,
        solver: str | Solver[Any] = "ddim",
        nfe: int = 10,
        grid: str = DEFAULT_GRID,
        to_zero: bool | None = None,
        seed: int = 0,
        guidance: float = 1.0,
        clip: bool = True,
        noise_ids: Tensor | None = None,
        return_x_hat: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Samples from latents ``z`` (or ``n`` draws of the prior): ``x^ = Dec(z)``, then ``solver`` at exactly
        ``nfe`` evaluations on ``grid`` (``to_zero`` as in ``dpmlab.sample``) conditioned on ``x^``, with the x0
        predictions ``clip``-ped to [-1, 1] (``Clipped``; the authors' default). The DDPM noise of row ``b`` comes from
        ``(seed, noise_ids[b])`` (default ``arange``): equal ids fix the noise while z varies."""
        if (n is None) == (z is None):
            raise ValueError("give n (prior draws) or z (latents), not both")
        z = self.latents(int(n), seed=seed, prior=prior) if z is None else z  # type: ignore[arg-type]
        if z.ndim != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        ids = torch.arange(len(z)) if noise_ids is None else torch.as_tensor(noise_ids, dtype=torch.int64)
        if ids.shape != (len(z),):
            raise ValueError(f"noise_ids must have shape ({len(z)},), got {tuple(ids.shape)}")
        x_hat = self.decode(z)
        slv = get(solver) if isinstance(solver, str) else solver
        sch = self.denoiser.schedule
        zero = default_to_zero(sch) if to_zero is None else bool(to_zero)
        ts = make_grid(sch, grid, slv.steps_for_nfe(nfe, zero), to_zero=zero)
        x = float(sch.sigma(ts[:1])) * counter_normal(seed, ids, 0, tuple(x_hat.shape[1:]))
        den = Clipped(self.guided(guidance), self.settings.form) if clip else self.guided(guidance)
        problem = Problem(den, sch, noise=SeededNoise(seed, ids), cond={"x_hat": x_hat})
        with torch.no_grad():
            out = run(problem, x, ts, slv)
        out = out + x_hat if self.settings.form is Form.FORM2 else out
        return (out, x_hat) if return_x_hat else out

    def interpolate(self, z0: Tensor, z1: Tensor, steps: int = 8, **sample_kw: Any) -> tuple[Tensor, Tensor]:
        """Controllable synthesis: ``steps`` latents on the segment z0 -> z1 sampled with one fixed DDPM noise;
        returns ``(samples, x^)``."""
        w = torch.linspace(0, 1, steps)[:, None]
        z = (1 - w) * z0.reshape(1, -1) + w * z1.reshape(1, -1)
        return self.sample(
            z=z,
            noise_ids=torch.zeros(steps, dtype=torch.int64),
            return_x_hat=True,  # type: ignore
            **sample_kw,
        )

    @classmethod
    def from_file(cls, path: Path, info: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> DiffuseVAEModel:
        s = DiffuseVAE.from_dict(info["settings"])
        shape = tuple(info["data_shape"])
        net = DiffuseVAENet(
            ConvVAE(VAEStage.from_dict(info["vae_settings"]), shape), UNet(UNetConfig.from_dict(s.net_config))
        )
        load_state(path, net, tensors)
        net.eval().requires_grad_(False)
        den = Denoiser(net, get_schedule(s.schedule), Prediction.EPS, data_shape=shape)
        return cls(net.vae, den, s)


register_method(Method("diffusevae_vae", VAEStage, VAEObjective, _vae_from_file))
register_method(Method("diffusevae", DiffuseVAE, DiffuseVAEObjective, DiffuseVAEModel.from_file))
