"""Revisiting Batch Normalization (Davis & Frank 2021, arXiv 2110.13989).

Three pieces: a small initial BN scale for every batch norm (:func:`init_bn_scale_`), a reduced
learning rate for the BN scales (:func:`bn_param_groups`), and online BN-based normalization of
raw inputs (:class:`InputNorm2d`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from normkit._checks import check_dtype, check_nonnegative, check_positive
from normkit.layers.core import DomainIndex, _BatchNormCore

__all__ = [
    "RELU_STD",
    "InputNorm1d",
    "InputNorm2d",
    "bn_param_groups",
    "init_bn_scale_",
]

RELU_STD = 0.58
"""The input-BN gain factor of the official code: the std of ReLU(z) for z ~ N(0, 1),
``sqrt(1/2 − 1/(2π)) ≈ 0.5838``, rounded as the authors do."""


class _InputNorm(_BatchNormCore):
    """BN on raw inputs: scale initialised to ``scale · RELU_STD``, shift frozen at 0."""

    _shows_split = False

    def __init__(
        self,
        num_features: int,
        scale: float = 0.1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        name = type(self).__name__
        check_positive(name, "scale", scale)
        check_dtype(name, dtype)
        limit = torch.finfo(dtype if dtype is not None else torch.get_default_dtype()).max
        if not scale * RELU_STD <= limit:  # the initial weight, filled in reset_parameters
            raise ValueError(f"{name}: expected scale * {RELU_STD} <= {limit}, got scale={scale}")
        self.scale = float(scale)
        super().__init__(
            num_features,
            1,
            eps,
            momentum,
            True,
            track_running_stats,
            device,
            dtype,
            domain_affine=False,
            domain_std=0.0,
        )
        self.bias.requires_grad_(False)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        with torch.no_grad():
            self.weight.fill_(self.scale * RELU_STD)
            self.bias.zero_()

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, scale={self.scale}, eps={self.eps}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}"
        )
        return s + self._sync_repr()

    def forward(self, input: Tensor, domain: DomainIndex | None = None) -> Tensor:
        return super().forward(input)


_INPUT_NORM_DOC = r"""Online BN-based input normalization (Davis & Frank 2021).

    A batch norm placed on the raw inputs (no dataset mean and std), whose running statistics act
    as online dataset statistics at test time:

    .. math::
        y = γ ⊙ (x − μ) / \sqrt{σ^2 + ε}, \qquad γ_0 = \mathrm{scale} · 0.58, \qquad β ≡ 0

    0.58 is the std of ReLU of a standard normal, so the first layer sees inputs on the scale that
    later layers see after BN and ReLU. The shift ``bias`` is frozen at 0 (``requires_grad`` is
    False, so :func:`bn_param_groups` puts it in no group); the scale ``weight`` is learnable and
    goes in the reduced-lr BN-scale group. The layer is a batch norm (a ``_BatchNorm`` subclass)
    with ``nn.BatchNorm``'s names, training behaviour and running-statistics rule (momentum 0.1,
    unbiased running variance), and joins :func:`normkit.convert_sync` like normkit's other
    batch-statistics layers. :func:`init_bn_scale_` leaves it alone: its scale is set here.

    Args:
        num_features: number of input channels.
        scale: c_γ > 0, the global BN scale (0.1 in the paper's runs).
        eps, momentum, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.

    Example::

        >>> net = nn.Sequential(normkit.InputNorm2d(3, scale=0.1), nn.Conv2d(3, 16, 3))
"""


class InputNorm1d(_InputNorm):
    __doc__ = _INPUT_NORM_DOC
    _ranks = (2, 3)


class InputNorm2d(_InputNorm):
    __doc__ = _INPUT_NORM_DOC
    _ranks = (4,)


def init_bn_scale_(model: nn.Module, value: float = 0.1) -> int:
    """Set the scale of every batch norm in ``model`` to ``value`` (Davis & Frank).

    Every ``_BatchNorm`` with a scale is covered: torch's BN and SyncBN, and normkit's
    BN-derived layers. A layer's scale is its shared ``weight`` where it has one (for Sandwich
    BN the shared scale γ_sa, its per-domain scales keeping their N(1, domain_std) init, so
    that every domain's scale γ_k γ_sa starts near ``value``; for BCN the batch part's), else
    its per-domain ``domain_weight`` (AuxBN, CCBN: every row set to ``value``, as the official
    AuxBN's per-branch batch norms each get γ = c_γ). Group-norm scales and
    :class:`InputNorm2d` (whose scale rule is its own) are left alone. The official code
    silently falls back to 1.0 for ``value <= 0``; normkit refuses it.

    Returns:
        The number of layers changed. When it is 0 (no batch norm with a scale) a
        ``UserWarning`` says so: the recipe then has no effect on the model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"init_bn_scale_: expected an nn.Module, got {type(model).__name__}")
    check_positive("init_bn_scale_", "value", value)
    norms = (
        m for m in model.modules() if isinstance(m, _BatchNorm) and not isinstance(m, _InputNorm)
    )
    scales = [scale for scale in map(_init_scale, norms) if scale is not None]
    # Checked before any scale changes: fill_ fails past a dtype's range (inf included).
    for weight in scales:
        if weight.is_floating_point() and not value <= torch.finfo(weight.dtype).max:
            raise ValueError(
                f"init_bn_scale_: expected a value a {weight.dtype} scale can hold (at most "
                f"{torch.finfo(weight.dtype).max}), got {value}"
            )
    with torch.no_grad():
        for weight in scales:
            weight.fill_(value)
    changed = len(scales)
    if not changed:
        warnings.warn(
            f"init_bn_scale_: expected a model with batch norms that have a scale (affine=True), "
            f"got a {type(model).__name__} with none; nothing was changed",
            stacklevel=2,
        )
    return changed


# Norm layers other than batch norms: their affines take no weight decay, at the full lr.
_OTHER_NORMS: tuple[type[nn.Module], ...] = (
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def _is_no_decay_module(module: nn.Module) -> bool:
    from normkit.fixup import Bias, Scale
    from normkit.layers.sandwich import SandwichAdaIN

    return isinstance(module, (*_OTHER_NORMS, SandwichAdaIN, Bias, Scale))


_T = TypeVar("_T", bound=Tensor)


def _init_scale(module: _BatchNorm) -> Tensor | None:
    """The scale :func:`init_bn_scale_` sets: the shared ``weight``, else ``domain_weight``
    (a plain tensor too: a frozen layer's scale is a buffer)."""
    return next(_bn_scales(module, Tensor), None)


def _bn_scales(module: _BatchNorm, kind: type[_T]) -> Iterator[_T]:
    """The batch norm's scales of type ``kind``: its shared ``weight``, then ``domain_weight``."""
    for attr in ("weight", "domain_weight"):
        p = getattr(module, attr, None)
        if isinstance(p, kind):
            yield p


def _is_bias_like(name: str, p: Tensor) -> bool:
    """The official rule for a parameter outside convolutions, linear layers and norms: no
    weight decay when it squeezes to one dimension and its name has no "weight" in it."""
    return sum(size > 1 for size in p.shape) == 1 and "weight" not in name


def bn_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    scale_lr_divisor: float = 100.0,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups of Davis & Frank, chosen by module type, never by name.

    ===============  ==================================================  ============  ==========
    group ``name``   members                                             weight decay  lr
    ===============  ==================================================  ============  ==========
    ``"decay"``      every parameter of convolutions and linear layers    weight_decay  lr
                     but their ``bias`` (WS convs included, and the
                     ``weight_orig``/``weight_v``/``weight_g`` and
                     ``parametrizations.weight.*`` of spectral and
                     weight norm); parameters of any other module type
                     (embeddings, attention, custom modules) but their
                     1-D non-weights (below)
    ``"no_decay"``   the ``bias`` of convolutions and linear layers; BN   0             lr
                     shifts (``bias``, ``domain_bias``) and other
                     batch-norm parameters (BCN's channel-part affine);
                     every parameter of GroupNorm, LayerNorm,
                     InstanceNorm, RMSNorm, SandwichAdaIN and Fixup
                     ``Bias``/``Scale``; in any other module, every
                     parameter that squeezes to 1-D and whose name has
                     no ``weight`` in it (the official rule for biases:
                     ``MultiheadAttention``'s ``in_proj_bias``,
                     ``bias_k``, ``bias_v``)
    ``"bn_scale"``   BN scales: ``weight`` of every ``_BatchNorm``        0             lr /
                     (InputNorm's included) and Sandwich/CCBN/AuxBN                     divisor
                     ``domain_weight``
    ===============  ==================================================  ============  ==========

    The official code picks the scale group as "squeezes to 1-D and named *weight*", which also
    catches LayerNorm/GroupNorm weights, depthwise kernels and 1-in/1-out linear layers; here
    only batch-norm scales are in it. Frozen parameters (InputNorm's shift) are in no group; a
    shared parameter appears once; empty groups are left out. A model without batch norms is
    no mistake here: it gets its ``"decay"``/``"no_decay"`` groups (the same treatment as in the
    BN arms) and no ``"bn_scale"`` group, without a warning. Keep the same no-decay treatment
    in the baseline arm (``scale_lr_divisor=1``) so that only the BN scale's lr differs.

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU())
        >>> groups = normkit.bn_param_groups(model, lr=0.1, weight_decay=1e-4)
        >>> [(g["name"], g["lr"], g["weight_decay"]) for g in groups]
        [('decay', 0.1, 0.0001), ('no_decay', 0.1, 0.0), ('bn_scale', 0.001, 0.0)]
        >>> opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bn_param_groups: expected an nn.Module, got {type(model).__name__}")
    check_nonnegative("bn_param_groups", "lr", lr)
    check_nonnegative("bn_param_groups", "weight_decay", weight_decay)
    check_positive("bn_param_groups", "scale_lr_divisor", scale_lr_divisor)
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    scales: list[nn.Parameter] = []
    seen: set[int] = set()

    def put(group: list[nn.Parameter], p: nn.Parameter) -> None:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            group.append(p)

    for module in model.modules():
        own = list(module.parameters(recurse=False))
        if not own:
            continue
        if isinstance(module, _BatchNorm):
            for p in _bn_scales(module, nn.Parameter):
                put(scales, p)
            for p in own:
                put(no_decay, p)
        elif isinstance(module, (_ConvNd, nn.Linear)):
            # The bias (or a parametrized bias's originals) takes no decay; everything else,
            # spectral/weight norm's weight_orig, weight_v, weight_g and parametrizations of
            # the weight included, is the layer's weight and decays.
            for name, p in module.named_parameters():
                is_bias = name == "bias" or name.startswith("parametrizations.bias.")
                put(no_decay if is_bias else decay, p)
        elif _is_no_decay_module(module):
            for p in own:
                put(no_decay, p)
        else:
            for name, p in module.named_parameters(recurse=False):
                put(no_decay if _is_bias_like(name, p) else decay, p)

    groups = [
        {"name": "decay", "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
        {
            "name": "bn_scale",
            "params": scales,
            "lr": lr / scale_lr_divisor,
            "weight_decay": 0.0,
        },
    ]
    return [g for g in groups if g["params"]]
