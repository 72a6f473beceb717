"""k-diffusion signature parity: the samplers below are k-diffusion's published algorithms written out
here (k-diffusion itself is not imported), run on the same sigmas as dpmlab's solvers."""

import math

import pytest
import torch

from dpmlab.interop import kdiffusion as K
from dpmlab.models.analytic import preset
from dpmlab.schedules import EDM
from dpmlab.solvers import available
from dpmlab.timesteps import karras

MIX = preset("gmm16")
SCH = EDM()


def kd_model(x, sigma, **extra):
    """A k-diffusion denoiser: D(x; sigma) on the VE/EDM state."""
    return MIX.x0(x, SCH, sigma.to(torch.float64).expand(x.shape[0]))


def kd_sample_euler(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def kd_sample_heun(model, x, sigmas):
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - model(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


@pytest.fixture(scope="module")
def setup():
    sigmas = karras(SCH, 10, to_zero=True)  # EDM: t == sigma
    x = 80.0 * torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    return sigmas, x


def test_every_solver_has_the_kdiffusion_signature():
    for name in available():
        fn = getattr(K, f"sample_{name}")
        assert fn.__name__ == f"sample_{name}"
    with pytest.raises(AttributeError):
        K.sample_nonexistent  # noqa: B018


@pytest.mark.parametrize("name, ref", [("euler", kd_sample_euler), ("ddim", kd_sample_euler), ("heun", kd_sample_heun)])
def test_parity_with_kdiffusion_algorithms(setup, name, ref):
    sigmas, x = setup
    ours = getattr(K, f"sample_{name}")(kd_model, x, sigmas)
    theirs = ref(kd_model, x, sigmas)
    assert float((ours - theirs).abs().max()) < 1e-10


def test_callback_extra_args_and_wrapped_denoiser(setup):
    sigmas, x = setup
    seen = []

    def model(x, sigma, scale=1.0):
        return kd_model(x, sigma) * scale

    out = K.sample_euler(model, x, sigmas, extra_args={"scale": 1.0}, callback=seen.append)
    assert [c["i"] for c in seen] == list(range(10))
    assert seen[-1]["denoised"] is not None and math.isclose(float(seen[0]["sigma"]), 80.0)
    assert torch.equal(out, seen[-1]["x"])
    d = K.denoiser_from_kdiffusion(kd_model)
    xt = x[:2] / 40.0
    assert torch.allclose(d(xt, torch.tensor(2.0)), kd_model(xt, torch.tensor(2.0)))


def test_bad_options_are_named(setup):
    sigmas, x = setup
    with pytest.raises(ValueError, match="has no option"):
        K.sample_euler(kd_model, x, sigmas, s_churn=1.0)
