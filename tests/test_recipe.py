"""Sampling recipes (dpmlab.calibrate.recipe) and solver="auto": choice on held-out noise, learned grids fitted
on the other noise, artifact round trip and validation, auto == the recorded solver and grid bit for bit, the
shipped MNIST recipe, and the command line."""

from __future__ import annotations

import json
import math

import pytest
import torch

import dpmlab
from dpmlab.calibrate import recipe as cr
from dpmlab.calibrate.grid import calibration_noise
from dpmlab.cli import main
from dpmlab.models.reference import reference_solution
from dpmlab.timesteps import make_grid

MODEL = dpmlab.load("gmm16")
SCH = MODEL.schedule
CANDS = ["ddim", "dpm_solver_pp", "unipc", "deis"]
GRIDS = ["quadratic_time", "uniform_time"]
TINY_GRID = {"fine_steps": 8, "sweeps": 1, "golden_iters": 3}


def _fit(fit_seed: int, select_seed: int, **kw: object) -> cr.Recipe:
    args = dict(n_fit=8, n_select=8, learned=False, candidates=CANDS, grids=GRIDS, model_name="gmm16")
    args.update(kw)
    return cr.fit_recipe(MODEL, [6], fit_seed=fit_seed, select_seed=select_seed, **args)  # type: ignore[arg-type]


def _held_out_scores(seed: int, n: int, nfe: int) -> dict[str, float]:
    """RMS error of every candidate on noise ``seed``, computed independently of the recipe module."""
    x = calibration_noise(SCH, (16,), n, seed=seed)
    ref = reference_solution(MODEL, SCH, x, SCH.t_max, 0.0, rtol=1e-10, atol=1e-10).x
    out = {}
    for name in CANDS:
        slv = dpmlab.solvers.get(name)
        for g in GRIDS:
            ts = make_grid(SCH, g, slv.steps_for_nfe(nfe, True), to_zero=True)
            y = dpmlab.sample(MODEL, n, solver=slv, grid=ts, nfe=nfe, x_T=x, dtype=torch.float64)
            out[f"{name} @ {g}"] = float((y - ref).pow(2).mean().sqrt())
    return out


def test_choice_is_the_lowest_error_on_the_select_noise_not_the_fit_noise() -> None:
    # on these two 8-sample sets the winners differ: swapping the seeds must swap the choice
    s2, s3 = _held_out_scores(2, 8, 6), _held_out_scores(3, 8, 6)
    win2, win3 = min(s2, key=s2.__getitem__), min(s3, key=s3.__getitem__)
    assert win2 != win3
    for fit, sel, win, scores in ((2, 3, win3, s3), (3, 2, win2, s2)):
        e = _fit(fit, sel).entry(6)
        assert e.label == win
        assert e.rms == pytest.approx(scores[win], rel=1e-6)
        assert set(e.scores) == set(scores)
        assert all(e.scores[k][0] == pytest.approx(v, rel=1e-6) for k, v in scores.items())


def test_learned_grids_are_fitted_on_the_fit_noise_and_scored_on_the_select_noise(monkeypatch) -> None:
    seen = []
    real = cr.fit_grid

    def spy(*args: object, **kw: object) -> object:
        seen.append(args[4])  # the calibration noise
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cr, "fit_grid", spy)
    rec = _fit(5, 7, learned=True, learned_top=1, grid_options=TINY_GRID, candidates=["dpm_solver_pp", "ddim"])
    assert len(seen) == 1
    assert torch.equal(seen[0], calibration_noise(SCH, (16,), 8, seed=5))
    e = rec.entry(6)
    learned = [k for k in e.scores if k.endswith("@ gits+e2e")]
    assert learned == ["dpm_solver_pp @ gits+e2e"]  # the better solver on the fixed grids gets the learned grid
    assert rec.seeds == {"fit": {"seed": 5, "start": 0, "n": 8}, "select": {"seed": 7, "start": 0, "n": 8}}
    assert e.ts[0] == SCH.t_max and e.ts[-1] == 0.0  # ends at sigma = 0
    with pytest.raises(ValueError, match="fit_seed and select_seed must differ"):
        _fit(4, 4)


def test_the_teacher_of_the_fit_noise_is_integrated_once_for_every_learned_grid(monkeypatch) -> None:
    teachers, fits = [], []
    real_teacher, real_fit = cr.teacher_states, cr.fit_grid

    def spy_teacher(*args: object, **kw: object) -> object:
        teachers.append(real_teacher(*args, **kw))  # type: ignore[arg-type]
        return teachers[-1]

    def spy_fit(*args: object, **kw: object) -> object:
        fits.append(kw["teacher"])
        return real_fit(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(cr, "teacher_states", spy_teacher)
    monkeypatch.setattr(cr, "fit_grid", spy_fit)
    args = dict(n_fit=8, n_select=8, candidates=["dpm_solver_pp", "ddim"], grids=GRIDS, model_name="gmm16")
    cr.fit_recipe(MODEL, [5, 6], fit_seed=0, select_seed=1, learned_top=2, grid_options=TINY_GRID, **args)  # type: ignore[arg-type]
    assert len(teachers) == 1 and len(fits) == 4 and all(t is teachers[0] for t in fits)
    assert torch.equal(teachers[0].states[0], calibration_noise(SCH, (16,), 8, seed=0))
    assert len(teachers[0].fine) == TINY_GRID["fine_steps"] + 1
    with pytest.raises(ValueError, match=r"fine_steps=8 is fewer than the 10 steps of nfe=10; pass grid_options"):
        cr.fit_recipe(MODEL, [5, 10], fit_seed=0, select_seed=1, grid_options=TINY_GRID, **args)  # type: ignore[arg-type]
    assert len(teachers) == 1  # refused before any work


def test_round_trip_and_validation(tmp_path) -> None:
    rec = _fit(0, 1)
    path = rec.save(tmp_path / "r.json")
    back = cr.Recipe.load(path, model="gmm16", schedule=SCH)
    assert back == rec
    assert back.solver(6).config() == dpmlab.solvers.get(**rec.entry(6).solver_config).config()
    assert torch.equal(back.grid(6), torch.tensor(rec.entry(6).ts, dtype=torch.float64))
    with pytest.raises(ValueError, match="fitted for model 'gmm16', not 'gmm64'"):
        cr.Recipe.load(path, model="gmm64")
    with pytest.raises(ValueError, match="recipe fitted on schedule"):
        cr.Recipe.load(path, schedule=dpmlab.load("mnist").schedule)
    with pytest.raises(ValueError, match=r"no entry for nfe=5 \(no guidance\); it has nfe 6"):
        rec.entry(5)
    with pytest.raises(ValueError, match="no entry with guidance 3; it has guidance: none"):
        rec.entry(6, guidance=3.0)
    d = json.loads(path.read_text())
    d["entries"][0]["ts"] = d["entries"][0]["ts"][:-2] + [0.0]  # one step fewer: no longer 6 evaluations
    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="costs .* evaluations, not 6"):
        cr.Recipe.load(tmp_path / "bad.json", schedule=SCH)
    (tmp_path / "grid.json").write_text(json.dumps({"format": "dpmlab.grid", "version": 1}))
    with pytest.raises(ValueError, match="is not a 'dpmlab.recipe' version 1 artifact"):
        cr.Recipe.load(tmp_path / "grid.json")
    with pytest.raises(ValueError, match="recipe path must end in .json"):
        rec.save(tmp_path / "r.safetensors")


def test_auto_samples_with_the_recorded_solver_and_grid_bit_for_bit(tmp_path) -> None:
    rec = _fit(2, 3)
    e = rec.entry(6)
    auto = dpmlab.sample("gmm16", 16, solver="auto", nfe=6, recipe=rec, seed=4)
    same = dpmlab.sample("gmm16", 16, solver=e.solver(), nfe=6, grid=e.grid(), seed=4)
    assert torch.equal(auto, same)
    assert e.label != "ddim @ quadratic_time"  # so the default would differ
    assert not torch.equal(auto, dpmlab.sample("gmm16", 16, nfe=6, seed=4))
    path = rec.save(tmp_path / "r.json")
    assert torch.equal(auto, dpmlab.sample("gmm16", 16, solver="auto", nfe=6, recipe=path, seed=4))
    with pytest.raises(ValueError, match="solver='auto' takes its grid from the recipe"):
        dpmlab.sample("gmm16", 4, solver="auto", nfe=6, recipe=rec, grid="karras")
    with pytest.raises(ValueError, match=r"options \['eta'\] do not apply"):
        dpmlab.sample("gmm16", 4, solver="auto", nfe=6, recipe=rec, eta=1.0)
    with pytest.raises(ValueError, match="recipe= is only used with solver='auto'"):
        dpmlab.sample("gmm16", 4, solver="ddim", nfe=6, recipe=rec)
    with pytest.raises(ValueError, match="model 'gmm16' ships none"):
        dpmlab.sample("gmm16", 4, solver="auto", nfe=6)
    with pytest.raises(ValueError, match="recipe fitted for model 'gmm16', not 'gmm64'"):
        dpmlab.sample("gmm64", 4, solver="auto", nfe=6, recipe=rec)


SHIPPED_NFES = (4, 5, 6, 8, 10, 15, 20)


def test_shipped_mnist_recipe_covers_the_advertised_nfes() -> None:
    rec = cr.shipped_recipe("mnist")
    assert rec is not None and rec.model == "mnist"
    model = dpmlab.load("mnist")
    rec.check("mnist", model.schedule)  # schedule id and every entry's exact NFE
    assert set(SHIPPED_NFES) <= set(rec.nfes())
    assert rec.seeds["fit"]["seed"] != rec.seeds["select"]["seed"]
    for nfe in SHIPPED_NFES:
        e = rec.entry(nfe)
        assert e.ts[-1] == 0.0 and math.isfinite(e.rms) and e.rms == min(v[0] for v in e.scores.values())
    assert cr.shipped_recipe("gmm16") is None
    with pytest.raises(ValueError, match=r"no entry for nfe=7 \(no guidance\); it has nfe 4, 5, 6, 8, 10, 15, 20"):
        dpmlab.sample("mnist", 1, solver="auto", nfe=7)
    e = rec.entry(4)
    x = dpmlab.sample(model, 1, solver="auto", nfe=4, recipe=rec)
    assert torch.equal(x, dpmlab.sample(model, 1, solver=e.solver(), nfe=4, grid=e.grid()))


def test_cli_calibrate_recipe_then_sample_auto(tmp_path, capsys) -> None:
    out = tmp_path / "r.json"
    argv = ["calibrate", "recipe", "--model", "gmm16", "--nfe", "4,6", "-n", "8", "--n-fit", "4"]
    argv += ["--learned-top", "0", "--solvers", "ddim,ipndm", "--out", str(out)]
    assert main(argv) == 0
    rec = cr.Recipe.load(out, model="gmm16")
    assert rec.nfes() == (4, 6) and rec.seeds["select"]["seed"] == 1
    assert main(argv) == 2  # exists, no --overwrite
    assert "exists; pass --overwrite" in capsys.readouterr().err
    png = tmp_path / "s.png"
    base = ["sample", "--model", "gmm16", "--solver", "auto", "--recipe", str(out), "-n", "4", "-q"]
    assert main([*base, "--nfe", "6", "--out", str(png)]) == 0 and png.is_file()
    assert main([*base, "--nfe", "5", "--out", str(tmp_path / "t.png")]) == 2
    assert "it has nfe 4, 6" in capsys.readouterr().err
    assert main([*base, "--nfe", "6", "--grid", "karras", "--out", str(tmp_path / "u.png")]) == 2
    assert "--grid cannot be used with --solver auto" in capsys.readouterr().err
    assert (
        main(["calibrate", "recipe", "--model", "gmm16", "--select-seed", "0", "--out", str(tmp_path / "v.json")]) == 2
    )
    assert "--select-seed must differ from --seed" in capsys.readouterr().err


def test_the_default_grid_of_a_model_comes_from_its_card() -> None:
    """The card's recipe names the fixed grid measured best (lowest geometric-mean selection error of its best
    solver over the NFEs); ``dpmlab.sample`` without ``grid`` uses it; models without a card recipe keep
    ``DEFAULT_GRID``."""
    from dpmlab.api import DEFAULT_GRID, default_grid

    for name in ("mnist", "mnist_t2i"):
        rec = cr.shipped_recipe(name)
        assert rec is not None
        unguided = [e for e in rec.entries if e.guidance is None]
        best = {}
        for g in cr.FIXED_GRIDS:
            per_nfe = [min(v[0] for k, v in e.scores.items() if k.endswith(f" @ {g}")) for e in unguided]
            best[g] = sum(math.log(v) for v in per_nfe)
        assert default_grid(name) == rec.default_grid() == min(best, key=best.__getitem__), name
    assert default_grid("mnist_t2i") == "karras" != DEFAULT_GRID  # measured: the text-to-image card's best
    assert default_grid("gmm16") == default_grid() == DEFAULT_GRID
    a = dpmlab.sample("mnist_t2i", 2, solver="ddim", nfe=4)
    b = dpmlab.sample("mnist_t2i", 2, solver="ddim", nfe=4, grid=default_grid("mnist_t2i"))
    c = dpmlab.sample("mnist_t2i", 2, solver="ddim", nfe=4, grid=DEFAULT_GRID)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_model_cards_of_weight_files_and_diffusers_folders() -> None:
    assert cr.model_card("mnist").name == "mnist.json"
    assert cr.model_card("mnist_t2i").name == "model_card.json"  # a diffusers-format folder's card
    assert cr.model_card("gmm16") is None and cr.model_card("../mnist") is None


def test_dc_ratios_are_tried_on_the_winner_and_kept_only_when_better_on_the_select_noise(tmp_path) -> None:
    """``calibrated=("dc",)``: DC-Solver ratios fitted on the fit noise for each NFE's winner, scored on the
    select noise beside it; the entry is the lower of the two, and a DC entry samples as its config says."""
    rec = _fit(0, 1, candidates=["unipc"], grids=["uniform_time"], calibrated=("dc",), n_fit=10, n_select=32)
    e = rec.entry(6)
    dc_lab, plain = "dc_solver[unipc] @ uniform_time", "unipc @ uniform_time"
    assert set(e.scores) == {dc_lab, plain}
    assert e.rms == min(v[0] for v in e.scores.values())
    assert (e.solver_config["name"] == "dc_solver") == (e.scores[dc_lab][0] < e.scores[plain][0])
    assert e.label == min(e.scores, key=lambda k: e.scores[k][0])  # a DC entry's label: dc_solver[<base>] @ grid
    dc_cfg = {"name": "dc_solver", "base": {"name": "unipc", "predictor_order": 3}, "ratios": [1.0, 0.9]}
    assert cr.candidate_label(dc_cfg) == "dc_solver[unipc(predictor_order=3)]"
    assert e.scores[dc_lab] != e.scores[plain]  # the ratios changed the sampler
    path = rec.save(tmp_path / "r.json")
    again = cr.Recipe.load(path, model="gmm16").entry(6)
    assert again.solver() == e.solver() and again.solver_config == e.solver_config
    with pytest.raises(ValueError, match="unknown calibrated artifact"):
        _fit(0, 1, calibrated=("ems",))


def test_dc_ratios_of_a_conditional_recipe_are_fitted_on_the_fit_noise_with_its_labels(monkeypatch) -> None:
    from dpmlab.calibrate import dc
    from dpmlab.models.analytic import GaussianMixture, preset

    mix = preset("gmm16")
    other = GaussianMixture(mix.weights[:4], mix.means[:4], mix.stds[:4]).denoiser(SCH)
    seen = []
    real = dc.fit_dc_ratios

    def labelled(x: torch.Tensor, t: torch.Tensor, *, label: torch.Tensor) -> torch.Tensor:
        return torch.where(label[:, None] == 1, MODEL(x, t), other(x, t))

    def spy(*args: object, **kw: object) -> object:
        seen.append(kw)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(dc, "fit_dc_ratios", spy)
    labels = torch.arange(12) % 2
    rec = cr.fit_recipe(
        labelled,  # type: ignore[arg-type]
        [6],
        fit_seed=3,
        select_seed=4,
        n_fit=6,
        n_select=12,
        learned=False,
        candidates=["unipc"],
        grids=["uniform_time"],
        calibrated=("dc",),
        cond={"label": labels},
        schedule=SCH,
        shape=(16,),
    )
    assert len(seen) == 1
    assert torch.equal(seen[0]["noise"], calibration_noise(SCH, (16,), 6, seed=3))  # type: ignore[arg-type]
    assert torch.equal(seen[0]["cond"]["label"], labels[:6])  # type: ignore[index]
    assert "dc_solver[unipc] @ uniform_time" in rec.entry(6).scores
