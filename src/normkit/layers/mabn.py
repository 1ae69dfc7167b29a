r"""Moving Average Batch Normalization (MABN) and the weight-centred convolution it pairs with.

MABN (Yan, Wan, Zhang, Zhang, Wei & Sun, "Towards Stabilizing Batch Statistics in Backward
Propagation of Batch Normalization", ICLR 2020) keeps batch normalization usable at very small
per-device batches. It drops the centring (which :class:`CenConv2d` moves into the weights),
normalizes by a *moving average* of the per-batch second moment, and replaces the two batch
statistics of BN's backward by moving averages too, so that neither direction depends on a
single small batch. The official code is megvii-model/MABN (``MABN.py``, MIT).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.common_types import _size_2_t
from torch.nn.modules.batchnorm import _BatchNorm

from normkit import _fused
from normkit import functional as F
from normkit._checks import (
    check_count,
    check_dtype,
    check_flags,
    check_input,
    check_momentum,
    check_positive,
)
from normkit._stats import (
    Synchronized,
    _merge_dtype,
    all_reduce_sum_,
    ema_factor,
    may_be_replayed,
    recomputing,
    replayed_values,
    stash_for_replay,
)
from normkit.layers.weight_std import (
    _conv_twin,
    _init_checked_conv,
    _PaddingMode,
    _standardized_conv,
    _StandardizedWeight,
)

__all__ = ["CenConv2d", "MovingAverageBatchNorm2d"]

# The official code hard-codes the step before which r is 1 as max(1000, warmup_iters).
_OFFICIAL_R_STEPS = 1000
# Counters are int64 buffers: a bound above this could not be compared with them.
_MAX_STEPS = torch.iinfo(torch.int64).max


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def _keep_format(grad: Tensor, like: Tensor) -> Tensor:
    # The input gradient mixes the incoming gradient (any layout) with the input: give it the
    # input's layout, as torch's batch norm does for channels_last input.
    if (
        like.dim() == 4
        and like.is_contiguous(memory_format=torch.channels_last)
        and not like.is_contiguous()
    ):
        return grad.contiguous(memory_format=torch.channels_last)
    return grad


def _moving_statistics(
    running_var: Tensor,
    buffer_x2: Tensor,
    step: Tensor,
    chi: Tensor,
    eps: float,
    warmup_iters: int,
    r_clamp_steps: int,
    r_min: float,
    r_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(ψ², r, row, warm)`` of step ``step`` whose ring row already holds ``chi``."""
    m = buffer_x2.shape[0]
    slot = torch.remainder(step, m)
    warm = (step <= m) | (step < warmup_iters)
    psi2 = torch.where(warm, chi, buffer_x2.to(chi.dtype).mean(dim=0)).clamp_min(0)
    ratio = torch.sqrt(psi2 + eps) * torch.rsqrt(running_var.to(chi.dtype) + eps)
    r = torch.where(step <= r_clamp_steps, torch.ones_like(ratio), ratio.clamp(r_min, r_max))
    return psi2, r, slot, warm


def _mabn_step_eager(
    running_var: Tensor,
    buffer_x2: Tensor,
    step: Tensor,
    chi: Tensor,
    momentum: float | None,
    eps: float,
    warmup_iters: int,
    r_clamp_steps: int,
    r_min: float,
    r_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One training step of MABN's state, in place: ``step += 1``, ``χ_t`` into ring row
    ``step mod m`` (where finite), ``(ψ², r, row, warm)`` from the old running variance, then
    ``running_var ← lerp(running_var, ψ², momentum)`` (where ``ψ²`` is finite).

    Compiled code calls it as the opaque op :data:`_mabn_step_`, as
    :func:`normkit._stats.estimate_update_`: the backward must get this step's ``ψ²``, ``r``
    and row, which inductor would otherwise recompute in backward from the buffers the forward
    has already updated (wrong gradients).
    """
    step.add_(1)
    slot = torch.remainder(step, buffer_x2.shape[0]).reshape(1)
    old = buffer_x2.index_select(0, slot).squeeze(0)
    fresh = torch.where(torch.isfinite(chi), chi.to(buffer_x2.dtype), old)
    buffer_x2.index_copy_(0, slot, fresh.unsqueeze(0))
    options = (eps, warmup_iters, r_clamp_steps, r_min, r_max)
    psi2, r, row, warm = _moving_statistics(running_var, buffer_x2, step, chi, *options)
    factor = ema_factor(momentum, step, running_var.dtype)
    updated = torch.lerp(running_var, psi2.to(running_var.dtype), factor)
    running_var.copy_(torch.where(torch.isfinite(psi2), updated, running_var))
    return psi2, r, row, warm


_mabn_step_ = torch.library.custom_op(
    "normkit::mabn_step_", _mabn_step_eager, mutates_args=("running_var", "buffer_x2", "step")
)


@_mabn_step_.register_fake
def _(
    running_var: Tensor,
    buffer_x2: Tensor,
    step: Tensor,
    chi: Tensor,
    momentum: float | None,
    eps: float,
    warmup_iters: int,
    r_clamp_steps: int,
    r_min: float,
    r_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (
        torch.empty_like(chi),
        torch.empty_like(chi),
        torch.empty_like(step),
        torch.empty(step.shape, dtype=torch.bool, device=step.device),
    )


def _forward_ad_in(*tensors: Tensor | None) -> bool:
    """Whether a forward-mode AD level is open and one of ``tensors`` carries a tangent."""
    if not _fused.in_dual_level() or torch.compiler.is_compiling():
        return False
    unpack = torch.autograd.forward_ad.unpack_dual
    return any(t is not None and unpack(t).tangent is not None for t in tensors)


class _MABNFunction(torch.autograd.Function):
    """``y = γ · r · x / sqrt(ψ² + ε) + β`` with MABN's backward, stateless but for ``buffer_gz``.

    Everything the layer keeps is passed in: ``psi2`` and ``r`` (``(C,)``, the statistics dtype,
    no gradient), the ring buffer of ``gz`` (written in backward at row ``slot``), ``warm`` (a
    bool tensor: use this batch's ``gz`` instead of the buffer's average), ``count`` (values per
    channel, over every rank under synchronization) and, with ``sync``, the process group over
    which ``gz`` is summed (None is the default group). The backward is not itself
    differentiable.
    """

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        psi2: Tensor,
        r: Tensor,
        buffer_gz: Tensor,
        slot: Tensor,
        warm: Tensor,
        count: Tensor,
        eps: float,
        sync: bool,
        group: Any,
        layer: str,
    ) -> Tensor:
        scale = r * torch.rsqrt(psi2 + eps)
        shift = torch.zeros_like(scale)
        if weight is not None and bias is not None:
            scale = scale * weight.to(scale.dtype)
            shift = bias.to(scale.dtype)
        y = F.apply_scale_shift(x.to(psi2.dtype), scale, shift)
        return y.to(x.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x, weight, _, psi2, r, buffer_gz, slot, warm, count, eps, sync, group, layer = inputs
        ctx.save_for_backward(x, weight)
        # The step's state is kept on ctx, not saved for backward: activation checkpointing
        # recomputes saved tensors (from a forward that no longer is this step), and
        # buffer_gz is written by every backward, which a second forward's backward (gradient
        # accumulation) would otherwise see as "modified by an inplace operation". All are
        # (C,) or scalars.
        ctx.step = (psi2, r, slot, warm, count)
        ctx.buffer_gz = buffer_gz
        ctx.eps, ctx.sync, ctx.group, ctx.layer = eps, sync, group, layer

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        psi2, r, slot, warm, count = ctx.step
        dt = psi2.dtype
        dims = [0, *range(2, x.dim())]
        inv = torch.rsqrt(psi2 + ctx.eps)
        gain = r if weight is None else r * weight.to(dt)
        dy = grad.to(dt)
        xf = x.to(dt)
        # With g = γ r dy and z = x / sqrt(ψ² + ε): Σ g z = γ r inv Σ dy x, per channel.
        dy_x = (dy * xf).sum(dim=dims)
        gz_sum = gain * inv * dy_x
        if ctx.sync:
            total = gz_sum.to(_merge_dtype(gz_sum))
            gz_sum = all_reduce_sum_(total, ctx.group, ctx.layer).to(dt)
        gz = gz_sum / count.to(dt).clamp_min(1)
        buffer_gz: Tensor = ctx.buffer_gz
        with torch.no_grad():
            # A channel whose gz is not finite (NaN or Inf in the batch) keeps its old row value.
            old = buffer_gz.index_select(0, slot.reshape(1)).squeeze(0)
            row = torch.where(torch.isfinite(gz), gz.to(buffer_gz.dtype), old)
            buffer_gz.index_copy_(0, slot.reshape(1), row.unsqueeze(0))
            mean_gz = torch.where(warm, gz, buffer_gz.to(dt).mean(dim=0))
        # dx = (g − z · mean_gz) / sqrt(ψ² + ε) = (γ r inv) dy − (inv² mean_gz) x
        grad_x = None
        if ctx.needs_input_grad[0]:
            a, b = gain * inv, -(inv * inv * mean_gz)
            gx = (dy * _channel_view(a, dy)).addcmul_(xf, _channel_view(b, xf))
            grad_x = _keep_format(gx.to(x.dtype), x)
        grad_w = grad_b = None
        if weight is not None and ctx.needs_input_grad[1]:
            grad_w = (r * inv * dy_x).to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_b = dy.sum(dim=dims).to(weight.dtype)
        return grad_x, grad_w, grad_b, *([None] * 10)


class MovingAverageBatchNorm2d(Synchronized, _BatchNorm):
    r"""Moving Average Batch Normalization over a 4D input (MABN; Yan et al., ICLR 2020).

    A drop-in for ``nn.BatchNorm2d`` at small per-device batches, meant to follow a
    :class:`CenConv2d` (whose weights are centred, so the activations need no centring). For
    each channel, over the ``N · H · W`` values of a training batch ``x``:

    .. math::

        χ_t = \operatorname{mean}_{N,H,W}(x^2), \qquad
        ψ^2 = \begin{cases} χ_t & \text{warm-up} \\
              \tfrac{1}{m}\sum_{i=0}^{m-1} χ_{t-i} & \text{after} \end{cases}

        z = \frac{x}{\sqrt{ψ^2 + ε}}, \qquad
        r = \operatorname{clip}_{[r_{min}, r_{max}]}
            \frac{\sqrt{ψ^2 + ε}}{\sqrt{\text{running\_var} + ε}}, \qquad
        y = γ \, r \, z + β.

    There is **no centring** (no mean, no ``running_mean``), and ``χ`` is the plain mean of
    ``x²``: a second moment about 0, with no biased/unbiased distinction and ε inside the root.
    ``m`` is ``buffer_size``: a ring buffer keeps the last ``m`` values of ``χ``. ``r`` carries
    no gradient; it is **exactly 1** for the first ``r_clamp_steps`` training steps.

    **Backward** (a custom autograd function, as the official code). With
    :math:`g = γ \, r \, ∂L/∂y` and, per channel, :math:`gz_t = \operatorname{mean}_{N,H,W}(g z)`
    kept in a second ring buffer of ``m`` values:

    .. math::

        \frac{∂L}{∂x} = \frac{g - z \, \overline{gz}}{\sqrt{ψ^2 + ε}}, \qquad
        \frac{∂L}{∂γ} = \sum \frac{∂L}{∂y} \, r z, \qquad
        \frac{∂L}{∂β} = \sum \frac{∂L}{∂y},

    with :math:`\overline{gz}` the average of the buffer (this batch's :math:`gz_t` in warm-up).
    For BN without centring, the gradient has this form with this batch's :math:`gz_t` (the
    term :math:`z \, gz_t` comes from differentiating through :math:`ψ^2 = χ_t`); MABN puts the
    moving average in its place, as it puts the moving average of :math:`χ` in the forward.
    In warm-up (and with ``m = 1``) the two agree: :math:`ψ^2 = χ_t`, the layer is "BN without
    centring" with γ scaled by ``r``, ``γ r x / sqrt(mean(x²) + ε) + β``, and its backward is
    that function's gradient with ``r`` held constant. It is exactly BN without centring,
    ``γ x / sqrt(mean(x²) + ε) + β``, only while ``r`` is 1: the first ``r_clamp_steps``
    steps, by default ``max(1000, warmup_iters)``, which covers all of warm-up when ``m`` is at
    most that, but not an ``m = 1`` layer after step 1000.

    **Warm-up** is every step ``t`` (1 for the first training call) with ``t ≤ m`` or
    ``t < warmup_iters``, as the official code: ``ψ² = χ_t`` and :math:`\overline{gz} = gz_t`.
    The rings are written in warm-up too, so they are full when it ends.

    **Running statistics.** Each training step (after ``r`` is computed from the old value)::

        running_var = (1 − momentum) · running_var + momentum · ψ²

    the PyTorch convention (``momentum`` weighs the *new* value; ``None``: cumulative average).
    The official code's ``momentum=0.98`` weighs the **old** value, so the official behaviour is
    ``momentum=0.02``, normkit's default. A channel whose ``χ_t`` (or, in backward, ``gz_t``) is
    NaN or Inf keeps its running value and its ring entry.

    **Eval:** ``y = γ · x / sqrt(running_var + ε) + β``: no batch statistics, so each sample is
    normalized alone. An empty batch in training changes nothing (the eval formula runs).

    **State** (all registered buffers, saved in ``state_dict`` and moved by ``.to()``):
    ``running_var`` ``(C,)``, ``num_batches_tracked`` (the step ``t``: the official ``iters``),
    ``buffer_x2`` and ``buffer_gz``, both ``(m, C)`` (row ``t mod m`` holds step ``t``).
    Statistics are computed in float32 for float16/bfloat16 input (float64 stays float64); the
    output has the input's dtype and memory format, and buffers keep their own dtype. A
    checkpoint of the official ``MABN2d`` (``running_var`` of shape ``(1, C, 1, 1)``, ``iters``)
    loads into this layer.

    **Double backward is not supported** (the backward is a closed form, not differentiable
    again); differentiating the gradient raises a ``RuntimeError``.

    **Compiled and functional code.** ``torch.compile(fullgraph=True)`` traces the layer whole
    (one graph per mode, nothing guarded on the step's value); compiled, the step's state update
    runs as the opaque op ``normkit::mabn_step_``, so that inductor's backward gets this step's
    ``ψ²``, ``r`` and ring row (tested against eager). ``torch.func`` transforms and
    ``functional_call`` work with the state passed in as buffers.

    **Activation checkpointing** (``torch.utils.checkpoint``) runs the forward a second time,
    inside the backward. Left alone, that would count the step twice (``t`` advancing by 2, a
    second ``χ`` in the next ring row, ``running_var`` updated twice) and hand the backward the
    recomputed ``ψ²``, ``r`` and ring row. The layer therefore recognizes a forward that runs
    inside a backward pass (the signal ``torch.utils.checkpoint`` itself uses) and *replays*
    the step: it writes nothing and uses the first forward's ``ψ²``, ``r`` and ring row
    (remembered by a forward that may be recomputed, and found again by its input);
    ``buffer_gz`` is written once, by the one backward. Training is exactly as without
    checkpointing in both modes, ``use_reentrant=False`` (PyTorch's recommended mode) and the
    legacy ``use_reentrant=True``, gradient accumulation included (tested). Under
    ``torch.compile``, which recomputes inside its own graphs, nothing is detected.

    **Synchronization** (:func:`normkit.convert_sync`): the forward sums ``x²`` over every rank
    (so ``χ_t`` is the whole batch's) and the backward sums ``g z``, so every replica holds the
    same buffers and the gradient is that of one process holding the whole batch.

    Args:
        num_features: C.
        eps: ε, inside the root. Default 1e-5 (official).
        momentum: weight of the new ψ² in ``running_var`` (PyTorch convention), or None for a
            cumulative average. Default 0.02, the official 0.98 on the old value.
        affine: learnable γ (``weight``, init 1) and β (``bias``, init 0). Default True.
        track_running_stats: must be True: ``r`` and eval need ``running_var`` (kept in the
            signature so that the layer takes ``nn.BatchNorm2d``'s positional arguments).
        device, dtype: factory arguments.

    Keyword-only args:
        buffer_size: m, the length of both rings: the batch to simulate divided by the
            per-device batch (official ``real_B // B``; 16 simulates a batch of 32 from 2 per
            device). Default 16.
        warmup_iters: steps that use this batch's statistics instead of the rings. Default 100
            (official).
        r_clamp_steps: steps for which ``r`` is exactly 1; None (default) gives the official
            ``max(1000, warmup_iters)``.
        r_min, r_max: the range of ``r`` after that (official, hard-coded: 1/5 and 5). Need
            ``0 < r_min ≤ 1 ≤ r_max``.

    Shape:
        ``(N, C, H, W)`` in and out.

    Example::

        >>> block = nn.Sequential(
        ...     normkit.CenConv2d(16, 32, 3, padding=1, bias=False),
        ...     normkit.MovingAverageBatchNorm2d(32, buffer_size=16),
        ...     nn.ReLU(),
        ... )
        >>> block(torch.randn(2, 16, 8, 8)).shape  # 2 per device, simulating 32
        torch.Size([2, 32, 8, 8])

    What was checked: the official ``MABN.py``, step by step (the warm-up condition, the clamp
    schedule, the ring rows, the order of the updates, the backward), which the tests reproduce
    in a formula-level reference; and the method as the paper describes it (no centring, simple
    moving averages of the forward statistic and of ``g·z``, the renormalizing ``r``). The
    paper's algorithm listing itself was not compared line by line. Deviations from the official
    code: ``momentum`` follows PyTorch (0.02 is the official 0.98); ``r_clamp_steps``, ``r_min``
    and ``r_max`` are options (defaults official); ``buffer_size`` replaces ``B``/``real_B``;
    non-finite statistics are not stored; the step never leaves the device (no host read);
    ``affine=False`` and ``momentum=None`` exist; the official layer has neither.
    """

    _ranks = (4,)
    buffer_size: int
    warmup_iters: int
    r_clamp_steps: int
    r_min: float
    r_max: float
    running_var: Tensor
    num_batches_tracked: Tensor
    buffer_x2: Tensor
    buffer_gz: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.02,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        buffer_size: int = 16,
        warmup_iters: int = 100,
        r_clamp_steps: int | None = None,
        r_min: float = 0.2,
        r_max: float = 5.0,
    ) -> None:
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        check_positive(name, "eps", eps)
        check_momentum(name, momentum)
        check_flags(name, affine=affine, track_running_stats=track_running_stats)
        if not track_running_stats:
            raise ValueError(
                f"{name}: expected track_running_stats=True (MABN's r and its eval mode use "
                "running_var), got track_running_stats=False"
            )
        check_dtype(name, dtype)
        check_count(name, "buffer_size", buffer_size)
        for key, value in (("warmup_iters", warmup_iters), ("r_clamp_steps", r_clamp_steps)):
            if value is None:
                continue
            check_count(name, key, value, 0)
            if value > _MAX_STEPS:
                raise ValueError(f"{name}: expected {key} <= {_MAX_STEPS}, got {value}")
        check_positive(name, "r_min", r_min)
        check_positive(name, "r_max", r_max)
        if not r_min <= 1.0 <= r_max:
            raise ValueError(
                f"{name}: expected r_min <= 1 <= r_max (r is exactly 1 before r_clamp_steps), "
                f"got r_min={r_min}, r_max={r_max}"
            )
        self.buffer_size = buffer_size
        self.warmup_iters = warmup_iters
        if r_clamp_steps is None:
            r_clamp_steps = max(_OFFICIAL_R_STEPS, warmup_iters)
        self.r_clamp_steps = r_clamp_steps
        self.r_min = float(r_min)
        self.r_max = float(r_max)
        factory = {"device": device, "dtype": dtype}
        super().__init__(num_features, eps, momentum, affine, True, **factory)
        # No centring, so no running mean (None, as in a batch norm that tracks nothing).
        self.register_buffer("running_mean", None)
        shape = (buffer_size, num_features)
        self.register_buffer("buffer_x2", torch.zeros(shape, **factory))
        self.register_buffer("buffer_gz", torch.zeros(shape, **factory))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        """``running_var`` to 1, the step to 0 and both rings to 0 (the official init);
        ``reset_parameters`` (``nn.BatchNorm``'s) also sets γ to 1 and β to 0."""
        # _BatchNorm.__init__ calls this before the rings exist (and the running mean goes).
        self.running_var.fill_(1.0)
        self.num_batches_tracked.zero_()
        for key in ("buffer_x2", "buffer_gz"):
            ring = self._buffers.get(key)
            if ring is not None:
                ring.zero_()

    def _check_input_dim(self, input: Tensor) -> None:
        check_input(type(self).__name__, input, self._ranks, self.num_features)

    def extra_repr(self) -> str:
        s = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, buffer_size={self.buffer_size}, "
            f"warmup_iters={self.warmup_iters}, r_clamp_steps={self.r_clamp_steps}, "
            f"r_min={self.r_min}, r_max={self.r_max}"
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
        # The official MABN2d keeps running_var as (1, C, 1, 1) and its step as ``iters`` (1,).
        var = state_dict.get(prefix + "running_var")
        if isinstance(var, Tensor) and var.dim() == 4 and var.numel() == self.num_features:
            state_dict[prefix + "running_var"] = var.reshape(self.num_features)
        iters = state_dict.get(prefix + "iters")
        if isinstance(iters, Tensor) and prefix + "num_batches_tracked" not in state_dict:
            state_dict[prefix + "num_batches_tracked"] = iters.reshape(())
            del state_dict[prefix + "iters"]
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:
        name = type(self).__name__
        check_input(name, input, self._ranks, self.num_features)
        syncing = self._syncing()
        if syncing:
            fields = {"num_features": self.num_features, "buffer_size": self.buffer_size}
            self._verify_peers(fields, input.device)
        if not self.training or (input.numel() == 0 and not syncing):
            return self._eval_forward(input)
        if not self.track_running_stats:
            # Cleared after construction (the usual way to freeze a batch norm's statistics):
            # MABN's training normalization is its moving averages, so there is no batch-only
            # mode to fall back on. Refused, as the constructor refuses the flag.
            raise ValueError(
                f"{name}: expected track_running_stats=True in training (MABN normalizes with its "
                "moving averages, which training updates), got False; use eval() or "
                "normkit.freeze_norm to freeze the layer"
            )
        if _forward_ad_in(input, self.weight, self.bias):
            # A named refusal instead of autograd's generic "implement the jvp function" (a jvp
            # method that only raised would stop dynamo from tracing the function at all).
            raise NotImplementedError(
                f"{name}: forward-mode AD (torch.autograd.forward_ad) is not supported in "
                "training: the training gradient is MABN's moving-average approximation, not "
                "the derivative of the forward, so no jvp matches it. Eval mode supports it."
            )
        replay = recomputing()
        psi2, r, slot, warm, count = self._step(input, syncing, update=not replay)
        if replay:
            # The step's state as the first forward computed it (r read the running variance
            # before that forward's update), for use_reentrant=True, whose backward runs on
            # this recomputation; use_reentrant=False keeps the first forward's ctx anyway.
            used = replayed_values(self, input)
            if used is not None:
                psi2, r, slot, warm, count = used
        elif may_be_replayed():
            stash_for_replay(self, input, (psi2, r, slot, warm, count))
        return _MABNFunction.apply(
            input,
            self.weight,
            self.bias,
            psi2,
            r,
            self.buffer_gz,
            slot,
            warm,
            count,
            self.eps,
            syncing,
            self.process_group,
            name,
        )

    def _eval_forward(self, x: Tensor) -> Tensor:
        scale = torch.rsqrt(self.running_var.to(F.stats_dtype(x.dtype)) + self.eps)
        shift = torch.zeros_like(scale)
        if self.weight is not None and self.bias is not None:
            scale, shift = scale * self.weight, self.bias.to(scale.dtype)
        return F.apply_scale_shift(x, scale, shift)

    @torch.no_grad()
    def _step(self, x: Tensor, syncing: bool, update: bool) -> tuple[Tensor, ...]:
        """One training step's forward state: ``ψ²``, ``r``, the ring row, the warm-up flag
        and the count of values per channel. With ``update``, first advance ``t``, write
        ``χ_t`` into its ring row and then update ``running_var`` (:func:`_mabn_step_`);
        without (a recomputation), read the state as the step left it and write nothing."""
        dt = F.stats_dtype(x.dtype)
        dims = [0, *range(2, x.dim())]
        sum_x2 = x.detach().to(dt).square().sum(dim=dims)
        count = torch.full((), x.numel() // x.shape[1], dtype=dt, device=x.device)
        if syncing:
            packed = torch.cat([sum_x2, count.reshape(1)]).to(_merge_dtype(sum_x2))
            all_reduce_sum_(packed, self.process_group, type(self).__name__)
            sum_x2, count = packed[:-1].to(dt), packed[-1].to(dt)
        chi = sum_x2 / count.clamp_min(1)
        options = (
            self.eps,
            self.warmup_iters,
            self.r_clamp_steps,
            self.r_min,
            self.r_max,
        )
        if update:
            # The opaque op only where a compiler could see through the body (its dispatch
            # costs more than the body's small ops in eager); the same function either way.
            step_ = _mabn_step_ if torch.compiler.is_compiling() else _mabn_step_eager
            psi2, r, slot, warm = step_(
                self.running_var,
                self.buffer_x2,
                self.num_batches_tracked,
                chi,
                self.momentum,
                *options,
            )
        else:
            psi2, r, slot, warm = _moving_statistics(
                self.running_var, self.buffer_x2, self.num_batches_tracked, chi, *options
            )
        return psi2, r, slot, warm, count


class CenConv2d(_StandardizedWeight, nn.Conv2d):
    r"""``nn.Conv2d`` whose filters are centred before use (MABN's weight centralization).

    Each output filter ``W_o`` (shape ``(in_channels / groups, kH, kW)``) has its mean removed
    at every forward, with the gradient flowing through the mean:

    .. math::

        \hat W_o = W_o - \frac{1}{n}\sum_j W_{o,j}, \qquad y = \operatorname{conv2d}(x, \hat W) + b

    (Weight Standardization without the division by the standard deviation). The paper pairs it
    with :class:`MovingAverageBatchNorm2d`, which does not centre: with centred filters and
    a zero-mean input the output has zero mean, and the authors report that dropping CenConv
    costs a little accuracy. It shares the WS layers' machinery: in eval mode the centred weight
    is cached (see :mod:`normkit.layers.weight_std`), :meth:`bake` returns a plain
    ``nn.Conv2d``, and :func:`normkit.prepare_for_inference` bakes it.

    Arguments, ``weight`` and ``bias`` are those of ``nn.Conv2d``, including its initialization
    (Kaiming-uniform). The official ``CenConv2d`` starts from plain ``randn`` weights and biases
    (so a network must re-initialize it) and defaults to ``bias=False``; normkit keeps
    ``nn.Conv2d``'s defaults, so pass ``bias=False`` before MABN as the authors advise. Centring
    is computed in float32 for float16/bfloat16 weights.

    Shape:
        as :class:`torch.nn.Conv2d`.

    Example::

        >>> conv = CenConv2d(16, 32, 3, padding=1, bias=False)
        >>> conv.centred_weight().mean(dim=(1, 2, 3)).abs().max() < 1e-6
        tensor(True)
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
    ) -> None:
        sizes = (in_channels, out_channels, kernel_size, stride, padding, dilation)
        _init_checked_conv(self, nn.Conv2d, (*sizes, groups, bias), padding_mode, device, dtype)
        self._ws_cache = None

    def _compute_weight(self) -> Tensor:
        w = self.weight.to(F.stats_dtype(self.weight.dtype))
        return (w - w.mean(dim=(1, 2, 3), keepdim=True)).to(self.weight.dtype)

    def _cache_config(self) -> tuple[object, ...]:
        return ()

    def centred_weight(self) -> Tensor:
        """The centred weight the forward uses (from the eval cache when it is valid)."""
        return self.standardized_weight()

    def forward(self, input: Tensor) -> Tensor:
        return _standardized_conv(self, input)

    def _plain_twin(self) -> nn.Module:
        return _conv_twin(self, nn.Conv2d)
