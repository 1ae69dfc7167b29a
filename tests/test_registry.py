"""The string registry: names, factories, norm_layer callables, third-party registration."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import normkit as nk
from normkit.models import resnet20


@pytest.mark.parametrize(
    ("name", "kwargs", "cls", "attrs"),
    [
        ("bn", {}, nn.BatchNorm2d, {}),
        ("BN-1d", {}, nn.BatchNorm1d, {}),
        ("gn", {"num_groups": 4}, nk.GroupNorm, {"num_groups": 4, "num_channels": 8}),
        ("FrozenBN", {}, nk.FrozenBatchNorm2d, {"num_features": 8}),
        ("sabn", {"num_domains": 3}, nk.SandwichBatchNorm2d, {"split_stats": False}),
        ("SaBN_Split", {"num_domains": 3}, nk.SandwichBatchNorm2d, {"split_stats": True}),
        ("sabn split 3d", {"num_domains": 3}, nk.SandwichBatchNorm3d, {"split_stats": True}),
        ("ccbn", {"num_domains": 3}, nk.CategoricalConditionalBatchNorm2d, {}),
        ("auxbn1d", {"num_domains": 2}, nk.AuxBatchNorm1d, {}),
        ("bcn", {"num_groups": 4}, nk.BatchChannelNorm2d, {"estimate": False}),
        ("BCN-micro", {"num_groups": 4}, nk.BatchChannelNorm2d, {"estimate": True}),
        ("inputnorm", {}, nk.InputNorm2d, {}),
    ],
)
def test_create_norm_builds_the_named_layer(
    name: str, kwargs: dict[str, object], cls: type[nn.Module], attrs: dict[str, object]
) -> None:
    layer = nk.create_norm(name, 8, **kwargs)
    assert type(layer) is cls
    for attr, value in attrs.items():
        assert getattr(layer, attr) == value


def test_names_fold_case_and_separators() -> None:
    a = nk.create_norm("bcn-micro", 8, num_groups=2)
    b = nk.create_norm("BCN_MICRO", 8, num_groups=2)
    c = nk.create_norm("bcnmicro", 8, num_groups=2)
    assert type(a) is type(b) is type(c) and a.estimate and b.estimate and c.estimate


def test_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(
        ValueError,
        match=(
            r"create_norm: expected a registered norm name, got unknown norm 'nope'; "
            r"known norms: .*sabn"
        ),
    ):
        nk.create_norm("nope", 8)
    with pytest.raises(TypeError, match="expected a norm name"):
        nk.create_norm(3, 8)  # type: ignore[arg-type]


def test_list_norms_has_the_issue_names() -> None:
    names = set(nk.list_norms())
    for name in (
        "bn",
        "gn",
        "sabn",
        "sabn-split",
        "ccbn",
        "auxbn",
        "bcn",
        "bcn-micro",
        "inputnorm",
    ):
        assert name in names


def test_get_norm_layer_works_as_torchvision_style_norm_layer() -> None:
    norm_layer = nk.get_norm_layer("bcn", num_groups=4)
    model = resnet20(norm_layer=norm_layer)
    norms = [m for m in model.modules() if isinstance(m, nk.BatchChannelNorm2d)]
    assert len(norms) == 19 and all(m.num_groups == 4 for m in norms)
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    # Call-time keywords override bound ones; the callable pickles (for multiprocessing).
    assert norm_layer(8, num_groups=2).num_groups == 2
    assert pickle.loads(pickle.dumps(norm_layer))(8).num_groups == 4
    assert "bcn" in repr(norm_layer) and "num_groups=4" in repr(norm_layer)


def test_get_norm_layer_binds_kwargs_to_any_callable() -> None:
    layer = nk.get_norm_layer(nk.SandwichBatchNorm2d, num_domains=5)(16)
    assert isinstance(layer, nk.SandwichBatchNorm2d) and layer.num_domains == 5
    with pytest.raises(TypeError, match="get_norm_layer: expected a norm name or a callable"):
        nk.get_norm_layer(42)  # type: ignore[arg-type]


def test_third_party_registration_and_overwrite_rule() -> None:
    class Scaled(nn.Module):
        def __init__(self, num_features: int, factor: float = 2.0) -> None:
            super().__init__()
            self.num_features, self.factor = num_features, factor

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    nk.register_norm("test-scaled-norm", Scaled)
    try:
        assert "test-scaled-norm" in nk.list_norms()
        assert nk.create_norm("Test_Scaled_Norm", 4, factor=3.0).factor == 3.0
        with pytest.raises(ValueError, match="is taken"):
            nk.register_norm("TEST SCALED NORM", Scaled)

        @nk.register_norm("test-scaled-norm", overwrite=True)
        def half(num_features: int) -> nn.Module:
            return Scaled(num_features, 0.5)

        assert nk.create_norm("test-scaled-norm", 4).factor == 0.5
    finally:
        from normkit import registry

        registry._REGISTRY.pop("testscalednorm", None)
        registry._CANONICAL.pop("testscalednorm", None)


def test_group_norm_factory_refuses_a_non_dividing_group_count() -> None:
    with pytest.raises(ValueError, match="GroupNorm: expected num_groups to divide"):
        nk.create_norm("gn", 10, num_groups=4)


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("batchnorm1d", nn.BatchNorm1d),
        ("BatchNorm2d", nn.BatchNorm2d),
        ("batch_norm_3d", nn.BatchNorm3d),
        ("in1d", nn.InstanceNorm1d),
        ("in2d", nn.InstanceNorm2d),
        ("IN-3d", nn.InstanceNorm3d),
        ("gn1d", nk.GroupNorm),
        ("groupnorm3d", nk.GroupNorm),
    ],
)
def test_every_family_name_takes_the_dimension_suffixes(name: str, cls: type) -> None:
    kwargs = {"num_groups": 4} if cls is nk.GroupNorm else {}
    assert type(nk.create_norm(name, 8, **kwargs)) is cls


def test_the_registry_knows_every_convert_norm_target_with_its_suffixes() -> None:
    # One naming rule for both: a family name, bare (2d) or with the suffix of each of its layers.
    from normkit.convert import _families

    kwargs = {
        "sabn": {"num_domains": 2},
        "sabnsplit": {"num_domains": 2},
        "saauxbn": {"num_domains": 2},
        "ccbn": {"num_domains": 2},
        "ccbnsplit": {"num_domains": 2},
        "auxbn": {"num_domains": 2},
        "bcn": {"num_groups": 4},
        "bcnmicro": {"num_groups": 4},
        "gn": {"num_groups": 4},
        "groupnorm": {"num_groups": 4},
        "bgn": {"num_groups": 4},
        "batchgroupnorm": {"num_groups": 4},
        "evonorms0": {"num_groups": 4},
    }
    for name, family in _families().items():
        for dim, cls in family.classes.items():
            names = [f"{name}{dim}d"] + ([name] if dim == 2 else [])
            for spelled in names:
                layer = nk.create_norm(spelled, 8, **kwargs.get(name, {}))
                assert type(layer) is cls, spelled
                for option, value in family.defaults.items():
                    if not callable(value) and option != "momentum":
                        assert getattr(layer, option) == value, (spelled, option)
