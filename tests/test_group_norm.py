"""GroupNorm with the channel count first: torch's layer, the literal reference, the identities.

Identities (related-methods §3.6 and the GN paper): the layer equals ``nn.GroupNorm(G, C)`` with
the same parameters and their state dicts are interchangeable; G = C is instance normalization and
G = 1 layer normalization over (C, *spatial); it is a ``norm_layer=`` callable; ``convert_norm``
swaps batch norms for it. (BCN's channel part is this group norm after a batch norm:
``tests/test_batch_channel.py::test_channel_part_equals_group_norm``.)
"""

from __future__ import annotations

import copy
import functools
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import normkit as nk
from normkit.models import resnet20
from tests.reference import ref_group_norm

F64 = torch.float64
SHAPES = [(5, 8), (5, 8, 3), (4, 8, 3, 2), (3, 8, 2, 2, 3)]
SHAPE_IDS = ["2d", "3d", "4d", "5d"]


def _x(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=F64) * 2 + 0.5).to(dtype)


def _randomize(layer: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(1.0 + 0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def _run(layer: nn.Module, x: torch.Tensor, up: torch.Tensor) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients of one call."""
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(up)
    assert x.grad is not None
    grads = [p.grad for p in layer.parameters()]
    assert all(g is not None for g in grads)
    return [y.detach(), x.grad, *grads]  # type: ignore[list-item]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_equals_torch_group_norm_with_the_same_parameters(
    shape: tuple[int, ...], affine: bool
) -> None:
    ours = _randomize(nk.GroupNorm(8, num_groups=4, eps=1e-3, affine=affine))
    theirs = nn.GroupNorm(4, 8, eps=1e-3, affine=affine)
    theirs.load_state_dict(ours.state_dict())
    x = _x(shape)
    up = _x(shape, seed=5)
    for got, want in zip(_run(ours, x, up), _run(theirs, x, up), strict=True):
        assert torch.equal(got, want)  # the same kernel: bit for bit


def test_state_dicts_are_interchangeable_with_torch() -> None:
    ours = _randomize(nk.GroupNorm(8, 2))
    theirs = nn.GroupNorm(2, 8)
    assert ours.state_dict().keys() == theirs.state_dict().keys() == {"weight", "bias"}
    theirs.load_state_dict(ours.state_dict(), strict=True)
    back = nk.GroupNorm(8, 2)
    back.load_state_dict(theirs.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    x = _x((3, 8, 4, 4))
    assert torch.equal(back(x), theirs(x))
    # Inside a model too: a torch GN model's checkpoint loads into the normkit GN model.
    model_t = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8))
    model_n = nn.Sequential(nn.Conv2d(3, 8, 1), nk.GroupNorm(8, 2))
    model_n.load_state_dict(model_t.state_dict(), strict=True)
    assert isinstance(model_n[1], nn.GroupNorm)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(("groups", "affine"), [(1, True), (2, True), (4, False), (8, True)])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_the_literal_reference_in_float64(
    shape: tuple[int, ...], groups: int, affine: bool, training: bool
) -> None:
    layer = _randomize(nk.GroupNorm(8, groups, eps=1e-4, affine=affine, dtype=F64))
    layer.train(training)
    x = _x(shape, F64).requires_grad_()
    up = _x(shape, F64, seed=3)
    y = layer(x)
    params = [layer.weight, layer.bias] if affine else []
    got = torch.autograd.grad(y, [x, *params], up)

    x_ref = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_() if affine else None
    b = layer.bias.detach().clone().requires_grad_() if affine else None
    want_y = ref_group_norm(x_ref, groups, w, b, 1e-4)
    want = torch.autograd.grad(want_y, [x_ref, *([w, b] if affine else [])], up)
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for g, h in zip(got, want, strict=True):
        assert h is not None
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-10)
    assert not list(layer.buffers())  # no running statistics to update


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck_in_float64(affine: bool) -> None:
    layer = _randomize(nk.GroupNorm(4, 2, eps=1e-3, affine=affine, dtype=F64))
    x = _x((2, 4, 3), F64).requires_grad_()
    names = [n for n, _ in layer.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = torch.func.functional_call(layer, dict(zip(names, ps)), (x,))
        return out

    assert gradcheck(f, (x, *params))
    assert gradgradcheck(f, (x, *params))


def test_one_group_per_channel_is_instance_norm_and_one_group_is_layer_norm() -> None:
    x = _x((3, 6, 4, 5), F64)
    eps = 1e-5
    instance = nk.GroupNorm(6, num_groups=6, eps=eps, affine=False)(x)
    torch.testing.assert_close(instance, TF.instance_norm(x, eps=eps), rtol=1e-12, atol=1e-12)
    layer = nk.GroupNorm(6, num_groups=1, eps=eps, affine=False)(x)
    want = TF.layer_norm(x, x.shape[1:], eps=eps)
    torch.testing.assert_close(layer, want, rtol=1e-12, atol=1e-12)


def test_a_sample_is_normalized_alone_in_training_too() -> None:
    layer = _randomize(nk.GroupNorm(8, 4)).train()
    x = _x((5, 8, 3, 3))
    out = layer(x)
    for i in range(5):
        torch.testing.assert_close(layer(x[i : i + 1]), out[i : i + 1], rtol=0, atol=0)
    torch.testing.assert_close(layer.eval()(x), out, rtol=0, atol=0)


def test_works_as_a_norm_layer_taking_the_channel_count() -> None:
    model = resnet20(norm_layer=functools.partial(nk.GroupNorm, num_groups=4))
    norms = [m for m in model.modules() if isinstance(m, nk.GroupNorm)]
    assert len(norms) == 19 and all(m.num_groups == 4 for m in norms)
    assert {m.num_features for m in norms} == {16, 32, 64}
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # The class alone: 32 groups, the paper's default.
    assert nk.GroupNorm(64).num_groups == 32
    assert repr(nk.GroupNorm(64)) == "GroupNorm(64, num_groups=32, eps=1e-05, affine=True)"
    layer = nk.get_norm_layer("gn", num_groups=8)(16)
    assert type(layer) is nk.GroupNorm and layer.num_groups == 8


def test_input_dtype_other_than_the_parameters() -> None:
    layer = _randomize(nk.GroupNorm(8, 4))
    x = _x((3, 8, 2, 2), F64)
    # float64 input, float32 parameters (torch's kernel refuses the pair): parameters cast up.
    want = nk.GroupNorm(8, 4, dtype=F64)
    want.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), want(x), rtol=0, atol=0)
    # Half input, float32 parameters: torch's mixed-precision kernel, as nn.GroupNorm.
    theirs = nn.GroupNorm(4, 8)
    theirs.load_state_dict(layer.state_dict())
    for half in (torch.float16, torch.bfloat16):
        out = layer(x.to(half))
        assert out.dtype == half and torch.equal(out, theirs(x.to(half)))
    # Half parameters, float32 input: parameters cast to float32.
    low = copy.deepcopy(layer).to(torch.bfloat16)
    want32 = copy.deepcopy(low).float()
    torch.testing.assert_close(low(x.float()), want32(x.float()), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("make", "exc", "fragment"),
    [
        (
            lambda: nk.GroupNorm(6, 4),
            ValueError,
            "num_groups to divide num_features=6, got num_groups=4",
        ),
        (lambda: nk.GroupNorm(6, 0), ValueError, "num_groups >= 1, got 0"),
        (lambda: nk.GroupNorm(0, 1), ValueError, "num_features >= 1, got 0"),
        (lambda: nk.GroupNorm(6, 2.0), TypeError, "num_groups to be an int, got 2.0"),
        (lambda: nk.GroupNorm(6, 2, eps=0.0), ValueError, "eps > 0, got 0.0"),
        (lambda: nk.GroupNorm(6, 2, eps=float("inf")), ValueError, "finite eps > 0, got inf"),
        (lambda: nk.GroupNorm(6, 2, affine="no"), TypeError, "affine to be a bool, got 'no'"),
        (lambda: nk.GroupNorm(6, 2, dtype=torch.long), TypeError, "floating-point torch.dtype"),
    ],
)
def test_bad_constructor_arguments_are_refused(make: Any, exc: type, fragment: str) -> None:
    with pytest.raises(exc, match=r"^GroupNorm: expected") as info:
        make()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("x", "exc", "fragment"),
    [
        (torch.randn(8), ValueError, "got 1D input of shape (8,)"),
        (torch.randn(2, 6, 3), ValueError, "expected 8 channels (dim 1), got 6"),
        (torch.ones(2, 8, 3, dtype=torch.long), TypeError, "floating-point input, got"),
        ([[1.0] * 8], TypeError, "torch.Tensor input, got list"),
    ],
)
def test_bad_input_is_refused(x: Any, exc: type, fragment: str) -> None:
    with pytest.raises(exc, match=r"^GroupNorm: expected") as info:
        nk.GroupNorm(8, 2)(x)
    assert fragment in str(info.value)


def test_registry_converters_and_param_groups() -> None:
    assert type(nk.create_norm("groupnorm", 8, num_groups=2)) is nk.GroupNorm
    # BN -> GN: the affine is carried, the statistics are dropped (and reported).
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU())
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    affine = [model[1].weight.detach().clone(), model[1].bias.detach().clone()]
    report = nk.convert_norm(model, "gn", num_groups=4)
    gn = report.model[1]
    assert type(gn) is nk.GroupNorm and gn.num_groups == 4
    assert torch.equal(gn.weight, affine[0]) and torch.equal(gn.bias, affine[1])
    (change,) = report.changes
    assert set(change.dropped) == {"running_mean", "running_var", "num_batches_tracked"}
    # GN -> normkit GN keeps the function; a normkit GN is already the target.
    torch_gn = _randomize(nn.GroupNorm(2, 8))
    swapped = nk.convert_norm(copy.deepcopy(torch_gn), "groupnorm", include_groupnorm=True).model
    x = _x((2, 8, 3, 3))
    assert type(swapped) is nk.GroupNorm and torch.equal(swapped(x), torch_gn(x))
    again = nk.convert_norm(swapped, "gn", include_groupnorm=True, strict=False)
    assert len(again) == 0 and again.left_alone == (("", "GroupNorm, already the target"),)
    # freeze_norm freezes its affine; unfreeze_norm restores it; no decay on GN parameters.
    frozen = nk.freeze_norm(nn.Sequential(nk.GroupNorm(8, 2)), include_groupnorm=True)
    assert isinstance(frozen[0], nk.GroupNorm) and not frozen[0].weight.requires_grad
    nk.unfreeze_norm(frozen)
    assert type(frozen[0]) is nk.GroupNorm and frozen[0].weight.requires_grad
    groups = nk.bn_param_groups(nn.Sequential(nk.GroupNorm(8, 2)), 0.1, 1e-4)
    assert [g["name"] for g in groups] == ["no_decay"]
    # A group norm has no batch statistics: nothing for convert_sync to do (it warns).
    with pytest.warns(UserWarning, match="convert_sync: expected a model with batch-statistics"):
        nk.convert_sync(nn.Sequential(nk.GroupNorm(8, 2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared, _ = nk.prepare_for_inference(nn.Sequential(nn.Conv2d(3, 8, 1), gn))
    assert isinstance(prepared[1], nk.GroupNorm)


def test_traces_with_torch_fx_as_torch_group_norm_does() -> None:
    # torch.fx treats nn.GroupNorm as a leaf; normkit's is traced through, and must trace.
    model = nn.Sequential(nn.Conv2d(3, 8, 1), _randomize(nk.GroupNorm(8, 4)))
    graph = torch.fx.symbolic_trace(model)
    x = _x((2, 3, 4, 4))
    assert torch.equal(graph(x), model(x))
    assert any(n.target is TF.group_norm for n in graph.graph.nodes)


@pytest.mark.parametrize("training", [True, False])
def test_a_single_value_per_group_over_the_batch_is_refused_by_name(training: bool) -> None:
    """torch's group norm refuses N · C/G · spatial == 1 in both modes, naming no layer (found
    by the fuzz test); normkit's names itself. Two samples of one value per group pass, as in
    torch."""
    layer = nk.GroupNorm(4, 4).train(training)
    with pytest.raises(ValueError, match=r"^GroupNorm: expected more than 1 value per group"):
        layer(torch.randn(1, 4, 1))
    assert layer(torch.randn(2, 4, 1)).shape == (2, 4, 1)
