"""The documentation's examples run and show what the code does.

Two sources of examples:

- Every fenced ``python`` block of ``README.md`` and ``docs/*.md``, one case per block. A block
  runs alone in a fresh namespace, except on the pages of ``CONTINUED_PAGES``, whose blocks read
  as one session: there a block's case first runs the page's earlier blocks in the same
  namespace. A block that cannot run in a CPU-only test says so on the line just before its
  fence, ``<!-- not run: REASON -->``, and the list of such blocks is kept short.
- The ``>>>`` examples in the docstrings of every public module of ``normkit`` (no ``_`` in its
  dotted name), one case per module, run by ``doctest`` with ``ELLIPSIS`` and
  ``NORMALIZE_WHITESPACE``. Examples assume ``import torch``, ``from torch import nn`` and
  ``import normkit`` (the module's own globals are there too). Docstrings have no room for a
  marker, so the few examples that cannot run are listed in ``DOCTESTS_NOT_RUN``, with why.

Each block and docstring starts with torch's random generator seeded to 0; the generator and
the norm registry are restored after each case.
"""

from __future__ import annotations

import doctest
import importlib
import io
import pkgutil
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import normkit
import normkit.kernels
from normkit import registry

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# Pages whose blocks continue one another (a later block uses names an earlier one defines).
CONTINUED_PAGES = frozenset({"docs/weight-standardization.md"})

# Docstrings (doctest's name: module, then qualified name) whose examples are not run, and why.
DOCTESTS_NOT_RUN = {
    "normkit.kernels": "enable() compiles the C++ kernels (about 40 s) and turns them on for the "
    "whole process",
    "normkit.checkpoints.load_official_sandwich": "needs an official SaBN checkpoint file (a "
    "download)",
}

# Not-run examples, blocks and doctests together: a growing list means untested docs.
MAX_NOT_RUN = 5

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
_FENCE_CLOSE = re.compile(r"^[ \t]*```[ \t]*$")
_NOT_RUN = re.compile(r"^[ \t]*<!--\s*not run:\s*(?P<reason>.*?)\s*-->[ \t]*$")
_DOCTEST_FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    source: str
    not_run: str | None  # the marker's reason, None for a block that runs

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def _blocks(path: Path) -> list[Block]:
    """Every fenced python block of a page, with the not-run marker just above it, if any."""
    page = path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE_OPEN.match(lines[i])
        if opening is None:
            i += 1
            continue
        end = i + 1
        while end < len(lines) and not _FENCE_CLOSE.match(lines[end]):
            end += 1
        if end == len(lines):
            raise AssertionError(f"{page}:{i + 1}: a fence that is never closed")
        if opening["lang"] == "python":
            indent = len(opening["indent"])
            body = "\n".join(line[indent:] for line in lines[i + 1 : end])
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = _NOT_RUN.match(before)
            reason = marker["reason"] if marker else None
            blocks.append(Block(page, i + 1, body + "\n", reason))
        i = end + 1
    return blocks


BLOCKS = [block for path in PAGES for block in _blocks(path)]


def _exec(block: Block, namespace: dict[str, object]) -> None:
    # Blank lines in front keep the page's line numbers in tracebacks.
    code = compile("\n" * block.line + block.source, str(ROOT / block.page), "exec")
    exec(code, namespace)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """An example may register a norm name or draw random numbers: neither outlives it, and
    none may switch the compiled kernels on or off for the rest of the process."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_CANONICAL", dict(registry._CANONICAL))
    kernels_on = normkit.kernels.is_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield
    assert normkit.kernels.is_enabled() == kernels_on, "an example switched the kernels"


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in BLOCKS if b.not_run is None])
def test_markdown_block_runs(block: Block) -> None:
    earlier = [
        b
        for b in BLOCKS
        if block.page in CONTINUED_PAGES
        and b.page == block.page
        and b.line < block.line
        and b.not_run is None
    ]
    namespace: dict[str, object] = {"__name__": "docs_example"}
    for b in [*earlier, block]:
        _exec(b, namespace)


def test_every_python_fence_is_a_block() -> None:
    for path in PAGES:
        page = path.relative_to(ROOT).as_posix()
        fences = sum("```python" in line for line in path.read_text(encoding="utf-8").splitlines())
        assert fences == sum(b.page == page for b in BLOCKS), page
    assert {b.page for b in BLOCKS} >= CONTINUED_PAGES | {"README.md"}


def _public_modules() -> list[str]:
    names = ["normkit"]
    for info in pkgutil.walk_packages(normkit.__path__, "normkit."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


MODULES = _public_modules()


def _doctests(module_name: str) -> list[doctest.DocTest]:
    """The module's docstrings with examples, a docstring shared by several classes once."""
    module = importlib.import_module(module_name)
    extraglobs = {"torch": torch, "nn": nn, "normkit": normkit}
    found = doctest.DocTestFinder(exclude_empty=True).find(module, extraglobs=extraglobs)
    tests: list[doctest.DocTest] = []
    seen: set[str | None] = set()
    for test in sorted(found, key=lambda t: t.name):
        if test.examples and test.docstring not in seen:
            seen.add(test.docstring)
            tests.append(test)
    return tests


@pytest.mark.parametrize("module_name", MODULES)
def test_docstring_examples_run(module_name: str) -> None:
    runner = doctest.DocTestRunner(optionflags=_DOCTEST_FLAGS)
    report = io.StringIO()
    for test in _doctests(module_name):
        if test.name not in DOCTESTS_NOT_RUN:
            torch.manual_seed(0)
            runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()


def test_not_run_examples_are_few_and_explained() -> None:
    blocks = {b.id: b.not_run for b in BLOCKS if b.not_run is not None}
    assert all(blocks.values()), f"a not-run marker without a reason: {blocks}"
    assert all(DOCTESTS_NOT_RUN.values())
    assert len(blocks) + len(DOCTESTS_NOT_RUN) <= MAX_NOT_RUN, (blocks, DOCTESTS_NOT_RUN)
    names = {test.name for module_name in MODULES for test in _doctests(module_name)}
    assert set(DOCTESTS_NOT_RUN) <= names, "listed, but no such docstring with examples"


def test_not_run_markers_sit_on_python_blocks() -> None:
    marked = {(b.page, b.line) for b in BLOCKS if b.not_run is not None}
    for path in PAGES:
        page = path.relative_to(ROOT).as_posix()
        lines = path.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if "<!--" in line and "not run" in line:
                after = next((j for j in range(i + 1, len(lines)) if lines[j].strip()), None)
                assert after is not None and (page, after + 1) in marked, (
                    f"{page}:{i + 1}: a not-run marker that is not just above a python block"
                )
