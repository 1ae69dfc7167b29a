"""A small deterministic training loop that every study reuses (the models stay in the studies).

Determinism comes from three seeds per run, all derived from the run's seed: ``torch.manual_seed``
just before the model is built (:func:`init_seed`), a ``torch.Generator`` that alone shuffles the
training set (:func:`train`), and nothing else random. Seeds pair runs across methods: for a given
seed every method sees the same batches in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Forward",
    "TrainResult",
    "batch_indices",
    "cosine_lr",
    "evaluate",
    "init_seed",
    "sgd",
    "train",
]

Forward = Callable[[nn.Module, Tensor, Sequence[Tensor]], Tensor]
"""``forward(model, x, extras) -> logits``: how a study calls its model on a batch, when the
model needs more than the images (``extras`` are the batch's rows of the tensors passed as
``extras=`` to :func:`train`, e.g. a domain index)."""


def _plain_forward(model: nn.Module, x: Tensor, extras: Sequence[Tensor]) -> Tensor:
    return model(x, *extras)


def init_seed(seed: int) -> None:
    """Seed torch's global generator; call it right before building the model."""
    torch.manual_seed(int(seed))


def batch_indices(
    n: int, batch_size: int, generator: torch.Generator, *, drop_last: bool = False
) -> Iterator[Tensor]:
    """One epoch of shuffled index batches of ``range(n)``, drawn from ``generator``.

    The last batch is kept unless ``drop_last`` (it may be smaller, or of size 1).
    """
    perm = torch.randperm(n, generator=generator)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield perm[start : start + batch_size]


def steps_per_epoch(n: int, batch_size: int, *, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def sgd(
    params: Any,
    lr: float,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    nesterov: bool = False,
) -> torch.optim.SGD:
    """SGD with momentum and weight decay (``params`` may be parameter groups)."""
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


def cosine_lr(
    optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_steps: int = 0, floor: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule: linear warm-up, then cosine from each group's lr to ``floor`` × it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    extras: Sequence[Tensor] = (),
    forward: Forward = _plain_forward,
    batch_size: int = 512,
) -> dict[str, float]:
    """Eval-mode ``accuracy`` (fraction) and mean cross-entropy ``loss`` of ``model`` on (x, y).

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    correct = 0
    loss = 0.0
    try:
        for start in range(0, len(y), batch_size):
            sl = slice(start, start + batch_size)
            logits = forward(model, x[sl], [e[sl] for e in extras])
            loss += float(F.cross_entropy(logits.float(), y[sl], reduction="sum"))
            correct += int((logits.argmax(dim=1) == y[sl]).sum())
    finally:
        model.train(was_training)
    n = max(1, len(y))
    return {"accuracy": correct / n, "loss": loss / n}


@dataclass
class TrainResult:
    """What :func:`train` observed."""

    steps: int = 0
    diverged: bool = False
    """A non-finite loss was seen (training stopped there when ``stop_on_nonfinite``)."""
    final_loss: float = float("nan")
    """Mean training loss over the last epoch run (NaN if it diverged)."""
    first_grad_norm: float = float("nan")
    """Global gradient norm at the very first step (before clipping)."""
    curve: list[float] = field(default_factory=list)
    """Mean training loss per epoch."""
    eval_curve: list[dict[str, float]] = field(default_factory=list)
    """``eval_fn()`` after each epoch, when one is given."""


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    batch_size: int,
    seed: int,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    extras: Sequence[Tensor] = (),
    forward: Forward = _plain_forward,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    drop_last: bool = False,
    clip_grad_norm: float | None = None,
    stop_on_nonfinite: bool = True,
    eval_fn: Callable[[], dict[str, float]] | None = None,
    progress: Callable[[float], None] | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` epochs of shuffled mini-batches of (x, y).

    Batches are drawn from a ``torch.Generator`` seeded with ``seed`` (and nothing else), so
    every model trained with the same seed, data and batch size sees the same batches.
    ``scheduler`` steps once per optimizer step. ``eval_fn`` (if given) is called after every
    epoch for a learning curve; ``progress`` gets the completed fraction, at most about 200 times.
    """
    generator = torch.Generator().manual_seed(int(seed))
    per_epoch = steps_per_epoch(len(y), batch_size, drop_last=drop_last)
    total = max(1, per_epoch * epochs)
    report_every = max(1, total // 200)
    result = TrainResult()
    model.train()
    for _ in range(epochs):
        epoch_loss = torch.zeros((), dtype=torch.float64, device=x.device)
        seen = 0
        for idx in batch_indices(len(y), batch_size, generator, drop_last=drop_last):
            idx = idx.to(x.device)
            logits = forward(model, x[idx], [e[idx] for e in extras])
            loss = loss_fn(logits, y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if result.steps == 0:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                norm = (
                    torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
                    if grads
                    else torch.zeros(())
                )
                result.first_grad_norm = float(norm)
            if clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            result.steps += 1
            epoch_loss += loss.detach().double() * len(idx)
            seen += len(idx)
            if stop_on_nonfinite and result.steps % 50 == 0 and not torch.isfinite(epoch_loss):
                break
            if progress is not None and result.steps % report_every == 0:
                progress(min(1.0, result.steps / total))
        mean_loss = float(epoch_loss) / max(1, seen)
        result.curve.append(mean_loss)
        if not math.isfinite(mean_loss):
            result.diverged = True
            if stop_on_nonfinite:
                break
        if eval_fn is not None:
            result.eval_curve.append(eval_fn())
    result.final_loss = result.curve[-1] if result.curve else float("nan")
    if progress is not None:
        progress(1.0)
    return result
