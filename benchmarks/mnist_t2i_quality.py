"""Quality of the shipped text-to-image model ``mnist_t2i``: does it follow prompts?

For guidance scales 1, 3, 5, 7.5 and NFE 10 / 20 (DPM-Solver++ 2M, dpmlab's default grid), on 50
prompts (each digit alone, with "thin", "bold", "left slanted", "right slanted"), ``--per-prompt``
samples each:

* digit accuracy under the shipped MNIST classifier (another network, trained on pixels, never seen by
  the diffusion model);
* attribute accuracy under the pixel measurements of ``dpmlab.training.captions`` (thickness against
  the prompted digit's ink tertiles, slant from image moments), beside the rate of the same attribute
  in samples of the digit-only prompt (what the prompt word adds);
* CLIP score (the shipped CLIP; its text tower is the model's text encoder, so not independent);
* FD-MNIST of the samples against the 500 held-out images (and, for scale, of as many training
  images against the same held-out set).

Then negative prompts: "a seven" with negative "bold" / "thin" / "slanted" at scale 5, and a picture
grid (rows = prompts, columns = seeds). Run: ``python benchmarks/mnist_t2i_quality.py [--model PATH]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import dpmlab
from dpmlab.metrics.clip import clip_score, load_clip
from dpmlab.metrics.features import MNISTFeatures, fd_mnist, load_mnist_classifier
from dpmlab.training.captions import DIGIT_WORDS, captioned_mnist, parse_caption, slant_class, thickness_class

FORMS = ("a {}", "a thin {}", "a bold {}", "a left slanted {}", "a right slanted {}")


def generate(model, prompts: list[str], scale: float, nfe: int, seed: int, negative: str = "") -> torch.Tensor:
    den = model.guided(scale, negative_prompt=negative) if scale != 1.0 else model
    z = dpmlab.sample(
        den, len(prompts), solver="dpm_solver_pp", nfe=nfe, seed=seed, cond={"prompt": prompts}, batch_size=250
    )
    return model.decode(z)


def attribute_hits(images: torch.Tensor, prompts: list[str]) -> dict[str, tuple[int, int]]:
    """Per attribute kind: (samples satisfying what the prompt asked, samples whose prompt asked it)."""
    specs = [parse_caption(p) for p in prompts]
    digits = torch.tensor([s.digit for s in specs])
    thick, sl = thickness_class(images, digits), slant_class(images)
    out = {"thickness": [0, 0], "slant": [0, 0]}
    for s, k, a in zip(specs, thick.tolist(), sl.tolist(), strict=True):
        if s.thickness is not None:
            out["thickness"][0] += int(s.thickness == k)
            out["thickness"][1] += 1
        if s.slant is not None:
            out["slant"][0] += int(s.matches(s.digit, k, a))
            out["slant"][1] += 1
    return {k: (v[0], v[1]) for k, v in out.items()}


def base_rates(images: torch.Tensor, digits: torch.Tensor) -> dict[str, float]:
    """How often digit-only samples happen to be thin / bold / left / right."""
    k, a = thickness_class(images, digits), slant_class(images)
    return {
        "thin": float((k == 0).float().mean()),
        "bold": float((k == 2).float().mean()),
        "left": float((a == 0).float().mean()),
        "right": float((a == 2).float().mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="mnist_t2i")
    p.add_argument("--per-prompt", type=int, default=8)
    p.add_argument("--scales", default="1,3,5,7.5")
    p.add_argument("--nfes", default="10,20")
    p.add_argument("--grid-out", default="docs/benchmarks/mnist_t2i_grid.png")
    a = p.parse_args()
    torch.set_num_threads(1)
    model = dpmlab.load(a.model)
    clf = load_mnist_classifier()
    feats = MNISTFeatures(clf)
    clip = load_clip(None if a.model == "mnist_t2i" else a.model)
    data = captioned_mnist()
    held = data.images[data.val_idx][..., 2:30, 2:30]
    prompts = [f.format(w) for w in DIGIT_WORDS for f in FORMS for _ in range(a.per_prompt)]
    digits = torch.tensor([parse_caption(q).digit for q in prompts])
    plain = torch.tensor([q.count(" ") == 1 for q in prompts])
    n = len(prompts)
    train_ref = data.images[
        data.train_idx[torch.randperm(len(data.train_idx), generator=torch.Generator().manual_seed(0))[:n]]
    ]
    print(
        f"{n} samples per setting ({a.per_prompt} per prompt); FD-MNIST of {n} training images vs the 500 "
        f"held-out: {fd_mnist(train_ref[..., 2:30, 2:30], held, classifier=clf):.1f}"
    )
    print("\n| guidance | NFE | digit acc. | thickness acc. | slant acc. | CLIP score | FD-MNIST vs held-out | s |")
    print("|---|---|---|---|---|---|---|---|")
    rates = {}
    for nfe in (int(v) for v in a.nfes.split(",")):
        for scale in (float(v) for v in a.scales.split(",")):
            t0 = time.perf_counter()
            x = generate(model, prompts, scale, nfe, seed=0)
            dt = time.perf_counter() - t0
            crop = x[..., 2:30, 2:30]
            acc = float((feats.logits(crop).argmax(1) == digits).float().mean())
            hits = attribute_hits(x, prompts)
            cs = float(clip_score(x, prompts, clip).mean())
            fd = fd_mnist(crop, held, classifier=clf)
            th, sl = hits["thickness"], hits["slant"]
            print(
                f"| {scale:g} | {nfe} | {acc:.3f} | {th[0] / th[1]:.3f} | {sl[0] / sl[1]:.3f} | {cs:.1f} | "
                f"{fd:.1f} | {dt:.0f} |"
            )
            rates[(scale, nfe)] = base_rates(x[plain], digits[plain])
    print(
        "\nBase rates in samples of the digit-only prompts (what 'thin'/'bold'/'left'/'right' would score by "
        "chance):\n\n| guidance | NFE | thin | bold | left | right |\n|---|---|---|---|---|---|"
    )
    for (scale, nfe), r in rates.items():
        print(f"| {scale:g} | {nfe} | {r['thin']:.2f} | {r['bold']:.2f} | {r['left']:.2f} | {r['right']:.2f} |")

    print('\nNegative prompts ("a seven", guidance 5, NFE 20, 100 samples each):\n')
    print("| negative prompt | digit acc. | thin | bold | left | right |\n|---|---|---|---|---|---|")
    sevens = ["a seven"] * 100
    for neg in ("", "bold", "thin", "slanted", "upright"):
        x = generate(model, sevens, 5.0, 20, seed=1, negative=neg)
        r = base_rates(x, torch.full((100,), 7))
        acc = float((feats.logits(x[..., 2:30, 2:30]).argmax(1) == 7).float().mean())
        print(
            f"| {neg or '(empty)'} | {acc:.2f} | {r['thin']:.2f} | {r['bold']:.2f} | {r['left']:.2f} | "
            f"{r['right']:.2f} |"
        )

    if a.grid_out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [
            "a zero",
            "a bold one",
            "a thin two",
            "a left slanted three",
            "a right slanted four",
            "a bold five",
            "a thin six",
            "a bold upright seven",
            "a thin right slanted eight",
            "a left slanted nine",
        ]
        cols = 8
        x = generate(model, [r for r in rows for _ in range(cols)], 5.0, 20, seed=2)
        fig, axes = plt.subplots(len(rows), cols, figsize=(cols * 0.9 + 2.4, len(rows) * 0.9))
        for i, ax in enumerate(axes.flat):
            ax.imshow(x[i, 0].numpy(), cmap="gray", vmin=-1, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i % cols == 0:
                ax.set_ylabel(rows[i // cols], rotation=0, ha="right", va="center", fontsize=8)
        fig.suptitle("mnist_t2i: DPM-Solver++ NFE 20, guidance 5 (rows = prompts, columns = seeds)", fontsize=9)
        Path(a.grid_out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.grid_out, dpi=110, bbox_inches="tight")
        print(f"\nwrote {a.grid_out}")


if __name__ == "__main__":
    main()
