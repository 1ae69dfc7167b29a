"""Fast training paths of the normalization layers, equal to their reference paths.

The reference path of a layer (its formula through autograd: ``functional.batch_moments`` or
``functional.sample_moments``, then ``functional.apply_scale_shift``) is the specification and
stays in use wherever these paths do not apply (synchronized statistics, empty batches, eval,
tracing for ``torch.compile``/``torch.export``, ``torch.func`` transforms). Here:

* :func:`norm_affine` (the batch-norm core: large contiguous inputs, and per-sample split
  statistics in any layout and size): per-(sample, channel) moments from shifted sums, the
  statistics of the whole batch or of each group of samples, the folded affine applied in one
  pass (written into the shifted copy the moments were taken from), and a closed-form backward
  (:func:`_affine_norm_backward`): one fused reduction and one elementwise pass.
* :func:`moment_scale_shift` (BCN at every size, batch renormalization and ``(N, C)`` inputs
  with per-sample split statistics when large): the same moments and a generic ``(N, C)`` fold
  into one scale and shift; its backward differentiates the fold with autograd, or calls the
  fold's own closed form (:class:`ClosedFold`, BCN's).
* :func:`batch_norm_train` (whole-batch statistics otherwise: small inputs, channels_last,
  ``(N, C)``):
  ATen's batch norm with the per-channel affine folded into its weight and bias, or, for a
  per-(sample, channel) affine, :class:`_AffineBatchNorm` (ATen's batch norm without affine, one
  in-place multiply-add, the same closed-form backward).
* :func:`weight_standardize` (the WS layers in eager mode): the reference computation, and a
  closed-form backward.

On CPU both ATen's batch norm and ``torch.var_mean`` reduce with a slow Welford loop over
contiguous NCHW data; plain sums of ``x − x[..., 0]`` are several times faster. At small sizes
every operator call costs microseconds, so the functions here are written for few calls.
``tests/test_fast_paths.py`` checks every path against the reference to 1e-10 in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from normkit import functional as F
from normkit import kernels

__all__ = [
    "MOMENT_PATH_MIN_NUMEL",
    "ClosedFold",
    "affine3",
    "aliases",
    "batch_norm_train",
    "centred_moments",
    "core_kernel",
    "fast_paths_apply",
    "in_dual_level",
    "moment_scale_shift",
    "norm_affine",
    "sample_moments",
    "scale_shift",
    "weight_standardize",
]


MOMENT_PATH_MIN_NUMEL = 1 << 19
"""Contiguous inputs of at least this many elements with whole-batch statistics take
:func:`norm_affine`; smaller ones ATen's batch norm (:func:`batch_norm_train`), whose two
operator calls beat the closed-form function's dozens of small ones there (measured at
2x512x8x8: SyncBatchNorm 1.7× nn.BatchNorm2d through ATen, 3.2× closed form; at 8x256x16x16
and above the closed form is as fast or faster). Where no closed-form path applies (``(N, C)``
inputs with per-sample split statistics, batch renormalization with r and d active), inputs of
at least this size take :func:`moment_scale_shift` and smaller ones ATen's batch norm or the
reference path: there the generic backward (the fold recomputed under autograd) costs more
than the passes it saves."""


def _view(t: Tensor, x: Tensor) -> Tensor:
    """A ``(C,)`` or ``(N, C)`` tensor viewed to broadcast against ``x`` of shape (N, C, ...),
    in ``x``'s dtype (a cast only where needed: even a no-op cast is an operator call)."""
    shape = [t.shape[0] if t.dim() == 2 else 1, x.shape[1]] + [1] * (x.dim() - 2)
    t = t.reshape(shape)
    return t if t.dtype == x.dtype else t.to(x.dtype)


def _var(invstd: Tensor, eps: float) -> Tensor:
    return (invstd.square().reciprocal() - eps).clamp_min(0)


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``weight · (x − μ) / sqrt(σ² + eps) + bias`` with the batch's per-channel μ and biased σ².

    Args:
        x: ``(N, C, *spatial)`` with ``N · spatial > 0``.
        weight, bias: None (no affine), ``(C,)`` or ``(N, C)``; both None or both given.

    Returns:
        ``(y, mean, var)``: ``y`` in ``x``'s dtype and memory format; ``mean`` and ``var`` of
        shape ``(C,)`` in the statistics dtype, detached.
    """
    # Parameters in the statistics dtype: ATen's CPU batch norm takes float32 parameters with
    # half-precision inputs (and then keeps float32 statistics).
    pdtype = F.stats_dtype(x.dtype)
    if weight is None or weight.dim() == 1:
        w = None if weight is None else weight.to(pdtype)
        b = None if bias is None else bias.to(pdtype)
        if w is None and pdtype != x.dtype:
            # Float32 statistics for half inputs need float32 parameters.
            w = torch.ones(x.shape[1], dtype=pdtype, device=x.device)
            b = torch.zeros(x.shape[1], dtype=pdtype, device=x.device)
        y, mean, invstd = torch.native_batch_norm(x, w, b, None, None, True, 0.0, eps)
        return y, mean.detach(), _var(invstd.detach(), eps)
    assert bias is not None
    y, mean, invstd = _AffineBatchNorm.apply(x, weight.to(pdtype), bias.to(pdtype), eps)
    return y, mean, _var(invstd, eps)


class _AffineBatchNorm(torch.autograd.Function):
    """``y = w[n, c] · x̂ + b[n, c]``, with ``x̂`` batch-normalized per channel by ATen's batch
    norm (layouts other than contiguous NCHW); backward: :func:`_affine_norm_backward`.

    Autograd functions here use the ``forward(ctx, ...)`` form: with a separate
    ``setup_context``, every ``apply`` binds its arguments through ``inspect.signature``, which
    costs tens of microseconds per call (these functions never run under ``torch.func``
    transforms, see :func:`fast_paths_apply`).
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, w: Tensor, b: Tensor, eps: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        ones = torch.ones(x.shape[1], dtype=w.dtype, device=x.device)
        y, mean, invstd = torch.native_batch_norm(
            x, ones, torch.zeros_like(ones), None, None, True, 0.0, eps
        )
        y.mul_(_view(w, x)).add_(_view(b, x))
        ctx.save_for_backward(x, w, b, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(
        ctx: Any, gy: Tensor, _gmean: Tensor | None, _ginvstd: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, w, b, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference form, so that second derivatives
            # see the statistics as functions of x.
            dx, dw, db = _reference_grads(ctx, x, w, b, None, 1, ctx.eps, gy)
        else:
            dx, dw, db = _affine_norm_backward(ctx, gy, x, w, mean, invstd, None, None)
        return dx, dw, db, None


def _reference(
    x: Tensor, w: Tensor | None, b: Tensor | None, groups: Tensor | None, k: int, eps: float
) -> Tensor:
    """Batch normalization (over the whole batch, or over each group of samples) then the
    affine, through autograd: the form second derivatives are taken of."""
    pdtype = F.stats_dtype(x.dtype)
    if groups is None:
        var, mean = torch.var_mean(x.to(pdtype), dim=[0, *range(2, x.dim())], correction=0)
    else:
        m, q = F.sample_moments(x)
        gmean, gvar, _ = F.domain_moments(m, q, groups, k)
        mean, var = gmean.index_select(0, groups), gvar.index_select(0, groups)
    scale = torch.rsqrt(var + eps)
    shift = -mean * scale
    if w is not None and b is not None:
        scale, shift = scale * w, shift * w + b
    scale, shift = torch.broadcast_tensors(scale, shift)
    return F.apply_scale_shift(x, scale, shift)


def aliases(*values: Any) -> list[Any]:
    """Fresh view nodes of the tensors among ``values`` (others as they are), for a nested
    gradient that must stop at a custom function's inputs. Taken w.r.t. the inputs themselves, a
    create_graph backward would also follow any path between them (the same layer applied
    twice makes its second input a function of its weight) and count that path once inside the
    function and again in the outer backward."""
    return [v.view_as(v) if isinstance(v, Tensor) else v for v in values]


def _reference_grads(
    ctx: Any,
    x: Tensor,
    w: Tensor | None,
    b: Tensor | None,
    groups: Tensor | None,
    k: int,
    eps: float,
    gy: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients of :func:`_reference` with ``create_graph=True`` (double backward)."""
    needs = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        x, w, b = aliases(x, w, b)
        wanted = [t for t, need in zip((x, w, b), needs) if need and t is not None]
        y = _reference(x, w, b, groups, k, eps)
        grads = iter(torch.autograd.grad(y, wanted, gy, create_graph=True))
    dx, dw, db = (next(grads) if need and t is not None else None
                  for t, need in zip((x, w, b), needs))  # fmt: skip
    return dx, dw, db


def _affine_norm_backward(
    ctx: Any,
    gy: Tensor,
    x: Tensor,
    w: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    groups: Tensor | None,
    count: Tensor | None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Closed-form backward of ``y = w · (x − μ) · invstd + b`` with batch statistics.

    ``w`` is None, ``(C,)`` or ``(N, C)``; ``mean`` and ``invstd`` are ``(C,)`` (statistics of
    the whole batch, ``groups`` None) or ``(N, C)``, each sample's group's (``groups`` the
    ``(N,)`` group of each sample, ``count`` the ``(K,)`` samples per group). With ``g`` the
    output gradient, per-(n, c) sums over the spatial positions ``A = Σ_s g`` and
    ``B = Σ_s g · x̂``, and ``Σ_G`` the sum over the samples of a group of ``M`` values:

    ``∂w = B``, ``∂b = A``, ``∂x = invstd · (w g − Σ_G wA / M − x̂ · Σ_G wB / M)``, which is
    ``α[n, c] · g + β · x + γ``: one fused reduction and two passes over the activation.
    Written for few operator calls: at small sizes each call costs more than its arithmetic.
    """
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    needs = ctx.needs_input_grad
    a, pc = _centred_sums(gy, x, mean)
    bb = pc * invstd  # Σ_s g · x̂
    per_channel = w is not None and w.dim() == 1
    dw = (bb.sum(0) if per_channel else bb) if needs[1] else None
    db = (a.sum(0) if per_channel else a) if needs[2] else None
    if not needs[0]:
        return None, dw, db
    wa, wb = (a, bb) if w is None else (a * w, bb * w)
    if groups is None:
        sa, sb = wa.sum(0), wb.sum(0)
        inv_m: float | Tensor = -1.0 / (n * s)
    else:
        assert count is not None
        k = count.shape[0]
        zeros = wa.new_zeros(k, c)
        sa = zeros.index_add(0, groups, wa).index_select(0, groups)
        sb = zeros.index_add_(0, groups, wb).index_select(0, groups)
        inv_m = (count * -s).reciprocal_().index_select(0, groups).unsqueeze(1)
    beta = invstd.square().mul_(sb).mul_(inv_m)
    gamma = (invstd * sa).mul_(inv_m).sub_(mean * beta)
    alpha = invstd if w is None else invstd * w
    return affine3(gy, x, alpha, beta, gamma), dw, db


def affine3(g: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor) -> Tensor:
    """``α · g + β · x + γ`` with ``(C,)`` or ``(N, C)`` coefficients, in ``x``'s dtype and
    layout: the shape of every closed-form input gradient here (three passes, no temporary)."""
    return (g * _view(alpha, x)).addcmul_(x, _view(beta, x)).add_(_view(gamma, x))


def _shift(mean: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    """``bias − mean · scale`` (``−mean · scale`` without a bias), in one operator call."""
    if bias is None:
        return (mean * scale).neg_()
    return torch.addcmul(bias, mean, scale, value=-1)


def _group_moments(
    m: Tensor, q: Tensor, groups: Tensor, k: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`normkit.functional.domain_moments` in fewer operator calls (scatter sums instead
    of one-hot products; a non-finite value still spoils only its own group's moments), plus
    each sample's group moments: ``(mean, var, count, mean_n, var_n)``."""
    # (bincount has no meta kernel; a scatter sum of ones works on every device)
    count = m.new_zeros(k).index_add_(0, groups, m.new_ones(m.shape[0]))
    denom = count.clamp_min(1).unsqueeze(1)
    mean = m.new_zeros(k, m.shape[1]).index_add_(0, groups, m).div_(denom)
    mean_n = mean.index_select(0, groups)
    spread = (m - mean_n).square_().add_(q)
    var = m.new_zeros(k, m.shape[1]).index_add_(0, groups, spread).div_(denom)
    return mean, var, count, mean_n, var.index_select(0, groups)


class _NormAffine(torch.autograd.Function):
    """Batch normalization and a ``(C,)`` or ``(N, C)`` affine of a contiguous ``(N, C, *S)``
    input, statistics from per-(sample, channel) shifted sums (as :func:`sample_moments`) over
    the whole batch or over each group of samples; one pass to apply (:func:`scale_shift`);
    backward :func:`_affine_norm_backward`."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        w: Tensor | None,
        b: Tensor | None,
        groups: Tensor | None,
        k: int,
        eps: float,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # For a contiguous input in the statistics dtype, the shifted copy d made for the
        # moments becomes the output, in place (one activation-sized allocation fewer).
        m, q, centred = centred_moments(x)
        if groups is None:
            mean = m.mean(0)
            var = (m - mean).square_().add_(q).mean(0)
            count = mean.new_ones(())
            mean_n, var_n = mean, var
        else:
            mean, var, count, mean_n, var_n = _group_moments(m, q, groups, k)
        invstd = (var_n + eps).rsqrt_()
        scale = invstd if w is None else invstd * w
        if centred is not None:
            # scale · x + (b − scale · μ) = scale · d + (b − scale · (μ − first)): d = x − first.
            d, first = centred
            shift = _shift(mean_n - first, scale, b)
            y = scale_shift(d.view(x.shape), scale, shift, inplace=True)
        else:
            y = scale_shift(x, scale, _shift(mean_n, scale, b))
        ctx.save_for_backward(x, w, b, groups, mean_n, invstd, count)
        ctx.k, ctx.eps = k, eps
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(
        ctx: Any, gy: Tensor, *_: Any
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None, None]:
        x, w, b, groups, mean_n, invstd, count = ctx.saved_tensors
        if torch.is_grad_enabled():
            dx, dw, db = _reference_grads(ctx, x, w, b, groups, ctx.k, ctx.eps, gy)
        else:
            cnt = None if groups is None else count
            dx, dw, db = _affine_norm_backward(ctx, gy, x, w, mean_n, invstd, groups, cnt)
        return dx, dw, db, None, None, None


def core_kernel(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    domain_weight: Tensor | None,
    domain_bias: Tensor | None,
    domain: int | Tensor,
    groups: int,
    eps: float,
    running: tuple[Tensor | None, Tensor, Tensor, int, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`norm_affine` of the shared ``(C,)`` affine followed by the domain's (a row of the
    ``(K, C)`` tables, by ``domain``), in normkit's compiled kernel: ``(y, mean, var, count)``
    with ``(G, C)`` statistics, ``G = groups`` (the statistics of each domain of the ``(N,)``
    index ``domain``) or 1 (``groups == 0``, the whole batch). ``x`` contiguous or
    channels_last float32/float64 on the CPU, every tensor in its dtype.

    ``running`` is ``(running_mean, running_var, num_batches_tracked, row, momentum)``: the
    kernel then also folds the statistics into those ``(R, C)`` buffers as
    :func:`normkit._stats.track_batch_` does (row ``g`` into buffer row ``g``, or the single
    row into buffer row ``row >= 0``; ``momentum < 0`` for the cumulative average).
    """
    index = domain if isinstance(domain, Tensor) else None
    dom = domain if isinstance(domain, int) else 0
    rm, rv, nbt, row, momentum = (None, None, None, -1, 0.0) if running is None else running
    # One operator whose autograd node is C++ too (normkit/csrc/core.cpp: CoreFunction), double
    # backward included: a Python autograd.Function costs more than the kernel at small sizes.
    out: tuple[Tensor, Tensor, Tensor, Tensor] = kernels.op("core_forward")(
        x,
        weight,
        bias,
        domain_weight,
        domain_bias,
        index,
        dom,
        groups,
        eps,
        rm,
        rv,
        nbt,
        row,
        momentum,
    )
    return out


def norm_affine(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    groups: Tensor | None = None,
    num_groups: int = 1,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``weight · (x − μ) / sqrt(σ² + eps) + bias`` for a contiguous ``(N, C, *spatial)`` input.

    μ and the biased σ² are per channel over the whole batch (``groups`` None) or over the
    samples of each group (``groups`` an ``(N,)`` LongTensor in ``[0, num_groups)``).

    Args:
        weight, bias: None, ``(C,)`` or ``(N, C)``, in the statistics dtype; both or neither.

    Returns:
        ``(y, mean, var, count)``, the last three detached: ``mean`` and ``var`` ``(C,)``, or
        ``(K, C)`` per group; ``count`` the samples per group ``(K,)`` (a 0-d one otherwise).
    """
    return _NormAffine.apply(x, weight, bias, groups, num_groups, eps)


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor, *, inplace: bool = False) -> Tensor:
    """``scale · x + shift`` with a ``(C,)`` or ``(N, C)`` scale and shift, without a graph.

    A broadcast multiply, then an in-place add: on CPU about twice as fast as ``addcmul`` with
    two broadcast operands, and than ATen's inference batch norm on the ``(1, N·C, S)`` view
    (measured with the outputs kept alive, as in training). The scale and shift are cast to
    ``x``'s dtype first, as :func:`normkit.functional.apply_scale_shift` does; the output has
    ``x``'s dtype and memory format; ``inplace=True`` overwrites ``x`` with it.
    """
    if inplace:
        return x.mul_(_view(scale, x)).add_(_view(shift, x))
    return (x * _view(scale, x)).add_(_view(shift, x))


_CONSTANTS: dict[tuple[int, torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}


def _zeros_ones(size: int, like: Tensor) -> tuple[Tensor, Tensor]:
    """Read-only zeros and ones of ``size`` (the running statistics handed to ATen's inference
    batch norm), kept between calls: allocating and filling them costs more than the pass."""
    key = (size, like.dtype, like.device)
    pair = _CONSTANTS.get(key)
    if pair is None:
        if len(_CONSTANTS) >= 64:
            _CONSTANTS.clear()
        pair = (like.new_zeros(size), like.new_ones(size))
        _CONSTANTS[key] = pair
    return pair


def in_dual_level() -> bool:
    """Whether a ``torch.autograd.forward_ad.dual_level`` is open (forward-mode AD may run)."""
    return getattr(_forward_ad, "_current_level", -1) >= 0


def fast_paths_apply(x: Tensor) -> bool:
    """Whether the fused eager paths may run: not while tracing for ``torch.compile`` or
    ``torch.export`` (which fuse the reference path themselves), and neither under
    ``torch.func`` transforms nor inside a ``torch.autograd.forward_ad.dual_level`` (the
    custom functions, Python and C++, define no vmap or jvp rule; the reference path's ATen
    operators do)."""
    if torch.compiler.is_compiling() or in_dual_level():
        return False
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return not (active is not None and active())


def kernel_call_applies(layer: Any, x: Tensor, *, one_value_ok: bool = False) -> bool:
    """The gates of a layer's short route into the compiled kernels (its ``_kernel_call``)
    that the kernel does not check itself: training, ``fast``, an input the kernels take
    (:func:`normkit.kernels.applies`) of a rank and channel count the layer accepts, more than
    one value per channel (unless ``one_value_ok``), no synchronization, no tracing. Anything
    else goes down the layer's full path, whose checks name the problem."""
    return (
        layer.training
        and layer.fast
        and type(x) is Tensor
        and kernels.applies(x)
        and x.dim() in layer._ranks
        and x.shape[1] == layer.num_features
        and x.numel() > (0 if one_value_ok else x.shape[1])
        and not layer._syncing()
        and fast_paths_apply(x)
    )


Fold = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ClosedFold:
    """A fold for :func:`moment_scale_shift` that also supplies its own first-order backward.

    ``backward(x, m, q, gy, params, need_x)`` returns ``(dx or None, grads)`` with one gradient
    (or None) per entry of ``params``, as the generic backward (autograd on the fold) would;
    it replaces that generic backward, whose many small autograd nodes cost more than the
    passes at small sizes. Double backward still differentiates ``fold`` itself.
    """

    fold: Fold
    backward: Callable[..., tuple[Tensor | None, list[Tensor | None]]]


def sample_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and biased variance, without a graph, in few fast passes.

    The same values as :func:`normkit.functional.sample_moments` (whose ``var_mean`` is a slow
    Welford loop on CPU), from a sum and a sum of squares of ``x − x[..., 0]``: the shift by a
    value of the same (sample, channel) keeps the cancellation in ``E[d²] − E[d]²`` to a few
    units in the last place when the mean is far from zero. Statistics dtype as in
    :func:`normkit.functional.stats_dtype`.
    """
    dtype = F.stats_dtype(x.dtype)
    with torch.no_grad():
        if x.dim() == 2:
            xf = x.to(dtype)
            return xf, torch.zeros_like(xf)
        n, c = x.shape[0], x.shape[1]
        s = x.numel() // (n * c)
        if x.is_contiguous():
            m, q, _, _ = _plane_moments(x)
            return m, q
        last = _channels_last_view(x)
        if last is not None:
            # (N, S, C) view of a channels-last input: sums over the middle dimension, vector-
            # wise over the channels (a norm over it is several times slower than this).
            first = last[:, :1, :].to(dtype)
            d = torch.sub(last, first)
            mean_d = d.sum(1).div_(s)
            q = d.square_().sum(1).div_(s).sub_(mean_d.square()).clamp_min_(0)
            return first.view(n, c) + mean_d, q
        dims = list(range(2, x.dim()))
        first = x[(slice(None), slice(None)) + (0,) * len(dims)].to(dtype)
        d = torch.sub(x, first.view(n, c, *([1] * len(dims))))
        mean_d = d.sum(dims) / s
        sq = torch.linalg.vector_norm(d, dim=dims).square_() / s
        q = (sq - mean_d.square()).clamp_min_(0)
        return first + mean_d, q


def centred_moments(x: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
    """:func:`sample_moments`, plus, for a contiguous input in the statistics dtype, the
    ``centred`` pair that lets :func:`moment_scale_shift` write its output into the shifted
    copy the moments were computed from (None otherwise)."""
    if x.dim() > 2 and x.is_contiguous() and x.dtype == F.stats_dtype(x.dtype):
        with torch.no_grad():
            m, q, d, first = _plane_moments(x)
        return m, q, (d, first)
    m, q = sample_moments(x)
    return m, q, None


def _plane_moments(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`sample_moments` of a contiguous ``(N, C, *S)`` input, with its by-products:
    ``(m, q, d, first)`` where ``d = x − first`` as ``(N·C, S)`` rows in the statistics dtype
    (a fresh tensor the caller may overwrite) and ``first = x[..., 0]``, ``(N, C)``."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // (n * c)
    # One (sample, channel) plane per row: inner-dimension reductions, the fastest.
    rows = x.view(n * c, s)
    first = rows[:, :1].to(F.stats_dtype(x.dtype))
    d = torch.sub(rows, first)
    mean_d = d.sum(1).div_(s)
    sq = torch.linalg.vector_norm(d, dim=1).square_().div_(s)
    q = sq.sub_(mean_d.square()).clamp_min_(0)
    first = first.view(n, c)
    return first + mean_d.view(n, c), q.view(n, c), d, first


def _channels_last_view(x: Tensor) -> Tensor | None:
    """``x`` of shape ``(N, C, *S)`` as an ``(N, S, C)`` view when its channels are the
    innermost dimension (channels_last, channels_last_3d), else None."""
    if x.dim() < 3:
        return None
    moved = x.movedim(1, -1)
    if not moved.is_contiguous():
        return None
    return moved.view(x.shape[0], -1, x.shape[1])


def moment_scale_shift(
    x: Tensor,
    m: Tensor,
    q: Tensor,
    fold: Fold | ClosedFold,
    *params: Any,
    centred: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``y = scale · x + shift`` where ``(scale, shift) = fold(m, q, *params)``.

    ``m`` and ``q`` must be ``x``'s per-(sample, channel) mean and biased variance (from
    :func:`normkit.functional.sample_moments`, computed without a graph); ``fold`` maps them and
    ``params`` (tensors or None) to a per-channel ``(C,)`` or per-(sample, channel) ``(N, C)``
    scale and shift, and must be pure: the backward calls it again. Gradients reach ``x``
    through the output and through ``m`` and ``q``, and reach every tensor in ``params``.

    The forward is one pass over ``x`` after the moments; the backward is one fused reduction
    (``Σ_s g`` and ``Σ_s g · x`` per (n, c)), autograd on the ``(N, C)``-sized fold, and one
    elementwise pass: ``∂x = scale · g + ∂m / S + 2 ∂q (x − m) / S``.
    """
    return _MomentScaleShift.apply(x, m.detach(), q.detach(), fold, centred, *params)


def _fold_full(
    fold: Fold | ClosedFold, m: Tensor, q: Tensor, params: tuple[Any, ...]
) -> tuple[Tensor, Tensor]:
    fn = fold.fold if isinstance(fold, ClosedFold) else fold
    scale, shift = fn(m, q, *params)
    scale, shift = torch.broadcast_tensors(scale, shift)
    return scale, shift


class _MomentScaleShift(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        m: Tensor,
        q: Tensor,
        fold: Fold | ClosedFold,
        centred: tuple[Tensor, Tensor] | None,
        *params: Any,
    ) -> Tensor:
        scale, shift = _fold_full(fold, m, q, params)
        ctx.fold = fold
        # Tensors are saved (version-checked); other arguments (an int domain, None) kept as is.
        ctx.is_tensor = [isinstance(p, Tensor) for p in params]
        ctx.constants = [None if isinstance(p, Tensor) else p for p in params]
        ctx.save_for_backward(x, m, q, *(p for p in params if isinstance(p, Tensor)))
        if centred is not None:
            # The caller's shifted copy d = x − first becomes the output, in place.
            d, first = centred
            shift = torch.addcmul(shift, scale, first)
            return scale_shift(d.view(x.shape), scale, shift, inplace=True)
        return scale_shift(x, scale, shift)

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Any, ...]:
        x, m, q, *tensors = ctx.saved_tensors
        saved = iter(tensors)
        params = [next(saved) if t else c for t, c in zip(ctx.is_tensor, ctx.constants)]
        needs = ctx.needs_input_grad
        want_params = [i for i, p in enumerate(params) if isinstance(p, Tensor) and needs[5 + i]]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference composition, whose second
            # derivatives see the moments as functions of x.
            with torch.enable_grad():
                x, *params = aliases(x, *params)
                mm, qq = F.sample_moments(x)
                scale, shift = _fold_full(ctx.fold, mm, qq, tuple(params))
                y = F.apply_scale_shift(x, scale, shift)
            wanted = ([x] if needs[0] else []) + [params[i] for i in want_params]
            grads = list(torch.autograd.grad(y, wanted, gy, create_graph=True, allow_unused=True))
            dx = grads.pop(0) if needs[0] else None
            out_p: list[Any] = [None] * len(params)
            for i, g in zip(want_params, grads):
                out_p[i] = g
            return (dx, None, None, None, None, *out_p)

        if isinstance(ctx.fold, ClosedFold):
            dx, grads_p = ctx.fold.backward(x, m, q, gy, params, needs[0])
            out_c = [g if isinstance(p, Tensor) and needs[5 + i] else None
                     for i, (p, g) in enumerate(zip(params, grads_p))]  # fmt: skip
            return (dx if needs[0] else None, None, None, None, None, *out_c)

        leaves = [p.detach().requires_grad_(True) if i in want_params else p
                  for i, p in enumerate(params)]  # fmt: skip
        ml = m.detach().requires_grad_(needs[0])
        ql = q.detach().requires_grad_(needs[0])
        with torch.enable_grad():
            scale, shift = _fold_full(ctx.fold, ml, ql, tuple(leaves))
        a, p = _sums(gy, x, m)
        if scale.dim() == 1:
            a, p = a.sum(0), p.sum(0)
        inputs = ([ml, ql] if needs[0] else []) + [leaves[i] for i in want_params]
        grads = list(
            torch.autograd.grad((scale, shift), inputs, (p, a), allow_unused=True) if inputs else ()
        )
        dx = None
        if needs[0]:
            gm, gq = grads.pop(0), grads.pop(0)
            n, c = x.shape[0], x.shape[1]
            s = x.numel() // (n * c)
            gm = torch.zeros_like(m) if gm is None else gm
            gq = torch.zeros_like(q) if gq is None else gq
            alpha = gq * (2.0 / s)
            beta = gm / s - alpha * m
            sc = scale.detach().expand(n, c) if scale.dim() == 1 else scale.detach()
            dx = scale_shift(x, alpha, beta).addcmul_(gy, _view(sc, x))
        out_params: list[Any] = [None] * len(params)
        for i, g in zip(want_params, grads):
            out_params[i] = g
        return (dx, None, None, None, None, *out_params)


def _sums(gy: Tensor, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) ``Σ_s g`` and ``Σ_s g · x`` (in ``m``'s dtype)."""
    a, pc = _centred_sums(gy, x, m)
    return a, pc + m * a


def _centred_sums(gy: Tensor, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) ``Σ_s g`` and ``Σ_s g · (x − m)`` for a ``(C,)`` or ``(N, C)``
    centre ``m`` (in ``m``'s dtype), in one pass where the layout allows: ATen's batch-norm
    backward on the ``(1, N·C, S)`` view.
    """
    n, c = x.shape[0], x.shape[1]
    if x.dim() == 2:
        a = gy.to(m.dtype)
        return a, a * (x.to(m.dtype) - m)
    if x.is_contiguous() and gy.is_contiguous():
        s = x.numel() // (n * c)
        flat_m = m.repeat(n) if m.dim() == 1 else m.reshape(n * c)
        _, pc, a = torch.ops.aten.native_batch_norm_backward(
            gy.view(1, n * c, s),
            x.view(1, n * c, s),
            None,
            None,
            None,
            flat_m,
            _zeros_ones(n * c, flat_m)[1],
            True,
            0.0,
            [False, True, True],
        )
        a, pc = a.view(n, c), pc.view(n, c)
        if a.dtype != m.dtype:
            a, pc = a.to(m.dtype), pc.to(m.dtype)
        return a, pc
    xl, gl = _channels_last_view(x), _channels_last_view(gy)
    if xl is not None and gl is not None and x.dtype == gy.dtype == m.dtype:
        a = gl.sum(1)
        return a, torch.linalg.vecdot(gl, xl, dim=1) - m * a
    dims = list(range(2, x.dim()))
    a = gy.sum(dims, dtype=m.dtype)
    return a, (gy * x).sum(dims, dtype=m.dtype) - m * a


def weight_standardize(
    weight: Tensor, eps: float, *, unbiased: bool = False, eps_mode: str = "sqrt"
) -> Tensor:
    """:func:`normkit.functional.weight_standardize` (same arguments and result; ``eps_mode``
    one of the three modes, as the layers check at construction) with a closed-form backward.

    Per output filter ``o`` with fan-in ``K``, ``d = w − mean``, ``v = Σ d² / (K − c)``
    (``c = 1`` when unbiased) and ``inv = 1 / σ(v)`` of the eps mode, ``ŵ = d · inv``; with
    ``g`` the gradient of ``ŵ`` and ``A = Σ g``, ``B = Σ g · d``:

    ``∂w = inv · (g − A / K) + κ · d`` where ``κ = B · inv′(v) · 2 / (K − c)``.

    The forward is the reference computation itself (:func:`normkit.functional.
    standardize_parts`), so the outputs are identical; autograd's backward of it is about ten
    passes over the weight, this one five.
    """
    out: Tensor = _WeightStandardize.apply(weight, eps, unbiased, eps_mode)
    return out


_EPS_MODES = {"sqrt": 0, "std": 1, "max": 2}


def weight_standardize_kernel(
    weight: Tensor, eps: float, *, unbiased: bool = False, eps_mode: str = "sqrt"
) -> Tensor:
    """:func:`weight_standardize` in normkit's compiled kernel (:mod:`normkit.kernels`): one
    operator call each way with its autograd node in C++, the statistics in double; for a
    float32 or float64 CPU weight (``kernels.takes_weight``)."""
    out: Tensor = kernels.op("ws_standardize")(weight, eps, unbiased, _EPS_MODES[eps_mode])
    return out


def _inv_std(var: Tensor, eps: float, eps_mode: str) -> tuple[Tensor, Tensor]:
    """``(inv, d inv / d var)`` of each eps mode (the derivative as autograd gives it)."""
    if eps_mode == "sqrt":
        inv = (var + eps).rsqrt_()
        return inv, inv.pow(3).mul_(-0.5)
    if eps_mode == "std":
        std = var.sqrt()
        inv = (std + eps).reciprocal_()
        return inv, inv.square().neg_().div_(std * 2)
    inv = var.clamp_min(eps).rsqrt_()
    return inv, torch.where(var >= eps, inv.pow(3).mul_(-0.5), 0.0)


class _WeightStandardize(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, weight: Tensor, eps: float, unbiased: bool, eps_mode: str) -> Tensor:
        w = weight.to(F.stats_dtype(weight.dtype))
        out, _, var = F.standardize_parts(w, eps, unbiased, eps_mode, inplace=True)
        o = weight.shape[0]
        inv, dinv = _inv_std(var.view(o, 1), eps, eps_mode)
        # The standardized weight (saved by the convolution anyway) stands in for the centred
        # one in backward: d = Ŵ / inv.
        ctx.save_for_backward(weight, out, inv, dinv)
        ctx.eps, ctx.unbiased, ctx.eps_mode = eps, unbiased, eps_mode
        return out.to(weight.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        weight, out, inv, dinv = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference formula (double backward).
            with torch.enable_grad():
                ref = F.weight_standardize(
                    weight, ctx.eps, unbiased=ctx.unbiased, eps_mode=ctx.eps_mode
                )
                (dw,) = torch.autograd.grad(ref, weight, grad, create_graph=True)
            return dw, None, None, None
        o = weight.shape[0]
        w_hat = out.reshape(o, -1)
        g = grad.reshape(o, -1)
        if g.dtype != inv.dtype:  # half weights: the arithmetic in float32
            g = g.to(inv.dtype)
        k = w_hat.shape[1]
        zeros, ones = _zeros_ones(o, inv)
        _, b, a = torch.ops.aten.native_batch_norm_backward(
            g.contiguous().view(1, o, k),
            w_hat.contiguous().view(1, o, k),
            None,
            None,
            None,
            zeros,
            ones,
            True,
            0.0,
            [False, True, True],
        )
        # B = Σ g · d = Σ g · Ŵ / inv; κ = B · inv′(v) · 2 / (K − c); ∂w = inv · g + (κ / inv)
        # · Ŵ − inv · A / K.
        kappa_inv = b.view(o, 1).mul_(dinv).mul_(2.0 / (k - int(ctx.unbiased))).div_(inv.square())
        dw = (g * inv).addcmul_(w_hat, kappa_inv).sub_(inv * a.view(o, 1) / k)
        return dw.view(weight.shape).to(weight.dtype), None, None, None
