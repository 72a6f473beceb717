"""DC-Solver (Zhao et al. 2024): the wrapper equals its base at rho = 1, fitted ratios reduce the error,
artifacts round-trip, record their grid/NFE/base and are checked on use, CPR of any degree reproduces the
authors' released coefficients; the noise-form serve path equals an independent loop; classifier-free
guidance."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

import dpmlab.solvers as S
from dpmlab.calibrate.dc import fit_cpr, fit_dc_ratios
from dpmlab.models.analytic import GaussianMixture, preset, reference_solution
from dpmlab.models.guidance import classifier_free
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers.dc_solver import CPRModel, DCRatios, DCState, DynamicCompensation, cpr_features, lagrange_weights
from dpmlab.timesteps import make_grid

torch.set_num_threads(1)
SCH = DiscreteVP.from_preset("linear")
MIX = preset("gmm16")
MODEL = MIX.denoiser(SCH)


def noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean().sqrt())


BASES = [
    S.get("unipc"),
    S.get("unipc", prediction="noise", variant="bh2"),
    S.get("unic"),
    S.get("dpm_solver_pp", order=3),
    S.get("ddim"),
    S.get("deis"),
]


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
    r = fit_dc_ratios(
        MODEL, SCH, S.get("unipc"), 6, n_datapoints=10, grid="quadratic_time", model_name="gmm16", ref_tol=1e-8
    )
    return r, make_grid(SCH, "quadratic_time", 6, to_zero=True)


def test_fitted_ratios_reduce_the_error(fitted):
    ratios, ts = fitted
    assert len(ratios.ratios) == 6 and ratios.ratios[:2] == (1.0, 1.0) and ratios.model == "gmm16"
    assert any(abs(r - 1.0) > 1e-3 for r in ratios.ratios)
    for x in (noise(10, 0) * float(SCH.sigma(ts[:1])), noise(32, 7)):  # the fitting points, then held-out
        ref = reference_solution(MODEL, SCH, x, float(ts[0]), 0.0, rtol=1e-8, atol=1e-8).x
        e_base = rms(S.sample(S.Problem(MODEL, SCH), x, ts, S.get("unipc")), ref)
        e_dc = rms(S.sample(S.Problem(MODEL, SCH), x, ts, DynamicCompensation(S.get("unipc"), ratios)), ref)
        assert e_dc < 0.9 * e_base, (e_dc, e_base)


def test_artifacts_round_trip(tmp_path, fitted):
    ratios, ts = fitted
    assert DCRatios.load(ratios.save(tmp_path / "r.safetensors")) == ratios
    cpr = CPRModel(tuple(float(i) / 27 for i in range(27)), model="gmm16")
    assert CPRModel.load(cpr.save(tmp_path / "c.safetensors")) == cpr
    solver = DynamicCompensation(S.get("unipc"), DCRatios.load(tmp_path / "r.safetensors"))
    assert solver.rhos == ratios.ratios and solver.ratios == ratios
    assert json.loads(json.dumps(solver.config()))["ratios"]["nfe"] == 6  # JSON-able, provenance kept
    assert S.get(**json.loads(json.dumps(solver.config()))) == solver  # config round trip through the registry


def test_ratios_record_and_check_grid_nfe_and_base(tmp_path, fitted):
    ratios, ts = fitted
    assert ratios.ts == pytest.approx(ts.tolist(), abs=0) and ratios.nfe == 6 and ratios.fit == "bounded"
    assert json.loads(ratios.solver) == S.get("unipc").config()
    x = noise(4, 0)
    S.sample(S.Problem(MODEL, SCH), x, ts, DynamicCompensation(S.get("unipc"), ratios))  # the fitted setting runs
    other = make_grid(SCH, "uniform_time", 6, to_zero=True)  # same length, another grid
    with pytest.raises(ValueError, match=r"fitted on the grid \[.*\], not \[.*\]; refit"):
        S.sample(S.Problem(MODEL, SCH), x, other, DynamicCompensation(S.get("unipc"), ratios))
    with pytest.raises(ValueError, match="fitted for base .*bh1.*, not .*bh2"):
        S.sample(S.Problem(MODEL, SCH), x, ts, DynamicCompensation(S.get("unipc", variant="bh2"), ratios))
    unipc_fc = S.get("unipc", final_corrector=True)  # one more evaluation on a grid not ending at sigma = 0
    ts_pos = make_grid(SCH, "quadratic_time", 6)
    r_pos = dataclasses.replace(ratios, ts=tuple(ts_pos.tolist()), solver=json.dumps(unipc_fc.config()))
    with pytest.raises(ValueError, match="fitted at nfe=6, this run uses nfe=7"):
        S.sample(S.Problem(MODEL, SCH), x, ts_pos, DynamicCompensation(unipc_fc, r_pos))


def test_version_1_artifacts_are_refused_unless_unchecked(tmp_path):
    path = tmp_path / "old.safetensors"
    meta = {"dc_order": 2, "guidance": 1.0, "model": "gmm16", "solver": ""}
    save_file(
        {"ratios": torch.tensor([1.0, 1.0, 0.9], dtype=torch.float64)},
        str(path),
        metadata={"format": "dpmlab.dc_ratios", "version": "1", "meta": json.dumps(meta)},
    )
    with pytest.raises(ValueError, match="version-1 dc_ratios artifact.*refit it.*allow_unchecked=True"):
        DCRatios.load(path)
    old = DCRatios.load(path, allow_unchecked=True)
    assert old.ratios == (1.0, 1.0, 0.9) and old.ts is None and old.nfe is None


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
    with pytest.raises(ValueError, match=r"9 \(degree \+ 1\) finite numbers \(27: quadratic, 36: cubic\), got 26"):
        CPRModel((0.0,) * 26)
    with pytest.raises(ValueError, match="dc_order=2, solver has 3"):
        DynamicCompensation(S.get("unipc"), ratios, dc_order=3)
    with pytest.raises(ValueError, match="6 dc ratios for a grid of 8 steps"):
        ts8 = make_grid(SCH, "quadratic_time", 8)
        S.sample(S.Problem(MODEL, SCH), noise(2, 0), ts8, DynamicCompensation(ratios=ratios))
    with pytest.raises(ValueError, match="deterministic"):
        DynamicCompensation(S.get("ddim", eta=1.0))


@pytest.mark.parametrize("degree", [2, 3])
def test_cpr_recovers_a_cascade_polynomial_and_interpolates(degree):
    n_coef = 9 * (degree + 1)
    true = CPRModel(
        tuple(torch.randn(n_coef, generator=torch.Generator().manual_seed(0), dtype=torch.float64).mul(0.1).tolist())
    )
    assert true.degree == degree
    fits = [true.predict(n, w) for n in (5, 6, 8, 10) for w in (1.0, 3.0, 7.0)]
    cpr = fit_cpr(fits, degree=degree)
    assert len(cpr.coeffs) == n_coef
    for f in fits:  # reproduces its training points
        assert cpr.predict(len(f.ratios), f.guidance).ratios == pytest.approx(f.ratios, abs=1e-9)
    for n, w in ((7, 5.0), (9, 2.0)):  # and the polynomial at unseen settings
        assert cpr.predict(n, w).ratios == pytest.approx(true.predict(n, w).ratios, abs=1e-8)
    assert len(cpr_features(6, 3.0, 4, degree=2)) == 27 and len(cpr_features(6, 3.0, 4)) == 36
    with pytest.raises(ValueError, match="nothing to regress"):
        fit_cpr([DCRatios((1.0, 1.0))])


def test_cpr_on_fitted_ratios(fitted):
    """Through real (noisy) fitted ratios CPR is a regression: its residual is well below the ratios'
    own deviation from 1 on the training settings."""
    ratios6, _ = fitted
    fits = [ratios6] + [
        fit_dc_ratios(MODEL, SCH, S.get("unipc"), n, grid="quadratic_time", n_datapoints=4, ref_tol=1e-8)
        for n in (5, 8)
    ]
    cpr = fit_cpr(fits, degree=2)
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
    r = fit_dc_ratios(guided, SCH, S.get("unipc"), 5, guidance=3.0, n_datapoints=6, ref_tol=1e-8)
    assert r.guidance == 3.0
    ts = make_grid(SCH, "uniform_time", 5, to_zero=True)
    x = noise(32, 5)
    ref = reference_solution(guided, SCH, x, float(ts[0]), 0.0, rtol=1e-8, atol=1e-8).x
    e_base = rms(S.sample(S.Problem(guided, SCH), x, ts, S.get("unipc")), ref)
    dc = dataclasses.replace(DynamicCompensation(), ratios=r.ratios)
    e_dc = rms(S.sample(S.Problem(guided, SCH), x, ts, dc), ref)
    assert e_dc < e_base, (e_dc, e_base)


def _authors_cpr(coeffs, cfg, nfe, step):
    """The authors' ``cascade_polynomial_regression`` (diffusers/.../scheduling_dcsolver_multistep.py), written
    out: coefficients reshaped (-1, 3, 3); quadratic in NFE/50, then in CFG/12, then a polynomial in step/NFE."""
    c = torch.tensor(coeffs, dtype=torch.float64).reshape(-1, 3, 3)
    n, g, x = nfe / 50, cfg / 12, step / nfe
    c1 = c[..., 0] * n**2 + c[..., 1] * n + c[..., 2]  # (P, 3)
    c2 = c1[..., 0] * g**2 + c1[..., 1] * g + c1[..., 2]  # (P,)
    return float(sum(c2[a] * x**a for a in range(c2.shape[0])))


def test_authors_released_cpr_loads_and_reproduces_their_ratios(tmp_path):
    cpr = CPRModel.authors_sd21()
    assert len(cpr.coeffs) == 36 and cpr.degree == 3 and cpr.model == "sd2.1"
    for nfe, cfg in ((10, 7.5), (6, 6.0), (20, 3.0)):
        want = [1.0 if step < 3 else _authors_cpr(cpr.coeffs, cfg, nfe, step) for step in range(1, nfe + 1)]
        assert cpr.predict(nfe, cfg).ratios == pytest.approx(want, rel=1e-12, abs=1e-12)
    # the figure: their CPR predicts rho ~ 0.44 at NFE 10, CFG 7.5 (outside the old (0.5, 1.5) range)
    assert cpr.predict(10, 7.5).ratios[2] == pytest.approx(0.4446, abs=5e-5)
    import numpy as np

    np.save(tmp_path / "sd2.1.npy", np.array(cpr.coeffs))  # the authors' file format loads directly
    assert CPRModel.from_npy(tmp_path / "sd2.1.npy").coeffs == cpr.coeffs


def test_adamw_fit_is_the_authors_unbounded_gradient_search():
    ts = make_grid(SCH, "uniform_time", 5, to_zero=True)
    base = S.get("unipc", variant="bh2")
    r = fit_dc_ratios(MODEL, SCH, base, 5, n_datapoints=3, grid="uniform_time", method="adamw", ref_tol=1e-7)
    assert r.fit == "adamw" and r.ratios[:2] == (1.0, 1.0) and any(abs(v - 1) > 1e-3 for v in r.ratios)
    # the gradient it follows is the true derivative of the step in rho (central difference)
    dc, p = DynamicCompensation(base), S.Problem(MODEL, SCH)
    x = noise(4, 3) * float(SCH.sigma(ts[:1]))
    state = dc.init(p, x, ts)
    for i in range(2):
        x, state = dc.step_with(p, x, ts, i, state, 1.0)
    rho = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    out, _ = dc.step_with(p, x, ts, 2, state, rho)
    (g,) = torch.autograd.grad(out.sum(), rho)
    h = 1e-5
    up, down = (dc.step_with(p, x, ts, 2, state, 0.8 + d)[0].sum() for d in (h, -h))
    fd = (up - down) / (2 * h)
    assert float(g) == pytest.approx(float(fd), rel=1e-6)
    with pytest.raises(ValueError, match="unknown method 'sgd'; allowed: bounded, adamw"):
        fit_dc_ratios(MODEL, SCH, base, 5, method="sgd")


def test_noise_form_serve_equals_an_independent_loop():
    """Kills the mutation "DC noise-form serve returning eps as x0": a noise-form base without a reused
    evaluation (UniP only) gets, at (x_i, t_i), the x0 whose eps is the Lagrange-compensated eps."""
    base = S.get("unipc", prediction="noise", use_corrector=False)
    ts = make_grid(SCH, "uniform_time", 6, to_zero=True)
    rho = (1.0, 1.0, 0.7, 1.3, 0.9, 1.1)
    x = noise(8, 2)
    got = S.sample(S.Problem(MODEL, SCH), x, ts, DynamicCompensation(base, rho))
    hist: list[tuple[float, torch.Tensor]] = []  # (t, compensated eps), newest last

    def model(xx, t):
        i = len(hist)
        ti = float(ts[i])
        a, s = SCH.alpha(ts[i]), SCH.sigma(ts[i])
        eps = (xx - a * MODEL(xx, t)) / s
        if i >= 2:
            (t2, e2), (t1, e1) = hist[-2], hist[-1]
            tau = t1 + rho[i] * (ti - t1)
            eps = sum(w * e for w, e in zip(lagrange_weights((ti, t1, t2), tau), (eps, e1, e2)))
        hist.append((ti, eps))
        return (xx - s * eps) / a

    want = S.sample(S.Problem(model, SCH), x, ts, base)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)
    assert not torch.allclose(got, S.sample(S.Problem(MODEL, SCH), x, ts, base), atol=1e-3)
    assert isinstance(DynamicCompensation(base).init(S.Problem(MODEL, SCH), x, ts), DCState)


def test_wrapper_reaches_a_pending_corrector_output_only_through_the_protocol():
    """The DC wrapper compensates UniPC's reused corrector evaluation via ``pending_output`` /
    ``with_pending_output`` (issue 16: no wrapper reads or writes a base's private state): a base whose
    protocol methods are the only way in still gets compensated, and the default protocol refuses."""
    from dpmlab.schedules import DiscreteVP
    from dpmlab.solvers import Problem, get, sample
    from dpmlab.solvers.dc_solver import DynamicCompensation

    sch = DiscreteVP.from_preset("linear")
    model = preset("gmm16").denoiser(sch)
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ts = make_grid(sch, "uniform_time", 6)
    unipc = get("unipc")
    calls = []

    class Spy(type(unipc)):
        def pending_output(self, state):
            calls.append("get")
            return super().pending_output(state)

        def with_pending_output(self, state, output):
            calls.append("set")
            return super().with_pending_output(state, output)

    spy = Spy(**{f.name: getattr(unipc, f.name) for f in dataclasses.fields(unipc)})
    ratios = (1.0, 1.0, 0.9, 1.1, 0.95, 1.05)
    a = sample(Problem(model, sch), x, ts, DynamicCompensation(base=spy, ratios=ratios))
    b = sample(Problem(model, sch), x, ts, DynamicCompensation(base=unipc, ratios=ratios))
    assert torch.equal(a, b) and "set" in calls and "get" in calls
    with pytest.raises(ValueError, match="reuses no model output; nothing to replace"):
        get("ddim").with_pending_output(None, x)


def test_ratios_fit_on_given_noise_and_conditioning():
    """``noise=`` replaces the seeded draw (the same start states give the same ratios) and ``cond=`` reaches the
    model in the ground truth and in the fit: on a labelled model, all-ones labels give the ratios of the
    label-1 model and all-zeros those of the label-0 model."""
    one = GaussianMixture(MIX.weights[:4], MIX.means[:4], MIX.stds[:4]).denoiser(SCH)

    def labelled(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        return torch.where(label[:, None] == 1, one(x, t), MODEL(x, t))

    kw = {"n_datapoints": 6, "ref_tol": 1e-8, "shape": (16,)}
    x = torch.randn(6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * float(SCH.sigma(1.0))
    seeded = fit_dc_ratios(MODEL, SCH, S.get("unipc"), 6, seed=4, **kw)
    assert fit_dc_ratios(MODEL, SCH, S.get("unipc"), 6, noise=x, **kw).ratios == seeded.ratios
    for lab, plain in ((1, one), (0, MODEL)):
        want = fit_dc_ratios(plain, SCH, S.get("unipc"), 6, noise=x, **kw).ratios
        cond = {"label": torch.full((6,), lab)}
        assert fit_dc_ratios(labelled, SCH, S.get("unipc"), 6, noise=x, cond=cond, **kw).ratios == want
    assert fit_dc_ratios(one, SCH, S.get("unipc"), 6, noise=x, **kw).ratios != seeded.ratios
    with pytest.raises(ValueError, match=r"noise must have shape \(6, 16\)"):
        fit_dc_ratios(MODEL, SCH, S.get("unipc"), 6, noise=x[:5], **kw)
