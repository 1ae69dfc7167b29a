"""Batch-Channel Normalization against the literal two-stage reference and its identities."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normkit as nk
from tests.reference import RefBCN, group_standardize

F64 = torch.float64
CLASSES = {1: nk.BatchChannelNorm1d, 2: nk.BatchChannelNorm2d, 3: nk.BatchChannelNorm3d}
SHAPES = {1: (5, 8, 3), 2: (5, 8, 3, 3), 3: (5, 8, 2, 3, 2)}


def _randomize(layer: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _params(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {n: getattr(layer, n) for n in ("weight", "bias", "group_weight", "group_bias")}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("group_affine", ["per_group", "per_channel"])
@pytest.mark.parametrize("estimate", [False, True])
def test_matches_literal_two_stage_reference_over_steps(
    dim: int, group_affine: str, estimate: bool
) -> None:
    layer = CLASSES[dim](
        8, 4, group_affine=group_affine, estimate=estimate, estimate_rate=0.3, dtype=F64
    )
    _randomize(layer)
    ref = RefBCN(8, 4, estimate=estimate, rate=0.3)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        x = torch.randn(SHAPES[dim], generator=gen, dtype=F64) * 2 + step
        for training in (True, False):
            layer.train(training)
            got = layer(x)
            want = ref(x, training=training, **_params(layer))
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 4


def test_2d_input_of_1d_layer_matches_reference() -> None:
    layer = nk.BatchChannelNorm1d(8, 2, dtype=F64)
    _randomize(layer)
    ref = RefBCN(8, 2)
    x = torch.randn(6, 8, dtype=F64)
    torch.testing.assert_close(layer(x), ref(x, training=True, **_params(layer)))


@pytest.mark.parametrize("group_affine", ["per_group", "per_channel"])
def test_channel_part_equals_group_norm(group_affine: str) -> None:
    # With running statistics (0, 1 - eps) and an identity batch affine, the batch part is the
    # identity, so the eval output is the channel part alone.
    eps = 1e-5
    layer = nk.BatchChannelNorm2d(8, 4, eps=eps, group_affine=group_affine, dtype=F64).eval()
    layer.running_var.fill_(1 - eps)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.group_weight.copy_(torch.randn(layer.group_weight.shape, generator=g))
        layer.group_bias.copy_(torch.randn(layer.group_bias.shape, generator=g))
    x = torch.randn(3, 8, 4, 4, dtype=F64) * 2 + 1
    if group_affine == "per_channel":
        want = TF.group_norm(x, 4, layer.group_weight, layer.group_bias, eps)
    else:
        gn = TF.group_norm(x, 4, None, None, eps).reshape(3, 4, -1)
        want = gn * layer.group_weight.reshape(1, 4, 1) + layer.group_bias.reshape(1, 4, 1)
        want = want.reshape(x.shape)
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_large_batch_train_equals_batchnorm_then_channel_part() -> None:
    layer = nk.BatchChannelNorm2d(8, 2, dtype=F64)
    _randomize(layer)
    bn = nn.BatchNorm2d(8, dtype=F64)
    with torch.no_grad():
        bn.weight.copy_(layer.weight)
        bn.bias.copy_(layer.bias)
    x = torch.randn(4, 8, 3, 3, dtype=F64)
    z = group_standardize(bn(x), 2, 1e-5).reshape(4, 2, -1)
    want = (z * layer.group_weight.reshape(1, 2, 1) + layer.group_bias.reshape(1, 2, 1)).reshape(
        x.shape
    )
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, bn.running_var)
    layer.eval()
    bn.eval()
    x = torch.randn(2, 8, 3, 3, dtype=F64)
    z = group_standardize(bn(x), 2, 1e-5).reshape(2, 2, -1)
    want = (z * layer.group_weight.reshape(1, 2, 1) + layer.group_bias.reshape(1, 2, 1)).reshape(
        x.shape
    )
    torch.testing.assert_close(layer(x), want, rtol=1e-12, atol=1e-12)


def test_micro_batch_rate_one_normalizes_with_the_batch_mean() -> None:
    layer = nk.BatchChannelNorm2d(8, 8, estimate=True, estimate_rate=1.0, dtype=F64)
    x = torch.randn(2, 8, 3, 3, dtype=F64) * 2 + 3
    batch_mean = x.mean(dim=(0, 2, 3))
    batch_var = x.var(dim=(0, 2, 3), unbiased=False)
    first = layer(x)
    torch.testing.assert_close(layer.running_mean, batch_mean)
    # The first variance is centred on the old estimate (0), so it is the raw second moment.
    torch.testing.assert_close(layer.running_var, (x**2).mean(dim=(0, 2, 3)))
    second = layer(x)
    torch.testing.assert_close(layer.running_mean, batch_mean)
    torch.testing.assert_close(layer.running_var, batch_var)
    bn = nn.BatchNorm2d(8, dtype=F64)
    want = group_standardize(bn(x), 8, 1e-5)
    torch.testing.assert_close(second, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(first, second)


def test_micro_batch_tiny_rate_makes_train_approach_eval() -> None:
    layer = nk.BatchChannelNorm2d(8, 4, estimate=True, estimate_rate=1e-9, dtype=F64)
    _randomize(layer)
    x = torch.randn(1, 8, 4, 4, dtype=F64) * 5 + 2
    train_out = layer(x)
    layer.eval()
    torch.testing.assert_close(train_out, layer(x), rtol=1e-7, atol=1e-7)


def test_micro_batch_no_gradient_through_estimates() -> None:
    layer = nk.BatchChannelNorm2d(8, 4, estimate=True, estimate_rate=0.5, dtype=F64)
    _randomize(layer)
    x = torch.randn(1, 8, 3, 3, dtype=F64, requires_grad=True)
    w = torch.randn(1, 8, 3, 3, dtype=F64)
    (gx_train,) = torch.autograd.grad((layer(x) * w).sum(), x)
    layer.eval()  # the estimates are now fixed constants: eval computes the same function
    (gx_eval,) = torch.autograd.grad((layer(x) * w).sum(), x)
    torch.testing.assert_close(gx_train, gx_eval, rtol=1e-12, atol=1e-12)
    # BN's gradient through batch statistics is different.
    bn_like = nk.BatchChannelNorm2d(8, 4, dtype=F64)
    bn_like.load_state_dict(layer.state_dict())
    xx = torch.randn(2, 8, 3, 3, dtype=F64, requires_grad=True)
    (g_bn,) = torch.autograd.grad((bn_like(xx) * w).sum(), xx)
    layer.train()
    (g_est,) = torch.autograd.grad((layer(xx) * w).sum(), xx)
    assert not torch.allclose(g_bn, g_est)


def test_micro_batch_gradient_accumulation_over_several_forwards() -> None:
    # Micro-batch training runs several forwards before one backward; each forward updates the
    # estimates in place, which must not break the earlier graphs.
    layer = nk.BatchChannelNorm2d(8, 4, estimate=True, estimate_rate=0.1)
    loss = sum(layer(torch.randn(1, 8, 3, 3)).square().sum() for _ in range(3))
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_micro_batch_accepts_a_batch_of_one_value_per_channel() -> None:
    layer = nk.BatchChannelNorm1d(8, 4, estimate=True)
    out = layer(torch.randn(1, 8))
    assert out.shape == (1, 8) and torch.isfinite(out).all()


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_rate_outside_unit_interval_is_refused(rate: float) -> None:
    with pytest.raises(ValueError, match=r"BatchChannelNorm2d: expected estimate_rate in \(0, 1\]"):
        nk.BatchChannelNorm2d(8, 4, estimate=True, estimate_rate=rate)


def test_constructor_errors() -> None:
    with pytest.raises(ValueError, match="num_groups to divide num_features=10, got num_groups=4"):
        nk.BatchChannelNorm2d(10, 4)
    with pytest.raises(ValueError, match="group_affine in"):
        nk.BatchChannelNorm2d(8, 4, group_affine="per_sample")
    with pytest.raises(ValueError, match="track_running_stats=True with estimate=True"):
        nk.BatchChannelNorm2d(8, 4, estimate=True, track_running_stats=False)
    with pytest.raises(TypeError, match="estimate_rate to be a float"):
        nk.BatchChannelNorm2d(8, 4, estimate_rate="fast")  # type: ignore[arg-type]


def test_batchnorm_state_dict_loads_into_batch_part() -> None:
    bn = nn.BatchNorm2d(8)
    bn(torch.randn(4, 8, 3, 3))
    layer = nk.BatchChannelNorm2d(8, 4)
    result = layer.load_state_dict(bn.state_dict(), strict=False)
    assert sorted(result.missing_keys) == ["group_bias", "group_weight"]
    assert result.unexpected_keys == []
    assert torch.equal(layer.running_mean, bn.running_mean)
    assert layer.group_weight.shape == (4,)
    assert nk.BatchChannelNorm2d(8, 4, group_affine="per_channel").group_weight.shape == (8,)


@pytest.mark.parametrize("group_affine", ["per_group", "per_channel"])
@pytest.mark.parametrize("mode", ["train", "eval", "estimate"])
def test_gradcheck(group_affine: str, mode: str) -> None:
    layer = nk.BatchChannelNorm2d(
        4, 2, group_affine=group_affine, estimate=mode == "estimate", estimate_rate=0.5, dtype=F64
    )
    _randomize(layer)
    x = torch.randn(3, 4, 2, 2, dtype=F64, requires_grad=True)
    if mode == "estimate":
        # The estimates depend on x without gradient by design, so finite differences of a
        # training forward would see that dependence. Check the function the gradient is taken
        # of: normalization with the (updated) estimates held fixed, which is what eval computes
        # (test_micro_batch_no_gradient_through_estimates shows train and eval gradients agree).
        layer(x.detach() * 2 + 1)
    layer.train(mode == "train")
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    buffers = {n: b.clone() for n, b in layer.named_buffers()}

    def fn(inp: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        # Reset the estimates each call, so the finite differences see one function.
        with torch.no_grad():
            for n, b in layer.named_buffers():
                b.copy_(buffers[n])
        return torch.func.functional_call(layer, dict(zip(names, ps)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params))


def test_gradgradcheck_large_batch() -> None:
    layer = nk.BatchChannelNorm2d(4, 2, dtype=F64)
    x = torch.randn(3, 4, 2, 2, dtype=F64, requires_grad=True)
    assert torch.autograd.gradgradcheck(layer, (x,))


def test_half_precision_keeps_float32_estimates() -> None:
    x = torch.randn(2, 8, 4, 4) * 3 + 1
    ref = nk.BatchChannelNorm2d(8, 4, estimate=True, estimate_rate=0.5)
    ref(x)
    for dtype in (torch.bfloat16, torch.float16):
        low = nk.BatchChannelNorm2d(8, 4, estimate=True, estimate_rate=0.5)
        y = low(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert low.running_var.dtype == torch.float32
        torch.testing.assert_close(low.running_mean, ref.running_mean, rtol=0, atol=2e-2)
        torch.testing.assert_close(low.running_var, ref.running_var, rtol=2e-2, atol=2e-2)
