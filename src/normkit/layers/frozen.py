"""A batch norm reduced to its eval-mode affine map, with everything in buffers.

The layer of detection and segmentation backbones (torchvision ``ops.FrozenBatchNorm2d``,
detectron2 ``layers.FrozenBatchNorm2d``): a pretrained batch norm whose statistics and affine no
longer train, typically because the fine-tuning batches are too small to estimate statistics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from normkit import functional as F
from normkit._checks import check_count, check_dtype, check_input, check_positive

__all__ = ["FrozenBatchNorm2d"]

# What a plain 2d batch norm holds; anything else (a per-domain affine, BCN's channel part, a
# schedule's state) is computation that a FrozenBatchNorm2d cannot carry.
_BN_STATE = frozenset({"weight", "bias", "running_mean", "running_var", "num_batches_tracked"})


class FrozenBatchNorm2d(nn.Module):
    r"""A 2d batch norm with fixed statistics and affine: ``y = x * scale + shift``.

    .. math::
        y = x \cdot \frac{\gamma}{\sqrt{\mathrm{rv} + \epsilon}}
            + \Bigl(\beta - \mathrm{rm} \cdot \frac{\gamma}{\sqrt{\mathrm{rv} + \epsilon}}\Bigr)

    per channel, which is exactly the eval-mode output of a batch norm with running mean ``rm``,
    running variance ``rv`` (ε inside the square root), scale γ and shift β. ``weight`` (γ),
    ``bias`` (β), ``running_mean`` and ``running_var`` are all **buffers**, initialised to 1, 0, 0
    and 1: the layer has no parameters, nothing in it receives a gradient or is updated, and
    training and eval compute the same function (``model.train()`` changes nothing). Gradients do
    flow to the input. This is the definition of torchvision's ``ops.FrozenBatchNorm2d`` and
    detectron2's ``FrozenBatchNorm2d``; the default ``eps=1e-5`` is torch's batch norm's.

    Arithmetic: the scale and shift are computed in the wider of the buffers' dtype and float32
    (float64 for a float64 input), then cast to the input's dtype, so the output has the input's
    dtype and memory format.

    Getting one:

    * ``FrozenBatchNorm2d.from_batch_norm(bn)`` copies a trained 2d batch norm (torch's
      ``BatchNorm2d`` / ``SyncBatchNorm``, normkit's :class:`SyncBatchNorm`): its statistics,
      affine (1 and 0 without one) and ``eps``, on its device and in its statistics' dtype.
    * It loads a ``BatchNorm2d`` state dict directly (``num_batches_tracked`` is ignored, as
      torchvision does, since nothing here counts batches), and its own state dict loads
      strictly into an ``nn.BatchNorm2d``, which starts its count at 0: BN → frozen → state
      dict → BN gives the batch norm back.
    * ``normkit.convert_norm(model, "frozenbn")`` replaces every ``BatchNorm2d`` of a model.
    * ``norm_layer=normkit.FrozenBatchNorm2d`` builds a model with frozen norms, to load a
      pretrained checkpoint into (torchvision's detection backbones do this).

    When to use which: :func:`normkit.freeze_norm` freezes norms **in place**, keeping their
    class, Parameter objects and every extra part (Sandwich BN's per-domain affines, BCN's
    channel part, an activation fused into a subclass), and :func:`normkit.unfreeze_norm` undoes
    it exactly; use it to freeze for a while (fine-tuning stages, linear probing) in a model you
    keep training. ``FrozenBatchNorm2d`` is a different, smaller module: four buffers and a fused
    scale-and-shift, with no training flag to get wrong and no parameters for an optimizer or
    DDP to see; use it for models whose batch norms stay frozen for good (detection backbones,
    deployment), or to build such models from scratch. (``freeze_norm`` names the class it makes
    from ``nn.BatchNorm2d`` ``FrozenBatchNorm2d`` too; that one is a ``BatchNorm2d`` subclass,
    not this class.) Neither has batch statistics: :func:`normkit.convert_sync` leaves both alone,
    and :func:`normkit.prepare_for_inference` folds this layer into a preceding convolution as it
    does an eval-mode batch norm.

    Shapes:
        - input: ``(N, C, H, W)``.
        - output: the input's shape, dtype and memory format.

    Example::

        >>> bn = torch.nn.BatchNorm2d(8).eval()  # trained
        >>> frozen = normkit.FrozenBatchNorm2d.from_batch_norm(bn)
        >>> x = torch.randn(2, 8, 4, 4)
        >>> torch.allclose(frozen(x), bn(x))
        True
    """

    _ranks: tuple[int, ...] = (4,)
    # Version 1 (nn.Module's): the state dict has no num_batches_tracked, and nn.BatchNorm2d's
    # migration of version-1 checkpoints fills it in, so the state dict loads strictly there.
    _version = 1
    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        check_count(name, "num_features", num_features)
        check_positive(name, "eps", eps)
        check_dtype(name, dtype)
        self.num_features = num_features
        self.eps = eps
        factory = {"device": device, "dtype": dtype}
        for key in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(key, torch.empty(num_features, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The identity map up to ε: scale 1, shift 0, statistics (0, 1)."""
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    @classmethod
    def from_batch_norm(cls, bn: nn.Module) -> FrozenBatchNorm2d:
        """A frozen copy of the 2d batch norm ``bn``, computing what ``bn.eval()`` computes.

        Copies ``running_mean``, ``running_var``, ``eps`` and the affine (1 and 0 when ``bn`` has
        none), on ``bn``'s device, all in its running statistics' dtype. Only a batch norm's
        state is read: a subclass whose forward does more (a fused activation) loses that part.

        Raises:
            TypeError: ``bn`` is not a batch norm (``_BatchNorm``), or holds state beyond a
                plain batch norm's (per-domain affines, BCN's channel part), which the frozen
                layer could not compute.
            ValueError: ``bn`` is a 1d or 3d batch norm, has no running statistics
                (``track_running_stats=False``), or has per-domain statistics.
        """
        where = f"{cls.__name__}.from_batch_norm"
        if not isinstance(bn, _BatchNorm):
            raise TypeError(f"{where}: expected a 2d batch norm, got {type(bn).__name__}")
        name = type(bn).__name__
        if isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm3d)) or 4 not in getattr(bn, "_ranks", (4,)):
            raise ValueError(f"{where}: expected a 2d batch norm, got {name}")
        mean, var = bn.running_mean, bn.running_var
        if mean is None or var is None:
            raise ValueError(
                f"{where}: expected a batch norm with running statistics, got {name} with "
                "track_running_stats=False"
            )
        state = [k for k, _ in bn.named_parameters(recurse=False)]
        state += [k for k, _ in bn.named_buffers(recurse=False)]
        extra = sorted(set(state) - _BN_STATE)
        if extra or next(bn.children(), None) is not None:
            held = ", ".join(extra) if extra else "submodules"
            raise TypeError(
                f"{where}: expected a plain batch norm (weight, bias, running statistics), got "
                f"{name} holding {held}, which {cls.__name__} cannot compute"
            )
        c = bn.num_features
        if tuple(mean.shape) != (c,) or tuple(var.shape) != (c,):
            raise ValueError(
                f"{where}: expected running statistics of shape ({c},), got {name} with shape "
                f"{tuple(mean.shape)} (per-domain statistics?)"
            )
        frozen = cls(c, bn.eps, device=mean.device, dtype=mean.dtype)
        with torch.no_grad():
            frozen.running_mean.copy_(mean)
            frozen.running_var.copy_(var)
            if bn.weight is not None:
                frozen.weight.copy_(bn.weight)
            if bn.bias is not None:
                frozen.bias.copy_(bn.bias)
        return frozen

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
        # A batch norm's count of batches has no meaning here (torchvision drops it too).
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"

    def scale_shift(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """The per-channel ``(scale, shift)`` of ``y = x * scale + shift``, ``(C,)`` each.

        Computed in the wider of the buffers' dtype and the statistics dtype of ``dtype`` (the
        input dtype the pair is for: float32 for half precision, float64 for float64).
        """
        work = self.running_var.dtype
        if dtype is not None:
            work = torch.promote_types(work, F.stats_dtype(dtype))
        scale = self.weight.to(work) * torch.rsqrt(self.running_var.to(work) + self.eps)
        shift = self.bias.to(work) - self.running_mean.to(work) * scale
        return scale, shift

    def forward(self, input: Tensor) -> Tensor:
        check_input(type(self).__name__, input, self._ranks, self.num_features)
        # Under torch.fx the input is a Proxy with no dtype to choose from: the buffers' dtype.
        scale, shift = self.scale_shift(input.dtype if isinstance(input, Tensor) else None)
        # functional.apply_scale_shift for a fixed (N, C, H, W), written out because torch.fx
        # cannot trace its shape arithmetic (feature extractors trace backbones through this).
        view = (1, -1, 1, 1)
        return torch.addcmul(
            shift.to(input.dtype).reshape(view), input, scale.to(input.dtype).reshape(view)
        )
