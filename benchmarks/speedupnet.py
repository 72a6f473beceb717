"""SpeedUpNet on mnist_t2i: does the 4-step student without CFG reach its 40-evaluation CFG teacher, and does the
same adapter still help on a fine-tuned copy of the UNet (plug-and-play)?

Prompts "a <digit>" x negative prompts {bold, thin, left slanted, right slanted} x ``--seeds`` seeds; every row
draws sample ``i`` from the same starting noise (dpmlab's per-index seeding). Rows: the base at 4 steps without CFG
(DDIM and DPM-Solver++, 4 UNet evaluations), the base at 4 steps with CFG (w = 5, 8 evaluations), the student
(base + adapter, DDIM, 4 evaluations, the negative prompt through the adapter) and the teacher (DPM-Solver++(2M),
20 steps, CFG: 40 evaluations). Metrics, none of them the training loss: RMS distance to the teacher's latents
and decoded pixels from the same noise; FD-MNIST against the 500 held-out images; the prompted digit's accuracy
under the independent classifier B; negative-prompt compliance = share of samples that HAVE the negative
attribute (pixel measurements of dpmlab.training.captions; lower is better); CLIP score of the positive prompt.
Then the same on a copy of the UNet fine-tuned on bold training digits (``--ft-steps``), with the unchanged
adapter plugged in. Run: ``python benchmarks/speedupnet.py --run runs/speedupnet [--seeds 3 --ft-steps 150]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

import dpmlab
from dpmlab.methods import load as load_method
from dpmlab.methods.speedupnet import SpeedUpNetAdapter, SpeedUpNetDenoiser, install, uninstall
from dpmlab.metrics.clip import clip_score, load_clip
from dpmlab.metrics.features import evaluator_predictions, fd_mnist
from dpmlab.models.guidance import classifier_free, with_cond
from dpmlab.models.t2i import TextToImage
from dpmlab.training.captions import DIGIT_WORDS, captioned_mnist, slant_class, thickness_class

NEGATIVE = {
    "bold": ("thickness", 2),
    "thin": ("thickness", 0),
    "left slanted": ("slant", 0),
    "right slanted": ("slant", 2),
}  # negative prompt -> (measured attribute, class it names)


def crop(images: torch.Tensor) -> torch.Tensor:
    return images[..., 2:30, 2:30]


def evaluate(model: TextToImage, z: torch.Tensor, ref: dict, pr: dict, clip) -> dict:
    images = model.decode(z)
    digits, negs = pr["digits"], pr["negatives"]
    thick, sl = thickness_class(images, digits), slant_class(images)
    has = torch.tensor(
        [bool((thick[i] if NEGATIVE[n][0] == "thickness" else sl[i]) == NEGATIVE[n][1]) for i, n in enumerate(negs)]
    ).double()
    acc = (evaluator_predictions(crop(images)) == digits).double()
    out = {
        "fd_mnist": fd_mnist(crop(images), ref["heldout"]),
        "acc_b": float(acc.mean()),
        "acc_b_se": float(acc.std() / len(acc) ** 0.5),
        "neg_share": float(has.mean()),
        "neg_share_se": float(has.std() / len(has) ** 0.5),
        "clip": float(clip_score(images, pr["prompts"], clip).mean()),
        "neg_share_by": {k: float(has[[n == k for n in negs]].mean()) for k in NEGATIVE},
    }
    if "teacher_z" in ref:
        out["rmse_latent"] = float((z - ref["teacher_z"]).square().mean().sqrt())
        out["rmse_pixel"] = float((images - ref["teacher_x"]).square().mean().sqrt())
    return out


def rows(
    model: TextToImage, adapter: SpeedUpNetAdapter, gain: float, pr: dict, w: float, heldout: torch.Tensor, clip, log
) -> dict:
    n, prompts, negs = len(pr["prompts"]), pr["prompts"], pr["negatives"]
    cfg = classifier_free(model, with_cond(model, prompt=negs), w)
    plans = [
        ("teacher: DPM-Solver++ 20 steps, CFG", cfg, "dpm_solver_pp", 20, 40, {"prompt": prompts}),
        ("base: DDIM 4 steps, no CFG", model, "ddim", 4, 4, {"prompt": prompts}),
        ("base: DPM-Solver++ 4 steps, no CFG", model, "dpm_solver_pp", 4, 4, {"prompt": prompts}),
        ("base: DPM-Solver++ 4 steps, CFG", cfg, "dpm_solver_pp", 4, 8, {"prompt": prompts}),
        (
            f"untrained adapter (W' = W, gamma = {gain:g}): DDIM 4 steps",
            SpeedUpNetDenoiser(model),
            "ddim",
            4,
            4,
            {"prompt": prompts, "negative_prompt": negs},
        ),
        (
            "SpeedUpNet student: DDIM 4 steps, no CFG",
            SpeedUpNetDenoiser(model),
            "ddim",
            4,
            4,
            {"prompt": prompts, "negative_prompt": negs},
        ),
    ]
    ref: dict = {"heldout": heldout}
    out = {}
    for name, den, solver, steps, evals, cond in plans:
        t0 = time.time()
        if name.startswith("untrained"):  # attention-space CFG, the training's starting point
            install(model.unet, SpeedUpNetAdapter.for_unet(model.unet, adapter.context_length, gain))
        else:
            install(model.unet, adapter)
        with torch.no_grad():
            z = dpmlab.sample(den, n, solver=solver, nfe=steps, seed=0, cond=cond, batch_size=n)
        m = {"unet_evals": evals, "seconds": round(time.time() - t0, 1), **evaluate(model, z, ref, pr, clip)}
        if name.startswith("teacher"):
            ref["teacher_z"], ref["teacher_x"] = z, model.decode(z)
        out[name] = m
        log(f"  {name}: {m}")
    return out


def finetune(model: TextToImage, steps: int, log) -> TextToImage:
    """A copy of the UNet fine-tuned for ``steps`` AdamW steps (batch 32, lr 3e-4, v-loss, 10% empty captions)
    on the bold training digits with their full captions; VAE and text encoder shared."""
    unet = copy.deepcopy(model.unet)
    uninstall(unet)
    unet.train().requires_grad_(True)
    data = captioned_mnist()
    idx = data.train_idx[data.attrs[data.train_idx, 1] == 2]
    caps = [data.full_captions()[i] for i in idx.tolist()]
    x0 = model.encode(data.images[idx])
    states = model.encode_prompt(caps)
    empty = model.encode_prompt("", 1)
    ft = TextToImage(unet, model.vae, model.text_encoder, model.tokenizer, model.schedule, model.prediction.value)
    opt = torch.optim.AdamW(unet.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    sch = model.schedule
    for step in range(steps):
        b = torch.randint(0, len(idx), (32,), generator=g)
        t = sch.t_min + (1 - sch.t_min) * torch.rand(32, generator=g, dtype=torch.float64)
        eps = torch.randn(32, *x0.shape[1:], generator=g)
        a, s = sch.alpha(t).float().view(-1, 1, 1, 1), sch.sigma(t).float().view(-1, 1, 1, 1)
        c = torch.where((torch.rand(32, generator=g) < 0.1).view(-1, 1, 1), empty, states[b])
        xt = a * x0[b] + s * eps
        v_hat = (a * xt - ft(xt, t, encoder_hidden_states=c)) / s  # x0 = a x_t - s v
        loss = (v_hat - (a * eps - s * x0[b])).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  fine-tune step {step}: v-loss {loss.item():.4f}")
    unet.eval().requires_grad_(False)
    return ft


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="runs/speedupnet")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ft-steps", type=int, default=150)
    ap.add_argument("--out", default="runs/speedupnet_bench.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    log = lambda s: print(s, flush=True)  # noqa: E731
    sun = load_method(args.run)
    w = sun.settings.guidance
    pr = {"prompts": [], "negatives": [], "digits": []}
    for d in range(10):
        for neg in NEGATIVE:
            for _ in range(args.seeds):
                pr["prompts"].append(f"a {DIGIT_WORDS[d]}")
                pr["negatives"].append(neg)
                pr["digits"].append(d)
    pr["digits"] = torch.tensor(pr["digits"])
    data = captioned_mnist()
    heldout = crop(data.images[data.val_idx])
    clip = load_clip()
    log(f"n = {len(pr['prompts'])} samples per row; teacher w = {w}")
    result = {
        "n": len(pr["prompts"]),
        "guidance": w,
        "adapter_parameters": sum(p.numel() for p in sun.adapter.parameters()),
    }
    log("base model + adapter:")
    gain = sun.settings.gain_init
    result["base"] = rows(sun.model, sun.adapter, gain, pr, w, heldout, clip, log)
    log("fine-tuned copy + the same adapter:")
    t0 = time.time()
    ft = finetune(sun.model, args.ft_steps, log)
    result["finetune_seconds"] = round(time.time() - t0, 1)
    result["finetuned"] = rows(ft, sun.adapter, gain, pr, w, heldout, clip, log)  # plug-and-play: no retraining
    with torch.no_grad():  # how far the fine-tune moved the model: its teacher vs the base's, same noise
        cfg = {"prompt": pr["prompts"]}
        za, zb = (
            dpmlab.sample(
                classifier_free(m, with_cond(m, prompt=pr["negatives"]), w),
                len(pr["prompts"]),
                solver="dpm_solver_pp",
                nfe=20,
                cond=cfg,
                batch_size=len(pr["prompts"]),
            )
            for m in (sun.model, ft)
        )
    result["teacher_shift_rmse_latent"] = float((za - zb).square().mean().sqrt())
    log(f"base teacher vs fine-tuned teacher, RMSE latent: {result['teacher_shift_rmse_latent']:.3f}")
    result["nfe_ratio_vs_25_step_cfg"] = 50 / sun.settings.student_steps
    Path(args.out).write_text(json.dumps(result, indent=2))
    for part in ("base", "finetuned"):
        print(
            f"\n### {part}\n\n| row | UNet evals | RMSE to teacher (latent / pixel) | FD-MNIST | accuracy (B) | "
            "has the negative attribute | CLIP |\n|---|---|---|---|---|---|---|"
        )
        for name, m in result[part].items():
            dist = "—" if name.startswith("teacher") else f"{m['rmse_latent']:.3f} / {m['rmse_pixel']:.3f}"
            print(
                f"| {name} | {m['unet_evals']} | {dist} | {m['fd_mnist']:.1f} | {m['acc_b']:.3f} ± "
                f"{m['acc_b_se']:.3f} | {m['neg_share']:.3f} ± {m['neg_share_se']:.3f} | {m['clip']:.2f} |"
            )
        print("\nshare with the negative attribute, per negative prompt:")
        for name, m in result[part].items():
            print(f"  {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in m["neg_share_by"].items()))


if __name__ == "__main__":
    main()
