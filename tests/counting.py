"""Counting the calls of a function the code under test looks up by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def count_calls(
    monkeypatch: pytest.MonkeyPatch,
    owner: Any,
    name: str,
    calls: list[str] | None = None,
    *,
    when: Callable[[Any], bool] = lambda result: True,
) -> list[str]:
    """Wrap ``owner.name`` (a module's function or a class's method) so that each call whose
    result passes ``when`` appends ``name`` to ``calls`` (a new list if None), which is
    returned; the wrapper is undone with ``monkeypatch``."""
    counted: list[str] = [] if calls is None else calls
    real = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        if when(result):
            counted.append(name)
        return result

    monkeypatch.setattr(owner, name, wrapper)
    return counted
