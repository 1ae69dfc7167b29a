"""Synchronized layers when ranks go wrong: clear errors instead of hangs, aborts or garbage.

Each scenario runs two gloo CPU processes (``torch.multiprocessing``, spawn) with a short process
group timeout, as ``tests/test_distributed.py`` does; each rank writes what it saw (the error's
type and message, and how long it waited) to a JSON file that the test reads:

* ranks whose layers disagree (``num_features``, ``num_domains``, ``num_groups``, the layer
  class): every rank gets a ``ValueError`` naming the layer and the per-rank values, raised before
  any statistics are exchanged, and the process group stays usable;
* a rank that raises before a collective and exits: the other rank gets a ``RuntimeError`` naming
  the layer at once (gloo sees the closed connection);
* a rank that raises before the backward collective and stays alive (it never joins): the other
  rank gets the same kind of error after the process group's timeout, not a hang.

Two process pairs in all (the mismatch cases and the exiting rank share one), to keep the time
spent starting processes low.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import normkit as nk
from tests.gloo import init_gloo

WORLD = 2
TIMEOUT_S = 5.0  # the process group timeout of every scenario


def _init(rank: int, store: str) -> None:
    init_gloo(rank, store, WORLD, TIMEOUT_S)


def _caught(call: Callable[[], Any]) -> dict[str, Any]:
    """Run ``call``; what it raised (or None), and how long it took."""
    start = time.monotonic()
    try:
        call()
    except Exception as e:  # the test checks the type
        return {"type": type(e).__name__, "message": str(e), "seconds": time.monotonic() - start}
    return {"type": None, "message": "", "seconds": time.monotonic() - start}


def _write(out_dir: str, rank: int, result: Any) -> None:
    path = Path(out_dir) / f"rank{rank}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)


def _synced(layer: nn.Module) -> nn.Module:
    return nk.convert_sync(layer).train()


# ---------------------------------------------------------------------------------------------
# Ranks whose layers disagree.

# name -> (layer of rank 0, layer of rank 1, input channels of each rank); EXPECTED_DIFF holds
# what the message must say about the per-rank values.
MISMATCHES: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple[int, int]]] = {
    "num_features": (
        lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True),
        lambda: nk.SandwichBatchNorm2d(6, 3, split_stats=True),
        (4, 6),
    ),
    "num_domains-split": (
        lambda: nk.SandwichBatchNorm2d(4, 2, split_stats=True),
        lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True),
        (4, 4),
    ),
    "num_domains-shared": (
        lambda: nk.CategoricalConditionalBatchNorm2d(4, 2),
        lambda: nk.CategoricalConditionalBatchNorm2d(4, 3),
        (4, 4),
    ),
    "split_stats": (
        lambda: nk.SandwichBatchNorm2d(4, 3),
        lambda: nk.SandwichBatchNorm2d(4, 3, split_stats=True),
        (4, 4),
    ),
    "layer-class": (
        lambda: nk.SandwichBatchNorm2d(4, 3),
        lambda: nk.CategoricalConditionalBatchNorm2d(4, 3),
        (4, 4),
    ),
    "num_groups": (
        lambda: nk.BatchChannelNorm2d(4, 2),
        lambda: nk.BatchChannelNorm2d(4, 4),
        (4, 4),
    ),
    "bn-num_features": (lambda: nn.BatchNorm2d(4), lambda: nn.BatchNorm2d(8), (4, 8)),
}
EXPECTED_DIFF = {
    "num_features": "num_features per rank is [4, 6]",
    "num_domains-split": "num_domains per rank is [2, 3]",
    "num_domains-shared": "num_domains per rank is [2, 3]",
    "split_stats": "split_stats per rank is [0, 1]",
    "layer-class": "layer class per rank differs",
    "num_groups": "num_groups per rank is [2, 4]",
    "bn-num_features": "num_features per rank is [4, 8]",
}


def _forward(layer: nn.Module, channels: int, seed: int) -> torch.Tensor:
    x = torch.randn(3, channels, 2, 2, generator=torch.Generator().manual_seed(seed))
    if getattr(type(layer), "takes_domain", False):
        return layer(x, torch.tensor([0, 1, 1]))
    return layer(x)


def _mismatch_worker(rank: int, store: str, out_dir: str) -> None:
    _init(rank, store)
    results: dict[str, Any] = {}
    for name, (first, second, channels) in MISMATCHES.items():
        layer = _synced((first, second)[rank]())
        before = {k: v.clone() for k, v in layer.state_dict().items()}
        results[name] = _caught(lambda m=layer, c=channels[rank]: _forward(m, c, rank))
        results[name]["buffers_kept"] = all(
            torch.equal(v, layer.state_dict()[k]) for k, v in before.items()
        )
    # The group still works: matching layers synchronize (equal running statistics).
    layer = _synced(nk.SandwichBatchNorm2d(4, 3, split_stats=True))
    results["after"] = _caught(lambda: _forward(layer, 4, rank))
    results["after"]["running_mean"] = layer.running_mean.tolist()
    # Then rank 1 raises before the next collective and exits.
    if rank == 1:
        results["exit"] = _caught(lambda: _bad_step(layer))
        _write(out_dir, rank, results)
        raise SystemExit(3)  # the process ends: its connections close
    results["exit"] = _caught(lambda: _forward(layer, 4, rank))
    _write(out_dir, rank, results)


# ---------------------------------------------------------------------------------------------
# A rank that raises before a collective.


def _bad_step(layer: nn.Module) -> None:
    # A wrong channel count: the layer refuses it before any collective.
    layer(torch.randn(3, 5, 2, 2), 0)


def _alive_peer_worker(rank: int, store: str, out_dir: str) -> None:
    _init(rank, store)
    torch.manual_seed(0)
    layer = _synced(nk.SandwichBatchNorm2d(4, 3, split_stats=True))
    x = torch.randn(3, 4, 2, 2, requires_grad=True)
    layer(x, torch.tensor([0, 1, 2])).sum().backward()  # one good synchronized step
    out = layer(x, 1)  # the forward of the next step, synchronized
    if rank == 1:
        # The loss fails before backward; the rank stays alive but never joins the backward
        # collective that rank 0 waits in.
        seen = _caught(lambda: _bad_step(layer))
        _write(out_dir, rank, seen)
        deadline = time.monotonic() + 4 * TIMEOUT_S
        while not (Path(out_dir) / "rank0.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    _write(out_dir, rank, _caught(lambda: out.sum().backward()))


# ---------------------------------------------------------------------------------------------


def _spawn(tmp: Path, target: Callable[..., None], *args: Any) -> list[Any]:
    ctx = mp.get_context("spawn")
    store = str(tmp / "store")
    procs = [
        ctx.Process(target=target, args=(rank, store, str(tmp), *args)) for rank in range(WORLD)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 45  # a hang fails the test well within a minute
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert not hung, f"processes {hung} still running after 45 s"
    results = []
    for rank in range(WORLD):
        path = tmp / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote no result (exit code {procs[rank].exitcode})"
        results.append(json.loads(path.read_text()))
    return results


@pytest.fixture(scope="module")
def mismatch_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return _spawn(tmp_path_factory.mktemp("dist-mismatch"), _mismatch_worker)


@pytest.mark.parametrize("case", list(MISMATCHES))
def test_ranks_with_different_layers_get_a_clear_error_on_every_rank(
    case: str, mismatch_results: list[dict[str, Any]]
) -> None:
    for rank in range(WORLD):
        seen = mismatch_results[rank][case]
        assert seen["type"] == "ValueError", (rank, seen)
        message = seen["message"]
        layer = "SyncBatchNorm" if case.startswith("bn-") else None
        name = layer or (MISMATCHES[case][rank]().__class__.__name__)
        assert message.startswith(f"{name}: expected the same synchronized layer"), message
        assert EXPECTED_DIFF[case] in message, message
        assert f"this rank: {rank}" in message, message
        assert seen["buffers_kept"], f"rank {rank} changed its buffers"
        assert seen["seconds"] < TIMEOUT_S, seen  # found by the check, not by a timeout


def test_process_group_still_works_after_a_refused_mismatch(
    mismatch_results: list[dict[str, Any]],
) -> None:
    a, b = (mismatch_results[rank]["after"] for rank in range(WORLD))
    assert a["type"] is None and b["type"] is None, (a, b)
    # Synchronized statistics: equal running buffers on both ranks, though their inputs differ.
    assert a["running_mean"] == b["running_mean"]
    assert a["running_mean"] != [[0.0] * 4] * 3


def _assert_peer_error(seen: dict[str, Any], what: str) -> None:
    assert seen["type"] == "RuntimeError", seen
    message = seen["message"]
    assert message.startswith(f"SandwichBatchNorm2d: {what} over the 2 ranks"), message
    assert "a peer rank failed, exited or did not join" in message
    assert "init_process_group(timeout=...)" in message


def test_rank_that_raises_and_exits_fails_the_peer_at_once(
    mismatch_results: list[dict[str, Any]],
) -> None:
    waiting, faulty = (mismatch_results[rank]["exit"] for rank in range(WORLD))
    # The faulty rank's own error is the layer's input check, raised before any collective.
    assert faulty["type"] == "ValueError" and "expected 4 channels" in faulty["message"]
    _assert_peer_error(waiting, "the all-reduce of batch statistics")
    assert "Connection closed by peer" in waiting["message"]
    assert waiting["seconds"] < TIMEOUT_S, waiting  # a closed connection is seen at once


def test_rank_that_never_joins_the_backward_collective_times_the_peer_out(
    tmp_path: Path,
) -> None:
    waiting, faulty = _spawn(tmp_path, _alive_peer_worker)
    assert faulty["type"] == "ValueError" and "expected 4 channels" in faulty["message"]
    _assert_peer_error(waiting, "the all-reduce of the statistics' gradient")
    # Waited for the process group's timeout, then gave up (gloo says it timed out).
    assert "Timed out" in waiting["message"]
    assert TIMEOUT_S - 0.5 <= waiting["seconds"] < TIMEOUT_S + 10, waiting
