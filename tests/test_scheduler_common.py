"""diffusers' common scheduler checks (``SchedulerCommonTest`` in diffusers'
tests/schedulers/test_schedulers.py), restated in our own words and run against ``DPMLabScheduler``
for every registered dpmlab solver. Checks that do not apply are listed with the reason in
docs/interop.md. On top of diffusers' checks: the scheduler loop equals ``dpmlab.solvers.sample`` on
the same grid, from the start and from every grid point ``set_begin_index`` accepts."""

import json

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler
from diffusers.utils import logging as dlog

from dpmlab.interop.diffusers import DPMLabScheduler
from dpmlab.solvers import Problem, available, sample

dlog.set_verbosity_error()
SOLVERS = [s for s in available() if s != "time_shift"]  # time_shift is refused (test_diffusers_scheduler)
STEPS = 5


EVALS_PER_STEP = {"dpm_solver": 3, "dpm_solver_pp_2s": 2, "heun": 2}  # diffusers' scheduler.order: evaluations per step


def _model(x, t):  # an x0-predictor with a simple, time-dependent answer
    return 0.7 * x + 0.1 * torch.sin(3 * t).reshape(-1, *([1] * (x.ndim - 1)))


def _loop(s, x, seed=0, return_dict=True, begin=0):
    """The diffusers loop with ``prediction_type="sample"`` outputs from ``_model``."""
    g = torch.Generator().manual_seed(seed)
    y = x
    for t in s.timesteps[begin:]:
        tc = s.schedule.index_to_t(t.double()).expand(x.shape[0])
        out = _model(y, tc)
        res = s.step(out, t, y, generator=g, return_dict=return_dict)
        y = res.prev_sample if return_dict else res[0]
    return y


def _sched(name, **kw):
    return DPMLabScheduler(solver=name, prediction_type="sample", **kw)


def _x(shape=(2, 3, 4)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", SOLVERS)
def test_save_load_step_shape_outputs_and_public_api(name, tmp_path):
    s = _sched(name)
    s.set_timesteps(STEPS)
    # public API: init_noise_sigma, scale_model_input, order, timesteps, len
    assert s.init_noise_sigma == 1.0 and len(s) == 1000 and s.order == EVALS_PER_STEP.get(name, 1)
    x = _x()
    assert s.scale_model_input(x, s.timesteps[0]) is x
    assert s.timesteps.dtype == torch.float32 and bool((s.timesteps[1:] <= s.timesteps[:-1]).all())
    a = _loop(s, x)
    # step shape and return_dict equivalence
    assert a.shape == x.shape and a.dtype == x.dtype
    s.set_timesteps(STEPS)
    assert torch.equal(_loop(s, x, return_dict=False), a)
    # save_config -> from_pretrained gives the same scheduler
    s.save_config(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["solver"] == name
    s2 = DPMLabScheduler.from_pretrained(tmp_path)
    s2.set_timesteps(STEPS)
    assert torch.equal(s2.timesteps, s.timesteps) and torch.equal(_loop(s2, x), a)


@pytest.mark.parametrize("name", SOLVERS)
def test_loop_equals_the_solver_and_begin_index(name):
    """The scheduler loop is ``dpmlab.solvers.sample`` on the scheduler's grid (same noise stream);
    from each accepted begin index, it is ``sample`` on the rest of the grid."""
    s = _sched(name)
    s.set_timesteps(STEPS)
    ts, x = s.make_grid(STEPS), _x()

    def run_direct(grid):
        g = torch.Generator().manual_seed(0)
        noise = lambda stream, like: torch.randn(like.shape, generator=g, dtype=like.dtype)  # noqa: E731
        return sample(Problem(_model, s.schedule, noise=noise), x, grid, s.solver)

    assert torch.allclose(_loop(s, x), run_direct(ts).float(), atol=1e-5)
    starts = 0
    for j in range(1, STEPS):
        b = j * s.order
        try:
            s.set_begin_index(b)
        except ValueError as e:
            assert "cannot start at" in str(e)
            continue
        starts += 1
        assert torch.allclose(_loop(s, x, begin=b), run_direct(ts[j:]).float(), atol=1e-5)
    warm_up = name in ("pndm", "plms", "s_pndm")  # a fresh run begins with a warm-up step: refused
    assert (starts == 0) if warm_up else (starts == STEPS - 1)


@pytest.mark.parametrize("name", SOLVERS)
def test_add_noise_and_generator(name):
    s = _sched(name)
    x0, noise = _x((3, 2, 4)), _x((3, 2, 4))
    t = torch.tensor([10, 500, 990])
    ref = DDIMScheduler().add_noise(x0, noise, t)
    assert torch.allclose(s.add_noise(x0, noise, t), ref, atol=1e-6)
    runs = []
    for seed in (0, 0, 1):
        s.set_timesteps(STEPS)
        runs.append(_loop(s, x0, seed=seed))
    a, b, c = runs
    assert torch.equal(a, b) and (torch.equal(a, c) != s.solver.is_stochastic())


def test_trained_betas_round_trip(tmp_path):
    s = DPMLabScheduler(num_train_timesteps=2, trained_betas=[0.1, 0.3])
    s.save_pretrained(tmp_path)
    s2 = DPMLabScheduler.from_pretrained(tmp_path)
    assert s2.betas.tolist() == s.betas.tolist() and len(s2) == 2
    assert torch.allclose(s.betas, torch.tensor([0.1, 0.3]))


def test_from_pretrained_config_and_no_hidden_kwargs(tmp_path):
    import inspect

    s = DPMLabScheduler(solver="heun", grid="karras", to_zero=True, thresholding=True)
    s.save_pretrained(tmp_path)
    cfg = dict(s.config)
    cfg.pop("_use_default_values", None)
    assert dict(DPMLabScheduler.from_pretrained(tmp_path).config) == cfg
    # every option is a named argument: nothing is swallowed by **kwargs
    assert "kwargs" not in inspect.signature(DPMLabScheduler.__init__).parameters
    assert not DPMLabScheduler._deprecated_kwargs


def test_attribute_access_follows_diffusers():
    s = DPMLabScheduler()
    s.dummy_attribute = 5
    s.register_to_config(test_attribute=5)
    assert s.dummy_attribute == 5
    with pytest.warns(FutureWarning):
        assert s.test_attribute == 5
    with pytest.raises(AttributeError, match="'DPMLabScheduler' object has no attribute 'does_not_exist'"):
        s.does_not_exist  # noqa: B018


def test_add_noise_at_a_timestep_of_the_grid():
    s = DPMLabScheduler()
    s.set_timesteps(100)
    x = _x((4, 3, 8, 8))
    noised = s.add_noise(x, torch.randn_like(x), s.timesteps[5][None])
    assert noised.shape == x.shape


def test_compatibles_round_trip():
    """To every compatible diffusers scheduler and back keeps every option (diffusers keeps ours hidden)."""
    s = DPMLabScheduler(solver="unipc", grid="karras", budget="nfe", beta_schedule="scaled_linear")
    assert {DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler} <= set(s.compatibles)
    own = {k: v for k, v in s.config.items() if not k.startswith("_")}
    tried = 0
    for other in s.compatibles:
        try:
            there = other.from_config(s.config)
        except ImportError:  # a scheduler needing an optional backend (torchsde) that is not installed
            continue
        tried += 1
        back = DPMLabScheduler.from_config(there.config)
        assert {k: v for k, v in back.config.items() if not k.startswith("_")} == own, other.__name__
    assert tried >= 10
