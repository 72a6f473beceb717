import json

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

    assert _quality(mean_gap, torch.full((2, 3), float("nan")), torch.zeros(2, 3)) != _quality(
        mean_gap, torch.zeros(2, 3), torch.zeros(2, 3)
    )
    assert run_bench(model, sch, (16,), [Entry("ddim", get("ddim"))], [5], n=8, peers=False).fd_table() is None
