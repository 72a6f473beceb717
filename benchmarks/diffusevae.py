"""DiffuseVAE (arXiv 2201.00308) on scikit-learn's 8x8 digits: the VAE of
``recipes/methods/diffusevae_vae_digits8.json``, then Form-1 and Form-2 conditional DDPMs
(``recipes/methods/diffusevae_digits8.json``) against an unconditional DDPM with the same UNet (minus the
conditioning channel), the same schedule, optimiser, batch and number of steps.

Quality: ``FD`` — Fréchet distance of raw 64-d pixel vectors (no trained feature network exists for 8x8 digits) and
``SW`` — sliced Wasserstein-2, of ``--n`` samples against all 1,797 digits, with DDIM at NFE 5 / 10 / 20 (dpmlab's
default quadratic grid; the same start noise per sample index for every model; every model's x0 prediction clipped
to [-1, 1], the authors' ``clip_denoised``: without it these small eps networks blow up at few steps). Floors:
``--n`` real digits and the VAE's own samples ``Dec(z)``. Each DiffuseVAE also with the paper's post-hoc "expressive
prior" (``LatentGMM``: 10 full-covariance components fitted on sampled latents of the training digits) instead of
N(0, I). The paper's claim: DiffuseVAE beats the DDPM most clearly at few steps.

Controllability: for ``--pairs`` pairs of prior latents, 8 latents on the segment z0 -> z1 are sampled with one fixed
DDPM noise (DDIM, NFE 10); reported: the mean pixel correlation of each sample with its own ``x^ = Dec(z)`` and with
the ``x^`` at the other end of the path, and the mean correlation of the sample with the noise-only (z0) sample.

Usage: ``nice -n 10 python benchmarks/diffusevae.py [--steps 1000] [--n 1000]``; runs are kept in ``--out``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import dpmlab
from dpmlab.methods import MethodRecipe, load, load_recipe, train_recipe
from dpmlab.methods.diffusevae import Clipped, Form
from dpmlab.metrics import frechet_distance_from_features, sliced_wasserstein
from dpmlab.training import Recipe, train
from dpmlab.training.data import digits8

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _train_method(d: dict, run: Path) -> Path:
    if not (run / "model.safetensors").is_file():
        t = time.process_time()
        res = train_recipe(
            MethodRecipe.from_dict(d), run, resume=(run / "checkpoint.safetensors").is_file(), progress=False
        )
        print(f"  trained {run.name}: loss {res.final_loss:.4f}, {time.process_time() - t:.0f} CPU s")
    return run


def runs(steps: int, vae_steps: int, out: Path) -> dict[str, Path]:
    vae = load_recipe(ROOT / "recipes" / "methods" / "diffusevae_vae_digits8.json").to_dict()
    vae["train"]["steps"] = vae_steps
    vae_run = _train_method(vae, out / f"vae_{vae_steps}")
    base = load_recipe(ROOT / "recipes" / "methods" / "diffusevae_digits8.json").to_dict()
    base["train"]["steps"] = steps
    base["method"]["vae"] = str(vae_run)
    out_runs = {"vae": vae_run}
    for form in ("form1", "form2"):
        d = {**base, "method": {**base["method"], "form": form}}
        out_runs[form] = _train_method(d, out / f"{form}_{steps}")
    ddpm = out / f"ddpm_{steps}"
    if not (ddpm / "model.safetensors").is_file():  # the same UNet without the conditioning channel
        net = {k: v for k, v in base["method"]["net_config"].items()}
        recipe = Recipe.from_dict(
            {
                "name": "ddpm_digits8",
                "data": {"name": "digits8", "conditional": False},
                "model": {
                    "net": "unet",
                    "objective": "eps",
                    "schedule": "linear",
                    "net_config": {"image_size": 8, "in_channels": 1, **net},
                },
                "train": base["train"],
                "export_dtype": "float32",
            }
        )
        t = time.process_time()
        res = train(recipe, ddpm, resume=(ddpm / "checkpoint.safetensors").is_file(), progress=False)
        print(f"  trained {ddpm.name}: loss {res.final_loss:.4f}, {time.process_time() - t:.0f} CPU s")
    out_runs["ddpm"] = ddpm
    return out_runs


def metrics(x: torch.Tensor, data: torch.Tensor) -> tuple[float, float]:
    x, data = x.double().flatten(1), data.double().flatten(1)
    return frechet_distance_from_features(x, data), sliced_wasserstein(x, data, 128, 0)


def corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of flattened images."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--vae-steps", type=int, default=1000)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--nfe", default="5,10,20")
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--out", default="runs/bench_diffusevae")
    a = p.parse_args()
    data = digits8().x
    r = runs(a.steps, a.vae_steps, Path(a.out))
    models = {"Form-1": load(r["form1"]), "Form-2": load(r["form2"])}
    ddpm = Clipped(dpmlab.load(r["ddpm"] / "model.safetensors"), Form.FORM1)  # clipped x0 for every model
    nfes = [int(v) for v in a.nfe.split(",")]
    real = metrics(data[torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: a.n]], data)
    vae_only = metrics(models["Form-1"].decode(models["Form-1"].latents(a.n, seed=1)), data)
    # the paper's post-hoc expressive prior: a 10-component GMM on sampled latents of the training digits
    m1 = models["Form-1"]
    gmm = m1.fit_prior(data, 10, seed=0)
    vae_gmm = metrics(m1.decode(m1.latents(a.n, seed=1, prior=gmm)), data)
    rows: dict[str, list[tuple[float, float]]] = {"DDPM (unconditional)": []}
    for nfe in nfes:
        rows["DDPM (unconditional)"].append(metrics(dpmlab.sample(ddpm, a.n, solver="ddim", nfe=nfe, seed=1), data))
        for name, m in models.items():
            for prior, tag in ((None, ""), (gmm, " + GMM prior")):
                x = m.sample(a.n, solver="ddim", nfe=nfe, seed=1, prior=prior)
                rows.setdefault(f"DiffuseVAE {name}{tag}", []).append(metrics(x, data))
    print(f"\nDiffuseVAE on digits8: {a.steps} training steps (VAE {a.vae_steps}), DDIM, {a.n} samples vs all digits")
    head = " | ".join(f"FD NFE {n}" for n in nfes) + " | " + " | ".join(f"SW NFE {n}" for n in nfes)
    print(f"| model | {head} |")
    print("|---" * (1 + 2 * len(nfes)) + "|")
    for name, vals in rows.items():
        print(
            f"| {name} | "
            + " | ".join(f"{fd:.3f}" for fd, _ in vals)
            + " | "
            + " | ".join(f"{sw:.4f}" for _, sw in vals)
            + " |"
        )
    print(f"| VAE alone, Dec(z) (0 NFE) | {vae_only[0]:.3f} | | | {vae_only[1]:.4f} | | |")
    print(f"| VAE alone, Dec(z), z from the GMM prior | {vae_gmm[0]:.3f} | | | {vae_gmm[1]:.4f} | | |")
    print(f"| real digits ({a.n}) | {real[0]:.3f} | | | {real[1]:.4f} | | |")

    print(f"\nControllability: {a.pairs} latent segments x 8 points, one fixed noise per segment, DDIM NFE 10")
    print("| model | corr(sample, own x^) | corr(sample, x^ at the other end) | corr(sample, z0's sample) |")
    print("|---|---|---|---|")
    for name, m in models.items():
        own, other, first = [], [], []
        for k in range(a.pairs):
            z0, z1 = m.latents(2 * a.pairs, seed=5)[2 * k : 2 * k + 2]
            xs, xh = m.interpolate(z0, z1, steps=8, nfe=10, seed=100 + k)
            own.append(corr(xs, xh))
            other.append(
                torch.cat([corr(xs[:4], xh[-1:].expand(4, -1, -1, -1)), corr(xs[4:], xh[:1].expand(4, -1, -1, -1))])
            )
            first.append(corr(xs[1:], xs[:1].expand(7, -1, -1, -1)))
        print(
            f"| {name} | {float(torch.cat(own).mean()):.3f} | {float(torch.cat(other).mean()):.3f} | "
            f"{float(torch.cat(first).mean()):.3f} |"
        )


if __name__ == "__main__":
    main()
