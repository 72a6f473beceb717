"""Conservative score parameterisation (Horvat & Pfister, ICLR 2024, arXiv 2402.03845, Section 5): the field is
the gradient of a learned scalar, so it has no gauge part and its Jacobian is symmetric.

``ConservativeScore(energy)`` turns an energy network ``E(x, t)`` (B,) into the noise prediction

    eps_hat(x, t) = grad_x E(x, t),        score = -eps_hat / sigma(t) = -grad_x (E / sigma(t)),

a gradient field at every t (a t-only factor keeps it one). Wrap it in ``Denoiser(..., Prediction.EPS)`` to
sample it with any dpmlab solver; training needs second derivatives (``create_graph`` while gradients are on).
``EnergyMLP`` and ``FieldMLP`` are the same small body (EDM input scaling ``x / sqrt(sigma^2 + sigma_data^2)``,
``log sigma`` features) with a scalar or a D-vector head, for conservative-vs-unconstrained comparisons.
``jacobian_asymmetry`` measures how far a field is from conservative: ``||(J - J^T)/2|| / ||J||`` of its x-Jacobian.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._utils import f64
from ..schedules import NoiseSchedule

__all__ = ["ConservativeScore", "EnergyMLP", "FieldMLP", "jacobian_asymmetry"]


class _Body(nn.Module):
    """``[x / sqrt(sigma^2 + sigma_data^2), sin/cos(k log sigma)] -> SiLU MLP -> out``."""

    def __init__(
        self, dim: int, out: int, *, width: int, depth: int, schedule: NoiseSchedule, sigma_data: float, freqs: int = 8
    ) -> None:
        super().__init__()
        if dim < 1 or width < 1 or depth < 1:
            raise ValueError(f"dim, width and depth must be >= 1, got {dim}, {width}, {depth}")
        self.schedule, self.sigma_data = schedule, float(sigma_data)
        self.register_buffer("k", torch.arange(1, freqs + 1, dtype=torch.float32) / 2)
        layers: list[nn.Module] = [nn.Linear(dim + 2 * freqs, width), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(width, out))
        self.dim = dim

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected x of shape (B, {self.dim}), got {tuple(x.shape)}")
        tt = f64(t, device=x.device)
        tt = tt.expand(x.shape[0]) if tt.ndim == 0 else tt
        s = (self.schedule.sigma(tt) / self.schedule.alpha(tt)).to(x.dtype)[:, None]  # (B, 1)
        c_in = 1 / torch.sqrt(s * s + self.sigma_data**2)
        ang = torch.log(s) * self.get_buffer("k").to(x.dtype)  # (B, freqs)
        return self.net(torch.cat([x * c_in, torch.sin(ang), torch.cos(ang)], dim=1))


class EnergyMLP(nn.Module):
    """A scalar energy ``E(x, t)`` (B,)."""

    def __init__(
        self, dim: int, schedule: NoiseSchedule, *, width: int = 64, depth: int = 3, sigma_data: float = 1.0
    ) -> None:
        super().__init__()
        self.body = _Body(dim, 1, width=width, depth=depth, schedule=schedule, sigma_data=sigma_data)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.body(x, t)[:, 0]


class FieldMLP(nn.Module):
    """An unconstrained vector field ``eps_hat(x, t)`` (B, D): the same body with a D-vector head."""

    def __init__(
        self, dim: int, schedule: NoiseSchedule, *, width: int = 64, depth: int = 3, sigma_data: float = 1.0
    ) -> None:
        super().__init__()
        self.body = _Body(dim, dim, width=width, depth=depth, schedule=schedule, sigma_data=sigma_data)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.body(x, t)


class ConservativeScore(nn.Module):
    """``eps_hat = grad_x E(x, t)`` for an energy module ``E`` returning (B,): a noise prediction whose score
    ``-eps_hat / sigma`` is conservative by construction."""

    def __init__(self, energy: nn.Module) -> None:
        super().__init__()
        self.energy = energy

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        outer = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x if x.requires_grad else x.detach().requires_grad_(True)
            e = self.energy(xg, t)
            if e.shape != (x.shape[0],):
                raise ValueError(f"the energy must return shape ({x.shape[0]},), got {tuple(e.shape)}")
            (g,) = torch.autograd.grad(e.sum(), xg, create_graph=outer)
        return g if outer else g.detach()


def jacobian_asymmetry(field: nn.Module | object, x: Tensor, t: Tensor | float) -> Tensor:
    """``||(J - J^T) / 2||_F / ||J||_F`` per sample (B,) for the x-Jacobian J of ``field(x, t)``: 0 for a gradient
    field (up to round-off), 1 for a pure rotation."""
    tt = f64(t, device=x.device)
    tt = tt.expand(x.shape[0]) if tt.ndim == 0 else tt
    D = x.shape[1]
    with torch.enable_grad():
        xg = x.detach().clone().requires_grad_(True)
        out = field(xg, tt)  # type: ignore[operator]
        rows = [torch.autograd.grad(out[:, j].sum(), xg, retain_graph=j + 1 < D)[0] for j in range(D)]
    J = torch.stack(rows, dim=1)  # (B, D, D): J[b, j, :] = d out_j / d x
    skew = torch.linalg.matrix_norm((J - J.transpose(1, 2)) / 2)
    return (skew / torch.linalg.matrix_norm(J).clamp_min(1e-300)).detach()
