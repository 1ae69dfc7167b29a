r"""Weight Standardization: convolutions and linear layers whose filters are standardized.

Weight Standardization (WS; Qiao, Wang, Liu, Shen & Yuille, arXiv 1903.10520, "Micro-Batch
Training with Batch-Channel Normalization and Weight Standardization") reparametrizes a layer's
weight. For a weight :math:`W` of shape ``(O, I/groups, *kernel)`` (or ``(O, I)`` for a linear
layer), each output filter :math:`W_o` is standardized over its fan-in
:math:`n = \text{numel}(W_o)` at every forward:

.. math::

    \mu_o = \frac{1}{n} \sum_j W_{o,j}, \qquad
    \hat W_o = \frac{W_o - \mu_o}{\sigma_o}, \qquad
    y = \operatorname{conv}(x, \hat W) + b,

with gradients flowing through :math:`\mu_o` and :math:`\sigma_o`. There is no learnable gain;
the bias, when present, is kept. A normalization layer (GroupNorm, BatchNorm, BCN) should follow.

The sources disagree on :math:`\sigma_o`, so normkit names the two conventions as presets:

* ``preset="paper"`` (the default): biased variance, eps inside the root,
  :math:`\sigma_o = \sqrt{\tfrac{1}{n}\sum_j (W_{o,j}-\mu_o)^2 + \epsilon}`,
  :math:`\epsilon = 10^{-5}`.
  Every filter then has mean 0 and variance exactly :math:`v_o / (v_o + \epsilon)`.
* ``preset="official"``: the authors' PyTorch code, unbiased standard deviation with eps added
  outside the root, :math:`\sigma_o = \sqrt{\tfrac{1}{n-1}\sum_j (W_{o,j}-\mu_o)^2} + \epsilon`,
  :math:`\epsilon = 10^{-5}`. Its gradient is NaN for a constant filter (zero variance), which the
  authors acknowledged (joe-siyuan-qiao/WeightStandardization #1, #16); prefer ``"paper"`` unless
  you load the authors' checkpoints.

``eps``, ``unbiased`` and ``eps_mode`` (``"sqrt"``: inside the root; ``"std"``: added to the
standard deviation; ``"max"``: :math:`\sqrt{\max(v, \epsilon)}`) override the preset's values.
Checkpoints are **not numerically interchangeable across presets**: the same raw ``weight`` gives
a (slightly, for fan-in of 100 or more; much, for tiny filters) different standardized weight, so
load a checkpoint with the preset it was trained with.

Statistics are computed in float32 for float16 and bfloat16 weights (the standardized weight is
cast back to the weight's dtype); float64 weights keep float64 (see
:func:`normkit.functional.weight_standardize`, which every layer here calls).

**Eval-mode cache.** Standardizing costs one pass over the weight per forward. In eval mode a
layer keeps the standardized weight and reuses it while it is valid. The cache is used only when
all of these hold, otherwise the weight is standardized afresh:

* the layer is in eval mode (training never reads or writes the cache, and ``train()`` drops it);
* no autograd graph is needed through the weight: grad mode is off (``torch.no_grad()``,
  ``torch.inference_mode()``) or the weight (and ScaledWS's ``gain``) does not require grad.
  The cached tensor carries no graph, so with a trainable weight under grad mode the layer
  recomputes and gradients reach the weight exactly as in training;
* the code is not being traced by ``torch.compile`` nor run under a ``torch.func`` transform, and
  the weight is a plain tensor (not a tensor subclass such as DTensor);
* the weight (and ``gain``) is not an inference tensor (made under ``torch.inference_mode()``,
  e.g. by building the layer there): it has no version counter to watch, so such a layer
  standardizes at every call.

The cache is invalidated when the weight changes: its identity, its version counter (bumped by
every in-place update: ``optimizer.step()``, ``load_state_dict``, ``torch.nn.init``, in-place ops
under ``torch.no_grad()``), its storage pointer, strides, dtype, device or shape, or the layer's
``eps``, ``unbiased``, ``eps_mode`` (and ScaledWS's ``gamma``) change. The cache keeps the
storage of the weight it was computed from alive, so no new storage can take its address: a
``weight.data = t`` assignment (which keeps the version counter) is always seen. In-place edits
made through ``weight.data`` bypass the version counter; call :meth:`clear_cache` after them.
Conversions (``.to()``, ``.double()``, ...) and ``load_state_dict`` drop the cache first, and it
holds no weak reference to the weight, so parameter swapping
(``torch.__future__.set_swap_module_params_on_conversion``) works. The cache holds one extra copy
of the weight per layer, plus, after the weight was replaced and until the next eval call, the
replaced weight's storage (never more than one old weight); :meth:`bake` gives a plain layer with
no such copy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Collection
from typing import Any, Literal, NamedTuple, TypeVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.common_types import _size_1_t, _size_2_t, _size_3_t
from torch.nn.modules.conv import _ConvNd

from normkit import _fused, kernels
from normkit import functional as nkf
from normkit._checks import (
    check_conv_input,
    check_count,
    check_dtype,
    check_flags,
    check_linear_input,
    check_positive,
)

__all__ = [
    "WS_PRESETS",
    "ScaledWSConv2d",
    "WSConv1d",
    "WSConv2d",
    "WSConv3d",
    "WSLinear",
    "weight_standardize_",
]

_EPS_MODES = ("sqrt", "std", "max")
_PaddingMode = Literal["zeros", "reflect", "replicate", "circular"]


class WSPreset(NamedTuple):
    """One named WS convention: variance estimator, eps and where eps goes."""

    unbiased: bool
    eps: float
    eps_mode: str


#: The named conventions. ``"paper"``: biased variance, ``sqrt(var + 1e-5)``. ``"official"``:
#: the authors' PyTorch code, ``std_unbiased + 1e-5``.
WS_PRESETS: dict[str, WSPreset] = {
    "paper": WSPreset(unbiased=False, eps=1e-5, eps_mode="sqrt"),
    "official": WSPreset(unbiased=True, eps=1e-5, eps_mode="std"),
}


def _resolve_preset(
    layer: str, preset: str, eps: float | None, unbiased: bool | None, eps_mode: str | None
) -> WSPreset:
    if not isinstance(preset, str) or preset not in WS_PRESETS:
        known = ", ".join(repr(k) for k in WS_PRESETS)
        raise ValueError(f"{layer}: expected preset to be one of {known}, got {preset!r}")
    base = WS_PRESETS[preset]
    if eps is None:
        eps = base.eps
    check_positive(layer, "eps", eps)
    if eps > torch.finfo(torch.float32).max:  # statistics may be float32: clamp_min fails
        raise ValueError(f"{layer}: expected eps <= {torch.finfo(torch.float32).max}, got {eps}")
    if unbiased is None:
        unbiased = base.unbiased
    if not isinstance(unbiased, bool):
        raise TypeError(f"{layer}: expected unbiased to be a bool or None, got {unbiased!r}")
    if eps_mode is None:
        eps_mode = base.eps_mode
    if eps_mode not in _EPS_MODES:
        known = ", ".join(repr(k) for k in _EPS_MODES)
        raise ValueError(f"{layer}: expected eps_mode to be one of {known}, got {eps_mode!r}")
    return WSPreset(unbiased=unbiased, eps=float(eps), eps_mode=eps_mode)


def _check_conv_args(
    layer: str,
    in_channels: int,
    out_channels: int,
    groups: int,
    bias: bool,
    dtype: Any,
    **sizes: Any,
) -> None:
    """Refuse, before ``nn.Conv*d.__init__`` fails on them with a RuntimeError, a negative
    size, a flag that is no bool, a dtype parameters cannot have, and ``sizes`` (kernel size,
    stride, padding, dilation) that are not ints or are out of range (a negative kernel size
    fails in ``torch.empty``; their number: :func:`_check_conv_sizes`)."""
    for name, value in sizes.items():
        if name == "padding" and isinstance(value, str):
            continue
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(type(v) is not int for v in items):
            raise TypeError(f"{layer}: expected {name} to be an int or ints, got {value!r}")
        for item in items:
            check_count(layer, name, item, 0 if name == "padding" else 1)
    check_count(layer, "in_channels", in_channels)
    check_count(layer, "out_channels", out_channels)
    check_count(layer, "groups", groups)
    if in_channels % groups or out_channels % groups:  # torch's message names neither
        raise ValueError(
            f"{layer}: expected groups to divide in_channels={in_channels} and "
            f"out_channels={out_channels}, got groups={groups}"
        )
    check_flags(layer, bias=bias)
    check_dtype(layer, dtype)


def _check_conv_sizes(conv: _ConvNd) -> None:
    """Refuse sizes ``nn.Conv*d`` accepts but cannot compute with: a kernel of 0 (a fan-in of
    0 has no statistics), a stride or dilation of 0, a negative padding, a tuple of the wrong
    length."""
    layer = type(conv).__name__
    dims = next(
        d for c, d in ((nn.Conv1d, 1), (nn.Conv2d, 2), (nn.Conv3d, 3)) if isinstance(conv, c)
    )
    sizes = {
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "dilation": conv.dilation,
        "padding": conv.padding,
    }
    for name, value in sizes.items():
        if isinstance(value, str):
            continue  # a padding string, which torch checks
        if len(value) != dims:
            raise ValueError(f"{layer}: expected {name} to be an int or {dims} ints, got {value!r}")
        for item in value:
            check_count(layer, name, item, 0 if name == "padding" else 1)


def _min_input_sizes(conv: _ConvNd) -> tuple[int, ...]:
    """The smallest input size per spatial dimension that ``conv`` accepts: the padded input
    must cover the dilated kernel, reflect padding needs more values than it pads and circular
    padding at least as many."""
    pads = conv._reversed_padding_repeated_twice  # (left, right) per dim, last dim first
    dims = len(conv.kernel_size)
    sizes = []
    for i, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation)):
        left, right = pads[2 * (dims - 1 - i)], pads[2 * (dims - 1 - i) + 1]
        size = max(1, d * (k - 1) + 1 - left - right)
        if conv.padding_mode == "reflect":
            size = max(size, left + 1, right + 1)
        elif conv.padding_mode == "circular":
            size = max(size, left, right)
        sizes.append(size)
    return tuple(sizes)


def _check_conv_call(conv: _ConvNd, input: Tensor) -> None:
    check_conv_input(
        type(conv).__name__, input, conv.in_channels, conv.weight.dtype, _min_input_sizes(conv)
    )


def _standardized_conv(conv: Any, input: Tensor) -> Tensor:
    """``conv._conv_forward`` with the layer's :meth:`standardized_weight`.

    For a non-empty floating-point tensor the full input checks run only when the call fails:
    every such input they refuse also makes torch's convolution fail, so on success they could
    only cost time (about 5 µs per call, 1.5% of a 64-channel 3x3 convolution at 32x32 with
    batch 1, where the eval target is 1%). On failure they replace torch's error with one that
    names the layer and the problem; when they pass, torch's own error propagates. Anything
    else (not a tensor, not floating point, empty: torch convolves an empty integer tensor
    without complaint) is checked first.
    """
    if not isinstance(input, Tensor) or not input.is_floating_point() or input.numel() == 0:
        _check_conv_call(conv, input)
    try:
        out: Tensor = conv._conv_forward(input, conv.standardized_weight(), conv.bias)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError):
        _check_conv_call(conv, input)
        raise
    return out


def _init_checked_conv(
    conv: _ConvNd,
    base: type[_ConvNd],
    args: tuple[Any, ...],
    padding_mode: str,
    device: Any,
    dtype: Any,
) -> None:
    """``base.__init__`` on ``conv`` between the checks of the layers here: the arguments before
    (errors that name the layer, instead of torch's), the sizes after.

    ``args`` are ``base``'s first positional arguments: ``(in_channels, out_channels,
    kernel_size, stride, padding, dilation, groups, bias)``.
    """
    in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias = args
    _check_conv_args(
        type(conv).__name__,
        in_channels,
        out_channels,
        groups,
        bias,
        dtype,
        kernel_size=kernel_size,
        stride=stride,
        padding=padding,
        dilation=dilation,
    )
    # The class's own __init__ (nn.Conv1d/2d/3d take more arguments than _ConvNd's stub says).
    init: Any = base.__init__
    init(conv, *args, padding_mode, device, dtype)
    _check_conv_sizes(conv)


def _check_fan_in(layer: str, weight: Tensor, unbiased: bool) -> None:
    fan_in = weight[0].numel() if weight.shape[0] > 0 else 0
    if unbiased and fan_in < 2:
        raise ValueError(
            f"{layer}: expected a fan-in of at least 2 for the unbiased variance, got a fan-in "
            f"of {fan_in} (weight shape {tuple(weight.shape)}); use unbiased=False"
        )


class _CacheEntry(NamedTuple):
    """The eval cache: ``value`` was computed under ``config`` from the tensors in ``sources``,
    ``(name, tensor, key)`` per source, ``key`` as :func:`_tensor_key` describes the tensor.

    The tensors (strong references) give the identity check: a new tensor object on the old
    storage (same pointer, version and shape) is told apart. ``storages`` keeps each source's
    storage alive while the entry lives, so no new storage can be allocated at the recorded
    address: a ``.data =`` assignment, which keeps the version counter, always changes the
    pointer. Weak references would save nothing (the storage is held anyway) and would block
    ``torch.utils.swap_tensors`` on the weight.
    """

    config: tuple[object, ...]
    sources: tuple[tuple[str, Tensor, tuple[object, ...]], ...]
    storages: tuple[torch.UntypedStorage, ...]
    value: Tensor


def _tensor_key(t: Tensor) -> tuple[object, ...]:
    """What the eval cache compares: an in-place update bumps the version, a ``.data =``
    assignment changes the pointer or the layout."""
    return (t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride())


_PLAIN_TENSOR_TYPES = (Tensor, nn.Parameter)
_functorch_active = torch._C._are_functorch_transforms_active
_M = TypeVar("_M", bound="_StandardizedWeight")


class _StandardizedWeight(nn.Module):
    """The machinery shared by every layer here: the eval cache, bake and the load hook.

    A subclass defines :meth:`_compute_weight` (the live computation) and, when the result
    depends on more than ``weight``, extends :attr:`_cache_names` and :meth:`_cache_config`.
    """

    weight: Tensor
    _ws_cache: _CacheEntry | None
    #: The closed-form standardization (:func:`normkit._fused.weight_standardize`) where it
    #: applies: the weight needs a gradient, in eager mode. False always runs the reference
    #: formula (:func:`normkit.functional.weight_standardize`), for tests and debugging.
    fast = True

    def _compute_weight(self) -> Tensor:
        raise NotImplementedError

    #: The tensors the standardized weight is computed from: parameter names.
    _cache_names: tuple[str, ...] = ("weight",)

    def _cache_config(self) -> tuple[object, ...]:
        raise NotImplementedError

    def _may_use_cache(self, sources: tuple[Tensor, ...]) -> bool:
        grad_mode = torch.is_grad_enabled()
        for t in sources:
            if type(t) not in _PLAIN_TENSOR_TYPES:
                return False
            if grad_mode and t.requires_grad:
                return False
            if t.is_inference():  # no version counter to watch (made in inference mode)
                return False
        return True

    def standardized_weight(self) -> Tensor:
        """The weight as the forward uses it (from the eval cache when it is valid).

        Under the cache rule (module docstring) the returned tensor may be the cached one:
        treat it as read-only.
        """
        # Training, compiling and functorch transforms first: a compiled forward stops at a
        # constant and never traces the identity and version-counter bookkeeping below.
        if self.training or torch.compiler.is_compiling() or _functorch_active():
            return self._compute_weight()
        entry = self.__dict__.get("_ws_cache")
        if entry is not None and entry.config == self._cache_config():
            # The hit path, inline: it runs at every eval call, and each Python call around a
            # small convolution is a measurable part of it.
            params = self._parameters
            grad_mode = torch.is_grad_enabled()
            for name, source, key in entry.sources:
                t = params.get(name)
                if t is None:  # not a registered parameter: a plain tensor, or a property
                    t = getattr(self, name)
                # Identity first: the type and inference checks of _may_use_cache held for it.
                if t is not source or (grad_mode and t.requires_grad):
                    break
                # (_tensor_key, written out: a call less per source.)
                if (t._version, t.data_ptr(), t.dtype, t.device, t.shape, t.stride()) != key:
                    break
            else:
                return entry.value
        return self._refresh_cache()

    def _refresh_cache(self) -> Tensor:
        """The weight computed afresh, and kept as the cache entry where the rule allows."""
        sources = tuple(getattr(self, name) for name in self._cache_names)
        if not self._may_use_cache(sources):
            return self._compute_weight()
        # Dropped first: the old entry's storages (a replaced weight) may be freed before the
        # new value is allocated, so the cache never keeps more than one old weight alive.
        self._ws_cache = None
        # Computed outside inference mode so that the cached tensor stays usable later with grad
        # mode on (an inference tensor cannot be saved for backward, e.g. for an input gradient).
        with torch.inference_mode(False), torch.no_grad():
            value = self._compute_weight()
        entries = tuple((name, t, _tensor_key(t)) for name, t in zip(self._cache_names, sources))
        storages = tuple(t.untyped_storage() for t in sources)
        self._ws_cache = _CacheEntry(self._cache_config(), entries, storages, value)
        return value

    def clear_cache(self) -> None:
        """Drop the eval-mode cache (needed only after in-place edits through ``weight.data``)."""
        self._ws_cache = None

    def train(self: _M, mode: bool = True) -> _M:
        if mode:
            self._ws_cache = None
        return super().train(mode)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> Any:
        # Conversions (.to(), .double(), device moves, share_memory(), to_empty()): the entry
        # would keep the old weight's storage alive (a second copy, on the old device) and
        # describes a weight that is about to be replaced or swapped
        # (torch.__future__.set_swap_module_params_on_conversion). Dropped first; rebuilt by
        # the next eval call.
        self._ws_cache = None
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict[str, Any]:
        # The cache (the value and the sources' storages) is not saved; the next eval call
        # rebuilds it.
        state: dict[str, Any] = super().__getstate__()
        state["_ws_cache"] = None
        return state

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # The weight is about to be copied into or swapped (and the entry would keep its old
        # storage alive): drop the cache first.
        self._ws_cache = None
        # A WS layer made with torch.nn.utils.parametrize saves its raw weight under this key;
        # accepting it lets such checkpoints load (with the preset they were trained with). Only
        # into a plain registered ``weight``: a layer parametrized itself owns that key.
        legacy = prefix + "parametrizations.weight.original"
        if (
            self._parameters.get("weight") is not None
            and prefix + "weight" not in state_dict
            and legacy in state_dict
        ):
            state_dict[prefix + "weight"] = state_dict.pop(legacy)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _plain_twin(self) -> nn.Module:
        raise NotImplementedError

    def bake(self) -> nn.Module:
        """A plain torch layer holding the standardized weight, for export and inference.

        The result is an ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d``/``nn.Linear`` with the same
        configuration, device, dtype and training flag, whose ``weight`` is a new Parameter
        holding :meth:`standardized_weight` (computed afresh, without graph) and whose ``bias``
        is a copy of this layer's bias. It equals this layer in eval mode; training it trains
        the baked weight directly, without standardization.
        """
        with torch.no_grad():
            weight = self._compute_weight().detach().clone()
        # Built on the meta device, so no memory is spent on an initialization thrown away.
        plain = self._plain_twin()
        plain.weight = nn.Parameter(weight, requires_grad=self.weight.requires_grad)
        bias = self._parameters.get("bias")
        if bias is not None:
            plain.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        plain.train(self.training)
        return plain


class _WSLayer(_StandardizedWeight):
    """WS with a preset and no gain (the paper's layer)."""

    preset: str
    eps: float
    unbiased: bool
    eps_mode: str

    def _init_ws(self, config: WSPreset, preset: str) -> None:
        _check_fan_in(type(self).__name__, self.weight, config.unbiased)
        self.preset = preset
        self.eps = config.eps
        self.unbiased = config.unbiased
        self.eps_mode = config.eps_mode
        self._ws_cache = None

    def _compute_weight(self) -> Tensor:
        standardize = _standardizer(self)
        return standardize(self.weight, self.eps, unbiased=self.unbiased, eps_mode=self.eps_mode)

    def _cache_config(self) -> tuple[object, ...]:
        return (self.eps, self.unbiased, self.eps_mode)

    _plain_cls: type[_ConvNd]

    def forward(self, input: Tensor) -> Tensor:
        # The convolutions; WSLinear has its own.
        return _standardized_conv(self, input)

    def _plain_twin(self) -> nn.Module:
        conv: Any = self
        return _conv_twin(conv, self._plain_cls)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._ws_repr()}"

    def _ws_repr(self) -> str:
        return (
            f"preset={self.preset!r}, eps={self.eps}, unbiased={self.unbiased}, "
            f"eps_mode={self.eps_mode!r}"
        )


def _standardizer(layer: _StandardizedWeight) -> Callable[..., Tensor]:
    """The closed-form standardization in eager mode (the reference computation done in place,
    and a five-pass backward instead of autograd's), else the reference. Eager calls with and
    without gradient use the same one, so the eval cache holds exactly the weight that
    training computes."""
    w = layer.weight
    if layer.fast and type(w) in _PLAIN_TENSOR_TYPES and _fused.fast_paths_apply(w):
        if kernels.takes_weight(w):  # normkit's compiled kernel, when enabled
            return _fused.weight_standardize_kernel
        return _fused.weight_standardize
    return nkf.weight_standardize


def _conv_twin(conv: _ConvNd, cls: Callable[..., _ConvNd]) -> _ConvNd:
    return cls(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
        device="meta",
        dtype=conv.weight.dtype,
    )


class WSConv1d(_WSLayer, nn.Conv1d):
    r"""``nn.Conv1d`` with Weight Standardization (Qiao et al., arXiv 1903.10520).

    Each output filter ``weight[o]`` (shape ``(in_channels / groups, kernel_size)``) is
    standardized over its fan-in at every forward,
    ``Ŵ_o = (W_o − mean(W_o)) / σ(W_o)``, and ``y = conv1d(x, Ŵ) + bias`` (with the layer's
    stride, padding, padding mode, dilation and groups). ``σ`` follows ``preset``: ``"paper"``
    ``σ = sqrt(var_biased + eps)``, ``"official"`` ``σ = std_unbiased + eps``; eps = 1e-5.

    Positional arguments are those of :class:`torch.nn.Conv1d`; the ``weight`` and ``bias``
    keys are unchanged, so ``nn.Conv1d`` checkpoints load with ``strict=True`` (but are not
    numerically interchangeable across presets). In eval mode the standardized weight is cached
    (module docstring); :meth:`bake` returns a plain ``nn.Conv1d``.

    Keyword-only args:
        preset: ``"paper"`` (biased variance, ``sqrt(var + 1e-5)``; default) or ``"official"``
            (the authors' PyTorch code: unbiased std ``+ 1e-5``). See the module docstring.
        eps: overrides the preset's eps (> 0).
        unbiased: overrides the preset's variance estimator (``True``: divide by ``n - 1``).
        eps_mode: overrides where eps goes: ``"sqrt"``, ``"std"`` or ``"max"``.

    Shape:
        as :class:`torch.nn.Conv1d`: ``(N, C_in, L)`` to ``(N, C_out, L_out)`` (or unbatched).

    Example::

        >>> conv = WSConv1d(16, 32, 3, padding=1)
        >>> conv(torch.randn(8, 16, 50)).shape
        torch.Size([8, 32, 50])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_1_t,
        stride: _size_1_t = 1,
        padding: str | _size_1_t = 0,
        dilation: _size_1_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: _PaddingMode = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        preset: str = "paper",
        eps: float | None = None,
        unbiased: bool | None = None,
        eps_mode: str | None = None,
    ) -> None:
        config = _resolve_preset(type(self).__name__, preset, eps, unbiased, eps_mode)
        _check_conv_args(
            type(self).__name__,
            in_channels,
            out_channels,
            groups,
            bias,
            dtype,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        _check_conv_sizes(self)
        self._init_ws(config, preset)

    _plain_cls = nn.Conv1d


class WSConv2d(_WSLayer, nn.Conv2d):
    r"""``nn.Conv2d`` with Weight Standardization (Qiao et al., arXiv 1903.10520).

    Each output filter ``weight[o]`` (shape ``(in_channels / groups, kH, kW)``) is standardized
    over its fan-in ``n = in_channels / groups · kH · kW`` at every forward:

    .. math::

        \hat W_o = \frac{W_o - \mu_o}{\sigma_o}, \qquad y = \operatorname{conv2d}(x, \hat W) + b

    with ``"paper"`` :math:`\sigma_o = \sqrt{v_o + \epsilon}` (:math:`v_o` the biased variance,
    divide by :math:`n`) or ``"official"`` :math:`\sigma_o = \sqrt{v^u_o} + \epsilon`
    (:math:`v^u_o` the unbiased variance, divide by :math:`n - 1`); :math:`\epsilon = 10^{-5}`.
    Gradients flow through :math:`\mu_o` and :math:`\sigma_o`; there is no learnable gain and the
    bias is kept. Stride, padding, ``padding_mode``, dilation and groups behave as in
    ``nn.Conv2d``.

    Positional arguments are those of :class:`torch.nn.Conv2d`; the ``weight`` and ``bias``
    keys are unchanged, so ``nn.Conv2d`` checkpoints load with ``strict=True`` (but are not
    numerically interchangeable across presets). In eval mode the standardized weight is cached
    (module docstring); :meth:`bake` returns a plain ``nn.Conv2d``.

    Keyword-only args:
        preset: ``"paper"`` (biased variance, ``sqrt(var + 1e-5)``; default) or ``"official"``
            (the authors' PyTorch code: unbiased std ``+ 1e-5``). See the module docstring.
        eps: overrides the preset's eps (> 0).
        unbiased: overrides the preset's variance estimator (``True``: divide by ``n - 1``).
        eps_mode: overrides where eps goes: ``"sqrt"``, ``"std"`` or ``"max"``.

    Shape:
        as :class:`torch.nn.Conv2d`: ``(N, C_in, H, W)`` to ``(N, C_out, H_out, W_out)`` (or
        unbatched).

    Example::

        >>> conv = WSConv2d(16, 32, 3, padding=1, bias=False)
        >>> y = conv(torch.randn(8, 16, 28, 28))  # (8, 32, 28, 28)
        >>> w = conv.standardized_weight()
        >>> w.mean(dim=(1, 2, 3)).abs().max() < 1e-6
        tensor(True)
        >>> plain = conv.eval().bake()  # nn.Conv2d, for export
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: str | _size_2_t = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: _PaddingMode = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        preset: str = "paper",
        eps: float | None = None,
        unbiased: bool | None = None,
        eps_mode: str | None = None,
    ) -> None:
        config = _resolve_preset(type(self).__name__, preset, eps, unbiased, eps_mode)
        _check_conv_args(
            type(self).__name__,
            in_channels,
            out_channels,
            groups,
            bias,
            dtype,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        _check_conv_sizes(self)
        self._init_ws(config, preset)

    _plain_cls = nn.Conv2d


class WSConv3d(_WSLayer, nn.Conv3d):
    r"""``nn.Conv3d`` with Weight Standardization (Qiao et al., arXiv 1903.10520).

    Each output filter ``weight[o]`` (shape ``(in_channels / groups, kD, kH, kW)``) is
    standardized over its fan-in at every forward, ``Ŵ_o = (W_o − mean(W_o)) / σ(W_o)``, and
    ``y = conv3d(x, Ŵ) + bias``. ``σ`` follows ``preset``: ``"paper"``
    ``σ = sqrt(var_biased + eps)``, ``"official"`` ``σ = std_unbiased + eps``; eps = 1e-5.

    Positional arguments are those of :class:`torch.nn.Conv3d`; the ``weight`` and ``bias``
    keys are unchanged, so ``nn.Conv3d`` checkpoints load with ``strict=True`` (but are not
    numerically interchangeable across presets). In eval mode the standardized weight is cached
    (module docstring); :meth:`bake` returns a plain ``nn.Conv3d``.

    Keyword-only args:
        preset: ``"paper"`` (biased variance, ``sqrt(var + 1e-5)``; default) or ``"official"``
            (the authors' PyTorch code: unbiased std ``+ 1e-5``). See the module docstring.
        eps: overrides the preset's eps (> 0).
        unbiased: overrides the preset's variance estimator (``True``: divide by ``n - 1``).
        eps_mode: overrides where eps goes: ``"sqrt"``, ``"std"`` or ``"max"``.

    Shape:
        as :class:`torch.nn.Conv3d`: ``(N, C_in, D, H, W)`` to ``(N, C_out, D_out, H_out, W_out)``
        (or unbatched).

    Example::

        >>> conv = WSConv3d(4, 8, 3, padding=1, preset="official")
        >>> conv(torch.randn(2, 4, 6, 6, 6)).shape
        torch.Size([2, 8, 6, 6, 6])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_3_t,
        stride: _size_3_t = 1,
        padding: str | _size_3_t = 0,
        dilation: _size_3_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: _PaddingMode = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        preset: str = "paper",
        eps: float | None = None,
        unbiased: bool | None = None,
        eps_mode: str | None = None,
    ) -> None:
        config = _resolve_preset(type(self).__name__, preset, eps, unbiased, eps_mode)
        _check_conv_args(
            type(self).__name__,
            in_channels,
            out_channels,
            groups,
            bias,
            dtype,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        _check_conv_sizes(self)
        self._init_ws(config, preset)

    _plain_cls = nn.Conv3d


class WSLinear(_WSLayer, nn.Linear):
    r"""``nn.Linear`` with Weight Standardization.

    The paper defines WS for convolutions only; this is its natural linear form: each output row
    ``weight[o]`` (shape ``(in_features,)``) is standardized over ``in_features`` at every
    forward, ``Ŵ_o = (W_o − mean(W_o)) / σ(W_o)``, and ``y = x Ŵᵀ + bias``, with ``σ`` as for
    :class:`WSConv2d` (``"paper"``: ``sqrt(var_biased + eps)``; ``"official"``:
    ``std_unbiased + eps``; eps = 1e-5).

    Positional arguments are those of :class:`torch.nn.Linear`; ``weight`` and ``bias`` keys are
    unchanged. In eval mode the standardized weight is cached (module docstring); :meth:`bake`
    returns a plain ``nn.Linear``.

    Keyword-only args:
        preset: ``"paper"`` (biased variance, ``sqrt(var + 1e-5)``; default) or ``"official"``
            (the authors' PyTorch code: unbiased std ``+ 1e-5``). See the module docstring.
        eps: overrides the preset's eps (> 0).
        unbiased: overrides the preset's variance estimator (``True``: divide by ``n - 1``).
        eps_mode: overrides where eps goes: ``"sqrt"``, ``"std"`` or ``"max"``.

    Shape:
        as :class:`torch.nn.Linear`: ``(*, in_features)`` to ``(*, out_features)``.

    Example::

        >>> fc = WSLinear(128, 10)
        >>> fc(torch.randn(4, 128)).shape
        torch.Size([4, 10])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        preset: str = "paper",
        eps: float | None = None,
        unbiased: bool | None = None,
        eps_mode: str | None = None,
    ) -> None:
        layer = type(self).__name__
        config = _resolve_preset(layer, preset, eps, unbiased, eps_mode)
        check_count(layer, "in_features", in_features)
        check_count(layer, "out_features", out_features)
        check_flags(layer, bias=bias)
        check_dtype(layer, dtype)
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_ws(config, preset)

    def forward(self, input: Tensor) -> Tensor:
        check_linear_input(type(self).__name__, input, self.in_features, self.weight.dtype)
        return F.linear(input, self.standardized_weight(), self.bias)

    def _plain_twin(self) -> nn.Module:
        return nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device="meta",
            dtype=self.weight.dtype,
        )


class ScaledWSConv2d(_StandardizedWeight, nn.Conv2d):
    r"""``nn.Conv2d`` with Scaled Weight Standardization, from the Normalizer-Free networks.

    Scaled WS comes from Brock, De & Smith, "Characterizing signal propagation to close the
    performance gap in unnormalized ResNets" (ICLR 2021), and Brock, De, Smith & Simonyan,
    "High-Performance Large-Scale Image Recognition Without Normalization" (ICML 2021), **not**
    from the Weight Standardization paper. With fan-in :math:`n = C_{in}/\text{groups} \cdot kH
    \cdot kW`, a learnable per-filter gain :math:`g_o` and a fixed activation gain
    :math:`\gamma`:

    .. math::

        W'_o = \gamma \, g_o \, \frac{W_o - \mu_o}{\sqrt{n}\,\sqrt{v_o + \epsilon}}, \qquad
        y = \operatorname{conv2d}(x, W') + b,

    with :math:`v_o` the biased variance of the filter (divide by :math:`n`) and eps inside the
    root. :math:`\gamma` preserves the signal's variance through the following nonlinearity
    (for ReLU, 1.7139588594436646 as tabulated by NF-Nets); with :math:`\gamma = g = 1` this is
    WS divided by :math:`\sqrt{n}`. The NF-Nets JAX code uses
    ``rsqrt(max(v·n, 1e-4))`` instead of ``sqrt(v + eps)``; the two agree unless a filter is
    nearly constant.

    Args:
        Positional arguments as :class:`torch.nn.Conv2d`.

    Keyword-only args:
        gamma: activation gain :math:`\gamma` (a constant, not learned). Default 1.0.
        eps: added to the biased variance inside the root (> 0). Default 1e-5.

    Parameters:
        ``weight`` and ``bias`` as ``nn.Conv2d``; ``gain`` of shape ``(out_channels, 1, 1, 1)``,
        initialized to 1 (timm ``ScaledStdConv2d`` uses the same keys).

    In eval mode the scaled standardized weight is cached like the other WS layers (the cache
    also watches ``gain`` and ``gamma``); :meth:`bake` returns a plain ``nn.Conv2d``.

    Example::

        >>> conv = ScaledWSConv2d(16, 32, 3, padding=1, gamma=1.7139588594436646)
        >>> conv(torch.randn(8, 16, 28, 28)).shape
        torch.Size([8, 32, 28, 28])
    """

    gain: nn.Parameter
    gamma: float
    eps: float

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: _size_2_t,
        stride: _size_2_t = 1,
        padding: str | _size_2_t = 0,
        dilation: _size_2_t = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: _PaddingMode = "zeros",
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        gamma: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        layer = type(self).__name__
        check_positive(layer, "eps", eps)
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)):
            raise TypeError(f"{layer}: expected gamma to be a number, got {gamma!r}")
        if not math.isfinite(gamma):  # it multiplies every weight
            raise ValueError(f"{layer}: expected a finite gamma, got {gamma}")
        _check_conv_args(
            layer,
            in_channels,
            out_channels,
            groups,
            bias,
            dtype,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
        )
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device,
            dtype,
        )
        _check_conv_sizes(self)
        self.gamma = float(gamma)
        self.eps = float(eps)
        self.gain = nn.Parameter(torch.ones(out_channels, 1, 1, 1, device=device, dtype=dtype))
        self._ws_cache = None

    def reset_parameters(self) -> None:
        super().reset_parameters()
        # nn.Conv2d.__init__ calls this before ``gain`` exists.
        gain = self._parameters.get("gain")
        if gain is not None:
            nn.init.ones_(gain)

    def _compute_weight(self) -> Tensor:
        fan_in = self.weight[0].numel()
        standardize = _standardizer(self)
        w_hat = standardize(self.weight, self.eps, unbiased=False, eps_mode="sqrt")
        return w_hat * (self.gain * (self.gamma / math.sqrt(fan_in))).to(w_hat.dtype)

    _cache_names = ("weight", "gain")

    def _cache_config(self) -> tuple[object, ...]:
        return (self.eps, self.gamma)

    def forward(self, input: Tensor) -> Tensor:
        return _standardized_conv(self, input)

    def _plain_twin(self) -> nn.Module:
        return _conv_twin(self, nn.Conv2d)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}, eps={self.eps}"


_WS_OF_CONV: dict[type[nn.Module], type[_WSLayer]] = {
    nn.Conv1d: WSConv1d,
    nn.Conv2d: WSConv2d,
    nn.Conv3d: WSConv3d,
}


def _adopt(
    plain: nn.Module, cls: Callable[..., _WSLayer], config: WSPreset, preset: str
) -> _WSLayer:
    """A WS layer that takes over ``plain``'s Parameter objects (not copies)."""
    weight = plain._parameters["weight"]
    assert weight is not None
    kwargs: dict[str, Any] = {
        "device": "meta",
        "dtype": weight.dtype,
        "preset": preset,
        "eps": config.eps,
        "unbiased": config.unbiased,
        "eps_mode": config.eps_mode,
    }
    bias = plain._parameters.get("bias")
    if isinstance(plain, nn.Linear):
        new = cls(plain.in_features, plain.out_features, bias is not None, **kwargs)
    else:
        assert isinstance(plain, _ConvNd)
        new = cls(
            plain.in_channels,
            plain.out_channels,
            plain.kernel_size,
            plain.stride,
            plain.padding,
            plain.dilation,
            plain.groups,
            bias is not None,
            plain.padding_mode,
            **kwargs,
        )
    # Re-binding (not copying) keeps optimizers', EMA's and tied modules' references valid.
    new.register_parameter("weight", weight)
    new.register_parameter("bias", bias)
    new.train(plain.training)
    return new


def weight_standardize_(
    model: nn.Module,
    *,
    preset: str = "paper",
    eps: float | None = None,
    unbiased: bool | None = None,
    eps_mode: str | None = None,
    include_linear: bool = False,
    exclude: Callable[[str, nn.Module], bool] | Collection[str] | None = None,
) -> nn.Module:
    """Swap every plain ``nn.Conv1d``/``nn.Conv2d``/``nn.Conv3d`` of ``model`` for its WS layer.

    Works in place and recursively. Each replaced layer becomes :class:`WSConv1d`,
    :class:`WSConv2d` or :class:`WSConv3d` (and ``nn.Linear`` becomes :class:`WSLinear` when
    ``include_linear``) built with ``preset``, ``eps``, ``unbiased`` and ``eps_mode`` (as in the
    layers' constructors). The new layer holds **the same** ``weight`` and ``bias`` Parameter
    objects, so an optimizer created before the call keeps training the model, and device,
    dtype, ``requires_grad`` and the training flag are kept. Hooks registered on a replaced
    module are not carried over; a layer whose ``weight`` is not a registered Parameter (the
    old hook-based ``weight_norm``/``spectral_norm``) is left alone.

    Only exact instances of the torch classes are replaced: their subclasses (including normkit's
    WS layers, so the call is idempotent, parametrized convs and ``MultiheadAttention``'s output
    projection) are left alone, because their forward may not be a plain conv; transposed
    convolutions are not standardized. A model with neither such a layer nor a WS layer is
    returned unchanged with a ``UserWarning`` (the call would have no effect). A module object
    reachable under several names (a shared module) is replaced once, by one new object placed at
    every one of its names. The official ResNets standardize every conv (stem and downsample
    included) and keep the classifier a plain Linear; the WS README advises converting only convs
    followed by a normalization layer, which ``exclude`` allows.

    Note that modules that read a Linear's ``weight`` directly instead of calling it (weight
    tying, custom heads) see the raw weight, not the standardized one.

    Args:
        model: the model to convert. If it is itself a plain conv (or Linear with
            ``include_linear``), its replacement is returned.
        preset, eps, unbiased, eps_mode: as in :class:`WSConv2d`.
        include_linear: also replace plain ``nn.Linear`` layers with :class:`WSLinear`.
        exclude: modules to leave alone: either a callable ``(qualified_name, module) -> bool``
            (called for each name of each candidate layer), or a collection of qualified names
            (as in ``model.named_modules()``; a name also excludes everything under it). A
            module is left alone if any of its names is excluded. Unknown names raise.

    Returns:
        ``model`` (converted in place), or the replacement of ``model`` itself.

    Example::

        >>> from normkit.models import resnet18
        >>> model = resnet18(norm_layer=lambda c: nn.GroupNorm(32, c))
        >>> model = weight_standardize_(model)  # every conv standardized; fc stays Linear
        >>> type(model.conv1).__name__, type(model.fc).__name__
        ('WSConv2d', 'Linear')
        >>> stem_kept = weight_standardize_(resnet18(), exclude={"conv1"})
        >>> type(stem_kept.conv1).__name__, type(stem_kept.layer1[0].conv1).__name__
        ('Conv2d', 'WSConv2d')
    """
    where = "weight_standardize_"
    config = _resolve_preset(where, preset, eps, unbiased, eps_mode)
    check_flags(where, include_linear=include_linear)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")
    targets: dict[type[nn.Module], type[_WSLayer]] = dict(_WS_OF_CONV)
    if include_linear:
        targets[nn.Linear] = WSLinear

    # Pass 1: every name of every module, without touching the model.
    names_of: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
        modules[id(module)] = module

    is_excluded = _exclusion_rule(where, exclude, names_of)
    replacements: dict[int, nn.Module] = {}
    for key, module in modules.items():
        cls = targets.get(type(module))
        # A weight that is not a registered Parameter belongs to an old-style hook
        # reparametrization (torch.nn.utils.weight_norm / spectral_norm): not a plain layer.
        if cls is None or not isinstance(module._parameters.get("weight"), nn.Parameter):
            continue
        if any(is_excluded(n, module) for n in names_of[key]):
            continue
        replacements[key] = _adopt(module, cls, config, preset)
    if not any(type(m) in targets or isinstance(m, _StandardizedWeight) for m in modules.values()):
        layers = "convolution or linear layer" if include_linear else "convolution"
        hint = "" if include_linear else " (pass include_linear=True for nn.Linear)"
        warnings.warn(
            f"{where}: expected a model with a plain {layers} to standardize, got a "
            f"{type(model).__name__} with none{hint}; nothing was changed",
            stacklevel=2,
        )

    # Pass 2: re-point every slot holding a replaced module; each container's children are
    # snapshotted before it is written to.
    for parent in modules.values():
        for attr, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                setattr(parent, attr, replacements[id(child)])
    return replacements.get(id(model), model)


def _exclusion_rule(
    where: str,
    exclude: Callable[[str, nn.Module], bool] | Collection[str] | None,
    names_of: dict[int, list[str]],
) -> Callable[[str, nn.Module], bool]:
    if exclude is None:
        return lambda name, module: False
    if callable(exclude):
        rule = exclude
        return lambda name, module: bool(rule(name, module))
    if isinstance(exclude, str):
        raise TypeError(
            f"{where}: expected exclude to be a callable or a collection of names, got the "
            f"string {exclude!r}; pass {{{exclude!r}}}"
        )
    wanted = set(exclude)
    if not all(isinstance(e, str) for e in wanted):
        raise TypeError(
            f"{where}: expected exclude to be a callable or a collection of names (str), got "
            f"{exclude!r}"
        )
    known = {n for names in names_of.values() for n in names}
    unknown = sorted(wanted - known)
    if unknown:
        raise ValueError(f"{where}: expected exclude to name modules of the model, got {unknown}")
    # A name excludes its module and everything under it; "" names the model itself (as in
    # named_modules()), so it excludes everything.
    if "" in wanted:
        return lambda name, module: True
    return lambda name, module: any(name == e or name.startswith(e + ".") for e in wanted)
