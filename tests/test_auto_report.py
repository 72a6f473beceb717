"""The held-out report of issue 17 item 3 (``dpmlab.bench.harness.auto_report``): a calibrated sampler, the best
fixed dpmlab solver and the best diffusers configuration on one report noise set that shares no sample with
the noise used for fitting or selection, each error equal to a direct recomputation."""

import pytest
import torch

from dpmlab.bench.harness import PEERS, Entry, NoiseSet, auto_report
from dpmlab.calibrate.grid import calibration_noise, fit_grid
from dpmlab.interop.diffusers import run_scheduler
from dpmlab.models.analytic import preset
from dpmlab.models.reference import reference_solution
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import Problem, get, sample
from dpmlab.timesteps import make_grid

SCH = DiscreteVP.from_preset("linear")
MIX = preset("gmm16")
MODEL = MIX.denoiser(SCH)
FIT, SELECT, REPORT = NoiseSet(0, 12), NoiseSet(1, 8), NoiseSet(2, 16)
ENTRIES = [Entry("ddim", get("ddim")), Entry("dpm_solver_pp", get("dpm_solver_pp"))]
TOL = 1e-8  # the reference's tolerance; the errors compared are ~0.1
PEER_SET = [p for p in PEERS if p[0] in ("DDIM default", "UniPC bh2 default")]


class LearnedGrid:
    """A tiny calibrated sampler: UniPC on a GITS grid fitted on the FIT noise."""

    def __init__(self, nfes):
        x_fit = FIT.draw(SCH, (MIX.dim,))
        self.arts = {
            k: fit_grid(MODEL, SCH, "unipc", k, x_fit, method="gits", fine_steps=8, seeds=FIT.to_dict()) for k in nfes
        }

    def solver(self, nfe):
        return get("unipc")

    def grid(self, nfe):
        return self.arts[nfe].grid()


@pytest.fixture(scope="module")
def report():
    auto = LearnedGrid([5])
    rep = auto_report(
        MODEL,
        SCH,
        (MIX.dim,),
        auto,
        [5],
        report=REPORT,
        select=SELECT,
        used={"fit": FIT},
        entries=ENTRIES,
        peers=PEER_SET,
        ref_tol=TOL,
        name="gmm16",
    )
    return auto, rep


def test_contenders_share_the_held_out_noise_and_errors_equal_a_direct_recomputation(report):
    auto, rep = report
    noise = rep.noise
    assert not any(noise["report"].overlaps(noise[k]) for k in ("fit", "select"))
    x = REPORT.draw(SCH, (MIX.dim,))
    for other in (FIT, SELECT):  # disjoint sets: no start state of the report set was fitted or selected on
        y = other.draw(SCH, (MIX.dim,))
        assert torch.cdist(x, y).min() > 1e-3
    ref = reference_solution(MODEL, SCH, x, SCH.t_max, 0.0, rtol=TOL, atol=TOL).x
    assert torch.allclose(rep.reference, ref, atol=1e-5)
    assert {c.contender for c in rep.cells} == {"auto", "dpmlab", "diffusers"}

    def rms(out, r):
        return float((out.double() - r).pow(2).mean().sqrt())

    a = rep.cell("auto", 5)
    out = sample(Problem(MODEL, SCH), x, auto.grid(5), auto.solver(5))
    assert a.rms == pytest.approx(rms(out, ref), rel=1e-4)
    assert a.median == pytest.approx(float((out - ref).pow(2).mean(1).sqrt().median()), rel=1e-4)

    d = rep.cell("dpmlab", 5)
    slv = get(d.label)
    out = sample(
        Problem(MODEL, SCH), x, make_grid(SCH, "quadratic_time", slv.steps_for_nfe(5, True), to_zero=True), slv
    )
    assert d.rms == pytest.approx(rms(out, ref), rel=1e-4)

    p = rep.cell("diffusers", 5)
    (peer,) = [q for q in PEER_SET if q[0] == p.label]
    from dpmlab.bench.harness import _final_t, _steps_for, peer_scheduler

    sch = peer_scheduler(peer[1], peer[2], SCH)
    run = run_scheduler(sch, MODEL, SCH, x, _steps_for(sch, 5))
    t_end = _final_t(sch, SCH)
    r_end = ref if t_end == 0.0 else reference_solution(MODEL, SCH, x, SCH.t_max, t_end, rtol=TOL, atol=TOL).x
    assert run.nfe == 5 and p.rms == pytest.approx(rms(run.x, r_end), rel=1e-4)
    assert rep.ratio(5) == pytest.approx(a.rms / p.rms)


def test_configurations_are_chosen_on_the_select_set(report):
    _, rep = report
    for lib in ("dpmlab", "diffusers"):
        sel = [c for c in rep.selection if c.contender == lib and c.nfe == 5]
        assert len(sel) == 2  # both candidates ran on the select set, only the chosen one on the report set
        assert rep.cell(lib, 5).label == min(sel, key=lambda c: c.rms).label
        assert sum(c.contender == lib for c in rep.cells) == 1


def test_bootstrap_interval_brackets_the_ratio(report):
    _, rep = report
    lo, hi = rep.ratio_ci(5, reps=500)
    assert lo <= rep.ratio(5) <= hi and lo < hi
    assert rep.ratio_ci(5, of="auto", to="auto", reps=50) == pytest.approx((1.0, 1.0))


class Fixed:
    """A stand-in sampler: DDIM on a fixed grid starting at ``t_start``."""

    def __init__(self, t_start=None):
        self.t_start = t_start

    def solver(self, nfe):
        return get("ddim")

    def grid(self, nfe):
        return make_grid(SCH, "uniform_time", nfe, to_zero=True, t_start=self.t_start)


def test_report_refuses_noise_used_for_fitting_or_selection():
    auto = Fixed()
    kw = dict(entries=ENTRIES[:1], peers=PEER_SET[:1], name="gmm16", ref_tol=TOL)
    with pytest.raises(ValueError, match="overlaps the fit noise"):
        auto_report(
            MODEL, SCH, (16,), auto, [4], report=NoiseSet(0, 4, start=10), select=SELECT, used={"fit": FIT}, **kw
        )
    with pytest.raises(ValueError, match="overlaps the select noise"):
        auto_report(MODEL, SCH, (16,), auto, [4], report=NoiseSet(1, 4), select=SELECT, **kw)


def test_noise_sets():
    a = NoiseSet(3, 5, start=2)
    assert torch.equal(a.draw(SCH, (4,)), calibration_noise(SCH, (4,), 5, seed=3, start=2))
    assert torch.equal(a.draw(SCH, (4,))[1:], NoiseSet(3, 4, start=3).draw(SCH, (4,)))  # counter-based rows
    assert a.overlaps(NoiseSet(3, 1, start=6)) and not a.overlaps(NoiseSet(3, 2, start=7))
    assert not a.overlaps(NoiseSet(4, 5, start=2))
    with pytest.raises(ValueError, match="NoiseSet.n must be a positive int"):
        NoiseSet(0, 0)
    with pytest.raises(ValueError, match="NoiseSet.seed must be a non-negative int"):
        NoiseSet(-1, 4)


def test_auto_grid_must_start_at_t_max():
    with pytest.raises(ValueError, match="auto grid at NFE 4 runs t=0.9"):
        auto_report(
            MODEL, SCH, (16,), Fixed(0.9), [4], report=REPORT, select=SELECT, entries=ENTRIES[:1], peers=PEER_SET[:1]
        )
