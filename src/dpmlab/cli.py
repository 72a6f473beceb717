"""Command line: ``dpmlab list`` and ``dpmlab sample``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._utils import atomic_write
from ._version import __version__
from .api import sample
from .models.hub import available_models, load
from .solvers.base import Solver, StepInfo, available, get, solver_class
from .timesteps import GRIDS

__all__ = ["main"]


def _cmd_list(args: argparse.Namespace) -> int:
    rows = []
    for name in available():
        cls = solver_class(name)
        default = get(name)
        special = cls.nfe_for_steps is not Solver.nfe_for_steps
        per_step = f"{cls.evals_per_step}{'*' if special else ''}"
        rows.append((name, str(default.order), per_step, _stochastic(cls), cls.paper))
    if args.json:
        keys = ("name", "order", "nfe_per_step", "stochastic", "paper")
        print(json.dumps([dict(zip(keys, r)) for r in rows], indent=2))
        return 0
    head = ("solver", "order", "NFE/step", "stochastic", "paper")
    widths = [max(len(r[k]) for r in rows + [head]) for k in range(5)]
    for r in [head, tuple("-" * w for w in widths)] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(
        "\n* fewer evaluations on some steps (e.g. Heun's last step to sigma=0, warm-up); "
        "`dpmlab.sample` always checks the exact count."
    )
    return 0


def _stochastic(cls: type[Solver[Any]]) -> str:
    if cls.stochastic:
        return "yes"
    return "option" if "is_stochastic" in cls.__dict__ else "no"


def _save_picture(x: Tensor, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = x.detach().cpu().double().numpy()
    with atomic_write(path) as tmp:
        if arr.ndim == 2 and arr.shape[1] == 2:
            fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
            ax.scatter(arr[:, 0], arr[:, 1], s=2, alpha=0.5)
            ax.set_aspect("equal")
            ax.set_title(title, fontsize=9)
        elif arr.ndim == 4 or (arr.ndim == 3):
            imgs = arr if arr.ndim == 4 else arr[:, None]
            n = min(len(imgs), 64)
            cols = int(np.ceil(np.sqrt(n)))
            rows = int(np.ceil(n / cols))
            fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), dpi=100, squeeze=False)
            for k, ax in enumerate(axes.flat):
                ax.axis("off")
                if k < n:
                    img = np.clip((imgs[k].transpose(1, 2, 0) + 1) / 2, 0, 1)
                    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            fig.suptitle(title, fontsize=9)
        else:
            fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
            ax.scatter(arr[:, 0], arr[:, 1], s=2, alpha=0.5)
            ax.set_title(f"{title} (first two of {arr.shape[1]} dims)", fontsize=9)
        fig.savefig(tmp, format="png")
        plt.close(fig)


def _save_raw(x: Tensor, path: Path, meta: dict[str, str]) -> None:
    if path.suffix == ".npz":
        with atomic_write(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, samples=x.detach().cpu().numpy(), meta=json.dumps(meta))
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        with atomic_write(path) as tmp:
            save_file({"samples": x.detach().cpu().contiguous()}, str(tmp), metadata=meta)
    else:
        raise ValueError(f"raw samples must be .npz or .safetensors, got {path.name!r}")


def _cmd_sample(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    options = json.loads(args.options) if args.options else {}
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {args.options!r}")
    model = load(args.model)
    solver = get(args.solver, **options)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must be a .png picture, got {out.name!r} (raw samples go to --raw)")
    raw = Path(args.raw) if args.raw else out.with_suffix(".npz")

    from tqdm import tqdm

    bar = tqdm(total=args.nfe, unit="nfe", desc=f"{args.solver} on {args.model}", disable=args.quiet, leave=False)

    def progress(info: StepInfo) -> None:
        bar.n = min(info.nfe, bar.total)
        bar.refresh()

    x = sample(
        model,
        args.n,
        solver=solver,
        nfe=args.nfe,
        seed=args.seed,
        grid=args.grid,
        to_zero=args.to_zero or None,
        batch_size=args.batch_size,
        callback=progress,
    )
    bar.close()
    meta = {
        "model": args.model,
        "solver": json.dumps(solver.config()),
        "nfe": str(args.nfe),
        "seed": str(args.seed),
        "grid": args.grid,
        "dpmlab": __version__,
    }
    _save_raw(x, raw, meta)
    _save_picture(x, out, f"{args.model}: {args.solver}, NFE={args.nfe}, n={args.n}, grid={args.grid}")
    if not args.quiet:
        print(f"wrote {out} and {raw} ({args.n} samples, shape {tuple(x.shape[1:])}, NFE {args.nfe})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpmlab", description="Fast, training-free sampling for diffusion models.")
    p.add_argument("--version", action="version", version=f"dpmlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    pl = sub.add_parser("list", help="list registered solvers")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=_cmd_list)

    ps = sub.add_parser("sample", help="draw samples and write a picture and the raw samples")
    ps.add_argument("--model", default="gmm2d", help=f"model name ({', '.join(available_models())})")
    ps.add_argument("--solver", default="ddim", help="solver name (see `dpmlab list`)")
    ps.add_argument("--options", default="", help="solver options as JSON, e.g. '{\"eta\": 1.0}'")
    ps.add_argument("--nfe", type=int, default=10, help="network evaluations per sample (exact)")
    ps.add_argument("-n", type=int, default=1000, help="number of samples")
    ps.add_argument("--seed", type=int, default=0)
    ps.add_argument("--grid", default="uniform_lambda", choices=sorted(GRIDS))
    ps.add_argument("--to-zero", action="store_true", help="end the grid at sigma = 0")
    ps.add_argument("--batch-size", type=int, default=None)
    ps.add_argument("--out", default="samples.png", help="picture (.png)")
    ps.add_argument("--raw", default="", help="raw samples (.npz or .safetensors; default: next to --out)")
    ps.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for small models)")
    ps.add_argument("-q", "--quiet", action="store_true")
    ps.set_defaults(func=_cmd_sample)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, TypeError, FloatingPointError) as e:
        print(f"dpmlab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
