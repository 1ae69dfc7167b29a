"""Fast training paths of the batch-norm layers, equal to their reference paths.

The reference path of a layer (its formula through autograd: ``functional.batch_moments`` or
``functional.sample_moments``, then ``functional.apply_scale_shift``) is the specification and
stays in use wherever these paths do not apply (synchronized statistics, empty batches, eval,
tracing for ``torch.compile``/``torch.export``, ``torch.func`` transforms). Here:

* :func:`moment_scale_shift` (contiguous inputs, and every per-sample split-statistics or BCN
  call): per-(sample, channel) moments from shifted sums (:func:`sample_moments`), a small
  ``(N, C)`` fold that turns them into one scale and shift, and one pass to apply it
  (:func:`scale_shift`). A custom autograd function: its backward is one fused reduction, autograd
  on the fold, and one elementwise pass.
* :func:`batch_norm_train` (other layouts: channels_last, ``(N, C)``): ATen's batch norm with the
  per-channel affine folded into its weight and bias, or, for a per-(sample, channel) affine,
  :class:`_AffineBatchNorm` (ATen's batch norm without affine, one in-place multiply-add, a
  closed-form backward).

On CPU both ATen's batch norm and ``torch.var_mean`` reduce with a slow Welford loop over
contiguous NCHW data; plain sums of ``x − x[..., 0]`` are several times faster, and ATen's
inference batch norm on the ``(1, N·C, S)`` view is the fastest per-(n, c) scale-and-shift.
``tests/test_fast_paths.py`` checks every path against the reference to 1e-10 in float64.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from normkit import functional as F

__all__ = [
    "MOMENT_PATH_MIN_NUMEL",
    "batch_norm_train",
    "fast_paths_apply",
    "moment_scale_shift",
    "sample_moments",
    "scale_shift",
]


MOMENT_PATH_MIN_NUMEL = 1 << 19
"""Training inputs of at least this many elements take :func:`moment_scale_shift`; below it the
layers use ATen's batch norm (:func:`batch_norm_train`) where it applies, else their reference
path: with small tensors the operator calls of the custom function's backward (a fold recomputed
under autograd) cost more than the passes it saves. Chosen from 1- and 2-thread CPU timings
(``normkit bench``; at 2x512x8x8, 1 thread: BCN 4.4 ms fused, 3.5 ms reference)."""


def _view(t: Tensor, x: Tensor) -> Tensor:
    """A ``(C,)`` or ``(N, C)`` tensor viewed to broadcast against ``x`` of shape (N, C, ...)."""
    shape = [t.shape[0] if t.dim() == 2 else 1, x.shape[1]] + [1] * (x.dim() - 2)
    return t.reshape(shape)


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


def _reference(x: Tensor, w: Tensor, b: Tensor, eps: float) -> Tensor:
    """The same function through autograd (for double backward)."""
    dims = [0, *range(2, x.dim())]
    xf = x.to(w.dtype)
    var, mean = torch.var_mean(xf, dim=dims, correction=0)
    scale = w * torch.rsqrt(var + eps)
    shift = b - mean * scale
    return torch.addcmul(_view(shift, x), xf, _view(scale, x)).to(x.dtype)


class _AffineBatchNorm(torch.autograd.Function):
    """``y = w[n, c] · x̂ + b[n, c]``, with ``x̂`` batch-normalized per channel.

    Backward, with ``g`` the output gradient, ``M = N·S`` and per-(n, c) sums over the spatial
    positions ``A = Σ_s g`` and ``B = Σ_s g · x̂``:

    ``∂w = B``, ``∂b = A``, and ``∂x = invstd · (w g − Σ_n wA / M − x̂ · Σ_n wB / M)``, which is
    ``α[n, c] · g + β[c] · x + γ[c]``: two passes over the activation.
    """

    @staticmethod
    def forward(x: Tensor, w: Tensor, b: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
        ones = torch.ones(x.shape[1], dtype=w.dtype, device=x.device)
        y, mean, invstd = torch.native_batch_norm(
            x, ones, torch.zeros_like(ones), None, None, True, 0.0, eps
        )
        torch.addcmul(_view(b, x).to(y.dtype), y, _view(w, x).to(y.dtype), out=y)
        return y, mean, invstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Any, ...]) -> None:
        x, w, b, eps = inputs
        _, mean, invstd = output
        ctx.save_for_backward(x, w, b, mean, invstd)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, invstd)

    @staticmethod
    def backward(
        ctx: Any, gy: Tensor, _gmean: Tensor | None, _ginvstd: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, None]:
        x, w, b, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference form, so that second derivatives
            # see the statistics as functions of x.
            wanted = [t for t, need in zip((x, w, b), ctx.needs_input_grad[:3]) if need]
            with torch.enable_grad():
                grads = iter(
                    torch.autograd.grad(_reference(x, w, b, ctx.eps), wanted, gy, create_graph=True)
                )
            out = [next(grads) if need else None for need in ctx.needs_input_grad[:3]]
            return out[0], out[1], out[2], None
        n, c = x.shape[0], x.shape[1]
        s = x.numel() // (n * c)
        a, p = _sums(gy, x, mean.expand(n, c))
        bb = invstd * (p - mean * a)
        m = n * s
        sa = (w * a).sum(0)
        sb = (w * bb).sum(0)
        beta = -invstd.square() * sb / m
        gamma = -invstd * sa / m - mean * beta
        alpha = invstd * w
        dx = scale_shift(x, beta, gamma).addcmul_(gy, _view(alpha, x).to(x.dtype))
        return dx, bb, a, None


def scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale · x + shift`` with a ``(C,)`` or ``(N, C)`` scale and shift, without a graph.

    On a contiguous input this is ATen's inference batch norm on the ``(1, N·C, S)`` view (zero
    mean, unit variance, eps 0, so its per-channel factor is exactly the given scale): a plain
    loop per (sample, channel) plane, several times faster on CPU than ``addcmul`` with two
    broadcast operands. Other layouts use ``addcmul``. The output has ``x``'s dtype and layout.
    """
    n, c = x.shape[0], x.shape[1]
    if x.dim() > 2 and x.is_contiguous() and x.numel() > 0:
        pdtype = F.stats_dtype(x.dtype)
        w = scale.to(pdtype).expand(n, c).reshape(n * c)
        b = shift.to(pdtype).expand(n, c).reshape(n * c)
        zeros = torch.zeros_like(w)
        y = torch.native_batch_norm(
            x.view(1, n * c, -1), w, b, zeros, torch.ones_like(w), False, 0.0, 0.0
        )[0]
        return y.view(x.shape)
    return torch.addcmul(_view(shift, x).to(x.dtype), x, _view(scale, x).to(x.dtype))


def fast_paths_apply(x: Tensor) -> bool:
    """Whether the fused eager paths may run: not while tracing for ``torch.compile`` or
    ``torch.export`` (which fuse the reference path themselves) and not under ``torch.func``
    transforms (the custom functions define no vmap or jvp rule)."""
    if torch.compiler.is_compiling():
        return False
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return not (active is not None and active())


Fold = Callable[..., tuple[Tensor, Tensor]]


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
        dims = list(range(2, x.dim()))
        s = x.numel() // (n * c)
        first = x[(slice(None), slice(None)) + (0,) * len(dims)].to(dtype)
        d = torch.sub(x, first.view(n, c, *([1] * len(dims))))
        mean_d = d.sum(dims) / s
        sq = torch.linalg.vector_norm(d, dim=dims).square_() / s
        q = (sq - mean_d.square()).clamp_min_(0)
        return first + mean_d, q


def moment_scale_shift(x: Tensor, m: Tensor, q: Tensor, fold: Fold, *params: Any) -> Tensor:
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
    return _MomentScaleShift.apply(x, m.detach(), q.detach(), fold, *params)


def _fold_full(fold: Fold, m: Tensor, q: Tensor, params: tuple[Any, ...]) -> tuple[Tensor, Tensor]:
    scale, shift = fold(m, q, *params)
    scale, shift = torch.broadcast_tensors(scale, shift)
    return scale, shift


class _MomentScaleShift(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, m: Tensor, q: Tensor, fold: Fold, *params: Any) -> Tensor:
        scale, shift = _fold_full(fold, m, q, params)
        return scale_shift(x, scale, shift)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, m, q, fold, *params = inputs
        ctx.fold = fold
        # Tensors are saved (version-checked); other arguments (an int domain, None) kept as is.
        ctx.is_tensor = [isinstance(p, Tensor) for p in params]
        ctx.constants = [None if isinstance(p, Tensor) else p for p in params]
        ctx.save_for_backward(x, m, q, *(p for p in params if isinstance(p, Tensor)))

    @staticmethod
    def backward(ctx: Any, gy: Tensor) -> tuple[Any, ...]:
        x, m, q, *tensors = ctx.saved_tensors
        saved = iter(tensors)
        params = [next(saved) if t else c for t, c in zip(ctx.is_tensor, ctx.constants)]
        needs = ctx.needs_input_grad
        want_params = [i for i, p in enumerate(params) if isinstance(p, Tensor) and needs[4 + i]]
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference composition, whose second
            # derivatives see the moments as functions of x.
            with torch.enable_grad():
                mm, qq = F.sample_moments(x)
                scale, shift = _fold_full(ctx.fold, mm, qq, tuple(params))
                y = F.apply_scale_shift(x, scale, shift)
            wanted = ([x] if needs[0] else []) + [params[i] for i in want_params]
            grads = list(torch.autograd.grad(y, wanted, gy, create_graph=True, allow_unused=True))
            dx = grads.pop(0) if needs[0] else None
            out_p: list[Any] = [None] * len(params)
            for i, g in zip(want_params, grads):
                out_p[i] = g
            return (dx, None, None, None, *out_p)

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
            dx = scale_shift(x, alpha, beta).addcmul_(gy, _view(sc, x).to(x.dtype))
        out_params: list[Any] = [None] * len(params)
        for i, g in zip(want_params, grads):
            out_params[i] = g
        return (dx, None, None, None, *out_params)


def _sums(gy: Tensor, x: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) ``Σ_s g`` and ``Σ_s g · x`` (in ``m``'s dtype), in one pass where
    the layout allows: ATen's batch-norm backward on the ``(1, N·C, S)`` view, centred on ``m``.
    """
    n, c = x.shape[0], x.shape[1]
    if x.dim() == 2:
        a = gy.to(m.dtype)
        return a, a * x.to(m.dtype)
    if x.is_contiguous() and gy.is_contiguous():
        s = x.numel() // (n * c)
        flat_m = m.reshape(n * c)
        _, pc, a = torch.ops.aten.native_batch_norm_backward(
            gy.reshape(1, n * c, s),
            x.reshape(1, n * c, s),
            None,
            None,
            None,
            flat_m,
            torch.ones_like(flat_m),
            True,
            0.0,
            [False, True, True],
        )
        a = a.view(n, c).to(m.dtype)
        return a, pc.view(n, c).to(m.dtype) + m * a
    dims = list(range(2, x.dim()))
    return gy.sum(dims, dtype=m.dtype), (gy * x).sum(dims, dtype=m.dtype)
