"""Adaptive gradient clipping (AGC) of Brock, De, Smith & Simonyan, "High-Performance Large-Scale
Image Recognition Without Normalization", ICML 2021 (arXiv 2102.06171): the gradient clipping
that lets normalizer-free networks (NFNets) train at large batch sizes.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from normkit import functional as F
from normkit._checks import check_positive

__all__ = ["adaptive_grad_clip_"]

_WHERE = "adaptive_grad_clip_"


def _tensors(parameters: Tensor | Iterable[Tensor]) -> list[Tensor]:
    """``parameters`` as a list of tensors, refusing anything else before any gradient changes."""
    if isinstance(parameters, Tensor):
        return [parameters]
    try:
        items = list(parameters)
    except TypeError:
        raise TypeError(
            f"{_WHERE}: expected a tensor or an iterable of tensors (model.parameters()), got "
            f"{type(parameters).__name__}"
        ) from None
    for i, p in enumerate(items):
        if not isinstance(p, Tensor):
            raise TypeError(
                f"{_WHERE}: expected an iterable of tensors (parameters), got "
                f"{type(p).__name__} at position {i}"
            )
        if p.grad is not None and p.grad.layout != torch.strided:
            raise TypeError(
                f"{_WHERE}: expected dense gradients, got a {p.grad.layout} gradient at "
                f"position {i} (shape {tuple(p.shape)})"
            )
    return items


def _unit_norm(t: Tensor) -> Tensor:
    """The norm of each output unit of ``t``, shaped to broadcast against it.

    An output unit is a slice along dim 0 (a conv filter, a row of a linear weight); a 0-d or 1-d
    tensor (a bias, a norm's gain, a scalar) is one unit. Accumulated in float32 or wider.
    """
    dims = tuple(range(1, t.dim())) if t.dim() > 1 else None
    norm: Tensor = torch.linalg.vector_norm(t, dim=dims, keepdim=True, dtype=F.stats_dtype(t.dtype))
    return norm


@torch.no_grad()
def adaptive_grad_clip_(
    parameters: Tensor | Iterable[Tensor],
    clip_factor: float = 0.01,
    eps: float = 1e-3,
) -> Tensor:
    r"""Clip gradients unit-wise relative to the weights' norms (AGC), in place on ``.grad``.

    For each output unit :math:`i` of each parameter :math:`W` with gradient :math:`G`:

    .. math::
        G_i \leftarrow \begin{cases}
            λ \, \frac{\max(\lVert W_i \rVert, ε)}{\lVert G_i \rVert} \, G_i
                & \text{if } \frac{\lVert G_i \rVert}{\max(\lVert W_i \rVert, ε)} > λ \\
            G_i & \text{otherwise}
        \end{cases}

    with Frobenius norms and λ = ``clip_factor``. A clipped unit keeps its direction and gets the
    norm :math:`λ \max(\lVert W_i \rVert, ε)`; the others are left exactly as they were.

    Units: a unit is a slice of the parameter along dim 0 (one output filter of a conv,
    ``(C_out, C_in, kh, kw)``; one row of a linear weight, ``(out, in)``), its norm taken over all
    other dims. A 0-d or 1-d parameter (a bias, a gain, a scalar gate) is **one** unit, its norm
    the whole vector's. This is the rule of both the official JAX code (DeepMind's
    ``nfnets/agc_optax.py``) and timm's ``adaptive_clip_grad``: per-element clipping of a bias
    would compare each entry with its own, often zero, magnitude, and ε is there for
    zero-initialised weights. (The official code keeps JAX's ``(in, out)`` / ``HWIO`` layouts
    and reduces over the input axes; torch's layout puts the output unit on dim 0, so the units
    are the same. It also counts a weight that squeezes to one dimension, a linear layer with a
    single input, as one unit; normkit, as timm, goes by the number of dimensions. So the gain
    of :class:`normkit.ScaledWSConv2d`, shaped ``(C_out, 1, 1, 1)`` as timm's is, is clipped
    per output channel here and in timm, where the official code's ``(C_out,)`` gain is one
    unit.)

    ε guards zero-initialised weights (a zero-init final layer, Fixup's last branch layers), whose
    gradients would otherwise be clipped to 0. A zero gradient is never clipped (no division by
    zero, no NaN). A non-finite gradient stays non-finite (``inf`` becomes NaN, as with
    ``torch.nn.utils.clip_grad_norm_``): skip such steps (``torch.amp.GradScaler`` does).

    **Exclude the final classifier**, which the paper leaves unclipped: pass the parameters
    without it, for instance::

        head = {id(p) for p in model.fc.parameters()}
        body = [p for p in model.parameters() if id(p) not in head]
        normkit.adaptive_grad_clip_(body, clip_factor=0.01)
        optimizer.step()

    Call it after ``backward()`` (after ``scaler.unscale_(optimizer)`` with a ``GradScaler``)
    and before ``optimizer.step()``. The paper's λ ranges from about 0.01 to 0.16, smaller for
    larger batches. Nothing waits on the device: the computation stays on the gradients'
    device, per parameter, with no ``.item()``.

    Args:
        parameters: a tensor, or an iterable of tensors (``model.parameters()``); those without
            a gradient are skipped.
        clip_factor: λ > 0.
        eps: ε > 0, the smallest weight norm a unit is measured against.

    Returns:
        The number of clipped units, a 0-d ``torch.long`` tensor on the first gradient's device
        (CPU when no parameter has a gradient), for logging; reading it synchronizes, so only do
        that when logging.

    Raises:
        TypeError: ``parameters`` is not a tensor or an iterable of tensors, a gradient is sparse,
            or ``clip_factor``/``eps`` is not a number.
        ValueError: ``clip_factor`` or ``eps`` is not a finite number > 0.

    Example::

        >>> model = torch.nn.Linear(4, 3)
        >>> model(torch.randn(8, 4)).square().sum().backward()
        >>> clipped = normkit.adaptive_grad_clip_(model.parameters(), clip_factor=0.01)
        >>> int(clipped) <= 4  # 3 rows of the weight and the bias
        True
    """
    check_positive(_WHERE, "clip_factor", clip_factor)
    check_positive(_WHERE, "eps", eps)
    counts: list[Tensor] = []
    for p in _tensors(parameters):
        grad = p.grad
        if grad is None:
            continue
        max_norm = _unit_norm(p.detach()).clamp_min(eps) * clip_factor
        grad_norm = _unit_norm(grad)
        clip = grad_norm > max_norm
        # Where a unit is not clipped its norm may be 0: divide by 1 there instead.
        factor = torch.where(clip, max_norm / torch.where(clip, grad_norm, 1.0), 1.0)
        grad.mul_(factor.to(grad.dtype))
        counts.append(clip.sum())
    if not counts:
        return torch.zeros((), dtype=torch.long)
    device = counts[0].device
    return torch.stack([c.to(device) for c in counts]).sum()
