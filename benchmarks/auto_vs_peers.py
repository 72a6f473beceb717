"""dpmlab ``auto`` vs dpmlab's best fixed solver vs the best diffusers scheduler, on held-out noise (issue 17,
item 3; ``docs/benchmarks/auto.md``).

Per model and NFE, against the float64 reference ODE solution at sigma = 0 of the REPORT noise set:

* (a) ``auto``: the model's sampling recipe (``dpmlab.calibrate.recipe``): ``shipped_recipe(model)`` where one
  ships (MNIST), else ``fit_recipe`` on the FIT and SELECT noise sets (``--fit-seed``, ``--select-seed``);
* (b) ``dpmlab``: every deterministic training-free dpmlab solver (plus a few option variants) on the default
  grid ``dpmlab.timesteps.DEFAULT_GRID`` ending at sigma = 0, the best per NFE on the SELECT set;
* (c) ``diffusers``: every scheduler configuration of ``dpmlab.bench.harness.PEERS`` on the model's own
  schedule from the same start states, the best per NFE on the SELECT set.

The report set (``--report-seed``) shares no sample with the fit or select sets (``auto_report`` refuses).
Reported: RMS error over all coordinates, the median per-sample RMS error, the ratio auto / best peer with
a paired bootstrap 95% interval; for MNIST also FD-MNIST (to the reference samples and to the 5k data) and
the accuracy of the independent evaluator (classifier B) on the class-conditional samples.

    python benchmarks/auto_vs_peers.py --models gmm16,gmm64            # ~15 min on one thread
    python benchmarks/auto_vs_peers.py --models mnist --out /tmp/auto_mnist --wait-recipe 45   # ~35 min
    python benchmarks/auto_vs_peers.py --tables-only --merge /tmp/auto_mnist.json   # merge, print the tables

Results merge into ``docs/benchmarks/auto.json`` (one entry per model) and ``auto.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dpmlab._utils import atomic_write
from dpmlab.bench.harness import AutoReport, Entry, NoiseSet, auto_report, references, select_configs
from dpmlab.solvers import available, get
from dpmlab.timesteps import DEFAULT_GRID

ROOT = Path(__file__).resolve().parents[1]
NFES = (4, 5, 6, 8, 10, 15, 20)
VARIANTS = {  # option variants of the training-free solvers, beside every solver's defaults
    "dpm_solver_pp order=3": {"name": "dpm_solver_pp", "order": 3},
    "unipc bh2": {"name": "unipc", "variant": "bh2"},
    "unipc predictor_order=3": {"name": "unipc", "predictor_order": 3},
}
# without a fitted artifact these run as their base solver (dc_solver, usf: unipc) or are another's alias
# (euler = ddim in x0 form): identical rows, skipped on the network to save time
DUPLICATES = ("euler", "dc_solver", "usf")
# far behind on the mixtures at NFE 4-10 or meeting only one or two of the NFEs (see the doc): skipped on the
# network, where each candidate costs ~60 network evaluations per selection sample
SKIP_ON_NETWORK = ("dpm_solver", "dpm_solver_fast", "dpm_solver_pp_2s", "heun", "pndm", "time_shift")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def candidates(network: bool) -> list[Entry]:
    """(b)'s candidates: every deterministic solver with its defaults, plus ``VARIANTS``; on the network without
    the ``DUPLICATES`` and ``SKIP_ON_NETWORK``."""
    skip = (*DUPLICATES, *SKIP_ON_NETWORK) if network else ()
    names = [n for n in available() if not get(n).is_stochastic() and n not in skip]
    out = [Entry(n, get(n), DEFAULT_GRID) for n in names]
    out += [Entry(k, get(**v), DEFAULT_GRID) for k, v in VARIANTS.items()]
    return out


PROMPTS = [f"a {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")]
NETWORKS = ("mnist", "mnist_t2i")


def setup(name: str) -> tuple[Any, Any, tuple[int, ...], float, bool]:
    """model, schedule, shape, reference tolerance, conditional (MNIST: labels; text to image: prompts)?"""
    if name in NETWORKS:
        import dpmlab

        model = dpmlab.load(name)
        return model, model.schedule, tuple(model.data_shape), 1e-5, True
    from dpmlab.models.analytic import preset
    from dpmlab.schedules import DiscreteVP

    sch = DiscreteVP.from_preset("linear")
    mix = preset(name)
    return mix.denoiser(sch), sch, (mix.dim,), 1e-10, False


def labels_for(ns: NoiseSet) -> dict[str, torch.Tensor]:
    """Class labels of a noise set's samples: sample index mod 10 (balanced)."""
    return {"label": torch.arange(ns.start, ns.start + ns.n) % 10}


def prompts_for(ns: NoiseSet) -> dict[str, list[str]]:
    """Prompts of a noise set's samples: "a zero" ... "a nine" by sample index mod 10 (as the t2i recipe's fit)."""
    return {"prompt": [PROMPTS[i % 10] for i in range(ns.start, ns.start + ns.n)]}


class AtScale:
    """A recipe's entries at one classifier-free guidance scale, as ``auto_report`` asks for them."""

    def __init__(self, recipe: Any, guidance: float | None) -> None:
        self.recipe, self.guidance = recipe, guidance

    def solver(self, nfe: int) -> Any:
        return self.recipe.solver(nfe, self.guidance)

    def grid(self, nfe: int) -> torch.Tensor:
        return self.recipe.grid(nfe, self.guidance)

    def entry(self, nfe: int) -> Any:
        return self.recipe.entry(nfe, self.guidance)

    def nfes(self) -> tuple[int, ...]:
        return tuple(self.recipe.nfes(self.guidance))


def get_recipe(name: str, model: Any, nfes: Sequence[int], args: argparse.Namespace) -> tuple[Any, dict[str, Any]]:
    """The recipe and where it came from: the shipped one (MNIST) unless ``--fit-mnist``, else fitted here."""
    from dpmlab.calibrate import recipe as rc

    if args.recipe:
        deadline = time.time() + 60 * args.wait_recipe
        while not Path(args.recipe).exists() and time.time() < deadline:
            log(f"waiting for {args.recipe} (until {time.strftime('%H:%M', time.localtime(deadline))})")
            time.sleep(60)
        r = rc.Recipe.load(args.recipe, model=name, schedule=model.schedule)
        return r, {"source": f"loaded from {args.recipe}", "cond": r.cond, "provenance": r.provenance}
    if name in NETWORKS and not args.fit_mnist:
        deadline = time.time() + 60 * args.wait_recipe
        while True:
            r = rc.shipped_recipe(name)
            if r is not None or time.time() > deadline:
                break
            log(f"waiting for a shipped {name} recipe (until {time.strftime('%H:%M', time.localtime(deadline))})")
            time.sleep(60)
        if r is not None:
            missing = [k for k in nfes if k not in r.nfes()]
            if missing:
                log(f"the shipped {name} recipe has no entry for NFE {missing}: no auto cell there")
            return r, {"source": "shipped (model card)", "cond": r.cond, "provenance": r.provenance, "missing": missing}
        log(f"no shipped recipe for {name}; fitting one with a small budget")
    n_fit, n_sel = (args.n_fit_mnist, args.n_fit_select_mnist) if name == "mnist" else (args.n_fit, args.n_fit_select)
    extra: dict[str, Any] = {"model_name": name}
    if name == "mnist":  # a small budget on the network: fixed grids only (see the doc)
        extra.update(ref_tol=1e-5, learned=False, grids=("quadratic_time", "uniform_time", "trailing"))
    t0 = time.perf_counter()
    r = rc.fit_recipe(
        model, list(nfes), fit_seed=args.fit_seed, select_seed=args.select_seed, n_fit=n_fit, n_select=n_sel, **extra
    )
    secs = time.perf_counter() - t0
    log(f"fit_recipe({name}) {secs:.0f} s")
    return r, {"source": "fitted by this script", "fit_seconds": secs, "cond": r.cond, "provenance": r.provenance}


def used_noise(recipe: Any) -> dict[str, NoiseSet]:
    """The noise sets the recipe was fitted and selected on, as it records them."""
    return {
        f"recipe {k}": NoiseSet(int(v["seed"]), int(v["n"]), int(v.get("start", 0))) for k, v in recipe.seeds.items()
    }


def mnist_metrics(rep: AutoReport, report: NoiseSet, conditional: bool) -> dict[str, Any]:
    """FD-MNIST (to the reference samples, to the 5k data) and classifier-B accuracy per cell: against the
    conditioning labels, or (null class) against classifier B's class of the reference sample."""
    from dpmlab.metrics.features import evaluator_predictions, fd_mnist, load_mnist_classifier_b, mnist_5k

    data = mnist_5k().images
    clf_b = load_mnist_classifier_b()
    labels = (
        labels_for(report)["label"]
        if conditional
        else evaluator_predictions(rep.reference.float().clamp(-1, 1), classifier=clf_b)
    )

    def one(x: torch.Tensor) -> dict[str, float]:
        x = x.float().clamp(-1, 1)
        acc = float((evaluator_predictions(x, classifier=clf_b) == labels).float().mean())
        return {
            "fd_ref": fd_mnist(x, rep.reference.float().clamp(-1, 1)),
            "fd_data": fd_mnist(x, data),
            "acc_b": acc,
            "acc_se": math.sqrt(acc * (1 - acc) / len(labels)),
        }

    out: dict[str, Any] = {"reference": one(rep.reference)}
    for c in rep.cells:
        out[f"{c.contender}|{c.nfe}"] = one(c.out) if bool(torch.isfinite(c.out).all()) else {}
    return out


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model, sch, shape, ref_tol, conditional = setup(name)
    t2i = name == "mnist_t2i"
    # MNIST: labels unless --null-class (guidance: none); text to image: prompts with guidance, else the empty one
    conditional = conditional and not args.null_class and (not t2i or args.guidance is not None)
    if args.guidance is not None:
        if not t2i:
            raise SystemExit("--guidance is for mnist_t2i (the MNIST report samples with labels, unguided)")
        model = model.guided(args.guidance)
    nfes = [int(k) for k in args.nfes.split(",")]
    net = name in NETWORKS
    n_rep = args.n_report_mnist if net else args.n_report
    n_sel = args.n_select_mnist if net else args.n_select
    report = NoiseSet(args.report_seed, n_rep)
    select = NoiseSet(args.select_seed, n_sel)
    cond = (prompts_for if t2i else labels_for) if conditional else None
    t0 = time.perf_counter()
    # (b) and (c): chosen on the select set, and the report set's reference — all before the recipe is needed
    sel = select_configs(
        model,
        sch,
        shape,
        nfes,
        select=select,
        entries=candidates(net),
        cond=cond,
        ref_tol=ref_tol,
        name=name,
        progress=log,
    )
    log(f"{name}: selection {time.perf_counter() - t0:.0f} s; chosen {sel.chosen()}")
    t0 = time.perf_counter()
    refs = references(model, sch, report.draw(sch, shape), ref_tol=ref_tol, cond=cond(report) if cond else None)
    ref_seconds = time.perf_counter() - t0
    log(f"{name}: report reference {ref_seconds:.0f} s")
    full, info = get_recipe(name, model, nfes, args)
    if info["source"] != "shipped (model card)":  # keep what was fitted here, for reproduction
        info["saved"] = str(full.save(Path(args.out).with_name(f"{Path(args.out).name}_recipe_{name}.json")))
    recipe = AtScale(full, args.guidance)
    if not recipe.nfes():
        have = ", ".join("none" if g is None else f"{g:g}" for g in full.guidances())
        raise SystemExit(f"the {name} recipe has no entries at guidance {args.guidance}; it has guidance: {have}")
    auto_nfes = [k for k in nfes if k in recipe.nfes()]
    t0 = time.perf_counter()
    rep = auto_report(
        model,
        sch,
        shape,
        recipe,
        nfes,
        report=report,
        select=sel,
        used=used_noise(full),
        entries=candidates(net),
        cond=cond,
        ref_tol=ref_tol,
        report_refs=refs,
        auto_nfes=auto_nfes,
        name=name,
        progress=log,
    )
    rep.seconds["report reference"] = ref_seconds
    log(f"{name}: report {time.perf_counter() - t0:.0f} s {rep.seconds}")
    cells = []
    for c in rep.cells:
        d = {"contender": c.contender, "label": c.label, "nfe": c.nfe, "rms": c.rms, "median": c.median}
        if c.contender == "auto":
            d["label"] = recipe.entry(c.nfe).label
            d["solver"] = recipe.entry(c.nfe).solver_config
            d["grid"] = [float(t) for t in recipe.grid(c.nfe)]
        cells.append(d)
    ratios = {}
    for k in nfes:
        lo, hi = rep.ratio_ci(k)
        blo, bhi = rep.ratio_ci(k, of="dpmlab")
        ratios[str(k)] = {
            "auto/peer": rep.ratio(k),
            "ci": [lo, hi],
            "dpmlab/peer": rep.ratio(k, of="dpmlab"),
            "dpmlab ci": [blo, bhi],
            "auto/dpmlab": rep.ratio(k, to="dpmlab"),
            "auto/peer median": _median_ratio(rep, k),
        }
    out: dict[str, Any] = {
        "model": name,
        "schedule": repr(sch),
        "reference_tol": ref_tol,
        "conditioning": (
            "none"
            if not conditional
            else f"prompt 'a <digit>' by sample index mod 10, guidance {args.guidance:g}"
            if t2i
            else "label = sample index mod 10"
        ),
        "noise": {k: v.to_dict() for k, v in rep.noise.items()},
        "recipe": info,
        "default_grid": DEFAULT_GRID,
        "cells": cells,
        "ratios": ratios,
        "selection": [
            {"contender": c.contender, "label": c.label, "nfe": c.nfe, "rms": c.rms, "median": c.median}
            for c in rep.selection
        ],
        "seconds": rep.seconds,
    }
    if name == "mnist":
        out["metrics"] = mnist_metrics(rep, report, conditional)
    return out


def _median_ratio(rep: AutoReport, nfe: int) -> float:
    a, b = rep.cell("auto", nfe), rep.cell("diffusers", nfe)
    return a.median / b.median if a is not None and b is not None else float("nan")


def fmt(v: float) -> str:
    return "—" if not math.isfinite(v) else f"{v:.3g}"


def tables(res: dict[str, Any]) -> str:
    lines: list[str] = []
    for name, m in res.items():
        nfes = sorted({c["nfe"] for c in m["cells"]})
        cell = {(c["contender"], c["nfe"]): c for c in m["cells"]}
        n = m["noise"]
        lines += [
            "",
            f"### {name}: held-out RMS / median per-sample RMS error (report set seed {n['report']['seed']}, "
            f"n = {n['report']['n']}; selection seed {n['select']['seed']}, n = {n['select']['n']})",
            "",
            "| NFE | auto | dpmlab best, default grid | diffusers best | auto / peer RMS (95% CI) | median ratio "
            "| dpmlab / peer | ≤ 0.5? |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for k in nfes:
            row = [str(k)]
            for who in ("auto", "dpmlab", "diffusers"):
                c = cell.get((who, k))
                row.append("—" if c is None else f"{fmt(c['rms'])} / {fmt(c['median'])} ({c['label']})")
            r = m["ratios"][str(k)]
            ci = r["ci"]
            row.append(f"**{fmt(r['auto/peer'])}** [{fmt(ci[0])}, {fmt(ci[1])}]")
            a, b = cell.get(("auto", k)), cell.get(("diffusers", k))
            row.append(fmt(a["median"] / b["median"]) if a and b else "—")
            row.append(fmt(r["dpmlab/peer"]))
            goal = "—" if not math.isfinite(r["auto/peer"]) else "yes" if r["auto/peer"] <= 0.5 else "no"
            if k > 10:
                goal += " (goal: 4–10 only)"
            row.append(goal)
            lines.append("| " + " | ".join(row) + " |")
        if "metrics" in m:
            met = m["metrics"]
            ref = met["reference"]
            what = "accuracy B" if m["conditioning"] != "none" else "class agreement B"  # null class: vs the ref
            lines += [
                "",
                f"### {name}: FD-MNIST and classifier-B accuracy (report set, n = {n['report']['n']})",
                "",
                f"Reference ODE samples: FD to data {ref['fd_data']:.2f}, classifier-B accuracy "
                f"{ref['acc_b']:.3f} ± {ref['acc_se']:.3f}.",
                "",
                "| NFE | FD→ref auto / dpmlab / diffusers | FD→data auto / dpmlab / diffusers "
                f"| {what} auto / dpmlab / diffusers |",
                "|---|---|---|---|",
            ]
            for k in nfes:
                q = [met.get(f"{w}|{k}", {}) for w in ("auto", "dpmlab", "diffusers")]
                fd_r = " / ".join(f"{x['fd_ref']:.2f}" if x else "—" for x in q)
                fd_d = " / ".join(f"{x['fd_data']:.2f}" if x else "—" for x in q)
                acc = " / ".join(f"{x['acc_b']:.3f}" if x else "—" for x in q)
                lines.append(f"| {k} | {fd_r} | {fd_d} | {acc} |")
    return "\n".join(lines)


def write(res: dict[str, Any], stem: Path) -> None:
    with atomic_write(stem.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    fields = ["model", "contender", "label", "nfe", "rms", "median", "auto/peer", "ci_lo", "ci_hi"]
    with atomic_write(stem.with_suffix(".csv")) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for name, m in res.items():
            for c in m["cells"]:
                r = m["ratios"][str(c["nfe"])]
                w.writerow(
                    {
                        "model": name,
                        **{k: c[k] for k in ("contender", "label", "nfe", "rms", "median")},
                        "auto/peer": r["auto/peer"],
                        "ci_lo": r["ci"][0],
                        "ci_hi": r["ci"][1],
                    }
                )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gmm16,gmm64", help="comma-separated: gmm16, gmm64, mnist, mnist_t2i")
    ap.add_argument("--nfes", default=",".join(map(str, NFES)))
    ap.add_argument("--n-report", type=int, default=1024, help="report noise set size (analytic)")
    ap.add_argument("--n-select", type=int, default=256, help="selection set of (b) and (c) (analytic)")
    ap.add_argument("--n-fit", type=int, default=128, help="recipe fit set (analytic)")
    ap.add_argument("--n-fit-select", type=int, default=256, help="recipe selection set (analytic)")
    ap.add_argument("--n-report-mnist", type=int, default=128)
    ap.add_argument("--n-select-mnist", type=int, default=32)
    ap.add_argument("--n-fit-mnist", type=int, default=8)
    ap.add_argument("--n-fit-select-mnist", type=int, default=16)
    ap.add_argument("--fit-mnist", action="store_true", help="fit a recipe for MNIST even if one ships")
    ap.add_argument("--null-class", action="store_true", help="MNIST: sample the null class (unconditional)")
    ap.add_argument(
        "--guidance", type=float, default=None, help="mnist_t2i: classifier-free guidance scale, prompts 'a <digit>'"
    )
    ap.add_argument("--recipe", default="", help="a recipe JSON to use (one model only) instead of shipped / fitted")
    ap.add_argument(
        "--wait-recipe",
        type=float,
        default=0.0,
        help="minutes to wait for a shipped MNIST recipe (or for --recipe's file)",
    )
    ap.add_argument("--fit-seed", type=int, default=0)
    ap.add_argument("--select-seed", type=int, default=1)
    ap.add_argument("--report-seed", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks" / "auto"), help="stem of the .json / .csv")
    ap.add_argument("--tables-only", action="store_true", help="no runs: print the tables (after --merge)")
    ap.add_argument("--merge", nargs="*", default=[], help="JSON results of other runs to merge in")
    args = ap.parse_args(argv)
    if len({args.fit_seed, args.select_seed, args.report_seed}) < 3:
        raise SystemExit("--fit-seed, --select-seed and --report-seed must be three different seeds")
    torch.set_num_threads(1)
    stem = Path(args.out)
    path = stem.with_suffix(".json")
    res: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for extra in args.merge:  # results of another run (e.g. MNIST run on its own), model by model
        res.update(json.loads(Path(extra).read_text()))
    if not args.tables_only:
        for name in args.models.split(","):
            key = name + ("-null-class" if args.null_class else "")
            key += f"-w{args.guidance:g}" if args.guidance is not None else ""
            res[key] = run_model(name, args)
            write(res, stem)  # after each model: a later failure keeps the finished ones
            log(f"{name} done; wrote {path}")
    elif args.merge:
        write(res, stem)
    print(tables(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
