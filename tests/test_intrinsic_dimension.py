"""Gauge freedom and intrinsic dimension (Horvat & Pfister, ICLR 2024; Stanczuk et al. 2022) on a degenerate
Gaussian with closed-form score: the estimator finds the dimension from the true score and fails on score +
gauge, while sampling with score + gauge stays exact (dpmlab's solvers, a ``Prediction.SCORE`` denoiser)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dpmlab.analysis import conservative as cons
from dpmlab.analysis import gauge as gg
from dpmlab.analysis import intrinsic_dimension as idim
from dpmlab.schedules import EDM
from dpmlab.solvers import Problem, get, sample
from dpmlab.timesteps import karras

SCH = EDM()


def _setup(D=6, d=2, seed=0, strength=1.0, profile=gg.cos_profile):
    data = gg.DegenerateGaussian.random(D, d, SCH, seed=seed)
    gauge = gg.SkewGauge(data, gg.random_skew(D, seed=seed + 1), strength=strength, profile=profile)
    return data, gauge, (lambda x, t: data.score(x, t) + gauge(x, t))


@pytest.mark.parametrize("D,d", [(6, 2), (10, 3)])
def test_estimator_recovers_the_dimension_from_the_true_score(D, d):
    data, _, _ = _setup(D, d)
    g = torch.Generator().manual_seed(0)
    for x0 in data.sample(8, generator=g):
        est = idim.normal_space_id(data.score, x0, 0.01, SCH, generator=g)
        assert est.dimension == d and est.normal_dimension == D - d
        assert est.singular_values.shape == (D,)


def test_estimator_fails_on_score_plus_gauge_but_not_on_a_linear_gauge():
    data, gauge, gauged = _setup()
    g = torch.Generator().manual_seed(1)
    pts = data.sample(12, generator=g)
    ks = [idim.normal_space_id(gauged, x0, 0.01, SCH, generator=g).dimension for x0 in pts]
    assert sum(k != 2 for k in ks) >= 8, ks  # measured: 12 of 12 wrong (k_hat 1, 4 or 5)
    # a constant profile keeps the field linear, score + gauge = (A - I) C^-1 x: the normal part is only mixed by
    # a fixed invertible matrix, so the gap survives (mostly: the absolute-gap rule can pick a gap inside the
    # spread-out normal singular values)
    _, _, linear = _setup(profile=lambda q: torch.ones_like(q))
    kl = [idim.normal_space_id(linear, x0, 0.01, SCH, generator=g).dimension for x0 in pts]
    assert sum(k == 2 for k in kl) >= 10, kl  # measured: 11 of 12 right


def test_the_gauge_condition_holds_exactly_and_a_plain_rotation_violates_it():
    data, gauge, _ = _setup(D=5, d=2)
    x = data.sample_t(16, 0.3, generator=torch.Generator().manual_seed(2))
    t = torch.full((16,), 0.3, dtype=torch.float64)
    res = gg.gauge_residual(gauge, data.score, x, t)
    scale = gg.divergence(gauge, x, t).abs().max() + (gauge(x, t) * data.score(x, t)).sum(1).abs().max()
    assert float(res.abs().max()) < 1e-10 * max(1.0, float(scale))
    # the same rotation without C^-1 is divergence-free but not a gauge field of this anisotropic p_t
    A = gauge.A

    def plain(x, t):
        return torch.cos((x * x).sum(1, keepdim=True)) * x @ A.T

    assert float(gg.gauge_residual(plain, data.score, x, t).abs().mean()) > 1e-2
    # divergence against its closed form on a linear field
    M = torch.randn(5, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.allclose(gg.divergence(lambda x, t: x @ M.T, x, t), torch.trace(M).expand(16))


def test_sampling_with_score_plus_gauge_stays_exact():
    data, gauge, gauged = _setup()
    n = 6000
    x1 = torch.randn(n, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x1 = x1 * (1 + SCH.t_max**2) ** 0.5  # exact p_T = N(0, UU^T + T^2 I) ~ N(0, (1 + T^2) I) at T = 80
    ts = karras(SCH, 120, t_start=SCH.t_max, t_end=SCH.t_min)
    target = data.cov_t(0.0)
    outs = {}
    for name, fn in [
        ("score", None),
        ("gauge", gauged),
        (
            "wrong",
            lambda x, t: (
                data.score(x, t)
                + 1.0
                * torch.cos((x * x).sum(1, keepdim=True))
                * x
                @ gauge.A.T
                / (x * x).sum(1, keepdim=True).sqrt().clamp_min(1e-3)
            ),
        ),
    ]:
        outs[name] = sample(Problem(data.denoiser(fn), SCH), x1, ts, get("heun"))
    err = {k: float((v.T @ v / n - target).abs().max()) for k, v in outs.items()}
    assert err["score"] < 0.08 and err["gauge"] < 0.08, err  # Monte Carlo error ~ sqrt(2 / n) = 0.018
    assert err["wrong"] > 0.15, err  # a field that breaks the condition changes the distribution
    # the gauge moved the samples (a different map onto the same distribution), and both end on the subspace
    assert float((outs["gauge"] - outs["score"]).norm(dim=1).mean()) > 0.3
    for k in ("score", "gauge"):
        off = outs[k] - (outs[k] @ data.basis) @ data.basis.T
        assert float(off.norm(dim=1).max()) < 0.05


def test_score_denoiser_follows_the_exact_flow_and_the_flow_jacobian_spectrum():
    data, _, gauged = _setup()
    x1 = torch.randn(4, 6, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 10
    t0, t1 = 10.0, 0.05
    ts = karras(SCH, 60, t_start=t0, t_end=t1)
    problem = Problem(data.denoiser(), SCH)
    out = sample(problem, x1, ts, get("dpm_solver_pp"))
    assert torch.allclose(out, data.exact_flow(x1, t0, t1), atol=2e-3)
    sv = idim.flow_jacobian_spectrum(problem, x1, ts, get("dpm_solver_pp"))
    assert torch.allclose(sv, data.flow_singular_values(t0, t1).expand(4, 6), rtol=2e-3)
    assert all(idim.largest_gap(s) == 2 for s in sv)  # d saturating directions
    # with the gauge the map (and its spectrum) changes although the distribution does not
    svg = idim.flow_jacobian_spectrum(Problem(data.denoiser(gauged), SCH), x1, ts, get("dpm_solver_pp"))
    assert float((svg - sv).abs().max()) > 1e-3


def test_conservative_score_is_a_gradient_field_and_trains():
    torch.manual_seed(0)
    D = 4
    energy = cons.EnergyMLP(D, SCH, width=32, depth=2)
    model, free = cons.ConservativeScore(energy), cons.FieldMLP(D, SCH, width=32, depth=2)
    x = torch.randn(8, D)
    t = torch.full((8,), 0.5, dtype=torch.float64)
    assert float(cons.jacobian_asymmetry(model, x, t).max()) < 1e-5
    assert float(cons.jacobian_asymmetry(free, x, t).min()) > 1e-2
    with torch.no_grad():
        out = model(x, t)
    assert out.shape == (8, D) and not out.requires_grad
    # one step of denoising score matching moves the energy's parameters and lowers the loss
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x0, eps = torch.randn(256, D), torch.randn(256, D)
    tt = torch.full((256,), 0.5, dtype=torch.float64)
    losses = []
    for _ in range(20):
        loss = ((model(x0 + 0.5 * eps, tt) - eps) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.9 * losses[0]
    with pytest.raises(ValueError, match=r"energy must return shape \(8,\)"):
        cons.ConservativeScore(cons.FieldMLP(D, SCH))(x, t)


def test_clear_errors():
    with pytest.raises(ValueError, match="orthonormal"):
        gg.DegenerateGaussian(torch.ones(4, 2), SCH)
    data = gg.DegenerateGaussian.random(4, 2, SCH)
    with pytest.raises(ValueError, match="skew-symmetric"):
        gg.SkewGauge(data, torch.eye(4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"A must have shape \(4, 4\)"):
        gg.SkewGauge(data, torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x0 must be one point of shape \(D,\)"):
        idim.normal_space_id(data.score, torch.zeros(2, 4), 0.01, SCH)
    with pytest.raises(ValueError, match="outside the schedule"):
        idim.normal_space_id(data.score, torch.zeros(4), 500.0, SCH)


def test_command_line(tmp_path, capsys):
    assert idim.main(["gaussian", "--points", "4", "--sample-n", "500", "--steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "score          k_hat counts {2: 4}" in out and "max |Cov - UU^T|" in out
    assert idim.main(["gaussian", "--d", "6"]) == 2
    assert capsys.readouterr().err.strip() == "error: need 1 <= d < D, got d = 6, D = 6"
    assert idim.main(["model", "gmm2d", "--points", str(tmp_path / "none.npy")]) == 2
    np.save(tmp_path / "p.npy", np.zeros((3, 5), dtype=np.float32))
    assert idim.main(["model", "gmm2d", "--points", str(tmp_path / "p.npy")]) == 2
    assert "points have shape (5,), the model expects (2,)" in capsys.readouterr().err
    np.save(tmp_path / "p.npy", np.random.default_rng(0).normal(size=(3, 2)).astype(np.float32))
    assert idim.main(["model", "gmm2d", "--points", str(tmp_path / "p.npy"), "--out", str(tmp_path / "o.json")]) == 0
