"""Bad input gets a clear error naming the problem."""

import pytest
import torch

import dpmlab
from dpmlab.models.analytic import preset
from dpmlab.schedules import LinearVP
from dpmlab.solvers import DDIM, Problem, get, sample
from dpmlab.timesteps import uniform_lambda


def test_unknown_solver_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown solver 'dpm\+\+'; available: .*ddim"):
        get("dpm++")


def test_unknown_and_invalid_options():
    with pytest.raises(ValueError, match="has no option.*etta.*allowed: eta"):
        get("ddim", etta=0.5)
    with pytest.raises(ValueError, match="eta must be"):
        get("ddim", eta=-1.0)
    with pytest.raises(ValueError, match="unknown variance 'learned'"):
        get("ddpm", variance="learned")


def test_nfe_budget_that_cannot_be_met():
    with pytest.raises(
        ValueError,
        match="cannot use exactly nfe=10 on a grid ending at sigma=0; nearest possible budgets: 9, 11; "
        r"a grid ending at t_min \(to_zero=False, --no-to-zero\) can",
    ):
        dpmlab.sample("gmm16", 4, solver="heun", nfe=10)  # the default grid ends at sigma = 0
    with pytest.raises(ValueError, match="cannot use exactly nfe=3.*nearest possible budgets: 2, 4"):
        dpmlab.sample("gmm16", 4, solver="heun", nfe=3, to_zero=False)
    with pytest.raises(ValueError, match="nfe must be a whole number >= 1, got 0"):
        dpmlab.sample("gmm16", 4, solver="ddim", nfe=0)


def test_non_monotone_grid():
    sch = LinearVP()
    x = torch.zeros(2, 16)
    with pytest.raises(ValueError, match="strictly monotone"):
        sample(Problem(preset("gmm16").denoiser(sch), sch), x, torch.tensor([1.0, 0.5, 0.7, 0.1]), DDIM())
    with pytest.raises(ValueError, match="strictly decreasing"):
        dpmlab.sample("gmm16", 2, grid=torch.tensor([0.5, 1.0]), nfe=None)


def test_wrong_shapes():
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    with pytest.raises(ValueError, match=r"expects x of shape \(B, 16\)"):
        sample(Problem(model, sch), torch.zeros(2, 15), uniform_lambda(sch, 3), DDIM())
    with pytest.raises(ValueError, match="batch dimension"):
        sample(Problem(model, sch), torch.zeros(16), uniform_lambda(sch, 3), DDIM())
    bad = Problem(lambda x, t: x[:, :3], sch)
    with pytest.raises(ValueError, match=r"model returned \(2, 3\) for x of shape \(2, 16\)"):
        sample(bad, torch.zeros(2, 16), uniform_lambda(sch, 3), DDIM())


def test_model_returning_nan():
    sch = LinearVP()

    def broken(x, t):
        out = x.clone()
        out[0, 0] = float("nan")
        return out

    with pytest.raises(FloatingPointError, match="model returned 1 non-finite values at t=1"):
        sample(Problem(broken, sch), torch.zeros(2, 4), uniform_lambda(sch, 3), DDIM())


def test_grid_length_must_match_nfe():
    with pytest.raises(ValueError, match="costs 3 evaluations with 'ddim', not nfe=5"):
        dpmlab.sample("gmm16", 2, grid=torch.tensor([1.0, 0.5, 0.1, 0.001], dtype=torch.float64), nfe=5)


def test_unknown_model_and_grid():
    with pytest.raises(ValueError, match="unknown model 'cifar10'"):
        dpmlab.sample("cifar10", 2)
    with pytest.raises(ValueError, match="unknown grid 'cosine'"):
        dpmlab.sample("gmm16", 2, grid="cosine")


def test_sample_accepts_its_start_state():
    """``x_T`` replaces the seeded start (issue 17, item 6): the default start passed explicitly gives the same
    samples; another start gives others; wrong shapes are refused."""
    from dpmlab._utils import counter_normal
    from dpmlab.models.hub import load

    model = load("gmm16")
    a = dpmlab.sample(model, 6, solver="unipc", nfe=5, seed=3, dtype=torch.float64)
    ts0 = dpmlab.timesteps.make_grid(model.schedule, "quadratic_time", 5)[:1]
    x_T = float(model.schedule.sigma(ts0)) * counter_normal(3, torch.arange(6), 0, (16,), dtype=torch.float64)
    b = dpmlab.sample(model, 6, solver="unipc", nfe=5, seed=99, x_T=x_T, dtype=torch.float64, batch_size=4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, dpmlab.sample(model, 6, solver="unipc", nfe=5, x_T=2 * x_T, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x_T must be a tensor of shape \(6, 16\)"):
        dpmlab.sample(model, 6, x_T=x_T[:5])
