"""DPM-OT (arXiv 2307.11308): the OT map to noised training points at sigma_k plus a short solver tail, against
DDIM and Heun from sigma_max at about the same NFE (Karras grid to sigma = 0 for every sampler).

1. A separated 2-D mixture (``gmm2d``: 8 modes of std 0.08 on a ring of radius 1.5 + a centre mode of std 0.2) with
   its exact denoiser on the continuous linear VP schedule: no training. Targets: ``--m2d`` exact samples noised to
   sigma_k; OT from the uniform square. Metrics over ``--n2d`` samples: the mode-mixture ratio (farther than 3 std
   from every mode; ``dpmlab.metrics.mode_mixture_ratio``), modes holding >= 1% of the samples, sliced W2 to fresh
   exact samples, the median distance to the nearest of the M training points (for reference, fresh exact samples).
2. MNIST with the shipped ``mnist`` model (its null class: unconditional) and ``recipes/methods/dpm_ot_mnist.json``
   (``--m`` training images noised to sigma_k, OT from the uniform cube [0, 1]^784). Metrics over ``--n``
   samples: FD-MNIST against all 5,000 images (the shipped classifier's features), the mode-mixture ratio by the
   independent evaluator (max softmax < 0.5), and memorisation: the median distance to the nearest of the M
   target images, next to the same distance for the images not among the targets ("a new digit"), and the
   share of samples closer to a target image than 95% of those new digits are.
   The OT fit's |g - nu| is printed next to the Monte-Carlo noise of a perfect fit measured the same way.

Usage: ``nice -n 10 python benchmarks/dpm_ot.py [--sigmas2d 0.2,1.0] [--sigmas 0.5] [--m 500] [--steps 300]``;
fitted OT runs are kept in ``--out``. The defaults are sized for about 5 CPU-minutes (the recipe itself uses
M = 1,000 and 10,000-point batches).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import dpmlab
from dpmlab.methods import MethodRecipe, load, load_recipe, train_recipe
from dpmlab.methods.dpm_ot import DPMOTModel
from dpmlab.metrics import classifier_mode_mixture, fd_mnist, mode_mixture_ratio, nearest_train_distance
from dpmlab.metrics import sliced_wasserstein as sw
from dpmlab.metrics.features import load_mnist_classifier_b, mnist_5k
from dpmlab.models.analytic import preset
from dpmlab.training.data import Dataset

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
BASELINES = (("DDIM", "ddim", 10), ("Heun", "heun", 9))


def fitted(recipe: dict, run: Path, dataset: Dataset | None = None) -> DPMOTModel:
    if not (run / "model.safetensors").is_file():
        t = time.process_time()
        res = train_recipe(
            MethodRecipe.from_dict(recipe),
            run,
            dataset=dataset,
            progress=False,
            resume=(run / "checkpoint.safetensors").is_file(),
        )
        print(f"  fitted {run.name}: energy {res.final_loss:.4f}, {time.process_time() - t:.0f} CPU s")
    model = load(run)
    fit = json.loads((run / "model.json").read_text())["method"]["fit"]
    print(
        f"  {run.name}: |g - nu| = {fit['g_minus_nu_l2']:.4f} (MC noise {fit['mc_noise_l2']:.4f}), "
        f"max rel. error {fit['max_rel_error']:.2f}, empty cells {fit['empty_cells']}"
    )
    return model  # type: ignore[no-any-return]


def mixture_part(a: argparse.Namespace, out: Path) -> None:
    mix = preset("gmm2d")
    den = dpmlab.load("gmm2d")
    train = mix.sample(a.m2d, generator=torch.Generator().manual_seed(0)).float()
    fresh = mix.sample(5000, generator=torch.Generator().manual_seed(1)).float()
    ds = Dataset("gmm2d", train)

    def row(name: str, x: torch.Tensor, nfe: int | str) -> None:
        r = mode_mixture_ratio(x, mix.means, mix.stds)
        covered = int((r.counts >= 0.01 * len(x)).sum())
        nn = nearest_train_distance(x, train).distance
        print(
            f"| {name} | {nfe} | {r.ratio:.3f} | {covered}/9 | {sw(x.double(), fresh.double()):.4f} | "
            f"{float(nn.median()):.4f} |"
        )

    print(f"\n2-D mixture gmm2d, exact denoiser, {a.n2d} samples; M = {a.m2d} training points")
    print("| sampler | NFE | mode-mixture ratio | modes >= 1% | SW to data | median NN distance to training |")
    print("|---|---|---|---|---|---|")
    row("exact samples (reference)", mix.sample(a.n2d, generator=torch.Generator().manual_seed(2)).float(), "-")
    for name, solver, nfe in BASELINES:
        row(
            f"{name} from sigma_max",
            dpmlab.sample(den, a.n2d, solver=solver, nfe=nfe, grid="karras", to_zero=True, seed=1),
            nfe,
        )
    for sigma in (float(s) for s in a.sigmas2d.split(",")):
        rec = {
            "name": f"dpm_ot_gmm2d_s{sigma:g}",
            "method": {"name": "dpm_ot", "model": "gmm2d", "sigma": sigma},
            "description": f"targets: {a.m2d} exact gmm2d samples passed as the dataset (data section unused)",
            "data": {"name": "moons"},
            "train": {
                "steps": a.steps2d,
                "batch_size": 20 * a.m2d,
                "lr": 0.1,
                "warmup": 0,
                "lr_decay": "cosine",
                "grad_clip": 0.0,
                "ema_decay": 0.99,
                "checkpoint_every": 10_000,
                "log_every": 100,
            },
        }
        ot = fitted(rec, out / f"gmm2d_s{sigma:g}_{a.m2d}_{a.steps2d}", ds)
        for topk in (1, 3):
            row(f"DPM-OT sigma_k={sigma:g}, topk={topk}, Heun tail", ot.sample(a.n2d, nfe=9, seed=1, topk=topk), 9)


def mnist_part(a: argparse.Namespace, out: Path) -> None:
    data = mnist_5k().images
    model = dpmlab.load("mnist")
    clf = load_mnist_classifier_b()
    base = load_recipe(ROOT / "recipes" / "methods" / "dpm_ot_mnist.json").to_dict()
    base["train"].update(steps=a.steps, batch_size=a.batch)
    base["method"]["n_targets"] = a.m

    def row(name: str, x: torch.Tensor, nfe: int | str, targets: torch.Tensor, ref: torch.Tensor) -> None:
        x = x.float().clamp(-1, 1)
        with torch.no_grad():
            mmr = classifier_mode_mixture(torch.cat([clf(b) for b in x.split(250)]))
        nn = nearest_train_distance(x, targets).distance
        print(
            f"| {name} | {nfe} | {fd_mnist(x, data):.2f} | {mmr.ratio:.3f} | {float(nn.median()):.2f} | "
            f"{float((nn < ref).double().mean()):.2f} |"
        )

    for sigma in (float(s) for s in a.sigmas.split(",")):
        rec = {**base, "method": {**base["method"], "sigma": sigma}}
        ot = fitted(rec, out / f"mnist_s{sigma:g}_{a.m}_{a.batch}_{a.steps}")
        s = ot.settings
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(s.seed))[: s.n_targets].sort().values
        targets = data[pick]
        others = data[torch.ones(len(data), dtype=torch.bool).index_fill_(0, pick, False)]
        others = others[torch.randperm(len(others), generator=torch.Generator().manual_seed(1))]  # mnist_5k is sorted
        d_new = nearest_train_distance(others, targets).distance
        ref = float(d_new.quantile(0.05))
        print(
            f"\nMNIST, shipped mnist model (null class), {a.n} samples; sigma_k = {sigma:g}, M = {s.n_targets} targets"
        )
        print(
            "| sampler | NFE | FD-MNIST | mode-mixture ratio (evaluator B) | median NN distance to targets | "
            "share nearer than 95% of new digits |"
        )
        print("|---|---|---|---|---|---|")
        print(
            f"| real images not among the targets | - | {fd_mnist(others[: a.n], data):.2f} | "
            f"{classifier_mode_mixture(clf(others[: a.n]).detach()).ratio:.3f} | {float(d_new.median()):.2f} | "
            f"{float((d_new[: a.n] < ref).double().mean()):.2f} |"
        )
        for name, solver, nfe in BASELINES:
            x = dpmlab.sample(model, a.n, solver=solver, nfe=nfe, grid="karras", to_zero=True, seed=1)
            row(f"{name} from sigma_max", x, nfe, targets, ref)
        for topk in (1, 3):
            row(f"DPM-OT topk={topk}, Heun tail", ot.sample(a.n, nfe=9, seed=1, topk=topk), 9, targets, ref)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n2d", type=int, default=2000)
    p.add_argument("--m2d", type=int, default=500)
    p.add_argument("--sigmas2d", default="0.2,1.0")
    p.add_argument("--steps2d", type=int, default=600)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--m", type=int, default=500)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--sigmas", default="0.5")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--skip-mnist", action="store_true")
    p.add_argument("--out", default="runs/bench_dpm_ot")
    a = p.parse_args()
    out = Path(a.out)
    mixture_part(a, out)
    if not a.skip_mnist:
        mnist_part(a, out)


if __name__ == "__main__":
    main()
