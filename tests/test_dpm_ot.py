"""DPM-OT (dpmlab.methods.dpm_ot): the fitted semi-discrete map pushes the source onto the target weights (trainer
fit and POT's solver, which also agree cell for cell), topk = 1 lands on a target and topk > 1 interpolates only
between close normals, the tail is a dpmlab solver from sigma_k, and the recipe runs through the CLI."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dpmlab.cli import main
from dpmlab.methods import MethodRecipe, load, load_recipe
from dpmlab.methods.dpm_ot import (
    DPMOT,
    BrenierPotential,
    DPMOTModel,
    OTObjective,
    fit_pot,
    noised_targets,
    sample,
    source_sample,
)
from dpmlab.models.analytic import GaussianMixture
from dpmlab.schedules import LinearVP
from dpmlab.training import TrainConfig, fit
from dpmlab.training.data import Dataset

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = torch.tensor([0.1, 0.2, 0.3, 0.15, 0.25])


def _targets() -> torch.Tensor:
    ang = torch.tensor([0.3, 1.4, 2.6, 3.9, 5.2])
    return torch.stack([ang.cos(), ang.sin()], 1) * torch.tensor([1.0, 1.6, 0.7, 1.2, 2.0])[:, None]


def _fitted(tmp_path: Path, source: str = "uniform", steps: int = 300) -> BrenierPotential:
    """The trainer's fit on five 2-D targets with unequal weights (sigma tiny: the targets are the points)."""
    y = _targets()
    recipe = MethodRecipe.from_dict(
        {
            "name": "ot5",
            "method": {"name": "dpm_ot", "model": None, "sigma": 1e-9, "source": source},
            "data": {"name": "moons"},
        }
    )
    obj = OTObjective(recipe, Dataset("five", y))
    obj.module.weights.copy_(WEIGHTS)  # the objective's potential owns the target weights
    tc = TrainConfig(
        steps=steps,
        batch_size=4000,
        lr=0.1,
        warmup=0,
        lr_decay="cosine",
        grad_clip=0.0,
        ema_decay=0.95,
        checkpoint_every=10_000,
        log_every=100,
    )
    fit(obj, tc, tmp_path / "ot5", progress=False)
    return load(tmp_path / "ot5").potential  # the EMA (Polyak-averaged) heights


@pytest.mark.parametrize("source", ["uniform", "normal"])
def test_fitted_map_pushes_the_source_to_the_target_weights(tmp_path, source):
    pot = _fitted(tmp_path, source)
    assert torch.equal(pot.weights, WEIGHTS)
    u = source_sample(source, torch.arange(100_000), 2, seed=9)  # fresh points, not the training draws
    freq = pot.measure(u)
    # measured 0.0027 (uniform), 0.0014 (normal); the MC std of a frequency here is <= 0.0015
    assert float((freq - WEIGHTS.double()).abs().max()) < 0.01, freq
    # power: the unfitted potential (h = 0) is far from the weights
    assert float((BrenierPotential(_targets()).measure(u) - WEIGHTS.double()).abs().max()) > 0.05
    card = json.loads((tmp_path / "ot5" / "model.json").read_text())["method"]["fit"]
    assert card["empty_cells"] == 0 and card["max_rel_error"] < 0.1


def test_pot_solver_agrees_with_the_trainer_fit(tmp_path):
    pot = _fitted(tmp_path)
    h_pot = fit_pot(_targets(), "uniform", weights=WEIGHTS, iters=10_000, batch=32, seed=1)
    other = BrenierPotential(_targets(), WEIGHTS)
    with torch.no_grad():
        other.h.copy_(h_pot)
    u = source_sample("uniform", torch.arange(100_000), 2, seed=3)
    assert float((other.measure(u) - WEIGHTS.double()).abs().max()) < 0.01
    same = (pot.topk(u, 1) == other.topk(u, 1)).double().mean()
    assert float(same) > 0.98, float(same)  # the same Laguerre cells (up to the fits' errors near boundaries)


def _model(tmp_path: Path) -> DPMOTModel:
    pot = _fitted(tmp_path)
    return DPMOTModel.build(pot, DPMOT(model=None, sigma=0.3, source="uniform"), (2,))


def test_topk_one_hits_a_target_and_topk_interpolates_between_close_normals(tmp_path):
    ot = _model(tmp_path)
    y = ot.potential.targets.double()
    idx = torch.arange(2000)
    x1, cell = ot.start(idx, topk=1, seed=4)
    assert torch.equal(x1, y[cell])  # exactly a target point: re-noised data
    x3, cell3 = ot.start(idx, topk=3, seed=4, angle_thresh=1.0, mix=0.25)  # always interpolate
    assert torch.equal(cell3, cell)
    on_target = (torch.cdist(x3, y).min(1).values < 1e-9).double().mean()
    assert float(on_target) == 0.0
    # x3 = 0.75 y_cell + 0.25 y_m for one of the other four targets
    d = (x3[:, None] - 0.75 * y[cell][:, None] - 0.25 * y[None]).norm(dim=-1)  # (B, M)
    assert float(d.min(1).values.max()) < 1e-9
    never, _ = ot.start(idx, topk=3, seed=4, angle_thresh=-1.0)  # no neighbour passes: the plain map
    assert torch.equal(never, x1)
    some, _ = ot.start(idx, topk=3, seed=4, angle_thresh=0.3)  # only the closest normals interpolate
    moved = (some != x1).any(1).double().mean()
    assert 0.0 < float(moved) < 1.0
    with pytest.raises(ValueError, match="need an int 1 <= topk <= M=5 and 0 <= mix <= 1, got topk=6"):
        ot.start(idx, topk=6)


def test_tail_starts_at_sigma_k_and_is_any_solver(tmp_path):
    ot = _model(tmp_path)
    mix = GaussianMixture(torch.ones(5), _targets(), 0.05)
    den = mix.denoiser(LinearVP())
    sch = den.schedule
    t_k = float(sch.t_of_sigma_over_alpha(torch.tensor(0.3, dtype=torch.float64)))
    tk = torch.tensor(t_k, dtype=torch.float64)
    assert float(sch.sigma(tk) / sch.alpha(tk)) == pytest.approx(0.3, rel=1e-9)
    y, _ = ot.start(torch.arange(64), seed=2)
    # one DDIM step to sigma = 0 returns the x0 prediction at (alpha_k y, t_k)
    one = sample(ot, den, 64, solver="ddim", nfe=1, seed=2)
    want = den((float(sch.alpha(torch.tensor(t_k, dtype=torch.float64))) * y).float(), torch.full((64,), t_k))
    torch.testing.assert_close(one, want)
    for solver, nfe in (("heun", 9), ("dpm_solver_pp", 10), ("ddpm", 10)):
        x = sample(ot, den, 64, solver=solver, nfe=nfe, seed=2)
        assert x.shape == (64, 2) and torch.isfinite(x).all()
        # the tail denoises: every sample ends within 4 std of a mode
        assert float(torch.cdist(x.double(), mix.means).min(1).values.max()) < 0.2
    with pytest.raises(ValueError, match="names no diffusion model"):
        ot.sample(4)
    with pytest.raises(ValueError, match="lies outside the model's schedule"):
        sample(dataclasses.replace(ot, settings=DPMOT(model=None, sigma=1e4)), den, 4)


def test_targets_and_settings():
    x = torch.randn(10, 1, 2, 2)
    y = DPMOT(sigma=0.5, n_targets=4, seed=3).targets(x)
    assert y.shape == (4, 4)
    assert torch.equal(y, DPMOT(sigma=0.5, n_targets=4, seed=3).targets(x))
    full = noised_targets(x, 0.5, seed=3)
    assert float((full - x.flatten(1)).std()) == pytest.approx(0.5, rel=0.3)
    assert DPMOT.from_dict(DPMOT(source="normal").to_dict()) == DPMOT(source="normal")
    with pytest.raises(ValueError, match="DPM-OT sigma must be a positive number, got 0"):
        DPMOT(sigma=0)
    with pytest.raises(ValueError, match="DPM-OT n_targets=20 exceeds the 10 data points"):
        DPMOT(n_targets=20).targets(x)
    with pytest.raises(ValueError, match="'cube' is not a valid Source"):
        DPMOT(source="cube")
    u = source_sample("uniform", torch.arange(5, 9), 3, seed=1)
    assert torch.equal(u[1:], source_sample("uniform", torch.arange(6, 9), 3, seed=1))  # per-index draws
    assert bool(((u > 0) & (u < 1)).all())


def test_recipe_through_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = ROOT / "recipes" / "methods" / "dpm_ot_digits8.json"
    assert load_recipe(recipe).settings.model == "digits8"
    assert load_recipe(ROOT / "recipes" / "methods" / "dpm_ot_mnist.json").settings.model == "mnist"
    args = [
        "train",
        "--recipe",
        str(recipe),
        "--steps",
        "200",
        "--out",
        str(out),
        "-q",
        "--set",
        "method.n_targets=40",
        "--set",
        "train.batch_size=1000",
        "--set",
        "train.checkpoint_every=100",
    ]
    assert main(args) == 0
    card = json.loads((out / "model.json").read_text())
    assert card["method"]["name"] == "dpm_ot" and card["method"]["fit"]["empty_cells"] == 0
    ot = load(out)
    assert ot.data_shape == (1, 8, 8) and ot.potential.targets.shape == (40, 64)
    x = ot.sample(6, nfe=3)
    assert x.shape == (6, 1, 8, 8) and torch.isfinite(x).all()
    torch.testing.assert_close(load(out / "checkpoint.safetensors").sample(6, nfe=3), x)
    assert main(["sample", "--model", str(out), "-n", "4", "--out", str(tmp_path / "s.png"), "-q"]) == 2
    assert "dpmlab.methods.load" in capsys.readouterr().err
