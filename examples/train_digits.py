"""Train small CNNs on scikit-learn's bundled 8x8 digits with normkit layers, and print results.

A first look at micro-batch training (Qiao et al. 2019): plain batch norm trained one image at a
time against Weight Standardization with micro-batch Batch-Channel Normalization, next to batch
norm at an ordinary batch size. It runs in about a minute on two CPU cores and downloads nothing.

    python examples/train_digits.py [--epochs 2] [--seed 0]

This is a demonstration, one seed per setting. The statistically tested reproductions of each
paper's claim belong to the ``normkit reproduce`` command.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import normkit as nk


def load(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(), test_size=450, stratify=y.numpy(), random_state=0
    )
    return x[idx_train], y[idx_train], x[idx_test], y[idx_test]


def cnn(conv: type[nn.Conv2d], norm: Callable[[int], nn.Module]) -> nn.Module:
    return nn.Sequential(
        conv(1, 16, 3, padding=1),
        norm(16),
        nn.ReLU(),
        conv(16, 32, 3, padding=1),
        norm(32),
        nn.ReLU(),
        nn.MaxPool2d(2),
        conv(32, 32, 3, padding=1),
        norm(32),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )


def train_and_test(
    model: nn.Module, batch: int, epochs: int, data: tuple[torch.Tensor, ...], seed: int
) -> float:
    x_train, y_train, x_test, y_test = data
    gen = torch.Generator().manual_seed(seed)
    lr = 0.01 * max(batch, 1) / 8 if batch >= 8 else 0.005
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(y_train), generator=gen)
        for start in range(0, len(order), batch):
            sel = order[start : start + batch]
            loss = nn.functional.cross_entropy(model(x_train[sel]), y_train[sel])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    data = load(args.seed)

    settings: list[tuple[str, int, Callable[[], nn.Module]]] = [
        ("BatchNorm2d", 32, lambda: cnn(nn.Conv2d, nn.BatchNorm2d)),
        ("BatchNorm2d", 1, lambda: cnn(nn.Conv2d, nn.BatchNorm2d)),
        (
            "WSConv2d + BatchChannelNorm2d(estimate=True)",
            1,
            lambda: cnn(
                nk.WSConv2d,
                lambda c: nk.BatchChannelNorm2d(c, 4, estimate=True, estimate_rate=0.01),
            ),
        ),
    ]
    print(f"8x8 digits: {len(data[1])} train / {len(data[3])} test, {args.epochs} epochs")
    print(f"{'layers':<46} {'batch':>5} {'test acc':>9} {'time':>7}")
    for name, batch, build in settings:
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        acc = train_and_test(build(), batch, args.epochs, data, args.seed)
        print(f"{name:<46} {batch:>5} {acc:>9.3f} {time.perf_counter() - start:>6.1f}s")


if __name__ == "__main__":
    main()
