"""Every refused input: the error type, a message naming layer, expected and received, and no
buffer changed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import normkit as nk

Factory = Callable[[], nn.Module]

CONDITIONAL: dict[str, Factory] = {
    "SandwichBatchNorm2d": lambda: nk.SandwichBatchNorm2d(4, 3),
    "SandwichBatchNorm2d(split)": lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True),
    "CategoricalConditionalBatchNorm2d": lambda: nk.CategoricalConditionalBatchNorm2d(4, 3),
    "AuxBatchNorm2d": lambda: nk.AuxBatchNorm2d(4, 3),
    "SandwichBatchNorm1d": lambda: nk.SandwichBatchNorm1d(4, 3),
    "SandwichBatchNorm3d": lambda: nk.SandwichBatchNorm3d(4, 3),
}
PLAIN: dict[str, Factory] = {
    "BatchChannelNorm2d": lambda: nk.BatchChannelNorm2d(4, 2),
    "BatchChannelNorm2d(estimate)": lambda: nk.BatchChannelNorm2d(4, 2, estimate=True),
    "BatchChannelNorm1d": lambda: nk.BatchChannelNorm1d(4, 2),
    "BatchChannelNorm3d": lambda: nk.BatchChannelNorm3d(4, 2),
    "InputNorm2d": lambda: nk.InputNorm2d(4),
}


def _good_shape(layer: nn.Module) -> tuple[int, ...]:
    name = type(layer).__name__
    if name.endswith("1d"):
        return (3, 4, 5)
    if name.endswith("3d"):
        return (3, 4, 2, 2, 2)
    return (3, 4, 2, 2)


def _state(layer: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_refused(
    layer: nn.Module,
    call: Callable[[], Any],
    exc: type[Exception],
    *fragments: str,
) -> None:
    before = _state(layer)
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert type(layer).__name__ in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    after = layer.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), f"{key} changed"


def _wrong_rank_shape(layer: nn.Module) -> tuple[int, ...]:
    name = type(layer).__name__
    if name.endswith("1d"):
        return (3, 4, 2, 2)
    return (3, 4, 2)


@pytest.mark.parametrize("key", list(CONDITIONAL))
def test_conditional_wrong_rank(key: str) -> None:
    layer = CONDITIONAL[key]()
    shape = _wrong_rank_shape(layer)
    x = torch.randn(shape)
    _assert_refused(layer, lambda: layer(x, 0), ValueError, "expected", f"got {len(shape)}D")


@pytest.mark.parametrize("key", list(PLAIN))
def test_plain_wrong_rank(key: str) -> None:
    layer = PLAIN[key]()
    shape = _wrong_rank_shape(layer)
    x = torch.randn(shape)
    _assert_refused(layer, lambda: layer(x), ValueError, f"got {len(shape)}D")


@pytest.mark.parametrize("key", list(CONDITIONAL))
def test_conditional_wrong_channel_count(key: str) -> None:
    layer = CONDITIONAL[key]()
    shape = list(_good_shape(layer))
    shape[1] = 5
    x = torch.randn(shape)
    _assert_refused(layer, lambda: layer(x, 0), ValueError, "expected 4 channels", "got 5")


@pytest.mark.parametrize(
    "key", ["BatchChannelNorm2d", "BatchChannelNorm2d(estimate)", "InputNorm2d"]
)
def test_plain_wrong_channel_count(key: str) -> None:
    layer = PLAIN[key]()
    x = torch.randn(3, 6, 2, 2)
    _assert_refused(layer, lambda: layer(x), ValueError, "expected 4 channels", "got 6")


@pytest.mark.parametrize("key", list(CONDITIONAL))
@pytest.mark.parametrize(
    ("domain", "exc", "fragments"),
    [
        (3, ValueError, ("expected a domain index in [0, 3)", "got 3")),
        (-1, ValueError, ("expected a domain index in [0, 3)", "got -1")),
        (torch.tensor([0, 1, 3]), ValueError, ("expected domain indices in [0, 3)", "got 3")),
        (torch.tensor([0, -2, 1]), ValueError, ("expected domain indices in [0, 3)", "got -2")),
        (torch.tensor([0.0, 1.0, 2.0]), TypeError, ("integer domain index", "torch.float32")),
        (torch.tensor([0, 1]), ValueError, ("shape (3,)", "got shape (2,)")),
        (torch.tensor([[0, 1, 2]]), ValueError, ("shape (3,)", "got shape (1, 3)")),
        (1.0, TypeError, ("int or integer tensor", "float")),
        (True, TypeError, ("got bool",)),
        (None, ValueError, ("expected a domain index", "got None")),
    ],
)
def test_bad_domain_index(
    key: str, domain: Any, exc: type[Exception], fragments: tuple[str, ...]
) -> None:
    layer = CONDITIONAL[key]()
    x = torch.randn(_good_shape(layer))
    _assert_refused(layer, lambda: layer(x, domain), exc, *fragments)


@pytest.mark.parametrize("key", list(CONDITIONAL))
def test_conditional_single_value_per_channel_in_training(key: str) -> None:
    layer = CONDITIONAL[key]()
    x = torch.randn(1, 4) if type(layer).__name__.endswith("1d") else None
    if x is None:
        shape = (1, 4, *([1] * (len(_good_shape(layer)) - 2)))
        x = torch.randn(shape)
    _assert_refused(layer, lambda: layer(x, 0), ValueError, "more than 1 value per channel")
    layer.eval()
    assert layer(x, 0).shape == x.shape  # eval accepts it


def test_input_norm_single_value_per_channel_in_training() -> None:
    layer = nk.InputNorm2d(4)
    x = torch.randn(1, 4, 1, 1)
    _assert_refused(layer, lambda: layer(x), ValueError, "more than 1 value per channel")


def test_bcn_single_value_per_channel_in_training_large_batch_mode_only() -> None:
    layer = nk.BatchChannelNorm2d(4, 2)
    x = torch.randn(1, 4, 1, 1)
    _assert_refused(layer, lambda: layer(x), ValueError, "more than 1 value per channel")
    assert nk.BatchChannelNorm2d(4, 2, estimate=True)(x).shape == x.shape


@pytest.mark.parametrize("key", list(CONDITIONAL) + list(PLAIN))
def test_non_float_input(key: str) -> None:
    factory = CONDITIONAL.get(key) or PLAIN[key]
    layer = factory()
    x = torch.ones(_good_shape(layer), dtype=torch.long)
    if key in CONDITIONAL:
        _assert_refused(layer, lambda: layer(x, 0), TypeError, "floating-point", "torch.int64")
    else:
        _assert_refused(layer, lambda: layer(x), TypeError, "floating-point", "torch.int64")


@pytest.mark.parametrize(
    ("build", "exc", "fragment"),
    [
        (lambda: nk.SandwichBatchNorm2d(4, 0), ValueError, "expected num_domains >= 1, got 0"),
        (lambda: nk.SandwichBatchNorm2d(0, 2), ValueError, "expected num_features >= 1, got 0"),
        (lambda: nk.SandwichBatchNorm2d(4, 2.5), TypeError, "num_domains to be an int"),
        (lambda: nk.SandwichBatchNorm2d(4, 2, momentum=1.5), ValueError, "momentum in [0, 1]"),
        (lambda: nk.SandwichBatchNorm2d(4, 2, eps=0), ValueError, "expected eps > 0, got 0"),
        (lambda: nk.SandwichBatchNorm2d(4, 2, domain_std=-1), ValueError, "domain_std >= 0"),
        (
            lambda: nk.CategoricalConditionalBatchNorm2d(4, 2, momentum="x"),
            TypeError,
            "momentum to be a float or None",
        ),
        (lambda: nk.BatchChannelNorm2d(6, 4), ValueError, "num_groups to divide"),
        (lambda: nk.BatchChannelNorm2d(6, 0), ValueError, "num_groups >= 1, got 0"),
        (lambda: nk.SandwichAdaIN(4, eps=-1), ValueError, "expected eps > 0"),
    ],
)
def test_constructor_errors_name_the_layer(
    build: Callable[[], nn.Module], exc: type[Exception], fragment: str
) -> None:
    with pytest.raises(exc) as info:
        build()
    assert fragment in str(info.value)
    assert str(info.value).split(":")[0] in {
        "SandwichBatchNorm2d",
        "CategoricalConditionalBatchNorm2d",
        "BatchChannelNorm2d",
        "SandwichAdaIN",
    }


def test_sandwich_adain_errors() -> None:
    layer = nk.SandwichAdaIN(4)
    with pytest.raises(ValueError, match=r"SandwichAdaIN: expected content of shape \(N, 4"):
        layer(torch.randn(2, 3, 4, 4), torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match="expected a style batch of 1 or 2"):
        layer(torch.randn(2, 4, 4, 4), torch.randn(3, 4, 4, 4))
    with pytest.raises(ValueError, match="at least 2 spatial positions"):
        layer(torch.randn(2, 4, 1, 1), torch.randn(2, 4, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(2, 4, 4, 4, dtype=torch.long), torch.randn(2, 4, 4, 4))
