"""Train dpmlab's MNIST feature classifier (FD-MNIST, classifier accuracy) and ship its weights.

    python benchmarks/train_mnist_classifier.py            # ~1-2 min on one CPU thread

Writes ``src/dpmlab/assets/mnist_classifier.safetensors`` and ``mnist_classifier.json`` (the card:
data, split, epochs, seed, validation accuracy, training time). Needs ``pip install 'dpmlab[train]'``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dpmlab.metrics.features import MNIST_CLASSIFIER_PATH, save_mnist_classifier, train_mnist_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=MNIST_CLASSIFIER_PATH)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = train_mnist_classifier(epochs=args.epochs, seed=args.seed, log=print)
    save_mnist_classifier(result.model, args.out, result.card)
    card = result.card
    print(f"val accuracy {card['val_accuracy']:.4f}  training time {card['training_time_s']:.1f} s")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
