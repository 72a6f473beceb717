"""Mode-mixture ratio: the share of generated samples that belong to no mode of the data — the blends of two
modes that fast samplers produce. DPM-OT (Li et al., ICCV 2023, arXiv 2307.11308) reports it with a classifier;
we give two definitions, both pure functions on tensors:

* ``mode_mixture_ratio(samples, means, stds, n_std=3)`` — for data with known Gaussian modes: a sample is *mixed*
  when its Mahalanobis distance ``|(x - mu_k) / s_k|`` exceeds ``n_std`` for every mode k. A true sample of mode k in
  D dimensions is flagged with probability ``P(chi_D > n_std)`` at most (D = 2, n_std = 3: 1.1%): compare against
  real data (the floor).
* ``classifier_mode_mixture(logits, threshold=0.5)`` — for images: a sample is mixed when the classifier's largest
  softmax probability is below ``threshold`` (no class claims it).

Both return ``ModeMixture(ratio, mixed, counts)``: the mixed share, the per-sample flag ``(B,)`` and the number of
unmixed samples assigned to each mode / class ``(K,)`` (mode coverage = ``(counts > 0).mean()``).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = ["ModeMixture", "mode_mixture_ratio", "classifier_mode_mixture"]


class ModeMixture(NamedTuple):
    ratio: float  # share of mixed samples
    mixed: Tensor  # (B,) bool
    counts: Tensor  # (K,) int64: unmixed samples per mode (nearest mode / predicted class)


def _result(mixed: Tensor, assigned: Tensor, k: int) -> ModeMixture:
    counts = torch.bincount(assigned[~mixed], minlength=k)
    return ModeMixture(float(mixed.double().mean()), mixed, counts)


def mode_mixture_ratio(
    samples: Tensor, means: Tensor, stds: Tensor | float, *, n_std: float = 3.0, batch_size: int = 4096
) -> ModeMixture:
    """Mixed = farther than ``n_std`` (Mahalanobis, diagonal) from every mode. ``samples`` ``(B, D)``, ``means``
    ``(K, D)``, ``stds`` a scalar, ``(K,)`` or ``(K, D)`` (> 0)."""
    x, mu = samples.double().flatten(1), torch.as_tensor(means, dtype=torch.float64)
    if mu.ndim != 2 or x.shape[1] != mu.shape[1] or len(x) == 0:
        raise ValueError(
            f"need samples (B, D) with B >= 1 and means (K, D) of the same D, got {tuple(samples.shape)} "
            f"and {tuple(mu.shape)}"
        )
    s = torch.as_tensor(stds, dtype=torch.float64)
    s = s.expand(mu.shape) if s.ndim == 0 else s[:, None].expand(mu.shape) if s.shape == mu.shape[:1] else s
    if s.shape != mu.shape or not bool((s > 0).all()):
        raise ValueError(f"stds must be positive: a scalar, ({len(mu)},) or {tuple(mu.shape)}, got {tuple(s.shape)}")
    if not (n_std > 0 and math.isfinite(n_std)):
        raise ValueError(f"n_std must be a positive number, got {n_std!r}")
    d = torch.cat([(((c[:, None] - mu[None]) / s[None]) ** 2).sum(-1).sqrt() for c in x.split(batch_size)])  # (B, K)
    dist, assigned = d.min(dim=1)
    return _result(dist > n_std, assigned, len(mu))


def classifier_mode_mixture(logits: Tensor, *, threshold: float = 0.5) -> ModeMixture:
    """Mixed = the largest softmax probability of ``logits`` ``(B, K)`` is below ``threshold`` (in (0, 1])."""
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"logits must have shape (B, K) with B >= 1, got {tuple(logits.shape)}")
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    p, assigned = logits.double().softmax(dim=1).max(dim=1)
    return _result(p < threshold, assigned, logits.shape[1])
