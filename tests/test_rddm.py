"""RDDM (dpmlab.methods.rddm): the authors' coefficient schedules, the forward process, RDDM = DDIM step for step
in float64 under the coefficient transform (eta = 0, and any per-step sigma), RDDM's own eta, clipping, and
restoration / generation trained through the CLI recipe."""

import json
import math
from pathlib import Path

import pytest
import torch

import dpmlab.methods.rddm as rddm
from dpmlab._utils import counter_normal
from dpmlab.cli import main
from dpmlab.methods import MethodRecipe, load, load_recipe
from dpmlab.methods.rddm import RDDM, Degradation, RDDMSchedule, predictor_from_denoiser, rddm_step, sample
from dpmlab.models.analytic import preset
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import Problem, SeededNoise, get, iterate
from dpmlab.training.data import digits8

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def test_schedule_is_the_authors_gen_coefficients():
    s = RDDMSchedule.residual(4, sum_scale=0.01)
    # alpha "decreased": (4, 3, 2, 1) / 10; beta^2 "increased": (1, 2, 3, 4) / 10 * sum_scale
    torch.testing.assert_close(s.alpha_cumsum, torch.tensor([0.4, 0.7, 0.9, 1.0], dtype=torch.float64))
    torch.testing.assert_close(s.beta2_cumsum, torch.tensor([0.001, 0.003, 0.006, 0.01], dtype=torch.float64))
    torch.testing.assert_close(rddm.coefficients(5, "average"), torch.full((5,), 0.2, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    x0, x_in, eps = (torch.randn(3, 2, generator=g, dtype=torch.float64) for _ in range(3))
    last, clean = torch.full((3,), 3), torch.full((3,), -1)
    torch.testing.assert_close(s.q_sample(x0, x_in, last, eps), x_in + 0.1 * eps)  # x_T = I_in + bbar_T eps
    assert torch.equal(s.q_sample(x0, x_in, clean, eps), x0)
    torch.testing.assert_close(
        s.q_sample(x0, x_in, torch.full((3,), 1), eps), x0 + 0.7 * (x_in - x0) + 0.003**0.5 * eps
    )
    with pytest.raises(ValueError, match="'rising' is not a valid Shape"):
        RDDMSchedule.residual(4, alpha="rising")
    with pytest.raises(ValueError, match="need an int T >= 2 and 0 < sum_scale <= 1, got T=4, sum_scale=2"):
        RDDMSchedule.residual(4, sum_scale=2)


def test_coefficient_transform_gives_the_ddpm_marginal():
    vp = DiscreteVP.from_preset("linear")
    s = RDDMSchedule.from_vp(vp.alphas_cumprod)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 10, 400, 800, 999])
    torch.testing.assert_close(
        s.q_sample(x0, torch.zeros_like(x0), t, eps), vp.add_noise(x0, eps, vp.index_to_t(t)), rtol=1e-12, atol=1e-12
    )


def _ddim_pair(steps, seed=3, n=16):
    """The RDDM sampler on the transformed schedule and dpmlab's DDIM on the same grid and start, both with the
    exact x0 of an 8-d mixture on the linear DDPM schedule (float64)."""
    vp = DiscreteVP.from_preset("linear")
    den = preset("gmm16").denoiser(vp)
    dim = den.data_shape[0]
    s = RDDMSchedule.from_vp(vp.alphas_cumprod)
    traj = []
    sample(
        predictor_from_denoiser(den, vp),
        s,
        torch.zeros(n, dim, dtype=torch.float64),
        steps,
        seed=seed,
        callback=lambda t, x: traj.append(x.clone()),
    )
    times = torch.linspace(-1, 999, steps + 1).int().tolist()[::-1]
    ts = torch.cat([vp.index_to_t(torch.tensor(times[:-1])), torch.zeros(1, dtype=torch.float64)])
    x = (1 - vp.alphas_cumprod[-1]).sqrt() * counter_normal(seed, torch.arange(n), 0, (dim,), dtype=torch.float64)
    return traj, list(iterate(Problem(den, vp), x, ts, get("ddim"))), den, vp, s, times


@pytest.mark.parametrize("steps", [5, 10, 50])
def test_rddm_equals_ddim_step_for_step(steps):
    traj, infos, *_ = _ddim_pair(steps)
    assert len(traj) == len(infos) == steps
    for x_rddm, info in zip(traj, infos):
        assert float((x_rddm - info.x).abs().max()) < 1e-10
    assert float(infos[0].x.abs().max()) > 0.1  # not vacuous


def test_any_per_step_sigma_is_the_ddim_form_and_rddm_eta_is_not_ddims():
    """With DDIM(eta)'s noise std, rddm_step reproduces DDIM(eta) step for step; RDDM's own sigma^2 =
    eta beta^2 bbar_s^2 / bbar_t^2 is abar^DDPM_s times DDIM(eta=1)'s variance."""
    _, _, den, vp, s, times = _ddim_pair(5)
    n, dim, eta = 8, den.data_shape[0], 0.7
    x = (1 - vp.alphas_cumprod[-1]).sqrt() * counter_normal(5, torch.arange(n), 0, (dim,), dtype=torch.float64)
    ts = torch.cat([vp.index_to_t(torch.tensor(times[:-1])), torch.zeros(1, dtype=torch.float64)])
    problem = Problem(den, vp, noise=SeededNoise(5, torch.arange(n)))
    predict = predictor_from_denoiser(den, vp)
    for i, info in enumerate(iterate(problem, x, ts, get("ddim", eta=eta))):
        t, u = times[i], times[i + 1]
        if u < 0:
            break
        a_t, a_s = float(vp.alphas_cumprod[t]), float(vp.alphas_cumprod[u])
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))  # DDIM eq. 16
        res, eps = predict(x, torch.zeros_like(x), torch.full((n,), t))
        z = problem.randn(i, x)
        x = rddm_step(
            x,
            res,
            eps,
            *(float(s.alpha_cumsum[k]) for k in (t, u)),
            *(float(s.beta2_cumsum[k]) for k in (t, u)),
            sigma,
            z,
        )
        assert float((x - info.x).abs().max()) < 1e-10, i
    # the sampler's eta = 1, first step, against the closed form sqrt(abar_s) * DDIM(eta=1) std
    first = []
    x_in = torch.zeros(n, dim, dtype=torch.float64)
    sample(predict, s, x_in, 5, eta=1.0, seed=5, callback=lambda t, x: first.append(x.clone()))
    x_t = math.sqrt(float(s.beta2_cumsum[-1])) * counter_normal(5, torch.arange(n), 0, (dim,), dtype=torch.float64)
    a_t, a_s = float(vp.alphas_cumprod[999]), float(vp.alphas_cumprod[799])
    sigma = math.sqrt(a_s) * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
    res, eps = predict(x_t, x_in, torch.full((n,), 999))
    want = rddm_step(
        x_t,
        res,
        eps,
        float(s.alpha_cumsum[999]),
        float(s.alpha_cumsum[799]),
        float(s.beta2_cumsum[999]),
        float(s.beta2_cumsum[799]),
        sigma,
        problem.randn(0, x_t),
    )
    assert float((first[0] - want).abs().max()) < 1e-10


def test_clip_keeps_the_residual_consistent_with_data_in_range():
    s = RDDMSchedule.residual(10, sum_scale=0.01)
    x_in = torch.full((2, 3), -0.8, dtype=torch.float64)  # a dark input; the truth may be bright: res down to -1.8

    def predict(x, xi, t):
        return torch.full_like(x, -1.7), torch.zeros_like(x)

    x_t = x_in + 0.1 * counter_normal(0, torch.arange(2), 0, (3,), dtype=torch.float64)
    # abar_T = 1: the output is I_0^ = x_T - res (eps^ = 0), res kept within [I_in - 1, I_in + 1], I_0^ in [-1, 1]
    torch.testing.assert_close(sample(predict, s, x_in, 2, clip=True), (x_t + 1.7).clamp(-1, 1))
    out_far = sample(lambda x, xi, t: (torch.full_like(x, -3.0), torch.zeros_like(x)), s, x_in, 2, clip=True)
    torch.testing.assert_close(out_far, (x_t + 1.8).clamp(-1, 1))  # the authors' [-1, 1] would give x_T + 1
    torch.testing.assert_close(sample(predict, s, x_in, 2, clip=False), x_t + 1.7)


def test_settings_and_errors():
    r = RDDM.from_dict({"degradation": {"kind": "noise", "level": 0.3}, "alpha": "average"})
    assert r.degradation == Degradation("noise", 0.3) and r.schedule().beta2_cumsum[-1] == pytest.approx(0.01)
    assert RDDM().schedule().beta2_cumsum[-1] == pytest.approx(1.0)  # generation: x_T = eps
    assert RDDM.from_dict(r.to_dict()) == r
    with pytest.raises(ValueError, match="RDDM loss must be 'l1' or 'l2', got 'huber'"):
        RDDM(loss="huber")
    with pytest.raises(ValueError, match="'blur' is not a valid Kind"):
        RDDM.from_dict({"degradation": {"kind": "blur"}})
    with pytest.raises(ValueError, match="need an int 1 <= steps <= T=4"):
        sample(lambda x, xi, t: (x, x), RDDMSchedule.residual(4), torch.zeros(1, 2), 5)
    for path in sorted((ROOT / "recipes" / "methods").glob("rddm_*.json")):
        assert load_recipe(path).method == "rddm"


def test_restoration_and_generation_through_the_cli(tmp_path, capsys):
    out = tmp_path / "lowlight"
    recipe = ROOT / "recipes" / "methods" / "rddm_digits8_lowlight.json"
    args = [
        "train",
        "--recipe",
        str(recipe),
        "--steps",
        "300",
        "--out",
        str(out),
        "-q",
        "--lr",
        "3e-3",
        "--ema-decay",
        "0.99",
        "--set",
        "method.net_config.width=96",
        "--set",
        "train.checkpoint_every=300",
    ]
    assert main(args) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["method"]["name"] == "rddm" and card["method"]["settings"]["net_config"]["data_shape"] == [2, 8, 8]
    model = load(out)
    clean = digits8().x[:200]
    x_in = model.degrade(clean, seed=1)
    restored = model.sample(x_in, steps=5)
    mse_in, mse_out = float((x_in - clean).square().mean()), float((restored - clean).square().mean())
    assert mse_out < 0.25 * mse_in, (mse_in, mse_out)
    assert torch.equal(model.sample(x_in[:7], steps=5), restored[:7])  # eta = 0, noise per sample index
    assert main(["sample", "--model", str(out), "-n", "4", "--out", str(tmp_path / "s.png"), "-q"]) == 2
    assert "dpmlab.methods.load(path)" in capsys.readouterr().err
    with pytest.raises(ValueError, match="give x_in \\(restoration\\) or n \\(generation\\), not both"):
        model.sample()
    with pytest.raises(ValueError, match="x_in must have shape \\(B, 1, 8, 8\\), got \\(3, 64\\)"):
        model.sample(torch.zeros(3, 64))
    # generation (I_in = 0): the same objective, another recipe
    gen = tmp_path / "gen"
    assert (
        main(
            [
                "train",
                "--recipe",
                str(ROOT / "recipes" / "methods" / "rddm_digits8_generation.json"),
                "--steps",
                "20",
                "--out",
                str(gen),
                "-q",
                "--set",
                "method.net_config.width=32",
            ]
        )
        == 0
    )
    x = load(gen).sample(n=6, steps=4, eta=1.0, seed=2)
    assert x.shape == (6, 1, 8, 8) and torch.isfinite(x).all() and float(x.abs().max()) <= 1.0
    rec = MethodRecipe.from_dict(json.loads((gen / "model.json").read_text())["recipe"])
    assert rec.settings.degradation.kind.value == "none"
