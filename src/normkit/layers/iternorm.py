"""Iterative Normalization (IterNorm; Huang, Zhou, Zhu, Liu & Shao, CVPR 2019, arXiv 1904.03441).

IterNorm whitens groups of channels: it centres them, estimates their covariance and multiplies
by an approximation of the inverse square root of that covariance, computed with a fixed number
of Newton iterations (matrix products only: no eigendecomposition, no SVD). Gradients are those
of the iterations themselves, by autograd.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from normkit._checks import (
    check_batch_values,
    check_count,
    check_dtype,
    check_flags,
    check_input,
    check_momentum,
    check_positive,
)
from normkit._stats import (
    Synchronized,
    _AllReduceSum,
    _merge_dtype,
    ema_factor,
)
from normkit.functional import _no_autocast, stats_dtype

__all__ = ["IterNorm1d", "IterNorm2d", "iterative_whitening_matrix"]

#: Channels per group of the paper's experiments (and of the official code's scripts).
PAPER_GROUP_SIZE = 64


def iterative_whitening_matrix(sigma: Tensor, iterations: int) -> Tensor:
    """``Σ^{-1/2}`` of each ``(d, d)`` matrix of ``sigma`` by ``iterations`` Newton steps.

    ``Σ_N = Σ / tr(Σ)``, ``P_0 = I``, ``P_k = ½ (3 P_{k−1} − P_{k−1}^3 Σ_N)`` and the result is
    ``P_T / sqrt(tr Σ)`` (Huang et al., Algorithm 1). Normalizing by the trace puts the
    eigenvalues of ``Σ_N`` in (0, 1], where the iteration converges for a positive definite
    ``Σ``; each step is three matrix products.

    Args:
        sigma: ``(G, d, d)`` symmetric positive definite matrices.
        iterations: T >= 0.
    """
    d = sigma.shape[-1]
    eye = torch.eye(d, dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1).reshape(-1, 1, 1)
    sigma_n = sigma / trace
    p = eye
    for _ in range(iterations):
        p = torch.baddbmm(p, torch.matrix_power(p, 3), sigma_n, beta=1.5, alpha=-0.5)
    return p * trace.rsqrt()


class _IterNorm(Synchronized, nn.Module):
    _ranks: tuple[int, ...] = (4,)
    running_mean: Tensor | None
    running_wm: Tensor | None
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
        *,
        group_size: int | None = None,
        T: int = 5,
    ) -> None:
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        if group_size is None:
            # The official code halves its channels per group until they divide the channel
            # count; from 64 that lands on gcd(C, 64).
            group_size = math.gcd(num_features, PAPER_GROUP_SIZE)
        check_count(name, "group_size", group_size)
        if num_features % group_size != 0:
            raise ValueError(
                f"{name}: expected group_size to divide num_features={num_features}, got "
                f"group_size={group_size}"
            )
        check_count(name, "T", T)
        check_positive(name, "eps", eps)
        check_momentum(name, momentum)
        check_flags(name, affine=affine, track_running_stats=track_running_stats)
        check_dtype(name, dtype)
        super().__init__()
        self.num_features = num_features
        self.group_size = group_size
        self.num_groups = num_features // group_size
        self.T = T
        self.eps = float(eps)
        self.momentum = momentum
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            shape = (self.num_groups, group_size, group_size)
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_wm", torch.zeros(shape, **factory))
            self.register_buffer(
                "num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device)
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_wm", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """Running mean to 0, running whitening matrices to the identity, count to 0."""
        if self.running_mean is None or self.running_wm is None:
            return
        assert self.num_batches_tracked is not None
        with torch.no_grad():
            self.running_mean.zero_()
            self.running_wm.copy_(torch.eye(self.group_size).expand_as(self.running_wm))
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        """Running statistics reset; affine to (1, 0)."""
        self.reset_running_stats()
        if self.weight is not None and self.bias is not None:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, group_size={self.group_size}, T={self.T}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}"
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
        # The official code stores the affine as (1, C, 1, 1) or (1, C), the mean as (G, d, 1),
        # and no count: its checkpoints load, the layer keeping its own count.
        c = self.num_features
        for key in ("weight", "bias", "running_mean"):
            t = state_dict.get(prefix + key)
            if isinstance(t, Tensor) and t.numel() == c and t.dim() != 1:
                state_dict[prefix + key] = t.reshape(c)
        count = prefix + "num_batches_tracked"
        own = self.num_batches_tracked
        if prefix + "running_wm" in state_dict and count not in state_dict and own is not None:
            state_dict[count] = own if own.device.type != "meta" else torch.tensor(0)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_input(name, input, self._ranks, self.num_features)
        syncing = self._syncing()
        if syncing:
            fields = {"num_features": self.num_features, "group_size": self.group_size}
            self._verify_peers({**fields, "T": self.T}, input.device)
        if (self.training or self.running_mean is None) and not syncing:
            # Batch statistics (training, or eval without running ones): more than one value
            # per channel, as nn.BatchNorm asks.
            check_batch_values(name, input)
        # Autocast would run the matrix products in half precision; the whitening needs float32.
        with _no_autocast(input):
            x = input.to(stats_dtype(input.dtype))
            if self.training or self.running_mean is None:
                mean, wm = self._batch_whitening(x, syncing)
            else:
                assert self.running_wm is not None
                # Copies: a later training forward updates the buffers in place, which must not
                # invalidate this forward's graph.
                mean = self.running_mean.to(x.dtype, copy=True)
                wm = self.running_wm.to(x.dtype, copy=True)
            matrix, shift = self._fold(mean, wm)
            out = self._transform(x, matrix, shift)
        channels_last = torch.channels_last
        if input.dim() == 4 and input.is_contiguous(memory_format=channels_last):
            out = out.contiguous(memory_format=channels_last)  # a no-op for a contiguous input
        return out.to(input.dtype)

    def _grouped(self, x: Tensor) -> Tensor:
        """``x`` as ``(G, d, M)``: each group's channels over the batch and positions."""
        n, values = x.shape[0], math.prod(x.shape[2:])
        return x.transpose(0, 1).reshape(self.num_groups, self.group_size, n * values)

    def _batch_whitening(self, x: Tensor, syncing: bool) -> tuple[Tensor, Tensor]:
        """The batch mean ``(C,)`` and whitening matrices ``(G, d, d)``; in training, the
        running buffers are updated from them."""
        xg = self._grouped(x)
        count: int | Tensor = xg.shape[-1]
        if syncing:
            mean, cov, count = self._synchronized_moments(xg)
        else:
            mean, cov = _group_moments(xg)
        eye = torch.eye(self.group_size, dtype=cov.dtype, device=cov.device)
        wm = iterative_whitening_matrix(cov + self.eps * eye, self.T)
        if self._tracking() and self.running_mean is not None:
            self._update_running(mean, wm, count)
        return mean.reshape(self.num_features), wm

    def _synchronized_moments(self, xg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, covariance and count over every rank: each rank's count, count · mean and
        count · (cov + mean meanᵀ), summed in one differentiable all-reduce (in float64, so the
        recombination ``E[x xᵀ] − μ μᵀ`` does not cancel away float32 digits)."""
        mean, cov = _group_moments(xg)
        g, d = self.num_groups, self.group_size
        wide = _merge_dtype(mean)
        m, s = mean.to(wide), cov.to(wide)
        n = torch.full((1,), float(xg.shape[-1]), dtype=wide, device=xg.device)
        second = s + m.unsqueeze(2) * m.unsqueeze(1)
        packed = torch.cat([n, (n * m).reshape(-1), (n * second).reshape(-1)])
        total = _AllReduceSum.apply(packed, self.process_group, type(self).__name__)
        count = total[0]
        denom = count.clamp_min(1)
        g_mean = total[1 : 1 + g * d].reshape(g, d) / denom
        g_second = total[1 + g * d :].reshape(g, d, d) / denom
        g_cov = g_second - g_mean.unsqueeze(2) * g_mean.unsqueeze(1)
        return g_mean.to(mean.dtype), g_cov.to(cov.dtype), count

    @torch.no_grad()
    def _update_running(self, mean: Tensor, wm: Tensor, count: int | Tensor) -> None:
        assert self.running_mean is not None and self.running_wm is not None
        assert self.num_batches_tracked is not None
        # A batch of at most one value per channel has no covariance: the buffers stay.
        if isinstance(count, int):
            if count <= 1:
                return
            present = torch.ones((), dtype=torch.bool, device=mean.device)
        else:
            present = count > 1
        self.num_batches_tracked.add_(present.to(self.num_batches_tracked.dtype))
        factor = ema_factor(self.momentum, self.num_batches_tracked, self.running_wm.dtype)
        old_mean = self.running_mean.view(self.num_groups, self.group_size)
        new_mean = torch.lerp(old_mean, mean.detach().to(old_mean.dtype), factor)
        new_wm = torch.lerp(self.running_wm, wm.detach().to(self.running_wm.dtype), factor)
        # Whitening couples the channels of a group: a group with any non-finite statistic
        # (after rounding to the buffers' dtype) keeps all of its running values.
        keep = present & torch.isfinite(new_mean).all(1) & torch.isfinite(new_wm).flatten(1).all(1)
        old_mean.copy_(torch.where(keep.unsqueeze(1), new_mean, old_mean))
        self.running_wm.copy_(torch.where(keep.reshape(-1, 1, 1), new_wm, self.running_wm))

    def _fold(self, mean: Tensor, wm: Tensor) -> tuple[Tensor, Tensor]:
        """Whitening and affine as one map per group, ``y = A x + b``: ``A = diag(γ) W``
        ``(G, d, d)`` and ``b = β − A μ`` ``(C,)``."""
        g, d = self.num_groups, self.group_size
        matrix = wm
        shift = -(wm @ mean.reshape(g, d, 1)).reshape(self.num_features)
        if self.weight is not None and self.bias is not None:
            matrix = matrix * self.weight.reshape(g, d, 1)
            shift = shift * self.weight + self.bias
        return matrix, shift

    def _transform(self, x: Tensor, matrix: Tensor, shift: Tensor) -> Tensor:
        g, d = self.num_groups, self.group_size
        n, values = x.shape[0], math.prod(x.shape[2:])
        xg = x.reshape(n, g, d, values)
        out = torch.matmul(matrix.to(x.dtype), xg) + shift.to(x.dtype).reshape(1, g, d, 1)
        return out.reshape(x.shape)


def _group_moments(xg: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group mean ``(G, d)`` and biased covariance ``(G, d, d)`` of ``xg`` ``(G, d, M)``.

    An empty batch gives zeros (in the graph), not NaN.
    """
    values = max(xg.shape[-1], 1)
    mean = xg.sum(-1) / values
    centred = xg - mean.unsqueeze(-1)
    cov = centred @ centred.transpose(1, 2) / values
    return mean, cov


_ITERNORM_DOC = r"""Iterative Normalization (IterNorm; Huang et al., CVPR 2019): group whitening
    by Newton iterations.

    The ``C`` channels form ``G = C / d`` groups of ``d = group_size`` consecutive channels. In
    training, for each group, over the ``M`` values of the batch (samples and positions):

    .. math::
        X_c = X − μ,\quad Σ = \tfrac1M X_c X_c^T + εI,\quad Σ_N = Σ / \mathrm{tr}(Σ),

        P_0 = I,\quad P_k = \tfrac12 (3 P_{k−1} − P_{k−1}^3 Σ_N)\ (k = 1 … T),\quad
        W = P_T / \sqrt{\mathrm{tr}(Σ)} ≈ Σ^{−1/2},

        y = γ ⊙ (W X_c) + β \quad\text{(γ, β per channel)}

    ε is added to the diagonal of the **biased** covariance (the official code's placement, and
    what makes ``d = 1`` exactly a batch norm: ``W = 1/\sqrt{σ^2 + ε}``). The gradient is that
    of the T iterations, by autograd (the official hand-written backward fails on current
    PyTorch and is not used). Statistics and matrix products run in float32, or float64 for
    float64 input, outside autocast; the output has the input's dtype.

    **Running statistics:** ``running_mean`` ``(C,)`` and the whitening matrices themselves,
    ``running_wm`` ``(G, d, d)``, are exponential averages,
    ``running = (1 − momentum) · running + momentum · batch`` (PyTorch's convention; the
    official code's update is the same), or cumulative averages with ``momentum=None``
    (``num_batches_tracked`` counts the batches). No unbiased correction is applied: the matrix
    averaged is the batch's W. Eval mode uses ``y = γ ⊙ (W_{run}(x − μ_{run})) + β``, which is
    batch independent; with ``track_running_stats=False`` eval uses batch statistics too. A
    batch with a single value per channel is refused in training (no covariance); a group whose
    batch statistics are not finite keeps its running values (whitening mixes the group's
    channels, so a non-finite value spoils the whole group's output).

    **Synchronization** (:func:`normkit.convert_sync`): the per-group counts, sums and
    ``X Xᵀ`` sums of every rank are merged in one differentiable all-reduce, so every rank
    whitens with the same matrix and keeps the same buffers. :func:`normkit.freeze_norm` does
    not apply (IterNorm is not a batch norm); use ``eval()``.

    Deviations from the official code (``huangleiBuaa/IterNorm-pytorch``): parameters and the
    running mean have shape ``(C,)`` (the official ``(1, C, 1, 1)`` / ``(G, d, 1)`` checkpoints
    load, reshaped, the count starting at this layer's own), there is a ``num_batches_tracked``
    count and a ``track_running_stats`` option, and an explicit ``group_size`` must divide
    ``C``, where the official code silently halves it until it does.

    Args:
        num_features: C.
        eps: added to the covariance's diagonal.
        momentum: weight of the new batch in the running averages, or None (cumulative).
        affine: learnable per-channel γ (``weight``) and β (``bias``), initialised to 1 and 0.
        track_running_stats: keep running statistics for eval.
        device, dtype: factory arguments (running buffers get ``dtype`` too, as torch's BN).
        group_size: d, dividing C; default ``gcd(C, 64)``: the paper's 64 channels per group,
            or what the official code falls back to when 64 does not divide C.
        T: Newton iterations (5 in the paper), at least 1.

    Shapes:
        - input: <SHAPES>
        - output: same shape and dtype (channels_last kept).

    Checked against the paper's Algorithm 1 (the covariance with ε on the diagonal, the trace
    normalization, the iteration, the ``1/\sqrt{tr Σ}`` rescaling) and the official PyTorch code
    (grouping, the two running averages and their momentum, eval). Tests:
    ``tests/test_iternorm.py`` (output covariance → I as T grows, ``d = 1`` is BN, eval uses
    the buffers, a float64 formula reference, gradcheck).

    Example::

        >>> norm = normkit.<NAME>(64, group_size=16)
        >>> y = norm(<EXAMPLE>)  # each group of 16 channels has covariance ≈ I
"""


def _doc(name: str, shapes: str, example: str) -> str:
    return (
        _ITERNORM_DOC.replace("<NAME>", name)
        .replace("<SHAPES>", shapes)
        .replace("<EXAMPLE>", example)
    )


class IterNorm1d(_IterNorm):
    __doc__ = _doc("IterNorm1d", "``(N, C)`` or ``(N, C, L)``.", "torch.randn(32, 64)")
    _ranks = (2, 3)


class IterNorm2d(_IterNorm):
    __doc__ = _doc("IterNorm2d", "``(N, C, H, W)``.", "torch.randn(8, 64, 4, 4)")
    _ranks = (4,)
