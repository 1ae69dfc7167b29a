"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020, arXiv 2004.02967).

Two normalization-activation layers found by evolutionary search, each replacing a BN-ReLU pair.
B0 divides by the larger of a batch standard deviation and a per-sample "gated" one, so it has
batch statistics (and a running variance for eval); S0 multiplies by a swish-like gate and
divides by a per-(sample, group) standard deviation, so it is batch-independent.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normkit import functional as F
from normkit._checks import (
    check_batch_values,
    check_count,
    check_dtype,
    check_flags,
    check_input,
    check_momentum,
    check_num_groups,
    check_positive,
)
from normkit._fused import _view
from normkit._stats import Synchronized

__all__ = ["EvoNormB0", "EvoNormS0"]


def _check_common(name: str, num_features: int, eps: float, affine: bool, dtype: Any) -> None:
    check_count(name, "num_features", num_features)
    check_positive(name, "eps", eps)
    check_flags(name, affine=affine)
    check_dtype(name, dtype)


def _make_parameters(
    layer: nn.Module, num_features: int, affine: bool, factory: dict[str, Any]
) -> None:
    """``weight`` and ``bias`` with ``affine``; ``v`` always (it belongs to the nonlinearity)."""
    if affine:
        layer.weight = nn.Parameter(torch.empty(num_features, **factory))
        layer.bias = nn.Parameter(torch.empty(num_features, **factory))
    else:
        layer.register_parameter("weight", None)
        layer.register_parameter("bias", None)
    layer.v = nn.Parameter(torch.empty(num_features, **factory))


def _reset_parameters(layer: Any) -> None:
    with torch.no_grad():
        layer.v.fill_(1.0)
        if layer.weight is not None and layer.bias is not None:
            layer.weight.fill_(1.0)
            layer.bias.zero_()


def _affine_out(layer: Any, y: Tensor, input: Tensor) -> Tensor:
    """γ y + β (when there is an affine), in ``input``'s dtype."""
    if layer.weight is not None and layer.bias is not None:
        y = F.apply_scale_shift(y, layer.weight, layer.bias)
    return y.to(input.dtype)


class EvoNormB0(Synchronized, nn.Module):
    r"""EvoNorm-B0 (Liu, Brock, Simonyan & Le, NeurIPS 2020, arXiv 2004.02967), a BN-ReLU
    replacement with batch statistics.

    .. math::
        y = \frac{x}{\max\left(\sqrt{s^2_{N,H,W}(x) + ε},\;
        v ⊙ x + \sqrt{s^2_{H,W}(x) + ε}\right)} ⊙ γ + β

    ``s²_{N,H,W}`` is the per-channel **biased** variance over the batch and the spatial
    positions (training), ``s²_{H,W}`` the per-(sample, channel) biased variance over the spatial
    positions; ε sits inside both square roots. The max is taken elementwise: where ``v·x`` is
    large the per-sample term wins and the layer behaves like an instance-normalized linear unit,
    elsewhere it divides by the batch standard deviation (without centring).

    **Eval**: the batch variance is replaced by ``running_var`` (with
    ``track_running_stats=False``, eval uses the batch's too); the per-sample variance stays per
    sample, so a sample's eval output does not depend on the rest of its batch. There is
    no running mean (B0 never subtracts a mean). ``running_var`` starts at 1 and is updated in
    training as ``nn.BatchNorm``'s: ``running_var = (1 − momentum) · running_var + momentum ·
    s²·M/(M − 1)``, the **unbiased** batch variance over ``M = N·H·W`` values (timm does the
    same; the TF reference stores the biased one, with decay 0.9 = momentum 0.1).
    ``momentum=None`` is the cumulative average (``num_batches_tracked`` counts the batches). A
    batch with one value per channel is refused in training, as by ``nn.BatchNorm``; a channel
    whose batch variance is not finite keeps its running value.

    ``eps = 1e-5`` by default, the TF reference's (tensorflow/tpu ``resnet_model.py``, used for
    the paper's experiments); timm's ``EvoNorm2dB0`` uses ``1e-3``: pass ``eps=1e-3`` to match
    it.

    Parameters and buffers: ``v`` (init 1), ``weight`` γ (init 1) and ``bias`` β (init 0) with
    ``affine=True``, ``running_var`` (float32 unless ``dtype=`` says otherwise) and
    ``num_batches_tracked`` with ``track_running_stats=True``. A timm ``EvoNorm2dB0``
    checkpoint (``weight``, ``bias``, ``v``, ``running_var``) loads strictly: it has no
    ``num_batches_tracked``, which the layer then keeps (as torch's batch norms do with their
    version-1 checkpoints).

    Numerics: variances in float32 for half-precision inputs (the input's dtype otherwise), the
    whole formula in that precision, the output in the input's dtype and memory format.

    Synchronization: with ``sync=True`` (set by :func:`normkit.convert_sync`), the batch variance
    in training is merged over every rank of ``process_group`` (one differentiable all-reduce;
    uneven and empty per-rank batches are weighted by their sizes); a no-op without an
    initialized process group of several ranks.

    Checked against the paper's B0 expression (its pseudocode reads
    ``x / max(batch_std, v·x + instance_std) · γ + β``) and the TF reference: v initialised to
    1, the batch variance in training and a moving average in inference, the same ε in both
    standard deviations, both variances biased.

    Args:
        num_features: C.
        eps: ε (> 0).
        momentum: weight of the new batch variance in the running one, or None (cumulative).
        affine: learn γ and β (``v`` is always learned: it is part of the nonlinearity).
        track_running_stats: keep ``running_var`` for eval; False uses batch statistics in
            eval too.
        device, dtype: factory arguments.

    Shapes:
        - input: ``(N, C, H, W)``.
        - output: same shape, dtype and memory format.

    Example::

        >>> norm = normkit.EvoNormB0(64)
        >>> norm(torch.randn(8, 64, 16, 16)).shape
        torch.Size([8, 64, 16, 16])
    """

    _ranks: tuple[int, ...] = (4,)
    # Version 2 has num_batches_tracked; version-1 checkpoints (timm's) do not.
    _version = 2
    v: nn.Parameter
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        _check_common(name, num_features, eps, affine, dtype)
        check_momentum(name, momentum)
        check_flags(name, track_running_stats=track_running_stats)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        factory = {"device": device, "dtype": dtype}
        _make_parameters(self, num_features, affine, factory)
        if track_running_stats:
            self.register_buffer("running_var", torch.empty(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.zeros((), dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """``running_var`` to 1, ``num_batches_tracked`` to 0."""
        if self.running_var is not None and self.num_batches_tracked is not None:
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset; ``v`` and γ to 1, β to 0."""
        self.reset_running_stats()
        _reset_parameters(self)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )
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
        version = local_metadata.get("version")
        key = prefix + "num_batches_tracked"
        own = self.num_batches_tracked
        if (version is None or version < 2) and own is not None and key not in state_dict:
            usable = own.device.type != "meta"
            state_dict[key] = own if usable else torch.zeros((), dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_input(name, input, self._ranks, self.num_features)
        syncing = self._syncing()
        if syncing:
            fields = {"num_features": self.num_features}
            self._verify_peers(fields, input.device)
        use_batch = self.training or self.running_var is None
        if use_batch and not syncing:
            # Under sync a rank may hold a single value per channel: the global batch decides.
            check_batch_values(name, input)
        m, q = F.sample_moments(input)
        var = self._batch_variance(input, m, q, use_batch, syncing)
        x = input.to(m.dtype)
        batch_std = _view(torch.sqrt(var + self.eps), x)
        gated = x * _view(self.v.to(x.dtype), x) + _view(torch.sqrt(q + self.eps), x)
        return _affine_out(self, x / torch.maximum(batch_std, gated), input)

    def _batch_variance(
        self, x: Tensor, m: Tensor, q: Tensor, use_batch: bool, syncing: bool
    ) -> Tensor:
        """The per-channel variance of the left branch: the batch's (merged over ranks under
        sync, folded into ``running_var`` in training) or the running one."""
        if not use_batch:
            assert self.running_var is not None
            # A copy: a later training forward updates the buffer in place.
            return self.running_var.to(m.dtype, copy=True)
        mean, var = F.merge_sample_moments(m, q)
        # BN's conventions (skips, cumulative factor, Bessel correction, non-finite guard);
        # B0 keeps no running mean.
        return self._merge_and_track(mean, var, x.numel() // x.shape[1], syncing)[1]


class EvoNormS0(nn.Module):
    r"""EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020, arXiv 2004.02967), a batch-independent
    BN-ReLU replacement.

    .. math::
        y = \frac{x ⊙ \mathrm{sigmoid}(v ⊙ x)}{\sqrt{s^2_{H,W,C/G}(x) + ε}} ⊙ γ + β

    ``s²_{H,W,C/G}`` is the biased variance of each (sample, group) over the group's ``C/G``
    consecutive channels and the spatial positions (a group norm's statistic), ε inside the
    square root. The numerator is a swish gate ``x·sigmoid(v·x)`` with a learned per-channel
    slope ``v``. No batch statistics and no running statistics: a sample's output does not
    depend on the rest of the batch, and training equals eval.

    ``num_groups`` G must divide C (32, the paper's and both official codes'). The TF reference
    silently lowers G until it divides C; normkit refuses a G that does not divide C instead, so
    that the group count is the one asked for (use ``math.gcd(C, 32)`` for odd widths).

    ``eps = 1e-5`` (the TF reference's and timm's ``EvoNorm2dS0``).

    Parameters: ``v`` (init 1), ``weight`` γ (init 1) and ``bias`` β (init 0) with
    ``affine=True``; the names of timm's ``EvoNorm2dS0``, whose checkpoints load strictly.

    Numerics: moments in float32 for half-precision inputs (the input's dtype otherwise), the
    whole formula in that precision, the output in the input's dtype and memory format.

    Checked against the paper's S0 expression (its pseudocode reads
    ``x·sigmoid(v·x) / group_std(x) · γ + β`` with ``group_std`` over (H, W, C/G)) and the TF
    reference: v initialised to 1, G = 32, the biased group variance, ε = 1e-5 inside the square
    root.

    Args:
        num_features: C.
        eps: ε (> 0).
        affine: learn γ and β (``v`` is always learned: it is part of the nonlinearity).
        device, dtype: factory arguments.
        num_groups: G, dividing C.

    Shapes:
        - input: ``(N, C, H, W)``.
        - output: same shape, dtype and memory format.

    Example::

        >>> norm = normkit.EvoNormS0(64, num_groups=32)
        >>> norm(torch.randn(1, 64, 16, 16)).shape  # a batch of one is fine
        torch.Size([1, 64, 16, 16])
    """

    _ranks: tuple[int, ...] = (4,)
    v: nn.Parameter
    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        _check_common(name, num_features, eps, affine, dtype)
        check_num_groups(name, num_features, num_groups)
        self.num_features = num_features
        self.eps = eps
        self.affine = bool(affine)
        self.num_groups = num_groups
        _make_parameters(self, num_features, affine, {"device": device, "dtype": dtype})
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``v`` and γ to 1, β to 0."""
        _reset_parameters(self)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
            f"affine={self.affine}"
        )

    def forward(self, input: Tensor) -> Tensor:
        check_input(type(self).__name__, input, self._ranks, self.num_features)
        m, q = F.sample_moments(input)
        # The group variance from per-channel moments (a group norm's statistic of x itself).
        _, gvar = F.group_moments(m, q, m.new_ones(()), m.new_zeros(()), self.num_groups)
        n, c, g = input.shape[0], self.num_features, self.num_groups
        inv_std = torch.rsqrt(gvar + self.eps).unsqueeze(2).expand(n, g, c // g).reshape(n, c)
        x = input.to(m.dtype)
        gated = x * torch.sigmoid(x * _view(self.v.to(x.dtype), x))
        return _affine_out(self, gated * _view(inv_std, x), input)
