"""Fixup initialization: residual learning without normalization.

Zhang, Dauphin & Ma, "Fixup Initialization: Residual Learning Without Normalization", ICLR 2019
(arXiv 1901.09321); official code: hongyi-zhang/Fixup.

The rule, for a network of ``L`` residual branches with ``m`` weight layers each:

1. Initialize the classifier and the **last** weight layer of every residual branch to 0.
2. Initialize every other weight layer **inside a residual branch** with He normal init
   (``fan_out``, ReLU gain: ``std = sqrt(2 / fan_out)``) and multiply it by

   .. math:: L^{-1/(2m-2)}

   (:func:`fixup_scale`): ``L ** -0.5`` for two-layer basic blocks, ``L ** -0.25`` for three-layer
   bottlenecks. Layers outside the branches (stem, shortcut convolutions) are not rescaled.
3. Add a scalar multiplier (:class:`Scale`, init 1) to every branch and a scalar bias
   (:class:`Bias`, init 0) before each convolution, linear layer and element-wise activation.

Each branch then changes the output by Θ(η/L) per SGD step of size η, so the total update stays
Θ(η) at any depth, without normalization. At init every branch outputs exactly 0 and the network is
the identity map through its shortcuts, followed by a zero classifier.

The scalars have their own optimizer treatment (:func:`fixup_param_groups`), found by module type:
they are :class:`Bias` and :class:`Scale` modules, never parameters matched by name.

Example::

    >>> import torch
    >>> from normkit.models import resnet20
    >>> from normkit import fixup_param_groups
    >>> model = resnet20(fixup=True)
    >>> bool((model(torch.randn(2, 3, 32, 32)) == 0).all())  # zero classifier at init
    True
    >>> groups = fixup_param_groups(model, lr=0.1, weight_decay=5e-4)
    >>> [(g["name"], g["lr"]) for g in groups]
    [('default', 0.1), ('fixup_scalars', 0.010000000000000002)]
    >>> opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch
from torch import Tensor, nn

from normkit._checks import check_count, check_dtype, check_float_input, check_nonnegative

__all__ = [
    "Bias",
    "FixupBlock",
    "Scale",
    "fixup_init_",
    "fixup_param_groups",
    "fixup_scale",
    "he_normal_fan_out_",
]

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _in_dtype(p: Tensor, dtype: torch.dtype) -> Tensor:
    """``p`` in ``dtype``, cast only where needed: a no-op ``to`` is still one more operator
    call per scalar per step, and those calls are most of what Fixup's scalars cost at small
    batches."""
    return p if p.dtype == dtype else p.to(dtype)


def _scalar_for(p: Tensor, x: Tensor) -> Tensor:
    """The ``(1,)`` parameter ``p`` as a 0-dim operand for ``x`` in ``x``'s dtype (the output
    keeps ``x``'s shape, and a 0-dim CPU scalar combines with an input on any device, meta
    included)."""
    return _in_dtype(p, x.dtype).reshape(())


class Bias(nn.Module):
    """A learnable scalar added to the input: ``y = x + bias``.

    Fixup puts one before every convolution, linear layer and activation of a residual branch (and
    after the stem, before the classifier). It is a module, rather than a bare parameter, so that
    :func:`fixup_param_groups` can find every Fixup scalar by module type.

    Parameter ``bias``: shape ``(1,)``, initialized to 0. The output keeps the input's dtype (the
    bias is cast to it), so the scalar does not promote half-precision activations to float32.

    Example::

        >>> b = Bias()
        >>> b(torch.ones(2, 3)).shape
        torch.Size([2, 3])
    """

    def __init__(
        self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        check_dtype(type(self).__name__, dtype)
        self.bias = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        # An integer input would get a truncated bias.
        check_float_input(type(self).__name__, x)
        return x + _scalar_for(self.bias, x)


class Scale(nn.Module):
    """A learnable scalar multiplier: ``y = weight * x``.

    Fixup puts one at the end of every residual branch, after its last weight layer.

    Parameter ``weight``: shape ``(1,)``, initialized to 1. It is named ``weight`` as torch names
    every learnable multiplier (the affine weight of a norm layer): with :class:`Bias` it forms the
    usual ``weight``/``bias`` pair that generic tools expect, and a block attribute named ``scale``
    (as in the official code) gives the key ``scale.weight`` rather than ``scale.scale``. Nothing
    selects it by that name: :func:`fixup_param_groups` selects by module type. The output keeps
    the input's dtype.

    Example::

        >>> s = Scale()
        >>> s(torch.full((2,), 3.0))
        tensor([3., 3.], grad_fn=<MulBackward0>)
    """

    def __init__(
        self, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        check_dtype(type(self).__name__, dtype)
        self.weight = nn.Parameter(torch.empty(1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        check_float_input(type(self).__name__, x)  # an integer input would get a truncated scale
        return x * _scalar_for(self.weight, x)


@runtime_checkable
class FixupBlock(Protocol):
    """A residual block that :func:`fixup_init_` knows how to initialize.

    Any module with a ``fixup_branch_layers()`` method qualifies (no subclassing needed). The
    method returns the weight layers of the block's residual branch in forward order; each has a
    ``weight`` of at least 2 dimensions (``nn.Conv*``, ``nn.Linear``). The last one is zeroed and
    the others get the rescaled He init. Shortcut layers must not be listed.
    """

    def fixup_branch_layers(self) -> Sequence[nn.Module]: ...


def fixup_scale(num_branches: int, m: int) -> float:
    """The Fixup rescaling factor ``num_branches ** (-1 / (2m - 2))``.

    Args:
        num_branches: ``L``, the number of residual branches in the network (for the reference
            ResNets: the number of blocks, e.g. 54 for the CIFAR ResNet-110).
        m: the number of weight layers per branch, at least 2 (2 for basic blocks, 3 for
            bottlenecks).

    Returns:
        ``L ** -0.5`` for ``m = 2``, ``L ** -0.25`` for ``m = 3``; 1 for ``L = 1``.
    """
    check_count("fixup_scale", "num_branches", num_branches)
    check_count("fixup_scale", "m", m, minimum=2)
    return float(num_branches) ** (-1.0 / (2 * m - 2))


def _weight_of(caller: str, layer: nn.Module) -> Tensor:
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() < 2:
        got = "no weight" if weight is None else f"weight of shape {tuple(weight.shape)}"
        raise TypeError(
            f"{caller}: expected a weight layer (nn.Conv*, nn.Linear) with a weight of at least "
            f"2 dimensions, got {type(layer).__name__} with {got}"
        )
    return weight


def he_normal_fan_out_(layer: ModuleT, scale: float = 1.0) -> ModuleT:
    """He normal init (``fan_out``, ReLU gain) of ``layer.weight``, times ``scale``; bias to 0.

    ``weight ~ N(0, (scale * sqrt(2 / fan_out))**2)`` with ``fan_out = weight.shape[0] * (kernel
    size)``: ``out_channels * kh * kw`` for a conv, ``out_features`` for a linear layer (the same
    fan as ``nn.init.kaiming_normal_(mode="fan_out")``). With ``scale = fixup_scale(L, m)`` this is
    the Fixup init of a non-final branch layer; with ``scale = 1`` it is the init of the reference
    ResNets' 1x1 shortcut convolutions. Returns ``layer``.
    """
    weight = _weight_of("he_normal_fan_out_", layer)
    check_nonnegative("he_normal_fan_out_", "scale", scale)
    fan_out = weight.shape[0] * weight[0][0].numel()
    std = scale * math.sqrt(2.0 / fan_out)
    with torch.no_grad():
        weight.normal_(0.0, std)
        bias = getattr(layer, "bias", None)
        if isinstance(bias, Tensor):
            bias.zero_()
    return layer


def _zero_(layer: nn.Module) -> None:
    weight = _weight_of("fixup_init_", layer)
    with torch.no_grad():
        weight.zero_()
        bias = getattr(layer, "bias", None)
        if isinstance(bias, Tensor):
            bias.zero_()


def fixup_init_(model: ModuleT, num_branches: int | None = None, m: int | None = None) -> ModuleT:
    """Apply the Fixup rule to every residual block of ``model``, in place. Returns ``model``.

    For every :class:`FixupBlock` (a module with ``fixup_branch_layers()``; normkit's
    :class:`~normkit.models.FixupBasicBlock` and :class:`~normkit.models.FixupBottleneck` are
    ones): the last branch layer's weight (and bias) is set to 0, and every other branch layer
    gets :func:`he_normal_fan_out_` times ``fixup_scale(num_branches, m)``. Every :class:`Bias` in
    the model is reset to 0 and every :class:`Scale` to 1.

    Nothing else is touched: the stem, shortcut convolutions and classifier are the caller's (the
    reference ResNets' ``reset_parameters()`` leave the stem at PyTorch's default init, He-init
    shortcut convs without rescaling and zero the classifier).

    Args:
        model: the network (or a single block).
        num_branches: ``L``; default: the number of blocks found in ``model``.
        m: weight layers per branch; default: each block's own number of branch layers (so a
            model mixing basic blocks and bottlenecks gets ``L ** -0.5`` and ``L ** -0.25``).

    Raises:
        ValueError: if ``model`` holds no :class:`FixupBlock`, or a block lists no layer.

    Example (a residual MLP block)::

        >>> class Block(nn.Module):
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)
        ...     def fixup_branch_layers(self):
        ...         return [self.fc1, self.fc2]
        >>> net = fixup_init_(nn.Sequential(*[Block(8) for _ in range(4)]))
        >>> bool((net[0].fc2.weight == 0).all())
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fixup_init_: expected an nn.Module, got {type(model).__name__}")
    blocks = [mod for mod in model.modules() if isinstance(mod, FixupBlock)]
    if not blocks:
        raise ValueError(
            f"fixup_init_: expected residual blocks with a fixup_branch_layers() method in "
            f"{type(model).__name__}, found none"
        )
    total = len(blocks) if num_branches is None else num_branches
    check_count("fixup_init_", "num_branches", total)
    if m is not None:
        check_count("fixup_init_", "m", m, minimum=2)
    for block in blocks:
        layers = list(block.fixup_branch_layers())
        if not layers:
            raise ValueError(
                f"fixup_init_: expected at least one branch layer from "
                f"{type(block).__name__}.fixup_branch_layers(), got none"
            )
        if len(layers) > 1:
            scale = fixup_scale(total, len(layers) if m is None else m)
            for layer in layers[:-1]:
                he_normal_fan_out_(layer, scale)
        _zero_(layers[-1])
    for mod in model.modules():
        if isinstance(mod, (Bias, Scale)):
            mod.reset_parameters()
    return model


def _check_nonnegative(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"fixup_param_groups: expected {name} to be a number, got {value!r}")
    if not value >= 0:
        raise ValueError(f"fixup_param_groups: expected {name} >= 0, got {value}")
    if not math.isfinite(value):
        raise ValueError(f"fixup_param_groups: expected a finite {name} >= 0, got {value}")


def fixup_param_groups(
    model: nn.Module,
    lr: float,
    scalar_lr_mult: float = 0.1,
    scalar_weight_decay: float = 0.0,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups that give the Fixup scalars their own learning rate.

    The Fixup scalars are the parameters of :class:`Bias` and :class:`Scale` modules (subclasses
    included), found by **module type**. A parameter that is merely *named* ``bias`` or ``scale``,
    such as a classifier's ``fc.bias``, is an ordinary parameter. Returns, in this order, the
    non-empty ones of:

    * ``{"name": "default", "params": [...], "lr": lr, "weight_decay": weight_decay}``: every
      other trainable parameter;
    * ``{"name": "fixup_scalars", "params": [...], "lr": lr * scalar_lr_mult,
      "weight_decay": scalar_weight_decay}``.

    Parameters with ``requires_grad=False`` are left out; a parameter reachable through several
    modules (shared modules, tied weights) appears once. Any ``torch.optim`` optimizer accepts the
    list (the extra ``"name"`` key is kept in ``optimizer.param_groups`` for schedulers and logs).

    Choosing the values:

    * The official code used ``lr / 10`` for the scalars (``scalar_lr_mult=0.1``), because a
      scalar's gradient sums over every channel and one scalar step moves a whole layer. That is
      adequate up to about a hundred blocks. **Very deep nets need a smaller multiplier**: beyond
      about a thousand blocks the scalar biases drift together and kill the residual stream
      within a few steps; about ``0.01`` at ~1000 blocks and ``1e-4`` at ~10,000 (shrinking
      roughly like 1/L; see the configuration notes in the reference, core-methods §4.6).
    * The official code applied weight decay to the scalars too (the same 1e-4 / 5e-4 as every
      weight), which pulls the multipliers towards 0. normkit defaults to
      ``scalar_weight_decay=0``; pass the main weight decay to reproduce the official setting.
    * The scalar lr does **not** follow batch-size or GPU-count scaling: the official code scaled
      the main lr as ``base_lr * batch / 128 * n_gpu`` but kept the scalars at ``base_lr / 10``.
      When you scale ``lr`` for a larger batch, divide ``scalar_lr_mult`` by the same factor to
      reproduce that.
    * Schedulers multiply every group alike, so the ratio is kept through the schedule (as in the
      official code).

    Args:
        model: the network.
        lr: learning rate of the default group (>= 0).
        scalar_lr_mult: the scalars' lr is ``lr * scalar_lr_mult`` (>= 0).
        scalar_weight_decay: weight decay of the scalars (>= 0).
        weight_decay: weight decay of everything else (>= 0).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fixup_param_groups: expected an nn.Module, got {type(model).__name__}")
    _check_nonnegative("lr", lr)
    _check_nonnegative("scalar_lr_mult", scalar_lr_mult)
    _check_nonnegative("scalar_weight_decay", scalar_weight_decay)
    _check_nonnegative("weight_decay", weight_decay)
    scalar_ids = {
        id(p) for mod in model.modules() if isinstance(mod, (Bias, Scale)) for p in mod.parameters()
    }
    scalars: list[nn.Parameter] = []
    default: list[nn.Parameter] = []
    for p in model.parameters():
        if p.requires_grad:
            (scalars if id(p) in scalar_ids else default).append(p)
    groups: list[dict[str, Any]] = []
    if default:
        groups.append(
            {"name": "default", "params": default, "lr": lr, "weight_decay": weight_decay}
        )
    if scalars:
        groups.append(
            {
                "name": "fixup_scalars",
                "params": scalars,
                "lr": lr * scalar_lr_mult,
                "weight_decay": scalar_weight_decay,
            }
        )
    return groups
