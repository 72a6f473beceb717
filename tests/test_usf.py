"""USF (Liu et al. 2024): presets reproduce DDIM / DPM-Solver++ / DPM-Solver / UniPC to 1e-10, plans
validate themselves, NFE accounting is honest, plan artifacts round-trip, and S³ never returns a plan
worse than the best preset it started from."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import dpmlab.solvers as S
from dpmlab.calibrate.s3 import fit_s3_plan, initial_plans
from dpmlab.models.analytic import preset
from dpmlab.schedules import DiscreteVP, LinearVP
from dpmlab.solvers.usf import (
    AFS,
    USF,
    Corrector,
    Family,
    Plan,
    Prediction,
    Preset,
    Relaxation,
    Step,
    Taylor,
)
from dpmlab.timesteps import make_grid, uniform_lambda

torch.set_num_threads(1)
SCH = DiscreteVP.from_preset("linear")
MODEL = preset("gmm16").denoiser(SCH)
X = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

PAIRS = [
    (S.get("ddim"), Preset.ddim()),
    (S.get("dpm_solver_pp", order=1), Preset.dpm_solver_pp(1)),
    (S.get("dpm_solver_pp", order=2), Preset.dpm_solver_pp(2)),
    (S.get("dpm_solver_pp", order=2, solver_type="heun"), Preset.dpm_solver_pp(2, "heun")),
    (S.get("dpm_solver_pp", order=3), Preset.dpm_solver_pp(3)),
    (S.get("dpm_solver_pp", order=3, lower_order_final=False), Preset.dpm_solver_pp(3, lower_order_final=False)),
    (S.get("dpm_solver_multistep", order=2),
     Preset(Family.DPM_SOLVER_PP, 2, Prediction.NOISE, Relaxation.DPM_SOLVER_2)),
    (S.get("unipc", predictor_order=1), Preset.unipc(1)),
    (S.get("unipc"), Preset.unipc(2, "bh1")),
    (S.get("unipc", variant="bh2"), Preset.unipc(2, "bh2")),
    (S.get("unipc", predictor_order=3), Preset.unipc(3)),
    (S.get("unipc", predictor_order=2, prediction="noise"), Preset.unipc(2, "bh1", "noise")),
    (S.get("unipc", predictor_order=3, variant="bh2", prediction="noise"), Preset.unipc(3, "bh2", "noise")),
    (S.get("unipc", lower_order_final=False, final_corrector=True),
     Preset.unipc(2, lower_order_final=False, final_corrector=True)),
]


@pytest.mark.parametrize(("solver", "plan"), PAIRS, ids=lambda v: str(v.config()) if hasattr(v, "config") else "")
@pytest.mark.parametrize(("steps", "to_zero"), [(5, True), (8, False), (12, True)])
def test_presets_reproduce_the_registered_solvers(solver, plan, steps, to_zero):
    ts = make_grid(SCH, "uniform_time", steps, to_zero=to_zero)
    p_ref, p_usf = S.Problem(MODEL, SCH), S.Problem(MODEL, SCH)
    a = S.sample(p_ref, X, ts, solver)
    b = S.sample(p_usf, X, ts, USF(plan))
    assert float((a - b).abs().max()) < 1e-10
    assert p_ref.nfe == p_usf.nfe == USF(plan).nfe(ts, SCH) == solver.nfe(ts, SCH)


def test_fixed_plan_equals_its_preset_and_honest_nfe():
    ts = uniform_lambda(LinearVP(), 6)
    sch = LinearVP()
    model = preset("gmm16").denoiser(sch)
    plan = Preset.unipc().expand(6, False)
    assert torch.equal(S.sample(S.Problem(model, sch), X, ts, USF(plan)),
                       S.sample(S.Problem(model, sch), X, ts, USF(Preset.unipc())))
    steps = list(plan.steps)
    steps[2] = dataclasses.replace(steps[2], corrector=Corrector.IMPLICIT)  # +1: next step re-evaluates
    for p, nfe in ((plan, 6), (dataclasses.replace(plan, afs=AFS.ZERO_X0), 5), (Plan(tuple(steps)), 7)):
        prob = S.Problem(model, sch)
        S.sample(prob, X, ts, USF(p))
        assert p.nfe == prob.nfe == nfe
    mixed = [Step(Prediction.NOISE if i % 2 else Prediction.DATA, Taylor.full(min(i + 1, 3))) for i in range(6)]
    prob = S.Problem(model, sch)
    out = S.sample(prob, X, ts, USF(Plan(tuple(mixed))))  # mixed prediction types run, one NFE per step
    assert torch.isfinite(out).all() and prob.nfe == 6


def test_plan_validation_errors():
    t = Taylor.full
    with pytest.raises(ValueError, match="needs 1 derivative estimates"):
        Taylor(2, ())
    with pytest.raises(ValueError, match=r"points for derivative 2 must be an int in 2\.\.4"):
        Taylor(3, (2, 1))
    with pytest.raises(ValueError, match="Taylor order must be an int in 1..4"):
        Taylor(5, (1, 1, 1, 1))
    with pytest.raises(ValueError, match="needs a first-derivative term"):
        Taylor(1, (), Relaxation.UNIPC_BH1)
    with pytest.raises(ValueError, match="disagree"):
        Step(corrector=Corrector.PSEUDO)
    with pytest.raises(ValueError, match="order >= 2"):
        Step(corrector=Corrector.PSEUDO, correction=t(1))
    with pytest.raises(ValueError, match="step 0: predictor needs 1 earlier outputs, only 0 exist"):
        Plan((Step(predictor=t(2)),))
    with pytest.raises(ValueError, match="step 1: corrector needs 3 outputs, only 2 exist"):
        Plan((Step(), Step(Prediction.DATA, t(2), Corrector.PSEUDO, Taylor(4, (1, 2, 3)))))
    with pytest.raises(ValueError, match="strictly decreasing"):
        Plan((Step(), Step()), ts=(1.0, 0.2, 0.5))
    with pytest.raises(ValueError, match="3 finite times"):
        Plan((Step(), Step()), ts=(1.0, 0.0))
    with pytest.raises(ValueError, match="'bogus' is not a valid Prediction"):
        Step(prediction="bogus")
    with pytest.raises(ValueError, match="one or more Step"):
        Plan(())
    ts = make_grid(SCH, "uniform_time", 3, to_zero=True)
    bad_end = Plan((Step(), Step(predictor=t(2)), Step(predictor=t(2))))
    with pytest.raises(ValueError, match="step to sigma = 0 must be first order"):
        S.sample(S.Problem(MODEL, SCH), X, ts, USF(bad_end))
    with pytest.raises(ValueError, match="the plan has 3 steps, the grid 5"):
        S.sample(S.Problem(MODEL, SCH), X, make_grid(SCH, "uniform_time", 5), USF(bad_end))
    fixed = dataclasses.replace(Preset.ddim().expand(3, True), ts=(1.0, 0.5, 0.2, 0.0))
    with pytest.raises(ValueError, match="differs from the plan's timesteps"):
        S.sample(S.Problem(MODEL, SCH), X, ts, USF(fixed))
    with pytest.raises(ValueError, match="uses exactly nfe=3, not 4"):
        USF(fixed).steps_for_nfe(4, True)
    with pytest.raises(ValueError, match="preset order must be an int in 1..1"):
        Preset(Family.DDIM, 2)


def test_plan_artifact_round_trip_and_bad_files(tmp_path):
    plan = dataclasses.replace(Preset.unipc(3, "bh2").expand(6, True), ts=tuple(make_grid(SCH, "karras", 6,
                               to_zero=True).tolist()), afs=AFS.ZERO_X0, model="gmm16")
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path, model="gmm16", nfe=plan.nfe) == plan
    solver = USF(plan)
    assert S.get(**solver.config()) == solver
    with pytest.raises(ValueError, match="searched for model 'gmm16', not 'gmm64'"):
        Plan.load(path, model="gmm64")
    with pytest.raises(ValueError, match="plan uses nfe=5, not 6"):
        Plan.load(path, nfe=6)
    d = json.loads(path.read_text())
    for change, msg in (({"format": "other"}, "is not a 'dpmlab.usf_plan'"), ({"nfe": 9}, "recorded nfe=9"),
                        ({"ts": [0.5, 1.0]}, "invalid plan"), ({"extra": 1}, "invalid plan")):
        (tmp_path / "bad.json").write_text(json.dumps({**d, **change}))
        with pytest.raises(ValueError, match=msg):
            Plan.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a USF plan"):
        Plan.load(tmp_path / "junk.json")


def test_s3_search_never_worse_than_its_initial_presets(tmp_path):
    init = {k: v for k, v in initial_plans(SCH, 5, True, "gmm16").items() if "uniform_time" in k}
    res = fit_s3_plan(MODEL, SCH, 5, n_samples=64, population=6, generations=4, elite=2, initial=init,
                      model_name="gmm16")
    assert res.plan.nfe == 5 and res.plan.model == "gmm16" and len(res.history) == 4
    assert res.fitness <= min(res.baselines.values())
    assert list(res.history) == sorted(res.history, reverse=True)  # elitism: monotone
    loaded = Plan.load(res.plan.save(tmp_path / "s3.json"), model="gmm16", nfe=5)
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * float(SCH.sigma(
        torch.tensor(SCH.t_max, dtype=torch.float64)))
    p = S.Problem(MODEL, SCH)
    out = S.sample(p, x, loaded.grid(), USF(loaded))
    assert p.nfe == 5 and torch.isfinite(out).all()
    res2 = fit_s3_plan(MODEL, SCH, 5, n_samples=64, population=6, generations=2, elite=2, initial=init,
                       predictor=True, proposals=3)
    assert res2.fitness <= min(res2.baselines.values())


def test_s3_selects_on_fresh_noise_and_reports_on_a_third_set():
    """A searched plan over-fits its search noise: with select_n the returned plan is the best of the final elite
    and the presets on a second noise set, and report_n measures it on a third set used for nothing else."""
    init = {k: v for k, v in initial_plans(SCH, 5, True, "gmm16").items() if "uniform_time" in k}
    res = fit_s3_plan(MODEL, SCH, 5, n_samples=16, population=6, generations=2, elite=2, initial=init,
                      model_name="gmm16", select_n=16, report_n=16)
    assert res.selection is not None and res.held_out is not None
    t0 = float(SCH.sigma(torch.tensor(SCH.t_max, dtype=torch.float64)))
    from dpmlab.models.reference import reference_solution

    def err(plan, k):
        x = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(k)) * t0
        ref = reference_solution(MODEL, SCH, x, SCH.t_max, SCH.t_zero, rtol=1e-10, atol=1e-10).x
        return float((S.sample(S.Problem(MODEL, SCH), x, plan.grid(), USF(plan)) - ref).pow(2).mean().sqrt())

    assert abs(err(res.plan, 1) - res.selection) < 1e-12 and abs(err(res.plan, 2) - res.held_out) < 1e-12
    assert res.selection <= min(err(p, 1) for p in init.values()) + 1e-12  # the presets were candidates too
    with pytest.raises(ValueError, match="select_n must be a whole number >= 0, got -1"):
        fit_s3_plan(MODEL, SCH, 5, n_samples=4, generations=1, select_n=-1)


def test_s3_corrector_order_is_the_predictor_order_plus_one():
    """The authors' rule (their code): a pseudo corrector after a predictor of order k has order k + 1."""
    import random

    from dpmlab.calibrate.s3 import _Search

    plan = initial_plans(SCH, 6, True, "gmm16")["dpm_solver_pp_2m@uniform_time"]
    search = _Search(SCH, 6, True, random.Random(0), 1.0)
    seen = 0
    for _ in range(200):
        for st in search.mutate(plan).steps:
            if st.correction is not None:
                seen += 1
                assert st.correction.order == min(st.predictor.order + 1, 4), st
    assert seen > 0
