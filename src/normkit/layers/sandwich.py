"""Sandwich Batch Normalization and its family (Gong et al. 2021, arXiv 2102.11382).

Every layer here is a batch norm whose affine depends on an index ``y_n`` carried by each sample
(a class, a domain, a branch, an architecture choice):

* :class:`CategoricalConditionalBatchNorm` (CCBN): ``γ_{y_n} ⊙ x̂ + β_{y_n}``, shared statistics;
* :class:`SandwichBatchNorm` (SaBN): ``γ_{y_n} ⊙ (γ_sa ⊙ x̂ + β_sa) + β_{y_n}``, statistics shared
  or per index (``split_stats=True``, the SaAuxBN and NAS form);
* :class:`AuxBatchNorm` (AuxBN): ``γ_{y_n} ⊙ x̂_{y_n} + β_{y_n}``, statistics per index;
* :class:`SandwichAdaIN` (SaAdaIN): ``σ_s ⊙ (γ_sa ⊙ IN(x) + β_sa) + μ_s``, per-sample statistics.

All the affines fold into one per-(sample, channel) scale and shift applied in a single pass after
the statistics (``A = γ_{y_n} γ_sa / sqrt(σ² + ε)``, ``B = γ_{y_n} (β_sa − γ_sa μ / sqrt(σ² + ε))
+ β_{y_n}``), which is what the layers compute.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normkit import functional as F
from normkit._checks import (
    check_count,
    check_dtype,
    check_flags,
    check_float_input,
    check_positive,
    check_same_device,
)
from normkit.layers.core import _BatchNormCore

__all__ = [
    "AuxBatchNorm1d",
    "AuxBatchNorm2d",
    "AuxBatchNorm3d",
    "CategoricalConditionalBatchNorm1d",
    "CategoricalConditionalBatchNorm2d",
    "CategoricalConditionalBatchNorm3d",
    "SandwichAdaIN",
    "SandwichBatchNorm1d",
    "SandwichBatchNorm2d",
    "SandwichBatchNorm3d",
]


class _ConditionalBatchNorm(_BatchNormCore):
    """The shared machinery of the conditional layers (see :class:`_BatchNormCore`)."""

    #: Marks the layer for :func:`normkit.condition`, which sets :attr:`context_domain`.
    takes_domain = True


class _Dim1:
    _ranks: tuple[int, ...] = (2, 3)


class _Dim2:
    _ranks: tuple[int, ...] = (4,)


class _Dim3:
    _ranks: tuple[int, ...] = (5,)


_STATS_DOC = r"""
    Statistics: with ``split_stats=False`` (default) one set of batch statistics and running
    statistics is shared by every domain, as a plain batch norm (buffers of shape ``(C,)``). With
    ``split_stats=True`` each domain has its own: in training, the mean and biased variance of
    sample ``n`` are those of the samples of domain ``y_n`` in the batch, and only the running
    statistics of the domains present change (buffers of shape ``(K, C)``; ``num_batches_tracked``
    of shape ``(K,)`` counts, per domain, the batches it appeared in).

    Running statistics: ``running = (1 − momentum) · running + momentum · stat``, with the batch
    variance stored unbiased (``· M / (M − 1)`` for M values per channel, or per domain and
    channel); ``momentum=None`` is the cumulative average. Normalization uses the biased batch
    variance in training and the running statistics in eval (batch statistics when
    ``track_running_stats=False``). Statistics are float32 for half and bfloat16 inputs.
"""

_INDEX_DOC = r"""
    Shapes:
        - input: ``(N, C)`` or ``(N, C, L)`` (1d), ``(N, C, H, W)`` (2d), ``(N, C, D, H, W)`` (3d).
        - domain: a Python ``int`` (the whole batch) or an integer tensor of shape ``(N,)``, one
          index per sample in ``[0, num_domains)``, on any device (it is moved to the input's).
        - output: same shape, dtype and memory format as the input.
"""


class _SandwichBatchNorm(_ConditionalBatchNorm):
    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        split_stats: bool = False,
        domain_std: float = 0.02,
        shared_std: float = 0.0,
    ) -> None:
        super().__init__(
            num_features,
            num_domains,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            split_stats=split_stats,
            domain_affine=True,
            domain_std=domain_std,
            shared_std=shared_std,
        )


_SABN_DOC = (
    r"""Sandwich Batch Normalization (SaBN; Gong et al. 2021, arXiv 2102.11382).

    .. math::
        y_n = γ_{y_n} ⊙ (γ_{sa} ⊙ \hat x_n + β_{sa}) + β_{y_n},
        \qquad \hat x = (x − μ) / \sqrt{σ^2 + ε}

    ``(γ_sa, β_sa)`` is one shared "sandwich" affine, stored as ``weight`` and ``bias`` so that an
    ``nn.BatchNorm`` checkpoint loads into it; ``(γ_k, β_k)`` are K per-domain affines, stored as
    ``domain_weight`` and ``domain_bias`` of shape ``(num_domains, num_features)``.
    ``affine=False`` drops the shared affine (the layer then computes CCBN).
"""
    + _STATS_DOC
    + r"""
    Args:
        num_features: C.
        num_domains: K, the number of indices (classes, domains, branches).
        eps, momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        split_stats: keep batch and running statistics per domain (the NAS and adversarial
            "SaAuxBN" form) instead of shared (the GAN form).
        domain_std: per-domain scales start at N(1, domain_std²) (0.02 in the official code; 0
            gives exactly 1); per-domain shifts start at 0.
        shared_std: the shared scale starts at 1 (``0``, PyTorch's init) or N(1, shared_std²)
            (0.02 reproduces the official GAN runs, whose training script re-initialises it).

    Weight decay: the official adversarial code stores the shared affine as an extra embedding
    row and decays it towards 0 with everything else; normkit keeps it a BN affine, which
    :func:`normkit.bn_param_groups` puts in the no-decay BN groups. Decide explicitly.
"""
    + _INDEX_DOC
    + r"""
    Example::

        >>> norm = normkit.SandwichBatchNorm2d(64, num_domains=3)
        >>> x, domain = torch.randn(8, 64, 16, 16), torch.randint(0, 3, (8,))
        >>> norm(x, domain).shape
        torch.Size([8, 64, 16, 16])
        >>> norm(x, 2).shape  # the whole batch from domain 2
        torch.Size([8, 64, 16, 16])
"""
)


class SandwichBatchNorm1d(_Dim1, _SandwichBatchNorm):
    __doc__ = _SABN_DOC


class SandwichBatchNorm2d(_Dim2, _SandwichBatchNorm):
    __doc__ = _SABN_DOC


class SandwichBatchNorm3d(_Dim3, _SandwichBatchNorm):
    __doc__ = _SABN_DOC


class _CategoricalConditionalBatchNorm(_ConditionalBatchNorm):
    _shows_affine = False

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        split_stats: bool = False,
        domain_std: float = 0.02,
    ) -> None:
        super().__init__(
            num_features,
            num_domains,
            eps,
            momentum,
            False,
            track_running_stats,
            device,
            dtype,
            split_stats=split_stats,
            domain_affine=True,
            domain_std=domain_std,
        )


_CCBN_DOC = (
    r"""Categorical conditional batch normalization (CCBN; de Vries et al. 2017, Miyato &
    Koyama 2018), the baseline of Sandwich BN.

    .. math::
        y_n = γ_{y_n} ⊙ \hat x_n + β_{y_n}

    A batch norm without affine followed by one of K per-domain affines, stored as
    ``domain_weight`` and ``domain_bias`` of shape ``(num_domains, num_features)``. Statistics and
    buffers keep ``nn.BatchNorm``'s names, so a BN checkpoint loads: its statistics into the
    statistics and, since CCBN has no shared affine, its affine into every domain's affine (when
    the checkpoint has no ``domain_weight``), so the loaded layer computes the BN for every index.
"""
    + _STATS_DOC
    + r"""
    Args:
        num_features: C.
        num_domains: K.
        eps, momentum, track_running_stats, device, dtype: as ``nn.BatchNorm2d``.
        split_stats: per-domain statistics (see above).
        domain_std: per-domain scales start at N(1, domain_std²), shifts at 0.
"""
    + _INDEX_DOC
    + r"""
    Example::

        >>> norm = normkit.CategoricalConditionalBatchNorm2d(64, num_domains=10)
        >>> norm(torch.randn(8, 64, 4, 4), torch.randint(0, 10, (8,))).shape
        torch.Size([8, 64, 4, 4])
"""
)


class CategoricalConditionalBatchNorm1d(_Dim1, _CategoricalConditionalBatchNorm):
    __doc__ = _CCBN_DOC


class CategoricalConditionalBatchNorm2d(_Dim2, _CategoricalConditionalBatchNorm):
    __doc__ = _CCBN_DOC


class CategoricalConditionalBatchNorm3d(_Dim3, _CategoricalConditionalBatchNorm):
    __doc__ = _CCBN_DOC


class _AuxBatchNorm(_ConditionalBatchNorm):
    _shows_affine = False
    _shows_split = False

    def __init__(
        self,
        num_features: int,
        num_domains: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        domain_std: float = 0.0,
    ) -> None:
        super().__init__(
            num_features,
            num_domains,
            eps,
            momentum,
            False,
            track_running_stats,
            device,
            dtype,
            split_stats=True,
            domain_affine=affine,
            domain_std=domain_std,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", affine={self.domain_weight is not None}"


_AUXBN_DOC = (
    r"""Auxiliary batch normalization (AuxBN; Xie et al. 2020, as used by Sandwich BN's
    adversarial-training experiments): one complete batch norm per domain.

    .. math::
        y_n = γ_{y_n} ⊙ (x_n − μ_{y_n}) / \sqrt{σ^2_{y_n} + ε} + β_{y_n}

    Each domain has its own statistics and running buffers (shape ``(K, C)``) and, with
    ``affine=True``, its own affine ``domain_weight``, ``domain_bias`` (shape ``(K, C)``),
    initialised like a BN's (1 and 0) unless ``domain_std > 0``. It equals
    ``CategoricalConditionalBatchNorm(split_stats=True)``; the sandwich form with a shared affine
    (SaAuxBN) is ``SandwichBatchNorm(split_stats=True)``.
"""
    + _STATS_DOC
    + _INDEX_DOC
    + r"""
    Example::

        >>> norm = normkit.AuxBatchNorm2d(64, num_domains=2)  # 0: clean, 1: adversarial
        >>> norm(torch.randn(8, 64, 4, 4), 1).shape
        torch.Size([8, 64, 4, 4])
"""
)


class AuxBatchNorm1d(_Dim1, _AuxBatchNorm):
    __doc__ = _AUXBN_DOC


class AuxBatchNorm2d(_Dim2, _AuxBatchNorm):
    __doc__ = _AUXBN_DOC


class AuxBatchNorm3d(_Dim3, _AuxBatchNorm):
    __doc__ = _AUXBN_DOC


class SandwichAdaIN(nn.Module):
    r"""Sandwich adaptive instance normalization (SaAdaIN; Gong et al. 2021, style transfer).

    .. math::
        y_n = σ(s_n) ⊙ (γ_{sa} ⊙ \frac{x_n − μ(x_n)}{\sqrt{σ^2(x_n) + ε}} + β_{sa}) + μ(s_n)

    The content ``x`` is instance-normalized (per sample and channel over the spatial positions),
    then goes through a shared learnable affine ``weight``, ``bias`` (initialised exactly to 1 and
    0, as the official code), then takes the style's per-(sample, channel) standard deviation and
    mean. ``σ(s) = sqrt(var(s) + ε)``. Variances are unbiased by default (the official code's
    ``torch.var``); ``unbiased=False`` uses the biased ones. ``affine=False`` gives plain AdaIN
    (Huang & Belongie 2017). No running statistics.

    Shapes:
        - content: ``(N, C, *spatial)`` with at least one spatial dimension.
        - style: ``(N, C, *spatial')`` or ``(1, C, *spatial')`` (one style for the whole batch).
        - output: the content's shape and dtype.

    Example::

        >>> adain = normkit.SandwichAdaIN(512)
        >>> adain(torch.randn(2, 512, 8, 8), torch.randn(2, 512, 8, 8)).shape
        torch.Size([2, 512, 8, 8])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        unbiased: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        check_positive(name, "eps", eps)
        check_flags(name, affine=affine, unbiased=unbiased)
        check_dtype(name, dtype)
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.unbiased = unbiased
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, unbiased={self.unbiased}"
        )

    def _moments(self, role: str, t: Tensor) -> tuple[Tensor, Tensor]:
        name = type(self).__name__
        check_float_input(name, t)
        if t.dim() < 3 or t.shape[1] != self.num_features:
            raise ValueError(
                f"{name}: expected {role} of shape (N, {self.num_features}, *spatial) with at "
                f"least one spatial dimension, got shape {tuple(t.shape)}"
            )
        # From the shape, not numel() / (N * C), which is 0 for an empty batch (N = 0).
        spatial = 1
        for size in t.shape[2:]:
            spatial *= size
        if self.unbiased and spatial < 2:
            raise ValueError(
                f"{name}: expected at least 2 spatial positions in the {role} for an unbiased "
                f"variance, got shape {tuple(t.shape)}"
            )
        m, q = F.sample_moments(t)
        if self.unbiased:
            q = q * (spatial / (spatial - 1))
        return m, q

    def forward(self, content: Tensor, style: Tensor) -> Tensor:
        cm, cq = self._moments("content", content)
        sm, sq = self._moments("style", style)
        check_same_device(type(self).__name__, "style", style, content)
        if style.shape[0] not in (1, content.shape[0]):
            raise ValueError(
                f"{type(self).__name__}: expected a style batch of 1 or {content.shape[0]} "
                f"(the content's), got {style.shape[0]}"
            )
        s_std = torch.sqrt(sq + self.eps)
        scale = torch.rsqrt(cq + self.eps)
        shift = -cm * scale
        if self.weight is not None and self.bias is not None:
            scale = scale * self.weight
            shift = shift * self.weight + self.bias
        scale, shift = torch.broadcast_tensors(scale * s_std, shift * s_std + sm)
        return F.apply_scale_shift(content, scale, shift)
