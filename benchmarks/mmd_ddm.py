"""MMD-DDM on the shipped class-conditional MNIST model: DDIM at 5 NFE before and after a short MMD fine-tune
(recipe ``recipes/methods/mmd_ddm_mnist.json``, run through ``dpmlab.methods.train_recipe`` = ``dpmlab train``),
against the un-fine-tuned model at 5 and 50 NFE, and the fine-tuned model at 50 NFE.

The loss uses the *shipped* classifier's features; the evaluation uses the independent classifier B (another
architecture and seed): FD and KID in its 64-d ``fc`` features, and its accuracy on the requested labels; plus
KID on raw pixels. FD-MNIST (the shipped classifier, i.e. the training feature space) is reported separately
and is not independent evidence. Every row draws the same ``n`` class-balanced samples (labels ``i % 10``,
seed 1), clamped to [-1, 1], against ``--n-real`` training images.

    .venv/bin/python benchmarks/mmd_ddm.py [--n 250] [--steps 60] [--lr 5e-5] [--out runs/bench_mmd_ddm]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

import dpmlab
from dpmlab.methods import load_recipe, train_recipe
from dpmlab.metrics.distances import frechet_distance_from_features, kid
from dpmlab.metrics.features import fd_mnist, load_mnist_classifier_b, mnist_5k

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


class EvaluatorB:
    """Classifier B's 64-d ``fc`` output (captured by a forward hook) and its predictions."""

    def __init__(self) -> None:
        self.clf = load_mnist_classifier_b()
        self._feat: list[Tensor] = []
        self.clf.fc.register_forward_hook(lambda m, i, o: self._feat.append(o.detach()))

    def __call__(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._feat.clear()
        with torch.no_grad():
            logits = torch.cat([self.clf(b) for b in x.split(500)])
        return torch.cat(self._feat).double(), logits.argmax(1)


def metrics(x: Tensor, labels: Tensor, real: Tensor, ev: EvaluatorB) -> dict[str, float]:
    x = x.clamp(-1, 1)
    fx, pred = ev(x)
    fr, _ = ev(real)
    m = min(len(x), len(real))
    # KID's kernel (a·b/F + 1)^3 assumes O(1) features: B's are centered and scaled (one scalar) by the reference
    mu = fr.mean(0)
    s = float((fr - mu).square().mean().sqrt())
    return {
        "fd_b": frechet_distance_from_features(fx, fr),
        "kid_b_x1e3": 1e3 * kid((fx - mu) / s, (fr - mu) / s, subsets=50, subset_size=m, seed=0).mean,
        "kid_pix_x1e3": 1e3 * kid(x.flatten(1), real.flatten(1), subsets=50, subset_size=m, seed=0).mean,
        "acc_b": float((pred == labels).float().mean()),
        "fd_mnist_train_features": fd_mnist(x, real),
    }


def draw(model: Any, n: int, nfe: int, grid: str, labels: Tensor) -> tuple[Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        x = dpmlab.sample(
            model, n, solver="ddim", nfe=nfe, grid=grid, to_zero=True, seed=1, cond={"label": labels}, batch_size=250
        )
    return x, (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=250, help="samples per row")
    ap.add_argument("--n-real", type=int, default=1000, help="training images in the reference set")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_mmd_ddm"))
    args = ap.parse_args()
    labels = torch.arange(args.n) % 10
    data = mnist_5k()
    real = data.images[torch.randperm(len(data.images), generator=torch.Generator().manual_seed(0))[: args.n_real]]
    ev = EvaluatorB()
    base = dpmlab.load("mnist")
    rows: list[dict[str, Any]] = []

    def row(name: str, model: Any, nfe: int, grid: str) -> None:
        x, ms = draw(model, args.n, nfe, grid, labels)
        rows.append({"model": name, "nfe": nfe, "grid": grid, **metrics(x, labels, real, ev), "ms_per_sample": ms})
        print(rows[-1], flush=True)

    row("base", base, 5, "leading")
    row("base", base, 5, "quadratic_time")
    row("base", base, 50, "leading")

    recipe = load_recipe(ROOT / "recipes" / "methods" / "mmd_ddm_mnist.json")
    recipe = dataclasses.replace(
        recipe, train=dataclasses.replace(recipe.train, steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    )
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    res = train_recipe(recipe, out, progress=False)
    train_s = time.perf_counter() - t0
    tuned = dpmlab.load(out)
    row("MMD-DDM", tuned, 5, "leading")
    row("MMD-DDM", tuned, 5, "quadratic_time")
    row("MMD-DDM", tuned, 50, "leading")

    summary = {"args": vars(args), "train_seconds": train_s, "losses": res.losses, "rows": rows}
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    head = (
        "| model | DDIM NFE | grid | FD (clf B) | KID×1e3 (clf B) | KID×1e3 (pixels) | acc (clf B) | "
        "FD-MNIST (training features) |"
    )
    lines = [
        f"fine-tune: {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}, {train_s:.0f} s; "
        f"{args.n} samples per row vs {args.n_real} training images",
        "",
        head,
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['nfe']} | {r['grid']} | {r['fd_b']:.2f} | {r['kid_b_x1e3']:.2f} | "
            f"{r['kid_pix_x1e3']:.2f} | {r['acc_b']:.3f} | {r['fd_mnist_train_features']:.1f} |"
        )
    lines += ["", "MMD² training loss (window means): " + ", ".join(f"{s}: {v:.4f}" for s, v in res.losses)]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
