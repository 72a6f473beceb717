"""Noise-level classifier for Denoising MCMC (Kim & Ye, "Denoising MCMC for Accelerating
Diffusion-Based Generative Models", ICML 2023, arXiv 2209.14593).

DMCMC's Gibbs step on the noise level needs ``p(k | x)`` over a grid of levels ``t_k``. For analytic
mixtures it is exact (``dpmlab.solvers.dmcmc.ExactLevelPosterior``); for trained models the paper
trains a small network on noisy data ``x = alpha_k x0 + sigma_k eps`` with ``k`` uniform over the grid
(cross-entropy), so its softmax is the level posterior under a uniform prior. ``log_posterior`` turns
the logits into ``log p(k | x)`` under any prior: ``log_softmax(logits + log_prior)``.

The network: an MLP on flattened data, or for images (``C, H, W`` with ``H >= 8``) a small stride-2 CNN
with global average pooling (the authors' ``SimpleCNN`` uses four conv + average-pool stages and a
linear head over 1000 levels); both also see ``log mean(x^2)``, the per-sample second moment — the
statistic that carries most of the information about the noise level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._utils import append_dims, f64
from ..schedules import NoiseSchedule

__all__ = ["NoiseLevelClassifier", "fit_noise_level_classifier"]


class NoiseLevelClassifier(nn.Module):
    """Logits ``(B, K)`` over the noise levels ``levels`` (K times, noisiest first) from ``x``."""

    levels: Tensor  # buffer, registered in __init__

    def __init__(self, data_shape: Sequence[int], levels: Tensor, *, width: int = 256, depth: int = 3) -> None:
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        self.register_buffer("levels", f64(levels).clone())
        k = int(self.levels.numel())
        self.image = len(self.data_shape) == 3 and min(self.data_shape[1:]) >= 8
        if self.image:
            c = self.data_shape[0]
            self.features: nn.Module = nn.Sequential(
                nn.Conv2d(c, 32, 3, 2, 1),
                nn.SiLU(),
                nn.Conv2d(32, 64, 3, 2, 1),
                nn.SiLU(),
                nn.Conv2d(64, width, 3, 2, 1),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            n_in = width + 1
        else:
            self.features = nn.Flatten()
            n_in = math.prod(self.data_shape) + 1
        layers: list[nn.Module] = []
        for j in range(depth):
            layers += [nn.Linear(n_in if j == 0 else width, width), nn.SiLU()]
        self.head = nn.Sequential(*layers, nn.Linear(width, k))

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        m2 = torch.log(x.flatten(1).pow(2).mean(1, keepdim=True) + 1e-8)  # log second moment
        return self.head(torch.cat([self.features(x), m2], dim=1))

    @torch.no_grad()
    def log_posterior(self, x: Tensor, log_prior: Tensor | None = None) -> Tensor:
        """``log p(k | x)`` ``(B, K)`` (float64) under ``log_prior`` (default: uniform, as trained)."""
        logits = self(x).to(torch.float64)
        if log_prior is not None:
            logits = logits + f64(log_prior, device=logits.device)[None]
        return torch.log_softmax(logits, dim=1)


def fit_noise_level_classifier(
    data: Tensor,
    schedule: NoiseSchedule,
    levels: Tensor,
    *,
    steps: int = 2000,
    batch_size: int = 256,
    lr: float = 2e-3,
    width: int = 256,
    depth: int = 3,
    seed: int = 0,
) -> NoiseLevelClassifier:
    """Train a ``NoiseLevelClassifier`` on ``data`` ``(N, *shape)`` noised to uniformly drawn levels
    (Adam, cosine learning-rate decay, cross-entropy). Returns it in eval mode."""
    if data.ndim < 2 or data.shape[0] < 2:
        raise ValueError(f"data must have shape (N, ...) with N >= 2, got {tuple(data.shape)}")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = NoiseLevelClassifier(data.shape[1:], levels, width=width, depth=depth)
    lv = f64(levels)
    a_k, s_k = schedule.alpha(lv).float(), schedule.sigma(lv).float()  # (K,)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    data = data.float()
    net.train()
    for _ in range(steps):
        x0 = data[torch.randint(0, data.shape[0], (batch_size,), generator=g)]
        k = torch.randint(0, lv.numel(), (batch_size,), generator=g)  # uniform over the level grid
        eps = torch.randn(x0.shape, generator=g)
        x = append_dims(a_k[k], x0.ndim) * x0 + append_dims(s_k[k], x0.ndim) * eps
        loss = F.cross_entropy(net(x), k)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()
