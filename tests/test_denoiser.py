import pytest
import torch
from torch import nn

from dpmlab.models import Denoiser, Prediction
from dpmlab.models.analytic import preset
from dpmlab.schedules import EDM, DiscreteVP, Flow, LinearVP

MIX = preset("gmm16")


class Oracle(nn.Module):
    """A 'network' that predicts any parameterisation exactly from the analytic mixture."""

    def __init__(self, sch, kind):
        super().__init__()
        self.sch, self.kind = sch, kind

    def forward(self, x, t, **cond):
        x0 = MIX.x0(x, self.sch, t)
        eps = self.sch.eps_from_x0(x, x0, t)
        if self.kind == "x0":
            return x0
        if self.kind == "eps":
            return eps
        if self.kind == "v":
            return self.sch.v_from_x0_eps(x0, eps, t)
        if self.kind == "score":
            return MIX.score(x, self.sch, t)
        da, ds = self.sch.dalpha_dsigma_dt(t)
        return da[:, None] * x0 + ds[:, None] * eps  # flow velocity dx/dt


@pytest.mark.parametrize("kind", [p.value for p in Prediction])
@pytest.mark.parametrize("sch", [LinearVP(), EDM(), Flow()], ids=["vp", "edm", "flow"])
def test_every_parameterisation_gives_the_same_x0(kind, sch):
    g = torch.Generator().manual_seed(1)
    t = sch.t_min + (sch.t_max - sch.t_min) * torch.rand(6, dtype=torch.float64, generator=g)
    x = MIX.sample_t(6, sch, 0.5, generator=g) * 1.3
    d = Denoiser(Oracle(sch, kind), sch, kind)
    assert torch.allclose(d(x, t), MIX.x0(x, sch, t), atol=1e-9)


def test_net_time_for_discrete_models_and_conditioning():
    sch = DiscreteVP.from_preset("linear")
    seen = {}

    def net(x, t, label=None):
        seen["t"], seen["label"] = t, label
        return torch.zeros_like(x)

    d = Denoiser(net, sch, "x0")
    d(torch.zeros(2, 3), sch.index_to_t(torch.tensor([999.0, 10.0])), label="cat")
    assert seen["t"].tolist() == pytest.approx([999.0, 10.0])
    assert seen["label"] == "cat"


def test_denoiser_errors():
    sch = LinearVP()
    with pytest.raises(ValueError, match="unknown prediction type 'noise'"):
        Denoiser(lambda x, t: x, sch, "noise")
    d = Denoiser(lambda x, t: x[:, :1], sch, "eps")
    with pytest.raises(ValueError, match="network returned shape"):
        d(torch.zeros(2, 3), 0.5)
    with pytest.raises(ValueError, match="t must be a scalar"):
        Denoiser(lambda x, t: x, sch, "eps")(torch.zeros(2, 3), torch.ones(3))


def test_denoiser_runs_net_in_its_dtype():
    net = nn.Linear(4, 4).to(torch.float64)
    d = Denoiser(lambda x, t: net(x), LinearVP(), "eps", dtype=torch.float64)
    out = d(torch.zeros(2, 4, dtype=torch.float32), 0.5)
    assert out.dtype == torch.float32
