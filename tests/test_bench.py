import json
import math

import pytest
import torch

from dpmlab.api import make_grid
from dpmlab.bench.harness import Entry, run_bench
from dpmlab.cli import main
from dpmlab.models.analytic import preset
from dpmlab.models.reference import reference_solution
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import Problem, get, sample


def test_bench_numbers_equal_a_direct_computation():
    sch = DiscreteVP.from_preset("linear")
    mix = preset("gmm16")
    model = mix.denoiser(sch)
    res = run_bench(
        model,
        sch,
        (16,),
        [Entry("ddim", get("ddim")), Entry("unipc", get("unipc"))],
        [6, 10],
        n=32,
        seed=5,
        peers=False,
    )
    x = torch.randn(32, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = x * float(sch.sigma(sch.t_max))  # the bench starts from sigma(t_start) * noise
    ref = reference_solution(model, sch, x, sch.t_max, 0.0, rtol=1e-10, atol=1e-10).x
    for row in res.rows:
        ts = make_grid(sch, "quadratic_time", row.nfe, to_zero=True)
        out = sample(Problem(model, sch), x, ts, get(row.label))
        assert row.rms == pytest.approx(float((out - ref).pow(2).mean().sqrt()), rel=1e-9)
        assert row.overhead_ms > 0


def test_bench_cli_quick_with_peers(tmp_path, capsys):
    stem = tmp_path / "b"
    assert main(["bench", "--model", "gmm16", "--quick", "--solvers", "ddim,dpm_solver_pp", "--out", str(stem)]) == 0
    out = capsys.readouterr().out
    assert "dpm_solver_pp" in out and "DPM++2M default" in out and "overhead" in out
    rows = json.loads((tmp_path / "b.json").read_text())["rows"]
    assert {r["library"] for r in rows} == {"dpmlab", "diffusers"}
    assert (tmp_path / "b.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "b.csv").read_text().startswith("library,label,nfe,rms")


def test_bench_cli_errors(tmp_path, capsys):
    assert main(["bench", "--solvers", "nope", "--quick", "--no-peers", "--out", str(tmp_path / "x")]) == 2
    assert "unknown solver 'nope'" in capsys.readouterr().err
    assert main(["bench", "--model", "nope", "--quick", "--out", str(tmp_path / "x")]) == 2
    assert "unknown model 'nope'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bench_quality_column_and_diverged_rows():
    sch = DiscreteVP.from_preset("linear")
    model = preset("gmm16").denoiser(sch)

    def mean_gap(x, ref):
        return float((x.mean(0) - ref.mean(0)).abs().max())

    res = run_bench(model, sch, (16,), [Entry("ddim", get("ddim"))], [5], n=16, peers=False, quality=mean_gap)
    assert res.fd_table() is not None and res.rows[0].fd >= 0
    from dpmlab.bench.harness import _quality

    assert math.isnan(_quality(mean_gap, torch.full((2, 3), float("nan")), torch.zeros(2, 3)))  # a diverged row
    assert _quality(mean_gap, torch.ones(2, 3), torch.zeros(2, 3)) == 1.0
    assert math.isnan(_quality(None, torch.ones(2, 3), torch.zeros(2, 3)))
    assert run_bench(model, sch, (16,), [Entry("ddim", get("ddim"))], [5], n=8, peers=False).fd_table() is None


# --- peers on the benchmarked model's own ODE; held-out selection ---------------------------------
@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_every_peer_is_built_on_the_benchmarked_schedule(name):
    from dpmlab.bench.harness import PEERS, peer_scheduler

    sch = DiscreteVP.from_preset(name)  # cosine: lambda clipped at -5.1, the top indices removed
    k = round(sch.t_max * sch.n_train)
    for label, cls_name, kwargs in PEERS:
        peer = peer_scheduler(cls_name, kwargs, sch)
        assert len(peer.alphas_cumprod) == k, label
        assert torch.allclose(peer.alphas_cumprod.double(), sch.alphas_cumprod[:k], rtol=1e-3), label


def test_peer_row_is_the_same_algorithm_on_the_same_ode():
    """A peer row equals dpmlab's DDIM on the peer's own grid, on the model's (scaled-linear)
    schedule, from the reference's starting state: the harness compares like with like."""
    from dpmlab.bench.harness import peer_rows
    from dpmlab.interop.diffusers import scheduler_grid

    sch = DiscreteVP.from_preset("scaled_linear")
    model = preset("gmm16").denoiser(sch)
    x = torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x0 = x * float(sch.sigma(torch.tensor(sch.t_max)))
    ref = reference_solution(model, sch, x0, sch.t_max, 0.0, rtol=1e-10, atol=1e-10).x  # DDIM ends at alpha=1
    peer = ("DDIM trailing", "DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"})
    (row,) = peer_rows(model, sch, x0, {0.0: ref}, [8], peers=[peer])
    from diffusers import DDIMScheduler

    grid_src = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing"
    )
    grid_src.set_timesteps(8)
    out = sample(Problem(model, sch), x0, scheduler_grid(grid_src.timesteps, sch, 0.0), get("ddim"))
    assert row.rms == pytest.approx(float((out - ref).pow(2).mean().sqrt()), rel=1e-4)


def test_peers_refuse_a_schedule_they_cannot_share():
    from dpmlab.schedules import LinearVP

    model = preset("gmm16").denoiser(LinearVP())
    with pytest.raises(ValueError, match="diffusers peers need a discrete VP schedule"):
        run_bench(model, LinearVP(), (16,), [Entry("ddim", get("ddim"))], [5], n=4, peers=True)


def test_best_config_is_chosen_on_one_noise_set_and_reported_on_another():
    from dpmlab.bench.harness import held_out_best

    sch = DiscreteVP.from_preset("linear")
    model = preset("gmm16").denoiser(sch)
    entries = [Entry(s, get(s)) for s in ("ddim", "unipc", "dpm_solver_pp")]
    a = run_bench(model, sch, (16,), entries, [5, 8], n=8, seed=1, peers=False)
    b = run_bench(model, sch, (16,), entries, [5, 8], n=8, seed=2, peers=False)
    held = held_out_best(a, b)
    assert len(held.rows) == 2 and held.seed == 2
    for row in held.rows:
        chosen = a.best("dpmlab", row.nfe)
        assert row.label == f"best: {chosen.label}"
        (same,) = [r for r in b.rows if r.label == chosen.label and r.nfe == row.nfe]
        assert row.rms == same.rms != chosen.rms
    with pytest.raises(ValueError, match="both have seed=1"):
        held_out_best(a, a)


def test_median_per_sample_error_is_robust_to_a_few_outliers():
    """The bench reports the median of per-sample RMS errors beside the pooled RMS (issue 17): one sample
    that changed mode dominates the RMS but not the median."""
    from dpmlab.bench.harness import _errors

    ref = torch.zeros(9, 4, dtype=torch.float64)
    out = ref + 0.01
    out[0] += 3.0  # one sample in the wrong mode
    rms, med = _errors(out, ref)
    assert abs(med - 0.01) < 1e-12 and rms > 0.9


def test_overhead_is_per_step_and_per_repeat(monkeypatch):
    """``_overhead_ms`` = elapsed / repeats / steps: a fake clock that advances 3 s over the timed repeats of a
    5-step grid must give 3 s / 3 repeats / 5 steps = 200 ms."""
    from dpmlab.bench import harness

    sch = DiscreteVP.from_preset("linear")
    clock = iter([0.0, 3.0])
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock))
    ms = harness._overhead_ms(get("ddim"), sch, make_grid(sch, "uniform_time", 5), (4,))
    assert ms == pytest.approx(3.0 / 3 / 5 * 1e3)
