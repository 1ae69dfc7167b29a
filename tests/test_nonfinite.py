"""Non-finite input in training is never written into running statistics.

normkit's policy (docs/integration.md, "Non-finite input"; ``normkit._stats.update_running_``):
a channel whose batch statistics are NaN or Inf keeps its running values (per domain, for
per-domain statistics); other channels, and other domains, update as usual. Refusing such input
would need a host sync in forward; the non-finite output already shows the problem. Only the
statistics that contain the bad value are spoiled: with per-domain statistics, the samples of the
other domains get finite outputs.

Every layer with running statistics is covered (the table test below checks it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit as nk
from tests.layer_table import LAYERS as LAYER_RECORDS

PER_SAMPLE = torch.tensor([0, 1, 0, 1])  # the bad sample (index 1) is in domain 1
INT_DOMAIN = 1

# name -> (factory, input shape, domain: None, "per_sample" or "int")
CASES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...], str | None]] = {
    "sabn2d": (lambda: nk.SandwichBatchNorm2d(4, 2), (4, 4, 3, 3), "per_sample"),
    "sabn1d": (lambda: nk.SandwichBatchNorm1d(4, 2), (4, 4, 3), "per_sample"),
    "sabn3d-split": (
        lambda: nk.SandwichBatchNorm3d(4, 2, split_stats=True),
        (4, 4, 2, 2, 2),
        "per_sample",
    ),
    "sabn2d-split": (
        lambda: nk.SandwichBatchNorm2d(4, 2, split_stats=True),
        (4, 4, 3, 3),
        "per_sample",
    ),
    "sabn2d-split-int": (
        lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True),
        (4, 4, 3, 3),
        "int",
    ),
    "sabn1d-split-flat-cumulative": (
        lambda: nk.SandwichBatchNorm1d(4, 2, split_stats=True, momentum=None),
        (4, 4),
        "per_sample",
    ),
    "ccbn2d-cumulative": (
        lambda: nk.CategoricalConditionalBatchNorm2d(4, 2, momentum=None),
        (4, 4, 3, 3),
        "per_sample",
    ),
    "ccbn3d-split": (
        lambda: nk.CategoricalConditionalBatchNorm3d(4, 2, split_stats=True),
        (4, 4, 2, 2, 2),
        "per_sample",
    ),
    "ccbn1d": (lambda: nk.CategoricalConditionalBatchNorm1d(4, 2), (4, 4, 3), "per_sample"),
    "auxbn2d": (lambda: nk.AuxBatchNorm2d(4, 2), (4, 4, 3, 3), "per_sample"),
    "auxbn3d": (lambda: nk.AuxBatchNorm3d(4, 2), (4, 4, 2, 2, 2), "per_sample"),
    "auxbn1d-int": (lambda: nk.AuxBatchNorm1d(4, 2), (4, 4, 3), "int"),
    "bcn2d": (lambda: nk.BatchChannelNorm2d(4, 2), (4, 4, 3, 3), None),
    "bcn1d-flat": (lambda: nk.BatchChannelNorm1d(4, 2), (4, 4), None),
    "bcn3d-micro": (
        lambda: nk.BatchChannelNorm3d(4, 2, estimate=True),
        (4, 4, 2, 2, 2),
        None,
    ),
    "bcn2d-micro": (lambda: nk.BatchChannelNorm2d(4, 2, estimate=True), (4, 4, 3, 3), None),
    "inputnorm2d": (lambda: nk.InputNorm2d(4), (4, 4, 3, 3), None),
    "inputnorm1d-flat": (lambda: nk.InputNorm1d(4), (4, 4), None),
    "syncbn": (lambda: nk.SyncBatchNorm(4), (4, 4, 3, 3), None),
    "syncbn-flat-cumulative": (lambda: nk.SyncBatchNorm(4, momentum=None), (4, 4), None),
    # renorm / batch-group (BGN with one channel per group here, as the checks below index
    # per-channel buffers; tests/test_batch_group.py covers wider groups).
    "brn2d-relaxed": (
        lambda: nk.BatchRenorm2d(4, warmup_steps=0, r_max_steps=0, d_max_steps=0),
        (4, 4, 3, 3),
        None,
    ),
    "brn1d-flat": (lambda: nk.BatchRenorm1d(4), (4, 4), None),
    "brn3d": (lambda: nk.BatchRenorm3d(4), (4, 4, 2, 2, 2), None),
    "bgn2d-per-channel": (lambda: nk.BatchGroupNorm2d(4, 4), (4, 4, 3, 3), None),
    # iternorm / bnet (IterNorm has no running_var: tests/test_iternorm.py covers it per group).
    "bnet2d": (lambda: nk.BNET2d(4), (4, 4, 3, 3), None),
}
BAD_CHANNEL = 2


def test_every_layer_with_running_statistics_is_covered() -> None:
    with_stats = {
        type(r.make())
        for r in LAYER_RECORDS
        if isinstance(r.make(), _BatchNorm) and r.make().running_mean is not None
    }
    covered = {type(build()) for build, _, _ in CASES.values()}
    assert with_stats <= covered, with_stats - covered


def _domain(kind: str | None) -> tuple[Any, ...]:
    if kind is None:
        return ()
    return (PER_SAMPLE,) if kind == "per_sample" else (INT_DOMAIN,)


def _rows(layer: nn.Module, kind: str | None) -> tuple[list[int], list[int]]:
    """Rows of the running buffers that the bad sample's statistics go to, and the clean rows
    that the batch also updates (per-domain buffers have one row per domain)."""
    if not getattr(layer, "split_stats", False):
        return [0], []
    if kind == "int":
        return [INT_DOMAIN], []
    return [1], [0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", list(CASES))
def test_non_finite_channel_keeps_its_running_statistics(name: str, bad: float) -> None:
    build, shape, kind = CASES[name]
    layer = build()
    args = _domain(kind)
    layer(torch.randn(shape), *args)  # one clean step
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    x_bad = torch.randn(shape)
    x_bad[(1, BAD_CHANNEL) + (0,) * (len(shape) - 2)] = bad  # one value of sample 1, channel 2
    out = layer(x_bad, *args)

    mean, var = layer.running_mean, layer.running_var
    assert torch.isfinite(mean).all() and torch.isfinite(var).all()
    view = (lambda t: t.unsqueeze(0)) if mean.dim() == 1 else (lambda t: t)
    mean, var, before_mean, before_var = map(view, (mean, var, before_mean, before_var))
    spoiled, clean = _rows(layer, kind)
    others = [c for c in range(4) if c != BAD_CHANNEL]
    for row in spoiled:
        assert torch.equal(mean[row, BAD_CHANNEL], before_mean[row, BAD_CHANNEL])
        assert torch.equal(var[row, BAD_CHANNEL], before_var[row, BAD_CHANNEL])
        assert not torch.equal(mean[row, others], before_mean[row, others])  # still updated
    for row in clean:  # another domain's statistics do not hold the bad value: they update
        assert not torch.equal(mean[row, BAD_CHANNEL], before_mean[row, BAD_CHANNEL])
        assert torch.isfinite(mean[row]).all()
    untouched = [r for r in range(mean.shape[0]) if r not in spoiled + clean]
    for row in untouched:  # domains absent from the batch
        assert torch.equal(mean[row], before_mean[row]) and torch.equal(var[row], before_var[row])

    # Outputs: the bad value may spoil its channel (and, in BCN, its group); nothing else.
    if isinstance(layer, nk.BatchChannelNorm2d | nk.BatchChannelNorm1d | nk.BatchChannelNorm3d):
        group = BAD_CHANNEL // (4 // layer.num_groups)
        per_group = 4 // layer.num_groups
        keep = [c for c in range(4) if c // per_group != group]
    else:
        keep = others
    assert torch.isfinite(out[:, keep]).all()
    if clean:  # per-domain statistics: the clean domain's samples are finite everywhere
        assert torch.isfinite(out[PER_SAMPLE == 0]).all()


def test_non_finite_input_in_eval_changes_nothing() -> None:
    layer = nk.SandwichBatchNorm2d(4, 2, split_stats=True)
    layer(torch.randn(4, 4, 3, 3), PER_SAMPLE)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(4, 4, 3, 3)
    x[1, BAD_CHANNEL, 0, 0] = float("nan")
    out = layer.eval()(x, PER_SAMPLE)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())
    # Eval normalizes each value with running statistics: only the bad value itself is NaN.
    assert int(out.isnan().sum()) == 1 and bool(out[1, BAD_CHANNEL, 0, 0].isnan())
