"""Inversion of real data into a sampler's latent space: DDIM (ODE) inversion and edit-friendly DDPM
inversion, with regeneration and editing from the inverted latents.

* ``invert`` — DDIM inversion: Song, Meng & Ermon, "Denoising Diffusion Implicit Models", ICLR 2021,
  arXiv 2010.02502 (Sec. 4.3: the ODE of eq. 14 run from data to noise; Sec. 5.4: reconstruction).
  Any deterministic dpmlab solver is stepped along the *reversed* grid through the
  public ``init``/``step`` protocol. The exponential-integrator updates (DDIM, DPM-Solver(++), UniPC,
  DEIS, PNDM, v3, ...) are exact-in-the-linear-part formulas of ``h = lam_next - lam`` valid for either
  sign of ``h``, and the multistep ones use step ratios ``r = h_prev / h > 0`` on a monotone grid; their
  orders hold on increasing grids (tested against a float64 reference ODE solve). Stochastic solvers
  are refused. The map is the inverse of sampling only up to the discretisation error, so
  ``sample(invert(x0))`` is not ``x0``; the error is measured, not assumed away.
* ``invert_ddpm`` / ``regenerate`` / ``edit`` — Huberman-Spiegelglas, Kulikov & Michaeli, "An Edit
  Friendly DDPM Noise Space: Inversion and Manipulations", CVPR 2024, arXiv 2304.06140 (authors' code
  ``inbarhub/DDPM_inversion`` @58fc881, ``inversion_forward_process`` / ``inversion_reverse_process``).
  Subscripts are grid indices on ``ts[0] > ... > ts[N]``: ``x_i`` is the state at ``ts[i]``, the data
  ``x0`` sits at ``ts[N]``. With the DDPM posterior (eta = 1) of the step ``i -> n = i + 1``

      mu_i(x)  = (alpha_{i|n} sigma_n^2 / sigma_i^2) x + (alpha_n sigma_{i|n}^2 / sigma_i^2) x0_hat(x, t_i)
      s_i      = sigma_n sqrt(1 - e^{-2 h}),   sigma_{i|n}^2 = sigma_i^2 (1 - e^{-2 h}),  h = lam_n - lam_i

  1. draw an *independent* noisy sequence ``x~_i = alpha_i x0 + sigma_i eps~_i`` (``eps~_i =
     problem.randn(i, x0)``, one fresh draw per grid point — not a Markov chain), ``x~_N = x0``;
  2. start at the noisiest point ``x_0 := x~_0``; for i = 0..N-1 extract ``z_i = (x~_{i+1} - mu_i(x_i))
     / s_i`` and apply the correction ``x_{i+1} = mu_i(x_i) + s_i z_i``: the next mean is taken at the
     *regenerated* state, computed by the operations regeneration performs, so regeneration retraces
     ``xs`` bit for bit (without it, rounding errors are amplified wherever the mean expands);
  3. regeneration: ``x_{i+1} = mu_i(x_i) + s_i z_i`` from ``xs[skip]`` with the stored ``z`` and any
     problem (a new condition, another guidance scale): same problem -> the data back exactly.
  Classifier-free guidance is part of the problem's model (``edit`` builds ``classifier_free`` with the
  source scale for inversion and the target scale for generation, the authors' ``cfg_src`` / ``cfg_tar``).

Deviations from the authors' code: (i) the grid must end at ``sigma > 0``; ``x0`` is the state at
``ts[-1]`` (they place it at ``final_alpha_cumprod``, ``alpha_bar[0]`` for Stable Diffusion); a last
step to ``sigma = 0`` has ``s = 0`` and no noise to store, so it is refused rather than approximated.
(ii) They zero the last step's noise after extracting it (``zs[0] = 0``), which makes their
reconstruction inexact by ``s_1 z_1``; we keep it, so the reconstruction is exact. (iii) eta is fixed
at 1 (the paper's DDPM; their code's eta option is not exposed). (iv) The mean is the DDPM posterior
in alpha/sigma form on any schedule and grid, identical to their DDIM(eta = 1) form.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .._utils import f64, state_dtype
from ..models.guidance import Unconditional, classifier_free
from ..models.hub import write_safetensors
from ..solvers.base import Problem, SeededNoise, Solver, StepInfo, sample
from ..solvers.ddpm import posterior as ddpm_posterior
from ..timesteps import check_grid
from ..typing import DenoiserFn

__all__ = ["invert", "DDPMInversion", "invert_ddpm", "regenerate", "edit", "guided"]

_FORMAT = "dpmlab.DDPMInversion/1"  # safetensors metadata tag


def _check(problem: Problem, x0: Tensor, ts: Tensor) -> Tensor:
    """Validate ``x0 (B, *data_shape)`` and a decreasing grid ending at ``sigma > 0``; the grid in float64."""
    ts = check_grid(ts, problem.schedule, decreasing=True)
    if float(problem.schedule.sigma(ts[-1])) == 0.0:
        raise ValueError(
            f"the grid ends at t={float(ts[-1]):g} where sigma = 0; inversion starts from the data at the grid's "
            f"last time, which needs sigma > 0 (end it at the schedule's t_min={problem.schedule.t_min:g})"
        )
    shape = getattr(problem.model, "data_shape", None)
    if not isinstance(x0, Tensor) or x0.ndim < 2 or (shape is not None and tuple(x0.shape[1:]) != tuple(shape)):
        want = f"(B, {', '.join(map(str, shape))})" if shape is not None else "(B, ...)"
        raise ValueError(f"x0 must have shape {want}, got {tuple(getattr(x0, 'shape', ())) or type(x0).__name__}")
    return ts


# --- DDIM inversion --------------------------------------------------------------------------------
def invert(
    problem: Problem, x0: Tensor, ts: Tensor, solver: Solver[Any], *, callback: Callable[[StepInfo], None] | None = None
) -> Tensor:
    """DDIM inversion: ``x0 (B, ...)`` at ``ts[-1]`` carried to ``ts[0]`` by the deterministic ``solver``
    run along the reversed grid. ``ts`` is given decreasing, as for sampling the result back."""
    if solver.is_stochastic():
        raise ValueError(
            f"inversion needs a deterministic solver; {solver.config()} is stochastic (use e.g. ddim with eta=0, "
            "dpm_solver_pp or unipc)"
        )
    ts = _check(problem, x0, ts)
    return sample(problem, x0, ts.flip(0), solver, callback=callback)


# --- edit-friendly DDPM inversion ---------------------------------------------------------------------
def _posterior(problem: Problem, x: Tensor, ts: Tensor, i: int) -> tuple[Tensor, float]:
    """``(mu_i(x), s_i)``: DDPM posterior mean and std (beta-tilde) of the step ``ts[i] -> ts[i + 1]``."""
    mean, var, _ = ddpm_posterior(problem, x, ts, i)
    return mean, math.sqrt(var)


def _next(mean: Tensor, std: float, z: Tensor) -> Tensor:
    """``x_{i+1} = mu_i + s_i z_i`` — the one expression both the correction and regeneration use."""
    return mean + std * z


@dataclass(frozen=True)
class DDPMInversion:
    """An edit-friendly inversion of a batch: ``xs[i]`` the state at ``ts[i]`` (``xs[0] = x_T``, ``xs[-1]``
    the reconstruction of ``x0``), ``zs[i]`` the noise of the step ``ts[i] -> ts[i + 1]``."""

    xs: Tensor  # (N + 1, B, ...) regenerated states
    zs: Tensor  # (N, B, ...) extracted noises
    ts: Tensor  # (N + 1,) float64, strictly decreasing

    def __post_init__(self) -> None:
        object.__setattr__(self, "ts", check_grid(self.ts, decreasing=True))
        n = len(self.ts) - 1
        if self.xs.ndim < 3 or self.xs.shape[0] != n + 1 or tuple(self.zs.shape) != (n, *self.xs.shape[1:]):
            raise ValueError(
                f"an inversion on {n + 1} grid times needs xs of shape ({n + 1}, B, ...) and zs of shape "
                f"({n}, B, ...); got xs {tuple(self.xs.shape)}, zs {tuple(self.zs.shape)}"
            )

    @property
    def steps(self) -> int:
        return len(self.ts) - 1

    @property
    def x_T(self) -> Tensor:  # noqa: N802 (the paper's name)
        return self.xs[0]

    def save(self, path: str | Path) -> Path:
        """Write ``xs``, ``zs``, ``ts`` to a ``.safetensors`` file (atomically)."""
        path = Path(path)
        tensors = {"xs": self.xs.contiguous().cpu(), "zs": self.zs.contiguous().cpu(), "ts": self.ts.contiguous().cpu()}
        write_safetensors(path, tensors, {"format": _FORMAT})
        return path

    @classmethod
    def load(cls, path: str | Path) -> DDPMInversion:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta, tensors = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except Exception as e:  # safetensors raises its own error types for a bad header or truncation
            raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        if meta.get("format") != _FORMAT or set(tensors) != {"xs", "zs", "ts"}:
            raise ValueError(f"{path}: not a DDPM inversion (format {meta.get('format')!r}, tensors {sorted(tensors)})")
        return cls(tensors["xs"], tensors["zs"], tensors["ts"])


def invert_ddpm(problem: Problem, x0: Tensor, ts: Tensor) -> DDPMInversion:
    """Edit-friendly DDPM inversion of ``x0 (B, ...)`` (at ``ts[-1]``) along the decreasing grid ``ts``.
    The noisy sequence uses ``problem.randn`` (pass ``noise=SeededNoise(seed, range(B))`` for per-sample
    seeding); ``problem.model`` carries the source condition and guidance. N model evaluations."""
    ts = _check(problem, x0, ts)
    x0 = x0.to(state_dtype(x0.dtype))
    n = len(ts) - 1
    sch = problem.schedule
    noisy = [sch.add_noise(x0, problem.randn(i, x0), ts[i]) for i in range(n)] + [x0]  # x~_i, independent eps~_i
    x, xs, zs = noisy[0], [noisy[0]], []
    for i in range(n):
        mean, std = _posterior(problem, x, ts, i)
        z = (noisy[i + 1] - mean) / std  # z_i = (x~_{i+1} - mu_i(x_i)) / s_i
        x = _next(mean, std, z)  # correction: the state regeneration will reach, bit for bit
        xs.append(x)
        zs.append(z)
    return DDPMInversion(torch.stack(xs), torch.stack(zs), ts)


def regenerate(
    problem: Problem, inversion: DDPMInversion, *, skip: int = 0, callback: Callable[[StepInfo], None] | None = None
) -> Tensor:
    """DDPM sampling with the stored noises from ``xs[skip]`` (time ``ts[skip]``; the authors' ``T - skip``)
    to ``ts[-1]`` under ``problem`` (e.g. a new condition). ``skip = 0`` and the inversion's problem give
    ``x0`` back; a larger ``skip`` keeps more of the source."""
    n = inversion.steps
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < n:
        raise ValueError(f"skip must be an int in [0, {n - 1}] for an inversion of {n} steps, got {skip!r}")
    ts = check_grid(inversion.ts, problem.schedule, decreasing=True)
    x = inversion.xs[skip]
    for i in range(skip, n):
        mean, std = _posterior(problem, x, ts, i)
        x = _next(mean, std, inversion.zs[i].to(x))
        if callback is not None:
            callback(StepInfo(i=i, t=float(ts[i]), t_next=float(ts[i + 1]), x=x, nfe=problem.nfe))
    return x


# --- convenience: guided problems and a one-call edit -----------------------------------------------
def guided(
    model: DenoiserFn, scale: float = 1.0, cond: Mapping[str, Any] | None = None, *, noise: Any = None
) -> Problem:
    """A problem on ``model.schedule`` with classifier-free guidance at ``scale`` (1: the conditional
    model, no guidance; the unconditional branch is ``model`` without its condition)."""
    sch = getattr(model, "schedule", None)
    if sch is None:
        raise ValueError("the model carries no .schedule; build the Problem yourself")
    den = model if scale == 1.0 else classifier_free(model, Unconditional(model), scale)
    return Problem(den, sch, noise=noise, cond=dict(cond or {}))


def edit(
    model: DenoiserFn,
    x0: Tensor,
    ts: Tensor,
    *,
    source: Mapping[str, Any],
    target: Mapping[str, Any],
    guidance_src: float = 3.5,
    guidance_tar: float = 15.0,
    skip: int = 0,
    seed: int = 0,
) -> tuple[Tensor, DDPMInversion]:
    """Edit ``x0`` from condition ``source`` to ``target`` (e.g. ``{"label": y}``): edit-friendly inversion
    with guidance ``guidance_src``, regeneration from ``ts[skip]`` with ``guidance_tar`` (the paper's
    defaults 3.5 / 15; its skip is 36 of 100 steps). Returns ``(edited, inversion)``."""
    noise = SeededNoise(seed, range(x0.shape[0]))
    inv = invert_ddpm(guided(model, guidance_src, source, noise=noise), x0, f64(ts))
    return regenerate(guided(model, guidance_tar, target), inv, skip=skip), inv
