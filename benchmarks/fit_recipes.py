"""Fit the sampling recipe (``solver="auto"``) of a model and, for a shipped model, put it in its card.

    python benchmarks/fit_recipes.py --model mnist --nfe 4,5,6,8,10 --n-fit 32 --n-select 64 \
        --ref-tol 1e-5 --learned-top 1 --fine-steps 16 --sweeps 1 --golden-iters 8 --out runs/recipes/mnist.json
    python benchmarks/fit_recipes.py --model mnist --out runs/recipes/mnist.json --write-card   # into the card
    python benchmarks/fit_recipes.py --model mnist --out runs/recipes/mnist.json --check-seed 2  # a third seed

Learned grids are fitted on ``--n-fit`` noises of ``--fit-seed``; every candidate is scored on ``--n-select``
noises of ``--select-seed`` (``dpmlab.calibrate.recipe.fit_recipe``). The command, the seeds and the CPU time
go into the recipe's provenance. ``--write-card`` adds the recipe to ``src/dpmlab/assets/<model>.json`` under
``"sampling_recipes"`` (the only key it touches; written atomically). Prints the per-NFE tables of
``docs/recipes.md``; ``--check-seed`` scores the choice and the best default-grid candidate on a third seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

import dpmlab
from dpmlab._utils import atomic_write
from dpmlab.calibrate.recipe import (
    CARD_KEY,
    DEFAULT_SOLVERS,
    FIXED_GRIDS,
    Recipe,
    candidate_label,
    fit_recipe,
    model_card,
)
from dpmlab.solvers import get


def table(rec: Recipe) -> str:
    """Markdown, errors on the select noise: per NFE the choice, the best candidate on a fixed grid, the best on
    the library's default grid (quadratic_time), and the choice's RMS as a fraction of the latter."""
    lines = [
        "| NFE | chosen (solver @ grid) | RMS / median | best on a fixed grid | RMS / median "
        "| best on quadratic_time | RMS / median | chosen / default RMS |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def best(scores: dict[str, tuple[float, float]], keep: str) -> tuple[str, str, float]:
        cands = {k: v for k, v in scores.items() if keep in k}
        if not cands:
            return "—", "—", float("nan")
        k = min(cands, key=lambda c: cands[c][0])
        return k, f"{cands[k][0]:.4f} / {cands[k][1]:.4f}", cands[k][0]

    for e in sorted(rec.entries, key=lambda e: (e.guidance or 0.0, e.nfe)):
        fixed = {k: v for k, v in e.scores.items() if k.rsplit(" @ ", 1)[-1] in (*FIXED_GRIDS, "trailing")}
        bf, bf_s, _ = best(fixed, "@")
        bd, bd_s, bd_rms = best(e.scores, "@ quadratic_time")
        g = "" if e.guidance is None else f" (w={e.guidance:g})"
        lines.append(
            f"| {e.nfe}{g} | {e.label} | {e.rms:.4f} / {e.median:.4f} | {bf} | {bf_s} | {bd} | {bd_s} "
            f"| {e.rms / bd_rms:.2f} |"
        )
    return "\n".join(lines)


def unguided_cond(rec: Recipe, n: int) -> dict[str, Any]:
    """The model keywords ``rec``'s unguided entries were fitted with, for ``n`` samples (rows 0..n-1); refuses a
    conditioning it cannot rebuild from the recipe's note."""
    note = rec.cond.partition("; guided entries: ")[0]
    if note.startswith("label = sample index % 10"):
        return {"label": torch.arange(n) % 10}
    if note.startswith("none"):
        return {}
    raise SystemExit(f"cannot rebuild the conditioning {note!r} of the unguided entries of {rec.model!r}")


class Scorer:
    """(pooled RMS, median per-sample RMS) of a solver on a grid, on ``n`` noises of ``seed`` with the unguided
    conditioning of ``rec``, against their float64 reference at ``sigma = 0`` (computed once)."""

    def __init__(self, rec: Recipe, seed: int, n: int, ref_tol: float, start: int = 0) -> None:
        from dpmlab.calibrate.grid import calibration_noise
        from dpmlab.models.reference import reference_solution

        self.model = dpmlab.load(rec.model)
        self.sch, self.shape = self.model.schedule, tuple(self.model.data_shape or ())
        self.x = calibration_noise(self.sch, self.shape, n, seed=seed, start=start)
        self.cond = unguided_cond(rec, n)
        self.ref = reference_solution(
            self.model, self.sch, self.x, self.sch.t_max, 0.0, rtol=ref_tol, atol=ref_tol, cond=self.cond
        ).x

    def __call__(self, solver: Any, ts: torch.Tensor) -> tuple[float, float]:
        from dpmlab.calibrate.grid import grid_errors

        err = grid_errors(self.model, self.sch, solver, ts, self.x, self.ref, cond=self.cond)
        dim = self.x[0].numel()
        return float(err.pow(2).mean().div(dim).sqrt()), float(err.median() / dim**0.5)


def check(rec: Recipe, seed: int, n: int, ref_tol: float) -> str:
    """Markdown: the choice vs the best candidate on quadratic_time (both chosen on the select noise), scored on
    ``n`` noises of a third ``seed`` (refused if it is the fit or select seed), unguided entries only."""
    from dpmlab.timesteps import make_grid

    if seed in (rec.seeds["fit"]["seed"], rec.seeds["select"]["seed"]):
        raise SystemExit(f"--check-seed {seed} is the fit or select seed; use a third")
    score = Scorer(rec, seed, n, ref_tol)
    lines = [
        f"| NFE | chosen | RMS / median (seed {seed}) | best on quadratic_time (chosen on the select noise) "
        f"| RMS / median (seed {seed}) | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for e in sorted(rec.entries, key=lambda e: e.nfe):
        if e.guidance is not None:
            continue
        a = score(e.solver(), e.grid())
        on_default = {k: v for k, v in e.scores.items() if k.endswith("@ quadratic_time")}
        k = min(on_default, key=lambda c: on_default[c][0])
        cfg = next(c for c in DEFAULT_SOLVERS if candidate_label(c) == k.split(" @ ")[0])
        slv = get(**cfg)
        b = score(slv, make_grid(score.sch, "quadratic_time", slv.steps_for_nfe(e.nfe, True), to_zero=True))
        lines.append(
            f"| {e.nfe} | {e.label} | {a[0]:.4f} / {a[1]:.4f} | {k} | {b[0]:.4f} / {b[1]:.4f} | {a[0] / b[0]:.2f} |"
        )
    return "\n".join(lines)


def _select_scorer(rec: Recipe, ref_tol: float) -> Scorer:
    sel = rec.seeds["select"]
    return Scorer(rec, int(sel["seed"]), int(sel["n"]), ref_tol, start=int(sel.get("start", 0)))


def rescore(rec: Recipe, prior: Recipe, ref_tol: float) -> Recipe:
    """``rec`` with, per unguided NFE both have, ``prior``'s entry put in its place where that entry has the lower
    RMS on ``rec``'s select noise and conditioning (set B; scored here). A choice on set B as ``fit_recipe``'s:
    the prior entry is one more candidate (its grid was fitted on another noise or conditioning)."""
    score = _select_scorer(rec, ref_tol)
    entries = []
    for e in rec.entries:
        if e.guidance is not None or e.nfe not in prior.nfes():
            entries.append(e)
            continue
        p = prior.entry(e.nfe)
        rms, med = score(p.solver(), p.grid())
        lab = f"{p.label} (prior recipe)"
        print(f"NFE {e.nfe}: {e.label} {e.rms:.4f} vs {lab} {rms:.4f}", flush=True)
        win = p if rms < e.rms else e
        scores = {**e.scores, lab: (rms, med)}
        rms, med = (rms, med) if win is p else (e.rms, e.median)
        entries.append(dataclasses.replace(win, rms=rms, median=med, guidance=None, scores=scores))
    what = {"what": "entries of a prior recipe scored as candidates on set B", **prior.provenance}
    return dataclasses.replace(rec, entries=tuple(entries), provenance={**rec.provenance, "prior": what})


def learn_more(
    rec: Recipe, solvers: list[dict[str, Any]], nfes: list[int], grid_options: dict[str, Any], ref_tol: float
) -> Recipe:
    """``rec`` with learned grids (``gits+e2e``, fitted on its set A) for more ``solvers`` at the unguided ``nfes``,
    scored on its set B as extra candidates; an entry is replaced where one is lower (a larger ``learned_top``
    after the fact: the solver best on the fixed grids is not always best on a learned grid)."""
    from dpmlab.calibrate.grid import calibration_noise, fit_grid, teacher_states

    score = _select_scorer(rec, ref_tol)
    fit, sel = rec.seeds["fit"], rec.seeds["select"]
    x_a = calibration_noise(
        score.sch, score.shape, int(fit["n"]), seed=int(fit["seed"]), start=int(fit.get("start", 0))
    )
    cond_a = unguided_cond(rec, x_a.shape[0])
    teacher = teacher_states(score.model, score.sch, x_a, grid_options["fine_steps"], ref_tol=ref_tol, cond=cond_a)
    entries = []
    for e in rec.entries:
        if e.guidance is not None or e.nfe not in nfes:
            entries.append(e)
            continue
        scores, best = dict(e.scores), e
        for cfg in solvers:
            art = fit_grid(
                score.model,
                score.sch,
                cfg,
                e.nfe,
                x_a,
                method="gits+e2e",
                cond=cond_a,
                ref_tol=ref_tol,
                teacher=teacher,
                model_name=rec.model,
                seeds=dict(fit),
                **grid_options,
            )
            art.check_held_out(int(sel["seed"]), int(sel.get("start", 0)), int(sel["n"]))
            rms, med = score(get(**cfg), art.grid())
            lab = f"{candidate_label(cfg)} @ gits+e2e (second pass)"
            scores[lab] = (rms, med)
            print(f"NFE {e.nfe}: {e.label} {e.rms:.4f} vs {lab} {rms:.4f}", flush=True)
            if rms < best.rms:
                best = dataclasses.replace(
                    e, solver_config=get(**cfg).config(), ts=art.ts, grid_name="gits+e2e", rms=rms, median=med
                )
        entries.append(dataclasses.replace(best, scores=scores))
    prov = {**rec.provenance, "second_pass": {"solvers": solvers, "nfes": nfes, **grid_options}}
    return dataclasses.replace(rec, entries=tuple(entries), provenance=prov)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mnist")
    ap.add_argument("--nfe", default="4,5,6,8,10")
    ap.add_argument("--n-fit", type=int, default=32)
    ap.add_argument("--n-select", type=int, default=64)
    ap.add_argument("--fit-seed", type=int, default=0)
    ap.add_argument("--select-seed", type=int, default=1)
    ap.add_argument("--ref-tol", type=float, default=1e-5)
    ap.add_argument("--learned-top", type=int, default=2)
    ap.add_argument("--no-learned", action="store_true")
    ap.add_argument("--fine-steps", type=int, default=16)
    ap.add_argument("--sweeps", type=int, default=1)
    ap.add_argument("--golden-iters", type=int, default=8)
    ap.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (labels i % 10)")
    ap.add_argument("--labels", action="store_true", help="MNIST without guidance: labels i % 10 (not the null class)")
    ap.add_argument(
        "--merge", action="store_true", help="keep the entries of other guidance scales of the recipe in --out"
    )
    ap.add_argument(
        "--add-nfes", action="store_true", help="add this run's NFEs to the recipe in --out, keeping its other entries"
    )
    ap.add_argument("--dc", action="store_true", help="also try DC-Solver ratios on each winner")
    ap.add_argument("--prompts", default="", help="text to image, with --guidance: comma-separated prompts")
    ap.add_argument("--out", required=True, help="the recipe (.json)")
    ap.add_argument("--write-card", action="store_true", help="also put it in src/dpmlab/assets/<model>.json")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--learn-more", default="", help="';'-separated solver configs (JSON) to fit learned grids for")
    ap.add_argument("--rescore", default="", help="a prior recipe whose unguided entries compete on --out's set B")
    ap.add_argument("--check-seed", type=int, default=None, help="score the recipe in --out on this third seed")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    found = model_card(args.model)
    if args.write_card and found is None:
        sys.exit(f"{args.model} has no model card in dpmlab/assets")
    card = found or Path()
    if args.learn_more:  # learned grids for more solvers at --nfe, scored on --out's set B
        cfgs = [json.loads(c) for c in args.learn_more.split(";")]
        grid_opts = {"fine_steps": args.fine_steps, "sweeps": args.sweeps, "golden_iters": args.golden_iters}
        nfes = [int(k) for k in args.nfe.split(",")]
        rec = learn_more(Recipe.load(out, model=args.model), cfgs, nfes, grid_opts, args.ref_tol)
        rec.save(out)
        print(table(rec))
        return
    if args.rescore:  # the prior recipe's entries as candidates on this recipe's select noise
        rec = rescore(Recipe.load(out, model=args.model), Recipe.load(args.rescore, model=args.model), args.ref_tol)
        rec.save(out)
        print(table(rec))
        return
    if args.check_seed is not None:
        print(check(Recipe.load(out, model=args.model), args.check_seed, args.n_select, args.ref_tol))
        return
    if out.exists() and not args.overwrite:
        if not args.write_card:
            sys.exit(f"{out} exists; pass --overwrite (or --write-card to put it in the card without refitting)")
        write_card(Recipe.load(out, model=args.model), card)
        return
    nfes = [int(k) for k in args.nfe.split(",")]
    cond: dict[str, Any] | None = None
    note = "none (unconditional: the null class)" if args.model == "mnist" else "none"
    if args.guidance is not None and args.prompts:  # text to image: prompt i % len(prompts) for sample i
        prompts = [p.strip() for p in args.prompts.split(",")]
        cond = {"prompt": [prompts[i % len(prompts)] for i in range(max(args.n_fit, args.n_select))]}
        note = f"prompt = {prompts} [sample index % {len(prompts)}], classifier-free guidance"
    elif args.guidance is not None:
        cond = {"label": torch.arange(max(args.n_fit, args.n_select)) % 10}
        note = "label = sample index % 10, classifier-free guidance"
    elif args.labels:
        cond = {"label": torch.arange(max(args.n_fit, args.n_select)) % 10}
        note = "label = sample index % 10, no guidance"
    rec = fit_recipe(
        args.model,
        nfes,
        fit_seed=args.fit_seed,
        select_seed=args.select_seed,
        n_fit=args.n_fit,
        n_select=args.n_select,
        learned=not args.no_learned,
        learned_top=args.learned_top,
        progress=lambda msg: print(msg, flush=True),
        cond=cond,
        cond_note=note,
        guidance=args.guidance,
        calibrated=("dc",) if args.dc else (),
        ref_tol=args.ref_tol,
        grid_options={"fine_steps": args.fine_steps, "sweeps": args.sweeps, "golden_iters": args.golden_iters},
        provenance={
            "command": "python " + shlex.join(["benchmarks/fit_recipes.py", *sys.argv[1:]]),
            "machine": "one CPU thread, shared",
            "dpmlab": dpmlab.__version__,
        },
    )
    if out.exists() and args.add_nfes:  # new NFEs beside the recipe's entries (same noise and conditioning)
        old = Recipe.load(out, model=args.model)
        if old.seeds != rec.seeds:
            sys.exit(f"{out} was fitted on the noise {old.seeds}, this run on {rec.seeds}: not merged")
        g = rec.entries[0].guidance
        base, _, guided = old.cond.partition("; guided entries: ")
        if rec.cond != (guided if g is not None else base):
            sys.exit(f"this run's conditioning {rec.cond!r} is not the recipe's {old.cond!r}: not merged")
        new = {(e.nfe, e.guidance) for e in rec.entries}
        scale = "no guidance" if g is None else f"guidance {g:g}"
        added = {"entries": f"nfe {', '.join(str(e.nfe) for e in rec.entries)} ({scale})", **rec.provenance}
        entries = sorted(
            [e for e in old.entries if (e.nfe, e.guidance) not in new] + list(rec.entries),
            key=lambda e: (e.guidance is not None, e.guidance or 0.0, e.nfe),
        )
        prov = {**old.provenance, "added": [*old.provenance.get("added", []), added]}
        rec = dataclasses.replace(rec, entries=tuple(entries), cond=old.cond, provenance=prov)
    elif out.exists() and (args.guidance is not None or args.merge):  # keep the other scales' entries in --out
        old = Recipe.load(out, model=args.model)
        if old.seeds != rec.seeds:
            sys.exit(f"{out} was fitted on the noise {old.seeds}, this run on {rec.seeds}: not merged")
        kept = tuple(e for e in old.entries if e.guidance != rec.entries[0].guidance)
        base, _, guided = old.cond.partition("; guided entries: ")
        if args.guidance is not None:  # the guided entries' note and provenance go under "guided"
            merged, prov = f"{base}; guided entries: {rec.cond}", {**old.provenance, "guided": rec.provenance}
        else:  # new unguided entries: the old guided ones keep theirs
            merged = rec.cond + (f"; guided entries: {guided}" if guided else "")
            prov = {**rec.provenance, **({"guided": old.provenance["guided"]} if "guided" in old.provenance else {})}
        rec = dataclasses.replace(rec, entries=kept + rec.entries, cond=merged, provenance=prov)
    rec.save(out)
    print(f"wrote {out} (CPU {rec.provenance['cpu_seconds']} s)")
    if args.write_card:
        write_card(rec, card)
    else:
        print(table(rec))


def write_card(rec: Recipe, card: Path) -> None:
    d = json.loads(card.read_text())
    d[CARD_KEY] = rec.to_dict()
    with atomic_write(card) as tmp:
        tmp.write_text(json.dumps(d, indent=2) + "\n")
    print(f"wrote {card} [{CARD_KEY!r}]")
    print(table(rec))


if __name__ == "__main__":
    main()
