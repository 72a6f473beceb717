"""DomainStudio vs plain fine-tuning on 10 shots of "bold" MNIST (docs/methods/domainstudio.md).

Both runs start from the shipped MNIST UNet (null class) and use the same recipe
(recipes/methods/domainstudio_mnist.json vs domainstudio_mnist_plain.json: only the three DomainStudio weights
differ); each is evaluated after several step counts (resumed runs) on ``--n`` samples (DDIM, ``--nfe``).

Metrics (none used in training):
* copy rate: share of samples whose nearest shot is closer than tau, tau = the 5th percentile of the pairwise
  distances between distinct held-out real target images; in raw pixels (L2) and in classifier-B features (64-d,
  the independent evaluator). "real" row: the same rate for held-out real target images (the floor).
  "copynn": the same with tau = the 5th percentile of held-out real targets' nearest-shot distances (so the real
  rate is 5% by construction; the issue's tau gives real images a high floor with 10 shots).
* intra-cluster diversity (Intra-LPIPS stand-in, no LPIPS here): each sample goes to its nearest shot; mean
  pairwise distance within each cluster of >= 2 samples, averaged over clusters (same space as the assignment).
* fidelity: FD-MNIST (classifier A features) to 2,000 held-out target images; ink = share of pixels > 0 (the
  shots' dilation roughly doubles it); classes = number of digit classes (classifier B) holding >= 2% of samples.

``--t2i``: the text-to-image variant on mnist_t2i (recipes/methods/domainstudio_mnist_t2i.json vs the DreamBooth
baseline domainstudio_mnist_t2i_dreambooth.json): samples for the instance prompt, decoded and centre-cropped to
28x28 for the same metrics; "drift" rows: the class prompt "a digit" after tuning (prior preservation).

Run: nohup nice .venv/bin/python benchmarks/domainstudio.py [--t2i] > runs/domainstudio.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

import dpmlab
from dpmlab.methods import MethodRecipe, load, load_recipe, train_recipe
from dpmlab.methods.domainstudio import shot_indices, to_domain
from dpmlab.metrics.features import fd_mnist, load_mnist_classifier_b, mnist_5k

ROOT = Path(__file__).resolve().parents[1]


def features_b(x: Tensor) -> Tensor:
    """Classifier B's 64-d penultimate features (the independent evaluator)."""
    clf = load_mnist_classifier_b()
    out = []
    with torch.no_grad():
        for b in x.split(500):
            h = F.avg_pool2d(F.gelu(clf.conv1(b)), 2)
            h = F.avg_pool2d(F.gelu(clf.conv2(h)), 2)
            out.append(F.gelu(clf.fc(h.flatten(1))))
    return torch.cat(out).double()


def predictions_b(x: Tensor) -> Tensor:
    clf = load_mnist_classifier_b()
    with torch.no_grad():
        return torch.cat([clf(b).argmax(1) for b in x.split(500)])


def tau(real: Tensor, q: float = 0.05) -> float:
    d = torch.cdist(real, real)
    iu = torch.triu_indices(len(real), len(real), 1)
    return float(torch.quantile(d[iu[0], iu[1]], q))


def copy_and_diversity(
    samples: Tensor, shots: Tensor, thr: float, thr_nn: float
) -> tuple[float, float, float, float, int]:
    """(copy rate, its binomial s.e., calibrated copy rate, intra-cluster diversity, clusters used) in one space
    (rows = vectors)."""
    d = torch.cdist(samples, shots)
    near, who = d.min(1)
    rate = float((near < thr).double().mean())
    se = math.sqrt(rate * (1 - rate) / len(samples))
    rate_nn = float((near < thr_nn).double().mean())
    divs = []
    for k in range(len(shots)):
        members = samples[who == k]
        if len(members) >= 2:
            dd = torch.cdist(members, members)
            iu = torch.triu_indices(len(members), len(members), 1)
            divs.append(float(dd[iu[0], iu[1]].mean()))
    return rate, se, rate_nn, (sum(divs) / len(divs) if divs else float("nan")), len(divs)


def evaluate(x: Tensor, shots: Tensor, ref: dict[str, Tensor], thr: dict[str, float]) -> dict[str, float]:
    x = x.clamp(-1, 1)
    out: dict[str, float] = {}
    for space, f in (("pix", lambda z: z.flatten(1).double()), ("feat", features_b)):
        r, se, r_nn, div, k = copy_and_diversity(f(x), f(shots), thr[space], thr[f"{space}_nn"])
        out.update(
            {
                f"copy_{space}": r,
                f"copy_{space}_se": se,
                f"copynn_{space}": r_nn,
                f"div_{space}": div,
                f"clusters_{space}": k,
            }
        )
    out["fd"] = fd_mnist(x, ref["images"])
    out["ink"] = float((x > 0).double().mean())
    counts = torch.bincount(predictions_b(x), minlength=10).double() / len(x)
    out["classes"] = int((counts >= 0.02).sum())
    return out


def table(rows: list[dict[str, object]]) -> str:
    """The markdown table of the doc."""
    head = (
        "| model | steps | copy pix | copy feat-B | copy@nn5 pix | copy@nn5 feat-B | intra-div pix | "
        "intra-div feat-B | FD-MNIST | ink | classes |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        f = {k: float(v) for k, v in r.items() if isinstance(v, int | float)}
        lines.append(
            f"| {r['model']} | {r['steps'] or '-'} | {f['copy_pix']:.3f} ± {f['copy_pix_se']:.3f} | "
            f"{f['copy_feat']:.3f} ± {f['copy_feat_se']:.3f} | {f['copynn_pix']:.3f} | "
            f"{f['copynn_feat']:.3f} | {f['div_pix']:.2f} | {f['div_feat']:.2f} | {f['fd']:.1f} | "
            f"{f['ink']:.3f} | {int(f['classes'])} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="100,300,600")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--nfe", type=int, default=20)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--work", default="runs/domainstudio_bench")
    ap.add_argument("--json", default="runs/domainstudio_bench.json")
    ap.add_argument("--t2i", action="store_true", help="the text-to-image variant on mnist_t2i")
    ap.add_argument("--table", default=None, help="only print the markdown table of this results JSON")
    ap.add_argument("--shot-seed", type=int, default=None, help="another shot set (method.shot_seed) for both arms")
    ap.add_argument(
        "--override",
        default=None,
        help='JSON method overrides: train and evaluate only "DomainStudio <overrides>" (an ablation)',
    )
    a = ap.parse_args()
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return 0
    torch.set_num_threads(1)
    steps = [int(s) for s in a.steps.split(",")]
    t0 = time.time()

    tag = "_t2i" if a.t2i else ""
    recipe = load_recipe(ROOT / f"recipes/methods/domainstudio_mnist{tag}.json")
    plain = load_recipe(ROOT / f"recipes/methods/domainstudio_mnist{'_t2i_dreambooth' if a.t2i else '_plain'}.json")
    if a.shot_seed is not None:  # note: train.seed does not change the trainer's per-step draws (see the doc)
        recipe, plain = (
            MethodRecipe.from_dict({**r.to_dict(), "method": {**r.to_dict()["method"], "shot_seed": a.shot_seed}})
            for r in (recipe, plain)
        )
    s = recipe.settings
    data = mnist_5k()
    idx = shot_indices(data.labels, len(data.images), s.shots, s.shot_seed, getattr(s, "label", None))
    shots = to_domain(data.images[idx], s.domain)
    keep = torch.ones(len(data.images), dtype=torch.bool)
    keep[idx] = False
    held = to_domain(data.images[keep], s.domain)
    held = held[torch.randperm(len(held), generator=torch.Generator().manual_seed(1))]
    ref = {"images": held[:2000]}
    calib = held[2000:3000]
    pix = lambda z: z.flatten(1).double()  # noqa: E731
    thr = {
        "pix": tau(pix(calib)),
        "feat": tau(features_b(calib)),  # the tau: pairwise 5th percentile
        # calibrated: 5th percentile of held-out real targets' nearest-shot distance (real = 5% by construction)
        "pix_nn": float(torch.quantile(torch.cdist(pix(calib), pix(shots)).min(1).values, 0.05)),
        "feat_nn": float(torch.quantile(torch.cdist(features_b(calib), features_b(shots)).min(1).values, 0.05)),
    }
    print(f"shots' classes {sorted(data.labels[idx].tolist())}; tau pix {thr['pix']:.3f} feat {thr['feat']:.3f}")
    rows: list[dict[str, object]] = []

    def record(name: str, step: int, seed: int, x: Tensor) -> None:
        m = evaluate(x, shots, ref, thr)
        rows.append({"model": name, "steps": step, "seed": seed, **m})
        print(json.dumps(rows[-1]), f"[{time.time() - t0:.0f}s]", flush=True)

    if not a.override:  # the references (an ablation run only adds its own rows)
        record("real held-out target", 0, 0, held[3000 : 3000 + a.n])
    if a.t2i:
        src = dpmlab.load("mnist_t2i")
        crop = lambda z: z[..., 2:30, 2:30]  # noqa: E731  (32x32 padded -> 28x28)
        for p in (s.instance_prompt, s.class_prompt) if not a.override else ():
            z = dpmlab.sample(src, a.n, solver="ddim", nfe=a.nfe, seed=1000, cond={"prompt": p})
            record(f"source, '{p}'", 0, 0, crop(src.decode(z)))
    elif not a.override:
        src = dpmlab.load("mnist")
        x = dpmlab.sample(src, a.n, solver="ddim", nfe=a.nfe, seed=1000, cond={"label": torch.full((a.n,), 10)})
        record("source (no tuning)", 0, 0, x)
    names = ("DreamBooth", "DomainStudio") if a.t2i else ("plain fine-tune", "DomainStudio")
    variants = list(zip(names, (plain, recipe), strict=True))
    if a.override:
        over = json.loads(a.override)
        d = recipe.to_dict()
        d["name"] += "_override"
        d["method"].update(over)
        variants = [(f"DomainStudio {', '.join(f'{k}={v}' for k, v in over.items())}", MethodRecipe.from_dict(d))]
    for seed in [int(v) for v in a.seeds.split(",")]:
        for name, rec in variants:
            out = Path(a.work) / f"{rec.name}_s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            for i, st in enumerate(steps):
                r = MethodRecipe.from_dict(
                    {**rec.to_dict(), "train": {**rec.to_dict()["train"], "steps": st, "seed": seed}}
                )
                train_recipe(r, out, resume=i > 0, progress=False)
                model = load(out)
                if a.t2i:
                    record(name, st, seed, crop(model.sample(a.n, solver="ddim", nfe=a.nfe, seed=1000)))
                    if i == len(steps) - 1:
                        record(
                            f"{name}, drift '{s.class_prompt}'",
                            st,
                            seed,
                            crop(model.sample(a.n, prompt=s.class_prompt, solver="ddim", nfe=a.nfe, seed=1000)),
                        )
                else:
                    record(name, st, seed, model.sample(a.n, solver="ddim", nfe=a.nfe, seed=1000))
    Path(a.json).write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {a.json} in {time.time() - t0:.0f}s")
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
