"""Selective labels (Balachandar, Garg & Pierson, ICLR 2024): the generator, the likelihoods against direct
integration over the unobservables, MAP recovery, the constraints' effect on the posterior, bad-data errors,
the command line, and that the module needs nothing from dpmlab."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dpmlab.apps import selective_labels as sl

MODULE = Path(sl.__file__)


def _params(**kw):
    return {k: torch.as_tensor(v, dtype=torch.float64) for k, v in kw.items()}


# --- the generator --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["uniform", "normal"])
def test_generator_marginals_match_the_model(variant):
    sim = sl.simulate(sl.SyntheticConfig(variant=variant, n=60_000), seed=3)
    d, p = sim.data, sim.params
    # the authors' parameter draws: sparse beta_Delta, intercepts near -2 / +2, sigma near 2
    assert torch.all(p["beta_Delta"][2:] == 0) and p["beta_Delta"][1] != 0
    assert abs(float(p["beta_Y"][0]) + 2) < 0.5 and abs(float(p["beta_Delta"][0]) - 2) < 0.5
    assert abs(float(p["sigma"]) - 2) < 0.5
    assert torch.allclose(d.X.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(d.X.std(0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-12)
    s, z = float(p["sigma"]), sim.Z
    if variant == "uniform":
        assert float(p["alpha"]) == 1.0 and 0 <= float(z.min()) and float(z.max()) <= s
        assert abs(float(z.mean()) - s / 2) < 4 * s / math.sqrt(12 * len(z))
    else:
        assert abs(float(z.mean())) < 4 * s / math.sqrt(len(z)) and abs(float(z.std()) / s - 1) < 0.02
    # cell frequencies equal the model's marginal cell probabilities at the true parameters (within 4 SE)
    normal = variant == "normal"
    model = sl.SelectiveLabelsModel(variant=variant, known_sigma=s) if normal else sl.SelectiveLabelsModel()
    py, p11, p10, p0 = (q.mean() for q in model.cell_probs(p, d.X))
    t, y = d.T == 1, sim.Y_full == 1
    n = len(t)
    for freq, prob in [
        ((t & y).double().mean(), p11),
        ((t & ~y).double().mean(), p10),
        ((~t).double().mean(), p0),
        (y.double().mean(), py),
    ]:
        assert abs(float(freq - prob)) < 4 * math.sqrt(float(prob * (1 - prob)) / n)
    assert torch.isnan(d.Y[~t]).all() and torch.equal(d.Y[t], sim.Y_full[t])


def test_heckman_generator_marginals_and_selection_formula():
    sim = sl.simulate(sl.SyntheticConfig(variant="heckman", n=60_000), seed=4)
    d, p = sim.data, sim.params
    model = sl.SelectiveLabelsModel(variant="heckman")
    c = d.design @ p["beta_T"]
    # expertise: beta_T = rho / sigma^2 beta_Y off the first two coefficients, beta_T intercept near 2
    assert torch.allclose(p["beta_T"][2:], (p["rho"] / p["sigma"] ** 2) * p["beta_Y"][2:])
    assert abs(float(p["beta_T"][0]) - 2) < 0.5
    pt = torch.special.ndtr(c)
    assert abs(float(d.T.mean() - pt.mean())) < 4 * math.sqrt(0.25 / len(c))
    # E[Y | X, T] with the inverse Mills ratio, for the tested and (hidden outcomes of) the untested
    cond = model.conditional_outcome(p, d.X, d.T)
    for g in (d.T == 1, d.T == 0):
        se = float(p["sigma"]) / math.sqrt(int(g.sum()))
        assert abs(float(sim.Y_full[g].mean() - cond[g].mean())) < 4 * se
    se = float(p["sigma"]) / math.sqrt(60_000)
    assert abs(sim.prevalence - float(model.expected_outcome(p, d.X).mean())) < 4 * se


# --- likelihoods against direct integration over Z ------------------------------------------------------------
def _cells_by_integration(a, d, alpha, z, w):
    """Cell probabilities of the latent model, integrated with nodes z and weights w (sum to 1)."""
    r = a[:, None] + z[None]
    py, pt = torch.sigmoid(r), torch.sigmoid(alpha * r + d[:, None])
    return (w * py).sum(1), (w * py * pt).sum(1), (w * (1 - py) * pt).sum(1), (w * (1 - pt)).sum(1)


def test_uniform_closed_form_equals_the_integral_including_small_d():
    g = torch.Generator().manual_seed(0)
    a = torch.cat([torch.randn(40, generator=g, dtype=torch.float64) * 3, torch.tensor([-12.0, 9.0, 0.3, 0.3, 0.3])])
    d = torch.cat(
        [
            torch.randn(40, generator=g, dtype=torch.float64) * 3,
            torch.tensor([1.0, -2.0, 1e-7, -9.9e-6, 1.1e-5], dtype=torch.float64),
        ]
    )
    s = 1.7
    x, w = np.polynomial.legendre.leggauss(200)  # on [0, s]: exact to far below 1e-12 for these smooth integrands
    z, wn = torch.as_tensor((x + 1) * s / 2), torch.as_tensor(w / 2)
    # through the model: X1 beta_Y = a and X1 beta_Delta = d with X = [a, d], beta_Y = (0, 1, 0), beta_Delta = (0, 0, 1)
    got = sl.SelectiveLabelsModel().cell_probs(
        _params(beta_Y=[0.0, 1.0, 0.0], beta_Delta=[0.0, 0.0, 1.0], sigma=s, alpha=1.0), torch.stack([a, d], 1)
    )
    want = _cells_by_integration(a, d, 1.0, z, wn)
    for gq, wq in zip(got, want):
        assert torch.allclose(gq, wq, rtol=1e-9, atol=1e-15)
    assert torch.allclose(got[1] + got[2] + got[3], torch.ones(45, dtype=torch.float64), atol=1e-12)


def test_normal_quadrature_likelihood_equals_monte_carlo_over_the_latent():
    """The Stan model samples Z_i ~ N(0, sigma^2) per person; integrating it out by quadrature gives the same
    marginal likelihood: equal to Monte Carlo over Z within its error, and to a dense grid to 1e-9."""
    sim = sl.simulate(sl.SyntheticConfig(variant="normal", n=40), seed=5)
    p, d = sim.params, sim.data
    model = sl.SelectiveLabelsModel(variant="normal", known_sigma=float(p["sigma"]))
    ll = model.log_likelihood(p, d)
    a, dd, s, alpha = d.design @ p["beta_Y"], d.design @ p["beta_Delta"], float(p["sigma"]), float(p["alpha"])
    # Monte Carlo over the latent
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * s
    r = a[:, None] + z[None]
    py, pt = torch.sigmoid(r), torch.sigmoid(alpha * r + dd[:, None])
    y = torch.nan_to_num(d.Y)[:, None]
    lik = torch.where(d.T[:, None] == 1, torch.where(y == 1, py * pt, (1 - py) * pt), 1 - pt)  # (N, S)
    mc, se = lik.mean(1), lik.std(1) / math.sqrt(z.numel())
    assert torch.all((ll.exp() - mc).abs() < 4 * se + 1e-12)
    # a dense grid over +-12 sigma
    zg = torch.linspace(-12 * s, 12 * s, 40_001, dtype=torch.float64)
    wg = torch.exp(-0.5 * (zg / s) ** 2)
    wg = wg / wg.sum()
    _, p11, p10, p0 = _cells_by_integration(a, dd, alpha, zg, wg)
    dense = torch.where(d.T == 1, torch.where(torch.nan_to_num(d.Y) == 1, p11, p10), p0)
    assert torch.allclose(ll.exp(), dense, rtol=1e-9)


# --- inference -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["uniform", "normal", "heckman"])
def test_map_recovers_the_parameters_on_large_data(variant):
    sim = sl.simulate(sl.SyntheticConfig(variant=variant, n=10_000), seed=11)
    p = sim.params
    kw = {"known_sigma": float(p["sigma"])} if variant == "normal" else {}
    model = sl.SelectiveLabelsModel(variant=variant, prevalence=sim.prevalence, testing_features=(0,), **kw)
    est = sl.map_estimate(model, sim.data).draw(0)
    assert float((est["beta_Y"][1:] - p["beta_Y"][1:]).abs().max()) < 0.15
    assert float((est["beta_Delta"] - p["beta_Delta"]).abs().max()) < 0.3
    assert torch.all(est["beta_Delta"][2:] == 0)
    if variant == "uniform":
        # only the mean offset of the risk, beta_Y0 + E[Z] = beta_Y0 + sigma / 2, is pinned down: sigma itself is
        # weakly identified even with both constraints (here the mode sits at sigma -> 0)
        offset = lambda q: float(q["beta_Y"][0] + q["sigma"] / 2)  # noqa: E731
        assert abs(offset(est) - offset(p)) < 0.15
    else:
        assert abs(float(est["beta_Y"][0] - p["beta_Y"][0])) < 0.15 and abs(float(est["sigma"] - p["sigma"])) < 0.15
    if variant == "normal":
        assert abs(float(est["alpha"] - p["alpha"])) < 0.15
    if variant == "heckman":
        assert abs(float(est["rho"] - p["rho"])) < 0.15
    # the prevalence constraint holds at the mode
    assert abs(float(model.expected_outcome(est, sim.data.X).mean()) - sim.prevalence) < 0.02


def test_constraints_reduce_posterior_width_on_a_small_case():
    sim = sl.simulate(sl.SyntheticConfig(n=300, m=3), seed=2)
    widths = {}
    for name, model in [
        ("none", sl.SelectiveLabelsModel()),
        ("both", sl.SelectiveLabelsModel(prevalence=sim.prevalence, testing_features=(0,))),
    ]:
        post = sl.sample_posterior(model, sim.data, num_samples=50, warmup=50, seed=0, max_tree_depth=4, progress=False)
        assert post.samples["beta_Y"].shape == (50, 3) and post.method == "nuts"
        lo, hi = post.interval(0.9)["beta_Y"]
        widths[name] = float((hi - lo).mean())
    assert widths["both"] < 0.6 * widths["none"], widths  # measured: 0.52 vs 1.49


def test_posterior_round_trip_risk_and_auc():
    sim = sl.simulate(sl.SyntheticConfig(n=2000), seed=6)
    model = sl.SelectiveLabelsModel(prevalence=sim.prevalence, testing_features=(0,))
    post = sl.map_estimate(model, sim.data)
    again = sl.Posterior.from_dict(json.loads(json.dumps(post.to_dict())))
    assert again.model == model and torch.equal(again.samples["beta_Y"], post.samples["beta_Y"])
    r = post.risk(sim.data.X)
    untested = sim.data.T == 0
    # at the true parameters (sigma ~ 2), not being tested is evidence of lower risk, being tested of higher risk
    X, T = sim.data.X, sim.data.T
    r0, rc0 = model.expected_outcome(sim.params, X), model.conditional_outcome(sim.params, X, T)
    assert torch.all(rc0[untested] < r0[untested]) and torch.all(rc0[~untested] > r0[~untested])
    a = sl.auc(r[untested], sim.Y_full[untested])
    assert 0.6 < a < 1
    # AUC against the pair count
    s, y = np.array([0.1, 0.4, 0.4, 0.8, 0.3]), np.array([0, 1, 0, 1, 1])
    pairs = [(i, j) for i in range(5) for j in range(5) if y[i] == 1 and y[j] == 0]
    brute = np.mean([1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0 for i, j in pairs])
    assert sl.auc(s, y) == pytest.approx(brute)


# --- bad data and settings -------------------------------------------------------------------------------------
def test_clear_errors_for_bad_data():
    X, T, Y = np.zeros((4, 2)), np.array([1, 0, 1, 0]), np.array([1.0, np.nan, 0.0, np.nan])
    sl.make_data(X, T, Y)
    with pytest.raises(ValueError, match="mismatched lengths: X has 4 rows, T 3"):
        sl.make_data(X, T[:3], Y)
    with pytest.raises(ValueError, match="empty"):
        sl.make_data(np.zeros((0, 2)), [], [])
    with pytest.raises(ValueError, match="no tested rows"):
        sl.make_data(X, [0, 0, 0, 0], [np.nan] * 4)
    with pytest.raises(ValueError, match="observed for 1 untested rows .* row 1"):
        sl.make_data(X, T, [1.0, 0.0, 0.0, np.nan])
    with pytest.raises(ValueError, match="missing for 1 tested rows"):
        sl.make_data(X, T, [np.nan, np.nan, 0.0, np.nan])
    with pytest.raises(ValueError, match="T must be 0 or 1, got 2.0 at row 2"):
        sl.make_data(X, [1, 0, 2, 0], Y)
    with pytest.raises(ValueError, match="missing or infinite"):
        sl.make_data(np.array([[np.nan, 0]] * 4), T, Y)
    data = sl.make_data(X, T, [0.5, np.nan, 0.0, np.nan])
    with pytest.raises(ValueError, match="binary outcomes"):
        sl.map_estimate(sl.SelectiveLabelsModel(), data)
    with pytest.raises(ValueError, match="out of range for 2 feature columns"):
        sl.map_estimate(sl.SelectiveLabelsModel(testing_features=(2,)), sl.make_data(X, T, Y))
    post = sl.map_estimate(sl.SelectiveLabelsModel(testing_features=(1,)), sl.make_data(X, T, Y))
    with pytest.raises(ValueError, match=r"X must have shape \(N, 2\)"):
        post.risk(np.zeros((3, 3)))


def test_clear_errors_for_bad_settings():
    with pytest.raises(ValueError, match="unknown variant 'probit'; allowed: uniform, normal, heckman"):
        sl.SelectiveLabelsModel(variant="probit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs known_sigma or known_alpha"):
        sl.SelectiveLabelsModel(variant=sl.Variant.NORMAL)
    with pytest.raises(ValueError, match="known_alpha applies to the normal model only"):
        sl.SelectiveLabelsModel(known_alpha=1.0)
    with pytest.raises(ValueError, match=r"prevalence must be in \(0, 1\)"):
        sl.SelectiveLabelsModel(prevalence=1.5)
    with pytest.raises(ValueError, match="distinct column indices"):
        sl.SelectiveLabelsModel(testing_features=(1, 1))
    with pytest.raises(ValueError, match="num_not_sparse"):
        sl.SyntheticConfig(num_not_sparse=0)


def test_read_csv_names_missing_columns(tmp_path):
    f = tmp_path / "d.csv"
    f.write_text("age,T,outcome\n1.0,1,1\n2.0,0,\n")
    with pytest.raises(ValueError, match="lacks column\\(s\\) 'Y'; it has age, T, outcome"):
        sl.read_csv(f)
    d = sl.read_csv(f, outcome="outcome")
    assert d.feature_names == ("age",) and torch.isnan(d.Y[1])
    f.write_text("age,T,Y\n1.0,1,1\n2.0,0,1\n")
    with pytest.raises(ValueError, match="observed for 1 untested rows"):
        sl.read_csv(f)


# --- command line and layering ---------------------------------------------------------------------------------
def test_command_line_simulate_fit_and_errors(tmp_path, capsys):
    data, truth, out, risk = (tmp_path / n for n in ("d.csv", "t.json", "p.json", "r.csv"))
    assert sl.main(["simulate", "--n", "1500", "--seed", "1", "--out", str(data), "--truth", str(truth)]) == 0
    prev = json.loads(truth.read_text())["prevalence"]
    assert (
        sl.main(
            [
                "fit",
                str(data),
                "--method",
                "map",
                "--prevalence",
                str(prev),
                "--testing-features",
                "x1",
                "--out",
                str(out),
                "--risk-out",
                str(risk),
            ]
        )
        == 0
    )
    post = sl.Posterior.from_dict(json.loads(out.read_text()))
    assert post.method == "map" and post.model.testing_features == (0,)
    assert len(risk.read_text().splitlines()) == 1501
    assert "beta_Y[x1]" in capsys.readouterr().out
    assert sl.main(["fit", str(data), "--method", "map", "--testing-features", "age"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --testing-features names unknown column(s) age") and "\n" not in err
    assert sl.main(["fit", str(tmp_path / "none.csv")]) == 2


def test_the_module_imports_nothing_from_dpmlab():
    for path in (MODULE, MODULE.parent / "__init__.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.level == 0 and not (node.module or "").startswith("dpmlab"), (path, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("dpmlab") for a in node.names), path
    # and it runs as a stand-alone file: no dpmlab (diffusion) module gets loaded
    code = (
        f"import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sl', {str(MODULE)!r})\n"
        f"m = importlib.util.module_from_spec(spec); sys.modules['sl'] = m; spec.loader.exec_module(m)\n"
        f"m.simulate(m.SyntheticConfig(n=50))\n"
        f"print(sorted(k for k in sys.modules if k.startswith('dpmlab')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
