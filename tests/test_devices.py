"""``dpmlab.sample(name, device=...)``: named models move to the device, the starting and step noise
are counter-based (the same numbers on any device), so a device returns the CPU's samples. CPU is
always tested, CUDA when present. ``meta`` is no stand-in here: the sampling loop checks values
(finite model outputs, positive mixture weights), which meta tensors do not have."""

import pytest
import torch

import dpmlab
from dpmlab.api import _to_device
from dpmlab.models.hub import load

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("solver", ["dpm_solver_pp", "ddpm"])
def test_same_samples_on_every_device(device, solver):
    ref = dpmlab.sample("gmm16", n=6, nfe=6, solver=solver, seed=3)
    got = dpmlab.sample("gmm16", n=6, nfe=6, solver=solver, seed=3, device=device, batch_size=4)
    assert got.device.type == device
    assert torch.allclose(got.cpu(), ref, atol=1e-5)
    other = dpmlab.sample("gmm16", n=6, nfe=6, solver=solver, seed=4, device=device)
    assert not torch.allclose(other.cpu(), ref, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_named_models_are_moved(device):
    analytic = _to_device(load("gmm16"), device)
    assert analytic.model.means.device.type == device and analytic.schedule is not None
    x = torch.randn(2, 16, device=device)
    assert analytic(x, torch.full((2,), 0.5, dtype=torch.float64)).device.type == device
    net = torch.nn.Linear(2, 2)
    assert _to_device(net, device).weight.device.type == device
