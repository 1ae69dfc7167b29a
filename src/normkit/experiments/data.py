"""The studies' data: scikit-learn's bundled 8x8 digits and fixed, seeded variants of it.

``load_digits`` ships inside scikit-learn, so nothing is downloaded and nothing is cached on
disk. Every study starts from the same split, :func:`digits_split` (1347 train / 450 test,
stratified, ``random_state=0``), as float32 images in [0, 1] of shape ``(N, 1, 8, 8)`` and int64
labels. The variants are pure functions of their inputs and a seed (a CPU ``torch.Generator``),
so a variant is the same on every machine and in every run that asks for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DOMAINS",
    "NUM_CLASSES",
    "TEST_SIZE",
    "TRAIN_SIZE",
    "Digits",
    "apply_domain",
    "digits_split",
    "gaussian_noise",
    "invert",
    "label_noise",
    "rotate_rescale",
    "subset",
]

NUM_CLASSES = 10
TRAIN_SIZE = 1347
TEST_SIZE = 450
SPLIT_SEED = 0


@dataclass(frozen=True)
class Digits:
    """A train/test split: images ``(N, 1, 8, 8)`` float32 and labels ``(N,)`` int64."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor

    def to(self, device: torch.device | str) -> Digits:
        return Digits(
            *(t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test))
        )


@functools.lru_cache(maxsize=1)
def _split_arrays() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    # Imported here: scikit-learn is an ``experiments`` extra, and slow to import.
    from sklearn.datasets import load_digits  # type: ignore[import-untyped]
    from sklearn.model_selection import train_test_split  # type: ignore[import-untyped]

    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(y)).numpy(),
        test_size=TEST_SIZE,
        stratify=y.numpy(),
        random_state=SPLIT_SEED,
    )
    idx_train_t = torch.as_tensor(idx_train)
    idx_test_t = torch.as_tensor(idx_test)
    return x[idx_train_t], y[idx_train_t], x[idx_test_t], y[idx_test_t]


def digits_split() -> Digits:
    """The fixed split: 1347 train / 450 test, stratified by class, ``random_state=0``.

    Pixel values are scikit-learn's 0..16 divided by 16. Each call returns fresh tensors (the
    split itself is computed once per process, in memory), so callers may modify them.
    """
    return Digits(*(t.clone() for t in _split_arrays()))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def invert(x: Tensor) -> Tensor:
    """Inverted contrast: ``1 - x``."""
    return 1.0 - x


def rotate_rescale(x: Tensor) -> Tensor:
    """Rotated by 90° (counter-clockwise), then rescaled: ``rot90(x) * 3 + 0.5``.

    The result lies in [0.5, 3.5]: a domain that differs from the original in geometry, scale
    and offset at once, so that per-domain normalization statistics differ.
    """
    return torch.rot90(x, 1, dims=(-2, -1)) * 3.0 + 0.5


DOMAINS: dict[str, Callable[[Tensor], Tensor]] = {
    "identity": lambda x: x.clone(),
    "inverted": invert,
    "rotated": rotate_rescale,
}
"""The fixed domain transforms, by name, in their canonical order (domain index = position)."""


def apply_domain(x: Tensor, name: str) -> Tensor:
    """``x`` transformed into the domain ``name`` (a key of :data:`DOMAINS`)."""
    try:
        transform = DOMAINS[name]
    except KeyError:
        raise ValueError(
            f"apply_domain: unknown domain {name!r}; expected one of {', '.join(DOMAINS)}"
        ) from None
    return transform(x)


def label_noise(y: Tensor, rate: float, seed: int, num_classes: int = NUM_CLASSES) -> Tensor:
    """A copy of ``y`` with exactly ``round(rate * len(y))`` labels replaced by a wrong class.

    The corrupted samples are drawn without replacement; each gets a class drawn uniformly among
    the ``num_classes - 1`` classes other than its own, so ``rate`` is the exact fraction of
    wrong labels.
    """
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"label_noise: expected rate in [0, 1], got {rate}")
    g = _generator(seed)
    y = y.clone()
    n = round(rate * len(y))
    idx = torch.randperm(len(y), generator=g)[:n]
    shift = torch.randint(1, num_classes, (n,), generator=g)
    y[idx] = (y[idx] + shift) % num_classes
    return y


def gaussian_noise(x: Tensor, std: float, seed: int) -> Tensor:
    """``x + std * z`` with ``z ~ N(0, 1)`` drawn from ``seed`` (not clamped)."""
    if std < 0:
        raise ValueError(f"gaussian_noise: expected std >= 0, got {std}")
    g = _generator(seed)
    return x + std * torch.randn(x.shape, generator=g, dtype=x.dtype).to(x.device)


def subset(x: Tensor, y: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded subset of ``n`` samples, stratified by class (the whole set if ``n >= len(y)``).

    Each class keeps ``n`` times its share, rounded by largest remainders, so the class balance
    of the subset matches the set's.
    """
    if n <= 0:
        raise ValueError(f"subset: expected n > 0, got {n}")
    if n >= len(y):
        return x.clone(), y.clone()
    g = _generator(seed)
    classes, counts = torch.unique(y, return_counts=True)
    exact = counts.double() * n / len(y)
    take = exact.floor().long()
    order = torch.argsort(exact - take, descending=True, stable=True)
    take[order[: n - int(take.sum())]] += 1
    picked = []
    for c, k in zip(classes.tolist(), take.tolist(), strict=True):
        members = torch.nonzero(y == c).flatten()
        picked.append(members[torch.randperm(len(members), generator=g)[:k]])
    idx = torch.sort(torch.cat(picked)).values
    return x[idx].clone(), y[idx].clone()
