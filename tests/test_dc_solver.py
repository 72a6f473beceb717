"""DC-Solver (Zhao et al. 2024): the wrapper equals its base at rho = 1, fitted ratios reduce the error,
artifacts round-trip and reject bad files, CPR reproduces and interpolates; classifier-free guidance."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dpmlab.solvers as S
from dpmlab.api import make_grid
from dpmlab.calibrate.dc import fit_cpr, fit_dc_ratios
from dpmlab.models.analytic import GaussianMixture, preset, reference_solution
from dpmlab.models.guidance import classifier_free
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers.dc_solver import CPRModel, DCRatios, DynamicCompensation, cpr_features, lagrange_weights

torch.set_num_threads(1)
SCH = DiscreteVP.from_preset("linear")
MIX = preset("gmm16")
MODEL = MIX.denoiser(SCH)


def noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


BASES = [S.get("unipc"), S.get("unipc", prediction="noise", variant="bh2"), S.get("unic"),
         S.get("dpm_solver_pp", order=3), S.get("ddim"), S.get("deis")]


@pytest.mark.parametrize("base", BASES, ids=lambda b: str(b.config()))
def test_unit_ratios_are_the_base_solver(base):
    ts = make_grid(SCH, "uniform_time", 6, to_zero=True)
    x = noise(8, 0)
    p0, p1, p2 = (S.Problem(MODEL, SCH) for _ in range(3))
    a = S.sample(p0, x, ts, base)
    assert torch.equal(a, S.sample(p1, x, ts, DynamicCompensation(base, (1.0,) * 6)))
    assert torch.equal(a, S.sample(p2, x, ts, DynamicCompensation(base)))
    assert p0.nfe == p1.nfe == p2.nfe == DynamicCompensation(base).nfe(ts, SCH)
    r = (1.0, 1.0, 0.9, 1.1, 0.95, 1.05)  # and compensation changes the result without extra evaluations
    p3 = S.Problem(MODEL, SCH)
    assert not torch.equal(a, S.sample(p3, x, ts, DynamicCompensation(base, r)))
    assert p3.nfe == p0.nfe


def test_lagrange_compensation_is_exact_on_polynomials():
    nodes, tau = (0.7, 0.5, 0.2), 0.63
    w = lagrange_weights(nodes, tau)
    assert sum(w) == pytest.approx(1.0, abs=1e-14)
    assert sum(wk * (3 * t * t - t + 2) for wk, t in zip(w, nodes)) == pytest.approx(3 * tau * tau - tau + 2, abs=1e-13)
    assert lagrange_weights(nodes, 0.7) == [1.0, 0.0, 0.0]  # rho = 1 leaves the newest output alone


@pytest.fixture(scope="module")
def fitted() -> tuple[DCRatios, torch.Tensor]:
    r = fit_dc_ratios(MODEL, SCH, S.get("unipc"), 6, n_datapoints=10, grid="quadratic_time", model_name="gmm16")
    return r, make_grid(SCH, "quadratic_time", 6, to_zero=True)


def test_fitted_ratios_reduce_the_error(fitted):
    ratios, ts = fitted
    assert len(ratios.ratios) == 6 and ratios.ratios[:2] == (1.0, 1.0) and ratios.model == "gmm16"
    assert any(abs(r - 1.0) > 1e-3 for r in ratios.ratios)
    for x in (noise(10, 0) * float(SCH.sigma(ts[:1])), noise(64, 7)):  # the fitting points, then held-out
        ref = reference_solution(MODEL, SCH, x, float(ts[0]), 0.0).x
        e_base = rms(S.sample(S.Problem(MODEL, SCH), x, ts, S.get("unipc")), ref)
        e_dc = rms(S.sample(S.Problem(MODEL, SCH), x, ts, DynamicCompensation(S.get("unipc"), ratios)), ref)
        assert e_dc < 0.9 * e_base, (e_dc, e_base)


def test_artifacts_round_trip(tmp_path, fitted):
    ratios, ts = fitted
    assert DCRatios.load(ratios.save(tmp_path / "r.safetensors")) == ratios
    cpr = CPRModel(tuple(float(i) / 27 for i in range(27)), model="gmm16")
    assert CPRModel.load(cpr.save(tmp_path / "c.safetensors")) == cpr
    solver = DynamicCompensation(S.get("unipc"), DCRatios.load(tmp_path / "r.safetensors"))
    assert solver.ratios == ratios.ratios
    assert S.get(**solver.config()) == solver  # config round trip through the registry


def test_bad_artifacts_raise_clear_errors(tmp_path, fitted):
    ratios, ts = fitted
    with pytest.raises(FileNotFoundError, match="no dpmlab.dc_ratios artifact"):
        DCRatios.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        DCRatios.load(tmp_path / "junk.safetensors")
    CPRModel((0.0,) * 27).save(tmp_path / "cpr.safetensors")
    with pytest.raises(ValueError, match="expected a 'dpmlab.dc_ratios'"):
        DCRatios.load(tmp_path / "cpr.safetensors")
    with pytest.raises(ValueError, match="first dc_order=2 steps must be 1"):
        DCRatios((1.0, 0.9, 1.0))
    with pytest.raises(ValueError, match="finite"):
        DCRatios((1.0, 1.0, float("nan")))
    with pytest.raises(ValueError, match="27 finite"):
        CPRModel((0.0,) * 26)
    with pytest.raises(ValueError, match="dc_order=2, solver has 3"):
        DynamicCompensation(S.get("unipc"), ratios, dc_order=3)
    with pytest.raises(ValueError, match="6 dc ratios for a grid of 8 steps"):
        ts8 = make_grid(SCH, "quadratic_time", 8)
        S.sample(S.Problem(MODEL, SCH), noise(2, 0), ts8, DynamicCompensation(ratios=ratios))
    with pytest.raises(ValueError, match="deterministic"):
        DynamicCompensation(S.get("ddim", eta=1.0))


def test_cpr_recovers_a_cascade_polynomial_and_interpolates():
    true = CPRModel(tuple(torch.randn(27, generator=torch.Generator().manual_seed(0), dtype=torch.float64).mul(0.1)
                          .tolist()))
    fits = [true.predict(n, w) for n in (5, 6, 8, 10) for w in (1.0, 3.0, 7.0)]
    cpr = fit_cpr(fits)
    for f in fits:  # reproduces its training points
        assert cpr.predict(len(f.ratios), f.guidance).ratios == pytest.approx(f.ratios, abs=1e-9)
    for n, w in ((7, 5.0), (9, 2.0)):  # and the polynomial at unseen settings
        assert cpr.predict(n, w).ratios == pytest.approx(true.predict(n, w).ratios, abs=1e-8)
    assert len(cpr_features(6, 3.0, 4)) == 27
    with pytest.raises(ValueError, match="nothing to regress"):
        fit_cpr([DCRatios((1.0, 1.0))])


def test_cpr_on_fitted_ratios(fitted):
    """Through real (noisy) fitted ratios CPR is a regression: its residual is well below the ratios'
    own deviation from 1 on the training settings."""
    ratios6, _ = fitted
    fits = [ratios6] + [fit_dc_ratios(MODEL, SCH, S.get("unipc"), n, grid="quadratic_time") for n in (5, 8, 10)]
    cpr = fit_cpr(fits)
    res = [a - b for f in fits for a, b in zip(cpr.predict(len(f.ratios)).ratios[2:], f.ratios[2:])]
    dev = [r - 1.0 for f in fits for r in f.ratios[2:]]
    rms_res = (sum(v * v for v in res) / len(res)) ** 0.5
    rms_dev = (sum(v * v for v in dev) / len(dev)) ** 0.5
    assert rms_res < 0.6 * rms_dev, (rms_res, rms_dev)


def test_classifier_free_guidance():
    cond = GaussianMixture(MIX.weights[:4], MIX.means[:4], MIX.stds[:4]).denoiser(SCH)
    x, t = noise(5, 1), torch.full((5,), 0.4, dtype=torch.float64)
    x0_c, x0_u = cond(x, t), MODEL(x, t)
    assert torch.equal(classifier_free(cond, MODEL, 1.0)(x, t), x0_c)
    g = classifier_free(cond, MODEL, 3.0)
    assert torch.allclose(g(x, t), x0_u + 3.0 * (x0_c - x0_u), atol=1e-14)
    a, s = SCH.alpha(t)[:, None], SCH.sigma(t)[:, None]
    eps = lambda x0: (x - a * x0) / s  # noqa: E731 - guiding x0 equals guiding eps
    assert torch.allclose(eps(g(x, t)), eps(x0_u) + 3.0 * (eps(x0_c) - eps(x0_u)), atol=1e-12)
    assert g.schedule is SCH and g.data_shape == (16,)
    with pytest.raises(ValueError, match="finite"):
        classifier_free(cond, MODEL, float("inf"))


def test_dc_on_guided_model_reduces_error():
    cond = GaussianMixture(MIX.weights[:4], MIX.means[:4], MIX.stds[:4]).denoiser(SCH)
    guided = classifier_free(cond, MODEL, 3.0)
    r = fit_dc_ratios(guided, SCH, S.get("unipc"), 5, guidance=3.0)
    assert r.guidance == 3.0
    ts = make_grid(SCH, "uniform_time", 5, to_zero=True)
    x = noise(64, 5)
    ref = reference_solution(guided, SCH, x, float(ts[0]), 0.0).x
    e_base = rms(S.sample(S.Problem(guided, SCH), x, ts, S.get("unipc")), ref)
    dc = dataclasses.replace(DynamicCompensation(), ratios=r.ratios)
    e_dc = rms(S.sample(S.Problem(guided, SCH), x, ts, dc), ref)
    assert e_dc < e_base, (e_dc, e_base)
