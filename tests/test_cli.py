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
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
