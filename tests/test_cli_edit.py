"""`dpmlab edit` (ddpm | ddim | boundary) on the shipped mnist model, its input checks and outputs, and
`dpmlab sample --classifier-guidance` (EluCD)."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from dpmlab.cli import main

torch.set_num_threads(1)


def _digit_one() -> np.ndarray:
    """A 28x28 uint8 'one': a vertical bar on black."""
    img = np.zeros((28, 28), dtype=np.uint8)
    img[5:23, 12:16] = 255
    return img


def _png(path, arr, mode="L"):
    Image.fromarray(arr, mode=mode if arr.ndim == 2 else "RGB").save(path)
    return path


def _files(d):
    return sorted(p.name for p in d.iterdir())


def test_ddpm_edit_writes_only_the_named_files_and_reconstructs_exactly(tmp_path, capsys):
    src = _png(tmp_path / "one.png", _digit_one())
    out, rec = tmp_path / "edited.png", tmp_path / "rec.npz"
    rc = main(
        [
            "edit",
            "--model",
            "mnist",
            "--image",
            str(src),
            "--method",
            "ddpm",
            "--target-label",
            "7",
            "--steps",
            "12",
            "--skip",
            "0.25",
            "--out",
            str(out),
            "--reconstruction",
            str(rec),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert _files(tmp_path) == ["edited.png", "one.png", "rec.npz"]  # nothing the user did not name
    edited = np.asarray(Image.open(out))
    assert edited.shape == (28, 28) and edited.dtype == np.uint8
    x0 = _digit_one().astype(np.float32) / 127.5 - 1
    recon = np.load(rec)["images"]
    assert recon.shape == (1, 1, 28, 28) and np.abs(recon[0, 0] - x0).max() < 1e-4  # edit-friendly: exact
    assert np.abs(edited.astype(float) - _digit_one()).mean() > 1.0  # the edit changed the image
    assert "reconstruction RMS error" in capsys.readouterr().out


def test_ddim_edit_of_an_npz_batch(tmp_path):
    x = np.stack([_digit_one(), _digit_one()[:, ::-1].copy()])[:, None].astype(np.float32) / 127.5 - 1  # (2, 1, 28, 28)
    np.savez(tmp_path / "in.npz", samples=x)
    out = tmp_path / "out.npz"
    assert (
        main(
            [
                "edit",
                "--image",
                str(tmp_path / "in.npz"),
                "--method",
                "ddim",
                "--target-label",
                "3",
                "--source-label",
                "1",
                "--steps",
                "10",
                "--out",
                str(out),
                "-q",
            ]
        )
        == 0
    )
    got = np.load(out)["images"]
    assert got.shape == (2, 1, 28, 28) and np.isfinite(got).all()
    png = tmp_path / "pair.png"
    assert (
        main(
            [
                "edit",
                "--image",
                str(tmp_path / "in.npz"),
                "--method",
                "ddim",
                "--target-label",
                "3",
                "--steps",
                "10",
                "--out",
                str(png),
                "-q",
            ]
        )
        == 0
    )
    assert np.asarray(Image.open(png)).shape == (28, 56)  # the two edits side by side


def test_boundary_edit_runs_end_to_end(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("mlxtend")
    src = _png(tmp_path / "one.png", _digit_one())
    out, rec = tmp_path / "e.npz", tmp_path / "r.npz"
    assert (
        main(
            [
                "edit",
                "--image",
                str(src),
                "--method",
                "boundary",
                "--target-label",
                "7",
                "--source-label",
                "1",
                "--boundary-images",
                "12",
                "--boundary-steps",
                "6",
                "--out",
                str(out),
                "--reconstruction",
                str(rec),
                "-q",
            ]
        )
        == 0
    )
    edited, recon = np.load(out)["images"], np.load(rec)["images"]
    assert edited.shape == recon.shape == (1, 1, 28, 28) and not np.allclose(edited, recon)


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda p: _png(p / "big.png", np.zeros((32, 32), np.uint8)),
            "image is 32x32 with 1 channel.*takes 1 channel of 28x28",
        ),
        (
            lambda p: _png(p / "rgb.png", np.zeros((28, 28, 3), np.uint8)),
            "image is 28x28 with 3 channel.*takes 1 channel",
        ),
        (lambda p: p / "missing.png", "no such file"),
        (lambda p: (np.savez(p / "f.npz", images=np.full((28, 28), 3.0)), p / "f.npz")[1], r"must lie in \[-1, 1\]"),
        (lambda p: (p / "t.png").write_bytes(b"not a png") and p / "t.png", "not a readable image"),
    ],
)
def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys, make, match):
    src = make(tmp_path)
    before = _files(tmp_path)
    assert (
        main(["edit", "--image", str(src), "--target-label", "3", "--steps", "4", "--out", str(tmp_path / "o.png")])
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dpmlab: error: --image")
    assert re.search(match, err), err
    assert _files(tmp_path) == before


def test_bad_options(tmp_path, capsys):
    src = _png(tmp_path / "one.png", _digit_one())
    for extra, match in (
        (["--target-label", "x"], "unknown --target-label 'x'; allowed: 0, 1"),
        (["--target-label", "3", "--skip", "1.0"], r"--skip .* in \[0, 1\)"),
        (["--target-label", "3", "--out", str(tmp_path / "o.jpg")], "--out must name a .png or .npz file"),
        (["--target-label", "1", "--method", "boundary", "--source-label", "1"], "already a '1'"),
    ):
        argv = ["edit", "--image", str(src), "--out", str(tmp_path / "o.png"), *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert re.search(match, err), err
    assert _files(tmp_path) == ["one.png"]
    with pytest.raises(SystemExit):
        main(["edit", "--image", str(src), "--target-label", "3", "--method", "sdedit", "--out", "o.png"])


def test_sample_with_classifier_guidance(tmp_path, capsys):
    out = tmp_path / "g.png"
    assert (
        main(
            [
                "sample",
                "--model",
                "mnist",
                "--label",
                "3",
                "--classifier-guidance",
                "1.0",
                "-n",
                "4",
                "--nfe",
                "6",
                "--out",
                str(out),
                "--raw",
                str(tmp_path / "g.npz"),
                "-q",
            ]
        )
        == 0
    )
    raw = np.load(tmp_path / "g.npz")
    assert raw["samples"].shape == (4, 1, 28, 28) and np.isfinite(raw["samples"]).all()
    assert (
        main(
            [
                "sample",
                "--model",
                "mnist",
                "--classifier-guidance",
                "1.0",
                "-n",
                "2",
                "--nfe",
                "4",
                "--out",
                str(tmp_path / "h.png"),
                "-q",
            ]
        )
        == 2
    )
    assert "needs --label" in capsys.readouterr().err
    assert (
        main(
            [
                "sample",
                "--model",
                "digits8",
                "--label",
                "3",
                "--classifier-guidance",
                "1.0",
                "-n",
                "2",
                "--nfe",
                "4",
                "--out",
                str(tmp_path / "h.png"),
                "-q",
            ]
        )
        == 2
    )
