"""Filter Response Normalization and the Thresholded Linear Unit (Singh & Krishnan, CVPR 2020).

FRN divides each (sample, channel) map by its root mean square, without centring, and applies a
per-channel affine; TLU is a ReLU with a learned threshold, ``max(y, τ)``, which the paper pairs
with FRN because un-centred activations may sit anywhere. Neither uses batch statistics: each
sample is normalized alone and training equals evaluation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from normkit import functional as F
from normkit._checks import check_count, check_dtype, check_flags, check_input, check_positive
from normkit._fused import _view

__all__ = ["TLU", "FilterResponseNorm2d"]

LEARNED_EPS_INIT = 1e-4
"""Initial value of FRN's learned ε (TF Addons' ``learned_epsilon`` starts there too). Not 0:
the subgradient of ``|ε|`` that torch uses at 0 is 0, so an ε starting at 0 would never move."""


def _threshold(y: Tensor, tau: Tensor) -> Tensor:
    """``max(y, τ)`` with one τ per channel, in ``y``'s dtype (a float32 τ must not promote a
    half-precision activation)."""
    return torch.maximum(y, _view(tau.to(y.dtype), y))


def _mean_square(x: Tensor) -> Tensor:
    """ν² = mean of x² over the spatial dimensions, ``(N, C)``, in the statistics dtype.

    With no spatial dimensions (``(N, C)`` input) it is x² itself.
    """
    xf = x.to(F.stats_dtype(x.dtype)).square()
    if x.dim() == 2:
        return xf
    return xf.mean(dim=list(range(2, x.dim())))


class TLU(nn.Module):
    r"""Thresholded Linear Unit (Singh & Krishnan, CVPR 2020), FRN's activation.

    .. math::
        z = \max(y, τ) = \mathrm{ReLU}(y − τ) + τ

    with one learned threshold ``tau`` per channel, initialised to 0 (so TLU starts as a ReLU).
    ``tau`` gets gradient exactly where ``y < τ``; at a tie ``y = τ`` torch's ``maximum`` splits
    the gradient in half between the two.

    Shapes:
        - input: ``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)`` or ``(N, C, D, H, W)``.
        - output: same shape, dtype and memory format (τ is cast to the input's dtype).

    Example::

        >>> tlu = normkit.TLU(64)
        >>> tlu(torch.randn(8, 64, 4, 4)).shape
        torch.Size([8, 64, 4, 4])
    """

    _ranks: tuple[int, ...] = (2, 3, 4, 5)

    def __init__(self, num_features: int, device: Any = None, dtype: Any = None) -> None:
        super().__init__()
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        check_dtype(name, dtype)
        self.num_features = num_features
        self.tau = nn.Parameter(torch.empty(num_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """τ to 0."""
        nn.init.zeros_(self.tau)

    def extra_repr(self) -> str:
        return f"{self.num_features}"

    def forward(self, input: Tensor) -> Tensor:
        check_input(type(self).__name__, input, self._ranks, self.num_features)
        return _threshold(input, self.tau)


class FilterResponseNorm2d(nn.Module):
    r"""Filter Response Normalization with its TLU (Singh & Krishnan, CVPR 2020, arXiv 1911.09737).

    .. math::
        ν^2_{nc} = \frac{1}{HW}\sum_{h,w} x_{nchw}^2,\qquad
        \hat x = \frac{x}{\sqrt{ν^2_{nc} + ε_{\mathrm{eff}}}},\qquad
        y = γ_c \hat x + β_c,\qquad z = \max(y, τ_c)

    Each (sample, channel) map is divided by its root mean square (no mean is subtracted: ν² is
    the mean *square*, not a variance), so a sample's output never depends on the rest of the
    batch and training and eval compute the same function. There are no running statistics.

    ε sits inside the square root. ``learnable_eps=False`` (default): ``ε_eff = eps``.
    ``learnable_eps=True``: ``ε_eff = eps + |ε_l|`` with ``ε_l`` the scalar parameter
    ``learned_eps`` (shape ``(1,)``), initialised to ``1e-4``. The paper learns ``|ε|`` for
    1×1 maps and dense layers, where ``x̂ = x / sqrt(x² + ε)`` is otherwise nearly ``sign(x)``
    with a vanishing gradient; normkit keeps the constant ``eps`` as a floor under the learned
    part, so that ``ε_l`` crossing 0 cannot divide by zero (TF Addons' parameterization; the
    paper's listing adds ``|ε|`` alone).

    ``tlu=True`` (default) applies the TLU inside, as the paper pairs them: ``z = max(y, τ)``
    with the per-channel ``tau`` initialised to 0; ``tlu=False`` returns ``y`` (plain FRN, for
    a block that ends without activation, or with another one).

    Parameters and their names: ``weight`` (γ, init 1) and ``bias`` (β, init 0) with
    ``affine=True``; ``tau`` with ``tlu=True``; ``learned_eps`` with ``learnable_eps=True``.

    Numerics: ν² is computed in float32 for half-precision inputs (in the input's dtype for
    float32 and float64); the output has the input's dtype and memory format.

    Checked against the paper's definition and its TensorFlow listing: ν² the mean square over
    the spatial extent per sample and channel, ``x · rsqrt(ν² + |ε|)``, the affine, then
    ``max(y, τ)`` with τ initialised to 0, and ``eps = 1e-6``. timm's ``FilterResponseNormTlu2d``
    (same parameter names, whose checkpoints load here) uses ``eps = 1e-5``, has no learned ε,
    and squares half-precision input before upcasting it (which overflows float16 from
    ``|x| ≈ 256``); normkit upcasts first.

    Args:
        num_features: C.
        eps: the constant ε (> 0); 1e-6, the paper's.
        affine: learn γ and β.
        device, dtype: factory arguments of the parameters.
        learnable_eps: add the learned ``|ε_l|`` to ``eps``.
        tlu: apply the TLU.

    Shapes:
        - input: ``(N, C, H, W)``, or ``(N, C)`` for a dense layer (H·W = 1: ν² = x²).
        - output: same shape, dtype and memory format.

    Example::

        >>> frn = normkit.FilterResponseNorm2d(64)  # FRN + TLU, replacing BN + ReLU
        >>> frn(torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 64, 8, 8])
        >>> head = normkit.FilterResponseNorm2d(128, learnable_eps=True)  # after a Linear
        >>> head(torch.randn(2, 128)).shape
        torch.Size([2, 128])
    """

    _ranks: tuple[int, ...] = (2, 4)
    weight: nn.Parameter | None
    bias: nn.Parameter | None
    tau: nn.Parameter | None
    learned_eps: nn.Parameter | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-6,
        affine: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        learnable_eps: bool = False,
        tlu: bool = True,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        check_positive(name, "eps", eps)
        check_flags(name, affine=affine, learnable_eps=learnable_eps, tlu=tlu)
        check_dtype(name, dtype)
        self.num_features = num_features
        self.eps = eps
        self.affine = bool(affine)
        self.learnable_eps = bool(learnable_eps)
        self.tlu = bool(tlu)
        factory = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features, **factory))
            self.bias = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if tlu:
            self.tau = nn.Parameter(torch.empty(num_features, **factory))
        else:
            self.register_parameter("tau", None)
        if learnable_eps:
            self.learned_eps = nn.Parameter(torch.empty(1, **factory))
        else:
            self.register_parameter("learned_eps", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """γ to 1, β and τ to 0, the learned ε to 1e-4."""
        with torch.no_grad():
            if self.weight is not None and self.bias is not None:
                self.weight.fill_(1.0)
                self.bias.zero_()
            if self.tau is not None:
                self.tau.zero_()
            if self.learned_eps is not None:
                self.learned_eps.fill_(LEARNED_EPS_INIT)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, affine={self.affine}, "
            f"learnable_eps={self.learnable_eps}, tlu={self.tlu}"
        )

    def forward(self, input: Tensor) -> Tensor:
        check_input(type(self).__name__, input, self._ranks, self.num_features)
        nu2 = _mean_square(input)
        eps: float | Tensor = self.eps
        if self.learned_eps is not None:
            eps = self.eps + self.learned_eps.abs().to(nu2.dtype)
        scale = torch.rsqrt(nu2 + eps)
        if self.weight is not None and self.bias is not None:
            scale = scale * self.weight
            shift = self.bias.to(scale.dtype).expand_as(scale)
        else:
            shift = torch.zeros_like(scale)
        y = F.apply_scale_shift(input, scale, shift)
        if self.tau is not None:
            y = _threshold(y, self.tau)
        return y
