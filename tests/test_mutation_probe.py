"""Issue 16's mutation probe: each test here kills one mutation that used to survive the whole suite (named in
the test's docstring). They check exact values, so the thresholds are float64 round-off unless said otherwise."""

import math

import numpy as np
import pytest
import torch

import dpmlab
from dpmlab.metrics.distances import precision_recall
from dpmlab.models.analytic import preset
from dpmlab.models.guidance import Unconditional, classifier_free
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import DDPM, Problem
from dpmlab.solvers.ddpm import posterior
from dpmlab.solvers.time_shift import shifted_time
from dpmlab.timesteps import trailing
from dpmlab.training import DiffusionObjective, Recipe
from dpmlab.training.data import Dataset

SCH = DiscreteVP.from_preset("linear")


def test_ddpm_step_variances_are_beta_tilde_and_beta():
    """Mutation: DDPM ``fixed_large`` variance x 1.3 (or fixed_small's). On a VP grid the one-step posterior
    variances are beta~ = (1 - abar_n) / (1 - abar_t) * beta' and beta' = 1 - abar_t / abar_n (DDPM eq. 7,
    respaced as iDDPM); the empirical variance of the step's added noise equals them."""
    ts = trailing(SCH, 10)
    x = torch.zeros(20000, 1, dtype=torch.float64)
    model = preset("gmm2d").denoiser(SCH)

    def zero(x, t, **c):
        return torch.zeros_like(x)

    i = 3
    abar_t, abar_n = float(SCH.alpha(ts[i : i + 1])) ** 2, float(SCH.alpha(ts[i + 1 : i + 2])) ** 2
    beta = 1 - abar_t / abar_n
    beta_tilde = (1 - abar_n) / (1 - abar_t) * beta
    _, var_small, var_large = posterior(Problem(zero, SCH), x, ts, i)
    assert math.isclose(var_small, beta_tilde, rel_tol=1e-10) and math.isclose(var_large, beta, rel_tol=1e-10)
    for variance, want in (("fixed_small", beta_tilde), ("fixed_large", beta)):
        problem = Problem(
            zero,
            SCH,
            noise=lambda stream, like: torch.randn(
                like.shape, dtype=like.dtype, generator=torch.Generator().manual_seed(stream)
            ),
        )
        out, _ = DDPM(variance=variance).step(problem, x, ts, i, None)  # mean 0: x = 0, x0 = 0
        got = float(out.var())
        # 20,000 draws: the sample variance's relative standard error is sqrt(2/n) = 1%; 5% is 5 sigma
        assert abs(got / want - 1) < 0.05, (variance, got, want)
    del model


def test_classifier_free_guidance_through_unconditional_uses_the_null_class():
    """Mutation: CFG through ``Unconditional`` made a no-op (the unconditional branch = the conditional one).
    x0 = x0_u + w (x0_c - x0_u) with x0_u the model called WITHOUT its label."""
    calls = []

    def net(x, t, label=None):
        calls.append(label)
        return x * (0.0 if label is None else 1.0) + (0.5 if label is None else 2.0)

    x, t = torch.ones(3, 2), torch.full((3,), 0.5)
    guided = classifier_free(net, Unconditional(net), 3.0)
    out = guided(x, t, label=torch.tensor([1, 2, 3]))
    x0_c, x0_u = x + 2.0, torch.full_like(x, 0.5)
    torch.testing.assert_close(out, x0_u + 3.0 * (x0_c - x0_u))
    assert sum(c is None for c in calls) == 1  # one call without the label


def test_training_drops_labels_at_the_configured_rate():
    """Mutation: ``train.label_dropout`` ignored (set to 0). The null class (index = number of classes) appears
    in a drawn batch at the configured rate."""
    data = Dataset("tiny", torch.zeros(64, 1, 8, 8), torch.arange(64) % 4, ("a", "b", "c", "d"))
    recipe = Recipe.from_dict(
        {
            "name": "t",
            "data": {"name": "digits8"},
            "model": {
                "net": "unet",
                "objective": "eps",
                "net_config": {
                    "image_size": 8,
                    "model_channels": 8,
                    "channel_mult": [1],
                    "num_res_blocks": 1,
                    "num_heads": 1,
                    "groups": 4,
                    "num_classes": 4,
                },
            },
            "train": {"steps": 1, "batch_size": 64, "label_dropout": 0.3},
        }
    )
    obj = DiffusionObjective(recipe, data)
    g = torch.Generator().manual_seed(0)
    nulls = sum(int((obj.draw(torch.arange(64), g)["label"] == 4).sum()) for _ in range(50))
    rate = nulls / (50 * 64)
    assert abs(rate - 0.3) < 0.03  # 3,200 Bernoulli(0.3) draws: standard error 0.008, so 0.03 is ~4 sigma


def test_precision_and_recall_are_different_quantities():
    """Mutation: ``recall = precision``. Fakes that cover only one of two real clusters: every fake lies on
    the real manifold (precision 1) but half the reals are far from every fake (recall 0.5)."""
    g = torch.Generator().manual_seed(0)
    real = torch.cat([torch.randn(200, 2, generator=g) * 0.1, torch.randn(200, 2, generator=g) * 0.1 + 10.0])
    fake = torch.randn(200, 2, generator=g) * 0.1
    pr = precision_recall(real, fake, k=3)
    assert pr.precision > 0.95 and abs(pr.recall - 0.5) < 0.05


def test_time_shift_matches_variance_including_the_data_term():
    """Mutation: Time-Shift's ``data_var`` term dropped. The chosen time minimises |Var(x) - sigma^2 -
    data_var alpha^2| over the window; with data_var > 0 the choice differs from data_var = 0 and equals the
    brute-force minimiser computed here."""
    x = torch.randn(4, 4096, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 0.55**0.5
    t = 0.27  # sigma^2 = 0.55 near t = 0.27 (data_var 0), sigma^2 = 0.44 near t = 0.24 (data_var 0.2)
    for v0 in (0.0, 0.2):
        got = shifted_time(SCH, x, t, window=200, n_train=1000, data_var=v0)
        cand = torch.clamp(t + torch.arange(-100, 101, dtype=torch.float64) / 1000, SCH.t_min, SCH.t_max)
        target = SCH.sigma(cand) ** 2 + v0 * SCH.alpha(cand) ** 2
        want = cand[(x.var(1)[:, None] - target[None]).abs().argmin(1)]
        assert torch.equal(got, want)
    a, b = shifted_time(SCH, x, t, 200, 1000, 0.0), shifted_time(SCH, x, t, 200, 1000, 0.2)
    assert bool((b < a - 0.01).all()) and bool((a - t).abs().max() < 0.09)  # inside the window, not at its edge


def test_cli_artifact_changes_the_samples(tmp_path):
    """Mutation: ``dpmlab sample --artifact`` ignored. Samples with a fitted DC-ratio artifact equal the API's
    with the artifact's ratios, and differ from ``--artifact none``."""
    from dpmlab.cli import main
    from dpmlab.solvers.dc_solver import DCRatios

    art = tmp_path / "dc.safetensors"
    ratios = (1.0, 1.0, 0.8, 1.3, 0.9, 1.1)
    DCRatios(ratios, dc_order=2, model="gmm16").save(art)
    out = {}
    for name, a in (("fit", str(art)), ("none", "none")):
        raw = tmp_path / f"{name}.npz"
        assert (
            main(
                [
                    "sample",
                    "--model",
                    "gmm16",
                    "--solver",
                    "dc_solver",
                    "--artifact",
                    a,
                    "--nfe",
                    "6",
                    "-n",
                    "16",
                    "--out",
                    str(tmp_path / f"{name}.png"),
                    "--raw",
                    str(raw),
                    "-q",
                ]
            )
            == 0
        )
        out[name] = np.load(raw)["samples"]
    api = dpmlab.sample("gmm16", 16, solver="dc_solver", nfe=6, ratios=ratios, dc_order=2)
    assert np.array_equal(out["fit"], api.numpy())
    assert np.abs(out["fit"] - out["none"]).max() > 1e-3


@pytest.mark.parametrize("bad", [{"variance": "learned"}])
def test_ddpm_refuses_unknown_variance(bad):
    with pytest.raises(ValueError, match="unknown variance 'learned'; allowed: fixed_small, fixed_large"):
        DDPM(**bad)
