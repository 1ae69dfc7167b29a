"""Batch statistics over every rank of ``torch.distributed``: ``convert_sync`` and its inverse.

After ``model = normkit.convert_sync(model)``, every batch-statistics layer of the model computes
its training statistics over the samples of all ranks, with one differentiable all-reduce per
layer per forward, on any backend (gloo on CPU included):

* normkit's layers (Sandwich BN with shared or split statistics, CCBN, AuxBN, BCN and its
  micro-batch estimates, InputNorm) are switched in place (``sync=True``);
* torch's ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` become :class:`normkit.SyncBatchNorm`,
  which holds the very same parameters and buffers (an optimizer built before the call still
  trains them) and the same checkpoint names.

Per-rank batches may be uneven or empty: each rank's moments are weighted by its number of
values, and running statistics come out equal on every rank. Outside an initialized process group
of more than one rank, the converted layers compute exactly what they did before.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit._stats import Synchronized
from normkit.convert import _FrozenNorm
from normkit.layers.core import SyncBatchNorm
from normkit.layers.frozen import FrozenBatchNorm2d

__all__ = ["convert_sync", "revert_sync"]

_TORCH_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# Every normkit layer with batch statistics derives from Synchronized (``sync``, ``process_group``).
_NORMKIT_SYNCABLE = (Synchronized,)


def _swap(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace modules by ``make(name, module)`` (None: keep), each object once, never while
    iterating a container; a module shared by several parents gets one replacement."""
    replacements: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=True):
        new = make(name, module)
        if new is not None:
            replacements[id(module)] = new
    if id(model) in replacements:
        return replacements[id(model)]
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            new = replacements.get(id(child))
            if new is not None:
                setattr(parent, child_name, new)
    return model


# nn.Module's hook registries (OrderedDicts of hooks, or of per-hook flags), where they exist.
_HOOK_REGISTRIES = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
    "_state_dict_pre_hooks",
    "_state_dict_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def _rebind(src: nn.Module, dst: nn.Module) -> nn.Module:
    # The same Parameter and buffer objects, so optimizers and references keep working, and
    # the same hooks: the replacement computes the same function, so what watched the old
    # module watches the new one (torch's converter drops them).
    for key, param in src._parameters.items():
        dst._parameters[key] = param
    for key, buf in src._buffers.items():
        dst._buffers[key] = buf
    for registry in _HOOK_REGISTRIES:
        hooks = getattr(src, registry, None)
        if hooks:
            setattr(dst, registry, copy.copy(hooks))
    # Whether the backward hooks are "full" ones (register_full_backward_hook) or the old kind.
    dst._is_full_backward_hook = src._is_full_backward_hook
    dst.train(src.training)
    return dst


def convert_sync(
    model: nn.Module,
    process_group: Any = None,
    *,
    treat_as_bn: tuple[type[nn.Module], ...] = (),
) -> nn.Module:
    """Make every batch-statistics layer of ``model`` synchronize over ``process_group``.

    Args:
        model: any module (itself a batch norm, possibly).
        process_group: the group to synchronize over (None: the default group, except that
            an ``nn.SyncBatchNorm`` keeps the group it already has).
        treat_as_bn: ``_BatchNorm`` subclasses to convert as if they were plain batch norms.
            Norms frozen by :func:`normkit.freeze_norm`, and :class:`normkit.FrozenBatchNorm2d`,
            are left as they are (they use running statistics).
            Any other subclass with its own ``forward`` (say, a BN fused with an activation)
            is refused with a ``TypeError`` instead of silently losing its extra behaviour, the
            known flaw of ``nn.SyncBatchNorm.convert_sync_batchnorm``.

    Returns:
        The model (the replacement, if the root itself was a torch batch norm). A model
        without any batch-statistics layer (frozen ones count) is returned unchanged, with a
        ``UserWarning``: nothing would be synchronized, which usually means the wrong model
        (a group-norm model needs no synchronization; do not call it there).

    On the first synchronized training forward, each layer checks with one small all-gather
    that every rank holds the same layer (class, channels, domains or groups): mismatched models
    raise a ``ValueError`` on every rank instead of crashing gloo or mixing statistics. A rank
    that fails or stops before a collective makes the others raise a ``RuntimeError`` naming
    the layer, at once if its process exited, else after the timeout given to
    ``torch.distributed.init_process_group(timeout=...)``.

    Example::

        >>> model = normkit.convert_sync(normkit.models.resnet20())
        >>> type(model.bn1).__name__
        'SyncBatchNorm'

    In each process, after ``torch.distributed.init_process_group``, the converted model then
    goes into ``nn.parallel.DistributedDataParallel(model)``.
    """

    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_sync: expected an nn.Module, got {type(model).__name__}")
    found = False

    def make(name: str, module: nn.Module) -> nn.Module | None:
        nonlocal found
        if isinstance(module, (_FrozenNorm, FrozenBatchNorm2d)):
            found = True
            return None  # frozen norms use running statistics: nothing to synchronize
        if isinstance(module, _NORMKIT_SYNCABLE):
            found = True
            module.sync = True
            module.process_group = process_group
            return None
        is_torch_bn = type(module) in _TORCH_BN or isinstance(module, treat_as_bn)
        if not is_torch_bn:
            if isinstance(module, _BatchNorm):
                raise TypeError(
                    f"convert_sync: expected torch or normkit batch norms, got "
                    f"{type(module).__qualname__} at {name or '<root>'!r}, an unknown "
                    "_BatchNorm subclass; pass treat_as_bn=(ThatClass,) if it is a plain batch "
                    "norm"
                )
            return None
        assert isinstance(module, _BatchNorm)
        found = True
        group = process_group
        if group is None and isinstance(module, nn.SyncBatchNorm):
            group = module.process_group  # a torch SyncBatchNorm keeps the group it was given
        new = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            group,
            device="meta",
        )
        new._local_cls = type(module)  # type: ignore[assignment]
        return _rebind(module, new)

    converted = _swap(model, make)
    if not found:
        warnings.warn(
            f"convert_sync: expected a model with batch-statistics layers (torch or normkit "
            f"batch norms, BCN), got a {type(model).__name__} with none; nothing will be "
            "synchronized",
            stacklevel=2,
        )
    return converted


def revert_sync(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync`: local statistics again, for evaluation or export.

    normkit's layers get ``sync=False``; a :class:`normkit.SyncBatchNorm` made by
    :func:`convert_sync` becomes the torch class it replaced (one constructed directly becomes
    ``nn.BatchNorm2d``, or ``nn.BatchNorm1d`` / ``nn.BatchNorm3d`` when given as
    ``local_cls``), holding the same parameters and buffers. A model with nothing synchronized
    is returned unchanged, silently (undoing nothing is not a mistake).
    """

    if not isinstance(model, nn.Module):
        raise TypeError(f"revert_sync: expected an nn.Module, got {type(model).__name__}")

    def make(name: str, module: nn.Module) -> nn.Module | None:
        if isinstance(module, SyncBatchNorm):
            cls = getattr(module, "_local_cls", None) or nn.BatchNorm2d
            if cls is nn.SyncBatchNorm:
                new: nn.Module = nn.SyncBatchNorm(
                    module.num_features,
                    module.eps,
                    module.momentum,
                    module.affine,
                    module.track_running_stats,
                    module.process_group,
                    device="meta",
                )
            else:
                new = cls(
                    module.num_features,
                    module.eps,
                    module.momentum,
                    module.affine,
                    module.track_running_stats,
                    device="meta",
                )
            return _rebind(module, new)
        if isinstance(module, _NORMKIT_SYNCABLE):
            module.sync = False
            module.process_group = None
        return None

    return _swap(model, make)
