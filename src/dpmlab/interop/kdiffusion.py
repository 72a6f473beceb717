"""k-diffusion interop (k-diffusion itself is never imported).

k-diffusion's world is the EDM parameterisation: state ``x = x0 + sigma * eps`` (``alpha = 1``), a
denoiser ``model(x, sigma, **extra_args) -> x0`` and samplers with the signature::

    sample_<name>(model, x, sigmas, extra_args=None, callback=None, disable=None, **options)

where ``sigmas`` is decreasing and usually ends with 0. Here every registered dpmlab solver is
available under that signature (``sample_ddim``, ``sample_heun``, ``sample_dpm_solver_pp``, ...;
``options`` are the dpmlab solver's options, plus ``noise_sampler(sigma, sigma_next)`` as in
k-diffusion), and a k-diffusion denoiser becomes a dpmlab ``Denoiser`` with
``denoiser_from_kdiffusion``. On the EDM schedule continuous time *is* sigma, so the grid is the
sigmas themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from .._utils import f64
from ..models.denoiser import Denoiser, Prediction
from ..schedules import EDM
from ..solvers.base import Problem, StepInfo, available, get, sample

__all__ = ["denoiser_from_kdiffusion", "sampler", "edm_schedule_for"]

KDenoiser = Callable[..., Tensor]


def edm_schedule_for(sigmas: Tensor) -> EDM:
    """An EDM schedule whose range covers ``sigmas`` (its positive part)."""
    s = f64(sigmas)
    pos = s[s > 0]
    if pos.numel() == 0:
        raise ValueError("sigmas must contain positive noise levels")
    return EDM(sigma_min=float(pos.min()), sigma_max=float(pos.max()))


def denoiser_from_kdiffusion(model: KDenoiser, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Denoiser:
    """A k-diffusion denoiser ``model(x, sigma, **cond) -> x0`` as a dpmlab ``Denoiser`` on EDM."""
    return Denoiser(model, EDM(sigma_min=sigma_min, sigma_max=sigma_max), Prediction.X0)


class _NoiseFromKSampler:
    """Adapts k-diffusion's ``noise_sampler(sigma, sigma_next)`` to dpmlab's ``noise(stream, like)``."""

    def __init__(self, fn: Callable[[Tensor, Tensor], Tensor], sigmas: Tensor) -> None:
        self.fn, self.sigmas = fn, sigmas

    def __call__(self, stream: int, like: Tensor) -> Tensor:
        i = (stream - 1) // 16  # Problem.randn's stream layout: 1 + 16 * step + sub
        return self.fn(self.sigmas[i], self.sigmas[i + 1]).to(like)


def sampler(name: str) -> Callable[..., Tensor]:
    """The k-diffusion-signature sampler running the dpmlab solver ``name``."""
    get(name)  # validates the name now, with the registry's error message

    def sample_fn(
        model: KDenoiser,
        x: Tensor,
        sigmas: Tensor,
        extra_args: Mapping[str, Any] | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None,
        disable: bool | None = None,
        noise_sampler: Callable[[Tensor, Tensor], Tensor] | None = None,
        **options: Any,
    ) -> Tensor:
        solver = get(name, **options)
        sch = edm_schedule_for(sigmas)
        last: dict[str, Tensor] = {}

        def x0_fn(x: Tensor, t: Tensor, **cond: Any) -> Tensor:  # parameter names as in DenoiserFn
            sigma = t.to(x.dtype)
            out = model(x, sigma, **cond)
            last["denoised"] = out
            return out

        noise = _NoiseFromKSampler(noise_sampler, sigmas) if noise_sampler is not None else None
        problem = Problem(x0_fn, sch, noise=noise, cond=dict(extra_args or {}))

        def cb(info: StepInfo) -> None:
            if callback is not None:
                s = sigmas[info.i]
                callback({"x": info.x, "i": info.i, "sigma": s, "sigma_hat": s, "denoised": last.get("denoised")})

        return sample(problem, x, f64(sigmas).cpu(), solver, callback=cb).to(x.dtype)

    sample_fn.__name__ = f"sample_{name}"
    sample_fn.__doc__ = f"dpmlab solver {name!r} with k-diffusion's sampler signature."
    return sample_fn


def __getattr__(attr: str) -> Callable[..., Tensor]:
    if attr.startswith("sample_") and attr[len("sample_") :] in available():
        return sampler(attr[len("sample_") :])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + [f"sample_{n}" for n in available()])
