"""Noise schedules: ``q(x_t | x0) = N(alpha(t) x0, sigma(t)^2 I)``.

Every schedule exposes ``alpha``, ``sigma``, ``lam = log(alpha / sigma)`` and the exact inverse
``t_of_lambda``; everything is computed in float64. Sampling runs from ``t_max`` (noise) towards
``t_min`` (data); ``t_zero`` is the time where ``sigma = 0`` when the schedule reaches it (``None``
for VE). A step *to* ``t_zero`` is a step to ``lam = +inf`` and is handled by the solvers' closed forms.

References: DPM-Solver's ``NoiseScheduleVP`` (Lu et al. 2022, arXiv 2206.00927) for the discrete
log-alpha interpolation and the linear/cosine VP formulas; Song et al. 2021 (arXiv 2011.13456) for VE;
Karras et al. 2022 (arXiv 2206.00364) for EDM; Liu et al. 2022 / Lipman et al. 2022 for flows.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._utils import append_dims, f64, interp1d

__all__ = [
    "NoiseSchedule",
    "DiscreteVP",
    "LinearVP",
    "CosineVP",
    "VE",
    "EDM",
    "Flow",
    "betas_for_preset",
    "get_schedule",
    "schedule_from_config",
    "SCHEDULES",
]


class NoiseSchedule(ABC):
    """Base class. Subclasses implement ``log_alpha``/``log_sigma`` (or ``alpha``/``sigma``) and
    ``t_of_lambda``; the rest is derived here once."""

    t_min: float  # smallest time a sampler should stop at (sigma > 0 there)
    t_max: float  # time sampling starts from
    t_zero: float | None = None  # time with sigma == 0, if the schedule reaches it
    is_vp: bool = False  # alpha^2 + sigma^2 == 1

    @abstractmethod
    def log_alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def log_sigma(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def t_of_lambda(self, lam: Tensor) -> Tensor:
        """Exact inverse of ``lam(t)`` (tested by round trip)."""

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(self.log_alpha(f64(t)))

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.exp(self.log_sigma(f64(t)))

    def lam(self, t: Tensor | float) -> Tensor:
        t = f64(t)
        return self.log_alpha(t) - self.log_sigma(t)

    def sigma_over_alpha(self, t: Tensor | float) -> Tensor:
        """The EDM / k-diffusion noise level ``s = sigma / alpha = exp(-lam)``."""
        return torch.exp(-self.lam(t))

    def t_of_sigma_over_alpha(self, s: Tensor | float) -> Tensor:
        s = f64(s)
        return self.t_of_lambda(-torch.log(s))

    def dalpha_dsigma_dt(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(d alpha / dt, d sigma / dt)`` at ``t`` (float64; autograd of the closed forms)."""
        with torch.enable_grad():
            tt = f64(t).detach().clone().requires_grad_(True)
            # "+ 0 * tt" keeps constant coefficients (alpha = 1 for VE/EDM) in the graph
            da = torch.autograd.grad((self.alpha(tt) + 0.0 * tt).sum(), tt)[0]
            ds = torch.autograd.grad((self.sigma(tt) + 0.0 * tt).sum(), tt)[0]
        return da, ds

    # --- conversions between parameterisations (all at the same (x_t, t)) -----------------------
    def _coeffs(self, x: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        t = f64(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        a = append_dims(self.alpha(t), x.ndim).to(x.dtype)
        s = append_dims(self.sigma(t), x.ndim).to(x.dtype)
        return a, s

    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps``."""
        a, s = self._coeffs(x0, t)
        return a * x0 + s * eps

    def x0_from_eps(self, x: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        a, s = self._coeffs(x, t)
        return (x - s * eps) / a

    def eps_from_x0(self, x: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
        a, s = self._coeffs(x, t)
        return (x - a * x0) / s

    def v_from_x0_eps(self, x0: Tensor, eps: Tensor, t: Tensor | float) -> Tensor:
        """``v = alpha eps - sigma x0`` (Salimans & Ho 2022)."""
        a, s = self._coeffs(x0, t)
        return a * eps - s * x0

    def x0_from_v(self, x: Tensor, v: Tensor, t: Tensor | float) -> Tensor:
        """Inverse of ``v`` on any schedule: ``x0 = (alpha x - sigma v) / (alpha^2 + sigma^2)``."""
        a, s = self._coeffs(x, t)
        return (a * x - s * v) / (a * a + s * s)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(t_min={self.t_min:g}, t_max={self.t_max:g})"


def _log_sigma_vp(log_alpha: Tensor) -> Tensor:
    """``log sqrt(1 - alpha^2)`` computed stably from ``log alpha``."""
    return 0.5 * torch.log(-torch.expm1(2.0 * log_alpha))


def _log_alpha_vp_of_lambda(lam: Tensor) -> Tensor:
    """For VP: ``alpha^2 = sigmoid(2 lam)`` so ``log alpha = -0.5 softplus(-2 lam)``."""
    return -0.5 * torch.logaddexp(torch.zeros_like(lam), -2.0 * lam)


class _VP(NoiseSchedule):
    is_vp = True
    t_zero = 0.0

    def log_sigma(self, t: Tensor) -> Tensor:
        return _log_sigma_vp(self.log_alpha(t))

    def lam(self, t: Tensor | float) -> Tensor:
        la = self.log_alpha(f64(t))
        return la - _log_sigma_vp(la)


def betas_for_preset(name: str, n: int = 1000) -> Tensor:
    """Training betas of the common discrete presets (float64)."""
    if name == "linear":
        return torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    if name == "scaled_linear":
        return torch.linspace(0.00085**0.5, 0.012**0.5, n, dtype=torch.float64) ** 2
    if name in ("cosine", "squaredcos_cap_v2"):

        def abar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        b = [min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)]
        return torch.tensor(b, dtype=torch.float64)
    raise ValueError(f"unknown beta preset {name!r}; allowed: 'linear', 'scaled_linear', 'cosine'")


class DiscreteVP(_VP):
    """VP schedule of a model trained on ``N`` discrete steps.

    Index ``n = 0..N-1`` sits at continuous time ``t_n = (n + 1) / N``; ``log alpha`` is linear in ``t``
    between knots (as in DPM-Solver), and the knot ``t = 0`` with ``alpha = 1`` is added so that the
    schedule reaches ``sigma = 0``. ``lambda_min`` truncates the table where ``lam < lambda_min``
    (DPM-Solver clips cosine schedules at ``-5.1``), which lowers ``t_max``.
    The network's own time input is ``N t - 1`` (the training index, fractional in between);
    see ``dpmlab.models.Denoiser``.
    """

    def __init__(
        self,
        *,
        betas: Sequence[float] | Tensor | None = None,
        alphas_cumprod: Sequence[float] | Tensor | None = None,
        lambda_min: float | None = None,
    ) -> None:
        if (betas is None) == (alphas_cumprod is None):
            raise ValueError("DiscreteVP needs exactly one of betas= or alphas_cumprod=")
        if betas is not None:
            b = f64(betas)
            if b.ndim != 1 or not bool(((b > 0) & (b < 1)).all()):
                raise ValueError("betas must be a 1-d sequence with every value in (0, 1)")
            abar = torch.cumprod(1.0 - b, 0)
        else:
            abar = f64(alphas_cumprod)  # type: ignore[arg-type]
            if abar.ndim != 1 or not bool(((abar > 0) & (abar < 1)).all()):
                raise ValueError("alphas_cumprod must be 1-d with every value in (0, 1)")
            if not bool((abar[1:] < abar[:-1]).all()):
                raise ValueError("alphas_cumprod must be strictly decreasing")
        self.n_train = int(abar.numel())
        self.alphas_cumprod = abar
        self.betas = 1.0 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
        log_alpha = 0.5 * torch.log(abar)
        knots_t = torch.arange(0, self.n_train + 1, dtype=torch.float64) / self.n_train
        knots_la = torch.cat([log_alpha.new_zeros(1), log_alpha])
        if lambda_min is not None:
            lam_knots = torch.cat([knots_la.new_full((1,), math.inf), knots_la[1:] - _log_sigma_vp(knots_la[1:])])
            keep = lam_knots >= lambda_min
            if int(keep.sum()) < 3:
                raise ValueError(f"lambda_min={lambda_min} removes almost the whole schedule")
            knots_t, knots_la = knots_t[keep], knots_la[keep]
        self.lambda_min = lambda_min
        self._t, self._la = knots_t, knots_la
        self._neg_la = -knots_la  # increasing, for the inverse
        self.t_max = float(knots_t[-1])
        self.t_min = 1.0 / self.n_train

    @classmethod
    def from_preset(cls, name: str, n: int = 1000, *, lambda_min: float | None = None) -> DiscreteVP:
        """``linear`` (1e-4..0.02), ``scaled_linear`` (0.00085..0.012), ``cosine`` (squaredcos_cap_v2;
        lambda clipped at -5.1 unless ``lambda_min`` is given)."""
        if lambda_min is None and name in ("cosine", "squaredcos_cap_v2"):
            lambda_min = -5.1
        return cls(betas=betas_for_preset(name, n), lambda_min=lambda_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        t = f64(t)
        return interp1d(t.reshape(-1), self._t.to(t.device), self._la.to(t.device)).reshape(t.shape)

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = f64(lam)
        neg_la = -_log_alpha_vp_of_lambda(lam)
        out = interp1d(neg_la.reshape(-1), self._neg_la.to(lam.device), self._t.to(lam.device))
        return out.reshape(lam.shape)

    def index_to_t(self, n: Tensor | Sequence[float] | float) -> Tensor:
        """Training index (float) to continuous time: ``t = (n + 1) / N``."""
        return (f64(n) + 1.0) / self.n_train

    def t_to_index(self, t: Tensor) -> Tensor:
        return f64(t) * self.n_train - 1.0

    def __repr__(self) -> str:
        return f"DiscreteVP(N={self.n_train}, t_max={self.t_max:.6g}, lambda_min={self.lambda_min})"


class LinearVP(_VP):
    """Continuous VP-SDE with linear beta(t) = beta0 + t (beta1 - beta0) on ``[0, 1]``."""

    def __init__(self, beta0: float = 0.1, beta1: float = 20.0, *, t_min: float = 1e-3, t_max: float = 1.0):
        if not (0 < beta0 < beta1):
            raise ValueError(f"need 0 < beta0 < beta1, got beta0={beta0}, beta1={beta1}")
        self.beta0, self.beta1, self.t_min, self.t_max = float(beta0), float(beta1), float(t_min), float(t_max)

    def log_alpha(self, t: Tensor) -> Tensor:
        t = f64(t)
        return -0.25 * t * t * (self.beta1 - self.beta0) - 0.5 * t * self.beta0

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        lam = f64(lam)
        tmp = 2.0 * (self.beta1 - self.beta0) * torch.logaddexp(-2.0 * lam, torch.zeros_like(lam))
        delta = self.beta0**2 + tmp
        return tmp / (torch.sqrt(delta) + self.beta0) / (self.beta1 - self.beta0)


class CosineVP(_VP):
    """Continuous cosine VP (Nichol & Dhariwal 2021), ``s = 0.008``; ``t_max = 0.9946`` as in DPM-Solver
    keeps lambda away from -inf."""

    def __init__(self, s: float = 0.008, *, t_min: float = 1e-3, t_max: float = 0.9946):
        self.s, self.t_min, self.t_max = float(s), float(t_min), float(t_max)
        self._log_alpha0 = math.log(math.cos(self.s / (1.0 + self.s) * math.pi / 2.0))

    def log_alpha(self, t: Tensor) -> Tensor:
        t = f64(t)
        return torch.log(torch.cos((t + self.s) / (1.0 + self.s) * math.pi / 2.0)) - self._log_alpha0

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        la = _log_alpha_vp_of_lambda(f64(lam))
        return 2.0 * (1.0 + self.s) / math.pi * torch.arccos(torch.exp(la + self._log_alpha0)) - self.s


class VE(NoiseSchedule):
    """Variance exploding (Song et al. 2021): ``alpha = 1``, ``sigma = sigma_min (sigma_max/sigma_min)^t``."""

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, *, t_min: float = 1e-5, t_max: float = 1.0):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = float(t_min), float(t_max)
        self._log_ratio = math.log(self.sigma_max / self.sigma_min)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(f64(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return math.log(self.sigma_min) + f64(t) * self._log_ratio

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        return (-f64(lam) - math.log(self.sigma_min)) / self._log_ratio


class EDM(NoiseSchedule):
    """EDM (Karras et al. 2022): ``alpha = 1``, ``sigma = t``; sampling from 80 down to 0.002."""

    t_zero = 0.0

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        if not (0 < sigma_min < sigma_max):
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.t_min, self.t_max, self.sigma_data = float(sigma_min), float(sigma_max), float(sigma_data)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.zeros_like(f64(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(f64(t))

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.ones_like(f64(t))

    def sigma(self, t: Tensor | float) -> Tensor:
        return f64(t).clone()

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        return torch.exp(-f64(lam))


class Flow(NoiseSchedule):
    """Rectified flow / flow matching: ``alpha = 1 - t``, ``sigma = t`` on ``[0, 1]``."""

    t_zero = 0.0

    def __init__(self, *, t_min: float = 1e-3, t_max: float = 1.0 - 1e-3):
        if not (0 < t_min < t_max < 1):
            raise ValueError(f"need 0 < t_min < t_max < 1, got {t_min}, {t_max}")
        self.t_min, self.t_max = float(t_min), float(t_max)

    def log_alpha(self, t: Tensor) -> Tensor:
        return torch.log1p(-f64(t))

    def log_sigma(self, t: Tensor) -> Tensor:
        return torch.log(f64(t))

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - f64(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return f64(t).clone()

    def t_of_lambda(self, lam: Tensor) -> Tensor:
        return torch.sigmoid(-f64(lam))


SCHEDULES = ("linear", "scaled_linear", "cosine", "linear_vp", "cosine_vp", "ve", "edm", "flow")


def get_schedule(name: str) -> NoiseSchedule:
    """A schedule by name, with its paper defaults. Allowed names: ``SCHEDULES``."""
    if name in ("linear", "scaled_linear", "cosine"):
        return DiscreteVP.from_preset(name)
    factories = {"linear_vp": LinearVP, "cosine_vp": CosineVP, "ve": VE, "edm": EDM, "flow": Flow}
    if name not in factories:
        raise ValueError(f"unknown schedule {name!r}; allowed: {', '.join(SCHEDULES)}")
    return factories[name]()


_BETA_PRESETS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def schedule_from_config(config: Mapping[str, Any]) -> DiscreteVP:
    """The ``DiscreteVP`` of a diffusers scheduler config (no lambda clipping, as diffusers)."""
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError("rescale_betas_zero_snr=True gives alpha = 0 at the last step; not supported by DiscreteVP")
    if config.get("trained_betas") is not None:
        return DiscreteVP(betas=f64(list(config["trained_betas"])))
    n = int(config.get("num_train_timesteps", 1000))
    kind = config.get("beta_schedule", "linear")
    if kind not in _BETA_PRESETS:
        raise ValueError(f"unsupported beta_schedule {kind!r}; allowed: {', '.join(_BETA_PRESETS)}")
    start, end = float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02))
    if kind == "linear":
        betas = torch.linspace(start, end, n, dtype=torch.float64)
    elif kind == "scaled_linear":
        betas = torch.linspace(start**0.5, end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = betas_for_preset("cosine", n)
    return DiscreteVP(betas=betas)
