"""Command line: ``dpmlab list``, ``dpmlab sample``, ``dpmlab train`` and ``dpmlab edit``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._utils import atomic_write
from ._version import __version__
from .api import DEFAULT_GRID, default_grid, sample
from .models.hub import available_models, load
from .solvers.base import Solver, StepInfo, available, get, solver_class
from .solvers.base import sample as sample_solver
from .timesteps import GRIDS

__all__ = ["main"]


def _solver_options(name: str) -> list[dict[str, str]]:
    """A solver's options: name, type, default (its dataclass fields)."""
    import dataclasses

    from .solvers.base import _hint_name, _option_hints

    cls = solver_class(name)
    hints = _option_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        kind = _hint_name(hints[f.name]) if f.name in hints else str(f.type)
        out.append({"option": f.name, "type": kind, "default": default})
    return out


def _cmd_list(args: argparse.Namespace) -> int:
    if args.solver:  # one solver's options
        cls = solver_class(args.solver)
        opts = _solver_options(args.solver)
        if args.json:
            print(json.dumps({"name": args.solver, "paper": cls.paper, "options": opts}, indent=2))
            return 0
        doc = (cls.__doc__ or "").strip()
        doc = "" if not doc or doc.startswith(f"{cls.__name__}(") else doc.splitlines()[0] + "\n"
        print(f"{args.solver}: {cls.paper}\n{doc}")
        if not opts:
            print("no options")
        for o in opts:
            print(f"  {o['option']:<22} {o['type']:<40} default {o['default']}")
        print(f"\nset them with: dpmlab sample --solver {args.solver} --options '{{\"<option>\": <value>}}'")
        return 0
    rows = []
    for name in available():
        cls = solver_class(name)
        default = get(name)
        special = cls.nfe_for_steps is not Solver.nfe_for_steps
        per_step = f"{default.nfe_for_steps(100, False) // 100}{'*' if special else ''}"
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


def _save_picture(x: Tensor, path: Path, title: str, labels: Sequence[str] = ()) -> None:
    """A scatter plot (2-d samples) or an image grid (at most 100 images, ``labels[k]`` over image k); the
    title is wrapped to the figure's width, never cut off."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = x.detach().cpu().double().numpy()
    with atomic_write(path) as tmp:
        if arr.ndim == 2 and arr.shape[1] == 2:
            fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
            ax.scatter(arr[:, 0], arr[:, 1], s=2, alpha=0.5)
            ax.set_aspect("equal")
            ax.set_title(textwrap.fill(title, width=70), fontsize=9)
        elif arr.ndim == 4 or (arr.ndim == 3):
            imgs = arr if arr.ndim == 4 else arr[:, None]
            n = min(len(imgs), 100)
            cols = int(np.ceil(np.sqrt(n)))
            rows = int(np.ceil(n / cols))
            width = max(cols, 4)
            text = textwrap.fill(title, width=int(width * 13))
            head = 0.2 * (text.count("\n") + 1) + 0.15
            fig, axes = plt.subplots(
                rows, cols, figsize=(width, rows * (1.15 if labels else 1) + head), dpi=100, squeeze=False
            )
            for k, ax in enumerate(axes.flat):
                ax.axis("off")
                if k < n:
                    img = np.clip((imgs[k].transpose(1, 2, 0) + 1) / 2, 0, 1)
                    ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
                    if k < len(labels):
                        ax.set_title(labels[k], fontsize=7, pad=2)
            fig.suptitle(text, fontsize=9)
            fig.tight_layout(rect=(0, 0, 1, 1 - head / (rows * (1.15 if labels else 1) + head)))
        else:
            fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
            ax.scatter(arr[:, 0], arr[:, 1], s=2, alpha=0.5)
            ax.set_title(textwrap.fill(f"{title} (first two of {arr.shape[1]} dims)", width=70), fontsize=9)
        fig.savefig(tmp, format="png")
        plt.close(fig)


def check_outputs(outputs: Sequence[tuple[Path, str, Sequence[str]]], overwrite: bool) -> None:
    """Validate every file a command will write BEFORE any work: ``(path, flag, allowed suffixes)``. The rule,
    everywhere: dpmlab writes only files named on the command line (a model file's ``.json`` card counts as
    named with it); a path must not be a folder nor lie under a file, its folder must be writable (missing
    folders are created), and an existing file is replaced only with ``--overwrite``."""
    seen: dict[Path, str] = {}
    for path, flag, suffixes in outputs:
        if path.is_dir():
            raise ValueError(f"{flag} {str(path)!r} is a folder; name a file inside it")
        if suffixes and path.suffix.lower() not in suffixes:
            raise ValueError(f"{flag} must name a {' or '.join(suffixes)} file, got {str(path)!r}")
        key = path.absolute()
        if key in seen:
            raise ValueError(f"{flag} and {seen[key]} name the same file {str(path)!r}")
        seen[key] = flag
        parent = path.absolute().parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"{flag} {str(path)!r} lies under {str(parent)!r}, which is a file, not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {str(path)!r}: the folder {str(parent)!r} is not writable")
        if path.exists() and not overwrite:
            raise ValueError(f"{flag} {str(path)!r} exists; pass --overwrite to replace it")


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


def _labels(model: Any, label: str, n: int) -> dict[str, Tensor]:
    """``--label``: one class for every sample, or ``grid`` (one class per picture row)."""
    names = getattr(getattr(model, "spec", None), "class_names", ())
    if not names:
        raise ValueError("--label needs a class-conditional model; this one has no classes")
    k = len(names)
    if label == "grid":
        cols = int(np.ceil(np.sqrt(min(n, 100))))
        return {"label": (torch.arange(n) // cols) % k}
    if label not in names:
        raise ValueError(f"unknown --label {label!r}; allowed: {', '.join(names)} or 'grid'")
    return {"label": torch.full((n,), names.index(label), dtype=torch.long)}


def _cmd_calibrate(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    suffixes = {"s3": (".json",), "grid": (".json", ".safetensors"), "recipe": (".json",)}
    check_outputs([(out, "--out", suffixes.get(args.kind, (".safetensors",)))], args.overwrite)
    if args.kind != "recipe":
        if len(args.nfe) != 1:
            raise ValueError(f"--nfe takes one budget for calibrate {args.kind}, got {','.join(map(str, args.nfe))}")
        args.nfe = args.nfe[0]
    model = load(args.model)
    schedule = model.schedule
    if args.kind == "recipe":
        return _calibrate_recipe(args, model, out)
    if args.kind == "ems":
        from .calibrate.ems import fit_ems
        from .models.analytic import AnalyticDenoiser

        n = args.n or 1024
        if isinstance(model, AnalyticDenoiser):  # exact data samples
            x = model.model.sample(n, generator=torch.Generator().manual_seed(args.seed))
            source = "data"
        else:  # the model's own trajectories from noise
            x = torch.randn(n, *tuple(model.data_shape or ()), generator=torch.Generator().manual_seed(args.seed))
            source = "noise"
        ems = fit_ems(
            model,
            schedule,
            x,
            n_points=n,
            grid_size=args.grid_size,
            source=source,
            seed=args.seed,
            model_name=args.model,
            progress=True,
        )
        ems.save(out)
        print(f"wrote {out}: EMS of {args.model} on {args.grid_size + 1} lambda knots from {n} {source} points")
    elif args.kind == "dc":
        from .calibrate.dc import fit_dc_ratios

        base, grid_name = get(args.base), args.grid or default_grid(args.model)  # as dpmlab sample's default
        ratios = fit_dc_ratios(
            model,
            schedule,
            base,
            args.nfe,
            n_datapoints=args.n or 10,
            grid=grid_name,
            to_zero=schedule.t_zero is not None,
            seed=args.seed,
            model_name=args.model,
        )
        ratios.save(out)
        rho = ", ".join(f"{r:.3f}" for r in ratios.ratios)
        print(f"wrote {out}: DC ratios for {args.base} at NFE {args.nfe} on grid {grid_name}: {rho}")
        print(
            f"sample with: dpmlab sample --model {args.model} --solver dc_solver --artifact {out} "
            f"--nfe {args.nfe} --grid {grid_name}"
        )
    elif args.kind == "grid":
        from .calibrate.grid import calibration_noise, fit_grid

        shape = tuple(model.data_shape or ())
        n = args.n or 128
        noise = calibration_noise(schedule, shape, n, seed=args.seed)
        art = fit_grid(
            model,
            schedule,
            get(args.solver),
            args.nfe,
            noise,
            method=args.method,
            model_name=args.model,
            seeds={"seed": args.seed, "start": 0, "n": n},
        )
        art.save(out)
        print(
            f"wrote {out}: {args.method} grid for {args.solver} on {args.model} at NFE {args.nfe} (fitted on {n} "
            f"noises, seed {args.seed}); sample with: dpmlab sample --model {args.model} --solver {args.solver} "
            f"--nfe {args.nfe} --grid-artifact {out}"
        )
    else:
        from .calibrate.s3 import fit_s3_plan

        n = args.n or 256
        res = fit_s3_plan(
            model,
            schedule,
            args.nfe,
            n_samples=n,
            seed=args.seed,
            model_name=args.model,
            generations=args.generations,
            to_zero=schedule.t_zero is not None,  # as dpmlab sample's default grid
            progress=True,
            select_n=n,
            report_n=n,
        )
        res.plan.save(out)
        print(
            f"wrote {out}: S3 plan for {args.model} at NFE {args.nfe}: RMS error {res.fitness:.4g} on the search "
            f"noise, {res.selection:.4g} on the selection noise, {res.held_out:.4g} on held-out noise "
            f"({n} samples each)"
        )
    return 0


def _calibrate_recipe(args: argparse.Namespace, model: Any, out: Path) -> int:
    """``dpmlab calibrate recipe``: the solver and grid per NFE, chosen on held-out noise (``--solver auto``)."""
    from .calibrate.recipe import fit_recipe

    select_seed = args.seed + 1 if args.select_seed is None else args.select_seed
    if select_seed == args.seed:
        raise ValueError(f"--select-seed must differ from --seed (selection on held-out noise); both are {args.seed}")
    solvers = [get(s.strip()) for s in args.solvers.split(",")] if args.solvers else None  # bad names: now
    rec = fit_recipe(
        model,
        args.nfe,
        fit_seed=args.seed,
        select_seed=select_seed,
        n_fit=args.n_fit,
        n_select=args.n or 64,
        candidates=solvers,
        learned=args.learned_top > 0,
        learned_top=max(args.learned_top, 1),
        calibrated=("dc",) if args.dc else (),
        progress=True,
        model_name=args.model,
        provenance={"command": "dpmlab " + " ".join(sys.argv[1:]) if sys.argv else ""},
    )
    rec.save(out)
    for e in rec.entries:
        print(f"NFE {e.nfe}: {e.label}  RMS {e.rms:.4g}, median {e.median:.4g} (select noise)")
    print(
        f"wrote {out} ({rec.provenance['cpu_seconds']} CPU s); sample with: dpmlab sample --model {args.model} "
        f"--solver auto --recipe {out} --nfe {args.nfe[0]}"
    )
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    out, raw = Path(args.out), (Path(args.raw) if args.raw else None)
    check_outputs(
        [(out, "--out", (".png",))] + ([(raw, "--raw", (".npz", ".safetensors"))] if raw else []), args.overwrite
    )
    try:
        options = json.loads(args.options) if args.options else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--options is not valid JSON ({e}): {args.options!r}") from None
    if not isinstance(options, dict):
        raise ValueError(f"--options must be a JSON object, got {args.options!r}")
    from .calibrate import NEEDS_ARTIFACT, artifact_options

    if args.grid_artifact and (args.grid is not None or args.to_zero is not None):
        raise ValueError("--grid-artifact gives the grid: --grid and --to-zero do not apply")
    auto = args.solver == "auto"
    if auto:  # solver and grid come from the model's sampling recipe (dpmlab calibrate recipe)
        flags = {
            "--options": args.options,
            "--artifact": args.artifact,
            "--grid-artifact": args.grid_artifact,
            "--grid": args.grid is not None,
            "--to-zero": args.to_zero is not None,
            "--classifier-guidance": args.classifier_guidance,
        }
        given = [f for f, v in flags.items() if v]
        if given:
            raise ValueError(
                f"{', '.join(given)} cannot be used with --solver auto (the recipe gives the solver and grid)"
            )
    elif args.recipe:
        raise ValueError("--recipe is only used with --solver auto")
    need = NEEDS_ARTIFACT.get(args.solver)
    if need and not args.artifact and need not in options:
        raise ValueError(
            f"--solver {args.solver} runs from a fitted artifact: give --artifact FILE (dpmlab calibrate "
            f"{'ems' if need == 'ems' else 'dc'}) or --artifact none (then it is its base solver: "
            f"{'DPM-Solver++' if need == 'ems' else 'the uncompensated base'})"
        )
    model: Any = load(args.model)
    class_names = getattr(getattr(model, "spec", None), "class_names", ())
    if args.artifact:
        options = artifact_options(args.solver, args.artifact, model=args.model, nfe=args.nfe, options=options)
    grid_name = args.grid or default_grid(args.model)  # the model card's default grid, else DEFAULT_GRID
    grid: Any = grid_name
    if args.solver == "usf" and "plan" in options and options["plan"].ts is not None:
        grid = options["plan"].grid()  # a searched plan carries its own timesteps
    solver = get(args.solver, **options) if not auto else None
    if args.grid_artifact:  # a learned grid (dpmlab calibrate grid), checked against model, solver and NFE
        from .calibrate.grid import GridArtifact

        art = GridArtifact.load(args.grid_artifact)
        assert solver is not None  # --grid-artifact is refused with --solver auto
        art.check(args.model, solver, args.nfe, getattr(model, "schedule", None))
        grid = art.grid()
    from .models.t2i import TextToImage

    t2i = model if isinstance(model, TextToImage) else None
    if t2i is None and (args.prompt or args.negative_prompt):
        raise ValueError(f"--prompt/--negative-prompt need a text-to-image model; {args.model!r} is not one")
    if t2i is not None:
        if args.label:
            raise ValueError(f"--label is for class-conditional models; {args.model!r} takes --prompt")
        if args.negative_prompt and args.guidance == 1.0:
            raise ValueError("--negative-prompt acts through classifier-free guidance: give --guidance other than 1")
        t2i.encode_prompt([args.prompt, args.negative_prompt])  # refuse a bad prompt before any work
        cond: dict[str, Any] = {"prompt": args.prompt}
        if args.guidance != 1.0:
            model = t2i.guided(args.guidance, negative_prompt=args.negative_prompt)
    else:
        cond = _labels(model, args.label, args.n) if args.label else {}
    if args.classifier_guidance:  # EluCD: the null-class model steered by the shipped (clean) MNIST classifier
        if args.guidance != 1.0 or t2i is not None or not args.label:
            raise ValueError(
                "--classifier-guidance steers the unconditional (null-class) model toward --label; "
                "it needs --label and excludes --guidance and text-to-image models"
            )
        if tuple(getattr(model, "data_shape", ())) != (1, 28, 28):
            raise ValueError(
                f"--classifier-guidance uses the shipped 28x28 MNIST classifier; {args.model!r} has "
                f"samples of shape {tuple(getattr(model, 'data_shape', ()))}"
            )
        from .metrics.features import load_mnist_classifier
        from .models.guidance import elucd

        model = elucd(model, load_mnist_classifier(), args.classifier_guidance)
    if args.guidance != 1.0 and t2i is None:
        if not args.label:
            raise ValueError(
                "--guidance needs --label (classifier-free guidance of a class-conditional model) "
                "or a text-to-image model with --prompt"
            )
        from .models.guidance import Unconditional, classifier_free

        model = classifier_free(model, Unconditional(model), args.guidance)

    if auto:
        from .calibrate.recipe import resolve_recipe

        entry = resolve_recipe(model, args.nfe, recipe=args.recipe or None, name=args.model, schedule=model.schedule)
        solver, grid = entry.solver(), entry.grid()
    assert solver is not None
    from tqdm import tqdm

    bar = tqdm(total=args.nfe, unit="nfe", desc=f"{solver.name} on {args.model}", disable=args.quiet, leave=False)

    def progress(info: StepInfo) -> None:
        bar.n = min(info.nfe, bar.total)
        bar.refresh()

    kw = dict(
        solver=solver,
        nfe=args.nfe,
        seed=args.seed,
        grid=grid,
        to_zero=args.to_zero,
        batch_size=args.batch_size,
        cond=cond,
    )
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun / accelerate launch -m dpmlab sample ...
            from .parallel import sample_distributed

            got = sample_distributed(model, args.n, **kw)
            if got is None:
                return 0  # only rank 0 decodes and writes
            x = got
        elif args.processes > 1:  # index-sharded worker processes: the same samples as one process
            from .parallel import sample_sharded

            x = sample_sharded(model, args.n, processes=args.processes, **kw)
        else:
            x = sample(model, args.n, callback=progress, **kw)
    finally:  # an error or Ctrl-C is printed on a clean line, not onto the bar
        bar.close()
    if t2i is not None:  # latents -> pixels
        x = torch.cat([t2i.decode(x[i : i + 256]) for i in range(0, len(x), 256)])
    meta = {
        "model": args.model,
        "solver": json.dumps(solver.config()),
        "nfe": str(args.nfe),
        "seed": str(args.seed),
        "grid": entry.grid_name if auto else grid_name,
        "recipe": (args.recipe or "shipped") if auto else "",
        "label": args.label,
        "guidance": str(args.guidance),
        "classifier_guidance": str(args.classifier_guidance),
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "artifact": args.artifact,
        "dpmlab": __version__,
    }
    if raw is not None:
        _save_raw(x, raw, meta)
    what = f" {args.prompt!r}" if t2i is not None else ""
    if t2i is not None and args.guidance != 1.0:
        what += f", w={args.guidance:g}" + (f", negative {args.negative_prompt!r}" if args.negative_prompt else "")
    config = ", ".join(f"{k}={v}" for k, v in solver.config().items() if k != "name")
    title = (
        f"{args.model}{what}: {'auto -> ' if auto else ''}{solver.name}"
        + (f" ({config})" if config else "")
        + f", NFE={args.nfe}, n={args.n}, grid={entry.grid_name if auto else grid_name}"
        + (", to t_min" if args.to_zero is False else "")
        + f", seed={args.seed}"
        + (f", label={args.label}" if args.label else "")
        + (f", CFG w={args.guidance:g}" if args.guidance != 1.0 and t2i is None else "")
        + (f", classifier guidance {args.classifier_guidance:g}" if args.classifier_guidance else "")
        + (f", artifact={args.artifact}" if args.artifact else "")
    )
    labels = [class_names[int(i)] for i in cond["label"]] if "label" in cond and class_names else []
    _save_picture(x, out, title, labels)
    if not args.quiet:
        also = f" and {raw}" if raw else ""
        print(f"wrote {out}{also} ({args.n} samples, shape {tuple(x.shape[1:])}, NFE {args.nfe})")
    return 0


def _set_path(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    for part in parts[:-1]:
        d = d.setdefault(part, {})
        if not isinstance(d, dict):
            raise ValueError(f"--set {key}: {part!r} is not a section")
    d[parts[-1]] = value


def _apply_overrides(base: dict[str, Any], flags: dict[str, Any], sets: Sequence[str]) -> None:
    """Set the given flags (``None``: not given), then the ``--set key=value`` items (JSON values)."""
    for key, value in flags.items():
        if value is not None:
            _set_path(base, key, value)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"--set takes key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        _set_path(base, key.strip(), value)


def _train_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The recipe fields the data and optimisation flags of ``train`` / ``finetune`` / ... set (None: not given)."""
    return {
        "data.name": args.data,
        "data.path": args.data_path,
        "data.size": args.image_size,
        "data.channels": args.channels,
        "train.steps": args.steps,
        "train.batch_size": args.batch_size,
        "train.lr": args.lr,
        "train.warmup": args.warmup,
        "train.ema_decay": args.ema_decay,
        "train.seed": args.seed,
        "train.checkpoint_every": args.checkpoint_every,
        "name": args.name,
    }


def _train_method(args: argparse.Namespace) -> tuple[str, Path, Any]:
    """A method recipe (a ``method`` section, ``dpmlab.methods``) + flags + ``--set``: trained on the same
    trainer; sample the run with ``dpmlab.methods.load(<run folder>)``."""
    from .methods import MethodRecipe, train_recipe
    from .methods import load_recipe as load_method_recipe

    given = [f for f, v in (("--net", args.net), ("--objective", args.objective), ("--schedule", args.schedule)) if v]
    if given:
        raise ValueError(
            f"{', '.join(given)} do not apply to a method recipe; set its network with "
            "--set method.net=... / --set method.net_config.<field>=..."
        )
    base = load_method_recipe(args.recipe).to_dict()
    flags = {**_train_flags(args), "data.conditional": False if args.unconditional else None}
    _apply_overrides(base, flags, args.set)
    recipe = MethodRecipe.from_dict(base)
    out = Path(args.out or f"runs/{recipe.name}")
    return recipe.name, out, train_recipe(recipe, out, resume=args.resume, progress=not args.quiet)


def _train_recipe(args: argparse.Namespace) -> tuple[Any, Any]:
    """The recipe (file + flags + ``--set`` overrides) and its dataset."""
    from .training import Recipe, load_data, load_recipe
    from .training.trainer import net_config_for

    base: dict[str, Any] = load_recipe(args.recipe).to_dict() if args.recipe else {"name": args.data or "run"}
    derive_net = "net_config" not in base.get("model", {})  # no recipe: size the network for the data
    flags = {
        **_train_flags(args),
        "model.net": args.net,
        "model.objective": args.objective,
        "model.schedule": args.schedule,
    }
    if args.unconditional:
        flags["data.conditional"] = False
    _apply_overrides(base, flags, args.set)
    data_only = Recipe.from_dict({"name": base.get("name", "run"), "data": base.get("data", {})})
    ds = load_data(data_only.data)
    model: dict[str, Any] = base.setdefault("model", {})
    if derive_net:  # a network sized for the data, updated by any --set model.net_config.* values
        net = model.setdefault("net", "unet" if len(ds.shape) == 3 else "mlp")
        model["net_config"] = net_config_for(
            net, model.get("net_config", {}), ds.shape, num_classes=ds.num_classes if ds.labels is not None else 0
        )
    return Recipe.from_dict(base), ds


def _check_method_kind(recipe: str, kind: str) -> None:
    """``dpmlab finetune|prune|distill --recipe R``: R must be a method recipe of that kind."""
    from .methods import _read_text, available_methods, method_kind

    d = _read_text(recipe)
    m = d.get("method") if isinstance(d, dict) else None
    name = m.get("name") if isinstance(m, dict) else None
    allowed = ", ".join(available_methods(kind))
    if name is None:
        raise ValueError(f"{recipe}: dpmlab {kind} needs a method recipe (a 'method' section naming one of: {allowed})")
    if method_kind(name) != kind:
        raise ValueError(
            f"{recipe}: method {name!r} is run with `dpmlab {method_kind(name)}`, not `dpmlab {kind}` "
            f"(dpmlab {kind} runs: {allowed})"
        )


def _cmd_module(args: argparse.Namespace) -> int:
    """``dpmlab apps NAME ...`` / ``dpmlab analyze NAME ...``: the module's own command line."""
    import importlib

    module = importlib.import_module(f"dpmlab.{args.package}.{args.module}")
    return int(module.main(args.args))


def _cmd_train(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    from .methods import is_method_recipe
    from .training import train

    if args.export:
        dst = Path(args.export)
        check_outputs(
            [(dst, "--export", (".safetensors",)), (dst.with_suffix(".json"), "--export's card", ())], args.overwrite
        )
    kind = getattr(args, "kind", "train")
    if kind != "train":  # finetune / prune / distill: a method recipe of that kind
        _check_method_kind(args.recipe, kind)
    if args.recipe and is_method_recipe(args.recipe):  # dpmlab.methods: PFGM++, RDDM, ...
        name, out, res = _train_method(args)
    else:
        recipe, ds = _train_recipe(args)
        if ds.skipped and not args.quiet:
            print(f"skipped {len(ds.skipped)} unreadable files (first: {ds.skipped[0]})", file=sys.stderr)
        name, out = recipe.name, Path(args.out or f"runs/{recipe.name}")
        res = train(recipe, out, resume=args.resume, dataset=ds, progress=not args.quiet)
    if args.export:
        dst = Path(args.export)
        with atomic_write(dst) as tmp:
            tmp.write_bytes((out / "model.safetensors").read_bytes())
        card = json.loads((out / "model.json").read_text())
        card.update(weights=dst.name, command="dpmlab " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["train"] else "")
        with atomic_write(dst.with_suffix(".json")) as tmp:
            tmp.write_text(json.dumps(card, indent=2) + "\n")
    if not args.quiet:
        also = f" and {args.export}" if args.export else ""
        print(
            f"trained {name}: {res.step} steps, final loss {res.final_loss:.4f}, "
            f"{res.elapsed_s:.0f} s; wrote {out / 'model.safetensors'}{also}"
        )
    return 0


def _print_table(rows: list[list[str]], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
        print(title)
        for r in rows:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        return
    table = Table(title=title)
    for h in rows[0]:
        table.add_column(h, justify="left" if not h.startswith("NFE") else "right")
    for r in rows[1:]:
        table.add_row(*r)
    Console().print(table)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench.harness import default_entries, run_bench
    from .schedules import DiscreteVP

    torch.set_num_threads(args.threads)
    stem = Path(args.out) if args.out else None
    if stem is not None:
        check_outputs([(stem.with_suffix(x), "--out", ()) for x in (".csv", ".json", ".png")], args.overwrite)
    if args.quick:
        nfes, n = [5, 10, 20], min(args.n, 64)
    else:
        try:
            nfes = [int(k) for k in args.nfe.split(",")]
        except ValueError:
            raise ValueError(f"--nfe takes comma-separated whole numbers, got {args.nfe!r}") from None
        bad = [k for k in nfes if not 1 <= k <= MAX_NFE]
        if bad:
            raise ValueError(f"--nfe budgets must lie in [1, {MAX_NFE}], got {bad[0]}")
        n = args.n
    names = [s for s in args.solvers.split(",") if s] if args.solvers else None
    entries = default_entries(names)
    schedule = DiscreteVP.from_preset(args.schedule)
    model = load(args.model, schedule=schedule)
    shape = tuple(model.data_shape or ())
    from .models.analytic import AnalyticDenoiser

    analytic = isinstance(model, AnalyticDenoiser)
    if args.quick and not analytic:
        n = min(n, 32)  # a network's reference solve dominates the run
    quality = None
    if shape == (1, 28, 28):  # MNIST-shaped images: FD-MNIST of each row's samples to the reference samples
        from .metrics.features import fd_mnist

        quality = fd_mnist
    from tqdm import tqdm

    from .bench.harness import held_out_best

    runs = []
    for k in tqdm((0, 1), desc="bench (selection, report)", unit="noise set", leave=False):
        runs.append(
            run_bench(
                model,
                schedule,
                shape,
                entries,
                nfes,
                n=n,
                seed=args.seed + k,
                name=args.model,
                peers=not args.no_peers,
                ref_tol=1e-10 if analytic else 1e-5,
                quality=quality,
            )
        )
    select, result = runs
    _print_table(
        result.table(),
        f"{args.model}: RMS error vs reference ({n} samples, seed {args.seed + 1}, {args.schedule} schedule)",
    )
    best = held_out_best(select, result)
    _print_table(
        best.table(),
        f"best configuration per library and NFE, chosen on seed {args.seed}, RMS error on seed {args.seed + 1}",
    )
    _print_table(best.median_table(), "the same configurations: median per-sample RMS error")
    fd = result.fd_table()
    if fd is not None:
        _print_table(fd, f"{args.model}: FD-MNIST to the reference samples (our classifier's features; not FID)")
    over = [r for r in result.rows if r.library == "dpmlab"]
    if over:
        mean_over = sum(r.overhead_ms for r in over) / len(over)
        print(f"mean dpmlab sampler overhead: {mean_over:.3f} ms/step (free model, shape {shape})")
    if stem is not None:
        for p in result.write(stem):
            print(f"wrote {p}")
    return 0


# --- dpmlab edit: real-image editing (edit-friendly DDPM inversion, DDIM inversion, BoundaryDiffusion) ---
def _read_image(path: Path, shape: tuple[int, ...]) -> Tensor:
    """A PNG (or any Pillow image) or ``.npz`` as ``(B, C, H, W)`` in [-1, 1], checked against ``shape``."""
    want = f"{shape[0]} channel{'s' if shape[0] > 1 else ''} of {shape[1]}x{shape[2]}"
    if not path.is_file():
        raise ValueError(f"--image {path}: no such file")
    if path.suffix.lower() == ".npz":
        with np.load(path) as npz:
            named = [k for k in ("images", "samples", "x") if k in npz.files]
            if not named and len(npz.files) != 1:
                raise ValueError(f"--image {path}: holds arrays {npz.files}; name the image array 'images'")
            arr = npz[named[0] if named else npz.files[0]]
        if arr.dtype == np.uint8:
            x = torch.from_numpy(arr.astype(np.float32)) / 127.5 - 1.0
        elif np.issubdtype(arr.dtype, np.floating):
            x = torch.from_numpy(arr.astype(np.float32))
            peak = float(x.abs().max()) if x.numel() else 0.0
            if peak > 1.001:
                raise ValueError(f"--image {path}: float pixels must lie in [-1, 1], got values up to {peak:g}")
        else:
            raise ValueError(f"--image {path}: array dtype {arr.dtype}; need uint8 (0..255) or float in [-1, 1]")
        x = x.reshape(1, 1, *x.shape) if x.ndim == 2 else x[None] if x.ndim == 3 else x
    else:
        from PIL import Image, UnidentifiedImageError

        try:
            img = Image.open(path)
            img.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"--image {path}: not a readable image ({e})") from None
        if img.mode in ("1", "L"):
            arr = np.asarray(img.convert("L"), dtype=np.float32)[None]
        elif img.mode == "RGB":
            arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1)
        else:
            raise ValueError(f"--image {path}: mode {img.mode}; the model takes {want} (grayscale L or RGB)")
        x = torch.from_numpy(arr)[None] / 127.5 - 1.0
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(shape):
        got = "x".join(map(str, x.shape[-2:])) + f" with {x.shape[-3] if x.ndim >= 3 else 1} channel(s)"
        raise ValueError(f"--image {path}: image is {got}; the model takes {want}")
    return x


def _write_image(x: Tensor, path: Path, meta: dict[str, str]) -> None:
    """``x (B, C, H, W)`` in [-1, 1] to ``.npz`` (array ``images``) or a PNG (the B images side by side)."""
    if path.suffix.lower() == ".npz":
        with atomic_write(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, images=x.detach().cpu().numpy(), meta=json.dumps(meta))
        return
    from PIL import Image

    u8 = ((x.detach().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # (B, C, H, W)
    row = torch.cat(list(u8), dim=-1).permute(1, 2, 0).numpy()  # (H, B W, C)
    img = Image.fromarray(row[..., 0] if row.shape[-1] == 1 else row)
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")


def _edit_boundary(model: Any, x0: Tensor, src: int, tgt: int, args: argparse.Namespace) -> tuple[Tensor, Tensor]:
    """BoundaryDiffusion between the source and target digits on the null-class model (labelled images:
    the MNIST 5k training split), edited onto the target side at the median target distance."""
    from .editing.boundary import boundary_edit, fit_boundary, invert_to
    from .metrics.features import mnist_5k, mnist_5k_split
    from .models.guidance import Unconditional
    from .solvers.base import Problem

    if args.model != "mnist":
        raise ValueError(
            f"--method boundary needs labelled images of the model's data; only --model mnist has them, "
            f"not {args.model!r}"
        )
    try:
        data = mnist_5k()
    except ImportError as e:
        raise ValueError(f"--method boundary: {e}") from None
    train, _ = mnist_5k_split(data.labels)
    idx = torch.cat([train[data.labels[train] == c][: args.boundary_images] for c in (src, tgt)])
    problem = Problem(Unconditional(model), model.schedule)
    lat = invert_to(problem, data.images[idx], args.t0, args.boundary_steps)
    side = (data.labels[idx] == tgt).long()
    zb, hb = fit_boundary(lat.z, side), fit_boundary(lat.h, side)
    dz = float(zb.distance(lat.z)[side == 1].median()) if args.distance is None else args.distance
    dh = float(hb.distance(lat.h)[side == 1].median()) if args.distance is None else args.distance
    mine = invert_to(problem, x0, args.t0, args.boundary_steps)
    edited = boundary_edit(problem, mine, dz, z_boundary=zb, h_boundary=hb, h_distance=dh, steps=args.boundary_steps)
    recon = boundary_edit(problem, mine, 0.0, z_boundary=None, h_boundary=None, steps=args.boundary_steps)
    return edited, recon


def _cmd_edit(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    check_outputs(
        [(out, "--out", (".png", ".npz"))]
        + ([(Path(args.reconstruction), "--reconstruction", (".png", ".npz"))] if args.reconstruction else []),
        args.overwrite,
    )
    if not 0.0 <= args.skip < 1.0:
        raise ValueError(f"--skip is the fraction of the steps left out at the noisy end, in [0, 1); got {args.skip}")
    model = load(args.model)
    names = getattr(getattr(model, "spec", None), "class_names", ())
    if not names:
        raise ValueError(f"dpmlab edit needs a class-conditional model; {args.model!r} has no classes")
    for flag, v in (("--target-label", args.target_label), ("--source-label", args.source_label)):
        if v and v not in names:
            raise ValueError(f"unknown {flag} {v!r}; allowed: {', '.join(names)}")
    x0 = _read_image(Path(args.image), tuple(model.data_shape or ()))
    tgt = names.index(args.target_label)
    from .editing.inversion import edit, guided, invert
    from .timesteps import uniform_time

    ts = uniform_time(model.schedule, args.steps)
    skip = int(round(args.skip * args.steps))
    src_cond = {"label": torch.full((len(x0),), names.index(args.source_label))} if args.source_label else {}
    tgt_cond = {"label": torch.full((len(x0),), tgt)}
    if args.method == "ddpm":
        edited, inv = edit(
            model,
            x0,
            ts,
            source=src_cond,
            target=tgt_cond,
            guidance_src=args.guidance_src,
            guidance_tar=args.guidance_tar,
            skip=skip,
            seed=args.seed,
        )
        recon = inv.xs[-1]
    elif args.method == "ddim":
        part, ddim = ts[skip:], get("ddim")
        source = guided(model, args.guidance_src, src_cond)
        z = invert(source, x0, part, ddim)
        edited = sample_solver(guided(model, args.guidance_tar, tgt_cond), z, part, ddim)
        recon = sample_solver(source, z, part, ddim)
    else:
        if args.source_label:
            src = names.index(args.source_label)
        else:  # the shipped classifier names the source digit
            from .metrics.features import MNISTFeatures

            src = int(MNISTFeatures().logits(x0).argmax(1).mode().values)
        if src == tgt:
            raise ValueError(f"the image is already a {names[tgt]!r} (source label); choose another --target-label")
        edited, recon = _edit_boundary(model, x0, src, tgt, args)
    meta = {
        "model": args.model,
        "method": args.method,
        "target_label": args.target_label,
        "source_label": args.source_label,
        "steps": str(args.steps),
        "skip": str(args.skip),
        "dpmlab": __version__,
    }
    _write_image(edited, out, {**meta, "what": "edited"})
    if args.reconstruction:
        _write_image(recon, Path(args.reconstruction), {**meta, "what": "reconstruction"})
    if not args.quiet:
        err = float((recon - x0).pow(2).mean().sqrt())
        also = f" and the reconstruction to {args.reconstruction}" if args.reconstruction else ""
        print(
            f"wrote {out}{also} ({args.method}: {len(x0)} image(s) to {args.target_label!r}; "
            f"reconstruction RMS error {err:.2e})"
        )
    return 0


def _int_in(lo: int, hi: int | None = None, what: str = "") -> Any:
    """An argparse type: a whole number in ``[lo, hi]`` (bools and fractions refused by ``int``)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo or (hi is not None and v > hi):
            rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{v} is out of range: {what or 'allowed'} {rng}")
        return v

    parse.__name__ = "integer"
    return parse


SEED = _int_in(0, 2**63 - 1, "seeds lie in")
NFE = _int_in(1, 10_000, "NFE budgets lie in")  # MAX_NFE: a sanity limit


def _nfe_list(text: str) -> list[int]:
    """An argparse type: comma-separated NFE budgets, each as ``NFE``, no duplicates."""
    out = [NFE(part.strip()) for part in text.split(",")]
    if len(set(out)) != len(out):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a budget")
    return out


POSITIVE = _int_in(1)


def _add_train_arguments(pt: argparse.ArgumentParser) -> None:
    """The options ``train`` shares with ``finetune`` / ``prune`` / ``distill``."""
    pt.add_argument("--out", default="", help="run folder for checkpoint and model (default: runs/<name>)")
    pt.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    pt.add_argument("--export", default="", help="also copy the final model (.safetensors + .json card) here")
    pt.add_argument("--name", default=None, help="run name")
    pt.add_argument("--data", default=None, help="digits8, mnist, moons, swiss_roll, rings, gaussian_mixture, folder")
    pt.add_argument("--data-path", default=None, help="image folder (with --data folder)")
    pt.add_argument("--image-size", type=POSITIVE, default=None, help="folder images are resized to this side")
    pt.add_argument("--channels", type=int, default=None, choices=(1, 3), help="folder images: 1 gray, 3 RGB")
    pt.add_argument("--unconditional", action="store_true", help="ignore the data's labels")
    pt.add_argument("--net", default=None, choices=("unet", "mlp"))
    pt.add_argument("--objective", default=None, choices=("eps", "x0", "v", "edm"))
    pt.add_argument("--schedule", default=None, help="noise schedule name (default linear)")
    pt.add_argument("--steps", type=POSITIVE, default=None)
    pt.add_argument("--batch-size", type=POSITIVE, default=None)
    pt.add_argument("--lr", type=float, default=None)
    pt.add_argument("--warmup", type=_int_in(0), default=None)
    pt.add_argument("--ema-decay", type=float, default=None)
    pt.add_argument("--seed", type=SEED, default=None)
    pt.add_argument("--checkpoint-every", type=POSITIVE, default=None)
    pt.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any recipe field, e.g. --set model.net_config.model_channels=16 (JSON values)",
    )
    pt.add_argument("--threads", type=POSITIVE, default=1, help="torch threads (1 is fastest for small models)")
    pt.add_argument("-q", "--quiet", action="store_true")
    pt.add_argument("--overwrite", action="store_true", help="replace an existing --export file")


MAX_NFE = 10_000  # a sanity limit on one sample's network evaluations (bench, sample)

# modules of dpmlab.apps / dpmlab.analysis with their own command line (``main(argv)``)
_MODULE_COMMANDS = ("selective_labels", "change_detection", "sda", "unlearn_attack", "intrinsic_dimension")


class _Parser(argparse.ArgumentParser):
    """Sub-command parsers whose ``--help`` shows every default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dpmlab", description="Fast, training-free sampling for diffusion models.")
    p.add_argument("--version", action="version", version=f"dpmlab {__version__}")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    pl = sub.add_parser("list", help="list registered solvers")
    pl.add_argument("solver", nargs="?", default="", help="show this solver's options (types, defaults, paper)")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=_cmd_list)

    ps = sub.add_parser("sample", help="draw samples and write a picture and the raw samples")
    ps.add_argument("--model", default="gmm2d", help=f"model name ({', '.join(available_models())})")
    ps.add_argument(
        "--solver",
        default="ddim",
        help="solver name (see `dpmlab list`); auto: the model's recipe",
    )
    ps.add_argument(
        "--recipe",
        default="",
        help="--solver auto: a recipe file (dpmlab calibrate recipe); default: the one in the model's card",
    )
    ps.add_argument("--options", default="", help="solver options as JSON, e.g. '{\"eta\": 1.0}'")
    ps.add_argument("--nfe", type=NFE, default=10, help="network evaluations per sample (exact)")
    ps.add_argument("-n", type=POSITIVE, default=1000, help="number of samples")
    ps.add_argument("--seed", type=SEED, default=0)
    ps.add_argument(
        "--grid", default=None, choices=sorted(GRIDS), help=f"default: the model card's, else {DEFAULT_GRID}"
    )
    ps.add_argument(
        "--to-zero",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="end the grid at sigma = 0 (default: yes where the schedule reaches it)",
    )
    ps.add_argument("--grid-artifact", default="", help="a learned grid (dpmlab calibrate grid) instead of --grid")
    ps.add_argument("--batch-size", type=POSITIVE, default=None)
    ps.add_argument("--label", default="", help="class-conditional models: a class name, or 'grid' (a class per row)")
    ps.add_argument("--out", default="samples.png", help="picture (.png)")
    ps.add_argument("--raw", default="", help="also write the raw samples here (.npz or .safetensors)")
    ps.add_argument("--threads", type=POSITIVE, default=1, help="torch threads (1 is fastest for small models)")
    ps.add_argument(
        "--processes",
        type=POSITIVE,
        default=1,
        help="sample in this many processes, sharded by "
        "sample index (the same samples as one process; give --batch-size for bit-identical networks)",
    )
    ps.add_argument("-q", "--quiet", action="store_true")
    ps.add_argument(
        "--guidance",
        type=float,
        default=1.0,
        help="classifier-free guidance scale (1 = none; diffusers' convention), needs --label or a text-to-image model",
    )
    ps.add_argument(
        "--classifier-guidance",
        type=float,
        default=0.0,
        metavar="SCALE",
        help="EluCD: guide the unconditional (null-class) model toward --label with the shipped MNIST "
        "classifier (Softplus(3), temperatures 1/0.5, sin schedule); 0 = off",
    )
    ps.add_argument("--prompt", default="", help="text-to-image models (mnist_t2i): the prompt, e.g. 'a bold seven'")
    ps.add_argument("--negative-prompt", default="", help="text-to-image models: the negative prompt (with --guidance)")
    ps.add_argument(
        "--artifact", default="", help="fitted artifact for dpm_solver_v3 (EMS), dc_solver (DC ratios) or usf (S3 plan)"
    )
    ps.add_argument("--overwrite", action="store_true", help="replace existing output files")
    ps.set_defaults(func=_cmd_sample)

    pc = sub.add_parser("calibrate", help="fit a solver artifact: ems (DPM-Solver-v3), dc (DC-Solver), s3 (USF plan)")
    pc.add_argument("kind", choices=["ems", "dc", "s3", "grid", "recipe"])
    pc.add_argument("--model", default="gmm16", help=f"model name ({', '.join(available_models())})")
    pc.add_argument(
        "--nfe",
        type=_nfe_list,
        default=[6],
        help="NFE budget the artifact is for (dc, s3, grid); recipe: comma-separated budgets, e.g. 5,6,8,10",
    )
    pc.add_argument(
        "-n",
        type=_int_in(0),
        default=0,
        help="points (ems: 1024), ground-truth trajectories (dc: 10), search samples (s3: 256), "
        "held-out selection samples (recipe: 64)",
    )
    pc.add_argument("--grid-size", type=POSITIVE, default=200, help="ems: lambda knots - 1")
    pc.add_argument("--base", default="unipc", help="dc: the predictor-corrector solver to compensate")
    pc.add_argument(
        "--grid", default=None, choices=sorted(GRIDS), help="dc: the grid to fit on (default: as dpmlab sample's)"
    )
    pc.add_argument("--generations", type=POSITIVE, default=10, help="s3: evolutionary generations")
    pc.add_argument("--solver", default="unipc", help="grid: the solver the grid is fitted for")
    pc.add_argument(
        "--method",
        default="gits+e2e",
        choices=("gits", "gits+e2e", "ld3"),
        help="grid: GITS dynamic programming, + end-to-end refinement, + LD3-style soft teacher forcing",
    )
    pc.add_argument("--seed", type=SEED, default=0, help="recipe: the noise learned grids are fitted on")
    pc.add_argument(
        "--select-seed", type=SEED, default=None, help="recipe: the held-out noise the choice is made on (seed + 1)"
    )
    pc.add_argument("--n-fit", type=POSITIVE, default=32, help="recipe: noises learned grids are fitted on")
    pc.add_argument(
        "--learned-top", type=_int_in(0), default=2, help="recipe: solvers per NFE given a learned grid (0: none)"
    )
    pc.add_argument("--solvers", default="", help="recipe: comma-separated candidate solvers (default: a set)")
    pc.add_argument("--dc", action="store_true", help="recipe: also try DC-Solver ratios on each NFE's winner")
    pc.add_argument("--out", required=True, help="artifact file (.safetensors for ems/dc, .json for s3/recipe)")
    pc.add_argument("--threads", type=POSITIVE, default=1)
    pc.add_argument("--overwrite", action="store_true", help="replace existing output files")
    pc.set_defaults(func=_cmd_calibrate)

    pt = sub.add_parser("train", help="train a model from a recipe (recipes/*.json|toml) and/or flags")
    pt.add_argument(
        "--recipe",
        default="",
        help="recipe file (.json or .toml), e.g. recipes/digits8.json; a "
        "method recipe (recipes/methods/*.json) trains a dpmlab.methods model",
    )
    _add_train_arguments(pt)
    pt.set_defaults(func=_cmd_train, kind="train")
    from .methods import available_methods

    for kind, what in (
        ("finetune", "fine-tune a trained model with a method recipe"),
        ("prune", "prune a trained model and fine-tune what is kept, from a method recipe"),
        ("distill", "distil a trained model into a faster one, from a method recipe"),
    ):
        names = ", ".join(available_methods(kind))
        pk = sub.add_parser(kind, help=f"{what} ({names})")
        pk.add_argument("--recipe", required=True, help=f"method recipe (recipes/methods/*.json) of: {names}")
        _add_train_arguments(pk)
        pk.set_defaults(func=_cmd_train, kind=kind)

    from . import analysis, apps

    for package, modules, what in (("apps", apps.__all__, "applications"), ("analysis", analysis.__all__, "analysis")):
        runnable = [m for m in modules if m in _MODULE_COMMANDS]
        cmd = "apps" if package == "apps" else "analyze"
        pm = sub.add_parser(cmd, help=f"{what}: {', '.join(runnable)} (`dpmlab {cmd} NAME --help`)", add_help=True)
        pm.add_argument("module", choices=runnable, help="which one")
        pm.add_argument("args", nargs=argparse.REMAINDER, help=f"its own arguments (see `dpmlab {cmd} NAME --help`)")
        pm.set_defaults(func=_cmd_module, package=package)

    pe = sub.add_parser(
        "edit",
        help="edit real images toward a class: edit-friendly DDPM inversion, DDIM inversion or BoundaryDiffusion",
    )
    pe.add_argument("--model", default="mnist", help="a class-conditional model (null class = unconditional)")
    pe.add_argument(
        "--image",
        required=True,
        help="input: a PNG (grayscale or RGB) or .npz (uint8, or float in "
        "[-1, 1]; e.g. the raw output of dpmlab sample) of the model's size",
    )
    pe.add_argument("--method", default="ddpm", choices=("ddpm", "ddim", "boundary"))
    pe.add_argument("--target-label", required=True, help="the class to edit toward, e.g. 3")
    pe.add_argument(
        "--source-label",
        default="",
        help="the image's class (ddpm/ddim: default unconditional; "
        "boundary: default the shipped classifier's prediction)",
    )
    pe.add_argument("--steps", type=POSITIVE, default=100, help="ddpm/ddim: inversion grid steps (the paper: 100)")
    pe.add_argument(
        "--skip",
        type=float,
        default=0.36,
        help="ddpm/ddim: fraction of the steps skipped at the noisy end (the paper: 36 of 100)",
    )
    pe.add_argument("--guidance-src", type=float, default=3.5, help="ddpm/ddim: CFG scale of the inversion")
    pe.add_argument("--guidance-tar", type=float, default=15.0, help="ddpm/ddim: CFG scale of the generation")
    pe.add_argument("--t0", type=float, default=0.5, help="boundary: the mixing step (schedule time)")
    pe.add_argument("--boundary-steps", type=POSITIVE, default=20, help="boundary: DDIM steps between data and t0")
    pe.add_argument(
        "--boundary-images", type=POSITIVE, default=50, help="boundary: labelled images per class for the SVM"
    )
    pe.add_argument(
        "--distance",
        type=float,
        default=None,
        help="boundary: signed distance to move onto (default: "
        "the median distance of the target class's latents, per space)",
    )
    pe.add_argument("--seed", type=SEED, default=0)
    pe.add_argument("--out", required=True, help="the edited image(s): .png (side by side) or .npz")
    pe.add_argument("--reconstruction", default="", help="also write the reconstruction (.png or .npz) here")
    pe.add_argument("--threads", type=POSITIVE, default=1)
    pe.add_argument("-q", "--quiet", action="store_true")
    pe.add_argument("--overwrite", action="store_true", help="replace existing output files")
    pe.set_defaults(func=_cmd_edit)

    pb = sub.add_parser("bench", help="error vs NFE of solvers (and diffusers peers) against a reference")
    pb.add_argument("--model", default="gmm16", help=f"model name ({', '.join(available_models())})")
    pb.add_argument("--solvers", default="", help="comma-separated dpmlab solvers (default: all deterministic)")
    pb.add_argument("--nfe", default="4,5,6,8,10,15,20", help="comma-separated NFE budgets")
    pb.add_argument("-n", type=POSITIVE, default=256, help="number of samples")
    pb.add_argument(
        "--seed",
        type=SEED,
        default=0,
        help="noise of the configuration choice; seed + 1: the noise every reported error is measured on",
    )
    pb.add_argument(
        "--schedule",
        default="linear",
        choices=["linear", "scaled_linear", "cosine"],
        help="discrete training schedule (shared with the diffusers peers)",
    )
    pb.add_argument("--no-peers", action="store_true", help="skip diffusers")
    pb.add_argument("--quick", action="store_true", help="NFE 5,10,20 and 64 samples (about 30 s)")
    pb.add_argument("--out", default="", help="also write STEM.csv, STEM.json and STEM.png (default: print only)")
    pb.add_argument("--overwrite", action="store_true", help="replace existing output files")
    pb.add_argument("--threads", type=POSITIVE, default=1)
    pb.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The error boundary: a user mistake exits 2 with one line, Ctrl-C exits 130 with one line, a file-system
    failure exits 1 naming the path; ``--debug`` (anywhere before the command) re-raises with the traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv[: next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))]
    if debug:
        argv.remove("--debug")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except KeyboardInterrupt as e:
        if debug:
            raise
        print(f"\ndpmlab: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FloatingPointError) as e:
        if debug:
            raise
        print(f"dpmlab: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dpmlab list | head`: the reader left; nothing to report
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - keeps the interpreter's final flush quiet
        return 0
    except OSError as e:  # unwritable / missing folders, a folder where a file was named, disk full
        if debug:
            raise
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        print(f"dpmlab: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
