"""BoundaryDiffusion: learning-free semantic control of a frozen (unconditional) diffusion model by
crossing a linear semantic boundary at the mixing step — Zhu, Wu, Deng, Russakovsky & Yan, "Boundary
Guided Learning-Free Semantic Control with Diffusion Models", NeurIPS 2023, arXiv 2302.08357 (authors'
code ``L-YeZhu/BoundaryDiffusion`` @98c8289: ``boundarydiffusion.py::boundary_search``,
``edit_image_boundary``, ``unconditional``, ``radius``; ``utils/diffusion_utils.py::denoising_step``).

1. ``invert_to``: DDIM inversion (``invert``, any deterministic solver) of labelled images from the data
   to the mixing step ``t0``; the z-space latent ``z = x_{t0}`` and the h-space feature ``h``, the UNet's
   bottleneck output at ``(z, t0)`` (``bottleneck``: dpmlab ``UNet.hooks`` or a forward hook on a
   diffusers UNet's ``mid_block``).
2. ``fit_boundary``: a linear SVM (``sklearn.svm.SVC(kernel="linear")``, as the authors) per space;
   ``w . x + b = 0`` with unit normal ``n = w / |w|`` pointing to label 1; held-out accuracy.
3. ``boundary_edit``: move each latent onto the parallel plane at signed distance ``d``:
   ``x' = x + (d - dist(x)) n``, ``dist(x) = n . x + b / |w|`` — in z and in h (each with its own
   boundary) — and regenerate from ``t0`` with ``z'``, the bottleneck replaced by ``h'`` in the first
   network call. ``sample_to`` gives the latents of fresh noise: unconditional control.
4. ``mixing_profile`` / ``MixingProfile.mixing_step``: the automatic mixing-step search, read as the
   paper's comparison of inverted latents with the Gaussian: the mean radius ``|x_t| / sqrt(D)`` of
   inverted latents against the radius of the forward marginal ``sqrt(alpha^2 E|x0|^2 / D + sigma^2)``
   (the radius of sampled latents under a perfect model; ``sqrt(D)``, the Gaussian's, at ``t_max``);
   ``t0`` is the earliest time from which the relative gap stays below a tolerance (``mixing_step``), or,
   where the inverted latents never reach the Gaussian radius, from which their radius has stopped
   changing (``plateau_step``).

Deviations from the authors' code: (i) the signed distance includes the SVM intercept (theirs is
``n . x``, the distance to the parallel plane through the origin), so ``d = 0`` is the decision boundary.
(ii) ``h`` is the bottleneck at ``(z, t0)`` (one extra evaluation); theirs is the one of the last
inversion step's evaluation, at the grid point before ``t0``. (iii) They regenerate edits with
stochastic DDIM (eta = 1) and the reconstruction with eta = 0; we regenerate both with the caller's
solver (deterministic DDIM by default), so "no edit" reproduces the reconstruction and the effect of an
edit is not mixed with fresh noise. (iv) Their edited h is used in the first generative call only (the
returned un-edited ``mid_h`` is fed back after it), which we do explicitly. (v) Their radius routine
measures sampled latents at one fixed step; the tolerance rule for ``t0`` is ours.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._utils import f64
from ..models.unet import UNet
from ..solvers.base import Problem, Solver, StepInfo, get, sample
from ..timesteps import uniform_time
from .inversion import invert

__all__ = [
    "Boundary",
    "fit_boundary",
    "Latents",
    "bottleneck",
    "invert_to",
    "sample_to",
    "boundary_edit",
    "MixingProfile",
    "mixing_profile",
]


# --- the h-space through hooks -----------------------------------------------------------------------
@contextlib.contextmanager
def bottleneck(network: nn.Module, replace: Tensor | None = None) -> Iterator[list[Tensor]]:
    """Within the block, record the bottleneck ("h-space", Kwon et al. 2023) output of each network call
    in the yielded list, and, given ``replace (B, C, H, W)``, use it instead in the *first* call only.
    ``network``: a dpmlab ``UNet`` (its ``hooks``) or a diffusers UNet (a forward hook on ``mid_block``)."""
    captured: list[Tensor] = []

    def swap(h: Tensor) -> Tensor:
        captured.append(h.detach())
        if replace is None or len(captured) > 1:
            return h
        if replace.shape != h.shape:
            raise ValueError(f"replacement h has shape {tuple(replace.shape)}, the bottleneck {tuple(h.shape)}")
        return replace.to(h)

    if isinstance(network, UNet):
        with network.hooks(bottleneck=lambda h, emb: swap(h)):
            yield captured
    elif isinstance(getattr(network, "mid_block", None), nn.Module):
        handle = network.mid_block.register_forward_hook(lambda module, inp, out: swap(out))  # type: ignore[union-attr]
        try:
            yield captured
        finally:
            handle.remove()
    else:
        raise ValueError(
            f"no h-space in {type(network).__name__}: need a dpmlab UNet or a diffusers UNet "
            "with a mid_block (pass network=)"
        )


def _network(model: Any, network: nn.Module | None) -> nn.Module:
    """``network``, else the UNet found by following ``.net`` / ``.model`` through denoiser wrappers."""
    if network is not None:
        return network
    m = model
    for _ in range(8):
        if isinstance(m, UNet) or isinstance(getattr(m, "mid_block", None), nn.Module):
            return m  # type: ignore[no-any-return]
        m = getattr(m, "net", None) or getattr(m, "model", None)
        if m is None:
            break
    raise ValueError(f"cannot find a UNet inside {type(model).__name__}; pass network= (the UNet)")


# --- boundaries -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Boundary:
    """A hyperplane ``n . x + offset = 0`` in a latent space of shape ``shape``; ``n`` is a unit vector."""

    normal: Tensor  # (D,) float64, unit length, pointing to label 1
    offset: float  # b / |w|
    shape: tuple[int, ...]  # the latent's shape without the batch dimension
    train_accuracy: float
    test_accuracy: float  # nan without a held-out set

    def __post_init__(self) -> None:
        object.__setattr__(self, "normal", f64(self.normal).reshape(-1))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.normal.numel() != math.prod(self.shape) or abs(float(self.normal.norm()) - 1) > 1e-9:
            raise ValueError(f"normal must be a unit vector of {math.prod(self.shape)} entries for shape {self.shape}")

    def _flat(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"latents must have shape (B, {', '.join(map(str, self.shape))}), got {tuple(x.shape)}")
        return x.reshape(x.shape[0], -1)

    def distance(self, x: Tensor) -> Tensor:
        """Signed distances ``(B,)`` (float64) of latents ``x (B, *shape)`` to the plane."""
        return f64(self._flat(x)) @ self.normal.to(x.device) + self.offset

    def move(self, x: Tensor, d: float | Tensor) -> Tensor:
        """``x + (d - dist(x)) n``: each latent moved along the normal onto the plane at signed distance ``d``
        (a number or ``(B,)``)."""
        shift = f64(d, device=x.device) - self.distance(x)  # (B,)
        return x + (shift[:, None] * self.normal.to(x.device)[None]).reshape(x.shape).to(x.dtype)


def fit_boundary(
    latents: Tensor, labels: Tensor, test: tuple[Tensor, Tensor] | None = None, *, C: float = 1.0
) -> Boundary:
    """Linear SVM (``SVC(kernel="linear", C=C)``) separating ``latents (N, ...)`` by binary ``labels (N,)``
    (0/1); held-out accuracy on ``test = (latents, labels)`` when given."""
    from sklearn.svm import SVC

    y = torch.as_tensor(labels).reshape(-1)
    if y.shape[0] != latents.shape[0] or y.dtype.is_floating_point or not set(y.tolist()) == {0, 1}:
        raise ValueError(
            f"labels must be {latents.shape[0]} ints with both classes 0 and 1, got values "
            f"{sorted(set(y.tolist()))[:5]}"
        )
    x = f64(latents).reshape(latents.shape[0], -1).cpu().numpy()
    svm = SVC(kernel="linear", C=C).fit(x, y.cpu().numpy())
    w, b = torch.tensor(svm.coef_[0], dtype=torch.float64), float(svm.intercept_[0])
    norm = float(w.norm())
    if norm == 0.0:
        raise ValueError("the SVM found no separating direction (zero weight vector)")
    test_acc = math.nan
    if test is not None:
        xt, yt = test
        test_acc = float(
            (svm.predict(f64(xt).reshape(xt.shape[0], -1).cpu().numpy()) == torch.as_tensor(yt).cpu().numpy()).mean()
        )
    return Boundary(w / norm, b / norm, tuple(latents.shape[1:]), float(svm.score(x, y.cpu().numpy())), test_acc)


# --- latents at the mixing step ----------------------------------------------------------------------
@dataclass(frozen=True)
class Latents:
    """Latents at the mixing step ``t0``: ``z = x_{t0}`` and the bottleneck ``h`` of the network at ``(z, t0)``."""

    z: Tensor  # (B, *data_shape)
    h: Tensor  # (B, C, H, W)
    t0: float


def _h_at(problem: Problem, z: Tensor, t0: float, network: nn.Module) -> Tensor:
    with bottleneck(network) as cap, torch.no_grad():
        problem.denoise(z, t0)
    return cap[0]


def _solver(solver: Solver[Any] | None) -> Solver[Any]:
    return solver if solver is not None else get("ddim")


def invert_to(
    problem: Problem,
    x0: Tensor,
    t0: float,
    steps: int = 40,
    *,
    solver: Solver[Any] | None = None,
    network: nn.Module | None = None,
) -> Latents:
    """DDIM-invert ``x0 (B, ...)`` from ``t_min`` to ``t0`` in ``steps`` uniform-time steps (the authors'
    ``n_inv_step = 40``) with the deterministic ``solver`` (default DDIM); ``steps + 1`` evaluations."""
    ts = uniform_time(problem.schedule, steps, t_start=t0)
    z = invert(problem, x0, ts, _solver(solver))
    return Latents(z, _h_at(problem, z, float(t0), _network(problem.model, network)), float(t0))


def sample_to(
    problem: Problem,
    x_T: Tensor,  # noqa: N803 (the paper's name)
    t0: float,
    steps: int = 40,
    *,
    solver: Solver[Any] | None = None,
    network: nn.Module | None = None,
) -> Latents:
    """Latents of fresh samples: ``x_T`` at ``t_max`` sampled down to ``t0`` (unconditional control)."""
    ts = uniform_time(problem.schedule, steps, t_end=t0)
    z = sample(problem, x_T, ts, _solver(solver))
    return Latents(z, _h_at(problem, z, float(t0), _network(problem.model, network)), float(t0))


def boundary_edit(
    problem: Problem,
    latents: Latents,
    distance: float | Tensor,
    *,
    z_boundary: Boundary | None,
    h_boundary: Boundary | None,
    h_distance: float | Tensor | None = None,
    steps: int = 40,
    solver: Solver[Any] | None = None,
    network: nn.Module | None = None,
) -> Tensor:
    """Move ``z`` (and ``h``) onto the planes at signed distance ``distance`` (``h_distance`` for h when
    given; the authors use one ``d`` for both) of their boundaries (``None`` leaves that space unedited)
    and generate from ``t0`` to ``t_min`` in ``steps`` uniform-time steps with the edited ``h`` in the
    first network call. No boundary at all regenerates the unedited latents."""
    z = latents.z if z_boundary is None else z_boundary.move(latents.z, distance)
    h_d = distance if h_distance is None else h_distance
    h = None if h_boundary is None else h_boundary.move(latents.h, h_d)
    ts = uniform_time(problem.schedule, steps, t_start=latents.t0)
    with bottleneck(_network(problem.model, network), replace=h):
        return sample(problem, z, ts, _solver(solver))


# --- the mixing step ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MixingProfile:
    """Radii ``|x_t| / sqrt(D)`` (batch means) of inverted latents and of the forward marginal, by time."""

    ts: Tensor  # (K,) increasing, float64
    radius: Tensor  # (K,) inverted latents
    radius_forward: Tensor  # (K,) sqrt(alpha^2 E|x0|^2 / D + sigma^2)

    @property
    def gap(self) -> Tensor:
        """Relative radius gap ``|radius - radius_forward| / radius_forward``, ``(K,)``."""
        return (self.radius - self.radius_forward).abs() / self.radius_forward

    @property
    def change(self) -> Tensor:
        """Relative change ``|radius - radius[t_max]| / radius[t_max]`` of the inverted radius, ``(K,)``."""
        return (self.radius - self.radius[-1]).abs() / self.radius[-1]

    def mixing_step(self, tol: float = 0.05) -> float:
        """The earliest time from which the gap to the forward radius stays ``<= tol`` up to ``t_max`` (nan
        if it never does: the inverted latents never look Gaussian)."""
        return self._earliest(self.gap, tol)

    def plateau_step(self, tol: float = 0.01) -> float:
        """The earliest time from which the inverted radius stays within ``tol`` (relative) of its value at
        ``t_max``: the inversion has converged ("mixed") even where its latents are not Gaussian."""
        return self._earliest(self.change, tol)

    def _earliest(self, gap: Tensor, tol: float) -> float:
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        ok = (gap <= tol).tolist()
        if not ok[-1]:
            return math.nan
        k = len(ok) - 1
        while k > 0 and ok[k - 1]:
            k -= 1
        return float(self.ts[k])


def mixing_profile(problem: Problem, x0: Tensor, ts: Tensor, solver: Solver[Any] | None = None) -> MixingProfile:
    """Invert ``x0 (B, ...)`` along the decreasing grid ``ts`` (data at ``ts[-1]``) and record the radius of
    the inverted latents at every grid time, beside the forward marginal's radius."""
    d = math.prod(x0.shape[1:])
    rad: list[float] = [float(f64(x0).reshape(x0.shape[0], -1).norm(dim=1).mean()) / math.sqrt(d)]
    times: list[float] = [float(f64(ts)[-1])]

    def record(info: StepInfo) -> None:
        rad.append(float(f64(info.x).reshape(x0.shape[0], -1).norm(dim=1).mean()) / math.sqrt(d))
        times.append(info.t_next)

    invert(problem, x0, ts, _solver(solver), callback=record)
    t = f64(times)
    m2 = float(f64(x0).pow(2).sum() / x0.shape[0]) / d  # E|x0|^2 / D
    sch = problem.schedule
    fwd = torch.sqrt(sch.alpha(t) ** 2 * m2 + sch.sigma(t) ** 2)
    return MixingProfile(t, f64(rad), fwd)
