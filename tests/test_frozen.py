"""FrozenBatchNorm2d: the eval-mode batch norm, frozen, with everything in buffers.

Identities (related-methods §3.6): frozen ≡ the eval-mode original (``from_batch_norm`` of a
trained BN, several affine and statistics settings, float64); no parameter requires grad (there
are none) while the gradient flows to the input; BN → frozen → state dict → BN round-trips. Then
the model helpers: ``convert_sync``, ``convert_norm``, ``freeze_norm`` / ``unfreeze_norm`` and
``prepare_for_inference`` treat it as a frozen norm.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk
from normkit.models import imagenet_resnet
from tests.reference import ref_frozen_bn

F64 = torch.float64
C = 6


def _x(shape: tuple[int, ...] = (4, C, 3, 3), dtype: torch.dtype = F64, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).to(dtype)


def _trained(bn: nn.Module, steps: int = 3) -> nn.Module:
    """``bn`` after a few SGD steps in training: statistics and affine away from their init."""
    params = [p for p in bn.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.5) if params else None
    for step in range(steps):
        x = _x(dtype=next(bn.buffers()).dtype, seed=10 + step) * (step + 1)
        loss = (bn(x) * _x(dtype=x.dtype, seed=20 + step)).sum()
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
    return bn.eval()


BATCH_NORMS: dict[str, Callable[[], nn.Module]] = {
    "bn": lambda: nn.BatchNorm2d(C, dtype=F64),
    "bn-eps": lambda: nn.BatchNorm2d(C, eps=0.1, dtype=F64),
    "bn-no-affine": lambda: nn.BatchNorm2d(C, affine=False, dtype=F64),
    "bn-cumulative": lambda: nn.BatchNorm2d(C, momentum=None, dtype=F64),
    "torch-syncbn": lambda: nn.SyncBatchNorm(C, dtype=F64),
    "normkit-syncbn": lambda: nk.SyncBatchNorm(C, dtype=F64),
    "normkit-syncbn-no-affine": lambda: nk.SyncBatchNorm(C, affine=False, dtype=F64),
    "freeze_norm-frozen": lambda: nk.freeze_norm(nn.BatchNorm2d(C, dtype=F64)),
}


@pytest.mark.parametrize("name", list(BATCH_NORMS))
def test_from_batch_norm_equals_the_eval_mode_original(name: str) -> None:
    bn = BATCH_NORMS[name]()
    if name == "freeze_norm-frozen":  # frozen: give it trained statistics by hand
        with torch.no_grad():
            bn.running_mean.copy_(_x((C,), seed=1))
            bn.running_var.copy_(_x((C,), seed=2).abs() + 0.1)
            bn.weight.copy_(_x((C,), seed=3))
    bn = _trained(bn)
    frozen = nk.FrozenBatchNorm2d.from_batch_norm(bn)
    assert frozen.eps == bn.eps and frozen.running_mean.dtype == F64
    x = _x().requires_grad_()
    up = _x(seed=5)
    want = bn(x)
    (want_dx,) = torch.autograd.grad(want, x, up)
    for training in (False, True):  # frozen: training changes nothing
        got = frozen.train(training)(x)
        (dx,) = torch.autograd.grad(got, x, up)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)
    if bn.weight is None:
        assert torch.equal(frozen.weight, torch.ones(C, dtype=F64))
        assert torch.equal(frozen.bias, torch.zeros(C, dtype=F64))


def test_matches_the_two_stage_reference_and_never_changes_its_buffers() -> None:
    layer = nk.FrozenBatchNorm2d(C, eps=1e-3, dtype=F64)
    with torch.no_grad():
        for seed, b in enumerate(layer.buffers()):
            b.copy_(_x((C,), seed=seed))
        layer.running_var.abs_().add_(0.2)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = _x().requires_grad_()
    up = _x(seed=7)
    for training in (True, False):
        layer.train(training)
        y = layer(x)
        (dx,) = torch.autograd.grad(y, x, up)
        x_ref = x.detach().clone().requires_grad_()
        want = ref_frozen_bn(
            x_ref, layer.weight, layer.bias, layer.running_mean, layer.running_var, 1e-3
        )
        (want_dx,) = torch.autograd.grad(want, x_ref, up)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx, want_dx, rtol=1e-12, atol=1e-12)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_has_no_parameters_and_passes_the_gradient_to_the_input() -> None:
    bn = _trained(nn.BatchNorm2d(C, dtype=F64))
    frozen = nk.FrozenBatchNorm2d.from_batch_norm(bn)
    assert list(frozen.parameters()) == []
    assert {n for n, _ in frozen.named_buffers()} == {
        "weight",
        "bias",
        "running_mean",
        "running_var",
    }
    assert not any(b.requires_grad for b in frozen.buffers())
    model = nn.Sequential(nn.Conv2d(3, C, 1, dtype=F64), frozen)
    model(_x((2, 3, 4, 4))).square().sum().backward()
    weight = model[0].weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    # The input gradient is the upstream gradient times the per-channel scale.
    x = _x().requires_grad_()
    up = _x(seed=9)
    frozen(x).backward(up)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, up * scale.reshape(1, C, 1, 1), rtol=1e-12, atol=1e-12)


def test_gradcheck_and_gradgradcheck_in_float64() -> None:
    frozen = nk.FrozenBatchNorm2d.from_batch_norm(_trained(nn.BatchNorm2d(C, dtype=F64)))
    x = _x((2, C, 2, 3)).requires_grad_()
    assert gradcheck(frozen, (x,))
    assert gradgradcheck(frozen, (x,))


def test_batch_norm_to_frozen_to_state_dict_to_batch_norm_round_trips() -> None:
    bn = _trained(nn.BatchNorm2d(C, dtype=F64))
    frozen = nk.FrozenBatchNorm2d.from_batch_norm(bn)
    back = nn.BatchNorm2d(C, dtype=F64)
    result = back.load_state_dict(frozen.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for key in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(back.state_dict()[key], bn.state_dict()[key]), key
    assert int(back.num_batches_tracked) == 0  # the count is not carried: it starts again
    x = _x()
    torch.testing.assert_close(back.eval()(x), bn(x), rtol=0, atol=0)
    # And a batch norm's checkpoint loads strictly into a frozen layer (the count ignored).
    again = nk.FrozenBatchNorm2d(C, eps=bn.eps, dtype=F64)
    result = again.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(again(x), bn(x), rtol=1e-12, atol=1e-12)


def test_state_dict_round_trip_keeps_every_buffer() -> None:
    frozen = nk.FrozenBatchNorm2d.from_batch_norm(_trained(nn.BatchNorm2d(C)))
    fresh = nk.FrozenBatchNorm2d(C)
    fresh.load_state_dict(frozen.state_dict(), strict=True)
    state = frozen.state_dict()
    assert fresh.state_dict().keys() == state.keys()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]) and value.dtype == torch.float32, key
    # A batch norm checkpoint without an affine lacks weight and bias: refused strictly.
    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*weight"):
        fresh.load_state_dict(nn.BatchNorm2d(C, affine=False).state_dict(), strict=True)


def test_input_dtypes_and_the_arithmetic_dtype() -> None:
    frozen = nk.FrozenBatchNorm2d.from_batch_norm(_trained(nn.BatchNorm2d(C)))  # float32
    x = _x()
    # float64 input: the scale and shift are computed in float64 from the float32 buffers.
    out = frozen(x)
    want = ref_frozen_bn(
        x, *(b.double() for b in (frozen.weight, frozen.bias)), frozen.running_mean.double(),
        frozen.running_var.double(), frozen.eps,
    )  # fmt: skip
    assert out.dtype == F64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # Half inputs keep their dtype; the fold is float32, rounded once per value.
    for half in (torch.float16, torch.bfloat16):
        got = frozen(x.to(half))
        assert got.dtype == half
        scale, shift = frozen.scale_shift(half)
        assert scale.dtype == torch.float32
        want_half = torch.addcmul(
            shift.to(half).reshape(1, C, 1, 1), x.to(half), scale.to(half).reshape(1, C, 1, 1)
        )
        assert torch.equal(got, want_half)
    x_cl = x.float().contiguous(memory_format=torch.channels_last)
    assert frozen(x_cl).is_contiguous(memory_format=torch.channels_last)


def test_works_as_norm_layer_and_loads_a_batch_norm_models_checkpoint() -> None:
    torch.manual_seed(0)
    bn_model = imagenet_resnet("basic", [1, 1, 1, 1], num_classes=5, width=8)
    opt = torch.optim.SGD(bn_model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        bn_model(torch.randn(4, 3, 32, 32)).square().mean().backward()
        opt.step()
    frozen_model = imagenet_resnet(
        "basic", [1, 1, 1, 1], num_classes=5, width=8, norm_layer=nk.FrozenBatchNorm2d
    )
    frozen_model.load_state_dict(bn_model.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(frozen_model.train()(x), bn_model.eval()(x))
    # The optimizer sees no norm parameters at all.
    names = {n for n, _ in frozen_model.named_parameters()}
    assert not any("bn" in n for n in names) and any("conv" in n for n in names)


def test_convert_norm_replaces_batch_norms_with_frozen_ones_and_leaves_them_alone() -> None:
    bn = _trained(nn.BatchNorm2d(C))
    model = nn.Sequential(nn.Conv2d(3, C, 1), bn, nn.ReLU())
    x = torch.randn(2, 3, 4, 4)
    want = model.eval()(x)
    report = nk.convert_norm(model, "frozenbn")
    assert type(model[1]) is nk.FrozenBatchNorm2d and [c.fresh for c in report] == [()]
    torch.testing.assert_close(model.train()(x), want)
    assert nk.convert_norm(nn.BatchNorm2d(4), nk.FrozenBatchNorm2d).model.num_features == 4
    # Already frozen: left alone by every target, and reported.
    report = nk.convert_norm(model, "sabn", num_domains=2, strict=False)
    assert len(report) == 0 and report.left_alone == (("1", "FrozenBatchNorm2d, a normkit layer"),)
    with pytest.raises(ValueError, match=r"'frozenbn' has no 1d layer for '0' \(BatchNorm1d\)"):
        nk.convert_norm(nn.Sequential(nn.BatchNorm1d(4)), "frozenbn")


def test_convert_sync_freeze_and_unfreeze_leave_it_alone_without_warnings() -> None:
    model = nn.Sequential(nn.Conv2d(3, C, 1), nk.FrozenBatchNorm2d(C), nn.BatchNorm2d(C))
    frozen = model[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        synced = nk.convert_sync(copy.deepcopy(model))
        assert type(synced[1]) is nk.FrozenBatchNorm2d and isinstance(synced[2], nk.SyncBatchNorm)
        alone = nn.Sequential(nk.FrozenBatchNorm2d(C))
        assert nk.convert_sync(alone) is alone and type(alone[0]) is nk.FrozenBatchNorm2d
        # freeze_norm: nothing to freeze here, and no "no batch norms" warning either.
        assert nk.freeze_norm(alone) is alone and type(alone[0]) is nk.FrozenBatchNorm2d
        nk.freeze_norm(model)
        assert model[1] is frozen and type(frozen) is nk.FrozenBatchNorm2d
        assert type(model[2]).__name__ == "FrozenBatchNorm2d"  # freeze_norm's own class
        assert isinstance(model[2], nn.BatchNorm2d) and not isinstance(model[2], type(frozen))
        nk.unfreeze_norm(model)
    assert type(model[1]) is nk.FrozenBatchNorm2d and type(model[2]) is nn.BatchNorm2d


def test_prepare_for_inference_folds_it_into_the_preceding_convolution() -> None:
    frozen = nk.FrozenBatchNorm2d.from_batch_norm(_trained(nn.BatchNorm2d(C)))
    model = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), frozen, nn.ReLU(), copy.deepcopy(frozen))
    x = torch.randn(2, 3, 5, 5)
    prepared, report = nk.prepare_for_inference(model)
    assert report.folded == [("0", "1")] and report.kept == ["3"]
    assert not isinstance(prepared[1], nk.FrozenBatchNorm2d)
    torch.testing.assert_close(prepared(x), model(x))


def test_from_batch_norm_refuses_what_it_cannot_compute() -> None:
    where = r"^FrozenBatchNorm2d\.from_batch_norm: expected"
    cases: list[tuple[nn.Module, type[Exception], str]] = [
        (nn.Conv2d(3, 3, 1), TypeError, "a 2d batch norm, got Conv2d"),
        (nn.BatchNorm1d(4), ValueError, "a 2d batch norm, got BatchNorm1d"),
        (nn.BatchNorm3d(4), ValueError, "a 2d batch norm, got BatchNorm3d"),
        (nk.SandwichBatchNorm1d(4, 2), ValueError, "got SandwichBatchNorm1d"),
        (
            nn.BatchNorm2d(4, track_running_stats=False),
            ValueError,
            "running statistics, got BatchNorm2d with track_running_stats=False",
        ),
        (nk.SandwichBatchNorm2d(4, 2), TypeError, "holding domain_bias, domain_weight"),
        (nk.BatchChannelNorm2d(4, 2), TypeError, "holding group_bias, group_weight"),
        (
            nk.CategoricalConditionalBatchNorm2d(4, 2, split_stats=True),
            TypeError,
            "CategoricalConditionalBatchNorm2d holding domain_bias",
        ),
    ]
    for module, exc, fragment in cases:
        with pytest.raises(exc, match=where) as info:
            nk.FrozenBatchNorm2d.from_batch_norm(module)
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
    ("make", "exc", "fragment"),
    [
        (lambda: nk.FrozenBatchNorm2d(0), ValueError, "num_features >= 1, got 0"),
        (lambda: nk.FrozenBatchNorm2d(4, eps=0.0), ValueError, "eps > 0, got 0.0"),
        (lambda: nk.FrozenBatchNorm2d(4, eps="1"), TypeError, "eps to be a number, got '1'"),
        (lambda: nk.FrozenBatchNorm2d(4, dtype=torch.int32), TypeError, "torch.dtype or None"),
        (lambda: nk.FrozenBatchNorm2d(4)(torch.randn(2, 4, 3)), ValueError, "got 3D input"),
        (lambda: nk.FrozenBatchNorm2d(4)(torch.randn(2, 3, 2, 2)), ValueError, "4 channels"),
        (
            lambda: nk.FrozenBatchNorm2d(4)(torch.ones(2, 4, 2, 2, dtype=torch.long)),
            TypeError,
            "floating-point input, got dtype torch.int64",
        ),
    ],
)
def test_bad_arguments_and_inputs_are_refused(make: Any, exc: type, fragment: str) -> None:
    with pytest.raises(exc, match=r"^FrozenBatchNorm2d: expected") as info:
        make()
    assert fragment in str(info.value)


def test_registry_names() -> None:
    for name in ("frozenbn", "FrozenBN-2d", "frozen_batch_norm", "frozenbatchnorm2d"):
        layer = nk.create_norm(name, 8, eps=1e-3)
        assert type(layer) is nk.FrozenBatchNorm2d and layer.eps == 1e-3
    assert repr(nk.FrozenBatchNorm2d(8)) == "FrozenBatchNorm2d(8, eps=1e-05)"


def test_traces_with_torch_fx() -> None:
    # Feature extractors (torchvision's create_feature_extractor) trace backbones with torch.fx.
    frozen = nk.FrozenBatchNorm2d.from_batch_norm(_trained(nn.BatchNorm2d(C)))
    model = nn.Sequential(nn.Conv2d(3, C, 1), frozen, nn.ReLU())
    graph = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(graph(x), model(x))
