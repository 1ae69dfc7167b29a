"""Group Normalization (Wu & He, ECCV 2018, arXiv 1803.08494) with the channel count first.

``torch.nn.GroupNorm`` takes ``(num_groups, num_channels)``, so it cannot be passed as a
``norm_layer=`` callable that torchvision- and timm-style models call with the channel count
alone. :class:`GroupNorm` is that layer with the arguments in normkit's order, and nothing else
changed: it subclasses ``nn.GroupNorm``, so checkpoints, ``isinstance`` checks and the tools that
look for group norms (``bn_param_groups``, ``freeze_norm(include_groupnorm=True)``) keep working.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from normkit._checks import (
    check_count,
    check_dtype,
    check_flags,
    check_input,
    check_num_groups,
    check_positive,
)

__all__ = ["GroupNorm"]

_HALF = (torch.float16, torch.bfloat16)


class GroupNorm(nn.GroupNorm):
    r"""Group normalization, ``GroupNorm(num_features, num_groups=32)``: channel count first.

    For each sample ``n`` and each group ``g`` of ``C / G`` consecutive channels,

    .. math::
        y = \frac{x - \mu_{n,g}}{\sqrt{\sigma^2_{n,g} + \epsilon}} \cdot \gamma_c + \beta_c

    where :math:`\mu_{n,g}` and :math:`\sigma^2_{n,g}` are the mean and the **biased** variance
    over the group's channels and every spatial position of sample ``n`` (ε inside the square
    root). ``weight`` (γ) and ``bias`` (β) are per channel, initialised to 1 and 0, as in the paper
    and in ``torch.nn.GroupNorm``. There are no running statistics: training and eval compute the
    same function, and a sample's output never depends on the rest of its batch (so the layer
    needs no synchronization across ranks, and works at batch size 1).

    This is ``torch.nn.GroupNorm(num_groups, num_features, eps, affine)`` with the arguments in
    normkit's order, so that ``GroupNorm`` itself (default 32 groups, the paper's choice), or
    ``functools.partial(GroupNorm, num_groups=8)``, works as a ``norm_layer=`` callable; the
    computation is torch's kernel, unchanged. It subclasses ``nn.GroupNorm``: the parameters are
    ``weight`` and ``bias`` (state dicts of the two classes are interchangeable) and ``num_groups``,
    ``num_channels`` (also readable as ``num_features``), ``eps`` and ``affine`` are torch's
    attributes. Batch-Channel Normalization's channel part (:class:`normkit.BatchChannelNorm2d`)
    is this group norm applied after a batch norm.

    Differences from ``nn.GroupNorm``, all in what it accepts: arguments are checked (a group
    count that does not divide the channels, ``eps <= 0``, a non-bool ``affine``) and wrong input
    (non-float, fewer than 2 dimensions, another channel count) is refused with a ``ValueError``
    or ``TypeError`` naming the layer. An input whose dtype differs from the parameters' gets the
    parameters cast to its dtype (torch's kernel refuses the pair), except float32 parameters
    with a float16/bfloat16 input, which torch's kernel takes as they are (statistics and affine in
    float32). Statistics are computed by the kernel in float32 or wider whatever the input dtype.

    Checked against the paper: the normalization set of a value is its sample and its group of
    C/G consecutive channels over all positions, the variance is biased with ε inside the square
    root, γ and β are per channel, and G = 32 is the paper's default.

    Shapes:
        - input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)`` (any rank of
          2 or more, as torch's layer).
        - output: the input's shape and dtype.

    Example::

        >>> gn = normkit.GroupNorm(64, num_groups=32)
        >>> gn(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        >>> model = normkit.models.resnet50(norm_layer=normkit.GroupNorm)  # torchvision's too
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        check_num_groups(name, num_features, num_groups)
        check_positive(name, "eps", eps)
        check_flags(name, affine=affine)
        check_dtype(name, dtype)
        super().__init__(num_groups, num_features, eps, affine, device=device, dtype=dtype)

    @property
    def num_features(self) -> int:
        """The channel count (``num_channels``), under the name every normkit layer uses."""
        return self.num_channels

    def extra_repr(self) -> str:
        return (
            f"{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, "
            f"affine={self.affine}"
        )

    def forward(self, input: Tensor) -> Tensor:
        # torch's kernel takes any rank from 2 up; the message names the usual ranks.
        rank = input.dim() if isinstance(input, Tensor) else 0
        ranks = tuple(range(2, max(rank, 5) + 1))
        check_input(type(self).__name__, input, ranks, self.num_channels)
        weight: Tensor | None = self.weight
        bias: Tensor | None = self.bias
        # Under torch.fx the input is a Proxy: no dtype to compare, the kernel call is recorded.
        traced = not isinstance(input, Tensor)
        if not traced and input.numel() == self.num_groups:
            # torch's group_norm refuses N · C/G · spatial == 1 (in eval too), with a message
            # that names no layer.
            raise ValueError(
                f"{type(self).__name__}: expected more than 1 value per group over the batch, "
                f"got input of shape {tuple(input.shape)} with {self.num_groups} groups"
            )
        if not traced and weight is not None and bias is not None and weight.dtype != input.dtype:
            mixed = input.dtype in _HALF and weight.dtype == torch.float32
            if not mixed:
                weight, bias = weight.to(input.dtype), bias.to(input.dtype)
        return TF.group_norm(input, self.num_groups, weight, bias, self.eps)
