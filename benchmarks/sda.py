"""SDA vs DDA on corrupted MNIST digits (Guo et al., CVPR 2025, arXiv 2406.04295; ``dpmlab.apps.sda``).

Held-out MNIST digits (``mnist_5k_split``'s validation part, ``--per-class`` per digit) under each corruption of
``dpmlab.apps.sda.CORRUPTIONS`` at one severity. The source classifier is ``load_mnist_classifier()`` (classifier
A); the diffusion model is the shipped class-conditional ``mnist`` (its null class is the unconditional projector).
Accuracy against the true labels of:

* ``source``: source(x);  ``DDA``: source(project(x));  ``DDA ens``: source(x) + source(project(x)) (DDA's sum);
* ``SDA ft``: finetuned(project(x));  ``SDA``: source(x) + finetuned(project(x)) (the paper's ensemble);
* ``ft+ft``: finetuned(x) + finetuned(project(x)) (a variant, not the paper's).

``finetuned`` = source fine-tuned on class-conditional samples of ``mnist`` pushed through the same projection.
Diagnostic rows on clean images: source accuracy on clean vs projected clean (the misalignment SDA targets), and the
independent evaluator B's accuracy on the projections (how much class content the projection keeps; B takes no
part in the method). Paper's claim: mean accuracy source < DDA < SDA.

Usage: ``nice python benchmarks/sda.py [--per-class 20] [--severity 3] [--synthetic-per-class 50] [--t-start 0.5]
[--corruptions a,b,...] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

import dpmlab
from dpmlab.apps import sda
from dpmlab.metrics.features import evaluator_predictions, load_mnist_classifier, mnist_5k, mnist_5k_split

torch.set_num_threads(1)
COLS = ("source", "dda", "dda_ensemble", "sda_finetuned", "sda", "sda_ft_both")
HEAD = ("source", "DDA", "DDA ens", "SDA ft", "SDA", "ft+ft")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--per-class", type=int, default=20)
    ap.add_argument("--severity", type=int, default=3)
    ap.add_argument("--synthetic-per-class", type=int, default=sda.FinetuneConfig().per_class)
    ap.add_argument("--finetune-steps", type=int, default=300)
    ap.add_argument("--corruptions", default=",".join(sda.CORRUPTIONS))
    ap.add_argument("--t-start", type=float, default=sda.DDAConfig().t_start)
    ap.add_argument("--scale", type=float, default=sda.DDAConfig().scale)
    ap.add_argument("--lowpass", type=int, default=sda.DDAConfig().lowpass)
    ap.add_argument("--steps", type=int, default=sda.DDAConfig().steps)
    ap.add_argument("--json", help="write all numbers here")
    a = ap.parse_args()
    t_cpu = time.process_time()
    proj = sda.DDAConfig(t_start=a.t_start, steps=a.steps, lowpass=a.lowpass, scale=a.scale)
    ftc = sda.FinetuneConfig(per_class=a.synthetic_per_class, steps=a.finetune_steps)
    model, source = dpmlab.load("mnist"), load_mnist_classifier()

    # stage 1: synthetic labelled set -> projection -> fine-tuned source classifier
    xs, ys = sda.synthetic_set(model, ftc, proj, seed=1, progress=True)
    finetuned = sda.finetune_classifier(source, xs, ys, ftc, seed=1)
    syn_acc = float((sda.logits(source, xs).argmax(1) == ys).float().mean())
    print(
        f"synthetic set: {len(ys)} projected images, source accuracy on them {syn_acc:.3f} "
        f"({time.process_time() - t_cpu:.0f} s CPU)",
        flush=True,
    )

    # clean diagnostics
    data = mnist_5k()
    _, val = mnist_5k_split(data.labels)
    val = torch.cat([val[data.labels[val] == c][: a.per_class] for c in range(10)]).sort().values
    x, y = data.images[val], data.labels[val]
    x_proj = sda.project(model, x, proj, seed=0, progress=True)
    clean = sda.evaluate(source, finetuned, x, x_proj, y)
    clean["B_proj"] = float((evaluator_predictions(x_proj) == y).float().mean())
    print(f"clean: {clean}", flush=True)

    rows: dict[str, dict[str, float]] = {}
    correct: dict[str, dict[str, torch.Tensor]] = {}
    for name in a.corruptions.split(","):
        xc = sda.corrupt(x, name, a.severity, seed=0)
        xc_proj = sda.project(model, xc, proj, seed=0, progress=True)
        rows[name] = sda.evaluate(source, finetuned, xc, xc_proj, y)
        rows[name]["B_proj"] = float((evaluator_predictions(xc_proj) == y).float().mean())
        s_raw, s_proj, f_proj = (sda.logits(m, z) for m, z in ((source, xc), (source, xc_proj), (finetuned, xc_proj)))
        correct[name] = {
            "dda": (s_proj.argmax(1) == y).float(),
            "sda": ((s_raw + f_proj).argmax(1) == y).float(),
            "source": (s_raw.argmax(1) == y).float(),
        }
        print(f"{name}: {rows[name]} ({time.process_time() - t_cpu:.0f} s CPU)", flush=True)

    n = len(y)
    print(
        f"\nSeverity {a.severity}, {n} held-out digits per corruption; projection {proj.to_dict()}; "
        f"synthetic set {len(ys)} images, fine-tune {ftc.steps} steps\n"
    )
    print("| corruption | " + " | ".join(HEAD) + " | B on proj |")
    print("|---|" + "---:|" * (len(HEAD) + 1))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * r[c]:.1f}" for c in COLS) + f" | {100 * r['B_proj']:.1f} |")
    mean = {c: sum(r[c] for r in rows.values()) / len(rows) for c in (*COLS, "B_proj")}
    print("| **mean** | " + " | ".join(f"**{100 * mean[c]:.1f}**" for c in COLS) + f" | {100 * mean['B_proj']:.1f} |")
    print("| clean | " + " | ".join(f"{100 * clean[c]:.1f}" for c in COLS) + f" | {100 * clean['B_proj']:.1f} |")
    se = math.sqrt(0.25 / (n * len(rows)))
    print(
        f"\n(binomial SE of a mean over {n * len(rows)} images <= {100 * se:.1f} points; "
        f"per corruption <= {100 * math.sqrt(0.25 / n):.1f})"
    )
    for a_, b_ in (("sda", "dda"), ("dda", "source"), ("sda", "source")):
        d = torch.cat([correct[k][a_] - correct[k][b_] for k in correct])
        print(
            f"paired {a_} - {b_}: {100 * float(d.mean()):+.1f} +- {100 * float(d.std() / math.sqrt(len(d))):.1f} "
            f"points (SE over {len(d)} images)"
        )
    print(
        f"\nsource on clean {100 * clean['source']:.1f} -> on projected clean {100 * clean['dda']:.1f} "
        f"(fine-tuned on projected clean {100 * clean['sda_finetuned']:.1f}); "
        f"total {time.process_time() - t_cpu:.0f} s CPU"
    )
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(
                {
                    "projection": proj.to_dict(),
                    "finetune": ftc.to_dict(),
                    "severity": a.severity,
                    "n": n,
                    "synthetic_source_accuracy": syn_acc,
                    "clean": clean,
                    "rows": rows,
                    "mean": mean,
                },
                fh,
                indent=2,
            )


if __name__ == "__main__":
    main()
