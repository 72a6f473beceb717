"""The cosine DiscreteVP (lambda clipped at -5.1, t_max = 0.996): diffusers' index spacings on the
truncated table, and the facts the cosine benchmark note (docs/benchmarks/cosine.md) rests on."""

import pytest
import torch

from dpmlab import timesteps as T
from dpmlab.models.analytic import preset
from dpmlab.models.reference import reference_solution
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import Problem, get, sample

COS = DiscreteVP.from_preset("cosine")


@pytest.mark.parametrize("name", ["linspace", "leading", "trailing"])
def test_index_spacings_stay_inside_a_truncated_table(name):
    k = round(COS.t_max * COS.n_train)  # training indices 0..k-1 survive the lambda clipping
    assert k == 996
    ts = T.make_grid(COS, name, 10, to_zero=True)
    idx = COS.t_to_index(ts[:-1])
    assert float(idx.max()) <= k - 1 + 1e-9 and float(ts[-1]) == 0.0
    if name != "leading":  # linspace and trailing start at the top surviving index, i.e. at t_max
        assert float(ts[0]) == pytest.approx(COS.t_max, abs=1e-12)
    # the same indices diffusers uses with num_train_timesteps=k (the bench's peer configuration)
    if name == "linspace":
        expect = torch.linspace(0, k - 1, 10, dtype=torch.float64).round().flip(0)
    elif name == "trailing":
        expect = torch.round(torch.arange(k, 0, -k / 10, dtype=torch.float64)) - 1
    else:
        expect = (torch.arange(10, dtype=torch.float64) * (k // 10)).flip(0)
    assert torch.allclose(idx, expect, atol=1e-9)


def test_index_spacings_unchanged_on_a_full_table():
    lin = DiscreteVP.from_preset("linear")
    ts = T.linspace(lin, 5)
    assert torch.allclose(lin.t_to_index(ts[:-1]), torch.tensor([999.0, 749.0, 500.0, 250.0, 0.0], dtype=torch.float64))


def test_cosine_and_linear_pose_the_same_ode_in_lambda():
    """The analytic denoiser depends on (alpha, sigma) only: started at the same lambda from the same
    state, the cosine and linear references agree, so no interpolation effect of the cosine table."""
    lin = DiscreteVP.from_preset("linear")
    gmm = preset("gmm16")
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t_lin = float(lin.t_of_lambda(COS.lam(COS.t_max)))
    rc = reference_solution(gmm.denoiser(COS), COS, x * COS.sigma(COS.t_max), COS.t_max, 0.0, rtol=1e-9, atol=1e-9)
    rl = reference_solution(gmm.denoiser(lin), lin, x * lin.sigma(t_lin), t_lin, 0.0, rtol=1e-9, atol=1e-9)
    assert float((rc.x - rl.x).abs().max()) < 1e-7


def test_time_grids_take_a_huge_first_lambda_step_on_cosine():
    """The measured mechanism: quadratic_time spends its first step on ~3.9 units of lambda on cosine
    (1.7 on linear); a first-order first step there leaves a 1e-2-scale error."""
    lin = DiscreteVP.from_preset("linear")
    for sch, lo, hi in ((COS, 3.5, 4.2), (lin, 1.5, 2.0)):
        ts = T.make_grid(sch, "quadratic_time", 10, to_zero=True)
        assert lo < float(sch.lam(ts[1]) - sch.lam(ts[0])) < hi
    m = preset("gmm16").denoiser(COS)
    x = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * COS.sigma(COS.t_max)
    ts = T.make_grid(COS, "quadratic_time", 10, to_zero=True)
    ref = reference_solution(m, COS, x, COS.t_max, float(ts[1])).x
    err = float((sample(Problem(m, COS), x, ts[:2], get("ddim")) - ref).pow(2).mean().sqrt())
    assert 1e-2 < err < 1e-1


def test_unipc_bh2_on_the_peer_grid_matches_diffusers_on_cosine():
    """The best diffusers configuration on cosine is reproduced by dpmlab's unipc (bh2) on the same
    grid: the benchmark gap is a configuration gap, not a solver or problem mismatch."""
    pytest.importorskip("diffusers")
    from dpmlab.bench.harness import peer_scheduler
    from dpmlab.interop.diffusers import run_scheduler

    m = preset("gmm16").denoiser(COS)
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * COS.sigma(COS.t_max)
    sch = peer_scheduler("UniPCMultistepScheduler", {}, COS)
    run = run_scheduler(sch, m, COS, x, 10)
    ts = torch.cat([COS.index_to_t(sch.timesteps.double()), torch.zeros(1, dtype=torch.float64)])
    ours = sample(Problem(m, COS), x, ts, get("unipc", variant="bh2"))
    assert run.nfe == 10 and float((ours - run.x.double()).abs().max()) < 1e-4
