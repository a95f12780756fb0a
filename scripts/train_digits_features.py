"""Train the built-in digits feature network and write it to ``fdistill/assets/``.

    python scripts/train_digits_features.py            # ~10-30 s on 2 CPU cores, deterministic

Data: sklearn's bundled digits (1,797 images, 8x8), pixel p -> p / 8 - 1. A stratified 80/20 split (seed 0) gives the
held-out accuracy reported in ``digits_features.json``; the shipped weights are those trained on the 80 % split (so
the reported accuracy is the accuracy of the shipped network). Augmentation: random +-1 pixel shifts and small
Gaussian pixel noise, so features stay meaningful on imperfect generated digits.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.model_selection import train_test_split

from fdistill.evaluation.digits import RECORD_PATH, WEIGHTS_PATH, DigitsFeatureNet, digits_images


def random_shift(images: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Shift each image [B, 1, 8, 8] by up to ``max_shift`` pixels (background value -1 fills the border)."""
    size = images.shape[-1]
    padded = F.pad(images, [max_shift] * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator)
    grid = torch.arange(size)
    rows = (offsets[:, 0, None] + grid)[:, :, None]                        # [B, 8, 1]
    cols = (offsets[:, 1, None] + grid)[:, None, :]                        # [B, 1, 8]
    batch = torch.arange(images.shape[0])[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


def augment(images: torch.Tensor, generator: torch.Generator, noise_std: float) -> torch.Tensor:
    shifted = random_shift(images, generator)
    return shifted + noise_std * torch.randn(shifted.shape, generator=generator)


def train(network, images, labels, epochs: int, batch_size: int, lr: float, noise_std: float, seed: int):
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(images) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(batch_size):
            loss = F.cross_entropy(network(augment(images[batch], generator, noise_std)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return network.eval()


@torch.no_grad()
def accuracy(network, images, labels) -> float:
    return float((network(images).argmax(1) == labels).double().mean())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--noise-std", type=float, default=0.1, 
                        help="Gaussian pixel noise augmentation (in [-1,1] units)")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", type=Path, default=WEIGHTS_PATH)
    parser.add_argument("--record", type=Path, default=RECORD_PATH)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    images, labels = digits_images()
    train_idx, test_idx = train_test_split(torch.arange(len(labels)).numpy(), test_size=0.2, random_state=args.seed,
                                           stratify=labels.numpy())
    start = time.perf_counter()
    network = train(DigitsFeatureNet(width=args.width), images[train_idx], labels[train_idx], args.epochs,
                    args.batch_size, args.lr, args.noise_std, args.seed)
    seconds = time.perf_counter() - start
    record = {
        "architecture": {"width": args.width},
        "held_out_accuracy": accuracy(network, images[test_idx], labels[test_idx]),
        "train_accuracy": accuracy(network, images[train_idx], labels[train_idx]),
        "num_train": len(train_idx), "num_held_out": len(test_idx),
        "split": "sklearn train_test_split(test_size=0.2, stratify=labels, random_state=seed)",
        "input": "[B, 1, 8, 8] in [-1, 1], sklearn pixel p -> p / 8 - 1",
        "training": {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "noise_std": args.noise_std,
                     "seed": args.seed, "optimizer": "AdamW(weight_decay=1e-4) + OneCycleLR",
                     "augmentation": "random +-1 pixel shift, Gaussian pixel noise"},
        "train_seconds": round(seconds, 2), "torch": torch.__version__,
    }
    args.weights.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(args.weights))
    args.record.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
