"""Non-finite input in training is never written into running statistics.

normkit's policy (documented in ``normkit._stats.update_running_``): a channel whose batch
statistics are NaN or Inf keeps its running values; other channels update as usual. Refusing such
input would need a host sync in forward; the non-finite output already shows the problem.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import normkit as nk

LAYERS: dict[str, tuple[Callable[[], nn.Module], bool]] = {
    "sabn": (lambda: nk.SandwichBatchNorm2d(4, 2), True),
    "sabn-split": (lambda: nk.SandwichBatchNorm2d(4, 2, split_stats=True), True),
    "auxbn": (lambda: nk.AuxBatchNorm2d(4, 2), True),
    "ccbn-cumulative": (lambda: nk.CategoricalConditionalBatchNorm2d(4, 2, momentum=None), True),
    "bcn": (lambda: nk.BatchChannelNorm2d(4, 2), False),
    "bcn-micro": (lambda: nk.BatchChannelNorm2d(4, 2, estimate=True), False),
    "inputnorm": (lambda: nk.InputNorm2d(4), False),
    "syncbn": (lambda: nk.SyncBatchNorm(4), False),
}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", list(LAYERS))
def test_non_finite_channel_keeps_its_running_statistics(name: str, bad: float) -> None:
    build, conditional = LAYERS[name]
    layer = build()
    x = torch.randn(4, 4, 3, 3)
    args: tuple[object, ...] = (torch.tensor([0, 1, 0, 1]),) if conditional else ()
    layer(x, *args)  # one clean step
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    x_bad = torch.randn(4, 4, 3, 3)
    x_bad[1, 2, 0, 0] = bad  # channel 2 only
    layer(x_bad, *args)
    mean, var = layer.running_mean, layer.running_var
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    channel = (..., 2)
    assert torch.equal(mean[channel], before_mean[channel])
    assert torch.equal(var[channel], before_var[channel])
    others = (..., [0, 1, 3])
    assert not torch.equal(mean[others], before_mean[others])  # clean channels still update
