"""Model-wide converters: swap batch norms for normkit layers, freeze and unfreeze norms.

:func:`convert_norm` replaces every batch norm of a model (optionally every group norm) with a
normkit layer, carrying the running statistics and affine into the matching parts through the
layers' own checkpoint-loading rules, and returns a :class:`ConversionReport` of what it changed.

:func:`freeze_norm` makes norms use their running statistics and stop training their affine, in
a way that ``model.train()`` cannot undo; :func:`unfreeze_norm` restores them exactly.
"""

from __future__ import annotations

import inspect
import math
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit._checks import check_flags
from normkit.layers import (
    batch_channel,
    batch_group,
    bnet,
    evonorm,
    iternorm,
    mabn,
    renorm,
    response,
    revisited,
    sandwich,
)
from normkit.layers.frozen import FrozenBatchNorm2d
from normkit.layers.group_norm import GroupNorm
from normkit.layers.weight_std import _exclusion_rule

__all__ = ["ConversionReport", "NormChange", "convert_norm", "freeze_norm", "unfreeze_norm"]

Exclude = Callable[[str, nn.Module], bool] | Collection[str] | None

# Exact classes only: a subclass may compute more than a batch norm (an activation, a custom
# forward), which a swap would silently drop.
_PLAIN_BATCH_NORMS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
)
_DIM_OF: tuple[tuple[type[nn.Module], int], ...] = (
    (nn.BatchNorm1d, 1),
    (nn.BatchNorm2d, 2),
    (nn.BatchNorm3d, 3),
)


# --- targets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    name: str
    classes: dict[int, type[nn.Module]]
    defaults: dict[str, Any]
    #: Start the target's step counter at 0: a batch norm's batch count is not its step (BRN's
    #: warm-up schedule reads it).
    restart_count: bool = False
    #: The target normalizes with the source's running statistics for good (no batch statistics
    #: of its own): a source without them (``track_running_stats=False``, a group norm) is
    #: refused, as fresh 0/1 statistics would compute another function.
    needs_statistics: bool = False


def _groups_of_32(num_features: int) -> int:
    """32 groups (GN's default) where the channels allow, else the largest divisor below."""
    return math.gcd(num_features, 32)


def _families() -> dict[str, _Family]:
    """The targets ``convert_norm`` knows, by folded name: the layer of each dimensionality and
    the options the name implies."""

    def dims(*classes: type[nn.Module] | None) -> dict[int, type[nn.Module]]:
        return {d: c for d, c in enumerate(classes, start=1) if c is not None}

    sabn = dims(
        sandwich.SandwichBatchNorm1d, sandwich.SandwichBatchNorm2d, sandwich.SandwichBatchNorm3d
    )
    ccbn = dims(
        sandwich.CategoricalConditionalBatchNorm1d,
        sandwich.CategoricalConditionalBatchNorm2d,
        sandwich.CategoricalConditionalBatchNorm3d,
    )
    bcn = dims(
        batch_channel.BatchChannelNorm1d,
        batch_channel.BatchChannelNorm2d,
        batch_channel.BatchChannelNorm3d,
    )
    table = [
        _Family("bn", dims(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), {}),
        _Family("sabn", sabn, {}),
        _Family("sabn-split", sabn, {"split_stats": True}),
        _Family("ccbn", ccbn, {}),
        _Family("ccbn-split", ccbn, {"split_stats": True}),
        _Family(
            "auxbn",
            dims(sandwich.AuxBatchNorm1d, sandwich.AuxBatchNorm2d, sandwich.AuxBatchNorm3d),
            {},
        ),
        _Family("bcn", bcn, {}),
        _Family("bcn-micro", bcn, {"estimate": True}),
        _Family("inputnorm", dims(revisited.InputNorm1d, revisited.InputNorm2d), {}),
        _Family("gn", dims(GroupNorm, GroupNorm, GroupNorm), {}),
        _Family("frozenbn", dims(None, FrozenBatchNorm2d), {}, needs_statistics=True),
        _Family(
            "brn",
            dims(renorm.BatchRenorm1d, renorm.BatchRenorm2d, renorm.BatchRenorm3d),
            {},
            restart_count=True,
        ),
        _Family("bgn", dims(None, batch_group.BatchGroupNorm2d), {"num_groups": _groups_of_32}),
        # MABN's momentum is the official one, not the batch norm's (see its docstring).
        _Family("mabn", dims(None, mabn.MovingAverageBatchNorm2d), {"momentum": 0.02}),
        _Family("iternorm", dims(iternorm.IterNorm1d, iternorm.IterNorm2d), {}),
        _Family("bnet", dims(None, bnet.BNET2d), {}),
        # FRN's eps is of another quantity (a mean square) than a batch norm's: its own default.
        _Family("frn", dims(None, response.FilterResponseNorm2d), {"eps": 1e-6}),
        _Family("evonorm-b0", dims(None, evonorm.EvoNormB0), {}),
        _Family("evonorm-s0", dims(None, evonorm.EvoNormS0), {"num_groups": _groups_of_32}),
    ]
    aliases = {
        "batchnorm": "bn",
        "saauxbn": "sabn-split",
        "groupnorm": "gn",
        "frozenbatchnorm": "frozenbn",
        "batchrenorm": "brn",
        "batchgroupnorm": "bgn",
    }
    found = {_fold(f.name): f for f in table}
    found.update({_fold(a): found[_fold(n)] for a, n in aliases.items()})
    return found


def _fold(name: str) -> str:
    return re.sub(r"[\s_\-.]", "", name).lower()


def _resolve_target(to: Any) -> tuple[_Family, int | None]:
    """The family ``to`` names, and the dimensionality it names if any (a class, a suffix)."""
    families = _families()
    if isinstance(to, str):
        key = _fold(to)
        match = re.fullmatch(r"(.+?)([123])d", key)
        family = families.get(key)
        if family is None and match and match.group(1) in families:
            return families[match.group(1)], int(match.group(2))
        if family is None:
            known = ", ".join(sorted({f.name for f in families.values()}))
            raise ValueError(f"convert_norm: unknown target {to!r}; known targets: {known}")
        return family, None
    if isinstance(to, type):
        # Aliases map to the same family object: each family once, in table order.
        unique = {id(f): f for f in families.values()}.values()
        owners = [f for f in unique if to in f.classes.values()]
        # A class shared by a family and its variants (SaBN and SaBN-split) names the plain
        # family, the one without implied options.
        if len(owners) > 1:
            owners = [f for f in owners if not f.defaults]
        if len(owners) == 1:
            family = owners[0]
            return family, min(d for d, c in family.classes.items() if c is to)
        if owners:
            raise TypeError(
                f"convert_norm: expected `to` to name one target family, got {to.__name__}, a "
                f"class of {', '.join(repr(f.name) for f in owners)}; pass the target name"
            )
    known_classes = sorted({c.__name__ for f in families.values() for c in f.classes.values()})
    raise TypeError(
        "convert_norm: expected `to` to be a target name or one of the classes "
        f"{', '.join(known_classes)}; got {to!r}"
    )


# --- the report -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NormChange:
    """One replaced layer of :func:`convert_norm`.

    Attributes:
        names: every qualified name (as in ``model.named_modules()``) of the replaced module; more
            than one when the module was shared. ``""`` is the model itself.
        source: the class of the replaced module.
        target: the class of its replacement.
        fresh: state-dict keys of the replacement that nothing was carried into; they keep the
            layer's initial values (SaBN's per-domain affine, BCN's channel-part affine, the
            running statistics of a layer that replaced a group norm).
        dropped: state-dict keys of the source that the replacement has no place for (only when
            the keyword arguments remove a part, e.g. ``affine=False``, or for ``treat_as_bn``
            classes with state of their own).
    """

    names: tuple[str, ...]
    source: type[nn.Module]
    target: type[nn.Module]
    fresh: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()

    def __str__(self) -> str:
        s = f"{', '.join(_show(n) for n in self.names)}: {self.source.__name__} -> "
        s += self.target.__name__
        if self.fresh:
            s += f" (fresh: {', '.join(self.fresh)})"
        if self.dropped:
            s += f" (dropped: {', '.join(self.dropped)})"
        return s


@dataclass(frozen=True, eq=False, repr=False)
class ConversionReport:
    """What :func:`convert_norm` did.

    Attributes:
        model: the converted model: the model passed in (converted in place), or the replacement
            of the model itself when the model is itself a batch norm.
        changes: one :class:`NormChange` per replaced module, in ``named_modules()`` order.
        left_alone: ``(name, reason)`` for every norm layer found but not replaced (a normkit
            layer, an excluded module, a layer that already is the target).
        target: the target family name.

    ``len(report)`` is the number of replaced modules; iterating gives the changes; ``str(report)``
    is a readable table.
    """

    model: nn.Module
    changes: tuple[NormChange, ...]
    left_alone: tuple[tuple[str, str], ...] = field(default=())
    target: str = ""

    @property
    def names(self) -> list[str]:
        """Every qualified name that now holds a new layer (all names of shared modules)."""
        return [n for change in self.changes for n in change.names]

    def __len__(self) -> int:
        return len(self.changes)

    def __iter__(self) -> Iterator[NormChange]:
        return iter(self.changes)

    def __repr__(self) -> str:
        return (
            f"ConversionReport(model={type(self.model).__name__}, target={self.target!r}, "
            f"changes={len(self.changes)}, left_alone={len(self.left_alone)})"
        )

    def __str__(self) -> str:
        count = len(self.changes)
        lines = [
            f"convert_norm to {self.target!r}: replaced {count} "
            f"module{'' if count == 1 else 's'} of {type(self.model).__name__}"
        ]
        lines += [f"  {change}" for change in self.changes]
        if self.left_alone:
            lines.append("left alone:")
            lines += [f"  {_show(name)}: {reason}" for name, reason in self.left_alone]
        return "\n".join(lines)


def _show(name: str) -> str:
    return name if name else "(model)"


# --- convert_norm ---------------------------------------------------------------------------------


def convert_norm(
    model: nn.Module,
    to: str | type[nn.Module],
    *,
    include_groupnorm: bool = False,
    treat_as_bn: Iterable[type[nn.Module]] = (),
    exclude: Exclude = None,
    default_dim: int | None = None,
    strict: bool = True,
    **kwargs: Any,
) -> ConversionReport:
    """Replace every batch norm of ``model`` with a normkit layer, carrying its state over.

    Every module whose class is exactly ``nn.BatchNorm1d``, ``nn.BatchNorm2d``,
    ``nn.BatchNorm3d`` or ``nn.SyncBatchNorm`` (and ``nn.GroupNorm`` or :class:`normkit.GroupNorm`
    with ``include_groupnorm``, and the classes listed in ``treat_as_bn``) is replaced, in place
    and however deeply nested, by the ``to`` layer of the matching dimensionality. The new layer
    is built with the source's ``num_features``, ``eps``, ``momentum``, ``affine`` and
    ``track_running_stats``, then ``kwargs`` (which win), on the source's device and dtype, and
    takes the source's training flag. It then loads the source's state dict, so that each
    layer's own checkpoint rules put the statistics and affine into the matching parts:

    ==============  ============================================================================
    target          what the batch norm's state becomes
    ==============  ============================================================================
    ``bn``          the same (useful to turn ``nn.SyncBatchNorm`` or a ``treat_as_bn`` subclass
                    back into a plain batch norm)
    ``sabn``        shared statistics and the shared "sandwich" affine ``weight``/``bias``; the
                    per-domain affine is fresh: pass ``domain_std=0.0`` to start it at exactly
                    (1, 0), and the converted model computes the same function for every domain
    ``sabn-split``  as ``sabn`` with the statistics copied to every domain (``saauxbn``)
    ``ccbn``        shared statistics; the affine becomes every domain's affine (same function;
                    from an ``affine=False`` source the per-domain affine is fresh: the same
                    function with ``domain_std=0.0``)
    ``ccbn-split``  as ``ccbn`` with the statistics copied to every domain
    ``auxbn``       statistics and affine copied to every domain (same function)
    ``bcn``         BCN's batch part (``weight``, ``bias``, ``running_*``); the channel part's
                    ``group_weight``/``group_bias`` is fresh; pass ``num_groups``
    ``bcn-micro``   as ``bcn`` with ``estimate=True``: the running statistics become the initial
                    estimates (the unbiased running variance is read as the estimate)
    ``inputnorm``   statistics and affine; the shift stays frozen (InputNorm's rule); from an
                    ``affine=False`` source the scale is fresh (``scale · 0.58``): not the same
                    function
    ``gn``          the affine (:class:`normkit.GroupNorm`, any dimensionality; pass
                    ``num_groups``, default 32); the statistics are dropped (``groupnorm``)
    ``frozenbn``    statistics and affine, all as buffers (:class:`normkit.FrozenBatchNorm2d`,
                    2d only): the eval-mode function, frozen for good; a source without running
                    statistics (``track_running_stats=False``, a group norm) is refused
    ``brn``         statistics and affine (:class:`normkit.BatchRenorm2d`): the same eval
                    function; the step counter restarts at 0, so training starts with the
                    warm-up of the renormalization schedule
    ``bnet``        statistics; the affine becomes the centre tap and bias of the depthwise
                    kernel (:class:`normkit.BNET2d`, 2d): the same function; a frozen ``weight``
                    freezes the whole kernel (its other taps stay 0)
    ``bgn``         the affine; the per-channel statistics are dropped (BGN keeps one per group;
                    ``num_groups`` defaults to the largest divisor of the channels up to 32)
    ``mabn``        the running variance and the affine (no mean: MABN does not centre); the
                    official momentum 0.02 unless ``momentum`` is given
    ``iternorm``    the running mean and the affine; the whitening matrices start at the identity
    ``frn``         the affine (FRN has no statistics; its own eps, 1e-6, unless given)
    ``evonorm-b0``  the running variance and the affine
    ``evonorm-s0``  the affine (no statistics; groups as for ``bgn``)
    ==============  ============================================================================

    Where a running statistic starts fresh or is dropped (``bgn``, ``mabn``'s ring buffers,
    ``iternorm``'s whitening matrices, a group norm target), ``num_batches_tracked`` restarts at 0
    too and is reported as fresh: the count belongs to the statistics it averaged.

    ``to`` is one of these names, case- and separator-insensitive (``"SaBN_split"``), or a
    class of one of these families (``normkit.SandwichBatchNorm2d``; a class shared by a family
    and its variants names the plain family, ``normkit.BatchChannelNorm2d`` is ``bcn``). Either
    way it names a family, with the options the name implies (``bgn``'s group count): the
    dimensionality comes from each source (``BatchNorm1d`` becomes the 1d layer, ``BatchNorm3d``
    the 3d one). Sources that do not say (``nn.SyncBatchNorm``, ``nn.GroupNorm``, a
    ``treat_as_bn`` class not derived from ``BatchNorm1d/2d/3d``) get ``default_dim``, which
    defaults to the dimensionality ``to`` names (a class, or a suffix such as ``"sabn3d"``),
    else 2.

    ``kwargs`` go to every new layer (``num_domains=3``, ``domain_std=0.0``, ``num_groups=8``,
    ``estimate=True``, ``momentum=None``); ``num_groups`` may also be a callable of the channel
    count, such as ``lambda c: math.gcd(c, 32)``, for models whose widths a fixed group count does
    not divide. Options a target class does not take (``affine`` for CCBN and InputNorm) are not
    passed from the source.

    Group norms (``include_groupnorm=True``) carry their affine, not statistics: into the shared
    affine (or CCBN/AuxBN's per-domain affine), and for BCN into the channel part, which is
    a group norm: ``group_weight``/``group_bias`` with ``group_affine="per_channel"`` (the
    default chosen for a group norm with an affine; ``"per_group"`` cannot hold a per-channel
    affine and is refused) and ``num_groups`` the group norm's unless given. Statistics and
    BCN's batch part start fresh, so such a conversion does not keep the function.

    Guarantees:

    * parameters that did not require grad in the source do not in the replacement (wherever
      they went); a source without a learnable shift (``bias=False``) gives a shift fixed at 0
      with ``requires_grad=False``; every other new parameter requires grad;
    * a module reachable under several names (shared) is replaced by one new object placed at
      all of them; the model is read fully before anything changes, and nothing changes if any
      layer cannot be built (the error names it);
    * normkit layers (already converted, or frozen by :func:`freeze_norm`) are left alone;
    * the new layers hold **new** Parameter objects: create the optimizer after converting.

    Hooks registered on a replaced module are not carried over (a warning names the module). A
    process group of ``nn.SyncBatchNorm`` is dropped: convert to synchronized layers afterwards.

    Args:
        model: any module, possibly itself a batch norm.
        to: a target name (table above) or a class of one of those families.
        include_groupnorm: also replace exact ``nn.GroupNorm`` modules.
        treat_as_bn: classes to convert as if they were plain batch norms, read through the
            ``nn.BatchNorm`` attributes and state-dict names. A subclass's own forward (the
            activation of a ``BatchNormAct``) is **dropped**: list a class only if that is what
            you want. Exact classes: a subclass of a listed class is not covered.
        exclude: modules to leave alone: a callable ``(qualified_name, module) -> bool``, or a
            collection of qualified names (a name also excludes everything under it; ``""``,
            the model itself, excludes everything).
        default_dim: 1, 2 or 3, for sources that do not tell their dimensionality.
        strict: raise when there is nothing to convert (default); ``False`` returns an empty
            report instead.
        **kwargs: options of the target layers.

    Returns:
        A :class:`ConversionReport`; ``report.model`` is the converted model (``model`` itself
        unless ``model`` is a batch norm).

    Raises:
        TypeError: a batch-norm subclass (or, with ``include_groupnorm``, a group-norm subclass)
            that is neither normkit's nor listed in ``treat_as_bn`` and not excluded: its forward
            may do more than normalize. The message names every such module and its class.
        ValueError: an unknown target; nothing to convert (with ``strict``); for ``frozenbn``,
            sources without running statistics (the message names every one).
        TypeError or ValueError: a layer that cannot be built from its source and ``kwargs`` (a
            missing ``num_domains``, a group count that does not divide the channels): the
            message names the module, its class and the layer's own error. Nothing is changed.

    Example::

        >>> model = normkit.models.resnet18(num_classes=10)  # nn.BatchNorm2d everywhere
        >>> report = normkit.convert_norm(model, "sabn", num_domains=3, domain_std=0.0)
        >>> print(report)  # doctest: +ELLIPSIS
        convert_norm to 'sabn': replaced 20 modules of ImageNetResNet
          bn1: BatchNorm2d -> SandwichBatchNorm2d (fresh: domain_weight, domain_bias)
          layer1.0.bn1: BatchNorm2d -> SandwichBatchNorm2d (fresh: domain_weight, domain_bias)
        ...
        >>> model = report.model.eval()
        >>> with normkit.condition(model, torch.tensor([0, 2])):  # as the BN model, any domain
        ...     out = model(torch.randn(2, 3, 64, 64))
        >>> other = normkit.models.resnet20()  # widths 16, 32, 64
        >>> report = normkit.convert_norm(
        ...     other, "bcn-micro", num_groups=lambda c: math.gcd(c, 32)
        ... )
        >>> report.model.layer1[0].bn1.num_groups, report.model.layer3[0].bn1.num_groups
        (16, 32)
    """
    where = "convert_norm"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    family, named_dim = _resolve_target(to)
    check_flags(where, include_groupnorm=include_groupnorm, strict=strict)
    if default_dim is None:
        default_dim = named_dim if named_dim is not None else 2
    if type(default_dim) is not int or default_dim not in (1, 2, 3):
        raise ValueError(f"{where}: expected default_dim in (1, 2, 3), got {default_dim!r}")
    taken = sorted({"num_features", "device", "dtype"} & kwargs.keys())
    if taken:
        raise TypeError(
            f"{where}: got {', '.join(taken)} in kwargs, which every new layer takes from its "
            "source; move the model (model.to(...)) after converting instead"
        )
    listed = _check_treat_as_bn(treat_as_bn)
    sources: tuple[type[nn.Module], ...] = _PLAIN_BATCH_NORMS + listed
    if include_groupnorm:
        sources += (nn.GroupNorm, GroupNorm)  # normkit's is torch's with the arguments reordered

    # Pass 1: every name of every module, without touching the model.
    names_of: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    is_excluded = _exclusion_rule(where, exclude, names_of)

    todo: list[int] = []
    unknown: list[str] = []
    stateless: list[str] = []
    left_alone: list[tuple[str, str]] = []
    for key, module in modules.items():
        cls = type(module)
        # FrozenBatchNorm2d is listed, as a normkit layer left alone, but never converted.
        is_norm = isinstance(module, (_BatchNorm, FrozenBatchNorm2d)) or (
            include_groupnorm and isinstance(module, nn.GroupNorm)
        )
        if not is_norm and cls not in listed:
            continue
        first = names_of[key][0]
        if any(is_excluded(n, module) for n in names_of[key]):
            left_alone.append((first, f"{cls.__name__}, excluded"))
        elif cls in sources:
            target = family.classes.get(_source_dim(module, default_dim))
            if target is cls:
                left_alone.append((first, f"{cls.__name__}, already the target"))
            elif family.needs_statistics and not _has_running_statistics(module):
                stateless.append(f"{_show(first)!r} ({cls.__name__})")
            else:
                todo.append(key)
        elif _is_normkit(cls):
            left_alone.append((first, f"{cls.__name__}, a normkit layer"))
        else:
            unknown.append(f"{_show(first)!r} ({cls.__module__}.{cls.__qualname__})")
    if unknown:
        raise TypeError(
            f"{where}: refusing {len(unknown)} norm subclass{'es' if len(unknown) > 1 else ''} "
            f"it does not know, whose forward may do more than normalize (that would be lost): "
            f"{', '.join(unknown)}. Pass treat_as_bn=(TheClass,) to convert such a class as a "
            "plain batch norm, or exclude=... to leave the modules alone"
        )
    if stateless:
        raise ValueError(
            f"{where}: expected norms with running statistics to convert to {family.name!r}, "
            f"which normalizes with them for good, got {', '.join(stateless)} without any "
            "(track_running_stats=False, or a group norm: statistics of each batch or sample, "
            "which fresh 0/1 statistics would not compute); exclude them or choose another "
            "target"
        )
    if not todo:
        if strict:
            looked = "nn.BatchNorm1d/2d/3d, nn.SyncBatchNorm"
            if include_groupnorm:
                looked += ", nn.GroupNorm"
            if listed:
                looked += ", " + ", ".join(c.__name__ for c in listed)
            alone = (
                "; left alone: " + ", ".join(f"{_show(n)} ({r})" for n, r in left_alone)
                if left_alone
                else ""
            )
            raise ValueError(
                f"{where}: expected a model with a norm layer to convert to {family.name!r}, got "
                f"a {type(model).__name__} with none (looked for exact {looked}{alone}); pass "
                "strict=False to accept a model with nothing to convert"
            )
        return ConversionReport(model, (), tuple(left_alone), family.name)

    # Build every replacement before changing anything, so that a failure leaves the model whole.
    replacements: dict[int, nn.Module] = {}
    changes: list[NormChange] = []
    for key in todo:
        source, names = modules[key], tuple(names_of[key])
        new, fresh, dropped = _build(where, source, names[0], family, default_dim, kwargs)
        replacements[key] = new
        changes.append(NormChange(names, type(source), type(new), fresh, dropped))
        if _has_hooks(source):
            warnings.warn(
                f"{where}: {_show(names[0])!r} ({type(source).__name__}) has hooks, which are "
                "not carried over to its replacement",
                stacklevel=2,
            )

    # Pass 2: re-point every slot holding a replaced module; each container's children are
    # snapshotted before it is written to.
    for parent in modules.values():
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, attr, replacements[id(child)])
    converted = replacements.get(id(model), model)
    return ConversionReport(converted, tuple(changes), tuple(left_alone), family.name)


def _check_treat_as_bn(treat_as_bn: Iterable[type[nn.Module]]) -> tuple[type[nn.Module], ...]:
    where = "convert_norm"
    items: tuple[Any, ...] = (treat_as_bn,) if isinstance(treat_as_bn, type) else tuple(treat_as_bn)
    for cls in items:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"{where}: expected treat_as_bn to hold nn.Module classes, got {cls!r}")
        if _is_normkit(cls):
            raise TypeError(
                f"{where}: normkit layers are never converted, so treat_as_bn cannot list "
                f"{cls.__name__}"
            )
    return items


def _is_normkit(cls: type) -> bool:
    return cls.__module__ == "normkit" or cls.__module__.startswith("normkit.")


def _source_dim(module: nn.Module, default: int) -> int:
    for cls, dim in _DIM_OF:
        if isinstance(module, cls):
            return dim
    return default


def _has_running_statistics(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with running statistics in eval mode: a variance (a batch
    norm, MABN, EvoNorm-B0) or whitening matrices (IterNorm); never a group norm."""
    if isinstance(module, nn.GroupNorm):
        return False
    return any(isinstance(getattr(module, k, None), Tensor) for k in ("running_var", "running_wm"))


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _first_tensor(module: nn.Module, names: tuple[str, ...]) -> Tensor | None:
    for name in names:
        t = getattr(module, name, None)
        if isinstance(t, Tensor):
            return t
    return None


def _build(
    where: str,
    source: nn.Module,
    name: str,
    family: _Family,
    default_dim: int,
    kwargs: dict[str, Any],
) -> tuple[nn.Module, tuple[str, ...], tuple[str, ...]]:
    """The replacement of ``source``, its fresh keys and the source keys it could not hold."""
    label = f"{_show(name)!r} ({type(source).__name__})"
    dim = _source_dim(source, default_dim)
    cls = family.classes.get(dim)
    if cls is None:
        raise ValueError(
            f"{where}: target {family.name!r} has no {dim}d layer for {label}; it has "
            f"{', '.join(f'{d}d' for d in sorted(family.classes))}"
        )
    accepts = inspect.signature(cls).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepts.values())

    weight = _first_tensor(source, ("weight",))
    bias = _first_tensor(source, ("bias",))
    is_group_norm = isinstance(source, nn.GroupNorm)
    if is_group_norm:
        assert isinstance(source, nn.GroupNorm)
        num_features = source.num_channels
        derived: dict[str, Any] = {"eps": source.eps, "affine": source.affine}
        derived["num_groups"] = source.num_groups
        if source.affine:
            derived["group_affine"] = "per_channel"
    else:
        running = _first_tensor(source, ("running_mean",))
        found = getattr(source, "num_features", None)
        if found is None:
            shaped = weight if weight is not None else running
            found = shaped.shape[0] if shaped is not None else None
        if not isinstance(found, int):
            raise ValueError(f"{where}: cannot tell the number of features of {label}")
        num_features = found
        derived = {
            "eps": getattr(source, "eps", 1e-5),
            "momentum": getattr(source, "momentum", 0.1),
            "affine": getattr(source, "affine", weight is not None),
            "track_running_stats": getattr(source, "track_running_stats", running is not None),
        }
    no_shift = weight is not None and bias is None
    if no_shift:
        derived["bias"] = False
    config = {k: v for k, v in derived.items() if takes_any or k in accepts}
    config.update(family.defaults)
    config.update(kwargs)
    groups = config.get("num_groups")
    if callable(groups):
        config["num_groups"] = groups(num_features)

    reference = weight if weight is not None else _first_tensor(source, ("running_mean", "bias"))
    factory: dict[str, Any] = {}
    if reference is not None:
        factory = {"device": reference.device, "dtype": reference.dtype}
    try:
        new = cls(num_features, **config, **factory)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{where}: cannot build {cls.__name__} for {label}: {e}") from e

    # A group norm's checkpoint version is not a batch norm's: its keys go in without it.
    state = OrderedDict(source.state_dict()) if is_group_norm else source.state_dict()
    renames: dict[str, str] = {}
    if is_group_norm:
        group_weight = getattr(new, "group_weight", None)
        if source.affine and group_weight is not None:
            if tuple(group_weight.shape) != (num_features,):
                raise ValueError(
                    f"{where}: cannot carry the per-channel affine of {label} into "
                    f"{cls.__name__}'s group_affine={getattr(new, 'group_affine', None)!r} "
                    "(one value per group); use group_affine='per_channel'"
                )
            renames = {"weight": "group_weight", "bias": "group_bias"}
    # Without a learnable shift the source computes a zero shift; unless the target can drop
    # its shift too, the replacement's shift is pinned at zero (below), so that the function and
    # what trains both stay the same.
    pin_shift = no_shift and config.get("bias") is not False
    if pin_shift and weight is not None:
        state["bias"] = torch.zeros_like(weight)
    for old, new_key in renames.items():
        if old in state:
            state[new_key] = state.pop(old)
    _match_buffer_dtypes(source, new)
    unfit: list[str] = []
    try:
        result = new.load_state_dict(state, strict=False)
    except RuntimeError as e:
        # Statistics the target keeps in another shape (BatchGroupNorm2d's per group) start
        # fresh and are reported as dropped; anything else that does not fit is no norm's state
        # (a treat_as_bn class that is no norm).
        own = new.state_dict()
        unfit = [
            k
            for k in _STATISTICS
            if k in state and k in own and tuple(own[k].shape) != tuple(state[k].shape)
        ]
        for key in unfit:
            del state[key]
        try:
            result = new.load_state_dict(state, strict=False)
        except RuntimeError:
            raise ValueError(
                f"{where}: cannot carry the state of {label} into {cls.__name__}: {e}"
            ) from e
    fresh = tuple(k for k in result.missing_keys if k not in unfit)
    # The batch count belongs to the statistics it averaged: where a running statistic starts
    # fresh (or was dropped for its shape), or the target counts steps of its own, it restarts
    # at 0, so that a cumulative average (momentum=None) or a warm-up reads the new state's age.
    float_buffers = {k for k, b in new.named_buffers() if b.is_floating_point()}
    restarted = family.restart_count or any(k in float_buffers for k in (*fresh, *unfit))
    count = getattr(new, "num_batches_tracked", None)
    if restarted and isinstance(count, Tensor) and "num_batches_tracked" not in fresh:
        with torch.no_grad():
            count.zero_()
        fresh += ("num_batches_tracked",)

    frozen = [n for n, p in source.named_parameters(recurse=False) if not p.requires_grad]
    if pin_shift:
        frozen.append("bias")
    for key in frozen:
        home = _home_of(new, renames.get(key, key), fresh)
        if home is not None:
            home.requires_grad_(False)
    new.train(source.training)
    return new, fresh, (*result.unexpected_keys, *unfit)


_STATISTICS = ("running_mean", "running_var")


def _home_of(new: nn.Module, key: str, fresh: tuple[str, ...]) -> nn.Parameter | None:
    """The parameter of ``new`` that received the source's ``key``: the same name; every
    domain's, for the conditional layers without a shared affine (CCBN, AuxBN); or BNET's
    depthwise convolution, whose centre tap and bias hold a batch norm's affine (their checkpoint
    rules). A frozen ``weight`` freezes BNET's whole kernel: its other taps start at 0, so the
    layer keeps computing the source's fixed scale."""
    for own in (key, "domain_" + key, "conv_" + key):
        p = new._parameters.get(own)
        if p is not None and own not in fresh:
            return p
    return None


def _match_buffer_dtypes(source: nn.Module, new: nn.Module) -> None:
    # A model may keep its statistics in another dtype than its affine (float32 buffers next to
    # half parameters); the replacement keeps each buffer's dtype.
    for key, buf in list(new._buffers.items()):
        theirs = source._buffers.get(key)
        if (
            buf is not None
            and theirs is not None
            and buf.dtype != theirs.dtype
            and buf.is_floating_point()
            and theirs.is_floating_point()
        ):
            new._buffers[key] = buf.to(theirs.dtype)


# --- freeze_norm / unfreeze_norm ------------------------------------------------------------------


_SAVED = "_normkit_frozen_requires_grad"

#: normkit's batch-statistics layers that are not ``_BatchNorm`` subclasses; their eval mode is
#: their running statistics (and, for EvoNorm-B0, the per-sample part), so they freeze as a batch
#: norm does.
_BATCH_STATISTICS_LAYERS: tuple[type[nn.Module], ...] = (iternorm._IterNorm, evonorm.EvoNormB0)


class _FrozenNorm:
    """Mixin put in front of a norm's class by :func:`freeze_norm`.

    ``training`` reads False whatever is assigned to it, so the layer normalizes with its running
    statistics and leaves them alone even after ``model.train()``; the mode the model asks for is
    kept in the instance, where :func:`unfreeze_norm` finds it.
    """

    _normkit_unfrozen: type[nn.Module]

    @property
    def training(self) -> bool:
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["training"] = mode

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The frozen class is made at run time, so pickle finds it through the original class.
        # The state goes third, so that copy and pickle create the object before its state and
        # references back to the module resolve.
        module: Any = self
        return (_new_frozen, (type(self)._normkit_unfrozen,), module.__getstate__())


_FROZEN_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _frozen_class(cls: type[nn.Module]) -> type[nn.Module]:
    frozen = _FROZEN_CLASSES.get(cls)
    if frozen is None:
        name = f"Frozen{cls.__name__}"
        frozen = type(
            name,
            (_FrozenNorm, cls),
            {
                "__module__": __name__,
                "__qualname__": name,
                "__doc__": f"A {cls.__name__} frozen by normkit.freeze_norm.",
                "_normkit_unfrozen": cls,
            },
        )
        _FROZEN_CLASSES[cls] = frozen
    return frozen


def _new_frozen(cls: type[nn.Module]) -> nn.Module:
    frozen = _frozen_class(cls)
    module: nn.Module = frozen.__new__(frozen)
    return module


def freeze_norm(
    model: nn.Module,
    *,
    include_groupnorm: bool = False,
    freeze_affine: bool = True,
    exclude: Exclude = None,
) -> nn.Module:
    """Freeze every batch norm of ``model``: running statistics, and an affine that does not train.

    Each batch norm (every ``nn.modules.batchnorm._BatchNorm``: torch's BN and SyncBN, normkit's
    SaBN, CCBN, AuxBN, BCN, InputNorm, BatchRenorm, BNET, BGN and MABN, and subclasses such as
    timm's ``BatchNormAct2d``), normkit's other batch-statistics layers (``IterNorm1d/2d``,
    ``EvoNormB0``), and each ``nn.GroupNorm`` with ``include_groupnorm``, is frozen **in
    place**:

    * its class becomes a subclass, ``Frozen<Class>`` (so ``isinstance`` checks, the forward,
      the state-dict keys and the Parameter objects are unchanged), whose ``training`` is always
      False: the layer normalizes with its running statistics and never updates them, and
      ``model.train()`` (or assigning ``layer.training``) cannot undo that;
    * with ``freeze_affine`` (default), every parameter of the layer gets
      ``requires_grad=False``, so no gradient reaches the affine (gradients still flow to the
      layer's input).

    What "frozen" means per layer is its eval mode: SaBN/CCBN/AuxBN use their (shared or
    per-domain) running statistics and keep their per-domain affines; BCN's batch part uses its
    running statistics (its estimates with ``estimate=True``), and its channel part stays per
    sample, as it has no batch statistics; IterNorm whitens with its running mean and whitening
    matrices; EvoNorm-B0 uses its running variance beside its per-sample one. A frozen layer's
    output for a sample therefore does not depend on the rest of the batch, in train mode too.
    Group norms have no statistics: freezing one only stops its affine from training.

    Freezing is idempotent; :func:`unfreeze_norm` undoes it exactly. Frozen models deep-copy and
    pickle. :func:`convert_norm` leaves frozen layers alone. A model without any such norm
    (frozen or not) is returned unchanged with a ``UserWarning``: the call has no effect, which
    is rarely what was meant (a group-norm model needs ``include_groupnorm=True``).

    Args:
        model: any module, possibly itself a norm layer.
        include_groupnorm: also freeze ``nn.GroupNorm`` modules (and their subclasses).
        freeze_affine: also set ``requires_grad=False`` on the layers' parameters; ``False``
            freezes the statistics only.
        exclude: modules to leave alone: a callable ``(qualified_name, module) -> bool``, or a
            collection of qualified names (a name also excludes everything under it; ``""``,
            the model itself, excludes everything).

    Returns:
        ``model``, frozen in place.

    Raises:
        ValueError: a norm without running statistics (``track_running_stats=False``), which
            has nothing to freeze to, or a lazy norm not initialized yet (its first forward
            would turn it into its plain, unfrozen class); the message names every such module.
            Every layer is checked before any is frozen, so the model is then unchanged.

    Example::

        >>> model = normkit.models.resnet18(num_classes=10)
        >>> model = normkit.freeze_norm(model).train()  # the batch norms stay frozen
        >>> type(model.bn1).__name__, model.bn1.training, model.bn1.weight.requires_grad
        ('FrozenBatchNorm2d', False, False)
        >>> model = normkit.unfreeze_norm(model)  # in train mode, as the model
        >>> type(model.bn1).__name__, model.bn1.training, model.bn1.weight.requires_grad
        ('BatchNorm2d', True, True)
    """
    where = "freeze_norm"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    check_flags(where, include_groupnorm=include_groupnorm, freeze_affine=freeze_affine)
    names_of: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
        modules[id(module)] = module
    is_excluded = _exclusion_rule(where, exclude, names_of)
    kinds: tuple[type[nn.Module], ...] = (_BatchNorm, *_BATCH_STATISTICS_LAYERS)
    if include_groupnorm:
        kinds += (nn.GroupNorm,)

    # Everything is checked before anything changes: a refused layer leaves the model whole.
    todo: list[nn.Module] = []
    stateless: list[str] = []
    lazy: list[str] = []
    # FrozenBatchNorm2d counts as an already frozen batch norm: no warning, nothing to do.
    if not any(isinstance(module, (*kinds, FrozenBatchNorm2d)) for module in modules.values()):
        looked = "batch norms" + (" or group norms" if include_groupnorm else "")
        warnings.warn(
            f"{where}: expected a model with {looked}, got a {type(model).__name__} with none; "
            "nothing was frozen",
            stacklevel=2,
        )
    for key, module in modules.items():
        if not isinstance(module, kinds) or isinstance(module, _FrozenNorm):
            continue
        if any(is_excluded(n, module) for n in names_of[key]):
            continue
        label = f"{_show(names_of[key][0])!r} ({type(module).__name__})"
        # An uninitialized lazy layer has no statistics yet, and its first forward would turn it
        # into its plain class, thawing it.
        if any(
            t is not None and nn.parameter.is_lazy(t)
            for t in (*module._parameters.values(), *module._buffers.values())
        ):
            lazy.append(label)
            continue
        # running_var, not running_mean: a norm without centring (MABN) tracks no mean.
        if not isinstance(module, nn.GroupNorm) and not _has_running_statistics(module):
            stateless.append(label)
            continue
        todo.append(module)
    if lazy:
        raise ValueError(
            f"{where}: expected initialized norms, got {', '.join(lazy)} with uninitialized "
            "(lazy) parameters or buffers; run a forward pass first, or exclude them"
        )
    if stateless:
        raise ValueError(
            f"{where}: expected batch norms with running statistics, got "
            f"{', '.join(stateless)} with track_running_stats=False, which normalize with batch "
            "statistics in eval mode too; exclude them"
        )
    for module in todo:
        saved = {n: p.requires_grad for n, p in module._parameters.items() if p is not None}
        setattr(module, _SAVED, saved)
        if freeze_affine:
            for p in module._parameters.values():
                if p is not None:
                    p.requires_grad_(False)
        mode = module.training
        module.__class__ = _frozen_class(type(module))
        module.training = mode
    return model


def unfreeze_norm(model: nn.Module) -> nn.Module:
    """Undo :func:`freeze_norm` on every frozen layer of ``model``, exactly.

    Each frozen layer gets back its original class (``type(layer)`` is the class it had), the
    ``requires_grad`` flags its parameters had when it was frozen, and the training flag that
    the model last gave it (``model.train()`` and ``model.eval()`` reach frozen layers too; they
    just do not act while frozen). Parameters, buffers and their values are the same objects
    throughout, so the state dict is unchanged and an optimizer built before freezing still
    holds the right tensors. Layers that are not frozen are left alone.

    Returns:
        ``model``, unfrozen in place.

    Example::

        >>> model = normkit.freeze_norm(normkit.models.resnet18()).eval()
        >>> model = normkit.unfreeze_norm(model)
        >>> type(model.bn1).__name__, model.bn1.training
        ('BatchNorm2d', False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfreeze_norm: expected an nn.Module, got {type(model).__name__}")
    frozen: list[nn.Module] = [m for m in model.modules() if isinstance(m, _FrozenNorm)]
    for module in frozen:
        mode = module.__dict__.get("training", False)
        module.__class__ = type(module)._normkit_unfrozen  # type: ignore[attr-defined]
        module.training = mode
        saved: dict[str, bool] = module.__dict__.pop(_SAVED, {})
        for name, flag in saved.items():
            p = module._parameters.get(name)
            if p is not None:
                p.requires_grad_(flag)
    return model
