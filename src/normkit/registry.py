"""A string registry of norm layers: ``create_norm``, ``get_norm_layer``, ``list_norms``.

Names are case- and separator-insensitive (``"SaBN-split"``, ``"sabn_split"`` and ``"sabnsplit"``
are one name). A bare family name builds the 2d layer; a ``1d``/``2d``/``3d`` suffix picks the
dimensionality (``"bcn1d"``, ``"sabn-split-3d"``). Every factory takes the channel count first,
so the callable that :func:`get_norm_layer` returns works as a torchvision or timm ``norm_layer=``
argument.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from normkit._checks import check_count, check_dtype, check_flags
from normkit.layers import batch_channel, revisited, sandwich

__all__ = ["NormFactory", "create_norm", "get_norm_layer", "list_norms", "register_norm"]

NormFactory = Callable[..., nn.Module]

_REGISTRY: dict[str, NormFactory] = {}
_CANONICAL: dict[str, str] = {}  # normalized key -> the name it was registered under


def _key(name: str) -> str:
    return re.sub(r"[\s_\-.]", "", name).lower()


def register_norm(name: str, factory: NormFactory | None = None, *, overwrite: bool = False) -> Any:
    """Register ``factory(num_features, **kwargs) -> nn.Module`` under ``name``.

    Usable as a function or as a decorator::

        @normkit.register_norm("mynorm")
        class MyNorm(nn.Module):
            def __init__(self, num_features: int, **kwargs): ...

    A name already taken (after case and separator folding) raises ``ValueError`` unless
    ``overwrite=True``.
    """

    if not isinstance(name, str):
        raise TypeError(f"register_norm: expected a name (str), got {type(name).__name__}")

    def add(f: NormFactory) -> NormFactory:
        if not callable(f):
            raise TypeError(f"register_norm: expected a callable factory, got {f!r}")
        key = _key(name)
        if not key:
            raise ValueError(f"register_norm: expected a non-empty name, got {name!r}")
        if key in _REGISTRY and not overwrite:
            raise ValueError(
                f"register_norm: expected a free name, got {name!r}, which is taken (by "
                f"{_CANONICAL[key]!r}); pass overwrite=True to replace it"
            )
        _REGISTRY[key] = f
        _CANONICAL[key] = name
        return f

    if factory is None:
        return add
    return add(factory)


def list_norms() -> list[str]:
    """Every registered name, as registered, sorted."""
    return sorted(_CANONICAL.values())


def _lookup(name: str, caller: str) -> NormFactory:
    if not isinstance(name, str):
        raise TypeError(f"{caller}: expected a norm name (str), got {type(name).__name__}")
    factory = _REGISTRY.get(_key(name))
    if factory is None:
        raise ValueError(
            f"{caller}: expected a registered norm name, got unknown norm {name!r}; known norms: "
            f"{', '.join(list_norms())}"
        )
    return factory


def create_norm(name: str, num_features: int, **kwargs: Any) -> nn.Module:
    """Build the norm registered as ``name`` for ``num_features`` channels.

    Example::

        >>> normkit.create_norm("sabn-split", 64, num_domains=3)
        SandwichBatchNorm2d(64, num_domains=3, ..., split_stats=True, ...)
    """
    return _build(
        _lookup(name, "create_norm"), f"create_norm: cannot build {name!r}", num_features, kwargs
    )


def _build(factory: NormFactory, what: str, num_features: int, kwargs: dict[str, Any]) -> nn.Module:
    # A missing or unknown keyword fails inside the factory with a message that names a private
    # class (or nothing): say which registry call it was, keeping the factory's own message.
    try:
        return factory(num_features, **kwargs)
    except (TypeError, ValueError) as e:
        kind = TypeError if isinstance(e, TypeError) else ValueError
        args = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        raise kind(
            f"{what}: expected arguments its factory accepts, got num_features={num_features!r}"
            f"{args}: {e}"
        ) from e


class _NormLayer:
    """A picklable ``norm_layer`` callable: ``layer(num_features) -> nn.Module``."""

    def __init__(self, factory: NormFactory, label: str, kwargs: dict[str, Any]) -> None:
        self.factory = factory
        self.label = label
        self.kwargs = kwargs

    def __call__(self, num_features: int, **kwargs: Any) -> nn.Module:
        return _build(
            self.factory,
            f"get_norm_layer: {self!r} cannot build",
            num_features,
            {**self.kwargs, **kwargs},
        )

    def __repr__(self) -> str:
        args = "".join(f", {k}={v!r}" for k, v in self.kwargs.items())
        return f"norm_layer({self.label}{args})"


def get_norm_layer(name_or_callable: str | NormFactory, **kwargs: Any) -> _NormLayer:
    """A callable ``norm_layer(num_features)`` for torchvision- and timm-style models.

    ``name_or_callable`` is a registered name or any callable taking the channel count first (a
    layer class, a function); ``kwargs`` are bound to it and may be overridden at call time.

    Example::

        >>> from normkit.models import resnet18
        >>> model = resnet18(norm_layer=normkit.get_norm_layer("bcn", num_groups=32))
    """
    if isinstance(name_or_callable, str):
        factory = _lookup(name_or_callable, "get_norm_layer")
        label = repr(name_or_callable)
    elif callable(name_or_callable):
        factory = name_or_callable
        label = getattr(name_or_callable, "__name__", repr(name_or_callable))
    else:
        raise TypeError(
            "get_norm_layer: expected a norm name or a callable taking the channel count, got "
            f"{type(name_or_callable).__name__}"
        )
    return _NormLayer(factory, label, kwargs)


def _check_torch_options(layer: str, kwargs: dict[str, Any]) -> None:
    # torch's norms test their flags for truth (a tensor flag fails with a RuntimeError) and
    # give their dtype to torch.empty (an integer dtype fails with a RuntimeError).
    flags = ("affine", "track_running_stats", "elementwise_affine", "bias")
    check_flags(layer, **{k: v for k, v in kwargs.items() if k in flags})
    check_dtype(layer, kwargs.get("dtype"))


def _torch_norm(cls: type[nn.Module], num_features: int, *args: Any, **kwargs: Any) -> nn.Module:
    # torch's norms take a negative size to torch.empty, which fails with a RuntimeError.
    check_count(cls.__name__, "num_features", num_features)
    _check_torch_options(cls.__name__, kwargs)
    return cls(num_features, *args, **kwargs)


def _layer_norm(normalized_shape: int | list[int], **kwargs: Any) -> nn.LayerNorm:
    sizes = normalized_shape if isinstance(normalized_shape, (tuple, list)) else [normalized_shape]
    for size in sizes:
        check_count("LayerNorm", "normalized_shape", size)
    _check_torch_options("LayerNorm", kwargs)
    return nn.LayerNorm(normalized_shape, **kwargs)


def _register_builtins() -> None:
    families: dict[str, dict[str, NormFactory]] = {
        "bn": {
            "1d": functools.partial(_torch_norm, nn.BatchNorm1d),
            "2d": functools.partial(_torch_norm, nn.BatchNorm2d),
            "3d": functools.partial(_torch_norm, nn.BatchNorm3d),
        },
        "sabn": {
            "1d": sandwich.SandwichBatchNorm1d,
            "2d": sandwich.SandwichBatchNorm2d,
            "3d": sandwich.SandwichBatchNorm3d,
        },
        "ccbn": {
            "1d": sandwich.CategoricalConditionalBatchNorm1d,
            "2d": sandwich.CategoricalConditionalBatchNorm2d,
            "3d": sandwich.CategoricalConditionalBatchNorm3d,
        },
        "auxbn": {
            "1d": sandwich.AuxBatchNorm1d,
            "2d": sandwich.AuxBatchNorm2d,
            "3d": sandwich.AuxBatchNorm3d,
        },
        "bcn": {
            "1d": batch_channel.BatchChannelNorm1d,
            "2d": batch_channel.BatchChannelNorm2d,
            "3d": batch_channel.BatchChannelNorm3d,
        },
        "inputnorm": {"1d": revisited.InputNorm1d, "2d": revisited.InputNorm2d},
    }
    variants: dict[str, tuple[str, dict[str, Any]]] = {
        "sabn-split": ("sabn", {"split_stats": True}),
        "saauxbn": ("sabn", {"split_stats": True}),
        "ccbn-split": ("ccbn", {"split_stats": True}),
        "bcn-micro": ("bcn", {"estimate": True}),
    }
    for family, dims in families.items():
        register_norm(family, dims["2d"])
        for dim, cls in dims.items():
            register_norm(f"{family}{dim}", cls)
    for name, (family, bound) in variants.items():
        dims = families[family]
        register_norm(name, functools.partial(dims["2d"], **bound))
        for dim, cls in dims.items():
            register_norm(f"{name}-{dim}", functools.partial(cls, **bound))
    # Every family name takes the dimension suffixes of its layers (the bare name is 2d), as
    # convert_norm's targets do: "batchnorm3d" is "bn3d".
    for dim, cls in families["bn"].items():
        register_norm(f"batchnorm{dim}", cls)
    register_norm("batchnorm", families["bn"]["2d"])
    instance_norms = {"1d": nn.InstanceNorm1d, "2d": nn.InstanceNorm2d, "3d": nn.InstanceNorm3d}
    register_norm("in", functools.partial(_torch_norm, nn.InstanceNorm2d))
    for dim, in_cls in instance_norms.items():
        register_norm(f"in{dim}", functools.partial(_torch_norm, in_cls))
    register_norm("ln", _layer_norm)  # any rank: no dimension suffixes
    # Related methods (issue 8), one block per family; each helper edits only its own block.
    # -- renorm / batch-group names --
    from normkit.layers import batch_group, renorm  # here, so that this block stands alone

    renorms = {"1d": renorm.BatchRenorm1d, "2d": renorm.BatchRenorm2d, "3d": renorm.BatchRenorm3d}
    for name in ("batchrenorm", "brn"):
        register_norm(name, renorm.BatchRenorm2d)
        for dim, brn_cls in renorms.items():
            register_norm(f"{name}{dim}", brn_cls)
    for name in ("batchgroupnorm", "bgn"):
        register_norm(name, batch_group.BatchGroupNorm2d)  # 2d only: the bare name and "2d"
        register_norm(f"{name}2d", batch_group.BatchGroupNorm2d)
    # -- mabn names --
    from normkit.layers import mabn  # here, so that this block stands alone

    register_norm("mabn", mabn.MovingAverageBatchNorm2d)  # 2d only: the bare name and "2d"
    register_norm("mabn2d", mabn.MovingAverageBatchNorm2d)
    # -- iternorm / bnet names --
    from normkit.layers import bnet, iternorm  # here, so that this block stands alone

    register_norm("iternorm", iternorm.IterNorm2d)
    register_norm("iternorm1d", iternorm.IterNorm1d)
    register_norm("iternorm2d", iternorm.IterNorm2d)
    register_norm("bnet", bnet.BNET2d)  # 2d only: the bare name and "2d"; kernel_size= given
    register_norm("bnet2d", bnet.BNET2d)
    # -- frn / evonorm names --
    from normkit.layers import evonorm, response  # here, so that this block stands alone

    for name, cls in (
        ("frn", response.FilterResponseNorm2d),
        ("evonorm-b0", evonorm.EvoNormB0),
        ("evonorm-s0", evonorm.EvoNormS0),
    ):
        register_norm(name, cls)  # 2d layers only: the bare name and its "2d" spelling
        register_norm(f"{name}-2d", cls)
    # -- groupnorm / frozen names --
    from normkit.layers import frozen, group_norm  # here, so that this block stands alone

    for name in ("gn", "groupnorm"):
        # Any rank: the bare name, and every suffix (as the convert_norm target "gn3d").
        register_norm(name, group_norm.GroupNorm)
        for dim in ("1d", "2d", "3d"):
            register_norm(f"{name}{dim}", group_norm.GroupNorm)
    for name in ("frozenbn", "frozenbatchnorm"):
        register_norm(name, frozen.FrozenBatchNorm2d)  # 2d only: the bare name and "2d"
        register_norm(f"{name}2d", frozen.FrozenBatchNorm2d)


_register_builtins()
