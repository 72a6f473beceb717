"""Mode-mixture ratio (dpmlab.metrics.mode_mixture): constructed cases for the Mahalanobis and the classifier
definitions, the false-positive floor of real samples against its closed form, errors."""

import math

import pytest
import torch

from dpmlab.metrics import ModeMixture, classifier_mode_mixture, mode_mixture_ratio

torch.set_num_threads(1)


def test_constructed_points_between_and_inside_modes():
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    pts = torch.tensor([[0.0, 0.0], [10.0, 0.5], [5.0, 0.0], [0.0, 2.9], [0.0, 3.1], [7.5, 0.0]])
    r = mode_mixture_ratio(pts, means, 1.0)
    assert isinstance(r, ModeMixture)
    assert r.mixed.tolist() == [False, False, True, False, True, False]  # 7.5 is 2.5 std from the second mode
    assert r.ratio == pytest.approx(2 / 6)
    assert r.counts.tolist() == [2, 2]
    # anisotropic modes (K, D): 0.5 along a 0.1-std axis is 5 std away; 2.0 along the 1-std axis is inside
    r2 = mode_mixture_ratio(torch.tensor([[0.0, 0.5], [2.0, 0.0]]), means, torch.tensor([[1.0, 0.1], [1.0, 0.1]]))
    assert r2.mixed.tolist() == [True, False]
    # per-mode stds (K,): a wide second mode claims a far point
    r3 = mode_mixture_ratio(torch.tensor([[5.0, 0.0]]), means, torch.tensor([1.0, 2.0]), n_std=3.0)
    assert r3.mixed.tolist() == [False] and r3.counts.tolist() == [0, 1]


def test_real_samples_are_flagged_at_the_chi_tail_rate():
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0]])
    comp = torch.randint(0, 3, (40000,), generator=g)
    x = means[comp] + 0.5 * torch.randn(40000, 2, generator=g)
    r = mode_mixture_ratio(x, means, 0.5)
    assert r.ratio == pytest.approx(math.exp(-4.5), abs=0.003)  # P(chi_2 > 3) = exp(-9/2) = 0.0111
    assert (r.counts > 12000).all()
    wrong = mode_mixture_ratio(x, means, 0.25)  # a too-narrow mode model flags most samples (power)
    assert wrong.ratio > 0.3


def test_classifier_definition():
    logits = torch.tensor([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, -20.0], [0.0, 5.0, 0.0], [2.0, 0.0, 1.0]])
    r = classifier_mode_mixture(logits)
    # max probs: ~1, 1/3, 0.5 - tiny, ~0.99, 0.67
    assert r.mixed.tolist() == [False, True, True, False, False]
    assert r.ratio == pytest.approx(0.4) and r.counts.tolist() == [2, 1, 0]
    assert classifier_mode_mixture(logits, threshold=0.9).mixed.tolist() == [False, True, True, False, True]


def test_errors():
    with pytest.raises(ValueError, match="need samples \\(B, D\\) with B >= 1 and means \\(K, D\\) of the same D"):
        mode_mixture_ratio(torch.zeros(3, 2), torch.zeros(2, 3), 1.0)
    with pytest.raises(ValueError, match="stds must be positive"):
        mode_mixture_ratio(torch.zeros(3, 2), torch.zeros(2, 2), torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="n_std must be a positive number, got -1"):
        mode_mixture_ratio(torch.zeros(3, 2), torch.zeros(2, 2), 1.0, n_std=-1)
    with pytest.raises(ValueError, match="threshold must be in \\(0, 1\\], got 1.5"):
        classifier_mode_mixture(torch.zeros(2, 3), threshold=1.5)
    with pytest.raises(ValueError, match="logits must have shape \\(B, K\\)"):
        classifier_mode_mixture(torch.zeros(3))
