"""The devices that the device-generic tests run on.

By default: the CPU, and CUDA where ``torch.cuda.is_available()``. ``NORMKIT_TEST_DEVICES``
(comma-separated, e.g. ``cuda`` or ``cpu,cuda``) names them instead, so that a GPU machine can run
only the CUDA cases (``benchmarks/device_check.sh`` does). A named device that is not there is a
collection error, not a silent skip.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["ACCELERATORS", "DEVICES", "devices_under_test", "place"]


def devices_under_test(text: str | None = None) -> tuple[str, ...]:
    """The devices named by ``text`` (default: ``$NORMKIT_TEST_DEVICES``), or the available ones."""
    if text is None:
        text = os.environ.get("NORMKIT_TEST_DEVICES", "")
    names = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
    for name in names:
        kind = torch.device(name).type
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"NORMKIT_TEST_DEVICES: expected cpu or cuda devices, got {name!r}")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"NORMKIT_TEST_DEVICES names {name!r}, but CUDA is not available")
    return names


DEVICES: tuple[str, ...] = devices_under_test()
"""Every device under test."""

ACCELERATORS: tuple[str, ...] = tuple(d for d in DEVICES if torch.device(d).type != "cpu")
"""The devices under test other than the CPU (empty on a CPU-only machine)."""


def place(
    args: Sequence[Any],
    device: str | torch.device,
    dtype: torch.dtype | None = None,
    fmt: torch.memory_format = torch.contiguous_format,
) -> tuple[Any, ...]:
    """A call's arguments on ``device``: floating tensors also in ``dtype`` (if given), 4D ones
    in ``fmt``; index tensors moved; anything else (a Python ``int`` domain) as it is."""
    out: list[Any] = []
    for a in args:
        if isinstance(a, Tensor) and a.is_floating_point():
            a = a.to(device=device, dtype=dtype)
            out.append(a.contiguous(memory_format=fmt) if a.dim() == 4 else a)
        elif isinstance(a, Tensor):
            out.append(a.to(device))
        else:
            out.append(a)
    return tuple(out)
