"""Time-Shift Sampler (Li et al. 2024, arXiv 2305.15583): neutral settings are the base exactly, the
shifted step is the paper's TS-DDIM update, the variance rule picks the matching time, NFE is the base's."""

import pytest
import torch

from dpmlab.models.analytic import preset
from dpmlab.schedules import DiscreteVP, LinearVP
from dpmlab.solvers import Problem, SeededNoise, get, iterate, sample
from dpmlab.solvers.time_shift import TimeShift, shifted_time
from dpmlab.timesteps import uniform_lambda, uniform_time

SCH = LinearVP()
MIX = preset("gmm64")


class Recording:
    def __init__(self, model):
        self.model, self.calls = model, []
        self.schedule, self.data_shape = model.schedule, model.data_shape

    def __call__(self, x, t, **cond):
        self.calls.append(t.clone())
        return self.model(x, t, **cond)


def _x(n=32, seed=0):
    return torch.randn(n, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("base", [get("ddim"), get("dpm_solver_pp", order=3), get("ddpm"), get("heun")])
def test_window_zero_is_the_base_exactly(base):
    ts = uniform_lambda(SCH, 8)
    noise = SeededNoise(3, range(32))
    ref_p, ts_p = Problem(MIX.denoiser(SCH), SCH, noise=noise), Problem(MIX.denoiser(SCH), SCH, noise=noise)
    ref = sample(ref_p, _x(), ts, base)
    out = sample(ts_p, _x(), ts, TimeShift(base=base, window=0))
    assert torch.equal(out, ref)
    assert ts_p.nfe == ref_p.nfe == base.nfe(ts, SCH)


def test_nfe_is_the_base_and_shifts_are_per_sample():
    model = Recording(MIX.denoiser(SCH))
    base = get("dpm_solver_pp")
    ts = uniform_time(SCH, 10)
    p = Problem(model, SCH)
    sample(p, _x(), ts, TimeShift(base=base, window=40, cutoff=100))
    assert p.nfe == len(model.calls) == base.nfe(ts, SCH)
    shifted = [t for t in model.calls if not bool((t == t[0]).all())]
    assert shifted, "some step must evaluate the model at per-sample shifted times"
    for t, t_nominal in zip(model.calls, ts):  # one call per step, at t_i or within the window around it
        assert float((t - t_nominal).abs().max()) <= 20 / 1000 + 1e-12


def test_shifted_time_matches_variance():
    t_star = 0.8
    s2 = float(SCH.sigma(torch.tensor(t_star, dtype=torch.float64))) ** 2
    z = torch.randn(4, 5000, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = z / z.std(dim=1, keepdim=True) * s2**0.5  # per-sample variance exactly sigma(t*)^2
    t_s = shifted_time(SCH, x, 0.79, window=40, n_train=1000)
    assert torch.allclose(t_s, torch.full((4,), t_star, dtype=torch.float64), atol=1.5e-3)
    far = shifted_time(SCH, x, 0.70, window=10, n_train=1000)  # t* out of the window: its nearest edge
    assert torch.allclose(far, torch.full((4,), 0.705, dtype=torch.float64))


def test_shifted_ddim_step_is_the_papers_update():
    """TS-DDIM: x_next = alpha_next x0(x, t_s) + sigma_next (x - alpha_s x0(x, t_s)) / sigma_s."""
    sch = DiscreteVP.from_preset("linear")
    model = MIX.denoiser(sch)
    ts = uniform_time(sch, 4)
    x = _x(16) * 0.9
    solver = TimeShift(base=get("ddim"), window=60, cutoff=0)
    infos = list(iterate(Problem(model, sch), x, ts, solver))
    x1 = infos[0].x  # step 0 is never shifted
    t_s = shifted_time(sch, x1, float(ts[1]), 60, sch.n_train)
    assert not bool((t_s == ts[1]).all())
    x0 = model(x1, t_s)
    a_s, s_s = sch.alpha(t_s)[:, None], sch.sigma(t_s)[:, None]
    a1, s1 = sch.alpha(ts[2]), sch.sigma(ts[2])
    expected = a1 * x0 + s1 * (x1 - a_s * x0) / s_s
    assert torch.allclose(infos[1].x, expected, atol=1e-10, rtol=0)


def test_cutoff_and_determinism():
    model = Recording(MIX.denoiser(SCH))
    ts = uniform_time(SCH, 6)
    sample(Problem(model, SCH), _x(), ts, TimeShift(window=30, cutoff=999))
    assert all(bool((t == t[0]).all()) for t in model.calls)  # nothing above the cutoff: no shift
    a = sample(Problem(MIX.denoiser(SCH), SCH), _x(), ts, TimeShift(window=30, cutoff=100))
    b = sample(Problem(MIX.denoiser(SCH), SCH), _x(), ts, TimeShift(window=30, cutoff=100))
    assert torch.equal(a, b)


def test_config_round_trip_and_errors():
    s = TimeShift(base=get("dpm_solver_pp", order=3), window=10, cutoff=550)
    assert get(**s.config()) == s
    assert s.order == 3 and not s.is_stochastic()
    with pytest.raises(ValueError, match="window must be an int >= 0, got -1"):
        TimeShift(window=-1)
    with pytest.raises(ValueError, match="base must be a Solver, got 'ddim'"):
        TimeShift(base="ddim")  # type: ignore[arg-type]
    unipc = TimeShift(base=get("unipc"), window=40, cutoff=0)  # its step starts from the corrector's call
    with pytest.raises(ValueError, match="first evaluates the model"):
        sample(Problem(MIX.denoiser(SCH), SCH), _x(), uniform_time(SCH, 6), unipc)
