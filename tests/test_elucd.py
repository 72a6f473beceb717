"""Classifier guidance (noise-aware baseline) and EluCD off-the-shelf guidance (Ma et al., ICLR 2024):
the sigma^2/alpha factor against an exact conditional denoiser, gradients against finite differences,
scale 0, the Softplus swap, the sin schedule, every solver, and ECE."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpmlab
from dpmlab.models.analytic import GaussianMixture
from dpmlab.models.guidance import (
    ClassifierGuidance,
    OffTheShelfGuidance,
    calibrated_log_likelihood,
    calibration_vs_t,
    classifier_guidance,
    diffusion_rate,
    elucd,
    expected_calibration_error,
    softplus_classifier,
)
from dpmlab.schedules import LinearVP
from dpmlab.solvers import available, get

torch.set_num_threads(1)


class Tiny:
    """A smooth nonlinear 'denoiser' on 6-d data (float64) that records the conditioning it receives."""

    schedule = LinearVP()
    data_shape = (6,)

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.A = torch.randn(6, 6, generator=g, dtype=torch.float64) / 3
        self.seen = []

    def __call__(self, x, t, **cond):
        self.seen.append(dict(cond))
        return torch.tanh(x @ self.A) + 0.1 * t[:, None]


class TinyClassifier(nn.Module):
    """ReLU in all three spellings: an nn.ReLU module, F.relu and Tensor.relu()."""

    def __init__(self, k=3, d=6):
        super().__init__()
        torch.manual_seed(1)
        self.fc1, self.act, self.fc2, self.fc3 = nn.Linear(d, 16), nn.ReLU(), nn.Linear(16, 16), nn.Linear(16, 16)
        self.head = nn.Linear(16, k)

    def forward(self, x):
        h = self.act(self.fc1(x))
        h = F.relu(self.fc2(h))
        return self.head(self.fc3(h).relu())


def _fd_grad(f, x, eps=1e-6):
    """Central differences of sum(f(x)) w.r.t. each entry of x (B, D), float64."""
    g = torch.zeros_like(x)
    for j in range(x.shape[1]):
        e = torch.zeros_like(x)
        e[:, j] = eps
        g[:, j] = (f(x + e) - f(x - e)) / (2 * eps)
    return g


def _coeffs(t):
    sch = Tiny.schedule
    return sch.alpha(t)[:, None], sch.sigma(t)[:, None]


def test_sigma2_over_alpha_factor_gives_the_exact_conditional_denoiser():
    """Bayes classifier of a Gaussian mixture at scale 1: x0 + sigma^2/alpha grad log p(k|x_t) is exactly the
    denoiser of component k — the factor is right, not just proportional."""
    sch = LinearVP()
    g = torch.Generator().manual_seed(2)
    mix = GaussianMixture([1.0, 2.0, 1.0], torch.randn(3, 4, generator=g, dtype=torch.float64) * 2, [0.5, 0.8, 0.3])
    bayes = lambda x, t: torch.log(mix._posterior(x, sch, t)[0])  # noqa: E731
    guided = ClassifierGuidance(mix.denoiser(sch), bayes, 1.0)
    x = mix.sample_t(8, sch, 0.4, generator=g)
    for k in range(3):
        for t in (0.05, 0.4, 0.9):
            tt = torch.full((8,), t, dtype=torch.float64)
            comp = GaussianMixture([1.0], mix.means[k : k + 1], mix.stds[k : k + 1])
            assert torch.allclose(guided(x, tt, label=k), comp.x0(x, sch, tt), atol=1e-9, rtol=1e-9)


def test_classifier_guidance_gradient_matches_finite_differences():
    model, clf = Tiny(), TinyClassifier().double()
    noisy = lambda x, t: clf(x) * (1 + t[:, None])  # noqa: E731  a "noise-aware" classifier
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    out = classifier_guidance(model, noisy, 2.5)(x, t, label=y)
    a, s = _coeffs(t)
    grad = (out - model(x, t)) / (2.5 * s * s / a)
    fd = _fd_grad(lambda z: torch.log_softmax(noisy(z, t), 1).gather(1, y[:, None])[:, 0], x)
    assert torch.allclose(grad, fd, atol=1e-6, rtol=1e-5)


def test_elucd_gradient_is_taken_at_the_detached_x0_and_matches_finite_differences():
    model, clf = Tiny(), softplus_classifier(TinyClassifier().double(), 3.0)
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.05, 0.3, 0.5, 0.7, 0.95], dtype=torch.float64)
    y = torch.tensor([2, 1, 0, 1, 2])
    guide = OffTheShelfGuidance(model, clf, 1.7, tau1=1.3, tau2=0.4, gamma=0.3)
    x0 = model(x, t)
    a, s = _coeffs(t)
    w = guide.weight(t)[:, None]
    grad = (guide(x, t, label=y) - x0) / (1.7 * w * s * s / a)
    fd = _fd_grad(lambda z: calibrated_log_likelihood(clf(z), y, 1.3, 0.4), x0)  # w.r.t. x0, not x_t
    assert torch.allclose(grad, fd, atol=1e-6, rtol=1e-5)
    # rescale: same direction, and the implied eps moves by exactly s w(t) in RMS per sample
    resc = OffTheShelfGuidance(model, clf, 1.7, tau1=1.3, tau2=0.4, gamma=0.3, rescale=True)
    d_eps = -(a / s) * (resc(x, t, label=y) - x0)
    assert torch.allclose(d_eps.pow(2).mean(1).sqrt(), 1.7 * w[:, 0], rtol=1e-10)
    cos = F.cosine_similarity(-d_eps, fd, dim=1)
    assert bool((cos > 1 - 1e-8).all())


def test_two_temperature_likelihood():
    logits = torch.randn(4, 5, dtype=torch.float64)
    y = torch.tensor([0, 4, 2, 2])
    log_softmax = torch.log_softmax(logits, 1).gather(1, y[:, None])[:, 0]
    assert torch.allclose(calibrated_log_likelihood(logits, y), log_softmax)
    # tau2 = 0: the marginal is the constant log K, only the logit term remains (the authors' EDM setting)
    assert torch.allclose(
        calibrated_log_likelihood(logits, y, 2.0, 0.0), 2.0 * logits.gather(1, y[:, None])[:, 0] - math.log(5)
    )


def test_scale_zero_returns_the_unguided_x0_exactly_and_the_label_is_consumed():
    model, clf = Tiny(), TinyClassifier().double()
    x = torch.randn(3, 6, dtype=torch.float64)
    t = torch.full((3,), 0.5, dtype=torch.float64)
    ref = model(x, t)
    for guide in (
        OffTheShelfGuidance(model, clf, 0.0),
        ClassifierGuidance(model, lambda z, tt: clf(z), 0.0),
        OffTheShelfGuidance(model, clf, 0.0, rescale=True),
    ):
        assert torch.equal(guide(x, t, label=1, other=7), ref)
        assert model.seen[-1] == {"other": 7}  # the target went to the classifier only
    guided = OffTheShelfGuidance(model, clf, 1.0, pass_label=True)(x, t, label=1)
    assert model.seen[-1] == {"label": 1} and not torch.equal(guided, ref)


def test_softplus_swap_keeps_the_architecture_and_approaches_relu():
    clf = TinyClassifier().eval()
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    soft = softplus_classifier(clf, 3.0)
    assert isinstance(clf.act, nn.ReLU) and all(torch.equal(v, clf.state_dict()[k]) for k, v in before.items())
    assert soft.state_dict().keys() == before.keys()
    assert all(torch.equal(soft.state_dict()[k], v) for k, v in before.items())
    kinds = {n: type(m).__name__ for n, m in soft.named_modules() if n}
    assert kinds == {"fc1": "Linear", "act": "Softplus", "fc2": "Linear", "fc3": "Linear", "head": "Linear"}
    assert soft.act.beta == 3.0 and not soft.training
    assert soft.code.count("softplus(") == 2  # F.relu and .relu() became softplus calls; the module is swapped
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = clf(x)
        errs = [float((softplus_classifier(clf, b)(x) - ref).abs().max()) for b in (1.0, 10.0, 100.0, 1e4)]
    assert all(b < a for a, b in zip(errs, errs[1:])) and errs[-1] < 1e-3, errs
    with pytest.raises(ValueError, match="beta must be a positive finite"):
        softplus_classifier(clf, 0.0)

    class Branchy(nn.Module):
        def forward(self, x):
            return x.relu() if float(x.sum()) > 0 else x

    with pytest.raises(ValueError, match="cannot trace Branchy"):
        softplus_classifier(Branchy())


def test_sin_schedule_is_the_variance_ratio_of_the_authors_ddpm_mean_shift():
    model = Tiny()
    sch = model.schedule
    t = torch.tensor([sch.t_min, 0.25, 0.5, 0.75, sch.t_max], dtype=torch.float64)
    flat = OffTheShelfGuidance(model, nn.Identity(), gamma=0.0).weight(t)
    assert torch.equal(flat, torch.ones(5, dtype=torch.float64))
    w = OffTheShelfGuidance(model, nn.Identity(), gamma=0.3).weight(t)
    beta = lambda s: sch.beta0 + s * (sch.beta1 - sch.beta0)  # noqa: E731  LinearVP's beta(t)
    assert torch.allclose(diffusion_rate(sch, t), beta(t), rtol=1e-8)
    u = (t - sch.t_min) / (sch.t_max - sch.t_min)
    assert torch.allclose(w, 1 + 0.3 * torch.sin(math.pi * u).clamp(min=0) * 20.0 / beta(t), rtol=1e-6)
    assert abs(float(w[0]) - 1) < 1e-12 and abs(float(w[-1]) - 1) < 1e-12 and bool((w[1:-1] > 1).all())


def test_guidance_works_with_every_solver():
    """Two well-separated classes in 2-D; a clean linear classifier; every registered solver, 24 NFE (or the
    nearest budget): finite samples, and the target class gains at least 30 points over unguided sampling.
    (At 12 NFE and scale 0.3, Heun and PNDM overshoot to the wrong class: their non-exponential first step
    from sigma/alpha = 150 cannot follow the large high-noise x0 shift; the exponential integrators can.)"""
    sch = LinearVP()
    mix = GaussianMixture([1.0, 1.0], [[-2.0, 0.0], [2.0, 0.0]], 0.5)
    model = mix.denoiser(sch)
    clf = nn.Linear(2, 2).double()
    with torch.no_grad():
        clf.weight.copy_(torch.tensor([[-2.0, 0.0], [2.0, 0.0]]))
        clf.bias.zero_()
    guided = OffTheShelfGuidance(model, clf, 1.0)
    for name in available():
        solver = get(name)
        nfe = next(n for n in range(24, 60) if _feasible(solver, n))
        base = dpmlab.sample(model, 200, solver=solver, nfe=nfe, seed=0, dtype=torch.float64)
        out = dpmlab.sample(guided, 200, solver=solver, nfe=nfe, seed=0, dtype=torch.float64, cond={"label": 0})
        assert bool(torch.isfinite(out).all()), name
        gain = float((out[:, 0] < 0).double().mean() - (base[:, 0] < 0).double().mean())
        assert gain > 0.3, (name, gain)


def _feasible(solver, n):
    try:
        solver.steps_for_nfe(n, True)  # the default grid ends at sigma = 0
        return True
    except ValueError:
        return False


def test_ece_is_zero_for_a_calibrated_classifier_and_large_for_an_overconfident_one():
    g = torch.Generator().manual_seed(6)
    logits = 2 * torch.randn(40000, 4, generator=g, dtype=torch.float64)
    probs = torch.softmax(logits, 1)
    labels = torch.multinomial(probs, 1, generator=g)[:, 0]  # labels drawn from the predicted distribution
    assert expected_calibration_error(probs, labels) < 0.01
    assert expected_calibration_error(torch.softmax(4 * logits, 1), labels) > 0.1
    with pytest.raises(ValueError, match="n_bins must be a positive int"):
        expected_calibration_error(probs, labels, 0)


def test_calibration_vs_t_of_a_prior_classifier_is_zero_at_every_t():
    """A classifier that always predicts the (balanced) class prior is perfectly calibrated whatever x0(x_t)."""
    sch = LinearVP()
    mix = GaussianMixture([1.0, 1.0], [[-2.0, 0.0], [2.0, 0.0]], 0.5)
    x0 = torch.cat([mix.means[0] + 0.5 * torch.randn(100, 2), mix.means[1] + 0.5 * torch.randn(100, 2)]).double()
    labels = torch.arange(2).repeat_interleave(100)
    ts = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    prior = lambda x: torch.zeros(x.shape[0], 2, dtype=x.dtype)  # noqa: E731
    curve = calibration_vs_t(mix.denoiser(sch), prior, x0, labels, ts)
    assert torch.allclose(curve.ece, torch.zeros(3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(curve.confidence, torch.full((3,), 0.5, dtype=torch.float64))
    lin = lambda x: 3 * torch.stack([-x[:, 0], x[:, 0]], 1)  # noqa: E731  sharp, right at low noise
    sharp = calibration_vs_t(mix.denoiser(sch), lin, x0, labels, ts)
    assert float(sharp.accuracy[0]) > 0.99 and float(sharp.accuracy[-1]) < float(sharp.accuracy[0])


def test_input_errors():
    model, clf = Tiny(), TinyClassifier().double()
    x, t = torch.randn(2, 6, dtype=torch.float64), torch.full((2,), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match="target class as the 'label' keyword"):
        OffTheShelfGuidance(model, clf)(x, t)
    with pytest.raises(ValueError, match="must be an int or 2 ints"):
        OffTheShelfGuidance(model, clf)(x, t, label=torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError, match="tau2 must be finite and >= 0"):
        OffTheShelfGuidance(model, clf, tau2=-1.0)
    with pytest.raises(ValueError, match="guidance scale must be finite"):
        elucd(model, clf, float("nan"))
