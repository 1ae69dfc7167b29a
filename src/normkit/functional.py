"""The math core of normkit: pure functions on tensors.

Nothing here holds state or knows about modules. Layers compute moments with these functions,
update their buffers (``normkit._stats``) and finish with one fused per-(sample, channel)
scale-and-shift (:func:`apply_scale_shift`).

Conventions used throughout:

* ``x`` has shape ``(N, C, *spatial)``; ``S`` is the product of the spatial sizes (1 when there
  are none).
* Moments are returned in the *statistics dtype*: float32 for half and bfloat16 inputs, the input
  dtype otherwise (so float64 inputs keep float64 precision for testing).
* Variances are biased (divide by the count) and clamped at 0.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

__all__ = [
    "apply_scale_shift",
    "batch_moments",
    "domain_moments",
    "group_moments",
    "merge_sample_moments",
    "sample_moments",
    "stats_dtype",
    "weight_standardize",
]


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are accumulated in for inputs of ``dtype``.

    Half-precision inputs get float32 statistics; float32 and float64 keep their own precision.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def _upcast(x: Tensor) -> Tensor:
    target = stats_dtype(x.dtype)
    return x if x.dtype == target else x.to(target)


def _no_autocast(t: Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast off on ``t``'s device, where it is on: autocast runs matmuls in half precision,
    which would round float32 statistics to 8 (bfloat16) or 11 (float16) significant bits."""
    device = t.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return torch.autocast(device, enabled=False)
    return contextlib.nullcontext()


def batch_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance over every dimension but the channel one.

    Args:
        x: ``(N, C, *spatial)``.

    Returns:
        ``(mean, var)``, each of shape ``(C,)`` in the statistics dtype.
    """
    dims = [0, *range(2, x.dim())]
    if x.numel() == 0:
        # An empty batch (one rank's share, say) has no moments: report zeros that stay in the
        # graph, so a synchronized layer's backward collective runs on this rank too.
        zeros = _upcast(x).sum(dim=dims)
        return zeros, zeros.clone()
    var, mean = torch.var_mean(_upcast(x), dim=dims, correction=0)
    return mean, var.clamp_min(0)


def sample_moments(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) mean and biased variance over the spatial dimensions.

    Args:
        x: ``(N, C, *spatial)``. With no spatial dimensions the mean is ``x`` itself and the
            variance is 0.

    Returns:
        ``(m, q)``, each of shape ``(N, C)`` in the statistics dtype.
    """
    xf = _upcast(x)
    if x.dim() == 2:
        return xf, torch.zeros_like(xf)
    if x.numel() == 0:  # zeros in the graph, as in batch_moments
        zeros = xf.sum(dim=list(range(2, x.dim())))
        return zeros, zeros.clone()
    var, mean = torch.var_mean(xf, dim=list(range(2, x.dim())), correction=0)
    return mean, var.clamp_min(0)


def merge_sample_moments(m: Tensor, q: Tensor) -> tuple[Tensor, Tensor]:
    """Merge per-sample moments of equal counts into per-channel moments (Chan et al.).

    ``mean_c = mean_n m[n, c]`` and ``var_c = mean_n (q[n, c] + (m[n, c] - mean_c)^2)``, which
    equals the biased variance over ``(N, *spatial)``.
    """
    if m.shape[0] == 0:  # no samples: zeros in the graph, as in batch_moments (not NaN)
        zeros = m.sum(dim=0)
        return zeros, zeros.clone()
    mean = m.mean(dim=0)
    var = (q + (m - mean).square()).mean(dim=0)
    return mean, var.clamp_min(0)


def domain_moments(
    m: Tensor, q: Tensor, index: Tensor, num_domains: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-domain, per-channel moments from per-sample moments.

    Args:
        m, q: per-sample means and biased variances, ``(N, C)`` (from :func:`sample_moments`).
        index: ``(N,)`` int64 (``LongTensor``) domain of each sample, in ``[0, num_domains)``
            (``one_hot`` takes no other integer dtype; the layers cast their index first).
        num_domains: K.

    Returns:
        ``(mean, var, count)``: ``mean`` and ``var`` of shape ``(K, C)`` (biased, over the
        samples of each domain and their spatial positions; 0 and 0 for a domain absent from
        the batch), and ``count`` of shape ``(K,)``, the number of samples of each domain.
        A (domain, channel) with a non-finite sample value has NaN moments; the other domains
        keep theirs.
    """
    onehot = torch.nn.functional.one_hot(index, num_domains).to(m.dtype)  # (N, K)
    count = onehot.sum(dim=0)  # (K,)
    denom = count.clamp_min(1).unsqueeze(1)
    # The one-hot product would spread a NaN or Inf to every domain (0 · NaN = NaN): sum the
    # finite values only, then mark the (domain, channel) pairs that had another one.
    bad = ~(torch.isfinite(m) & torch.isfinite(q))
    m, q = torch.where(bad, 0.0, m), torch.where(bad, 0.0, q)
    with _no_autocast(m):
        mean = (onehot.t() @ m) / denom
        dev = m - mean.index_select(0, index)
        var = (onehot.t() @ (q + dev.square())) / denom
        spoiled = (onehot.t() @ bad.to(m.dtype)) > 0
    nan = torch.full_like(mean, float("nan"))
    return torch.where(spoiled, nan, mean), torch.where(spoiled, nan, var.clamp_min(0)), count


def group_moments(
    m: Tensor, q: Tensor, scale: Tensor, shift: Tensor, num_groups: int
) -> tuple[Tensor, Tensor]:
    """Per-(sample, group) moments of ``y = scale * x + shift``, in closed form.

    For each (n, c), ``y`` has mean ``scale_c m_nc + shift_c`` and variance ``scale_c^2 q_nc``.
    A group of ``C / G`` consecutive channels merges them with equal counts.

    Args:
        m, q: per-sample moments of ``x``, ``(N, C)``.
        scale, shift: ``(C,)`` or ``(N, C)``.
        num_groups: G, dividing C.

    Returns:
        ``(mean, var)`` of shape ``(N, G)``, biased and clamped at 0.
    """
    n, c = m.shape
    ym = scale * m + shift  # (N, C)
    yq = scale.square() * q
    ym_g = ym.reshape(n, num_groups, c // num_groups)
    gmean = ym_g.mean(dim=2)
    gvar = yq.reshape(n, num_groups, c // num_groups) + (ym_g - gmean.unsqueeze(2)).square()
    gvar = gvar.mean(dim=2)
    return gmean, gvar.clamp_min(0)


def standardize_parts(
    w: Tensor, eps: float, unbiased: bool, eps_mode: str, *, inplace: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`weight_standardize`'s computation on an already upcast weight: ``(Ŵ, mean,
    var)`` with ``mean`` and ``var`` of shape ``(O, 1, ...)``.

    Plain passes (the shifted mean, then the norm of the centred filter), not ``var_mean``'s
    Welford loop, which is several times slower on CPU. ``inplace=True`` (no autograd) reuses
    one temporary for every step, with the same arithmetic: normkit's fast path calls it so,
    and gets the same bits as the reference.
    """
    dims = list(range(1, w.dim()))
    fan_in = w[0].numel()
    # Shifted by each filter's first value: a constant filter gives exactly 0, and a filter far
    # from zero loses no precision to its offset. The shift is a constant for autograd (any
    # value gives the same result), which keeps the first element's gradient free of
    # cancellation.
    first = w.detach().reshape(w.shape[0], -1)[:, :1].reshape([w.shape[0]] + [1] * (w.dim() - 1))
    shifted = w - first
    mean_shifted = shifted.sum(dim=dims, keepdim=True) / fan_in
    mean = first + mean_shifted
    d = shifted.sub_(mean_shifted) if inplace else shifted - mean_shifted
    norm = torch.linalg.vector_norm(d, dim=dims, keepdim=True)
    var = norm.square() / (fan_in - int(unbiased))
    if eps_mode == "sqrt":
        inv = torch.rsqrt(var + eps)
        out = d.mul_(inv) if inplace else d * inv
    elif eps_mode == "std":
        sigma = var.sqrt() + eps
        out = d.div_(sigma) if inplace else d / sigma
    else:
        inv = torch.rsqrt(var.clamp_min(eps))
        out = d.mul_(inv) if inplace else d * inv
    return out, mean, var


def apply_scale_shift(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``y = scale * x + shift`` in one pass, with a per-channel or per-(sample, channel) pair.

    Args:
        x: ``(N, C, *spatial)``.
        scale, shift: ``(C,)`` or ``(N, C)``; cast to ``x.dtype`` so the output keeps the input
            dtype and memory format.
    """
    view = [1] * x.dim()
    if scale.dim() == 2:
        view[0] = scale.shape[0]
    view[1] = x.shape[1]
    a = scale.to(x.dtype).reshape(view)
    b = shift.to(x.dtype).reshape(view)
    return torch.addcmul(b, x, a)


def weight_standardize(
    weight: Tensor, eps: float = 1e-5, *, unbiased: bool = False, eps_mode: str = "sqrt"
) -> Tensor:
    """Standardize each output filter (dim 0) of ``weight`` over its fan-in.

    ``Ŵ_o = (W_o − mean(W_o)) / σ(W_o)`` where, with ``var`` biased or unbiased:

    * ``eps_mode="sqrt"``: ``σ = sqrt(var + eps)`` (the paper's form; normkit's default);
    * ``eps_mode="std"``: ``σ = sqrt(var) + eps`` (the authors' PyTorch code);
    * ``eps_mode="max"``: ``σ = sqrt(max(var, eps))`` (NF-Nets-like: DeepMind's code thresholds
      ``var · fan_in`` at eps instead).

    With ``unbiased=True`` a fan-in of 1 has no variance estimate and gives NaN; the layers refuse
    it at construction.

    Statistics are computed in float32 for half-precision weights; the result has the weight's
    dtype.
    """
    if eps_mode not in ("sqrt", "std", "max"):
        raise ValueError(
            f"weight_standardize: eps_mode must be one of 'sqrt', 'std', 'max', got {eps_mode!r}"
        )
    if weight.dim() == 0:
        raise ValueError(
            "weight_standardize: expected a weight with an output dimension, got a 0-d tensor"
        )
    if weight.shape[0] == 0:  # no filters: nothing to standardize
        return weight.clone()
    if weight[0].numel() == 0:
        raise ValueError(
            "weight_standardize: expected filters with at least one value (a fan-in of 1 or "
            f"more), got a weight of shape {tuple(weight.shape)}"
        )
    out, _, _ = standardize_parts(_upcast(weight), eps, unbiased, eps_mode)
    return out.to(weight.dtype)
