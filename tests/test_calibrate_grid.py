"""Learned time grids (dpmlab.calibrate.grid): exact DP, artifact round trip and validation, and a fitted
grid that beats the fixed grids on noise it was not fitted on."""

from __future__ import annotations

import json

import pytest
import torch

from dpmlab.calibrate import grid as cg
from dpmlab.models.analytic import preset
from dpmlab.models.reference import reference_solution
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import get
from dpmlab.timesteps import make_grid

SCH = DiscreteVP.from_preset("linear")


def _artifact(**kw: object) -> cg.GridArtifact:
    d = {
        "ts": (1.0, 0.5, 0.1, 0.0),
        "model": "gmm16",
        "solver": get("ddim").config(),
        "nfe": 3,
        "schedule": cg.schedule_id(SCH),
        "method": "gits",
        "seeds": {"seed": 0, "start": 0, "n": 8},
        "fine_steps": 10,
    }
    d.update(kw)
    return cg.GridArtifact(**d)  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dp_path_matches_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    m = 9
    cost = torch.rand(m, m, generator=g, dtype=torch.float64).triu(1)
    cost[torch.ones(m, m).tril().bool()] = float("inf")
    for steps in range(1, m):
        dp = cg.dp_path(cost, steps)
        bf = cg.brute_force_path(cost, steps)
        tot = lambda p: sum(float(cost[a, b]) for a, b in zip(p, p[1:]))  # noqa: E731
        assert len(dp) == steps + 1 and dp[0] == 0 and dp[-1] == m - 1
        assert tot(dp) == pytest.approx(tot(bf), abs=1e-12)


def test_dp_path_known_answer() -> None:
    # convex cost of the step length: equal steps are optimal
    i = torch.arange(13, dtype=torch.float64)
    cost = torch.where(i[None, :] > i[:, None], (i[None, :] - i[:, None]).pow(2), torch.tensor(float("inf")))
    assert cg.dp_path(cost, 4) == [0, 3, 6, 9, 12]
    with pytest.raises(ValueError, match="steps must be an int"):
        cg.dp_path(cost, 13)


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_artifact_round_trip(tmp_path, suffix: str) -> None:
    art = _artifact(fit_seconds=1.5, fit_error=0.25)
    path = art.save(tmp_path / f"g{suffix}")
    back = cg.GridArtifact.load(path, model="gmm16", solver="ddim", nfe=3)
    assert back == art
    assert torch.equal(back.grid(), art.grid())


def test_artifact_refuses_mismatch_and_bad_files(tmp_path) -> None:
    art = _artifact()
    art.check("gmm16", "ddim", 3, SCH)
    with pytest.raises(ValueError, match="fitted for model 'gmm16', not 'gmm64'"):
        art.check("gmm64", "ddim", 3)
    with pytest.raises(ValueError, match="fitted for solver"):
        art.check("gmm16", "unipc", 3)
    with pytest.raises(ValueError, match="fitted for solver"):
        art.check("gmm16", {"name": "dpm_solver_pp", "order": 3}, 3)
    with pytest.raises(ValueError, match="fitted for nfe=3, not nfe=4"):
        art.check("gmm16", "ddim", 4)
    with pytest.raises(ValueError, match="fitted on schedule"):
        art.check("gmm16", "ddim", 3, DiscreteVP.from_preset("scaled_linear"))
    path = art.save(tmp_path / "g.json")
    with pytest.raises(ValueError, match="fitted for nfe=3, not nfe=5"):
        cg.GridArtifact.load(path, model="gmm16", solver="ddim", nfe=5)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="is not a 'dpmlab.grid' version 1 artifact"):
        cg.GridArtifact.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="must end in .json or .safetensors"):
        art.save(tmp_path / "g.pt")
    with pytest.raises(ValueError, match="strictly decreasing"):
        _artifact(ts=(1.0, 0.1, 0.5, 0.0))
    with pytest.raises(ValueError, match="unknown grid method 'ld9'"):
        _artifact(method="ld9")
    with pytest.raises(ValueError, match="overlaps the calibration noise"):
        art.check_held_out(0, 4, 16)
    art.check_held_out(0, 8, 16)  # disjoint index range
    art.check_held_out(1, 0, 16)  # other seed


def test_calibration_noise_is_counter_based() -> None:
    a = cg.calibration_noise(SCH, (4,), 6, seed=3)
    b = cg.calibration_noise(SCH, (4,), 3, seed=3, start=3)
    assert torch.equal(a[3:], b)
    assert not torch.equal(a[:3], b)


def test_fit_grid_generalises_to_held_out_noise() -> None:
    mix = preset("gmm16")
    model = mix.denoiser(SCH)
    x_cal = cg.calibration_noise(SCH, (16,), 32, seed=0)
    x_test = cg.calibration_noise(SCH, (16,), 128, seed=1)
    ref = reference_solution(model, SCH, x_test, SCH.t_max, SCH.t_zero, rtol=1e-8, atol=1e-8).x
    for solver, method in (("ddim", "gits"), ("unipc", "gits+e2e"), ("dpm_solver_pp", "ld3")):
        art = cg.fit_grid(
            model,
            SCH,
            solver,
            5,
            x_cal,
            method=method,
            fine_steps=24,
            model_name="gmm16",
            seeds={"seed": 0, "start": 0, "n": 32},
            sweeps=1,
            golden_iters=8,
            rounds=1,
            inner_iters=5,
        )
        assert art.method == method
        art.check("gmm16", solver, 5, SCH)
        art.check_held_out(1, 0, 128)
        slv = get(solver)
        assert slv.nfe(art.grid(), SCH) == 5
        fitted = float(cg.grid_errors(model, SCH, slv, art.grid(), x_test, ref).mean())
        for g in ("quadratic_time", "uniform_lambda"):
            fixed = cg.grid_errors(model, SCH, slv, make_grid(SCH, g, 5, to_zero=True), x_test, ref)
            assert fitted < float(fixed.mean()), (solver, g)


def test_a_shared_teacher_gives_the_same_grid_and_is_checked() -> None:
    """``teacher_states`` computed once and passed to several fits gives each the grid of a fit that integrates
    its own teacher; a teacher of other noise, fine grid, tolerance or conditioning is refused."""
    model = preset("gmm16").denoiser(SCH)
    x = cg.calibration_noise(SCH, (16,), 8, seed=0)
    teacher = cg.teacher_states(model, SCH, x, 8, ref_tol=1e-8)
    assert len(teacher.states) == len(teacher.fine) == 9 and torch.equal(teacher.states[0], x)
    ref = reference_solution(model, SCH, x, SCH.t_max, SCH.t_zero, rtol=1e-8, atol=1e-8).x
    assert torch.allclose(teacher.states[-1], ref, atol=1e-5)
    for solver, nfe in (("ddim", 4), ("unipc", 5)):
        kw = {"method": "gits+e2e", "fine_steps": 8, "ref_tol": 1e-8, "sweeps": 1, "golden_iters": 3}
        own = cg.fit_grid(model, SCH, solver, nfe, x, **kw)  # type: ignore[arg-type]
        shared = cg.fit_grid(model, SCH, solver, nfe, x, teacher=teacher, **kw)  # type: ignore[arg-type]
        assert own.ts == shared.ts and own.fit_error == shared.fit_error
    with pytest.raises(ValueError, match="other calibration noise"):
        cg.fit_grid(model, SCH, "ddim", 4, x + 1e-3, fine_steps=8, ref_tol=1e-8, teacher=teacher)
    with pytest.raises(ValueError, match="9-point fine grid; fine_steps=9, to_zero=True gives 10 points"):
        cg.fit_grid(model, SCH, "ddim", 4, x, fine_steps=9, ref_tol=1e-8, teacher=teacher)
    with pytest.raises(ValueError, match="ref_tol=1e-08, not ref_tol=1e-09"):
        cg.fit_grid(model, SCH, "ddim", 4, x, fine_steps=8, ref_tol=1e-9, teacher=teacher)
    with pytest.raises(ValueError, match="computed with cond"):
        cg.fit_grid(model, SCH, "ddim", 4, x, fine_steps=8, ref_tol=1e-8, teacher=teacher, cond={"label": 1})


def test_fit_grid_refuses_bad_input() -> None:
    model = preset("gmm16").denoiser(SCH)
    x = cg.calibration_noise(SCH, (16,), 4, seed=0)
    with pytest.raises(ValueError, match="unknown grid method 'dp'"):
        cg.fit_grid(model, SCH, "ddim", 4, x, method="dp")
    with pytest.raises(ValueError, match="fewer than the 8 steps"):
        cg.fit_grid(model, SCH, "ddim", 8, x, fine_steps=4)
    with pytest.raises(ValueError, match="seeds must have the keys"):
        cg.fit_grid(model, SCH, "ddim", 4, x, seeds={"seed": 0})
    with pytest.raises(ValueError, match="radius must be > 0"):
        cg.fit_grid(model, SCH, "ddim", 4, x, method="ld3", radius=0.0, fine_steps=6)
    with pytest.raises(ValueError, match="is stochastic"):
        cg.fit_grid(model, SCH, "ddpm", 4, x)
    with pytest.raises(ValueError, match="noise must have shape"):
        cg.fit_grid(model, SCH, "ddim", 4, x[0])


def test_cli_fits_a_grid_and_samples_on_it_checked(tmp_path, capsys):
    """``dpmlab calibrate grid`` writes the artifact; ``dpmlab sample --grid-artifact`` samples on it and refuses
    another solver or NFE."""
    from dpmlab.cli import main

    art = tmp_path / "g.json"
    assert (
        main(
            [
                "calibrate",
                "grid",
                "--model",
                "gmm16",
                "--solver",
                "ddim",
                "--nfe",
                "4",
                "-n",
                "16",
                "--method",
                "gits",
                "--out",
                str(art),
            ]
        )
        == 0
    )
    base = ["sample", "--model", "gmm16", "--nfe", "4", "-n", "8", "--grid-artifact", str(art), "-q"]
    assert main([*base, "--solver", "ddim", "--out", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    assert main([*base, "--solver", "unipc", "--out", str(tmp_path / "b.png")]) == 2
    assert "grid fitted for solver" in capsys.readouterr().err
    assert main([*base[:4], "5", *base[5:], "--solver", "ddim", "--out", str(tmp_path / "c.png")]) == 2
    assert "grid fitted for nfe=4, not nfe=5" in capsys.readouterr().err
