"""Passing a domain or class index to every conditional layer of a model.

A model whose ``forward`` knows nothing about domains (an ``nn.Sequential``, a torchvision-style
ResNet built with ``norm_layer=``) can still run conditional layers::

    with normkit.condition(model, domain):
        out = model(x)

Inside the block every conditional layer called without an index uses ``domain``; an index passed
explicitly, ``layer(x, domain)``, still wins. On exit every layer gets back the index it had
before (none, or an outer block's), also when forward raises.

A layer joins by having a class attribute ``takes_domain = True`` and reading its
``context_domain`` attribute when called without an index, as normkit's conditional layers do.

The index lives on the layers, so a model shared by threads that run different domains at the
same time needs one model per thread (as for any module state).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["condition", "conditional_layers"]


def conditional_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` (itself included) that take a domain index, each once."""
    _check_model("conditional_layers", model)
    return [m for m in model.modules() if getattr(type(m), "takes_domain", False)]


def _check_model(where: str, model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where}: expected an nn.Module, got {type(model).__name__}")


def _check_domain(domain: int | Tensor) -> None:
    if isinstance(domain, bool) or not isinstance(domain, (int, Tensor)):
        raise TypeError(
            "condition: expected a domain index as int or integer tensor of shape (N,), got "
            f"{type(domain).__name__}"
        )
    if isinstance(domain, Tensor):
        if domain.dtype.is_floating_point or domain.dtype.is_complex or domain.dtype == torch.bool:
            raise TypeError(f"condition: expected an integer domain tensor, got {domain.dtype}")
        if domain.dim() != 1:
            raise ValueError(
                "condition: expected a domain tensor of shape (N,), one index per sample, got "
                f"shape {tuple(domain.shape)}"
            )


@contextmanager
def condition(model: nn.Module, domain: int | Tensor) -> Iterator[nn.Module]:
    """Run every conditional layer of ``model`` with ``domain`` inside the ``with`` block.

    Args:
        model: any module; its conditional layers (SaBN, CCBN, AuxBN and any layer with
            ``takes_domain = True``) are found by type, however deeply nested or shared.
        domain: a Python int (the whole batch) or an integer tensor of shape ``(N,)``. Values and
            length are checked by each layer at forward, against its own number of domains.

    Nested blocks: the inner index applies inside the inner block, and the outer one again after
    it. The index is cleared on exit, also when the block raises.

    Raises:
        ValueError: ``model`` has no conditional layer (a likely mistake: the index would be
            silently ignored).

    Example::

        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), normkit.SandwichBatchNorm2d(8, 3))
        >>> with normkit.condition(model, torch.tensor([0, 2])):
        ...     out = model(torch.randn(2, 3, 8, 8))
    """
    _check_model("condition", model)
    _check_domain(domain)
    layers = conditional_layers(model)
    if not layers:
        raise ValueError(
            f"condition: expected a model with conditional layers (SaBN, CCBN, AuxBN), got a "
            f"{type(model).__name__} with none"
        )
    previous = [layer.__dict__.get("context_domain") for layer in layers]
    try:
        for layer in layers:
            setattr(layer, "context_domain", domain)  # noqa: B010 (not a Module attribute)
        yield model
    finally:
        for layer, before in zip(layers, previous):
            if before is None:
                layer.__dict__.pop("context_domain", None)
            else:
                setattr(layer, "context_domain", before)  # noqa: B010
