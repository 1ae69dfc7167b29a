"""Batch-Channel Normalization (Qiao et al. 2019, arXiv 1903.10520).

BCN is a batch part (per-channel normalization and affine, as a batch norm) followed by a
channel part (per-sample, per-group standardization, as a group norm, and an affine). normkit
computes both in closed form from one reduction: per-(sample, channel) moments give the batch
statistics (a Chan merge over the samples) and the group statistics of the batch part's output
(which is an affine map of the input per channel), then one per-(sample, channel) scale and shift
produces the output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit import _fused, kernels
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
from normkit._stats import (
    Synchronized,
    all_reduce_sum_,
    estimate_update_,
    estimate_update_eager_,
    may_be_replayed,
    recomputing,
    replayed_values,
    stash_for_replay,
)

__all__ = ["BatchChannelNorm1d", "BatchChannelNorm2d", "BatchChannelNorm3d"]

_GROUP_AFFINES = ("per_group", "per_channel")


class _BatchChannelNorm(Synchronized, _BatchNorm):
    _ranks: tuple[int, ...] = (4,)
    num_groups: int
    estimate: bool
    estimate_rate: float
    group_affine: str
    group_weight: nn.Parameter | None
    group_bias: nn.Parameter | None
    #: Fused kernels in training (see :mod:`normkit._fused`); False runs the reference path,
    #: the formula written out step by step (for tests and debugging).
    fast = True
    #: While a checkpointed micro-batch forward is recomputed: the estimates it used.
    _replaying: tuple[Tensor, Tensor] | None = None

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
        *,
        estimate: bool = False,
        estimate_rate: float = 0.01,
        group_affine: str = "per_group",
    ) -> None:
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        check_num_groups(name, num_features, num_groups)
        check_positive(name, "eps", eps)
        check_momentum(name, momentum)
        if isinstance(estimate_rate, bool) or not isinstance(estimate_rate, (int, float)):
            raise TypeError(f"{name}: expected estimate_rate to be a float, got {estimate_rate!r}")
        if not 0.0 < float(estimate_rate) <= 1.0:
            raise ValueError(
                f"{name}: expected estimate_rate in (0, 1], got {estimate_rate} (a rate of 0 "
                "freezes the estimates, the official code's silent default)"
            )
        if group_affine not in _GROUP_AFFINES:
            raise ValueError(
                f"{name}: expected group_affine in {_GROUP_AFFINES}, got {group_affine!r}"
            )
        check_flags(name, affine=affine, track_running_stats=track_running_stats, estimate=estimate)
        check_dtype(name, dtype)
        if estimate and not track_running_stats:
            raise ValueError(
                f"{name}: expected track_running_stats=True with estimate=True (the estimates "
                "live in the running buffers), got track_running_stats=False"
            )
        self.num_groups = num_groups
        self.estimate = estimate
        self.estimate_rate = float(estimate_rate)
        self.group_affine = group_affine
        factory = {"device": device, "dtype": dtype}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **factory)
        if affine:
            size = num_groups if group_affine == "per_group" else num_features
            self.group_weight = nn.Parameter(torch.empty(size, **factory))
            self.group_bias = nn.Parameter(torch.empty(size, **factory))
        else:
            self.register_parameter("group_weight", None)
            self.register_parameter("group_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Both affines to (1, 0); running statistics (the estimates) to (0, 1)."""
        super().reset_parameters()
        # _BatchNorm.__init__ calls this before the channel-part affine exists.
        group_weight = getattr(self, "group_weight", None)
        group_bias = getattr(self, "group_bias", None)
        if group_weight is not None and group_bias is not None:
            nn.init.ones_(group_weight)
            nn.init.zeros_(group_bias)

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(type(self).__name__, input, self._ranks, self.num_features)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, num_groups={self.num_groups}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, group_affine={self.group_affine!r}"
        )
        if self.estimate:
            s += f", estimate=True, estimate_rate={self.estimate_rate}"
        return s

    def forward(self, input: Tensor) -> Tensor:
        if self.estimate and self.training and not torch.compiler.is_compiling():
            return self._estimate_forward(input)
        return self._forward(input)

    def _estimate_forward(self, input: Tensor) -> Tensor:
        """The micro-batch training forward under activation checkpointing: a recomputation
        (:func:`normkit._stats.recomputing`) replays the first forward, normalizing with the
        estimates that forward used and updating (and all-reducing) nothing; a forward that
        may be recomputed remembers its estimates for that."""
        if recomputing():
            # Nothing remembered: the estimates as the last update left them.
            used = replayed_values(self, input) or self._estimate_copies()
            self._replaying = (used[0], used[1])
            try:
                return self._forward(input)
            finally:
                self._replaying = None
        out = self._forward(input)
        if may_be_replayed():
            # The forward normalized with the estimates after its update: the buffers now.
            stash_for_replay(self, input, self._estimate_copies())
        return out

    def _forward(self, input: Tensor) -> Tensor:
        if kernels.is_enabled():
            out = self._kernel_call(input)
            if out is not None:
                return out
        name = type(self).__name__
        check_input(name, input, self._ranks, self.num_features)
        syncing = self._syncing()
        if syncing:
            fields = {
                "num_features": self.num_features,
                "num_groups": self.num_groups,
                "estimate": int(self.estimate),
            }
            self._verify_peers(fields, input.device)
        if self.training and not self.estimate and not syncing:
            check_batch_values(name, input)
        params = (self.weight, self.bias, self.group_weight, self.group_bias)
        eager_fast = (
            self.fast
            and self.training
            and not syncing
            and input.numel() > 0
            and _fused.fast_paths_apply(input)
        )
        if eager_fast and kernels.applies(input):
            out = self._kernel_forward(input, params)
            if out is not None:
                return out
        if eager_fast and (input.dim() > 2 or input.numel() >= _fused.MOMENT_PATH_MIN_NUMEL):
            # Moments without a graph; the fused function differentiates through them, with
            # the closed-form backward of _moment_backward.
            m, q, centred = _fused.centred_moments(input)
            mean, var = self._batch_statistics(input, m, q, syncing)
            fold = _fused.ClosedFold(
                self._fold if self.estimate else self._fold_batch, self._moment_backward
            )
            return _fused.moment_scale_shift(input, m, q, fold, mean, var, *params, centred=centred)
        m, q = F.sample_moments(input)
        mean, var = self._batch_statistics(input, m, q, syncing)
        scale, shift = self._fold(m, q, mean, var, *params)
        return F.apply_scale_shift(input, scale, shift)

    def _kernel_call(self, x: Tensor) -> Tensor | None:
        """The usual training forward with the kernels on, as one kernel call with only the
        checks the kernel does not make itself (as the batch-norm core's ``_kernel_call``);
        None for anything else, which :meth:`forward`'s full path handles: eval, synchronized
        statistics, tracing, a rank or channel count the layer refuses, a single value per
        channel in the batch mode, a parametrized parameter (absent from the module's
        dictionary). Parameters in another dtype than the input are cast for the call."""
        if not _fused.kernel_call_applies(self, x, one_value_ok=self.estimate):
            return None
        try:
            p = self._parameters
            params = (p["weight"], p["bias"], p["group_weight"], p["group_bias"])
        except KeyError:
            return None
        return self._kernel_forward(x, params)

    def _kernel_forward(self, x: Tensor, params: tuple[Tensor | None, ...]) -> Tensor | None:
        """The training forward as one call of normkit's compiled kernel each way
        (:mod:`normkit.kernels`): moments, the batch part's statistics (and the update of the
        running statistics or of the estimates), the fold and the apply; a closed-form
        backward. None (the PyTorch path runs) for buffers in another dtype than the input, a
        partial, strided or parametrized set of buffers, or an affine pair with one half
        missing."""
        b = self._buffers  # (the lookup of nn.Module's attributes costs more)
        try:
            rm, rv, counts = b["running_mean"], b["running_var"], b["num_batches_tracked"]
        except KeyError:  # a parametrized buffer
            return None
        if not (
            kernels.in_dtype_already(x.dtype, rm, rv)
            and kernels.buffers_ok(rm, rv, counts)
            and kernels.affines_paired(*params)
        ):
            return None
        rate = self.estimate_rate
        fixed = self._fixed_estimates()
        if fixed is not None:
            # The same kernel call (the backward reads what it saves) on copies of the
            # estimates to use, which a rate of 0 leaves as they are, and a scratch counter.
            rm, rv = (t.to(x.dtype, copy=True) for t in fixed)
            counts, rate = torch.zeros((), dtype=torch.long, device=x.device), 0.0
        elif not self._tracking():  # buffers kept but not tracked: none for the kernel
            rm = rv = counts = None
        y: Tensor = kernels.op("bcn_forward")(
            x,
            *kernels.in_dtype(x.dtype, *params),
            rm,
            rv,
            counts,
            self.num_groups,
            self.group_affine == "per_channel",
            self.estimate,
            self.eps,
            rate,
            -1.0 if self.momentum is None else self.momentum,
        )
        return y

    def _fold_batch(
        self, m: Tensor, q: Tensor, _mean: Tensor, _var: Tensor, *params: Any
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_fold` with the batch part's statistics as functions of the moments."""
        mean, var = F.merge_sample_moments(m, q)
        return self._fold(m, q, mean, var, *params)

    def _fold(
        self,
        m: Tensor,
        q: Tensor,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        group_weight: Tensor | None,
        group_bias: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """The per-(sample, channel) scale and shift of BCN, from the input's moments ``m, q``
        and the batch part's ``mean, var``."""
        # Batch part as a per-channel affine x1 = a x + b.
        a = torch.rsqrt(var + self.eps)
        b = -mean * a
        if weight is not None and bias is not None:
            a = a * weight
            b = b * weight + bias

        # Channel part: per-(sample, group) moments of x1 in closed form, then fold everything.
        gmean, gvar = F.group_moments(m, q, a, b, self.num_groups)
        n, c = m.shape
        per_group = c // self.num_groups
        ginv = torch.rsqrt(gvar + self.eps)
        ginv_c = ginv.unsqueeze(2).expand(n, self.num_groups, per_group).reshape(n, c)
        gmean_c = gmean.unsqueeze(2).expand(n, self.num_groups, per_group).reshape(n, c)
        scale = a * ginv_c
        shift = (b - gmean_c) * ginv_c
        if group_weight is not None and group_bias is not None:
            gw, gb = group_weight, group_bias
            if self.group_affine == "per_group":
                gw = gw.repeat_interleave(per_group)
                gb = gb.repeat_interleave(per_group)
            scale = scale * gw
            shift = shift * gw + gb
        return scale, shift

    def _moment_backward(
        self,
        x: Tensor,
        m: Tensor,
        q: Tensor,
        gy: Tensor,
        params: list[Any],
        need_x: bool,
    ) -> tuple[Tensor | None, list[Tensor | None]]:
        """Closed-form gradients of ``y = scale · x + shift`` with :meth:`_fold`'s scale and
        shift, for :func:`normkit._fused.moment_scale_shift` (tested against autograd of the
        reference path to 1e-10 in float64).

        Notation: the batch part ``x1 = a x + b`` per channel (``a = γ_b · invstd``); the
        channel part ``y = γ_g · t · (x1 − μ_ng) + β_g`` with ``t`` the inverse group std;
        per-(n, c) sums over the positions ``A = Σ g`` and ``P = Σ g (x − m)``, and
        ``e = a m + b − μ_ng``. Then ``Σ g x̂1 = t (a P + e A)`` gives the channel-part affine's
        gradients, and the group-norm backward is ``dx1 = α1 g + β1 (x − m) + γ1`` with
        ``α1 = γ_g t``, ``β1 = −t² H2 a``, ``γ1 = −t H1 − t² H2 e`` (``H1``, ``H2`` the group
        means of ``γ_g A`` and ``γ_g Σ g x̂1``). The batch part's per-channel sums of ``dx1``
        and ``dx1 (x − μ)`` follow from ``A``, ``P``, ``q`` and ``m`` in closed form, and give
        its affine's gradients and, with batch statistics, the batch-norm backward. ``dx`` is
        ``α g + β x + γ`` per (n, c): two passes over the activation after one reduction.
        """
        mean, var, weight, bias, group_weight, _group_bias = params
        n, c = m.shape
        groups = self.num_groups
        per = c // groups
        s = x.numel() // (n * c)
        if not self.estimate:
            mean, var = F.merge_sample_moments(m, q)
        invstd = (var + self.eps).rsqrt()
        a = invstd if weight is None else invstd * weight
        b = -mean * a if bias is None else torch.addcmul(bias, mean, a, value=-1)
        plane = (a * m + b).view(n, groups, per)  # mean of x1 on each (n, c) plane
        e = plane - plane.mean(2, keepdim=True)
        a3 = a.view(1, groups, per)
        gvar = (a3.square() * q.view(n, groups, per) + e.square()).mean(2, keepdim=True)
        t = (gvar + self.eps).rsqrt()  # (N, G, 1)
        gw: Tensor | None = None
        if group_weight is not None:
            gw = group_weight.view(1, groups, 1 if self.group_affine == "per_group" else per)
        sum_g, sum_gx = _fused._centred_sums(gy, x, m)
        a_nc, p_nc = sum_g.view(n, groups, per), sum_gx.view(n, groups, per)
        xh = t * (a3 * p_nc + e * a_nc)  # Σ_s g · x̂1
        grads: list[Tensor | None] = [None, None, None, None, None, None]
        if group_weight is not None:
            dims = (0, 2) if self.group_affine == "per_group" else (0,)
            grads[4] = xh.sum(dims).reshape(group_weight.shape)
            grads[5] = a_nc.sum(dims).reshape(group_weight.shape)
        ha, hx = (a_nc, xh) if gw is None else (a_nc * gw, xh * gw)
        k = 1.0 / (s * per)
        h1 = ha.sum(2, keepdim=True).mul_(k)
        t2h2 = hx.sum(2, keepdim=True).mul_(k).mul_(t.square())
        alpha1 = (t if gw is None else t * gw).expand(n, groups, per).reshape(n, c)
        beta1 = (-t2h2 * a3).reshape(n, c)
        gamma1 = (-t * h1 - t2h2 * e).reshape(n, c)
        # Per-(n, c) Σ_s dx1 and Σ_s dx1 (x − μ).
        s1 = alpha1 * sum_g + gamma1 * s
        dev = m - mean
        s2 = alpha1 * sum_gx + beta1 * (q * s) + dev * s1
        t1, t2 = s1.sum(0), s2.sum(0)
        if weight is not None:
            grads[2] = t2 * invstd
            grads[3] = t1
        if not need_x:
            return None, grads
        if self.estimate:  # fixed statistics: dx = a · dx1
            beta, gamma0 = a * beta1, a * gamma1
        else:  # the batch-norm backward, through μ and σ² of the batch
            inv_m = 1.0 / (n * s)
            d2 = t2 * invstd.square() * inv_m
            beta = a * (beta1 - d2)
            gamma0 = a * (gamma1 - t1 * inv_m - d2 * dev)
        alpha = a * alpha1
        return _fused.affine3(gy, x, alpha, beta, gamma0 - beta * m), grads

    def _batch_statistics(
        self, x: Tensor, m: Tensor, q: Tensor, syncing: bool
    ) -> tuple[Tensor, Tensor]:
        """Per-channel mean and variance that the batch part normalizes with."""
        if self.estimate:
            assert self.running_mean is not None and self.running_var is not None
            fixed = self._fixed_estimates()
            if fixed is not None:
                return fixed
            if self.training:
                spatial = math.prod(x.shape[2:])
                return self._update_estimates(m, q, syncing, spatial)
            # Copies (C values each): the next training forward updates the buffers in place,
            # which must not invalidate this forward's graph (micro-batch gradient accumulation
            # runs several forwards before one backward).
            return self.running_mean.clone(), self.running_var.clone()
        if not self.training and self.running_mean is not None:
            assert self.running_var is not None
            return self.running_mean.clone(), self.running_var.clone()
        mean, var = F.merge_sample_moments(m, q)
        count: int | Tensor = x.numel() // x.shape[1]
        return self._merge_and_track(mean, var, count, syncing)

    def _estimate_copies(self) -> tuple[Tensor, Tensor]:
        assert self.running_mean is not None and self.running_var is not None
        return self.running_mean.clone(), self.running_var.clone()

    def _fixed_estimates(self) -> tuple[Tensor, Tensor] | None:
        """In a micro-batch training forward that must not update the estimates, the ones it
        normalizes with: a checkpoint recomputation's (the first forward's), or copies of the
        frozen ones (``track_running_stats`` set to False on the built layer). None otherwise."""
        if not (self.estimate and self.training):
            return None
        if self._replaying is not None:
            return self._replaying
        return None if self.track_running_stats else self._estimate_copies()

    @torch.no_grad()
    def _update_estimates(
        self, m: Tensor, q: Tensor, syncing: bool, spatial: int
    ) -> tuple[Tensor, Tensor]:
        """Update the estimates in place; return their new values (for this forward to use).
        ``spatial`` is the number of values behind each of the ``(N, C)`` moments."""
        # The variance is centred on the previous mean estimate, not on the batch mean, as in
        # the authors' estimated-statistics BN; it is stored biased.
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        old_mean = self.running_mean.to(m.dtype)
        if not syncing:
            if m.shape[0] == 0:
                return self.running_mean.clone(), self.running_var.clone()
            batch_mean = m.mean(dim=0)
            batch_var = (q + (m - old_mean).square()).mean(dim=0)
            present = torch.ones((), dtype=torch.bool, device=m.device)
        else:
            # Sums over every value of every rank, in one all-reduce: each sample's moments
            # weigh by its ``spatial`` values, so ranks with other spatial sizes (multi-scale
            # training) count as one process holding the whole batch would count them.
            sums = torch.stack(
                [
                    torch.full_like(old_mean, float(m.shape[0] * spatial)),
                    m.sum(dim=0) * spatial,
                    (q + (m - old_mean).square()).sum(dim=0) * spatial,
                ]
            ).double()
            all_reduce_sum_(sums, self.process_group, type(self).__name__)
            n = sums[0].clamp_min(1)
            batch_mean, batch_var = (sums[1] / n).to(m.dtype), (sums[2] / n).to(m.dtype)
            present = sums[0][0] > 0
        self.num_batches_tracked.add_(present.to(self.num_batches_tracked.dtype))
        # The opaque op only where a compiler traces; eager code skips its dispatch (as MABN).
        update = estimate_update_ if torch.compiler.is_compiling() else estimate_update_eager_
        new_mean, new_var = update(
            self.running_mean, self.running_var, batch_mean, batch_var, self.estimate_rate, present
        )
        return new_mean, new_var


_BCN_DOC = r"""Batch-Channel Normalization (BCN; Qiao et al. 2019, "Micro-Batch Training with
    Batch-Channel Normalization and Weight Standardization", arXiv 1903.10520).

    .. math::
        x_1 = γ_b ⊙ (x − μ) / \sqrt{σ^2 + ε} + β_b \quad\text{(batch part, per channel)}

        y = γ_g ⊙ (x_1 − μ_{n,g}(x_1)) / \sqrt{σ^2_{n,g}(x_1) + ε} + β_g
        \quad\text{(channel part, per sample and group)}

    The batch part keeps ``nn.BatchNorm``'s names (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``) so a BN checkpoint loads into it. The channel part's
    affine is ``group_weight``, ``group_bias``: one value per group, shape ``(G,)``, as the
    official code (``group_affine="per_group"``, default), or one per channel, shape ``(C,)``,
    as a standard group norm (``group_affine="per_channel"``). Group variances are biased.

    **Large-batch mode** (``estimate=False``): the batch part is a batch norm: biased batch
    statistics in training, running statistics in eval, updated as
    ``running = (1 − momentum) · running + momentum · stat`` with the variance stored unbiased
    (``momentum=None``: cumulative average).

    **Micro-batch mode** (``estimate=True``): the batch part normalizes with *estimated*
    statistics in training and in eval. In training, before normalizing, the estimates are
    updated without gradient at rate ``r = estimate_rate``:

    .. math::
        m = \mathrm{mean}_{N,*}(x),\quad v = \mathrm{mean}_{N,*}((x − \hat μ_{old})^2),\quad
        \hat μ ← (1 − r)\hat μ + r m,\quad \hat σ^2 ← (1 − r)\hat σ^2 + r v

    The variance is centred on the previous mean estimate and stored biased; the estimates live in
    ``running_mean``/``running_var`` (starting at 0 and 1); ``momentum`` is not used. No gradient
    flows through the estimates, and the layer accepts a batch of one. The official code's rate
    is a buffer initialised to 0 that no script sets, which freezes the estimates; normkit
    refuses a rate outside (0, 1].

    Args:
        num_features: C.
        num_groups: G, dividing C (32 in all official code).
        eps: added to both variances (1e-5, as the official code).
        momentum, affine, track_running_stats, device, dtype: as ``nn.BatchNorm2d``; ``affine``
            covers both parts' affines.
        estimate: micro-batch mode with estimated statistics.
        estimate_rate: r in (0, 1].
        group_affine: ``"per_group"`` or ``"per_channel"``.

    Shapes:
        - input: ``(N, C)`` or ``(N, C, L)`` (1d), ``(N, C, H, W)`` (2d), ``(N, C, D, H, W)`` (3d).
        - output: same shape, dtype and memory format.

    Example::

        >>> norm = normkit.BatchChannelNorm2d(64, num_groups=32, estimate=True)
        >>> norm(torch.randn(1, 64, 16, 16)).shape  # a micro-batch of one
        torch.Size([1, 64, 16, 16])
"""


class BatchChannelNorm1d(_BatchChannelNorm):
    __doc__ = _BCN_DOC
    _ranks = (2, 3)


class BatchChannelNorm2d(_BatchChannelNorm):
    __doc__ = _BCN_DOC
    _ranks = (4,)


class BatchChannelNorm3d(_BatchChannelNorm):
    __doc__ = _BCN_DOC
    _ranks = (5,)
