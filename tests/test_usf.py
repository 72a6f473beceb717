"""USF (Liu et al. 2024): presets reproduce DDIM / DPM-Solver++ / DPM-Solver / UniPC to 1e-10, plans
validate themselves, NFE accounting is honest, plan artifacts round-trip, and S³ never returns a plan
worse than the best preset it started from."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

import dpmlab.solvers as S
from dpmlab.calibrate.ems import fit_ems
from dpmlab.calibrate.s3 import fit_s3_plan, initial_plans
from dpmlab.models.analytic import preset
from dpmlab.schedules import DiscreteVP, LinearVP
from dpmlab.solvers import usf
from dpmlab.solvers.dpm_solver_v3 import EMS
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
    (
        S.get("dpm_solver_multistep", order=2),
        Preset(Family.DPM_SOLVER_PP, 2, Prediction.NOISE, Relaxation.DPM_SOLVER_2),
    ),
    (S.get("unipc", predictor_order=1), Preset.unipc(1)),
    (S.get("unipc"), Preset.unipc(2, "bh1")),
    (S.get("unipc", variant="bh2"), Preset.unipc(2, "bh2")),
    (S.get("unipc", predictor_order=3), Preset.unipc(3)),
    (S.get("unipc", predictor_order=2, prediction="noise"), Preset.unipc(2, "bh1", "noise")),
    (S.get("unipc", predictor_order=3, variant="bh2", prediction="noise"), Preset.unipc(3, "bh2", "noise")),
    (
        S.get("unipc", lower_order_final=False, final_corrector=True),
        Preset.unipc(2, lower_order_final=False, final_corrector=True),
    ),
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
    assert torch.equal(
        S.sample(S.Problem(model, sch), X, ts, USF(plan)), S.sample(S.Problem(model, sch), X, ts, USF(Preset.unipc()))
    )
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
    plan = dataclasses.replace(
        Preset.unipc(3, "bh2").expand(6, True),
        ts=tuple(make_grid(SCH, "karras", 6, to_zero=True).tolist()),
        afs=AFS.ZERO_X0,
        model="gmm16",
    )
    path = plan.save(tmp_path / "plan.json")
    assert Plan.load(path, model="gmm16", nfe=plan.nfe) == plan
    solver = USF(plan)
    assert S.get(**solver.config()) == solver
    with pytest.raises(ValueError, match="searched for model 'gmm16', not 'gmm64'"):
        Plan.load(path, model="gmm64")
    with pytest.raises(ValueError, match="plan uses nfe=5, not 6"):
        Plan.load(path, nfe=6)
    d = json.loads(path.read_text())
    for change, msg in (
        ({"format": "other"}, "is not a 'dpmlab.usf_plan'"),
        ({"nfe": 9}, "recorded nfe=9"),
        ({"ts": [0.5, 1.0]}, "invalid plan"),
        ({"extra": 1}, "invalid plan"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps({**d, **change}))
        with pytest.raises(ValueError, match=msg):
            Plan.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read a USF plan"):
        Plan.load(tmp_path / "junk.json")


def test_s3_search_never_worse_than_its_initial_presets(tmp_path):
    init = {k: v for k, v in initial_plans(SCH, 5, True, "gmm16").items() if "uniform_time" in k}
    res = fit_s3_plan(
        MODEL, SCH, 5, n_samples=64, population=6, generations=4, elite=2, initial=init, model_name="gmm16"
    )
    assert res.plan.nfe == 5 and res.plan.model == "gmm16" and len(res.history) == 4
    assert res.fitness <= min(res.baselines.values())
    assert list(res.history) == sorted(res.history, reverse=True)  # elitism: monotone
    loaded = Plan.load(res.plan.save(tmp_path / "s3.json"), model="gmm16", nfe=5)
    x = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * float(
        SCH.sigma(torch.tensor(SCH.t_max, dtype=torch.float64))
    )
    p = S.Problem(MODEL, SCH)
    out = S.sample(p, x, loaded.grid(), USF(loaded))
    assert p.nfe == 5 and torch.isfinite(out).all()
    res2 = fit_s3_plan(
        MODEL, SCH, 5, n_samples=64, population=6, generations=2, elite=2, initial=init, predictor=True, proposals=3
    )
    assert res2.fitness <= min(res2.baselines.values())


def test_s3_selects_on_fresh_noise_and_reports_on_a_third_set():
    """A searched plan over-fits its search noise: with select_n the returned plan is the best of the final elite
    and the presets on a second noise set, and report_n measures it on a third set used for nothing else."""
    init = {k: v for k, v in initial_plans(SCH, 5, True, "gmm16").items() if "uniform_time" in k}
    res = fit_s3_plan(
        MODEL,
        SCH,
        5,
        n_samples=16,
        population=6,
        generations=2,
        elite=2,
        initial=init,
        model_name="gmm16",
        select_n=16,
        report_n=16,
    )
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


# --- the authors' released schedules (thu-nics/USF, CIFAR-10 ScoreSDE) ------------------------------
VPSDE = LinearVP(0.1, 20.0, t_min=1e-4)  # the ScoreSDE VP schedule the released plans were searched on
GMM = preset("gmm16")


def _released(nfe, **kw):
    kw = {"v3": "data", "drop_skip": True, "afs_mean": GMM.mean(), **kw}
    return Plan.from_authors(f"cifar10_sde_nfe{nfe}", **kw)


@pytest.mark.parametrize("nfe", [5, 10])
def test_released_schedules_load_with_their_nfe_and_run(nfe):
    plan = _released(nfe)
    assert plan.nfe == nfe and len(plan.steps) == nfe + 1  # AFS saves the first evaluation
    assert plan.afs is (AFS.EPS_X if nfe == 5 else AFS.MEAN_X0)
    assert any(s.predictor.relaxation is Relaxation.LINEAR and s.predictor.coefficient != 0 for s in plan.steps)
    calls = []
    model = GMM.denoiser(VPSDE)

    def counted(x, t):
        calls.append(1)
        return model(x, t)

    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = S.sample(S.Problem(counted, VPSDE), x, plan.grid(), USF(plan))
    assert torch.isfinite(out).all() and len(calls) == nfe
    ref = S.sample(
        S.Problem(model, VPSDE),
        x,
        make_grid(VPSDE, "uniform_lambda", 40, t_start=plan.ts[0], t_end=plan.ts[-1]),
        S.get("dpm_solver_pp", order=3),
    )
    assert float((out - ref).pow(2).mean().sqrt()) < 0.2  # a real solve (x_T has RMS ~1; the data ~0.8)


def test_authors_conversion_refuses_what_it_cannot_express():
    v3 = Plan.from_authors("cifar10_sde_nfe5", drop_skip=True)  # v3 steps kept: sampling needs the EMS
    assert [s.prediction for s in v3.steps][:4] == [Prediction.V3] * 3 + [Prediction.DATA]
    with pytest.raises(ValueError, match=r"steps \[0, 1, 2\] use DPM-Solver-v3 prediction: pass USF\(plan, ems"):
        S.sample(S.Problem(GMM.denoiser(VPSDE), VPSDE), X, v3.grid(), USF(v3))
    with pytest.raises(ValueError, match="skip_coefficients .* pass drop_skip=True"):
        Plan.from_authors("cifar10_sde_nfe5", v3="data")
    with pytest.raises(ValueError, match="afs 'average_x0' needs the dataset-mean x0"):
        Plan.from_authors("cifar10_sde_nfe10", v3="data", drop_skip=True)
    with pytest.raises(ValueError, match="v3 must be None"):
        Plan.from_authors("cifar10_sde_nfe5", v3="f", drop_skip=True)
    d = json.loads((Path(usf.ASSETS) / "usf_cifar10_sde_nfe5.json").read_text())["decisions"]
    d["prediction_types"] = ["data_prediction"] * 6
    d["skip_coefficients"] = [1.0] * 4  # all ones: nothing to drop
    assert Plan.from_authors(d).nfe == 5
    bad = json.loads(json.dumps(d))
    bad["start_points"][3] = -2
    with pytest.raises(ValueError, match="step 3: start point -2 .singlestep. is not supported"):
        Plan.from_authors(bad)
    bad = json.loads(json.dumps(d))
    bad["derivative_types"][2][0]["active_points"] = [-4, -2]
    with pytest.raises(ValueError, match=r"active points \[-4, -2\] are not the 2 nearest"):
        Plan.from_authors(bad)
    with pytest.raises(ValueError, match="cannot read authors' USF decisions from nope"):
        Plan.from_authors("nope")


def test_linear_relaxation_and_the_new_afs_kinds():
    tay = Taylor(2, (1,), Relaxation.LINEAR, 0.25)
    assert tay.factor(0.4, "data") == tay.factor(0.4, "noise") == 1.0 + 0.25 * 0.4  # + h in every form
    with pytest.raises(ValueError, match="needs relaxation 'linear'"):
        Taylor(2, (1,), Relaxation.UNIPC_BH1, 0.5)
    ts = make_grid(SCH, "uniform_time", 6, to_zero=False)
    base = Preset.dpm_solver_pp(2).expand(6, False)

    def with_rel(rel, c):
        return Plan(
            tuple(
                dataclasses.replace(
                    s,
                    predictor=Taylor(
                        s.predictor.order,
                        s.predictor.points,
                        rel if s.predictor.order == 2 else Relaxation.NONE,
                        c if s.predictor.order == 2 else 0.0,
                    ),
                )
                for s in base.steps
            )
        )

    run = lambda p: S.sample(S.Problem(MODEL, SCH), X, ts, USF(p))  # noqa: E731
    assert torch.equal(run(with_rel(Relaxation.LINEAR, 0.0)), run(with_rel(Relaxation.NONE, 0.0)))
    assert not torch.equal(run(with_rel(Relaxation.LINEAR, 0.3)), run(with_rel(Relaxation.NONE, 0.0)))
    # AFS: one DDIM step from x_T whose first output is given -- eps_x: eps = x_T; mean_x0: x0 = the mean
    t = torch.tensor([VPSDE.t_max, 0.5], dtype=torch.float64)
    a0, s0, a1, s1 = (float(f(torch.tensor(v))) for v in t.tolist() for f in (VPSDE.alpha, VPSDE.sigma))
    mean = torch.arange(16, dtype=torch.float64) / 10
    for afs, x0 in ((AFS.EPS_X, (X - s0 * X) / a0), (AFS.MEAN_X0, mean.expand_as(X))):
        plan = Plan((Step(),), afs=afs, afs_mean=tuple(mean.tolist()) if afs is AFS.MEAN_X0 else None)
        assert plan.nfe == 0
        out = S.sample(S.Problem(MODEL, VPSDE), X, t, USF(plan))
        assert torch.allclose(out, s1 / s0 * X + (a1 - s1 / s0 * a0) * x0, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match="afs_mean is required for afs 'mean_x0' and only for it"):
        Plan((Step(),), afs=AFS.MEAN_X0)
    with pytest.raises(ValueError, match="afs_mean has 3 values, a sample has 16"):
        S.sample(S.Problem(MODEL, VPSDE), X, t, USF(Plan((Step(),), afs=AFS.MEAN_X0, afs_mean=(0.0, 1.0, 2.0))))


def test_version_1_artifacts_without_the_new_fields_still_load(tmp_path):
    plan = Preset.unipc(2).expand(5, True)
    d = {"format": "dpmlab.usf_plan", "version": 1, **plan.to_dict()}
    assert "afs_mean" not in d
    for s in d["steps"]:  # a file written before the linear relaxation existed has no coefficients
        for k in ("predictor", "correction"):
            if s[k] is not None:
                del s[k]["coefficient"]
    (tmp_path / "old.json").write_text(json.dumps(d))
    assert Plan.load(tmp_path / "old.json") == plan


def _ems(l, s_, n=3):
    lam = torch.linspace(-20, 20, n, dtype=torch.float64)
    return EMS(
        lam,
        torch.full((n, 1), l, dtype=torch.float64),
        torch.full((n, 1), s_, dtype=torch.float64),
        torch.zeros(n, 1, dtype=torch.float64),
    )


@pytest.mark.parametrize("nfe", [5, 10])
def test_v3_steps_with_degenerate_ems_equal_data_and_noise_steps(nfe):
    """l = 1, s = b = 0 makes v3 = data prediction, l = 0, s = -1 noise prediction (DPM-Solver-v3, App. A), so
    the released plan with its v3 steps kept equals the one with them substituted (linear relaxations: +h)."""
    model, kept = GMM.denoiser(VPSDE), _released(nfe, v3=None)
    for kind, ems in (("data", _ems(1.0, 0.0)), ("noise", _ems(0.0, -1.0))):
        a = S.sample(S.Problem(model, VPSDE), X, kept.grid(), USF(kept, ems=ems))
        b = S.sample(S.Problem(model, VPSDE), X, kept.grid(), USF(_released(nfe, v3=kind)))
        assert float((a - b).abs().max()) < 1e-11
    bad = _ems(1.0, 0.0)
    bad = EMS(bad.lam / 10, bad.l, bad.s, bad.b)
    with pytest.raises(ValueError, match="outside the EMS range"):
        S.sample(S.Problem(model, VPSDE), X, kept.grid(), USF(kept, ems=bad))
    with pytest.raises(ValueError, match="ems must be a dpmlab EMS"):
        USF(kept, ems=3)


def test_v3_steps_equal_dpm_solver_v3_and_released_schedules_run_with_a_fitted_ems(tmp_path):
    model = GMM.denoiser(VPSDE)
    data = GMM.sample(64, generator=torch.Generator().manual_seed(5))
    ems = fit_ems(model, VPSDE, data, n_points=64, grid_size=20, t_start=1.0, t_end=1e-4, model_name="gmm16")
    x = torch.randn(8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ts = make_grid(VPSDE, "uniform_lambda", 6, t_start=1.0, t_end=1e-3)
    for k in (2, 3):  # a plan of v3 steps (nearest points, no corrector) is dpmlab's DPM-Solver-v3 predictor
        plan = Plan(tuple(Step(Prediction.V3, Taylor.full(min(k, i + 1))) for i in range(6)))
        a = S.sample(S.Problem(model, VPSDE), x, ts, USF(plan, ems=ems))
        b = S.sample(
            S.Problem(model, VPSDE),
            x,
            ts,
            S.get("dpm_solver_v3", ems=ems, order=k, use_corrector=False, lower_order_final=False),
        )
        assert float((a - b).abs().max()) < 1e-10
    for nfe in (5, 10):
        plan, calls = _released(nfe, v3=None), []

        def counted(x, t, calls=calls):
            calls.append(1)
            return model(x, t)

        out = S.sample(S.Problem(counted, VPSDE), x, plan.grid(), USF(plan, ems=ems))
        assert len(calls) == nfe and torch.isfinite(out).all()
    ems.save(tmp_path / "ems.safetensors")  # a saved EMS by path: same result, JSON-able config
    by_path = USF(plan, ems=str(tmp_path / "ems.safetensors"))
    assert torch.equal(S.sample(S.Problem(model, VPSDE), x, plan.grid(), by_path), out)
    assert json.loads(json.dumps(by_path.config()))["ems"] == str(tmp_path / "ems.safetensors")


def test_s3_searches_the_released_decision_space_v3_linear_relaxation_and_every_afs():
    """With the model's EMS and the dataset mean, S³ proposes what the authors' released schedules use:
    v3 prediction steps, the linear relaxation with a (searched) coefficient, every AFS kind; without
    them it never proposes v3 or "mean_x0" (they could not run). The searched plans run and are scored."""
    import random

    from dpmlab.calibrate.s3 import _Search

    model = GMM.denoiser(VPSDE)
    plan = initial_plans(VPSDE, 6, True, "gmm16")["unipc_bh1@uniform_lambda"]
    mean = torch.zeros(16, dtype=torch.float64)

    def seen(search):
        preds, coefs, afs = set(), set(), set()
        for _ in range(300):
            p = search.mutate(plan)
            afs.add(p.afs)
            for st in p.steps:
                preds.add(st.prediction)
                if st.predictor.relaxation is Relaxation.LINEAR:
                    coefs.add(round(st.predictor.coefficient, 6))
        return preds, coefs, afs

    preds, coefs, afs = seen(_Search(VPSDE, 6, True, random.Random(0), 1.0, v3=True, afs_mean=tuple(mean.tolist())))
    assert Prediction.V3 in preds and len(coefs - {0.0}) > 5 and set(AFS) == afs
    preds, _, afs = seen(_Search(VPSDE, 6, True, random.Random(0), 1.0))
    assert Prediction.V3 not in preds and AFS.MEAN_X0 not in afs and AFS.EPS_X in afs
    data = GMM.sample(64, generator=torch.Generator().manual_seed(5))
    ems = fit_ems(model, VPSDE, data, n_points=64, grid_size=20, t_start=1.0, t_end=1e-4, model_name="gmm16")
    res = fit_s3_plan(
        model, VPSDE, 6, n_samples=16, population=8, generations=3, elite=2, ems=ems, afs_mean=mean, p_mutate=0.6
    )
    assert res.plan.nfe == 6 and math.isfinite(res.fitness) and res.fitness <= min(res.baselines.values())
    with pytest.raises(ValueError, match="afs_mean has 3 values"):
        fit_s3_plan(model, VPSDE, 6, n_samples=4, generations=1, afs_mean=torch.zeros(3))
