"""The layers trace whole under torch.compile(fullgraph=True) and match eager, buffers included."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import normkit as nk

DOMAINS = torch.tensor([0, 1, 2, 0, 1, 2])
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple[Any, ...]]]] = {
    "sabn": (lambda: nk.SandwichBatchNorm2d(4, 3), lambda: (torch.randn(6, 4, 3, 3), DOMAINS)),
    "sabn-split-cumulative": (
        lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True, momentum=None),
        lambda: (torch.randn(6, 4, 3, 3), DOMAINS),
    ),
    "auxbn-int": (lambda: nk.AuxBatchNorm2d(4, 3), lambda: (torch.randn(6, 4, 3, 3), 1)),
    "bcn-estimate": (
        lambda: nk.BatchChannelNorm2d(4, 2, estimate=True),
        lambda: (torch.randn(1, 4, 3, 3),),
    ),
    "bcn-cumulative": (
        lambda: nk.BatchChannelNorm2d(4, 2, momentum=None),
        lambda: (torch.randn(2, 4, 3, 3),),
    ),
    "sandwich-adain": (
        lambda: nk.SandwichAdaIN(4),
        lambda: (torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fullgraph_compile_matches_eager(name: str) -> None:
    build, inputs = CASES[name]
    torch.manual_seed(0)
    layer = build()
    eager = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    for training in (True, True, False):
        layer.train(training)
        eager.train(training)
        args = inputs()
        torch.testing.assert_close(compiled(*args), eager(*args))
        for (key, got), want in zip(layer.state_dict().items(), eager.state_dict().values()):
            torch.testing.assert_close(got, want, msg=key)
