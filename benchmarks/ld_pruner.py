"""LD-Pruner on the shipped class-conditional MNIST UNet (7 shape-preserving blocks): the latent-statistics
score of every block vs the FD increase its removal causes (Spearman), and k blocks pruned by the score vs k
random vs the k of smallest weight norm — FD before and after the same short fine-tune (recipe
``recipes/methods/ld_pruner_mnist.json`` with ``prune=[...]``, run through ``train_recipe`` = ``dpmlab train``),
parameters and wall time per NFE. ``--t2i`` adds the score, parameters and speed on the text-to-image model's
``UNet2DConditionModel`` (prompts x seeds).

FD: Fréchet distance in the independent classifier B's 64-d features (``benchmarks/mmd_ddm.py``'s evaluator),
``--n`` class-balanced samples (DDIM, 10 NFE, seed 1) vs 1000 training images; FD-MNIST (the shipped
classifier) alongside.

    .venv/bin/python benchmarks/ld_pruner.py [--n 160] [--k 2] [--steps 60] [--t2i]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from mmd_ddm import EvaluatorB  # the independent evaluator of the sibling benchmark
from scipy import stats
from torch import Tensor

import dpmlab
from dpmlab.methods import load, load_recipe, train_recipe
from dpmlab.methods.ld_pruner import bypassed, latent_score, lowest, operators, parameter_count, prune, score_operators
from dpmlab.metrics.distances import frechet_distance_from_features
from dpmlab.metrics.features import fd_mnist, mnist_5k

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def seconds_per_nfe(models: dict[str, Any], cond: dict[str, Any], shape: tuple[int, ...], batch: int = 64,
                    rounds: int = 15) -> dict[str, tuple[float, float]]:
    """``{name: (wall, cpu)}`` seconds of one network evaluation on a batch of ``batch``: the minimum over
    ``rounds`` rounds that run every model once in turn (interleaved, so a burst of load on the shared machine
    hits all of them), wall-clock and this process's CPU time."""
    x, t = torch.randn(batch, *shape), torch.full((batch,), 0.5, dtype=torch.float64)
    best = {k: (float("inf"), float("inf")) for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x, t, **cond)
        for _ in range(rounds):
            for k, m in models.items():
                w0, c0 = time.perf_counter(), time.process_time()
                m(x, t, **cond)
                w, c = time.perf_counter() - w0, time.process_time() - c0
                best[k] = (min(best[k][0], w), min(best[k][1], c))
    return best


def mnist(args: argparse.Namespace) -> dict[str, Any]:
    base = dpmlab.load("mnist")
    net = base.net
    ev = EvaluatorB()
    data = mnist_5k()
    real = data.images[torch.randperm(5000, generator=torch.Generator().manual_seed(0))[:1000]]
    fr, _ = ev(real)
    labels = torch.arange(args.n) % 10

    def quality(model: Any) -> dict[str, float]:
        with torch.no_grad():
            x = dpmlab.sample(model, args.n, solver="ddim", nfe=10, seed=1, cond={"label": labels}).clamp(-1, 1)
        return {"fd_b": frechet_distance_from_features(ev(x)[0], fr), "fd_mnist": fd_mnist(x, real)}

    ops = operators(net)
    t0 = time.perf_counter()
    scores = score_operators(base, {"label": torch.arange(80) % 10}, 80, nfe=10)  # 10 labels x 8 seeds
    score_s = time.perf_counter() - t0
    full = quality(base)
    single = {}
    for name in ops:
        with bypassed(net, [name]):
            single[name] = quality(base)
        print(name, scores[name], single[name], flush=True)
    rho = stats.spearmanr([scores[o] for o in ops], [single[o]["fd_b"] - full["fd_b"] for o in ops])
    rho_a = stats.spearmanr([scores[o] for o in ops], [single[o]["fd_mnist"] - full["fd_mnist"] for o in ops])

    norms = {o: float(torch.sqrt(sum(p.square().sum() for p in _block(net, o).parameters()))) for o in ops}
    choices = {"LD-Pruner score": lowest(scores, args.k), "random": sorted(random.Random(0).sample(ops, args.k)),
               "smallest weight norm": lowest(norms, args.k)}
    recipe = load_recipe(ROOT / "recipes" / "methods" / "ld_pruner_mnist.json")
    rows = []
    for how, names in choices.items():
        pruned = prune(copy.deepcopy(base.net), names).eval()
        before = quality(base.spec.denoiser(pruned))
        r = dataclasses.replace(recipe, settings=dataclasses.replace(recipe.settings, k=len(names), prune=tuple(names)),
                                train=dataclasses.replace(recipe.train, steps=args.steps))
        out = Path(args.out) / how.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        t1 = time.perf_counter()
        res = train_recipe(r, out, progress=False)
        tuned = load(out).denoiser
        after = quality(tuned)
        rows.append({"selection": how, "pruned": names, "params": parameter_count(tuned.net),
                     "fd_b_before": before["fd_b"], "fd_b_after": after["fd_b"], "fd_mnist_before": before["fd_mnist"],
                     "fd_mnist_after": after["fd_mnist"], "train_s": time.perf_counter() - t1,
                     "final_loss": res.final_loss})
        print(rows[-1], flush=True)
    return {"scores": scores, "score_seconds": score_s, "full": full, "single": single, "norms": norms,
            "spearman_fd_b": [rho.statistic, rho.pvalue], "spearman_fd_mnist": [rho_a.statistic, rho_a.pvalue],
            "params_full": parameter_count(net), "rows": rows}


def speed(res: dict[str, Any], out: Path) -> dict[str, tuple[float, float]]:
    """Wall / CPU seconds per NFE of the full model and of the fine-tuned pruned runs, interleaved."""
    models = {"full": dpmlab.load("mnist")}
    for r in res["mnist"]["rows"]:
        models[r["selection"]] = load(out / r["selection"].replace(" ", "_")).denoiser
    return seconds_per_nfe(models, {"label": torch.arange(64) % 10}, (1, 28, 28))


def _block(net: Any, name: str) -> Any:
    if name.startswith("mid."):
        return net.mid[int(name.split(".")[1])]
    names, blocks = (net.down_names, net.down) if name.startswith("down.") else (net.up_names, net.up)
    return blocks[names.index(name)]


def t2i(args: argparse.Namespace) -> dict[str, Any]:
    """Scores of the text-to-image UNet's operators over prompts x seeds, the evaluator's prompt accuracy of the
    decoded samples without each operator (Spearman with the score), parameters and speed after pruning k."""
    model = dpmlab.load("mnist_t2i")
    unet = model.unet
    ev = EvaluatorB()
    digits = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    prompts = [f"a {w} {digits[d]}" for w in ("bold", "thin") for d in range(10)]
    target = torch.tensor([d for _ in range(2) for d in range(10)] * 2)
    cond = {"prompt": prompts * 2}  # 20 prompts x 2 seeds
    n = len(target)

    def run() -> tuple[Tensor, float]:
        with torch.no_grad():
            z = dpmlab.sample(model, n, solver="ddim", nfe=10, cond=cond)
            img = model.decode(z)
        img = img[:, :, 2:30, 2:30] if img.shape[-1] == 32 else img  # the VAE's 32x32 pads the 28x28 digits
        return z, float((ev(img.clamp(-1, 1))[1] == target).float().mean())

    t0 = time.perf_counter()
    ref, acc_full = run()
    scores, acc = {}, {}
    for o in operators(unet):
        with bypassed(unet, [o]):
            z, acc[o] = run()
        scores[o] = latent_score(ref, z)
        print(o, scores[o], acc[o], flush=True)
    score_s = time.perf_counter() - t0
    ops = list(scores)
    rho = stats.spearmanr([scores[o] for o in ops], [acc_full - acc[o] for o in ops])
    names = lowest(scores, args.k)
    pruned = prune(copy.deepcopy(unet), names)
    with bypassed(unet, names):
        _, acc_pruned = run()
    states = model.encode_prompt(prompts[0], 16)

    def net(u: Any) -> Any:  # the UNet itself, at training index 500 (t = 0.5)
        return lambda x, t: u(x, t * 1000, encoder_hidden_states=states).sample

    spn = seconds_per_nfe({"full": net(unet), "pruned": net(pruned)}, {}, tuple(model.data_shape), batch=16)
    return {"scores": scores, "accuracy": acc, "accuracy_full": acc_full, "accuracy_pruned": acc_pruned,
            "spearman_acc_drop": [rho.statistic, rho.pvalue], "score_seconds": score_s, "pruned": names,
            "params_full": parameter_count(unet), "params_pruned": parameter_count(pruned), "s_per_nfe": spn}


def report(res: dict[str, Any]) -> str:
    m = res["mnist"]
    lines = ["| block | LD-Pruner score | FD (clf B) without it | ΔFD (clf B) | ΔFD-MNIST |", "|---|---|---|---|---|"]
    for o, s in sorted(m["scores"].items(), key=lambda kv: kv[1]):
        d = m["single"][o]
        lines.append(f"| {o} | {s:.4f} | {d['fd_b']:.2f} | {d['fd_b'] - m['full']['fd_b']:+.2f} | "
                     f"{d['fd_mnist'] - m['full']['fd_mnist']:+.1f} |")
    lines += ["", f"full model: FD (clf B) {m['full']['fd_b']:.2f}, FD-MNIST {m['full']['fd_mnist']:.1f}; Spearman "
              f"(score, ΔFD clf B) = {m['spearman_fd_b'][0]:.2f} (p = {m['spearman_fd_b'][1]:.2f}); (score, ΔFD-MNIST) "
              f"= {m['spearman_fd_mnist'][0]:.2f} (p = {m['spearman_fd_mnist'][1]:.2f}); scoring took "
              f"{m['score_seconds']:.0f} s", "",
              "| selection | pruned | parameters | FD (clf B) before → after | FD-MNIST before → after | "
              "ms / NFE (batch 64, wall / CPU) |", "|---|---|---|---|---|---|"]
    sp = res.get("speed", {})

    def ms(k: str) -> str:
        return f"{1e3 * sp[k][0]:.0f} / {1e3 * sp[k][1]:.0f}" if k in sp else "—"

    lines.append(f"| none (full model) | — | {m['params_full']} | {m['full']['fd_b']:.2f} | "
                 f"{m['full']['fd_mnist']:.1f} | {ms('full')} |")
    for r in m["rows"]:
        lines.append(f"| {r['selection']} | {', '.join(r['pruned'])} | {r['params']} | {r['fd_b_before']:.2f} → "
                     f"{r['fd_b_after']:.2f} | {r['fd_mnist_before']:.1f} → {r['fd_mnist_after']:.1f} | "
                     f"{ms(r['selection'])} |")
    if "t2i" in res:
        t = res["t2i"]
        lines += ["", "| text-to-image operator | LD-Pruner score | prompt accuracy (clf B) without it |",
                  "|---|---|---|"]
        lines += [f"| {o} | {s:.4f} | {t['accuracy'][o]:.3f} |"
                  for o, s in sorted(t["scores"].items(), key=lambda kv: kv[1])]
        sp = t["s_per_nfe"]
        lines += ["", f"full UNet: prompt accuracy {t['accuracy_full']:.3f}; Spearman (score, accuracy drop) = "
                  f"{t['spearman_acc_drop'][0]:.2f} (p = {t['spearman_acc_drop'][1]:.2f}); pruned {t['pruned']}: "
                  f"accuracy {t['accuracy_pruned']:.3f}, parameters {t['params_full']} → {t['params_pruned']}, "
                  f"ms / NFE (batch 16, wall / CPU) {1e3 * sp['full'][0]:.1f} / {1e3 * sp['full'][1]:.1f} → "
                  f"{1e3 * sp['pruned'][0]:.1f} / {1e3 * sp['pruned'][1]:.1f}; scoring took {t['score_seconds']:.0f} s"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=160, help="samples per FD evaluation")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--t2i", action="store_true")
    ap.add_argument("--skip-mnist", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench_ld_pruner"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {}
    if (out / "bench.json").is_file():
        res = json.loads((out / "bench.json").read_text())
    if not args.skip_mnist:
        res["mnist"] = mnist(args)
    if "mnist" in res:
        res["speed"] = speed(res, out)
    if args.t2i:
        res["t2i"] = t2i(args)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    print(report(res))


if __name__ == "__main__":
    main()
