"""Batch Group Normalization (Zhou et al. 2020, arXiv 2012.02782).

BGN takes its statistics over the batch *and* a group of channels: the (C, H, W) values of each
sample are split into G groups of C/G consecutive channels (with all their spatial positions), and
each group is normalized with the mean and variance over every sample's values in it. G sets how
many values a statistic sees, between batch norm (G = C) and, for a batch of one, group norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from normkit import functional as F
from normkit._checks import (
    check_count,
    check_dtype,
    check_flags,
    check_input,
    check_momentum,
    check_num_groups,
    check_positive,
)
from normkit._stats import Synchronized

__all__ = ["BatchGroupNorm2d"]


class BatchGroupNorm2d(Synchronized, _BatchNorm):
    r"""Batch Group Normalization (BGN; Zhou et al. 2020, arXiv 2012.02782) [experimental].

    The channels are split into G groups of ``C/G`` consecutive channels; group g holds channels
    ``g·C/G … (g+1)·C/G − 1`` at every spatial position. In training, each group is normalized
    with the mean and biased variance of all its values over the batch, ``N · C/G · H · W`` of
    them, and each channel gets its own affine:

    .. math::
        μ_g = \mathrm{mean}_{n,\ c ∈ g,\ h,\ w}(x), \qquad
        σ^2_g = \mathrm{mean}_{n,\ c ∈ g,\ h,\ w}\big((x − μ_g)^2\big)

        y_{n,c,h,w} = γ_c \frac{x_{n,c,h,w} − μ_{g(c)}}{\sqrt{σ^2_{g(c)} + ε}} + β_c

    In eval the running group statistics replace μ_g and σ²_g. G = C is ``nn.BatchNorm2d``;
    a training batch of one sample is ``nn.GroupNorm(G, C)``; G = 1 normalizes each batch as one
    group. There are no parameters beyond a batch norm's.

    Running statistics follow ``nn.BatchNorm``: ``running_mean`` and ``running_var`` hold one
    value per *group*, shape ``(G,)``;
    ``running = (1 − momentum) · running + momentum · stat`` with the variance stored unbiased
    (``σ²_g · M/(M − 1)``, ``M = N · C/G · H · W``), ``momentum=None`` the cumulative average.
    ε is added to the variance inside the square root. With ``track_running_stats=False`` batch
    statistics are used in eval too. Training needs more than one value per group (torch's batch
    norm asks for more than one per channel): a batch of one 1×1 map is accepted when
    ``C/G > 1``.

    Synchronization: with :func:`normkit.convert_sync` the group statistics are taken over the
    batch of every rank. :func:`normkit.freeze_norm` freezes the layer to its eval form.

    **What was checked, and what was not.** The paper's abstract (arXiv 2012.02782) says BGN
    brings the channel, height and width dimensions into BN's statistics with GN's group
    technique, a hyper-parameter G controlling how many feature instances each statistic uses,
    and adds no trainable parameters. The paper's method section could not be read here, so
    these points are normkit's reading, **unverified**: groups of consecutive whole channels
    (merging (C, H, W) and splitting into G parts gives exactly these when G divides C; the
    layer requires G | C and does not allow G > C, which would split channels), the per-channel
    affine, biased variance with ε inside the square root, and running group statistics for
    eval with PyTorch's momentum convention. The default G = 32 follows GN and BCN; the paper
    tunes G per batch size (fewer, larger groups for small batches).

    Args:
        num_features: C.
        num_groups: G, dividing C.
        eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.

    Shapes:
        - input: ``(N, C, H, W)``.
        - output: same shape, dtype and memory format.

    Example::

        >>> norm = normkit.BatchGroupNorm2d(64, num_groups=16)
        >>> norm(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        >>> norm.running_mean.shape
        torch.Size([16])
    """

    _ranks: tuple[int, ...] = (4,)
    num_groups: int

    def __init__(
        self,
        num_features: int,
        num_groups: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        check_num_groups(name, num_features, num_groups)
        check_positive(name, "eps", eps)
        check_momentum(name, momentum)
        check_flags(name, affine=affine, track_running_stats=track_running_stats)
        check_dtype(name, dtype)
        self.num_groups = num_groups
        factory = {"device": device, "dtype": dtype}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_groups, **factory))
            self.register_buffer("running_var", torch.ones(num_groups, **factory))

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(type(self).__name__, input, self._ranks, self.num_features)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
        )
        return s + self._sync_repr()

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_input(name, input, self._ranks, self.num_features)
        syncing = self._syncing()
        if syncing:
            fields = {"num_features": self.num_features, "num_groups": self.num_groups}
            self._verify_peers(fields, input.device)
        n, c = input.shape[0], input.shape[1]
        per_group = c // self.num_groups * math.prod(input.shape[2:])  # C/G · H · W
        if self.training and not syncing and n * per_group == 1:
            raise ValueError(
                f"{name}: expected more than 1 value per group when training, got input of "
                f"shape {tuple(input.shape)} with num_groups={self.num_groups}; use a larger "
                "batch or fewer groups, or eval mode"
            )
        mean, var = self._group_statistics(input, n, per_group, syncing)
        # One statistic per group, repeated for its C/G channels.
        g, k = self.num_groups, c // self.num_groups
        mean, var = (s.unsqueeze(1).expand(g, k).reshape(c) for s in (mean, var))
        scale = torch.rsqrt(var + self.eps)
        shift = -mean * scale
        if self.weight is not None and self.bias is not None:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        return F.apply_scale_shift(input, scale, shift)

    def _group_statistics(
        self, x: Tensor, n: int, per_group: int, syncing: bool
    ) -> tuple[Tensor, Tensor]:
        """``(μ_g, σ²_g)``, shape ``(G,)``: the batch's (merged over ranks under sync, and folded
        into the running buffers) in training, the running ones in eval."""
        if not self.training and self.running_mean is not None and self.running_var is not None:
            # Copies, so that a later training forward's in-place update cannot invalidate
            # this forward's graph.
            return self.running_mean.clone(), self.running_var.clone()
        # (N, C, H, W) -> (N, G, C/G·H·W): each group becomes one "channel" of a batch norm.
        mean, var = F.batch_moments(x.reshape(n, self.num_groups, per_group))
        count: int | Tensor = n * per_group
        return self._merge_and_track(mean, var, count, syncing)
