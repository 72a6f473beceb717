"""Denoiser wrappers (``DenoiserFn -> DenoiserFn``) that change the data prediction ``x0``.

* ``dynamic_threshold`` — dynamic thresholding of Saharia et al., "Photorealistic Text-to-Image Diffusion
  Models with Deep Language Understanding" (Imagen), NeurIPS 2022, arXiv 2205.11487, Sec. 2.3, as used by
  DPM-Solver++ (Lu et al. 2022, arXiv 2211.01095, Sec. 5). Per sample::

      s  = clamp(quantile_ratio(|x0|), min=max_value, max=s_max)
      x0 <- clamp(x0, -s, s) * max_value / s

  With ``max_value = 1`` (the default) this is exactly Imagen and the DPM-Solver reference code
  (``s = max(quantile, 1)``, ``x0 = clamp(x0, -s, s) / s``); diffusers' ``thresholding=True`` is
  ``max_value = 1, s_max = sample_max_value``. For ``max_value != 1`` the reference still divides by
  ``s`` alone (range ``[-1, 1]``); we rescale to ``[-max_value, max_value]`` so that data already inside
  that range pass unchanged. The quantile is computed in float32 at least (``torch.quantile`` needs it).
  Meant for pixel-space models and data-form solvers (DPM-Solver++, DDIM); unsuitable for latents.
  Noise-form solvers see the ``eps`` implied by the thresholded ``x0`` (the reference code skips them).
* ``ClassifierFree`` / ``Unconditional`` / ``WithCond`` — classifier-free guidance (Ho & Salimans 2022).
* ``ClassifierGuidance`` — noise-aware classifier guidance (Dhariwal & Nichol 2021, arXiv 2105.05233):
  ``x0 + s (sigma^2 / alpha) grad_{x_t} log p(y | x_t, t)``.
* ``OffTheShelfGuidance`` / ``elucd`` / ``softplus_classifier`` — EluCD (Ma et al., ICLR 2024, arXiv
  2310.11311): a clean classifier on the detached x0, Softplus(beta) for ReLU, two temperatures, the sin
  schedule, per-sample rescaling. ``calibration_vs_t``: the classifier's ECE on ``x0(x_t)`` against ``t``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import append_dims, counter_normal, f64
from ..typing import DenoiserFn

__all__ = ["DynamicThreshold", "dynamic_threshold"]


class _ModelWrapper:
    """A ``DenoiserFn -> DenoiserFn`` transform keeps the wrapped model's ``schedule`` and ``data_shape``."""

    model: DenoiserFn

    @property
    def schedule(self) -> Any:
        return self.model.schedule  # type: ignore[attr-defined]

    @property
    def data_shape(self) -> Any:
        return self.model.data_shape  # type: ignore[attr-defined]


class DynamicThreshold(_ModelWrapper):
    """``x0 = threshold(model(x, t, **cond))``; forwards the wrapped model's ``schedule``/``data_shape``."""

    def __init__(self, model: DenoiserFn, *, ratio: float = 0.995, max_value: float = 1.0, s_max: float = math.inf):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        if not (0.0 < max_value < math.inf and s_max >= max_value):
            raise ValueError(f"need 0 < max_value <= s_max, got max_value={max_value}, s_max={s_max}")
        self.model, self.ratio, self.max_value, self.s_max = model, float(ratio), float(max_value), float(s_max)

    def threshold(self, x0: Tensor) -> Tensor:
        """Dynamic thresholding of a batch ``x0`` of shape ``(B, ...)``."""
        flat = x0.abs().reshape(x0.shape[0], -1).to(torch.promote_types(x0.dtype, torch.float32))
        s = torch.quantile(flat, self.ratio, dim=1)  # (B,) per-sample percentile of |x0|
        s = append_dims(s.clamp(min=self.max_value, max=self.s_max).to(x0.dtype), x0.ndim)
        return torch.minimum(torch.maximum(x0, -s), s) * (self.max_value / s)  # clamp to [-s, s], rescale

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.threshold(self.model(x, t, **cond))

    def __repr__(self) -> str:
        return f"DynamicThreshold({self.model!r}, ratio={self.ratio}, max_value={self.max_value}, s_max={self.s_max})"


def dynamic_threshold(
    model: DenoiserFn, ratio: float = 0.995, max_value: float = 1.0, *, s_max: float = math.inf
) -> DynamicThreshold:
    """Wrap ``model`` with dynamic thresholding (Imagen; DPM-Solver++): percentile ``ratio`` of ``|x0|``,
    data range ``[-max_value, max_value]``, optional cap ``s_max`` on the threshold (diffusers)."""
    return DynamicThreshold(model, ratio=ratio, max_value=max_value, s_max=s_max)


# --- classifier-free guidance (appended) ----------------------------------------------------------
class ClassifierFree(_ModelWrapper):
    """Classifier-free guidance — Ho & Salimans, "Classifier-Free Diffusion Guidance", arXiv 2207.12598 —
    in ``x0`` space: ``x0 = x0_u + w (x0_c - x0_u)``.

    Convention: ``w`` is the guidance scale of diffusers / DPM-Solver / DC-Solver (``eps_u + w (eps_c -
    eps_u)``); ``w = 1`` is the conditional model, ``w = 0`` the unconditional one. Ho & Salimans' ``w``
    is ours minus 1. At fixed ``(x, t)`` eps and x0 are affine in each other with the same coefficients
    for both models, so guiding x0 equals guiding eps. ``**cond`` is passed to both models."""

    def __init__(self, cond_model: DenoiserFn, uncond_model: DenoiserFn, scale: float) -> None:
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be finite, got {scale}")
        self.cond_model, self.uncond_model, self.scale = cond_model, uncond_model, float(scale)
        self.model = cond_model  # the wrapped model whose schedule and data shape are forwarded

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        x0_c = self.cond_model(x, t, **cond)
        if self.scale == 1.0:
            return x0_c
        x0_u = self.uncond_model(x, t, **cond)
        return x0_u + self.scale * (x0_c - x0_u)

    def __repr__(self) -> str:
        return f"ClassifierFree({self.cond_model!r}, {self.uncond_model!r}, scale={self.scale})"


def classifier_free(cond_model: DenoiserFn, uncond_model: DenoiserFn, scale: float) -> ClassifierFree:
    """``x0_u + scale (x0_c - x0_u)``: classifier-free guidance of two denoisers (``scale = 1``: no
    guidance, the conditional model; diffusers' ``guidance_scale`` convention)."""
    return ClassifierFree(cond_model, uncond_model, scale)


__all__ += ["ClassifierFree", "classifier_free"]


class Unconditional(_ModelWrapper):
    """The same model with its conditioning dropped (a class-conditional network then sees its null
    class): the ``uncond_model`` of classifier-free guidance for networks trained with label dropout."""

    def __init__(self, model: DenoiserFn) -> None:
        self.model = model

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.model(x, t)


__all__ += ["Unconditional"]


class WithCond(_ModelWrapper):
    """The same model with some conditioning replaced: ``model(x, t, **{**cond, **override})`` — e.g. a
    negative prompt as the ``uncond_model`` of classifier-free guidance."""

    def __init__(self, model: DenoiserFn, **override: Any) -> None:
        self.model, self.override = model, override

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.model(x, t, **{**cond, **self.override})

    def __repr__(self) -> str:
        return f"WithCond({self.model!r}, {', '.join(f'{k}={v!r}' for k, v in self.override.items())})"


def with_cond(model: DenoiserFn, **override: Any) -> WithCond:
    """``model`` with the keyword conditioning ``override`` replacing what the solver passes."""
    return WithCond(model, **override)


__all__ += ["WithCond", "with_cond"]


# --- classifier guidance: the noise-aware baseline and EluCD's off-the-shelf guidance (appended) -----
def _target(cond: dict[str, Any], key: str, batch: int, device: torch.device) -> Tensor:
    """The target classes ``(B,)`` from the problem's ``cond[key]`` (an int, a 0-d or a ``(B,)`` tensor)."""
    if key not in cond:
        raise ValueError(
            f"classifier guidance needs the target class as the {key!r} keyword of the condition; got keywords "
            f"{sorted(cond) or 'none'} (e.g. sample(..., cond={{{key!r}: 3}}))"
        )
    y = torch.as_tensor(cond[key], device=device)
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.ndim > 1 or (y.ndim == 1 and y.shape[0] != batch):
        raise ValueError(f"target {key!r} must be an int or {batch} ints, got {tuple(y.shape)} {y.dtype}")
    return y.expand(batch).long() if y.ndim == 0 else y.long()


def _model_cond(cond: dict[str, Any], key: str, pass_label: bool) -> dict[str, Any]:
    return cond if pass_label else {k: v for k, v in cond.items() if k != key}


def calibrated_log_likelihood(logits: Tensor, y: Tensor, tau1: float = 1.0, tau2: float = 1.0) -> Tensor:
    """EluCD's two-temperature log-likelihood ``log p~(y|x) = tau1 f_y(x) - log sum_k exp(tau2 f_k(x))`` of
    ``logits (B, K)`` at classes ``y (B,)``, shape ``(B,)``; ``tau1 = tau2 = 1`` is ``log_softmax``."""
    return tau1 * logits.gather(1, y[:, None].to(logits.device))[:, 0] - torch.logsumexp(tau2 * logits, dim=1)


def _grad(fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """``grad_x sum(fn(x))`` at a detached copy of ``x`` (grad mode on even inside ``no_grad``)."""
    with torch.enable_grad():
        xd = x.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(fn(xd).sum(), xd)
    return g


def _check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"guidance scale must be finite, got {scale}")


@dataclass(frozen=True, eq=False)
class ClassifierGuidance(_ModelWrapper):
    """Classifier guidance with a noise-aware classifier ``log p_phi(y | x_t, t)`` — Dhariwal & Nichol,
    "Diffusion Models Beat GANs on Image Synthesis", NeurIPS 2021, arXiv 2105.05233 (Alg. 1/2; the score
    form of Song et al. 2021, arXiv 2011.13456) — as a denoiser wrapper. With Tweedie's formula
    ``x0 = (x + sigma^2 grad log p_t(x)) / alpha``, guiding the score by ``s grad_x log p(y|x_t)`` is::

        x0_y = x0 + s (sigma_t^2 / alpha_t) grad_{x_t} log p_phi(y | x_t, t)

    (``s = 1`` with the exact posterior gives the exact class-conditional denoiser). The classifier is
    called as ``classifier(x_t, t)``; wrap a clean classifier as ``lambda x, t: clf(x)`` for EluCD's naive
    baseline. The target class is ``cond[key]``; unless ``pass_label`` it is removed before the model is
    called (a class-conditional dpmlab UNet then runs as its null class, the unconditional model)."""

    model: DenoiserFn
    classifier: Callable[[Tensor, Tensor], Tensor]  # (x_t (B, ...), t (B,)) -> logits (B, K)
    scale: float = 1.0  # s; 0 returns the model's x0 unchanged
    key: str = "label"  # the condition keyword holding the target class
    pass_label: bool = False  # also give the target to the model (class-conditional model + classifier)

    def __post_init__(self) -> None:
        _check_scale(self.scale)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        y = _target(cond, self.key, x.shape[0], x.device)
        x0 = self.model(x, t, **_model_cond(cond, self.key, self.pass_label))
        if self.scale == 0.0:
            return x0
        g = _grad(lambda xx: torch.log_softmax(self.classifier(xx, t), dim=1).gather(1, y[:, None]), x)
        a, s = (append_dims(v, x.ndim).to(x0.dtype) for v in (self.schedule.alpha(t), self.schedule.sigma(t)))
        return x0 + (self.scale * s * s / a) * g.to(x0.dtype)


def classifier_guidance(
    model: DenoiserFn, classifier: Callable[[Tensor, Tensor], Tensor], scale: float = 1.0, *, key: str = "label"
) -> ClassifierGuidance:
    """Guide ``model`` with the noise-aware ``classifier(x_t, t) -> logits`` at ``scale`` (class in ``cond[key]``)."""
    return ClassifierGuidance(model, classifier, scale, key=key)


def diffusion_rate(schedule: Any, t: Tensor) -> Tensor:
    """``g(t)^2 = d sigma^2/dt - 2 (d log alpha/dt) sigma^2``, the forward SDE's squared diffusion
    coefficient (``beta(t)`` on VP schedules); a DDPM step of length ``dt`` has variance ``~ g^2 dt``."""
    t = f64(t)
    da, ds = schedule.dalpha_dsigma_dt(t)
    a, s = schedule.alpha(t), schedule.sigma(t)
    return 2 * s * ds - 2 * (da / a) * s * s


@dataclass(frozen=True, eq=False)
class OffTheShelfGuidance(_ModelWrapper):
    """EluCD: guidance by an off-the-shelf *clean-data* classifier — Ma, Hu, Wang & Sun, "Elucidating The
    Design Space of Classifier-Guided Diffusion Generation", ICLR 2024, arXiv 2310.11311 (authors' code
    ``AlexMaOLS/EluCD`` @0b79a4e: ``DDPM/scripts/classifier_sample.py::design_cond_fn``,
    ``gaussian_diffusion.py::p_sample``, ``EDM/generate.py::edm_sampler``). Per call::

        x0  = D(x_t, t)                                                  the model's data prediction
        g   = grad_{x0} [tau1 f_y(x0) - log sum_k exp(tau2 f_k(x0))]     at the *detached* x0 (no backprop
                                                                          through the diffusion network)
        w(t) = 1 + gamma sin(pi u) g2_max / g2(t),  u = (t - t_min)/(t_max - t_min)
        x0_y = x0 + s w(t) (sigma^2 / alpha) g                           (score shift s w g)

    The authors shift the DDPM mean by ``(Sigma_t + gamma sin(pi t/T) max Sigma) s g``; a mean shift
    ``Sigma_t g`` is the score shift ``g``, and with ``Sigma_t ~ g2(t) dt`` (``diffusion_rate``) their sin
    term is the score weight above, independent of the step size — so any dpmlab solver can use it.
    ``rescale`` (the EDM variant's per-sample normalisation) replaces ``g`` by ``g / (rms(g) sigma_t)``:
    the implied eps then moves by exactly ``s w(t)`` in RMS per sample.

    Deviations: (i) a wrapper of x0 for every solver instead of a DDPM mean shift; ``max Sigma`` is
    ``g2_max`` over the schedule's whole range (theirs: the running maximum of the variances seen, the
    same for increasing ``beta``). (ii) The EDM code evaluates the classifier on ``x_t`` normalised to
    unit RMS, adds ``rms(x_t) g_i`` with a linearly decaying ``g_i`` to ``x`` before each Heun step; we
    keep the x0 input and the sin weight and make the normalisation step-size independent. (iii) The
    ReLU -> Softplus swap is a separate function (``softplus_classifier``); ``elucd`` applies it.
    Paper defaults (DDPM, ImageNet 128): ``s = 1, tau1 = 1, tau2 = 0.5, gamma = 0.3, beta = 3``."""

    model: DenoiserFn
    classifier: Callable[[Tensor], Tensor]  # clean data x0 (B, ...) -> logits (B, K)
    scale: float = 1.0  # s (the authors' classifier_scale); 0 returns the model's x0 unchanged
    tau1: float = 1.0  # joint temperature (joint_temperature)
    tau2: float = 0.5  # marginal temperature (tau1 * margin_temperature_discount 0.5); 0: logit only
    gamma: float = 0.3  # sin-schedule amplitude (gamma_factor); 0: constant weight
    rescale: bool = False  # per-sample unit-RMS gradient, eps moved by s w(t) in RMS (EDM variant)
    key: str = "label"  # the condition keyword holding the target class
    pass_label: bool = False  # also give the target to the model

    def __post_init__(self) -> None:
        _check_scale(self.scale)
        for name in ("tau1", "tau2", "gamma"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {v}")
        sch = getattr(self.model, "schedule", None)
        if sch is None:
            raise ValueError(f"EluCD needs the model's noise schedule; {type(self.model).__name__} has no .schedule")
        dense = torch.linspace(float(sch.t_min), float(sch.t_max), 1001, dtype=torch.float64)
        object.__setattr__(self, "_g2_max", float(diffusion_rate(sch, dense).max()))

    def weight(self, t: Tensor) -> Tensor:
        """The guidance schedule ``w(t) = 1 + gamma sin(pi u) g2_max / g2(t)`` at ``t (B,)`` (float64)."""
        t = f64(t)
        if self.gamma == 0.0:
            return torch.ones_like(t)
        sch = self.schedule
        u = ((t - float(sch.t_min)) / (float(sch.t_max) - float(sch.t_min))).clamp(0.0, 1.0)
        return 1.0 + self.gamma * torch.sin(math.pi * u).clamp(min=0.0) * self._g2_max / diffusion_rate(sch, t)  # type: ignore[attr-defined]

    def log_likelihood(self, x0: Tensor, y: Tensor) -> Tensor:
        """``log p~(y | x0)`` with the two temperatures, ``(B,)``."""
        return calibrated_log_likelihood(self.classifier(x0), y, self.tau1, self.tau2)

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        y = _target(cond, self.key, x.shape[0], x.device)
        x0 = self.model(x, t, **_model_cond(cond, self.key, self.pass_label))
        if self.scale == 0.0:
            return x0
        dt = next((p.dtype for p in getattr(self.classifier, "parameters", list)()), x0.dtype)
        g = _grad(lambda z: self.log_likelihood(z, y), x0.to(dt)).to(x0.dtype)  # grad wrt the detached x0
        t64 = f64(t, device=x.device).expand(x.shape[0])
        a, s = (append_dims(v, x.ndim).to(x0.dtype) for v in (self.schedule.alpha(t64), self.schedule.sigma(t64)))
        w = append_dims(self.weight(t64), x.ndim).to(x0.dtype)
        if self.rescale:  # per-sample unit RMS, divided by sigma: eps moves by s w(t) in RMS
            rms = g.pow(2).mean(dim=tuple(range(1, g.ndim)), keepdim=True).sqrt()
            return x0 + (self.scale * w * s / a) * g / rms.clamp(min=torch.finfo(g.dtype).tiny)
        return x0 + (self.scale * w * s * s / a) * g


def softplus_classifier(classifier: nn.Module, beta: float = 3.0) -> nn.Module:
    """A copy of ``classifier`` with every ReLU — ``nn.ReLU`` modules and ``F.relu`` / ``torch.relu`` /
    ``.relu()`` calls — replaced by ``Softplus(beta)`` (EluCD Sec. 4; their code swaps the ResNet's
    ``nn.ReLU`` modules): same parameters (copied), same modules otherwise. Traced with ``torch.fx``;
    a classifier it cannot trace is refused. ``beta -> inf`` recovers ReLU."""
    import copy

    import torch.fx as fx
    import torch.nn.functional as F

    if not (isinstance(beta, int | float) and 0 < beta < math.inf):
        raise ValueError(f"softplus beta must be a positive finite number, got {beta!r}")
    try:
        gm = fx.symbolic_trace(copy.deepcopy(classifier))
    except Exception as e:  # fx raises several error types for untraceable control flow
        raise ValueError(f"cannot trace {type(classifier).__name__} with torch.fx to swap its ReLUs ({e})") from None
    relus = {F.relu, torch.relu, torch.relu_, F.relu_}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.ReLU):
            parent, _, name = node.target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, name, nn.Softplus(beta=float(beta)))
        elif (node.op == "call_function" and node.target in relus) or (
            node.op == "call_method" and node.target in ("relu", "relu_")
        ):
            node.op, node.target, node.args, node.kwargs = "call_function", F.softplus, node.args[:1], {"beta": beta}
    gm.recompile()
    return gm.train(classifier.training)


def elucd(
    model: DenoiserFn,
    classifier: nn.Module,
    scale: float = 1.0,
    *,
    beta: float | None = 3.0,
    tau1: float = 1.0,
    tau2: float = 0.5,
    gamma: float = 0.3,
    rescale: bool = False,
    key: str = "label",
) -> OffTheShelfGuidance:
    """EluCD with the paper's DDPM defaults: ``classifier`` with its ReLUs swapped for ``Softplus(beta)``
    (``beta=None`` keeps ReLU), two temperatures, the sin schedule; see ``OffTheShelfGuidance``."""
    clf = softplus_classifier(classifier, beta) if beta is not None else classifier
    return OffTheShelfGuidance(model, clf, scale, tau1, tau2, gamma, rescale, key)


__all__ += [
    "ClassifierGuidance",
    "classifier_guidance",
    "OffTheShelfGuidance",
    "elucd",
    "softplus_classifier",
    "calibrated_log_likelihood",
    "diffusion_rate",
]


# --- calibration of a classifier on x0(x_t) --------------------------------------------------------
def expected_calibration_error(probs: Tensor, labels: Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017, arXiv 1706.04599, eq. 3): ``sum_b |B_b|/N |acc(B_b) - conf(B_b)|`` over
    ``n_bins`` equal-width confidence bins of ``probs (N, K)`` against ``labels (N,)``."""
    if probs.ndim != 2 or labels.shape != (probs.shape[0],):
        raise ValueError(f"need probs (N, K) and labels (N,), got {tuple(probs.shape)} and {tuple(labels.shape)}")
    if not (isinstance(n_bins, int) and n_bins >= 1):
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    conf, pred = probs.max(dim=1)
    correct = (pred == labels.to(pred.device)).double()
    bins = (conf.double() * n_bins).long().clamp(0, n_bins - 1)  # (N,) bin of each confidence
    count = torch.bincount(bins, minlength=n_bins).double()
    gap = torch.bincount(bins, weights=correct - conf.double(), minlength=n_bins).abs()
    return float(gap.sum() / max(1, probs.shape[0])) if count.sum() > 0 else 0.0


@dataclass(frozen=True)
class CalibrationCurve:
    """A classifier's calibration on ``x0(x_t)`` (or on ``x_t``) at the times ``ts``."""

    ts: Tensor  # (T,) float64
    ece: Tensor  # (T,) expected calibration error
    accuracy: Tensor  # (T,)
    confidence: Tensor  # (T,) mean max-probability


def calibration_vs_t(
    model: DenoiserFn,
    classifier: Callable[[Tensor], Tensor],
    x0: Tensor,
    labels: Tensor,
    ts: Tensor,
    *,
    denoise: bool = True,
    n_bins: int = 15,
    seed: int = 0,
    batch_size: int = 500,
) -> CalibrationCurve:
    """ECE, accuracy and confidence of ``softmax(classifier(x))`` against ``labels (N,)`` where ``x`` is
    ``model(x_t, t)`` (``denoise``; EluCD's x0 input) or ``x_t`` itself, ``x_t = alpha x0 + sigma eps``
    with ``eps`` seeded per sample by ``(seed, index, time index)``. Pass e.g. ``lambda x: clf(x) / T``
    to measure a temperature-scaled classifier."""
    sch = model.schedule  # type: ignore[attr-defined]
    ts = f64(ts).reshape(-1)
    idx = torch.arange(x0.shape[0])
    ece, acc, conf = [], [], []
    for k, t in enumerate(ts):
        eps = counter_normal(seed, idx, k, x0.shape[1:], dtype=x0.dtype, device=x0.device)
        xt = sch.add_noise(x0, eps, t)
        probs = []
        with torch.no_grad():
            for lo in range(0, x0.shape[0], batch_size):
                xb = xt[lo : lo + batch_size]
                inp = model(xb, t.expand(xb.shape[0])) if denoise else xb
                probs.append(torch.softmax(classifier(inp).double(), dim=1))
        p = torch.cat(probs)
        ece.append(expected_calibration_error(p, labels, n_bins))
        acc.append(float((p.argmax(1) == labels.to(p.device)).double().mean()))
        conf.append(float(p.max(1).values.mean()))
    return CalibrationCurve(ts, *(torch.tensor(v, dtype=torch.float64) for v in (ece, acc, conf)))


__all__ += ["expected_calibration_error", "CalibrationCurve", "calibration_vs_t"]
