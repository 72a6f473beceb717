import json

import numpy as np
from safetensors.numpy import load_file

from dpmlab.cli import main
from dpmlab.solvers import available


def test_list_shows_every_solver(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in available():
        assert name in out
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in rows} == set(available())
    heun = next(r for r in rows if r["name"] == "heun")
    assert heun["order"] == "2" and heun["nfe_per_step"] == "2*"


def test_sample_writes_picture_and_raw(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert (
        main(["sample", "--model", "gmm2d", "--solver", "ddim", "--nfe", "10", "-n", "300", "--out", str(out), "-q"])
        == 0
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.png"]  # only the file the user named
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(
            [
                "sample",
                "--model",
                "gmm2d",
                "--nfe",
                "10",
                "-n",
                "300",
                "--out",
                str(out),
                "--raw",
                str(tmp_path / "s.npz"),
                "-q",
                "--overwrite",
            ]
        )
        == 0
    )
    raw = np.load(tmp_path / "s.npz")
    assert raw["samples"].shape == (300, 2)
    st = tmp_path / "r.safetensors"
    assert (
        main(
            [
                "sample",
                "--solver",
                "heun",
                "--nfe",
                "9",
                "--to-zero",
                "-n",
                "50",
                "--out",
                str(out),
                "--raw",
                str(st),
                "-q",
                "--overwrite",
            ]
        )
        == 0
    )
    assert load_file(str(st))["samples"].shape == (50, 2)


def test_sample_errors_are_clear_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "s.png"
    assert main(["sample", "--solver", "nope", "--out", str(out)]) == 2
    assert "unknown solver 'nope'" in capsys.readouterr().err
    assert main(["sample", "--solver", "heun", "--nfe", "10", "--to-zero", "--out", str(out)]) == 2
    assert "nearest possible budgets: 9, 11" in capsys.readouterr().err
    assert main(["sample", "--solver", "ddim", "--options", '{"eta": -2}', "--out", str(out)]) == 2
    assert "eta must be" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_calibrate_then_sample_with_each_artifact(tmp_path, capsys):
    ems, dc, plan = tmp_path / "ems.safetensors", tmp_path / "dc.safetensors", tmp_path / "plan.json"
    assert main(["calibrate", "ems", "--model", "gmm16", "-n", "128", "--grid-size", "20", "--out", str(ems)]) == 0
    assert main(["calibrate", "dc", "--model", "gmm16", "--nfe", "5", "-n", "2", "--out", str(dc)]) == 0
    assert (
        main(
            ["calibrate", "s3", "--model", "gmm16", "--nfe", "5", "-n", "32", "--generations", "1", "--out", str(plan)]
        )
        == 0
    )
    for solver, art in (("dpm_solver_v3", ems), ("dc_solver", dc), ("usf", plan)):
        out = tmp_path / f"{solver}.png"
        args = ["sample", "--model", "gmm16", "--solver", solver, "--artifact", str(art), "--nfe", "5", "-n", "20"]
        assert main([*args, "--out", str(out), "--raw", str(out.with_suffix(".npz")), "-q"]) == 0, solver
        assert np.isfinite(np.load(out.with_suffix(".npz"))["samples"]).all()
    capsys.readouterr()
    # an artifact fitted on another model is refused, naming both
    assert (
        main(
            [
                "sample",
                "--model",
                "gmm64",
                "--solver",
                "dpm_solver_v3",
                "--artifact",
                str(ems),
                "--nfe",
                "5",
                "--out",
                str(tmp_path / "x.png"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "gmm16" in err and "gmm64" in err
    assert main(["sample", "--solver", "ddim", "--artifact", str(ems), "--out", str(tmp_path / "y.png")]) == 2
    assert "takes no artifact" in capsys.readouterr().err


def test_classifier_free_guidance_on_the_shipped_mnist_model(tmp_path, capsys):
    out = tmp_path / "g.png"
    assert (
        main(
            [
                "sample",
                "--model",
                "mnist",
                "--label",
                "7",
                "--guidance",
                "3",
                "--solver",
                "unipc",
                "--nfe",
                "6",
                "-n",
                "4",
                "--out",
                str(out),
                "--raw",
                str(out.with_suffix(".npz")),
                "-q",
            ]
        )
        == 0
    )
    assert np.load(out.with_suffix(".npz"))["samples"].shape == (4, 1, 28, 28)
    assert main(["sample", "--model", "gmm16", "--guidance", "3", "--out", str(out)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert main(["sample", "--model", "gmm16", "--guidance", "3", "--out", str(out), "--overwrite"]) == 2
    assert "--guidance needs --label" in capsys.readouterr().err
