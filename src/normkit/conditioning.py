"""Passing a domain or class index to every conditional layer of a model.

A model whose ``forward`` knows nothing about domains (an ``nn.Sequential``, a torchvision-style
ResNet built with ``norm_layer=``) can still run conditional layers::

    with normkit.condition(model, domain):
        out = model(x)

Inside the block every conditional layer called without an index uses ``domain``; an index passed
explicitly, ``layer(x, domain)``, still wins. When the block exits (also when forward raises)
its index stops applying: each layer uses the innermost block still open, or none.

A layer joins by having a class attribute ``takes_domain = True`` and reading its
``context_domain`` attribute when called without an index, as normkit's conditional layers do.
``context_domain`` is a descriptor (:class:`_ContextDomain`, installed on a layer class that lacks
it the first time the class is conditioned): it gives the index of the innermost open block for
the calling thread, else a value assigned to the attribute (``prepare_for_inference(model,
domain=k)`` assigns one), else None.

Where the index lives: each open block is an entry in a per-layer, per-thread stack (a
``threading.local`` in the layer's ``__dict__``), and leaving a block removes its own entry. So
blocks need not close in LIFO order, and threads conditioning one model with different domains at
once each see their own. Asyncio tasks share their thread's stack: tasks that ``await`` inside
blocks on one model with different domains see the most recently entered one. The stack is not
copied: ``copy.deepcopy``, pickling, ``torch.save(model)`` made inside a block give a model with
no index; a ``torch.nn.DataParallel`` replica (made inside the block, run by another thread) gets
the index active when it was made. ``torch.compile`` reads the stack through guards, so a compiled
model follows the index of each call without a graph break.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["condition", "conditional_layers"]


DomainIndex = int | Tensor

# The key of a layer's stack of open blocks in its ``__dict__`` (shared by a shallow copy, such as
# a DataParallel replica; a deep copy or an unpickled model gets an empty one).
_STACK_KEY = "_normkit_condition_stack"


class _Stack(threading.local):
    """The open ``condition`` blocks of one layer in the calling thread, innermost last.

    ``domain`` (the innermost block's index, or None) is kept apart from ``entries`` so that a
    compiled forward reads, and guards on, the index alone.
    """

    entries: tuple[tuple[object, DomainIndex], ...] = ()
    domain: DomainIndex | None = None

    def push(self, token: object, domain: DomainIndex) -> None:
        self.entries = (*self.entries, (token, domain))
        self.domain = domain

    def remove(self, token: object) -> None:
        self.entries = tuple(e for e in self.entries if e[0] is not token)
        self.domain = self.entries[-1][1] if self.entries else None

    def __reduce__(self) -> tuple[Any, ...]:
        # Never copied nor pickled with its layer: a copy starts with no open block.
        return (_Stack, ())


class _ContextDomain:
    """``layer.context_domain``: the innermost open block's index in this thread, else a value
    assigned to the attribute (kept in the instance ``__dict__``, copied with the layer), else
    the class default (None)."""

    def __init__(self, default: Any = None) -> None:
        self.default = default

    def __get__(self, layer: Any, owner: type | None = None) -> Any:
        if layer is None:
            return self.default
        stack = layer.__dict__.get(_STACK_KEY)
        if stack is not None:
            domain = stack.domain
            if domain is not None:
                return domain
        return layer.__dict__.get("context_domain", self.default)

    def __set__(self, layer: Any, value: Any) -> None:
        layer.__dict__["context_domain"] = value

    def __delete__(self, layer: Any) -> None:
        layer.__dict__.pop("context_domain", None)


def _join(layer: nn.Module) -> _Stack:
    """The stack of ``layer`` (made on first use), its class given the descriptor if it lacks it."""
    cls = type(layer)
    found = inspect.getattr_static(cls, "context_domain", None)
    if not isinstance(found, _ContextDomain):
        if hasattr(type(found), "__get__"):
            raise TypeError(
                f"condition: expected {cls.__name__}.context_domain to be a plain value or "
                f"normkit's descriptor, got a {type(found).__name__}"
            )
        setattr(cls, "context_domain", _ContextDomain(found))  # noqa: B010
    stack: _Stack = layer.__dict__.setdefault(_STACK_KEY, _Stack())
    return stack


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
    it. The index is cleared on exit, also when the block raises. The index is per thread, and
    blocks may exit in any order (each removes its own index).

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
    stacks = [_join(layer) for layer in layers]
    token = object()  # this block's entry, removed on exit wherever it is in the stack
    try:
        for stack in stacks:
            stack.push(token, domain)
        yield model
    finally:
        for stack in stacks:
            stack.remove(token)
