"""Distances between sets of samples or features: pure functions on tensors, no feature extraction.

Every function takes feature tensors ``(N, F)`` (images are flattened to ``(N, C*H*W)`` where noted),
computes in float64 and returns Python floats or float64 tensors. Randomness (subsets, projections)
comes from an explicit ``seed``; nothing touches the global RNG.

* ``feature_stats`` / ``frechet_distance`` / ``frechet_distance_from_features``
      Heusel et al. (2017), "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
      Equilibrium", arXiv:1706.08500 — the Fréchet distance between Gaussians fitted to features,
      ``|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^{1/2})`` (Dowson & Landau 1982).
* ``gaussian_w2``     the 2-Wasserstein distance between two Gaussians in closed form: its square *is*
                      the Fréchet distance above (Dowson & Landau 1982; Olkin & Pukelsheim 1982).
* ``mmd2_unbiased``   Gretton et al. (2012), "A Kernel Two-Sample Test", JMLR 13, Lemma 6 — the unbiased
                      MMD² estimator, differentiable (a training loss: MMD-DDM), with ``PolynomialKernel``
                      (KID's cubic kernel) or ``RBFKernel``. The one copy of the estimator.
* ``kid``             Bińkowski et al. (2018), "Demystifying MMD GANs", arXiv:1801.01401 — unbiased
                      MMD² with the cubic polynomial kernel, mean and std over random subsets.
* ``precision_recall`` Kynkäänniemi et al. (2019), "Improved Precision and Recall Metric for Assessing
                      Generative Models", arXiv:1904.06991 — k-NN balls as manifold estimates.
* ``sliced_wasserstein`` Rabin et al. (2011), "Wasserstein Barycenter and its Application to Texture
                      Mixing" (SSVM) — SW₂ from sorted 1-d projections; exact 1-d W₂ via quantile
                      functions when the sample counts differ.
* ``nearest_train_distance`` per-sample L2 distance to the nearest training point (memorisation checks,
                      cf. Carlini et al. 2023, arXiv:2301.13188).

Implementation note (matrix square root): ``tr (C1 C2)^{1/2}`` is computed as the sum of the square
roots of the eigenvalues of the symmetric PSD matrix ``C1^{1/2} C2 C1^{1/2}`` (same spectrum as
``C1 C2``), with ``C1^{1/2}`` from ``eigh`` and round-off eigenvalues (below the numerical-rank tolerance) set to 0.
Unlike ``scipy.linalg.sqrtm`` of the non-symmetric product (EDM, pytorch-fid), this never produces
complex parts and needs no ``eps * I`` offset for singular covariances (fewer samples than features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "feature_stats",
    "frechet_distance",
    "frechet_distance_from_features",
    "gaussian_w2",
    "PolynomialKernel",
    "RBFKernel",
    "mmd2_unbiased",
    "kid",
    "KID",
    "precision_recall",
    "PrecisionRecall",
    "sliced_wasserstein",
    "nearest_train_distance",
    "Nearest",
]


# --- validation and small helpers ----------------------------------------------------------------


def _features(f: Tensor, name: str, *, min_rows: int = 1) -> Tensor:
    """``f`` as a float64 ``(N, F)`` tensor; raises on a wrong shape, too few rows or non-finite values."""
    if not isinstance(f, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(f).__name__}")
    if f.ndim != 2:
        raise ValueError(f"{name} must have shape (N, F), got {tuple(f.shape)}")
    if f.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {f.shape[0]}")
    f = f.to(torch.float64)
    if not torch.isfinite(f).all():
        raise ValueError(f"{name} contains NaN or inf")
    return f


def _flat(x: Tensor, name: str, *, min_rows: int = 1) -> Tensor:
    """Samples ``(N, ...)`` flattened to float64 ``(N, D)``."""
    if not isinstance(x, Tensor) or x.ndim < 1:
        raise ValueError(f"{name} must be a tensor of shape (N, ...)")
    return _features(x.reshape(x.shape[0], -1), name, min_rows=min_rows)


def _same_dim(a: Tensor, b: Tensor, na: str, nb: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{na} and {nb} have different feature dims: {a.shape[1]} vs {b.shape[1]}")


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared Euclidean distances ``(A, B)`` between rows, float64, clipped at 0."""
    d = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def _clip_roundoff(w: Tensor) -> Tensor:
    """Eigenvalues of a PSD matrix with round-off removed: values below ``F · eps · max|w|`` (the
    numerical-rank tolerance of ``numpy.linalg.matrix_rank``), negative ones included, become 0, so
    exactly singular covariances do not leak ``sqrt(eps)``-sized errors through the square root."""
    tol = w.shape[-1] * torch.finfo(w.dtype).eps * w.abs().max().clamp_min(torch.finfo(w.dtype).tiny)
    return torch.where(w > tol, w, torch.zeros_like(w))


def _psd_sqrt(c: Tensor) -> Tensor:
    """Symmetric PSD square root via ``eigh`` (round-off eigenvalues clipped to 0)."""
    w, v = torch.linalg.eigh(0.5 * (c + c.T))
    return (v * _clip_roundoff(w).sqrt()) @ v.T


# --- Fréchet distance / Gaussian W2 --------------------------------------------------------------


def feature_stats(f: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(F,)`` and unbiased covariance ``(F, F)`` of features ``(N, F)``, float64."""
    f = _features(f, "features", min_rows=2)
    mu = f.mean(0)
    d = f - mu
    return mu, d.T @ d / (f.shape[0] - 1)


def _gaussian_args(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> tuple[Tensor, ...]:
    out = []
    for name, t, nd in (("mu1", mu1, 1), ("cov1", cov1, 2), ("mu2", mu2, 1), ("cov2", cov2, 2)):
        if not isinstance(t, Tensor) or t.ndim != nd:
            raise ValueError(f"{name} must be a {nd}-d tensor, got {getattr(t, 'shape', type(t))}")
        t = t.to(torch.float64)
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or inf")
        out.append(t)
    d = out[0].shape[0]
    if out[2].shape != (d,) or out[1].shape != (d, d) or out[3].shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {tuple(mu1.shape)}, cov1 {tuple(cov1.shape)}, "
            f"mu2 {tuple(mu2.shape)}, cov2 {tuple(cov2.shape)}"
        )
    for name, c in (("cov1", out[1]), ("cov2", out[3])):
        if not torch.allclose(c, c.T, rtol=1e-6, atol=1e-8 * max(1.0, float(c.abs().max()))):
            raise ValueError(f"{name} is not symmetric")
    return tuple(out)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)`` (Heusel et al. 2017, eq. 6):

        d² = |mu1 - mu2|² + tr(C1) + tr(C2) - 2 tr((C1 C2)^{1/2}).

    This is the *squared* 2-Wasserstein distance between the Gaussians (FID convention: no square
    root). Covariances may be singular. Computed in float64; the result is clipped at 0 against
    round-off. ``mu``: ``(F,)``, ``cov``: ``(F, F)``.
    """
    mu1, cov1, mu2, cov2 = _gaussian_args(mu1, cov1, mu2, cov2)
    s1 = _psd_sqrt(cov1)
    m = s1 @ cov2 @ s1  # symmetric PSD, same spectrum as C1 C2
    tr_sqrt = _clip_roundoff(torch.linalg.eigvalsh(0.5 * (m + m.T))).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * tr_sqrt
    return max(float(d2), 0.0)


def frechet_distance_from_features(f1: Tensor, f2: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to features ``f1 (N1, F)`` and ``f2 (N2, F)``."""
    f1, f2 = _features(f1, "f1", min_rows=2), _features(f2, "f2", min_rows=2)
    _same_dim(f1, f2, "f1", "f2")
    return frechet_distance(*feature_stats(f1), *feature_stats(f2))


def gaussian_w2(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """2-Wasserstein distance (not squared) between ``N(mu1, cov1)`` and ``N(mu2, cov2)``:

        W₂² = |mu1 - mu2|² + tr(C1 + C2 - 2 (C1^{1/2} C2 C1^{1/2})^{1/2})   (Dowson & Landau 1982),

    so ``gaussian_w2(...)**2 == frechet_distance(...)``; the tests check both against the transport
    cost of the explicit optimal linear map.
    """
    return math.sqrt(frechet_distance(mu1, cov1, mu2, cov2))


# --- MMD and KID -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolynomialKernel:
    """``k(a, b) = (gamma a·b + coef0)^degree``; ``gamma=None`` is ``1 / F`` (F features). The defaults are
    KID's kernel (Bińkowski et al. 2018, Sec. 5). ``degree=1, gamma=1, coef0=0`` is the linear kernel."""

    degree: int = 3  # integer power >= 1
    gamma: float | None = None  # scale of the inner product; None: 1 / F
    coef0: float = 1.0  # additive constant

    def __post_init__(self) -> None:
        if isinstance(self.degree, bool) or not isinstance(self.degree, int) or self.degree < 1:
            raise ValueError(f"PolynomialKernel degree must be an int >= 1, got {self.degree!r}")
        if self.gamma is not None and not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"PolynomialKernel gamma must be a positive number or None, got {self.gamma!r}")
        if not math.isfinite(self.coef0):
            raise ValueError(f"PolynomialKernel coef0 must be finite, got {self.coef0!r}")

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        """Gram matrix ``(A, B)`` of rows ``a (A, F)`` and ``b (B, F)``."""
        gamma = 1.0 / a.shape[1] if self.gamma is None else self.gamma
        return (gamma * (a @ b.T) + self.coef0) ** self.degree


@dataclass(frozen=True)
class RBFKernel:
    """``k(a, b) = exp(-gamma |a - b|²)``; ``gamma=None`` is ``1 / F`` (scikit-learn's default, as in the
    MMD-DDM authors' ``KID_rbf``)."""

    gamma: float | None = None  # inverse squared length scale; None: 1 / F

    def __post_init__(self) -> None:
        if self.gamma is not None and not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"RBFKernel gamma must be a positive number or None, got {self.gamma!r}")

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        gamma = 1.0 / a.shape[1] if self.gamma is None else self.gamma
        d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return torch.exp(-gamma * d2.clamp_min(0.0))


def mmd2_unbiased(x: Tensor, y: Tensor, kernel: PolynomialKernel | RBFKernel | None = None) -> Tensor:
    """The unbiased estimate of MMD² between the laws of the rows of ``x (m, F)`` and ``y (n, F)`` (Gretton
    et al. 2012, Lemma 6; Bińkowski et al. 2018, eq. 4), a differentiable 0-d float64 tensor:

        MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m-1)) + Σ_{i≠j} k(y_i, y_j) / (n(n-1)) - 2 Σ_{i,j} k(x_i, y_j) / (mn).

    ``E[MMD²_u] = MMD²`` exactly (so it is ≈ 0, often negative, for two samples of one law); for the linear
    kernel ``MMD² = |E x - E y|²``. ``kernel`` defaults to KID's ``PolynomialKernel()``. Gradients flow to
    ``x`` and ``y`` (the loss of MMD-DDM, arXiv 2301.07969)."""
    x, y = _features(x, "x", min_rows=2), _features(y, "y", min_rows=2)
    _same_dim(x, y, "x", "y")
    k = PolynomialKernel() if kernel is None else kernel
    if not isinstance(k, PolynomialKernel | RBFKernel):
        raise TypeError(f"kernel must be a PolynomialKernel or RBFKernel, got {type(kernel).__name__}")
    m, n = x.shape[0], y.shape[0]
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    # off-diagonal means of k(x, x') and k(y, y'), full mean of k(x, y)
    xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return xx + yy - 2.0 * kxy.mean()


class KID(NamedTuple):
    """Kernel Inception Distance-style estimate: mean and std of unbiased MMD² over subsets."""

    mean: float
    std: float


def kid(
    f1: Tensor,
    f2: Tensor,
    subsets: int = 100,
    subset_size: int | None = None,
    degree: int = 3,
    *,
    seed: int = 0,
) -> KID:
    """Unbiased MMD² (``mmd2_unbiased``) with the polynomial kernel ``k(x, y) = (x·y / F + 1)^degree``
    (Bińkowski et al. 2018, eq. 4 and the KID definition in Sec. 5), averaged over ``subsets`` random subsets
    of ``subset_size`` rows drawn without replacement from each set (default ``min(N1, N2, 1000)``).

    Identical distributions give a mean of ≈ 0 (it can be slightly negative: the estimator is
    unbiased). ``f1``: ``(N1, F)``, ``f2``: ``(N2, F)``. Subsets come from ``torch.Generator(seed)``.
    """
    f1, f2 = _features(f1, "f1", min_rows=2), _features(f2, "f2", min_rows=2)
    _same_dim(f1, f2, "f1", "f2")
    n_max = min(f1.shape[0], f2.shape[0])
    m = min(n_max, 1000) if subset_size is None else int(subset_size)
    if not 2 <= m <= n_max:
        raise ValueError(f"subset_size must be in [2, {n_max}] (the smaller set's size), got {subset_size}")
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if degree < 1:
        raise ValueError(f"degree must be >= 1, got {degree}")
    kernel = PolynomialKernel(degree=int(degree))
    gen = torch.Generator().manual_seed(int(seed))
    vals = torch.empty(subsets, dtype=torch.float64)
    with torch.no_grad():
        for s in range(subsets):
            x = f1[torch.randperm(f1.shape[0], generator=gen)[:m]]
            y = f2[torch.randperm(f2.shape[0], generator=gen)[:m]]
            vals[s] = mmd2_unbiased(x, y, kernel)
    std = float(vals.std(unbiased=True)) if subsets > 1 else 0.0
    return KID(float(vals.mean()), std)


# --- precision / recall ----------------------------------------------------------------------------


class PrecisionRecall(NamedTuple):
    precision: float
    recall: float


def _knn_radii(x: Tensor, k: int, batch_size: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest *other* row, ``(N,)``."""
    radii = []
    for i in range(0, x.shape[0], batch_size):
        d2 = _sq_dists(x[i : i + batch_size], x)  # (b, N), includes the point itself at 0
        radii.append(d2.topk(k + 1, dim=1, largest=False).values[:, -1].sqrt())
    return torch.cat(radii)


def _coverage(query: Tensor, support: Tensor, radii: Tensor, batch_size: int) -> float:
    """Fraction of ``query`` rows inside at least one ball ``B(support_j, radii_j)``."""
    inside = 0
    r2 = radii.square()[None, :]  # (1, M)
    for i in range(0, query.shape[0], batch_size):
        d2 = _sq_dists(query[i : i + batch_size], support)  # (b, M)
        inside += int((d2 <= r2).any(1).sum())
    return inside / query.shape[0]


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, *, batch_size: int = 1024) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019, eqs. 1–3).

    The real (fake) manifold is the union of balls around each real (fake) feature with radius the
    distance to its ``k``-th nearest neighbour in the same set. Precision = fraction of fake features
    inside the real manifold; recall = fraction of real features inside the fake manifold. The paper
    uses k = 3. Distances are computed in blocks of ``batch_size`` rows (memory O(batch_size · N)).
    ``real``: ``(N, F)``, ``fake``: ``(M, F)``, both with more than ``k`` rows.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real, fake = _features(real, "real", min_rows=k + 1), _features(fake, "fake", min_rows=k + 1)
    _same_dim(real, fake, "real", "fake")
    precision = _coverage(fake, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, fake, _knn_radii(fake, k, batch_size), batch_size)
    return PrecisionRecall(precision, recall)


# --- sliced Wasserstein ----------------------------------------------------------------------------


def _w2sq_1d_sorted(xs: Tensor, ys: Tensor) -> Tensor:
    """Exact squared W₂ between 1-d empirical measures, per column. ``xs (n, P)``, ``ys (m, P)`` sorted
    along dim 0. ``W₂² = ∫₀¹ |F⁻¹(u) - G⁻¹(u)|² du`` with both quantile functions piecewise constant:
    integrate exactly over the merged breakpoints ``{i/n} ∪ {j/m}``."""
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return (xs - ys).square().mean(0)
    f64 = torch.float64
    u = torch.cat([torch.arange(0, n + 1, dtype=f64) / n, torch.arange(1, m + 1, dtype=f64) / m])
    u = torch.unique(u.clamp(max=1.0))  # sorted breakpoints 0 = u_0 < ... < u_K = 1
    w = u[1:] - u[:-1]  # interval lengths, sum to 1
    mid = 0.5 * (u[1:] + u[:-1])
    ix = (mid * n).floor().long().clamp(max=n - 1)
    iy = (mid * m).floor().long().clamp(max=m - 1)
    return (w[:, None] * (xs[ix] - ys[iy]).square()).sum(0)


def sliced_wasserstein(x: Tensor, y: Tensor, n_projections: int = 128, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance SW₂ (not squared) between the empirical measures of ``x (N, ...)``
    and ``y (M, ...)`` (Rabin et al. 2011; Bonneel et al. 2015):

        SW₂² = E_θ W₂²(θ#x, θ#y),  θ uniform on the unit sphere S^{D-1},

    estimated with ``n_projections`` directions from ``torch.Generator(seed)``. Each 1-d W₂² is
    exact: mean squared difference of sorted projections when ``N == M``, otherwise the integral of
    the squared difference of the two (piecewise-constant) quantile functions. Samples are flattened.
    For a pure translation by δ, SW₂² = |δ|² / D.
    """
    x, y = _flat(x, "x"), _flat(y, "y")
    _same_dim(x, y, "x", "y")
    if n_projections < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    gen = torch.Generator().manual_seed(int(seed))
    theta = torch.randn(x.shape[1], n_projections, generator=gen, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)  # (D, P) unit directions
    xs = (x @ theta).sort(dim=0).values  # (N, P)
    ys = (y @ theta).sort(dim=0).values  # (M, P)
    return math.sqrt(float(_w2sq_1d_sorted(xs, ys).mean()))


# --- nearest training point ------------------------------------------------------------------------


class Nearest(NamedTuple):
    """Per-sample nearest training point: L2 ``distance (B,)`` (float64) and its ``index (B,)``."""

    distance: Tensor
    index: Tensor  # type: ignore[assignment]  # public field name; shadows tuple.index on purpose


def nearest_train_distance(samples: Tensor, train: Tensor, *, batch_size: int = 1024) -> Nearest:
    """For each sample ``(B, ...)``, the L2 distance to its nearest training point ``(N, ...)`` (both
    flattened) and that point's index — a memorisation flag: copies of training images score ≈ 0.

    The search uses blocked matrix products (memory O(batch_size · N)); the reported distance is then
    recomputed directly from the difference vector, so exact copies give exactly 0.
    """
    s, t = _flat(samples, "samples"), _flat(train, "train")
    _same_dim(s, t, "samples", "train")
    idx = torch.cat([_sq_dists(s[i : i + batch_size], t).argmin(1) for i in range(0, s.shape[0], batch_size)])
    return Nearest((s - t[idx]).norm(dim=1), idx)
