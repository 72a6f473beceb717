"""DDPM-CD experiment (dpmlab.apps.change_detection): change-class F1 / IoU on held-out pairs for the same head on
(a) features of the pre-trained diffusion UNet (runs/ddpm_cd_scenes, recipes/apps/ddpm_cd_scenes.json),
(b) the same UNet architecture with random weights, (c) raw pixels; plus single-timestep ablations.

    nohup nice .venv/bin/python benchmarks/change_detection.py --only pixels,random > runs/cd.log 2>&1 &
    nohup nice .venv/bin/python benchmarks/change_detection.py --only ddpm,ddpm_t50,ddpm_t100,ddpm_t400 ...
    .venv/bin/python benchmarks/change_detection.py --table          # the markdown tables from the results file

Every configuration trains one head per seed on the same training pairs (MNIST training digits) and is scored on
the same test pairs (held-out digits) with pixel confusion counts over the whole test set.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from dpmlab.apps import change_detection as cd

CONFIGS = {  # name: (features, timesteps)
    "ddpm": ("diffusion", (50, 100, 400)),
    "random": ("random", (50, 100, 400)),
    "pixels": ("pixels", ()),
    "ddpm_t50": ("diffusion", (50,)),
    "ddpm_t100": ("diffusion", (100,)),
    "ddpm_t400": ("diffusion", (400,)),
    "ddpm_t50_100": ("diffusion", (50, 100)),
    "ddpm_long": ("diffusion", (50, 100, 400)),  # run with --model runs/ddpm_cd_scenes_1200
}
LABELS = {
    "ddpm": "(a) pre-trained DDPM features, t = 50, 100, 400",
    "random": "(b) same UNet, random weights, t = 50, 100, 400",
    "pixels": "(c) raw pixels (same head, one scale)",
    "ddpm_t50": "pre-trained, t = 50 only",
    "ddpm_t100": "pre-trained, t = 100 only",
    "ddpm_t400": "pre-trained, t = 400 only",
    "ddpm_t50_100": "pre-trained, t = 50, 100",
    "ddpm_long": "(a') pre-trained 3x longer (1,200 steps), t = 50, 100, 400",
}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.is_file() else {}
    train = cd.make_pairs(args.train_pairs, split="train", seed=1)
    test = cd.make_pairs(args.test_pairs, split="test", seed=2)
    print(
        f"train pairs {len(train)} (changed pixels {train.mask.float().mean():.3%}), "
        f"test pairs {len(test)} (changed pixels {test.mask.float().mean():.3%})",
        flush=True,
    )
    for name in args.only.split(","):
        kind, ts = CONFIGS[name]
        spec = (
            {"kind": kind}
            if kind == "pixels"
            else {"kind": kind, "model": args.model, "timesteps": list(ts), "seed": 0, "init_seed": 0}
        )
        t0 = time.process_time()
        ext = cd.build_extractor(spec)
        fa, fb = cd.extract(ext, train.a), cd.extract(ext, train.b)
        ta, tb = cd.extract(ext, test.a), cd.extract(ext, test.b)
        t_feat = time.process_time() - t0
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            torch.manual_seed(seed)
            head = cd.ChangeHead(ext.channels, n_t=max(1, len(ts)))
            losses = cd.train_head(head, fa, fb, train.mask, epochs=args.epochs, batch_size=16, lr=args.lr, seed=seed)
            m = cd.change_metrics(cd.predict(head, ta, tb, (32, 32)), test.mask).to_dict()
            runs.append({**m, "seed": seed, "final_loss": losses[-1]})
            print(
                name,
                seed,
                {k: round(v, 4) for k, v in m.items() if isinstance(v, float)},
                f"loss {losses[-1]:.4f}",
                flush=True,
            )
        results[name] = {
            "features": spec,
            "runs": runs,
            "cpu_s": round(time.process_time() - t0, 1),
            "feature_cpu_s": round(t_feat, 1),
            "train_pairs": len(train),
            "test_pairs": len(test),
            "epochs": args.epochs,
            "lr": args.lr,
        }
        path.write_text(json.dumps(results, indent=2) + "\n")


def table(paths: list[Path], names: list[str]) -> str:
    res: dict = {}
    for path in paths:  # the runs of one configuration may be spread over several files (parallel seeds)
        for k, v in json.loads(path.read_text()).items():
            res.setdefault(k, {"runs": []})["runs"] += v["runs"]
    rows = [
        "| features | F1 | IoU | precision | recall | OA | final train CE | seeds |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        if name not in res:
            continue
        runs = res[name]["runs"]

        def ms(key: str, runs: list = runs) -> str:
            v = [r[key] for r in runs]
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            return f"{statistics.mean(v):.3f} ± {sd:.3f}"

        rows.append(
            f"| {LABELS[name]} | {ms('f1')} | {ms('iou')} | {ms('precision')} | {ms('recall')} | "
            f"{ms('accuracy')} | {ms('final_loss')} | {len(runs)} |"
        )
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="runs/ddpm_cd_scenes")
    p.add_argument("--only", default="ddpm,random,pixels,ddpm_t50,ddpm_t100,ddpm_t400")
    p.add_argument("--train-pairs", type=int, default=160)
    p.add_argument("--test-pairs", type=int, default=300)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--results", default="runs/change_detection_results.json")
    p.add_argument(
        "--table",
        nargs="*",
        metavar="RESULTS",
        help="print the markdown tables from these results files (default: --results) and exit",
    )
    a = p.parse_args()
    if a.table is not None:
        files = [Path(f) for f in a.table] or [Path(a.results)]
        print(table(files, ["ddpm", "ddpm_long", "random", "pixels"]))
        print()
        print(table(files, ["ddpm", "ddpm_t50_100", "ddpm_t50", "ddpm_t100", "ddpm_t400"]))
        return
    run(a)


if __name__ == "__main__":
    main()
