"""DiffuseVAE (dpmlab.methods.diffusevae): Form-2's forward process is the paper's one-step chain and a DDPM on
x0 - x^; an exact-eps network makes sampling return x0 through the Denoiser (both forms, any solver); the VAE's KL
is the closed form; CFG scale 1 is the conditional model and other scales are the authors' eps combination; the
UNet's concatenated conditioning; the latent GMM; the two recipes trained through the CLI, with controllable
synthesis (noise fixed, z varied)."""

import json
from pathlib import Path

import pytest
import torch

import dpmlab
from dpmlab.cli import main
from dpmlab.methods import MethodRecipe, load, load_recipe
from dpmlab.methods.diffusevae import (
    Clipped,
    ConvVAE,
    DiffuseVAE,
    DiffuseVAEModel,
    Form,
    LatentGMM,
    VAEStage,
    q_sample,
)
from dpmlab.models.denoiser import Denoiser
from dpmlab.models.unet import UNet, UNetConfig
from dpmlab.schedules import get_schedule
from dpmlab.training.data import digits8

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def test_form2_forward_process_is_the_papers_chain_and_a_ddpm_on_the_residual():
    vp = get_schedule("linear")
    ab = vp.alphas_cumprod
    betas = 1 - ab / torch.cat([torch.ones(1, dtype=torch.float64), ab[:-1]])
    g = torch.Generator().manual_seed(0)
    x0, x_hat = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)
    # q(x_t | x_{t-1}, x^) = N(sqrt(1 - b_t) x_{t-1} + (1 - sqrt(1 - b_t)) x^, b_t I), iterated from x_0
    mean, var = x0.clone(), torch.zeros((), dtype=torch.float64)
    for t in range(len(betas)):
        mean = (1 - betas[t]).sqrt() * mean + (1 - (1 - betas[t]).sqrt()) * x_hat
        var = (1 - betas[t]) * var + betas[t]
        if t in (0, 9, 499, 999):
            a, s = ab[t].sqrt(), (1 - ab[t]).sqrt()
            torch.testing.assert_close(
                q_sample(x0, x_hat, a, s, torch.zeros_like(x0), "form2"), mean, rtol=0, atol=1e-12
            )
            assert float(var) == pytest.approx(float(s**2), abs=1e-12)
    # x_T ~ N(x^, I); minus x^ it is the DDPM of y = x0 - x^; Form-1 is the plain DDPM
    eps = torch.randn(4, 6, generator=g, dtype=torch.float64)
    a, s = ab[-1].sqrt(), (1 - ab[-1]).sqrt()
    torch.testing.assert_close(
        q_sample(x0, x_hat, a, s, torch.zeros_like(x0), Form.FORM2), x_hat, atol=0.03, rtol=0
    )  # alpha_T = 0.0064
    t = torch.tensor(0.37, dtype=torch.float64)
    a, s = vp.alpha(t), vp.sigma(t)
    torch.testing.assert_close(q_sample(x0, x_hat, a, s, eps, "form2") - x_hat, vp.add_noise(x0 - x_hat, eps, t))
    torch.testing.assert_close(q_sample(x0, x_hat, a, s, eps, "form1"), vp.add_noise(x0, eps, t))


def _vae(latent: int = 4) -> ConvVAE:
    torch.manual_seed(0)
    return ConvVAE(VAEStage(latent_dim=latent, width=8), (1, 8, 8)).eval().requires_grad_(False)


class ExactEps:
    """The network that knows x0: eps = (s - alpha y) / sigma at the state s, y = x0 (Form-1) or x0 - x^ (Form-2)."""

    def __init__(self, x0: torch.Tensor, form: Form) -> None:
        self.x0, self.form, self.sch = x0, form, get_schedule("linear")

    def __call__(self, x, t, x_hat=None):
        tt = self.sch.index_to_t(t.double())
        a, s = (v(tt).reshape(-1, 1, 1, 1).float() for v in (self.sch.alpha, self.sch.sigma))
        y = self.x0 - x_hat if self.form is Form.FORM2 else self.x0
        return (x - a * y) / s


@pytest.mark.parametrize("form", [Form.FORM1, Form.FORM2])
def test_exact_eps_network_samples_x0_through_the_denoiser(form):
    vae = _vae()
    x0 = digits8().x[:6]
    den = Denoiser(ExactEps(x0, form), get_schedule("linear"), "eps", data_shape=(1, 8, 8))
    model = DiffuseVAEModel(vae, den, DiffuseVAE(vae="unused", form=form))
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    for solver, nfe in (("ddim", 4), ("dpm_solver_pp", 6), ("heun", 7), ("unipc", 5)):
        x, x_hat = model.sample(z=z, solver=solver, nfe=nfe, to_zero=True, seed=3, return_x_hat=True)
        torch.testing.assert_close(x, x0, atol=2e-4, rtol=0)  # exact x0 predictions: every solver lands on x0
    assert float((x_hat - x0).abs().max()) > 0.5  # not vacuous: the (untrained) reconstruction is far from x0
    # with to_zero=False the grid stops at t_min: the deterministic path stays on the ray alpha y + sigma eps_T
    x = model.sample(z=z, solver="ddim", nfe=4, seed=3, to_zero=False)
    sch = den.schedule
    y = x0 - x_hat if form is Form.FORM2 else x0
    start = dpmlab._utils.counter_normal(3, torch.arange(6), 0, (1, 8, 8))
    t_min = torch.tensor(sch.t_min, dtype=torch.float64)
    want = float(sch.alpha(t_min)) * y + float(sch.sigma(t_min)) * start
    torch.testing.assert_close(x - (x_hat if form is Form.FORM2 else 0), want, atol=2e-4, rtol=0)


def test_vae_kl_is_the_closed_form_and_the_objective_is_the_authors_loss():
    g = torch.Generator().manual_seed(2)
    mu, logvar = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(2))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, (0.5 * logvar).exp()), torch.distributions.Normal(0.0, 1.0)
    ).sum(1)
    torch.testing.assert_close(ConvVAE.kl(mu, logvar), ref)
    assert float(ConvVAE.kl(torch.zeros(1, 3), torch.zeros(1, 3))) == 0.0
    recipe = MethodRecipe.from_dict(
        {
            "name": "v",
            "method": {"name": "diffusevae_vae", "latent_dim": 3, "width": 8, "beta": 0.3},
            "data": {"name": "digits8"},
        }
    )
    from dpmlab.methods.diffusevae import VAEObjective
    from dpmlab.training.data import load_data

    obj = VAEObjective(recipe, load_data(recipe.data))
    batch = obj.draw(torch.arange(4), torch.Generator().manual_seed(0))
    x01 = batch["x0"] * 0.5 + 0.5
    m, lv = obj.module.encode(x01)
    rec = obj.module.decode(m + (0.5 * lv).exp() * batch["e"])
    want = ((rec - x01) ** 2).sum((1, 2, 3)) + 0.3 * ConvVAE.kl(m, lv)
    torch.testing.assert_close(obj.loss(obj.module, batch), want.mean())


def _trained_like_net(form: Form = Form.FORM1) -> DiffuseVAEModel:
    torch.manual_seed(5)
    unet = UNet(
        UNetConfig(
            image_size=8,
            in_channels=1,
            cond_channels=1,
            model_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            num_heads=2,
            groups=4,
        )
    )
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # zero-initialised output: make the net non-trivial
    from dpmlab.methods.diffusevae import DiffuseVAENet

    net = DiffuseVAENet(_vae(), unet).eval().requires_grad_(False)
    den = Denoiser(net, get_schedule("linear"), "eps", data_shape=(1, 8, 8))
    return DiffuseVAEModel(net.vae, den, DiffuseVAE(vae="unused", form=form))


def test_cfg_scale_one_is_conditional_and_scale_w_is_the_authors_eps_combination():
    model = _trained_like_net()
    g = torch.Generator().manual_seed(0)
    x, x_hat = torch.randn(5, 1, 8, 8, generator=g), torch.randn(5, 1, 8, 8, generator=g)
    t = torch.full((5,), 0.4, dtype=torch.float64)
    cond = model.denoiser(x, t, x_hat=x_hat)
    assert model.guided(1.0) is model.denoiser
    assert torch.equal(model.guided(1.0)(x, t, x_hat=x_hat), cond)
    c2 = Clipped(model.denoiser, Form.FORM2)(x, t, x_hat=x_hat)  # Form-2 clips y^ + x^ to the data range
    torch.testing.assert_close(c2, (cond + x_hat).clamp(-1, 1) - x_hat)
    assert torch.equal(Clipped(model.denoiser, Form.FORM1)(x, t, x_hat=x_hat), cond.clamp(-1, 1))
    uncond = model.denoiser(x, t, x_hat=torch.zeros_like(x_hat))
    assert float((cond - uncond).abs().max()) > 1e-3  # the conditioning matters
    # authors: eps = (1 + w) eps(x^) - w eps(0), w = scale - 1
    sch, unet, tn = model.denoiser.schedule, model.denoiser.net.unet, get_schedule("linear").t_to_index(t).float()
    w = 1.5
    eps = (1 + w) * unet(x, tn, x_cond=x_hat) - w * unet(x, tn, x_cond=torch.zeros_like(x_hat))
    a, s = (v(t).reshape(-1, 1, 1, 1).float() for v in (sch.alpha, sch.sigma))
    torch.testing.assert_close(model.guided(1 + w)(x, t, x_hat=x_hat), (x - s * eps) / a, atol=1e-5, rtol=1e-5)
    # the DDIM sampler with guidance 1 equals the library's one-line sampler with cond x^
    z = torch.randn(4, 4, generator=g)
    x_ours, xh = model.sample(z=z, nfe=5, seed=7, return_x_hat=True, clip=False)
    torch.testing.assert_close(x_ours, dpmlab.sample(model.denoiser, 4, nfe=5, seed=7, cond={"x_hat": xh}))
    clipped = model.sample(z=z, nfe=5, seed=7)  # the authors' clip_denoised: x0 predictions within [-1, 1]
    assert float((clipped - x_ours).abs().max()) > 1e-3 and float(clipped.abs().max()) < 1.2


def test_unet_concatenated_conditioning_is_backwards_compatible():
    old = UNet(UNetConfig(image_size=8, model_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, groups=4))
    new = UNet(
        UNetConfig(
            image_size=8,
            model_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=1,
            num_heads=2,
            groups=4,
            cond_channels=2,
        )
    )
    so, sn = old.state_dict(), new.state_dict()
    assert so.keys() == sn.keys()
    assert [k for k in so if so[k].shape != sn[k].shape] == ["conv_in.weight"] and sn["conv_in.weight"].shape[1] == 3
    assert UNetConfig.from_dict({"image_size": 8}).cond_channels == 0  # old model files load unchanged
    torch.nn.init.normal_(new.conv_out.weight, std=0.1)
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 10.0)
    torch.testing.assert_close(new(x, t), new(x, t, x_cond=torch.zeros(3, 2, 8, 8)))
    with torch.no_grad():
        assert float((new(x, t, x_cond=torch.ones(3, 2, 8, 8)) - new(x, t)).abs().max()) > 1e-3
    with pytest.raises(ValueError, match="this UNet takes no x_cond \\(cond_channels=0\\)"):
        old(x, t, x_cond=x)
    with pytest.raises(ValueError, match="UNet x_cond must have shape \\(3, 2, 8, 8\\), got \\(3, 1, 8, 8\\)"):
        new(x, t, x_cond=x)
    with pytest.raises(ValueError, match="UNetConfig.cond_channels must be an int >= 0, got -1"):
        UNetConfig(cond_channels=-1)


def test_latent_gmm_prior(tmp_path):
    g = torch.Generator().manual_seed(0)
    comp = (torch.rand(3000, generator=g) >= 0.3).long()
    z = torch.tensor([[-3.0, 0.0], [3.0, 1.0]])[comp] + 0.5 * torch.randn(3000, 2, generator=g)
    gmm = LatentGMM.fit(z, 2, seed=0)
    order = gmm.means[:, 0].argsort()
    torch.testing.assert_close(gmm.weights[order], torch.tensor([0.3, 0.7], dtype=torch.float64), atol=0.03, rtol=0)
    torch.testing.assert_close(
        gmm.means[order], torch.tensor([[-3.0, 0.0], [3.0, 1.0]], dtype=torch.float64), atol=0.06, rtol=0
    )
    s = gmm.sample(torch.arange(20000), seed=4)
    assert float((s[:, 0] < 0).float().mean()) == pytest.approx(0.3, abs=0.015)
    assert float(s[s[:, 0] > 0].std(0).mean()) == pytest.approx(0.5, abs=0.03)
    assert torch.equal(s[7:9], gmm.sample(torch.arange(7, 9), seed=4))  # per-index draws
    gmm.save(tmp_path / "gmm.safetensors")
    back = LatentGMM.load(tmp_path / "gmm.safetensors")
    assert torch.equal(back.sample(torch.arange(5), seed=1), gmm.sample(torch.arange(5), seed=1))
    with pytest.raises(ValueError, match="n_components must be an int in \\[1, 3000\\], got 0"):
        LatentGMM.fit(z, 0)


def test_settings_errors():
    assert DiffuseVAE.from_dict(DiffuseVAE(form="form2").to_dict()).form is Form.FORM2
    with pytest.raises(ValueError, match="'form3' is not a valid Form"):
        DiffuseVAE(form="form3")
    with pytest.raises(ValueError, match="DiffuseVAE cfg_drop must be in \\[0, 1\\), got 1.0"):
        DiffuseVAE(cfg_drop=1.0)
    with pytest.raises(ValueError, match="VAE beta must be a finite number >= 0, got -1"):
        VAEStage(beta=-1)
    with pytest.raises(ValueError, match="side divisible by 2\\*\\*downs=8"):
        ConvVAE(VAEStage(downs=3), (1, 28, 28))
    model = _trained_like_net()
    with pytest.raises(ValueError, match="give n \\(prior draws\\) or z \\(latents\\), not both"):
        model.sample()
    with pytest.raises(ValueError, match="z must have shape \\(B, 4\\), got \\(2, 3\\)"):
        model.sample(z=torch.zeros(2, 3))


def test_two_stage_recipes_through_the_cli_and_controllable_synthesis(tmp_path, capsys):
    vae_run, run = tmp_path / "vae", tmp_path / "ddpm"
    assert (
        main(
            [
                "train",
                "--recipe",
                str(ROOT / "recipes" / "methods" / "diffusevae_vae_digits8.json"),
                "--steps",
                "150",
                "--out",
                str(vae_run),
                "-q",
                "--set",
                "method.width=8",
            ]
        )
        == 0
    )
    vae = load(vae_run)
    x = digits8().x[:300]
    with torch.no_grad():
        x_hat = vae.x_hat(x, torch.zeros(300, vae.settings.latent_dim))
    assert float((x_hat - x).square().mean()) < 0.6 * float(x.var())  # it reconstructs (measured 0.30 vs 0.58)
    args = [
        "train",
        "--recipe",
        str(ROOT / "recipes" / "methods" / "diffusevae_digits8.json"),
        "--steps",
        "20",
        "--out",
        str(run),
        "-q",
        "--set",
        f"method.vae={vae_run}",
        "--set",
        "method.net_config.model_channels=8",
        "--set",
        "method.net_config.num_heads=2",
        "--set",
        "method.net_config.groups=4",
        "--set",
        "train.checkpoint_every=10",
    ]
    assert main(args) == 0
    card = json.loads((run / "model.json").read_text())
    assert card["method"]["name"] == "diffusevae" and card["method"]["settings"]["net_config"]["cond_channels"] == 1
    model = load(run)
    assert isinstance(model, DiffuseVAEModel) and model.latent_dim == 8
    torch.testing.assert_close(model.vae.state_dict(), vae.state_dict())  # the frozen stage-1 weights ride along
    s = model.sample(6, nfe=3, seed=1)
    assert s.shape == (6, 1, 8, 8) and torch.isfinite(s).all()
    torch.testing.assert_close(load(run / "checkpoint.safetensors").sample(6, nfe=3, seed=1), s)
    # controllable synthesis: one fixed noise for every row; equal z give equal samples, the samples follow x^
    z0, z1 = model.latents(2, seed=3)
    out, xh = model.interpolate(z0, z0, steps=3, nfe=3)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    out, xh = model.interpolate(z0, z1, steps=5, nfe=3)
    assert not torch.equal(out[0], out[-1]) and not torch.equal(xh[0], xh[-1])
    gmm = model.fit_prior(x, 3)  # the paper's expressive prior on sampled training latents
    assert gmm.means.shape == (3, 8) and float(gmm.weights.sum()) == pytest.approx(1.0)
    assert model.sample(4, prior=gmm, nfe=3, guidance=2.0).shape == (4, 1, 8, 8)
    assert model.reconstruct(x[:5]).shape == (5, 1, 8, 8)
    # resume continues; the plain loader refuses; a stage-2 run is not a VAE
    assert main([*args[:4], "22", *args[5:], "--resume"]) == 0
    assert json.loads((run / "model.json").read_text())["steps"] == 22
    assert main(["sample", "--model", str(run), "-n", "4", "--out", str(tmp_path / "s.png"), "-q"]) == 2
    assert "dpmlab.methods.load" in capsys.readouterr().err
    bad = load_recipe(ROOT / "recipes" / "methods" / "diffusevae_digits8.json").to_dict()
    bad["method"]["vae"] = str(run)
    with pytest.raises(ValueError, match="must be a diffusevae_vae run on data of shape \\(1, 8, 8\\)"):
        dpmlab.methods.train_recipe(MethodRecipe.from_dict(bad), tmp_path / "bad", progress=False)
    # Form-2 with CFG drop-out trains on the same objective
    f2 = tmp_path / "f2"
    assert main([*args[:4], "4", "--out", str(f2), *args[7:], "--set", "method.form=form2"]) == 0
    assert load(f2).settings.form is Form.FORM2 and load(f2).sample(3, nfe=2).shape == (3, 1, 8, 8)
