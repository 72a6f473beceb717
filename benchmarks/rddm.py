"""RDDM (arXiv 2308.13712): (1) generation equivalence with DDIM under the coefficient transform, step for step;
(2) restoration of degraded 8x8 digits at few steps vs a conditional DDPM (SR3-style) with the same network,
steps and budget, and a direct regression network as a reference.

(1) ``abar_t = 1 - sqrt(abar^DDPM_t)``, ``bbar_t = sqrt(1 - abar^DDPM_t)``, ``I_res^ = -x0^``; RDDM's sampler
(eta = 0) vs dpmlab's DDIM on the authors' grid ``int(linspace(-1, 999, S + 1))``: max |difference| over all
steps and samples, float64, for the exact denoiser of ``gmm16`` and for the shipped ``digits8`` UNet (float64).

(2) Digits 0..1496 train, 1497..1796 (300 images) test; degradations ``lowlight`` (pixels x0.25 + 0.05 noise) and
``noise`` (+ 0.3 noise, images in [-1, 1]). Same residual MLP (width 256, depth 3, input [x_t, I_in], two
outputs), AdamW, steps, batch and EMA for: RDDM (``recipes/methods/rddm_digits8_lowlight.json``: residual + noise,
L1, T = 1000, sum_scale 0.01, eta = 0, clip), SR3 (eps prediction with L1 on the linear DDPM schedule, input
[x_t, I_in], DDIM from pure noise on the same grid, x0 clipped each step) and a regression net (L1 of
``net([I_in, 0])`` to ``I_0``; one evaluation). PSNR on [0, 1] pixels, mean over images; SSIM over the whole
8x8 image as one window (a windowed SSIM does not fit 8x8).

Usage: ``nice -n 10 python benchmarks/rddm.py [--steps 2000] [--tasks lowlight,noise]``; runs kept in ``--out``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpmlab import load as load_model
from dpmlab.methods import MethodRecipe, load, load_recipe, train_recipe
from dpmlab.methods.rddm import Degradation, RDDMSchedule, predictor_from_denoiser, sample
from dpmlab.models.analytic import preset
from dpmlab.models.denoiser import Denoiser
from dpmlab.models.mlp import MLP, MLPConfig
from dpmlab.schedules import DiscreteVP
from dpmlab.solvers import Problem, SeededNoise, get, iterate
from dpmlab.training import TrainConfig, fit
from dpmlab.training.data import Dataset, digits8

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
VP = DiscreteVP.from_preset("linear")


def grid(steps: int) -> tuple[list[int], Tensor]:
    times = torch.linspace(-1, 999, steps + 1).int().tolist()[::-1]
    return times, torch.cat([VP.index_to_t(torch.tensor(times[:-1])), torch.zeros(1, dtype=torch.float64)])


def equivalence(den: Any, shape: tuple[int, ...], steps: int, n: int = 64) -> float:
    traj: list[Tensor] = []
    x_in = torch.zeros(n, *shape, dtype=torch.float64)
    sample(
        predictor_from_denoiser(den, VP),
        RDDMSchedule.from_vp(VP.alphas_cumprod),
        x_in,
        steps,
        seed=0,
        callback=lambda t, x: traj.append(x),
    )
    x = (1 - VP.alphas_cumprod[-1]).sqrt() * SeededNoise(0, torch.arange(n))(0, x_in)
    infos = list(iterate(Problem(den, VP), x, grid(steps)[1], get("ddim")))
    return max(float((a - b.x).abs().max()) for a, b in zip(traj, infos))


class Baseline:
    """SR3-style conditional DDPM (``kind="sr3"``) or direct regression (``"regression"``) as a ``TrainObjective``
    on the RDDM network shape (input and output: two stacked images)."""

    def __init__(self, kind: str, ds: Dataset, degradation: Degradation, seed: int) -> None:
        self.kind, self.ds, self.deg, self.name = kind, ds, degradation, kind
        torch.manual_seed(seed)
        self.module = MLP(MLPConfig(data_shape=(2, 8, 8), width=256, depth=3, time_dim=64))

    def __len__(self) -> int:
        return len(self.ds)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "degradation": self.deg.kind.value, "n": len(self.ds)}

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        b = len(idx)
        t = torch.randint(0, 1000, (b,), generator=g)
        eps = torch.randn(b, 1, 8, 8, generator=g)
        x0 = self.ds.x[idx]
        return {"x0": x0, "x_in": self.deg(x0, torch.randn(b, 1, 8, 8, generator=g)), "t": t, "eps": eps}

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        x0, x_in, t, eps = batch["x0"], batch["x_in"], batch["t"], batch["eps"]
        if self.kind == "regression":
            return (
                (module(torch.cat([x_in, torch.zeros_like(x_in)], 1), torch.zeros_like(t).float())[:, :1] - x0)
                .abs()
                .mean()
            )
        x_t = VP.add_noise(x0, eps, VP.index_to_t(t))
        return (module(torch.cat([x_t, x_in], 1), t.float())[:, :1] - eps).abs().mean()

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        path = out_dir / "ema.pt.safetensors"
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(path))
        return path

    def checkpoint_meta(self) -> dict[str, str]:
        return {}


def baseline(kind: str, ds: Dataset, deg: Degradation, tc: TrainConfig, out: Path) -> nn.Module:
    obj = Baseline(kind, ds, deg, tc.seed)
    if not (out / "ema.pt.safetensors").is_file():
        fit(obj, tc, out, progress=False)
    from safetensors.torch import load_file

    obj.module.load_state_dict(load_file(str(out / "ema.pt.safetensors")))
    return obj.module.eval().requires_grad_(False)


def sr3_restore(net: nn.Module, x_in: Tensor, steps: int, seed: int = 0) -> Tensor:
    den = Denoiser(lambda x, t, x_in: net(torch.cat([x, x_in], 1), t)[:, :1], VP, "eps", data_shape=(1, 8, 8))
    clipped = lambda x, t, **c: den(x, t, **c).clamp(-1, 1)  # noqa: E731  (clip x0 each step, as RDDM)
    x = SeededNoise(seed, torch.arange(len(x_in)))(0, x_in)
    with torch.no_grad():
        return list(iterate(Problem(clipped, VP, cond={"x_in": x_in}), x, grid(steps)[1], get("ddim")))[-1].x


def psnr_ssim(x: Tensor, ref: Tensor) -> tuple[float, float]:
    a, b = ((x.double().clamp(-1, 1) + 1) / 2).flatten(1), ((ref.double() + 1) / 2).flatten(1)
    psnr = (10 * torch.log10(1 / (a - b).square().mean(1))).mean()
    ma, mb, va, vb = a.mean(1), b.mean(1), a.var(1, unbiased=False), b.var(1, unbiased=False)
    cov = ((a - ma[:, None]) * (b - mb[:, None])).mean(1)
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))).mean()
    return float(psnr), float(ssim)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--tasks", default="lowlight,noise")
    p.add_argument("--sample-steps", default="1,2,5,10")
    p.add_argument("--out", default="runs/bench_rddm")
    a = p.parse_args()

    print("(1) RDDM sampler vs DDIM, same grid and start, float64: max |x_RDDM - x_DDIM| over all steps")
    print("| model | S=5 | S=10 | S=50 |\n|---|---|---|---|")
    gmm = preset("gmm16").denoiser(VP)
    print("| gmm16 exact x0 | " + " | ".join(f"{equivalence(gmm, (16,), s):.1e}" for s in (5, 10, 50)) + " |")
    unet = load_model("digits8")
    unet.net.double()
    print(
        "| digits8 UNet (eps) | " + " | ".join(f"{equivalence(unet, (1, 8, 8), s, 32):.1e}" for s in (5, 10, 50)) + " |"
    )

    data = digits8().x
    train, test = Dataset("digits8_train", data[:1497]), data[1497:]
    base = load_recipe(ROOT / "recipes" / "methods" / "rddm_digits8_lowlight.json").to_dict()
    base["train"]["steps"] = a.steps
    levels = {"lowlight": {"kind": "lowlight", "level": 0.25, "noise": 0.05}, "noise": {"kind": "noise", "level": 0.3}}
    s_steps = [int(v) for v in a.sample_steps.split(",")]
    print(f"\n(2) restoration of 300 held-out digits, {a.steps} training steps each; PSNR dB / SSIM")
    print(
        "| task | input | regression (1 NFE) | "
        + " | ".join(f"RDDM {s}" for s in s_steps)
        + " | "
        + " | ".join(f"SR3 {s}" for s in s_steps)
        + " |"
    )
    print("|---" * (3 + 2 * len(s_steps)) + "|")
    for task in a.tasks.split(","):
        out = Path(a.out) / f"{task}_{a.steps}"
        base["method"]["degradation"] = levels[task]
        recipe = MethodRecipe.from_dict({**base, "name": f"rddm_{task}"})
        t0 = time.process_time()
        if not (out / "rddm" / "model.safetensors").is_file():
            train_recipe(recipe, out / "rddm", dataset=train, progress=False)
        model = load(out / "rddm")
        tc = recipe.train
        reg, sr3 = (baseline(k, train, recipe.settings.degradation, tc, out / k) for k in ("regression", "sr3"))
        x_in = model.degrade(test, seed=123)
        with torch.no_grad():
            y_reg = reg(torch.cat([x_in, torch.zeros_like(x_in)], 1), torch.zeros(len(x_in)))[:, :1]
        cells = [psnr_ssim(x_in, test), psnr_ssim(y_reg, test)]
        cells += [psnr_ssim(model.sample(x_in, steps=s), test) for s in s_steps]
        cells += [psnr_ssim(sr3_restore(sr3, x_in, s), test) for s in s_steps]
        print(
            f"| {task} | "
            + " | ".join(f"{ps:.2f} / {ss:.3f}" for ps, ss in cells)
            + " |"
            + f"  <!-- {time.process_time() - t0:.0f} CPU s -->"
        )


if __name__ == "__main__":
    main()
