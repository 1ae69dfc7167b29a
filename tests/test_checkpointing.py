"""Activation checkpointing (``torch.utils.checkpoint``): the gradients of every layer are exact.

``torch.utils.checkpoint`` runs a layer's forward a second time inside the backward. For every
record of the layer table, a checkpointed training forward and backward (both modes,
``use_reentrant=False`` and ``True``) give the output, input gradients and parameter gradients of
the plain one, in float64 to 1e-12, with normkit's compiled kernels off and on.

Buffers: layers whose training output depends on state their forward updates (BatchRenorm's r and
d, BCN's micro-batch estimates, MABN's moving averages) replay the first forward in the
recomputation (its state, no update): their buffers, step counter included, equal the plain
run's. The other layers normalize with batch statistics in training and, like
``nn.BatchNorm2d``, may update their running statistics again in the recomputation (checked
against ``nn.BatchNorm2d`` itself); their gradients do not depend on it.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import normkit as nk
from normkit import kernels
from normkit.layers.batch_channel import _BatchChannelNorm
from normkit.layers.core import _BatchNormCore
from normkit.layers.mabn import MovingAverageBatchNorm2d
from normkit.layers.renorm import _BatchRenorm
from tests.counting import count_calls
from tests.layer_table import LayerRecord, layer_params

F64 = torch.float64
MODES = {"non-reentrant": False, "reentrant": True}


def _replays(layer: nn.Module) -> bool:
    """Whether the layer's training output depends on state its forward updates."""
    if isinstance(layer, _BatchChannelNorm):
        return layer.estimate
    return isinstance(layer, (_BatchRenorm, MovingAverageBatchNorm2d))


def _float_args(args: tuple[Any, ...]) -> list[Any]:
    return [
        a.to(F64).requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a
        for a in args
    ]


def _step(layer: nn.Module, args: list[Any], reentrant: bool | None, seed: int = 0) -> Tensor:
    """One training forward (checkpointed unless ``reentrant`` is None); returns the loss."""
    if reentrant is None:
        y = layer(*args)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reentrant mode's "inputs have requires_grad"
            y = checkpoint(layer, *args, use_reentrant=reentrant)
    g = torch.Generator().manual_seed(100 + seed)
    return (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()


def _results(layer: nn.Module, args: list[Any], out: Tensor) -> dict[str, Any]:
    return {
        "out": out.detach(),
        "input_grads": [a.grad for a in args if isinstance(a, Tensor) and a.requires_grad],
        "param_grads": {n: p.grad for n, p in layer.named_parameters()},
        "buffers": {n: b.clone() for n, b in layer.named_buffers()},
    }


def _run(rec: LayerRecord, kind: str | None, reentrant: bool | None) -> dict[str, Any]:
    layer = rec.build().to(F64).train()
    args = _float_args(rec.args(kind))
    if reentrant is None:
        y = layer(*args)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y = checkpoint(layer, *args, use_reentrant=reentrant)
    g = torch.Generator().manual_seed(7)
    (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum().backward()
    return {**_results(layer, args, y), "replays": _replays(layer)}


EXACT = {"rtol": 1e-12, "atol": 1e-12}


def _assert_same(got: dict[str, Any], want: dict[str, Any], buffers: bool) -> None:
    torch.testing.assert_close(got["out"], want["out"], **EXACT)
    for a, b in zip(got["input_grads"], want["input_grads"], strict=True):
        torch.testing.assert_close(a, b, **EXACT, msg="input gradient")
    for name, grad in want["param_grads"].items():
        torch.testing.assert_close(got["param_grads"][name], grad, **EXACT, msg=name)
    if buffers:
        for name, buf in want["buffers"].items():
            torch.testing.assert_close(got["buffers"][name], buf, **EXACT, msg=name)


@contextlib.contextmanager
def _kernels(on: bool) -> Iterator[None]:
    if on:
        kernels.enable()
    try:
        yield
    finally:
        if on:
            kernels.disable()


# The compiled kernels cover the batch-norm core and BCN: the other layers run once, without.
CHECKPOINT_CASES = [
    pytest.param(*case.values, on, id=f"{case.id}-{kid}")
    for case in layer_params()
    for on, kid in ((False, "pytorch"), (True, "kernels"))
    if not on or issubclass(case.values[0].cls, (_BatchNormCore, _BatchChannelNorm))
]


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("record", "kind", "kernels_on"), CHECKPOINT_CASES)
def test_checkpointed_training_step_has_the_plain_gradients(
    record: LayerRecord, kind: str | None, mode: str, kernels_on: bool
) -> None:
    with _kernels(kernels_on):
        want = _run(record, kind, None)
        got = _run(record, kind, MODES[mode])
    _assert_same(got, want, buffers=want["replays"])


REPLAYING = {
    "brn": lambda: nk.BatchRenorm2d(
        4, momentum=0.5, r_max=3, d_max=5, warmup_steps=0, r_max_steps=0, d_max_steps=0, dtype=F64
    ),
    # The schedule's ramp: the limits move with the step counter.
    "brn-ramp": lambda: nk.BatchRenorm2d(
        4, momentum=0.5, r_max=3, d_max=5, warmup_steps=1, r_max_steps=4, d_max_steps=3, dtype=F64
    ),
    "bcn-estimate": lambda: nk.BatchChannelNorm2d(
        4, 2, estimate=True, estimate_rate=0.5, dtype=F64
    ),
    "mabn": lambda: MovingAverageBatchNorm2d(
        4, momentum=0.3, buffer_size=2, warmup_iters=0, r_clamp_steps=0, dtype=F64
    ),
}


def _batch(seed: int, n: int = 3) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 3, 3, generator=g, dtype=F64) * (1 + seed) + seed).requires_grad_()


def _train(
    layer: nn.Module, reentrant: bool | None, steps: int, per_step: int
) -> list[dict[str, Any]]:
    """``steps`` optimizer-free steps of ``per_step`` micro-batches each (gradient
    accumulation: every micro-batch's forward, then one backward of their summed losses)."""
    out = []
    for step in range(steps):
        xs = [_batch(step * per_step + i) for i in range(per_step)]
        loss = sum(_step(layer, [x], reentrant, seed=i) for i, x in enumerate(xs))
        assert isinstance(loss, Tensor)
        loss.backward()
        out.append({
            "dx": [x.grad for x in xs],
            "grads": {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None},
            "buffers": {n: b.clone() for n, b in layer.named_buffers()},
        })  # fmt: skip
        layer.zero_grad()
    return out


# Of these layers only BCN's training forward has a compiled kernel.
REPLAY_CASES = [pytest.param(name, False, id=f"{name}-pytorch") for name in REPLAYING] + [
    pytest.param("bcn-estimate", True, id="bcn-estimate-kernels")
]


@pytest.mark.parametrize("per_step", [1, 3], ids=["one-micro-batch", "accumulate-3"])
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(("name", "kernels_on"), REPLAY_CASES)
def test_stateful_layers_replay_over_steps_and_accumulation(
    name: str, mode: str, per_step: int, kernels_on: bool
) -> None:
    """Several steps (the state moves between them), with several checkpointed micro-batches
    awaiting one backward: each recomputation finds its own forward's state."""
    calls = []
    mp = pytest.MonkeyPatch()
    if kernels_on:
        calls = count_calls(mp, _BatchChannelNorm, "_kernel_forward", when=lambda y: y is not None)
    try:
        with _kernels(kernels_on):
            plain = REPLAYING[name]()
            wrapped = copy.deepcopy(plain)
            want = _train(plain, None, steps=3, per_step=per_step)
            got = _train(wrapped, MODES[mode], steps=3, per_step=per_step)
    finally:
        mp.undo()
    if kernels_on:
        # Every first forward ran the kernel, and so did every recomputation in reentrant
        # mode (non-reentrant mode stops a recomputation inside the call, once the kernel has
        # saved its tensors for backward).
        assert len(calls) == 3 * per_step * (3 if MODES[mode] else 2)
    for step, (a, b) in enumerate(zip(want, got, strict=True)):
        for x_a, x_b in zip(a["dx"], b["dx"], strict=True):
            torch.testing.assert_close(x_b, x_a, **EXACT, msg=f"step {step}: dx")
        for key in ("grads", "buffers"):
            for n, t in a[key].items():
                torch.testing.assert_close(b[key][n], t, **EXACT, msg=f"step {step}: {n}")


def test_batch_statistics_layers_update_like_torch_batchnorm() -> None:
    """A layer normalizing with batch statistics behaves as ``nn.BatchNorm2d`` does under
    reentrant checkpointing: the running statistics see the recomputation too (the gradients
    do not). (Non-reentrant mode stops a recomputation once the tensors saved for backward
    are back, which may come before the update.)"""
    torch.manual_seed(0)
    ours, theirs = nk.SyncBatchNorm(4, dtype=F64), nn.BatchNorm2d(4, dtype=F64)
    for layer in (ours, theirs):
        x = _batch(0)
        _step(layer, [x], True).backward()
    assert int(theirs.num_batches_tracked) == 2  # torch's own: updated twice
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, key), getattr(theirs, key), **EXACT)


def test_a_plain_training_forward_remembers_nothing() -> None:
    """Only a forward that may be recomputed (gradients off, or saved tensors hooked) stashes
    its state for a replay."""
    from normkit import _stats

    layer = REPLAYING["brn"]()
    layer(_batch(0)).sum().backward()
    assert layer not in _stats._REPLAY
    _step(layer, [_batch(1)], False).backward()
    assert len(_stats._REPLAY[layer]) == 1
    for step in range(_stats.REPLAY_DEPTH + 3):
        with torch.no_grad():
            layer(_batch(step))
    assert len(_stats._REPLAY[layer]) == _stats.REPLAY_DEPTH
