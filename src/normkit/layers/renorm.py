"""Batch Renormalization (Ioffe 2017, "Batch Renormalization: Towards Reducing Minibatch
Dependence in Batch-Normalized Models", NeurIPS 2017, arXiv 1702.03275).

A batch norm whose training output is corrected towards what the running statistics would give:
``x̂ = (x − μ_B)/σ_B · r + d`` with ``r`` and ``d`` clipped, batch-dependent and held constant by
backprop. Since ``r`` and ``d`` are per-channel constants of the forward, BRN is a batch norm with
the affine ``(γ r, γ d + β)``: the layers are thin subclasses of the batch-norm core
(:class:`normkit.layers.core._BatchNormCore`) that hand it that affine, and so inherit its
synchronized statistics, fast paths, checkpoint names and ``freeze_norm`` support.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from normkit import _fused
from normkit import functional as F
from normkit._checks import (
    check_count,
    check_flags,
    check_nonnegative,
    check_positive,
)
from normkit._fused import batch_norm_train
from normkit._stats import may_be_replayed, recomputing, replayed_values, stash_for_replay
from normkit.layers.core import DomainIndex, _BatchNormCore

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d"]


class _BatchRenorm(_BatchNormCore):
    _shows_split = False
    #: While a checkpointed training forward is recomputed: the reference it used (``()``
    #: where none was remembered: the buffers' current one), else None.
    _replaying: tuple[Tensor, ...] | None = None
    #: During a training forward that may be recomputed: the reference it stashes.
    _pinned: tuple[Tensor, ...] | None = None
    r_max: float
    d_max: float
    warmup_steps: int
    r_max_steps: int
    d_max_steps: int

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
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        r_max_steps: int = 40000,
        d_max_steps: int = 25000,
    ) -> None:
        name = type(self).__name__
        check_flags(name, track_running_stats=track_running_stats)
        if not track_running_stats:
            raise ValueError(
                f"{name}: expected track_running_stats=True (r and d correct the batch "
                "statistics towards the running ones, which must exist), got "
                "track_running_stats=False; use a batch norm for batch statistics in eval too"
            )
        check_positive(name, "r_max", r_max)
        if not r_max >= 1:
            raise ValueError(
                f"{name}: expected r_max >= 1 (r is clipped to [1/r_max, r_max]), got {r_max}"
            )
        check_nonnegative(name, "d_max", d_max)
        for key, steps in (
            ("warmup_steps", warmup_steps),
            ("r_max_steps", r_max_steps),
            ("d_max_steps", d_max_steps),
        ):
            check_count(name, key, steps, minimum=0)
        for key, steps in (("r_max_steps", r_max_steps), ("d_max_steps", d_max_steps)):
            if steps < warmup_steps:
                raise ValueError(
                    f"{name}: expected {key} >= warmup_steps={warmup_steps} (the limits relax "
                    f"after the warm-up), got {key}={steps}"
                )
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.r_max_steps = r_max_steps
        self.d_max_steps = d_max_steps
        super().__init__(
            num_features,
            1,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            domain_affine=False,
            domain_std=0.0,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}, r_max_steps={self.r_max_steps}, "
            f"d_max_steps={self.d_max_steps}"
        )
        return s + self._sync_repr()

    def forward(self, input: Tensor, domain: DomainIndex | None = None) -> Tensor:
        if not self.training or torch.compiler.is_compiling():
            return super().forward(input)
        # Activation checkpointing runs this forward again inside the backward. The recomputed
        # forward replays the first one: r and d from the reference (running statistics and
        # limits) the first forward read, and no update of the buffers or the step counter.
        if recomputing():
            used = replayed_values(self, input)
            self._replaying = () if used is None else used
            try:
                return super().forward(input)
            finally:
                self._replaying = None
        if not may_be_replayed():
            return super().forward(input)
        reference = self._reference()
        self._pinned = reference
        try:
            out = super().forward(input)
        finally:
            self._pinned = None
        if reference:
            stash_for_replay(self, input, reference)
        return out

    def clip_limits(self) -> tuple[Tensor, Tensor]:
        """The limits ``(r_max(t), d_max(t))`` the next training forward clips ``r`` and ``d`` to,
        as 0-dim tensors, at step ``t = num_batches_tracked``."""
        assert self.num_batches_tracked is not None
        # In the statistics' dtype (float64 layers get float64 limits), at least float32.
        dtype = torch.float32
        if self.running_var is not None and self.running_var.dtype == torch.float64:
            dtype = torch.float64
        t = self.num_batches_tracked.to(dtype)
        return (
            1.0 + (self.r_max - 1.0) * self._ramp(t, self.r_max_steps),
            self.d_max * self._ramp(t, self.d_max_steps),
        )

    def _ramp(self, t: Tensor, end: int) -> Tensor:
        """0 for the steps ``t < warmup_steps``, rising linearly to 1 at ``t = end``, then 1."""
        start = self.warmup_steps - 1  # the last warm-up step, where the ramp is still 0
        return ((t - start) / (end - start)).clamp(0.0, 1.0)

    # A longer tuple than the core's: the core hands params on to _fast and _fold unread.
    def _affines(self) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        """The affines, then in training the renormalization reference: the running mean, the
        running std ``sqrt(running_var + eps)`` and the clip limits, taken before this batch
        updates the buffers (Algorithm 1 computes r and d with the old moving averages)."""
        params = super()._affines()
        if not self._tracking() or self.running_var is None:
            # (track_running_stats set to False on the built layer: a batch norm in training,
            # as torch's, which passes no running statistics then)
            return params
        # (A replay, or a first forward that stashed its reference: that reference.)
        reference = self._replaying or self._pinned or self._reference()
        return (*params, *reference)

    def _reference(self) -> tuple[Tensor, ...]:
        """``(running mean, running std, r limit, d limit)`` as the buffers are now; ``()``
        without running statistics or with their tracking turned off."""
        if not self._tracking() or self.running_mean is None or self.running_var is None:
            return ()
        ref_std = torch.sqrt(self.running_var + self.eps)
        return (self.running_mean.clone(), ref_std, *self.clip_limits())

    def _update_running(self, mean: Tensor, var: Tensor, count: int | Tensor) -> None:
        # A replay (see forward) leaves the running statistics and the step counter alone.
        if self._replaying is None:
            super()._update_running(mean, var, count)

    def _renorm_affine(
        self,
        mean: Tensor,
        var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        reference: Sequence[Any],
    ) -> tuple[Tensor, Tensor]:
        """``(γ r, γ d + β)`` (``(r, d)`` without affine): the affine that turns batch
        normalization with ``mean``, ``var`` into batch renormalization; ``reference`` is the
        tail of :meth:`_affines`."""
        ref_mean, ref_std, r_limit, d_limit = reference
        # r and d are constants of this step (stop_gradient in the paper): backprop sees a
        # batch norm with a fixed affine.
        sigma = torch.sqrt(var.detach() + self.eps)
        r = (sigma / ref_std).clamp(1.0 / r_limit, r_limit)
        d = ((mean.detach() - ref_mean) / ref_std).clamp(-d_limit, d_limit)
        if weight is None or bias is None:
            return r, d
        return weight * r, weight * d + bias

    def _fold(
        self, mean: Tensor, var: Tensor, domain: DomainIndex, *params: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        weight, bias, domain_weight, domain_bias, *reference = params
        if reference:
            weight, bias = self._renorm_affine(mean, var, weight, bias, reference)
        return super()._fold(mean, var, domain, weight, bias, domain_weight, domain_bias)

    def _kernel_call(self, x: Tensor, domain: DomainIndex | None) -> Tensor | None:
        """None: in training r and d are active, and the full path decides (see
        :meth:`_takes_kernel`)."""
        return None

    def _takes_kernel(self, params: tuple[Tensor | None, ...]) -> bool:
        """Not while r and d are active: they depend on the batch statistics, which the kernel
        computes inside."""
        return len(params) <= 4 and super()._takes_kernel(params)

    def _fast_norm_affine(
        self, x: Tensor, domain: DomainIndex, params: tuple[Tensor | None, ...]
    ) -> Tensor:
        """While r and d are active (they depend on the batch statistics, which the closed-form
        function computes inside): the moment-based function with the generic fold for large
        inputs, else ATen's batch norm."""
        if len(params) <= 4:
            return super()._fast_norm_affine(x, domain, params)
        if x.numel() >= _fused.MOMENT_PATH_MIN_NUMEL:
            return self._fast_moment_forward(x, domain, params)
        return self._fast_forward(x, domain, params)

    def _fast_forward(
        self, x: Tensor, domain: DomainIndex, params: tuple[Tensor | None, ...]
    ) -> Tensor:
        """ATen's batch norm without affine, then the renormalizing affine in one pass."""
        weight, bias, _, _, *reference = params
        if not reference:
            return super()._fast_forward(x, domain, params)
        y, mean, var = batch_norm_train(x, None, None, self.eps)
        self._track_whole_batch(mean, var, domain, x)
        scale, shift = self._renorm_affine(mean, var, weight, bias, reference)
        return F.apply_scale_shift(y, scale, shift)


_BRN_DOC = r"""Batch Renormalization (BRN; Ioffe 2017, arXiv 1702.03275).

    In training, with the batch's per-channel mean μ_B and biased variance σ²_B, and the running
    mean μ and running std σ:

    .. math::
        σ_B = \sqrt{σ^2_B + ε}, \qquad σ = \sqrt{\mathrm{running\_var} + ε}

        r = \mathrm{sg}\big(\mathrm{clip}_{[1/r_{max}(t),\ r_{max}(t)]}(σ_B / σ)\big), \qquad
        d = \mathrm{sg}\big(\mathrm{clip}_{[−d_{max}(t),\ d_{max}(t)]}((μ_B − μ) / σ)\big)

        y = γ ⊙ \Big(\frac{x − μ_B}{σ_B} ⊙ r + d\Big) + β

    ``sg`` is stop-gradient: ``r`` and ``d`` are treated as constants by backprop, so the
    training gradient is that of a batch norm with the affine ``(γ r, γ d + β)``. In eval the
    layer is a plain batch norm with the running statistics, ``y = γ ⊙ (x − μ)/σ + β``, which
    is what training with unclipped ``r`` and ``d`` would compute.

    **Running statistics** follow ``nn.BatchNorm``: after ``r`` and ``d`` are computed from the
    buffers as they were before the batch (as in the paper's Algorithm 1),
    ``running = (1 − momentum) · running + momentum · stat``, with the variance stored unbiased
    (``σ²_B · M/(M − 1)`` for ``M`` values per channel) and ε added inside the square root when
    σ is formed. The paper instead averages the std σ_B itself; normkit keeps ``running_var``
    so that checkpoints, eval and every batch-norm tool stay ``nn.BatchNorm``'s (Chainer's
    ``batch_renormalization`` makes the same choice). ``momentum=0.1`` is PyTorch's default; the
    paper recommends a relatively fast update of the moving averages, since r and d are only as
    good as the averages they correct towards: raise ``momentum`` if the running statistics lag.

    **Schedule.** ``t`` is the training step, ``num_batches_tracked`` before the batch (counting
    from 0; batches that update the statistics are counted). For ``t < warmup_steps`` the limits
    are ``r_max(t) = 1`` and ``d_max(t) = 0``: the layer is a plain batch norm. After that they
    relax linearly, reaching ``r_max`` at ``t = r_max_steps`` and ``d_max`` at
    ``t = d_max_steps``, and stay there:
    ``r_max(t) = 1 + (r_max − 1) · clip((t − w + 1)/(r_max_steps − w + 1), 0, 1)`` with
    ``w = warmup_steps`` (likewise ``d_max(t)`` from 0). The defaults are the paper's (5k
    warm-up steps, r_max = 3 at 40k steps, d_max = 5 at 25k); the paper says "gradually
    relaxed", the linear ramp is normkit's choice. ``warmup_steps=0, r_max_steps=0,
    d_max_steps=0`` uses the targets from the first step (no schedule). :meth:`clip_limits`
    returns the current limits; resetting ``num_batches_tracked`` restarts the schedule (a
    checkpoint of a trained batch norm loads with its count, so the schedule starts where that
    count is). The limits are computed as tensors from the counter: forward reads no Python
    number from a buffer and compiles with ``torch.compile(fullgraph=True)``.

    ``track_running_stats=False`` is refused: without running statistics there is nothing to
    renormalize towards. Setting the attribute to False on a built layer freezes the running
    statistics and the step counter as in ``nn.BatchNorm``: training then normalizes with the
    batch statistics alone (no r and d, as torch's batch norm passes no running statistics
    then), eval with the frozen running statistics.

    Synchronization: with :func:`normkit.convert_sync`, μ_B and σ²_B (and so r and d) are
    taken over the batch of every rank. :func:`normkit.freeze_norm` freezes the layer to its
    eval form. Checkpoint names are ``nn.BatchNorm``'s: a batch norm's state dict loads as is.

    Checked against the paper: Algorithm 1 (r, d, stop-gradient, the use of the moving averages
    before their update, inference as a plain batch norm with the moving averages) and the
    schedule of Section 4 (r_max = 1, d_max = 0 for the first 5000 steps, then relaxed to
    r_max = 3 at 40k steps and d_max = 5 at 25k steps). Deviations: the running variance instead
    of the running std, PyTorch's momentum convention and default, and the linear ramp.

    Args:
        num_features: C.
        eps, momentum, affine, device, dtype: as ``nn.BatchNorm2d``.
        track_running_stats: must be True.
        r_max: the final limit of r, >= 1 (r is clipped to ``[1/r_max, r_max]``).
        d_max: the final limit of |d|, >= 0.
        warmup_steps: training steps of plain batch normalization (limits 1 and 0).
        r_max_steps: the step at which r's limit reaches ``r_max`` (>= ``warmup_steps``).
        d_max_steps: the step at which d's limit reaches ``d_max`` (>= ``warmup_steps``).

    Shapes:
        - input: ``(N, C)`` or ``(N, C, L)`` (1d), ``(N, C, H, W)`` (2d), ``(N, C, D, H, W)`` (3d).
        - output: same shape, dtype and memory format.

    Example::

        >>> norm = normkit.BatchRenorm2d(64)  # the paper's schedule
        >>> norm(torch.randn(4, 64, 8, 8)).shape
        torch.Size([4, 64, 8, 8])
        >>> relaxed = normkit.BatchRenorm2d(64, warmup_steps=0, r_max_steps=0, d_max_steps=0)
        >>> [float(v) for v in relaxed.clip_limits()]
        [3.0, 5.0]
"""


class BatchRenorm1d(_BatchRenorm):
    __doc__ = _BRN_DOC
    _ranks = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    __doc__ = _BRN_DOC
    _ranks = (4,)


class BatchRenorm3d(_BatchRenorm):
    __doc__ = _BRN_DOC
    _ranks = (5,)
