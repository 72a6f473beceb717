"""Differentiable sampling (dpmlab.solvers.differentiable): the gradient through all solver steps matches a
central finite difference in float64, per-step checkpointing gives the same gradient (and the honest NFE),
gradients reach the starting noise, and stochastic solvers are refused."""

import pytest
import torch

from dpmlab.api import make_grid
from dpmlab.models.denoiser import Denoiser
from dpmlab.models.mlp import MLP, MLPConfig
from dpmlab.schedules import LinearVP
from dpmlab.solvers import Problem, get
from dpmlab.solvers import sample as plain_sample
from dpmlab.solvers.differentiable import Checkpointed, sample_with_grad

torch.set_num_threads(1)

SOLVERS = [("ddim", {}), ("heun", {}), ("dpm_solver_pp", {"order": 2}), ("unipc", {}), ("deis", {}), ("ipndm", {})]


def tiny_model() -> Denoiser:
    torch.manual_seed(0)
    net = MLP(MLPConfig(data_shape=(3,), width=16, depth=2, time_dim=8)).double()
    with torch.no_grad():  # the zero-initialised output layer would make the gradient trivial
        for p in net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return Denoiser(net, LinearVP(), "eps", data_shape=(3,))


def run(model: Denoiser, name: str, opts: dict, *, checkpoint: bool = False) -> tuple[torch.Tensor, Problem]:
    sch = model.schedule
    ts = make_grid(sch, "uniform_time", 4)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    problem = Problem(model, sch)
    return sample_with_grad(problem, x, ts, get(name, **opts), checkpoint=checkpoint), problem


def run_plain(model: Denoiser, name: str, opts: dict) -> torch.Tensor:
    """The same samples by the ordinary loop (no graph needed)."""
    ts = make_grid(model.schedule, "uniform_time", 4)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return plain_sample(Problem(model, model.schedule), x, ts, get(name, **opts))


def loss_of(out: torch.Tensor) -> torch.Tensor:
    w = torch.linspace(-1.0, 2.0, out.numel(), dtype=torch.float64).reshape(out.shape)
    return (w * out + 0.5 * out.square()).sum()


@pytest.mark.parametrize("name,opts", SOLVERS)
def test_gradient_matches_central_finite_difference(name, opts):
    model = tiny_model()
    p = model.net.blocks[0].fc1.weight  # (16, 16), inside the residual stack
    out, _ = run(model, name, opts)
    (grad,) = torch.autograd.grad(loss_of(out), p)
    h = 1e-6
    for idx in [(0, 0), (3, 5), (7, 2)]:
        with torch.no_grad():
            p[idx] += h
            up = loss_of(run_plain(model, name, opts))
            p[idx] -= 2 * h
            down = loss_of(run_plain(model, name, opts))
            p[idx] += h
        fd = float(up - down) / (2 * h)
        assert abs(float(grad[idx]) - fd) <= 1e-6 * max(1.0, abs(fd)), (name, idx, float(grad[idx]), fd)
    assert float(grad.abs().max()) > 1e-3  # the parameter matters: the comparison is not 0 == 0


@pytest.mark.parametrize("name,opts", SOLVERS)
def test_checkpointing_gives_the_same_samples_gradient_and_nfe(name, opts):
    model = tiny_model()
    out_a, prob_a = run(model, name, opts)
    grads_a = torch.autograd.grad(loss_of(out_a), list(model.net.parameters()))
    out_b, prob_b = run(model, name, opts, checkpoint=True)
    nfe_forward = prob_b.nfe
    grads_b = torch.autograd.grad(loss_of(out_b), list(model.net.parameters()))
    assert torch.equal(out_a, out_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-14)
    assert prob_a.nfe == nfe_forward == prob_b.nfe  # the backward recomputation is not counted
    with torch.no_grad():  # and the samples are those of the plain loop
        assert torch.equal(out_a, run_plain(model, name, opts))


def test_gradient_reaches_the_starting_noise():
    model = tiny_model().requires_grad_(False)
    sch = model.schedule
    ts = make_grid(sch, "uniform_time", 3)
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True, generator=torch.Generator().manual_seed(3))
    (gx,) = torch.autograd.grad(loss_of(sample_with_grad(Problem(model, sch), x, ts, get("ddim"))), x)
    h = 1e-6
    with torch.no_grad():
        e = torch.zeros_like(x)
        e[1, 2] = h
        fd = (
            loss_of(plain_sample(Problem(model, sch), x + e, ts, get("ddim")))
            - loss_of(plain_sample(Problem(model, sch), x - e, ts, get("ddim")))
        ) / (2 * h)
    assert abs(float(gx[1, 2]) - float(fd)) < 1e-6 * max(1.0, abs(float(fd)))


@pytest.mark.parametrize("name,opts", [("ddpm", {}), ("ddim", {"eta": 0.5}), ("sde_dpm_solver_pp", {})])
def test_stochastic_solvers_are_refused(name, opts):
    model = tiny_model()
    with pytest.raises(ValueError, match="stochastic"):
        run(model, name, opts)
    with pytest.raises(ValueError, match="stochastic"):  # also when wrapped for checkpointing
        run(model, name, opts, checkpoint=True)


def test_non_solver_is_refused():
    model = tiny_model()
    with pytest.raises(TypeError, match="Solver instance"):
        sample_with_grad(Problem(model, model.schedule), torch.zeros(1, 3), torch.tensor([1.0, 0.5]), "ddim")  # type: ignore[arg-type]
    assert Checkpointed(get("heun")).order == 2  # the wrapper declares its base's capabilities
