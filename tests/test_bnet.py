"""BNET2d: the paper's identities, the folds used at inference, and the layer's own behaviour.

* ``k = 1`` with the identity kernel scaled by γ (bias β) is ``nn.BatchNorm2d`` in training and
  eval; the identity kernel of any ``k`` is ``nn.BatchNorm2d(affine=False)`` at init.
* ``to_conv`` (one depthwise convolution) equals the eval-mode layer everywhere, the border
  included, where a plain zero-padded fold would not; ``prepare_for_inference`` folds the
  normalization into a preceding conv and leaves a plain depthwise conv.
* The float64 formula reference of ``tests/reference.py`` (BN, then an explicit sum over the
  kernel taps): outputs, gradients, running buffers.
* gradcheck and gradgradcheck in float64 (no custom backward: the core's fast paths are checked
  against their reference path by ``tests/test_fast_paths.py``).
* Init (identity, ``zero_init``), checkpoints (official and BN layouts), freeze/unfreeze,
  untracked statistics, empty images, bad arguments.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.modules.batchnorm import _BatchNorm

import normkit as nk
from normkit.layers.bnet import CentredDepthwiseConv2d
from tests.reference import RefBNET

F64 = torch.float64
C = 3


def _x(shape: tuple[int, ...] = (5, C, 6, 7), seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2.0 * torch.randn(shape, generator=g, dtype=F64) + 1.5


def _upstream(shape: tuple[int, ...], seed: int = 11) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _randomized(layer: nk.BNET2d, seed: int = 1) -> nk.BNET2d:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.conv_weight.copy_(torch.randn(layer.conv_weight.shape, generator=g, dtype=F64))
        layer.conv_bias.copy_(torch.randn(layer.conv_bias.shape, generator=g, dtype=F64))
    return layer


def _trained(kernel_size: int, steps: int = 3, **kwargs: Any) -> nk.BNET2d:
    layer = _randomized(nk.BNET2d(C, kernel_size=kernel_size, dtype=F64, **kwargs))
    for step in range(steps):
        layer(_x(seed=100 + step))
    return layer.eval()


def _step(module: nn.Module, x: Tensor, upstream: Tensor) -> tuple[Tensor, Tensor]:
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(upstream)
    assert x.grad is not None
    return out.detach(), x.grad


# --- the identities ---------------------------------------------------------------------------


def test_k1_with_a_scaled_identity_kernel_is_batch_norm_in_training_and_eval() -> None:
    layer = _randomized(nk.BNET2d(C, kernel_size=1, dtype=F64))
    bn = nn.BatchNorm2d(C, dtype=F64)
    with torch.no_grad():
        bn.weight.copy_(layer.conv_weight.reshape(C))
        bn.bias.copy_(layer.conv_bias)
    for step, training in enumerate((True, True, False, True, False)):
        layer.train(training)
        bn.train(training)
        x, up = _x(seed=step), _upstream((5, C, 6, 7), seed=step)
        out, grad = _step(layer, x, up)
        want, want_grad = _step(bn, x, up)
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.conv_weight.grad.reshape(C), bn.weight.grad)
        torch.testing.assert_close(layer.conv_bias.grad, bn.bias.grad)
        for key in ("running_mean", "running_var"):  # equal to float64 rounding
            torch.testing.assert_close(getattr(layer, key), getattr(bn, key), rtol=1e-14, atol=0)
        assert torch.equal(layer.num_batches_tracked, bn.num_batches_tracked)


@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_identity_kernel_of_any_size_is_affine_free_batch_norm_at_init(k: int) -> None:
    layer = nk.BNET2d(C, kernel_size=k, dtype=F64)
    bn = nn.BatchNorm2d(C, affine=False, dtype=F64)
    for training in (True, True, False):
        layer.train(training)
        bn.train(training)
        x, up = _x(), _upstream((5, C, 6, 7))
        out, grad = _step(layer, x, up)
        want, want_grad = _step(bn, x, up)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-14)
        torch.testing.assert_close(grad, want_grad, rtol=0, atol=1e-13)
        torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-14, atol=0)
    # The kernel still learns: every tap sees the normalized neighbourhood.
    assert layer.conv_weight.grad is not None and (layer.conv_weight.grad != 0).all()


def test_zero_init_starts_from_a_zero_output_as_the_official_imagenet_model() -> None:
    layer = nk.BNET2d(C, kernel_size=3, zero_init=True, dtype=F64)
    assert not layer.conv_weight.any() and not layer.conv_bias.any()
    out, _ = _step(layer, _x(), _upstream((5, C, 6, 7)))
    assert not out.any()
    assert layer.conv_weight.grad is not None and layer.conv_weight.grad.abs().sum() > 0
    assert "zero_init=True" in repr(layer)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_to_conv_equals_the_eval_output_everywhere(k: int) -> None:
    layer = _trained(k)
    x = _x((4, C, 5, 6), seed=7)
    conv = layer.to_conv()
    assert isinstance(conv, nn.Conv2d) and isinstance(conv, CentredDepthwiseConv2d)
    assert conv.groups == C and conv.kernel_size == (k, k) and conv.padding == (k // 2, k // 2)
    assert not conv.training
    with torch.no_grad():
        want = layer(x)
        torch.testing.assert_close(conv(x), want, rtol=1e-12, atol=1e-12)
        if k == 1:
            return
        # Why the centre: a plain zero-padded conv with the normalization folded into kernel and
        # bias is right inside the image, and wrong on the border (its padding is x = 0, not
        # x̂ = 0).
        scale = torch.rsqrt(layer.running_var + layer.eps)
        shift = -layer.running_mean * scale
        plain = layer.depthwise_conv()
        plain.weight.mul_(scale.reshape(-1, 1, 1, 1))
        plain.bias.add_((layer.conv_weight.sum(dim=(1, 2, 3))) * shift)
        naive = plain(x)
    p = k // 2
    inner = (slice(None), slice(None), slice(p, -p), slice(p, -p))
    torch.testing.assert_close(naive[inner], want[inner], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(naive, want)


def test_depthwise_conv_applied_to_the_normalized_input_is_the_layer() -> None:
    layer = _trained(3)
    x = _x(seed=3)
    normalized = nn.BatchNorm2d(C, affine=False, dtype=F64).eval()
    normalized.load_state_dict(
        {k: v for k, v in layer.state_dict().items() if not k.startswith("conv_")}
    )
    conv = layer.depthwise_conv()
    assert type(conv) is nn.Conv2d and conv.weight.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(conv(normalized(x)), layer(x), rtol=1e-12, atol=1e-12)


def test_prepare_for_inference_folds_bnet_after_a_conv_and_keeps_the_others() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, C, 3, padding=1),
        nk.BNET2d(C, kernel_size=3),
        nn.ReLU(),
        nk.BNET2d(C, kernel_size=5),  # after a ReLU: nothing to fold into
        nn.Conv2d(C, C, 1),
    ).to(F64)
    for layer in (model[1], model[3]):
        _randomized(layer)
    for step in range(3):
        model(_x((6, 2, 5, 5), seed=step))
    model.eval()
    x = _x((3, 2, 5, 5), seed=9)
    prepared, report = nk.prepare_for_inference(model)
    assert report.folded == [("0", "1")] and report.kept == ["3"]
    assert type(prepared[1]) is nn.Conv2d and prepared[1].groups == C
    assert isinstance(prepared[3], nk.BNET2d)
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-12, atol=1e-12)
    assert isinstance(model[1], nk.BNET2d)  # the original is untouched


def test_prepared_resnet_with_bnet_everywhere_equals_the_eval_model() -> None:
    torch.manual_seed(0)
    model = nk.models.resnet20(norm_layer=nk.get_norm_layer("bnet", kernel_size=3)).to(F64)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(2):
        loss = model(_x((8, 3, 8, 8), seed=step)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x = _x((4, 3, 8, 8), seed=5)
    prepared, report = nk.prepare_for_inference(model)
    assert len(report.folded) == 19 and report.kept == []
    assert not any(isinstance(m, _BatchNorm) for m in prepared.modules())
    with torch.no_grad():
        want = model(x)
        err = (prepared(x) - want).abs().max() / want.abs().max()
    assert err < 1e-12, err.item()


# --- the formula reference ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "momentum"), [(3, 0.1), (5, None), (1, 0.3)], ids=["k3", "k5-cumulative", "k1"]
)
def test_layer_matches_the_formula_reference(k: int, momentum: float | None) -> None:
    layer = _randomized(nk.BNET2d(C, kernel_size=k, momentum=momentum, dtype=F64))
    ref = RefBNET(C, k, eps=layer.eps, momentum=momentum)
    weight = layer.conv_weight.detach().clone().requires_grad_()
    bias = layer.conv_bias.detach().clone().requires_grad_()
    for step, training in enumerate((True, True, False, True)):
        layer.train(training)
        x, up = _x((4, C, 4, 5), seed=step), _upstream((4, C, 4, 5), seed=step)
        out, grad = _step(layer, x, up)
        xb = x.clone().requires_grad_()
        want = ref(xb, training=training, weight=weight, bias=bias)
        want.backward(up)
        torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10, msg=f"step {step}")
        torch.testing.assert_close(grad, xb.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.conv_weight.grad, weight.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.conv_bias.grad, bias.grad, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(layer.running_mean, ref.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-14)
    assert int(layer.num_batches_tracked) == ref.tracked == 3


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck_in_float64(training: bool) -> None:
    layer = _trained(3).train(training)
    buffers = {k: b.clone() for k, b in layer.named_buffers()}
    x = _x((2, C, 3, 4)).requires_grad_()
    params = (
        layer.conv_weight.detach().clone().requires_grad_(),
        layer.conv_bias.detach().clone().requires_grad_(),
    )

    def fn(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        state = {"conv_weight": weight, "conv_bias": bias}
        state.update({k: b.clone() for k, b in buffers.items()})
        out: Tensor = torch.func.functional_call(layer, state, (x,))
        return out

    assert gradcheck(fn, (x, *params))
    assert gradgradcheck(fn, (x, *params))


# --- state, checkpoints, helpers -----------------------------------------------------------------


def test_state_dict_names_and_round_trip() -> None:
    layer = _trained(5, momentum=None)
    state = layer.state_dict()
    assert set(state) == {
        "conv_weight",
        "conv_bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    }
    assert state["conv_weight"].shape == (C, 1, 5, 5) and int(state["num_batches_tracked"]) == 3
    assert layer.weight is None and layer.bias is None  # no BN affine for tools to misread
    fresh = nk.BNET2d(C, kernel_size=5, momentum=None, dtype=F64)
    fresh.load_state_dict(state, strict=True)
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    x = _x(seed=4)
    torch.testing.assert_close(fresh.eval()(x), layer(x), rtol=0, atol=0)
    fresh.train()(x)
    layer.train()(x)
    torch.testing.assert_close(fresh.running_var, layer.running_var, rtol=0, atol=0)


class _OfficialBNET(nn.BatchNorm2d):
    """The official classification ``BNET2d``'s layout and forward, written from its code."""

    def __init__(self, width: int, k: int = 3) -> None:
        super().__init__(width, affine=False)
        self.bnconv = nn.Conv2d(width, width, k, padding=(k - 1) // 2, groups=width, bias=True)

    def forward(self, input: Tensor) -> Tensor:
        out: Tensor = self.bnconv(super().forward(input))
        return out


def test_official_checkpoint_loads_with_the_same_function() -> None:
    torch.manual_seed(0)
    official = _OfficialBNET(C, 5).to(F64)
    official(_x(seed=1))
    layer = nk.BNET2d(C, kernel_size=5, dtype=F64)
    result = layer.load_state_dict(official.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    x = _x(seed=2)
    for training in (False, True):
        with torch.no_grad():
            want = official.train(training)(x)
            torch.testing.assert_close(layer.train(training)(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.running_var, official.running_var, rtol=1e-14, atol=0)


def test_batch_norm_checkpoint_loads_as_the_same_function() -> None:
    bn = nn.BatchNorm2d(C, dtype=F64)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
    bn(_x(seed=1))
    layer = nk.BNET2d(C, kernel_size=3, dtype=F64)
    layer.load_state_dict(bn.state_dict(), strict=True)
    assert layer.conv_weight[:, 0, 1, 1].equal(bn.weight.detach())
    assert int((layer.conv_weight != 0).sum()) == C  # the centre taps only
    x = _x(seed=2)
    for training in (False, True):
        with torch.no_grad():
            want = bn.train(training)(x)
            torch.testing.assert_close(layer.train(training)(x), want, rtol=1e-12, atol=1e-12)


def test_freeze_norm_and_unfreeze_norm() -> None:
    layer = _trained(3).train()
    model = nn.Sequential(layer)
    x = _x(seed=6).requires_grad_()
    expected = copy.deepcopy(layer).eval()(x)
    buffers = [b.clone() for b in layer.buffers()]
    nk.freeze_norm(model)
    model.train()
    assert type(layer).__name__ == "FrozenBNET2d" and not layer.training
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(layer(x[:2]), out[:2], rtol=0, atol=0)  # batch independent
    assert all(torch.equal(a, b) for a, b in zip(buffers, layer.buffers(), strict=True))
    out.square().sum().backward()
    assert x.grad is not None and not layer.conv_weight.requires_grad
    nk.unfreeze_norm(model)
    assert type(layer) is nk.BNET2d and layer.training and layer.conv_weight.requires_grad


def test_convert_sync_marks_bnet_and_revert_sync_unmarks_it() -> None:
    model = nn.Sequential(nn.Conv2d(2, C, 1), nk.BNET2d(C))
    nk.convert_sync(model)
    assert model[1].sync and "sync=True" in repr(model[1])
    nk.revert_sync(model)
    assert not model[1].sync and isinstance(model[1], nk.BNET2d)


def test_untracked_layer_uses_batch_statistics_in_eval_and_cannot_fold() -> None:
    layer = _randomized(nk.BNET2d(C, track_running_stats=False, dtype=F64))
    assert set(layer.state_dict()) == {"conv_weight", "conv_bias"}
    x = _x()
    torch.testing.assert_close(layer.eval()(x), layer.train()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^BNET2d: expected running statistics"):
        layer.to_conv()


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(2, C, 0, 4), (0, C, 3, 3), (3, C, 1, 1)])
def test_images_without_positions_or_samples_and_1x1_images(
    shape: tuple[int, ...], training: bool
) -> None:
    layer = _trained(5).train(training)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(shape, dtype=F64, requires_grad=True)
    out = layer(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad is not None and layer.conv_weight.grad is not None
    changed = any(not torch.equal(v, layer.state_dict()[k]) for k, v in before.items())
    assert changed == (training and x.numel() > C)


def test_registry_names() -> None:
    layer = nk.create_norm("bnet", 8, kernel_size=5)
    assert type(layer) is nk.BNET2d and layer.kernel_size == 5
    assert type(nk.create_norm("BNET-2d", 8)) is nk.BNET2d
    assert nk.get_norm_layer("bnet", zero_init=True)(4).zero_init


@pytest.mark.parametrize(
    ("kwargs", "exc", "fragment"),
    [
        ({"kernel_size": 2}, ValueError, "expected an odd kernel_size"),
        ({"kernel_size": 0}, ValueError, "expected kernel_size >= 1, got 0"),
        ({"kernel_size": 3.0}, TypeError, "expected kernel_size to be an int, got 3.0"),
        ({"kernel_size": True}, TypeError, "expected kernel_size to be an int, got True"),
        ({"zero_init": "yes"}, TypeError, "expected zero_init to be a bool, got 'yes'"),
        ({"eps": -1.0}, ValueError, "expected eps > 0, got -1.0"),
        ({"momentum": -0.5}, ValueError, "expected momentum in [0, 1] or None, got -0.5"),
        ({"track_running_stats": None}, TypeError, "track_running_stats to be a bool"),
    ],
)
def test_bad_constructor_arguments_are_refused(
    kwargs: dict[str, Any], exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc) as info:
        nk.BNET2d(4, **kwargs)
    assert str(info.value).startswith("BNET2d: ") and fragment in str(info.value)
