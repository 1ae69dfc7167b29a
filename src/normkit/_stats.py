"""Running-statistics conventions, in one place.

* Momentum follows PyTorch: ``running = (1 - m) * running + m * batch_stat``; ``momentum=None``
  is the cumulative average with factor ``1 / num_batches_tracked``, computed as a tensor so that
  forward never reads a Python number from a buffer (``torch.compile(fullgraph=True)`` friendly).
* Layers normalize with the biased batch variance and store the unbiased one,
  ``var * M / (M - 1)`` for ``M`` values per channel, as ``nn.BatchNorm`` does.
* Buffers are updated in place (CUDA-graph safe) and without gradient; statistics are cast to the
  buffer dtype at the very end, so a float32 buffer never sees half-precision arithmetic.
"""

from __future__ import annotations

import weakref
import zlib
from collections import deque
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def ema_factor(
    momentum: float | None, num_batches_tracked: Tensor, dtype: torch.dtype = torch.float32
) -> float | Tensor:
    """The weight of the new batch statistic; call after ``num_batches_tracked`` was increased.

    ``dtype`` is the running buffers' dtype, so that a cumulative factor is exact for them.
    """
    if momentum is None:
        return 1.0 / num_batches_tracked.clamp_min(1).to(dtype)
    return momentum


def unbiased_factor(count: int | Tensor) -> float | Tensor:
    """``M / (M - 1)``; 1 where ``M <= 1`` (no unbiased estimate exists; callers make no update)."""
    if isinstance(count, Tensor):
        c = count if count.is_floating_point() else count.to(torch.float32)
        return torch.where(c > 1, c / (c - 1).clamp_min(1), torch.ones_like(c))
    return count / (count - 1) if count > 1 else 1.0


@torch.no_grad()
def update_running_(
    running_mean: Tensor | None,
    running_var: Tensor,
    mean: Tensor,
    var_unbiased: Tensor,
    factor: float | Tensor,
    mask: Tensor | None = None,
) -> None:
    """``running += factor * (batch - running)``, in place, only where ``mask`` is true.

    ``mask`` broadcasts against the buffers (a ``(K, 1)`` mask of present domains, say).
    ``factor`` may be a tensor broadcasting the same way (one cumulative factor per domain).

    Non-finite statistics (from NaN or Inf in the input) are never written: a channel whose
    batch mean or variance is not finite keeps its running values. Checking costs no host sync,
    so forward stays compile-friendly; the non-finite output itself still shows the problem.
    ``running_mean`` None: a layer that keeps only a running variance (EvoNorm-B0).
    """
    if isinstance(factor, Tensor):
        factor = factor.to(running_var.dtype)
    mean, var_unbiased = mean.detach(), var_unbiased.detach()
    # A sum is finite only if both terms are (or overflows, for moments near the float range,
    # which are treated as non-finite too): one check for both statistics.
    keep = torch.isfinite(mean + var_unbiased)
    if mask is not None:
        keep = keep & mask
    # lerp towards the old value itself leaves it exactly unchanged.
    if running_mean is not None:
        target = torch.where(keep, mean.to(running_mean.dtype), running_mean)
        running_mean.lerp_(target, factor)
    running_var.lerp_(torch.where(keep, var_unbiased.to(running_var.dtype), running_var), factor)


@torch.no_grad()
def track_batch_(
    running_mean: Tensor | None,
    running_var: Tensor,
    num_batches_tracked: Tensor,
    momentum: float | None,
    mean: Tensor,
    var: Tensor,
    count: int | Tensor,
) -> None:
    """Fold one batch's biased moments over ``count`` values into the running buffers.

    ``count`` is a Python int (one set of statistics) or a tensor with one entry per row of the
    buffers (``()`` for ``(C,)`` buffers, ``(K,)`` for per-domain ``(K, C)`` buffers); rows with
    fewer than two values keep their buffers and their ``num_batches_tracked``.
    """
    # One value per channel has no variance estimate: such a batch (or domain) leaves the
    # buffers alone, rather than pulling the running variance towards 0.
    if isinstance(count, int):
        if count <= 1:
            return
        num_batches_tracked.add_(1)
        factor = ema_factor(momentum, num_batches_tracked, running_var.dtype)
        update_running_(running_mean, running_var, mean, var * unbiased_factor(count), factor)
        return
    present = count > 1
    num_batches_tracked.add_(present.to(num_batches_tracked.dtype))
    factor = ema_factor(momentum, num_batches_tracked, running_var.dtype)
    correction = unbiased_factor(count)
    assert isinstance(correction, Tensor)
    if present.dim() > 0:  # one row per domain: broadcast over channels
        present = present.unsqueeze(-1)
        correction = correction.unsqueeze(-1)
        if isinstance(factor, Tensor):
            factor = factor.unsqueeze(-1)
    update_running_(running_mean, running_var, mean, var * correction, factor, mask=present)


def estimate_update_eager_(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    rate: float,
    present: Tensor,
) -> tuple[Tensor, Tensor]:
    """``running ← (1 − rate) · running + rate · batch`` where ``present``; returns the new values.

    Compiled code calls it as the opaque op :data:`estimate_update_`: a layer that normalizes
    with estimates it has just updated in place (BCN's micro-batch mode) must use the returned
    values, which the compiled backward then saves. Without this, inductor's backward may
    recompute them from the mutated buffers and produce wrong gradients (pytorch/pytorch PR
    #197039 tracks the underlying bug). Eager code calls this function directly: calling a
    custom op from Python costs far more (about 0.1 ms) than these few small ops.
    """
    # Detached: no_grad stops reverse-mode gradients but not forward-mode tangents, which would
    # otherwise flow into the buffers and into the values this forward normalizes with.
    mean, var = mean.detach(), var.detach()
    keep = present & torch.isfinite(mean) & torch.isfinite(var)  # never store NaN or Inf
    new_mean = torch.lerp(running_mean, mean.to(running_mean.dtype), rate)
    new_var = torch.lerp(running_var, var.to(running_var.dtype), rate)
    new_mean = torch.where(keep, new_mean, running_mean)
    new_var = torch.where(keep, new_var, running_var)
    running_mean.copy_(new_mean)
    running_var.copy_(new_var)
    return new_mean, new_var


estimate_update_ = torch.library.custom_op(
    "normkit::estimate_update_",
    estimate_update_eager_,
    mutates_args=("running_mean", "running_var"),
)


@estimate_update_.register_fake
def _(
    running_mean: Tensor,
    running_var: Tensor,
    mean: Tensor,
    var: Tensor,
    rate: float,
    present: Tensor,
) -> tuple[Tensor, Tensor]:
    return torch.empty_like(running_mean), torch.empty_like(running_var)


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` when ``torch.distributed`` is initialized, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(group))


def _merge_dtype(t: Tensor) -> torch.dtype:
    # Cross-rank merging goes through raw sums; float64 keeps their cancellation negligible.
    # (Apple's MPS has no float64.)
    return torch.float32 if t.device.type == "mps" else torch.float64


def _peer_error(layer: str, what: str, group: Any, error: Exception) -> RuntimeError:
    return RuntimeError(
        f"{layer}: {what} over the {world_size(group)} ranks of the process group failed: a peer "
        "rank failed, exited or did not join this collective (every rank must run the same "
        "synchronized layers in the same order, each training forward and backward). A peer "
        "that stops without exiting is waited for until the timeout given to "
        "torch.distributed.init_process_group(timeout=...) (30 minutes by default on gloo). "
        f"The backend reported: {error}"
    )


def _all_reduce(t: Tensor, group: Any, layer: str, what: str) -> None:
    """``dist.all_reduce`` (sum, in place) whose failure names the layer and the likely cause.

    gloo reports a peer that exited as "Connection closed by peer" at once, and a peer that
    never joins as "Timed out waiting ...ms" after the process group's timeout; both surface
    deep in a backward or a forward without saying which layer waited.
    """
    try:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    except RuntimeError as e:  # DistBackendError and gloo's errors are RuntimeErrors
        raise _peer_error(layer, what, group, e) from e


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose backward sums the gradients over ranks (the adjoint of a sum)."""

    @staticmethod
    def forward(
        ctx: Any,
        t: Tensor,
        group: Any,
        layer: str,
        what: str = "the all-reduce of batch statistics",
    ) -> Tensor:
        ctx.group = group
        ctx.layer = layer
        out = t.clone()
        _all_reduce(out, group, layer, what)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        # The sum over ranks is its own adjoint: the backward is this function again, so that
        # double backward (a gradient penalty through synchronized statistics) differentiates
        # it too. An in-place collective in the backward would be an identity to autograd under
        # create_graph, and the second-order gradient would silently miss the other ranks.
        what = "the all-reduce of the statistics' gradient"
        out: Tensor = _AllReduceSum.apply(grad.contiguous(), ctx.group, ctx.layer, what)
        return out, None, None, None


# Layers already checked against their peers, with the group they were checked for. Weak keys,
# and nothing stored on the module: a copy or an unpickled layer is checked again, as a freshly
# built layer on another rank would be, so that every rank runs the check at the same forward.
_VERIFIED: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def verify_peers(owner: Any, layer: str, fields: dict[str, int], device: Any, group: Any) -> None:
    """Check, once per layer and process group, that every rank holds the same layer.

    Called at the first synchronized training forward of ``owner``: one all-gather of a few
    integers (the layer class and ``fields``, say ``num_features`` and ``num_domains``). Ranks
    whose layers differ would otherwise reach the all-reduce of statistics with tensors of
    different sizes, which makes gloo abort the process (an uncatchable C++ error), or of equal
    sizes but different meanings, which silently mixes statistics. Every rank gets the same
    gathered values, so every rank raises the same ``ValueError``. Skipped under
    ``torch.compile``; later forwards cost nothing.
    """
    if torch.compiler.is_compiling():
        return
    if owner in _VERIFIED and _VERIFIED[owner] is group:
        return
    code = zlib.crc32(layer.encode()) & 0x7FFFFFFF
    mine = torch.tensor([code, *fields.values()], dtype=torch.long, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world_size(group))]
    try:
        dist.all_gather(gathered, mine, group=group)
    except RuntimeError as e:
        raise _peer_error(layer, "the check that every rank holds the same layer", group, e) from e
    rows = [t.tolist() for t in gathered]
    if any(row != rows[0] for row in rows):
        names = ["layer class", *fields]
        diffs = []
        for i, name in enumerate(names):
            values = [row[i] for row in rows]
            if len(set(values)) > 1:
                shown = "differs" if i == 0 else f"is {values}"
                diffs.append(f"{name} per rank {shown}")
        raise ValueError(
            f"{layer}: expected the same synchronized layer on every rank of the process group, "
            f"got {'; '.join(diffs)} (this rank: {dist.get_rank(group)}, "
            f"{', '.join(f'{k}={v}' for k, v in fields.items())}); ranks whose models differ, or "
            "that run different layers at this point, cannot merge batch statistics"
        )
    _VERIFIED[owner] = group


def sync_moments(
    mean: Tensor, var: Tensor, count: int | Tensor, group: Any = None, layer: str = "normkit"
) -> tuple[Tensor, Tensor, Tensor]:
    """Merge per-rank biased moments over every rank of ``group``: one all-reduce, with gradient.

    Args:
        mean, var: this rank's moments, ``(C,)`` or ``(K, C)``; anything where ``count`` is 0
            (NaN from an empty batch, say) is ignored.
        count: values behind each moment on this rank: an int, or a tensor broadcasting against
            ``mean`` (``(K, 1)`` for per-domain moments).
        layer: the name that errors of the collective give (a peer that failed or never came).

    Returns:
        ``(mean, var, count)`` over all ranks; ``count`` has ``mean``'s shape without the channel
        dimension (a scalar for ``(C,)`` moments, ``(K,)`` for ``(K, C)``).

    The all-reduce is differentiable (its backward all-reduces the gradient), so the gradient of
    every rank's loss reaches every rank's input through the shared statistics.
    """
    dtype = _merge_dtype(mean)
    n = torch.as_tensor(count, dtype=dtype, device=mean.device).expand_as(mean)
    present = n > 0
    m = torch.where(present, mean.to(dtype), 0.0)
    v = torch.where(present, var.to(dtype), 0.0)
    packed = torch.stack([n, n * m, n * (v + m.square())])
    total = _AllReduceSum.apply(packed, group, layer)
    values = total[0]
    denom = values.clamp_min(1)
    g_mean = total[1] / denom
    g_var = (total[2] / denom - g_mean.square()).clamp_min(0)
    return g_mean.to(mean.dtype), g_var.to(var.dtype), values[..., 0]


class Synchronized:
    """Mixin of every layer with batch statistics that :func:`normkit.convert_sync` can switch
    to statistics merged over the ranks of ``process_group``.

    ``sync`` is False until ``convert_sync`` sets it; merging happens in training only, and not
    at all without an initialized process group of several ranks.
    """

    #: Batch statistics over every rank of ``process_group`` (see :func:`normkit.convert_sync`).
    sync: bool = False
    process_group: Any = None
    training: bool

    def _sync_repr(self) -> str:
        """The ``extra_repr`` ending that shows synchronization."""
        return ", sync=True" if self.sync else ""

    def _syncing(self) -> bool:
        return self.sync and self.training and world_size(self.process_group) > 1

    def _tracking(self) -> bool:
        """Whether this forward updates the running statistics: in training, with
        ``track_running_stats`` (a layer without the flag always tracks). As ``nn.BatchNorm``,
        a flag set to False after the layer was built (its buffers kept: "freeze the running
        statistics") stops every update: training normalizes with batch statistics without
        touching the buffers or the count, eval with the running statistics."""
        return self.training and getattr(self, "track_running_stats", True)

    def _verify_peers(self, fields: dict[str, int], device: Any) -> None:
        # Once per layer: every rank must hold this very layer (see verify_peers).
        verify_peers(self, type(self).__name__, fields, device, self.process_group)

    def _merge_and_track(
        self, mean: Tensor, var: Tensor, count: int | Tensor, syncing: bool
    ) -> tuple[Tensor, Tensor]:
        """This batch's biased moments, merged over ranks when ``syncing``; in training they
        also update the layer's ``running_var`` and ``running_mean`` (where it keeps them) by
        its ``momentum`` (see :func:`track_batch_`)."""
        if syncing:
            mean, var, count = sync_moments(
                mean, var, count, self.process_group, type(self).__name__
            )
        running_var = getattr(self, "running_var", None)
        if self._tracking() and running_var is not None:
            track_batch_(
                getattr(self, "running_mean", None),
                running_var,
                getattr(self, "num_batches_tracked"),  # noqa: B009
                getattr(self, "momentum"),  # noqa: B009
                mean,
                var,
                count,
            )
        return mean, var


@torch.no_grad()
def all_reduce_sum_(t: Tensor, group: Any = None, layer: str = "normkit") -> Tensor:
    """In-place sum over every rank of ``group``, without gradient; returns ``t``."""
    _all_reduce(t, group, layer, "the all-reduce of batch statistics")
    return t


# -- activation checkpointing -----------------------------------------------------------------
#
# torch.utils.checkpoint runs a layer's forward a second time inside the backward. A layer whose
# training output depends on state its forward updates (BatchRenorm's r and d, BCN's estimates)
# must then neither update that state again nor read it as the first forward left it: it
# *replays* the first forward, with the state that forward used, stashed for the purpose.


def recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing
    it (``torch.utils.checkpoint`` recomputes in the backward's graph task, and reads the same
    signal). Never under ``torch.compile``, which recomputes inside its own graphs."""
    if torch.compiler.is_compiling():
        return False
    return bool(torch._C._current_graph_task_id() != -1)


def may_be_replayed() -> bool:
    """Whether activation checkpointing may run this (eager, not recomputed) forward again:
    gradients off (``use_reentrant=True`` runs the first forward under ``no_grad``) or saved
    tensors hooked (``use_reentrant=False`` packs them with saved-tensor hooks). Plain training
    forwards stash nothing."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    if active is not None and active():
        return False
    if not torch.is_grad_enabled():
        return True
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


def _replay_key(x: Tensor) -> Tensor:
    """A fingerprint of a layer's input: its per-(sample, channel) sums (one pass). A
    recomputation sees the same input, so the same key finds what the first forward used."""
    x = x.detach()
    return x.sum(dim=tuple(range(2, x.dim()))) if x.dim() > 2 else x.clone()


#: Forwards remembered per layer: several checkpointed forwards may await one backward
#: (gradient accumulation); older ones are forgotten.
REPLAY_DEPTH = 16

_REPLAY: weakref.WeakKeyDictionary[Any, deque[tuple[Tensor, tuple[Tensor, ...]]]] = (
    weakref.WeakKeyDictionary()
)


def stash_for_replay(owner: Any, input: Tensor, values: tuple[Tensor, ...]) -> None:
    """Remember ``values`` (tensors this forward used, which nothing may change in place
    afterwards) for a recomputation of ``owner``'s forward on ``input``."""
    entries = _REPLAY.get(owner)
    if entries is None:
        entries = _REPLAY[owner] = deque(maxlen=REPLAY_DEPTH)
    entries.append((_replay_key(input), values))


def replayed_values(owner: Any, input: Tensor) -> tuple[Tensor, ...] | None:
    """The values the newest remembered forward of ``owner`` on ``input`` used; else (an input
    recomputed differently, on an accelerator say) the newest forward's; None when nothing is
    remembered (a forward that ran in a backward without checkpointing). Entries stay: a
    second backward through a retained graph recomputes again."""
    entries = _REPLAY.get(owner)
    if not entries:
        return None
    key = _replay_key(input)
    for stashed, values in reversed(entries):
        same = stashed.shape == key.shape and stashed.dtype == key.dtype
        if same and stashed.device == key.device and torch.equal(stashed, key):
            return values
    return entries[-1][1]
