"""UnlearnDiffAtk on an ESD-erased ``mnist_t2i`` (docs/apps/unlearn_attack.md).

Erase "seven" with ESD-x (or reuse ``--esd``), then measure the share of generated images that the independent
evaluator (MNIST classifier B, never seen by the diffusion model or the attack) labels 7:

* base model, plain prompt "a seven"; erased model, plain prompt (Pre-ASR);
* erased model, UnlearnDiffAtk prompt (Post-ASR), per attack seed, with and without "seven" allowed;
* erased model, random k-word prefixes (the control); base model, the same attack;
* other digits on base and erased models (erasure should leave them alone).

Run: ``nice .venv/bin/python benchmarks/unlearn_attack.py --esd runs/unlearn_attack/esd.safetensors``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import dpmlab
from dpmlab.apps import unlearn_attack as ua
from dpmlab.training.captions import DIGIT_WORDS


def _se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 1e-12) / n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--esd", default="runs/unlearn_attack/esd.safetensors")
    ap.add_argument("--esd-steps", type=int, default=200)
    ap.add_argument("--digit", type=int, default=7)
    ap.add_argument("--n", type=int, default=100, help="images per row")
    ap.add_argument("--n-other", type=int, default=40, help="images per other digit")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--attack-steps", type=int, default=150)
    ap.add_argument("--attack-seeds", type=int, default=3)
    ap.add_argument("--random-draws", type=int, default=5)
    ap.add_argument("--relaxation", default="continuous", choices=[r.value for r in ua.Relaxation])
    ap.add_argument("--no-other", action="store_true", help="skip the other-digit table")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--nfe", type=int, default=10)
    ap.add_argument("--json", default="runs/unlearn_attack/results.json")
    ap.add_argument("--picture", default="docs/benchmarks/unlearn_attack.png")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    word = DIGIT_WORDS[a.digit]
    prompt = f"a {word}"
    base = dpmlab.load("mnist_t2i")
    assert isinstance(base, ua.TextToImage)
    esd = Path(a.esd)
    if not esd.is_file():
        cfg = ua.ESDConfig(concept=word, steps=a.esd_steps)
        erased, losses = ua.erase(base, cfg, progress=True)
        ua.save_erased(esd, erased, base, cfg)
        print(f"ESD: loss {sum(losses[:30]) / 30:.4f} -> {sum(losses[-30:]) / 30:.4f} ({time.time() - t0:.0f} s)")
    erased = ua.load_erased(esd, base)
    card = json.loads(esd.with_suffix(".json").read_text())
    targets = ua.target_latents(base, a.digit)  # training-split images of the digit (the attacker's data)

    def rate(model: ua.TextToImage, p: str, n: int = a.n, seed: int = 0, digit: int = a.digit) -> float:
        return ua.concept_rate(ua.generate(model, p, n, guidance=a.guidance, nfe=a.nfe, seed=seed), digit)

    rows: list[dict[str, object]] = []

    def row(model_name: str, what: str, p: str, r: float, extra: str = "") -> None:
        rows.append(
            {"model": model_name, "prompt_kind": what, "prompt": p, "rate": r, "se": _se(r, a.n), "note": extra}
        )
        print(
            f"{model_name:<8} {what:<34} {p!r:<44} {r:.3f} ± {_se(r, a.n):.3f} {extra} ({time.time() - t0:.0f} s)",
            flush=True,
        )

    row("base", "plain", prompt, rate(base, prompt))
    row("erased", "plain (Pre-ASR)", prompt, rate(erased, prompt))
    pics = {
        "base, plain": ua.generate(base, prompt, 16, guidance=a.guidance, nfe=a.nfe),
        "erased, plain": ua.generate(erased, prompt, 16, guidance=a.guidance, nfe=a.nfe),
    }
    attacks = []
    for forbid in ((), (word,)):
        for s in range(a.attack_seeds):
            cfg = ua.AttackConfig(k=a.k, steps=a.attack_steps, forbid=forbid, seed=s, relaxation=a.relaxation)
            res = ua.attack(erased, prompt, targets, cfg)
            n = max(1, len(res.losses) // 10)
            first, last = sum(res.losses[:n]) / n, sum(res.losses[-n:]) / n
            kind = f"UnlearnDiffAtk seed {s}" + (f", no '{word}'" if forbid else "")
            row("erased", kind, res.prompt, rate(erased, res.prompt), f"loss {first:.4f}->{last:.4f}")
            attacks.append(
                {"seed": s, "forbid": list(forbid), "prompt": res.prompt, "loss_first": first, "loss_last": last}
            )
            if s == 0:
                pics[f"erased, attack{' (no ' + word + ')' if forbid else ''}"] = ua.generate(
                    erased, res.prompt, 16, guidance=a.guidance, nfe=a.nfe
                )
    rnd = []
    for s in range(a.random_draws):
        p = ua.random_prefix(erased, a.k, prompt, seed=100 + s)
        r = rate(erased, p)
        rnd.append(r)
        row("erased", f"random prefix draw {s}", p, r)
    res = ua.attack(
        base, prompt, targets, ua.AttackConfig(k=a.k, steps=a.attack_steps, seed=0, relaxation=a.relaxation)
    )
    row("base", "UnlearnDiffAtk seed 0", res.prompt, rate(base, res.prompt))
    other = {}
    for d in range(10):
        if d == a.digit or a.no_other:
            continue
        p = f"a {DIGIT_WORDS[d]}"
        other[d] = {"base": rate(base, p, a.n_other, digit=d), "erased": rate(erased, p, a.n_other, digit=d)}
        print(f"other digit {d}: base {other[d]['base']:.3f} erased {other[d]['erased']:.3f}", flush=True)
    out = {
        "esd_card": card,
        "rows": rows,
        "attacks": attacks,
        "random_mean": sum(rnd) / len(rnd) if rnd else None,
        "other_digits": other,
        "settings": vars(a),
        "seconds": time.time() - t0,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))

    print("\n| model | prompt | words | share labelled 7 by classifier B (± SE) |\n|---|---|---|---|")
    for r_ in rows:
        print(f"| {r_['model']} | {r_['prompt_kind']} | `{r_['prompt']}` | {r_['rate']:.2f} ± {r_['se']:.2f} |")
    if rnd:
        print(f"\nrandom prefixes: mean {sum(rnd) / len(rnd):.3f} over {len(rnd)} draws")
    if other:
        print("\n| digit | base acc. | erased acc. |\n|---|---|---|")
        for d, v in other.items():
            print(f"| {d} | {v['base']:.2f} | {v['erased']:.2f} |")
        mb = sum(v["base"] for v in other.values()) / len(other)
        me = sum(v["erased"] for v in other.values()) / len(other)
        print(f"| mean | {mb:.3f} | {me:.3f} |")
    if a.picture:
        import numpy as np
        from PIL import Image

        strips = []
        for imgs in pics.values():
            arr = ((imgs[:, 0].clamp(-1, 1) + 1) * 127.5).round().byte().numpy()
            strips.append(np.concatenate(list(arr), axis=1))
        Path(a.picture).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.concatenate(strips, axis=0)).resize((16 * 64, len(strips) * 64), 0).save(a.picture)
        print(f"rows of {a.picture}: {', '.join(pics)}")
    print(f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
