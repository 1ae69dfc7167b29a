"""SkipInit (De & Smith, NeurIPS 2020) and ReZero (Bachlechner et al., 2020): a zero-initialised
learnable scalar on each residual branch, ``x + α·f(x)``, so that every block starts as the
identity and deep networks train without normalization.
"""

from __future__ import annotations

import torch
from torch import nn

from normkit._checks import check_finite
from normkit.fixup import Scale

__all__ = ["ResidualGate"]


class ResidualGate(Scale):
    r"""A learnable scalar gate on a residual branch: ``y = α·x``, with α initialised to ``init``.

    Used as ``x + gate(f(x))``, it gives the residual block

    .. math:: x_{i+1} = x_i + α_i \, F(x_i)

    of SkipInit and ReZero. With ``init=0`` (both papers' choice) every block is the identity at
    initialization, and the gradient reaches α (it is ``⟨∂L/∂y, F(x)⟩``) while the branch's own
    parameters get none until α has moved away from 0. ReZero uses the same gate in place of
    LayerNorm in Transformers.

    It is :class:`normkit.Scale` (Fixup's scalar multiplier) with another initial value, so it
    shares its code path and rules:

    * the parameter is ``weight``, shape ``(1,)`` (the name torch gives learnable multipliers;
      SkipInit code calls it ``skipinit_gain``, the ReZero package ``resweight``);
    * the output keeps the input's dtype (α is cast to it), so the gate does not promote
      half-precision activations;
    * tools that select Fixup scalars by module type select it too: :func:`normkit.fixup_init_`
      resets it to ``init``, :func:`normkit.fixup_param_groups` gives it the scalar learning
      rate, and :func:`normkit.bn_param_groups` puts it in the no-weight-decay group (decay
      would pull α, and with it the branch, back to 0).

    Args:
        init: the initial α, any finite number (0 for SkipInit and ReZero; a small value such as
            0.1 for a branch that should contribute from the start).

    Shapes:
        - input: any shape. - output: the input's shape and dtype.

    Checked against the papers: the gate multiplies the branch output only (not the skip path),
    it is one scalar per block, and it starts at 0 with no normalization in the block.

    Example::

        >>> f = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
        >>> gate = normkit.ResidualGate()
        >>> x = torch.randn(2, 8)
        >>> torch.equal(x + gate(f(x)), x)  # the identity at init
        True
    """

    def __init__(
        self,
        init: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        check_finite(type(self).__name__, "init", init)
        # Read by reset_parameters, which Scale.__init__ calls.
        self.init = float(init)
        super().__init__(device=device, dtype=dtype)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, self.init)

    def extra_repr(self) -> str:
        return f"init={self.init}"
