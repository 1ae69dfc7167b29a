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
from normkit.layers import core
from normkit.layers.batch_channel import _BatchChannelNorm
from normkit.layers.core import _BatchNormCore
from tests.counting import count_calls
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
    """Large contiguous inputs, and per-sample split statistics in any layout and size, take
    the closed-form moment-based function; other whole-batch statistics (small inputs,
    channels_last, (N, C)) ATen's batch norm; (N, C) inputs with per-sample split statistics
    the generic moment-based function when large and the reference path when small; eval and
    ``fast = False`` none of them."""
    calls: list[str] = []
    for name in ("batch_norm_train", "moment_scale_shift", "norm_affine"):
        count_calls(monkeypatch, core, name, calls)
    monkeypatch.setattr(_fused, "MOMENT_PATH_MIN_NUMEL", 6 * 4 * 3 * 3)
    small = torch.randn(6, 4, 3, 2)  # below the threshold
    x = torch.randn(6, 4, 3, 3)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    small_cl = small.contiguous(memory_format=torch.channels_last)
    per_sample = torch.tensor([0, 1, 2, 0, 1, 2])
    flat, flat_domain = torch.randn(60, 4), torch.arange(60) % 3  # (N, C) above the threshold
    off = nk.SandwichBatchNorm2d(4, 3, split_stats=True)
    off.fast = False
    closed, moments, aten = ["norm_affine"], ["moment_scale_shift"], ["batch_norm_train"]
    split = {"split_stats": True}
    cases = [
        (nk.SandwichBatchNorm2d(4, 3), x, per_sample, closed),
        (nk.SandwichBatchNorm2d(4, 3), small, per_sample, aten),
        (nk.SandwichBatchNorm2d(4, 3), x_cl, per_sample, aten),
        (nk.SandwichBatchNorm2d(4, 3), x, 1, closed),
        (nk.SandwichBatchNorm2d(4, 3), small, 1, aten),
        (nk.SandwichBatchNorm2d(4, 3), x_cl, 1, aten),
        (nk.SandwichBatchNorm2d(4, 3, **split), small, per_sample, closed),
        (nk.SandwichBatchNorm2d(4, 3, **split), small_cl, per_sample, closed),
        (nk.SandwichBatchNorm2d(4, 3, **split), x, 1, closed),
        (nk.SandwichBatchNorm2d(4, 3, **split), x_cl, 1, aten),
        (nk.SandwichBatchNorm2d(4, 3, **split), x, per_sample, closed),
        (nk.SandwichBatchNorm2d(4, 3, **split), x_cl, per_sample, closed),
        (nk.SandwichBatchNorm1d(4, 3), x[:, :, 0, 0], per_sample, aten),
        (nk.SandwichBatchNorm1d(4, 3, **split), flat, flat_domain, moments),
        (nk.SandwichBatchNorm1d(4, 3, **split), small[:, :, 0, 0], per_sample, []),
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


def _group_reference(
    x: Tensor, w: Tensor | None, b: Tensor | None, groups: Tensor | None, k: int, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch normalization over the whole batch, or over the samples of each group, written
    out sample by sample; then the affine. Returns ``(y, mean, var)`` with per-group rows."""
    dims = [0, *range(2, x.dim())]
    if groups is None:
        mean = x.mean(dims)
        var = ((x - _bcast(mean, x)) ** 2).mean(dims)
        mean_n, var_n = mean.expand(x.shape[0], -1), var.expand(x.shape[0], -1)
    else:
        means, variances = [], []
        for j in range(k):
            xs = x[groups == j]
            if xs.shape[0] == 0:
                means.append(torch.zeros(x.shape[1], dtype=x.dtype))
                variances.append(torch.zeros(x.shape[1], dtype=x.dtype))
                continue
            mu = xs.mean(dims)
            means.append(mu)
            variances.append(((xs - _bcast(mu, xs)) ** 2).mean(dims))
        mean, var = torch.stack(means), torch.stack(variances)
        mean_n, var_n = mean[groups], var[groups]
    y = (x - _bcast(mean_n, x)) / torch.sqrt(_bcast(var_n, x) + eps)
    if w is not None and b is not None:
        y = _bcast(w, x) * y + _bcast(b, x)
    return y, mean, var


def _bcast(t: Tensor, x: Tensor) -> Tensor:
    shape = [t.shape[0] if t.dim() == 2 else 1, x.shape[1]] + [1] * (x.dim() - 2)
    return t.reshape(shape)


AFFINES = ["none", "per-channel", "per-sample"]


def _affine(kind: str, n: int, c: int, g: torch.Generator) -> tuple[Tensor | None, ...]:
    if kind == "none":
        return None, None
    shape = (c,) if kind == "per-channel" else (n, c)
    return (torch.randn(shape, generator=g, dtype=F64), torch.randn(shape, generator=g, dtype=F64))


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("shape", [(6, 3, 4, 2), (5, 2, 7), (4, 3, 2, 2, 3)])
def test_norm_affine_matches_the_formula(
    shape: tuple[int, ...], grouped: bool, affine: str
) -> None:
    g = torch.Generator().manual_seed(4)
    # A mean far from zero: the shifted sums must keep the variance exact.
    x = torch.randn(shape, generator=g, dtype=F64) * 3 + 50
    n, c = shape[0], shape[1]
    groups = torch.tensor([0, 2, 0, 2, 2, 0][:n]) if grouped else None  # group 1 absent
    w, b = _affine(affine, n, c, g)
    y, mean, var, count = _fused.norm_affine(x, w, b, 1e-5, groups, 3)
    want_y, want_mean, want_var = _group_reference(x, w, b, groups, 3, 1e-5)
    torch.testing.assert_close(y, want_y, **TOL)
    torch.testing.assert_close(mean, want_mean, **TOL)
    torch.testing.assert_close(var, want_var, **TOL)
    if grouped:
        assert groups is not None
        torch.testing.assert_close(count, torch.bincount(groups, minlength=3).to(F64))
    assert not (mean.requires_grad or var.requires_grad or count.requires_grad)


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("grouped", [False, True])
def test_norm_affine_gradients_equal_autograd_of_the_formula(grouped: bool, affine: str) -> None:
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 3, 4, 3, generator=g, dtype=F64) * 2 + 1
    groups = torch.tensor([0, 1, 0, 1, 1, 0]) if grouped else None
    w0, b0 = _affine(affine, 6, 3, g)
    up = torch.randn(x0.shape, generator=g, dtype=F64)
    results = []
    for fn in (lambda *a: _fused.norm_affine(*a, 1e-3, groups, 2)[0],
               lambda *a: _group_reference(*a, groups, 2, 1e-3)[0]):  # fmt: skip
        leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x0, w0, b0)]
        y = fn(*leaves)
        results.append(torch.autograd.grad(y, [t for t in leaves if t is not None], up))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("grouped", [False, True])
def test_norm_affine_gradcheck_and_gradgradcheck(grouped: bool) -> None:
    g = torch.Generator().manual_seed(6)
    x = (torch.randn(4, 3, 2, 3, generator=g, dtype=F64) * 2).requires_grad_(True)
    w = torch.randn(4, 3, generator=g, dtype=F64).requires_grad_(True)
    b = torch.randn(4, 3, generator=g, dtype=F64).requires_grad_(True)
    groups = torch.tensor([1, 0, 1, 0]) if grouped else None

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return _fused.norm_affine(x, w, b, 1e-3, groups, 2)[0]

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_norm_affine_half_input_keeps_its_dtype_with_float32_statistics(
    dtype: torch.dtype,
) -> None:
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(6, 4, 5, 5, generator=g) * 2 + 1).to(dtype)
    w, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y, mean, var, _ = _fused.norm_affine(x, w, b, 1e-5)
    assert y.dtype == dtype and mean.dtype == torch.float32 and var.dtype == torch.float32
    want_y, want_mean, want_var = _group_reference(
        x.double(), w.double(), b.double(), None, 1, 1e-5
    )
    torch.testing.assert_close(mean, want_mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, want_var.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y.float(), want_y.float(), rtol=2e-2, atol=5e-2)


# Weight standardization: the closed-form function against the reference formula.

WS_CASES = [
    ("conv2d", lambda **k: nk.WSConv2d(3, 4, 3, padding=1, **k), (2, 3, 5, 5)),
    ("conv1d", lambda **k: nk.WSConv1d(3, 4, 2, **k), (2, 3, 6)),
    ("conv3d", lambda **k: nk.WSConv3d(2, 3, 2, **k), (2, 2, 3, 3, 3)),
    ("linear", lambda **k: nk.WSLinear(5, 3, **k), (4, 5)),
    ("grouped", lambda **k: nk.WSConv2d(4, 6, 3, groups=2, **k), (2, 4, 4, 4)),
]
WS_MODES = [
    {"eps_mode": "sqrt", "unbiased": False},
    {"eps_mode": "std", "unbiased": True},
    {"eps_mode": "max", "unbiased": False, "eps": 0.3},  # some filters below the threshold
    {"eps_mode": "max", "unbiased": True, "eps": 1e-4},
]


def _ws_run(layer: nn.Module, x0: Tensor, up: Tensor) -> dict[str, Tensor]:
    x = x0.clone().requires_grad_(True)
    y = layer(x)
    names, params = zip(*layer.named_parameters())
    grads = torch.autograd.grad(y, (x, *params), up)
    return {"y": y.detach(), "dx": grads[0], **dict(zip(names, grads[1:]))}


def _ws_pair(
    make: Any, shape: tuple[int, ...], mode: dict[str, Any]
) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """A float64 WS layer with filters of different spreads and offsets, its reference copy
    (``fast = False``), an input of ``shape`` and an upstream gradient for the output."""
    torch.manual_seed(8)
    fast = make(**mode).to(F64)
    with torch.no_grad():
        fast.weight.mul_(torch.rand(fast.weight.shape[0], *[1] * (fast.weight.dim() - 1),
                                    dtype=F64) * 2).add_(0.3)  # fmt: skip
    ref = copy.deepcopy(fast)
    ref.fast = False
    g = torch.Generator().manual_seed(9)
    x = torch.randn(shape, generator=g, dtype=F64)
    up = torch.randn(ref(x).shape, generator=g, dtype=F64)
    return fast, ref, x, up


@pytest.mark.parametrize("mode", WS_MODES, ids=lambda m: f"{m['eps_mode']}-{m['unbiased']}")
@pytest.mark.parametrize(("name", "make", "shape"), WS_CASES, ids=[c[0] for c in WS_CASES])
def test_ws_fast_path_equals_reference(
    name: str, make: Any, shape: tuple[int, ...], mode: dict[str, Any]
) -> None:
    fast, ref, x, up = _ws_pair(make, shape, mode)
    calls: list[int] = []
    real = _fused.weight_standardize

    def counting(*a: Any, **k: Any) -> Tensor:
        calls.append(1)
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_fused, "weight_standardize", counting)
        got = _ws_run(fast, x, up)
    assert calls, "the fast path was not taken"
    want = _ws_run(ref, x, up)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")


def test_scaled_ws_fast_path_equals_reference() -> None:
    torch.manual_seed(10)
    fast = nk.ScaledWSConv2d(3, 5, 3, padding=1).to(F64)
    with torch.no_grad():
        fast.gain.uniform_(0.5, 1.5)
    ref = copy.deepcopy(fast)
    ref.fast = False
    x = torch.randn(2, 3, 6, 6, dtype=F64)
    up = torch.randn(2, 5, 6, 6, dtype=F64)
    got, want = _ws_run(fast, x, up), _ws_run(ref, x, up)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.parametrize("mode", WS_MODES, ids=lambda m: f"{m['eps_mode']}-{m['unbiased']}")
def test_ws_function_gradcheck_and_gradgradcheck(mode: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(11)
    w = (torch.randn(4, 3, 2, 2, generator=g, dtype=F64) * 0.7 + 0.2).requires_grad_(True)
    eps = mode.get("eps", 1e-5)

    def f(w: Tensor) -> Tensor:
        return _fused.weight_standardize(
            w, eps, unbiased=mode["unbiased"], eps_mode=mode["eps_mode"]
        )

    torch.testing.assert_close(
        f(w),
        nk.functional.weight_standardize(
            w, eps, unbiased=mode["unbiased"], eps_mode=mode["eps_mode"]
        ),
        **TOL,
    )
    assert gradcheck(f, (w,))
    assert gradgradcheck(f, (w,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ws_function_half_weight(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(12)
    w32 = torch.randn(6, 4, 3, 3, generator=g)
    w = w32.to(dtype).requires_grad_(True)
    up = torch.randn(w.shape, generator=g).to(dtype)
    y = _fused.weight_standardize(w, 1e-5)
    (dw,) = torch.autograd.grad(y, w, up)
    assert y.dtype == dtype and dw.dtype == dtype
    w64 = w.detach().double().requires_grad_(True)
    y64 = nk.functional.weight_standardize(w64, 1e-5)
    (dw64,) = torch.autograd.grad(y64, w64, up.double())
    torch.testing.assert_close(y.double(), y64, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw.double(), dw64, rtol=5e-2, atol=5e-2)


def test_ws_fast_path_in_every_eager_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every eager computation of the weight takes the closed form, with or without a
    gradient (so the eval cache equals the training weight bit for bit); ``fast = False``
    and compiled code keep the reference formula."""
    calls = count_calls(monkeypatch, _fused, "weight_standardize")
    layer = nk.WSConv2d(3, 4, 3)
    x = torch.randn(1, 3, 5, 5)
    layer.fast = False
    layer(x)
    torch.compile(layer, backend="eager", fullgraph=True)(x)
    assert calls == []
    layer.fast = True
    with torch.no_grad():
        layer(x)
    layer(x)
    assert len(calls) == 2
    train_weight = layer.standardized_weight()
    with torch.no_grad():
        cached = layer.eval().standardized_weight()
    assert torch.equal(cached, train_weight)


@pytest.mark.parametrize(
    ("split", "domain"),
    [(False, "per_sample"), (True, "per_sample"), (False, "int")],
)
def test_create_graph_gradient_uses_the_layers_eps(split: bool, domain: str, route: str) -> None:
    """Under ``create_graph=True`` the fast paths' backward differentiates the reference
    formula; it must use the layer's eps, not the default, so that the first-order gradient is
    the plain backward's and the reference path's. (A generic test compares the two backward
    routes at the default eps, where a hard-coded 1e-5 is invisible; eps 0.5 here.)"""
    layer = nk.SandwichBatchNorm2d(4, 3, eps=0.5, split_stats=split, dtype=F64)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    x = torch.randn(6, 4, 3, 3, generator=g, dtype=F64) * 0.7 + 0.3
    up = torch.randn(x.shape, generator=g, dtype=F64)
    index: int | Tensor = torch.tensor([0, 1, 2, 0, 1, 2]) if domain == "per_sample" else 1
    state = copy.deepcopy(layer.state_dict())

    def grads(fast: bool, create_graph: bool) -> tuple[Tensor, ...]:
        layer.load_state_dict(state)
        layer.fast = fast
        xs = x.clone().requires_grad_()
        out = layer(xs, index)
        inputs = [xs, *layer.parameters()]
        return torch.autograd.grad(out, inputs, up, create_graph=create_graph)

    want = grads(fast=False, create_graph=False)
    for create_graph in (False, True):
        for got, ref in zip(grads(fast=True, create_graph=create_graph), want, strict=True):
            torch.testing.assert_close(got.detach(), ref, **TOL)
