"""Running-statistics conventions, in one place.

* Momentum follows PyTorch: ``running = (1 - m) * running + m * batch_stat``; ``momentum=None``
  is the cumulative average with factor ``1 / num_batches_tracked``, computed as a tensor so that
  forward never reads a Python number from a buffer (``torch.compile(fullgraph=True)`` friendly).
* Layers normalize with the biased batch variance and store the unbiased one,
  ``var * M / (M - 1)`` for ``M`` values per channel, as ``nn.BatchNorm`` does.
* Buffers are updated in place (CUDA-graph safe) and without gradient; statistics are cast to the
  buffer dtype at the very end, so a float32 buffer never sees half-precision arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor


def ema_factor(
    momentum: float | None, num_batches_tracked: Tensor, dtype: torch.dtype = torch.float32
) -> float | Tensor:
    """The weight of the new batch statistic; call after ``num_batches_tracked`` was increased.

    ``dtype`` is the running buffers' dtype, so that a cumulative factor is exact for them.
    """
    if momentum is None:
        return 1.0 / num_batches_tracked.clamp_min(1).to(dtype)
    return momentum


def unbiased_factor(count: int | Tensor) -> float | Tensor:
    """``M / (M - 1)``; 1 where ``M <= 1`` (no unbiased estimate exists, and no update is made)."""
    if isinstance(count, Tensor):
        c = count if count.is_floating_point() else count.to(torch.float32)
        return torch.where(c > 1, c / (c - 1).clamp_min(1), torch.ones_like(c))
    return count / (count - 1) if count > 1 else 1.0


@torch.no_grad()
def update_running_(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var_unbiased: Tensor,
    factor: float | Tensor,
    mask: Tensor | None = None,
) -> None:
    """``running += factor * (batch - running)``, in place, only where ``mask`` is true.

    ``mask`` broadcasts against the buffers (a ``(K, 1)`` mask of present domains, say).
    ``factor`` may be a tensor broadcasting the same way (one cumulative factor per domain).
    """
    if isinstance(factor, Tensor):
        factor = factor.to(running_mean.dtype)
    new_mean = torch.lerp(running_mean, mean.detach().to(running_mean.dtype), factor)
    new_var = torch.lerp(running_var, var_unbiased.detach().to(running_var.dtype), factor)
    if mask is not None:
        new_mean = torch.where(mask, new_mean, running_mean)
        new_var = torch.where(mask, new_var, running_var)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
