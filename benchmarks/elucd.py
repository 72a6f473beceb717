"""EluCD on MNIST: the null-class (unconditional) ``mnist`` model guided toward each digit by the shipped
classifier (``load_mnist_classifier``), judged by the independent evaluator (``load_mnist_classifier_b``).

    python benchmarks/elucd.py                 # ~4 min on one CPU thread (10 samples per digit, NFE 20)

Rows: unguided; (i) the clean classifier's gradient at x_t (naive); (ii) its gradient at the detached
x0; (iii) + Softplus(3); (iv) + temperatures (1, 0.5); (v) + sin schedule (gamma 0.3); (vi) + per-sample
rescaling; and classifier-free guidance of the class-conditional model at several scales (for matched
accuracy). Columns: target accuracy under the evaluator, FD-MNIST of all samples to the 5k images, the
mean per-digit FD-MNIST (against that digit's images; biased upward at 10 samples, compare rows only).
Then the ECE of the guiding classifier on x0(x_t) against t: ReLU, Softplus(3), Softplus + the
temperature fitted on clean held-out images, and ReLU on x_t itself (the naive input).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import dpmlab
from dpmlab.metrics.features import (
    evaluator_predictions,
    fd_mnist,
    load_mnist_classifier,
    load_mnist_classifier_b,
    mnist_5k,
    mnist_5k_split,
)
from dpmlab.models.guidance import (
    ClassifierGuidance,
    OffTheShelfGuidance,
    Unconditional,
    calibration_vs_t,
    classifier_free,
    softplus_classifier,
)

Method = Callable[[float], object]


def methods(model, clf, soft) -> dict[str, Method]:
    """name -> (scale -> guided model). (i)-(v) share the score-shift units ``s g``; (vi)'s scale is the RMS
    of the eps change; CFG's is diffusers' guidance scale (1 = the conditional model)."""
    return {
        "(i) naive x_t grad": lambda s: ClassifierGuidance(model, lambda x, t: clf(x), s),
        "(ii) x0 grad": lambda s: OffTheShelfGuidance(model, clf, s, tau1=1, tau2=1, gamma=0),
        "(iii) + softplus(3)": lambda s: OffTheShelfGuidance(model, soft, s, tau1=1, tau2=1, gamma=0),
        "(iv) + tau (1, 0.5)": lambda s: OffTheShelfGuidance(model, soft, s, tau1=1, tau2=0.5, gamma=0),
        "(v) + sin (0.3)": lambda s: OffTheShelfGuidance(model, soft, s, tau1=1, tau2=0.5, gamma=0.3),
        "(vi) + rescale": lambda s: OffTheShelfGuidance(model, soft, s, 1, 0.5, 0.3, rescale=True),
        "CFG (conditional model)": lambda w: classifier_free(model, Unconditional(model), w),
    }


def run(guided, n_per_digit: int, nfe: int, seed: int, solver: str) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(10).repeat_interleave(n_per_digit)
    x = dpmlab.sample(guided, len(labels), solver=solver, nfe=nfe, seed=seed, cond={"label": labels})
    return x.clamp(-1, 1), labels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-per-digit", type=int, default=10)
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--solver", default="ddpm", help="the authors use ancestral DDPM sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scales",
        default="2,2,2,2,2,0.25;0.5,0.5;1;2",
        help="scales of (i),(ii),(iii),(iv),(v),(vi),CFG; several per method separated by ';'",
    )
    p.add_argument("--only", default="", help="rows to run, e.g. 'vi,CFG' (default: all, with the unguided row)")
    p.add_argument("--no-ece", action="store_true", help="skip the ECE table")
    args = p.parse_args()
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    model = dpmlab.load("mnist")
    clf, evaluator = load_mnist_classifier(), load_mnist_classifier_b()
    soft = softplus_classifier(clf, 3.0)
    data = mnist_5k()
    table = methods(model, clf, soft)

    def score(x, labels):
        pred = evaluator_predictions(x, classifier=evaluator)
        acc = float((pred == labels).float().mean())
        fd_all = fd_mnist(x, data.images)
        fd_cls = sum(fd_mnist(x[labels == c], data.images[data.labels == c]) for c in range(10)) / 10
        return acc, fd_all, fd_cls

    chosen = {name: [float(v) for v in part.split(";")] for name, part in zip(table, args.scales.split(","))}

    n = 10 * args.n_per_digit
    print(
        f"\nnull-class mnist model guided toward each digit: {args.n_per_digit} per digit, {args.solver} at "
        f"NFE {args.nfe}; accuracy = independent evaluator (MNISTClassifierB)"
    )
    print(f"| method | scale | target accuracy | FD-MNIST (all, n={n}) | mean per-digit FD-MNIST |")
    print("|---|---|---|---|---|")
    only = [k.strip() for k in args.only.split(",") if k.strip()]
    if not only:
        x, y = run(Unconditional(model), args.n_per_digit, args.nfe, args.seed, args.solver)
        acc, fd_all, fd_cls = score(x, y)
        print(f"| unguided (null class) | - | {acc:.3f} | {fd_all:.2f} | {fd_cls:.2f} |")
    for name, make in table.items():
        if only and not any(name.startswith(f"({k})") or name.startswith(k) for k in only):
            continue
        for s in chosen[name]:
            x, y = run(make(s), args.n_per_digit, args.nfe, args.seed, args.solver)
            acc, fd_all, fd_cls = score(x, y)
            print(f"| {name} | {s:g} | {acc:.3f} | {fd_all:.2f} | {fd_cls:.2f} |", flush=True)

    if args.no_ece:
        return
    # ECE of the guiding classifier on x0(x_t) against t (held-out images), with and without calibration
    _, val = mnist_5k_split(data.labels)
    keep = torch.arange(len(val)) % 5 < 3  # 300 of the 500 held-out images (30 per digit)
    xv, yv = data.images[val][keep], data.labels[val][keep]
    with torch.no_grad():
        logits = soft(data.images[val][~keep])  # the other 200 held-out images fit the temperature
    temps = torch.linspace(0.3, 3.0, 28)
    nll = torch.stack([torch.nn.functional.cross_entropy(logits / tt, data.labels[val][~keep]) for tt in temps])
    temp = float(temps[nll.argmin()])
    ts = torch.tensor([0.05, 0.2, 0.35, 0.5, 0.7, 0.9], dtype=torch.float64)
    curves = {
        "ReLU on x0(x_t)": calibration_vs_t(model, clf, xv, yv, ts),
        "Softplus(3) on x0(x_t)": calibration_vs_t(model, soft, xv, yv, ts),
        f"Softplus(3) / T={temp:.1f} on x0(x_t)": calibration_vs_t(model, lambda z: soft(z) / temp, xv, yv, ts),
        "ReLU on x_t (naive input)": calibration_vs_t(model, clf, xv, yv, ts, denoise=False),
    }
    print(
        f"\nECE (15 bins) of the guiding classifier on {len(yv)} held-out images, against t "
        f"(T fitted by NLL on 200 other clean held-out images); accuracy in brackets"
    )
    print("| input / classifier | " + " | ".join(f"t={float(t):.2f}" for t in ts) + " |")
    print("|---" * (len(ts) + 1) + "|")
    for name, c in curves.items():
        cells = " | ".join(f"{float(e):.3f} ({float(a):.2f})" for e, a in zip(c.ece, c.accuracy))
        print(f"| {name} | {cells} |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
