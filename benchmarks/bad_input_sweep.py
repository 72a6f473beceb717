"""Issue 15's sweep: feed the CLI and the Python API bad inputs and classify what comes back.

    python benchmarks/bad_input_sweep.py            # prints the table and the counts

Each case must FAIL; the outcome is classified as
* ``clear``      exit status != 0 (CLI) / ValueError (API) with ONE line that names the bad value or file,
* ``unclear``    it failed, but with several lines, a traceback or an exception type other than ValueError,
* ``accepted``   it ran (status 0 / no exception): a silent coercion or fallback.
Nothing here needs a network beyond the shipped models; every case runs in a fresh temporary folder and the
sweep also reports any file a failing case left behind.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

torch.set_num_threads(1)


def cli_cases(d: str) -> list[list[str]]:
    s = ["sample", "--model", "gmm2d", "-n", "8", "--nfe", "4"]
    o = ["--out", f"{d}/o.png"]
    return [
        # outputs
        [*s, "--out", f"{d}/folder"],
        [*s, "--out", f"{d}/afile/x.png"],
        [*s, "--out", f"{d}/x.jpg"],
        [*s, *o, "--raw", f"{d}/r.txt"],
        [*s, *o, "--raw", f"{d}/existing.npz"],
        [*s, "--out", f"{d}/existing.png"],
        [*s, *o, "--raw", f"{d}/o.png"],
        ["calibrate", "s3", "--out", f"{d}/p.txt"],
        ["calibrate", "ems", "--out", f"{d}/folder"],
        ["calibrate", "dc", "--out", f"{d}/existing.safetensors"],
        ["train", "--data", "moons", "--export", f"{d}/m.pt", "--out", f"{d}/run"],
        ["bench", "--quick", "--out", f"{d}/afile/b"],
        ["edit", "--image", f"{d}/nope.png", "--target-label", "3", "--out", f"{d}/e.png"],
        ["edit", "--image", f"{d}/afile", "--target-label", "3", "--out", f"{d}/e.png"],
        # numbers
        [*s[:-2], "--nfe", "0", *o],
        [*s[:-2], "--nfe", "-3", *o],
        [*s[:-2], "--nfe", "100000000", *o],
        [*s[:-2], "--nfe", "2.5", *o],
        ["sample", "-n", "0", *o],
        ["sample", "-n", "-1", *o],
        ["sample", "--seed", "1.5", *o],
        ["sample", "--seed", "-1", *o],
        ["sample", "--seed", str(2**70), *o],
        ["sample", "--batch-size", "0", *o],
        ["sample", "--threads", "0", *o],
        ["sample", "--threads", "-1", *o],
        ["bench", "--nfe", "0"],
        ["bench", "--nfe", "5,x"],
        ["bench", "-n", "0"],
        ["calibrate", "ems", "-n", "-5", "--out", f"{d}/e.safetensors"],
        ["calibrate", "s3", "--generations", "0", "--out", f"{d}/p.json"],
        ["train", "--steps", "0"],
        ["train", "--batch-size", "-4"],
        ["train", "--lr", "nan", "--data", "moons", "--out", f"{d}/r1"],
        ["train", "--data", "moons", "--steps", "3", "--set", "train.ema_decay=2", "--out", f"{d}/r2"],
        # names
        ["sample", "--model", "nope", *o],
        ["sample", "--solver", "nope", *o],
        ["sample", "--grid", "nope", *o],
        ["sample", "--model", "mnist", "--label", "x", *o],
        ["sample", "--model", "gmm2d", "--label", "3", *o],
        ["sample", "--model", "gmm2d", "--prompt", "a seven", *o],
        ["sample", "--model", "mnist_t2i", "--prompt", "a purple seven", *o],
        ["sample", "--model", "mnist_t2i", "--label", "3", *o],
        ["sample", "--model", "mnist_t2i", "--prompt", "a seven", "--negative-prompt", "bold", *o],
        ["sample", "--model", "gmm2d", "--guidance", "3", *o],
        ["sample", "--model", "gmm2d", "--guidance", "nan", *o],
        ["sample", "--model", "mnist", "--classifier-guidance", "1", *o],
        ["train", "--data", "nope"],
        ["train", "--recipe", f"{d}/nope.json"],
        ["train", "--recipe", f"{d}/afile"],
        ["train", "--data", "moons", "--net", "unet", "--out", f"{d}/r3"],
        ["train", "--data", "folder", "--out", f"{d}/r4"],
        ["train", "--data", "folder", "--data-path", f"{d}/folder", "--out", f"{d}/r5"],
        ["train", "--data", "moons", "--set", "nonsense", "--out", f"{d}/r6"],
        ["train", "--data", "moons", "--set", "model.nope=1", "--out", f"{d}/r7"],
        ["train", "--data", "moons", "--resume", "--out", f"{d}/r8"],
        ["finetune", "--recipe", "recipes/digits8.json"],
        ["prune", "--recipe", "recipes/methods/pfgmpp_digits8.json"],
        ["distill", "--recipe", f"{d}/nope.json"],
        ["apps", "nope"],
        ["analyze", "nope"],
        ["edit", "--image", f"{d}/x.png", "--target-label", "x", "--out", f"{d}/e.png"],
        ["edit", "--image", f"{d}/x.png", "--target-label", "3", "--skip", "1.5", "--out", f"{d}/e.png"],
        ["edit", "--image", f"{d}/x.png", "--model", "gmm2d", "--target-label", "3", "--out", f"{d}/e.png"],
        ["bench", "--model", "nope"],
        ["bench", "--solvers", "nope", "--quick"],
        ["bench", "--schedule", "nope"],
        # options and artifacts
        ["sample", "--options", "{eta: 1}", *o],
        ["sample", "--options", "[1]", *o],
        ["sample", "--options", '{"etta": 1}', *o],
        ["sample", "--options", '{"eta": -1}', *o],
        ["sample", "--options", '{"eta": "1"}', *o],
        ["sample", "--solver", "dpm_solver_pp", "--options", '{"order": true}', *o],
        ["sample", "--solver", "dpm_solver_pp", "--options", '{"order": 2.0}', *o],
        ["sample", "--solver", "dpm_solver_pp", "--options", '{"order": 5}', *o],
        ["sample", "--solver", "heun", "--nfe", "10", "--to-zero", *o],
        ["sample", "--solver", "dpm_solver_v3", *o],
        ["sample", "--solver", "dc_solver", *o],
        ["sample", "--solver", "ddim", "--artifact", "none", *o],
        ["sample", "--solver", "dpm_solver_v3", "--artifact", f"{d}/nope.safetensors", *o],
        ["sample", "--solver", "dpm_solver_v3", "--artifact", f"{d}/afile", *o],
        ["sample", "--solver", "usf", "--artifact", f"{d}/existing.npz", *o],
        ["sample", "--solver", "dpm_solver_v3", "--artifact", "none", "--options", '{"ems": null}', *o],
        ["list", "nope"],
        ["sample", "--solver", "time_shift", "--options", '{"window": -1}', *o],
    ]


def api_cases() -> list[tuple[str, Callable[[], object]]]:
    import dpmlab
    from dpmlab.solvers.base import get

    def s(**kw: object) -> Callable[[], object]:
        return lambda: dpmlab.sample("gmm2d", **{"n": 4, "nfe": 4, **kw})  # type: ignore[arg-type]

    return [
        ("seed=1.5", s(seed=1.5)),
        ("seed=2**70", s(seed=2**70)),
        ("seed=-1", s(seed=-1)),
        ("n=True", s(n=True)),
        ("n=0", s(n=0)),
        ("n=2.0", s(n=2.0)),
        ("nfe=0", s(nfe=0)),
        ("nfe=True", s(nfe=True)),
        ("dtype=int32", s(dtype=torch.int32)),
        ("dtype='float32'", s(dtype="float32")),
        ("batch_size=0", s(batch_size=0)),
        ("to_zero=1", s(to_zero=1)),
        ("grid='nope'", s(grid="nope")),
        ("solver='nope'", s(solver="nope")),
        ("model='nope'", lambda: dpmlab.sample("nope")),
        ("order=True", lambda: get("dpm_solver_pp", order=True)),
        ("order=2.0", lambda: get("deis", order=2.0)),
        ("eta='1'", lambda: get("ddim", eta="1")),
        ("etta", lambda: get("ddim", etta=1.0)),
        ("variance='learned'", lambda: get("ddpm", variance="learned")),
        ("grid tensor increasing", s(grid=torch.tensor([0.1, 0.5, 0.9]), nfe=None)),
        ("grid tensor nan", s(grid=torch.tensor([0.9, math.nan, 0.1]), nfe=None)),
        ("cond label wrong length", lambda: dpmlab.sample("mnist", 4, nfe=2, cond={"label": torch.arange(3)})),
        ("cond label out of range", lambda: dpmlab.sample("mnist", 2, nfe=2, cond={"label": torch.tensor([0, 11])})),
        ("prompt OOV", lambda: dpmlab.sample("mnist_t2i", 2, nfe=2, cond={"prompt": "a purple seven"})),
    ]


def classify_cli(argv: list[str], d: str) -> tuple[str, str]:
    from dpmlab.cli import main

    err = io.StringIO()
    code: object
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)
    except SystemExit as e:
        code = e.code
    except Exception as e:  # noqa: BLE001 - an escaped exception is what this sweep looks for
        return "unclear", f"{type(e).__name__}: {e}"[:100]
    lines = [ln for ln in err.getvalue().replace("\r", "\n").splitlines() if "error" in ln.lower()]
    if code == 0:
        return "accepted", ""
    if len(lines) == 1 and "Traceback" not in err.getvalue():
        return "clear", lines[0][:110]
    return "unclear", " | ".join(lines)[:110] or err.getvalue()[-110:]


def classify_api(fn: Callable[[], object]) -> tuple[str, str]:
    try:
        fn()
    except ValueError as e:
        msg = str(e)
        return ("clear" if "\n" not in msg else "unclear"), msg[:110]
    except Exception as e:  # noqa: BLE001
        return "unclear", f"{type(e).__name__}: {e}"[:110]
    return "accepted", ""


def main() -> None:
    rows = []
    os.chdir(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as root:
        for k, argv in enumerate(cli_cases("{d}")):
            d = Path(root) / f"c{k}"
            d.mkdir()
            (d / "folder").mkdir()
            for name in ("afile", "existing.npz", "existing.png", "existing.safetensors"):
                (d / name).write_bytes(b"x")
            from PIL import Image

            Image.new("L", (28, 28)).save(d / "x.png")
            before = sorted(p.name for p in d.rglob("*"))
            real = [a.replace("{d}", str(d)) for a in argv]
            kind, msg = classify_cli(real, str(d))
            left = sorted(set(p.name for p in d.rglob("*")) - set(before))
            rows.append(("cli", " ".join(argv).replace("{d}/", "")[:70], kind, msg, ",".join(left)))
    for name, fn in api_cases():
        kind, msg = classify_api(fn)
        rows.append(("api", name, kind, msg, ""))
    print("| where | input | outcome | message (first 110 chars) | files left |")
    print("|---|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(x.replace("|", "/") for x in r) + " |")
    counts = {k: sum(r[2] == k for r in rows) for k in ("clear", "unclear", "accepted")}
    stray = sum(bool(r[4]) for r in rows)
    print(
        f"\n{len(rows)} bad inputs: {counts['clear']} clear one-line errors, {counts['unclear']} unclear, "
        f"{counts['accepted']} accepted; {stray} left files behind",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
