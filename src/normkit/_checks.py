"""Argument and input checks shared by every layer.

Every message names the layer, what was expected and what was received, so that a user reading a
traceback from deep inside a model knows which layer refused what. Checks run before any buffer
changes. They look only at shapes and dtypes (static under ``torch.compile``); checks of index
*values* live in :func:`check_index` and stay off the compiled graph.
"""

from __future__ import annotations

import math

import torch
import torch.fx
from torch import Tensor


def _tracing() -> bool:
    # torch.fx passes Proxies: there is nothing to check (shapes are unknown).
    return bool(torch.fx._symbolic_trace.is_fx_symbolic_tracing())


def check_float_input(layer: str, x: Tensor) -> None:
    if _tracing():
        return
    if not isinstance(x, Tensor):
        raise TypeError(f"{layer}: expected a torch.Tensor input, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{layer}: expected a floating-point input, got dtype {x.dtype}")


def check_input(layer: str, x: Tensor, ranks: tuple[int, ...], num_features: int) -> None:
    """Refuse a non-float input, a rank outside ``ranks`` or a wrong channel count (dim 1)."""
    check_float_input(layer, x)
    if _tracing():
        return
    if x.dim() not in ranks:
        want = " or ".join(f"{r}D" for r in ranks)
        raise ValueError(
            f"{layer}: expected {want} input (N, C, ...), got {x.dim()}D input of shape "
            f"{tuple(x.shape)}"
        )
    if x.shape[1] != num_features:
        raise ValueError(
            f"{layer}: expected {num_features} channels (dim 1), got {x.shape[1]} in input of "
            f"shape {tuple(x.shape)}"
        )


def check_same_device(layer: str, role: str, t: Tensor, ref: Tensor) -> None:
    """Refuse a second input (a style, say) on another device than the first."""
    if _tracing():
        return
    if t.device != ref.device:
        raise ValueError(f"{layer}: expected the {role} on device {ref.device}, got {t.device}")


def check_batch_values(layer: str, x: Tensor) -> None:
    """Refuse a training batch with a single value per channel, as ``nn.BatchNorm`` does."""
    shape = x.shape
    if len(shape) < 2:
        return
    channels = shape[1]
    # Values per channel, N · spatial: numel / C without a loop over the shape (this runs on
    # every training forward); a layer with C == 0 has no channel to check.
    if channels and x.numel() == channels:
        raise ValueError(
            f"{layer}: expected more than 1 value per channel when training, got input of shape "
            f"{tuple(x.shape)}; use a larger batch, eval mode, or a micro-batch-safe layer "
            "(GroupNorm, BatchChannelNorm with estimate=True)"
        )


def check_momentum(layer: str, momentum: float | None) -> None:
    if momentum is None:
        return
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"{layer}: expected momentum to be a float or None, got {momentum!r}")
    if not 0.0 <= float(momentum) <= 1.0:
        raise ValueError(f"{layer}: expected momentum in [0, 1] or None, got {momentum}")


def check_positive(layer: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{layer}: expected {name} to be a number, got {value!r}")
    if not value > 0:
        raise ValueError(f"{layer}: expected {name} > 0, got {value}")
    if not math.isfinite(value):  # an eps or a scale of inf only produces zeros or infinities
        raise ValueError(f"{layer}: expected a finite {name} > 0, got {value}")


def check_nonnegative(layer: str, name: str, value: float) -> None:
    """Refuse anything but a finite number >= 0 (an init std: inf or NaN would fill weights)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{layer}: expected {name} to be a number, got {value!r}")
    if not 0.0 <= value < math.inf:
        raise ValueError(f"{layer}: expected {name} >= 0 and finite, got {value}")


def check_flags(layer: str, **flags: object) -> None:
    """Refuse an on/off option that is not a bool (or 0/1): a string such as ``"False"`` would
    silently read as true, and a tensor of several values cannot be read at all."""
    for name, value in flags.items():
        if isinstance(value, bool) or (type(value) is int and value in (0, 1)):
            continue
        raise TypeError(f"{layer}: expected {name} to be a bool, got {value!r}")


def check_dtype(layer: str, dtype: object) -> None:
    """Refuse a ``dtype=`` factory argument that parameters cannot have."""
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{layer}: expected dtype to be a floating-point torch.dtype or None, got {dtype!r}"
        )


def check_count(layer: str, name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{layer}: expected {name} to be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{layer}: expected {name} >= {minimum}, got {value}")


def check_num_groups(layer: str, num_features: int, num_groups: int) -> None:
    """Refuse a group count that is not a positive int dividing ``num_features``."""
    check_count(layer, "num_groups", num_groups)
    if num_features % num_groups != 0:
        raise ValueError(
            f"{layer}: expected num_groups to divide num_features={num_features}, got "
            f"num_groups={num_groups}"
        )


def check_finite(layer: str, name: str, value: float) -> None:
    """Refuse anything but a finite number (an init value of any sign)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{layer}: expected {name} to be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{layer}: expected a finite {name}, got {value}")


def _check_weight_dtype(layer: str, x: Tensor, dtype: torch.dtype) -> None:
    if x.dtype == dtype:
        return
    device = x.device.type
    if torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device):
        return  # autocast casts input and weight to one dtype
    raise TypeError(
        f"{layer}: expected input of dtype {dtype} (the weight's), got {x.dtype}; convert one "
        "of them or run under torch.autocast"
    )


def check_conv_input(
    layer: str,
    x: Tensor,
    in_channels: int,
    dtype: torch.dtype,
    min_sizes: tuple[int, ...],
) -> None:
    """Refuse, before ``F.conv*d`` fails deep inside torch: a non-float input, a dtype other
    than the weight's ``dtype`` (outside autocast), a rank other than batched ``(N, C, *spatial)``
    or unbatched ``(C, *spatial)``, a wrong channel count, or spatial sizes below ``min_sizes``
    (the smallest ones the kernel, dilation and padding accept)."""
    check_float_input(layer, x)
    if _tracing():
        return
    _check_weight_dtype(layer, x, dtype)
    spatial_dims = len(min_sizes)
    if x.dim() not in (spatial_dims + 1, spatial_dims + 2):
        raise ValueError(
            f"{layer}: expected {spatial_dims + 2}D input (N, C, ...) or {spatial_dims + 1}D "
            f"unbatched input (C, ...), got {x.dim()}D input of shape {tuple(x.shape)}"
        )
    channel_dim = x.dim() - spatial_dims - 1
    if x.shape[channel_dim] != in_channels:
        raise ValueError(
            f"{layer}: expected {in_channels} channels (dim {channel_dim}), got "
            f"{x.shape[channel_dim]} in input of shape {tuple(x.shape)}"
        )
    spatial = tuple(x.shape[channel_dim + 1 :])
    if any(s < m for s, m in zip(spatial, min_sizes)):
        raise ValueError(
            f"{layer}: expected spatial sizes of at least {min_sizes} (for the kernel size, "
            f"dilation and padding), got {spatial} in input of shape {tuple(x.shape)}"
        )


def check_linear_input(layer: str, x: Tensor, in_features: int, dtype: torch.dtype) -> None:
    """Refuse a non-float input, a dtype other than the weight's, or a last dimension other
    than ``in_features``, before ``F.linear`` fails deep inside torch."""
    check_float_input(layer, x)
    if _tracing():
        return
    _check_weight_dtype(layer, x, dtype)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(
            f"{layer}: expected input of shape (*, {in_features}), got shape {tuple(x.shape)}"
        )


def check_index(
    layer: str,
    index: int | Tensor,
    num_domains: int,
    batch: int,
    device: torch.device | None = None,
) -> None:
    """Check a domain index: a Python int, or an integer tensor of shape ``(batch,)``.

    ``device`` is the input's: an index on any other device is moved there by the layers,
    except one on the meta device (it has no values), which is refused unless the input is
    on the meta device too.

    Values are checked in eager mode only. For an index on the CPU this costs nothing; for one
    on an accelerator the check is an asynchronous device-side assert, so forward never waits
    on the device. Under ``torch.compile`` only dtype and shape are checked.
    """
    if isinstance(index, bool):
        raise TypeError(f"{layer}: expected a domain index as int or LongTensor, got bool")
    if isinstance(index, int):
        if not 0 <= index < num_domains:
            raise ValueError(f"{layer}: expected a domain index in [0, {num_domains}), got {index}")
        return
    if not isinstance(index, Tensor):
        raise TypeError(
            f"{layer}: expected a domain index as int or integer tensor of shape (N,), got "
            f"{type(index).__name__}"
        )
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(
            f"{layer}: expected an integer domain index tensor (torch.long), got dtype "
            f"{index.dtype}"
        )
    if index.dim() != 1 or index.shape[0] != batch:
        raise ValueError(
            f"{layer}: expected a domain index of shape ({batch},), one per sample, got shape "
            f"{tuple(index.shape)}"
        )
    if index.device.type == "meta":
        if device is not None and device.type != "meta":
            raise ValueError(
                f"{layer}: expected a domain index with values (on the input's device {device}, "
                "or one it can be copied from), got an index on the meta device"
            )
        return  # no values to check
    if torch.compiler.is_compiling() or index.numel() == 0:
        return
    if torch._C._are_functorch_transforms_active():  # vmap and friends forbid reading values
        return
    if index.device.type == "cpu":
        if index.numel() <= 256:  # one conversion instead of two reductions and two reads
            values = index.tolist()
            lo, hi = min(values), max(values)
        else:
            lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= num_domains:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{layer}: expected domain indices in [0, {num_domains}), got {bad}")
    else:
        torch._assert_async(
            ((index >= 0) & (index < num_domains)).all(),
            f"{layer}: domain index out of range [0, {num_domains})",
        )
