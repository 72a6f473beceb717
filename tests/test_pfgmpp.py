"""PFGM++ (dpmlab.methods.pfgmpp): the radial law of the kernel against its closed form, the uniform direction,
convergence to the Gaussian kernel as D grows, the prior, D = inf is EDM exactly (objective and sampler), the
sigma-ODE is the N+D-dim field's ODE, noise injection, and a recipe trained and sampled end to end."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats

import dpmlab
from dpmlab._utils import counter_normal
from dpmlab.cli import main
from dpmlab.methods import MethodRecipe, load, load_recipe
from dpmlab.methods.pfgmpp import PFGMPP, PFGMPPObjective, kernel_noise, prior, sample
from dpmlab.metrics import sliced_wasserstein
from dpmlab.schedules import EDM
from dpmlab.solvers import Problem, get
from dpmlab.training import DiffusionObjective, Recipe, TrainConfig, fit
from dpmlab.training.data import Dataset, toy2d

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def radii(n_dims, D, size, seed=0):
    """R / r of ``size`` kernel draws in ``n_dims`` dimensions (r = sigma sqrt(D))."""
    eps = torch.randn(size, n_dims, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return (kernel_noise(eps, D, np.random.default_rng(seed)).norm(dim=1) / math.sqrt(D)).numpy()


def radial_cdf(n_dims, D):
    """CDF of R / r from the density p(rho) ∝ rho^(N-1) / (rho^2 + 1)^((N+D)/2) by quadrature."""
    dens = lambda rho: rho ** (n_dims - 1) * (rho * rho + 1) ** (-(n_dims + D) / 2)  # noqa: E731
    total = integrate.quad(dens, 0, np.inf)[0]
    return np.vectorize(lambda v: integrate.quad(dens, 0, v)[0] / total)


@pytest.mark.parametrize("n_dims,D", [(2, 1.0), (8, 3.0), (8, 1.0)])
def test_radial_law_matches_its_closed_form_for_small_D(n_dims, D):
    r = radii(n_dims, D, 3000)
    assert stats.kstest(r, radial_cdf(n_dims, D)).pvalue > 1e-3
    # the Student-t form of the same law: R^2 / (N sigma^2) = (R / r)^2 D / N ~ F(N, D)
    assert stats.kstest(r**2 * D / n_dims, stats.f(n_dims, D).cdf).pvalue > 1e-3
    # the test has power: Beta(D/2, N/2) (parameters swapped) is rejected
    b = np.random.default_rng(1).beta(D / 2, n_dims / 2, 3000)
    assert stats.kstest(np.sqrt(b / (1 - b)), radial_cdf(n_dims, D)).pvalue < 1e-6


def test_direction_is_uniform_on_the_sphere():
    n_dims = 6
    e = kernel_noise(
        torch.randn(4000, n_dims, dtype=torch.float64, generator=torch.Generator().manual_seed(2)),
        5.0,
        np.random.default_rng(2),
    )
    u = e / e.norm(dim=1, keepdim=True)
    # one coordinate of a uniform unit vector: (u_1 + 1) / 2 ~ Beta((N-1)/2, (N-1)/2)
    for k in (0, 3):
        assert stats.kstest((u[:, k].numpy() + 1) / 2, stats.beta((n_dims - 1) / 2, (n_dims - 1) / 2).cdf).pvalue > 1e-3
    assert torch.allclose(u.T @ u / len(u), torch.eye(n_dims, dtype=torch.float64) / n_dims, atol=0.02)


def test_kernel_tends_to_the_gaussian_as_D_grows():
    n_dims, size = 16, 40000
    z = torch.randn(size, n_dims, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    var_gap, kurt_gap = [], []
    for D in (8.0, 64.0, 2048.0, 1e6):
        e = kernel_noise(z, D, np.random.default_rng(int(D)))
        c = e.flatten()
        var, kurt = float(c.var()), float((c**4).mean() / c.var() ** 2)
        # Student-t with D degrees of freedom: variance D / (D - 2), kurtosis 3 + 6 / (D - 4)
        assert var == pytest.approx(D / (D - 2), rel=0.03)
        assert kurt == pytest.approx(3 + 6 / (D - 4), rel=0.06)
        var_gap.append(abs(var - 1))
        kurt_gap.append(abs(kurt - 3))
    assert var_gap[0] > var_gap[1] > var_gap[2] and kurt_gap[0] > kurt_gap[1] > kurt_gap[2]
    r = (e.norm(dim=1)).numpy()  # D = 1e6: the chi law of a Gaussian's norm
    assert stats.kstest(r[:5000], stats.chi(n_dims).cdf).pvalue > 1e-3
    assert torch.equal(kernel_noise(z, math.inf, np.random.default_rng(0)), z)


def test_prior_radius_and_reproducibility():
    shape, D, s_max = (2, 3), 5.0, 80.0
    x = prior(torch.arange(3000), shape, D, s_max, seed=4, dtype=torch.float64)
    rho2 = ((x.flatten(1).norm(dim=1) / (s_max * math.sqrt(D))) ** 2).numpy()
    assert stats.kstest(rho2, stats.betaprime(6 / 2, D / 2).cdf).pvalue > 1e-3  # (R / r_max)^2 ~ BetaPrime(N/2, D/2)
    assert stats.kstest(rho2, stats.betaprime(6 / 2, 2 * D).cdf).pvalue < 1e-6  # another D is rejected
    assert torch.equal(prior(torch.arange(7), shape, D, s_max, seed=4, dtype=torch.float64), x[:7])  # per sample
    assert torch.equal(
        prior(torch.arange(5), shape, math.inf, s_max, seed=4), s_max * counter_normal(4, torch.arange(5), 0, shape)
    )  # D = inf: dpmlab.sample's start


def test_sigma_ode_is_the_field_ode_of_the_augmented_space():
    """(x - E_{p_r}[y | x]) / sigma = sqrt(D) E_x / E_r with the Coulomb field of the data in N + D dims."""
    g = torch.Generator().manual_seed(5)
    N, D, sigma = 2, 3, 0.7
    y = torch.randn(4, N, dtype=torch.float64, generator=g)
    x = torch.randn(N, dtype=torch.float64, generator=g)
    r = sigma * math.sqrt(D)
    w = ((x - y).square().sum(1) + r * r) ** (-(N + D) / 2)  # ∝ p_r(x | y_i)
    denoised = (w[:, None] * y).sum(0) / w.sum()  # the ideal network output E[y | x]
    zdir = torch.randn(D, dtype=torch.float64, generator=g)
    xt = torch.cat([x, r * zdir / zdir.norm()])  # a point of the augmented space at radius r
    yt = torch.cat([y, torch.zeros(4, D, dtype=torch.float64)], 1)
    diff = xt - yt
    field = (diff / diff.norm(dim=1, keepdim=True) ** (N + D)).sum(0)
    e_x, e_r = field[:N], field[N:] @ (zdir / zdir.norm())
    torch.testing.assert_close((x - denoised) / sigma, math.sqrt(D) * e_x / e_r, rtol=1e-12, atol=1e-12)


def _toy(n=256):
    return Dataset("toy", toy2d("gaussian_mixture", n, seed=1).x)


TRAIN = TrainConfig(steps=6, batch_size=32, lr=1e-3, warmup=0, ema_decay=0.9, checkpoint_every=3, log_every=3, seed=2)
NET = {"width": 32, "depth": 2, "time_dim": 16}


def _recipe(D, **train):
    return MethodRecipe("pf", "pfgmpp", PFGMPP(D=D, net_config=NET), train=TrainConfig(**{**TRAIN.__dict__, **train}))


def test_infinite_D_is_the_edm_objective_exactly(tmp_path):
    ds = _toy()
    edm = DiffusionObjective(
        Recipe.from_dict(
            {
                "name": "pf",
                "model": {"net": "mlp", "objective": "edm", "net_config": {"data_shape": [2], **NET}},
                "train": TRAIN.__dict__,
            }
        ),
        ds,
    )
    pf = PFGMPPObjective(_recipe(math.inf), ds)
    for k, v in edm.module.state_dict().items():
        assert torch.equal(v, pf.module.state_dict()[k])
    idx = torch.arange(32)
    b_edm, b_pf = edm.draw(idx, torch.Generator().manual_seed(9)), pf.draw(idx, torch.Generator().manual_seed(9))
    assert all(torch.equal(b_edm[k], b_pf[k]) for k in b_edm) and set(b_edm) == set(b_pf)
    assert torch.equal(edm.loss(edm.module, b_edm), pf.loss(pf.module, b_pf))
    fit(edm, TRAIN, tmp_path / "edm", progress=False)
    fit(pf, TRAIN, tmp_path / "pf", progress=False)
    for k, v in edm.module.state_dict().items():
        assert torch.equal(v, pf.module.state_dict()[k]), k
    # not vacuous: a finite D changes the draw (a rescaled eps of the same directions) and the loss
    b_fin = PFGMPPObjective(_recipe(64.0), ds).draw(idx, torch.Generator().manual_seed(9))
    assert not torch.equal(b_fin["eps"], b_edm["eps"])
    torch.testing.assert_close(
        b_fin["eps"] / b_fin["eps"].norm(dim=1, keepdim=True), b_edm["eps"] / b_edm["eps"].norm(dim=1, keepdim=True)
    )


def _analytic(name="gmm2d"):
    """The exact x0 of a mixture on EDM's schedule (a stand-in network)."""
    return dpmlab.models.analytic.preset(name).denoiser(EDM())


def test_sampler_infinite_D_equals_dpmlab_sample_and_noise_injection():
    model = _analytic()
    a = sample(model, 40, D=math.inf, solver="heun", nfe=11, seed=3)
    b = dpmlab.sample(model, 40, solver="heun", nfe=11, seed=3, grid="karras", to_zero=True)
    assert torch.equal(a, b)
    assert torch.equal(sample(model, 40, D=math.inf, solver="heun", nfe=11, seed=3, alpha=0.0), a)
    # alpha > 0: x + alpha sigma_i z before each step, z the step's seeded noise (sub-stream 15)
    ts = dpmlab.api.make_grid(model.schedule, "karras", 4, to_zero=True)
    x = prior(torch.arange(40), (2,), 16.0, float(ts[0]), seed=3)
    problem = Problem(model, model.schedule, noise=dpmlab.solvers.SeededNoise(3, torch.arange(40)))
    for i in range(4):
        x = x + 0.2 * float(ts[i]) * problem.randn(i, x, sub=15)
        x, _ = get("euler").step(problem, x, ts, i, None)
    torch.testing.assert_close(sample(model, 40, D=16.0, solver="euler", nfe=4, seed=3, alpha=0.2), x)
    with pytest.raises(ValueError, match="stochastic .* use a deterministic solver"):
        sample(model, 4, D=16.0, solver=get("ddim", eta=1.0), nfe=4)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0, got -0.1"):
        sample(model, 4, D=16.0, nfe=4, alpha=-0.1)


def test_settings_errors_are_clear():
    with pytest.raises(ValueError, match="PFGM\\+\\+ D must be a positive number or 'inf', got 0"):
        PFGMPP(D=0)
    with pytest.raises(ValueError, match="got 'infinite'"):
        PFGMPP(D="infinite")
    with pytest.raises(ValueError, match="unknown PFGM\\+\\+ method fields: N; allowed: D, net"):
        PFGMPP.from_dict({"N": 3})
    assert PFGMPP.from_dict(PFGMPP(D="inf").to_dict()).D == math.inf and PFGMPP(D="inf").to_dict()["D"] == "inf"
    with pytest.raises(ValueError, match="unknown method 'pfgm'; allowed: .*pfgmpp"):
        MethodRecipe.from_dict({"name": "x", "method": {"name": "pfgm"}})
    with pytest.raises(ValueError, match="a 'method' section makes a method recipe"):
        dpmlab.training.load_recipe(ROOT / "recipes" / "methods" / "pfgmpp_digits8.json")


def test_recipe_trains_through_the_cli_and_samples(tmp_path, capsys):
    recipe = load_recipe(ROOT / "recipes" / "methods" / "pfgmpp_digits8.json")
    assert recipe.method == "pfgmpp" and recipe.settings.D == 128 and recipe.data.name == "digits8"
    out = tmp_path / "run"
    args = [
        "train",
        "--recipe",
        str(ROOT / "recipes" / "methods" / "pfgmpp_digits8.json"),
        "--data",
        "moons",
        "--steps",
        "400",
        "--out",
        str(out),
        "-q",
        "--lr",
        "3e-3",
        "--ema-decay",
        "0.99",
        "--set",
        "method.D=4",
        "--set",
        "method.net_config.width=64",
        "--set",
        "train.warmup=20",
        "--set",
        "train.checkpoint_every=200",
    ]
    assert main(args) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["method"]["name"] == "pfgmpp" and card["method"]["settings"]["D"] == 4 and card["steps"] == 400
    model = load(out)
    assert model.settings.D == 4 and model.denoiser.data_shape == (2,)
    data = toy2d("moons", 2000, seed=7).x
    x = model.sample(2000, nfe=21, seed=1)
    start = model.prior(2000, seed=1)
    assert start.norm(dim=1).median() > 100  # the prior sits at r_max = 80 * 2
    sw, sw_noise = sliced_wasserstein(x, data), sliced_wasserstein(torch.randn(2000, 2) * data.std(0), data)
    assert sw < 0.6 * sw_noise, (sw, sw_noise)  # measured 0.14 vs 0.30 (two moon samples: 0.05)
    assert sliced_wasserstein(model.sample(2000, nfe=21, seed=1, alpha=0.1), data) < sw_noise
    # the plain loader refuses the file (it would sample the D = inf prior); the checkpoint loads here too
    assert main(["sample", "--model", str(out), "-n", "4", "--out", str(tmp_path / "s.png"), "-q"]) == 2
    assert "dpmlab.methods.load(path)" in capsys.readouterr().err
    ck = load(out / "checkpoint.safetensors")
    torch.testing.assert_close(ck.sample(8, nfe=5), model.sample(8, nfe=5))
    # resume continues on the same trainer (only train.steps may change)
    assert main([*args[:6], "410", *args[7:], "--resume"]) == 0
    assert json.loads((out / "model.json").read_text())["steps"] == 410
