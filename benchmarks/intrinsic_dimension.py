"""Gauge freedom and intrinsic dimension (Horvat & Pfister, ICLR 2024, arXiv 2402.03845; the normal-space
estimator of Stanczuk et al., arXiv 2212.12611). Two tables:

1. Closed form: data on a random d-dim subspace of R^D (``DegenerateGaussian``, EDM schedule, exact score). The
   normal-space estimate (sigma = 0.01, 4D perturbations, ``--points`` data points) from the score, from score +
   gauge (``f(q) A C^-1 x``, f = 2 cos q), and the flow-Jacobian count (sigma 80 -> 0.01, DPM-Solver++ 40
   steps); the sampling error max |Cov - U U^T| of ``--n`` samples by Heun (``--steps``) for the score, score +
   gauge, and a control that breaks the gauge condition (the same rotation without C^-1).
2. Learned: a unit circle in R^``--dim`` (random plane). An unconstrained noise-prediction MLP and a conservative
   one (``eps_hat = grad_x E``, same body, scalar head) trained alike by ``dpmlab.training.fit`` (eps MSE,
   log-uniform sigma in [0.01, 10]); per model: held-out eps MSE at sigma = 0.05, Jacobian asymmetry of eps_hat,
   the most common k_hat and the share of circle points with k_hat = 1 at sigma 0.02 / 0.05 / 0.1 / 0.2,
   and the samples' radius and off-plane errors.

Usage: ``nice -n 10 python benchmarks/intrinsic_dimension.py [--steps-train 4000] [--width 128] [--dim 5]
[--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dpmlab.analysis import conservative as cons
from dpmlab.analysis import gauge as gg
from dpmlab.analysis import intrinsic_dimension as idim
from dpmlab.models.denoiser import Denoiser, Prediction
from dpmlab.schedules import EDM
from dpmlab.solvers import Problem, get, sample
from dpmlab.timesteps import karras
from dpmlab.training import TrainConfig, fit

torch.set_num_threads(1)
SCH = EDM()


def closed_form(D: int, d: int, points: int, n: int, steps: int, seed: int = 0) -> dict[str, Any]:
    data = gg.DegenerateGaussian.random(D, d, SCH, seed=seed)
    gauge = gg.SkewGauge(data, gg.random_skew(D, seed=seed + 1))
    A = gauge.A
    fields = {
        "score": data.score,
        "gauge": lambda x, t: data.score(x, t) + gauge(x, t),
        "control": lambda x, t: (
            data.score(x, t)
            + torch.cos((x * x).sum(1, keepdim=True)) * x @ A.T / (x * x).sum(1, keepdim=True).sqrt().clamp_min(1e-3)
        ),
    }
    g = torch.Generator().manual_seed(seed)
    pts = data.sample(points, generator=g)
    row: dict[str, Any] = {"D": D, "d": d}
    for name in ("score", "gauge"):
        ks = [idim.normal_space_id(fields[name], p, 0.01, SCH, generator=g).dimension for p in pts]
        row[f"k_{name}"] = max(set(ks), key=ks.count)
        row[f"right_{name}"] = sum(k == d for k in ks) / len(ks)
        x1 = torch.randn(8, D, generator=g, dtype=torch.float64) * 80
        ts = karras(SCH, 40, t_start=80.0, t_end=0.01)
        sv = idim.flow_jacobian_spectrum(Problem(data.denoiser(fields[name]), SCH), x1, ts, get("dpm_solver_pp"))
        row[f"flow_right_{name}"] = sum(idim.largest_gap(s) == d for s in sv) / len(sv)
    x1 = torch.randn(n, D, generator=g, dtype=torch.float64) * math.sqrt(1 + SCH.t_max**2)
    ts = karras(SCH, steps, t_start=SCH.t_max, t_end=SCH.t_min)
    for name, fn in fields.items():
        out = sample(Problem(data.denoiser(fn), SCH), x1, ts, get("heun"))
        row[f"cov_err_{name}"] = float((out.T @ out / n - data.cov_t(0.0)).abs().max())
    row["mc_floor"] = math.sqrt(2 / n)
    return row


class EpsObjective:
    """Denoising score matching of a noise predictor on fixed points, sigma log-uniform in [0.01, 10]."""

    def __init__(self, name: str, module: nn.Module, data: Tensor) -> None:
        self.name, self.module, self.data = name, module, data
        self.trained: nn.Module | None = None  # the EMA network, set by export

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "n": len(self), "dim": int(self.data.shape[1])}

    def draw(self, idx: Tensor, g: torch.Generator) -> dict[str, Tensor]:
        sigma = torch.exp(math.log(0.01) + torch.rand(len(idx), generator=g) * math.log(1000.0))
        return {"x0": self.data[idx], "eps": torch.randn(len(idx), self.data.shape[1], generator=g), "sigma": sigma}

    def loss(self, module: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
        x = batch["x0"] + batch["sigma"][:, None] * batch["eps"]
        return ((module(x, batch["sigma"].double()) - batch["eps"]) ** 2).mean()

    def export(self, ema: nn.Module, out_dir: Path, card: dict[str, Any]) -> Path:
        self.trained = ema
        path = out_dir / "card.json"
        path.write_text(json.dumps(card, default=str))
        return path

    def checkpoint_meta(self) -> dict[str, str]:
        return {}


def learned(dim: int, steps: int, width: int, seed: int = 0) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(dim, 2, generator=g, dtype=torch.float64))
    U = basis.float()

    def circle(n: int) -> Tensor:
        th = torch.rand(n, generator=g) * 2 * math.pi
        return torch.stack([th.cos(), th.sin()], 1) @ U.T

    data = circle(4000)
    rows: dict[str, dict[str, float]] = {}
    for name in ("unconstrained", "conservative"):
        torch.manual_seed(seed)
        module: nn.Module = (
            cons.FieldMLP(dim, SCH, width=width, depth=3)
            if name == "unconstrained"
            else cons.ConservativeScore(cons.EnergyMLP(dim, SCH, width=width, depth=3))
        )
        t0 = time.process_time()
        with tempfile.TemporaryDirectory() as tmp:
            tc = TrainConfig(
                steps=steps,
                batch_size=256,
                lr=1e-3,
                warmup=50,
                ema_decay=0.99,
                lr_decay="cosine",
                checkpoint_every=steps,
                log_every=max(1, steps // 4),
                seed=seed,
            )
            obj = EpsObjective(name, module, data)
            res = fit(obj, tc, tmp, progress=False)
        net = obj.trained if obj.trained is not None else module  # the EMA weights
        net.eval()
        row: dict[str, float] = {"train_loss": res.final_loss, "cpu_s": time.process_time() - t0}
        x0 = circle(512)
        eps = torch.randn(512, dim, generator=g)
        s = torch.full((512,), 0.05, dtype=torch.float64)
        with torch.no_grad():
            row["eps_mse_0.05"] = float(((net(x0 + 0.05 * eps, s) - eps) ** 2).mean())
        row["asymmetry"] = float(cons.jacobian_asymmetry(net, x0[:32] + 0.05 * eps[:32], s[:32]).mean())
        model = Denoiser(net, SCH, Prediction.EPS, data_shape=(dim,))
        score = idim.score_of(model, SCH, (dim,))
        for sig in (0.02, 0.05, 0.1, 0.2):
            ks = [idim.normal_space_id(score, p, sig, SCH, generator=g).dimension for p in circle(20)]
            row[f"k_mode_{sig}"] = max(set(ks), key=ks.count)
            row[f"k1_share_{sig}"] = sum(k == 1 for k in ks) / len(ks)
        x1 = torch.randn(1000, dim, generator=g) * 10
        with torch.no_grad():
            out = sample(Problem(model, SCH), x1, karras(SCH, 40, t_start=10.0, t_end=0.01), get("heun"))
        radius = (out @ U).norm(dim=1)
        row["radius_err"] = float((radius - 1).abs().mean())
        row["off_manifold"] = float((out - (out @ U) @ U.T).norm(dim=1).mean())
        rows[name] = row
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", type=int, default=20)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--dim", type=int, default=5)
    ap.add_argument("--steps-train", type=int, default=4000)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--json")
    a = ap.parse_args()
    t0 = time.process_time()
    table = [closed_form(D, d, a.points, a.n, a.steps) for D, d in ((6, 2), (10, 3), (20, 5))]
    print(
        "| D | d | k_hat score (share right) | k_hat score+gauge (share right) | flow-Jacobian right: score / "
        "score+gauge | max abs Cov err: score / score+gauge / control (MC floor) |"
    )
    print("|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['D']} | {r['d']} | {r['k_score']} ({r['right_score']:.2f}) | {r['k_gauge']} "
            f"({r['right_gauge']:.2f}) | {r['flow_right_score']:.2f} / {r['flow_right_gauge']:.2f} | "
            f"{r['cov_err_score']:.3f} / {r['cov_err_gauge']:.3f} / {r['cov_err_control']:.3f} "
            f"({r['mc_floor']:.3f}) |"
        )
    rows = learned(a.dim, a.steps_train, a.width)
    print(f"\ncircle in R^{a.dim}, width {a.width}, {a.steps_train} steps\n")
    keys = list(next(iter(rows.values())))
    print("| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    print(f"\n{time.process_time() - t0:.0f} CPU s")
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "closed_form": table, "learned": rows}, indent=2))


if __name__ == "__main__":
    main()
