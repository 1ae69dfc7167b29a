"""BN with Enhanced Linear Transformation (BNET; Xu et al., TPAMI 2023, arXiv 2011.14150).

BNET replaces batch norm's per-channel affine with a depthwise ``k × k`` convolution, so each
channel's output mixes its normalized neighbourhood. The normalization is the batch-norm core's
(statistics, running buffers, synchronization, fast paths); this module adds the convolution and
the folds used at inference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from normkit._checks import check_count, check_flags
from normkit.functional import _no_autocast
from normkit.layers.core import DomainIndex, _BatchNormCore

__all__ = ["BNET2d", "CentredDepthwiseConv2d"]


class CentredDepthwiseConv2d(nn.Conv2d):
    """A depthwise convolution of ``x − centre`` (zero padding of ``x − centre``).

    What :meth:`BNET2d.to_conv` returns: BNET's eval-mode function as one ``nn.Conv2d``. The
    per-channel ``centre`` buffer (BNET's running mean) is subtracted before the convolution
    because a zero-padded convolution of ``x`` cannot absorb the normalization's shift
    exactly: the taps that fall outside the image see BNET's zero padding of the *normalized*
    input, which is ``x = μ``, not ``x = 0``.
    """

    centre: Tensor

    def __init__(
        self, channels: int, kernel_size: int, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__(
            channels,
            channels,
            kernel_size,
            padding=kernel_size // 2,
            groups=channels,
            bias=True,
            device=device,
            dtype=dtype,
        )
        self.register_buffer("centre", torch.zeros(channels, device=device, dtype=dtype))

    def forward(self, input: Tensor) -> Tensor:
        return super().forward(input - self.centre.to(input.dtype).reshape(-1, 1, 1))


class BNET2d(_BatchNormCore):
    r"""Batch normalization with an enhanced linear transformation (BNET; Xu et al., TPAMI
    2023): a batch norm without affine followed by a depthwise ``k × k`` convolution with bias.

    .. math::
        \hat x = (x − μ) / \sqrt{σ^2 + ε},\qquad
        y_c = \sum_{i,j} w_{c,i,j}\, \hat x_{c}[h + i − ⌊k/2⌋,\ w + j − ⌊k/2⌋] + b_c

    with zero padding of :math:`\hat x` (``padding = k // 2``, so the output keeps the input's
    size). In training μ and the biased σ² are the batch's (over N, H, W, and over every rank
    after :func:`normkit.convert_sync`); in eval the running statistics, updated as
    ``nn.BatchNorm2d`` does (``running = (1 − momentum) · running + momentum · stat``, the
    variance stored unbiased; ``momentum=None``: cumulative average). The convolution is the
    per-channel affine generalized: ``k = 1`` is exactly a batch norm with
    ``weight = w[:, 0, 0, 0]`` and ``bias = b``.

    Parameters: ``conv_weight`` ``(C, 1, k, k)`` and ``conv_bias`` ``(C,)`` (not ``weight`` /
    ``bias``, which tools read as a batch norm's per-channel γ and β; here they are None).
    Buffers: ``running_mean``, ``running_var``, ``num_batches_tracked`` as ``nn.BatchNorm2d``.
    Checkpoints of the official ``BNET2d`` (``bnconv.weight``, ``bnconv.bias``) load, and so do
    ``nn.BatchNorm2d`` checkpoints, whose affine becomes the centre tap and the bias (the same
    function).

    **Init:** by default the identity kernel (centre tap 1, others 0) and bias 0, so that the
    layer starts as ``nn.BatchNorm2d(affine=False)``. ``zero_init=True`` zeroes the kernel and
    the bias, the official ImageNet choice (there BNET is the last norm of each bottleneck, so
    each residual branch starts at zero).

    The convolution runs in the input's dtype, outside autocast, as a batch norm's affine
    does. :meth:`to_conv` folds the eval-mode layer into one depthwise convolution;
    :func:`normkit.prepare_for_inference` folds the normalization into a preceding ``nn.Conv2d``
    and leaves a plain depthwise ``nn.Conv2d``. A subclass of torch's ``_BatchNorm``:
    :func:`normkit.freeze_norm` and :func:`normkit.convert_sync` handle it.

    Deviations from the official code (``yuhuixu1993/BNET``): the identity default init (the
    official ImageNet model zeroes the kernel, ``zero_init=True``; its init loop also asserts a
    BN affine that ``affine=False`` leaves None), parameter names (the official ones load), and
    even kernel sizes are refused (``padding = (k − 1) // 2`` would shrink the output).

    Args:
        num_features: C.
        eps, momentum, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        kernel_size: k, odd, at least 1 (3 by default; 3, 5 and 7 in the paper).
        zero_init: start from a zero kernel and bias instead of the identity kernel.

    Shapes:
        - input: ``(N, C, H, W)``.
        - output: the same (channels_last kept).

    Checked against the paper's abstract (the recovery step as a depthwise convolution over
    each neuron's neighbourhood, BN a special case) and the official classification and
    detection code (BN without affine, padding, bias, init); the full TPAMI text was not
    available. Tests: ``tests/test_bnet.py``.

    Example::

        >>> norm = normkit.BNET2d(64, kernel_size=5)
        >>> norm(torch.randn(8, 64, 16, 16)).shape
        torch.Size([8, 64, 16, 16])
        >>> conv = norm.eval().to_conv()  # one depthwise convolution, same eval output
    """

    _ranks = (4,)
    conv_weight: nn.Parameter
    conv_bias: nn.Parameter

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        kernel_size: int = 3,
        zero_init: bool = False,
    ) -> None:
        name = type(self).__name__
        check_count(name, "kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"{name}: expected an odd kernel_size (padding kernel_size // 2 keeps the "
                f"spatial size), got kernel_size={kernel_size}"
            )
        check_flags(name, zero_init=zero_init)
        self.kernel_size = kernel_size
        self.zero_init = bool(zero_init)
        super().__init__(
            num_features,
            1,
            eps,
            momentum,
            False,
            track_running_stats,
            device,
            dtype,
            domain_affine=False,
            domain_std=0.0,
        )
        factory = {"device": device, "dtype": dtype}
        shape = (num_features, 1, kernel_size, kernel_size)
        self.conv_weight = nn.Parameter(torch.empty(shape, **factory))
        self.conv_bias = nn.Parameter(torch.empty(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Running statistics to (0, 1); the identity kernel and bias 0 (zeros with
        ``zero_init``)."""
        super().reset_parameters()
        # _BatchNorm.__init__ calls this before the convolution exists.
        weight = getattr(self, "conv_weight", None)
        bias = getattr(self, "conv_bias", None)
        if weight is None or bias is None:
            return
        with torch.no_grad():
            weight.zero_()
            bias.zero_()
            if not self.zero_init:
                centre = self.kernel_size // 2
                weight[:, :, centre, centre] = 1.0

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"track_running_stats={self.track_running_stats}, kernel_size={self.kernel_size}"
        )
        if self.zero_init:
            s += ", zero_init=True"
        return s + self._sync_repr()

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
        # The official layout (a ``bnconv`` submodule) and a batch norm's affine, which is the
        # k = 1 case of the convolution: its centre tap and bias.
        for official, own in (("bnconv.weight", "conv_weight"), ("bnconv.bias", "conv_bias")):
            if prefix + official in state_dict and prefix + own not in state_dict:
                state_dict[prefix + own] = state_dict.pop(prefix + official)
        w, b = state_dict.get(prefix + "weight"), state_dict.get(prefix + "bias")
        has_conv = prefix + "conv_weight" in state_dict
        c, k = self.num_features, self.kernel_size
        if not has_conv and isinstance(w, Tensor) and isinstance(b, Tensor) and w.shape == (c,):
            kernel = w.new_zeros(c, 1, k, k)
            kernel[:, 0, k // 2, k // 2] = w
            state_dict[prefix + "conv_weight"] = kernel
            state_dict[prefix + "conv_bias"] = b
            del state_dict[prefix + "weight"], state_dict[prefix + "bias"]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor, domain: DomainIndex | None = None) -> Tensor:
        normalized = super().forward(input)
        return self._depthwise(normalized)

    def _depthwise(self, x: Tensor) -> Tensor:
        weight = self.conv_weight.to(x.dtype)
        bias = self.conv_bias.to(x.dtype)
        if x.shape[2] == 0 or x.shape[3] == 0:
            # conv2d refuses an image without positions (its padded size is below the kernel);
            # there is nothing to compute, and the parameters stay in the graph.
            centre = self.kernel_size // 2
            tap = weight[:, 0, centre, centre].reshape(-1, 1, 1)
            return x * tap + bias.reshape(-1, 1, 1)
        with _no_autocast(x):
            return TF.conv2d(x, weight, bias, padding=self.kernel_size // 2, groups=x.shape[1])

    def _eval_statistics(self, what: str) -> tuple[Tensor, Tensor]:
        if self.running_mean is None or self.running_var is None:
            raise ValueError(
                f"{type(self).__name__}: expected running statistics to build {what}, got a "
                "layer with track_running_stats=False (it normalizes with batch statistics in "
                "eval too, which no convolution computes)"
            )
        return self.running_mean, self.running_var

    @torch.no_grad()
    def depthwise_conv(self) -> nn.Conv2d:
        """The convolution part alone, as a plain depthwise ``nn.Conv2d`` (weights copied,
        ``requires_grad`` kept): the layer's output is ``depthwise_conv()(x̂)``."""
        c, k = self.num_features, self.kernel_size
        weight = self.conv_weight
        conv = nn.Conv2d(
            c, c, k, padding=k // 2, groups=c, device=weight.device, dtype=weight.dtype
        )
        assert conv.bias is not None
        conv.weight.copy_(weight)
        conv.bias.copy_(self.conv_bias)
        conv.weight.requires_grad_(weight.requires_grad)
        conv.bias.requires_grad_(self.conv_bias.requires_grad)
        return conv

    @torch.no_grad()
    def to_conv(self) -> CentredDepthwiseConv2d:
        """The eval-mode layer as one depthwise convolution, equal on every position.

        The normalization's scale ``1/sqrt(running_var + eps)`` is folded into the kernel and
        the running mean becomes the convolution's ``centre`` (see
        :class:`CentredDepthwiseConv2d`): ``y = conv_{w · s}(x − μ) + b``, which is exact at the
        border too, where a plain zero-padded convolution could not be.

        Raises:
            ValueError: the layer has no running statistics (``track_running_stats=False``).
        """
        mean, var = self._eval_statistics("a folded convolution")
        scale, _ = self._fold(mean, var, 0, *self._affines())
        weight = self.conv_weight
        conv = CentredDepthwiseConv2d(
            self.num_features, self.kernel_size, device=weight.device, dtype=weight.dtype
        )
        assert conv.bias is not None
        conv.weight.copy_(weight * scale.to(weight.dtype).reshape(-1, 1, 1, 1))
        conv.bias.copy_(self.conv_bias)
        conv.centre.copy_(mean)
        return conv.train(False)
