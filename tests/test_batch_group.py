"""Batch Group Normalization: the identities of the method, the formula and the layer's rules.

* G = C is ``nn.BatchNorm2d`` in training (output, gradients, running buffers) and eval;
* a training batch of one sample is ``nn.GroupNorm(G, C)`` with the same affine;
* other G: the literal group-by-group reference of ``tests/reference.py`` (float64: output,
  gradients, running buffers over steps, eval).
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk
from tests.reference import RefBatchGroupNorm

F64 = torch.float64
C = 4


def _x(shape: tuple[int, ...], seed: int, scale: float = 2.0, shift: float = 0.5) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=F64) * scale + shift


def _randomize_affine(*layers: nn.Module, channels: int = C) -> None:
    g = torch.Generator().manual_seed(11)
    w = 1.0 + 0.5 * torch.randn(channels, generator=g, dtype=F64)
    b = 0.5 * torch.randn(channels, generator=g, dtype=F64)
    with torch.no_grad():
        for layer in layers:
            layer.weight.copy_(w)
            layer.bias.copy_(b)


def _grads(
    fn: Any, x: Tensor, params: list[Tensor], seed: int
) -> tuple[Tensor, Tensor, list[Tensor]]:
    """Output, input gradient and gradients of ``params`` of ``fn(x)`` (random cotangent)."""
    x = x.clone().requires_grad_()
    out = fn(x)
    cot = _x(out.shape, 100 + seed, 1.0, 0.0)
    grads = torch.autograd.grad(out, [x, *params], cot)
    return out.detach(), grads[0], list(grads[1:])


def _assert_same(got: tuple[Tensor, Tensor, list[Tensor]], want: Any) -> None:
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    for g, w in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_one_channel_per_group_equals_torch_batch_norm(channels_last: bool) -> None:
    layer = nk.BatchGroupNorm2d(C, C, dtype=F64)
    bn = nn.BatchNorm2d(C, dtype=F64)
    _randomize_affine(layer, bn)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(3):
        x = _x((5, C, 3, 2), step).contiguous(memory_format=fmt)
        got = _grads(layer, x, [layer.weight, layer.bias], step)
        _assert_same(got, _grads(bn, x, [bn.weight, bn.bias], step))
        assert got[0].is_contiguous(memory_format=fmt)
        for key, value in bn.state_dict().items():
            torch.testing.assert_close(layer.state_dict()[key], value, msg=key)
    layer.eval()
    bn.eval()
    x = _x((3, C, 3, 2), 9)
    _assert_same(
        _grads(layer, x, [layer.weight, layer.bias], 9), _grads(bn, x, [bn.weight, bn.bias], 9)
    )


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_a_training_batch_of_one_equals_group_norm(groups: int) -> None:
    channels = 8
    layer = nk.BatchGroupNorm2d(channels, groups, dtype=F64)
    gn = nn.GroupNorm(groups, channels, dtype=F64)
    _randomize_affine(layer, gn, channels=channels)
    x = _x((1, channels, 3, 3), 0)
    got = _grads(layer, x, [layer.weight, layer.bias], 0)
    _assert_same(got, _grads(gn, x, [gn.weight, gn.bias], 0))


@pytest.mark.parametrize(("groups", "momentum"), [(2, 0.1), (1, None), (2, None), (4, 0.3)])
def test_training_and_eval_match_the_reference(groups: int, momentum: float | None) -> None:
    layer = nk.BatchGroupNorm2d(C, groups, momentum=momentum, dtype=F64)
    ref = RefBatchGroupNorm(C, groups, momentum=momentum)
    _randomize_affine(layer)
    w, b = layer.weight, layer.bias
    for step in range(3):
        x = _x((3, C, 2, 3), step)
        got = _grads(layer, x, [w, b], step)
        _assert_same(
            got, _grads(lambda t: ref(t, training=True, weight=w, bias=b), x, [w, b], step)
        )
        assert layer.running_mean.shape == (groups,)
        torch.testing.assert_close(layer.running_mean, ref.running_mean)
        torch.testing.assert_close(layer.running_var, ref.running_var)
    layer.eval()
    x = _x((2, C, 2, 3), 7)
    got = _grads(layer, x, [w, b], 7)
    _assert_same(got, _grads(lambda t: ref(t, training=False, weight=w, bias=b), x, [w, b], 7))


def test_groups_are_consecutive_channels_with_all_their_positions() -> None:
    # Channels 0-1 and 2-3 at very different scales: each pair is standardized as one block.
    layer = nk.BatchGroupNorm2d(C, 2, affine=False, dtype=F64)
    x = _x((4, C, 3, 3), 0, 1.0, 0.0)
    x[:, 2:] = x[:, 2:] * 50 + 20
    y = layer(x)
    for block in (y[:, :2], y[:, 2:]):
        torch.testing.assert_close(block.mean(), torch.tensor(0.0, dtype=F64))
        var = block.var(correction=0)
        assert 0.999 < float(var) <= 1.0  # 1 up to eps
    # Within a group, channels keep their relative offsets (no per-channel standardization).
    assert abs(float(y[:, 2].mean() - y[:, 3].mean())) > 1e-3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck(training: bool) -> None:
    layer = nk.BatchGroupNorm2d(C, 2, dtype=F64).train(training)
    _randomize_affine(layer)
    with torch.no_grad():
        layer.running_mean.copy_(torch.tensor([0.3, -0.4], dtype=F64))
        layer.running_var.copy_(torch.tensor([1.5, 0.7], dtype=F64))
    x = _x((3, C, 2, 2), 0).requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    state = copy.deepcopy(layer.state_dict())

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        layer.load_state_dict(state)  # every evaluation from the same buffers
        out: Tensor = torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))
        return out

    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_running_statistics_are_float32_per_group_for_half_input() -> None:
    layer = nk.BatchGroupNorm2d(C, 2)
    x32 = _x((4, C, 3, 3), 0).float().to(torch.bfloat16).float()
    reference = copy.deepcopy(layer)
    reference(x32)
    out = layer(x32.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert layer.running_var.dtype == torch.float32 and layer.running_var.shape == (2,)
    torch.testing.assert_close(layer.running_mean, reference.running_mean)
    torch.testing.assert_close(layer.running_var, reference.running_var)


def test_one_value_per_group_is_refused_in_training_but_one_per_channel_is_not() -> None:
    x = _x((1, C, 1, 1), 0)
    per_channel = nk.BatchGroupNorm2d(C, C, dtype=F64)
    with pytest.raises(ValueError, match=r"BatchGroupNorm2d: expected more than 1 value per group"):
        per_channel(x)
    assert int(per_channel.num_batches_tracked) == 0
    assert torch.equal(per_channel.running_var, torch.ones(C, dtype=F64))
    layer = nk.BatchGroupNorm2d(C, 2, dtype=F64)
    gn = nn.GroupNorm(2, C, dtype=F64)
    torch.testing.assert_close(layer(x), gn(x))
    assert int(layer.num_batches_tracked) == 1
    per_channel.eval()(x)  # eval takes the running statistics: any batch


def test_non_finite_value_spoils_only_its_group() -> None:
    layer = nk.BatchGroupNorm2d(C, 2)
    layer(torch.randn(4, C, 3, 3))
    before_mean, before_var = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(4, C, 3, 3)
    x[1, 3, 0, 0] = float("nan")  # group 1 (channels 2, 3)
    out = layer(x)
    assert torch.equal(layer.running_mean[1], before_mean[1])
    assert torch.equal(layer.running_var[1], before_var[1])
    assert not torch.equal(layer.running_mean[0], before_mean[0])  # group 0 still updates
    assert torch.isfinite(out[:, :2]).all() and out[:, 2:].isnan().all()


def test_state_dict_round_trip() -> None:
    layer = nk.BatchGroupNorm2d(C, 2, momentum=None, dtype=F64)
    _randomize_affine(layer)
    for step in range(2):
        layer(_x((3, C, 2, 2), step))
    state = layer.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    fresh = nk.BatchGroupNorm2d(C, 2, momentum=None, dtype=F64)
    fresh.load_state_dict(state, strict=True)
    x = _x((3, C, 2, 2), 5)
    torch.testing.assert_close(fresh(x), layer(x))  # the cumulative average continues alike
    for key, value in layer.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    torch.testing.assert_close(fresh.eval()(x), layer.eval()(x))


def test_untracked_layer_uses_batch_statistics_in_eval() -> None:
    layer = nk.BatchGroupNorm2d(C, 2, track_running_stats=False, dtype=F64)
    assert layer.running_mean is None
    x = _x((3, C, 2, 2), 0)
    torch.testing.assert_close(layer.eval()(x), layer.train()(x))


def test_freeze_sync_and_inference_helpers_handle_the_group_statistics() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, C, 1), nk.BatchGroupNorm2d(C, 2))
    model(torch.randn(4, 3, 3, 3))
    norm = model[1]
    x = torch.randn(2, 3, 3, 3)
    want = copy.deepcopy(model).eval()(x)
    nk.freeze_norm(model).train()
    torch.testing.assert_close(model(x), want)
    assert int(norm.num_batches_tracked) == 1 and not norm.weight.requires_grad
    nk.unfreeze_norm(model)
    assert nk.convert_sync(model)[1].sync
    nk.revert_sync(model)
    assert not norm.sync
    # Conv folding repeats each group's statistics over its channels.
    prepared, report = nk.prepare_for_inference(model)
    assert report.folded == [("0", "1")]
    torch.testing.assert_close(prepared(x), want)


def test_registry_names() -> None:
    for name in ("bgn", "BatchGroupNorm", "bgn-2d", "batch_group_norm_2d"):
        layer = nk.create_norm(name, 8, num_groups=4)
        assert type(layer) is nk.BatchGroupNorm2d and layer.num_groups == 4
    assert nk.get_norm_layer("bgn")(64).num_groups == 32


NAN = float("nan")


@pytest.mark.parametrize(
    ("args", "kwargs", "exc", "fragment"),
    [
        ((4, 3), {}, ValueError, "divide num_features=4, got num_groups=3"),
        ((4, 8), {}, ValueError, "divide num_features=4, got num_groups=8"),
        ((4, 0), {}, ValueError, "expected num_groups >= 1, got 0"),
        ((4, 2.0), {}, TypeError, "expected num_groups to be an int, got 2.0"),
        ((0,), {}, ValueError, "expected num_features >= 1, got 0"),
        ((4, 2), {"eps": NAN}, ValueError, "got nan"),
        ((4, 2), {"momentum": -0.5}, ValueError, "momentum in [0, 1] or None, got -0.5"),
        ((4, 2), {"affine": "yes"}, TypeError, "expected affine to be a bool"),
        ((4, 2), {"dtype": torch.long}, TypeError, "floating-point torch.dtype"),
    ],
)
def test_bad_constructor_arguments_are_refused(
    args: tuple[Any, ...], kwargs: dict[str, Any], exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc) as info:
        nk.BatchGroupNorm2d(*args, **kwargs)
    message = str(info.value)
    assert message.startswith("BatchGroupNorm2d: expected") and fragment in message, message


@pytest.mark.parametrize(
    ("bad", "exc", "fragment"),
    [
        (torch.randn(3, C, 2), ValueError, "expected 4D input"),
        (torch.randn(3, C + 2, 2, 2), ValueError, "expected 4 channels"),
        (torch.ones(3, C, 2, 2, dtype=torch.int32), TypeError, "torch.int32"),
    ],
)
def test_bad_input_is_refused_before_any_buffer_changes(
    bad: Tensor, exc: type[Exception], fragment: str
) -> None:
    layer = nk.BatchGroupNorm2d(C, 2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(exc, match=f"BatchGroupNorm2d: .*{fragment}"):
        layer(bad)
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
