"""Reference ResNets taking any ``norm_layer``, and their Fixup (normalization-free) form.

Two families, each in a normalized and a Fixup form:

* **CIFAR-style** (:func:`cifar_resnet`, :func:`resnet20` ... :func:`resnet110`; He et al. 2016,
  section 4.2): a 3x3 stem, three stages of basic blocks of widths ``(w, 2w, 4w)`` (``w = 16``),
  ``n`` blocks per stage, depth ``6n + 2``; parameter-free "option A" shortcuts (strided
  subsampling plus zero channels).
* **ImageNet-style** (:func:`imagenet_resnet`, :func:`resnet18`, :func:`resnet34`,
  :func:`resnet50`): a 7x7 stride-2 stem and a 3x3 max-pool, four stages of basic blocks or
  bottlenecks (stride on the 3x3 conv), 1x1 convolution shortcuts. The normalized form has
  torchvision's module names, so its state dict has torchvision's keys.

Normalized form (``fixup=False``): ``norm_layer`` is any callable taking the channel count alone
(``nn.BatchNorm2d``, a normkit layer, ``functools.partial(nn.GroupNorm, 8)``) or ``None`` for no
normalization at all. Convolutions have no bias. Init as torchvision: every conv He normal
(``fan_out``, ReLU gain), every norm its own ``reset_parameters()``, the classifier PyTorch's
default. ``zero_init_residual=True`` zeroes the weight of each branch's last norm, as the official
Fixup repository's BN baseline does (keep it on when comparing against Fixup).

Fixup form (``fixup=True``): no normalization, the scalar placement of the official code
(:class:`FixupBasicBlock`, :class:`FixupBottleneck`) and the Fixup init
(:meth:`reset_parameters` of the networks):

* rescaled: the non-final convs of every residual branch, He normal ``fan_out`` times
  ``L ** (-1 / (2m - 2))``, ``L`` the number of blocks, ``m`` = 2 (basic) or 3 (bottleneck);
* zero: the last conv of every branch, the classifier's weight and bias;
* not rescaled: the ImageNet 1x1 shortcut convs (He normal ``fan_out``) and the stem conv, which
  keeps PyTorch's default ``kaiming_uniform_(a=sqrt(5))`` init, as in the official code.

Every block has ``branch(x)`` and ``shortcut(x)`` (the two terms before the addition);
``model.blocks()`` lists the blocks in forward order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _nn_module

from normkit import _fused, kernels
from normkit._checks import check_count, check_input
from normkit.fixup import Bias, Scale, _in_dtype, fixup_init_, he_normal_fan_out_

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "FixupBasicBlock",
    "FixupBottleneck",
    "ImageNetResNet",
    "NormLayer",
    "ZeroPadShortcut",
    "cifar_resnet",
    "imagenet_resnet",
    "resnet18",
    "resnet20",
    "resnet32",
    "resnet34",
    "resnet44",
    "resnet50",
    "resnet56",
    "resnet110",
]

NormLayer = Callable[[int], nn.Module]
"""A norm layer factory: called with the channel count alone, returns the layer."""

ShortcutKind = Literal["zero_pad", "conv"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _unhooked(*modules: nn.Module) -> bool:
    """Whether calling these modules runs only their ``forward``: no forward or backward hooks
    on them, none global (a fused computation that skips their calls would skip the hooks)."""
    g = _nn_module
    if (
        g._global_forward_hooks
        or g._global_forward_pre_hooks
        or g._global_backward_hooks
        or g._global_backward_pre_hooks
    ):
        return False
    for m in modules:
        if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks:
            return False
    return True


def _conv_then_scalars(
    conv: nn.Module, x: Tensor, bias: Bias, scale: Scale | None = None
) -> Tensor:
    """``bias(scale(conv(x)))`` (``bias(conv(x))`` without a scale): Fixup's scalars after a
    branch convolution.

    For a plain ``nn.Conv2d`` with zero padding, one convolution computes it: the scale folded
    into the weight (a weight-sized multiply) and the bias into the convolution's per-channel
    bias, which the convolution kernel adds as it writes its output. The scalars then cost no
    pass over the activation in forward, and their gradients come from the convolution's own
    weight and bias gradients instead of two more passes in backward. Equal to the modules'
    composition up to float rounding. Any other layer (a WS convolution from
    :func:`normkit.convert_norm`, hooked modules) runs the modules as written.
    """
    parts = (conv, bias) if scale is None else (conv, bias, scale)
    if type(conv) is not nn.Conv2d or conv.padding_mode != "zeros" or not _unhooked(*parts):
        out = conv(x)
        return bias(out if scale is None else scale(out))
    weight: Tensor = conv.weight
    shift = _in_dtype(bias.bias, weight.dtype).expand(conv.out_channels)
    if scale is not None:
        factor = _in_dtype(scale.weight, weight.dtype)
        weight = weight * factor
        if conv.bias is not None:
            shift = torch.addcmul(shift, conv.bias, factor)
    elif conv.bias is not None:
        shift = conv.bias + shift
    return F.conv2d(x, weight, shift, conv.stride, conv.padding, conv.dilation, conv.groups)


def _plain_3x3(conv: nn.Module, stride: int | None = 1) -> bool:
    """Whether ``conv`` is a plain bias-free 3x3 ``nn.Conv2d`` with zero padding 1 and the
    given stride (None: any stride, the same along both axes): the convolution the Fixup block
    kernel computes."""
    return (
        type(conv) is nn.Conv2d
        and conv._parameters.get("bias") is None
        and conv.kernel_size == (3, 3)
        and conv.padding == (1, 1)
        and conv.stride[0] == conv.stride[1] == (conv.stride[0] if stride is None else stride)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _fixup_block_kernel(block: FixupBasicBlock, x: Tensor) -> Tensor | None:
    """The block as one call of normkit's compiled kernel (``fixup_basic``) where it applies,
    else None: kernels enabled, a float32/float64 CPU 4D input (contiguous or channels_last)
    outside tracing, ``torch.func`` and forward-mode AD, no autocast, plain 3x3 convolutions,
    exact ``Bias``/``Scale`` modules (a parametrization changes their class), no hooks on any
    of them, every parameter in the input's dtype and on the CPU. Equal to the modules'
    composition up to float rounding.

    (Submodules and parameters are read from ``_modules``/``_parameters``: ``nn.Module``'s
    attribute lookup costs about half a microsecond each, and this runs on every forward.)
    """
    if not (
        type(x) is Tensor and x.dim() == 4 and kernels.applies(x) and _fused.fast_paths_apply(x)
    ):
        return None
    m = block._modules
    c1: Any = m["conv1"]  # checked to be an nn.Conv2d below
    c2: Any = m["conv2"]
    a1, b1, a2 = m["bias1a"], m["bias1b"], m["bias2a"]
    sc, b2 = m["scale"], m["bias2b"]
    if not (
        type(a1) is Bias
        and type(b1) is Bias
        and type(a2) is Bias
        and type(sc) is Scale
        and type(b2) is Bias
        and _plain_3x3(c1, None)
        and _plain_3x3(c2)
        and _unhooked(c1, c2, a1, b1, a2, sc, b2)
        and not torch.is_autocast_enabled("cpu")
    ):
        return None
    # (.get: a weight replaced by a plain tensor attribute or a buffer is not in _parameters)
    w1, w2 = c1._parameters.get("weight"), c2._parameters.get("weight")
    bias1a, bias1b = a1._parameters.get("bias"), b1._parameters.get("bias")
    bias2a, scale, bias2b = (
        a2._parameters.get("bias"),
        sc._parameters.get("weight"),
        b2._parameters.get("bias"),
    )
    dtype = x.dtype
    for p in (w1, w2, bias1a, bias1b, bias2a, scale, bias2b):
        if p is None or p.dtype is not dtype or not p.is_cpu:
            return None
    fixup_basic = kernels.op("fixup_basic")
    stride = c1.stride[0]
    if block.downsample is None:
        out: Tensor = fixup_basic(x, None, bias1a, w1, bias1b, bias2a, w2, scale, bias2b, stride)
        return out
    a = a1(x)
    shortcut = block.downsample(a)
    expected = (
        x.shape[0],
        w1.shape[0],
        (x.shape[2] - 1) // stride + 1,
        (x.shape[3] - 1) // stride + 1,
    )
    if type(shortcut) is not Tensor or shortcut.dtype is not dtype or shortcut.shape != expected:
        # A custom downsample whose output the modules broadcast or promote: finish with them
        # (returning None would call the downsample a second time).
        return F.relu(block._branch(a) + shortcut)
    out = fixup_basic(a, shortcut, None, w1, bias1b, bias2a, w2, scale, bias2b, stride)
    return out


def _norm(norm_layer: NormLayer | None, channels: int) -> nn.Module:
    return nn.Identity() if norm_layer is None else norm_layer(channels)


class ZeroPadShortcut(nn.Module):
    """The parameter-free "option A" shortcut: strided subsampling, then zero channels appended.

    ``y = cat([x[:, :, ::stride, ::stride], zeros], dim=1)`` with ``out_channels - in_channels``
    zero channels. Any increase in channels works, not only doubling (the official Fixup code
    assumed exact doubling). The subsampling keeps pixel ``(0, 0)`` and every ``stride``-th after
    it, so the output is ``ceil(H / stride) x ceil(W / stride)``: the size of a padded 3x3 conv of
    the same stride.

    Example::

        >>> import torch
        >>> ZeroPadShortcut(16, 24, stride=2)(torch.randn(1, 16, 8, 8)).shape
        torch.Size([1, 24, 4, 4])
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        check_count("ZeroPadShortcut", "in_channels", in_channels)
        check_count("ZeroPadShortcut", "out_channels", out_channels)
        check_count("ZeroPadShortcut", "stride", stride)
        if out_channels < in_channels:
            raise ValueError(
                f"ZeroPadShortcut: expected out_channels >= in_channels (zero padding cannot "
                f"remove channels), got {in_channels} -> {out_channels}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - self.in_channels
        if extra:
            x = F.pad(x, (0, 0, 0, 0, 0, extra))
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


def _needs_projection(in_channels: int, out_channels: int, stride: int) -> bool:
    return stride != 1 or in_channels != out_channels


def _downsample(
    kind: ShortcutKind,
    in_channels: int,
    out_channels: int,
    stride: int,
    norm_layer: NormLayer | None,
    fixup: bool,
) -> nn.Module | None:
    if not _needs_projection(in_channels, out_channels, stride):
        return None
    if kind == "zero_pad":
        return ZeroPadShortcut(in_channels, out_channels, stride)
    if fixup:
        return _conv1x1(in_channels, out_channels, stride)
    return nn.Sequential(
        _conv1x1(in_channels, out_channels, stride), _norm(norm_layer, out_channels)
    )


class _ResidualBlock(nn.Module):
    """``relu(branch(x) + shortcut(x))``; ``downsample`` is ``None`` for the identity shortcut."""

    expansion = 1
    downsample: nn.Module | None

    def branch(self, x: Tensor) -> Tensor:
        """The residual branch's output, before the addition."""
        raise NotImplementedError

    def shortcut(self, x: Tensor) -> Tensor:
        """The shortcut's output, before the addition."""
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))


class BasicBlock(_ResidualBlock):
    """Two 3x3 convs, each followed by a norm: ``relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x))``.

    ``conv1`` carries the stride. The shortcut ``s`` is the identity, or (when the stride or the
    channel count changes) :class:`ZeroPadShortcut` for ``shortcut="zero_pad"`` or a 1x1 conv and
    a norm (``downsample.0``, ``downsample.1``) for ``shortcut="conv"``. ``norm_layer=None``
    puts ``nn.Identity`` in every norm slot.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        shortcut: ShortcutKind = "conv",
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = _norm(norm_layer, planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = _norm(norm_layer, planes)
        self.downsample = _downsample(shortcut, in_channels, planes, stride, norm_layer, False)

    def branch(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(h))

    def last_norm(self) -> nn.Module:
        """The norm that closes the branch (zeroed by ``zero_init_residual``)."""
        return self.bn2


class Bottleneck(_ResidualBlock):
    """1x1 (reduce) -> 3x3 (stride) -> 1x1 (expand by 4) convs, each followed by a norm.

    ``relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + s(x))``, with the stride on the
    3x3 conv (torchvision's "ResNet v1.5" and the official Fixup code). Output channels are
    ``4 * planes``. Shortcut as in :class:`BasicBlock`.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        shortcut: ShortcutKind = "conv",
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = _norm(norm_layer, planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = _norm(norm_layer, planes)
        self.conv3 = _conv1x1(planes, out_channels)
        self.bn3 = _norm(norm_layer, out_channels)
        self.downsample = _downsample(
            shortcut, in_channels, out_channels, stride, norm_layer, False
        )

    def branch(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return self.bn3(self.conv3(h))

    def last_norm(self) -> nn.Module:
        """The norm that closes the branch (zeroed by ``zero_init_residual``)."""
        return self.bn3


class FixupBasicBlock(_ResidualBlock):
    """The Fixup basic block (m = 2), 5 scalars, exactly as the official code places them::

        a = x + bias1a
        h = relu(conv1(a) + bias1b)
        branch = scale * conv2(h + bias2a) + bias2b
        out = relu(branch + shortcut),  shortcut = downsample(a) if downsampling else x

    ``bias1a`` also feeds the downsample path. Attribute names are the official ones; each scalar
    is a :class:`~normkit.Bias` (``bias1a.bias``) or :class:`~normkit.Scale` (``scale.weight``).
    Branch init (by the network, which knows ``L``): ``conv1`` He ``fan_out`` times
    ``L ** -0.5``, ``conv2`` zero.

    With :mod:`normkit.kernels` enabled, the standard block (plain 3x3 convolutions, these exact
    scalar modules, no hooks, a float32/float64 CPU input) runs as one compiled operator, the
    scalars folded into the passes between the convolutions; any other block runs its modules.
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: ShortcutKind = "conv",
    ) -> None:
        super().__init__()
        self.bias1a = Bias()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bias1b = Bias()
        self.bias2a = Bias()
        self.conv2 = _conv3x3(planes, planes)
        self.scale = Scale()
        self.bias2b = Bias()
        self.downsample = _downsample(shortcut, in_channels, planes, stride, None, True)

    def _branch(self, a: Tensor) -> Tensor:
        h = F.relu(_conv_then_scalars(self.conv1, a, self.bias1b))
        return _conv_then_scalars(self.conv2, self.bias2a(h), self.bias2b, self.scale)

    def branch(self, x: Tensor) -> Tensor:
        return self._branch(self.bias1a(x))

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(self.bias1a(x))

    def forward(self, x: Tensor) -> Tensor:
        if kernels.is_enabled():
            out = _fixup_block_kernel(self, x)
            if out is not None:
                return out
        a = self.bias1a(x)
        s = x if self.downsample is None else self.downsample(a)
        return F.relu(self._branch(a) + s)

    def fixup_branch_layers(self) -> Sequence[nn.Module]:
        return (self.conv1, self.conv2)


class FixupBottleneck(_ResidualBlock):
    """The Fixup bottleneck (m = 3), 7 scalars, exactly as the official code places them::

        a = x + bias1a
        h = relu(conv1(a) + bias1b)
        h = relu(conv2(h + bias2a) + bias2b)
        branch = scale * conv3(h + bias3a) + bias3b
        out = relu(branch + shortcut),  shortcut = downsample(a) if downsampling else x

    Stride on ``conv2``; output channels ``4 * planes``. Branch init (by the network): ``conv1``
    and ``conv2`` He ``fan_out`` times ``L ** -0.25``, ``conv3`` zero.
    """

    expansion = 4

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        *,
        shortcut: ShortcutKind = "conv",
    ) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.bias1a = Bias()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bias1b = Bias()
        self.bias2a = Bias()
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bias2b = Bias()
        self.bias3a = Bias()
        self.conv3 = _conv1x1(planes, out_channels)
        self.scale = Scale()
        self.bias3b = Bias()
        self.downsample = _downsample(shortcut, in_channels, out_channels, stride, None, True)

    def _branch(self, a: Tensor) -> Tensor:
        h = F.relu(_conv_then_scalars(self.conv1, a, self.bias1b))
        h = F.relu(_conv_then_scalars(self.conv2, self.bias2a(h), self.bias2b))
        return _conv_then_scalars(self.conv3, self.bias3a(h), self.bias3b, self.scale)

    def branch(self, x: Tensor) -> Tensor:
        return self._branch(self.bias1a(x))

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(self.bias1a(x))

    def forward(self, x: Tensor) -> Tensor:
        a = self.bias1a(x)
        s = x if self.downsample is None else self.downsample(a)
        return F.relu(self._branch(a) + s)

    def fixup_branch_layers(self) -> Sequence[nn.Module]:
        return (self.conv1, self.conv2, self.conv3)


_BLOCKS: dict[tuple[str, bool], type[_ResidualBlock]] = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): FixupBasicBlock,
    ("bottleneck", True): FixupBottleneck,
}


def _stage_widths(name: str, width: int | Sequence[int], num_stages: int) -> list[int]:
    if isinstance(width, bool):
        raise TypeError(f"{name}: expected width as an int or a sequence of ints, got {width!r}")
    if isinstance(width, int):
        check_count(name, "width", width)
        return [width * 2**i for i in range(num_stages)]
    widths = list(width)
    if len(widths) != num_stages:
        raise ValueError(
            f"{name}: expected width as an int or {num_stages} stage widths, got {len(widths)} "
            f"widths {tuple(widths)}"
        )
    for w in widths:
        check_count(name, "every stage width", w)
    return widths


class _ResNet(nn.Module):
    """Stem, stages ``layer1``..``layerK`` of residual blocks, global average pool, classifier."""

    def __init__(
        self,
        name: str,
        *,
        block: str,
        layers: Sequence[int],
        widths: Sequence[int],
        stem_channels: int,
        imagenet_stem: bool,
        shortcut: ShortcutKind,
        num_classes: int,
        norm_layer: NormLayer | None,
        fixup: bool,
        in_channels: int,
        zero_init_residual: bool,
    ) -> None:
        super().__init__()
        check_count(name, "num_classes", num_classes)
        check_count(name, "in_channels", in_channels)
        if norm_layer is not None and not callable(norm_layer):
            raise TypeError(
                f"{name}: expected norm_layer to be a callable taking the channel count, or "
                f"None, got {norm_layer!r}"
            )
        if fixup and norm_layer not in (None, nn.BatchNorm2d):
            raise ValueError(
                f"{name}: fixup=True builds a network without normalization; expected norm_layer "
                f"left at its default or None, got {norm_layer!r}"
            )
        if fixup and zero_init_residual:
            raise ValueError(
                f"{name}: zero_init_residual applies to the normalized form; with fixup=True "
                "the last conv of every branch is already zero"
            )
        self.fixup = fixup
        self.in_channels = in_channels
        self.zero_init_residual = zero_init_residual
        norm = None if fixup else norm_layer
        block_cls = _BLOCKS[(block, fixup)]

        if imagenet_stem:
            self.conv1 = nn.Conv2d(in_channels, stem_channels, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = _conv3x3(in_channels, stem_channels)
        self.bn1: nn.Module | None = None if fixup else _norm(norm, stem_channels)
        self.bias1: Bias | None = Bias() if fixup else None
        self.maxpool: nn.Module = (
            nn.MaxPool2d(3, stride=2, padding=1) if imagenet_stem else nn.Identity()
        )

        self.stage_names: list[str] = []
        channels = stem_channels
        for i, (num_blocks, planes) in enumerate(zip(layers, widths)):
            blocks: list[nn.Module] = []
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                kwargs: dict[str, Any] = {"shortcut": shortcut}
                if not fixup:
                    kwargs["norm_layer"] = norm
                blocks.append(block_cls(channels, planes, stride, **kwargs))
                channels = planes * block_cls.expansion
            stage_name = f"layer{i + 1}"
            self.add_module(stage_name, nn.Sequential(*blocks))
            self.stage_names.append(stage_name)
        self.num_features = channels
        self.num_blocks = sum(layers)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.bias2: Bias | None = Bias() if fixup else None
        self.fc = nn.Linear(channels, num_classes)
        self._name = name

        if zero_init_residual:
            for blk in self.blocks():
                last = blk.last_norm() if isinstance(blk, (BasicBlock, Bottleneck)) else None
                if not isinstance(getattr(last, "weight", None), Tensor):
                    raise ValueError(
                        f"{name}: zero_init_residual needs a norm layer with a learnable weight "
                        f"(affine), got {type(last).__name__} without one"
                    )
        self.reset_parameters()

    def blocks(self) -> Iterator[_ResidualBlock]:
        """The residual blocks, in forward order."""
        for stage_name in self.stage_names:
            for blk in self.get_submodule(stage_name).children():
                assert isinstance(blk, _ResidualBlock)
                yield blk

    def reset_parameters(self) -> None:
        """Re-initialize every parameter (and norm buffer) as described in the class docstring."""
        if self.fixup:
            # PyTorch's default, not He: the official code's stem, kept so that results compare
            # with the paper's.
            self.conv1.reset_parameters()
            for blk in self.blocks():
                if isinstance(blk.downsample, nn.Conv2d):
                    he_normal_fan_out_(blk.downsample)
            fixup_init_(self)
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)
            return
        for mod in self.modules():
            if mod is self:
                continue
            if isinstance(mod, nn.Conv2d):
                he_normal_fan_out_(mod)
            elif isinstance(mod, nn.Linear):
                mod.reset_parameters()
            else:
                reset = getattr(mod, "reset_parameters", None)
                if callable(reset):
                    reset()
        if self.zero_init_residual:
            for blk in self.blocks():
                assert isinstance(blk, (BasicBlock, Bottleneck))
                weight = blk.last_norm().weight
                assert isinstance(weight, Tensor)
                nn.init.zeros_(weight)

    def forward(self, x: Tensor) -> Tensor:
        check_input(self._name, x, (4,), self.in_channels)
        x = self.conv1(x)
        if self.bias1 is not None:
            x = self.bias1(x)
        if self.bn1 is not None:
            x = self.bn1(x)
        x = self.maxpool(F.relu(x))
        for stage_name in self.stage_names:
            x = self.get_submodule(stage_name)(x)
        x = self.avgpool(x).flatten(1)
        if self.bias2 is not None:
            x = self.bias2(x)
        return self.fc(x)


class CifarResNet(_ResNet):
    """CIFAR-style ResNet of depth ``6n + 2`` (He et al. 2016, section 4.2), optionally Fixup.

    ``conv1`` (3x3, ``width`` channels) -> norm (or ``+ bias1`` with Fixup) -> ReLU -> three
    stages ``layer1``..``layer3`` of ``n`` basic blocks, widths ``(w, 2w, 4w)``, the first block
    of stages 2 and 3 with stride 2 and a zero-pad shortcut (:class:`ZeroPadShortcut`) ->
    global average pool -> (``+ bias2`` with Fixup) -> ``fc``. Works on any input size (the pool
    is adaptive); 32x32 is the CIFAR setting.

    Args:
        depth: ``6n + 2`` with ``n >= 1`` (20, 32, 44, 56, 110, 1202, ...); ``L = 3n`` blocks.
        num_classes: classifier outputs.
        norm_layer: a callable taking the channel count, or ``None`` (no normalization). With
            ``fixup=True`` it must be left at its default or be ``None``: the Fixup form has no
            norm layers, and any other value raises ``ValueError`` rather than being ignored.
        fixup: build the Fixup form (:class:`FixupBasicBlock`, Fixup init).
        in_channels: input channels.
        width: the first stage's width ``w`` (stages ``w, 2w, 4w``), or the three stage widths;
            the zero-pad shortcut handles any non-decreasing sequence.
        zero_init_residual: zero each branch's last norm weight (normalized form only).

    Init: see the module docstring; with Fixup, the ``conv1`` of every block is He ``fan_out``
    times ``L ** -0.5``, every block's ``conv2`` and the classifier are 0, and the stem keeps
    PyTorch's default init.

    Example::

        >>> import torch
        >>> model = CifarResNet(20, fixup=True)
        >>> model.num_blocks
        9
        >>> model(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        depth: int,
        *,
        num_classes: int = 10,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        fixup: bool = False,
        in_channels: int = 3,
        width: int | Sequence[int] = 16,
        zero_init_residual: bool = False,
    ) -> None:
        name = "CifarResNet"
        if isinstance(depth, bool) or not isinstance(depth, int):
            raise TypeError(f"{name}: expected depth to be an int, got {depth!r}")
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(
                f"{name}: expected depth = 6n + 2 with n >= 1 (8, 14, 20, 32, 44, 56, 110, ...), "
                f"got {depth}"
            )
        n = (depth - 2) // 6
        widths = _stage_widths(name, width, 3)
        super().__init__(
            name,
            block="basic",
            layers=[n, n, n],
            widths=widths,
            stem_channels=widths[0],
            imagenet_stem=False,
            shortcut="zero_pad",
            num_classes=num_classes,
            norm_layer=norm_layer,
            fixup=fixup,
            in_channels=in_channels,
            zero_init_residual=zero_init_residual,
        )
        self.depth = depth


class ImageNetResNet(_ResNet):
    """ImageNet-style ResNet (torchvision's layout), optionally Fixup.

    ``conv1`` (7x7, stride 2) -> norm (or ``+ bias1`` with Fixup) -> ReLU -> 3x3 max-pool
    (stride 2) -> stages ``layer1``.. of basic blocks or bottlenecks, stage ``i`` with
    ``width * 2**i`` planes (times 4 for bottlenecks) and stride 2 from the second stage on ->
    global average pool -> (``+ bias2`` with Fixup) -> ``fc``. Shortcuts that change shape are a
    1x1 strided conv followed by a norm (Fixup: the conv alone, fed ``x + bias1a``).

    Args:
        block: ``"basic"`` (m = 2) or ``"bottleneck"`` (m = 3).
        layers: blocks per stage, e.g. ``[2, 2, 2, 2]`` (ResNet-18), ``[3, 4, 6, 3]``
            (ResNet-34 with basic blocks, ResNet-50 with bottlenecks); ``L = sum(layers)``.
        num_classes, norm_layer, fixup, in_channels, zero_init_residual: as in
            :class:`CifarResNet`.
        width: the stem's and the first stage's planes (64), or one width per stage.

    Init: see the module docstring; with Fixup, branch convs other than the last are He
    ``fan_out`` times ``L ** -0.5`` (basic) or ``L ** -0.25`` (bottleneck), the last conv of each
    branch and the classifier are 0, the 1x1 shortcut convs are He ``fan_out`` unscaled, and the
    stem keeps PyTorch's default init.
    """

    def __init__(
        self,
        block: Literal["basic", "bottleneck"],
        layers: Sequence[int],
        *,
        num_classes: int = 1000,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        fixup: bool = False,
        in_channels: int = 3,
        width: int | Sequence[int] = 64,
        zero_init_residual: bool = False,
    ) -> None:
        name = "ImageNetResNet"
        if block not in ("basic", "bottleneck"):
            raise ValueError(f"{name}: expected block 'basic' or 'bottleneck', got {block!r}")
        layers = list(layers)
        if not layers:
            raise ValueError(f"{name}: expected at least one stage in layers, got []")
        for count in layers:
            check_count(name, "every entry of layers", count)
        widths = _stage_widths(name, width, len(layers))
        super().__init__(
            name,
            block=block,
            layers=layers,
            widths=widths,
            stem_channels=widths[0],
            imagenet_stem=True,
            shortcut="conv",
            num_classes=num_classes,
            norm_layer=norm_layer,
            fixup=fixup,
            in_channels=in_channels,
            zero_init_residual=zero_init_residual,
        )
        self.block = block


def cifar_resnet(
    depth: int,
    *,
    num_classes: int = 10,
    norm_layer: NormLayer | None = nn.BatchNorm2d,
    fixup: bool = False,
    in_channels: int = 3,
    width: int | Sequence[int] = 16,
    zero_init_residual: bool = False,
) -> CifarResNet:
    """A CIFAR-style ResNet of depth ``6n + 2``; see :class:`CifarResNet` for the arguments.

    Example::

        >>> import functools
        >>> gn = cifar_resnet(32, norm_layer=functools.partial(nn.GroupNorm, 8))
        >>> fixup = cifar_resnet(110, fixup=True)  # L = 54 blocks, conv1 scaled by 54 ** -0.5
    """
    return CifarResNet(
        depth,
        num_classes=num_classes,
        norm_layer=norm_layer,
        fixup=fixup,
        in_channels=in_channels,
        width=width,
        zero_init_residual=zero_init_residual,
    )


def imagenet_resnet(
    block: Literal["basic", "bottleneck"],
    layers: Sequence[int],
    *,
    num_classes: int = 1000,
    norm_layer: NormLayer | None = nn.BatchNorm2d,
    fixup: bool = False,
    in_channels: int = 3,
    width: int | Sequence[int] = 64,
    zero_init_residual: bool = False,
) -> ImageNetResNet:
    """An ImageNet-style ResNet; see :class:`ImageNetResNet` for the arguments.

    Example::

        >>> model = imagenet_resnet("bottleneck", [3, 4, 6, 3], fixup=True)  # Fixup ResNet-50
    """
    return ImageNetResNet(
        block,
        layers,
        num_classes=num_classes,
        norm_layer=norm_layer,
        fixup=fixup,
        in_channels=in_channels,
        width=width,
        zero_init_residual=zero_init_residual,
    )


def resnet20(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-20 (3 blocks per stage, L = 9); keyword arguments of :func:`cifar_resnet`."""
    return cifar_resnet(20, **kwargs)


def resnet32(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-32 (5 blocks per stage, L = 15); keyword arguments of :func:`cifar_resnet`."""
    return cifar_resnet(32, **kwargs)


def resnet44(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-44 (7 blocks per stage, L = 21); keyword arguments of :func:`cifar_resnet`."""
    return cifar_resnet(44, **kwargs)


def resnet56(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-56 (9 blocks per stage, L = 27); keyword arguments of :func:`cifar_resnet`."""
    return cifar_resnet(56, **kwargs)


def resnet110(**kwargs: Any) -> CifarResNet:
    """CIFAR ResNet-110 (18 blocks per stage, L = 54); keyword arguments of :func:`cifar_resnet`."""
    return cifar_resnet(110, **kwargs)


def resnet18(**kwargs: Any) -> ImageNetResNet:
    """ImageNet ResNet-18 (basic, [2, 2, 2, 2]); keyword arguments of :func:`imagenet_resnet`."""
    return imagenet_resnet("basic", [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs: Any) -> ImageNetResNet:
    """ImageNet ResNet-34 (basic, [3, 4, 6, 3]); keyword arguments of :func:`imagenet_resnet`."""
    return imagenet_resnet("basic", [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs: Any) -> ImageNetResNet:
    """ImageNet ResNet-50 (bottleneck, [3, 4, 6, 3]); keywords of :func:`imagenet_resnet`."""
    return imagenet_resnet("bottleneck", [3, 4, 6, 3], **kwargs)
