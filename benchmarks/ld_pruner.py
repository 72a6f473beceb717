"""LD-Pruner on the shipped class-conditional MNIST UNet (7 shape-preserving blocks): the latent-statistics
score of every block vs the FD increase its removal causes (Spearman), and k blocks pruned by the score vs k
random vs the k of smallest weight norm — FD before and after the same short fine-tune (recipe
``recipes/methods/ld_pruner_mnist.json`` with ``prune=[...]``, run through ``train_recipe`` = ``dpmlab train``),
parameters and wall time per NFE. ``--t2i`` adds the same on the text-to-image model's ``UNet2DConditionModel``
(``t2i``: recipe ``recipes/methods/ld_pruner_mnist_t2i.json``; quality = prompt accuracy by classifier B, FD in
B's features vs the 500 held-out images of ``mnist_5k_split``, CLIP score; ``--t2i-n`` samples of 20 prompts).

FD: Fréchet distance in the independent classifier B's 64-d features (``benchmarks/mmd_ddm.py``'s evaluator),
``--n`` class-balanced samples (DDIM, 10 NFE, seed 1) vs 1000 training images; FD-MNIST (the shipped
classifier) alongside.

    .venv/bin/python benchmarks/ld_pruner.py [--n 160] [--k 2] [--steps 60] [--t2i [--skip-mnist]
        [--t2i-n 160] [--t2i-k 2 4] [--draws 3]]
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

import dpmlab
from dpmlab.methods import load, load_recipe, train_recipe
from dpmlab.methods.ld_pruner import bypassed, lowest, operators, parameter_count, prune, score_operators
from dpmlab.metrics.distances import frechet_distance_from_features
from dpmlab.metrics.features import fd_mnist, mnist_5k
from dpmlab.models.t2i import TextToImage

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def seconds_per_nfe(
    models: dict[str, Any], cond: dict[str, Any], shape: tuple[int, ...], batch: int = 64, rounds: int = 15
) -> dict[str, tuple[float, float]]:
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
    choices = {
        "LD-Pruner score": lowest(scores, args.k),
        "random": sorted(random.Random(0).sample(ops, args.k)),
        "smallest weight norm": lowest(norms, args.k),
    }
    recipe = load_recipe(ROOT / "recipes" / "methods" / "ld_pruner_mnist.json")
    rows = []
    for how, names in choices.items():
        pruned = prune(copy.deepcopy(base.net), names).eval()
        before = quality(base.spec.denoiser(pruned))
        r = dataclasses.replace(
            recipe,
            settings=dataclasses.replace(recipe.settings, k=len(names), prune=tuple(names)),
            train=dataclasses.replace(recipe.train, steps=args.steps),
        )
        out = Path(args.out) / how.replace(" ", "_")
        shutil.rmtree(out, ignore_errors=True)
        t1 = time.perf_counter()
        res = train_recipe(r, out, progress=False)
        tuned = load(out).denoiser
        after = quality(tuned)
        rows.append(
            {
                "selection": how,
                "pruned": names,
                "params": parameter_count(tuned.net),
                "fd_b_before": before["fd_b"],
                "fd_b_after": after["fd_b"],
                "fd_mnist_before": before["fd_mnist"],
                "fd_mnist_after": after["fd_mnist"],
                "train_s": time.perf_counter() - t1,
                "final_loss": res.final_loss,
            }
        )
        print(rows[-1], flush=True)
    return {
        "scores": scores,
        "score_seconds": score_s,
        "full": full,
        "single": single,
        "norms": norms,
        "spearman_fd_b": [rho.statistic, rho.pvalue],
        "spearman_fd_mnist": [rho_a.statistic, rho_a.pvalue],
        "params_full": parameter_count(net),
        "rows": rows,
    }


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


def t2i(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """The text-to-image UNet (11 operators): LD-Pruner scores (the recipe's inputs: T2I_PROMPTS x 2 seeds), the
    real FD increase of removing each operator (Spearman), and k operators pruned by the score / at random (a few
    draws) / by smallest weight norm — prompt accuracy (clf B), FD (clf B features vs held-out MNIST), CLIP score
    before and after the same fine-tune (recipe ``ld_pruner_mnist_t2i.json``), parameters, ms per NFE."""
    from dpmlab.methods.ld_pruner import T2I_PROMPTS, scoring_inputs
    from dpmlab.metrics.clip import clip_score, load_clip
    from dpmlab.metrics.features import mnist_5k_split

    model = dpmlab.load("mnist_t2i")
    unet = model.unet
    ev, clip = EvaluatorB(), load_clip()
    data = mnist_5k()
    _, val = mnist_5k_split(data.labels)
    fr, _ = ev(data.images[val])  # 500 held-out images (never trained on)
    seeds = args.t2i_n // len(T2I_PROMPTS)
    prompts = list(T2I_PROMPTS) * seeds
    target = torch.tensor([d for _ in range(2) for d in range(10)] * seeds)
    part = out / "t2i_partial.json"

    def quality(m: Any) -> dict[str, float]:
        with torch.no_grad():  # DDIM 10 NFE, no guidance, seed 1 (scoring uses seed 0)
            img = m.decode(dpmlab.sample(m, len(prompts), solver="ddim", nfe=10, seed=1, cond={"prompt": prompts}))
        f, pred = ev(img[:, :, 2:30, 2:30])  # the VAE's 32x32 pads the 28x28 digits
        return {
            "acc": float((pred == target).float().mean()),
            "fd_b": frechet_distance_from_features(f, fr),
            "clip": float(clip_score(img, prompts, clip).mean()),
        }

    def with_unet(u: Any) -> Any:
        return TextToImage(u, model.vae, model.text_encoder, model.tokenizer, model.schedule, "v")

    res: dict[str, Any] = json.loads(part.read_text()) if part.is_file() else {}
    ops = operators(unet)
    if "scores" not in res:
        t0 = time.perf_counter()
        cond, n = scoring_inputs(model, 2)
        res["scores"] = score_operators(model, cond, n, nfe=10)
        res["score_seconds"] = time.perf_counter() - t0
        res["full"] = quality(model)
        res["single"] = {}
        for o in ops:
            with bypassed(unet, [o]):
                res["single"][o] = quality(model)
            print(o, res["scores"][o], res["single"][o], flush=True)
        part.write_text(json.dumps(res, indent=2))
    scores, full = res["scores"], res["full"]
    rho = stats.spearmanr([scores[o] for o in ops], [res["single"][o]["fd_b"] - full["fd_b"] for o in ops])
    rho_acc = stats.spearmanr([scores[o] for o in ops], [full["acc"] - res["single"][o]["acc"] for o in ops])
    res["spearman_fd_b"], res["spearman_acc_drop"] = [rho.statistic, rho.pvalue], [rho_acc.statistic, rho_acc.pvalue]
    norms = {o: float(torch.sqrt(sum(p.square().sum() for p in unet.get_submodule(o).parameters()))) for o in ops}
    res["norms"] = norms
    choices: dict[str, list[str]] = {"none (fine-tuned only)": []}
    for k in args.t2i_k:
        choices[f"k={k} LD-Pruner score"] = lowest(scores, k)
        for draw in range(args.draws):
            choices[f"k={k} random #{draw}"] = sorted(random.Random(draw).sample(ops, k))
        choices[f"k={k} smallest weight norm"] = lowest(norms, k)
    recipe = load_recipe(ROOT / "recipes" / "methods" / "ld_pruner_mnist_t2i.json")
    rows = res.setdefault("rows", {})
    for how, names in choices.items():
        if how in rows:
            continue
        before = quality(with_unet(prune(copy.deepcopy(unet), names).eval()))
        r = dataclasses.replace(recipe, settings=dataclasses.replace(recipe.settings, k=len(names), prune=tuple(names)))
        run_dir = out / "t2i" / how.replace(" ", "_").replace("#", "").replace("=", "")
        shutil.rmtree(run_dir, ignore_errors=True)
        t1 = time.perf_counter()
        fit = train_recipe(r, run_dir, progress=False)
        after = quality(load(run_dir).denoiser)
        rows[how] = {
            "pruned": names,
            "params": parameter_count(prune(copy.deepcopy(unet), names)),
            "before": before,
            "after": after,
            "train_s": time.perf_counter() - t1,
            "final_loss": fit.final_loss,
        }
        print(how, rows[how], flush=True)
        part.write_text(json.dumps(res, indent=2))
    states = model.encode_prompt(T2I_PROMPTS[0], 16)

    def net(u: Any) -> Any:  # the UNet itself, at training index 500 (t = 0.5)
        return lambda x, t: u(x, t * 1000, encoder_hidden_states=states).sample

    nets = {"full": net(unet)}
    nets |= {h: net(prune(copy.deepcopy(unet), r["pruned"])) for h, r in rows.items() if r["pruned"]}
    res["s_per_nfe"] = seconds_per_nfe(nets, {}, tuple(model.data_shape), batch=16, rounds=10)
    res["params_full"] = parameter_count(unet)
    return res


def report(res: dict[str, Any]) -> str:
    m = res["mnist"]
    lines = ["| block | LD-Pruner score | FD (clf B) without it | ΔFD (clf B) | ΔFD-MNIST |", "|---|---|---|---|---|"]
    for o, s in sorted(m["scores"].items(), key=lambda kv: kv[1]):
        d = m["single"][o]
        lines.append(
            f"| {o} | {s:.4f} | {d['fd_b']:.2f} | {d['fd_b'] - m['full']['fd_b']:+.2f} | "
            f"{d['fd_mnist'] - m['full']['fd_mnist']:+.1f} |"
        )
    lines += [
        "",
        f"full model: FD (clf B) {m['full']['fd_b']:.2f}, FD-MNIST {m['full']['fd_mnist']:.1f}; Spearman "
        f"(score, ΔFD clf B) = {m['spearman_fd_b'][0]:.2f} (p = {m['spearman_fd_b'][1]:.2f}); (score, ΔFD-MNIST) "
        f"= {m['spearman_fd_mnist'][0]:.2f} (p = {m['spearman_fd_mnist'][1]:.2f}); scoring took "
        f"{m['score_seconds']:.0f} s",
        "",
        "| selection | pruned | parameters | FD (clf B) before → after | FD-MNIST before → after | "
        "ms / NFE (batch 64, wall / CPU) |",
        "|---|---|---|---|---|---|",
    ]
    sp = res.get("speed", {})

    def ms(k: str) -> str:
        return f"{1e3 * sp[k][0]:.0f} / {1e3 * sp[k][1]:.0f}" if k in sp else "—"

    lines.append(
        f"| none (full model) | — | {m['params_full']} | {m['full']['fd_b']:.2f} | "
        f"{m['full']['fd_mnist']:.1f} | {ms('full')} |"
    )
    for r in m["rows"]:
        lines.append(
            f"| {r['selection']} | {', '.join(r['pruned'])} | {r['params']} | {r['fd_b_before']:.2f} → "
            f"{r['fd_b_after']:.2f} | {r['fd_mnist_before']:.1f} → {r['fd_mnist_after']:.1f} | "
            f"{ms(r['selection'])} |"
        )
    if "t2i" in res:
        lines += ["", t2i_report(res["t2i"])]
    return "\n".join(lines)


def t2i_report(t: dict[str, Any]) -> str:
    f = t["full"]
    lines = [
        "| operator | LD-Pruner score | ΔFD (clf B) without it | prompt accuracy without it | CLIP without it |",
        "|---|---|---|---|---|",
    ]
    for o, s in sorted(t["scores"].items(), key=lambda kv: kv[1]):
        d = t["single"][o]
        lines.append(f"| {o} | {s:.4f} | {d['fd_b'] - f['fd_b']:+.2f} | {d['acc']:.3f} | {d['clip']:.2f} |")
    lines += [
        "",
        f"full UNet: FD (clf B) {f['fd_b']:.2f}, prompt accuracy {f['acc']:.3f}, CLIP {f['clip']:.2f}; "
        f"Spearman (score, ΔFD clf B) = {t['spearman_fd_b'][0]:.2f} (p = {t['spearman_fd_b'][1]:.2f}); "
        f"(score, accuracy drop) = {t['spearman_acc_drop'][0]:.2f} (p = {t['spearman_acc_drop'][1]:.2f}); "
        f"scoring took {t['score_seconds']:.0f} s",
        "",
        "| selection | pruned | parameters | prompt acc. before → after | FD (clf B) before → after | "
        "CLIP before → after | ms / NFE (batch 16, wall / CPU) |",
        "|---|---|---|---|---|---|---|",
    ]
    sp = t.get("s_per_nfe", {})

    def ms(k: str) -> str:
        return f"{1e3 * sp[k][0]:.0f} / {1e3 * sp[k][1]:.1f}" if k in sp else "—"

    lines.append(
        f"| full UNet | — | {t['params_full']} | {f['acc']:.3f} | {f['fd_b']:.2f} | {f['clip']:.2f} | {ms('full')} |"
    )
    for how, r in t["rows"].items():
        b, a = r["before"], r["after"]
        lines.append(
            f"| {how} | {', '.join(r['pruned']) or '—'} | {r['params']} | {b['acc']:.3f} → {a['acc']:.3f} | "
            f"{b['fd_b']:.2f} → {a['fd_b']:.2f} | {b['clip']:.2f} → {a['clip']:.2f} | "
            f"{ms(how) if r['pruned'] else ms('full')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=160, help="samples per FD evaluation")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--t2i", action="store_true")
    ap.add_argument("--t2i-n", type=int, default=160, help="text-to-image samples per evaluation (20 prompts x n/20)")
    ap.add_argument("--t2i-k", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--draws", type=int, default=3, help="random selections per k")
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
    if "mnist" in res and (not args.skip_mnist or "speed" not in res):
        res["speed"] = speed(res, out)
    if args.t2i:
        res["t2i"] = t2i(args, out)
    (out / "bench.json").write_text(json.dumps(res, indent=2))
    print(report(res))


if __name__ == "__main__":
    main()
