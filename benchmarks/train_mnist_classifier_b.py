"""Train the independent MNIST evaluator (``MNISTClassifierB``: another architecture and seed than the
shipped feature classifier) and ship its weights.

    python benchmarks/train_mnist_classifier_b.py          # ~1 min on one CPU thread

Writes ``src/dpmlab/assets/mnist_classifier_b.safetensors`` and ``mnist_classifier_b.json`` (the card:
data, split, epochs, seed, held-out accuracy, training time) and prints the agreement of the two
classifiers on the 500 held-out images. Needs ``pip install 'dpmlab[train]'``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from dpmlab.metrics.features import (
    MNIST_CLASSIFIER_B_PATH,
    evaluator_predictions,
    load_mnist_classifier,
    mnist_5k,
    mnist_5k_split,
    save_mnist_classifier,
    train_mnist_classifier_b,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=MNIST_CLASSIFIER_B_PATH)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = mnist_5k()
    result = train_mnist_classifier_b(epochs=args.epochs, seed=args.seed, data=data, log=print)
    _, val = mnist_5k_split(data.labels)
    pred_b = evaluator_predictions(data.images[val], classifier=result.model)
    pred_a = evaluator_predictions(data.images[val], classifier=load_mnist_classifier())
    result.card["agreement_with_mnist_classifier_on_val"] = round(float((pred_a == pred_b).float().mean()), 4)
    save_mnist_classifier(result.model, args.out, result.card)
    card = result.card
    print(
        f"held-out accuracy {card['val_accuracy']:.4f}  agreement with the guiding classifier "
        f"{card['agreement_with_mnist_classifier_on_val']:.4f}  training time {card['training_time_s']:.1f} s"
    )
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB) and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
