"""Every fast path equals its reference path: 1e-10 in float64, forward, backward and buffers.

The fast paths (:mod:`normkit._fused`, used by the batch-norm core in training) are switched off
per layer with ``layer.fast = False``, which runs the reference path: the formula written out step
by step through autograd. Each case runs both on the same input and compares the output, the
gradients of the input and of every parameter, and every buffer after the update.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk
from normkit import _fused
from normkit.layers.batch_channel import _BatchChannelNorm
from normkit.layers.core import _BatchNormCore
from tests.layer_table import LAYERS, LayerRecord, layer_params

F64 = torch.float64
TOL: dict[str, float] = {"rtol": 1e-10, "atol": 1e-10}

CORE = [r for r in LAYERS if issubclass(r.cls, (_BatchNormCore, _BatchChannelNorm))]
EXTRA = [
    LayerRecord(
        "sabn2d-no-shared-affine",
        nk.SandwichBatchNorm2d,
        (4, 3),
        ((7, 4, 3, 3),),
        init_kwargs={"affine": False},
        num_domains=3,
    ),
    LayerRecord(
        "sabn2d-cumulative", nk.SandwichBatchNorm2d, (4, 3), ((7, 4, 3, 3),),
        init_kwargs={"momentum": None}, num_domains=3,
    ),
    LayerRecord(
        "sabn2d-untracked", nk.SandwichBatchNorm2d, (4, 3), ((7, 4, 3, 3),),
        init_kwargs={"track_running_stats": False}, num_domains=3,
    ),
    LayerRecord("bcn2d-no-affines", nk.BatchChannelNorm2d, (4, 2), ((7, 4, 3, 3),),
                init_kwargs={"affine": False}),
    LayerRecord("bcn2d-untracked", nk.BatchChannelNorm2d, (4, 2), ((7, 4, 3, 3),),
                init_kwargs={"track_running_stats": False}),
    LayerRecord("syncbn-no-affine", nk.SyncBatchNorm, (4,), ((7, 4, 3, 3),),
                init_kwargs={"affine": False}),
]  # fmt: skip


def _run(layer: nn.Module, args: tuple[Any, ...], upstream: Tensor) -> dict[str, Tensor]:
    x = args[0].detach().clone().requires_grad_(True)
    y = layer(x, *args[1:])
    y.backward(upstream)
    out = {"y": y.detach(), "dx": x.grad.detach() if x.grad is not None else torch.zeros(())}
    for name, p in layer.named_parameters():
        out[f"grad:{name}"] = p.grad.detach() if p.grad is not None else torch.zeros(())
    for name, b in layer.named_buffers():
        out[f"buffer:{name}"] = b.detach().clone()
    return out


def _compare(record: LayerRecord, kind: str | None, *, channels_last: bool = False) -> None:
    fast = record.build().to(F64).train()
    ref = copy.deepcopy(fast)
    ref.fast = False
    args = tuple(a.to(F64) if isinstance(a, Tensor) and a.is_floating_point() else a
                 for a in record.args(kind))  # fmt: skip
    if channels_last:
        args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    g = torch.Generator().manual_seed(7)
    upstream = torch.randn(args[0].shape, generator=g, dtype=F64)
    got, want = _run(fast, args, upstream), _run(ref, args, upstream)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")
    if channels_last:
        assert got["y"].is_contiguous(memory_format=torch.channels_last)


@pytest.fixture(params=["moments", "aten"])
def route(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both routes of a training input, whatever its size (the sample inputs are small): the
    moment-based function wherever it applies, or ATen's batch norm where it applies and the
    reference path elsewhere."""
    threshold = 0 if request.param == "moments" else 1 << 62
    monkeypatch.setattr(_fused, "MOMENT_PATH_MIN_NUMEL", threshold)
    return str(request.param)


@pytest.mark.parametrize(("record", "kind"), layer_params(CORE + EXTRA))
def test_fast_path_equals_reference(record: LayerRecord, kind: str | None, route: str) -> None:
    _compare(record, kind)


@pytest.mark.parametrize(("record", "kind"), layer_params([r for r in CORE + EXTRA if r.is_4d]))
def test_fast_path_equals_reference_channels_last(
    record: LayerRecord, kind: str | None, route: str
) -> None:
    _compare(record, kind, channels_last=True)


def test_the_fast_path_is_taken_exactly_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Large contiguous inputs and per-sample split statistics take the moment-based function;
    small or other layouts (channels_last, (N, C)) ATen's batch norm; eval and ``fast = False``
    neither."""
    calls: list[str] = []

    def counting(name: str) -> Any:
        real = getattr(_fused, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            calls.append(name)
            return real(*a, **k)

        return wrapper

    for name in ("batch_norm_train", "moment_scale_shift"):
        monkeypatch.setattr(f"normkit.layers.core.{name}", counting(name))
    monkeypatch.setattr(_fused, "MOMENT_PATH_MIN_NUMEL", 6 * 4 * 3 * 3)
    small = torch.randn(6, 4, 3, 2)  # below the threshold: ATen's batch norm or the reference
    x = torch.randn(6, 4, 3, 3)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    per_sample = torch.tensor([0, 1, 2, 0, 1, 2])
    off = nk.SandwichBatchNorm2d(4, 3, split_stats=True)
    off.fast = False
    moments, aten = ["moment_scale_shift"], ["batch_norm_train"]
    cases = [
        (nk.SandwichBatchNorm2d(4, 3), x, per_sample, moments),
        (nk.SandwichBatchNorm2d(4, 3), x_cl, per_sample, aten),
        (nk.SandwichBatchNorm2d(4, 3), x, 1, moments),
        (nk.SandwichBatchNorm2d(4, 3), small, 1, aten),
        (nk.SandwichBatchNorm2d(4, 3, split_stats=True), small, per_sample, []),
        (nk.SandwichBatchNorm2d(4, 3), x_cl, 1, aten),
        (nk.SandwichBatchNorm2d(4, 3, split_stats=True), x, 1, moments),
        (nk.SandwichBatchNorm2d(4, 3, split_stats=True), x_cl, 1, aten),
        (nk.SandwichBatchNorm2d(4, 3, split_stats=True), x, per_sample, moments),
        (nk.SandwichBatchNorm2d(4, 3, split_stats=True), x_cl, per_sample, moments),
        (nk.SandwichBatchNorm1d(4, 3), x[:, :, 0, 0], per_sample, aten),
        (nk.SandwichBatchNorm2d(4, 3).eval(), x, per_sample, []),
        (off, x, per_sample, []),
    ]
    for layer, x_in, domain, taken in cases:
        calls.clear()
        layer(x_in, domain)
        assert calls == taken, (layer, domain)


def _reference(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """Batch normalization written out, then a per-(sample, channel) affine."""
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dims, keepdim=True)
    shape = [w.shape[0] if w.dim() == 2 else 1, x.shape[1]] + [1] * (x.dim() - 2)
    return w.reshape(shape) * (x - mean) / torch.sqrt(var + eps) + b.reshape(shape)


@pytest.mark.parametrize("shape", [(5, 3, 4, 2), (4, 3), (3, 2, 5), (2, 3, 2, 2, 2)])
@pytest.mark.parametrize("per_sample", [False, True])
def test_batch_norm_train_matches_the_formula(shape: tuple[int, ...], per_sample: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=F64) * 3 + 1
    wshape = (shape[0], shape[1]) if per_sample else (shape[1],)
    w = torch.randn(wshape, generator=g, dtype=F64)
    b = torch.randn(wshape, generator=g, dtype=F64)
    y, mean, var = _fused.batch_norm_train(x, w, b, 1e-5)
    torch.testing.assert_close(y, _reference(x, w, b, 1e-5), **TOL)
    dims = [0, *range(2, x.dim())]
    torch.testing.assert_close(mean, x.mean(dims), **TOL)
    torch.testing.assert_close(var, x.var(dims, correction=0), **TOL)
    assert not mean.requires_grad and not var.requires_grad


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("shape", [(4, 3, 2, 3), (5, 2)])
def test_batch_norm_train_gradcheck_and_gradgradcheck(
    shape: tuple[int, ...], per_sample: bool
) -> None:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g, dtype=F64) * 2).requires_grad_(True)
    wshape = (shape[0], shape[1]) if per_sample else (shape[1],)
    w = torch.randn(wshape, generator=g, dtype=F64).requires_grad_(True)
    b = torch.randn(wshape, generator=g, dtype=F64).requires_grad_(True)

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return _fused.batch_norm_train(x, w, b, 1e-3)[0]

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_custom_backward_equals_autograd_of_the_formula_channels_last() -> None:
    """The non-contiguous branch of the backward (channels_last), against autograd."""
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=F64).contiguous(
        memory_format=torch.channels_last
    )
    w0 = torch.randn(4, 3, generator=g, dtype=F64)
    b0 = torch.randn(4, 3, generator=g, dtype=F64)
    up = torch.randn(4, 3, 5, 5, generator=g, dtype=F64).contiguous(
        memory_format=torch.channels_last
    )
    grads = []
    for fn in (lambda *a: _fused.batch_norm_train(*a)[0], _reference):
        x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
        y = fn(x, w, b, 1e-5)
        grads.append(torch.autograd.grad(y, (x, w, b), up))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_half_input_keeps_its_dtype_and_gives_float32_statistics(
    dtype: torch.dtype, per_sample: bool
) -> None:
    g = torch.Generator().manual_seed(3)
    x32 = torch.randn(6, 4, 5, 5, generator=g) * 2 + 1
    w = torch.randn((6, 4) if per_sample else (4,), generator=g)
    b = torch.randn(w.shape, generator=g)
    y, mean, var = _fused.batch_norm_train(x32.to(dtype), w, b, 1e-5)
    assert y.dtype == dtype and mean.dtype == torch.float32 and var.dtype == torch.float32
    y32, mean32, var32 = _fused.batch_norm_train(x32.to(dtype).float(), w, b, 1e-5)
    torch.testing.assert_close(mean, mean32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, var32, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), y32, rtol=2e-2, atol=2e-2)
