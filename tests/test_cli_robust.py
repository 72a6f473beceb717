"""Issue 15: the command line and API refuse bad input before any work with one line, write only the files the
user named (never replacing one without --overwrite), exit cleanly on Ctrl-C, and training survives SIGINT."""

import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import dpmlab
import dpmlab.cli as cli
from dpmlab._utils import atomic_write
from dpmlab.cli import main
from dpmlab.solvers.base import get
from dpmlab.training import Recipe, train
from dpmlab.training.data import Dataset
from dpmlab.training.trainer import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _files(folder):
    return sorted(p.name for p in Path(folder).rglob("*"))


@pytest.fixture
def no_work(monkeypatch):
    """Any model load (the first piece of real work) fails the test: validation must come first."""

    def fail(*a, **k):
        raise AssertionError("work started before the inputs were validated")

    monkeypatch.setattr(cli, "load", fail)


def test_sample_writes_only_named_files_and_never_replaces_one(tmp_path, capsys):
    keep = tmp_path / "s.npz"
    keep.write_bytes(b"the user's own file")
    out = tmp_path / "s.png"
    args = ["sample", "--model", "gmm2d", "--nfe", "4", "-n", "20", "--out", str(out), "-q"]
    assert main(args) == 0
    assert keep.read_bytes() == b"the user's own file" and _files(tmp_path) == ["s.npz", "s.png"]
    before = out.read_bytes()
    assert main([*args, "--seed", "3"]) == 2
    assert "s.png' exists; pass --overwrite to replace it" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert main([*args, "--seed", "3", "--overwrite"]) == 0 and out.read_bytes() != before


@pytest.mark.parametrize(
    "argv, match",
    [
        (["sample", "--out", "{d}/folder"], "is a folder; name a file inside it"),
        (["sample", "--out", "{d}/afile/x.png"], "which is a file, not a folder"),
        (["sample", "--out", "{d}/x.jpg"], r"--out must name a \.png file"),
        (["sample", "--out", "{d}/x.png", "--raw", "{d}/x.txt"], r"--raw must name a \.npz or \.safetensors"),
        (["sample", "--out", "{d}/x.png", "--raw", "{d}/afile"], r"--raw must name"),
        (["sample", "--out", "{d}/x.png", "--raw", "{d}/existing.npz"], "exists; pass --overwrite"),
        (["calibrate", "s3", "--out", "{d}/plan.txt"], r"--out must name a \.json file"),
        (["calibrate", "ems", "--out", "{d}/folder"], "is a folder"),
        (["calibrate", "ems", "--out", "{d}/e.npz"], r"--out must name a \.safetensors file"),
        (["train", "--data", "moons", "--out", "{d}/run", "--export", "{d}/m.pt"], r"must name a \.safetensors"),
        (["train", "--data", "moons", "--out", "{d}/run", "--export", "{d}/existing.safetensors"], "exists"),
        (["bench", "--quick", "--out", "{d}/afile/b"], "which is a file, not a folder"),
        (["edit", "--image", "{d}/x.png", "--target-label", "3", "--out", "{d}/existing.npz"], "exists"),
    ],
)
def test_bad_output_paths_are_refused_before_any_work(tmp_path, capsys, no_work, argv, match):
    (tmp_path / "folder").mkdir()
    for name in ("afile", "existing.npz", "existing.safetensors"):
        (tmp_path / name).write_bytes(b"x")
    before = _files(tmp_path)
    assert main([a.replace("{d}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dpmlab: error: ") and "Traceback" not in err
    assert re.search(match, err), err
    assert _files(tmp_path) == before  # nothing written, nothing removed


@pytest.mark.parametrize(
    "argv, match",
    [
        (["bench", "--nfe", "0"], r"--nfe budgets must lie in \[1, 10000\], got 0"),
        (["bench", "--nfe", "5,x"], "comma-separated whole numbers"),
        (["sample", "--nfe", "100000000"], r"out of range: NFE budgets lie in \[1, 10000\]"),
        (["calibrate", "ems", "-n", "-5", "--out", "e.safetensors"], r"-5 is out of range"),
        (["sample", "--threads", "-1"], "-1 is out of range"),
        (["sample", "--threads", "0"], "0 is out of range"),
        (["sample", "--seed", "1.5"], "'1.5' is not a whole number"),
        (["sample", "--seed", str(2**70)], "out of range: seeds lie in"),
        (["sample", "--batch-size", "0"], "0 is out of range"),
        (["sample", "-n", "0"], "0 is out of range"),
        (["train", "--steps", "0"], "0 is out of range"),
    ],
)
def test_numbers_out_of_range_are_refused(capsys, no_work, argv, match):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal: usage line + one error line
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err


def test_ctrl_c_and_file_system_errors_exit_cleanly(tmp_path, capsys, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "sample", interrupted)
    args = ["sample", "--model", "gmm2d", "--out", str(tmp_path / "s.png")]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "dpmlab: interrupted" and not list(tmp_path.iterdir())
    with pytest.raises(KeyboardInterrupt):
        main(["--debug", *args])

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "s.png"))

    monkeypatch.setattr(cli, "sample", denied)
    assert main(args) == 1
    err = capsys.readouterr().err  # (the cleared progress bar precedes it; the message has a line of its own)
    assert err.splitlines()[-1] == f"dpmlab: error: Permission denied ({tmp_path / 's.png'})"


def test_solver_options_are_checked_by_type():
    with pytest.raises(ValueError, match=r"option order=True \(bool\) has the wrong type; allowed: int"):
        get("dpm_solver_pp", order=True)
    with pytest.raises(ValueError, match=r"option order=2.0 \(float\) has the wrong type"):
        get("deis", order=2.0)
    with pytest.raises(ValueError, match=r"option eta='1' \(str\) has the wrong type; allowed: float"):
        get("ddim", eta="1")
    assert get("ddim", eta=1).eta == 1  # an int is a float
    with pytest.raises(ValueError, match="unknown variance 'learned'"):  # the solver's own check names the values
        get("ddpm", variance="learned")


def test_cli_solver_options_and_listing(tmp_path, capsys):
    assert (
        main(["sample", "--options", '{"order": true}', "--solver", "dpm_solver_pp", "--out", str(tmp_path / "s.png")])
        == 2
    )
    assert "has the wrong type" in capsys.readouterr().err
    assert main(["sample", "--options", "{eta: 1}", "--out", str(tmp_path / "s.png")]) == 2
    assert "--options is not valid JSON" in capsys.readouterr().err
    assert main(["list", "unipc", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"option": "predictor_order", "type": "int", "default": "2"} in info["options"]
    assert "UniPC" in info["paper"]
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    assert "(default: ddim)" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"seed": 1.5}, r"seed must be a whole number in \[0, 9223372036854775807\], got 1.5"),
        ({"seed": 2**70}, "seed must be a whole number"),
        ({"seed": -1}, "seed must be a whole number"),
        ({"n": True}, "n must be a whole number >= 1, got True"),
        ({"dtype": torch.int32}, "dtype must be a floating torch dtype"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1, got 0"),
        ({"to_zero": 1}, "to_zero must be True, False or None"),
    ],
)
def test_api_refuses_what_it_used_to_coerce(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpmlab.sample("gmm2d", **{"n": 4, **kwargs})


def test_artifact_solvers_need_an_artifact_or_an_explicit_none(tmp_path, capsys):
    out = tmp_path / "v3.png"
    for solver, fix in (("dpm_solver_v3", "dpmlab calibrate ems"), ("dc_solver", "dpmlab calibrate dc")):
        assert main(["sample", "--model", "gmm2d", "--solver", solver, "--nfe", "6", "--out", str(out)]) == 2
        assert f"give --artifact FILE ({fix}) or --artifact none" in capsys.readouterr().err
    raw = tmp_path / "v3.npz"
    assert (
        main(
            [
                "sample",
                "--model",
                "gmm2d",
                "--solver",
                "dpm_solver_v3",
                "--artifact",
                "none",
                "--nfe",
                "6",
                "--out",
                str(out),
                "--raw",
                str(raw),
                "-q",
            ]
        )
        == 0
    )
    assert json.loads(str(np.load(raw)["meta"]))["artifact"] == "none"
    assert (
        main(
            [
                "sample",
                "--model",
                "gmm2d",
                "--solver",
                "dpm_solver_v3",
                "--artifact",
                "none",
                "--options",
                '{"ems": null}',
                "--nfe",
                "6",
                "--out",
                str(tmp_path / "b.png"),
            ]
        )
        == 2
    )
    assert "the solver options set ems and the artifact gives it too" in capsys.readouterr().err
    assert (
        main(["sample", "--model", "gmm2d", "--solver", "ddim", "--artifact", "none", "--out", str(tmp_path / "c.png")])
        == 2
    )
    assert "takes no artifact" in capsys.readouterr().err


def _tiny():
    g = torch.Generator().manual_seed(0)
    data = Dataset("tiny", torch.rand(16, 2, generator=g) * 2 - 1, None, ())
    recipe = Recipe.from_dict(
        {
            "name": "tiny",
            "data": {"name": "moons"},
            "model": {"net": "mlp", "objective": "eps", "net_config": {"data_shape": [2], "width": 16, "depth": 2}},
            "train": {
                "steps": 8,
                "batch_size": 4,
                "lr": 1e-3,
                "ema_decay": 0.9,
                "checkpoint_every": 100,
                "log_every": 1,
                "seed": 1,
            },
        }
    )
    return recipe, data


def test_sigint_during_training_checkpoints_and_resume_is_bit_exact(tmp_path):
    recipe, data = _tiny()
    ref = train(recipe, tmp_path / "ref", dataset=data, progress=False)

    def interrupt(step, loss):
        if step == 3:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the step finishes, then a checkpoint is written

    with pytest.raises(KeyboardInterrupt, match="SIGINT: checkpoint written at step 3"):
        train(recipe, tmp_path / "run", dataset=data, progress=False, callback=interrupt)
    assert read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")[1]["step"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler was put back
    with pytest.raises(ValueError, match=r"at step 3, train.steps=3: nothing to resume; give more steps"):
        train(
            Recipe.from_dict({**recipe.to_dict(), "train": {**recipe.to_dict()["train"], "steps": 3}}),
            tmp_path / "run",
            resume=True,
            dataset=data,
            progress=False,
        )
    more = {**recipe.to_dict(), "train": {**recipe.to_dict()["train"], "checkpoint_every": 2}}  # may change
    res = train(Recipe.from_dict(more), tmp_path / "run", resume=True, dataset=data, progress=False)
    assert res.losses == ref.losses
    a = read_checkpoint(tmp_path / "run" / "checkpoint.safetensors")[0]
    b = read_checkpoint(tmp_path / "ref" / "checkpoint.safetensors")[0]
    assert all(torch.equal(a[k], b[k]) for k in b if k.startswith("ema/"))


def test_cli_resume_names_the_differing_field(tmp_path, capsys):
    args = [
        "train",
        "--data",
        "moons",
        "--net",
        "mlp",
        "--out",
        str(tmp_path / "r"),
        "-q",
        "--set",
        "model.net_config.width=8",
    ]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "4", "--resume", "--lr", "0.01"]) == 2
    assert "train config differs at lr (saved 0.0002, now 0.01)" in capsys.readouterr().err
    assert main([*args, "--steps", "4", "--resume", "--checkpoint-every", "1"]) == 0


def test_orphan_temp_files_of_dead_processes_are_removed(tmp_path):
    target = tmp_path / "model.safetensors"
    dead = tmp_path / ".model.safetensors.999999999.abc.safetensors"  # no such pid
    live = tmp_path / f".model.safetensors.{os.getpid()}.def.safetensors"  # still running: kept
    other = tmp_path / ".other.safetensors.999999999.x.safetensors"  # another file's: kept
    for p in (dead, live, other):
        p.write_bytes(b"torn")
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"ok")
    assert target.read_bytes() == b"ok" and not dead.exists() and live.exists() and other.exists()


def test_method_commands_check_the_recipe_kind(tmp_path, capsys):
    recipe = str(ROOT / "recipes" / "methods" / "pfgmpp_digits8.json")
    assert main(["finetune", "--recipe", recipe, "--out", str(tmp_path / "r")]) == 2
    assert "method 'pfgmpp' is run with `dpmlab train`, not `dpmlab finetune`" in capsys.readouterr().err
    assert main(["prune", "--recipe", str(ROOT / "recipes" / "digits8.json"), "--out", str(tmp_path / "r")]) == 2
    assert "dpmlab prune needs a method recipe" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_apps_and_analysis_run_their_own_command_lines(capsys):
    assert main(["analyze", "intrinsic_dimension", "gaussian", "--d", "6"]) == 2
    assert capsys.readouterr().err.strip().startswith("error:")
    with pytest.raises(SystemExit) as e:
        main(["apps", "selective_labels", "--help"])
    assert e.value.code == 0 and "simulate" in capsys.readouterr().out


def test_dc_ratios_record_their_grid_and_are_checked_on_use(tmp_path, capsys):
    """DC ratios fitted on one grid are refused on another (they used to be applied unchecked)."""
    art = tmp_path / "dc.safetensors"
    assert main(["calibrate", "dc", "--model", "gmm16", "--nfe", "5", "-n", "2", "--out", str(art)]) == 0
    args = ["sample", "--model", "gmm16", "--solver", "dc_solver", "--artifact", str(art), "--nfe", "5", "-q"]
    assert main([*args, "--out", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    assert main([*args, "--grid", "uniform_time", "--out", str(tmp_path / "b.png")]) == 2
    assert "dc ratios were fitted on the grid" in capsys.readouterr().err
